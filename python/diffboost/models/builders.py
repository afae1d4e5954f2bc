"""Build diffusers pipelines and denoisers with random weights, offline, from the presets."""

from __future__ import annotations

import contextlib
import zlib
from typing import Any

import torch

from .presets import get_preset, load_config, resolve_preset
from .tokenizer import offline_clip_tokenizer

__all__ = ["build_pipeline", "build_denoiser", "build_component"]

# Pipeline constructor arguments that are not built from a config.  SD pipelines get no safety
# checker (it needs downloaded weights and would blank random images); FLUX and PixArt get no text
# encoders, because callers pass prompt embeddings directly (see example_inputs).
_SD_EXTRAS = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
_PIPELINE_EXTRAS: dict[str, dict[str, Any]] = {
    "StableDiffusionPipeline": _SD_EXTRAS,
    "StableDiffusionControlNetPipeline": _SD_EXTRAS,
    "StableDiffusionInpaintPipeline": _SD_EXTRAS,
    "StableDiffusionImg2ImgPipeline": _SD_EXTRAS,
    "FluxPipeline": {"text_encoder": None, "tokenizer": None, "text_encoder_2": None, "tokenizer_2": None},
    "PixArtAlphaPipeline": {"text_encoder": None, "tokenizer": None},
    "StableDiffusion3Pipeline": {f"{part}{suffix}": None for part in ("text_encoder", "tokenizer")
                                 for suffix in ("", "_2", "_3")},
}

# Attribute set on every denoiser this module builds, naming its preset, so example_inputs can
# pick the preset's resolution and prompt length when handed the pipeline or the denoiser.
PRESET_ATTRIBUTE = "_diffboost_preset"


def _component_seed(seed: int, role: str) -> int:
    # Each component gets its own seed derived from (seed, role) rather than sharing one RNG
    # stream, so a component's weights don't depend on which other components a preset has: the
    # VAE of tiny-sd-inpaint is bit-identical to tiny-sd's, and build_denoiser() equals the
    # pipeline's denoiser.
    return zlib.crc32(f"{role}:{seed}".encode())


@contextlib.contextmanager
def _construction(device: torch.device, dtype: torch.dtype, seed: int):
    """Create parameters directly on ``device`` in ``dtype`` from a private RNG stream.

    Building in place avoids materializing a float32 CPU copy first (FLUX.1 is 48 GB in float32)
    and lets GPU builds initialize on the GPU.  The caller's RNG state and default dtype are
    restored afterwards.
    """
    cuda_devices = []
    if device.type == "cuda":
        cuda_devices = [device.index if device.index is not None else torch.cuda.current_device()]
    previous_dtype = torch.get_default_dtype()
    with torch.random.fork_rng(devices=cuda_devices), device:
        torch.manual_seed(seed)
        torch.set_default_dtype(dtype)
        try:
            yield
        finally:
            torch.set_default_dtype(previous_dtype)


def _instantiate(config: dict[str, Any]):
    if "_class_name" in config:
        import diffusers

        return getattr(diffusers, config["_class_name"]).from_config(config)
    import transformers

    model_class = getattr(transformers, config["architectures"][0])
    return model_class(model_class.config_class.from_dict(config))


def _activate_control_branch(controlnet) -> None:
    # A freshly initialized ControlNet has zero output convolutions, so it adds exactly nothing
    # to the U-Net and tests could not tell whether the control branch runs at all: give them
    # PyTorch's default init.  With default init the 8-conv image encoder also shrinks the control
    # image ~20x (its features would be 2% of the latents', invisible in the output), so it gets
    # variance-preserving He init instead.
    for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
        conv.reset_parameters()
    for module in controlnet.controlnet_cond_embedding.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")


def build_component(
    preset: str,
    component: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
):
    """Build one component of a preset (e.g. ``"unet"``, ``"vae"``, ``"text_encoder"``).

    Models are created with their libraries' default random initialization, directly on
    ``device`` in ``dtype`` (``device="meta"`` builds only shapes, e.g. to count parameters of
    the full-size presets for free), in eval mode.  The same ``(preset, component, seed)`` gives
    bit-identical weights on a given device; the global RNG state is left untouched.  Not
    thread-safe: torch's default dtype is process-wide and is set to ``dtype`` while building.
    Schedulers are returned as scheduler objects (``dtype``, ``device`` and ``seed`` unused).
    """
    preset = resolve_preset(preset)
    config = load_config(preset, component)
    if component == "scheduler":
        return _instantiate(config)
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating point dtype, got {dtype}")
    device = torch.device(device)
    with _construction(device, dtype, _component_seed(seed, component)):
        model = _instantiate(config)
        if component == "controlnet":
            _activate_control_branch(model)
    # Some buffers are created explicitly in float32 or on the CPU (e.g. PixArt's sin-cos position
    # table via numpy); this moves just those, the parameters are already in place.  It calls
    # torch's Module.to because diffusers 0.42's override warns about float32 modules on every
    # dtype cast, even for models that have none.
    torch.nn.Module.to(model, device=device, dtype=dtype)
    model.eval()
    if component == get_preset(preset).denoiser_role:
        setattr(model, PRESET_ATTRIBUTE, preset)
    return model


def build_denoiser(
    preset: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
):
    """Build only the denoiser of ``preset``: its ``UNet2DConditionModel`` or transformer.

    The weights are bit-identical to those of ``build_pipeline(preset, seed=seed).unet`` (or
    ``.transformer``) built on the same device, so a benchmark of the denoiser alone measures the
    same model.  See :func:`build_component` for ``dtype``/``device``/``seed``.
    """
    return build_component(preset, get_preset(preset).denoiser_role, dtype=dtype, device=device, seed=seed)


def build_pipeline(
    preset: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
):
    """Build the diffusers pipeline of ``preset`` with random weights, without any download.

    Args:
        preset: a key of :data:`PRESETS` or :data:`ALIASES`.
        dtype: dtype of every model; created in it directly (no float32 copy is made).
        device: where the models are created.  Full-size FLUX needs a GPU (24 GB in bfloat16).
        seed: weight seed; the same seed gives bit-identical weights on a given device.

    Returns:
        A ``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``, ``FluxPipeline``,
        ``PixArtAlphaPipeline``, ``StableDiffusion3Pipeline``, ``StableDiffusionControlNetPipeline``,
        ``StableDiffusionInpaintPipeline`` or ``StableDiffusionImg2ImgPipeline`` with its
        progress bar disabled.  SD pipelines have no safety checker; FLUX, PixArt and SD3 have no
        text encoders or tokenizers and must be given prompt embeddings (:func:`example_inputs` does).
    """
    import diffusers

    preset = resolve_preset(preset)
    spec = get_preset(preset)
    components: dict[str, Any] = {}
    for role in spec.components:
        components[role] = build_component(preset, role, dtype=dtype, device=device, seed=seed)
        if role.startswith("text_encoder"):
            components[role.replace("text_encoder", "tokenizer")] = offline_clip_tokenizer()
    pipeline_class = getattr(diffusers, spec.pipeline)
    pipe = pipeline_class(**components, **_PIPELINE_EXTRAS.get(spec.pipeline, {}))
    pipe.set_progress_bar_config(disable=True)
    return pipe
