"""``diffboost.patch(pipe, linear_attention=...)``: LinFusion-style linear attention in every U-Net self-attention.

Every ``attn1`` of the pipeline's U-Net (cross-attention stays) is swapped for a
:class:`~diffboost.linear.GeneralizedLinearAttention`, on the instance: the parent block's attribute is set to the
new module, and the original module object is kept and put back by ``unpatch``. Weights come from a LinFusion-layout
checkpoint directory, from an in-memory :class:`~diffboost.linear.LinearAttentionModules` (what
:func:`diffboost.linear.distill` returns), or — with ``weights=None`` — from the U-Net's own projections, which is
the starting point of distillation (undistilled, the output differs visibly from softmax attention).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
from typing import Any, Optional, Union

import torch

from diffboost.linear.modules import LinearAttentionModules, check_projection_mid_dim
from diffboost.ops.linear_attention import LINEAR_ATTENTION_OP
from diffboost.patching import Feature, denoisers, register_feature

logger = logging.getLogger("diffboost")

__all__ = ["LinearAttentionConfig", "install", "uninstall", "unet_of"]


@dataclasses.dataclass(frozen=True)
class LinearAttentionConfig:
    """What :func:`diffboost.patch` does with ``linear_attention=``.

    Args:
        weights: a LinFusion-layout checkpoint directory (``config.json`` + ``diffusion_pytorch_model.safetensors``),
            a :class:`~diffboost.linear.LinearAttentionModules` (copied on install), or None to initialise every
            module from the self-attention it replaces (before distillation).
        projection_mid_dim: hidden width of the residual projections when ``weights`` is None (None = model width,
            -1 = none), as LinFusion's ``projection_mid_dim``.
        backend: backend of :func:`diffboost.ops.linear_attention` (``"auto"``: the Triton kernel where it runs,
            else the PyTorch reference; or force ``"triton"`` / ``"reference"``).
    """

    weights: Union[str, os.PathLike, LinearAttentionModules, None] = None
    projection_mid_dim: Optional[int] = None
    backend: str = "auto"

    def __post_init__(self) -> None:
        if not (self.weights is None or isinstance(self.weights, (str, os.PathLike, LinearAttentionModules))):
            raise TypeError(
                "LinearAttentionConfig.weights must be a checkpoint directory, a LinearAttentionModules or None, "
                f"got {type(self.weights).__name__}"
            )
        check_projection_mid_dim(self.projection_mid_dim, "LinearAttentionConfig")
        if self.projection_mid_dim is not None and self.weights is not None:
            raise ValueError("LinearAttentionConfig: projection_mid_dim applies only with weights=None")
        backends = ["auto"] + [b.name for b in LINEAR_ATTENTION_OP.backends]
        if self.backend not in backends:
            raise ValueError(
                f"LinearAttentionConfig.backend={self.backend!r} not supported ({', '.join(map(repr, backends))})"
            )


def unet_of(pipe: Any) -> torch.nn.Module:
    """The U-Net of a pipeline (or a bare U-Net module); ValueError for transformer-based pipelines."""
    found = denoisers(pipe)
    unet = found.get("unet", found.get(""))
    if unet is None:
        raise ValueError(
            f"linear_attention replaces U-Net self-attention; {type(pipe).__name__} has no unet "
            f"(it has {', '.join(found)})"
        )
    return unet


def _modules_for(unet: torch.nn.Module, config: LinearAttentionConfig) -> tuple[LinearAttentionModules, str]:
    if config.weights is None:
        return LinearAttentionModules.from_unet(unet, config.projection_mid_dim), "initialisation"
    if isinstance(config.weights, LinearAttentionModules):
        return config.weights.clone(), "the given LinearAttentionModules"
    return LinearAttentionModules.load(config.weights), f"checkpoint {os.fspath(config.weights)}"


def install(pipe: Any, config: LinearAttentionConfig) -> list[tuple[torch.nn.Module, str, torch.nn.Module]]:
    """Replace the U-Net's self-attentions; return ``(parent, attribute, original)`` triples to undo it.

    Everything is loaded and checked before the first module is swapped, so a mismatching checkpoint raises with
    the pipeline unchanged.
    """
    unet = unet_of(pipe)
    modules, source = _modules_for(unet, config)
    originals = modules.check_matches(unet, source)
    swaps = []
    for name, new in modules.items():
        original = originals[name]
        # A self-attention quantized by diffboost.quant has no float parameters: the U-Net's then give the dtype.
        like = next(p for p in itertools.chain(original.parameters(), unet.parameters()) if p.is_floating_point())
        parent_name, _, attribute = name.rpartition(".")
        parent = unet.get_submodule(parent_name)
        new.backend = config.backend
        swaps.append((parent, attribute, original, new.to(device=like.device, dtype=like.dtype).eval()))
    changed = []
    for parent, attribute, original, new in swaps:
        setattr(parent, attribute, new)
        changed.append((parent, attribute, original))
    logger.info("diffboost: linear attention in %d U-Net self-attentions (%s)", len(changed), source)
    return changed


def check_install(pipe: Any, config: LinearAttentionConfig) -> None:
    """ValueError, changing nothing, if ``config`` cannot apply to ``pipe``: no U-Net, or a checkpoint that does not
    load or does not match the U-Net's self-attentions (initialising from the U-Net itself always fits)."""
    unet = unet_of(pipe)
    if config.weights is not None:
        modules, source = _modules_for(unet, config)
        modules.check_matches(unet, source)


def uninstall(changed: list[tuple[torch.nn.Module, str, torch.nn.Module]]) -> None:
    """Put back the original self-attention objects recorded by :func:`install`."""
    for parent, attribute, original in reversed(changed):
        setattr(parent, attribute, original)


def _coerce(value: Any) -> LinearAttentionConfig:
    if isinstance(value, LinearAttentionConfig):
        return value
    if value is True:
        return LinearAttentionConfig()
    if isinstance(value, (str, os.PathLike, LinearAttentionModules)):
        return LinearAttentionConfig(weights=value)
    raise TypeError(
        "diffboost.patch: linear_attention must be a diffboost.LinearAttentionConfig, a checkpoint directory, "
        f"a LinearAttentionModules or True (initialise from the U-Net), got {type(value).__name__}"
    )


register_feature(
    Feature(
        name="linear_attention",
        order=20,  # after quantization, before attention processors and caching
        coerce=_coerce,
        install=install,
        uninstall=lambda pipe, changed: uninstall(changed),
        check_install=check_install,
    )
)
