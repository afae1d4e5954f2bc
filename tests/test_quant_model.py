"""Whole-model W4A4 quantization: ``diffboost.quant.quantize``, ``patch(pipe, quant=...)``, calibration, reports.

Pipelines are the tiny offline presets (random weights, CPU, fp32). Fidelity is the PSNR of the quantized pipeline's
images against the float pipeline's on the same seed; the numbers are printed (``pytest -s``) as well as asserted.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import inspect

import pytest
import torch
from torch import nn

import diffboost
from diffboost.models import build_denoiser, build_pipeline, example_denoiser_inputs, example_inputs
from diffboost.quant import (
    DEFAULT_SKIP,
    Int4Linear,
    W4A4Config,
    W4A4Conv2d,
    W4A4Linear,
    W4A16Conv2d,
    W4A16Linear,
)
from diffboost.quant.linear import is_pointwise_conv

# The tiny presets' widths (32/48/80/96) are not all multiples of 64: group 32 keeps padding to a minimum. A
# three-point alpha grid keeps the search (one SVD per layer and candidate) short on 2 CPU cores.
GRID = (0.25, 0.5, 0.75)
CONFIG = W4A4Config(group_size=32, rank=16, alpha_grid=GRID)
STEPS = 2


def psnr(images: torch.Tensor, reference: torch.Tensor) -> float:
    mse = (images.double() - reference.double()).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(1.0 / mse)).item()


def generate(pipe, seed: int = 0) -> torch.Tensor:
    return pipe(**example_inputs(pipe, steps=STEPS, seed=seed)).images


def calibration(pipe) -> list[dict]:
    """One short sampling run on a seed other than the evaluation's."""
    return [example_inputs(pipe, steps=STEPS, seed=1)]


def float_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if type(m) is nn.Linear or is_pointwise_conv(m)}


@pytest.mark.parametrize("preset", ["tiny-sd", "tiny-sdxl", "tiny-flux", "tiny-pixart", "tiny-sd3"])
def test_pipelines_quantize_and_run(preset):
    from diffboost.models import build_pipeline

    pipe = build_pipeline(preset)
    denoiser_name = "unet" if hasattr(pipe, "unet") else "transformer"
    denoiser = getattr(pipe, denoiser_name)
    reference = generate(pipe)
    before = float_layers(denoiser)
    params_total = sum(p.numel() for p in denoiser.parameters())
    schemes = {n: CONFIG.scheme(n) for n in before if CONFIG.scheme(n)}
    expected = set(schemes)

    reports = diffboost.quant.quantize(pipe, CONFIG, calibration=calibration(pipe), progress=False)
    report = reports[denoiser_name]
    images = generate(pipe)

    after = dict(denoiser.named_modules())
    assert {n for n, m in after.items() if isinstance(m, Int4Linear)} == expected == set(report.layers)
    assert all(type(after[n]) is type(before[n]) for n in before if n not in expected)  # skipped: untouched
    assert all(isinstance(after[n], W4A4Conv2d) == isinstance(before[n], nn.Conv2d) for n in expected)
    assert all(isinstance(after[n], W4A16Linear) == (scheme == "w4a16") == (report.layers[n].scheme == "w4a16")
               for n, scheme in schemes.items())
    if preset in ("tiny-flux", "tiny-sd3"):  # DiTs with adaLN projections (PixArt modulates with a parameter table)
        assert "w4a16" in schemes.values()
    quantized_params = sum(p.numel() for n in expected for p in before[n].parameters())
    assert report.params_quantized == quantized_params and report.params_total == params_total
    assert report.fraction_quantized == pytest.approx(quantized_params / params_total)
    assert report.bytes_after == diffboost.quant.module_bytes(denoiser) < report.bytes_before
    assert all(r.error is not None and r.error < 1.0 for r in report.layers.values())
    assert torch.isfinite(images).all()
    quality = psnr(images, reference)
    print(f"\n{preset}: {report}; PSNR vs float {quality:.1f} dB")
    assert quality > 20.0


