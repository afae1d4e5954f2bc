"""Fused attention forward in Triton: exact (flash-style) and INT8-QK (SageAttention's method).

Layout is SDPA's ``(batch, heads, seq, head_dim)`` with arbitrary strides, so the strided views that diffusers'
processors make with ``view(...).transpose(1, 2)`` are read in place.

Head dims. Tensor-core dots need power-of-two tiles of at least 16 along the reduction, and the head dims of
diffusion models are often not powers of two (SD 1.5: 40/80/160, PixArt: 72). Padding 80 to 128 or 160 to 256
wastes a third of the work, so the head dim is split into a power-of-two main part ``D0`` (columns ``[0, D0)``) and
a power-of-two tail ``D1`` that covers the *last* ``D1`` columns, ``[D - D1, D)``: 80 = 64 + 16, 160 = 128 + 32,
112 = 64 + 64 (16 columns overlap). Every dot is done once per part and the output has two accumulators.
Overlapped columns are zeroed in Q's tail (registers, once per program), so they count once in ``Q K^T``; the
tail's output is stored before the main part's, which then overwrites the overlap. The tail is thus read without
any column mask.

Head dims that are not multiples of 16 (40 and 72 among diffusion models) are zero-padded to the next one, in copies
of Q, K and V made by the launcher, and the output is copied back: 40 runs as 48 = 32 + 16, 72 as 80 = 64 + 16. The
dots do the same work as a split of 40 into 32 + 16 columns with 8 overlapping, but such a tail starts off a
16-column boundary, and Triton 3.6 on an H100 miscompiled it (wrong values and illegal memory accesses) with key
tiles of 64 or more, and also its column-masked variant. Those head dims therefore ran 32-key tiles, which compiled
for sm_90 to 7.4 (40) and 9.2 (72) instructions per key and warp in the main loop, against 4.9 and 5.3 for the
padded kernel with 64-key tiles (``python -m benchmarks.kernel_report``); the copies cost about four extra passes
over Q, K and V.
On the INT8 path, whose dots are at least 32 deep, head dims 8 and 16 have a masked main part of 32 instead.

INT8 path. The mean of K over tokens is subtracted (softmax is invariant to adding a constant to a row of scores,
and it removes the channel offsets that make K hard to quantize); K is quantized per token in a pre-pass
(:func:`quantize_k`, which writes K's two parts side by side), Q per token inside the attention kernel while its
tile is resident. ``Q K^T`` runs on INT8 tensor cores with INT32 accumulation; the scores are converted to fp32
exactly with an integer add and a float subtract and scaled by K's per-token scales, and Q's per-row scales join
the softmax scale in exp2's argument. ``P V`` stays in 16-bit with fp32 accumulation.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from ._launch import launch_first_fitting, sm_count

LOG2E = 1.4426950408889634
# 1.5 * 2^23 and its bit pattern: (i + bits) read as fp32, minus the value, is the integer i exactly for |i| < 2^22.
_ROUND_MAGIC = tl.constexpr(12582912.0)
_ROUND_MAGIC_BITS = tl.constexpr(0x4B400000)

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def split_head_dim(head_dim: int, min_tail: int = 16) -> tuple[int, int]:
    """Split ``head_dim`` into a power-of-two main part and a power-of-two tail (0 when not needed).

    ``min_tail`` is the smallest reduction width a tensor-core dot accepts for the operand type (16 for 16-bit,
    32 for INT8). The tail covers ``head_dim - main`` columns and is padded (masked) up to its power of two.
    """
    main = 1 << (head_dim.bit_length() - 1)
    main = max(main, min_tail)
    rest = head_dim - main
    if rest <= 0:
        return main, 0
    return main, max(triton.next_power_of_2(rest), min_tail)


def _heuristic_configs(d_total: int, lq: int, programs: int, sm_count: int) -> list[triton.Config]:
    """Launch configs chosen from the tile shape alone (no tuning run; see ``DIFFBOOST_AUTOTUNE``), best first: the
    others use less shared memory, for GPUs where the first does not fit (see ``launch_first_fitting``).

    ``programs`` is the number of 128-row query tiles over batch and heads: when that does not fill the GPU once (SD
    1.5's 256-token level: 32 tiles for 132 SMs), 64-row tiles double the programs; at most 64 queries get 64-row
    tiles too. 64-key tiles everywhere: compiled for sm_90 they take 1.4-1.5x fewer instructions per key than 32-key
    tiles (kernel_report), without spills up to head dim 256.
    """
    if _INTERPRET:  # the interpreter pays per program and per op, not per FLOP: few, large tiles
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=1)]
    block_m, warps = (128, 8) if lq > 64 and programs >= sm_count else (64, 4)
    stages = 3 if d_total <= 128 else 2  # num_stages=1 gave wrong results on Hopper with split head dims (Triton 3.6)
    configs = [triton.Config({"BLOCK_M": block_m, "BLOCK_N": 64}, num_warps=warps, num_stages=stages)]
    if stages > 2:
        configs.append(triton.Config({"BLOCK_M": block_m, "BLOCK_N": 64}, num_warps=warps, num_stages=2))
    configs.append(triton.Config({"BLOCK_M": block_m, "BLOCK_N": 32}, num_warps=warps, num_stages=2))
    if block_m == 128:
        configs.append(triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=2))
    return configs


def _tuning_configs():
    configs = []
    for block_m in (64, 128):
        for block_n in (32, 64, 128):
            for warps in (4, 8):
                for stages in (2, 3, 4):
                    configs.append(
                        triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)
                    )
    return configs


def _prune(configs, named_args, **kwargs):
    """Drop configs whose tiles cannot fit in registers/shared memory for this head dim, or that are wasteful for
    short sequences (a 128-row Q tile for a single query)."""
    d_total = kwargs["D0"] + kwargs["D1"]
    lq, lk = named_args["Lq"], named_args["Lk"]
    kept = []
    for c in configs:
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        if c.num_stages < 2:  # num_stages=1 gave wrong results on Hopper with split head dims (Triton 3.6)
            continue
        if d_total > 128 and (bn > 64 or (bm == 128 and c.num_warps < 8)):
            continue
        if d_total > 128 and c.num_stages > 3:
            continue
        if bm > max(64, triton.next_power_of_2(lq)) or bn > max(32, triton.next_power_of_2(lk)):
            continue
        if bm == 128 and c.num_warps == 4:
            continue
        kept.append(c)
    return kept or configs[:1]


# Opt-in autotuning: every distinct (Lq, Lk, head dim, ...) is tuned once per process, which costs seconds of
# compilation per shape; the heuristic config is within a few percent on the shapes we benchmark.
AUTOTUNE = os.environ.get("DIFFBOOST_AUTOTUNE", "0") not in ("", "0") and not _INTERPRET


@triton.jit
def _attn_tile(
    acc0, acc1, l_i, m_i, q0, q1, q_scale, qk_scale, start_n,
    k_base, v_base, ks_base, m_base, stride_mm, stride_mn,
    stride_kn, stride_kd, stride_vn, stride_vd,
    offs_m, row_ok, offs_d0, col0_ok, offs_d1, offs_k1, Lk,
    D0: tl.constexpr, D1: tl.constexpr, MASK_D0: tl.constexpr, MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr,
    INT8: tl.constexpr, DOT_F32: tl.constexpr, EVEN: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One key/value tile of the online softmax. ``EVEN``: the tile lies fully inside ``Lk`` (no bounds checks)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    col_ok = offs_n < Lk
    k0_ptrs = k_base + offs_n[None, :] * stride_kn + offs_d0[:, None] * stride_kd
    if EVEN and not MASK_D0:
        kt0 = tl.load(k0_ptrs)
    else:
        kt0 = tl.load(k0_ptrs, mask=col_ok[None, :] & col0_ok[:, None], other=0.0)
    if INT8:
        s = tl.dot(q0, kt0, out_dtype=tl.int32)
    else:
        if DOT_F32:
            kt0 = kt0.to(tl.float32)
        s = tl.dot(q0, kt0)
    if D1 > 0:
        k1_ptrs = k_base + offs_n[None, :] * stride_kn + offs_k1[:, None] * stride_kd
        if EVEN:
            kt1 = tl.load(k1_ptrs)
        else:
            kt1 = tl.load(k1_ptrs, mask=col_ok[None, :], other=0.0)
        if INT8:
            s += tl.dot(q1, kt1, out_dtype=tl.int32)
        else:
            if DOT_F32:
                kt1 = kt1.to(tl.float32)
            s += tl.dot(q1, kt1)
    if INT8:
        if EVEN:
            k_scale = tl.load(ks_base + offs_n)
        else:
            k_scale = tl.load(ks_base + offs_n, mask=col_ok, other=0.0)
        # INT32 to fp32 by an integer add and a float subtract, exact for |s| <= 127^2 * 256 < 2^22 (the conversion
        # instruction runs at a quarter of the rate). K's per-token scale is applied here, Q's per-row scale (which
        # carries qk_scale) with the rows' max and in exp2's argument below, as qk_scale is.
        s = ((s + _ROUND_MAGIC_BITS).to(tl.float32, bitcast=True) - _ROUND_MAGIC) * k_scale[None, :]
        scale = q_scale[:, None]
        row_scale = q_scale
    else:
        # Scaling is folded into exp2's argument below (one FMA per score instead of a multiply and a subtract).
        scale = qk_scale
        row_scale = qk_scale

    if MASK_KIND != 0:
        m_ptrs = m_base + offs_m[:, None] * stride_mm + offs_n[None, :] * stride_mn
        m_ok = row_ok[:, None] & col_ok[None, :]
        if MASK_KIND == 1:
            keep = tl.load(m_ptrs, mask=m_ok, other=0) != 0
            s = tl.where(keep, s, float("-inf"))
        else:
            s = s * scale + tl.load(m_ptrs, mask=m_ok, other=0.0).to(tl.float32) * 1.4426950408889634
            scale = 1.0
            row_scale = 1.0
    if not EVEN:
        s = tl.where(col_ok[None, :], s, float("-inf"))
    if IS_CAUSAL:
        s = tl.where(offs_m[:, None] >= offs_n[None, :], s, float("-inf"))

    # -inf stays -inf under the positive scale (the op requires scale > 0 for this kernel).
    m_new = tl.maximum(m_i, tl.max(s, axis=1) * row_scale)
    # A row that has seen only masked keys keeps m = -inf; shift by 0 there so exp2 gives 0, not NaN.
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_shift)
    p = tl.math.exp2(s * scale - m_shift[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)

    v0_ptrs = v_base + offs_n[:, None] * stride_vn + offs_d0[None, :] * stride_vd
    if EVEN and not MASK_D0:
        v0 = tl.load(v0_ptrs)
    else:
        v0 = tl.load(v0_ptrs, mask=col_ok[:, None] & col0_ok[None, :], other=0.0)
    p_v = p.to(v0.dtype)
    if DOT_F32:  # keep the rounding of P to 16 bits, compute the product in fp32
        p_v = p_v.to(tl.float32)
        v0 = v0.to(tl.float32)
    acc0 = acc0 * alpha[:, None] + tl.dot(p_v, v0)
    if D1 > 0:
        v1_ptrs = v_base + offs_n[:, None] * stride_vn + offs_d1[None, :] * stride_vd
        if EVEN:
            v1 = tl.load(v1_ptrs)
        else:
            v1 = tl.load(v1_ptrs, mask=col_ok[:, None], other=0.0)
        if DOT_F32:
            v1 = v1.to(tl.float32)
        acc1 = acc1 * alpha[:, None] + tl.dot(p_v, v1)
    m_i = m_new
    return acc0, acc1, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, Out, Lse, Mask, KScale, KMean,
    qk_scale,  # softmax scale * log2(e): scores are kept in the log2 domain so exp2 can be used
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_ksb, stride_ksh,
    H, Lq, Lk,
    D: tl.constexpr,  # the true head dim; the main part covers [0, D0), the tail [D - D1, D)
    D0: tl.constexpr, D1: tl.constexpr,
    MASK_KIND: tl.constexpr,  # 0: none, 1: boolean (True = attend), 2: additive
    IS_CAUSAL: tl.constexpr,
    INT8: tl.constexpr,
    WRITE_LSE: tl.constexpr,
    DOT_F32: tl.constexpr,  # under the interpreter 16-bit dots are wrong or inexact: upcast operands there
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d0 = tl.arange(0, D0)
    row_ok = offs_m < Lq

    q_base = Q + off_b * stride_qb + off_h * stride_qh
    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh

    # Only head dims below the smallest dot width (16 on the INT8 path) have masked columns in the main part.
    if D0 > D:
        col0_ok = offs_d0 < D
    else:
        col0_ok = offs_d0 < D0
    q0 = tl.load(
        q_base + offs_m[:, None] * stride_qm + offs_d0[None, :] * stride_qd,
        mask=row_ok[:, None] & col0_ok[None, :],
        other=0.0,
    )
    if D1 > 0:
        offs_d1 = (D - D1) + tl.arange(0, D1)
        new1 = offs_d1 >= D0  # tail columns the main part does not cover
        if INT8:
            offs_k1 = D0 + tl.arange(0, D1)  # quantize_k stored the tail right after the main part
        else:
            offs_k1 = offs_d1
        q1 = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d1[None, :] * stride_qd, mask=row_ok[:, None], other=0.0)
        q1 = tl.where(new1[None, :], q1, tl.zeros_like(q1))

    if INT8:
        # Per-token symmetric quantization of the resident Q tile; the softmax scale is folded into its scale.
        q0f = q0.to(tl.float32)
        amax = tl.max(tl.abs(q0f), axis=1)
        if D1 > 0:
            q1f = q1.to(tl.float32)
            amax = tl.maximum(amax, tl.max(tl.abs(q1f), axis=1))
        amax = tl.maximum(amax, 1e-12)
        inv = 127.0 / amax
        q_scale = amax / 127.0 * qk_scale
        q0 = tl.floor(q0f * inv[:, None] + 0.5).to(tl.int8)
        if D1 > 0:
            q1 = tl.floor(q1f * inv[:, None] + 0.5).to(tl.int8)
    elif DOT_F32:
        q0 = q0.to(tl.float32)
        if D1 > 0:
            q1 = q1.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    if D1 > 0:
        acc1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32)
    else:  # placeholders so the tile function has one signature; never read when D1 == 0
        acc1, q1, offs_d1, offs_k1 = acc0, q0, offs_d0, offs_d0
    if not INT8:
        q_scale = m_i  # placeholder: the exact path scales by qk_scale

    # Full key tiles run without bounds checks; the ragged last tile (and causal tiles) with them.
    if IS_CAUSAL:  # top-left aligned, as torch's is_causal: query i sees keys 0..i
        hi_full = 0
        hi = tl.minimum(Lk, (start_m + 1) * BLOCK_M)
    else:
        hi_full = (Lk // BLOCK_N) * BLOCK_N
        hi = Lk
    for start_n in range(0, hi_full, BLOCK_N):
        acc0, acc1, l_i, m_i = _attn_tile(
            acc0, acc1, l_i, m_i, q0, q1, q_scale, qk_scale, start_n,
            k_base, v_base, KScale + off_b * stride_ksb + off_h * stride_ksh,
            Mask + off_b * stride_mb + off_h * stride_mh, stride_mm, stride_mn,
            stride_kn, stride_kd, stride_vn, stride_vd,
            offs_m, row_ok, offs_d0, col0_ok, offs_d1, offs_k1, Lk,
            D0, D1, D0 > D, MASK_KIND, False, INT8, DOT_F32, True, BLOCK_N,
        )
    for start_n in range(hi_full, hi, BLOCK_N):
        acc0, acc1, l_i, m_i = _attn_tile(
            acc0, acc1, l_i, m_i, q0, q1, q_scale, qk_scale, start_n,
            k_base, v_base, KScale + off_b * stride_ksb + off_h * stride_ksh,
            Mask + off_b * stride_mb + off_h * stride_mh, stride_mm, stride_mn,
            stride_kn, stride_kd, stride_vn, stride_vd,
            offs_m, row_ok, offs_d0, col0_ok, offs_d1, offs_k1, Lk,
            D0, D1, D0 > D, MASK_KIND, IS_CAUSAL, INT8, DOT_F32, False, BLOCK_N,
        )

    # Rows with no visible key (fully masked) produce zeros and lse = -inf rather than NaN.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o_base = Out + off_b * stride_ob + off_h * stride_oh
    if D1 > 0:
        out1 = acc1 / l_safe[:, None]
        tl.store(
            o_base + offs_m[:, None] * stride_om + offs_d1[None, :] * stride_od,
            out1.to(Out.dtype.element_ty),
            mask=row_ok[:, None],
        )
        # The main part's store below must land after the tail's on the overlapping columns.
        tl.debug_barrier()
    out0 = acc0 / l_safe[:, None]
    tl.store(
        o_base + offs_m[:, None] * stride_om + offs_d0[None, :] * stride_od,
        out0.to(Out.dtype.element_ty),
        mask=row_ok[:, None] & col0_ok[None, :],
    )
    if WRITE_LSE:
        # Natural-log LSE of the true (scaled, masked) scores, as flash-attention reports it.
        lse = (m_i + tl.math.log2(l_i)) / 1.4426950408889634
        if INT8:
            # Smoothing subtracted q . mean(K) * scale from every score of a row; add it back so the LSE is that
            # of the unsmoothed scores and partial results merge correctly. KMean is (B, H, D) contiguous.
            km0 = tl.load(KMean + off_bh * D + offs_d0, mask=col0_ok, other=0.0)
            corr = tl.sum(q0f * km0[None, :], axis=1)
            if D1 > 0:
                km1 = tl.load(KMean + off_bh * D + offs_d1)
                corr += tl.sum(q1f * km1[None, :], axis=1)
            lse += corr * (qk_scale / 1.4426950408889634)
        tl.store(Lse + off_bh.to(tl.int64) * Lq + offs_m, lse, mask=row_ok)


_attn_fwd_tuned = triton.autotune(
    configs=_tuning_configs(),
    key=["Lq", "Lk", "D", "D0", "D1", "MASK_KIND", "IS_CAUSAL", "INT8", "WRITE_LSE"],
    prune_configs_by={"early_config_prune": _prune},
)(_attn_fwd_kernel)


@triton.jit
def _quantize_k_kernel(
    K, KMean, KQ, KScale,
    stride_kb, stride_kh, stride_kn, stride_kd,
    H, Lk,
    D: tl.constexpr,
    SMOOTH: tl.constexpr,
    D0: tl.constexpr, D1: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_n < Lk
    offs_d0 = tl.arange(0, D0)
    if D0 > D:
        col0_ok = offs_d0 < D
    else:
        col0_ok = offs_d0 < D0
    k_base = K + off_b * stride_kb + off_h * stride_kh
    k0 = tl.load(
        k_base + offs_n[:, None] * stride_kn + offs_d0[None, :] * stride_kd,
        mask=row_ok[:, None] & col0_ok[None, :],
        other=0.0,
    ).to(tl.float32)
    if SMOOTH:
        k0 -= tl.load(KMean + off_bh * D + offs_d0, mask=col0_ok, other=0.0)[None, :]
    amax = tl.max(tl.abs(k0), axis=1)
    if D1 > 0:
        # Same tail as the attention kernel: the last D1 columns, with those the main part covers zeroed.
        offs_d1 = (D - D1) + tl.arange(0, D1)
        k1 = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d1[None, :] * stride_kd, mask=row_ok[:, None], other=0.0)
        k1 = k1.to(tl.float32)
        if SMOOTH:
            k1 -= tl.load(KMean + off_bh * D + offs_d1)[None, :]
        k1 = tl.where((offs_d1 >= D0)[None, :], k1, 0.0)
        amax = tl.maximum(amax, tl.max(tl.abs(k1), axis=1))
    amax = tl.maximum(amax, 1e-12)
    inv = 127.0 / amax
    out_base = KQ + off_bh.to(tl.int64) * Lk * (D0 + D1)
    tl.store(
        out_base + offs_n[:, None] * (D0 + D1) + offs_d0[None, :],
        tl.floor(k0 * inv[:, None] + 0.5).to(tl.int8),
        mask=row_ok[:, None],
    )
    if D1 > 0:
        tl.store(
            out_base + offs_n[:, None] * (D0 + D1) + (D0 + tl.arange(0, D1))[None, :],
            tl.floor(k1 * inv[:, None] + 0.5).to(tl.int8),
            mask=row_ok[:, None],
        )
    tl.store(KScale + off_bh.to(tl.int64) * Lk + offs_n, amax / 127.0, mask=row_ok)


def quantize_k(key: torch.Tensor, smooth: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Smooth (subtract the per-head mean over tokens) and quantize K to INT8 per token.

    Returns ``(k_int8, k_scale, k_mean)``: ``k_int8`` is ``(B, H, Lk, D0 + D1)`` contiguous, the main part then the
    tail (see the module docstring; overlapped and padded columns are 0), ``k_scale`` ``(B, H, Lk)`` fp32 and
    ``k_mean`` ``(B, H, D)`` fp32 (zeros when ``smooth=False``).
    """
    b, h, lk, d = key.shape
    d0, d1 = split_head_dim(d, min_tail=32)
    if smooth:
        k_mean = key.mean(dim=2, dtype=torch.float32)
    else:
        k_mean = torch.zeros(b, h, d, device=key.device, dtype=torch.float32)
    k_q = torch.empty(b, h, lk, d0 + d1, device=key.device, dtype=torch.int8)
    k_scale = torch.empty(b, h, lk, device=key.device, dtype=torch.float32)
    block_n = 64
    grid = (triton.cdiv(lk, block_n), b * h)
    _quantize_k_kernel[grid](
        key, k_mean, k_q, k_scale,
        *key.stride(),
        h, lk,
        D=d, SMOOTH=smooth, D0=d0, D1=d1, BLOCK_N=block_n,
    )
    return k_q, k_scale, k_mean


def attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    *,
    mask: torch.Tensor | None,
    is_causal: bool,
    scale: float,
    int8: bool,
    smooth_k: bool = True,
    lse: torch.Tensor | None = None,
) -> None:
    """Launch the fused attention forward, writing ``out`` (and ``lse`` when given) in place.

    Inputs are validated by the caller (:mod:`diffboost.ops.attention`): ``q``/``k``/``v``/``out`` are
    ``(B, H, L, D)`` with any strides on one CUDA device (or CPU under the interpreter), same 16-bit or fp32 dtype,
    ``mask`` is ``None`` or already expanded (stride-0 broadcast is fine) to ``(B, H, Lq, Lk)``, boolean or float.
    Head dims that are not multiples of 16 run on zero-padded copies (module docstring).
    """
    d = q.shape[-1]
    if d % 16:
        width = d + 16 - d % 16
        padded = [torch.nn.functional.pad(t, (0, width - d)) for t in (q, k, v)]
        out_padded = torch.empty_like(padded[0])
        _attention_fwd(*padded, out_padded, mask=mask, is_causal=is_causal, scale=scale, int8=int8,
                       smooth_k=smooth_k, lse=lse)
        out.copy_(out_padded[..., :d])
    else:
        _attention_fwd(q, k, v, out, mask=mask, is_causal=is_causal, scale=scale, int8=int8, smooth_k=smooth_k,
                       lse=lse)


