"""``diffboost.patch`` / ``diffboost.unpatch``: apply features to a diffusers pipeline (or a bare model) in place.

Each feature is a config plus an install/uninstall pair (see :mod:`diffboost.integrations`). ``patch`` first undoes
whatever diffboost installed before (so patching twice is safe and the last call wins), then installs the requested
features on the pipeline's denoisers. Only instances are touched: original objects (processors, modules) are kept
and put back by ``unpatch``, so the pipeline computes bit for bit what it did before.
"""

from __future__ import annotations

from typing import Any, Union

import torch

from diffboost.integrations import attention as _attention
from diffboost.integrations.attention import AttentionConfig

__all__ = ["AttentionConfig", "denoisers", "is_patched", "patch", "unpatch"]

_STATE_ATTR = "_diffboost_patches"
# Pipeline components that run at every denoising step; the VAE and text encoders run once per image.
DENOISER_NAMES = ("unet", "transformer", "controlnet")


def denoisers(pipe_or_model: Any, include_vae: bool = False) -> dict[str, torch.nn.Module]:
    """The modules diffboost patches: ``name -> module``. A bare ``nn.Module`` is its own denoiser."""
    if isinstance(pipe_or_model, torch.nn.Module):
        return {"": pipe_or_model}
    names = DENOISER_NAMES + (("vae",) if include_vae else ())
    found = {}
    for name in names:
        module = getattr(pipe_or_model, name, None)
        if isinstance(module, torch.nn.Module):
            found[name] = module
    if not found:
        raise ValueError(
            f"diffboost.patch: {type(pipe_or_model).__name__} has none of the components {', '.join(names)}; "
            "pass a diffusers pipeline or a denoiser module"
        )
    return found


def _attention_config(value: Union[str, AttentionConfig]) -> AttentionConfig:
    if isinstance(value, AttentionConfig):
        return value
    if isinstance(value, str):
        return AttentionConfig(precision=value)
    raise TypeError(
        f"diffboost.patch: attention must be 'exact', 'int8' or a diffboost.AttentionConfig, got {type(value).__name__}"
    )


def patch(pipe: Any, *, attention: Union[str, AttentionConfig, None] = None) -> Any:
    """Make ``pipe`` faster in place and return it.

    Args:
        pipe: a diffusers pipeline (its ``unet`` / ``transformer`` / ``controlnet`` are patched) or a denoiser module.
        attention: ``"exact"``, ``"int8"`` or an :class:`AttentionConfig`: fused Triton attention in every supported
            attention layer. ``None`` leaves attention alone.

    Calling ``patch`` again replaces the previous patch; :func:`unpatch` restores the original exactly.
    """
    unpatch(pipe)
    state: dict[str, Any] = {}
    if attention is not None:
        config = _attention_config(attention)
        changed = []
        for name, module in denoisers(pipe, include_vae=config.include_vae).items():
            changed += _attention.install(module, config, prefix=name)
        state["attention"] = changed
    if state:
        setattr(pipe, _STATE_ATTR, state)
    return pipe


def unpatch(pipe: Any) -> Any:
    """Undo everything :func:`patch` did to ``pipe`` (a no-op on a pipeline that is not patched) and return it."""
    state = getattr(pipe, _STATE_ATTR, None)
    if state is None:
        return pipe
    if "attention" in state:
        _attention.uninstall(state.pop("attention"))
    delattr(pipe, _STATE_ATTR)
    return pipe


def is_patched(pipe: Any) -> bool:
    """Whether ``pipe`` currently carries diffboost patches."""
    return getattr(pipe, _STATE_ATTR, None) is not None
