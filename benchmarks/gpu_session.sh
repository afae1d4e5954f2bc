#!/usr/bin/env bash
# A GPU session's checks and benchmarks, as named steps that each run under a time limit.
#
#   benchmarks/gpu_session.sh STEP[:SECONDS] [STEP[:SECONDS] ...]
#
# Run from the repository root on a machine with a CUDA GPU and torch (+ triton) already installed. The first step on
# a machine installs what it lacks: the wheels in .whl/ if present (../shared/tools/device-wheels.sh --peers puts
# diffusers and the peers there), then diffboost itself, its CUDA kernels built for this GPU's architecture only.
# Everything a step writes goes under $OUT (default: ./gpu-session): logs/STEP.log, results/*.json (the benchmarks'
# recorded results: copy them to benchmarks/results/ and run `python -m benchmarks.readme_results`), and one line per
# step in summary.txt (exit status and seconds). A step that fails or runs out of time does not stop the next one.
# DRY_RUN=1 prints each step's command and runs nothing.
#
# Steps (default limit in seconds):
#   kernels (330)        the kernel test files whole: GPU tests and the CPU ones, on this GPU's Triton
#   tests (300)          every other test marked gpu (pipelines, patching, compile, quantized models)
#   attn (200)           bench_attention: exact and INT8 vs every SDPA backend and SageAttention
#   w4a4 (250)           bench_w4a4 on the GPU: Triton and CUDA W4A4 / W4A16 vs cuBLAS bf16 and torch._int_mm
#   w4a4_cpu (250)       bench_w4a4 on this machine's CPU (2 threads, as on CI machines)
#   attn_tuned (500)     bench_attention and bench_w4a4 with DIFFBOOST_AUTOTUNE=1: Triton autotunes over every
#   w4a4_tuned (500)       config, the log names the fastest per shape (to check the launch heuristics against);
#                          results under $OUT/tuned, not to be confused with the default configs' ones
#   linattn (250)        bench_linear_attention with the end-to-end U-Net rows
#   cache_sd15 (300)     bench_cache per model: uncached vs DeepCache / encoder propagation / block caching and the
#   cache_sdxl (400)       DeepCache package
#   cache_flux (400)
#   cache_compile (500)  bench_cache on SD 1.5 with the denoiser under torch.compile
#   quant_sdxl (400)     bench_quant per model: bf16 vs W4A4 / W4A16 denoisers
#   quant_flux (500)
#   bench (400)          `diffboost bench` (SD 1.5 architecture, 512 px, 50 steps), every feature alone and combined
#   info (60)            `diffboost info` and nvidia-smi
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-session}
[ -n "${DRY_RUN:-}" ] || mkdir -p "$OUT/logs" "$OUT/results"

setup() {
  [ -f /tmp/diffboost-gpu-session.ready ] && return 0
  if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || return 1
  fi
  local arch
  arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)
  [ "$arch" = 90 ] && arch=90a  # wgmma needs the architecture-specific target
  DIFFBOOST_CUDA_ARCHS=$arch python3 -m pip install -q --no-build-isolation --no-deps . || return 1
  touch /tmp/diffboost-gpu-session.ready
}
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}

command_of() {
  local results="$OUT/results"
  case $1 in
    kernels) echo "python3 -m pytest -q -rs tests/test_attention.py tests/test_w4a4.py tests/test_w4a16.py" \
                  "tests/test_linear_attention.py tests/test_launch.py" ;;
    tests) echo "python3 -m pytest -q -rs -m gpu --deselect tests/test_attention.py --deselect tests/test_w4a4.py" \
                "--deselect tests/test_w4a16.py --deselect tests/test_linear_attention.py --deselect tests/test_launch.py" ;;
    attn) echo "python3 -m benchmarks.bench_attention --out $results" ;;
    w4a4) echo "python3 -m benchmarks.bench_w4a4 --device cuda --out $results" ;;
    w4a4_cpu) echo "python3 -m benchmarks.bench_w4a4 --device cpu --threads 2 --out $results" ;;
    attn_tuned) echo "DIFFBOOST_AUTOTUNE=1 TRITON_PRINT_AUTOTUNING=1 python3 -m benchmarks.bench_attention --out $OUT/tuned" ;;
    w4a4_tuned) echo "DIFFBOOST_AUTOTUNE=1 TRITON_PRINT_AUTOTUNING=1" \
                     "python3 -m benchmarks.bench_w4a4 --device cuda --out $OUT/tuned" ;;
    linattn) echo "python3 -m benchmarks.bench_linear_attention --e2e --out $results" ;;
    cache_sd15|cache_sdxl|cache_flux) echo "python3 -m benchmarks.bench_cache --models ${1#cache_} --out $results" ;;
    cache_compile) echo "python3 -m benchmarks.bench_cache --models sd15 --compile --out $results" ;;
    quant_sdxl|quant_flux) echo "python3 -m benchmarks.bench_quant --models ${1#quant_} --out $results" ;;
    bench) echo "python3 -m diffboost bench --json $results/bench-gpu.json" ;;
    info) echo "nvidia-smi; python3 -m diffboost info" ;;
    *) return 1 ;;
  esac
}

default_limit() {
  case $1 in
    info) echo 60 ;; attn) echo 200 ;; w4a4|w4a4_cpu|linattn) echo 250 ;; tests) echo 300 ;; cache_sd15) echo 300 ;;
    kernels) echo 330 ;; cache_sdxl|cache_flux|quant_sdxl|bench) echo 400 ;; *) echo 500 ;;
  esac
}

for arg in "$@"; do
  step=${arg%%:*}
  limit=${arg#*:}
  [ "$limit" = "$arg" ] && limit=$(default_limit "$step")
  if ! cmd=$(command_of "$step"); then
    echo "unknown step '$step' (see the list at the top of $0)" >&2
    exit 2
  fi
  if [ -n "${DRY_RUN:-}" ]; then
    echo "$step: $cmd"
    continue
  fi
  log="$OUT/logs/$step.log"
  start=$SECONDS
  { setup && timeout -k 10 "$limit" bash -c "$cmd"; } >"$log" 2>&1
  rc=$?
  line="$step rc=$rc ${limit}s-limit $((SECONDS - start))s"
  [ $rc = 124 ] && line="$line (timed out)"
  echo "$line" | tee -a "$OUT/summary.txt"
  tail -n 5 "$log"
done
