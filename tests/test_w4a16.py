"""diffboost.ops.w4a16 and W4A16Linear: weight-only INT4 against an fp64 evaluation of its definition.

The Triton kernel runs under the interpreter on CPU (conftest) and natively on a GPU, through its launcher with a
poisoned output. The dequantized weight (``q * wscale`` rounded once to x's dtype) is bit-identical across backends,
so the only differences from the fp64 oracle are the fp32 sums and the final rounding to x's dtype: the bound below
is one rounding of the output dtype plus an fp32 sum error over K terms of the products' magnitudes.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import diffboost
from diffboost import _ext
from diffboost.ops import w4a16 as w4a16_ops
from diffboost.ops import w4a16_linear
from diffboost.ops.w4a4 import pack_int4, unpack_int4
from diffboost.ops.w4a16 import dequantize
from diffboost.quant import W4A16Linear

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
CPU_DTYPES = (torch.float32, torch.bfloat16)  # the C++ backend's; fp16 runs the reference on a CPU
CPU_LEVELS = tuple(_ext.build_info().get("cpu_simd_compiled", ()))
CPU_SUPPORTED = set(_ext.build_info().get("cpu_simd_supported", ()))
# (M, K, N, G): one row (a modulation layer at batch 1), two, a ragged handful, rows over several tiles (the grouped
# program order); N not a multiple of the kernel's column tile.
CASES = [(1, 192, 100, 64), (2, 256, 72, 32), (17, 384, 130, 128), (40, 128, 64, 64), (150, 256, 136, 64)]
_EPS = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float32: 2.0**-24}


def _layer(k, n, g, dtype, device=DEVICE, smooth=True, bias=True):
    scale_dtype = torch.float16 if dtype == torch.float16 else torch.bfloat16
    q = torch.randint(-7, 8, (n, k), dtype=torch.int8)
    return dict(
        qweight=pack_int4(q).to(device),
        wscales=(torch.rand(k // g, n) * 0.1 + 0.01).to(scale_dtype).to(device),
        smooth=(torch.rand(k) + 0.5).to(scale_dtype).to(device) if smooth else None,
        bias=torch.randn(n).to(scale_dtype).to(device) if bias else None,
    )


def _smoothed(x, layer):
    """x divided by the smoothing factors exactly as the op does: a reciprocal, a product, rounded to x's dtype."""
    if layer["smooth"] is None:
        return x
    s = layer["smooth"].float()
    return (x.float() * (torch.ones_like(s) / s)).to(x.dtype)


def _oracle(xs, layer):
    """The layer's output on the smoothed rows in fp64 (the weight dequantized to xs's dtype), before rounding."""
    w = dequantize(layer["qweight"], layer["wscales"], xs.dtype).double()
    out = xs.double() @ w.t()
    return out if layer["bias"] is None else out + layer["bias"].double()


def _bound(xs, layer, oracle, dtype):
    """|out - oracle| allowed per element: one rounding to ``dtype`` plus fp32 sums of |xs| |w| over K."""
    k = layer["qweight"].shape[1] * 2
    magnitude = xs.double().abs() @ dequantize(layer["qweight"], layer["wscales"], dtype).double().abs().t()
    return _EPS[dtype] * oracle.abs() + 2 * k * 2.0**-24 * magnitude


def _assert_close(out, xs, layer, dtype):
    oracle = _oracle(xs, layer)
    assert not torch.isnan(out).any(), "unwritten output elements"
    assert ((out.double() - oracle).abs() <= _bound(xs, layer, oracle, dtype)).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,k,n,g", CASES)
