"""Linear attention benchmark: diffboost's Triton kernel vs torch SDPA (every backend) at long sequences.

    python -m benchmarks.bench_linear_attention [--dtype bf16|fp16] [--dims 40,80,160,64] [--quick] [--e2e]
                                                [--out benchmarks/results] [--device auto|cuda|cpu] [--threads N]

Self-attention shapes of SD 1.5 (8 heads, head dims 40/80/160) and SDXL (10 heads, head dim 64) at N = 4096,
16384 and 65536 tokens (a 512, 1024 and 2048 px SD 1.5 image at its top resolution), batch 2 (classifier-free
guidance). Every shape is a harness group whose baseline is the fastest SDPA backend of the same run; beside it run
diffboost's linear attention and the same formula in plain PyTorch (``torch-linear``, what LinFusion runs). Note the
comparison is of different functions: linear attention replaces softmax attention only after distillation.

Columns: median time and spread; on CUDA ``peak_extra_mib``, the peak memory a call allocates beyond its inputs
(output included); ``scaling_x4``, this row's time over the same implementation's at N / 4 (linear scaling gives
about 4, quadratic 16); for diffboost and torch-linear rows, the error against the fp32 linear-attention reference.
``--e2e`` adds a full U-Net call (SD 1.5 architecture, random weights, 2048 px; the tiny preset on CPU) with its
self-attentions as they are vs patched with linear attention.

Without CUDA only ``--quick`` runs (two heads, N = 128/512/2048, the reference backend), so the script can be tested
end to end on a CPU; on CUDA ``--quick`` keeps the real shapes and shortens timing.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel

# The linear-attention op has the same two backends: "triton" on CUDA, "reference" on CPU.
from benchmarks.bench_attention import DTYPES, MATH_MAX_SCORES, SDPA_BACKENDS, diffboost_backend, make_sdpa
from benchmarks.harness import Case, SkipCase, add_common_arguments, finish, resolve_device, run_cases

HEADS_AND_DIMS = ((8, 40), (8, 80), (8, 160), (10, 64))
LENGTHS = (4096, 16384, 65536)
QUICK_CPU_LENGTHS = (128, 512, 2048)
E2E_RESOLUTION = 2048


@dataclasses.dataclass(frozen=True)
class Shape:
    """One self-attention call: batch, heads, tokens, head dim."""

    B: int
    H: int
    N: int
    D: int

    @property
    def name(self) -> str:
        """Group name, e.g. ``h8-d40-n4096``."""
        return f"h{self.H}-d{self.D}-n{self.N}"

    @property
    def sdpa_flops(self) -> int:
        """Softmax attention: ``Q K^T`` and ``P V``, 2 N^2 D each."""
        return 4 * self.B * self.H * self.N * self.N * self.D

    @property
    def linear_flops(self) -> int:
        """Linear attention: ``phi(K)^T V`` and ``phi(Q) S``, 2 N D^2 each."""
        return 4 * self.B * self.H * self.N * self.D * self.D

    def dims(self) -> dict[str, int]:
        """The dimensions as recorded in a row's ``shapes``."""
        return {"B": self.B, "H": self.H, "N": self.N, "D": self.D}


def shapes_for(quick_cpu: bool, dims: Sequence[int] | None = None) -> list[Shape]:
    """Real shapes, or CPU-sized ones (batch 1, two heads, short sequences) keeping the head dims; ``dims`` selects
    head dims (all by default)."""
    configs = [(h, d) for h, d in HEADS_AND_DIMS if dims is None or d in dims]
    if quick_cpu:
        return [Shape(1, 2, n, d) for _, d in configs for n in QUICK_CPU_LENGTHS]
    return [Shape(2, h, n, d) for h, d in configs for n in LENGTHS]


