"""Tests of diffboost.models: offline random-weight pipelines, their inputs and the tokenizer."""

import functools
import json
from importlib import resources

import pytest
import torch

from diffboost import models
from diffboost.models import (
    PRESETS,
    build_component,
    build_denoiser,
    build_pipeline,
    example_denoiser_inputs,
    example_inputs,
    load_config,
    offline_clip_tokenizer,
)

TINY = [name for name in PRESETS if name.startswith("tiny")]
FULL = ["sd15", "sdxl", "flux", "pixart", "sd3"]

PIPELINE_CLASSES = {
    "tiny-sd": "StableDiffusionPipeline",
    "tiny-sdxl": "StableDiffusionXLPipeline",
    "tiny-flux": "FluxPipeline",
    "tiny-pixart": "PixArtAlphaPipeline",
    "tiny-sd3": "StableDiffusion3Pipeline",
    "tiny-sd-controlnet": "StableDiffusionControlNetPipeline",
    "tiny-sd-inpaint": "StableDiffusionInpaintPipeline",
    "tiny-sd-img2img": "StableDiffusionImg2ImgPipeline",
}


@functools.lru_cache(maxsize=None)
def _pipe(name):
    # Shared by read-only tests; tests that compare builds build their own.
    return build_pipeline(name)


def _denoiser(pipe):
    return pipe.unet if hasattr(pipe, "unet") else pipe.transformer


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_preset_names():
    assert set(PIPELINE_CLASSES) | set(FULL) == set(PRESETS)
    assert all(isinstance(text, str) and text for text in PRESETS.values())
    assert models.resolve_preset("tiny") == "tiny-sd"
    with pytest.raises(KeyError):
        models.resolve_preset("sd-9000")


@pytest.mark.parametrize("name", TINY)
def test_tiny_preset_generates(name):
    pipe = _pipe(name)
    assert type(pipe).__name__ == PIPELINE_CLASSES[name]
    images = pipe(**example_inputs(pipe)).images
    assert images.shape == (1, 3, 64, 64)
    assert torch.isfinite(images).all()
    assert 0 <= images.min() and images.max() <= 1 and images.std() > 0.01
    assert torch.equal(images, pipe(**example_inputs(pipe)).images)


@pytest.mark.parametrize("name", TINY)
def test_tiny_preset_batch_and_size(name):
    pipe = _pipe(name)
    images = pipe(**example_inputs(pipe, batch=2, height=32, width=48, seed=3)).images
    assert images.shape == (2, 3, 32, 48)
    assert torch.isfinite(images).all()
    # Different prompts (or embeddings) and noise per sample give different images.
    assert not torch.equal(images[0], images[1])


def test_example_inputs_from_name_match_pipeline():
    for name in TINY:
        from_name, from_pipe = example_inputs(name), example_inputs(_pipe(name))
        assert from_name.keys() == from_pipe.keys()
        for key, value in from_name.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, from_pipe[key]), (name, key)
    # CFG is on for the pipelines that use it (later tests rely on the doubled batch).
    for name in ["tiny-sd", "tiny-sdxl", "tiny-pixart", "tiny-sd3", "tiny-sd-controlnet"]:
        assert example_inputs(name)["guidance_scale"] > 1


def test_pixart_sigma_pipeline_gets_inputs():
    """PixArt-Sigma (e.g. ``diffboost bench --model`` on a local PixArt-Sigma pipeline) takes PixArt-alpha's inputs."""
    import diffusers

    alpha = _pipe("tiny-pixart")
    sigma = diffusers.PixArtSigmaPipeline(tokenizer=None, text_encoder=None, vae=alpha.vae,
                                          transformer=alpha.transformer, scheduler=alpha.scheduler)
    sigma.set_progress_bar_config(disable=True)
    kwargs = example_inputs(sigma, batch=2)
    assert kwargs["guidance_scale"] > 1 and kwargs["prompt_attention_mask"].shape[0] == 2
    images = sigma(**kwargs).images
    assert images.shape == (2, 3, 64, 64) and torch.isfinite(images).all()


def test_img2img_runs_requested_steps():
    pipe = _pipe("tiny-sd-img2img")
    calls = []
    handle = pipe.unet.register_forward_hook(lambda *args: calls.append(1))
    try:
        pipe(**example_inputs(pipe, steps=3))
    finally:
        handle.remove()
    assert len(calls) == 3


def test_same_seed_gives_identical_weights_and_images():
    a, b, c = build_pipeline("tiny-sd"), build_pipeline("tiny-sd"), build_pipeline("tiny-sd", seed=1)
    for role in ("unet", "vae", "text_encoder"):
        assert _same_weights(getattr(a, role), getattr(b, role))
        assert not _same_weights(getattr(a, role), getattr(c, role))
    assert torch.equal(a(**example_inputs(a)).images, b(**example_inputs(b)).images)
    assert _same_weights(build_denoiser("tiny-sd"), a.unet)
    # Components shared between presets are the same weights.
    assert _same_weights(_pipe("tiny-sd-inpaint").vae, a.vae)


def test_builders_leave_global_state_alone():
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    build_denoiser("tiny-pixart", dtype=torch.bfloat16)
    assert torch.equal(torch.rand(4), expected)
    assert torch.get_default_dtype() == torch.float32


def test_dtype_and_device():
    denoiser = build_denoiser("tiny-flux", dtype=torch.bfloat16)
    assert {p.dtype for p in denoiser.parameters()} == {torch.bfloat16}
    assert {b.dtype for b in denoiser.buffers() if b.is_floating_point()} <= {torch.bfloat16}
    meta = build_denoiser("tiny-sd", device="meta")
    assert all(p.is_meta for p in meta.parameters())