def test_default_skips_and_weight_only_layers():
    """The sensitive layers QuEST / SVDQuant keep in 16-bit (embeddings, first and last layers) and the modulation
    projections that get 4-bit weights with 16-bit activations."""
    flux = build_denoiser("tiny-flux")
    diffboost.quant.quantize(flux, CONFIG, calibration="data-free")
    for name in ("x_embedder", "context_embedder", "proj_out", "norm_out.linear",
                 "time_text_embed.timestep_embedder.linear_1"):
        assert type(flux.get_submodule(name)) is nn.Linear, name
    for name in ("transformer_blocks.0.norm1.linear", "transformer_blocks.0.norm1_context.linear",
                 "single_transformer_blocks.0.norm.linear"):
        assert type(flux.get_submodule(name)) is W4A16Linear, name
    for name in ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.ff.net.2",
                 "single_transformer_blocks.0.proj_out", "single_transformer_blocks.0.proj_mlp"):
        assert type(flux.get_submodule(name)) is W4A4Linear, name

    flux = build_denoiser("tiny-flux")  # weight_only=(): every quantized layer is W4A4
    diffboost.quant.quantize(flux, W4A4Config(group_size=32, rank=16, weight_only=()), calibration="data-free")
    assert type(flux.get_submodule("transformer_blocks.0.norm1.linear")) is W4A4Linear

    unet = build_denoiser("tiny-sd")
    report = diffboost.quant.quantize(unet, CONFIG, calibration="data-free")[""]
    for name in ("time_embedding.linear_1", "down_blocks.0.resnets.0.time_emb_proj"):
        assert type(unet.get_submodule(name)) is nn.Linear and "skip pattern" in report.skipped[name]
    assert isinstance(unet.get_submodule("down_blocks.0.attentions.0.proj_in"), W4A4Conv2d)  # inside a block


def test_include_and_skip_patterns_choose_the_layers():
    model = build_denoiser("tiny-pixart")
    names = set(float_layers(model))
    config = W4A4Config(group_size=32, rank=16, include=("*attn1.*",), skip=("*to_out*",))
    report = diffboost.quant.quantize(model, config, calibration="data-free")[""]
    expected = {n for n in names if fnmatch.fnmatchcase(n, "*attn1.*") and "to_out" not in n}
    assert set(report.layers) == expected and expected
    assert set(report.skipped) == names - expected

    model = build_denoiser("tiny-pixart")
    everything = diffboost.quant.quantize(model, W4A4Config(group_size=32, rank=16, skip=()), calibration="data-free")
    assert set(everything[""].layers) == names and not everything[""].skipped


def test_controlnet_is_quantized_only_when_asked(tiny_sd_controlnet):
    pipe = tiny_sd_controlnet
    config = W4A4Config(group_size=32, rank=16, alpha_grid=GRID, components=("unet", "controlnet"))
    reports = diffboost.quant.quantize(pipe, config, calibration=calibration(pipe), progress=False)
    assert set(reports) == {"unet", "controlnet"}
    assert any(isinstance(m, W4A4Linear) for m in pipe.controlnet.modules())
    # The zero convolutions stay: ControlNet's residuals start from them.
    assert all(type(m) is nn.Conv2d for m in pipe.controlnet.controlnet_down_blocks)
    assert torch.isfinite(generate(pipe)).all()