def test_kernel_matches_the_definition(m, k, n, g, dtype):
    from diffboost.kernels import w4a16 as kernels

    layer = _layer(k, n, g, dtype)
    xs = _smoothed(torch.randn(m, k, dtype=dtype, device=DEVICE), layer)  # the op smooths before the launch
    out = torch.full((m, n), float("nan"), dtype=dtype, device=DEVICE)
    kernels.linear(xs, layer["qweight"], layer["wscales"], layer["bias"], out)
    _assert_close(out, xs, layer, dtype)


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("m,k,n,g", CASES)
@pytest.mark.parametrize("path", ["rows", "gemm"])
def test_cpu_backend_matches_the_definition(m, k, n, g, path, dtype, monkeypatch):
    """fp32 and bf16 on the CPU, both paths whatever M is: the few-row kernel, and ``_C``'s dequantization + torch's
    fp32 GEMM."""
    if _ext.get_ext() is None:
        pytest.skip(f"no _C extension: {_ext.ext_error()}")
    monkeypatch.setattr(w4a16_ops, "_CPU_FEW_ROWS", 10**9 if path == "rows" else 0)
    layer = _layer(k, n, g, dtype, device="cpu")
    x = torch.randn(m, k, dtype=dtype)
    out = w4a16_linear(x, **layer, backend="cpu")
    assert out.dtype == dtype
    _assert_close(out, _smoothed(x, layer), layer, dtype)


@pytest.mark.parametrize("level", CPU_LEVELS)
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("g", [32, 64, 128])
def test_cpu_rows_kernel_at_every_level(level, dtype, g):
    """The few-row kernel of each SIMD level: every row count its register blocks handle (1-4 and a 4 + tail),
    column counts that leave a tail of single columns, rows of x and out with strides past their ends; what the
    strides skip stays poisoned."""
    if level not in CPU_SUPPORTED:
        pytest.skip(f"this CPU cannot run the {level} kernels (supports {sorted(CPU_SUPPORTED)})")
    k = 2 * 128
    for m, n, bias in ((1, 37, True), (2, 6, False), (3, 5, True), (4, 3, True), (9, 38, False)):
        layer = _layer(k, n, g, dtype, device="cpu", smooth=False, bias=bias)
        x = torch.randn(m, k + 24, dtype=dtype)[:, :k]
        out = torch.full((m, n + 3), float("nan"), dtype=dtype)
        w4a16_ops.gemm_rows_cpu(x, layer["qweight"], layer["wscales"], layer["bias"], out[:, :n], level=level)
        _assert_close(out[:, :n], x, layer, dtype)
        assert out[:, n:].isnan().all(), "wrote past the output's columns"


def test_cpu_rows_kernel_checks_its_arguments():
    if _ext.get_ext() is None:
        pytest.skip(f"no _C extension: {_ext.ext_error()}")
    layer = _layer(128, 8, 64, torch.float32, device="cpu", smooth=False, bias=False)
    x, out = torch.randn(2, 128), torch.empty(2, 8)
    with pytest.raises(ValueError, match="unknown SIMD level"):
        w4a16_ops.gemm_rows_cpu(x, layer["qweight"], layer["wscales"], None, out, level="sse9")
    with pytest.raises(ValueError, match="group must be 32, 64 or 128"):
        w4a16_ops.gemm_rows_cpu(x, layer["qweight"], layer["wscales"][:1].expand(3, 8), None, out)  # K / 3 groups
    with pytest.raises(ValueError, match="x_dtype must be 0"):
        _ext.get_ext().w4a16_gemm_rows_cpu("auto", x.data_ptr(), 2, 2, 128, 128, 0, 0, 8, 64, 0, out.data_ptr(), 8, 1)
    for level in [lvl for lvl in ("avx2", "avx512_vnni") if lvl in CPU_LEVELS and lvl not in CPU_SUPPORTED]:
        with pytest.raises(RuntimeError, match="does not support"):
            w4a16_ops.gemm_rows_cpu(x, layer["qweight"], layer["wscales"], None, out, level=level)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dequantize_is_the_unpacked_weight_times_its_scales_rounded_once(dtype):
    """The oracle above, against the packing's own inverse (:func:`unpack_int4`) and a per-element product."""
    layer = _layer(128, 24, 32, dtype, device="cpu")
    q = unpack_int4(layer["qweight"]).float()
    scales = layer["wscales"].float().t().repeat_interleave(32, dim=1)  # [N, K]: the scale of each element's group
    assert torch.equal(dequantize(layer["qweight"], layer["wscales"], dtype), (q * scales).to(dtype))


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_cpu_dequantize_is_exact_and_checks_its_arguments(dtype):
    if _ext.get_ext() is None:
        pytest.skip(f"no _C extension: {_ext.ext_error()}")
    layer = _layer(128, 24, 32, dtype, device="cpu")
    scales = layer["wscales"].float().contiguous()
    out = torch.full((24, 128), float("nan"))
    _ext.get_ext().w4a16_dequantize_cpu(layer["qweight"].data_ptr(), scales.data_ptr(), 24, 128, 32,
                                        dtype == torch.bfloat16, out.data_ptr(), 2)
    assert torch.equal(out, dequantize(layer["qweight"], layer["wscales"], dtype).float())
    with pytest.raises(ValueError, match="group must be 32, 64 or 128"):
        _ext.get_ext().w4a16_dequantize_cpu(0, 0, 24, 128, 48, False, 0, 1)
    with pytest.raises(ValueError, match="need n >= 0"):
        _ext.get_ext().w4a16_dequantize_cpu(0, 0, -1, 128, 32, False, 0, 1)


