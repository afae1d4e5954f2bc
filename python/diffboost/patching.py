"""``diffboost.patch`` / ``diffboost.unpatch``: apply features to a diffusers pipeline (or a bare model) in place.

A feature (attention, step caching, quantization, linear attention) is a config plus an install/uninstall pair,
registered here with :func:`register_feature` by its module in :mod:`diffboost.integrations`. ``patch`` first undoes
whatever diffboost installed before (so patching twice is safe and the last call wins), then checks every requested
feature against the pipeline (so that a request that cannot apply fails before a slow one runs), then installs them in
their registered order (layer replacements before processors, processors before forward wrappers).
Only instances are touched: original objects (processors, modules, forwards) are kept and put back by ``unpatch`` in
reverse order, so the pipeline computes bit for bit what it did before.

A *persistent* feature (quantization) converts weights, which is expensive (calibration) and may not be undoable
(the original weights are dropped to save memory). ``patch`` keeps it when it is asked for again with an equal
config (so ``patch(pipe, quant="w4a4", cache=3)`` after ``patch(pipe, quant="w4a4")`` does not recalibrate) and
otherwise removes it like any other feature, which raises a clear error, before anything is changed, when it cannot
be undone.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, Callable

import torch

__all__ = ["Feature", "denoisers", "is_patched", "patch", "register_feature", "uncompiled", "unpatch"]

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
        options: extra keywords of :func:`patch` that belong to this feature (``calibration`` for ``quant``); they
            are passed to ``install`` as keyword arguments.
        persistent: see the module docstring; such a feature also provides ``check_uninstall``.
        check_uninstall: ``check_uninstall(pipe, state)`` raises (without changing anything) when ``uninstall``
            would fail.
        check_install: ``check_install(pipe, config)`` raises ValueError (without changing anything) when ``config``
            cannot apply to ``pipe``. :func:`patch` asks every requested feature before it installs any, so that a
            request that cannot work fails before a slow or irreversible feature (quantization) runs.
    """

    name: str
    order: int
    coerce: Callable[[Any], Any]
    install: Callable[..., Any]
    uninstall: Callable[[Any, Any], None]
    options: tuple[str, ...] = ()
    persistent: bool = False
    check_uninstall: Callable[[Any, Any], None] = lambda pipe, state: None
    check_install: Callable[[Any, Any], None] = lambda pipe, config: None


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


def uncompiled(module: torch.nn.Module) -> torch.nn.Module:
    """The module that a ``torch.compile`` wrapper (``OptimizedModule``) runs, else ``module`` itself.

    diffboost patches the original module, inside the wrapper: the wrapper's guards see the change and it recompiles
    on its next call, so ``torch.compile`` may come before or after :func:`patch`.
    """
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # not imported: nothing was compiled
    while eval_frame is not None and isinstance(module, eval_frame.OptimizedModule):
        module = module._orig_mod
    return module


