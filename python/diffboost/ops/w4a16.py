"""``diffboost.ops.w4a16``: 4-bit weights x 16-bit activations (weight-only INT4) for linear layers.

The weight-only companion of :mod:`diffboost.ops.w4a4`, for the layers where quantizing the activations costs too
much accuracy and buys no speed: the adaLN / timestep modulation projections of DiTs and U-Nets. They run on one row
per sample (the conditioning vector), so they are bound by reading the weight, which INT4 makes ~3.5x smaller; and
their outputs scale and shift every token of a block, so their inputs stay exact. SVDQuant's FLUX models keep these
layers in W4A16 the same way (AWQ-style).

Layout: the weight half of the W4A4 layout (:mod:`diffboost.ops.w4a4`), no low-rank branch:
``qweight uint8 [N, K/2]`` (symmetric INT4, two per byte, low nibble first), ``wscales [K/G, N]`` 16-bit,
``smooth [K]`` or None (the weight was multiplied by it per input channel, the layer divides its input by it), and
``bias [N]`` or None.

Arithmetic (every backend computes this; the reference is its definition): ``xs = x`` or, with ``smooth``,
``xs = (x * (1 / smooth))`` in fp32 rounded to x's dtype; ``out = sum_g (xs_g . q_g) * wscales_g + bias`` with fp32
accumulation, in x's dtype. The INT4 values are exact in every float type and ``q * wscale`` is exact in fp32, so
backends differ only by the order of the fp32 sums.

Backends: ``triton`` (``kernels/w4a16.py``: unpacks the nibbles in registers, one 16-bit tensor-core dot per group,
the group scale applied in fp32), ``reference`` (dequantize, one matmul).
"""

from __future__ import annotations

from typing import Optional

import torch

from diffboost.ops.registry import Backend, get_op
from diffboost.ops.w4a4 import _FLOAT_DTYPES, _check_tensor, _cuda_device, _validate_weights, unpack_int4

__all__ = ["W4A16_OP", "w4a16_linear", "w4a16_linear_reference"]

W4A16_OP = get_op("w4a16_linear", "weight-only INT4 linear: packed INT4 weights, 16-bit activations, group scales")


def _smoothed(x: torch.Tensor, smooth: Optional[torch.Tensor]) -> torch.Tensor:
    if smooth is None:
        return x
    s = smooth.float()
    return (x.float() * (torch.ones_like(s) / s)).to(x.dtype)


def w4a16_linear_reference(
    x: torch.Tensor,
    qweight: torch.Tensor,
    wscales: torch.Tensor,
    smooth: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    *,
    compute: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The weight-only layer in PyTorch on a 2-D ``x [M, K]``: dequantize the weight, one matmul in ``compute``.

    ``compute=torch.float64`` makes it the oracle for the kernel's fp32 sums. Returns ``[M, N]`` in x's dtype.
    """
    n, k = qweight.shape[0], qweight.shape[1] * 2
    groups = wscales.shape[0]
    w = unpack_int4(qweight).to(compute).view(n, groups, k // groups) * wscales.t().to(compute).unsqueeze(-1)
    out = _smoothed(x, smooth).to(compute) @ w.view(n, k).t()
    if bias is not None:
        out += bias.to(compute)
    return out.to(x.dtype)


def _triton_linear(x, qweight, wscales, smooth, bias):
    from diffboost.kernels import w4a16 as kernels

    xs = _smoothed(x, smooth)
    out = torch.empty(x.shape[0], qweight.shape[0], dtype=x.dtype, device=x.device)
    with _cuda_device(x):
        kernels.linear(xs, qweight, wscales, bias, out)
    return out


def _reference_linear(x, qweight, wscales, smooth, bias):
    return w4a16_linear_reference(x, qweight, wscales, smooth, bias)


W4A16_OP.register(
    Backend(
        name="triton",
        impl=_triton_linear,
        devices=("cuda",),
        dtypes=_FLOAT_DTYPES,
        needs=("triton",),
        min_capability=(8, 0),
        description="Triton weight-only INT4 GEMM: nibbles unpacked in registers, 16-bit tensor-core dots",
    )
)
W4A16_OP.register(
    Backend(name="reference", impl=_reference_linear, description="PyTorch dequantize + matmul reference (test oracle)")
)


def _run(x, qweight, wscales, smooth, bias, backend):
    args = (x, qweight, wscales, smooth, bias)
    return W4A16_OP.select(x.device, x.dtype, *args, backend=backend).impl(*args)


def _entry():
    # One opaque node under torch.compile; in eager mode the dispatch layers would cost more than a small layer.
    return torch.ops.diffboost.w4a16_linear if torch.compiler.is_compiling() else _run


@torch.library.custom_op("diffboost::w4a16_linear", mutates_args=())
def _linear_op(
    x: torch.Tensor,
    qweight: torch.Tensor,
    wscales: torch.Tensor,
    smooth: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    backend: str,
) -> torch.Tensor:
    return _run(x, qweight, wscales, smooth, bias, backend)


@_linear_op.register_fake
def _linear_fake(x, qweight, wscales, smooth, bias, backend):
    return x.new_empty((x.shape[0], qweight.shape[0]))


def w4a16_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    wscales: torch.Tensor,
    *,
    smooth: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """A weight-only INT4 linear layer over x's leading dims (layout and arithmetic in the module docstring).

    Args:
        x: ``[..., K]`` fp16/bf16/fp32, any strides.
        qweight, wscales: packed ``uint8 [N, K/2]`` and ``[K/G, N]`` scales (G = 32, 64 or 128).
        smooth: ``[K]`` or None.
        bias: ``[N]`` or None.
        backend: ``"auto"``, ``"triton"`` or ``"reference"``.

    Returns:
        ``[..., N]`` in x's dtype.
    """
    fn = "w4a16_linear"
    n, k, _groups = _validate_weights(fn, qweight, wscales, None, bias)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{fn}: x dtype {x.dtype} not supported (float16, bfloat16, float32)")
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"{fn}: x's last dim must be the layer's in_features K={k}, got shape {list(x.shape)}")
    if x.device != qweight.device:
        raise ValueError(f"{fn}: x is on {x.device}, qweight on {qweight.device}")
    if smooth is not None:
        _check_tensor(fn, "smooth", smooth, _FLOAT_DTYPES, (k,), x.device)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return _entry()(x2, qweight, wscales, smooth, bias, backend).view(*lead, n)
