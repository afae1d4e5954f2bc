"""``diffboost.patch(pipe, cache=...)``: step-cached execution (:mod:`diffboost.cache`) on a diffusers pipeline.

``cache`` takes a :class:`~diffboost.cache.DeepCacheConfig` or :class:`~diffboost.cache.EncoderPropagationConfig`
(U-Net pipelines), a :class:`~diffboost.cache.BlockCacheConfig` (DiT pipelines), or an int: DeepCache with that
interval (branch 0) on a U-Net, uniform block caching with that interval on a DiT. The pipeline's denoiser, its
ControlNet if it has one (U-Nets), and the pipeline's class are patched on the instance; ``diffboost.unpatch``
restores all of them. Installed after the other features (order 40): it wraps forwards, they replace layers and
attention processors inside them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from diffboost.cache import BlockCacheConfig, DeepCacheConfig, EncoderPropagationConfig
from diffboost.patching import Feature, denoisers, register_feature

if TYPE_CHECKING:
    from diffboost.cache.runtime import StepTracker

__all__ = ["install", "uninstall"]

CacheConfig = DeepCacheConfig | EncoderPropagationConfig | BlockCacheConfig


def _coerce(value: Any) -> CacheConfig | int:
    if isinstance(value, (DeepCacheConfig, EncoderPropagationConfig, BlockCacheConfig)):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise ValueError(f"diffboost.patch: cache={value}: an interval must be an integer >= 1")
        return value
    raise TypeError("diffboost.patch: cache must be an int (caching interval), a diffboost.DeepCacheConfig, "
                    f"EncoderPropagationConfig or BlockCacheConfig, got {type(value).__name__}")


def install(pipe: Any, config: CacheConfig | int) -> StepTracker:
    """Patch ``pipe`` for step caching and return the tracker that undoes it (:func:`uninstall`)."""
    tracker = _tracker(pipe, config)
    tracker.install()
    return tracker


def _tracker(pipe: Any, config: CacheConfig | int) -> StepTracker:
    """The caches for ``pipe``, built but not installed (``pipe`` is not changed).

    Raises ValueError for a config that does not fit the pipeline's denoiser: a U-Net config on a DiT or the
    reverse, a DeepCache branch the U-Net does not have, a bare module instead of a pipeline.
    """
    from diffusers import UNet2DConditionModel

    from diffboost.cache.block_cache import BlockCache
    from diffboost.cache.deepcache import ControlNetCache, DeepCacheUNet
    from diffboost.cache.encoder_propagation import EncoderPropagationUNet
    from diffboost.cache.runtime import StepTracker  # imports torch._dynamo (to keep bookkeeping out of graphs)

    found = denoisers(pipe)
    if "" in found:
        raise ValueError(f"diffboost.patch: cache= needs a diffusers pipeline (steps are counted per pipeline call), "
                         f"got a bare {type(pipe).__name__}")
    if getattr(pipe, "scheduler", None) is None:
        raise ValueError(f"diffboost.patch: cache= needs a pipeline with a scheduler; {type(pipe).__name__} has none")
    name = "unet" if "unet" in found else "transformer" if "transformer" in found else None
    if name is None:
        raise ValueError(f"diffboost.patch: cache= found no unet or transformer in {type(pipe).__name__}")
    denoiser = found[name]
    is_unet = isinstance(denoiser, UNet2DConditionModel)
    if isinstance(config, int):
        config = DeepCacheConfig(interval=config) if is_unet else BlockCacheConfig(mode="uniform", interval=config)
    kind = type(denoiser).__name__
    if isinstance(config, (DeepCacheConfig, EncoderPropagationConfig)) and not is_unet:
        raise ValueError(f"diffboost.patch: cache={type(config).__name__}(...) needs a UNet2DConditionModel; "
                         f"this pipeline's {name} is a {kind}: use diffboost.BlockCacheConfig")
    if isinstance(config, BlockCacheConfig) and is_unet:
        raise ValueError(f"diffboost.patch: cache=BlockCacheConfig(...) is for transformer denoisers; this "
                         f"pipeline's {name} is a {kind}: use diffboost.DeepCacheConfig or EncoderPropagationConfig")

    cache_class = {DeepCacheConfig: DeepCacheUNet, EncoderPropagationConfig: EncoderPropagationUNet,
                   BlockCacheConfig: BlockCache}[type(config)]
    tracker = StepTracker(pipe, cache_class.method)
    main = cache_class(tracker, name, denoiser, config)
    tracker.caches.append(main)
    if is_unet and "controlnet" in found:
        tracker.caches.append(ControlNetCache(tracker, "controlnet", found["controlnet"], leader=main))
    return tracker


def uninstall(tracker: StepTracker) -> None:
    """Restore everything :func:`install` changed."""
    tracker.uninstall()


register_feature(
    Feature(
        name="cache",
        order=40,  # last: wraps forwards around whatever layers and processors the other features installed
        coerce=_coerce,
        install=install,
        uninstall=lambda pipe, tracker: uninstall(tracker),
        check_install=_tracker,
    )
)
