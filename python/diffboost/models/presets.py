"""Preset definitions: which components each preset has and the configuration of each component.

Full-size presets read the configurations of the public architectures from the JSON files under
``configs/`` (shipped with the package).  Tiny presets are defined here, in Python, because their
sizes are chosen to exercise specific code paths and the comments say which.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Callable, Mapping
from importlib import resources
from typing import Any, Union

from .tokenizer import BOS_TOKEN, CLIP_MAX_LENGTH, EOS_TOKEN, clip_vocabulary

__all__ = ["PRESETS", "ALIASES", "PresetSpec", "get_preset", "load_config", "resolve_preset"]

# A component's configuration: a JSON file under configs/, a dict, or a function returning one
# (for configs that depend on the offline tokenizer's vocabulary size, computed on first use).
ConfigSource = Union[str, Mapping[str, Any], Callable[[], Mapping[str, Any]]]


@dataclasses.dataclass(frozen=True)
class PresetSpec:
    """How to assemble one preset.

    Attributes:
        description: one-line human description (the value in :data:`PRESETS`).
        pipeline: name of the ``diffusers`` pipeline class.
        components: component role (the pipeline's ``__init__`` argument name, e.g. ``"unet"``)
            to configuration.  Text encoders get an offline CLIP tokenizer each.
        resolution: default image height and width in pixels for :func:`example_inputs`.
        text_tokens: sequence length of the random prompt embeddings passed to pipelines without
            text encoders (FLUX, PixArt); SD-family presets always use CLIP's 77 tokens.
    """

    description: str
    pipeline: str
    components: Mapping[str, ConfigSource]
    resolution: int
    text_tokens: int = CLIP_MAX_LENGTH

    @property
    def denoiser_role(self) -> str:
        """``"unet"`` or ``"transformer"``."""
        return "unet" if "unet" in self.components else "transformer"


def _tiny_clip_text(architecture: str, hidden_act: str) -> dict[str, Any]:
    """A 2-layer, 32-wide CLIP text encoder whose vocabulary is the offline tokenizer's.

    Two layers because SDXL reads the penultimate hidden state.  The special-token ids are the
    offline tokenizer's, so the pooled output is taken at the first ``<|endoftext|>``.
    """
    vocab, _ = clip_vocabulary()
    return {
        "architectures": [architecture],
        "model_type": "clip_text_model",
        "vocab_size": len(vocab),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "max_position_embeddings": CLIP_MAX_LENGTH,
        "hidden_act": hidden_act,
        "projection_dim": 32,
        "bos_token_id": vocab[BOS_TOKEN],
        "eos_token_id": vocab[EOS_TOKEN],
        "pad_token_id": vocab[EOS_TOKEN],
    }


def _tiny_sd_text_encoder() -> dict[str, Any]:
    return _tiny_clip_text("CLIPTextModel", "quick_gelu")


def _tiny_sdxl_text_encoder_2() -> dict[str, Any]:
    return _tiny_clip_text("CLIPTextModelWithProjection", "gelu")


# SD 1.5's U-Net in miniature: the same block pattern (cross-attention down blocks with
# downsamplers, a plain last down block without one, layers_per_block=2, mirrored up blocks) so
# skip-connection indices line up with SD 1.5's (3 per down block: 2 resnets + 1 downsampler).
# ``attention_head_dim`` is, as in SD 1.x configs, really the number of heads: 2 heads over 48
# and 80 channels give head dims 24 and 40 (multiples of 8, not powers of two, like SD 1.5's 40).
# With 64x64 px images (8x8 latents) self-attention runs over 64 tokens (8x8, head dim 24),
# 16 tokens (4x4, head dim 40) and 4 tokens in the mid block (2x2, head dim 40); cross-attention
# keys are the 77 CLIP tokens.
_TINY_SD_UNET: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel",
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": [48, 80, 80],
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "attention_head_dim": 2,
    "cross_attention_dim": 32,
    "norm_num_groups": 8,
}

# The SD inpainting architecture: the U-Net also sees the mask (1) and masked-image latents (4).
_TINY_SD_INPAINT_UNET: dict[str, Any] = {**_TINY_SD_UNET, "in_channels": 9}

# ControlNetModel mirrors the encoder half of the U-Net it conditions.  The conditioning embedding
# downsamples the control image 3 times (4 stages) to match the VAE's factor of 8.
_TINY_SD_CONTROLNET: dict[str, Any] = {
    "_class_name": "ControlNetModel",
    **{
        key: _TINY_SD_UNET[key]
        for key in (
            "in_channels",
            "layers_per_block",
            "block_out_channels",
            "down_block_types",
            "attention_head_dim",
            "cross_attention_dim",
            "norm_num_groups",
        )
    },
    "conditioning_embedding_out_channels": [16, 32, 48, 64],
}

# An 8x VAE like the real ones (4 stages) so pixel/latent sizes relate as in SD.  The mid-block
# attention is single-head over 48 channels (head dim 48, again not a power of two).
_TINY_VAE: dict[str, Any] = {
    "_class_name": "AutoencoderKL",
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": [24, 48, 48, 48],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 64,
    "scaling_factor": 0.18215,
}

# SDXL's U-Net in miniature: no attention in the first block, cross-attention blocks after it with
# more transformer layers in the deeper one, linear projections, and the "text_time" added
# conditioning.  Head dim 24 everywhere (48/2, 96/4), as SDXL keeps it constant (64).  The added
# embedding input is 6 time ids x 8 + the 32-dim pooled output of text encoder 2 = 80, and the
# cross-attention dim is the two encoders' hidden sizes concatenated, 32 + 32.  With 64x64 px
# images self-attention runs over 16 (4x4) and 4 (2x2, also the mid block) tokens.
_TINY_SDXL_UNET: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel",
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": [32, 48, 96],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "attention_head_dim": [2, 2, 4],
    "transformer_layers_per_block": [1, 1, 2],
    "use_linear_projection": True,
    "cross_attention_dim": 64,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 80,
    "norm_num_groups": 8,
}

# FLUX.1 in miniature: 2 double-stream + 2 single-stream blocks, 2 heads of dim 24 whose rotary
# axes (8, 8, 8) sum to the head dim, guidance embedding on as in FLUX.1-dev, and a 16-channel VAE
# so the packed latent width is 64 as in the real model.  With 64x64 px images the joint
# attention runs over 16 image tokens (2x2-packed 8x8 latents) + 16 text tokens = 32 tokens.
_TINY_FLUX_TRANSFORMER: dict[str, Any] = {
    "_class_name": "FluxTransformer2DModel",
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 2,
    "num_single_layers": 2,
    "attention_head_dim": 24,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "pooled_projection_dim": 32,
    "guidance_embeds": True,
    "axes_dims_rope": [8, 8, 8],
}

_TINY_FLUX_VAE: dict[str, Any] = {
    **_TINY_VAE,
    "latent_channels": 16,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}

# PixArt-alpha in miniature: 2 layers of 2 heads x 24, learned sigma (8 output channels), T5-like
# caption features of width 32.  The additional (resolution, aspect ratio) conditions of the
# 1024 px model are off because the pipeline only provides them for sample_size 128.  With
# 64x64 px images self-attention runs over 16 tokens (8x8 latents, patch 2) and cross-attention
# over 16 masked caption tokens.
_TINY_PIXART_TRANSFORMER: dict[str, Any] = {
    "_class_name": "PixArtTransformer2DModel",
    "sample_size": 8,
    "patch_size": 2,
    "in_channels": 4,
    "out_channels": 8,
    "num_layers": 2,
    "num_attention_heads": 2,
    "attention_head_dim": 24,
    "cross_attention_dim": 48,
    "caption_channels": 32,
    "use_additional_conditions": False,
}

# SD3.5-medium's MMDiT in miniature: 2 joint blocks of 2 heads x 24 with RMS-normed Q/K, the first also with
# the image-only second attention of the dual-attention (MMDiT-X) layers, the last context-pre-only; 16-channel
# latents as in SD3. With 64x64 px images joint attention runs over 16 image tokens (8x8 latents, patch 2) + 16
# text tokens.
_TINY_SD3_TRANSFORMER: dict[str, Any] = {
    "_class_name": "SD3Transformer2DModel",
    "sample_size": 8,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 2,
    "attention_head_dim": 24,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "caption_projection_dim": 48,
    "pooled_projection_dim": 32,
    "pos_embed_max_size": 16,
    "dual_attention_layers": [0],
    "qk_norm": "rms_norm",
}

_TINY_SD3_VAE: dict[str, Any] = {**_TINY_FLUX_VAE, "scaling_factor": 1.5305, "shift_factor": 0.0609}

_TINY_SD = {
    "unet": _TINY_SD_UNET,
    "vae": _TINY_VAE,
    "text_encoder": _tiny_sd_text_encoder,
    "scheduler": "sd15/scheduler.json",
}
_TINY_TEXT_TOKENS = 16


_SPECS: dict[str, PresetSpec] = {
    "tiny-sd": PresetSpec(
        "Tiny SD 1.x text-to-image (random weights, seconds on CPU): U-Net head dims 24/40, "
        "8x VAE, 2-layer CLIP text encoder, DDIM.",
        "StableDiffusionPipeline",
        _TINY_SD,
        resolution=64,
    ),
    "tiny-sd-controlnet": PresetSpec(
        "tiny-sd plus a ControlNet mirroring its U-Net; its zero convolutions are randomized so "
        "the control image visibly changes the output.",
        "StableDiffusionControlNetPipeline",
        {**_TINY_SD, "controlnet": _TINY_SD_CONTROLNET},
        resolution=64,
    ),
    "tiny-sd-inpaint": PresetSpec(
        "tiny-sd with the 9-channel inpainting U-Net (latents + mask + masked-image latents).",
        "StableDiffusionInpaintPipeline",
        {**_TINY_SD, "unet": _TINY_SD_INPAINT_UNET},
        resolution=64,
    ),
    "tiny-sd-img2img": PresetSpec(
        "tiny-sd components in an image-to-image pipeline.",
        "StableDiffusionImg2ImgPipeline",
        _TINY_SD,
        resolution=64,
    ),
    "tiny-sdxl": PresetSpec(
        "Tiny SDXL: text_time added conditioning, two CLIP text encoders (the second with "
        "projection), transformer_layers_per_block (1, 1, 2), head dim 24, DDIM.",
        "StableDiffusionXLPipeline",
        {
            "unet": _TINY_SDXL_UNET,
            "vae": _TINY_VAE,
            "text_encoder": _tiny_sd_text_encoder,
            "text_encoder_2": _tiny_sdxl_text_encoder_2,
            "scheduler": "sdxl/scheduler.json",
        },
        resolution=64,
    ),
    "tiny-flux": PresetSpec(
        "Tiny FLUX.1: 2 double + 2 single blocks, 2 heads x 24, guidance embedding, 16-channel "
        "VAE, flow-matching Euler; no text encoders (prompt embeddings are passed directly).",
        "FluxPipeline",
        {
            "transformer": _TINY_FLUX_TRANSFORMER,
            "vae": _TINY_FLUX_VAE,
            "scheduler": "flux/scheduler.json",
        },
        resolution=64,
        text_tokens=_TINY_TEXT_TOKENS,
    ),
    "tiny-pixart": PresetSpec(
        "Tiny PixArt-alpha: 2 layers, 2 heads x 24, learned sigma, DDIM; no text encoder (masked "
        "prompt embeddings are passed directly).",
        "PixArtAlphaPipeline",
        {
            "transformer": _TINY_PIXART_TRANSFORMER,
            "vae": _TINY_VAE,
            "scheduler": "pixart/scheduler.json",
        },
        resolution=64,
        text_tokens=_TINY_TEXT_TOKENS,
    ),
    "tiny-sd3": PresetSpec(
        "Tiny SD3.5-style MMDiT: 2 joint blocks, 2 heads x 24, QK RMSNorm, one dual-attention block, 16-channel "
        "VAE, flow-matching Euler; no text encoders (prompt embeddings are passed directly).",
        "StableDiffusion3Pipeline",
        {
            "transformer": _TINY_SD3_TRANSFORMER,
            "vae": _TINY_SD3_VAE,
            "scheduler": "sd3/scheduler.json",
        },
        resolution=64,
        text_tokens=_TINY_TEXT_TOKENS,
    ),
    "sd15": PresetSpec(
        "Stable Diffusion 1.5 architecture with random weights: U-Net (859.5M params), VAE, "
        "CLIP ViT-L/14 text encoder, offline tokenizer, DDIM; 512x512 px.",
        "StableDiffusionPipeline",
        {
            "unet": "sd15/unet.json",
            "vae": "sd15/vae.json",
            "text_encoder": "sd15/text_encoder.json",
            "scheduler": "sd15/scheduler.json",
        },
        resolution=512,
    ),
    "sdxl": PresetSpec(
        "SDXL base 1.0 architecture with random weights: U-Net (2.57B params), VAE, CLIP ViT-L "
        "and OpenCLIP ViT-bigG text encoders, offline tokenizers, DDIM; 1024x1024 px.",
        "StableDiffusionXLPipeline",
        {
            "unet": "sdxl/unet.json",
            "vae": "sdxl/vae.json",
            "text_encoder": "sdxl/text_encoder.json",
            "text_encoder_2": "sdxl/text_encoder_2.json",
            "scheduler": "sdxl/scheduler.json",
        },
        resolution=1024,
    ),
    "flux": PresetSpec(
        "FLUX.1-dev architecture with random weights: transformer (11.9B params, 19 double + 38 "
        "single blocks, 24 heads x 128), 16-channel VAE, flow-matching Euler; the CLIP/T5 text "
        "encoders are omitted (512 random T5-sized prompt embeddings are passed directly); "
        "1024x1024 px.  Needs ~24 GB in bfloat16.",
        "FluxPipeline",
        {
            "transformer": "flux/transformer.json",
            "vae": "flux/vae.json",
            "scheduler": "flux/scheduler.json",
        },
        resolution=1024,
        text_tokens=512,
    ),
    "sd3": PresetSpec(
        "Stable Diffusion 3.5 Medium architecture with random weights: MMDiT-X transformer (24 joint blocks, 24 "
        "heads x 64, QK RMSNorm, dual attention in the first 13), 16-channel VAE, flow-matching Euler; the CLIP/T5 "
        "text encoders are omitted (333 random prompt embeddings, 77 CLIP + 256 T5 tokens, are passed directly); "
        "1024x1024 px.",
        "StableDiffusion3Pipeline",
        {
            "transformer": "sd3/transformer.json",
            "vae": "sd3/vae.json",
            "scheduler": "sd3/scheduler.json",
        },
        resolution=1024,
        text_tokens=333,
    ),
    "pixart": PresetSpec(
        "PixArt-alpha XL-2 1024 architecture with random weights: transformer (28 layers, 16 "
        "heads x 72), VAE, DDIM; the T5 text encoder is omitted (120 random masked T5-sized "
        "prompt embeddings are passed directly); 1024x1024 px.",
        "PixArtAlphaPipeline",
        {
            "transformer": "pixart/transformer.json",
            "vae": "pixart/vae.json",
            "scheduler": "pixart/scheduler.json",
        },
        resolution=1024,
        text_tokens=120,
    ),
}

#: Preset name -> one-line description.  Every name is accepted by the builders.
PRESETS: dict[str, str] = {name: spec.description for name, spec in _SPECS.items()}

#: Alternative names accepted by the builders.
ALIASES: dict[str, str] = {"tiny": "tiny-sd"}


def resolve_preset(name: str) -> str:
    """Return the canonical preset name for ``name`` (resolving aliases); raise ``KeyError``."""
    name = ALIASES.get(name, name)
    if name not in _SPECS:
        known = ", ".join([*_SPECS, *ALIASES])
        raise KeyError(f"unknown diffboost preset {name!r}; known presets: {known}")
    return name


def get_preset(name: str) -> PresetSpec:
    """Return the :class:`PresetSpec` of preset ``name`` (aliases accepted)."""
    return _SPECS[resolve_preset(name)]


def load_config(preset: str, component: str) -> dict[str, Any]:
    """Return a fresh copy of the configuration of ``component`` (e.g. ``"unet"``) of ``preset``.

    Diffusers configurations carry ``_class_name``; transformers configurations carry
    ``architectures`` and ``model_type``, as in the ``config.json`` files of hub repositories.
    """
    spec = get_preset(preset)
    if component not in spec.components:
        raise KeyError(f"preset {preset!r} has no {component!r}; it has {', '.join(spec.components)}")
    source = spec.components[component]
    if isinstance(source, str):
        path = resources.files(__package__).joinpath("configs")
        for part in source.split("/"):  # one part per call: Python 3.10's joinpath takes one
            path = path.joinpath(part)
        text = path.read_text(encoding="utf-8")
        return json.loads(text)
    if callable(source):
        return dict(source())
    return copy.deepcopy(dict(source))
