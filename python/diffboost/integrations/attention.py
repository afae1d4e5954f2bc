"""diffusers attention processors that run :func:`diffboost.ops.attention`, and their installation on a model.

Three processors, one per kind of diffusers attention processor they replace. Each keeps its original's call
signature (diffusers filters keyword arguments by it) and its pre/post-processing, built from diffusers' own module
helpers (``prepare_attention_mask``, ``norm_cross``, ``spatial_norm``, the FLUX projection and RoPE helpers); only the
attention itself changes:

* :class:`AttnProcessor` replaces ``AttnProcessor2_0`` (U-Net self/cross attention, PixArt, VAE).
* :class:`JointAttnProcessor` replaces ``JointAttnProcessor2_0`` (SD3-style joint attention).
* :class:`FluxAttnProcessor` replaces ``FluxAttnProcessor`` (FLUX dual- and single-stream blocks).

Q/K/V are handed to the op as the strided ``(B, S, H, D) -> (B, H, S, D)`` views the projections give, and the op
writes its output in the same physical order, so neither side copies. A call the fused kernel cannot take (head dim
512 in a VAE, fp32 on a GPU, ...) runs through the op's fallback (SDPA), and the processor logs the reason once for
its layer.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch

from diffboost.ops.attention import ATTENTION_OP, attention
from diffboost.patching import Feature, denoisers, register_feature

logger = logging.getLogger("diffboost")

__all__ = ["AttentionConfig", "AttnProcessor", "FluxAttnProcessor", "JointAttnProcessor", "install", "uninstall"]


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """What :func:`diffboost.patch` does to attention.

    Args:
        precision: ``"exact"`` (flash-style, same result as SDPA up to rounding) or ``"int8"`` (INT8 Q/K with
            smoothing, SageAttention's method; a bounded change of the output).
        include_vae: also patch the VAE's attention. Off by default: its single 512-wide head is memory-bound and
            the fused kernel's head-dim limit (256) sends it to SDPA anyway.
        smooth_k: subtract K's per-head mean before INT8 quantization; only disable to measure what it buys.
    """

    precision: str = "exact"
    include_vae: bool = False
    smooth_k: bool = True

    def __post_init__(self) -> None:
        if self.precision not in ("exact", "int8"):
            raise ValueError(f"AttentionConfig.precision={self.precision!r} not supported ('exact', 'int8')")


class _DiffboostProcessor:
    """Shared part: the attention call, with a per-layer note when the fused kernel is not the one that runs."""

    def __init__(self, config: AttentionConfig, layer_name: str, original: Any) -> None:
        self.config = config
        self.layer_name = layer_name
        self.original = original  # kept so uninstall restores the very same object
        self._reported = False

    def _attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scale):
        # The note is Python-side bookkeeping: skipped while torch.compile traces (where it would break the graph);
        # the op itself still records which backend ran (diffboost.ops.dispatch_log).
        if not self._reported and not torch.compiler.is_compiling():
            self._reported = True
            args = (query, key, value, mask, False, scale, self.config.precision, False, self.config.smooth_k)
            reasons = ATTENTION_OP.backend("triton").why_not(query.device, query.dtype, *args)
            if reasons:
                level = logging.WARNING if query.is_cuda else logging.INFO
                logger.log(level, "diffboost: %s: fused attention does not run here (%s); using the fallback",
                           self.layer_name, "; ".join(reasons))
        return attention(
            query, key, value, mask, scale=scale, precision=self.config.precision, smooth_k=self.config.smooth_k
        )


class AttnProcessor(_DiffboostProcessor):
    """Replacement for diffusers' ``AttnProcessor2_0``: group/spatial norm, cross-attention, masks, residual
    connection and output rescaling behave as there."""

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        image_shape = None
        if hidden_states.ndim == 4:
            image_shape = hidden_states.shape
            hidden_states = hidden_states.flatten(2).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch, context_len = context.shape[:2]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, context_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if encoder_hidden_states is None:
            context = hidden_states
        elif attn.norm_cross:
            context = attn.norm_encoder_hidden_states(encoder_hidden_states)

        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.unflatten(-1, (attn.heads, head_dim)).transpose(1, 2) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        out = self._attend(query, key, value, attention_mask, None)
        hidden_states = out.transpose(1, 2).flatten(2).to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if image_shape is not None:
            hidden_states = hidden_states.transpose(1, 2).reshape(image_shape)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class JointAttnProcessor(_DiffboostProcessor):
    """Replacement for diffusers' ``JointAttnProcessor2_0`` (SD3): image and context tokens attend jointly."""

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *args,
        **kwargs,
    ):
        n_image = hidden_states.shape[1]

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.unflatten(-1, (attn.heads, -1)).transpose(1, 2)

        query, key, value = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if encoder_hidden_states is not None:
            c_query = heads(attn.add_q_proj(encoder_hidden_states))
            c_key = heads(attn.add_k_proj(encoder_hidden_states))
            c_value = heads(attn.add_v_proj(encoder_hidden_states))
            if attn.norm_added_q is not None:
                c_query = attn.norm_added_q(c_query)
            if attn.norm_added_k is not None:
                c_key = attn.norm_added_k(c_key)
            query = torch.cat([query, c_query], dim=2)
            key = torch.cat([key, c_key], dim=2)
            value = torch.cat([value, c_value], dim=2)

        out = self._attend(query, key, value, None, None).transpose(1, 2).flatten(2).to(query.dtype)
        hidden_states, context = out[:, :n_image], out[:, n_image:]
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if encoder_hidden_states is None:
            return hidden_states
        if not attn.context_pre_only:
            context = attn.to_add_out(context)
        return hidden_states, context


