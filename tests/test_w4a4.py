"""diffboost.ops.w4a4: packing, the activation pass and the W4A4 GEMM of every backend against the reference.

Backends are run through their launchers with poisoned output buffers, so an element a kernel fails to write shows
up. Integer parts (packed activations, activation scales, the GEMM's group dot products) must match the reference
bit for bit; fp32 sums (low-rank projections, scaled GEMM) must match an fp64 evaluation of the reference within a
bound on fp32 rounding derived from the magnitudes involved. On CPU the Triton kernels run under the interpreter;
every C++ SIMD level compiled in runs where the CPU supports it (the others are skipped, visibly).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import diffboost
from diffboost import _ext
from diffboost.ops import BackendUnavailableError, dispatch_log, w4a4_gemm, w4a4_linear, w4a4_quantize_act
from diffboost.ops.w4a4 import (
    _reciprocal,
    gemm_cpu,
    gemm_cuda,
    pack_int4,
    quantize_act_cpu,
    unpack_int4,
    w4a4_gemm_reference,
    w4a4_quantize_act_reference,
)

HAS_CUDA = torch.cuda.is_available()
CPU_LEVELS = tuple(_ext.build_info().get("cpu_simd_compiled", ()))
CPU_SUPPORTED = set(_ext.build_info().get("cpu_simd_supported", ()))
QUANTIZE_BACKENDS = [f"cpu-{level}" for level in CPU_LEVELS] + ["triton"]
GEMM_BACKENDS = ["cuda", *QUANTIZE_BACKENDS]  # the CUDA extension has the GEMM; the activation pass runs in Triton
# (M, K, N, G): every M the issue names; K and N multiples of G but not of the kernels' tiles (CPU: 64 x 128,
# register blocks of 8-column vectors; Triton: 64 x 64 under the interpreter), and N not a multiple of 8 or 16 too.
# K = 1152 spans several of the CPU kernel's 512-channel K chunks (and a partial last one).
CASES = [(1, 192, 320, 64), (7, 256, 100, 32), (77, 384, 200, 128), (300, 192, 136, 64), (67, 1152, 203, 64)]


def _skip_unless_runs(backend: str) -> torch.device:
    """The device a backend runs on here, or skip with the reason it cannot."""
    if backend.startswith("cpu-"):
        level = backend[4:]
        if level not in CPU_SUPPORTED:
            pytest.skip(f"this CPU cannot run the {level} kernels (supports {sorted(CPU_SUPPORTED)})")
        return torch.device("cpu")
    if backend == "triton":
        return torch.device("cuda" if HAS_CUDA else "cpu")  # CPU: TRITON_INTERPRET=1 (conftest)
    if backend == "cuda":
        if not HAS_CUDA:
            pytest.skip("needs a CUDA GPU")
        if not _ext.build_info().get("cuda"):
            pytest.skip(f"_C has no CUDA kernels: {_ext.build_info().get('cuda_disabled_by')}")
        return torch.device("cuda")
    raise AssertionError(backend)


def _out_dtypes(backend: str) -> tuple[torch.dtype, ...]:
    return (torch.float32, torch.bfloat16) if backend.startswith("cpu-") else (torch.float16, torch.bfloat16)


def _exact_out_dtype(backend: str) -> torch.dtype:
    """The output dtype the integer test uses: fp32 where the backend writes it (exact for these sums)."""
    return torch.float16 if backend == "cuda" else torch.float32


def _poisoned_quantize_outputs(m, k, g, rank, device):
    return (
        torch.full((m, k // 2), 0xA5, dtype=torch.uint8, device=device),
        torch.full((k // g, m), float("nan"), device=device),
        torch.full((m, rank), float("nan"), device=device),
    )


def quantize_with(backend, x, group_size, smooth=None, lora_down=None):
    m, k = x.shape
    outputs = _poisoned_quantize_outputs(m, k, group_size, 0 if lora_down is None else lora_down.shape[1], x.device)
    if backend.startswith("cpu-"):
        quantize_act_cpu(x, smooth, lora_down, group_size, *outputs, level=backend[4:])
    else:
        from diffboost.kernels import w4a4 as kernels

        kernels.quantize_act(x, _reciprocal(smooth), lora_down, *outputs, group_size)  # as the op calls it
    return outputs


def gemm_with(backend, qx, ascales, qweight, wscales, lora_act, lora_up, bias, out_dtype):
    out = torch.full((qx.shape[0], qweight.shape[0]), float("nan"), dtype=out_dtype, device=qx.device)
    if backend.startswith("cpu-"):
        gemm_cpu(qx, ascales, qweight, wscales, lora_act, lora_up, bias, out, level=backend[4:])
    elif backend == "cuda":
        gemm_cuda(qx, ascales, qweight, wscales, lora_act, lora_up, bias, out)
    else:
        from diffboost.kernels import w4a4 as kernels

        kernels.gemm(qx, ascales, qweight, wscales, lora_act, lora_up, bias, out)
    return out


def random_layer(k, n, g, rank, dtype, device):
    """Random packed weights (every nibble value, -8 included), positive 16-bit scales, low-rank factors, bias."""
    return dict(
        qweight=torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=device),
        wscales=(torch.rand(k // g, n, device=device) * 0.02 + 0.001).to(dtype),
        lora_up=torch.randn(rank, n, device=device).to(dtype) if rank else None,
        bias=torch.randn(n, device=device).to(dtype),
    )


def reference_before_rounding(qx, ascales, qweight, wscales, lora_act, lora_up, bias, out_dtype):
    """The reference GEMM in fp64 up to the final rounding to ``out_dtype`` (lr is rounded to it, as specified)."""
    if lora_act is not None:
        lora_act = lora_act.to(out_dtype).float()
    return w4a4_gemm_reference(qx, ascales, qweight, wscales, lora_act, lora_up, bias, torch.float64,
                               compute=torch.float64)


def gemm_error_bound(qx, ascales, qweight, wscales, lora_act, lora_up, bias, ref, out_dtype):
    """What fp32 rounding can account for: a unit roundoff of 2^-20 (headroom for the few fp32 operations per group
    and output) times the sum of the magnitudes of every term, plus rounding the result to out_dtype."""
    groups = ascales.shape[0]
    a = unpack_int4(qx).double().abs().view(qx.shape[0], groups, -1) * ascales.t().double().abs().unsqueeze(-1)
    w = unpack_int4(qweight).double().abs().view(qweight.shape[0], groups, -1)
    w = w * wscales.t().double().abs().unsqueeze(-1)
    bound = a.flatten(1) @ w.flatten(1).t()
    if lora_up is not None:
        bound += lora_act.to(out_dtype).double().abs() @ lora_up.double().abs()
    if bias is not None:
        bound += bias.double().abs()
    eps = torch.finfo(out_dtype).eps if out_dtype != torch.float32 else 0.0
    return 2.0**-20 * bound + eps * ref.double().abs()


def assert_gemm_close(out, ref, bound):
    assert not torch.isnan(out).any(), "output has NaN: unwritten elements?"
    err = (out.double() - ref.double()).abs()
    worst = (err - bound).argmax()
    assert (err <= bound).all(), (
        f"max excess error {(err - bound).max().item():.3e} at flat index {worst.item()}: "
        f"out {out.flatten()[worst].item()} ref {ref.flatten()[worst].item()}"
    )


# ---------------------------------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------------------------------


def test_pack_unpack_round_trip():
    q = torch.randint(-8, 8, (3, 5, 38), dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.shape == (3, 5, 19) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), q)
    every_byte = torch.arange(256, dtype=torch.uint8).view(4, 64)
    assert torch.equal(pack_int4(unpack_int4(every_byte)), every_byte)
    # The documented nibble order: channel 2j in the low nibble of byte j.
    assert pack_int4(torch.tensor([[3, -2]], dtype=torch.int8)).item() == 0xE3


def test_pack_rejects_odd_length_and_wrong_dtype():
    with pytest.raises(ValueError, match="even"):
        pack_int4(torch.zeros(2, 3, dtype=torch.int8))
    with pytest.raises(ValueError, match="uint8"):
        unpack_int4(torch.zeros(2, 3, dtype=torch.int8))


# ---------------------------------------------------------------------------------------------------------------
# Activation pass
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", QUANTIZE_BACKENDS)
@pytest.mark.parametrize("m,k,n,g", CASES)
def test_quantize_matches_reference(backend, m, k, n, g):
    device = _skip_unless_runs(backend)
    dtypes = (torch.float32, torch.bfloat16) if backend.startswith("cpu-") else (torch.float16, torch.bfloat16)
    for dtype in dtypes:
        x = (torch.randn(m, k + 16, device=device) * 3).to(dtype)[:, 8 : 8 + k]  # a row stride > K
        smooth = (torch.rand(k, device=device) + 0.25).to(torch.bfloat16)
        down = (torch.randn(k, 32, device=device) / k**0.5).to(dtype if dtype != torch.float32 else torch.bfloat16)
        qx, ascales, lr = quantize_with(backend, x, g, smooth, down)
        ref_qx, ref_scales, ref_lr = w4a4_quantize_act_reference(x, g, smooth, down, compute=torch.float64)
        assert torch.equal(qx, ref_qx), f"{dtype}: packed activations differ"
        assert torch.equal(ascales, ref_scales), f"{dtype}: activation scales differ"
        xs = x.float() / smooth.float()
        bound = 2.0**-20 * (xs.to(dtype).double().abs() @ down.double().abs())
        assert ((lr.double() - ref_lr.double()).abs() <= bound).all(), f"{dtype}: low-rank activations"


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_smoothing_updated_in_place_is_seen(backend):
    """The backends keep a derived copy of ``smooth`` per parameter (fp32 for the C++ kernels, its reciprocal for
    Triton): an in-place update of the parameter must reach the next call."""
    device = torch.device("cpu")
    if backend == "cpu" and _ext.get_ext() is None:
        pytest.skip(f"_C unavailable: {_ext.ext_error()}")
    x = torch.randn(5, 128, device=device).to(torch.bfloat16)
    smooth = (torch.rand(128, device=device) + 0.5).to(torch.bfloat16)
    for step in range(2):
        qx, ascales, _ = w4a4_quantize_act(x, 64, smooth, None, backend=backend)
        ref_qx, ref_scales, _ = w4a4_quantize_act_reference(x, 64, smooth, None)
        assert torch.equal(qx, ref_qx) and torch.equal(ascales, ref_scales), f"call {step}"
        with torch.no_grad():
            smooth.mul_(3.0)


@pytest.mark.parametrize("backend", QUANTIZE_BACKENDS)
def test_quantize_without_smoothing_or_low_rank(backend):
    device = _skip_unless_runs(backend)
    x = torch.randn(9, 128, device=device, dtype=torch.bfloat16)
    qx, ascales, lr = quantize_with(backend, x, 64)
    ref_qx, ref_scales, _ = w4a4_quantize_act_reference(x, 64)
    assert torch.equal(qx, ref_qx) and torch.equal(ascales, ref_scales) and lr.shape == (9, 0)


@pytest.mark.parametrize("backend", QUANTIZE_BACKENDS)
def test_quantize_rounds_half_to_even_and_zero_groups(backend):
    device = _skip_unless_runs(backend)
    # Group absmax 7 makes the quantizer's multiplier exactly 1: halves must round to even, as torch.round does.
    halves = torch.tensor([7.0, 2.5, -3.5, 0.5, -0.5, 1.5, 6.5, -6.5] * 4, device=device)
    x = torch.stack([halves, torch.zeros(32, device=device), -halves])  # the middle row is an all-zero group
    qx, ascales, _ = quantize_with(backend, x, 32)
    expected = torch.round(x).to(torch.int8)
    assert torch.equal(unpack_int4(qx), expected)
    assert ascales[0].tolist() == [1.0, 0.0, 1.0]


# ---------------------------------------------------------------------------------------------------------------
# GEMM
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", GEMM_BACKENDS)
@pytest.mark.parametrize("m,k,n,g", CASES)
def test_gemm_integer_part_is_exact(backend, m, k, n, g):
    """Unit scales: the result is the exact integer sum of the group dot products, rounded once to the output
    dtype (fp32 holds these sums exactly, so that is the only rounding)."""
    device = _skip_unless_runs(backend)
    out_dtype = _exact_out_dtype(backend)
    qx = torch.randint(0, 256, (m, k // 2), dtype=torch.uint8, device=device)
    qweight = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=device)
    ones_a = torch.ones(k // g, m, device=device)
    ones_w = torch.ones(k // g, n, device=device, dtype=torch.float16 if backend == "cuda" else torch.bfloat16)
    out = gemm_with(backend, qx, ones_a, qweight, ones_w, None, None, None, out_dtype)
    exact = unpack_int4(qx).cpu().long() @ unpack_int4(qweight).cpu().long().t()  # no integer matmul on CUDA
    assert torch.equal(out.cpu(), exact.to(out_dtype))


@pytest.mark.parametrize("backend", GEMM_BACKENDS)
@pytest.mark.parametrize("m,k,n,g", CASES)
def test_gemm_matches_reference(backend, m, k, n, g):
    device = _skip_unless_runs(backend)
    rank = 32 if m != 7 else 0  # one case without the low-rank branch and bias
    for out_dtype in _out_dtypes(backend):
        store = torch.bfloat16 if out_dtype == torch.float32 else out_dtype
        layer = random_layer(k, n, g, rank, store, device)
        if not rank:
            layer["bias"] = None
        qx = torch.randint(0, 256, (m, k // 2), dtype=torch.uint8, device=device)
        ascales = torch.rand(k // g, m, device=device) + 0.01
        lora_act = torch.randn(m, rank, device=device) if rank else None
        args = (qx, ascales, layer["qweight"], layer["wscales"], lora_act, layer["lora_up"], layer["bias"])
        out = gemm_with(backend, *args, out_dtype)
        assert out.dtype == out_dtype
        ref = reference_before_rounding(*args, out_dtype)
        assert_gemm_close(out, ref, gemm_error_bound(*args, ref, out_dtype))


def test_gemm_cpu_level_errors():
    if _ext.get_ext() is None:
        pytest.skip(f"_C unavailable: {_ext.ext_error()}")
    args = [torch.zeros(1, 32, dtype=torch.uint8), torch.ones(1, 1), torch.zeros(8, 32, dtype=torch.uint8),
            torch.ones(1, 8), None, None, None, torch.empty(1, 8)]
    with pytest.raises(ValueError, match="unknown SIMD level"):
        gemm_cpu(*args, level="sse9")
    missing = [lvl for lvl in ("avx2", "avx512_vnni") if lvl in CPU_LEVELS and lvl not in CPU_SUPPORTED]
    for level in missing:
        with pytest.raises(RuntimeError, match="does not support"):
            gemm_cpu(*args, level=level)


def kernel_report(arch: int, only: str, tmp_path) -> list[dict]:
    """``benchmarks.kernel_report`` rows: the kernels compiled for ``sm_<arch>`` through their real launchers (no GPU
    needed), in a process without TRITON_INTERPRET (the interpreter accepts programs the compiler rejects)."""
    pytest.importorskip("triton.backends.nvidia")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    out = tmp_path / f"report-sm{arch}.json"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.kernel_report", "--arch", str(arch), "--only", only, "--json", str(out)],
        env=env, capture_output=True, text=True, timeout=600, cwd=Path(__file__).resolve().parent.parent,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())["rows"]


@pytest.mark.skipif(HAS_CUDA, reason="the GPU tests compile and run the kernels")
@pytest.mark.parametrize("arch,gemm_op", [(80, "IMMA"), (90, "IGMMA")])
def test_triton_kernels_compile_for_sm80_and_sm90(arch, gemm_op, tmp_path):
    """Both kernels compile for Ampere and Hopper, onto tensor cores (INT8 for the GEMM, 16-bit for the low-rank
    dot of the activation pass), with nothing spilled."""
    rows = {(r["case"], r["kernel"]): r for r in kernel_report(arch, "w4a4", tmp_path)
            if not r["case"].startswith("cuda:")}
    assert {case for case, _ in rows} == {"w4a4_gemm-flux-g32", "w4a4_gemm-flux-g64", "w4a4_gemm-flux-g128",
                                          "w4a4_gemm-m16", "w4a4_quantize-flux"}
    for (case, kernel), row in rows.items():
        assert row["stack_bytes"] == 0, f"{case}: registers spilled ({row})"
        ops = row["loop_tensor_core"]
        if kernel == "_gemm_kernel":
            assert set(ops) <= {gemm_op, "IMMA"} and ops, f"{case}: main loop not on INT8 tensor cores ({row})"
        else:
            assert set(ops) & {"HMMA", "HGMMA"}, f"{case}: low-rank dot not on tensor cores ({row})"
    if arch == 90:
        # The GEMM is bound by instruction issue on Hopper: per 64-channel group each warp issues its share of two
        # wgmma and everything around them. 785 instructions with sign-extended, interleaved nibbles; 464 now.
        loop = rows[("w4a4_gemm-flux-g64", "_gemm_kernel")]
        assert loop["loop_tensor_core"] == {"IGMMA": 2} and loop["loop_instructions"] <= 500, loop


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (the CUDA kernels are compiled, not run)")
@pytest.mark.parametrize("arch,gemm_op,max_loop", [(89, "IMMA", 450), (90, "IMMA", 600)])
def test_cuda_gemm_compiles_lean(arch, gemm_op, max_loop, tmp_path):
    """The CUDA GEMM compiled by nvcc for Ada (mma.sync INT4) and Hopper (mma.sync INT8): every instance on tensor
    cores, nothing spilled, and the 64-channel group's main loop within its instruction budget (711 and 985 per warp
    before the copy addresses were worked out once per block and sm_90's nibbles were taken 16x-scaled)."""
    rows = kernel_report(arch, "cuda:w4a4_gemm", tmp_path)
    instances = {f"w4a4_gemm_kernel<{dtype}, {group}>" for dtype in ("fp16", "bf16") for group in (32, 64, 128)}
    assert {r["kernel"] for r in rows} == instances
    for row in rows:
        assert row["stack_bytes"] == 0 and set(row["loop_tensor_core"]) == {gemm_op}, row
    loop = next(r for r in rows if r["kernel"] == "w4a4_gemm_kernel<bf16, 64>")
    assert loop["loop_instructions"] <= max_loop, loop