def test_tiny_attention_head_dims():
    # Later kernels need head_dim % 8 == 0; non-powers of two catch kernels that assume them.
    for name in TINY:
        pipe = _pipe(name)
        head_dims = {
            module.inner_dim // module.heads
            for role in ("unet", "transformer", "controlnet")
            if getattr(pipe, role, None) is not None
            for module in getattr(pipe, role).modules()
            if type(module).__name__.endswith("Attention")
        }
        assert head_dims, name
        assert all(d % 8 == 0 and d & (d - 1) != 0 for d in head_dims), (name, head_dims)


def test_tiny_sd_unet_layout_matches_sd15():
    unet = _pipe("tiny-sd").unet
    full = load_config("sd15", "unet")
    assert unet.config.layers_per_block == full["layers_per_block"] == 2
    kinds = [type(block).__name__ for block in unet.down_blocks]
    assert kinds == ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
    assert [block.downsamplers is not None for block in unet.down_blocks] == [True, True, False]
    assert _pipe("tiny-sd-inpaint").unet.config.in_channels == 9


@pytest.mark.parametrize("name", TINY)
def test_example_denoiser_inputs(name):
    denoiser = _denoiser(_pipe(name))
    with torch.no_grad():
        out = denoiser(**example_denoiser_inputs(denoiser, batch=2), return_dict=False)[0]
    assert out.shape[0] == 2 and torch.isfinite(out).all()


def test_control_image_changes_output():
    pipe = _pipe("tiny-sd-controlnet")
    blank = example_inputs(pipe)
    blank["image"] = torch.zeros_like(blank["image"])
    assert (pipe(**example_inputs(pipe)).images - pipe(**blank).images).abs().max() > 1e-3


def test_tokenizer_round_trip(tmp_path):
    tokenizer = offline_clip_tokenizer(tmp_path)
    assert (tmp_path / "vocab.json").is_file() and (tmp_path / "merges.txt").is_file()
    assert tokenizer.model_max_length == 77
    prompt = "a photo of an astronaut riding a horse on the moon"
    ids = tokenizer(prompt, padding="max_length", max_length=77).input_ids
    assert len(ids) == 77
    assert ids[0] == tokenizer.bos_token_id and tokenizer.eos_token_id in ids
    assert ids[-1] == tokenizer.pad_token_id == tokenizer.eos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == prompt
    # Merges make common prompt words single tokens, as with the real vocabulary.
    assert len(tokenizer.tokenize(prompt)) == len(prompt.split())
    # Any text encodes (every byte is a token); ids fit both the real and the tiny encoders.
    ids = tokenizer("Zürich 2024: \u732b & emoji \U0001f600!").input_ids
    vocab_size = len(tokenizer)
    assert max(ids) < vocab_size <= 49408
    assert _pipe("tiny-sd").text_encoder.config.vocab_size == vocab_size
    # <|endoftext|> has the largest id: legacy CLIP configs (eos_token_id 2) pool at argmax(ids).
    assert tokenizer.eos_token_id == vocab_size - 1
    vocab = json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == vocab_size and sum(len(t) == 1 for t in vocab) == 256


def _config_files():
    root = resources.files("diffboost.models").joinpath("configs")
    return sorted(f"{d.name}/{f.name}" for d in root.iterdir() if d.is_dir() for f in d.iterdir())


def test_config_jsons_load():
    import diffusers
    import transformers

    files = _config_files()
    used = set()
    for name in FULL:
        for component in models.get_preset(name).components:
            config = load_config(name, component)
            used.add(f"{name}/{component}.json")
            if "_class_name" in config:
                cls = getattr(diffusers, config["_class_name"])
                _, unused, _ = cls.extract_init_dict(config)
                assert not unused, (name, component, unused)  # every key is a constructor argument
            else:
                cls = getattr(transformers, config["architectures"][0])
                assert cls.config_class.from_dict(config).vocab_size == 49408
    assert used == set(files)


# Parameter counts of the real checkpoints, checked on the meta device (shapes only, no memory).
@pytest.mark.parametrize(
    "name, component, count",
    [
        ("sd15", "unet", 859_520_964),
        ("sd15", "vae", 83_653_863),
        ("sd15", "text_encoder", 123_060_480),
        ("sdxl", "unet", 2_567_463_684),
        ("sdxl", "text_encoder_2", 694_659_840),
        ("flux", "transformer", 11_901_408_320),
    ],
)
def test_full_size_parameter_counts(name, component, count):
    model = build_component(name, component, device="meta")
    assert sum(p.numel() for p in model.parameters()) == count


def test_full_size_flux_block_structure():
    flux = build_denoiser("flux", device="meta")
    assert (len(flux.transformer_blocks), len(flux.single_transformer_blocks)) == (19, 38)
    assert flux.config.num_attention_heads * flux.config.attention_head_dim == 3072
    pixart = build_denoiser("pixart", device="meta")
    assert len(pixart.transformer_blocks) == 28
    assert pixart.config.num_attention_heads * pixart.config.attention_head_dim == 1152


@pytest.mark.slow
def test_sd15_builds_and_runs_on_cpu():
    pipe = build_pipeline("sd15")
    assert sum(p.numel() for p in pipe.unet.parameters()) == 859_520_964
    images = pipe(**example_inputs(pipe, height=64, width=64, steps=1)).images
    assert images.shape == (1, 3, 64, 64) and torch.isfinite(images).all()
