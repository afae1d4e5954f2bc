"""diffboost.quant: the W4A4 weight format and ``W4A4Linear`` (construction, forward, memory, dequantization).

The quantization-error test measures what SVDQuant's two additions buy on activations with per-channel outliers
(the structure diffusion activations have): smoothing migrates the outliers into the weight, the rank-32 branch keeps
the weight's dominant directions in 16 bits; plain W4A4 has neither.
"""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from diffboost.ops.w4a4 import unpack_int4, w4a4_gemm_reference, w4a4_quantize_act_reference
from diffboost.quant import W4A4Linear, dequantize_weight, quantize_linear_weight, smooth_factors

#: SVDQuant (smoothing + rank 32) must beat plain W4A4 by at least this much SQNR on outlier activations.
SQNR_MARGIN_DB = 6.0


def sqnr_db(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of ``out`` against ``ref``, in dB."""
    ref = ref.double()
    return 10 * torch.log10(ref.pow(2).sum() / (out.double() - ref).pow(2).sum()).item()


def outlier_activations(m: int, k: int, channels: int = 8, scale: float = 30.0) -> torch.Tensor:
    """Gaussian activations with a few input channels ``scale`` times larger, as in diffusion transformers."""
    x = torch.randn(m, k)
    x[:, torch.randperm(k)[:channels]] *= scale
    return x


def test_from_linear_forward_is_the_w4a4_arithmetic(device):
    linear = nn.Linear(192, 80).to(device)
    x = torch.randn(3, 7, 192, device=device)
    act_amax = x.abs().flatten(0, 1).amax(0)
    layer = W4A4Linear.from_linear(linear, group_size=64, rank=16, smooth=smooth_factors(act_amax, linear.weight))
    out = layer(x)
    assert out.shape == (3, 7, 80) and out.dtype == x.dtype
    w = layer.weights
    qx, ascales, lr = w4a4_quantize_act_reference(x.reshape(-1, 192), 64, w.smooth, w.lora_down)
    ref = w4a4_gemm_reference(qx, ascales, w.qweight, w.wscales, lr, w.lora_up, w.bias, torch.float64,
                              compute=torch.float64)
    torch.testing.assert_close(out.reshape(-1, 80).double(), ref, rtol=1e-5, atol=1e-5)


def test_format_parts_add_up_to_the_layer():
    """smooth * W = lora_down @ lora_up (the rounded factors) + the residual, up to half an INT4 step: the
    smoothing factors are rounded before they multiply the weight, the residual is taken after the factors are."""
    torch.manual_seed(0)
    u, v = torch.randn(96, 16), torch.randn(16, 128)
    weight = (u @ v).bfloat16().float()  # rank 16
    smooth = torch.rand(128) + 0.5
    w = quantize_linear_weight(weight, group_size=32, rank=16, smooth=smooth, dtype=torch.bfloat16)
    residual = unpack_int4(w.qweight).float().view(96, 4, 32) * w.wscales.float().t().unsqueeze(-1)
    smoothed = weight * w.smooth.float()
    low_rank = (w.lora_down.float() @ w.lora_up.float()).t()
    half_step = 0.5 * w.wscales.float().t().repeat_interleave(32, dim=1) * 1.001
    assert ((smoothed - low_rank - residual.view(96, 128)).abs() <= half_step).all()
    assert w.group_size == 32 and w.rank == 16
    torch.testing.assert_close(dequantize_weight(w), weight, rtol=0.05, atol=0.05 * weight.abs().max().item())


def test_sqnr_smoothing_and_low_rank_beat_plain_w4a4(capsys):
    linear = nn.Linear(512, 384)
    with torch.no_grad():
        linear.weight[:, :4] *= 8  # a few weight outliers too, for the low-rank branch to absorb
    x = outlier_activations(256, 512)
    ref = x.double() @ linear.weight.double().t() + linear.bias.double()
    plain = W4A4Linear.from_linear(linear, rank=0)
    smooth = smooth_factors(x.abs().amax(0), linear.weight, alpha=0.5)
    svdquant = W4A4Linear.from_linear(linear, rank=32, smooth=smooth)
    smooth_only = W4A4Linear.from_linear(linear, rank=0, smooth=smooth)
    results = {name: sqnr_db(layer(x), ref) for name, layer in
               (("plain W4A4", plain), ("smoothing", smooth_only), ("smoothing + rank 32", svdquant))}
    with capsys.disabled():
        print("\nW4A4 SQNR on outlier activations (512 -> 384, 8 channels x30): "
              + ", ".join(f"{name} {db:.1f} dB" for name, db in results.items()))
    assert results["smoothing + rank 32"] >= results["plain W4A4"] + SQNR_MARGIN_DB
    assert results["smoothing + rank 32"] > results["smoothing"]


def test_memory_report():
    layer = W4A4Linear(3072, 3072, group_size=64, rank=32, smooth=True)
    mem = layer.memory()
    assert mem["qweight"] == 3072 * 3072 // 2
    assert mem["scales"] == (3072 // 64) * 3072 * 2 + 3072 * 2
    assert mem["low_rank"] == (3072 + 3072) * 32 * 2
    assert mem["bias"] == 3072 * 2
    assert mem["total"] == mem["qweight"] + mem["scales"] + mem["low_rank"] + mem["bias"]
    assert mem["dense_16bit"] / mem["total"] >= 3.4  # FLUX-sized layer: ~3.5x smaller than bf16
    assert W4A4Linear(3072, 3072, rank=0, bias=False).memory()["low_rank"] == 0


def test_to_linear_dequantizes():
    linear = nn.Linear(128, 64)
    layer = W4A4Linear.from_linear(linear, group_size=32, rank=16, smooth=torch.rand(128) + 0.5)
    dense = layer.to_linear(torch.float32)
    assert isinstance(dense, nn.Linear) and dense.weight.dtype == torch.float32
    torch.testing.assert_close(dense.weight, dequantize_weight(layer.weights))
    assert (dense.weight - linear.weight).abs().max() < 0.25 * linear.weight.abs().max()
    torch.testing.assert_close(dense.bias, linear.bias.bfloat16().float())
    assert layer.to_linear().weight.dtype == torch.bfloat16


def test_state_dict_round_trip_and_absent_parts():
    linear = nn.Linear(64, 48, bias=False).to(torch.float16)
    layer = W4A4Linear.from_linear(linear, group_size=32, rank=0)
    assert layer.wscales.dtype == torch.float16  # the layer's 16-bit dtype is kept
    assert layer.smooth is None and layer.lora_down is None and layer.bias is None
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    fresh = W4A4Linear(64, 48, group_size=32, rank=0, bias=False, dtype=torch.float16)
    fresh.load_state_dict(torch.load(io.BytesIO(buffer.getvalue())))
    x = torch.randn(5, 64)
    assert torch.equal(fresh(x), layer(x))
    assert "rank=0" in repr(fresh) and "dtype=float16" in repr(fresh)


def test_forced_backend_and_input_dtypes():
    layer = W4A4Linear.from_linear(nn.Linear(64, 32), group_size=64, rank=16)
    x = torch.randn(4, 64)
    reference = W4A4Linear.from_linear(nn.Linear(64, 32), group_size=64, rank=16, backend="reference")
    reference.load_state_dict(layer.state_dict())
    assert "backend='reference'" in repr(reference)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        out, ref = layer(x.to(dtype)), reference(x.to(dtype))
        assert out.dtype == dtype
        torch.testing.assert_close(out, ref, rtol=2 * torch.finfo(dtype).eps, atol=1e-3)


def test_empty_batch(device):
    layer = W4A4Linear.from_linear(nn.Linear(64, 32), group_size=32, rank=16, smooth=torch.rand(64) + 0.5).to(device)
    for shape in ((0, 64), (2, 0, 64)):
        out = layer(torch.randn(shape, device=device))
        assert out.shape == (*shape[:-1], 32)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(group_size=16), r"group_size=16 not supported \(32, 64, 128\)"),
        (dict(rank=24), "rank=24 must be 0 or a multiple of 16"),
        (dict(dtype=torch.float32), r"dtype torch.float32 not supported \(float16, bfloat16\)"),
        (dict(smooth=torch.zeros(128)), "smooth factors must be positive"),
        (dict(smooth=torch.ones(64)), r"smooth must have shape \[128\]"),
    ],
)
def test_from_linear_bad_arguments(kwargs, message):
    linear = nn.Linear(kwargs.pop("in_features", 128), 32)
    with pytest.raises(ValueError, match=message):
        W4A4Linear.from_linear(linear, **kwargs)


@pytest.mark.parametrize("in_features", [40, 100, 136])
def test_in_features_off_the_group_are_zero_padded(device, in_features):
    """K pads to the next multiple of the group; the padded layer equals the layer with explicit zero columns."""
    linear = nn.Linear(in_features, 48)
    smooth = torch.rand(in_features) + 0.5
    layer = W4A4Linear.from_linear(linear, group_size=32, rank=16, smooth=smooth).to(device)
    padded_k = -(-in_features // 32) * 32
    assert layer.padded_in_features == padded_k and layer.qweight.shape == (48, padded_k // 2)
    wide = nn.Linear(padded_k, 48)
    with torch.no_grad():
        wide.weight.zero_()
        wide.weight[:, :in_features] = linear.weight
        wide.bias.copy_(linear.bias)
    wide_smooth = torch.cat([smooth, torch.ones(padded_k - in_features)])
    reference = W4A4Linear.from_linear(wide, group_size=32, rank=16, smooth=wide_smooth).to(device)
    for name in ("qweight", "wscales", "smooth", "lora_down", "lora_up", "bias"):
        assert torch.equal(getattr(layer, name), getattr(reference, name)), name
    x = torch.randn(5, in_features, device=device)
    out = layer(x)
    torch.testing.assert_close(out, reference(torch.nn.functional.pad(x, (0, padded_k - in_features))))
    assert layer.to_linear().weight.shape == (48, in_features)
    with pytest.raises(ValueError, match=f"expected in_features={in_features}"):
        layer(torch.randn(5, padded_k, device=device))


def test_from_linear_needs_a_linear():
    with pytest.raises(TypeError, match="expected an nn.Linear"):
        W4A4Linear.from_linear(nn.Conv2d(4, 4, 1))


def test_smooth_factors():
    act = torch.tensor([4.0, 0.0, 1.0])
    weight = torch.tensor([[1.0, 2.0, 4.0], [-2.0, 1.0, 0.5]])
    torch.testing.assert_close(smooth_factors(act, weight, alpha=0.5), torch.tensor([2.0 / 2**0.5, 1.0, 0.5]))
    with pytest.raises(ValueError, match="alpha must be in"):
        smooth_factors(act, weight, alpha=2.0)


@pytest.mark.gpu
def test_gpu_module_matches_cpu_reference():
    torch.manual_seed(0)
    linear = nn.Linear(3072, 3072, dtype=torch.bfloat16)
    x = outlier_activations(512, 3072).bfloat16()
    smooth = smooth_factors(x.float().abs().amax(0), linear.weight)
    layer = W4A4Linear.from_linear(linear, rank=32, smooth=smooth)
    out = layer.cuda()(x.cuda()).cpu()
    ref = W4A4Linear.from_linear(linear, rank=32, smooth=smooth, backend="reference")(x)
    assert sqnr_db(out.float(), ref.float()) > 40  # identical up to bf16 rounding of the output


def test_benchmark_script_quick(tmp_path):
    """benchmarks/bench_w4a4.py --quick runs end to end on this machine and records every row."""
    import json
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from benchmarks import bench_w4a4

    assert bench_w4a4.main(["--quick", "--device", "cpu", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("w4a4-quick-*.json")
    rows = json.loads(path.read_text())["rows"]
    assert {row["status"] for row in rows} <= {"ok", "skipped"}
    quantized = [row for row in rows if row["name"].startswith(("w4a4-", "w4a16-"))]
    assert any(row["name"].startswith("w4a16-") for row in quantized)  # the modulation shape's weight-only rows
    assert all(row["status"] == "ok" and row["metrics"]["sqnr_db"] > 15 for row in quantized)


def test_ops_pass_opcheck_and_a_quantized_model_compiles_fullgraph():
    """The torch.library ops (what torch.compile sees) have consistent schemas and fake implementations, and a stack
    of W4A4 layers compiles into one graph that computes exactly what eager mode does."""
    from torch.library import opcheck

    layer = W4A4Linear.from_linear(nn.Linear(96, 48), group_size=32, rank=16, smooth=torch.rand(96) + 0.5)
    w = layer.weights
    x = torch.randn(7, 96)
    opcheck(torch.ops.diffboost.w4a4_quantize_act, (x, w.smooth, w.lora_down, 32, "auto"))
    qx, ascales, lr = torch.ops.diffboost.w4a4_quantize_act(x, w.smooth, w.lora_down, 32, "auto")
    opcheck(torch.ops.diffboost.w4a4_gemm,
            (qx, ascales, w.qweight, w.wscales, lr, w.lora_up, w.bias, torch.float32, "auto"))

    model = nn.Sequential(layer, nn.GELU(), W4A4Linear.from_linear(nn.Linear(48, 64), group_size=32, rank=0))
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        assert torch.equal(compiled(x), model(x))
