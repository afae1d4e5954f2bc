"""What diffboost's GPU kernels compile to on a GPU this machine need not have: registers, stack, shared memory and
the instruction mix of each kernel's main loop (the Triton kernels, and the CUDA ones of csrc/ when nvcc is on
PATH).

    python -m benchmarks.kernel_report [--arch 90] [--only SUBSTRING] [--json PATH]

Every case runs the kernel's real launcher (so the arguments, their specialization and the launch config are those
of a run on that GPU) with Triton's driver replaced by one that compiles and never launches; Triton's own ptxas and
cuobjdump then give the resource usage and the SASS. The main loop is the loop with the most tensor-core
instructions (see :func:`main_loop`), and its counts are per warp and per iteration (one K group of a GEMM, one key
tile of attention).

This is not a timing. It is the figure to reduce for a kernel bound by instruction issue: the W4A4 GEMM on Hopper,
where each 64-channel group is two INT8 wgmma per warpgroup against hundreds of other instructions per warp
(nibble extraction, fp32 group scaling). Counts come from this machine's Triton and ptxas (the versions are in the
output), so they can differ from the GPU machine's by a few instructions.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    # The kernel modules read it when imported: under the interpreter they would pick interpreter launch configs.
    raise SystemExit("kernel_report compiles for a GPU: run it without TRITON_INTERPRET")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402

TENSOR_CORE_OPS = ("HMMA", "IMMA", "HGMMA", "IGMMA", "QGMMA")


class _CompileOnlyDriver:
    """The three queries a Triton launch makes before it compiles; the launch itself never happens."""

    def __init__(self, arch: int) -> None:
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0


class _CompileOnly:
    """Stands in for a ``@triton.jit`` function: ``kernel[grid](...)`` compiles (``warmup``) and records."""

    def __init__(self, fn: Any, compiled: list) -> None:
        self.fn = fn
        self.compiled = compiled

    def __getitem__(self, grid: Any) -> Callable[..., None]:
        def launch(*args: Any, **kwargs: Any) -> None:
            kernel = self.fn.warmup(*args, grid=grid, **kwargs)
            config = {k: kwargs[k] for k in sorted(kwargs) if k.startswith("BLOCK") or k.startswith("num_")}
            self.compiled.append((self.fn.__name__, config, kernel))
        return launch


@contextlib.contextmanager
def compile_only(arch: int, module: Any, names: tuple[str, ...]) -> Iterator[list]:
    """Within the block, launches of ``module.<name>`` compile for ``sm_<arch>`` and append
    ``(kernel name, launch config, CompiledKernel)`` to the yielded list instead of running."""
    compiled: list = []
    saved = {name: getattr(module, name) for name in names}
    # driver.reset_active() would create the default driver, which fails without a GPU: put back what was there.
    previous = driver._active
    driver.set_active(_CompileOnlyDriver(arch))
    try:
        for name, fn in saved.items():
            setattr(module, name, _CompileOnly(fn, compiled))
        yield compiled
    finally:
        for name, fn in saved.items():
            setattr(module, name, fn)
        driver._active = previous


def _nvidia_tool(name: str) -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _cuobjdump(cubin: str, flag: str) -> str:
    return subprocess.run([_nvidia_tool("cuobjdump"), flag, cubin], capture_output=True, text=True, check=True).stdout


def _row(kernel: str, config: dict, registers: int, stack: int, shared: int, sass: str) -> dict[str, Any]:
    """One report row: a kernel's resources and its main loop's instruction mix."""
    loop = main_loop(sass)
    return {
        "kernel": kernel,
        "config": config,
        "registers": registers,
        "stack_bytes": stack,  # spills land here
        "shared_bytes": shared,
        "loop_instructions": sum(loop.values()),
        "loop_tensor_core": {op: loop[op] for op in TENSOR_CORE_OPS if loop[op]},
        "loop_top": dict(loop.most_common(12)),
    }


_SASS_LINE = re.compile(r"\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)(.*)")


def main_loop(sass: str) -> collections.Counter:
    """Opcode counts (without modifiers) of the main loop: of the loops (backward branches), the one with the most
    tensor-core instructions, the first of them in the code on a tie (attention's loop over full key tiles comes
    before the one over the ragged last tile, which has the same dots plus masking); the largest loop when none has
    tensor-core instructions. Empty when the SASS has no loop."""
    instructions = [(int(m.group(1), 16), m.group(2).split(".")[0], m.group(3))
                    for m in map(_SASS_LINE.match, sass.splitlines()) if m]
    loops = []
    for address, opcode, operands in instructions:
        target = re.search(r"0x([0-9a-f]+)", operands) if opcode == "BRA" else None
        if target and int(target.group(1), 16) < address:
            start = int(target.group(1), 16)
            loops.append(collections.Counter(op for a, op, _ in instructions if start <= a <= address))
    if not loops:
        return collections.Counter()

    def rank(loop: collections.Counter) -> tuple[int, int]:
        tensor_core = sum(loop[op] for op in TENSOR_CORE_OPS)
        return (tensor_core, 0) if tensor_core else (0, sum(loop.values()))

    best = max(rank(loop) for loop in loops)
    return next(loop for loop in loops if rank(loop) == best)


def describe(name: str, config: dict, kernel: Any) -> dict[str, Any]:
    """One report row for a compiled Triton kernel (its shared memory is the dynamic allocation it launches with)."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(kernel.asm["cubin"])
        usage = re.search(r"REG:(\d+) STACK:(\d+)", _cuobjdump(cubin, "-res-usage"))
        sass = _cuobjdump(cubin, "-sass")
    return _row(name, config, int(usage.group(1)), int(usage.group(2)), kernel.metadata.shared, sass)