class FluxAttnProcessor(_DiffboostProcessor):
    """Replacement for diffusers' ``FluxAttnProcessor``: QK RMSNorm, RoPE, text + image tokens, both block kinds."""

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ):
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        query, key, value, c_query, c_key, c_value = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query, key, value = (t.unflatten(-1, (-1, attn.head_dim)) for t in (query, key, value))
        query, key = attn.norm_q(query), attn.norm_k(key)
        if attn.added_kv_proj_dim is not None:
            c_query, c_key, c_value = (t.unflatten(-1, (-1, attn.head_dim)) for t in (c_query, c_key, c_value))
            c_query, c_key = attn.norm_added_q(c_query), attn.norm_added_k(c_key)
            query = torch.cat([c_query, query], dim=1)
            key = torch.cat([c_key, key], dim=1)
            value = torch.cat([c_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        out = self._attend(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attention_mask, None)
        hidden_states = out.transpose(1, 2).flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:
            return hidden_states
        n_text = encoder_hidden_states.shape[1]
        context, hidden_states = hidden_states[:, :n_text], hidden_states[:, n_text:]
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
        return hidden_states, attn.to_add_out(context.contiguous())


def _replacements() -> dict[type, type]:
    """diffusers processor class -> diffboost processor class. Exact types only: a subclass may change behaviour."""
    from diffusers.models import attention_processor as ap
    from diffusers.models.transformers import transformer_flux

    return {
        ap.AttnProcessor2_0: AttnProcessor,
        ap.JointAttnProcessor2_0: JointAttnProcessor,
        transformer_flux.FluxAttnProcessor: FluxAttnProcessor,
    }


def install(model: torch.nn.Module, config: AttentionConfig, prefix: str = "") -> list[tuple[torch.nn.Module, Any]]:
    """Replace every supported attention processor inside ``model``; return ``(module, original)`` pairs to undo it.

    Modules whose processor diffboost does not know (IP-Adapter, custom processors) are left alone and named in the
    log, never silently changed.
    """
    table = _replacements()
    changed = []
    for name, module in model.named_modules():
        processor = getattr(module, "processor", None)
        if processor is None or not hasattr(module, "set_processor"):
            continue
        replacement = table.get(type(processor))
        layer = f"{prefix}.{name}" if prefix else name
        if replacement is None:
            logger.info("diffboost: %s keeps its %s (no fused replacement)", layer, type(processor).__name__)
            continue
        module.set_processor(replacement(config, layer, processor))
        changed.append((module, processor))
    return changed


def uninstall(changed: list[tuple[torch.nn.Module, Any]]) -> None:
    """Put back the original processor objects recorded by :func:`install`."""
    for module, original in changed:
        module.set_processor(original)


def _coerce(value: Any) -> AttentionConfig:
    if isinstance(value, AttentionConfig):
        return value
    if isinstance(value, str):
        return AttentionConfig(precision=value)
    raise TypeError(
        f"diffboost.patch: attention must be 'exact', 'int8' or a diffboost.AttentionConfig, got {type(value).__name__}"
    )


def _install_on_pipe(pipe: Any, config: AttentionConfig) -> list[tuple[torch.nn.Module, Any]]:
    changed = []
    for name, module in denoisers(pipe, include_vae=config.include_vae).items():
        changed += install(module, config, prefix=name)
    return changed


register_feature(
    Feature(
        name="attention",
        order=30,  # after features that replace whole layers (quantization, linear attention)
        coerce=_coerce,
        install=_install_on_pipe,
        uninstall=lambda pipe, changed: uninstall(changed),
    )
)
