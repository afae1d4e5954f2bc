"""``diffboost.ops.attention``: scaled dot-product attention with exact and INT8-QK fused kernels.

Backends, in priority order:

``triton``
    Fused flash-style forward (``kernels/attention.py``): fp16/bf16 on CUDA (sm80+), head dims 8..256 in steps of
    8, boolean/additive masks, ``return_lse``; ``precision="int8"`` runs the INT8-QK variant.
``sdpa``
    ``torch.nn.functional.scaled_dot_product_attention``. Exact attention on any device and dtype. It also serves
    ``precision="int8"`` requests where no INT8 kernel can run: the answer is then exact (never less accurate), and
    dispatch logs why the INT8 kernel did not run. It cannot return the LSE.
``reference``
    Plain PyTorch in fp32 (fp64 for fp64 inputs) that always runs: the test oracle. For ``precision="int8"`` it
    emulates the INT8 kernel's arithmetic (smoothing, per-token rounding, INT32 dot) exactly.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Optional

import torch
import torch.nn.functional as F

from diffboost.ops.registry import Backend, get_op

__all__ = ["attention", "attention_reference", "PRECISIONS", "ATTENTION_OP"]

logger = logging.getLogger("diffboost")

PRECISIONS = ("exact", "int8")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_TRITON_HEAD_DIM = 256

ATTENTION_OP = get_op("attention", "scaled dot-product attention, (batch, heads, seq, head_dim)")


# ----------------------------------------------------------------------------------------------------------------
# Reference: the oracle every backend is tested against, and the backend that always runs.
# ----------------------------------------------------------------------------------------------------------------


def _round_half_up(x: torch.Tensor) -> torch.Tensor:
    # The kernels round with floor(x + 0.5); torch.round rounds half to even, which differs on exact halves.
    return torch.floor(x + 0.5)


def _quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric INT8 per row of the last dim, as the kernels do it: returns (integer values as fp32, scale)."""
    amax = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12)
    return _round_half_up(x * (127.0 / amax)), amax / 127.0


