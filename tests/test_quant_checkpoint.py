"""Quantized checkpoints: save -> load is bit-identical; every bad file fails before the model changes."""

from __future__ import annotations

import json
import os

import pytest
import torch

import diffboost
from diffboost.models import build_denoiser, build_pipeline, example_denoiser_inputs, example_inputs
from diffboost.quant import Int4Linear, W4A4Config
from diffboost.quant.checkpoint import HEADER, TENSORS

CONFIG = W4A4Config(group_size=32, rank=16, alpha_grid=(0.5,))


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in model.state_dict().items()}


def assert_unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[key], value) for key, value in before.items())
    assert not any(isinstance(m, Int4Linear) for m in model.modules())
    assert not diffboost.is_patched(model)


@pytest.fixture(scope="module")
def saved_flux(tmp_path_factory):
    """A quantized tiny FLUX transformer, saved; fixed inputs and its output on them."""
    model = build_denoiser("tiny-flux")
    inputs = [example_denoiser_inputs(model, seed=s) for s in range(2)]
    diffboost.quant.quantize(model, CONFIG, calibration=inputs, progress=False)
    directory = tmp_path_factory.mktemp("flux-w4a4")
    diffboost.quant.save_quantized(model, directory)
    probe = example_denoiser_inputs(model, seed=7)
    with torch.no_grad():
        output = model(**probe).sample
    return directory, probe, output


def fresh_flux(seed: int = 123) -> torch.nn.Module:
    """The same architecture with other random weights: loading must overwrite all of them."""
    torch.manual_seed(seed)
    model = build_denoiser("tiny-flux")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    return model


def test_save_load_is_bit_identical(saved_flux):
    directory, probe, expected = saved_flux
    model = fresh_flux()
    reports = diffboost.quant.load_quantized(model, directory)
    assert reports[""].layers and reports[""].config == CONFIG
    with torch.no_grad():
        assert torch.equal(model(**probe).sample, expected)
    # Loaded quantization is not undoable in place (the skeleton's float weights were never the model's).
    with pytest.raises(RuntimeError, match="reload"):
        diffboost.unpatch(model)


@pytest.mark.parametrize("device", [None, "cpu"])
def test_load_onto_a_meta_skeleton(saved_flux, device):
    from diffusers import FluxTransformer2DModel

    from diffboost.models import load_config

    directory, probe, expected = saved_flux
    with torch.device("meta"):
        model = FluxTransformer2DModel.from_config(load_config("tiny-flux", "transformer"))
    assert next(model.parameters()).is_meta
    diffboost.quant.load_quantized(model, directory, device=device)
    assert not any(t.is_meta for t in (*model.parameters(), *model.buffers()))
    with torch.no_grad():
        assert torch.equal(model(**probe).sample, expected)


def test_header_records_config_layers_and_checksums(saved_flux):
    directory = saved_flux[0]
    header = json.loads((directory / HEADER).read_text())
    assert header["format"] == "diffboost-w4a4" and header["version"] == 2
    assert header["model_class"] == "FluxTransformer2DModel"
    assert W4A4Config.from_json(header["config"]) == CONFIG
    spec = header["layers"]["transformer_blocks.0.attn.to_q"]
    assert spec["kind"] == "linear" and spec["scheme"] == "w4a4" and spec["group_size"] == 32 and spec["rank"] == 16
    spec = header["layers"]["transformer_blocks.0.norm1.linear"]
    assert spec["kind"] == "linear" and spec["scheme"] == "w4a16" and spec["rank"] == 0
    assert all(len(t["sha256"]) == 64 for t in header["tensors"].values())
    assert "transformer_blocks.0.attn.to_q.qweight" in header["tensors"]
    assert "x_embedder.weight" in header["tensors"]  # the 16-bit rest of the model travels along


def corrupt_byte(path: os.PathLike, offset_from_end: int = 100) -> None:
    data = bytearray(open(path, "rb").read())
    data[-offset_from_end] ^= 0xFF
    open(path, "wb").write(bytes(data))


def copy_checkpoint(src, dst):
    dst.mkdir()
    for name in (HEADER, TENSORS):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda d: corrupt_byte(d / TENSORS), "fails its checksum"),
        (lambda d: (d / TENSORS).write_bytes((d / TENSORS).read_bytes()[:-1000]), "truncated or corrupted"),
        (lambda d: (d / TENSORS).unlink(), "missing, truncated or corrupted"),
        (lambda d: (d / HEADER).write_text((d / HEADER).read_text()[:-50]), "unreadable or corrupted"),
        (lambda d: (d / HEADER).write_text((d / HEADER).read_text().replace('"version": 2', '"version": 99')),
         "format version 99 is not supported"),
        (lambda d: (d / HEADER).unlink(), "not a diffboost W4A4 checkpoint"),
    ],
    ids=["flipped-byte", "truncated", "no-tensors", "truncated-header", "unknown-version", "no-header"],
)
def test_damaged_checkpoints_raise_and_change_nothing(saved_flux, tmp_path, damage, message):
    directory = copy_checkpoint(saved_flux[0], tmp_path / "ckpt")
    damage(directory)
    model = fresh_flux()
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        diffboost.quant.load_quantized(model, directory)
    assert_unchanged(model, before)


