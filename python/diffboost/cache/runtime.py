"""What every cache method shares: following the denoising loop, wrapping forwards on instances, counting.

* :class:`StepTracker` (one per patched pipeline) knows, during a pipeline call, which step the loop is at and
  which call of a denoiser within that step this is. The pipeline's class is swapped for a subclass (same name)
  whose ``__call__`` brackets the original one — ``pipe(...)`` looks ``__call__`` up on the type, so an instance
  attribute would never be called. For the duration of the call the scheduler's ``step`` is wrapped on the
  instance to count steps; nothing reads a timestep back from the device.
* :class:`ForwardPatch` replaces ``forward`` on one module instance and restores exactly what was there.
* :class:`DenoiserCache` is the per-denoiser base: its top-level forward asks the tracker where the loop is and
  hands the call to the method (:meth:`DenoiserCache.call`), which reports what ran for :func:`diffboost.cache.stats`.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from typing import Any

import torch

from diffboost.cache import CacheStats, DenoiserStats
from diffboost.cache.macs import count_macs

logger = logging.getLogger("diffboost")

__all__ = ["DenoiserCache", "ForwardPatch", "StepTracker", "eager", "repeat_batch", "tracker_of"]

TRACKER_ATTR = "_diffboost_cache_tracker"
_MISSING = object()
_TRACKING_CLASSES: dict[type, type] = {}


def eager(method: Callable[..., Any]) -> Callable[..., Any]:
    """Mark a method that reads the step number as never traced by ``torch.compile`` (what it calls still is).

    Traced, such a method would make Dynamo specialize on the step and recompile at every step of a compiled
    denoiser; left eager, the denoiser's own forward is compiled once per caching mode.
    """
    return torch.compiler.disable(method, recursive=False)


@torch.compiler.disable
def _count_eagerly(module: torch.nn.Module, call: Callable[[], Any], groups: dict) -> tuple[Any, dict[str, int]]:
    """:func:`count_macs` with every compiled region (whole model or regional ``torch.compile``) run eagerly: traced,
    the counting hooks would cost a recompilation each, for a call made once per input shape."""
    with torch.compiler.set_stance("force_eager"):
        return count_macs(module, call, groups)


def tracker_of(pipe: Any) -> StepTracker | None:
    """The :class:`StepTracker` of a pipeline patched with ``cache=``, else ``None``."""
    return getattr(pipe, "__dict__", {}).get(TRACKER_ATTR)


def _tracking_class(cls: type) -> type:
    """``cls`` with a ``__call__`` that opens and closes the tracker's per-call state around the original."""
    tracking = _TRACKING_CLASSES.get(cls)
    if tracking is not None:
        return tracking

    @functools.wraps(cls.__call__)
    def __call__(self, *args, **kwargs):
        tracker = self.__dict__.get(TRACKER_ATTR)
        if tracker is None or tracker.active:  # unpatched meanwhile, or a nested call: part of the outer one
            return cls.__call__(self, *args, **kwargs)
        tracker.begin_call()
        try:
            return cls.__call__(self, *args, **kwargs)
        finally:
            tracker.end_call()

    # Same name, qualname and module as the original: save_pretrained and reprs keep naming the real class.
    tracking = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__,
                                           "__qualname__": cls.__qualname__})
    _TRACKING_CLASSES[cls] = tracking
    return tracking


