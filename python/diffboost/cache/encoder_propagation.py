"""Faster Diffusion's encoder propagation on a diffusers ``UNet2DConditionModel``.

The encoder (``conv_in``, every down block, the mid block) is replayed on non-key steps exactly as DeepCache's deep
units are (:class:`~diffboost.cache.deepcache.UNetReplayCache`); the decoder runs on the stored skip features and
mid output with the current timestep embedding. Since nothing the decoder reads then depends on the latents, the
decoder passes of all non-key steps up to the next key step can run at the key step as one batched call (the
parallel decoder): the U-Net runs once on the batch ``[x; x; ...]`` with one timestep per copy, its encoder
modules replaying their stored outputs repeated the same way, and each later step gets its slice.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, Callable

import torch

from diffboost.cache import EncoderPropagationConfig
from diffboost.cache.deepcache import _REPLAY, _RUN, UNetReplayCache
from diffboost.cache.runtime import StepTracker, eager, repeat_batch

logger = logging.getLogger("diffboost")

__all__ = ["EncoderPropagationUNet", "encoder_units"]


def encoder_units(unet: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules that form Faster Diffusion's encoder: ``conv_in``, the down blocks and the mid block."""
    units = [unet.conv_in, *unet.down_blocks]
    if unet.mid_block is not None:
        units.append(unet.mid_block)
    return units


class EncoderPropagationUNet(UNetReplayCache):
    """Encoder propagation (:class:`~diffboost.cache.EncoderPropagationConfig`) on one ``UNet2DConditionModel``."""

    method = "encoder_propagation"

    def __init__(self, tracker: StepTracker, name: str, unet: torch.nn.Module,
                 config: EncoderPropagationConfig) -> None:
        super().__init__(tracker, name, unet, config, encoder_units(unet))
        self._precomputed: dict[tuple[int, int], torch.Tensor] = {}  # (slot, step) -> noise prediction
        self._signature: inspect.Signature | None = None
        self._told_sequential = False

    def end_call(self) -> None:
        super().end_call()
        self._precomputed.clear()

    def _bind(self, original: Callable[..., Any], args: tuple, kwargs: dict) -> inspect.BoundArguments:
        if self._signature is None:
            self._signature = inspect.signature(original)
        return self._signature.bind(*args, **kwargs)

    @eager
    def call(self, original: Callable[..., Any], step: int, slot: int, args: tuple, kwargs: dict) -> Any:
        sample = self._precomputed.pop((slot, step), None)
        if sample is None:
            return super().call(original, step, slot, args, kwargs)
        self.report(step, args, kwargs, reused=True, skipped=True)  # its share of the batched decoder pass
        if self._bind(original, args, kwargs).arguments.get("return_dict", True):
            from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

            return UNet2DConditionOutput(sample=sample)
        return (sample,)

    @eager
    def full_call(self, original: Callable[..., Any], step: int, slot: int, args: tuple, kwargs: dict) -> Any:
        out = super().full_call(original, step, slot, args, kwargs)
        if self.config.parallel_decoder and slot in self._store:
            self._decode_ahead(original, step, slot, args, kwargs)
        return out

    @eager
    def _decode_ahead(self, original: Callable[..., Any], step: int, slot: int, args: tuple, kwargs: dict) -> None:
        """Run the decoder of every non-key step up to the next key step now, as one batch."""
        steps = []
        for k in range(step + 1, self.tracker.num_steps or 0):
            if self.is_full(k):
                break
            steps.append(k)
        if not steps:
            return
        timesteps = self.tracker.future_timesteps(steps)
        if timesteps is None:
            if not self._told_sequential:
                self._told_sequential = True
                logger.info("diffboost: parallel decoder needs a first-order scheduler with known timesteps "
                            "(scheduler.order=%d); decoding step by step", self.tracker.order)
            return
        bound = self._bind(original, args, kwargs)
        sample = bound.arguments["sample"]
        batch, copies = sample.shape[0], len(steps)
        for name, value in bound.arguments.items():
            bound.arguments[name] = repeat_batch(value, copies, batch)
        bound.arguments["timestep"] = timesteps.to(sample.device).repeat_interleave(batch)
        bound.arguments["return_dict"] = False
        self._mode, self._current, self._repeat, self._batch = _REPLAY, self._store[slot], copies, batch
        try:
            decoded = original(*bound.args, **bound.kwargs)[0]
        finally:
            self._mode, self._current, self._repeat = _RUN, None, 1
        for index, k in enumerate(steps):
            self._precomputed[(slot, k)] = decoded[index * batch:(index + 1) * batch]
