"""One timing harness for every diffboost benchmark.

A benchmark script describes what to time as a list of `Case` objects and hands them to `run_cases`,
which returns one JSON-ready row per case; `write_results` stores the rows with the machine description
in ``benchmarks/results/<name>-<device>.json`` and `print_table` shows them.

Timing
------
* CUDA: ``triton.testing.do_bench``; the row carries the median and the 20th/80th percentiles of the
  individual timed calls.  ``do_bench`` (triton 3.x, checked on 3.6 and 3.7) writes a 256 MB buffer before
  every timed call, which evicts the whole L2 (50 MB on H100/H200), so every call starts cold.
  Rotating through input copies on top of that would only add work, so on CUDA the harness times one
  input set and records ``l2_flush: true``.
* CPU: ``time.perf_counter`` around each call after a time-based warm-up.  Nothing flushes the caches
  here, so when a case's inputs are smaller than twice the last-level cache the harness clones them
  and cycles through the copies (``input_copies`` in the row), keeping timings from being cache-resident.
  ``torch.set_num_threads`` is respected and the thread count is recorded.

Rows
----
Every case yields exactly one row: ``status`` is ``ok``, ``skipped`` (with a ``reason``: peer not
installed, shape unsupported, ...) or ``error`` (the exception, and the run goes on; after a sticky CUDA
error such as an illegal address, the remaining cases are recorded as not run).  Within a group,
``ratio_to_baseline`` is ``baseline_median / median`` (a speedup: above 1 is faster), where the baseline
is the fastest successfully-timed case flagged ``baseline=True`` in the same run; several flagged cases
therefore act as candidates (e.g. every SDPA backend) and ``baseline_name`` records which one won.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import itertools
import json
import math
import re
import shlex
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, ContextManager, TextIO

import torch

from diffboost.bench.machine import cpu_cache_bytes
from diffboost.bench.machine import machine_info as _machine_info
from diffboost.bench.report import rounded

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"

#: Significant digits kept for floats in results files: keeps float noise (0.30000000000000004) out of
#: diffs while resolving cosine similarities such as 0.99999963.
SIGNIFICANT_DIGITS = 8


class SkipCase(Exception):
    """Raise from a case's ``inputs``, ``make_fn`` or ``fn`` to record it as skipped; the message is the reason.

    ``NotImplementedError`` is treated the same way, so kernels can signal an unsupported shape with it.
    """


@dataclasses.dataclass
class Case:
    """One thing to time.

    Attributes:
        name: what is timed (e.g. ``"sdpa-flash"``, ``"diffboost-int8"``); unique within its group.
        inputs: zero-argument factory returning the positional arguments (tensors and anything else).
        fn: called as ``fn(*inputs())`` in the timed region.  Give either ``fn`` or ``make_fn``.
        make_fn: called once per input set as ``make_fn(*inputs())`` outside the timed region (for setup
            such as weight packing or a probe call) and returns the zero-argument callable to time.
        group: cases compared with each other (one shape, one layer, one pipeline).
        flops: floating-point operations per call; adds ``tflops`` to the row.
        bytes: bytes moved per call; adds ``gbps`` to the row.
        baseline: candidate baseline for its group; the fastest timed candidate becomes the baseline.
        shapes: free-form description of the problem size (e.g. ``{"B": 2, "S": 4096}``); defaults to
            the shapes of the tensor inputs.
        dtype: recorded dtype; defaults to the dtype of the first floating-point tensor input.
        params: extra metadata recorded verbatim in the row (backend, precision, ...).
        check: optional ``check(output, *inputs) -> {metric: float}``, evaluated once on the output of an
            untimed call (accuracy columns such as max abs error).
        context: optional zero-argument factory of a context manager held around setup and timing
            (e.g. ``functools.partial(sdpa_kernel, SDPBackend.FLASH_ATTENTION)``), so that entering it is
            not part of the timed region.
        skip: if set, the case is not run and is recorded as skipped with this reason.
        device: ``"cuda"`` or ``"cpu"`` timer; defaults to where the tensor inputs live.
    """

    name: str
    inputs: Callable[[], Sequence[Any]] = tuple
    fn: Callable[..., Any] | None = None
    make_fn: Callable[..., Callable[[], Any]] | None = None
    group: str = "default"
    flops: float | None = None
    bytes: float | None = None
    baseline: bool = False
    shapes: Mapping[str, Any] | None = None
    dtype: str | None = None
    params: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    check: Callable[..., Mapping[str, float]] | None = None
    context: Callable[[], ContextManager[Any]] | None = None
    skip: str | None = None
    device: str | None = None

    def __post_init__(self) -> None:
        if (self.fn is None) == (self.make_fn is None) and self.skip is None:
            raise ValueError(f"case {self.name!r}: give exactly one of fn and make_fn")


# --------------------------------------------------------------------------------------------------
# Machine description
# --------------------------------------------------------------------------------------------------

def machine_info(packages: Iterable[str] = ()) -> dict[str, Any]:
    """Describe the machine and software a benchmark ran on: :func:`diffboost.bench.machine.machine_info` (the
    schema ``diffboost bench`` records too), with the git state of this checkout."""
    return _machine_info(packages, git_dir=REPO_ROOT)


def _slug(text: str) -> str:
    text = re.sub(r"\((r|tm)\)", "", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")


def device_slug(machine: Mapping[str, Any], device: str) -> str:
    """File-name-safe device label: the GPU name for CUDA results, ``cpu-<model>`` for CPU results."""
    if device == "cuda" and machine.get("gpu"):
        return _slug(machine["gpu"]["name"])
    return "cpu-" + _slug(machine["cpu"]["model"])


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------

def _tensors(obj: Any) -> Iterable[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, Mapping):
        for item in obj.values():
            yield from _tensors(item)


def _clone(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, (list, tuple)):
        items = [_clone(item) for item in obj]
        return items if isinstance(obj, list) else tuple(items)
    if isinstance(obj, Mapping):
        return {key: _clone(value) for key, value in obj.items()}
    return obj


def input_copies_needed(input_bytes: int, cache_bytes: int, max_copies: int) -> int:
    """How many input sets to cycle through so that together they span at least twice the cache."""
    if input_bytes <= 0:
        return 1
    return max(1, min(max_copies, math.ceil(2 * cache_bytes / input_bytes)))


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (the numpy/torch default) of already sorted values, q in [0, 1]."""
    position = q * (len(sorted_values) - 1)
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def summarize(times_ms: Sequence[float]) -> dict[str, float]:
    """Median and 20th/80th percentiles of per-call times in milliseconds."""
    ordered = sorted(times_ms)
    return {"median_ms": _percentile(ordered, 0.5), "p20_ms": _percentile(ordered, 0.2),
            "p80_ms": _percentile(ordered, 0.8)}


