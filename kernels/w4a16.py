"""Weight-only INT4 linear (W4A16) in Triton; layout and arithmetic in :mod:`diffboost.ops.w4a16`.

The layers this serves (adaLN / timestep modulation) run on a handful of rows, so the kernel is built to stream the
packed weight once: each program owns a ``BLOCK_N`` slice of output channels (and a ``BLOCK_M`` slice of rows, one
for a modulation layer) and walks K one group at a time. Per group the nibbles are sign-extended in registers (as in
:mod:`diffboost.kernels.w4a4`), converted to x's dtype (exact: they are small integers), and one tensor-core dot with
fp32 accumulation gives the group's partial sums, which the group's scale multiplies in fp32. fp32 inputs (and the
interpreter, whose 16-bit dots are wrong) take an exact fp32 dot instead.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .w4a4 import _round_to, _unpack_int4

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _linear_kernel(
    X, QW, WScale, Bias, Out,
    M, N, K, stride_xm, stride_om,
    G: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Out-of-range rows / columns wrap to valid ones (unmasked loads); the store drops them.
    rows = (offs_m % M).to(tl.int64)
    cols = (offs_n % N).to(tl.int64)
    offs_g = tl.arange(0, G)
    offs_h = tl.arange(0, G // 2)
    x_ptrs = X + rows[:, None] * stride_xm + offs_g[None, :]
    w_ptrs = QW + cols[:, None] * (K // 2) + offs_h[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for g in range(0, K // G):
        x = tl.load(x_ptrs)
        w = _unpack_int4(tl.load(w_ptrs), BLOCK_N, G)
        if DOT_FP32:
            part = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
        else:
            part = tl.dot(x, tl.trans(w.to(x.dtype)))
        scale = tl.load(WScale + g * N + cols).to(tl.float32)
        acc += part * scale[None, :]
        x_ptrs += G
        w_ptrs += G // 2
    if HAS_BIAS:
        acc += tl.load(Bias + cols).to(tl.float32)[None, :]
    out_mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    out_ptrs = Out + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, _round_to(acc, Out.dtype.element_ty), mask=out_mask)


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
    group = k // wscales.shape[0]
    block_m = 16 if m <= 16 or _INTERPRET else min(64, triton.next_power_of_2(m))
    block_n = 64 if m <= 16 or _INTERPRET else 128
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m))
    _linear_kernel[grid](
        x, qweight, wscales, bias if bias is not None else wscales, out,
        m, n, k, x.stride(0), out.stride(0),
        G=group, HAS_BIAS=bias is not None, DOT_FP32=_INTERPRET or x.dtype == torch.float32,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4, num_stages=3,
    )
