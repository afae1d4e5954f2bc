"""``diffboost.patch(pipe, attention=...)`` on the tiny SD / SDXL / PixArt / FLUX / SD3 pipelines.

In bf16 the fused Triton kernel runs inside every denoiser attention layer (under the interpreter on CPU); in fp32 the
same processors run through the op's SDPA fallback, which isolates the processors' pre/post-processing: it must match
diffusers' own processors to fp32 rounding.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

import diffboost
from diffboost.integrations.attention import AttnProcessor, FluxAttnProcessor, JointAttnProcessor
from diffboost.models import build_denoiser, build_pipeline, example_denoiser_inputs, example_inputs
from diffboost.ops import dispatch_log

PRESETS = ["tiny-sd", "tiny-sdxl", "tiny-pixart", "tiny-flux", "tiny-sd3"]


def _denoiser_output(model, inputs):
    with torch.no_grad():
        out = model(**inputs, return_dict=False)[0]
    return out.float()


def _processors(model):
    return {name: proc for name, proc in model.attn_processors.items()}


@pytest.mark.parametrize("preset", PRESETS)
def test_fp32_processors_match_diffusers(preset):
    """Same math as diffusers' processors: only the attention call differs, and in fp32 it is SDPA on both sides."""
    model = build_denoiser(preset)
    inputs = example_denoiser_inputs(model, batch=2)
    reference = _denoiser_output(model, inputs)
    diffboost.patch(model, attention="exact")
    assert all(type(p) in (AttnProcessor, FluxAttnProcessor, JointAttnProcessor) for p in _processors(model).values())
    torch.testing.assert_close(_denoiser_output(model, inputs), reference, atol=2e-5, rtol=1e-5)


# SDXL's attention layers use the same processor as SD's; in bf16 (Triton under the interpreter on CPU) it would only
# repeat tiny-sd's check at several times its cost.
@pytest.mark.parametrize("preset", ["tiny-sd", "tiny-pixart", "tiny-flux", "tiny-sd3"])
def test_bf16_fused_kernel_close_to_unpatched(preset, device):
    model = build_denoiser(preset, dtype=torch.bfloat16, device=device)
    inputs = example_denoiser_inputs(model, batch=2)
    reference = _denoiser_output(model, inputs)
    before = sum(e["calls"] for e in dispatch_log() if e["backend"] == "triton")
    diffboost.patch(model, attention="exact")
    exact = _denoiser_output(model, inputs)
    assert sum(e["calls"] for e in dispatch_log() if e["backend"] == "triton") > before, "fused kernel did not run"
    diffboost.patch(model, attention="int8")
    int8 = _denoiser_output(model, inputs)
    # Exact: bf16 rounding differences only, amplified a little through the network.
    rel_exact = ((exact - reference).norm() / reference.norm()).item()
    rel_int8 = ((int8 - reference).norm() / reference.norm()).item()
    print(f"{preset}: relative L2 vs unpatched: exact {rel_exact:.2e}, int8 {rel_int8:.2e}")
    assert rel_exact < 2e-2
    assert rel_int8 < 5e-2
    assert F.cosine_similarity(int8.flatten(), reference.flatten(), dim=0) > 0.998


@pytest.mark.parametrize("preset", ["tiny-sd", "tiny-flux"])
def test_unpatch_is_bit_identical(preset):
    reference_pipe = build_pipeline(preset)
    expected = reference_pipe(**example_inputs(reference_pipe)).images
    pipe = build_pipeline(preset)
    originals = _processors(pipe.transformer if preset == "tiny-flux" else pipe.unet)
    diffboost.patch(pipe, attention="int8")
    diffboost.patch(pipe, attention="exact")  # patching twice replaces, never stacks
    pipe(**example_inputs(pipe))
    diffboost.unpatch(pipe)
    diffboost.unpatch(pipe)  # a second unpatch is a no-op
    restored = _processors(pipe.transformer if preset == "tiny-flux" else pipe.unet)
    assert all(restored[name] is proc for name, proc in originals.items()), "original processor objects come back"
    assert not diffboost.is_patched(pipe)
    assert torch.equal(pipe(**example_inputs(pipe)).images, expected)


def test_full_pipeline_with_cfg_close_to_unpatched():
    pipe = build_pipeline("tiny-sd")
    expected = pipe(**example_inputs(pipe, batch=2)).images
    diffboost.patch(pipe, attention="exact")
    got = pipe(**example_inputs(pipe, batch=2)).images
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_vae_left_alone_by_default_and_patched_on_request():
    pipe = build_pipeline("tiny-sd")
    vae_before = _processors(pipe.vae)
    diffboost.patch(pipe, attention="exact")
    assert _processors(pipe.vae) == vae_before
    diffboost.patch(pipe, attention=diffboost.AttentionConfig(include_vae=True))
    assert all(isinstance(p, AttnProcessor) for p in _processors(pipe.vae).values())
    diffboost.unpatch(pipe)
    assert _processors(pipe.vae) == vae_before


def test_fallback_reason_logged_once_per_layer(caplog):
    model = build_denoiser("tiny-sd")  # fp32: the fused kernel takes fp16/bf16 only
    inputs = example_denoiser_inputs(model)
    diffboost.patch(model, attention="exact")
    with caplog.at_level(logging.INFO, logger="diffboost"):
        _denoiser_output(model, inputs)
        _denoiser_output(model, inputs)
    notes = [r.getMessage() for r in caplog.records if "fused attention does not run here" in r.getMessage()]
    n_layers = len(_processors(model))
    assert len(notes) == n_layers, f"{len(notes)} notes for {n_layers} layers"
    assert all("dtype float32 not supported" in note for note in notes)


def test_bad_patch_arguments():
    pipe = build_pipeline("tiny-sd")
    with pytest.raises(ValueError, match="precision='fp8' not supported"):
        diffboost.patch(pipe, attention="fp8")
    with pytest.raises(TypeError, match="attention must be"):
        diffboost.patch(pipe, attention=3)
    with pytest.raises(TypeError, match="unknown keyword"):
        diffboost.patch(pipe, atention="exact")
    with pytest.raises(ValueError, match="has none of the components"):
        diffboost.patch(object(), attention="exact")
    assert not diffboost.is_patched(pipe)
