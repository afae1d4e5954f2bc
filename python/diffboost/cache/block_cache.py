"""Block caching for transformer denoisers (FLUX, PixArt, SD3-style DiTs).

The transformer's blocks run one after the other with nothing in between (ControlNet residuals and SD3's skipped
layers are the exceptions: calls that pass them run uncached). So the whole stack is one function of the first
block's input, and a skipped stack is that input plus a residual:

* ``uniform``: on full steps the first block's input is kept and, after the last block, the residual
  ``output - input`` (per stream: image tokens, and text tokens for dual-stream blocks). On the other steps the
  first block returns ``input + residual`` and every later block returns its input unchanged, without running.
* ``first_block``: the first block always runs; its residual is compared per sample with the one of that sample's
  last full step. Samples under the threshold take ``first block output + cached tail residual``; if all of them
  do, the later blocks do not run; if some do, the tail runs for the batch and those samples' outputs (and caches)
  are replaced by the cached ones, so each sample behaves as if it ran alone.

The blocks themselves are never patched: for the duration of a cached call the model's block lists
(``transformer_blocks``, ``single_transformer_blocks``) hold stand-ins that do the above and call the real blocks
when they run. Compiled blocks (diffusers' regional compilation) thus never see the cache's state.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable

import torch
from torch import nn

from diffboost.cache import BlockCacheConfig
from diffboost.cache.runtime import DenoiserCache, StepTracker, eager

logger = logging.getLogger("diffboost")

__all__ = ["BlockCache", "BlockFormat", "transformer_blocks"]

_RUN, _RECORD, _SKIP, _PROBE, _FIRST_FULL = "run", "record", "skip", "probe", "first-full"
# Inputs added between blocks (ControlNet) or that skip blocks (SD3's skip-layer guidance): such calls run uncached.
_UNCACHEABLE_INPUTS = ("controlnet_block_samples", "controlnet_single_block_samples", "block_controlnet_hidden_states",
                       "skip_layers")
_BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")

Streams = tuple[torch.Tensor, "torch.Tensor | None"]  # (image tokens, text tokens or None)


@dataclasses.dataclass(frozen=True)
class BlockFormat:
    """How a block class takes and returns its streams: ``hidden_index`` / ``encoder_index`` in the returned tuple
    (``None``: the block returns the hidden states alone and has no text stream)."""

    hidden_index: int | None
    encoder_index: int | None

    def inputs(self, args: tuple, kwargs: dict) -> Streams:
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        if self.encoder_index is None:
            return hidden, None
        encoder = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else args[1]
        return hidden, encoder

    def outputs(self, out: Any) -> Streams:
        if self.hidden_index is None:
            return out, None
        return out[self.hidden_index], out[self.encoder_index]

    def make(self, hidden: torch.Tensor, encoder: torch.Tensor | None) -> Any:
        if self.hidden_index is None:
            return hidden
        out = [None, None]
        out[self.hidden_index], out[self.encoder_index] = hidden, encoder
        return tuple(out)


def _formats() -> dict[type, BlockFormat]:
    from diffusers.models.attention import BasicTransformerBlock, JointTransformerBlock
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

    two_streams = BlockFormat(hidden_index=1, encoder_index=0)  # these return (encoder_hidden_states, hidden_states)
    return {
        FluxTransformerBlock: two_streams,
        FluxSingleTransformerBlock: two_streams,
        JointTransformerBlock: two_streams,
        BasicTransformerBlock: BlockFormat(hidden_index=None, encoder_index=None),  # PixArt
    }


def transformer_blocks(model: torch.nn.Module) -> list[tuple[torch.nn.Module, BlockFormat]]:
    """The blocks of a DiT in execution order, with their formats; ValueError for a block class not supported."""
    formats = _formats()
    blocks = []
    for attr in _BLOCK_LISTS:
        for block in getattr(model, attr, None) or ():
            fmt = formats.get(type(block))
            if fmt is None:
                supported = ", ".join(sorted(cls.__name__ for cls in formats))
                raise ValueError(f"BlockCacheConfig: {type(model).__name__}.{attr} holds {type(block).__name__} "
                                 f"blocks, which diffboost cannot skip (supported: {supported})")
            blocks.append((block, fmt))
    if not blocks:
        raise ValueError(f"BlockCacheConfig: {type(model).__name__} has no transformer_blocks to cache")
    return blocks


def _add(a: Streams, b: Streams) -> Streams:
    return a[0] + b[0], None if a[1] is None or b[1] is None else a[1] + b[1]


def _sub(a: Streams, b: Streams) -> Streams:
    return a[0] - b[0], None if a[1] is None or b[1] is None else a[1] - b[1]


def _where(mask: torch.Tensor, a: Streams, b: Streams) -> Streams:
    """Per sample: ``a`` where ``mask``, else ``b``."""

    def pick(x, y):
        return torch.where(mask.view(-1, *([1] * (x.ndim - 1))), x, y)

    return pick(a[0], b[0]), None if a[1] is None or b[1] is None else pick(a[1], b[1])


def _relative_change(residual: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per sample ``mean |residual - reference| / mean |reference|``, in float32."""
    residual, reference = residual.float().flatten(1), reference.float().flatten(1)
    return (residual - reference).abs().mean(1) / reference.abs().mean(1).clamp_min(torch.finfo(torch.float32).tiny)