def test_checkpoint_of_another_model_raises_and_changes_nothing(saved_flux):
    directory = saved_flux[0]
    other = build_denoiser("tiny-pixart")
    before = snapshot(other)
    with pytest.raises(ValueError, match="saved from a FluxTransformer2DModel, this is a PixArtTransformer2DModel"):
        diffboost.quant.load_quantized(other, directory)
    assert_unchanged(other, before)


@pytest.mark.parametrize(
    "layer,field,value,message",
    [
        ("transformer_blocks.0.attn.to_q", "out_features", 64, "transformer_blocks.0.attn.to_q.*another model"),
        ("transformer_blocks.0.norm1.linear", "scheme", "w4a8", "norm1.linear.*malformed entry"),
    ],
    ids=["shape", "unknown-scheme"],
)
def test_bad_layer_entry_raises_and_changes_nothing(saved_flux, tmp_path, layer, field, value, message):
    directory = copy_checkpoint(saved_flux[0], tmp_path / "ckpt")
    header = json.loads((directory / HEADER).read_text())
    assert header["layers"][layer][field] != value
    header["layers"][layer][field] = value
    (directory / HEADER).write_text(json.dumps(header))
    model = fresh_flux()
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        diffboost.quant.load_quantized(model, directory)
    assert_unchanged(model, before)


def test_missing_layer_raises_and_changes_nothing(saved_flux, tmp_path):
    directory = copy_checkpoint(saved_flux[0], tmp_path / "ckpt")
    header = json.loads((directory / HEADER).read_text())
    header["layers"]["transformer_blocks.9.attn.to_q"] = header["layers"]["transformer_blocks.0.attn.to_q"]
    (directory / HEADER).write_text(json.dumps(header))
    model = fresh_flux()
    before = snapshot(model)
    with pytest.raises(ValueError, match="transformer_blocks.9.attn.to_q.*does not exist"):
        diffboost.quant.load_quantized(model, directory)
    assert_unchanged(model, before)


def test_save_needs_a_quantized_model(tmp_path):
    with pytest.raises(ValueError, match="not quantized; quantize it first"):
        diffboost.quant.save_quantized(build_denoiser("tiny-pixart"), tmp_path)


def test_pipeline_round_trip(tmp_path):
    pipe = build_pipeline("tiny-pixart")
    diffboost.patch(pipe, quant=CONFIG, calibration=[example_inputs(pipe, steps=2, seed=1)])
    expected = pipe(**example_inputs(pipe, steps=2)).images
    diffboost.quant.save_quantized(pipe, tmp_path)
    assert (tmp_path / "transformer" / HEADER).is_file()

    torch.manual_seed(5)
    fresh = build_pipeline("tiny-pixart")
    diffboost.quant.load_quantized(fresh, tmp_path)
    assert torch.equal(fresh(**example_inputs(fresh, steps=2)).images, expected)
    # Loading twice is refused: the layers are already W4A4.
    with pytest.raises(ValueError, match="already quantized"):
        diffboost.quant.load_quantized(fresh, tmp_path)


def test_version_1_checkpoints_still_load(tmp_path):
    """Version 1 headers had no per-layer scheme (every layer was W4A4)."""
    model = build_denoiser("tiny-flux")
    config = W4A4Config(group_size=32, rank=16, weight_only=())
    diffboost.quant.quantize(model, config, calibration="data-free")
    diffboost.quant.save_quantized(model, tmp_path)
    header = json.loads((tmp_path / HEADER).read_text())
    header["version"] = 1
    del header["config"]["weight_only"]
    for spec in header["layers"].values():
        assert spec.pop("scheme") == "w4a4"
    (tmp_path / HEADER).write_text(json.dumps(header))
    probe = example_denoiser_inputs(model, seed=3)
    loaded = fresh_flux()
    diffboost.quant.load_quantized(loaded, tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(**probe).sample, model(**probe).sample)


def test_weight_only_unet_round_trip(tmp_path):
    """W4A16 linear and 1x1 conv layers (scheme "w4a16", kind "conv1x1") save and load bit-identically."""
    model = build_denoiser("tiny-sd")
    diffboost.quant.quantize(model, W4A4Config(group_size=32, weight_only=("*",)), calibration="data-free")
    diffboost.quant.save_quantized(model, tmp_path)
    spec = json.loads((tmp_path / HEADER).read_text())["layers"]["down_blocks.0.attentions.0.proj_in"]
    assert (spec["kind"], spec["scheme"]) == ("conv1x1", "w4a16")
    probe = example_denoiser_inputs(model, seed=5)
    torch.manual_seed(7)
    fresh = build_denoiser("tiny-sd", seed=3)
    diffboost.quant.load_quantized(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(fresh(**probe).sample, model(**probe).sample)
