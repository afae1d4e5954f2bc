"""Normalized non-causal linear attention in Triton, with an fp32 state.

    out = phi(Q) S / (phi(Q) . m + eps),   S = sum_n phi(k_n) v_n^T / N,   m = sum_n phi(k_n) / N

with ``phi`` = elu + 1 (LinFusion) or relu (SANA) and ``N`` the number of kept keys. Three phases:

1. ``_kv_partial_kernel``: the key sequence of every (batch, head) is cut into ``num_splits`` chunks, one program
   each, so a long sequence is spread over the whole GPU rather than one program per head. A program accumulates
   its chunk's ``phi(K)^T V`` (``d_k x d_v``) and ``sum phi(K)`` in fp32 and writes them to a scratch buffer.
2. ``_combine_kernel``: sums the chunks in a fixed order and divides by N. The reduction has no atomics, so a run
   is bit-for-bit repeatable.
3. ``_apply_kernel``: one program per query tile computes ``phi(Q) S`` and the normalizer.

Phases 1 and 3 cover all value columns in one launch while a program's fp32 accumulators fit in registers
(``d_k x d_v <= MAX_FUSED_STATE``); above that (head dims > 128) they run once per value block.

Memory is the output plus ``O(num_splits * d_k * d_v)`` fp32 scratch per head, and ``num_splits`` is capped so that
each chunk holds at least ``MIN_CHUNK`` keys (the scratch stays a small fraction of K and V).

Head dims. Tensor-core dots need power-of-two tiles of at least 16, and diffusion head dims often are not powers of
two (SD 1.5: 40/80/160). Each head dim is covered by a power-of-two main block ``[0, W0)`` and, when needed, a
power-of-two tail block ``[W0, W0 + W1)`` (40 = 32 + 16, 80 = 64 + 16, 160 = 128 + 32, 256 = 128 + 128); both start
at multiples of 16. Where a block reaches past the head dim (the tail of 40 has 8 real columns), its column indices
are clamped to the last real column so the load needs no mask, and the extra columns are zeroed in registers: on
Triton 3.6/Hopper column-masked loads whose valid width is not a multiple of 16 were miscompiled in the attention
kernel, and this way no load carries a column mask at all. The fp32 state is stored padded to ``W0 + W1`` on both
sides with zeros in the padding. Ragged key/query tiles are handled the same way (row indices clamped, rows zeroed);
only the output stores are masked.

Precision: 16-bit inputs feed 16-bit tensor-core dots (``phi(K)``, ``phi(Q)`` and the state rounded to the input
dtype, as a PyTorch computation in that dtype would) with fp32 accumulation; the normalizer is summed in fp32. fp32
inputs use ``tf32x3`` dots (three TF32 products per dot, relative error about 1e-6): exact fp32 dots compile to
unrolled FMA code that spills registers by kilobytes.

Launch configurations were chosen with ``ptxas -v`` on Triton 3.7's output for sm_80 and sm_90: no register spills
for 16-bit inputs at any head dim up to 256 (fp32 spills a little in the apply kernel at head dims >= 64). They have
not been tuned by timing.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._launch import sm_count

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

FEATURE_MAPS = {"elu": 0, "relu": 1}
MAX_HEAD_DIM = 256
MAX_BLOCK = 128  # widest block per head-dim part: a 128 x 128 fp32 accumulator is what registers hold
MAX_FUSED_STATE = 128 * 128  # largest state slice (fp32 elements) one program accumulates
# Fewest keys per chunk: each chunk writes a d_k x d_v fp32 partial state, which should stay small next to the
# chunk's own K and V.
MIN_CHUNK = 256 if _INTERPRET else 512


def split_head_dim(d: int) -> tuple[int, int]:
    """Widths ``(W0, W1)`` of the main and tail blocks covering head dim ``d`` (``W1 = 0``: no tail).

    Both are powers of two >= 16 and at most ``MAX_BLOCK``; the tail starts at ``W0`` and may reach past ``d``.
    """
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"head dim {d} not supported (1..{MAX_HEAD_DIM})")
    main = min(max(1 << (d.bit_length() - 1), 16), MAX_BLOCK)
    rest = d - main
    if rest <= 0:
        return main, 0
    return main, max(triton.next_power_of_2(rest), 16)


@triton.jit
def _phi(x, FEATURE: tl.constexpr):
    if FEATURE == 0:  # elu + 1; the exp argument is clamped so the unused branch cannot overflow
        return tl.where(x > 0, x + 1.0, tl.exp(tl.minimum(x, 0.0)))
    else:
        return tl.maximum(x, 0.0)


@triton.jit
def _load_block(base, rows, row_ok, stride_n, stride_d, START: tl.constexpr, WIDTH: tl.constexpr, D: tl.constexpr):
    """A ``[len(rows), WIDTH]`` tile of columns ``[START, START + WIDTH)`` and the mask of its real elements.

    ``rows`` are already clamped into the tensor; columns past ``D`` are clamped to ``D - 1`` (no load mask, see the
    module docstring). Callers zero the elements outside ``ok``.
    """
    cols = START + tl.arange(0, WIDTH)
    if START + WIDTH > D:
        col_ok = cols < D
        cols = tl.minimum(cols, D - 1)
    else:
        col_ok = cols < START + WIDTH
    x = tl.load(base + rows[:, None] * stride_n + cols[None, :] * stride_d)
    return x, row_ok[:, None] & col_ok[None, :]


@triton.jit
def _mm(a, b, acc, DOT_F32: tl.constexpr, FP32: tl.constexpr):
    """``acc + a @ b`` with the operand handling of the module docstring."""
    if DOT_F32:  # the interpreter's 16-bit dots are wrong; the operands were already rounded to 16 bits
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if FP32:
        return tl.dot(a, b, acc, input_precision="tf32x3")
    return tl.dot(a, b, acc)


@triton.jit
def _kv_partial_kernel(
    K, V, Keep, Partial,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mn,
    H, N, chunk, num_splits,
    DK: tl.constexpr, DV: tl.constexpr,
    K0: tl.constexpr, K1: tl.constexpr,
    V_OFF: tl.constexpr, V0: tl.constexpr, V1: tl.constexpr, VW: tl.constexpr,
    FEATURE: tl.constexpr, HAS_MASK: tl.constexpr, DOT_F32: tl.constexpr, FP32: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """State columns ``[V_OFF, V_OFF + V0 + V1)`` of one chunk; ``VW`` is the padded state width."""
    pid_s = tl.program_id(0)
    bh = tl.program_id(1)
    off_b = (bh // H).to(tl.int64)
    off_h = (bh % H).to(tl.int64)
    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh
    dot_ty = K.dtype.element_ty

    a00 = tl.zeros([K0, V0], dtype=tl.float32)
    ks0 = tl.zeros([K0], dtype=tl.float32)
    if V1 > 0:
        a01 = tl.zeros([K0, V1], dtype=tl.float32)
    if K1 > 0:
        a10 = tl.zeros([K1, V0], dtype=tl.float32)
        ks1 = tl.zeros([K1], dtype=tl.float32)
        if V1 > 0:
            a11 = tl.zeros([K1, V1], dtype=tl.float32)

    start = pid_s * chunk
    end = tl.minimum(start + chunk, N)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        keep = offs_n < end
        rows = tl.minimum(offs_n, N - 1).to(tl.int64)  # int64: row * stride may pass 2^31 on long sequences
        if HAS_MASK:  # key padding: a dropped key adds nothing to the state (its V is ignored, even if NaN)
            keep = keep & (tl.load(Keep + off_b * stride_mb + rows * stride_mn) != 0)

        k0, ok = _load_block(k_base, rows, keep, stride_kn, stride_kd, 0, K0, DK)
        pk0 = tl.where(ok, _phi(k0.to(tl.float32), FEATURE), 0.0)
        ks0 += tl.sum(pk0, axis=0)
        pk0t = tl.trans(pk0.to(dot_ty))
        v0, ok = _load_block(v_base, rows, keep, stride_vn, stride_vd, V_OFF, V0, DV)
        v0 = tl.where(ok, v0, 0.0).to(dot_ty)
        a00 = _mm(pk0t, v0, a00, DOT_F32, FP32)
        if V1 > 0:
            v1, ok = _load_block(v_base, rows, keep, stride_vn, stride_vd, V_OFF + V0, V1, DV)
            v1 = tl.where(ok, v1, 0.0).to(dot_ty)
            a01 = _mm(pk0t, v1, a01, DOT_F32, FP32)
        if K1 > 0:
            k1, ok = _load_block(k_base, rows, keep, stride_kn, stride_kd, K0, K1, DK)
            pk1 = tl.where(ok, _phi(k1.to(tl.float32), FEATURE), 0.0)
            ks1 += tl.sum(pk1, axis=0)
            pk1t = tl.trans(pk1.to(dot_ty))
            a10 = _mm(pk1t, v0, a10, DOT_F32, FP32)
            if V1 > 0:
                a11 = _mm(pk1t, v1, a11, DOT_F32, FP32)

    # Partial is (B*H, num_splits, L) fp32 with L = KW*VW + KW: the padded state row-major, then sum phi(K)
    # (written by the launch that starts at column 0; every launch computes it).
    KW = K0 + K1
    base = Partial + (bh.to(tl.int64) * num_splits + pid_s) * (KW * VW + KW)
    r0 = tl.arange(0, K0)
    c0 = V_OFF + tl.arange(0, V0)
    tl.store(base + r0[:, None] * VW + c0[None, :], a00)
    if V_OFF == 0:
        tl.store(base + KW * VW + r0, ks0)
    if V1 > 0:
        c1 = V_OFF + V0 + tl.arange(0, V1)
        tl.store(base + r0[:, None] * VW + c1[None, :], a01)
    if K1 > 0:
        r1 = K0 + tl.arange(0, K1)
        tl.store(base + r1[:, None] * VW + c0[None, :], a10)
        if V_OFF == 0:
            tl.store(base + KW * VW + r1, ks1)
        if V1 > 0:
            tl.store(base + r1[:, None] * VW + c1[None, :], a11)


@triton.jit
def _combine_kernel(Partial, InvCount, State, H, num_splits, L, BLOCK: tl.constexpr):
    bh = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < L
    src = Partial + bh.to(tl.int64) * num_splits * L
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(num_splits):  # fixed order: repeatable to the bit
        acc += tl.load(src + s * L + offs, mask=ok, other=0.0)
    inv = tl.load(InvCount + bh // H)
    tl.store(State + bh.to(tl.int64) * L + offs, acc * inv, mask=ok)


@triton.jit
def _apply_kernel(
    Q, State, Out,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_ob, stride_oh, stride_om, stride_od,
    H, M, eps,
    DK: tl.constexpr, DV: tl.constexpr,
    K0: tl.constexpr, K1: tl.constexpr,
    V_OFF: tl.constexpr, V0: tl.constexpr, V1: tl.constexpr, VW: tl.constexpr,
    FEATURE: tl.constexpr, DOT_F32: tl.constexpr, FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """Output columns ``[V_OFF, V_OFF + V0 + V1)`` of one query tile."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    off_b = (bh // H).to(tl.int64)
    off_h = (bh % H).to(tl.int64)
    q_base = Q + off_b * stride_qb + off_h * stride_qh
    o_base = Out + off_b * stride_ob + off_h * stride_oh
    KW = K0 + K1
    s_base = State + bh.to(tl.int64) * (KW * VW + KW)
    dot_ty = Q.dtype.element_ty

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < M
    offs_m = offs_m.to(tl.int64)  # row * stride may pass 2^31 on long sequences
    rows = tl.minimum(offs_m, M - 1)
    r0 = tl.arange(0, K0)
    q0, ok = _load_block(q_base, rows, row_ok, stride_qm, stride_qd, 0, K0, DK)
    pq0 = tl.where(ok, _phi(q0.to(tl.float32), FEATURE), 0.0)
    den = tl.sum(pq0 * tl.load(s_base + KW * VW + r0)[None, :], axis=1)
    pq0 = pq0.to(dot_ty)
    if K1 > 0:
        r1 = K0 + tl.arange(0, K1)
        q1, ok = _load_block(q_base, rows, row_ok, stride_qm, stride_qd, K0, K1, DK)
        pq1 = tl.where(ok, _phi(q1.to(tl.float32), FEATURE), 0.0)
        den += tl.sum(pq1 * tl.load(s_base + KW * VW + r1)[None, :], axis=1)
        pq1 = pq1.to(dot_ty)
    inv_den = 1.0 / (den + eps)

    c0 = V_OFF + tl.arange(0, V0)
    acc = _mm(pq0, tl.load(s_base + r0[:, None] * VW + c0[None, :]).to(dot_ty),
              tl.zeros([BLOCK_M, V0], dtype=tl.float32), DOT_F32, FP32)
    if K1 > 0:
        acc = _mm(pq1, tl.load(s_base + r1[:, None] * VW + c0[None, :]).to(dot_ty), acc, DOT_F32, FP32)
    out = (acc * inv_den[:, None]).to(Out.dtype.element_ty)
    tl.store(o_base + offs_m[:, None] * stride_om + c0[None, :] * stride_od, out,
             mask=row_ok[:, None] & (c0 < DV)[None, :])
    if V1 > 0:
        c1 = V_OFF + V0 + tl.arange(0, V1)
        acc = _mm(pq0, tl.load(s_base + r0[:, None] * VW + c1[None, :]).to(dot_ty),
                  tl.zeros([BLOCK_M, V1], dtype=tl.float32), DOT_F32, FP32)
        if K1 > 0:
            acc = _mm(pq1, tl.load(s_base + r1[:, None] * VW + c1[None, :]).to(dot_ty), acc, DOT_F32, FP32)
        out = (acc * inv_den[:, None]).to(Out.dtype.element_ty)
        tl.store(o_base + offs_m[:, None] * stride_om + c1[None, :] * stride_od, out,
                 mask=row_ok[:, None] & (c1 < DV)[None, :])