class _Stand(nn.Module):
    """Takes the place of one transformer block in the model's block list during a cached call.

    The real block is left untouched and called from here when it has to run: under diffusers' regional compilation
    the blocks stay the compiled units, with none of the cache's state in their graphs, and a whole-model compile
    sees one fixed module list per caching mode.
    """

    def __init__(self, cache: BlockCache, block: nn.Module, fmt: BlockFormat, action: str, last: bool) -> None:
        super().__init__()
        self.block, self.fmt, self.action, self.last = block, fmt, action, last
        self.cache = cache

    def forward(self, *args, **kwargs):
        return self.cache._stand_forward(self, args, kwargs)


# What a stand-in does, per mode (first block, middle blocks, last block; a real block where it just runs):
#   record:     record input | - | run, keep the stack's residual        (uniform, full step)
#   skip:       input + residual | pass | pass                          (uniform, partial step)
#   first-full: run, keep first residual | - | run, keep tail residual  (first_block, full step)
#   probe:      run, decide per sample | gate | gate                    (first_block, other steps)
_ACTIONS = {
    _RECORD: ("record", None, "tail"),
    _SKIP: ("skip", "pass", "pass"),
    _FIRST_FULL: ("first-full", None, "tail"),
    _PROBE: ("probe", "gate", "gate"),
}


