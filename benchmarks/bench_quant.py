"""W4A4 model benchmark: a whole denoiser in 16/32-bit vs the same denoiser quantized by ``diffboost.quant``.

    python -m benchmarks.bench_quant [--models flux,sdxl,sd15] [--quick] [--out benchmarks/results]
                                     [--device auto|cuda|cpu] [--threads N]

One harness group per model, full size with random weights (offline presets), one denoiser call = one sampling
step (CFG batch 2 for the U-Nets):

* ``flux``: FLUX.1-dev-architecture transformer, bf16, 1024x1024 (4096 image + 512 text tokens), batch 1.
* ``sdxl``: SDXL U-Net, bf16, 1024x1024, batch 2.
* ``sd15``: SD 1.5 U-Net, bf16, 512x512, batch 2 (on a CPU: fp32 at 256x256). Its 3x3 convolutions, which stay
  16/32-bit, hold two thirds of the weights and most of the FLOPs.
* ``pixart``: PixArt-alpha transformer (a DiT: linear layers throughout), bf16, 1024x1024, batch 2 (on a CPU: fp32 at
  256x256).

Defaults: ``flux,sdxl`` on CUDA, ``sd15,pixart`` on a CPU (the smaller models end to end).

Rows: ``dense`` (the baseline: the model as built), ``w4a4`` (the same model after
``diffboost.quant.quantize(model, W4A4Config())``: group 64, rank 32, per-layer smoothing search, the modulation
projections weight-only, calibrated on four denoiser calls at the benchmark's resolution along a sampling
trajectory) and ``w4a16`` (``W4A4Config(weight_only=("*",))``: every quantized layer weight-only, on a freshly built
copy of the dense model). A quantized model replaces the dense one in place, so the dense row runs first. Each
row's metrics: ``weight_mib`` (parameters and buffers of the denoiser), ``peak_mem_mib`` (CUDA allocator peak over
one call, weights included), ``sqnr_db`` and ``cosine`` of the output against the dense output on the same input;
the quantized rows add ``quantize_s``, ``layers_quantized``, ``fraction_quantized`` and ``weight_reduction`` (dense
weight bytes / quantized weight bytes).

``--quick``: the tiny presets at 64x64 (for tests of this script; timings meaningless).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

from diffboost.quant import W4A4Config

from benchmarks.harness import (
    Case,
    add_common_arguments,
    finish,
    resolve_device,
    results_name,
    run_cases,
    save_rows,
)


@dataclasses.dataclass(frozen=True)
class Model:
    """One denoiser: its preset, the tiny stand-in for ``--quick``, batch and resolution per device."""

    preset: str
    quick_preset: str
    batch: int
    cuda_resolution: int
    cpu_resolution: int


MODELS = {
    "flux": Model("flux", "tiny-flux", 1, 1024, 512),
    "sdxl": Model("sdxl", "tiny-sdxl", 2, 1024, 512),
    "sd15": Model("sd15", "tiny-sd", 2, 512, 256),
    "pixart": Model("pixart", "tiny-pixart", 2, 1024, 256),
}
DEFAULT_MODELS = {"cuda": "flux,sdxl", "cpu": "sd15,pixart"}
CALIBRATION_TIMESTEPS = 4
QUICK_TIMING = {"warmup_ms": 1, "rep_ms": 1}
CPU_TIMING = {"warmup_ms": 1, "rep_ms": 20_000}
CUDA_TIMING = {"warmup_ms": 2_000, "rep_ms": 8_000}
PACKAGES = ("diffusers",)  # versions recorded with the results


class Subject:
    """The denoiser a group's cases share, its inputs, the dense reference output and the quantization report."""

    def __init__(self, preset: str, batch: int, resolution: int, dtype: torch.dtype, device: str) -> None:
        from diffboost.models import build_denoiser, example_denoiser_inputs

        self.preset, self.dtype, self.device = preset, dtype, device
        self.model = build_denoiser(preset, dtype=dtype, device=device).eval()
        self.inputs = example_denoiser_inputs(self.model, batch=batch, height=resolution, width=resolution, seed=0)
        self.resolution, self.batch = resolution, batch
        self.reference: torch.Tensor | None = None
        self.dense_weight_bytes: int | None = None
        self.report = None
        self.quantize_s: float | None = None

    def calibration(self) -> list[dict[str, Any]]:
        """Denoiser calls along a trajectory (other seed than the timed input), at the benchmark's resolution."""
        from diffboost.models import example_denoiser_inputs

        calls = []
        for i in range(CALIBRATION_TIMESTEPS):
            kwargs = example_denoiser_inputs(self.model, batch=self.batch, height=self.resolution,
                                             width=self.resolution, seed=1 + i)
            t = kwargs["timestep"]
            top = 1.0 if t.is_floating_point() else 999
            level = top * (1 - i / CALIBRATION_TIMESTEPS)
            kwargs["timestep"] = torch.full_like(t, level if t.is_floating_point() else round(level))
            calls.append(kwargs)
        return calls

    def dense(self):
        from diffboost.quant import module_bytes

        self.dense_weight_bytes = module_bytes(self.model)
        return self.call

    def quantized(self, config):
        import diffboost
        from diffboost.models import build_denoiser

        if self.report is not None:  # the model holds an earlier quantization: start again from the dense weights
            self.model = None
            if self.device == "cuda":
                torch.cuda.empty_cache()
            self.model = build_denoiser(self.preset, dtype=self.dtype, device=self.device).eval()
        start = time.perf_counter()
        reports = diffboost.quant.quantize(self.model, config, calibration=self.calibration(), progress=False)
        if self.device == "cuda":
            torch.cuda.synchronize()
        self.quantize_s = time.perf_counter() - start
        self.report = reports[""]
        return self.call

    def call(self) -> torch.Tensor:
        with torch.no_grad():
            return self.model(**self.inputs, return_dict=False)[0]

    def check(self, output: torch.Tensor) -> dict[str, float]:
        from diffboost.quant import module_bytes

        out = output.double()
        if self.reference is None:
            self.reference = out
        ref = self.reference
        noise = (out - ref).pow(2).sum().item()
        metrics = {
            "weight_mib": module_bytes(self.model) / 2**20,
            "cosine": torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0).item(),
        }
        if noise > 0:
            metrics["sqnr_db"] = 10 * math.log10(ref.pow(2).sum().item() / noise)
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.call()
            torch.cuda.synchronize()
            metrics["peak_mem_mib"] = torch.cuda.max_memory_allocated() / 2**20
        if self.report is not None:
            metrics.update(quantize_s=self.quantize_s, layers_quantized=len(self.report.layers),
                           fraction_quantized=self.report.fraction_quantized,
                           weight_reduction=self.dense_weight_bytes / module_bytes(self.model))
        return metrics