def default_num_splits(n: int, programs_per_split: int, device: torch.device) -> int:
    """Chunks per (batch, head) for ``n`` keys: enough programs to fill the GPU twice over, with at least
    ``MIN_CHUNK`` keys per chunk."""
    if _INTERPRET or device.type != "cuda":
        target = 8  # the interpreter pays per program: few, large chunks
    else:
        target = 2 * sm_count(device)
    return max(1, min(triton.cdiv(n, MIN_CHUNK), triton.cdiv(target, programs_per_split)))


def value_blocks(k_width: int, v0: int, v1: int) -> list[tuple[int, int, int]]:
    """``(V_OFF, V0, V1)`` per launch: the value blocks share one launch while the fp32 accumulators of a program
    (``k_width x (V0 + V1)``) fit in registers, else each block gets its own launch (K is then read twice)."""
    if v1 == 0 or k_width * (v0 + v1) <= MAX_FUSED_STATE:
        return [(0, v0, v1)]
    return [(0, v0, 0), (v0, v1, 0)]


def _launch_config(k_width: int, v_width: int) -> tuple[int, int, int]:
    """``(BLOCK_N, BLOCK_M, num_warps)`` from the padded state slice one program holds (no tuning run).

    num_stages stays at 2: 1 miscompiled split head dims on Hopper with Triton 3.6 (attention kernel).
    """
    if _INTERPRET:  # the interpreter pays per program and per op, not per FLOP: few, large tiles
        return 256, 256, 4
    # See the module docstring: no register spills for 16-bit inputs, untimed.
    if k_width * v_width <= 64 * 64:
        return 32, 64, 4
    return 16, 32, 8


