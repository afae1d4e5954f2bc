"""Weight-only INT4 linear (W4A16) in Triton; layout and arithmetic in :mod:`diffboost.ops.w4a16`.

Each program owns a ``BLOCK_M x BLOCK_N`` output tile and walks K one group at a time. Per group the weight tile's
nibbles become fp32 values in registers (one bitwise op and one subtraction each, see ``_dequantize``; compiled for
sm_90 the loop no longer has the quarter-rate int-to-float conversion, 32 of them per warp and group), are
interleaved back into channel order, multiplied by the group's scale in fp32 (exact) and rounded to x's dtype: the
dequantized tile feeds an ordinary 16-bit tensor-core dot with fp32 accumulation. The dequantization costs
``BLOCK_N*G`` operations per group, shared by the tile's ``BLOCK_M`` rows, so large-M layers can run close to a
16-bit GEMM while reading a quarter of its weight bytes; one-row layers (adaLN modulation) stream the packed weight
once. The product is computed transposed, ``out^T = W x^T``: the weight tile, produced in registers, is the dot's
first operand (which Hopper's wgmma reads from registers, so it never goes through shared memory), and x, loaded as
is, the second; with a handful of rows the tile is then a natural ``64 x 16`` wgmma shape. fp32 inputs (and the
interpreter, whose 16-bit dots are wrong) take an exact fp32 dot.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .w4a4 import _INTERPRET, _round_to, _tile_indices


# 2^23 + 8 and the bits of 2^23: a nibble n in offset binary (n ^ 8 for a two's complement one) OR'd into the
# mantissa of 2^23 reads as 2^23 + n as an fp32, so subtracting 2^23 + 8 leaves the nibble's signed value exactly.
_NIBBLE_MAGIC = tl.constexpr(8388616.0)
_NIBBLE_MAGIC_BITS = tl.constexpr(0x4B000008)


@triton.jit
def _dequantize(packed, scale, ROWS: tl.constexpr, G: tl.constexpr):
    """``uint8 [ROWS, G/2]`` packed nibbles times their rows' ``scale`` in fp32, ``[ROWS, G]`` in channel order (x
    is in channel order). Each nibble becomes an fp32 with one bitwise op and one subtraction: the integer to float
    conversion instruction runs at a quarter of the rate, and it bounded the loop."""
    p = packed.to(tl.int32)
    lo = ((p & 0xF) ^ _NIBBLE_MAGIC_BITS).to(tl.float32, bitcast=True) - _NIBBLE_MAGIC
    hi = (((p >> 4) & 0xF) ^ _NIBBLE_MAGIC_BITS).to(tl.float32, bitcast=True) - _NIBBLE_MAGIC
    return tl.reshape(tl.join(lo * scale[:, None], hi * scale[:, None]), [ROWS, G])


@triton.jit
def _linear_kernel(
    X, QW, WScale, Bias, Out,
    M, N, K, stride_xm, stride_om,
    G: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
):
    offs_m, offs_n, rows, cols = _tile_indices(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_g = tl.arange(0, G)
    offs_h = tl.arange(0, G // 2)
    x_ptrs = X + rows[:, None] * stride_xm + offs_g[None, :]
    w_ptrs = QW + cols[:, None] * (K // 2) + offs_h[None, :]
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)  # transposed: out^T = W x^T
    for g in range(0, K // G):
        x = tl.load(x_ptrs)
        scale = tl.load(WScale + g * N + cols).to(tl.float32)
        w = _round_to(_dequantize(tl.load(w_ptrs), scale, BLOCK_N, G), X.dtype.element_ty)  # exact products
        if DOT_FP32:
            acc += tl.dot(w.to(tl.float32), tl.trans(x.to(tl.float32)), input_precision="ieee")
        else:
            acc += tl.dot(w, tl.trans(x))
        x_ptrs += G
        w_ptrs += G // 2
    if HAS_BIAS:
        acc += tl.load(Bias + cols).to(tl.float32)[:, None]
    out_mask = (offs_n < N)[:, None] & (offs_m < M)[None, :]
    out_ptrs = Out + offs_m.to(tl.int64)[None, :] * stride_om + offs_n[:, None]
    tl.store(out_ptrs, _round_to(acc, Out.dtype.element_ty), mask=out_mask)


def _config(m: int) -> triton.Config:
    """Launch config from the number of rows: small tiles that stream the weight for a few rows (modulation
    layers), 128 x 128 tensor-core tiles for many."""
    if _INTERPRET:  # the interpreter pays per program and per op: few, large tiles
        return triton.Config({"BLOCK_M": 16 if m <= 16 else 64, "BLOCK_N": 64, "GROUP_M": 4}, num_warps=4,
                             num_stages=1)
    if m <= 16:
        return triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "GROUP_M": 1}, num_warps=4, num_stages=4)
    if m <= 64:
        return triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "GROUP_M": 8}, num_warps=4, num_stages=4)
    return triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "GROUP_M": 8}, num_warps=8, num_stages=3)


def linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    wscales: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor,
) -> None:
    """Launch ``out [M, N] = x [M, K] @ dequant(qweight)^T + bias`` (x already divided by the smoothing factors).

    Inputs are validated by :mod:`diffboost.ops.w4a16`: x with unit stride along K, contiguous ``qweight [N, K/2]``,
    ``wscales [K/G, N]`` and ``bias [N]``; ``out`` has unit stride along N and x's dtype.
    """
    m, n = out.shape
    k = x.shape[1]
    if m == 0 or n == 0:
        return
    config = _config(m)
    grid = (triton.cdiv(m, config.kwargs["BLOCK_M"]) * triton.cdiv(n, config.kwargs["BLOCK_N"]),)
    _linear_kernel[grid](
        x, qweight, wscales, bias if bias is not None else wscales, out,
        m, n, k, x.stride(0), out.stride(0),
        G=k // wscales.shape[0], HAS_BIAS=bias is not None, DOT_FP32=_INTERPRET or x.dtype == torch.float32,
        **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages,
    )
