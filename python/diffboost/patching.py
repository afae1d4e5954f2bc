"""``diffboost.patch`` / ``diffboost.unpatch``: apply features to a diffusers pipeline (or a bare model) in place.

A feature (attention, step caching, quantization, linear attention) is a config plus an install/uninstall pair,
registered here with :func:`register_feature` by its module in :mod:`diffboost.integrations`. ``patch`` first undoes
whatever diffboost installed before (so patching twice is safe and the last call wins), then installs the requested
features in their registered order (layer replacements before processors, processors before forward wrappers).
Only instances are touched: original objects (processors, modules, forwards) are kept and put back by ``unpatch`` in
reverse order, so the pipeline computes bit for bit what it did before.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch

__all__ = ["Feature", "denoisers", "is_patched", "patch", "register_feature", "unpatch"]

_STATE_ATTR = "_diffboost_patches"
# Pipeline components that run at every denoising step; the VAE and text encoders run once per image.
DENOISER_NAMES = ("unet", "transformer", "controlnet")


@dataclasses.dataclass(frozen=True)
class Feature:
    """One keyword of :func:`patch`.

    Attributes:
        name: the keyword (``"attention"``, ``"cache"``, ...).
        order: install order; lower installs first (and is removed last).
        coerce: turns the user's value (a string, int or config) into the feature's config, raising TypeError /
            ValueError that name the keyword and what it accepts.
        install: ``install(pipe, config) -> state``; everything needed to undo it goes in ``state``.
        uninstall: ``uninstall(pipe, state)``; restores exactly what ``install`` changed.
    """

    name: str
    order: int
    coerce: Callable[[Any], Any]
    install: Callable[[Any, Any], Any]
    uninstall: Callable[[Any, Any], None]


_FEATURES: dict[str, Feature] = {}


def register_feature(feature: Feature) -> Feature:
    """Make ``feature.name`` a keyword of :func:`patch`."""
    if feature.name in _FEATURES:
        raise ValueError(f"diffboost feature {feature.name!r} is already registered")
    _FEATURES[feature.name] = feature
    return feature


def _features() -> list[Feature]:
    import diffboost.integrations  # noqa: F401  (registers the built-in features)

    return sorted(_FEATURES.values(), key=lambda f: f.order)


def denoisers(pipe_or_model: Any, include_vae: bool = False) -> dict[str, torch.nn.Module]:
    """The modules diffboost patches: ``name -> module``. A bare ``nn.Module`` is its own denoiser (name ``""``)."""
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


def patch(pipe: Any, **features: Any) -> Any:
    """Make ``pipe`` faster in place and return it.

    Args:
        pipe: a diffusers pipeline (its ``unet`` / ``transformer`` / ``controlnet`` are patched) or a denoiser module.
        attention: ``"exact"``, ``"int8"`` or a :class:`diffboost.AttentionConfig`: fused Triton attention in every
            supported attention layer of the denoisers.
        cache: an int (DeepCache with that interval on U-Nets, uniform block caching on DiTs) or a
            :class:`diffboost.DeepCacheConfig` / :class:`diffboost.EncoderPropagationConfig` /
            :class:`diffboost.BlockCacheConfig`; :func:`diffboost.cache.stats` reports what the last call ran.
        Other keywords are listed by ``diffboost info`` (each feature registers one). ``None`` leaves a feature off.

    Calling ``patch`` again replaces the previous patch; :func:`unpatch` restores the original exactly. If a
    feature fails to install, the ones already installed are removed again before the error propagates.
    """
    denoisers(pipe)  # fail on something that is neither a pipeline nor a model before touching it
    registered = _features()
    known = {f.name: f for f in registered}
    unknown = sorted(set(features) - set(known))
    if unknown:
        raise TypeError(f"diffboost.patch: unknown keyword(s) {', '.join(unknown)}; supported: {', '.join(known)}")
    configs = {name: known[name].coerce(value) for name, value in features.items() if value is not None}
    unpatch(pipe)
    state: list[tuple[str, Any]] = []
    setattr(pipe, _STATE_ATTR, state)
    try:
        for feature in registered:
            if feature.name in configs:
                state.append((feature.name, feature.install(pipe, configs[feature.name])))
    except BaseException:
        unpatch(pipe)
        raise
    if not state:
        delattr(pipe, _STATE_ATTR)
    return pipe


def unpatch(pipe: Any) -> Any:
    """Undo everything :func:`patch` did to ``pipe`` (a no-op on a pipeline that is not patched) and return it."""
    state = getattr(pipe, _STATE_ATTR, None)
    if state is None:
        return pipe
    while state:
        name, feature_state = state[-1]
        _FEATURES[name].uninstall(pipe, feature_state)
        state.pop()
    delattr(pipe, _STATE_ATTR)
    return pipe


def is_patched(pipe: Any) -> bool:
    """Whether ``pipe`` currently carries diffboost patches."""
    return getattr(pipe, _STATE_ATTR, None) is not None


def patched_features(pipe: Any) -> list[str]:
    """Names of the features currently installed on ``pipe``, in install order."""
    return [name for name, _ in getattr(pipe, _STATE_ATTR, [])]
