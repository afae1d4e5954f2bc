"""What a benchmark ran on: GPU, CPU, versions, git state, and the environment variables that change timings.

This is the one machine description of the project: ``diffboost bench`` records it in its JSON, and the benchmark
scripts of a source checkout (``benchmarks/harness.py``) can import it, so every results file has the same schema.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import platform
import re
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

__all__ = ["DEFAULT_PACKAGES", "RECORDED_ENV", "cpu_cache_bytes", "machine_info", "package_version"]

#: Packages whose versions every results file records; callers add their peers via ``packages=``.
DEFAULT_PACKAGES = ("torch", "triton", "numpy", "diffboost")

#: Environment variables that change what gets measured, recorded when set.
RECORDED_ENV = ("CUDA_VISIBLE_DEVICES", "TRITON_INTERPRET", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                "TORCH_CUDNN_SDPA_ENABLED", "PYTORCH_CUDA_ALLOC_CONF")

#: Assumed last-level cache size when sysfs does not say (typical of one server CPU complex).
FALLBACK_CPU_CACHE_BYTES = 32 * 2**20


def package_version(name: str) -> str | None:
    """Version of a package: the loaded module's ``__version__`` (it keeps local tags such as torch's
    ``+cu130``), else the installed distribution's, else that of an importable source checkout; None if absent."""
    loaded = sys.modules.get(name)
    if loaded is not None and hasattr(loaded, "__version__"):
        return str(loaded.__version__)
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        module = importlib.import_module(name)
    except Exception:  # noqa: BLE001 - a broken peer must not stop a benchmark from recording the rest
        return None
    return str(getattr(module, "__version__", "unknown"))


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def cpu_cache_bytes() -> int:
    """Size of the largest (last-level) CPU cache visible to cpu0, from sysfs; a fixed guess elsewhere."""
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        match = re.fullmatch(r"(\d+)([KMG]?)", text)
        if match:
            sizes.append(int(match.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[match.group(2)])
    return max(sizes, default=FALLBACK_CPU_CACHE_BYTES)


def _git_state(directory: Path) -> dict[str, Any] | None:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=directory, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None  # no git, not a repository (an installed wheel), or no commit yet
    return {"commit": commit, "dirty": dirty}


def _gpu_info() -> dict[str, Any] | None:
    if not torch.cuda.is_available():
        return None
    index = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    return {
        "name": props.name,
        "capability": f"{props.major}.{props.minor}",
        "sm_count": props.multi_processor_count,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "l2_cache_mib": round(getattr(props, "L2_cache_size", 0) / 2**20, 1),
        "count": torch.cuda.device_count(),
    }


def machine_info(packages: Iterable[str] = (), git_dir: str | Path | None = None) -> dict[str, Any]:
    """Describe the machine and software a benchmark runs on.

    Args:
        packages: extra packages (peers) whose versions to record.
        git_dir: directory whose git commit to record; default: the directory holding the diffboost sources
            (an editable install's checkout; an installed wheel records ``None``).

    Returns:
        A dict with ``device`` (``"cuda"`` or ``"cpu"``), ``gpu`` (name, compute capability, SM count, memory,
        L2 size; ``None`` without CUDA), ``cpu`` (model, cores, torch threads, last-level cache, 1-minute load
        average), ``versions``
        (python, CUDA, cuDNN, torch, triton, numpy, diffboost and ``packages``; ``None`` when absent), ``git``
        (commit and dirty flag, when available), ``platform`` and the set ``env`` variables that affect timings.
    """
    versions: dict[str, Any] = {
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
    }
    for name in dict.fromkeys((*DEFAULT_PACKAGES, *packages)):
        versions[name] = package_version(name)
    gpu = _gpu_info()
    return {
        "device": "cuda" if gpu else "cpu",
        "gpu": gpu,
        "cpu": {
            "model": _cpu_model(),
            "logical_cores": os.cpu_count(),
            "available_cores": _available_cores(),
            "torch_threads": torch.get_num_threads(),
            "cache_mib": round(cpu_cache_bytes() / 2**20, 1),
            # Other work on the machine slows CPU timings down; the 1-minute load average shows how busy it was.
            "load_average_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        },
        "versions": versions,
        "git": _git_state(Path(git_dir) if git_dir is not None else Path(__file__).resolve().parent),
        "platform": platform.platform(),
        "env": {name: os.environ[name] for name in RECORDED_ENV if name in os.environ},
    }