def inject_outliers(unet: nn.Module, channels: int = 4, scale: float = 40.0) -> None:
    """Give the inputs of the attention / feed-forward projections a few huge channels, function-preserving: scale
    the LayerNorm's affine output on those channels and divide the consumers' weight columns by the same factor
    (the per-channel outliers of real diffusion activations, which plain per-token INT4 cannot represent)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for block in (m for m in unet.modules() if type(m).__name__ == "BasicTransformerBlock"):
            pairs = [(block.norm1, [block.attn1.to_q, block.attn1.to_k, block.attn1.to_v]),
                     (block.norm2, [block.attn2.to_q]), (block.norm3, [block.ff.net[0].proj])]
            for norm, consumers in pairs:
                picked = torch.randperm(norm.weight.shape[0], generator=generator)[:channels]
                norm.weight[picked] *= scale
                norm.bias[picked] *= scale
                for linear in consumers:
                    linear.weight[:, picked] /= scale


def test_smoothing_and_low_rank_beat_naive_w4a4_on_outliers():
    from diffboost.models import build_pipeline

    results = {}
    # Only the layers that receive the outliers: the rest would add the same error to every variant.
    fed = ("*attn1.to_q", "*attn1.to_k", "*attn1.to_v", "*attn2.to_q", "*ff.net.0.proj")
    variants = {
        "naive W4A4": W4A4Config(group_size=32, rank=0, smooth=False, include=fed),
        "smoothing": W4A4Config(group_size=32, rank=0, include=fed, alpha_grid=GRID),
        "smoothing + rank 16": W4A4Config(group_size=32, rank=16, include=fed, alpha_grid=GRID),
    }
    reference = None
    for label, config in variants.items():
        pipe = build_pipeline("tiny-sd")
        inject_outliers(pipe.unet)
        if reference is None:
            reference = generate(pipe)
        diffboost.quant.quantize(pipe, config, calibration=calibration(pipe), progress=False)
        results[label] = psnr(generate(pipe), reference)
    print("\nPSNR vs float on a U-Net with activation outliers: "
          + ", ".join(f"{label} {value:.1f} dB" for label, value in results.items()))
    assert results["smoothing"] > results["naive W4A4"] + 3.0
    assert results["smoothing + rank 16"] > results["smoothing"]


def test_self_calibration_of_a_bare_denoiser():
    model = build_denoiser("tiny-flux")
    calls = []
    model.register_forward_pre_hook(lambda m, a, k: calls.append(float(k["timestep"][0])), with_kwargs=True)
    report = diffboost.quant.quantize(model, CONFIG, progress=False)[""]
    assert len(set(calls)) == len(calls) > 1  # a trajectory of distinct timesteps
    assert any(r.alpha is not None for r in report.layers.values())  # activation data drove the smoothing
    out = model(**diffboost.models.example_denoiser_inputs(model)).sample
    assert torch.isfinite(out).all()


def test_patch_without_calibration_self_calibrates_the_pipeline(tiny_pixart):
    calls = []
    tiny_pixart.transformer.register_forward_pre_hook(lambda m, a, k: calls.append(1), with_kwargs=True)
    diffboost.patch(tiny_pixart, quant=CONFIG)
    # One sampling run of the self-calibration (CFG batched into one call per step), then quantized.
    from diffboost.quant.calibrate import SELF_CALIBRATION_SEEDS, SELF_CALIBRATION_STEPS

    assert len(calls) == SELF_CALIBRATION_STEPS * len(SELF_CALIBRATION_SEEDS)
    report = diffboost.quant.report(tiny_pixart)["transformer"]
    assert report.layers and all(r.error is not None for r in report.layers.values())
    assert torch.isfinite(generate(tiny_pixart)).all()


def test_prompts_calibrate_a_pipeline_with_its_own_steps(tiny_sd):
    steps = []
    tiny_sd.unet.register_forward_pre_hook(lambda m, a, k: steps.append(1), with_kwargs=True)
    reports = diffboost.quant.quantize(tiny_sd, CONFIG, calibration=["a red fox in the snow"], progress=False)
    default_steps = inspect.signature(type(tiny_sd).__call__).parameters["num_inference_steps"].default
    assert len(steps) == default_steps  # the real number of steps, CFG in one batch
    assert reports["unet"].layers
    with pytest.raises(TypeError, match="a bare model needs forward kwargs"):
        diffboost.quant.quantize(build_denoiser("tiny-pixart"), CONFIG, calibration=["a prompt"])
    with pytest.raises(TypeError, match="all be prompts .* or all call kwargs"):
        diffboost.quant.quantize(build_denoiser("tiny-pixart"), CONFIG, calibration=["a prompt", {}])


def test_calibration_stats_of_a_1x1_conv_and_a_linear_layer_agree():
    """A 1x1 conv's GEMM rows are its pixels: the same data through a conv and a linear layer gives the same per-channel
    maxima, and the row sample (larger than the data here, so it keeps everything) holds exactly the input's rows."""
    from diffboost.quant.calibrate import collect

    conv, linear = nn.Conv2d(8, 4, 1), nn.Linear(8, 4)
    x = torch.randn(3, 8, 5, 6)
    rows = x.permute(0, 2, 3, 1).reshape(-1, 8)
    with collect({"conv": conv, "linear": linear}, max_rows=1000) as stats:
        conv(x)
        linear(x.permute(0, 2, 3, 1))
        linear(x.permute(0, 2, 3, 1)[:0])  # an empty call records nothing
    for name in ("conv", "linear"):
        entry = stats[name]
        assert torch.equal(entry.amax, rows.abs().amax(0)) and entry.calls == 1 and entry.rows == 90
        assert torch.equal(entry.sample.sort(0).values, rows.sort(0).values)


