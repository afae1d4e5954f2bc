"""Step-cached execution benchmark: time per image of whole pipelines, uncached vs diffboost's caches vs DeepCache.

    python -m benchmarks.bench_cache [--models sd15,sdxl,flux] [--quick] [--out benchmarks/results]
                                     [--device auto|cuda|cpu] [--threads N] [--compile [BACKEND]]

One harness group per model, each a whole text-to-image pipeline with random weights (offline presets), batch 1:

* ``sd15``: SD 1.5 architecture, bf16, 512x512, 50 DDIM steps, CFG 7.5: uncached (the baseline), diffboost DeepCache
  at interval 3 / branch 0 and interval 5 / branch 0, encoder propagation (Faster Diffusion's key steps, step by
  step and with the parallel decoder), and the ``DeepCache`` package (0.1.1, ``DeepCacheSDHelper``) at the same two
  settings in the same run (a skipped row when it is not installed).
* ``sdxl``: the same at 1024x1024.
* ``flux``: FLUX.1-dev architecture, bf16, 1024x1024, 28 flow-matching Euler steps: uncached vs block caching
  (uniform interval 2 and 3, first_block threshold 0.1; the decisions of the latter depend on the weights, which
  are random here).

Each row carries ``macs_skipped`` (diffboost's counted fraction, :func:`diffboost.cache.stats`), the steps run
fully / partially, fidelity to the uncached image of the same seed (``psnr_db``, ``max_abs_diff``; images in
[0, 1]) and, on CUDA, ``peak_mem_gib``. Everything in a group shares one pipeline; the cases patch and unpatch it.

``--compile`` runs every case with the denoiser under ``torch.compile`` (whole, default mode; Inductor unless a
backend is named), compiled before patching as a user would; the untimed first call of each case compiles it (Dynamo's
cache is reset between cases, so no case inherits another's graphs). The ``DeepCache`` package rows are skipped
then: it patches the U-Net's methods and does not look inside a compiled wrapper. Results go to their own file
(``cache-compile...``).

``--quick`` on a CPU runs the same cases on the tiny presets (8 steps, float32) in well under a minute; on CUDA it
keeps the real models and shortens the timing.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from collections.abc import Sequence
from typing import Any, Callable

import torch

from benchmarks.harness import (
    Case,
    SkipCase,
    add_common_arguments,
    finish,
    resolve_device,
    results_name,
    run_cases,
    save_rows,
)

DEEPCACHE_PACKAGE = "DeepCache"


@dataclasses.dataclass(frozen=True)
class Model:
    """One pipeline to benchmark: preset, steps and the tiny preset standing in for it with ``--quick`` on CPU."""

    preset: str
    quick_preset: str
    steps: int
    unet: bool
    # (warmup_ms, rep_ms) on CUDA, for triton's do_bench (which also makes 5 estimating calls): a few whole
    # pipeline calls per case, so that one group (--models one at a time) runs in well under 10 minutes on an H100
    cuda_timing: tuple[float, float]


MODELS = {
    "sd15": Model("sd15", "tiny-sd", 50, unet=True, cuda_timing=(3_000, 8_000)),
    "sdxl": Model("sdxl", "tiny-sdxl", 50, unet=True, cuda_timing=(6_000, 15_000)),
    "flux": Model("flux", "tiny-flux", 28, unet=False, cuda_timing=(8_000, 20_000)),
}
DEFAULT_MODELS = tuple(MODELS)
QUICK_STEPS = 8
CPU_QUICK_TIMING = {"warmup_ms": 1, "rep_ms": 1}  # one warm-up call and the harness's minimum of 5 timed calls


def _cache_configs(unet: bool) -> list[tuple[str, Any]]:
    """(case name, value for ``diffboost.patch(cache=...)``) of one group."""
    from diffboost.cache import BlockCacheConfig, DeepCacheConfig, EncoderPropagationConfig

    if unet:
        return [
            ("diffboost-deepcache-i3-b0", DeepCacheConfig(interval=3, branch=0)),
            ("diffboost-deepcache-i5-b0", DeepCacheConfig(interval=5, branch=0)),
            ("diffboost-encoder-propagation", EncoderPropagationConfig()),
            ("diffboost-encoder-propagation-parallel", EncoderPropagationConfig(parallel_decoder=True)),
        ]
    return [
        ("diffboost-block-uniform-i2", BlockCacheConfig(mode="uniform", interval=2)),
        ("diffboost-block-uniform-i3", BlockCacheConfig(mode="uniform", interval=3)),
        ("diffboost-block-first-block-t0.1", BlockCacheConfig(mode="first_block", threshold=0.1)),
    ]


class Group:
    """The pipeline one group's cases share, the uncached reference image, and how to undo the current patch."""

    def __init__(self, preset: str, steps: int, dtype: torch.dtype, device: str, compile_backend: str | None) -> None:
        self.preset, self.steps, self.dtype, self.device = preset, steps, dtype, device
        self.compile_backend = compile_backend
        self._pipe = None
        self.undo: Callable[[], None] | None = None
        self.reference: torch.Tensor | None = None
        self.cached = False  # whether the current case is a diffboost cache (its stats are recorded)

    def pipe(self):
        if self._pipe is None:
            from diffboost.models import build_pipeline

            self._pipe = build_pipeline(self.preset, dtype=self.dtype, device=self.device)
            if self.compile_backend is not None:
                role = "unet" if hasattr(self._pipe, "unet") else "transformer"
                setattr(self._pipe, role, torch.compile(getattr(self._pipe, role), backend=self.compile_backend))
        return self._pipe

    def prepare(self, apply: Callable[[Any], Callable[[], None] | None], cached: bool) -> Callable[[], torch.Tensor]:
        """Undo the previous case's patch, apply this case's, and return the timed call (one image)."""
        if self.undo is not None:
            self.undo()
            self.undo = None
        if self.compile_backend is not None:
            torch._dynamo.reset()  # this case compiles its own graphs in its untimed first call
        pipe = self.pipe()
        self.undo = apply(pipe)
        self.cached = cached
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        return self.generate

    def generate(self) -> torch.Tensor:
        from diffboost.models import example_inputs

        pipe = self.pipe()
        return pipe(**example_inputs(pipe, steps=self.steps, seed=0)).images  # same seed: comparable images

    def check(self, output: torch.Tensor) -> dict[str, float]:
        """Fidelity to the uncached image (the first case's output), the cache's counts, peak memory."""
        metrics: dict[str, float] = {}
        image = output.float()
        if self.reference is None:
            self.reference = image
        diff = image - self.reference
        metrics["max_abs_diff"] = diff.abs().max().item()
        mse = diff.square().mean().item()
        if mse > 0:
            metrics["psnr_db"] = 10 * math.log10(1.0 / mse)
        if self.cached:
            from diffboost.cache import stats

            s = stats(self.pipe())
            metrics.update(macs_skipped=s.macs_skipped_fraction or 0.0, full_steps=s.full_steps,
                           partial_steps=s.partial_steps)
        if self.device == "cuda":
            metrics["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        return metrics


def apply_nothing(pipe) -> None:
    return None


def apply_diffboost(config: Any) -> Callable[[Any], Callable[[], None]]:
    def apply(pipe):
        import diffboost

        diffboost.patch(pipe, cache=config)
        return lambda: diffboost.unpatch(pipe)

    return apply


def apply_deepcache_package(interval: int, branch: int) -> Callable[[Any], Callable[[], None]]:
    """The ``DeepCache`` package's helper at the same settings; a skipped row when it is not installed."""

    def apply(pipe):
        if isinstance(pipe.unet, torch._dynamo.eval_frame.OptimizedModule):
            raise SkipCase(f"{DEEPCACHE_PACKAGE} patches the U-Net's methods, not inside a torch.compile wrapper")
        try:
            from DeepCache import DeepCacheSDHelper
        except ImportError as exc:
            raise SkipCase(f"{DEEPCACHE_PACKAGE} not installed ({exc})") from exc
        helper = DeepCacheSDHelper(pipe=pipe)
        helper.set_params(cache_interval=interval, cache_branch_id=branch)
        helper.enable()
        return helper.disable

    return apply


def build_cases(models: Sequence[str], quick_cpu: bool, dtype: torch.dtype, device: str,
                compile_backend: str | None = None) -> list[tuple[Model, list[Case]]]:
    """The cases of each model's group, uncached first (its image is every other row's fidelity reference);
    ``compile_backend``: run the denoiser under ``torch.compile`` with this backend."""
    groups = []
    for key in models:
        model = MODELS[key]
        preset = model.quick_preset if quick_cpu else model.preset
        steps = QUICK_STEPS if quick_cpu else model.steps
        group = Group(preset, steps, dtype, device, compile_backend)
        resolution = 64 if quick_cpu else 1024 if key in ("sdxl", "flux") else 512
        name = f"{key}-{preset}-{resolution}px-{steps}steps"
        common = dict(group=name, device=device, dtype=str(dtype).removeprefix("torch."),
                      shapes={"batch": 1, "resolution": resolution, "steps": steps},
                      check=lambda output, group=group: group.check(output))

        def case(label: str, apply, cached: bool, params: dict[str, Any], baseline: bool = False) -> Case:
            def make_fn(apply=apply, cached=cached, group=group):
                return group.prepare(apply, cached)

            if compile_backend is not None:
                params = {**params, "compile": compile_backend}
            return Case(name=label, make_fn=make_fn, baseline=baseline, params={"preset": preset, **params}, **common)

        cases = [case("uncached", apply_nothing, False, {"impl": "diffusers"}, baseline=True)]
        for label, config in _cache_configs(model.unet):
            cases.append(case(label, apply_diffboost(config), True, {"impl": "diffboost", "cache": repr(config)}))
        if model.unet:
            for interval in (3, 5):
                cases.append(case(f"{DEEPCACHE_PACKAGE}-i{interval}-b0", apply_deepcache_package(interval, 0), False,
                                  {"impl": DEEPCACHE_PACKAGE, "cache_interval": interval, "cache_branch_id": 0}))
        groups.append((model, cases))
    return groups


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the process exit code."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_cache", description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated of sd15,sdxl,flux")
    parser.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                        help="run the denoiser under torch.compile (default backend: inductor)")
    add_common_arguments(
        parser, quick_help="short timing; without CUDA also the tiny presets (the only mode that runs on CPU)"
    )
    args = parser.parse_args(argv)
    device = resolve_device(parser, args, cpu_needs_quick="the full-size pipelines")
    models = [name.strip() for name in args.models.split(",") if name.strip()]
    unknown = [name for name in models if name not in MODELS]
    if unknown or not models:
        parser.error(f"unknown models {unknown}; choose from {', '.join(MODELS)}")

    quick_cpu = device == "cpu"
    dtype = torch.float32 if quick_cpu else torch.bfloat16
    rows, name = [], results_name("cache-compile" if args.compile else "cache", models, DEFAULT_MODELS)
    for model, cases in build_cases(models, quick_cpu, dtype, device, args.compile):
        if quick_cpu:
            timing = CPU_QUICK_TIMING
        else:
            warmup, rep = model.cuda_timing
            timing = {"warmup_ms": warmup / 4, "rep_ms": rep / 4} if args.quick else {"warmup_ms": warmup,
                                                                                      "rep_ms": rep}
        rows += run_cases(cases, **timing)
        save_rows(rows, name, args, argv, script="bench_cache", packages=("diffusers", DEEPCACHE_PACKAGE))
    return finish(rows, name, args, argv, script="bench_cache", packages=("diffusers", DEEPCACHE_PACKAGE))


if __name__ == "__main__":
    sys.exit(main())