@pytest.mark.parametrize("backend", ("triton", "reference") if HAS_CUDA else ("triton", "cpu", "reference"))
@pytest.mark.parametrize("smooth,bias", [(True, True), (False, False)])
def test_op_over_leading_dims_and_strides(backend, smooth, bias):
    layer = _layer(256, 96, 64, torch.bfloat16, smooth=smooth, bias=bias)
    x = torch.randn(3, 2, 512, dtype=torch.bfloat16, device=DEVICE)[..., ::2]  # non-unit stride along K
    out = w4a16_linear(x, **layer, backend=backend)
    assert out.shape == (3, 2, 96) and out.dtype == torch.bfloat16
    _assert_close(out.reshape(6, 96), _smoothed(x.reshape(6, 256), layer), layer, torch.bfloat16)


def test_empty_input():
    layer = _layer(128, 64, 64, torch.float32)
    assert w4a16_linear(torch.randn(0, 128, device=DEVICE), **layer, backend="triton").shape == (0, 64)


def test_layer_equals_its_dequantized_linear():
    torch.manual_seed(0)
    linear = nn.Linear(200, 96)  # 200 is not a multiple of the group: zero-padded
    smooth = torch.rand(200) + 0.5
    layer = W4A16Linear.from_linear(linear, group_size=64, smooth=smooth)
    assert layer.rank == 0 and layer.padded_in_features == 256 and layer.SCHEME == "w4a16"
    x = torch.randn(4, 200)
    dense = layer.to_linear(torch.float32)
    torch.testing.assert_close(layer(x), dense(x), rtol=1e-5, atol=1e-5)
    # RTN INT4 per group of 64 on a Gaussian-like weight: a bounded, small error.
    error = (dense.weight - linear.weight).pow(2).sum() / linear.weight.pow(2).sum()
    assert 1e-4 < error.item() < 0.02
    assert layer.memory()["low_rank"] == 0
    memory = W4A16Linear.from_linear(nn.Linear(1024, 1024)).memory()  # no padding: 4.25 bits per weight
    assert memory["dense_16bit"] / memory["total"] > 3.5


def test_layer_refuses_a_low_rank_branch():
    with pytest.raises(ValueError, match="rank=16.*no low-rank branch"):
        W4A16Linear(64, 64, rank=16)


_FALLBACK_SCRIPT = r"""
import torch
from diffboost.ops import BackendUnavailableError, dispatch_log, w4a16_linear
from diffboost.ops.w4a4 import pack_int4, unpack_int4
from diffboost.ops.w4a16 import w4a16_linear_reference

layer = dict(qweight=pack_int4(torch.randint(-7, 8, (32, 128), dtype=torch.int8)),
             wscales=torch.rand(2, 32).to(torch.float16))
x = torch.randn(3, 128, dtype=torch.float16)  # the C++ backend takes fp32 and bf16
assert torch.equal(w4a16_linear(x, **layer), w4a16_linear_reference(x, **layer))
entry = next(e for e in dispatch_log() if e["op"] == "w4a16_linear")
print(entry["backend"], "|", "; ".join(entry["skipped"]["triton"]), "|", "; ".join(entry["skipped"].get("cpu", [])))
try:
    w4a16_linear(x, **layer, backend="triton")
except BackendUnavailableError as error:
    print("refused:", error)
"""


