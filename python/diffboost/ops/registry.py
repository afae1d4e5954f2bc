"""Backend registry and dispatch for diffboost ops.

Every op (attention, linear attention, W4A4 GEMM, ...) owns an ordered list of backends. A backend declares what
it supports — devices, dtypes, a minimum CUDA compute capability, the runtime pieces it needs (Triton, the ``_C``
extension, its CUDA kernels) — plus an op-specific ``check`` for shapes. ``Backend.why_not`` turns that metadata into
human-readable reasons; dispatch takes the first backend with no reasons (the registration order is the documented
priority) and remembers, once per distinct situation, why the faster ones were passed over, so ``diffboost info`` and
the logs can say why a fast path did not run. The last backend of every op is its PyTorch reference, which always
runs: it is both the CPU fallback and the test oracle.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import threading
from typing import Any, Callable, Iterable, Sequence

import torch

logger = logging.getLogger("diffboost")

__all__ = [
    "Backend",
    "BackendUnavailableError",
    "Op",
    "dispatch_log",
    "get_op",
    "registered_ops",
    "triton_available",
    "triton_interpreting",
]


class BackendUnavailableError(RuntimeError):
    """Raised when a backend was forced with ``backend=...`` but cannot run the given inputs."""


def triton_interpreting() -> bool:
    """Whether Triton kernels run under the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except ImportError as exc:  # the only failure mode we expect; anything else is a real bug and propagates
        return f"triton is not importable ({exc})"
    return None


def triton_available() -> bool:
    """Whether ``import triton`` works in this environment."""
    return _triton_import_error() is None


def _needs_reasons(needs: Sequence[str], device: torch.device) -> list[str]:
    """Reasons why the runtime pieces a backend needs are missing on ``device``."""
    reasons: list[str] = []
    for need in needs:
        if need == "triton":
            err = _triton_import_error()
            if err is not None:
                reasons.append(err)
            elif device.type == "cpu" and not triton_interpreting():
                reasons.append("Triton kernels need a CUDA device (on CPU only under TRITON_INTERPRET=1)")
        elif need in ("_C", "_C.cuda"):
            from diffboost import _ext

            if _ext.get_ext() is None:
                reasons.append(f"the _C extension is not available ({_ext.ext_error()})")
            elif need == "_C.cuda" and not _ext.build_info().get("cuda", False):
                reasons.append("_C was built without CUDA kernels (no nvcc at build time or DIFFBOOST_BUILD_CUDA=0)")
        else:  # a typo in a backend declaration must not turn into a silently skipped backend
            raise ValueError(f"unknown backend requirement {need!r}")
    return reasons


@dataclasses.dataclass(frozen=True)
class Backend:
    """One implementation of an op and the metadata that says when it can run.

    Attributes:
        name: short identifier, used with ``backend="name"``.
        impl: the function called with the op's arguments.
        devices: device types it runs on (``"cuda"``, ``"cpu"``). A Triton backend lists ``"cuda"``; it also runs on
            CPU tensors when ``TRITON_INTERPRET=1`` (that is how the test suite exercises Triton kernels).
        dtypes: input dtypes it accepts, or ``None`` for any.
        needs: runtime pieces required: ``"triton"``, ``"_C"``, ``"_C.cuda"``.
        min_capability: minimum CUDA compute capability ``(major, minor)``, checked on CUDA devices.
        check: op-specific validation, called with the op's arguments; returns reasons it cannot run them.
        auto_below_capability: ``(capability, why)``: automatic dispatch passes this backend over on CUDA devices
            of at least that compute capability, where a later backend was measured faster (``why`` says so);
            ``backend=name`` still runs it there.
        description: one line for ``diffboost info``.
    """

    name: str
    impl: Callable[..., Any]
    devices: tuple[str, ...] = ("cuda", "cpu")
    dtypes: tuple[torch.dtype, ...] | None = None
    needs: tuple[str, ...] = ()
    min_capability: tuple[int, int] | None = None
    check: Callable[..., list[str]] | None = None
    auto_below_capability: tuple[tuple[int, int], str] | None = None
    description: str = ""

    def __post_init__(self) -> None:
        # Per-device cache of (environment_reasons, passed_over): dispatch runs on every call and the machine
        # doesn't change.
        object.__setattr__(self, "_environment_cache", {})

    def _environment(self, device: torch.device) -> tuple[tuple[str, ...], tuple[str, ...]]:
        cached = self._environment_cache.get(device)
        if cached is None:
            cached = (self._compute_environment_reasons(device), self._compute_passed_over(device))
            self._environment_cache[device] = cached
        return cached

    def environment_reasons(self, device: torch.device) -> list[str]:
        """Reasons that depend only on the machine and device, not on the inputs (cached per device)."""
        return list(self._environment(device)[0])

    def passed_over(self, device: torch.device) -> list[str]:
        """Why automatic dispatch skips this backend on ``device`` although it can run there (see
        ``auto_below_capability``; cached per device)."""
        return list(self._environment(device)[1])

    def _compute_environment_reasons(self, device: torch.device) -> tuple[str, ...]:
        reasons: list[str] = []
        runs_on_cpu_via_interpreter = "triton" in self.needs and triton_interpreting()
        if device.type not in self.devices and not (device.type == "cpu" and runs_on_cpu_via_interpreter):
            reasons.append(f"runs on {'/'.join(self.devices)}, not {device.type}")
        reasons += _needs_reasons(self.needs, device)
        if self.min_capability is not None and device.type == "cuda" and torch.cuda.is_available():
            cap = torch.cuda.get_device_capability(device)
            if cap < self.min_capability:
                want = "%d.%d" % self.min_capability
                reasons.append(f"needs compute capability >= {want}, device has {cap[0]}.{cap[1]}")
        return tuple(reasons)

    def _compute_passed_over(self, device: torch.device) -> tuple[str, ...]:
        if self.auto_below_capability is None or device.type != "cuda" or not torch.cuda.is_available():
            return ()
        (major, minor), why = self.auto_below_capability
        cap = torch.cuda.get_device_capability(device)
        if cap < (major, minor):
            return ()
        return (f"passed over on compute capability {cap[0]}.{cap[1]} >= {major}.{minor}: {why}",)

    def why_not(self, device: torch.device, dtype: torch.dtype, *args: Any, **kwargs: Any) -> list[str]:
        """All reasons this backend cannot run these inputs; an empty list means it can."""
        reasons = self.environment_reasons(device)
        if self.dtypes is not None and dtype not in self.dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in self.dtypes)
            reasons.append(f"dtype {str(dtype).replace('torch.', '')} not supported (supports {names})")
        if self.check is not None and not reasons:  # shape checks may assume the environment is sane
            reasons += self.check(*args, **kwargs)
        return reasons