class BlockCache(DenoiserCache):
    """Block caching (:class:`~diffboost.cache.BlockCacheConfig`) on one transformer denoiser."""

    method = "block_cache"

    def __init__(self, tracker: StepTracker, name: str, model: torch.nn.Module, config: BlockCacheConfig) -> None:
        super().__init__(tracker, name, model)
        self.config = config
        self.blocks = transformer_blocks(model)
        if config.mode == "first_block" and len(self.blocks) < 2:
            raise ValueError(f"BlockCacheConfig.mode='first_block' needs at least 2 transformer blocks; "
                             f"{type(model).__name__} has {len(self.blocks)}")
        self._store: dict[int, dict[str, Any]] = {}  # slot -> cached residuals
        self._lists: dict[str, dict[str, nn.ModuleList]] = {}  # mode -> block list attribute -> stand-ins
        self._mode = _RUN
        self._state: dict[str, Any] = {}
        self._clear_call()
        self._warned = False

    def _clear_call(self) -> None:
        self._skip_rest = False  # the first block already returned the stack's output
        self._reused = False  # some sample took cached features
        self._first_in: Streams | None = None
        self._first_out: Streams | None = None
        self._first_residual: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None  # first_block, mixed batch: samples that take the cache

    @property
    def skippable(self) -> list[torch.nn.Module]:
        blocks = [block for block, _ in self.blocks]
        return blocks[1:] if self.config.mode == "first_block" else blocks

    def full_steps(self, num_steps: int) -> list[bool]:
        return self.config.full_steps(num_steps)

    def end_call(self) -> None:
        self._store.clear()

    def _block_lists(self, mode: str) -> dict[str, nn.ModuleList]:
        """The model's block lists as ``mode`` runs them (built once per mode, so compiled graphs can be reused)."""
        if mode not in self._lists:
            first, middle, last = _ACTIONS[mode]
            stands, end = [], len(self.blocks) - 1
            for index, (block, fmt) in enumerate(self.blocks):
                action = first if index == 0 else last if index == end else middle
                stands.append(block if action is None else _Stand(self, block, fmt, action, index == end))
            lists, start = {}, 0
            for attr in _BLOCK_LISTS:
                count = len(getattr(self.module, attr, None) or ())
                if count:
                    lists[attr] = nn.ModuleList(stands[start:start + count])
                    start += count
            self._lists[mode] = lists
        return self._lists[mode]

    def _stand_forward(self, stand: _Stand, args: tuple, kwargs: dict) -> Any:
        fmt, action = stand.fmt, stand.action
        if action == "pass" or (action == "gate" and self._skip_rest):
            return fmt.make(*fmt.inputs(args, kwargs))
        if action == "skip":
            self._skip_rest = self._reused = True
            return fmt.make(*_add(fmt.inputs(args, kwargs), self._state["residual"]))
        streams = fmt.inputs(args, kwargs) if action in ("record", "first-full", "probe") else None
        out = stand.block(*args, **kwargs)
        if action == "record":
            self._first_in = streams
        elif action in ("first-full", "probe"):
            out = self._after_first(fmt, streams, out)
        return self._after_last(fmt, out) if stand.last and not self._skip_rest else out

    def _after_first(self, fmt: BlockFormat, streams: Streams, out: Any) -> Any:
        """first_block: decide per sample whether the rest of the stack runs."""
        self._first_out = fmt.outputs(out)
        self._first_residual = self._first_out[0] - streams[0]
        reference = self._state.get("reference")
        if self._mode is _FIRST_FULL or reference is None:
            return out
        take_cache = _relative_change(self._first_residual, reference) < self.config.threshold
        taking = int(take_cache.sum())  # the one host sync: skipping work is a host-side decision
        if taking == take_cache.numel():
            self._skip_rest = self._reused = True
            return fmt.make(*_add(self._first_out, self._state["tail"]))
        if taking:
            self._mask, self._reused = take_cache, True
        return out

    def _after_last(self, fmt: BlockFormat, out: Any) -> Any:
        """Keep the residual(s) of a full pass; in a mixed first_block batch, give the samples that take the cache
        their cached output."""
        streams, state = fmt.outputs(out), self._state
        if self._mode is _RECORD:
            state["residual"] = _sub(streams, self._first_in)
            return out
        tail = _sub(streams, self._first_out)
        if self._mask is None:
            state["tail"], state["reference"] = tail, self._first_residual
            return out
        mask = self._mask
        streams = _where(mask, _add(self._first_out, state["tail"]), streams)
        state["tail"] = _where(mask, state["tail"], tail)
        state["reference"] = torch.where(mask.view(-1, *([1] * (self._first_residual.ndim - 1))),
                                         state["reference"], self._first_residual)
        return fmt.make(*streams)

    @eager
    def call(self, original: Callable[..., Any], step: int, slot: int, args: tuple, kwargs: dict) -> Any:
        if any(kwargs.get(name) is not None for name in _UNCACHEABLE_INPUTS):
            if not self._warned:
                self._warned = True
                logger.warning("diffboost: %s gets one of %s; these calls run without block caching", self.name,
                               ", ".join(_UNCACHEABLE_INPUTS))
            out = original(*args, **kwargs)
            self.report(step, args, kwargs, reused=False, skipped=False)
            return out
        state = self._store.get(slot)
        forced = self.is_full(step) or state is None
        if forced and not self.partial_follows(step):
            mode = _RUN
        elif self.config.mode == "uniform":
            mode = _RECORD if forced else _SKIP
        else:
            mode = _FIRST_FULL if forced else _PROBE
        if state is None or mode is _RUN:
            state = self._store[slot] = {}
        self._mode, self._state = mode, state
        lists = {} if mode is _RUN else self._block_lists(mode)
        blocks = {attr: self.module._modules[attr] for attr in lists}
        self.module._modules.update(lists)  # for this call only: the stand-ins of this mode
        try:
            out = self.run_full(original, args, kwargs) if forced else original(*args, **kwargs)
            self.report(step, args, kwargs, reused=self._reused, skipped=self._skip_rest)
        finally:
            self.module._modules.update(blocks)
            self._mode, self._state = _RUN, {}
            self._clear_call()
        return out