class ForwardPatch:
    """``forward`` replaced on one module instance by ``make(current_forward)``; :meth:`restore` undoes it.

    Whatever the instance had (nothing, or another library's instance-level wrapper such as accelerate's offload
    hook) is kept and put back; the class's ``forward`` is never touched.
    """

    def __init__(self, module: torch.nn.Module, make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
        self.module = module
        self.previous = module.__dict__.get("forward", _MISSING)
        self.wrapper = make(module.forward)
        module.__dict__["forward"] = self.wrapper

    def restore(self) -> None:
        current = self.module.__dict__.get("forward", _MISSING)
        if current is not self.wrapper:
            # Someone wrapped on top of us after patching (their wrapper calls ours, which now passes through).
            logger.warning("diffboost: %s.forward was re-wrapped after cache patching; leaving that wrapper in place",
                           type(self.module).__name__)
            return
        if self.previous is _MISSING:
            del self.module.__dict__["forward"]
        else:
            self.module.__dict__["forward"] = self.previous


def repeat_batch(value: Any, times: int, batch: int) -> Any:
    """``value`` with every tensor whose first dimension is ``batch`` repeated ``times`` along it (``[x; x; ...]``),
    through tuples, lists and dicts; everything else unchanged."""
    if isinstance(value, torch.Tensor):
        if value.ndim >= 1 and value.shape[0] == batch:
            return value.repeat(times, *([1] * (value.ndim - 1)))
        return value
    if isinstance(value, dict):
        return {key: repeat_batch(item, times, batch) for key, item in value.items()}
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(repeat_batch(item, times, batch) for item in value)
    return value


def _shape_key(args: tuple, kwargs: dict) -> tuple:
    """The shapes of the tensor arguments, one level into dicts, lists and tuples: equal keys, equal costs."""
    key = []
    for name, value in [*enumerate(args), *sorted(kwargs.items())]:
        items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else (value,)
        key.append((name, tuple(tuple(v.shape) for v in items if isinstance(v, torch.Tensor))))
    return tuple(key)


class StepTracker:
    """Where the denoising loop of the current pipeline call is, and what the caches did in the last call."""

    def __init__(self, pipe: Any, method: str) -> None:
        self.pipe = pipe
        self.method = method
        self.caches: list[DenoiserCache] = []
        self.active = False
        self.last_stats = CacheStats(method)
        self._pipeline_class: type | None = None
        self._reset()

    def _reset(self) -> None:
        self.index = 0  # scheduler.step calls so far in this pipeline call
        self.order = 1
        self.num_calls: int | None = None  # loop iterations of this call
        self.num_steps: int | None = None
        self._resolved = False
        self._slots: dict[str, int] = {}
        self._steps_seen: set[int] = set()
        self._partial_steps: set[int] = set()
        self._stats = CacheStats(self.method)
        self._scheduler = None
        self._scheduler_step = _MISSING
        self._num_timesteps = _MISSING

    # -- installation ------------------------------------------------------------------------------------------
    def install(self) -> None:
        """Install every cache and hook the pipeline's ``__call__`` (instance only: its class is swapped)."""
        try:
            for cache in self.caches:
                cache.install()
        except BaseException:
            self.uninstall()
            raise
        self._pipeline_class = type(self.pipe)
        self.pipe.__dict__[TRACKER_ATTR] = self
        self.pipe.__class__ = _tracking_class(self._pipeline_class)

    def uninstall(self) -> None:
        """Restore the pipeline's class and every patched forward."""
        if self.active:
            self.end_call()
        if self._pipeline_class is not None:
            self.pipe.__class__ = self._pipeline_class
            self._pipeline_class = None
        self.pipe.__dict__.pop(TRACKER_ATTR, None)
        for cache in reversed(self.caches):
            cache.uninstall()

    # -- one pipeline call ---------------------------------------------------------------------------------------
    def begin_call(self) -> None:
        """Start a pipeline call: fresh state, and count the scheduler's steps."""
        self._check_not_fullgraph()
        self._reset()
        self.active = True
        scheduler = getattr(self.pipe, "scheduler", None)
        self.order = max(1, int(getattr(scheduler, "order", 1) or 1))
        if scheduler is not None:
            self._scheduler = scheduler
            self._scheduler_step = scheduler.__dict__.get("step", _MISSING)
            original = scheduler.step

            @functools.wraps(original)  # keeps the signature: pipelines inspect it for eta / generator
            def step(*args, **kwargs):
                out = original(*args, **kwargs)
                self.index += 1
                self._slots.clear()
                return out

            scheduler.__dict__["step"] = step
        # Pipelines set _num_timesteps to the length of their loop just before it; clearing it first tells a value
        # from this call apart from a stale one (PixArt, for one, never sets it).
        self._num_timesteps = self.pipe.__dict__.get("_num_timesteps", _MISSING)
        self.pipe.__dict__["_num_timesteps"] = None
        for cache in self.caches:
            cache.begin_call()

    def _check_not_fullgraph(self) -> None:
        """Refuse, before anything runs, a cached denoiser compiled whole with ``fullgraph=True``: the per-step
        bookkeeping is a graph break by design, and Dynamo's own error would not say so."""
        for cache in self.caches:
            component = getattr(self.pipe, cache.name, None)
            if getattr(getattr(component, "dynamo_ctx", None), "fullgraph", False):
                raise RuntimeError(
                    f"diffboost: cache= runs its per-step bookkeeping outside torch.compile graphs, so the pipeline's "
                    f"{cache.name} cannot be compiled whole with fullgraph=True; compile it without fullgraph, or "
                    f"compile its blocks (pipe.{cache.name}.compile_repeated_blocks(fullgraph=True))")

    def end_call(self) -> None:
        """End a pipeline call (normally or by an exception): restore the scheduler, keep the stats, drop caches."""
        try:
            for cache in self.caches:
                cache.end_call()
            if self._scheduler is not None:
                if self._scheduler_step is _MISSING:
                    self._scheduler.__dict__.pop("step", None)
                else:
                    self._scheduler.__dict__["step"] = self._scheduler_step
            if self.pipe.__dict__.get("_num_timesteps") is None:
                if self._num_timesteps is _MISSING:
                    self.pipe.__dict__.pop("_num_timesteps", None)
                else:
                    self.pipe.__dict__["_num_timesteps"] = self._num_timesteps
            stats = self._stats
            stats.num_steps = self.num_steps if self.num_steps is not None else len(self._steps_seen)
            stats.partial_steps = len(self._partial_steps)
            stats.full_steps = len(self._steps_seen - self._partial_steps)
            self.last_stats = stats
        finally:
            self.active = False
            self._scheduler = None

    def _resolve_steps(self) -> None:
        self._resolved = True
        calls = self.pipe.__dict__.get("_num_timesteps")
        if not isinstance(calls, int):
            scheduler = getattr(self.pipe, "scheduler", None)
            timesteps = getattr(scheduler, "timesteps", None)
            if timesteps is None:
                return
            begin = getattr(scheduler, "begin_index", None)  # image-to-image: steps before it are not run
            calls = len(timesteps) - (begin if isinstance(begin, int) else 0)
        self.num_calls = calls
        self.num_steps = math.ceil(calls / self.order)

    def position(self, name: str) -> tuple[int, int]:
        """``(step, slot)`` of a call of denoiser ``name``: the slot numbers its calls within one loop iteration (CFG
        run as separate calls, e.g. FLUX's true CFG, gets one cache per slot)."""
        if not self._resolved:
            self._resolve_steps()
        slot = self._slots.get(name, 0)
        self._slots[name] = slot + 1
        return self.index // self.order, slot

    def future_timesteps(self, steps: list[int]) -> torch.Tensor | None:
        """The timesteps the loop will pass at ``steps``, else ``None``: known for first-order schedulers when the loop
        runs over ``scheduler.timesteps[begin_index:]`` (not, e.g., when SDXL's ``denoising_end`` cuts it short)."""
        timesteps = getattr(self._scheduler, "timesteps", None)
        if self.order != 1 or self.num_calls is None or not isinstance(timesteps, torch.Tensor):
            return None
        begin = getattr(self._scheduler, "begin_index", None)
        offset = begin if isinstance(begin, int) else 0
        if offset + self.num_calls != len(timesteps) or max(steps) >= self.num_calls:
            return None
        return timesteps[[offset + step for step in steps]]

    def record(self, name: str, step: int, full: bool, macs_run: int | None, macs_full: int | None) -> None:
        """Account one denoiser call (``full``: it ran completely for every sample)."""
        entry = self._stats.denoisers.setdefault(name, DenoiserStats())
        entry.calls += 1
        if full:
            entry.full_calls += 1
        else:
            entry.partial_calls += 1
            self._partial_steps.add(step)
        self._steps_seen.add(step)
        entry.macs_run = None if entry.macs_run is None or macs_run is None else entry.macs_run + macs_run
        entry.macs_full = None if entry.macs_full is None or macs_full is None else entry.macs_full + macs_full


class DenoiserCache:
    """Caching state of one denoiser of a patched pipeline.

    Subclasses say which modules a partial call may skip (:attr:`skippable`, used to attribute MACs), add their
    unit wrappers in :meth:`install_units`, and implement :meth:`call`, which runs (or does not run) the original
    forward for one denoiser call and reports it with :meth:`report`.
    """

    def __init__(self, tracker: StepTracker, name: str, module: torch.nn.Module) -> None:
        self.tracker = tracker
        self.name = name
        self.module = module
        self.patches: list[ForwardPatch] = []
        self._costs: dict[tuple, tuple[int, int]] = {}  # shape key -> (MACs of a full call, of a partial one)
        self._full_mask: list[bool] | None = None

    @property
    def skippable(self) -> list[torch.nn.Module]:
        """Modules a partial call does not run."""
        raise NotImplementedError

    def full_steps(self, num_steps: int) -> list[bool]:
        """The method's schedule: which steps run fully."""
        raise NotImplementedError

    def install(self) -> None:
        self.patches.append(ForwardPatch(self.module, self._top_level))
        self.install_units()

    def install_units(self) -> None:
        """Wrap the forwards of the parts the method skips or reads (subclasses append to :attr:`patches`)."""

    def uninstall(self) -> None:
        while self.patches:
            self.patches.pop().restore()

    def begin_call(self) -> None:
        self._full_mask = None

    def end_call(self) -> None:
        """Drop everything cached during the call."""

    def is_full(self, step: int) -> bool:
        """Whether the schedule runs ``step`` fully (always, when the step count is unknown or exceeded)."""
        if self._full_mask is None:
            num_steps = self.tracker.num_steps
            self._full_mask = self.full_steps(num_steps) if num_steps else []
        return step >= len(self._full_mask) or self._full_mask[step]

    def partial_follows(self, step: int) -> bool:
        """Whether a later step of this call may reuse what this one caches."""
        self.is_full(step)  # computes the schedule
        return not all(self._full_mask[step + 1:])

    def _top_level(self, original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def forward(*args, **kwargs):
            if not self.tracker.active:  # called outside a pipeline call: exactly the original
                return original(*args, **kwargs)
            step, slot = self.tracker.position(self.name)
            return self.call(original, step, slot, args, kwargs)

        return eager(forward)

    def call(self, original: Callable[..., Any], step: int, slot: int, args: tuple, kwargs: dict) -> Any:
        raise NotImplementedError

    @eager
    def run_full(self, original: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        """Run a full call, measuring its MACs with hooks the first time inputs of these shapes are seen."""
        key = _shape_key(args, kwargs)
        if key in self._costs:
            return original(*args, **kwargs)
        output, counts = _count_eagerly(self.module, lambda: original(*args, **kwargs), {"skippable": self.skippable})
        self._costs[key] = (counts["total"], counts["total"] - counts["skippable"])
        return output

    def report(self, step: int, args: tuple, kwargs: dict, *, reused: bool, skipped: bool, runs: float = 1.0) -> None:
        """Account one call to the tracker.

        Args:
            reused: some sample's output came from cached features (a partial call in the stats).
            skipped: the :attr:`skippable` modules did not run (else the call cost a full call's MACs).
            runs: how many calls' worth of that work it did (a batched decoder pass shares its work out this way).
        """
        cost = self._costs.get(_shape_key(args, kwargs))
        macs_run = None if cost is None else round((cost[1] if skipped else cost[0]) * runs)
        self.tracker.record(self.name, step, not reused, macs_run, cost[0] if cost else None)
