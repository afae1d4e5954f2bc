"""Offline diffusers pipelines with random weights, for tests and benchmarks.

Presets (see :data:`PRESETS`) come in two sizes:

* tiny presets (``tiny-sd`` a.k.a. ``tiny``, ``tiny-sdxl``, ``tiny-flux``, ``tiny-pixart``,
  ``tiny-sd-controlnet``, ``tiny-sd-inpaint``, ``tiny-sd-img2img``) build in well under a second
  and generate 64x64 px images on a CPU in about a second, with head dims that are multiples of 8
  but not powers of two;
* full-size presets (``sd15``, ``sdxl``, ``flux``, ``pixart``) have the real architectures, from
  the JSON configs shipped in ``diffboost/models/configs``, with random weights.

Nothing is downloaded: weights are random (seeded) and the CLIP tokenizer is generated
(:func:`offline_clip_tokenizer`).  Typical use::

    pipe = build_pipeline("tiny-sd")
    images = pipe(**example_inputs(pipe)).images  # (1, 3, 64, 64) tensor in [0, 1]
"""

from .builders import build_component, build_denoiser, build_pipeline
from .inputs import PROMPTS, example_denoiser_inputs, example_inputs
from .presets import ALIASES, PRESETS, PresetSpec, get_preset, load_config, resolve_preset
from .tokenizer import offline_clip_tokenizer

__all__ = [
    "ALIASES",
    "PRESETS",
    "PROMPTS",
    "PresetSpec",
    "build_component",
    "build_denoiser",
    "build_pipeline",
    "example_denoiser_inputs",
    "example_inputs",
    "get_preset",
    "load_config",
    "offline_clip_tokenizer",
    "resolve_preset",
]
