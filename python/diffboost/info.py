"""``diffboost info``: what this installation can do on this machine, and why faster paths don't run.

Everything is collected into a plain dict first (:func:`collect`), so tests and bug reports can use it as data;
:func:`render` turns it into the text the command prints.
"""

from __future__ import annotations

import importlib.metadata
import platform
from typing import Any

import torch

import diffboost
from diffboost import _ext
from diffboost.ops import registered_ops
from diffboost.ops.registry import dispatch_log, triton_interpreting

__all__ = ["collect", "render"]


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _devices() -> list[torch.device]:
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return devices


def collect() -> dict[str, Any]:
    """Versions, GPUs, the ``_C`` build, and per op and device the backend that runs and why faster ones don't."""
    from diffboost.patching import _features  # importing diffboost already registered every feature and op

    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            gpus.append({"index": i, "name": props.name, "capability": f"{props.major}.{props.minor}",
                         "memory_gib": round(props.total_memory / 2**30, 1)})
    ops = []
    for op in registered_ops():
        for device in _devices():
            explained = op.explain(device)
            runs = next((name for name, reasons in explained if not reasons), None)
            ops.append({
                "op": op.name,
                "device": str(device),
                "backend": runs,
                "skipped": {name: reasons for name, reasons in explained if reasons},
            })
    return {
        "versions": {
            "diffboost": diffboost.__version__,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_cuda": torch.version.cuda,
            "triton": _version("triton"),
            "diffusers": _version("diffusers"),
            "transformers": _version("transformers"),
        },
        "triton_interpreter": triton_interpreting(),
        "gpus": gpus,
        "extension": {"error": _ext.ext_error(), "build": _ext.build_info(), "cuda_runtime": _ext.cuda_runtime_info(),
                      "cpu_threads": _ext.cpu_threads()},
        "ops": ops,
        "features": [f.name for f in _features()],
        "dispatch_log": dispatch_log(),
    }


def render(info: dict[str, Any]) -> str:
    """Human-readable form of :func:`collect`'s dict."""
    lines = ["diffboost " + info["versions"]["diffboost"], ""]
    lines.append("versions:")
    for name, version in info["versions"].items():
        missing = "none (CPU build)" if name == "torch_cuda" else "not installed"
        lines.append(f"  {name:<13} {version or missing}")
    lines.append("")
    if info["gpus"]:
        for gpu in info["gpus"]:
            lines.append(f"GPU {gpu['index']}: {gpu['name']} (compute capability {gpu['capability']}, {gpu['memory_gib']} GiB)")
    else:
        lines.append("GPU: none visible to torch" + (" (Triton kernels run under TRITON_INTERPRET=1)" if info["triton_interpreter"] else ""))
    ext = info["extension"]
    lines.append("")
    if ext["error"]:
        lines.append(f"_C extension: NOT LOADED ({ext['error']})")
    else:
        build = ext["build"]
        archs = ", ".join(build.get("cuda_archs") or []) or "-"
        cuda = f"CUDA {build.get('cuda_version')} kernels for sm {archs}" if build.get("cuda") else (
            f"no CUDA kernels ({build.get('cuda_disabled_by')})")
        lines.append(f"_C extension: {build.get('version')}, {cuda}")
        lines.append(f"  CPU SIMD compiled: {', '.join(build.get('cpu_simd_compiled', []))}; "
                     f"running: {build.get('cpu_simd_runtime')}")
        lines.append(f"  CPU kernels run on: {ext['cpu_threads']}")
        runtime = ext["cuda_runtime"]
        lines.append(f"  CUDA runtime: {'ok' if runtime.get('ok') else 'unusable'} - {runtime.get('message')}")
    lines.append("")
    lines.append("ops (backend that runs here; why each faster one does not):")
    for entry in info["ops"]:
        lines.append(f"  {entry['op']} on {entry['device']}: {entry['backend'] or 'NONE'}")
        for name, reasons in entry["skipped"].items():
            lines.append(f"      {name}: {'; '.join(reasons)}")
    lines.append("")
    lines.append("patch features: " + ", ".join(info["features"]))
    if info["dispatch_log"]:
        lines.append("")
        lines.append("dispatch in this process:")
        for entry in info["dispatch_log"]:
            lines.append(f"  {entry['op']} {entry['device']}/{entry['dtype']}: {entry['backend']} x{entry['calls']}")
    return "\n".join(lines)