def test_data_free_quantizes_without_smoothing():
    model = build_denoiser("tiny-pixart")
    diffboost.quant.quantize(model, CONFIG, calibration="data-free")
    layers = [m for m in model.modules() if isinstance(m, W4A4Linear)]
    assert layers and all(m.smooth is None for m in layers)


def test_fixed_alpha_is_used_everywhere():
    model = build_denoiser("tiny-pixart")
    inputs = [diffboost.models.example_denoiser_inputs(model, seed=s) for s in range(2)]
    report = diffboost.quant.quantize(model, W4A4Config(group_size=32, rank=16, smooth_alpha=0.5), inputs)[""]
    assert {r.alpha for r in report.layers.values()} == {0.5}


def test_patch_quant_composes_and_unpatch_restores_kept_originals(tiny_sd):
    pipe = tiny_sd
    reference = generate(pipe)
    config = W4A4Config(group_size=32, rank=16, alpha_grid=GRID, keep_original=True)
    diffboost.patch(pipe, quant=config, attention="exact", cache=2, calibration=calibration(pipe))
    assert diffboost.patching.patched_features(pipe) == ["quant", "attention", "cache"]
    assert any(isinstance(m, W4A4Linear) for m in pipe.unet.modules())
    assert psnr(generate(pipe), reference) > 15.0
    diffboost.unpatch(pipe)
    assert not diffboost.is_patched(pipe)
    assert not any(isinstance(m, Int4Linear) for m in pipe.unet.modules())
    assert torch.equal(generate(pipe), reference)


def test_patch_again_with_the_same_quant_config_keeps_the_quantization(tiny_sd):
    pipe = tiny_sd
    runs = []

    def run(target):
        runs.append(1)
        target(**example_inputs(target, steps=STEPS, seed=1))

    diffboost.patch(pipe, quant=CONFIG, calibration=run)
    layer = pipe.unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
    diffboost.patch(pipe, quant=CONFIG, cache=2, calibration=run)
    assert runs == [1]  # no second calibration
    assert pipe.unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q") is layer
    assert diffboost.patching.patched_features(pipe) == ["quant", "cache"]


def test_a_quantization_without_originals_cannot_be_removed(tiny_sd):
    pipe = tiny_sd
    diffboost.patch(pipe, quant=CONFIG, attention="exact", calibration=calibration(pipe))
    processors = dict(pipe.unet.attn_processors)
    # Dropping quant in a new patch() call is impossible: it raises before changing anything.
    with pytest.raises(RuntimeError, match="keep_original=False.*reload"):
        diffboost.patch(pipe, cache=2)
    assert diffboost.patching.patched_features(pipe) == ["quant", "attention"]
    assert dict(pipe.unet.attn_processors) == processors
    # unpatch removes what it can and says how to get the weights back.
    with pytest.raises(RuntimeError, match="from_pretrained"):
        diffboost.unpatch(pipe)
    assert diffboost.patching.patched_features(pipe) == ["quant"]
    assert any(isinstance(m, W4A4Linear) for m in pipe.unet.modules())
    with pytest.raises(RuntimeError, match="keep_original=False"):
        diffboost.quant.restore(pipe)