def denoisers(pipe_or_model: Any, include_vae: bool = False) -> dict[str, torch.nn.Module]:
    """The modules diffboost patches: ``name -> module``. A bare ``nn.Module`` is its own denoiser (name ``""``).
    Compiled modules are given as the modules they compile (:func:`uncompiled`)."""
    if isinstance(pipe_or_model, torch.nn.Module):
        return {"": uncompiled(pipe_or_model)}
    names = DENOISER_NAMES + (("vae",) if include_vae else ())
    found = {}
    for name in names:
        module = getattr(pipe_or_model, name, None)
        if isinstance(module, torch.nn.Module):
            found[name] = uncompiled(module)
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
        quant: ``"w4a4"`` or a :class:`diffboost.W4A4Config`: W4A4 quantization of the denoisers' linear layers,
            calibrated on ``calibration`` (see :func:`diffboost.quant.quantize`; a short self-calibration without it).
        Other keywords are listed by ``diffboost info`` (each feature registers one). ``None`` leaves a feature off.

    Calling ``patch`` again replaces the previous patch (a quantization asked for again with an equal config is
    kept as it is); :func:`unpatch` restores the original exactly. If a feature fails to install, the ones installed
    by this call are removed again before the error propagates, except a quantization that cannot be undone
    (``keep_original=False``): it stays, and a note on the error says so.
    """
    denoisers(pipe)  # fail on something that is neither a pipeline nor a model before touching it
    registered = _features()
    known = {f.name: f for f in registered}
    owner = {option: f.name for f in registered for option in f.options}
    unknown = sorted(set(features) - set(known) - set(owner))
    if unknown:
        supported = ", ".join([*known, *owner])
        raise TypeError(f"diffboost.patch: unknown keyword(s) {', '.join(unknown)}; supported: {supported}")
    options: dict[str, dict[str, Any]] = {}
    for option, name in owner.items():
        if features.get(option) is not None:
            if features.get(name) is None:
                raise TypeError(f"diffboost.patch: {option}= is an option of {name}=, which was not given")
            options.setdefault(name, {})[option] = features[option]
    configs = {name: known[name].coerce(features[name]) for name in known if features.get(name) is not None}

    # Persistent features asked for again with an equal config stay; everything else goes. Check first that what
    # goes can go, so that an impossible request changes nothing.
    state = _state(pipe)
    kept = [entry for entry in state if known[entry[0]].persistent and configs.get(entry[0]) == entry[1]]
    leaving = [entry for entry in state if not any(entry is k for k in kept)]
    for name, _, feature_state in leaving:
        known[name].check_uninstall(pipe, feature_state)
    _uninstall(pipe, leaving)
    # Every request is checked against the pipeline as it now is before any is installed.
    for name, config in configs.items():
        known[name].check_install(pipe, config)
    kept_names = {name for name, _, _ in kept}
    added: list[tuple[str, Any, Any]] = []
    try:
        for feature in registered:
            if feature.name in configs and feature.name not in kept_names:
                config = configs[feature.name]
                feature_state = feature.install(pipe, config, **options.get(feature.name, {}))
                added.append((feature.name, config, feature_state))
                state.append(added[-1])
                setattr(pipe, _STATE_ATTR, state)
    except BaseException as exc:
        # Undo what this call installed, except a persistent feature that cannot be undone (a quantization without
        # its originals): it stays, recorded in the state as installed, and the error says so.
        undoable, stuck = _split_undoable(pipe, added)
        for (name, _, _), why in stuck:
            exc.add_note(f"diffboost.patch: {name}= stays installed: {why}")
        _uninstall(pipe, undoable)
        raise
    return pipe


def _state(pipe: Any) -> list[tuple[str, Any, Any]]:
    """The installed features of ``pipe``: ``(name, config, state)`` in install order (the list itself)."""
    return getattr(pipe, _STATE_ATTR, [])


def _split_undoable(pipe: Any, entries: list[tuple[str, Any, Any]]) -> tuple[list, list]:
    """``entries`` split into those that can be uninstalled and ``(entry, error)`` pairs for those whose
    ``check_uninstall`` refuses (a quantization without its originals), in the given order."""
    undoable, stuck = [], []
    for entry in entries:
        try:
            _FEATURES[entry[0]].check_uninstall(pipe, entry[2])
        except RuntimeError as exc:
            stuck.append((entry, exc))
        else:
            undoable.append(entry)
    return undoable, stuck


def _uninstall(pipe: Any, entries: list[tuple[str, Any, Any]]) -> None:
    """Uninstall ``entries`` (items of ``_state(pipe)``), newest first, dropping each from the state once undone."""
    state = _state(pipe)
    for entry in reversed(list(entries)):
        _FEATURES[entry[0]].uninstall(pipe, entry[2])
        state[:] = [e for e in state if e is not entry]
    if not state and hasattr(pipe, _STATE_ATTR):
        delattr(pipe, _STATE_ATTR)


def unpatch(pipe: Any) -> Any:
    """Undo everything :func:`patch` did to ``pipe`` (a no-op on a pipeline that is not patched) and return it.

    A quantization made without ``keep_original`` cannot be undone: the other features are removed and the error
    raised says how to get the original weights back.
    """
    undoable, stuck = _split_undoable(pipe, list(_state(pipe)))
    _uninstall(pipe, undoable)
    if stuck:
        raise stuck[-1][1]  # the newest, as when they were checked newest first
    return pipe


def _push(pipe: Any, name: str, config: Any, feature_state: Any) -> None:
    """Record a feature installed outside :func:`patch` (``diffboost.quant.quantize``) so :func:`unpatch` undoes it."""
    state = _state(pipe)
    state.append((name, config, feature_state))
    setattr(pipe, _STATE_ATTR, state)


def is_patched(pipe: Any) -> bool:
    """Whether ``pipe`` currently carries diffboost patches."""
    return getattr(pipe, _STATE_ATTR, None) is not None


def patched_features(pipe: Any) -> list[str]:
    """Names of the features currently installed on ``pipe``, in install order."""
    return [name for name, _, _ in _state(pipe)]
