"""DeepCache on a diffusers ``UNet2DConditionModel``, by replaying module outputs.

The U-Net's own forward always runs; what changes on a partial call is that every module deeper than the shallow
branch (a *unit*) returns, without running, the output it produced at the last full call of the same slot. The
first up-path layer that does run therefore receives the cached deep feature, concatenated with the fresh skip
feature of the shallow branch — DeepCache's computation, on any U-Net of that class (SD 1.x/2.x, SDXL, inpainting).
Whole blocks are units where the whole block is skipped, so a partial call costs one Python call per deep block.

Branch numbering (DeepCache's): the skip features of the down path are ``s_0`` (``conv_in``) and then, per down
block, one per resnet and one for the downsampler. Branch ``b`` = (block ``b // 3``, layer ``b % 3``) keeps the
down block's layers before ``layer`` and every block before it, i.e. the skips ``s_0 .. s_F-1`` with
``F = 1 + skips of the earlier blocks + layer``; an up-path resnet runs exactly when the skip it consumes is fresh.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable

import torch

from diffboost.cache import DeepCacheConfig
from diffboost.cache.runtime import DenoiserCache, ForwardPatch, StepTracker, eager, repeat_batch

logger = logging.getLogger("diffboost")

__all__ = ["ControlNetCache", "DeepCacheUNet", "UNetReplayCache", "deepcache_units"]

_RUN, _RECORD, _REPLAY = "run", "record", "replay"
# Inputs the U-Net adds to its features in place: a replayed feature would accumulate them, so such calls run fully.
_IN_PLACE_INPUTS = ("down_intrablock_additional_residuals",)


def _skips_per_block(unet: torch.nn.Module) -> list[int]:
    return [len(block.resnets) + (1 if getattr(block, "downsamplers", None) else 0) for block in unet.down_blocks]


def _branches(unet: torch.nn.Module) -> list[int]:
    skips = _skips_per_block(unet)
    return [b for b in range(3 * len(skips)) if b % 3 <= skips[b // 3]]


def deepcache_units(unet: torch.nn.Module, branch: int) -> list[torch.nn.Module]:
    """The modules that do not run on DeepCache's partial steps for ``branch``; ValueError if the U-Net has no such
    branch."""
    valid = _branches(unet)
    if branch not in valid:
        raise ValueError(f"DeepCacheConfig.branch={branch}: this U-Net ({len(unet.down_blocks)} down blocks) has "
                         f"branches {valid[0]}-{valid[-1]}")
    skips = _skips_per_block(unet)
    block, layer = divmod(branch, 3)
    fresh = 1 + sum(skips[:block]) + layer
    units: list[torch.nn.Module] = []
    for index, down in enumerate(unet.down_blocks):
        if index < block:
            continue
        if index > block or layer == 0:
            units.append(down)
            continue
        attentions = getattr(down, "attentions", None)
        for j in range(layer, len(down.resnets)):
            units.append(down.resnets[j])
            if attentions:
                units.append(attentions[j])
        if getattr(down, "downsamplers", None) and layer <= len(down.resnets):  # the downsampler is layer L
            units.extend(down.downsamplers)
    if unet.mid_block is not None:
        units.append(unet.mid_block)
    stale = sum(skips) + 1 - fresh  # up-path resnets whose skip input is a cached (deep) one: the first `stale`
    for up in unet.up_blocks:
        if stale <= 0:
            break
        if stale >= len(up.resnets):
            units.append(up)  # with its upsampler: the next block starts from the cached output
            stale -= len(up.resnets)
            continue
        attentions = getattr(up, "attentions", None)
        for j in range(stale):
            units.append(up.resnets[j])
            if attentions:
                units.append(attentions[j])
        stale = 0
    return units


class UNetReplayCache(DenoiserCache):
    """A U-Net whose ``units`` return, on partial calls, what they returned at the last full call of the same slot.

    Stored outputs are references to the tensors the full call produced (no copies); they are dropped when the
    pipeline call ends. Features are per sample, so CFG and batched prompts never mix.
    """

    method = "deepcache"

    def __init__(self, tracker: StepTracker, name: str, unet: torch.nn.Module, config: Any,
                 units: list[torch.nn.Module]) -> None:
        super().__init__(tracker, name, unet)
        self.config = config
        self.units = units
        self._mode = _RUN
        self._current: dict[int, Any] | None = None  # unit index -> output, for the call in progress
        self._store: dict[int, dict[int, Any]] = {}  # slot -> unit outputs of its last full call
        self._repeat = 1  # replayed outputs are repeated this many times along the batch (batched decoder)
        self._batch = 0
        self._warned = False

    @property
    def skippable(self) -> list[torch.nn.Module]:
        return self.units

    def full_steps(self, num_steps: int) -> list[bool]:
        return self.config.full_steps(num_steps)

    def install_units(self) -> None:
        for index, unit in enumerate(self.units):
            self.patches.append(ForwardPatch(unit, functools.partial(self._unit_forward, index)))

    def _unit_forward(self, index: int, original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def forward(*args, **kwargs):
            mode = self._mode
            if mode is _REPLAY:
                out = self._current[index]
                return out if self._repeat == 1 else repeat_batch(out, self._repeat, self._batch)
            out = original(*args, **kwargs)
            if mode is _RECORD:
                self._current[index] = out
            return out

        return forward

    def end_call(self) -> None:
        self._store.clear()
        self._current = None

    @eager
    def call(self, original: Callable[..., Any], step: int, slot: int, args: tuple, kwargs: dict) -> Any:
        if any(kwargs.get(name) is not None for name in _IN_PLACE_INPUTS):
            if not self._warned:
                self._warned = True
                logger.warning("diffboost: %s gets %s, which it adds to its features in place; these calls run "
                               "without caching", self.name, ", ".join(_IN_PLACE_INPUTS))
            out = original(*args, **kwargs)
            self.report(step, args, kwargs, reused=False, skipped=False)
            return out
        cached = self._store.get(slot)
        if self.is_full(step) or cached is None:
            return self.full_call(original, step, slot, args, kwargs)
        self._mode, self._current = _REPLAY, cached
        try:
            out = original(*args, **kwargs)
        finally:
            self._mode, self._current = _RUN, None
        self.report(step, args, kwargs, reused=True, skipped=True)
        return out

    @eager
    def full_call(self, original: Callable[..., Any], step: int, slot: int, args: tuple, kwargs: dict) -> Any:
        """Run the whole U-Net, keeping the units' outputs when a later step of the call will reuse them."""
        record = self.partial_follows(step)
        self._store.pop(slot, None)
        current = {} if record else None
        self._mode, self._current = (_RECORD if record else _RUN), current
        try:
            out = self.run_full(original, args, kwargs)
        finally:
            self._mode, self._current = _RUN, None
        if record:
            self._store[slot] = current
        self.report(step, args, kwargs, reused=False, skipped=False)
        return out


