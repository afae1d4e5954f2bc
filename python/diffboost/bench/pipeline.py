"""End-to-end pipeline benchmark: the unpatched pipeline, then each optimisation alone and combined.

Every variant is one set of :func:`diffboost.patch` keywords (none for the unpatched pipeline). For each one the
pipeline is patched, run once for one step (a probe: it compiles kernels, warms caches and shows which backends
the ops dispatch to), optionally warmed up with full calls, then timed ``repeat`` times with the same seed, and
unpatched. A row records:

* the wall time of each call divided by the batch (time per image; CUDA is synchronized around each call), its
  median, min and max, and the speedup of the median over the unpatched median;
* the denoiser's own time per image: forward pre/post hooks on the denoiser instances (U-Net, transformer,
  ControlNet) time their calls with CUDA events, or ``perf_counter`` on CPU, and are removed afterwards;
* peak memory: the CUDA allocator's peak during the timed calls, or on CPU the peak resident set size of the
  process sampled during them;
* fidelity to the unpatched images of the same seed: PSNR (data range 1) and LPIPS when ``lpips`` is installed;
* which backend every diffboost op dispatched to, from the registry's dispatch log.

A variant whose ops all ran a PyTorch fallback (no diffboost kernel: no GPU, no ``_C``, an unsupported dtype) is
not timed by default and its row says why; a variant that does not apply to the pipeline (its feature raised
ValueError) is listed with the feature's message. Nothing is dropped from the table.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TextIO

import torch

import diffboost
from diffboost.models import example_inputs
from diffboost.ops.registry import dispatch_log, get_op
from diffboost.patching import _features, denoisers

__all__ = [
    "COMBINED",
    "FEATURE_VARIANTS",
    "Settings",
    "Variant",
    "plan_variants",
    "psnr",
    "run_benchmark",
]

#: The settings benchmarked for each feature on its own, as ``diffboost.patch`` keyword values; a feature is
#: benchmarked only when it is registered in this installation. Order: the features' install order.
FEATURE_VARIANTS: dict[str, tuple[Any, ...]] = {
    "quant": ("w4a4", "w4a16"),
    # Initialised from the U-Net's own projections (no distilled weights ship with the package): it measures the
    # speed of linear attention; its fidelity is that of an undistilled model.
    "linear_attention": (True,),
    "attention": ("exact", "int8"),
    "cache": (3,),
}

#: The combined row: one setting per feature, those meant to stay close to the original output (undistilled
#: linear attention is not). A feature whose own row did not apply to the pipeline is left out of it.
COMBINED: dict[str, Any] = {"quant": "w4a4", "attention": "int8", "cache": 3}

UNPATCHED = "unpatched"
FALLBACK_REASON = "not timed: no diffboost kernel runs here (--time-fallbacks times it anyway)"
COMBINED_NAME = "combined"


@dataclasses.dataclass(frozen=True)
class Variant:
    """One row of the benchmark: a name and the keywords given to :func:`diffboost.patch` (empty: unpatched)."""

    name: str
    features: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class Settings:
    """What every variant runs: the generation settings and the timing protocol.

    Attributes:
        height, width: image size in pixels.
        steps: denoising steps per call.
        batch: prompts per call (one image each).
        repeat: timed calls per variant.
        warmup: untimed full calls per variant after the one-step probe.
        seed: seed of every call's latents (the same for every variant, so images are comparable).
        time_fallbacks: also time variants whose ops all fell back to PyTorch.
    """

    height: int
    width: int
    steps: int
    batch: int = 1
    repeat: int = 3
    warmup: int = 1
    seed: int = 0
    time_fallbacks: bool = False


def _variant_name(feature: str, value: Any) -> str:
    return f"{feature}={value}"


def plan_variants(only: Sequence[str] | None = None) -> tuple[list[Variant], list[str]]:
    """The variants to run and the registered features that have no benchmark setting.

    Args:
        only: restrict to these feature names (all registered ones by default).

    Returns:
        ``(variants, unbenchmarked)``: the unpatched variant, then each registered feature's settings from
        :data:`FEATURE_VARIANTS` in install order. The combined row is planned by :func:`run_benchmark` once the
        single rows show which features apply to the pipeline.
    """
    registered = [feature.name for feature in _features()]
    wanted = registered if only is None else [name for name in registered if name in only]
    variants = [Variant(UNPATCHED, {})]
    unbenchmarked = []
    for name in wanted:
        if name not in FEATURE_VARIANTS:
            unbenchmarked.append(name)
            continue
        variants += [Variant(_variant_name(name, value), {name: value}) for value in FEATURE_VARIANTS[name]]
    return variants, unbenchmarked


# ------------------------------------------------------------------------------------------------------------------
# Measurements
# ------------------------------------------------------------------------------------------------------------------


def psnr(images: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR in dB of ``images`` against ``reference`` (values in [0, 1]); ``inf`` when they are identical."""
    mse = (images.double() - reference.double()).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