# ---------------------------------------------------------------------------------------------------------------
# Ops: dispatch, torch.library, validation
# ---------------------------------------------------------------------------------------------------------------


def _layer_args(k=128, n=48, g=64, rank=16, dtype=torch.bfloat16, device="cpu"):
    layer = random_layer(k, n, g, rank, dtype, device)
    layer["smooth"] = (torch.rand(k, device=device) + 0.5).to(dtype)
    layer["lora_down"] = torch.randn(k, rank, device=device).to(dtype) if rank else None
    return layer


def test_linear_is_quantize_then_gemm_on_every_leading_shape(device):
    layer = _layer_args(device=device)
    x = torch.randn(2, 5, 128, device=device, dtype=torch.bfloat16)
    out = w4a4_linear(x.transpose(0, 1), **layer)  # non-contiguous leading dims
    assert out.shape == (5, 2, 48) and out.dtype == torch.bfloat16
    x2 = x.transpose(0, 1).reshape(-1, 128)
    qx, ascales, lr = w4a4_quantize_act(x2, 64, layer["smooth"], layer["lora_down"])
    expected = w4a4_gemm(qx, ascales, layer["qweight"], layer["wscales"], lora_act=lr, lora_up=layer["lora_up"],
                         bias=layer["bias"], out_dtype=torch.bfloat16)
    assert torch.equal(out.reshape(-1, 48), expected)