_dispatch_lock = threading.Lock()
# (op, chosen backend, device type, dtype, ((skipped backend, reasons), ...)) -> number of calls
_dispatch_log: dict[tuple, int] = {}


def dispatch_log() -> list[dict[str, Any]]:
    """What dispatch did in this process: for each distinct situation, the backend chosen and why faster ones
    were passed over, with a call count. ``diffboost info`` prints it; tests inspect it."""
    with _dispatch_lock:
        items = list(_dispatch_log.items())
    return [
        {
            "op": op,
            "backend": chosen,
            "device": device,
            "dtype": str(dtype).replace("torch.", ""),
            "skipped": {name: list(reasons) for name, reasons in skipped},
            "calls": calls,
        }
        for (op, chosen, device, dtype, skipped), calls in items
    ]


class Op:
    """An op with backends in priority order (first registered = preferred; the last is the reference)."""

    def __init__(self, name: str, doc: str = "") -> None:
        self.name = name
        self.doc = doc
        self.backends: list[Backend] = []

    def register(self, backend: Backend) -> Backend:
        """Append ``backend`` (lower priority than those already registered)."""
        if any(b.name == backend.name for b in self.backends):
            raise ValueError(f"op {self.name!r} already has a backend named {backend.name!r}")
        self.backends.append(backend)
        return backend

    def backend(self, name: str) -> Backend:
        """The backend called ``name``; a ValueError lists the valid names otherwise."""
        for b in self.backends:
            if b.name == name:
                return b
        valid = ", ".join(repr(b.name) for b in self.backends)
        raise ValueError(f"{self.name}: unknown backend={name!r}; valid: 'auto', {valid}")

    def select(self, device: torch.device, dtype: torch.dtype, *args: Any, backend: str = "auto", **kwargs: Any) -> Backend:
        """Pick the backend that will run these inputs.

        With ``backend="auto"`` it is the first one with no reasons, and the reasons of the faster ones are recorded
        (logged once per distinct situation). A forced backend that cannot run raises
        :class:`BackendUnavailableError` listing its reasons.
        """
        if backend != "auto":
            chosen = self.backend(backend)
            reasons = chosen.why_not(device, dtype, *args, **kwargs)
            if reasons:
                raise BackendUnavailableError(
                    f"{self.name}: backend={backend!r} cannot run these inputs: " + "; ".join(reasons)
                )
            self._record(chosen, device, dtype, ())
            return chosen
        skipped: list[tuple[str, tuple[str, ...]]] = []
        unable = False  # whether a faster backend was skipped because it cannot run (not merely passed over)
        for candidate in self.backends:
            reasons = candidate.why_not(device, dtype, *args, **kwargs)
            unable = unable or bool(reasons)
            reasons = reasons or candidate.passed_over(device)
            if not reasons:
                self._record(candidate, device, dtype, tuple(skipped), unable)
                return candidate
            skipped.append((candidate.name, tuple(reasons)))
        lines = "\n".join(f"  {name}: {'; '.join(r)}" for name, r in skipped)
        raise BackendUnavailableError(f"{self.name}: no backend can run these inputs:\n{lines}")

    def _record(
        self, chosen: Backend, device: torch.device, dtype: torch.dtype, skipped: tuple, unable: bool = False
    ) -> None:
        key = (self.name, chosen.name, device.type, dtype, skipped)
        with _dispatch_lock:
            first = key not in _dispatch_log
            _dispatch_log[key] = _dispatch_log.get(key, 0) + 1
        if first and skipped:
            why = "; ".join(f"{name}: {', '.join(r)}" for name, r in skipped)
            # On a GPU a fast path that cannot run is news the user should see; on CPU it is the expected state of
            # affairs, and a backend passed over for a faster one is no loss.
            level = logging.WARNING if device.type == "cuda" and unable else logging.INFO
            logger.log(level, "%s on %s/%s runs %r (%s)", self.name, device.type, dtype, chosen.name, why)

    def explain(self, device: torch.device) -> list[tuple[str, list[str]]]:
        """Per backend, the environment reasons it cannot run on ``device`` (input-independent part of why_not),
        or why automatic dispatch passes it over there."""
        return [(b.name, b.environment_reasons(device) or b.passed_over(device)) for b in self.backends]


_ops: dict[str, Op] = {}


def get_op(name: str, doc: str = "") -> Op:
    """The op called ``name``, created on first use."""
    if name not in _ops:
        _ops[name] = Op(name, doc)
    return _ops[name]


def registered_ops() -> Iterable[Op]:
    """All ops registered so far (import :mod:`diffboost.ops` to register the built-in ones)."""
    return list(_ops.values())
