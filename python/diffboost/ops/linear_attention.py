"""``diffboost.ops.linear_attention``: normalized non-causal linear attention (LinFusion's, SANA's).

    out = phi(Q) (phi(K)^T V / N) / (phi(Q) . mean(phi(K)) + eps)

``phi`` is ``elu + 1`` (LinFusion) or ``relu`` (SANA); ``N`` and the mean count only the keys a padding mask keeps.
Time and memory are linear in the sequence length: the keys are reduced to a ``d_k x d_v`` state once, and every
query reads that state.

Backends, in priority order:

``triton``
    ``kernels/linear_attention.py``: a split-sequence reduction into an fp32 state, a deterministic combine and a
    query-tiled apply; fp16/bf16/fp32 on CUDA (sm80+), head dims up to 256.
``reference``
    PyTorch in fp32 (fp64 for fp64 inputs), differentiable; it always runs and is the test oracle.
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
import torch.nn.functional as F

from diffboost.ops.attention import _empty_like_layout, _layout_strides, _validate_qkv
from diffboost.ops.registry import Backend, get_op

__all__ = ["FEATURE_MAPS", "LINEAR_ATTENTION_OP", "linear_attention", "linear_attention_reference"]

FEATURE_MAPS = ("elu", "relu")
MAX_TRITON_HEAD_DIM = 256

LINEAR_ATTENTION_OP = get_op(
    "linear_attention", "normalized non-causal linear attention, (batch, heads, seq, head_dim)"
)


# ----------------------------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------------------------


def _phi(x: torch.Tensor, feature_map: str) -> torch.Tensor:
    return F.elu(x) + 1.0 if feature_map == "elu" else F.relu(x)


def linear_attention_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    feature_map: str = "elu",
    eps: float = 1e-4,
    key_padding_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Linear attention in fp32 (fp64 for fp64 inputs), returned in the input dtype; differentiable.

    Dropped keys (``key_padding_mask`` False) are ignored entirely, even where their K or V is not finite. A batch
    element with no kept key gets zeros.
    """
    compute = torch.float64 if query.dtype == torch.float64 else torch.float32
    pq = _phi(query.to(compute), feature_map)
    pk = _phi(key.to(compute), feature_map)
    v = value.to(compute)
    if key_padding_mask is None:
        count = float(key.shape[2])
    else:
        dropped = ~key_padding_mask[:, None, :, None]
        pk = pk.masked_fill(dropped, 0.0)
        v = v.masked_fill(dropped, 0.0)
        count = key_padding_mask.sum(dim=1).clamp_min(1).to(compute)[:, None, None, None]
    state = pk.transpose(-1, -2) @ v / count  # (B, H, Dk, Dv)
    k_mean = pk.sum(dim=2, keepdim=True) / count  # (B, H, 1, Dk)
    out = (pq @ state) / ((pq * k_mean).sum(dim=-1, keepdim=True) + eps)
    return out.to(query.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Backends
# ----------------------------------------------------------------------------------------------------------------


def _triton_check(query, key, value, key_padding_mask, feature_map, eps) -> list[str]:
    reasons = []
    for name, d in (("query/key", query.shape[-1]), ("value", value.shape[-1])):
        if d > MAX_TRITON_HEAD_DIM:
            reasons.append(f"{name} head_dim {d} not supported (up to {MAX_TRITON_HEAD_DIM})")
    return reasons


def _triton_impl(query, key, value, key_padding_mask, feature_map, eps):
    from diffboost.kernels import linear_attention as kernels

    out = _empty_like_layout(query, value.shape[-1])
    with torch.cuda.device(query.device) if query.is_cuda else contextlib.nullcontext():
        kernels.linear_attention_fwd(
            query, key, value, out, feature_map=feature_map, eps=eps, keep=key_padding_mask
        )
    return out


def _reference_impl(query, key, value, key_padding_mask, feature_map, eps):
    return linear_attention_reference(
        query, key, value, feature_map=feature_map, eps=eps, key_padding_mask=key_padding_mask
    )


LINEAR_ATTENTION_OP.register(
    Backend(
        name="triton",
        impl=_triton_impl,
        devices=("cuda",),
        dtypes=(torch.float16, torch.bfloat16, torch.float32),
        needs=("triton",),
        min_capability=(8, 0),
        check=_triton_check,
        description="Triton split-sequence reduction + apply, fp32 state, head dims up to 256",
    )
)
LINEAR_ATTENTION_OP.register(
    Backend(
        name="reference",
        impl=_reference_impl,
        description="PyTorch fp32/fp64 reference, differentiable (test oracle)",
    )
)


# ----------------------------------------------------------------------------------------------------------------
# torch.library op
# ----------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("diffboost::linear_attention", mutates_args=())
def _linear_attention_op(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor],
    feature_map: str,
    eps: float,
    backend: str,
) -> torch.Tensor:
    args = (query, key, value, key_padding_mask, feature_map, eps)
    chosen = LINEAR_ATTENTION_OP.select(query.device, query.dtype, *args, backend=backend)
    out = chosen.impl(*args)
    if out.stride() != _layout_strides(query, value.shape[-1]):  # the layout the fake implementation promised
        out = _empty_like_layout(query, value.shape[-1]).copy_(out)
    return out