def attention_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
    is_causal: bool = False,
    scale: Optional[float] = None,
    *,
    precision: str = "exact",
    smooth_k: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention in fp32 (fp64 for fp64 inputs), returning ``(out, lse)`` with ``out`` in the input dtype.

    ``precision="int8"`` reproduces the INT8 kernel: K minus its per-head mean over tokens (``smooth_k``), Q and K
    rounded to INT8 per token, their integer dot product rescaled in fp32, and P rounded to the input dtype before
    ``P V``. The LSE is that of the true (unsmoothed) scores. Differentiable for ``precision="exact"``.
    """
    compute = torch.float64 if query.dtype == torch.float64 else torch.float32
    q, k, v = query.to(compute), key.to(compute), value.to(compute)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    if precision == "int8":
        k_mean = k.mean(dim=2, keepdim=True) if smooth_k else torch.zeros_like(k[:, :, :1])
        q_int, q_scale = _quantize_per_token(q)
        k_int, k_scale = _quantize_per_token(k - k_mean)
        scores = (q_int @ k_int.transpose(-1, -2)) * (q_scale * scale) * k_scale.transpose(-1, -2)
        # What smoothing removed from each row, to report the LSE of the unsmoothed scores.
        lse_shift = (q @ k_mean.transpose(-1, -2)).squeeze(-1) * scale
    else:
        scores = (q @ k.transpose(-1, -2)) * scale
        lse_shift = None
    lq, lk = scores.shape[-2:]
    if is_causal:
        causal = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask.to(compute)
    lse = torch.logsumexp(scores, dim=-1)
    # Rows that see no key at all give zeros (as the kernel does), not NaN.
    probs = torch.exp(scores - lse.unsqueeze(-1).clamp_min(torch.finfo(compute).min)).nan_to_num(0.0)
    if precision == "int8":
        probs = probs.to(query.dtype).to(compute)
        lse = lse + lse_shift
    out = (probs @ v).to(query.dtype)
    return out, lse.to(torch.float32)


# ----------------------------------------------------------------------------------------------------------------
# Backends
# ----------------------------------------------------------------------------------------------------------------


def _empty_like_layout(query: torch.Tensor, head_dim_v: int) -> torch.Tensor:
    """An output ``(B, H, Lq, Dv)`` laid out in memory like ``query``.

    diffusers builds Q as ``(B, S, H, D).transpose(1, 2)``; writing the output in the same physical order makes the
    processor's transpose back to ``(B, S, H*D)`` free.
    """
    shape = (*query.shape[:3], head_dim_v)
    return torch.empty_permuted(shape, _layout_order(query), dtype=query.dtype, device=query.device)


def _layout_order(query: torch.Tensor) -> list[int]:
    """Dims of ``query`` from outermost to innermost in memory."""
    return sorted(range(4), key=lambda i: (-query.stride(i), i))


def _layout_strides(query: torch.Tensor, head_dim_v: int) -> tuple[int, ...]:
    """The strides :func:`_empty_like_layout` gives, without allocating."""
    shape = (*query.shape[:3], head_dim_v)
    strides = [0] * 4
    step = 1
    for dim in reversed(_layout_order(query)):
        strides[dim] = step
        step *= shape[dim]
    return tuple(strides)


def _expand_mask(attn_mask: Optional[torch.Tensor], shape: tuple[int, int, int, int]) -> Optional[torch.Tensor]:
    if attn_mask is None:
        return None
    while attn_mask.dim() < 4:
        attn_mask = attn_mask.unsqueeze(0)
    return attn_mask.expand(shape)


def _triton_check(query, key, value, attn_mask, is_causal, scale, precision, return_lse, smooth_k) -> list[str]:
    reasons = []
    d = query.shape[-1]
    if d % 8 != 0 or not 8 <= d <= MAX_TRITON_HEAD_DIM:
        reasons.append(f"head_dim {d} not supported (multiples of 8 from 8 to {MAX_TRITON_HEAD_DIM})")
    if scale is not None and scale <= 0:
        reasons.append(f"scale {scale} is not positive (the kernel keeps masked scores at -inf through the scaling)")
    if value.shape[-1] != d:
        reasons.append(f"value head_dim {value.shape[-1]} differs from query head_dim {d}")
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.stride(-1) != 1:
            # Unit stride along the head dim is what makes tile loads coalesced; anything else is a layout
            # diffusers never produces, and the reference handles it.
            reasons.append(f"{name} is not unit-stride along head_dim (stride {t.stride(-1)})")
    return reasons


def _triton_impl(query, key, value, attn_mask, is_causal, scale, precision, return_lse, smooth_k):
    from diffboost.kernels import attention as kernels

    b, h, lq, _ = query.shape
    out = _empty_like_layout(query, value.shape[-1])
    lse = torch.empty(b, h, lq, device=query.device, dtype=torch.float32) if return_lse else None
    # Triton launches on the current CUDA device; switch only when the inputs live on another one (the switch costs
    # more than a small attention call).
    other_device = query.is_cuda and query.device.index != torch.cuda.current_device()
    with torch.cuda.device(query.device) if other_device else contextlib.nullcontext():
        kernels.attention_fwd(
            query, key, value, out,
            mask=_expand_mask(attn_mask, (b, h, lq, key.shape[2])),
            is_causal=is_causal,
            scale=scale,
            int8=precision == "int8",
            smooth_k=smooth_k,
            lse=lse,
        )
    return out, lse


def _sdpa_check(query, key, value, attn_mask, is_causal, scale, precision, return_lse, smooth_k) -> list[str]:
    if return_lse:
        return ["torch SDPA does not return the log-sum-exp"]
    return []


def _sdpa_impl(query, key, value, attn_mask, is_causal, scale, precision, return_lse, smooth_k):
    if attn_mask is not None and attn_mask.dtype != torch.bool and attn_mask.dtype != query.dtype:
        attn_mask = attn_mask.to(query.dtype)  # SDPA insists on a mask in the query dtype
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, is_causal=is_causal, scale=scale)
    return out, None


def _reference_impl(query, key, value, attn_mask, is_causal, scale, precision, return_lse, smooth_k):
    out, lse = attention_reference(
        query, key, value, attn_mask, is_causal, scale, precision=precision, smooth_k=smooth_k
    )
    return out, (lse if return_lse else None)


ATTENTION_OP.register(
    Backend(
        name="triton",
        impl=_triton_impl,
        devices=("cuda",),
        dtypes=(torch.float16, torch.bfloat16),
        needs=("triton",),
        min_capability=(8, 0),
        check=_triton_check,
        description="fused Triton forward, exact and INT8-QK, head dims 8..256",
    )
)
ATTENTION_OP.register(
    Backend(
        name="sdpa",
        impl=_sdpa_impl,
        check=_sdpa_check,
        description="torch scaled_dot_product_attention (exact; also serves int8 requests exactly)",
    )
)
ATTENTION_OP.register(
    Backend(
        name="reference",
        impl=_reference_impl,
        description="PyTorch fp32/fp64 reference with exact INT8 emulation (test oracle)",
    )
)


# ----------------------------------------------------------------------------------------------------------------
# torch.library op: one opaque node for torch.compile; dispatch happens when it runs.
# ----------------------------------------------------------------------------------------------------------------


def _run(query, key, value, attn_mask, is_causal, scale, precision, return_lse, backend, smooth_k):
    """Dispatch and run; returns ``(out, lse or None)``."""
    args = (query, key, value, attn_mask, is_causal, scale, precision, return_lse, smooth_k)
    chosen = ATTENTION_OP.select(query.device, query.dtype, *args, backend=backend)
    return chosen.impl(*args)


@torch.library.custom_op("diffboost::attention", mutates_args=())
def _attention_op(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: Optional[torch.Tensor],
    is_causal: bool,
    scale: float,
    precision: str,
    return_lse: bool,
    backend: str,
    smooth_k: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = _run(query, key, value, attn_mask, is_causal, scale, precision, return_lse, backend, smooth_k)
    if out.stride() != _layout_strides(query, value.shape[-1]):  # keep the layout the fake implementation promised
        out = _empty_like_layout(query, value.shape[-1]).copy_(out)
    if lse is None:  # the schema has no optional outputs
        lse = query.new_empty((0,), dtype=torch.float32)
    return out, lse


@_attention_op.register_fake
def _attention_fake(query, key, value, attn_mask, is_causal, scale, precision, return_lse, backend, smooth_k):
    out = _empty_like_layout(query, value.shape[-1])
    lse_shape = query.shape[:3] if return_lse else (0,)
    return out, query.new_empty(lse_shape, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------------------------


def _validate_qkv(fn: str, query, key, value) -> tuple[torch.Size, torch.Size, torch.Size]:
    """The checks every attention op shares: three 4-D float tensors ``(batch, heads, seq, head_dim)`` on one
    device, of one dtype, with equal batch and head counts, query and key head dims, key and value lengths.
    Returns the three shapes; ``fn`` names the op in the messages."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{fn}: {name} must be 4-D (batch, heads, seq, head_dim), got shape {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{fn}: {name} dtype {t.dtype} not supported (float16, bfloat16, float32, float64)")
    if not (query.device == key.device == value.device):
        raise ValueError(
            f"{fn}: query, key and value must be on one device, got {query.device}, {key.device}, {value.device}"
        )
    if not (query.dtype == key.dtype == value.dtype):
        raise ValueError(
            f"{fn}: query, key and value must have one dtype, got {query.dtype}, {key.dtype}, {value.dtype}"
        )
    (b, h, _, d), (bk, hk, lk, dk), (bv, hv, lv, _) = query.shape, key.shape, value.shape
    if not (b == bk == bv):
        raise ValueError(f"{fn}: batch sizes differ: query {b}, key {bk}, value {bv}")
    if not (h == hk == hv):
        raise ValueError(f"{fn}: head counts differ: query {h}, key {hk}, value {hv}")
    if d != dk:
        raise ValueError(f"{fn}: query head_dim {d} differs from key head_dim {dk}")
    if lk != lv:
        raise ValueError(f"{fn}: key has {lk} tokens but value has {lv}")
    return query.shape, key.shape, value.shape