class DeepCacheUNet(UNetReplayCache):
    """DeepCache (:class:`~diffboost.cache.DeepCacheConfig`) on one ``UNet2DConditionModel``."""

    def __init__(self, tracker: StepTracker, name: str, unet: torch.nn.Module, config: DeepCacheConfig) -> None:
        super().__init__(tracker, name, unet, config, deepcache_units(unet, config.branch))


def _same_scale(a: Any, b: Any) -> bool:
    """Equal conditioning scales (floats or lists of them), compared on the host; tensors only by identity."""
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_scale(x, y) for x, y in zip(a, b))
    return a is b


class ControlNetCache(DenoiserCache):
    """A ControlNet that runs only on the U-Net's full steps; on the others it returns its residuals from the last
    full step (per slot), so the U-Net's fresh shallow skips and its replayed deep features get the same control as
    when the cache was filled. A different ``conditioning_scale`` than then (``control_guidance_start/end``) makes
    it run again."""

    def __init__(self, tracker: StepTracker, name: str, controlnet: torch.nn.Module, leader: DenoiserCache) -> None:
        super().__init__(tracker, name, controlnet)
        self.leader = leader
        self._store: dict[int, tuple[Any, Any]] = {}  # slot -> (conditioning_scale, output)

    @property
    def skippable(self) -> list[torch.nn.Module]:
        return [self.module]

    def full_steps(self, num_steps: int) -> list[bool]:
        return self.leader.full_steps(num_steps)  # the U-Net's schedule

    def end_call(self) -> None:
        self._store.clear()

    @eager
    def call(self, original: Callable[..., Any], step: int, slot: int, args: tuple, kwargs: dict) -> Any:
        scale = kwargs.get("conditioning_scale", 1.0)
        cached = self._store.get(slot)
        if cached is not None and not self.is_full(step) and _same_scale(cached[0], scale):
            self.report(step, args, kwargs, reused=True, skipped=True)
            return cached[1]
        out = self.run_full(original, args, kwargs)
        if self.partial_follows(step):
            self._store[slot] = (scale, out)
        else:
            self._store.pop(slot, None)
        self.report(step, args, kwargs, reused=False, skipped=False)
        return out