@_linear_attention_op.register_fake
def _linear_attention_fake(query, key, value, key_padding_mask, feature_map, eps, backend):
    return _empty_like_layout(query, value.shape[-1])


# ----------------------------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------------------------


def _validate(query, key, value, key_padding_mask, feature_map, eps) -> None:
    (b, _, _, d), (_, _, n, _), (_, _, _, dv) = _validate_qkv("linear_attention", query, key, value)
    if n == 0:
        raise ValueError("linear_attention: key and value must have at least one token")
    if d == 0 or dv == 0:
        raise ValueError(f"linear_attention: head dims must be >= 1, got query/key {d}, value {dv}")
    if feature_map not in FEATURE_MAPS:
        raise ValueError(
            f"linear_attention: feature_map={feature_map!r} not supported ({', '.join(map(repr, FEATURE_MAPS))})"
        )
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"linear_attention: eps must be a positive finite number, got {eps!r}")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor):
            raise TypeError(
                "linear_attention: key_padding_mask must be a torch.Tensor or None, "
                f"got {type(key_padding_mask).__name__}"
            )
        if key_padding_mask.dtype != torch.bool:
            raise ValueError(
                f"linear_attention: key_padding_mask dtype {key_padding_mask.dtype} not supported (bool, True = attend)"
            )
        if tuple(key_padding_mask.shape) != (b, n):
            raise ValueError(
                f"linear_attention: key_padding_mask shape {tuple(key_padding_mask.shape)} must be (batch, key_len) = "
                f"{(b, n)}"
            )
        if key_padding_mask.device != query.device:
            raise ValueError(
                f"linear_attention: key_padding_mask is on {key_padding_mask.device}, query on {query.device}"
            )


def linear_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    feature_map: str = "elu",
    eps: float = 1e-4,
    key_padding_mask: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Normalized non-causal linear attention, ``phi(Q) (phi(K)^T V / N) / (phi(Q) . mean(phi(K)) + eps)``.

    Args:
        query: ``(batch, heads, Lq, head_dim)``; key ``(batch, heads, Lk, head_dim)``, value
            ``(batch, heads, Lk, head_dim_v)``; any strides, one device and dtype (fp16, bf16, fp32, fp64). Query and
            key lengths may differ.
        feature_map: ``"elu"`` (``elu(x) + 1``, LinFusion) or ``"relu"`` (SANA).
        eps: added to the normalizer (LinFusion uses 1e-4); must be positive.
        key_padding_mask: boolean ``(batch, Lk)``, True = attend. Dropped keys count neither in ``N`` nor in the
            mean; a batch element with no kept key gets zeros.
        backend: ``"auto"``, ``"triton"`` or ``"reference"`` (a forced backend that cannot run raises).

    Returns:
        ``(batch, heads, Lq, head_dim_v)`` in the input dtype, laid out in memory like ``query``.

    Inputs that require grad run the differentiable reference (the kernel is forward-only).
    """
    _validate(query, key, value, key_padding_mask, feature_map, eps)
    eps = float(eps)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        if backend not in ("auto", "reference"):
            raise ValueError(
                f"linear_attention: backend={backend!r} is forward-only; inputs require grad (use 'reference')"
            )
        return linear_attention_reference(
            query, key, value, feature_map=feature_map, eps=eps, key_padding_mask=key_padding_mask
        )
    return torch.ops.diffboost.linear_attention(query, key, value, key_padding_mask, feature_map, eps, backend)