def test_linear_attention_starts_from_the_quantized_projections(tiny_sd):
    """``quant=`` with ``linear_attention=True`` (initialised from the U-Net): each linear attention copies the
    dequantized projections of the quantized self-attention it replaces, in one call or after the quantization."""
    pipe = tiny_sd
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    diffboost.patch(pipe, quant=CONFIG, calibration=calibration(pipe))
    quantized = pipe.unet.get_submodule(name)
    diffboost.patch(pipe, quant=CONFIG, linear_attention=True)
    assert diffboost.patching.patched_features(pipe) == ["quant", "linear_attention"]
    linear = pipe.unet.get_submodule(name)
    assert isinstance(linear, diffboost.linear.GeneralizedLinearAttention)
    for proj in ("to_q", "to_k", "to_v"):
        dequantized = getattr(quantized, proj).to_linear(torch.float32)
        assert torch.equal(getattr(linear, proj).weight, dequantized.weight)
    assert torch.equal(linear.to_out[0].weight, quantized.to_out[0].to_linear(torch.float32).weight)
    assert torch.isfinite(generate(pipe)).all()

    fresh = build_pipeline("tiny-sd")
    diffboost.patch(fresh, quant=CONFIG, linear_attention=True, calibration=calibration(fresh))
    assert diffboost.patching.patched_features(fresh) == ["quant", "linear_attention"]
    assert torch.isfinite(generate(fresh)).all()


def test_a_request_that_cannot_apply_fails_before_quantizing(tiny_sd, tiny_flux, tmp_path):
    """A feature whose config does not fit the pipeline raises before the (slow, irreversible) quantization of the
    same call runs: nothing is calibrated, nothing changes."""
    runs = []
    for pipe, features, error in [
        (tiny_sd, {"linear_attention": str(tmp_path)}, "not a LinFusion checkpoint"),
        (tiny_flux, {"cache": diffboost.DeepCacheConfig(interval=2)}, "needs a UNet2DConditionModel"),
        (tiny_flux, {"linear_attention": True}, "has no unet"),
    ]:
        with pytest.raises(ValueError, match=error):
            diffboost.patch(pipe, quant=CONFIG, calibration=lambda target: runs.append(1), **features)
        assert not diffboost.is_patched(pipe)
        for denoiser in diffboost.patching.denoisers(pipe).values():
            assert not any(isinstance(m, Int4Linear) for m in denoiser.modules())
    assert runs == []


def test_a_feature_failing_after_a_quantization_leaves_it_installed_and_says_so(tiny_sd, monkeypatch):
    """The quantization of this very call cannot be undone (keep_original=False): the failing feature's own error
    propagates, with a note that quant= stays, and the state still records the quantization."""
    pipe = tiny_sd
    feature = diffboost.patching._FEATURES["attention"]

    def fail(*args, **kwargs):
        raise RuntimeError("attention install failed")

    monkeypatch.setitem(diffboost.patching._FEATURES, "attention", dataclasses.replace(feature, install=fail))
    with pytest.raises(RuntimeError, match="attention install failed") as info:
        diffboost.patch(pipe, quant=CONFIG, attention="exact", calibration=calibration(pipe))
    assert any(note.startswith("diffboost.patch: quant= stays installed") for note in info.value.__notes__)
    assert diffboost.patching.patched_features(pipe) == ["quant"]
    assert any(isinstance(m, W4A4Linear) for m in pipe.unet.modules())


def test_patch_quant_w4a16_name(tiny_sd):
    diffboost.patch(tiny_sd, quant="w4a16", calibration="data-free")
    report = diffboost.quant.report(tiny_sd)["unet"]
    assert report.config == W4A4Config(weight_only=("*",))
    layers = [m for m in tiny_sd.unet.modules() if isinstance(m, Int4Linear)]
    assert layers and all(isinstance(m, (W4A16Linear, W4A16Conv2d)) for m in layers)
    diffboost.patch(tiny_sd, quant="w4a16")  # an equal config keeps the quantization
    assert diffboost.quant.report(tiny_sd)["unet"] is report


def test_patch_quant_argument_errors(tiny_sd):
    with pytest.raises(TypeError, match="calibration= is an option of quant="):
        diffboost.patch(tiny_sd, calibration=["a prompt"])
    with pytest.raises(TypeError, match="quant='int4' not supported; use 'w4a4', 'w4a16'"):
        diffboost.patch(tiny_sd, quant="int4")
    with pytest.raises(TypeError, match="calibration must be None"):
        diffboost.patch(tiny_sd, quant=CONFIG, calibration=42)
    assert not diffboost.is_patched(tiny_sd)
    assert not any(isinstance(m, Int4Linear) for m in tiny_sd.unet.modules())


