"""``diffboost bench kernels``: the kernel microbenchmarks of a source checkout, each against its peers.

The microbenchmarks are the ``benchmarks/bench_*.py`` scripts of the repository (each times diffboost's kernels
and the peers in the same run through ``benchmarks/harness.py``, prints the table and writes the JSON). They are
not part of the installed package, so this command finds the checkout: ``--benchmarks DIR``, else the current
directory or one of its parents, else the checkout an editable install points at. Each script runs in its own
process (``python -m benchmarks.bench_<name>``) from the checkout's root, with its output streamed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import torch

__all__ = ["add_kernels_parser", "find_benchmarks", "list_scripts", "run_kernels"]

SCRIPT_PREFIX = "bench_"


def _is_benchmarks_dir(path: Path) -> bool:
    return (path / "harness.py").is_file() and any(path.glob(f"{SCRIPT_PREFIX}*.py"))


def find_benchmarks(explicit: str | Path | None = None, start: str | Path | None = None) -> Path | None:
    """The ``benchmarks`` directory of a diffboost source checkout, or None.

    Args:
        explicit: a ``benchmarks`` directory (or the checkout holding one) given by the user; only it is tried.
        start: where to start looking upwards (default: the current directory); the editable install's checkout
            (this file's ``../../..``) is tried last.
    """
    if explicit is not None:
        candidates: Iterable[Path] = [Path(explicit), Path(explicit) / "benchmarks"]
    else:
        here = Path(start if start is not None else os.getcwd()).resolve()
        candidates = [*(parent / "benchmarks" for parent in (here, *here.parents)),
                      Path(__file__).resolve().parents[3] / "benchmarks"]
    return next((path.resolve() for path in candidates if _is_benchmarks_dir(path)), None)


def list_scripts(benchmarks: Path) -> dict[str, Path]:
    """Benchmark name (``attention`` for ``bench_attention.py``) -> script, sorted by name."""
    return {path.stem.removeprefix(SCRIPT_PREFIX): path for path in sorted(benchmarks.glob(f"{SCRIPT_PREFIX}*.py"))}


def add_kernels_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``kernels`` under ``diffboost bench``."""
    parser = subparsers.add_parser(
        "kernels",
        help="kernel microbenchmarks vs their peers (needs a source checkout)",
        description=__doc__.split("\n\n")[1].replace("\n", " "),
    )
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help="benchmarks to run, e.g. attention (default: all; --list shows them)")
    parser.add_argument("--list", action="store_true", help="list the benchmarks found and exit")
    parser.add_argument("--quick", action=argparse.BooleanOptionalAction, default=None,
                        help="short timing and, without CUDA, CPU-sized shapes (default: on without CUDA)")
    parser.add_argument("--benchmarks", metavar="DIR", help="the checkout's benchmarks directory")
    parser.add_argument("--out", type=Path, metavar="DIR",
                        help="directory for the results JSON (default: each script's, benchmarks/results)")
    parser.set_defaults(run=run_kernels, kernels_parser=parser)
    return parser


def run_kernels(args: argparse.Namespace) -> int:
    """Run the selected microbenchmark scripts; exit code 0 if all succeeded, 1 otherwise, 2 for bad names."""
    parser = args.kernels_parser
    benchmarks = find_benchmarks(args.benchmarks)
    if benchmarks is None:
        where = args.benchmarks or f"{os.getcwd()} or its parents"
        print("diffboost bench kernels: the kernel microbenchmarks live in the benchmarks/ directory of a diffboost "
              f"source checkout, which was not found in {where}. Run it from a clone of the repository, or pass "
              "--benchmarks DIR.", file=sys.stderr)
        return 1
    scripts = list_scripts(benchmarks)
    unknown = [name for name in args.names if name not in scripts]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; found in {benchmarks}: {', '.join(scripts)}")
    if args.list:
        for name, path in scripts.items():
            print(f"{name:<20} {path}")
        return 0
    quick = args.quick if args.quick is not None else not torch.cuda.is_available()
    root = benchmarks.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    failed = []
    selected = args.names or list(scripts)
    for index, name in enumerate(selected, 1):
        command = [sys.executable, "-m", f"{benchmarks.name}.{scripts[name].stem}"]
        command += ["--quick"] * quick + (["--out", str(args.out.resolve())] if args.out is not None else [])
        print(f"[{index}/{len(selected)}] {name}: {' '.join(command[1:])}", file=sys.stderr, flush=True)
        if subprocess.run(command, cwd=root, env=env, check=False).returncode != 0:
            failed.append(name)
    if failed:
        print(f"diffboost bench kernels: failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
