"""Deterministic, offline inputs for the preset pipelines and their denoisers."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch

from .builders import PRESET_ATTRIBUTE
from .presets import get_preset, load_config
from .tokenizer import CLIP_MAX_LENGTH

__all__ = ["example_inputs", "example_denoiser_inputs", "PROMPTS"]

#: Prompts used (cyclically) for SD-family pipelines.
PROMPTS = (
    "a photo of an astronaut riding a horse on the moon",
    "a watercolor painting of a castle on a mountain at sunset",
    "a cute cat sitting on a chair in a library, highly detailed",
    "a futuristic city street at night with neon lights, cinematic lighting",
)

# Classifier-free guidance scales typical of each pipeline (all > 1, so CFG doubles the batch).
# FLUX.1-dev's guidance is an embedding input instead, with no extra batch.
_GUIDANCE = {
    "StableDiffusionPipeline": 7.5,
    "StableDiffusionControlNetPipeline": 7.5,
    "StableDiffusionInpaintPipeline": 7.5,
    "StableDiffusionImg2ImgPipeline": 7.5,
    "StableDiffusionXLPipeline": 5.0,
    "PixArtAlphaPipeline": 4.5,
    "PixArtSigmaPipeline": 4.5,
    "StableDiffusion3Pipeline": 7.0,
    "FluxPipeline": 3.5,
}
# PixArt-alpha and -Sigma pipelines share the transformer class and the call signature.
_PIXART_PIPELINES = ("PixArtAlphaPipeline", "PixArtSigmaPipeline")
# Image-to-image strength; num_inference_steps is scaled by 1/strength so that `steps` denoising
# steps actually run.
_IMG2IMG_STRENGTH = 0.5
# When nothing tells otherwise (a denoiser not built here): the FLUX pipeline's own defaults.
_FLUX_DEFAULT_RESOLUTION = 1024
# SD3: 77 CLIP tokens then 256 T5 tokens (the pipeline's default max_sequence_length).
_DEFAULT_TEXT_TOKENS = {"FluxTransformer2DModel": 512, "PixArtTransformer2DModel": 120, "SD3Transformer2DModel": 333}
_VAE_SCALE = 8  # every preset, and every model these pipelines ship with, uses an 8x VAE
_DENOISERS = ("UNet2DConditionModel", "FluxTransformer2DModel", "PixArtTransformer2DModel", "SD3Transformer2DModel")


@dataclasses.dataclass
class _Target:
    """What inputs need to know about a pipeline or denoiser, from the object or its preset."""

    pipeline: str | None  # pipeline class name; None for a bare denoiser
    denoiser_class: str
    denoiser_config: Mapping[str, Any]
    resolution: int
    text_tokens: int
    device: torch.device
    dtype: torch.dtype


def _from_denoiser(denoiser, pipeline: str | None) -> _Target:
    from diffboost.patching import uncompiled

    denoiser = uncompiled(denoiser)
    config = denoiser.config
    kind = type(denoiser).__name__
    preset = getattr(denoiser, PRESET_ATTRIBUTE, None)
    if preset is not None:
        spec = get_preset(preset)
        resolution, text_tokens = spec.resolution, spec.text_tokens
    else:
        sample_size = config.get("sample_size")
        resolution = sample_size * _VAE_SCALE if sample_size else _FLUX_DEFAULT_RESOLUTION
        text_tokens = _DEFAULT_TEXT_TOKENS.get(kind, CLIP_MAX_LENGTH)
    return _Target(pipeline, kind, config, resolution, text_tokens, denoiser.device, denoiser.dtype)


def _target(obj) -> _Target:
    if isinstance(obj, str):
        spec = get_preset(obj)
        config = load_config(obj, spec.denoiser_role)
        return _Target(
            spec.pipeline, config["_class_name"], config, spec.resolution, spec.text_tokens,
            torch.device("cpu"), torch.float32,
        )
    if isinstance(obj, torch.nn.Module):
        return _from_denoiser(obj, None)
    denoiser = getattr(obj, "unet", None)
    if denoiser is None:
        denoiser = getattr(obj, "transformer", None)
    if denoiser is None:
        raise TypeError(f"expected a preset name, pipeline or denoiser, got {type(obj).__name__}")
    return _from_denoiser(denoiser, type(obj).__name__)


def _size(target: _Target, height: int | None, width: int | None) -> tuple[int, int]:
    return height or target.resolution, width or target.resolution


def _prompt_embeddings(target: _Target, batch: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random stand-ins for T5 (and CLIP pooled) prompt embeddings, for pipelines without encoders."""
    config, tokens = target.denoiser_config, target.text_tokens

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(target.device, target.dtype)

    if target.denoiser_class == "FluxTransformer2DModel":
        return {
            "prompt_embeds": randn(batch, tokens, config["joint_attention_dim"]),
            "pooled_prompt_embeds": randn(batch, config["pooled_projection_dim"]),
        }
    if target.denoiser_class == "SD3Transformer2DModel":
        # With CFG the pipeline would encode the empty negative prompt, which needs the encoders: pass it too.
        return {
            f"{prefix}{name}": randn(batch, *shape)
            for prefix in ("", "negative_")
            for name, shape in [("prompt_embeds", (tokens, config["joint_attention_dim"])),
                                ("pooled_prompt_embeds", (config["pooled_projection_dim"],))]
        }
    # PixArt: captions are padded to a fixed length and masked, the negative (empty) caption
    # keeps a single valid token, as T5 encodes "" to just </s>.  Prompt lengths vary across the
    # batch so that attention masking is exercised with different patterns per sample.
    mask = torch.zeros(batch, tokens, dtype=torch.long)
    for i in range(batch):
        mask[i, : max(1, tokens * (3 - i % 2) // 4)] = 1
    negative_mask = torch.zeros(batch, tokens, dtype=torch.long)
    negative_mask[:, 0] = 1
    return {
        "prompt_embeds": randn(batch, tokens, config["caption_channels"]),
        "prompt_attention_mask": mask.to(target.device),
        "negative_prompt_embeds": randn(batch, tokens, config["caption_channels"]),
        "negative_prompt_attention_mask": negative_mask.to(target.device),
    }


def example_inputs(
    pipe_or_preset,
    *,
    batch: int = 1,
    height: int | None = None,
    width: int | None = None,
    steps: int = 2,
    seed: int = 0,
) -> dict[str, Any]:
    """Keyword arguments for ``pipe(**kwargs)`` that run fully offline and deterministically.

    Args:
        pipe_or_preset: a pipeline from :func:`build_pipeline` (or any pipeline of a supported
            class), or a preset name (inputs for a float32 CPU pipeline).
        batch: number of prompts (one image each).
        height, width: image size in pixels; defaults to the preset's resolution (64 for the tiny
            presets, the native resolution for the full-size ones).
        steps: number of denoising steps that run.  For image-to-image (strength 0.5),
            ``num_inference_steps`` is ``2 * steps`` so that ``steps`` steps actually run.
        seed: seed of the latent noise generator and of every random input tensor.

    Returns:
        A dict with ``output_type="pt"`` (``pipe(**kwargs).images`` is a float tensor of shape
        ``(batch, 3, height, width)`` in ``[0, 1]``), ``num_inference_steps``, a CPU
        ``generator`` (so latents are the same on every device) and ``guidance_scale``
        (> 1 for SD, SDXL, PixArt and SD3, so classifier-free guidance doubles the denoiser batch;
        FLUX.1's distilled guidance instead).  SD-family pipelines get ``prompt`` strings (encoded
        by the pipeline with the offline tokenizer); FLUX gets random ``prompt_embeds`` /
        ``pooled_prompt_embeds``, SD3 the same and their negative counterparts; PixArt (alpha and
        Sigma) gets random masked prompt and negative prompt embeddings and
        ``use_resolution_binning=False`` so that ``height``/``width`` are used as given.
        ControlNet gets a random control ``image``, image-to-image a random init ``image``,
        inpainting a random ``image`` and a ``mask_image`` covering the central square.
    """
    target = _target(pipe_or_preset)
    if target.pipeline not in _GUIDANCE:
        raise ValueError(f"no example inputs for {target.pipeline}; supported: {', '.join(_GUIDANCE)}")
    height, width = _size(target, height, width)
    generator = torch.Generator("cpu").manual_seed(seed)
    kwargs: dict[str, Any] = {
        "num_inference_steps": steps,
        "guidance_scale": _GUIDANCE[target.pipeline],
        "output_type": "pt",
    }
    if target.pipeline in ("FluxPipeline", *_PIXART_PIPELINES, "StableDiffusion3Pipeline"):
        kwargs.update(_prompt_embeddings(target, batch, generator))
        if target.pipeline in _PIXART_PIPELINES:
            # The pipeline's default negative prompt "" may not be combined with embeddings.
            kwargs["negative_prompt"] = None
            kwargs["use_resolution_binning"] = False
    else:
        kwargs["prompt"] = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]

    # Images are passed as [0, 1] tensors, which the pipelines' image processors accept as is.
    if target.pipeline == "StableDiffusionControlNetPipeline":
        kwargs["image"] = torch.rand(batch, 3, height, width, generator=generator)
    elif target.pipeline == "StableDiffusionImg2ImgPipeline":
        kwargs["image"] = torch.rand(batch, 3, height, width, generator=generator)
        kwargs["strength"] = _IMG2IMG_STRENGTH
        kwargs["num_inference_steps"] = round(steps / _IMG2IMG_STRENGTH)
    elif target.pipeline == "StableDiffusionInpaintPipeline":
        kwargs["image"] = torch.rand(batch, 3, height, width, generator=generator)
        mask = torch.zeros(batch, 1, height, width)
        mask[:, :, height // 4 : height - height // 4, width // 4 : width - width // 4] = 1.0
        kwargs["mask_image"] = mask

    if target.pipeline != "StableDiffusionImg2ImgPipeline":  # it takes its size from the image
        kwargs["height"], kwargs["width"] = height, width
    # Created last so the random tensors above don't depend on whether the generator was used.
    kwargs["generator"] = torch.Generator("cpu").manual_seed(seed)
    return kwargs


def example_denoiser_inputs(
    denoiser_or_preset,
    *,
    batch: int = 1,
    height: int | None = None,
    width: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Keyword arguments for one call ``denoiser(**kwargs)`` of a U-Net or transformer.

    The tensors have the shapes, dtype and device the pipeline would pass at one denoising step
    of ``batch`` latents for ``height`` x ``width`` px images (default: the preset's resolution).
    ``batch`` counts denoiser rows: pass twice the number of prompts to mimic CFG batching.

    * ``UNet2DConditionModel``: ``sample``, ``timestep``, ``encoder_hidden_states`` (77 tokens),
      plus ``added_cond_kwargs`` (pooled text embeds, 6 time ids) for SDXL's ``text_time``.
    * ``FluxTransformer2DModel``: packed ``hidden_states``, ``encoder_hidden_states``,
      ``pooled_projections``, ``timestep`` in [0, 1], ``img_ids``, ``txt_ids`` and ``guidance``
      (when the model has guidance embeddings).
    * ``PixArtTransformer2DModel``: ``hidden_states``, masked ``encoder_hidden_states``,
      ``timestep`` and ``added_cond_kwargs``.
    * ``SD3Transformer2DModel``: ``hidden_states``, ``encoder_hidden_states`` (CLIP + T5 tokens),
      ``pooled_projections`` and a float ``timestep`` in [0, 1000].
    """
    target = _target(denoiser_or_preset)
    if target.denoiser_class not in _DENOISERS:
        raise ValueError(f"no example inputs for {target.denoiser_class}; supported: {', '.join(_DENOISERS)}")
    height, width = _size(target, height, width)
    config = target.denoiser_config
    generator = torch.Generator("cpu").manual_seed(seed)
    latent_h, latent_w = height // _VAE_SCALE, width // _VAE_SCALE
    device, dtype = target.device, target.dtype

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device, dtype)

    if target.denoiser_class == "FluxTransformer2DModel":
        # 2x2 patches of the latents are packed into tokens; ids give (0, row, col) per token.
        rows, cols = latent_h // 2, latent_w // 2
        img_ids = torch.zeros(rows, cols, 3)
        img_ids[..., 1] = torch.arange(rows)[:, None]
        img_ids[..., 2] = torch.arange(cols)[None, :]
        kwargs = {
            "hidden_states": randn(batch, rows * cols, config["in_channels"]),
            "timestep": torch.full((batch,), 0.5, device=device, dtype=dtype),
            "img_ids": img_ids.reshape(rows * cols, 3).to(device, dtype),
            "txt_ids": torch.zeros(target.text_tokens, 3, device=device, dtype=dtype),
        }
        embeddings = _prompt_embeddings(target, batch, generator)
        kwargs["encoder_hidden_states"] = embeddings["prompt_embeds"]
        kwargs["pooled_projections"] = embeddings["pooled_prompt_embeds"]
        if config["guidance_embeds"]:
            kwargs["guidance"] = torch.full((batch,), _GUIDANCE["FluxPipeline"], device=device, dtype=dtype)
        return kwargs

    if target.denoiser_class == "SD3Transformer2DModel":
        embeddings = _prompt_embeddings(target, batch, generator)
        return {
            "hidden_states": randn(batch, config["in_channels"], latent_h, latent_w),
            "encoder_hidden_states": embeddings["prompt_embeds"],
            "pooled_projections": embeddings["pooled_prompt_embeds"],
            "timestep": torch.full((batch,), 500.0, device=device, dtype=dtype),  # sigma x 1000, as the pipeline
        }

    timestep = torch.full((batch,), 500, device=device, dtype=torch.long)
    if target.denoiser_class == "PixArtTransformer2DModel":
        embeddings = _prompt_embeddings(target, batch, generator)
        added = {"resolution": None, "aspect_ratio": None}
        additional = config.get("use_additional_conditions")
        if additional is None:  # the model's own rule: only the 1024 px model (sample_size 128)
            additional = config["sample_size"] == 128
        if additional:
            added = {
                "resolution": torch.tensor([[height, width]] * batch, device=device, dtype=dtype),
                "aspect_ratio": torch.tensor([[height / width]] * batch, device=device, dtype=dtype),
            }
        return {
            "hidden_states": randn(batch, config["in_channels"], latent_h, latent_w),
            "encoder_hidden_states": embeddings["prompt_embeds"],
            "encoder_attention_mask": embeddings["prompt_attention_mask"],
            "timestep": timestep,
            "added_cond_kwargs": added,
        }

    kwargs = {
        "sample": randn(batch, config["in_channels"], latent_h, latent_w),
        "timestep": timestep,
        "encoder_hidden_states": randn(batch, CLIP_MAX_LENGTH, config["cross_attention_dim"]),
    }
    if config.get("addition_embed_type") == "text_time":
        time_ids = 6 * config["addition_time_embed_dim"]
        kwargs["added_cond_kwargs"] = {
            "text_embeds": randn(batch, config["projection_class_embeddings_input_dim"] - time_ids),
            # (original size, crop top-left, target size), as SDXL's pipeline builds them.
            "time_ids": torch.tensor([[height, width, 0, 0, height, width]] * batch).to(device, dtype),
        }
    return kwargs
