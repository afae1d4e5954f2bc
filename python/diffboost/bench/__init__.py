"""``diffboost bench``: how much faster each optimisation makes a pipeline on this machine, and at what fidelity.

    diffboost bench                            SD 1.5 architecture, random weights, sized to the machine
    diffboost bench --preset tiny --steps 4    seconds on a CPU
    diffboost bench --model ./my-sdxl --json results.json --plot results.png
    diffboost bench kernels                    kernel microbenchmarks vs peers (source checkout)

The pipeline runs unpatched, then with each registered feature's settings (:data:`FEATURE_VARIANTS`) alone and
with :data:`COMBINED`, with the same seed; the table gives time per image (median, min-max), speedup, the denoiser's
time, peak memory and PSNR (LPIPS with ``lpips`` installed) against the unpatched images. What cannot run here
(no GPU, no ``_C``, a feature that does not apply to the pipeline) is listed with the reason. The same run is
available from Python as :func:`run_benchmark`.
"""

from diffboost.bench.cli import add_bench_parser
from diffboost.bench.machine import machine_info
from diffboost.bench.pipeline import COMBINED, FEATURE_VARIANTS, Settings, Variant, plan_variants, run_benchmark

__all__ = [
    "COMBINED",
    "FEATURE_VARIANTS",
    "Settings",
    "Variant",
    "add_bench_parser",
    "machine_info",
    "plan_variants",
    "run_benchmark",
]
