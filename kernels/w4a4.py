"""W4A4 in Triton: the fused activation pass and the INT4 x INT4 GEMM on INT8 tensor cores.

The layout and the arithmetic are defined in :mod:`diffboost.ops.w4a4` (module docstring); these kernels reproduce
it exactly: the packed activations and their scales are bit-identical to the reference, the GEMM's group dot
products are exact INT32, and only the order of the fp32 sums differs.

Activation pass (:func:`quantize_act`). One program owns ``BLOCK_M`` rows and walks K one group at a time, so x is
read once: the tile is smoothed (multiplied by ``1 / smooth``, which the op layer divides once per layer), its
per-row absmax gives the group scale, it is rounded to INT4 and packed (the even/odd channels of a
``[BLOCK_M, G/2, 2]`` view go to the low/high nibbles), and the same smoothed tile feeds the low-rank
down-projection accumulated over K on tensor cores. Rounding uses the ``1.5 * 2^23`` trick (adding it leaves an
fp32 with no fraction bits, in round-half-even, whose low mantissa bits are then the integer), which is exact only
if the product before it is rounded first: the kernel is compiled with ``enable_fp_fusion=False`` so no
multiply-add is contracted into an FMA. Compiled for sm_90, its loop is 443 instructions per warp and group; it was
1332 with the reciprocal divided in every program, float-to-int conversions and bf16 rounded with integer ops.

GEMM (:func:`gemm`). Both operands stay packed in global memory. Per group (in chunks of up to 64 channels), the
nibbles are extracted without sign extension, each moved to the high half of its byte, where the int8 byte is 16x
the nibble (``_nibbles_x16``: three 32-bit instructions per four packed bytes on a GPU), and the low nibbles (even
channels) and the high ones (odd channels) go to two INT8 tensor-core dots of depth 32 into one INT32 tile (mma on
sm80-89, wgmma on sm90, where no INT4 path exists): a dot product over the group does not depend on the order of
its channels, so they are never interleaved back (32-channel groups are, since INT8 dots are at least 32 deep).
The tile is 256x the exact group dot products; one integer add and one float subtract turn it into fp32 and divide
by 256 exactly (a bias trick, full rate where the conversion instruction runs at a quarter), and the group's two
scale vectors are applied in fp32 outside the MMA. Compiled for sm90 (``python -m benchmarks.kernel_report``), the
main loop is 464 instructions per warp per 64-channel group, against 785 with sign-extended, interleaved int8
nibbles; the fp32 scaling (4 instructions per output element and group) is now most of it. The epilogue adds
``lr @ lora_up`` (lr rounded to the output dtype, a 16-bit tensor-core dot with fp32 accumulation) and the bias.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# Opt-in autotuning, as for attention: each distinct (M, N, K) is tuned once per process.
AUTOTUNE = os.environ.get("DIFFBOOST_AUTOTUNE", "0") not in ("", "0") and not _INTERPRET

# Module-level values used inside kernels must be tl.constexpr (the interpreter accepts plain floats, the compiler
# does not).
_ROUND_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2^23: y + magic - magic == round_half_even(y) for |y| < 2^22
_ROUND_MAGIC_BITS = tl.constexpr(0x4B400000)
_AMAX_FLOOR = tl.constexpr(1e-30)  # diffboost.ops.w4a4.AMAX_FLOOR
# Integer to float by an integer add and a float subtract (full rate, where the conversion instruction runs at a
# quarter): 1.5 * 2^15 has a unit in the last place of 2^-8, so its bit pattern plus an integer |d| < 2^22, read as a
# float, is 1.5 * 2^15 + d / 256 exactly.
_X256_MAGIC = tl.constexpr(49152.0)
_X256_MAGIC_BITS = tl.constexpr(0x47400000)
_COMPILED = tl.constexpr(not _INTERPRET)  # for a GPU: inline PTX and hardware rounding (the interpreter has neither)

# How the low-rank dots run: on 16-bit tensor cores when both operands share a 16-bit dtype, else in exact fp32
# ("ieee": no TF32 rounding), which is also what the interpreter needs (its 16-bit dots are wrong).
_DOT_NATIVE = 0
_DOT_FP32 = 1


def _lora_dot_mode(a_dtype: torch.dtype, b_dtype: torch.dtype) -> int:
    if _INTERPRET or a_dtype == torch.float32 or a_dtype != b_dtype:
        return _DOT_FP32
    return _DOT_NATIVE


@triton.jit
def _round_to(x, DTYPE: tl.constexpr):
    """fp32 to ``DTYPE``, rounding to nearest even on every target: GPUs convert so (one instruction per two values),
    the interpreter truncates fp32 -> bf16, so there bf16 is rounded with integer ops first (the conversion of the
    rounded value is then exact)."""
    if DTYPE == tl.bfloat16 and not _COMPILED:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        return bits.to(tl.float32, bitcast=True).to(tl.bfloat16)
    else:
        return x.to(DTYPE)


@triton.jit
def _quantize_act_kernel(
    X, InvSmooth, Down, QX, AScale, LR,
    M, K, stride_xm,
    G: tl.constexpr, R: tl.constexpr,
    HAS_SMOOTH: tl.constexpr, HAS_LORA: tl.constexpr, LORA_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < M
    rows = offs_m.to(tl.int64)
    offs_g = tl.arange(0, G)
    offs_h = tl.arange(0, G // 2)
    x_ptrs = X + rows[:, None] * stride_xm + offs_g[None, :]
    q_ptrs = QX + rows[:, None] * (K // 2) + offs_h[None, :]
    if HAS_LORA:
        offs_r = tl.arange(0, R)
        d_ptrs = Down + offs_g[:, None] * R + offs_r[None, :]
        lr = tl.zeros([BLOCK_M, R], dtype=tl.float32)
    for g in range(0, K // G):
        k0 = g * G
        x = tl.load(x_ptrs + k0, mask=row_ok[:, None], other=0.0)
        xs = x.to(tl.float32)
        if HAS_SMOOTH:
            xs = xs * tl.load(InvSmooth + k0 + offs_g)[None, :]
        amax = tl.max(tl.abs(xs), axis=1)
        scale = tl.math.div_rn(amax, tl.full([BLOCK_M], 7.0, tl.float32))
        inv = tl.math.div_rn(tl.full([BLOCK_M], 7.0, tl.float32), tl.maximum(amax, _AMAX_FLOOR))
        y = xs * inv[:, None]
        # Rounded to an integer by the magic add; its low mantissa bits are then that integer (|y| <= 7).
        q = (y + _ROUND_MAGIC).to(tl.int32, bitcast=True) - _ROUND_MAGIC_BITS
        q_even, q_odd = tl.split(tl.reshape(q, [BLOCK_M, G // 2, 2]))
        packed = ((q_even & 0xF) | ((q_odd & 0xF) << 4)).to(tl.uint8)
        tl.store(q_ptrs + k0 // 2, packed, mask=row_ok[:, None])
        tl.store(AScale + g * M + offs_m, scale, mask=row_ok)
        if HAS_LORA:
            d = tl.load(d_ptrs + k0 * R)
            xs_low = _round_to(xs, X.dtype.element_ty)  # the reference rounds the low-rank input to x's dtype
            if LORA_DOT == 0:
                lr += tl.dot(xs_low, d)
            else:
                lr += tl.dot(xs_low.to(tl.float32), d.to(tl.float32), input_precision="ieee")
    if HAS_LORA:
        tl.store(LR + rows[:, None] * R + offs_r[None, :], lr, mask=row_ok[:, None])


@triton.jit
def _nibbles_x16(packed):
    """``uint8`` packed nibbles to two ``int8`` tensors of the same shape, the low and the high nibbles, each moved
    to the high half of its byte: read as int8 such a byte is exactly 16x the nibble's signed value (two's
    complement), so no sign extension is needed: ``lo = b << 4``, ``hi = b & 0xF0``. On a GPU these are three 32-bit
    instructions per four packed bytes (inline PTX); Triton lowers its own int8 shifts byte by byte."""
    if _COMPILED:
        lo, hi = tl.inline_asm_elementwise(
            # $2 is read before either output is written: an output may share the input's register.
            "{ .reg .b32 t; shl.b32 t, $2, 4; and.b32 $1, $2, 0xF0F0F0F0; and.b32 $0, t, 0xF0F0F0F0; }",
            "=r,=r,r", [packed], dtype=(tl.int8, tl.int8), is_pure=True, pack=4,
        )
    else:
        lo = (packed << 4).to(tl.int8, bitcast=True)
        hi = (packed & 0xF0).to(tl.int8, bitcast=True)
    return lo, hi


@triton.jit
def _tile_indices(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's output tile, in grouped order (GROUP_M row tiles share each column tile while it is in L2):
    ``(offs_m, offs_n, rows, cols)``, where rows / cols wrap out-of-range indices around to valid ones, so every
    load is in bounds and unmasked (the store, masked with offs_m / offs_n, drops their results)."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return offs_m, offs_n, (offs_m % M).to(tl.int64), (offs_n % N).to(tl.int64)


@triton.jit
def _gemm_kernel(
    QX, AScale, QW, WScale, LR, Up, Bias, Out,
    M, N, K, stride_om,
    G: tl.constexpr, R: tl.constexpr,
    HAS_LORA: tl.constexpr, LORA_DOT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
):
    offs_m, offs_n, rows, cols = _tile_indices(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    # A group is read in chunks of up to 64 channels (32 bytes per row): fewer registers live for 128-channel groups.
    CHUNK: tl.constexpr = min(G, 64)
    offs_h = tl.arange(0, CHUNK // 2)
    a_ptrs = QX + rows[:, None] * (K // 2) + offs_h[None, :]
    w_ptrs = QW + cols[:, None] * (K // 2) + offs_h[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for g in range(0, K // G):
        a_scale = tl.load(AScale + g * M + rows)
        w_scale = tl.load(WScale + g * N + cols).to(tl.float32)
        dots = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
        for c in tl.static_range(G // CHUNK):
            a_lo, a_hi = _nibbles_x16(tl.load(a_ptrs + c * (CHUNK // 2)))
            w_lo, w_hi = _nibbles_x16(tl.load(w_ptrs + c * (CHUNK // 2)))
            if CHUNK >= 64:
                # Even channels (low nibbles), then odd ones (high nibbles), into one accumulator: a dot product
                # over the group does not depend on the order of its channels, so they are never interleaved back.
                dots = tl.dot(a_lo, tl.trans(w_lo), dots, out_dtype=tl.int32)
                dots = tl.dot(a_hi, tl.trans(w_hi), dots, out_dtype=tl.int32)
            else:  # INT8 dots are at least 32 deep: interleave a 32-channel group back into one operand
                a = tl.reshape(tl.join(a_lo, a_hi), [BLOCK_M, CHUNK])
                w = tl.reshape(tl.join(w_lo, w_hi), [BLOCK_N, CHUNK])
                dots = tl.dot(a, tl.trans(w), dots, out_dtype=tl.int32)
        # dots / 256 in fp32, exactly (|dots| <= 256 * 64 G <= 2^21 < 2^22): the 256 undoes the 16x of both
        # operands' nibbles (_nibbles_x16).
        dots_f = (dots + _X256_MAGIC_BITS).to(tl.float32, bitcast=True) - _X256_MAGIC
        acc += dots_f * (a_scale[:, None] * w_scale[None, :])
        a_ptrs += G // 2
        w_ptrs += G // 2

    out_ty = Out.dtype.element_ty
    if HAS_LORA:
        offs_r = tl.arange(0, R)
        lr = _round_to(tl.load(LR + rows[:, None] * R + offs_r[None, :]), out_ty)
        up = tl.load(Up + offs_r[:, None] * N + cols[None, :])
        if LORA_DOT == 0:
            acc += tl.dot(lr, up)
        else:
            acc += tl.dot(lr.to(tl.float32), up.to(tl.float32), input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(Bias + cols).to(tl.float32)[None, :]
    out_mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    tl.store(Out + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :], _round_to(acc, out_ty), mask=out_mask)


def _gemm_config(m: int, n: int) -> triton.Config:
    """Launch config from the problem shape alone (no tuning run); see ``DIFFBOOST_AUTOTUNE``."""
    if _INTERPRET:  # the interpreter pays per program and per op: few, large tiles
        return triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "GROUP_M": 4}, num_warps=4, num_stages=1)
    block_m = min(128, max(16, triton.next_power_of_2(m)))
    if block_m == 128:
        return triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "GROUP_M": 8}, num_warps=8, num_stages=4)
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": 128, "GROUP_M": 8}, num_warps=4, num_stages=4)


def _gemm_tuning_configs():
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm in (64, 128)
        for bn in (64, 128, 256)
        for w in (4, 8)
        for s in (3, 4, 5)
        if not (bm == 128 and bn == 256 and w == 4)
    ]


_gemm_tuned = triton.autotune(configs=_gemm_tuning_configs(), key=["M", "N", "K", "G", "R", "HAS_LORA"])(_gemm_kernel)


def quantize_act(
    x: torch.Tensor,
    inv_smooth: torch.Tensor | None,
    lora_down: torch.Tensor | None,
    qx: torch.Tensor,
    ascales: torch.Tensor,
    lr: torch.Tensor,
    group_size: int,
) -> None:
    """Launch the activation pass, writing ``qx``, ``ascales`` and ``lr`` in place.

    Inputs are validated by :mod:`diffboost.ops.w4a4`: ``x [M, K]`` with unit stride along K, ``inv_smooth [K]``
    (``1 / smooth`` in fp32, an IEEE division) and ``lora_down [K, r]`` contiguous (or None); outputs
    ``uint8 [M, K/2]``, ``fp32 [K/G, M]``, ``fp32 [M, r]``.
    """
    m, k = x.shape
    if m == 0:
        return
    rank = 0 if lora_down is None else lora_down.shape[1]
    block_m = 64 if _INTERPRET else 32
    _quantize_act_kernel[(triton.cdiv(m, block_m),)](
        x, inv_smooth if inv_smooth is not None else x, lora_down if lora_down is not None else x, qx, ascales, lr,
        m, k, x.stride(0),
        G=group_size, R=max(rank, 16), HAS_SMOOTH=inv_smooth is not None, HAS_LORA=rank > 0,
        LORA_DOT=_lora_dot_mode(x.dtype, lora_down.dtype) if rank else _DOT_FP32,
        BLOCK_M=block_m, num_warps=4,
        enable_fp_fusion=False,  # keep every product rounded before the rounding trick (module docstring)
    )


def gemm(
    qx: torch.Tensor,
    ascales: torch.Tensor,
    qweight: torch.Tensor,
    wscales: torch.Tensor,
    lora_act: torch.Tensor | None,
    lora_up: torch.Tensor | None,
    bias: torch.Tensor | None,
    out: torch.Tensor,
) -> None:
    """Launch the W4A4 GEMM into ``out [M, N]`` (unit stride along N; its dtype is the output dtype).

    Inputs are validated by :mod:`diffboost.ops.w4a4`: packed ``qx [M, K/2]``, ``qweight [N, K/2]``, scales
    ``[K/G, M]`` fp32 and ``[K/G, N]``, ``lora_act fp32 [M, r]`` with ``lora_up [r, N]`` (or both None), ``bias [N]``.
    """
    m, n = out.shape
    k = qx.shape[1] * 2
    if m == 0 or n == 0:
        return
    group = k // wscales.shape[0]
    rank = 0 if lora_up is None else lora_up.shape[0]
    args = (
        qx, ascales, qweight, wscales,
        lora_act if rank else qx, lora_up if rank else qx, bias if bias is not None else qx, out,
        m, n, k, out.stride(0),
    )
    meta = dict(
        G=group, R=max(rank, 16), HAS_LORA=rank > 0,
        LORA_DOT=_lora_dot_mode(out.dtype, lora_up.dtype) if rank else _DOT_FP32,
        HAS_BIAS=bias is not None,
    )

    def grid(launch):
        return (triton.cdiv(m, launch["BLOCK_M"]) * triton.cdiv(n, launch["BLOCK_N"]),)

    if AUTOTUNE:
        _gemm_tuned[grid](*args, **meta)
    else:
        config = _gemm_config(m, n)
        _gemm_kernel[grid](*args, **meta, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