def test_unsupported_dtype_falls_back_to_reference_and_says_why():
    layer = _layer_args()
    x = torch.randn(3, 128, dtype=torch.float16)  # the C++ kernels take fp32/bf16
    out = w4a4_linear(x, **layer)
    ref_q = w4a4_quantize_act_reference(x, 64, layer["smooth"], layer["lora_down"])
    ref = w4a4_gemm_reference(*ref_q[:2], layer["qweight"], layer["wscales"], ref_q[2], layer["lora_up"],
                              layer["bias"], torch.float16)
    assert torch.equal(out, ref)
    entries = [e for e in dispatch_log() if e["op"] == "w4a4_gemm" and e["dtype"] == "float16" and e["device"] == "cpu"]
    assert entries and entries[-1]["backend"] in ("reference", "triton")
    if _ext.get_ext() is not None:
        assert any("dtype float16 not supported" in r for r in entries[-1]["skipped"]["cpu"])


def test_forced_backend_that_cannot_run_raises():
    layer = _layer_args()
    with pytest.raises(BackendUnavailableError, match="backend='cpu'"):
        w4a4_linear(torch.randn(2, 128, dtype=torch.float16), **layer, backend="cpu")
    with pytest.raises(ValueError, match="unknown backend='nope'"):
        w4a4_linear(torch.randn(2, 128), **layer, backend="nope")


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(x=torch.randn(4, 96)), r"x's last dim must be the layer's in_features K=128"),
        (dict(x=torch.randint(0, 5, (4, 128))), r"x dtype torch.int64 not supported"),
        (dict(qweight=torch.zeros(48, 64)), r"qweight dtype torch.float32 not supported \(uint8\)"),
        (dict(qweight=torch.zeros(64, 48, dtype=torch.uint8).t()), r"qweight must be contiguous"),
        (dict(wscales=torch.ones(3, 48)), r"wscales has 3 groups for K=128"),
        (dict(wscales=torch.ones(2, 48, dtype=torch.int32)), r"wscales dtype torch.int32 not supported"),
        (dict(smooth=torch.ones(64)), r"smooth must have shape \[128\]"),
        (dict(lora_up=None), r"pass both of lora_down and lora_up or neither"),
        (dict(lora_down=torch.ones(128, 8), lora_up=torch.ones(8, 48)), r"lora_up rank 8 must be a multiple of 16"),
        (dict(bias=torch.ones(47)), r"bias must have shape \[48\]"),
    ],
)
def test_bad_input_names_the_argument(change, message):
    args = dict(x=torch.randn(4, 128), **_layer_args())
    args.update(change)
    with pytest.raises(ValueError, match=message):
        w4a4_linear(**args)