class _DenoiserTimer:
    """Times the forward calls of the denoiser instances with hooks (instance-level, removed by :meth:`close`).

    Only the outermost call is timed, so a denoiser that calls itself (or a wrapper that calls the module again)
    is not counted twice.
    """

    def __init__(self, modules: Sequence[torch.nn.Module], cuda: bool, on_call: Callable[[int], None] | None):
        self.cuda = cuda
        self.on_call = on_call
        self.calls = 0
        self._depth = 0
        self._spans: list[tuple[Any, Any]] = []
        self._start: Any = None
        self._handles = []
        for module in modules:
            self._handles.append(module.register_forward_pre_hook(self._pre))
            self._handles.append(module.register_forward_hook(self._post))

    def _now(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _pre(self, module, args) -> None:
        if self._depth == 0:
            self._start = self._now()
        self._depth += 1

    def _post(self, module, args, output) -> None:
        self._depth -= 1
        if self._depth == 0:
            self._spans.append((self._start, self._now()))
            self.calls += 1
            if self.on_call is not None:
                self.on_call(self.calls)

    def reset(self) -> None:
        """Forget the recorded calls (also clears a depth left behind by a forward that raised)."""
        self._spans.clear()
        self._depth = 0
        self.calls = 0

    def total_ms(self) -> float:
        """Milliseconds spent in the recorded calls (synchronizes CUDA)."""
        if self.cuda:
            torch.cuda.synchronize()
            return sum(start.elapsed_time(end) for start, end in self._spans)
        return sum(end - start for start, end in self._spans) * 1e3

    def close(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class _RssSampler:
    """Peak resident set size of this process while active, sampled every few milliseconds (Linux /proc)."""

    INTERVAL_S = 0.005

    def __init__(self) -> None:
        self.peak_bytes = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _rss() -> int | None:
        try:
            with open("/proc/self/statm", encoding="ascii") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return None

    def _run(self) -> None:
        while not self._stop.wait(self.INTERVAL_S):
            self.peak_bytes = max(self.peak_bytes, self._rss())

    def __enter__(self) -> _RssSampler:
        if self.peak_bytes is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(self.peak_bytes, self._rss())


def _dispatch_counts() -> dict[tuple, int]:
    """The registry's dispatch log as ``(op, backend, device, dtype, skipped) -> calls``."""
    counts = {}
    for entry in dispatch_log():
        skipped = tuple((name, tuple(reasons)) for name, reasons in entry["skipped"].items())
        counts[(entry["op"], entry["backend"], entry["device"], entry["dtype"], skipped)] = entry["calls"]
    return counts


def _dispatch_since(before: Mapping[tuple, int]) -> dict[tuple, int]:
    """Calls dispatched since the ``before`` snapshot, per situation."""
    after = _dispatch_counts()
    return {key: calls - before.get(key, 0) for key, calls in after.items() if calls > before.get(key, 0)}


def _is_kernel(op: str, backend: str) -> bool:
    """Whether a backend is one of diffboost's kernels: they declare runtime needs (Triton, ``_C``); the backends
    without any are plain PyTorch (SDPA, references), i.e. the fallbacks."""
    return bool(get_op(op).backend(backend).needs)


def _fallback_notes(dispatched: Mapping[tuple, int]) -> list[str]:
    """One line per situation where an op ran a PyTorch fallback: which one and why not a kernel (the call counts
    are in the row's ``backends``)."""
    notes = []
    for op, backend, device, dtype, skipped in dispatched:
        if _is_kernel(op, backend):
            continue
        why = "; ".join(f"{name}: {', '.join(reasons)}" for name, reasons in skipped) or "no faster backend"
        notes.append(f"{op} on {device}/{dtype} ran PyTorch '{backend}' ({why})")
    return notes


def _backend_counts(dispatched: Mapping[tuple, int]) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for (op, backend, *_), calls in dispatched.items():
        counts.setdefault(op, {})
        counts[op][backend] = counts[op].get(backend, 0) + calls
    return counts


class _Lpips:
    """LPIPS (AlexNet) when the ``lpips`` package is installed and can load its network; otherwise a reason."""

    def __init__(self, device: torch.device) -> None:
        self.model = None
        self.reason: str | None = None
        try:
            import lpips
        except ImportError:
            self.reason = "LPIPS not computed: the lpips package is not installed (pip install lpips)"
            return
        try:
            self.model = lpips.LPIPS(net="alex", verbose=False).to(device).eval()
        except Exception as exc:  # noqa: BLE001 - e.g. no network to fetch AlexNet: the benchmark goes on
            self.reason = f"LPIPS not computed: lpips could not load its network ({type(exc).__name__}: {exc})"
        self.device = device

    def __call__(self, images: torch.Tensor, reference: torch.Tensor) -> float | None:
        if self.model is None:
            return None
        with torch.no_grad():
            # lpips expects [-1, 1] inputs.
            a, b = (t.to(self.device, torch.float32) * 2 - 1 for t in (images, reference))
            return self.model(a, b).mean().item()


# ------------------------------------------------------------------------------------------------------------------
# Running
# ------------------------------------------------------------------------------------------------------------------


def _new_row(variant: Variant) -> dict[str, Any]:
    return {
        "name": variant.name,
        "features": {name: value if isinstance(value, (str, int, float, bool)) else repr(value)
                     for name, value in variant.features.items()},
        "status": "ok",
        "reason": None,
        "patch_s": None,
        "median_ms": None,
        "min_ms": None,
        "max_ms": None,
        "times_ms": [],
        "denoiser_ms": None,
        "denoiser_calls": None,
        "speedup": None,
        "peak_memory_mib": None,
        "psnr_db": None,
        "lpips": None,
        "identical": None,
        "finite": None,
        "backends": {},
        "fallbacks": [],
        "unpatch_error": None,
    }


class _Progress:
    """Progress lines on a stream; on a terminal also a live step counter."""

    def __init__(self, stream: TextIO | None) -> None:
        self.stream = stream
        self.live = stream is not None and stream.isatty()
        self.label = ""
        self.expected = 0

    def line(self, text: str) -> None:
        if self.stream is not None:
            print(text, file=self.stream, flush=True)

    def step(self, calls: int) -> None:
        if self.live:
            total = f"/{self.expected}" if self.expected else ""
            end = "\n" if self.expected and calls >= self.expected else ""
            print(f"\r    {self.label}: denoiser call {calls}{total}", end=end, file=self.stream, flush=True)


def _synchronize(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def _generate(pipe: Any, settings: Settings, steps: int) -> torch.Tensor:
    """One pipeline call with the benchmark's inputs and seed; returns the images, (batch, 3, H, W) in [0, 1]."""
    kwargs = example_inputs(pipe, batch=settings.batch, height=settings.height, width=settings.width, steps=steps,
                            seed=settings.seed)
    with torch.no_grad():
        return pipe(**kwargs).images


def _measure(pipe: Any, row: dict[str, Any], settings: Settings, cuda: bool, progress: _Progress,
             timer: _DenoiserTimer, before: Mapping[tuple, int], skip_fallback: bool) -> torch.Tensor | None:
    """Probe, warm up and time the (already patched) pipeline, filling ``row``; return the first timed images.

    With ``skip_fallback``, a probe in which diffboost ops were called but none of its kernels ran ends the
    measurement (status ``fallback``).
    """
    progress.label, progress.expected = "probe (1 step)", 0
    timer.reset()
    _generate(pipe, settings, 1)
    expected = timer.calls * settings.steps
    probe = _dispatch_since(before)
    if skip_fallback and probe and not any(_is_kernel(op, backend) for op, backend, *_ in probe):
        row.update(status="fallback", reason=FALLBACK_REASON)
        return None
    for i in range(settings.warmup):
        progress.label, progress.expected = f"warm-up {i + 1}/{settings.warmup}", expected
        _generate(pipe, settings, settings.steps)
    if cuda:
        torch.cuda.reset_peak_memory_stats()  # of the current device: run_benchmark made it the pipeline's
    images, times, denoiser = None, [], []
    with contextlib.nullcontext() if cuda else _RssSampler() as rss:
        for i in range(settings.repeat):
            progress.label, progress.expected = f"run {i + 1}/{settings.repeat}", expected
            timer.reset()
            _synchronize(cuda)
            start = time.perf_counter()
            out = _generate(pipe, settings, settings.steps)
            _synchronize(cuda)
            times.append((time.perf_counter() - start) * 1e3 / settings.batch)
            denoiser.append(timer.total_ms() / settings.batch)
            if images is None:
                images = out.detach().float().cpu()
            progress.line(f"    run {i + 1}/{settings.repeat}: {times[-1] / 1e3:.3f} s/image")
    peak = torch.cuda.max_memory_allocated() if cuda else rss.peak_bytes
    row.update(times_ms=times, median_ms=statistics.median(times), min_ms=min(times), max_ms=max(times),
               denoiser_ms=statistics.median(denoiser), denoiser_calls=timer.calls,
               peak_memory_mib=peak / 2**20 if peak is not None else None,
               finite=bool(torch.isfinite(images).all()))
    return images


def _patch_options(pipe: Any, variant: Variant, settings: Settings) -> dict[str, Any]:
    """Extra :func:`diffboost.patch` keywords of a variant: quantization calibrates on one generation with the
    benchmark's size and steps, on another seed than the timed calls (so fidelity is not measured on the calibration
    sample); ``patch_s`` in the row includes it."""
    if "quant" not in variant.features:
        return {}
    kwargs = example_inputs(pipe, batch=settings.batch, height=settings.height, width=settings.width,
                            steps=settings.steps, seed=settings.seed + 1)
    kwargs["output_type"] = "latent"  # the denoiser is what is calibrated
    return {"calibration": [kwargs]}


def _run_variant(pipe: Any, variant: Variant, settings: Settings, cuda: bool, progress: _Progress,
                 reference: torch.Tensor | None, lpips: _Lpips,
                 skip_fallback: bool) -> tuple[dict[str, Any], torch.Tensor | None, bool]:
    """Patch, measure and unpatch one variant (see :func:`_measure` for ``skip_fallback``).

    Returns the row, the images of its first timed call (None if not timed) and whether ``pipe`` is still the
    original pipeline (False when :func:`diffboost.unpatch` could not restore it, e.g. quantization that did not
    keep the original weights: the caller must reload it).
    """
    row = _new_row(variant)
    start = time.perf_counter()
    try:
        diffboost.patch(pipe, **variant.features, **_patch_options(pipe, variant, settings))
    except (TypeError, ValueError, NotImplementedError) as exc:
        # The feature's own refusal (its config or this pipeline is not supported) is the row's explanation.
        row.update(status="n/a", reason=str(exc))
        return row, None, True
    except Exception as exc:  # noqa: BLE001 - patch() removed what it installed; the other variants still run
        row.update(status="error", reason=f"patch failed: {type(exc).__name__}: {exc}")
        return row, None, True
    row["patch_s"] = time.perf_counter() - start
    images = None
    before = _dispatch_counts()
    timer = _DenoiserTimer(list(denoisers(pipe).values()), cuda, progress.step)
    try:
        images = _measure(pipe, row, settings, cuda, progress, timer, before, skip_fallback)
        if images is not None and reference is not None:
            value = psnr(images, reference)
            row.update(psnr_db=None if math.isinf(value) else value, identical=math.isinf(value),
                       lpips=lpips(images, reference))
    except Exception as exc:  # noqa: BLE001 - one failing variant is recorded and the others still run
        row.update(status="error", reason=f"{type(exc).__name__}: {exc}")
        if cuda:
            torch.cuda.empty_cache()
    finally:
        timer.close()
        dispatched = _dispatch_since(before)
        row["backends"] = _backend_counts(dispatched)
        row["fallbacks"] = _fallback_notes(dispatched)
    try:
        diffboost.unpatch(pipe)
    except Exception as exc:  # noqa: BLE001 - reported, and the caller reloads the pipeline
        row["unpatch_error"] = f"{type(exc).__name__}: {str(exc).split(';')[0]}"  # the cause, not the advice
        return row, images, False
    return row, images, True


def _combinable(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """:data:`COMBINED`'s setting of each feature whose own row was measured or only fell back (not those that do
    not apply to the pipeline or failed)."""
    return {name: value for name, value in COMBINED.items()
            if any(row["name"] == _variant_name(name, value) and row["status"] in ("ok", "fallback")
                   for row in rows)}


def run_benchmark(load: Callable[[], Any], variants: Sequence[Variant], settings: Settings, *,
                  device: torch.device, progress: TextIO | None = sys.stderr,
                  combined: bool = True) -> tuple[list[dict[str, Any]], list[str]]:
    """Run every variant and return ``(rows, notes)``.

    Args:
        load: returns the pipeline on ``device``; called once at the start (its exceptions propagate), and
            again before the next variant whenever a variant's unpatch cannot restore the pipeline (e.g.
            quantization that did not keep the original weights), after the broken copy was released.
        variants: ``variants[0]`` must be the unpatched pipeline: speedups and fidelity are relative to it.
        settings: generation settings and timing protocol.
        device: where the pipeline runs (selects CUDA events and the CUDA memory peak).
        progress: stream for progress lines; None for silence.
        combined: add a last row with :data:`COMBINED`'s settings together (see :func:`_combinable`).

    ``notes`` are run-wide remarks (LPIPS availability, pipeline reloads).
    """
    if not variants or variants[0].features:
        raise ValueError("run_benchmark: variants[0] must be the unpatched variant (no features)")
    cuda = device.type == "cuda"
    out = _Progress(progress)
    lpips = _Lpips(device)
    may_combine = combined and sum(any(name in v.features for v in variants) for name in COMBINED) >= 2
    total = len(variants) + may_combine
    rows: list[dict[str, Any]] = []
    notes: list[str] = [lpips.reason] if lpips.reason else []
    reference = None
    pipe = load()

    def run(variant: Variant, skip_fallback: bool) -> None:
        nonlocal pipe, reference
        described = ", ".join(f"{k}={v}" for k, v in variant.features.items())
        out.line(f"[{len(rows) + 1}/{total}] {variant.name}"
                 + (f" ({described})" if variant.name == COMBINED_NAME else ""))
        if pipe is None:  # the previous variant left it broken
            pipe = load()
        row, images, intact = _run_variant(pipe, variant, settings, cuda, out, reference, lpips, skip_fallback)
        if not rows:  # the unpatched run: the reference of every other row
            reference = images
            if row["status"] == "ok":
                row["identical"] = True
        if row["status"] != "ok":
            out.line(f"    {row['status']}: {row['reason']}")
        rows.append(row)
        if not intact:
            notes.append(f"{variant.name} cannot be undone in place: the pipeline was reloaded after it")
            out.line(f"    {notes[-1]}")
            pipe = None  # released before a fresh copy is loaded
            if cuda:
                torch.cuda.empty_cache()

    def combine() -> None:
        usable = _combinable(rows)
        if len(usable) < 2:
            row = _new_row(Variant(COMBINED_NAME, {}))
            row.update(status="n/a", reason="fewer than two of " + ", ".join(COMBINED) + " apply to this pipeline")
            rows.append(row)
            return
        # Timed when one of its features works here (cache needs no kernel), even if others fall back.
        status = {row["name"]: row["status"] for row in rows}
        all_fallback = all(status[_variant_name(name, value)] == "fallback" for name, value in usable.items())
        run(Variant(COMBINED_NAME, usable), skip_fallback=all_fallback and not settings.time_fallbacks)

    # The pipeline's GPU becomes the current device: CUDA events, synchronization and memory peaks refer to it.
    with torch.cuda.device(device) if cuda else contextlib.nullcontext():
        for variant in variants:
            run(variant, skip_fallback=bool(variant.features) and not settings.time_fallbacks)
        if may_combine:
            combine()
    baseline = rows[0]["median_ms"]
    for row in rows:
        if baseline and row["median_ms"]:
            row["speedup"] = baseline / row["median_ms"]
    return rows, notes