@pytest.mark.skipif(HAS_CUDA, reason="on a GPU machine the Triton backend runs")
def test_without_a_gpu_or_interpreter_it_falls_back_to_reference_and_says_why():
    """fp16 on a CPU in a process without TRITON_INTERPRET (unlike this one): the reference runs, the log says why
    the others do not, and forcing the Triton backend raises."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _FALLBACK_SCRIPT], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "reference | runs on cuda, not cpu" in result.stdout and "dtype float16 not supported" in result.stdout
    assert "refused:" in result.stdout and "triton" in result.stdout.split("refused:")[1]


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(x=torch.randn(2, 100)), r"x's last dim must be the layer's in_features K=128"),
        (dict(x=torch.randint(0, 3, (2, 128))), "x dtype torch.int64 not supported"),
        (dict(qweight=torch.zeros(32, 64, dtype=torch.int8)), "qweight dtype torch.int8 not supported"),
        (dict(wscales=torch.ones(3, 32)), "wscales has 3 groups for K=128"),
        (dict(smooth=torch.ones(64)), r"smooth must have shape \[128\]"),
        (dict(bias=torch.ones(31)), r"bias must have shape \[32\]"),
    ],
    ids=["k", "x-dtype", "qweight-dtype", "groups", "smooth", "bias"],
)
def test_bad_input_names_the_argument(change, message):
    args = dict(x=torch.randn(2, 128), **_layer(128, 32, 64, torch.float32, device="cpu"))
    args.update(change)
    with pytest.raises(ValueError, match=message):
        w4a16_linear(args.pop("x"), **args)


def test_library_op_schema_fake_and_compile():
    layer = _layer(128, 32, 64, torch.float32, device="cpu")
    x = torch.randn(5, 128)
    torch.library.opcheck(torch.ops.diffboost.w4a16_linear.default,
                          (x, layer["qweight"], layer["wscales"], layer["smooth"], layer["bias"], "reference"))

    def f(x):
        return diffboost.ops.w4a16_linear(x * 2, **layer, backend="reference").relu()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), f(x))


_COMPILE_SCRIPT = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from diffboost.kernels import w4a16 as k

pointers = dict(X="*bf16", QW="*u8", WScale="*bf16", Bias="*bf16", Out="*bf16")
ints = dict(M="i32", N="i32", K="i32", stride_xm="i32", stride_om="i32")
for arch, block_m, block_n, warps in ((80, 16, 64, 4), (90, 128, 128, 8)):
    consts = dict(G=64, HAS_BIAS=True, DOT_FP32=False, BLOCK_M=block_m, BLOCK_N=block_n, GROUP_M=8)
    signature = {**pointers, **ints, **{c: "constexpr" for c in consts}}
    ptx = triton.compile(ASTSource(fn=k._linear_kernel, signature=signature, constexprs=consts),
                         target=GPUTarget("cuda", arch, 32), options=dict(num_warps=warps, num_stages=3)).asm["ptx"]
    assert "mma" in ptx, "the group dots should run on tensor cores"
print("compiled")
"""


@pytest.mark.skipif(HAS_CUDA, reason="the GPU tests compile and run the kernel")
def test_triton_kernel_compiles_for_sm80_and_sm90():
    """The interpreter accepts programs the compiler rejects: compile for Ampere and Hopper (no GPU needed)."""
    pytest.importorskip("triton.backends.nvidia")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("m,k,n", [(1, 3072, 18432), (2, 3072, 9216), (2, 1280, 640), (300, 3072, 3072)])
def test_gpu_real_sizes(m, k, n, dtype):
    from diffboost.kernels import w4a16 as kernels

    layer = _layer(k, n, 64, dtype, device="cuda", smooth=False)
    x = torch.randn(m, k, dtype=dtype, device="cuda")
    out = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")
    kernels.linear(x, layer["qweight"], layer["wscales"], layer["bias"], out)
    _assert_close(out, x, layer, dtype)