def test_bad_input_of_the_two_ops():
    with pytest.raises(ValueError, match=r"x's last dim \(in_features\) 100 must be a positive multiple of "
                                         r"group_size=64"):
        w4a4_quantize_act(torch.randn(2, 100))
    with pytest.raises(ValueError, match=r"group_size=48 not supported \(32, 64, 128\)"):
        w4a4_quantize_act(torch.randn(2, 96), 48)
    with pytest.raises(ValueError, match="x must have unit stride along K"):
        w4a4_quantize_act(torch.randn(64, 4).t())
    with pytest.raises(ValueError, match="x must be 2-D"):
        w4a4_quantize_act(torch.randn(2, 2, 64))
    layer = _layer_args()
    qx, ascales, lr = w4a4_quantize_act(torch.randn(2, 128), 64, layer["smooth"], layer["lora_down"])
    with pytest.raises(ValueError, match=r"ascales must have shape \[2, 2\]"):
        w4a4_gemm(qx, ascales.t().contiguous()[:1], layer["qweight"], layer["wscales"])
    with pytest.raises(ValueError, match=r"ascales dtype torch.bfloat16 not supported \(float32\)"):
        w4a4_gemm(qx, ascales.bfloat16(), layer["qweight"], layer["wscales"])
    with pytest.raises(ValueError, match="out_dtype torch.int8 not supported"):
        w4a4_gemm(qx, ascales, layer["qweight"], layer["wscales"], out_dtype=torch.int8)
    with pytest.raises(ValueError, match=r"lora_act must have shape \[2, 16\]"):
        w4a4_gemm(qx, ascales, layer["qweight"], layer["wscales"], lora_act=lr[:, :8].contiguous(),
                  lora_up=layer["lora_up"])