def test_a_failure_midway_leaves_the_model_unchanged(monkeypatch):
    import diffboost.quant.model as quant_model

    model = build_denoiser("tiny-pixart")
    before = {key: value.clone() for key, value in model.state_dict().items()}
    original = quant_model._quantize_layer
    calls = []

    def fail_on_the_fifth(module, stats, config, scheme):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("out of memory (simulated)")
        return original(module, stats, config, scheme)

    monkeypatch.setattr(quant_model, "_quantize_layer", fail_on_the_fifth)
    with pytest.raises(RuntimeError, match="simulated"):
        diffboost.quant.quantize(model, CONFIG, calibration="data-free")
    assert not any(isinstance(m, Int4Linear) for m in model.modules()) and not diffboost.is_patched(model)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


def test_quantize_twice_raises():
    model = build_denoiser("tiny-pixart")
    diffboost.quant.quantize(model, CONFIG, calibration="data-free")
    with pytest.raises(ValueError, match="already quantized"):
        diffboost.quant.quantize(model, CONFIG, calibration="data-free")


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(rank=24), "rank=24 must be 0 or a multiple of 16"),
        (dict(group_size=16), r"group_size=16 not supported \(32, 64, 128\)"),
        (dict(smooth_alpha=1.5), r"smooth_alpha / alpha_grid must be numbers in \[0, 1\]"),
        (dict(components=("vae",)), "components .* not supported"),
        (dict(dtype=torch.float32), "dtype torch.float32 not supported"),
        (dict(calibration_tokens=0), "calibration_tokens=0 must be a positive int"),
    ],
)
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        W4A4Config(**kwargs)


def test_config_json_round_trip():
    config = W4A4Config(rank=16, group_size=128, smooth_alpha=0.3, include=["*attn*"], dtype=torch.float16)
    assert W4A4Config.from_json(config.to_json()) == config
    assert config.include == ("*attn*",)
    assert len({config, W4A4Config.from_json(config.to_json())}) == 1  # hashable, equal by value
    assert set(DEFAULT_SKIP) == set(W4A4Config().skip)
    with pytest.raises(TypeError, match="skip must be a sequence"):
        W4A4Config(skip="conv_in")


@pytest.mark.parametrize("conv_class,linear_class", [(W4A4Conv2d, W4A4Linear), (W4A16Conv2d, W4A16Linear)],
                         ids=["w4a4", "w4a16"])
