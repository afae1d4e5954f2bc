"""Lazy, failure-tolerant access to the compiled extension :mod:`diffboost._C`.

``_C`` holds the CUDA kernels (when the package was built with a CUDA toolkit) and the CPU SIMD code.
diffboost must keep working without it -- on the Triton and PyTorch paths -- when it is missing or
cannot be loaded (a source checkout that was never built, a wheel built for another Python, a
missing shared library). Everything here therefore imports ``_C`` at most once, on first use, and
turns a failed import into a single warning plus a remembered reason instead of an exception.

Only :class:`ImportError` and :class:`OSError` count as "unavailable"; any other exception raised
while loading the module is a bug and propagates.
"""

from __future__ import annotations

import importlib
import os
import re
import threading
import warnings
from types import ModuleType
from typing import Any

_EXT_NAME = "diffboost._C"

_lock = threading.Lock()
_attempted = False
_ext: ModuleType | None = None
_error: str | None = None


def get_ext() -> ModuleType | None:
    """Return the ``diffboost._C`` module, or ``None`` when it cannot be loaded.

    The import is attempted once per process. When it fails, a :class:`RuntimeWarning` carrying the
    original exception text is emitted (once) and the reason stays available from :func:`ext_error`.
    """
    global _attempted, _ext, _error
    if _attempted:  # fast path, no lock once the outcome is known
        return _ext
    with _lock:
        if not _attempted:
            try:
                _ext = importlib.import_module(_EXT_NAME)
                _attach_openmp(_ext)
            except (ImportError, OSError) as exc:
                _error = f"{type(exc).__name__}: {exc}"
                warnings.warn(
                    f"{_EXT_NAME} could not be loaded ({_error}); diffboost falls back to its "
                    "Triton/PyTorch implementations.",
                    RuntimeWarning,
                    stacklevel=2,
                )
            _attempted = True
    return _ext


_threads_note: str | None = None


def _torch_openmp_library() -> tuple[str | None, str]:
    """The OpenMP library that torch's CPU ops run on, from the libraries this process has mapped, or None and why
    there is none to share."""
    import torch

    if "ATen parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None, "torch's CPU thread pool is not OpenMP"
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split(maxsplit=5)[-1].strip() for line in maps if line.count(" ") >= 5}
    except OSError:
        return None, "the process's libraries are not listed in /proc/self/maps"
    for path in sorted(paths):
        name = os.path.basename(path)
        if re.match(r"lib(gomp|iomp5|omp)\b.*\.so", name):
            return path, ""
    return None, "no OpenMP library is loaded"


def _attach_openmp(ext: ModuleType) -> None:
    """Run the CPU kernels on torch's OpenMP threads (see csrc/cpu/parallel.h for why); remember what was done."""
    global _threads_note
    path, why_not = _torch_openmp_library()
    if path is not None:
        why_not = ext.use_openmp_runtime(path)
    _threads_note = f"torch's OpenMP team ({path})" if not why_not else f"threads of their own: {why_not}"


def cpu_threads() -> str | None:
    """What the CPU kernels of ``_C`` run on: torch's OpenMP thread team (and its library), or threads of their own
    and why; None when ``_C`` is unavailable."""
    get_ext()
    return _threads_note


def ext_error() -> str | None:
    """Why ``diffboost._C`` could not be loaded (``"ImportError: ..."``), or ``None`` if it loaded.

    Triggers the load if it has not been attempted yet.
    """
    get_ext()
    return _error


def build_info() -> dict[str, Any]:
    """Describe the compiled extension: ``_C.build_info()`` plus ``available: True``.

    Keys include ``version``, ``cuda`` (CUDA kernels compiled in), ``cuda_disabled_by``, ``cuda_version``,
    ``cuda_archs``, ``compilers``, ``cpu_simd_compiled`` and ``cpu_simd_runtime``. When ``_C`` is
    unavailable: ``{"available": False, "error": <reason>, "cuda": False}``.
    """
    ext = get_ext()
    if ext is None:
        return {"available": False, "error": _error, "cuda": False}
    return {"available": True, **ext.build_info()}


def cuda_runtime_info() -> dict[str, Any]:
    """Whether this machine can run diffboost's CUDA kernels: ``_C.cuda_runtime_info()``.

    Keys: ``ok``, ``message`` (what to fix when not ok), ``runtime_version``, ``driver_version`` and
    ``devices`` (each with ``index``, ``name``, ``compute_capability``, ``sm_count``, ``total_memory``,
    ``supported`` and ``code``). When ``_C`` is unavailable, ``ok`` is False and ``message`` gives the
    reason. Creates no CUDA context.
    """
    ext = get_ext()
    if ext is None:
        return {
            "ok": False,
            "message": f"{_EXT_NAME} is unavailable ({_error})",
            "runtime_version": None,
            "driver_version": None,
            "devices": [],
        }
    return ext.cuda_runtime_info()