@functools.lru_cache(maxsize=1)
def make_inputs(shape: Shape, dtype: torch.dtype, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded q, k, v in diffusers' strided layout (``(B, N, H, D)`` transposed); cached for the current group."""
    generator = torch.Generator(device=device).manual_seed(0)

    def one() -> torch.Tensor:
        x = torch.randn(shape.B, shape.N, shape.H, shape.D, generator=generator, device=device, dtype=dtype)
        return x.transpose(1, 2)

    return one(), one(), one()


@functools.lru_cache(maxsize=1)
def reference_linear(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The fp32 linear-attention reference on the same inputs (cached per group)."""
    from diffboost.ops.linear_attention import linear_attention_reference

    return linear_attention_reference(q.float(), k.float(), v.float())


def torch_linear(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The LinFusion formula in plain PyTorch, in the input dtype (LinFusion's own implementation)."""
    q, k = F.elu(q) + 1.0, F.elu(k) + 1.0
    n = k.shape[2]
    z = q @ k.mean(dim=2, keepdim=True).transpose(-1, -2) + 1e-4
    state = (k.transpose(-1, -2) * n**-0.5) @ (v * n**-0.5)
    return q @ state / z


def linear_accuracy(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> dict[str, float]:
    """Max abs error and cosine similarity against the fp32 linear-attention reference."""
    ref = reference_linear(q, k, v)
    cos = F.cosine_similarity(out.double().flatten(), ref.double().flatten(), dim=0)
    return {"max_abs_err": (out.float() - ref).abs().max().item(), "cos_sim": cos.item()}


def with_peak_memory(make: Callable[..., Callable[[], Any]], memory: dict[str, float], *args: Any):
    """``make(*args)``, and on CUDA the peak memory one call allocates beyond what is already allocated."""
    call = make(*args)
    if torch.cuda.is_available() and any(isinstance(a, torch.Tensor) and a.is_cuda for a in args):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = call()
        torch.cuda.synchronize()
        memory["peak_extra_mib"] = (torch.cuda.max_memory_allocated() - before) / 2**20
        del out
    return call


def memory_metrics(memory: dict[str, float], check: Callable[..., dict[str, float]] | None = None):
    """A harness ``check`` that reports the measured memory (and ``check``'s metrics)."""

    def metrics(out: Any, *args: Any) -> dict[str, float]:
        return {**memory, **(check(out, *args) if check is not None else {})}

    return metrics


def make_torch_linear(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Callable[[], torch.Tensor]:
    """The :func:`torch_linear` call on these inputs."""
    return functools.partial(torch_linear, q, k, v)


def make_diffboost(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Callable[[], torch.Tensor]:
    """``diffboost.ops.linear_attention`` with its backend forced: Triton on CUDA, the reference on CPU."""
    from diffboost.ops import BackendUnavailableError
    from diffboost.ops.linear_attention import linear_attention

    call = functools.partial(linear_attention, q, k, v, backend=diffboost_backend(q.device.type))
    try:
        call()
    except BackendUnavailableError as exc:
        raise SkipCase(str(exc)) from exc
    return call


def build_cases(shapes: Sequence[Shape], dtype: torch.dtype, device: str) -> list[Case]:
    """Per shape: every SDPA backend (baseline candidates), diffboost's linear attention, torch-linear."""
    cases = []
    for shape in shapes:
        common: dict[str, Any] = {
            "group": shape.name,
            "inputs": functools.partial(make_inputs, shape, dtype, device),
            "shapes": shape.dims(),
            "dtype": str(dtype).removeprefix("torch."),
            "device": device,
        }
        for backend, enum in SDPA_BACKENDS.items():
            too_big = backend == "math" and shape.N * shape.N > MATH_MAX_SCORES
            memory: dict[str, float] = {}
            sdpa = functools.partial(make_sdpa, backend)
            cases.append(Case(
                name=f"sdpa-{backend}", make_fn=functools.partial(with_peak_memory, sdpa, memory),
                check=memory_metrics(memory), baseline=True, flops=shape.sdpa_flops,
                context=functools.partial(sdpa_kernel, enum), params={"impl": "torch.sdpa", "backend": backend},
                skip=f"math backend not timed above N*N={MATH_MAX_SCORES}" if too_big else None, **common))
        memory = {}
        cases.append(Case(
            name="diffboost-linear", make_fn=functools.partial(with_peak_memory, make_diffboost, memory),
            check=memory_metrics(memory, linear_accuracy), flops=shape.linear_flops,
            params={"impl": "diffboost", "backend": diffboost_backend(device)}, **common))
        memory = {}
        cases.append(Case(
            name="torch-linear", make_fn=functools.partial(with_peak_memory, make_torch_linear, memory),
            check=memory_metrics(memory, linear_accuracy), flops=shape.linear_flops,
            params={"impl": "torch", "formula": "LinFusion"}, **common))
    return cases


def build_e2e_cases(dtype: torch.dtype, device: str) -> list[Case]:
    """One U-Net call with softmax self-attention (baseline) and patched with linear attention."""
    from diffboost.models import build_denoiser, example_denoiser_inputs

    preset, resolution = ("sd15", E2E_RESOLUTION) if device == "cuda" else ("tiny-sd", 128)
    model_dtype = dtype if device == "cuda" else torch.float32
    group = f"e2e-{preset}-unet-{resolution}px"

    @functools.lru_cache(maxsize=1)
    def unet_and_inputs():
        unet = build_denoiser(preset, dtype=model_dtype, device=device)
        return unet, example_denoiser_inputs(unet, batch=2, height=resolution, width=resolution)

    def make(linear: bool):
        import diffboost
        from diffboost.integrations.linear_attention import LinearAttentionConfig

        unet, kwargs = unet_and_inputs()
        diffboost.unpatch(unet)
        if linear:
            diffboost.patch(unet, linear_attention=LinearAttentionConfig(backend=diffboost_backend(device)))

        @torch.no_grad()
        def call():
            return unet(**kwargs).sample

        return call

    common = {"group": group, "inputs": tuple, "device": device, "dtype": str(model_dtype).removeprefix("torch."),
              "shapes": {"preset": preset, "resolution": resolution, "batch": 2}}
    return [
        Case(name="unet-softmax", make_fn=lambda: make(False), baseline=True, params={"attention": "as built"},
             **common),
        Case(name="unet-linear-diffboost", make_fn=lambda: make(True),
             params={"attention": "linear_attention (undistilled weights)"}, **common),
    ]


def add_scaling(rows: list[dict[str, Any]]) -> None:
    """``metrics["scaling_x4"]``: median time over the same implementation's median at N / 4."""
    timed = {(row["name"], row["shapes"]["H"], row["shapes"]["D"], row["shapes"]["N"]): row["median_ms"]
             for row in rows if row["status"] == "ok" and "N" in (row["shapes"] or {})}
    for row in rows:
        if row["status"] != "ok" or "N" not in (row["shapes"] or {}):
            continue
        s = row["shapes"]
        smaller = timed.get((row["name"], s["H"], s["D"], s["N"] // 4))
        if smaller:
            row["metrics"]["scaling_x4"] = row["median_ms"] / smaller


def scaling_summary(rows: Sequence[dict[str, Any]]) -> list[str]:
    """One line per implementation and head config: the log-log slope of time vs N (1 = linear, 2 = quadratic)."""
    series: dict[tuple[str, int, int], list[tuple[int, float]]] = {}
    for row in rows:
        if row["status"] == "ok" and "N" in (row["shapes"] or {}):
            s = row["shapes"]
            series.setdefault((row["name"], s["H"], s["D"]), []).append((s["N"], row["median_ms"]))
    lines = []
    for (name, h, d), points in sorted(series.items()):
        if len(points) < 2:
            continue
        xs = [math.log(n) for n, _ in points]
        ys = [math.log(t) for _, t in points]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
        lines.append(f"{name:18s} h{h} d{d}: time ~ N^{slope:.2f} over N = {', '.join(str(n) for n, _ in points)}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the process exit code."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_linear_attention",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    known = ",".join(str(d) for _, d in HEADS_AND_DIMS)
    parser.add_argument("--dims", default=known, help=f"comma-separated head dims among {known}")
    parser.add_argument("--e2e", action="store_true", help="also time a whole U-Net call with and without")
    add_common_arguments(parser, quick_help="short timing; without CUDA also tiny shapes (the only mode that runs on CPU)")
    args = parser.parse_args(argv)
    device = resolve_device(parser, args, cpu_needs_quick="the full shapes")

    try:
        dims = [int(d) for d in args.dims.split(",") if d.strip()]
    except ValueError:
        dims = []
    if not dims or any(d not in [hd for _, hd in HEADS_AND_DIMS] for d in dims):
        parser.error(f"--dims {args.dims!r}: choose among {known}")
    dtype = DTYPES[args.dtype]
    cases = build_cases(shapes_for(device == "cpu", dims), dtype, device)
    if args.e2e:
        cases += build_e2e_cases(dtype, device)
    timing = {"warmup_ms": 10, "rep_ms": 30} if args.quick else {"warmup_ms": 25, "rep_ms": 100}
    rows = run_cases(cases, **timing)
    add_scaling(rows)
    print("scaling (log-log slope of median time vs N):")
    for line in scaling_summary(rows):
        print("  " + line)
    print()
    return finish(rows, "linear-attention", args, argv, script="bench_linear_attention", packages=("diffusers",))


if __name__ == "__main__":
    sys.exit(main())