def _validate(query, key, value, attn_mask, is_causal, scale, precision) -> None:
    (b, h, lq, _), (_, _, lk, _), _ = _validate_qkv("attention", query, key, value)
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise TypeError(f"attention: attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
        if attn_mask.device != query.device:
            raise ValueError(f"attention: attn_mask is on {attn_mask.device}, query on {query.device}")
        if attn_mask.dtype != torch.bool and not attn_mask.dtype.is_floating_point:
            raise ValueError(f"attention: attn_mask dtype {attn_mask.dtype} not supported (bool or floating point)")
        full = (b, h, lq, lk)
        shape = tuple(attn_mask.shape)
        ok = 1 <= len(shape) <= 4 and all(s in (1, f) for s, f in zip(shape[::-1], full[::-1]))
        if not ok:
            raise ValueError(
                f"attention: attn_mask shape {shape} does not broadcast to (batch, heads, Lq, Lk) = {full}; "
                "each dim must be 1 or the full size"
            )
        if is_causal:
            raise ValueError("attention: pass either attn_mask or is_causal=True, not both")
    if precision not in PRECISIONS:
        raise ValueError(f"attention: precision={precision!r} not supported ({', '.join(map(repr, PRECISIONS))})")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f"attention: scale must be a finite number or None, got {scale!r}")


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
    is_causal: bool = False,
    scale: Optional[float] = None,
    *,
    precision: str = "exact",
    return_lse: bool = False,
    backend: str = "auto",
    smooth_k: bool = True,
):
    """Scaled dot-product attention, SDPA's contract plus INT8 and LSE options.

    Args:
        query, key, value: ``(batch, heads, seq, head_dim)``, any strides, one device and dtype. Query and key
            lengths may differ (cross-attention).
        attn_mask: boolean (True = attend) or additive float mask broadcastable to ``(B|1, H|1, Lq|1, Lk)``.
        is_causal: top-left aligned causal mask, as torch's.
        scale: softmax scale, default ``1/sqrt(head_dim)``.
        precision: ``"exact"`` or ``"int8"`` (INT8 Q/K with smoothing, SageAttention's method). Where no INT8
            kernel can run the result is exact, and the reason is logged once.
        return_lse: also return the natural-log log-sum-exp of each query row, ``(B, H, Lq)`` fp32, for merging
            partial results.
        backend: ``"auto"`` or one of ``"triton"``, ``"sdpa"``, ``"reference"`` (raises if it cannot run).
        smooth_k: subtract K's mean before INT8 quantization (only turn off to measure what smoothing buys).

    Returns:
        ``out`` ``(B, H, Lq, Dv)`` laid out like ``query``, or ``(out, lse)`` with ``return_lse=True``.
    """
    _validate(query, key, value, attn_mask, is_causal, scale, precision)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        # The fused kernels are forward-only (diffusion inference). Training code (e.g. distillation) gets the
        # differentiable reference rather than an error in backward.
        if backend not in ("auto", "reference"):
            raise ValueError(f"attention: backend={backend!r} is forward-only; inputs require grad (use 'reference')")
        out, lse = attention_reference(
            query, key, value, attn_mask, is_causal, scale, precision=precision, smooth_k=smooth_k
        )
        return (out, lse) if return_lse else out
    args = (query, key, value, attn_mask, is_causal, scale, precision, return_lse, backend, smooth_k)
    # Under torch.compile the op is one opaque node with a fake implementation; in eager mode the same code runs
    # without the torch.library dispatch layers, which cost more than a small attention call itself.
    if torch.compiler.is_compiling():
        out, lse = torch.ops.diffboost.attention(*args)
    else:
        out, lse = _run(*args)
    return (out, lse) if return_lse else out