def build_cases(models: Sequence[str], quick: bool, device: str) -> list[Case]:
    """Per model: the dense baseline, then the quantized model (built lazily, in this order, by the harness)."""
    cases = []
    for key in models:
        model = MODELS[key]
        quick_cpu = quick and device == "cpu"
        preset = model.quick_preset if quick_cpu else model.preset
        resolution = 64 if quick_cpu else model.cuda_resolution if device == "cuda" else model.cpu_resolution
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        holder: dict[str, Subject] = {}

        def subject(preset=preset, batch=model.batch, resolution=resolution, dtype=dtype, holder=holder) -> Subject:
            if "subject" not in holder:
                holder["subject"] = Subject(preset, batch, resolution, dtype, device)
            return holder["subject"]

        common = dict(
            group=f"{key}-{preset}-{resolution}px-batch{model.batch}", device=device,
            dtype=str(dtype).removeprefix("torch."),
            shapes={"batch": model.batch, "resolution": resolution},
            check=lambda output, subject=subject: subject().check(output),
        )
        cases.append(Case(name="dense", make_fn=lambda s=subject: s().dense(), baseline=True,
                          params={"preset": preset, "impl": "diffusers"}, **common))
        for name, config in (("w4a4", W4A4Config()), ("w4a16", W4A4Config(weight_only=("*",)))):
            cases.append(Case(name=name, make_fn=lambda s=subject, c=config: s().quantized(c),
                              params={"preset": preset, "impl": "diffboost", "group_size": config.group_size,
                                      "rank": config.rank, "weight_only": list(config.weight_only)}, **common))
    return cases


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the process exit code."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_quant", description=__doc__.splitlines()[0])
    parser.add_argument("--models", help=f"comma-separated of {','.join(MODELS)} (default: flux,sdxl on CUDA, "
                                         "sd15,pixart on CPU)")
    add_common_arguments(parser, quick_help="the tiny presets at 64x64 on CPU, short timing on CUDA (for tests)")
    args = parser.parse_args(argv)
    device = resolve_device(parser, args)
    models = [m.strip() for m in (args.models or DEFAULT_MODELS[device]).split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown or not models:
        parser.error(f"unknown models {unknown}; choose from {', '.join(MODELS)}")
    if args.quick:
        timing = QUICK_TIMING if device == "cpu" else {k: v / 4 for k, v in CUDA_TIMING.items()}
    else:
        timing = CUDA_TIMING if device == "cuda" else CPU_TIMING
    rows, name = [], results_name("quant", models, DEFAULT_MODELS[device].split(","))
    for key in models:  # one model at a time: its float and quantized weights are freed before the next
        rows += run_cases(build_cases([key], args.quick, device), **timing)
        save_rows(rows, name, args, argv, script="bench_quant", packages=PACKAGES)
        if device == "cuda":
            torch.cuda.empty_cache()
    return finish(rows, name, args, argv, script="bench_quant", packages=PACKAGES)


if __name__ == "__main__":
    sys.exit(main())
