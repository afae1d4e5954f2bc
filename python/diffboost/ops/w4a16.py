"""``diffboost.ops.w4a16``: 4-bit weights x 16-bit activations (weight-only INT4) for linear layers.

The weight-only companion of :mod:`diffboost.ops.w4a4`. By default it serves the layers where quantizing the
activations costs too much accuracy and buys no speed: the adaLN / timestep modulation projections of DiTs and
U-Nets. They run on one row per sample (the conditioning vector), so they are bound by reading the weight, which INT4
makes ~3.5x smaller; and their outputs scale and shift every token of a block, so their inputs stay exact. SVDQuant's
FLUX models keep these layers in W4A16 the same way (AWQ-style). It also serves whole models on GPUs without INT4
tensor cores (Hopper): the weight is dequantized tile by tile in registers, a cost shared by all the rows of a tile,
where W4A4 pays a per-group scaling of every output element (see :mod:`diffboost.kernels.w4a4`).

Layout: the weight half of the W4A4 layout (:mod:`diffboost.ops.w4a4`), no low-rank branch:
``qweight uint8 [N, K/2]`` (symmetric INT4, two per byte, low nibble first), ``wscales [K/G, N]`` 16-bit,
``smooth [K]`` or None (the weight was multiplied by it per input channel, the layer divides its input by it), and
``bias [N]`` or None.

Arithmetic (every backend computes this; the reference is its definition): ``xs = x`` or, with ``smooth``,
``xs = (x * (1 / smooth))`` in fp32 rounded to x's dtype; the weight is dequantized to x's dtype,
``w = round(q * wscale)`` (the product is exact in fp32, then rounded once to nearest even); ``out = xs @ w^T + bias``
with fp32 accumulation, in x's dtype. Backends differ only by the order of the fp32 sums.

Backends: ``cpu`` (fp32: ``_C`` dequantizes the weight a chunk of rows at a time, torch's GEMM multiplies),
``triton`` (``kernels/w4a16.py``: unpacks and dequantizes each weight tile in registers, 16-bit tensor-core dots),
``reference`` (dequantize, one matmul).
"""

from __future__ import annotations

from typing import Optional

import torch

from diffboost.ops.registry import Backend, get_op
from diffboost.ops.w4a4 import _FLOAT_DTYPES, _as_rows, _cuda_device, _validate_layer_input, _validate_weights
from diffboost.ops.w4a4 import _smoothed as _smoothed_fp32

__all__ = ["W4A16_OP", "dequantize", "w4a16_linear", "w4a16_linear_reference"]

W4A16_OP = get_op("w4a16_linear", "weight-only INT4 linear: packed INT4 weights, 16-bit activations, group scales")


def _smoothed(x: torch.Tensor, smooth: Optional[torch.Tensor]) -> torch.Tensor:
    """``x / smooth`` as the W4A4 activation pass computes it, rounded to x's dtype (the GEMM's 16-bit operand)."""
    return x if smooth is None else _smoothed_fp32(x, smooth).to(x.dtype)


def dequantize(qweight: torch.Tensor, wscales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The ``[N, K]`` weight in ``dtype``: ``q * wscale`` in fp32 (exact), rounded once to ``dtype``."""
    n, k = qweight.shape[0], qweight.shape[1] * 2
    groups = wscales.shape[0]
    b = qweight.view(torch.int8)  # arithmetic shifts on int8 sign-extend the nibbles, as the kernels do
    q = torch.stack(((b << 4) >> 4, b >> 4), dim=-1).view(n, groups, k // groups)
    return (q * wscales.t().float().unsqueeze(-1)).view(n, k).to(dtype)


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
    out = _smoothed(x, smooth).to(compute) @ dequantize(qweight, wscales, x.dtype).to(compute).t()
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


#: Weight elements the CPU backend dequantizes at a time for a few rows (fp32 scratch of 16 MiB): the whole layer for
#: most, chunks of rows for the largest. From ``_CPU_WHOLE_ROWS`` rows on, the whole weight is dequantized at once:
#: the activations are as large, and one GEMM over all the columns runs faster than several (measured on a 2-core
#: CPU: 4096 x 3072 x 3072 took 1.6x as long in 1365-column chunks).
_CPU_CHUNK_ELEMENTS = 1 << 22
_CPU_WHOLE_ROWS = 64


def _cpu_linear(x, qweight, wscales, smooth, bias):
    from diffboost import _ext
    from diffboost.ops.w4a4 import _f32

    xs = _smoothed(x, smooth)
    n, k = qweight.shape[0], qweight.shape[1] * 2
    rows = n if x.shape[0] >= _CPU_WHOLE_ROWS else max(1, min(n, _CPU_CHUNK_ELEMENTS // k))
    scales = _f32(wscales)
    chunks = []
    for begin in range(0, n, rows):
        end = min(n, begin + rows)
        w = torch.empty(end - begin, k)  # a fresh buffer per chunk: autograd may keep the previous one
        _ext.get_ext().w4a16_dequantize_cpu(qweight.data_ptr(), scales.data_ptr(), n, k, k // wscales.shape[0],
                                            begin, end, w.data_ptr(), torch.get_num_threads())
        chunks.append(xs @ w.t())
    out = chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=1)
    return out if bias is None else out + bias.float()


W4A16_OP.register(
    Backend(
        name="cpu",
        impl=_cpu_linear,
        devices=("cpu",),
        dtypes=(torch.float32,),
        needs=("_C",),
        description="C++ dequantization of the INT4 weight, a chunk of rows at a time, then torch's fp32 GEMM",
    )
)
W4A16_OP.register(
    Backend(
        name="triton",
        impl=_triton_linear,
        devices=("cuda",),
        dtypes=_FLOAT_DTYPES,
        needs=("triton",),
        min_capability=(8, 0),
        description="Triton weight-only INT4 GEMM: weight tiles dequantized in registers, 16-bit tensor-core dots",
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
        backend: ``"auto"``, ``"cpu"``, ``"triton"`` or ``"reference"``.

    Returns:
        ``[..., N]`` in x's dtype.
    """
    fn = "w4a16_linear"
    n, k, groups = _validate_weights(fn, qweight, wscales, None, bias)
    _validate_layer_input(fn, x, qweight, k, groups, smooth, None)
    return _entry()(_as_rows(x, k), qweight, wscales, smooth, bias, backend).view(*x.shape[:-1], n)
