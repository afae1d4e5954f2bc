"""Step-cached execution: skip the parts of the denoiser that barely change from one denoising step to the next.

Three methods, each a config for ``diffboost.patch(pipe, cache=...)``:

* :class:`DeepCacheConfig` (U-Nets; DeepCache, Ma et al. 2023): every ``interval`` steps the whole U-Net runs; on
  the steps between, only the shallow branch runs (``conv_in``, the first down-path layers, the matching last
  up-path layers, ``conv_out``) and the up-path input that deeper layers would have produced is the one cached at
  the last full step.
* :class:`EncoderPropagationConfig` (U-Nets; Faster Diffusion, Li et al. 2023): at key steps the whole U-Net runs and
  its encoder (``conv_in``, down blocks, mid block) outputs are kept; at the other steps only the decoder runs on
  them. Optionally the decoder passes of all steps up to the next key step run as one batched call.
* :class:`BlockCacheConfig` (DiTs: FLUX, PixArt, SD3): the residual that the transformer blocks add is reused on
  non-full steps, either on a fixed schedule (``mode="uniform"``) or when the first block's residual barely
  changed (``mode="first_block"``).

``diffboost.patch(pipe, cache=3)`` means DeepCache with interval 3 on a U-Net and uniform block caching with
interval 3 on a DiT. :func:`stats` reports what the last pipeline call ran.

Steps. A *step* is one iteration of the pipeline's denoising loop, or ``scheduler.order`` iterations for
second-order schedulers (Heun, DPM2: they evaluate the denoiser twice per step). Steps are counted by the calls to
``scheduler.step`` within one pipeline call, never by looking a timestep up (no host sync, correct with repeated
timesteps and with image-to-image strength); ``num_steps`` is the number of steps the call runs (after strength).
All state belongs to one pipeline call: it is cleared when a call starts and when it ends, normally or not.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

__all__ = [
    "FASTER_DIFFUSION_KEY_STEPS",
    "BlockCacheConfig",
    "CacheStats",
    "DeepCacheConfig",
    "DenoiserStats",
    "EncoderPropagationConfig",
    "stats",
]

#: Faster Diffusion's key steps for 50 sampling steps (the paper's Stable Diffusion setting).
FASTER_DIFFUSION_KEY_STEPS = (0, 1, 2, 3, 5, 10, 15, 25, 35)
_PAPER_STEPS = 50


def _check_int(owner: str, name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{owner}.{name}={value!r}: must be an integer >= {low}")


def _check_window(owner: str, start: float, end: float) -> None:
    for name, value in (("start", start), ("end", end)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ValueError(f"{owner}.{name}={value!r}: must be a fraction in [0, 1]")
    if not start < end:
        raise ValueError(f"{owner}.start={start!r}, end={end!r}: start must be < end (both in [0, 1])")


def _window(num_steps: int, start: float, end: float) -> tuple[int, int]:
    """The steps ``k`` with ``start <= k / num_steps < end``, as ``range(lo, hi)`` bounds."""
    # round() first: 0.3 * 10 is 3.0000000000000004, whose ceil would drop step 3 from the window.
    return math.ceil(round(start * num_steps, 9)), math.ceil(round(end * num_steps, 9))


def _uniform_in_window(num_steps: int, interval: int, start: float, end: float) -> list[bool]:
    """Full every ``interval`` steps inside the window, counted from the last full step before it (step 0 when the
    window opens at 0); every step outside the window is full."""
    lo, hi = _window(num_steps, start, end)
    anchor = lo - 1 if lo > 0 else 0
    return [not lo <= k < hi or (k - anchor) % interval == 0 for k in range(num_steps)]


def _quadratic_in_window(num_steps: int, interval: int, start: float, end: float, center: float) -> list[bool]:
    """As many full steps as the uniform schedule has, placed densest around ``center`` (a fraction of the
    trajectory), as in the DeepCache paper: the first step of the window (or the last full step before it), then
    steps ``c + sign(x) |x|^p`` for ``x`` at the interior points of an even grid from ``-(c - first)^(1/p)`` to
    ``(last - c)^(1/p)``; ``p = 2`` is lowered in steps of 0.05 until no two steps coincide (``p = 1`` is an even
    grid, so this ends)."""
    uniform = _uniform_in_window(num_steps, interval, start, end)
    lo, hi = _window(num_steps, start, end)
    if hi <= lo:
        return uniform
    anchor = lo - 1 if lo > 0 else 0
    count = sum(uniform[lo:hi]) + (anchor < lo)  # the anchor is placed too, then dropped when outside the window
    last = hi - 1
    c = min(max(center * num_steps, anchor), last)
    power = 2.0
    while True:
        left, right = (c - anchor) ** (1 / power), (last - c) ** (1 / power)
        grid = [-left + (left + right) * i / count for i in range(1, count)]
        points = sorted({anchor, *(round(c + math.copysign(abs(x) ** power, x)) for x in grid)})
        if len(points) == count or power <= 1.0:
            break
        power = max(1.0, power - 0.05)
    full = [not lo <= k < hi for k in range(num_steps)]
    for k in points:
        if lo <= k < hi:
            full[k] = True
    return full


@dataclasses.dataclass(frozen=True)
class DeepCacheConfig:
    """DeepCache for ``UNet2DConditionModel`` denoisers (SD 1.x/2.x, SDXL; text-to-image, image-to-image,
    inpainting, ControlNet).

    Args:
        interval: a full U-Net every ``interval`` steps (1: every step, i.e. no caching).
        branch: how much of the U-Net runs on the other steps, numbered as in DeepCache: down block
            ``branch // 3``, layer ``branch % 3`` is where the shallow branch stops. Branch 0 runs only ``conv_in``,
            the last up-path layer (fed by the fresh ``conv_in`` skip) and ``conv_out``; SD 1.5 has branches 0-11,
            SDXL 0-8.
        schedule: ``"uniform"`` (full every ``interval`` steps) or ``"quadratic"`` (the paper's non-uniform
            schedule: as many full steps, densest around ``center``).
        start, end: fractions of the sampling progress; steps with ``k / num_steps`` outside ``[start, end)`` are
            all full (the first step always is).
        center: where the quadratic schedule is densest, as a fraction of the trajectory.

    With ControlNet, the ControlNet runs on full steps only; on the other steps its residuals from the last full
    step are added again (to the fresh shallow skips and, unchanged, to the cached deep features), so the U-Net
    sees the same control it saw when the cache was filled. A changed ``controlnet_conditioning_scale`` (e.g. at
    ``control_guidance_end``) makes the ControlNet run again.
    """

    interval: int = 3
    branch: int = 0
    schedule: str = "uniform"
    start: float = 0.0
    end: float = 1.0
    center: float = 0.3

    def __post_init__(self) -> None:
        _check_int("DeepCacheConfig", "interval", self.interval, 1)
        _check_int("DeepCacheConfig", "branch", self.branch, 0)
        if self.schedule not in ("uniform", "quadratic"):
            raise ValueError(f"DeepCacheConfig.schedule={self.schedule!r}: must be 'uniform' or 'quadratic'")
        _check_window("DeepCacheConfig", self.start, self.end)
        if isinstance(self.center, bool) or not isinstance(self.center, (int, float)) or not 0 <= self.center <= 1:
            raise ValueError(f"DeepCacheConfig.center={self.center!r}: must be a fraction in [0, 1]")

    def full_steps(self, num_steps: int) -> list[bool]:
        """For each of ``num_steps`` steps, whether the whole U-Net runs."""
        if self.schedule == "quadratic":
            return _quadratic_in_window(num_steps, self.interval, self.start, self.end, self.center)
        return _uniform_in_window(num_steps, self.interval, self.start, self.end)


@dataclasses.dataclass(frozen=True)
class EncoderPropagationConfig:
    """Faster Diffusion's encoder propagation for ``UNet2DConditionModel`` denoisers.

    At key steps the whole U-Net runs and the encoder's outputs (``conv_in``, every down-block skip feature, the mid
    block's output; with ControlNet, its residuals) are kept; at the other steps only the decoder (up blocks,
    ``conv_out``) runs, on those features and the current timestep embedding.

    Args:
        key_steps: the key steps, explicitly (step 0 is always one); ``None`` with no ``interval`` means the paper's
            preset :data:`FASTER_DIFFUSION_KEY_STEPS` for 50 steps, scaled to the call's step count.
        interval: key steps every ``interval`` steps instead (exclusive with ``key_steps``).
        parallel_decoder: at each key step, run the decoder passes of all the steps up to the next key step as one
            batched call (their inputs are all known then; more memory, fewer launches). Only with first-order
            schedulers (``scheduler.order == 1``); otherwise the decoder runs step by step.
    """

    key_steps: tuple[int, ...] | None = None
    interval: int | None = None
    parallel_decoder: bool = False

    def __post_init__(self) -> None:
        if self.key_steps is not None and self.interval is not None:
            raise ValueError("EncoderPropagationConfig: give key_steps or interval, not both")
        if self.interval is not None:
            _check_int("EncoderPropagationConfig", "interval", self.interval, 1)
        if self.key_steps is not None:
            if isinstance(self.key_steps, (str, bytes)) or not isinstance(self.key_steps, Sequence):
                raise ValueError(f"EncoderPropagationConfig.key_steps={self.key_steps!r}: must be a sequence of "
                                 "step indices >= 0")
            for step in self.key_steps:
                _check_int("EncoderPropagationConfig", "key_steps[]", step, 0)
            object.__setattr__(self, "key_steps", tuple(sorted(set(self.key_steps))))
        if not isinstance(self.parallel_decoder, bool):
            raise ValueError(f"EncoderPropagationConfig.parallel_decoder={self.parallel_decoder!r}: must be a bool")

    def full_steps(self, num_steps: int) -> list[bool]:
        """For each of ``num_steps`` steps, whether it is a key step (the whole U-Net runs)."""
        if self.interval is not None:
            keys = set(range(0, num_steps, self.interval))
        elif self.key_steps is not None:
            keys = set(self.key_steps)
        else:
            keys = {round(k * num_steps / _PAPER_STEPS) for k in FASTER_DIFFUSION_KEY_STEPS}
        keys.add(0)
        return [k in keys for k in range(num_steps)]


@dataclasses.dataclass(frozen=True)
class BlockCacheConfig:
    """Block caching for transformer denoisers (FLUX, PixArt, SD3-style DiTs).

    Args:
        mode: ``"uniform"``: every ``interval`` steps all blocks run and the residual they add to the hidden states
            (and to the text stream of dual-stream models) is kept; the other steps add that residual without
            running any block. No host synchronisation.
            ``"first_block"``: every step runs the first block; when its residual changed, relative to the last
            step on which all blocks ran, by less than ``threshold`` (mean absolute difference over mean absolute
            value), the other blocks are skipped and their cached residual is added. Decided per sample: a sample
            never reuses a cache because another sample in the batch could. Costs one host sync per step (the
            decision has to reach the host to skip work).
        interval: ``mode="uniform"``: full every ``interval`` steps.
        threshold: ``mode="first_block"``: relative-change threshold, >= 0 (0 never skips).
        start, end: fractions of the sampling progress outside which every step is full (the first always is).
    """

    mode: str = "uniform"
    interval: int = 2
    threshold: float = 0.1
    start: float = 0.0
    end: float = 1.0

    def __post_init__(self) -> None:
        if self.mode not in ("uniform", "first_block"):
            raise ValueError(f"BlockCacheConfig.mode={self.mode!r}: must be 'uniform' or 'first_block'")
        _check_int("BlockCacheConfig", "interval", self.interval, 1)
        if (isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float))
                or not self.threshold >= 0 or math.isinf(self.threshold)):
            raise ValueError(f"BlockCacheConfig.threshold={self.threshold!r}: must be a finite number >= 0")
        _check_window("BlockCacheConfig", self.start, self.end)

    def full_steps(self, num_steps: int) -> list[bool]:
        """For each step, whether all blocks run unconditionally (for ``first_block``: the steps outside the window
        and step 0; inside it the threshold decides)."""
        if self.mode == "first_block":
            lo, hi = _window(num_steps, self.start, self.end)
            return [k == 0 or not lo <= k < hi for k in range(num_steps)]
        return _uniform_in_window(num_steps, self.interval, self.start, self.end)


@dataclasses.dataclass
class DenoiserStats:
    """What one denoiser (``unet``, ``transformer``, ``controlnet``) ran during a pipeline call.

    ``full_calls`` ran completely; ``partial_calls`` reused cached features for at least one sample. MACs are
    counted from the convolutions, linear layers and attention products that actually ran (measured with forward
    hooks on one full call per input shape, then attributed per call to the parts that ran); ``macs_full`` is what
    the same calls cost without caching. ``None`` when no full call of that shape was seen to measure.
    """

    calls: int = 0
    full_calls: int = 0
    partial_calls: int = 0
    macs_run: int | None = 0
    macs_full: int | None = 0


@dataclasses.dataclass
class CacheStats:
    """What the last pipeline call ran (see :func:`stats`).

    Attributes:
        method: ``"deepcache"``, ``"encoder_propagation"`` or ``"block_cache"``.
        num_steps: steps in the call (after image-to-image strength; second-order schedulers: evaluations / order).
        full_steps: steps on which every denoiser call ran completely.
        partial_steps: steps on which some call reused cached features.
        denoisers: per-denoiser counts.
        macs_run, macs_full: MACs of all denoiser calls, with caching and as they would have been without.
        macs_skipped_fraction: ``1 - macs_run / macs_full`` (``None`` if not measured).
    """

    method: str
    num_steps: int = 0
    full_steps: int = 0
    partial_steps: int = 0
    denoisers: dict[str, DenoiserStats] = dataclasses.field(default_factory=dict)

    @property
    def macs_run(self) -> int | None:
        values = [d.macs_run for d in self.denoisers.values()]
        return None if any(v is None for v in values) else sum(values)

    @property
    def macs_full(self) -> int | None:
        values = [d.macs_full for d in self.denoisers.values()]
        return None if any(v is None for v in values) else sum(values)

    @property
    def macs_skipped_fraction(self) -> float | None:
        run, full = self.macs_run, self.macs_full
        if run is None or not full:
            return None
        return 1.0 - run / full


def stats(pipe: Any) -> CacheStats:
    """What the last call of ``pipe`` ran: steps run fully and partially, and the fraction of denoiser MACs skipped.

    Raises ValueError if ``pipe`` is not patched with ``cache=``. Before the first call the counts are zero.
    """
    from diffboost.cache.runtime import tracker_of

    tracker = tracker_of(pipe)
    if tracker is None:
        raise ValueError(f"diffboost.cache.stats: {type(pipe).__name__} is not patched with cache= "
                         "(use diffboost.patch(pipe, cache=...))")
    return tracker.last_stats