def test_pointwise_conv_is_a_gemm_over_pixels(device, conv_class, linear_class):
    conv = nn.Conv2d(96, 40, 1).to(device)
    smooth = torch.rand(96, device=device) + 0.5
    rank = {"rank": 16} if conv_class is W4A4Conv2d else {}
    layer = conv_class.from_conv(conv, group_size=32, smooth=smooth, **rank)
    as_linear = linear_class.from_weights(layer.weights, 96)
    x = torch.randn(2, 96, 5, 7, device=device)
    out = layer(x)
    assert out.shape == (2, 40, 5, 7) and out.is_contiguous()  # the input's memory format
    expected = as_linear(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    assert torch.equal(out, expected)
    out_cl = layer(x.contiguous(memory_format=torch.channels_last))
    assert out_cl.is_contiguous(memory_format=torch.channels_last) and torch.equal(out_cl, expected)
    dense = layer.to_conv(torch.float32)
    torch.testing.assert_close(dense.weight.view(40, 96), layer.to_linear(torch.float32).weight)
    with pytest.raises(TypeError, match="expected a 1x1 nn.Conv2d"):
        conv_class.from_conv(nn.Conv2d(8, 8, 3))


def test_weight_only_everywhere():
    """``weight_only=("*",)``: every quantized layer W4A16 (1x1 convs included); activations stay 16-bit, so the
    images stay closer to the float ones than with W4A4."""
    from diffboost.models import build_pipeline

    pipe = build_pipeline("tiny-sd")
    reference = generate(pipe)
    config = W4A4Config(group_size=32, rank=16, alpha_grid=GRID, weight_only=("*",))
    report = diffboost.quant.quantize(pipe, config, calibration=calibration(pipe), progress=False)["unet"]
    assert report.layers and all(layer.scheme == "w4a16" and layer.rank == 0 for layer in report.layers.values())
    assert isinstance(pipe.unet.get_submodule("down_blocks.0.attentions.0.proj_in"), W4A16Conv2d)
    assert not any(isinstance(m, W4A4Linear) for m in pipe.unet.modules())
    quality = psnr(generate(pipe), reference)
    print(f"\ntiny-sd weight-only: {report}; PSNR vs float {quality:.1f} dB")
    assert quality > 30.0


@pytest.mark.gpu
def test_gpu_bf16_pipeline_quantizes_and_runs():
    from diffboost.models import build_pipeline

    pipe = build_pipeline("tiny-flux").to("cuda", torch.bfloat16)
    reference = generate(pipe)
    diffboost.patch(pipe, quant=W4A4Config(group_size=32, rank=16), calibration=calibration(pipe))
    layer = pipe.transformer.get_submodule("transformer_blocks.0.attn.to_q")
    assert isinstance(layer, W4A4Linear) and layer.qweight.is_cuda and layer.wscales.dtype == torch.bfloat16
    modulation = pipe.transformer.get_submodule("transformer_blocks.0.norm1.linear")
    assert isinstance(modulation, W4A16Linear) and modulation.qweight.is_cuda
    assert psnr(generate(pipe), reference) > 20.0


def test_benchmark_script_quick(tmp_path):
    """benchmarks/bench_quant.py --quick (tiny FLUX on CPU) records the dense, W4A4 and W4A16 rows with their
    metrics."""
    import json
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from benchmarks import bench_quant

    assert bench_quant.main(["--quick", "--device", "cpu", "--models", "flux", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("quant-flux-quick-*.json")
    rows = {row["name"]: row for row in json.loads(path.read_text())["rows"]}
    assert rows["dense"]["status"] == rows["w4a4"]["status"] == rows["w4a16"]["status"] == "ok"
    for name in ("w4a4", "w4a16"):
        metrics = rows[name]["metrics"]
        assert metrics["weight_reduction"] > 1.2 and metrics["layers_quantized"] > 0 and metrics["sqnr_db"] > 15
        assert metrics["weight_mib"] < rows["dense"]["metrics"]["weight_mib"]
    assert rows["w4a16"]["params"]["weight_only"] == ["*"]


def _layer_plans(report) -> dict[str, tuple]:
    return {name: (layer.kind, layer.scheme, layer.rank, layer.in_features, layer.out_features)
            for name, layer in report.layers.items()}


def test_estimate_is_what_quantize_gives_even_on_a_meta_model():
    from diffusers import FluxTransformer2DModel

    from diffboost.models import load_config

    config = W4A4Config(group_size=32, rank=16, smooth=False)  # no smoothing: the estimate is exact
    model = build_denoiser("tiny-flux")
    with torch.device("meta"):
        skeleton = FluxTransformer2DModel.from_config(load_config("tiny-flux", "transformer"))
    estimates = [diffboost.quant.estimate(m, config)[""] for m in (model, skeleton)]
    assert not diffboost.is_patched(model) and not any(isinstance(m, Int4Linear) for m in model.modules())
    real = diffboost.quant.quantize(model, config, calibration="data-free")[""]
    for estimate in estimates:
        assert estimate.seconds is None and "estimated from the layer shapes" in str(estimate)
        assert (estimate.bytes_before, estimate.bytes_after) == (real.bytes_before, real.bytes_after)
        assert (estimate.params_total, estimate.params_quantized) == (real.params_total, real.params_quantized)
        assert _layer_plans(estimate) == _layer_plans(real) and estimate.skipped == real.skipped


def test_estimate_with_smoothing_bounds_the_real_size():
    model = build_denoiser("tiny-pixart")
    estimate = diffboost.quant.estimate(model, CONFIG)[""]
    inputs = [example_denoiser_inputs(model, seed=1)]
    real = diffboost.quant.quantize(model, CONFIG, calibration=inputs, progress=False)[""]
    slack = sum(2 * layer.in_features for layer in real.layers.values())  # a smoothing vector the search dropped
    assert real.bytes_after <= estimate.bytes_after <= real.bytes_after + slack
    assert _layer_plans(estimate) == _layer_plans(real)
