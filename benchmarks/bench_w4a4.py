"""W4A4 linear-layer benchmark: diffboost's W4A4 (and weight-only W4A16) kernels vs dense F.linear and torch._int_mm.

    python -m benchmarks.bench_w4a4 [--device auto|cuda|cpu] [--quick] [--threads N] [--out benchmarks/results]

Each shape is one layer ``y = x W^T + b`` with ``x [M, K]``, ``W [N, K]`` and is a harness group whose baseline is
the fastest dense ``F.linear`` measured in the same run (fp32 and bf16 on CPU, bf16 cuBLAS on CUDA). Rows:

``linear-fp32``/``linear-bf16``  ``F.linear`` on the dense layer (the baselines).
``int_mm-int8``                 ``torch._int_mm`` on pre-quantized INT8 operands: the INT8 GEMM alone, no activation
                                quantization or scaling (an upper bound for an INT8 layer).
``w4a4-<backend>``               :class:`diffboost.quant.W4A4Linear` (group 64, smoothing, rank-32 branch, bias):
                                the whole layer, activation quantization included.
``w4a4-gemm-<backend>``          the W4A4 GEMM alone on pre-quantized activations.
``w4a16-<backend>``              :class:`diffboost.quant.W4A16Linear` (weight-only, group 64, bias): on the GEMM
                                shapes, the alternative to W4A4 where INT4 tensor cores are missing; on the
                                ``modulation`` shapes (adaLN projections, one row per sample, bound by reading the
                                weight) the default for those layers (``gbps`` counts the weight bytes read).

The layer is built from a random ``nn.Linear`` with :meth:`W4A4Linear.from_linear`; each row's ``sqnr_db`` is the
SQNR of its output against the dense layer in fp64 on the same Gaussian input (quantization error plus kernel error).
FLOPs count the main GEMM, ``2 M N K``. Shapes: CPU M=4096, K=N=3072 and M=1024, K=N=1280 (``--quick``: tiny ones,
for tests); CUDA the FLUX (M=4608, K=3072, N=3072/12288) and SDXL (M=4096, K=N=640/1280) layers. Modulation
shapes: FLUX's double- and single-block adaLN projections at batch 2 (K=3072, N=18432/9216); CPU one of them.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import time
from collections.abc import Sequence
from typing import Any, Callable

import torch
import torch.nn.functional as F

from benchmarks.harness import Case, SkipCase, add_common_arguments, finish, resolve_device, run_cases

GROUP_SIZE = 64
RANK = 32


@dataclasses.dataclass(frozen=True)
class Shape:
    """One linear layer: tokens M, in_features K, out_features N."""

    family: str
    M: int
    K: int
    N: int
    weight_only: bool = False  # a modulation layer: dense vs W4A16 rows

    @property
    def name(self) -> str:
        return f"{self.family}-m{self.M}-k{self.K}-n{self.N}"

    @property
    def flops(self) -> int:
        return 2 * self.M * self.N * self.K


CPU_SHAPES = (Shape("flux", 4096, 3072, 3072), Shape("sdxl", 1024, 1280, 1280),
              Shape("flux-modulation", 2, 3072, 9216, weight_only=True))
CPU_QUICK_SHAPES = (Shape("quick", 128, 256, 192), Shape("quick", 77, 128, 320),
                    Shape("quick-modulation", 2, 256, 384, weight_only=True))
CUDA_SHAPES = (Shape("flux", 4608, 3072, 3072), Shape("flux", 4608, 3072, 12288),
               Shape("sdxl", 4096, 640, 640), Shape("sdxl", 4096, 1280, 1280),
               Shape("flux-modulation", 2, 3072, 18432, weight_only=True),
               Shape("flux-modulation", 2, 3072, 9216, weight_only=True))


@functools.lru_cache(maxsize=1)
def make_layer(shape: Shape, device: str) -> dict[str, Any]:
    """The dense layer, its W4A4 (or W4A16) form and a Gaussian input for one shape (cached for the group being
    timed)."""
    from diffboost.quant import W4A4Linear, W4A16Linear, smooth_factors

    generator = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(shape.K, shape.N)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(shape.N, shape.K, generator=generator) / shape.K**0.5)
        linear.bias.copy_(torch.randn(shape.N, generator=generator) * 0.1)
    x = torch.randn(shape.M, shape.K, generator=generator)
    layers = {"w4a16": W4A16Linear.from_linear(linear, GROUP_SIZE).to(device)}
    if not shape.weight_only:
        smooth = smooth_factors(x.abs().amax(0), linear.weight)
        layers["w4a4"] = W4A4Linear.from_linear(linear, GROUP_SIZE, RANK, smooth=smooth).to(device)
    ref = (x.double() @ linear.weight.double().t() + linear.bias.double()).to(device)
    return {"linear": linear.to(device), **layers, "x": x.to(device), "ref": ref}


def sqnr(out: torch.Tensor, *_inputs: Any, ref: torch.Tensor) -> dict[str, float]:
    """SQNR in dB of a layer output against the dense fp64 result."""
    err = (out.double() - ref).pow(2).sum()
    return {"sqnr_db": (10 * torch.log10(ref.pow(2).sum() / err)).item()}


def dense_inputs(shape: Shape, device: str, dtype: torch.dtype):
    layer = make_layer(shape, device)
    return layer["x"].to(dtype), layer["linear"].weight.detach().to(dtype), layer["linear"].bias.detach().to(dtype)


def int8_inputs(shape: Shape, device: str):
    generator = torch.Generator(device=device).manual_seed(1)
    a = torch.randint(-127, 128, (shape.M, shape.K), dtype=torch.int8, device=device, generator=generator)
    b = torch.randint(-127, 128, (shape.K, shape.N), dtype=torch.int8, device=device, generator=generator)
    return a, b.t().contiguous().t()  # column-major B, the layout _int_mm's fast paths want


#: A peer whose one call would take longer than this (estimated on a slice of the rows) is not timed: on CPUs
#: without the instructions it is built for (AVX-512 VNNI / BF16), torch falls back to reference loops.
MAX_CALL_SECONDS = 30.0
PROBE_ROWS = 64


def _skip_if_too_slow(fn: Callable[..., torch.Tensor], x: torch.Tensor, *rest: Any) -> None:
    """Time ``fn`` on the first PROBE_ROWS rows of ``x`` and skip the case if a full call would exceed the limit."""
    if x.device.type != "cpu" or x.shape[0] <= PROBE_ROWS:
        return
    probe = x[:PROBE_ROWS].contiguous()
    fn(probe, *rest)
    start = time.perf_counter()
    fn(probe, *rest)
    estimate = (time.perf_counter() - start) * x.shape[0] / PROBE_ROWS
    if estimate > MAX_CALL_SECONDS:
        raise SkipCase(f"not timed: one call would take ~{estimate:.0f} s here (probe on {PROBE_ROWS} rows); this "
                       "CPU lacks the instructions torch's fast path for it needs")


def make_dense(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> Callable[[], torch.Tensor]:
    _skip_if_too_slow(F.linear, x, weight, bias)
    return functools.partial(F.linear, x, weight, bias)


def make_int_mm(a: torch.Tensor, b: torch.Tensor) -> Callable[[], torch.Tensor]:
    try:
        _skip_if_too_slow(torch._int_mm, a, b)
    except RuntimeError as exc:
        raise SkipCase(f"torch._int_mm refused: {str(exc).splitlines()[0]}") from exc
    return functools.partial(torch._int_mm, a, b)


def layer_inputs(shape: Shape, device: str, dtype: torch.dtype):
    layer = make_layer(shape, device)
    return (layer["x"].to(dtype),)


def make_quantized(shape: Shape, device: str, scheme: str, backend: str, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    from diffboost.ops import BackendUnavailableError

    layer = make_layer(shape, device)[scheme]
    call = functools.partial(_forward, layer, backend, x)
    try:
        call()
    except BackendUnavailableError as exc:
        raise SkipCase(str(exc)) from exc
    return call


def _forward(layer, backend: str, x: torch.Tensor) -> torch.Tensor:
    layer.backend = backend
    return layer(x)


def make_w4a4_gemm(shape: Shape, device: str, backend: str, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    from diffboost.ops import BackendUnavailableError, w4a4_gemm, w4a4_quantize_act

    w = make_layer(shape, device)["w4a4"].weights
    qx, ascales, lr = w4a4_quantize_act(x, GROUP_SIZE, w.smooth, w.lora_down)
    call = functools.partial(w4a4_gemm, qx, ascales, w.qweight, w.wscales, lora_act=lr, lora_up=w.lora_up,
                             bias=w.bias, out_dtype=x.dtype, backend=backend)
    try:
        call()
    except BackendUnavailableError as exc:
        raise SkipCase(str(exc)) from exc
    return call


def build_cases(shapes: Sequence[Shape], device: str) -> list[Case]:
    """Dense baselines, the INT8 peer and diffboost's W4A4 backends for each shape (dense and W4A16 for the
    modulation shapes)."""
    dense_dtypes = (torch.float32, torch.bfloat16) if device == "cpu" else (torch.bfloat16,)
    w4a4_dtypes = (torch.float32, torch.bfloat16) if device == "cpu" else (torch.bfloat16,)
    backends = ("cpu",) if device == "cpu" else ("cuda", "triton")
    cases = []
    for shape in shapes:
        common: dict[str, Any] = {"group": shape.name, "flops": shape.flops, "device": device,
                                  "shapes": {"M": shape.M, "K": shape.K, "N": shape.N}}

        def check(out, *inputs, _shape=shape):
            return sqnr(out, ref=make_layer(_shape, device)["ref"])

        for dtype in dense_dtypes:
            name = str(dtype).removeprefix("torch.")
            weight_bytes = shape.N * shape.K * dtype.itemsize if shape.weight_only else None
            cases.append(Case(name=f"linear-{'fp32' if dtype == torch.float32 else 'bf16'}", make_fn=make_dense,
                              inputs=functools.partial(dense_inputs, shape, device, dtype), baseline=True,
                              dtype=name, check=check, params={"impl": "torch.F.linear"}, bytes=weight_bytes,
                              **common))
        # The W4A16 op: Triton on GPUs (bf16); on a CPU the C++ backend (fp32 and bf16): the weight dequantized in
        # registers for the few rows of a modulation layer, dequantized once + torch's fp32 GEMM for many rows.
        weight_bytes = shape.N * shape.K // 2 + 2 * shape.N * shape.K // GROUP_SIZE if shape.weight_only else None
        for dtype in (torch.bfloat16,) if device == "cuda" else (torch.float32, torch.bfloat16):
            suffix = "" if device == "cuda" else f"-{'fp32' if dtype == torch.float32 else 'bf16'}"
            backend = "triton" if device == "cuda" else "cpu"
            cases.append(Case(name=f"w4a16-{backend}{suffix}", dtype=str(dtype).removeprefix("torch."),
                              inputs=functools.partial(layer_inputs, shape, device, dtype), check=check,
                              make_fn=functools.partial(make_quantized, shape, device, "w4a16", backend),
                              bytes=weight_bytes, params={"impl": "diffboost", "backend": backend,
                                                          "group_size": GROUP_SIZE}, **common))
        if shape.weight_only:
            continue
        cases.append(Case(name="int_mm-int8", make_fn=make_int_mm, inputs=functools.partial(int8_inputs, shape, device),
                          dtype="int8", params={"impl": "torch._int_mm", "note": "INT8 GEMM only"}, **common))
        for backend in backends:
            for dtype in w4a4_dtypes:
                suffix = "" if len(w4a4_dtypes) == 1 else f"-{'fp32' if dtype == torch.float32 else 'bf16'}"
                params = {"impl": "diffboost", "backend": backend, "group_size": GROUP_SIZE, "rank": RANK}
                inputs = functools.partial(layer_inputs, shape, device, dtype)
                dtype_name = str(dtype).removeprefix("torch.")
                cases.append(Case(name=f"w4a4-{backend}{suffix}", inputs=inputs, dtype=dtype_name, check=check,
                                  make_fn=functools.partial(make_quantized, shape, device, "w4a4", backend),
                                  params=params,
                                  **common))
                cases.append(Case(name=f"w4a4-gemm-{backend}{suffix}", inputs=inputs, dtype=dtype_name, check=check,
                                  make_fn=functools.partial(make_w4a4_gemm, shape, device, backend),
                                  params={**params, "note": "pre-quantized activations"}, **common))
    return cases


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the process exit code."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_w4a4", description=__doc__.splitlines()[0])
    add_common_arguments(parser, quick_help="short timing; on CPU also tiny shapes (for tests)")
    args = parser.parse_args(argv)
    device = resolve_device(parser, args)
    if device == "cuda":
        shapes = CUDA_SHAPES
    else:
        shapes = CPU_QUICK_SHAPES if args.quick else CPU_SHAPES
    timing = {"warmup_ms": 10, "rep_ms": 30} if args.quick else {"warmup_ms": 200, "rep_ms": 5000}
    rows = run_cases(build_cases(shapes, device), **timing)
    return finish(rows, "w4a4", args, argv, script="bench_w4a4")


if __name__ == "__main__":
    sys.exit(main())
