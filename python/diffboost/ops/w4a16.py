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

Backends: ``cpu`` (fp32 and bf16: fewer than 64 rows in ``_C`` with the weight dequantized in registers; more rows
as one torch fp32 GEMM on the weight ``_C`` dequantizes),
``triton`` (``kernels/w4a16.py``: unpacks and dequantizes each weight tile in registers, 16-bit tensor-core dots),
``reference`` (dequantize, one matmul).
"""

from __future__ import annotations

from typing import Optional

import torch

from diffboost.ops.registry import Backend, get_op
from diffboost.ops.w4a4 import (
    _CPU_DTYPE_CODES,
    _FLOAT_DTYPES,
    _as_rows,
    _cuda_device,
    _f32,
    _ptr,
    _validate_layer_input,
    _validate_weights,
)
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


#: Rows below which the CPU backend multiplies with the weight dequantized in registers (``_C.w4a16_gemm_rows_cpu``,
#: which reads the packed weight once per 4 rows); from here on it dequantizes the whole weight once and runs torch's
#: fp32 GEMM. Measured on a 2-core AVX2 CPU (fp32; K x N = 3072 x 9216, 3072 x 3072, 1280 x 1280): the register
#: path is 1.1-3.2x faster at 16-48 rows and ties at 64 on the smallest shape.
_CPU_FEW_ROWS = 64


def gemm_rows_cpu(xs, qweight, wscales, bias, out, level: str = "auto") -> None:
    """Launch the C++ few-row kernel into ``out [M, N]`` (x's dtype, unit stride along N) on ``xs [M, K]`` (fp32 or
    bf16, unit stride along K, already smoothed). ``level``: ``"auto"`` or a SIMD level (``"scalar"``, ``"avx2"``,
    ``"avx512_vnni"``; raises if it is not compiled in or this CPU lacks it)."""
    from diffboost import _ext

    n, k = qweight.shape[0], qweight.shape[1] * 2
    _ext.get_ext().w4a16_gemm_rows_cpu(
        level, xs.data_ptr(), _CPU_DTYPE_CODES[xs.dtype], xs.shape[0], k, xs.stride(0), qweight.data_ptr(),
        _f32(wscales).data_ptr(), n, k // wscales.shape[0], _ptr(_f32(bias)), out.data_ptr(), out.stride(0),
        torch.get_num_threads(),
    )


def _cpu_linear(x, qweight, wscales, smooth, bias):
    from diffboost import _ext

    xs = _smoothed(x, smooth)
    n, k = qweight.shape[0], qweight.shape[1] * 2
    if x.shape[0] < _CPU_FEW_ROWS:
        out = torch.empty(x.shape[0], n, dtype=x.dtype)
        gemm_rows_cpu(xs, qweight, wscales, bias, out)
        return out
    # bf16 runs as an fp32 GEMM on the bf16-rounded weight (the definition), not as torch's CPU bf16 GEMM: without
    # AVX-512 BF16 that one is ~8x slower than fp32.
    w = torch.empty(n, k)
    _ext.get_ext().w4a16_dequantize_cpu(qweight.data_ptr(), _f32(wscales).data_ptr(), n, k, k // wscales.shape[0],
                                        x.dtype == torch.bfloat16, w.data_ptr(), torch.get_num_threads())
    out = xs.float() @ w.t()
    return (out if bias is None else out + bias.float()).to(x.dtype)


W4A16_OP.register(
    Backend(
        name="cpu",
        impl=_cpu_linear,
        devices=("cpu",),
        dtypes=(torch.float32, torch.bfloat16),
        needs=("_C",),
        description="C++: few rows with the weight dequantized in registers (AVX2 / scalar), more rows as a torch "
        "fp32 GEMM on a dequantized copy",
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