def linear_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    *,
    feature_map: str,
    eps: float,
    keep: torch.Tensor | None,
    num_splits: int | None = None,
) -> None:
    """Compute normalized linear attention into ``out`` in place.

    Inputs are validated by the caller (:mod:`diffboost.ops.linear_attention`): ``q`` ``(B, H, M, Dk)``, ``k``
    ``(B, H, N, Dk)`` with ``N >= 1``, ``v`` and ``out`` ``(B, H, N|M, Dv)``, any strides, one CUDA device (or CPU
    under the interpreter), one dtype among fp16/bf16/fp32, head dims <= 256. ``keep`` is ``None`` or a boolean
    ``(B, N)`` key mask (True = attend). ``num_splits`` overrides :func:`default_num_splits`.
    """
    b, h, m, dk = q.shape
    n, dv = k.shape[2], v.shape[3]
    if m == 0:
        return
    k0, k1 = split_head_dim(dk)
    v0, v1 = split_head_dim(dv)
    kw, vw = k0 + k1, v0 + v1
    launches = value_blocks(kw, v0, v1)
    block_n, block_m, warps = _launch_config(kw, max(a + b for _, a, b in launches))
    splits = num_splits if num_splits is not None else default_num_splits(n, b * h, q.device)
    # Whole tiles per chunk; recount so that no chunk is empty.
    chunk = triton.cdiv(triton.cdiv(n, splits), block_n) * block_n
    splits = triton.cdiv(n, chunk)

    if keep is None:
        keep_arg, keep_strides = k, (0, 0)
        inv_count = torch.full((b,), 1.0 / n, device=q.device, dtype=torch.float32)
    else:
        keep_arg = keep.view(torch.uint8)  # Triton has no bool pointers on every version we support
        keep_strides = keep_arg.stride()
        inv_count = 1.0 / keep.sum(dim=1, dtype=torch.float32).clamp_min(1.0)  # no kept key: state 0, output 0

    length = kw * vw + kw
    partial = torch.empty(b * h, splits, length, device=q.device, dtype=torch.float32)
    state = torch.empty(b * h, length, device=q.device, dtype=torch.float32)
    common = dict(
        DK=dk, DV=dv, K0=k0, K1=k1, VW=vw, FEATURE=FEATURE_MAPS[feature_map],
        DOT_F32=_INTERPRET, FP32=q.dtype == torch.float32, num_warps=warps, num_stages=2,
    )
    for v_off, lv0, lv1 in launches:
        _kv_partial_kernel[(splits, b * h)](
            k, v, keep_arg, partial,
            *k.stride(), *v.stride(), *keep_strides,
            h, n, chunk, splits,
            V_OFF=v_off, V0=lv0, V1=lv1, HAS_MASK=keep is not None, BLOCK_N=block_n, **common,
        )
    combine_block = 1024
    _combine_kernel[(b * h, triton.cdiv(length, combine_block))](
        partial, inv_count, state, h, splits, length, BLOCK=combine_block, num_warps=4,
    )
    for v_off, lv0, lv1 in launches:
        _apply_kernel[(triton.cdiv(m, block_m), b * h)](
            q, state, out,
            *q.stride(), *out.stride(),
            h, m, eps,
            V_OFF=v_off, V0=lv0, V1=lv1, BLOCK_M=block_m, **common,
        )