def test_library_ops_schema_and_fake():
    layer = _layer_args()
    x = torch.randn(5, 128)
    torch.library.opcheck(torch.ops.diffboost.w4a4_quantize_act.default,
                          (x, layer["smooth"], layer["lora_down"], 64, "reference"))
    qx, ascales, lr = w4a4_quantize_act(x, 64, layer["smooth"], layer["lora_down"])
    torch.library.opcheck(
        torch.ops.diffboost.w4a4_gemm.default,
        (qx, ascales, layer["qweight"], layer["wscales"], lr, layer["lora_up"], layer["bias"], torch.bfloat16,
         "reference"),
    )


def test_compiles_fullgraph():
    layer = _layer_args()

    def f(x):
        return diffboost.ops.w4a4_linear(x * 2, **layer).relu()

    x = torch.randn(2, 3, 128)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), f(x))


# ---------------------------------------------------------------------------------------------------------------
# GPU: the same comparisons at real sizes
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ("triton", "cuda"))
@pytest.mark.parametrize("out_dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("m,k,n", [(4608, 3072, 3072), (4608, 3072, 12288), (4096, 640, 640), (333, 1280, 1288)])
def test_gpu_real_sizes(m, k, n, out_dtype, backend):
    device = _skip_unless_runs(backend)
    layer = _layer_args(k, n, 64, 32, out_dtype, device)
    x = torch.randn(m, k, device=device, dtype=out_dtype)
    quantized = quantize_with("triton", x, 64, layer["smooth"], layer["lora_down"])
    ref_q = w4a4_quantize_act_reference(x, 64, layer["smooth"], layer["lora_down"])
    assert torch.equal(quantized[0], ref_q[0]) and torch.equal(quantized[1], ref_q[1])
    args = (*quantized[:2], layer["qweight"], layer["wscales"], quantized[2], layer["lora_up"], layer["bias"])
    out = gemm_with(backend, *args, out_dtype)
    ref = reference_before_rounding(*args, out_dtype)
    assert_gemm_close(out, ref, gemm_error_bound(*args, ref, out_dtype))


@pytest.mark.gpu
def test_gpu_compiles_fullgraph_inductor():
    layer = _layer_args(device="cuda")

    def f(x):
        return diffboost.ops.w4a4_linear(x, **layer) * 2

    x = torch.randn(4, 77, 128, device="cuda", dtype=torch.bfloat16)
    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(x), f(x))