# ---------------------------------------------------------------------------------------------------------------
# Cases: the benchmarks' shapes, launched through the real launchers on CPU tensors (only their dtype, shape,
# strides and 16-byte alignment matter).
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    run: Callable[[int], list]  # arch -> [(kernel name, config, CompiledKernel)]


def _compiling(module: str, kernels: tuple[str, ...], launch: Callable[[Any], None]) -> Callable[[int], list]:
    """A case's ``run``: ``launch(diffboost.kernels.<module>)`` with the named kernels compiled, never launched."""
    def run(arch: int) -> list:
        mod = importlib.import_module(f"diffboost.kernels.{module}")
        with compile_only(arch, mod, kernels) as compiled:
            launch(mod)
        return compiled
    return run


def _w4a4_gemm(m: int, k: int, n: int, group: int, rank: int = 32) -> Callable[[int], list]:
    return _compiling("w4a4", ("_gemm_kernel",), lambda w4a4: w4a4.gemm(
        torch.empty(m, k // 2, dtype=torch.uint8), torch.empty(k // group, m),
        torch.empty(n, k // 2, dtype=torch.uint8), torch.empty(k // group, n, dtype=torch.bfloat16),
        torch.empty(m, rank), torch.empty(rank, n, dtype=torch.bfloat16), torch.empty(n, dtype=torch.bfloat16),
        torch.empty(m, n, dtype=torch.bfloat16),
    ))


def _w4a4_quantize(m: int, k: int, group: int, rank: int = 32) -> Callable[[int], list]:
    return _compiling("w4a4", ("_quantize_act_kernel",), lambda w4a4: w4a4.quantize_act(
        torch.empty(m, k, dtype=torch.bfloat16), torch.empty(k), torch.empty(k, rank, dtype=torch.bfloat16),
        torch.empty(m, k // 2, dtype=torch.uint8), torch.empty(k // group, m), torch.empty(m, rank), group,
    ))


def _w4a16(m: int, k: int, n: int, group: int = 64) -> Callable[[int], list]:
    return _compiling("w4a16", ("_linear_kernel",), lambda w4a16: w4a16.linear(
        torch.empty(m, k, dtype=torch.bfloat16), torch.empty(n, k // 2, dtype=torch.uint8),
        torch.empty(k // group, n, dtype=torch.bfloat16), torch.empty(n, dtype=torch.bfloat16),
        torch.empty(m, n, dtype=torch.bfloat16),
    ))


def _attention(b: int, h: int, lq: int, lk: int, d: int, int8: bool) -> Callable[[int], list]:
    def heads(length: int) -> torch.Tensor:  # diffusers' layout: (B, L, H*D) viewed as (B, H, L, D)
        return torch.empty(b, length, h * d, dtype=torch.bfloat16).view(b, length, h, d).transpose(1, 2)

    def launch(attention: Any) -> None:
        q, k, v = heads(lq), heads(lk), heads(lk)
        attention.attention_fwd(q, k, v, torch.empty_like(q), mask=None, is_causal=False, scale=d ** -0.5, int8=int8)

    return _compiling("attention", ("_attn_fwd_kernel", "_quantize_k_kernel"), launch)


def _linear_attention(b: int, h: int, n: int, d: int) -> Callable[[int], list]:
    def launch(linear_attention: Any) -> None:
        q, k, v = (torch.empty(b, n, h * d, dtype=torch.bfloat16).view(b, n, h, d).transpose(1, 2) for _ in range(3))
        linear_attention.linear_attention_fwd(q, k, v, torch.empty_like(q), feature_map="elu", eps=1e-6, keep=None)

    return _compiling("linear_attention", ("_kv_partial_kernel", "_combine_kernel", "_apply_kernel"), launch)


def cases() -> list[Case]:
    """Every case, in report order."""
    out = [Case(f"w4a4_gemm-flux-g{g}", _w4a4_gemm(4608, 3072, 3072, g)) for g in (32, 64, 128)]
    out += [
        Case("w4a4_gemm-m16", _w4a4_gemm(16, 3072, 3072, 64)),
        Case("w4a4_quantize-flux", _w4a4_quantize(4608, 3072, 64)),
        Case("w4a16-flux", _w4a16(4608, 3072, 3072)),
        Case("w4a16-modulation", _w4a16(2, 3072, 9216)),
    ]
    shapes = {"sd15-s4096-d40": (2, 8, 4096, 4096, 40), "sd15-s1024-d80": (2, 8, 1024, 1024, 80),
              "sd15-s256-d160": (2, 8, 256, 256, 160), "sd15-s4096-kv77-d40": (2, 8, 4096, 77, 40),
              "sdxl-s4096-d64": (2, 10, 4096, 4096, 64), "pixart-s4096-d72": (2, 16, 4096, 4096, 72),
              "flux-s4608-d128": (1, 24, 4608, 4608, 128)}
    for precision in ("exact", "int8"):
        out += [Case(f"attention-{precision}-{name}", _attention(*shape, precision == "int8"))
                for name, shape in shapes.items()]
    out += [Case(f"linear_attention-d{d}", _linear_attention(2, 8, 4096, d)) for d in (40, 80, 160)]
    return out


# The CUDA extension's kernels (csrc/), compiled by nvcc when it is on PATH: one row per template instance.
CUDA_CASES = {"cuda:w4a4_gemm": "csrc/w4a4/w4a4_cuda.cu"}
_REPO = Path(__file__).resolve().parent.parent


def _cuda_rows(case: str, source: str, arch: int) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernels.cubin")
        subprocess.run(["nvcc", "-std=c++17", "-O3", f"-arch=sm_{arch}", "-cubin", "-I", str(_REPO / "csrc"),
                        "-o", cubin, str(_REPO / source)], check=True, capture_output=True, text=True)
        sass = _cuobjdump(cubin, "-sass")
        usage = _cuobjdump(cubin, "-res-usage")
    resources = {name: (int(regs), int(stack), int(shared)) for name, regs, stack, shared in
                 re.findall(r"Function (\S+):\s+REG:(\d+) STACK:(\d+) SHARED:(\d+)", usage)}
    demangle = shutil.which("cu++filt") or shutil.which("c++filt")
    rows = []
    for function in re.split(r"\n\s+Function : ", sass)[1:]:
        mangled = function.split("\n", 1)[0].strip()
        name = mangled
        if demangle:  # "void ns::(anonymous namespace)::kernel<__half, 64>(Args)" -> "kernel<fp16, 64>"
            readable = subprocess.run([demangle, mangled], capture_output=True, text=True).stdout.strip()
            name = re.sub(r"^.*::", "", readable.rsplit("(", 1)[0])
            name = name.replace("__nv_bfloat16", "bf16").replace("__half", "fp16")
        # Shared memory here is the static part; the dynamic part is set at launch.
        rows.append({"case": case, **_row(name, {}, *resources[mangled], function)})
    return rows


def report(arch: int, only: str | None = None) -> list[dict[str, Any]]:
    """Compile the selected cases for ``sm_<arch>`` and describe every kernel they launch; then the CUDA
    extension's kernels, if nvcc is on PATH."""
    rows = []
    for case in cases():
        if only and only not in case.name:
            continue
        for name, config, kernel in case.run(arch):
            rows.append({"case": case.name, **describe(name, config, kernel)})
    if shutil.which("nvcc"):
        for case, source in CUDA_CASES.items():
            if not only or only in case:
                rows += _cuda_rows(case, source, arch)
    return rows


def _versions() -> dict[str, str]:
    ptxas = subprocess.run([_nvidia_tool("ptxas"), "--version"], capture_output=True, text=True).stdout
    release = re.search(r"release ([\d.]+)", ptxas)
    return {"triton": triton.__version__, "torch": torch.__version__, "ptxas": release.group(1) if release else "?"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10: 80, 86, 89, 90 (default 90)")
    parser.add_argument("--only", help="only the cases whose name contains this")
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    args = parser.parse_args(argv)
    rows = report(args.arch, args.only)
    print(f"sm_{args.arch}, " + ", ".join(f"{k} {v}" for k, v in _versions().items()))
    print(f"{'case':34} {'kernel':30} {'regs':>4} {'stack':>5} {'smem':>6} {'loop':>5}  tensor-core ops / top")
    for r in rows:
        top = ", ".join(f"{op} {n}" for op, n in list(r["loop_top"].items())[:6])
        tc = " ".join(f"{op}x{n}" for op, n in r["loop_tensor_core"].items()) or "-"
        print(f"{r['case']:34} {r['kernel'][:30]:30} {r['registers']:4d} {r['stack_bytes']:5d} "
              f"{r['shared_bytes']:6d} {r['loop_instructions']:5d}  {tc} | {top}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"arch": args.arch, "versions": _versions(), "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