def time_cuda(call: Callable[[], Any], warmup_ms: float, rep_ms: float) -> list[float]:
    """Per-call CUDA times (ms) from ``triton.testing.do_bench``, which flushes L2 before every call."""
    from triton.testing import do_bench  # imported here so CPU-only runs never touch the CUDA driver

    return list(do_bench(call, warmup=warmup_ms, rep=rep_ms, return_mode="all"))


def time_cpu(call: Callable[[], Any], warmup_ms: float, rep_ms: float, min_runs: int = 5,
             max_runs: int = 10_000) -> list[float]:
    """Per-call wall-clock times (ms) with ``time.perf_counter``: warm up for ``warmup_ms`` (at least one
    call), then repeat enough calls to fill about ``rep_ms``, bounded by ``min_runs``/``max_runs``."""
    deadline = time.perf_counter() + warmup_ms / 1e3
    warm = []
    while True:
        start = time.perf_counter()
        call()
        warm.append(time.perf_counter() - start)
        if time.perf_counter() >= deadline:
            break
    recent = sorted(warm[-5:])  # the last calls: compilation and caches have settled by then
    estimate = recent[len(recent) // 2]
    runs = min(max_runs, max(min_runs, int(rep_ms / 1e3 / max(estimate, 1e-9))))
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------------------------------
# Running cases
# --------------------------------------------------------------------------------------------------

def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _new_row(case: Case) -> dict[str, Any]:
    return {
        "group": case.group, "name": case.name, "status": "ok", "reason": None,
        "device": case.device, "dtype": case.dtype,
        "shapes": dict(case.shapes) if case.shapes is not None else None, "params": dict(case.params),
        "median_ms": None, "p20_ms": None, "p80_ms": None,
        "flops": case.flops, "bytes": case.bytes, "tflops": None, "gbps": None,
        "baseline": case.baseline, "baseline_name": None, "ratio_to_baseline": None,
        "metrics": {}, "timing": None,
    }


def _describe_inputs(row: dict[str, Any], args: Sequence[Any]) -> None:
    tensors = list(_tensors(args))
    if row["device"] is None:
        row["device"] = ("cuda" if any(t.is_cuda for t in tensors)
                         else "cpu" if tensors else "cuda" if torch.cuda.is_available() else "cpu")
    if row["shapes"] is None:
        row["shapes"] = {f"arg{i}": list(a.shape) for i, a in enumerate(args) if isinstance(a, torch.Tensor)}
    if row["dtype"] is None:
        row["dtype"] = next((_dtype_name(t.dtype) for t in tensors if t.is_floating_point()), None)


def _error_text(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip().rstrip(":")


def _run_case(case: Case, warmup_ms: float, rep_ms: float, max_copies: int) -> dict[str, Any]:
    row = _new_row(case)
    if case.skip is not None:
        row.update(status="skipped", reason=case.skip)
        return row
    calls: list[Callable[[], Any]] = []
    try:
        with case.context() if case.context is not None else contextlib.nullcontext():
            args = tuple(case.inputs())
            _describe_inputs(row, args)
            device = row["device"]
            copies = [args]
            if device == "cpu":
                input_bytes = sum(t.numel() * t.element_size() for t in _tensors(args))
                extra = input_copies_needed(input_bytes, cpu_cache_bytes(), max_copies) - 1
                copies += [_clone(args) for _ in range(extra)]
            for copy in copies:
                calls.append(case.make_fn(*copy) if case.make_fn is not None
                             else functools.partial(case.fn, *copy))
            output = calls[0]()  # untimed: compiles/autotunes and feeds the accuracy check
            _synchronize(device)
            if case.check is not None:
                row["metrics"] = {key: float(value) for key, value in case.check(output, *args).items()}
            del output
            cycle = itertools.cycle(calls)
            rotating = calls[0] if len(calls) == 1 else (lambda: next(cycle)())
            if device == "cuda":
                times = time_cuda(rotating, warmup_ms, rep_ms)
            else:
                times = time_cpu(rotating, warmup_ms, rep_ms)
    except (SkipCase, NotImplementedError) as exc:
        row.update(status="skipped", reason=_error_text(exc) if isinstance(exc, NotImplementedError)
                   else str(exc))
        return row
    except Exception as exc:  # noqa: BLE001 - one failing case is recorded and the run goes on
        row.update(status="error", reason=_error_text(exc))
        return row
    finally:
        calls.clear()
        if row["device"] == "cuda":
            # Release what a failed or large case left before the next one; after a sticky CUDA error this
            # raises too, and run_cases handles the lost context.
            with contextlib.suppress(RuntimeError):
                torch.cuda.empty_cache()

    row.update(summarize(times))
    seconds = row["median_ms"] / 1e3
    if case.flops:
        row["tflops"] = case.flops / seconds / 1e12
    if case.bytes:
        row["gbps"] = case.bytes / seconds / 1e9
    row["timing"] = {
        "method": "triton.testing.do_bench" if device == "cuda" else "time.perf_counter",
        "runs": len(times),
        "warmup_ms": warmup_ms,
        "rep_ms": rep_ms,
        "l2_flush": device == "cuda",
        "input_copies": len(copies),
        "threads": torch.get_num_threads(),
    }
    return row


def cuda_usable() -> bool:
    """Whether this process can still run CUDA work (false after a sticky error such as an illegal address)."""
    try:
        torch.cuda.synchronize()
        return torch.ones(1, device="cuda").add_(1).item() == 2
    except Exception:  # noqa: BLE001 - whatever the failure, the context cannot be trusted any more
        return False


def apply_baselines(rows: list[dict[str, Any]]) -> None:
    """Set ``baseline_name`` and ``ratio_to_baseline`` (baseline median / median) in place, per group,
    using the fastest ``ok`` row flagged ``baseline`` in that group."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["group"], []).append(row)
    for members in groups.values():
        candidates = [r for r in members if r["baseline"] and r["status"] == "ok"]
        if not candidates:
            continue
        best = min(candidates, key=lambda r: r["median_ms"])
        for row in members:
            row["baseline_name"] = best["name"]
            if row["status"] == "ok":
                row["ratio_to_baseline"] = best["median_ms"] / row["median_ms"]


def run_cases(cases: Iterable[Case], *, warmup_ms: float = 25, rep_ms: float = 100, max_copies: int = 32,
              progress: TextIO | None = sys.stderr) -> list[dict[str, Any]]:
    """Time every case and return one row per case, in order, with baselines applied.

    Args:
        cases: the cases; the order is kept in the rows.
        warmup_ms, rep_ms: warm-up and measurement time per case (``do_bench`` semantics on CUDA;
            on CPU the same budgets with at least 5 timed calls).
        max_copies: upper bound on input copies cycled through on CPU.
        progress: stream for one progress line per case; ``None`` for silence.
    """
    cases = list(cases)
    rows = []
    lost_context = None
    for index, case in enumerate(cases, 1):
        if lost_context is None:
            row = _run_case(case, warmup_ms, rep_ms, max_copies)
            if row["status"] == "error" and row["device"] == "cuda" and not cuda_usable():
                lost_context = f"CUDA context lost in {row['group']} / {row['name']} ({row['reason']})"
        else:
            # A sticky error (illegal address, ...) fails every later CUDA call in this process; say so once
            # per row instead of recording the same error against cases that never ran.
            row = _new_row(case)
            row.update(status="error", reason=f"not run: {lost_context}")
        rows.append(row)
        if progress is not None:
            outcome = (f"{row['median_ms']:.4g} ms" if row["status"] == "ok"
                       else f"{row['status']}: {row['reason']}")
            print(f"[{index}/{len(cases)}] {row['group']} / {row['name']}: {outcome}", file=progress, flush=True)
    apply_baselines(rows)
    return rows


# --------------------------------------------------------------------------------------------------
# Results files and tables
# --------------------------------------------------------------------------------------------------

def default_command() -> str:
    """The command line that started this process, as ``python -m module ...`` when run with ``-m``."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    head = ["python", "-m", spec.name] if spec is not None and spec.name else ["python", sys.argv[0]]
    return shlex.join([*head, *sys.argv[1:]])


def write_results(rows: Sequence[Mapping[str, Any]], name: str, *, out_dir: str | Path = RESULTS_DIR,
                  machine: Mapping[str, Any] | None = None, command: str | None = None) -> Path:
    """Write ``<out_dir>/<name>-<device-slug>.json`` and return its path.

    The document holds ``name``, ``command``, ``timestamp`` (UTC), ``machine`` (see `machine_info`) and
    ``rows``.  Keys keep the fixed order the harness builds them in (identity first, readable) and floats
    are rounded, so a rerun differs only where results changed.
    """
    machine = dict(machine) if machine is not None else machine_info()
    device = "cuda" if any(row.get("device") == "cuda" for row in rows) else "cpu"
    doc = {
        "name": name,
        "command": command if command is not None else default_command(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat(),
        "machine": machine,
        "rows": list(rows),
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}-{device_slug(machine, device)}.json"
    path.write_text(json.dumps(rounded(doc, SIGNIFICANT_DIGITS), indent=2) + "\n", encoding="utf-8")
    return path


def format_ms(value: float | None) -> str:
    """Milliseconds with four significant digits and no exponent."""
    if value is None:
        return ""
    return f"{value:.0f}" if value >= 1000 else f"{value:.4g}"


def _format_rate(value: float | None) -> str:
    """Throughput: one decimal for GPU-sized numbers, three significant digits for CPU-sized ones."""
    if not value:
        return ""
    return f"{value:.1f}" if value >= 10 else f"{value:.3g}"


def _format_metric(value: float) -> str:
    """Four significant digits, except similarities just below 1, where the digits after the 9s matter."""
    if 0.99 <= value < 1:
        return f"{value:.7f}"
    return f"{value:.4g}"


def table(rows: Sequence[Mapping[str, Any]], *, columns: Sequence[str] = ("group", "name"),
          note_width: int | None = 80) -> tuple[list[str], list[list[str]]]:
    """Headers and string cells for a results table, shared by `print_table` and ``benchmarks.report``.

    ``columns`` are the leading identity columns.  Throughput columns appear only when some row has
    them; metric columns are the union of the rows' ``metrics``; ``note`` carries skip/error reasons
    (cut to ``note_width`` characters).
    """
    has_tflops = any(row.get("tflops") for row in rows)
    has_gbps = any(row.get("gbps") for row in rows)
    metric_names = sorted({key for row in rows for key in (row.get("metrics") or {})})
    headers = [*columns, "median ms", "p20-p80 ms"]
    headers += ["TFLOP/s"] * has_tflops + ["GB/s"] * has_gbps
    headers += ["x baseline", *metric_names, "note"]
    cells = []
    for row in rows:
        ok = row["status"] == "ok"
        line = [str(row.get(column, "")) for column in columns]
        line += [format_ms(row.get("median_ms")),
                 f"{format_ms(row['p20_ms'])}-{format_ms(row['p80_ms'])}" if ok else ""]
        if has_tflops:
            line.append(_format_rate(row.get("tflops")))
        if has_gbps:
            line.append(_format_rate(row.get("gbps")))
        ratio = row.get("ratio_to_baseline")
        line.append(f"{ratio:.2f}x" if ratio is not None else "")
        metrics = row.get("metrics") or {}
        line += [_format_metric(metrics[key]) if key in metrics else "" for key in metric_names]
        note = "" if ok else f"{row['status']}: {row['reason']}"
        if note_width is not None and len(note) > note_width:
            note = note[: note_width - 3] + "..."
        line.append(note)
        cells.append(line)
    return headers, cells


def print_table(rows: Sequence[Mapping[str, Any]], file: TextIO | None = None) -> None:
    """Print rows as an aligned plain-text table (group, name, timings, throughput, ratio, metrics)."""
    headers, cells = table(rows)
    widths = [max(len(text) for text in column) for column in zip(headers, *cells)]
    out = file if file is not None else sys.stdout
    for line in [headers, ["-" * w for w in widths], *cells]:
        print("  ".join(text.ljust(w) for text, w in zip(line, widths)).rstrip(), file=out)


# ----------------------------------------------------------------------------------------------------------------
# Command-line plumbing shared by the bench_*.py scripts
# ----------------------------------------------------------------------------------------------------------------


def add_common_arguments(parser, *, quick_help: str) -> None:
    """``--quick``, ``--out``, ``--device`` and ``--threads``, as every benchmark script takes them."""
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="directory for the results JSON")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="auto: cuda when available, else cpu")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads for CPU timing (default: torch's)")


def resolve_device(parser, args, *, cpu_needs_quick: str | None = None) -> str:
    """Apply ``--threads`` and turn ``--device`` into ``"cuda"`` or ``"cpu"``; exits through ``parser.error`` when
    CUDA is asked for but absent, or (``cpu_needs_quick`` names what) when a full run is asked for on a CPU."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    if device == "cpu" and cpu_needs_quick and not args.quick:
        parser.error(f"{cpu_needs_quick} need a GPU; pass --quick for the CPU variant")
    return device


def results_name(base: str, selected: Sequence[str], default: Sequence[str]) -> str:
    """``base``, or ``base-<selected models>`` when a run covers another set than the default: each partial run then
    has its own results file (a GPU session can measure one pipeline per call) instead of replacing the others'."""
    return base if set(selected) == set(default) else "-".join((base, *selected))


def save_rows(rows: Sequence[Mapping[str, Any]], name: str, args, argv: Sequence[str] | None, *, script: str,
              packages: Sequence[str] = ()) -> Path:
    """Write ``rows`` as ``<name>[-quick]-<machine>.json`` with the command that produced them; returns the path.

    Benchmarks that run group after group (one pipeline at a time) call it after each group, so a run stopped
    midway (a time limit on a lent GPU) keeps what it measured; :func:`finish` writes the whole set at the end.
    """
    argv_text = shlex.join(sys.argv[1:] if argv is None else argv)
    return write_results(rows, f"{name}-quick" if args.quick else name, out_dir=args.out,
                         machine=machine_info(packages=tuple(packages)),
                         command=f"python -m benchmarks.{script} {argv_text}".rstrip())


def finish(rows: Sequence[Mapping[str, Any]], name: str, args, argv: Sequence[str] | None, *, script: str,
           packages: Sequence[str] = ()) -> int:
    """Write ``rows`` (:func:`save_rows`) and print the table."""
    path = save_rows(rows, name, args, argv, script=script, packages=packages)
    print_table(rows)
    print(f"\nwrote {path}")
    return 0