def _attention_fwd(q, k, v, out, *, mask, is_causal, scale, int8, smooth_k, lse) -> None:
    b, h, lq, d = q.shape
    lk = k.shape[2]
    mask_kind = 0 if mask is None else (1 if mask.dtype == torch.bool else 2)
    if mask is None:
        mask_arg, mask_strides = q, (0, 0, 0, 0)
    else:
        # Triton has no bool pointers on every version we support: read the mask's bytes as uint8.
        mask_arg = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
        mask_strides = mask_arg.stride()
    lse_arg = lse if lse is not None else out  # never written when WRITE_LSE is False
    qk_scale = scale * LOG2E
    if int8:
        d0, d1 = split_head_dim(d, min_tail=32)
        k_q, k_scale, k_mean = quantize_k(k, smooth=smooth_k)
        k_arg, k_strides = k_q, k_q.stride()
        ks_arg, ks_strides = k_scale, k_scale.stride()[:2]
    else:
        d0, d1 = split_head_dim(d, min_tail=16)
        k_arg, k_strides = k, k.stride()
        ks_arg, ks_strides, k_mean = q, (0, 0), q

    def grid(meta):
        return (triton.cdiv(lq, meta["BLOCK_M"]), b * h)

    args = (
        q, k_arg, v, out, lse_arg, mask_arg, ks_arg, k_mean,
        qk_scale,
        *q.stride(), *k_strides, *v.stride(), *out.stride(), *mask_strides, *ks_strides,
        h, lq, lk,
    )
    meta = dict(
        D=d, D0=d0, D1=d1, MASK_KIND=mask_kind, IS_CAUSAL=is_causal, INT8=int8, WRITE_LSE=lse is not None,
        DOT_F32=_INTERPRET,
    )
    if AUTOTUNE:
        _attn_fwd_tuned[grid](*args, **meta)
        return
    programs = triton.cdiv(lq, 128) * b * h
    sms = sm_count(q.device) if q.device.type == "cuda" else 1
    key = (q.device, d0, d1, int8, mask_kind, lq > 64 and programs >= sms)
    configs = _heuristic_configs(d0 + d1, lq, programs, sms)
    launch_first_fitting(_attn_fwd_kernel, grid, args, meta, configs, key)


def default_scale(head_dim: int) -> float:
    """SDPA's default softmax scale, ``1 / sqrt(head_dim)``."""
    return 1.0 / math.sqrt(head_dim)
