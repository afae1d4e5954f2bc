"""``diffboost.linear.distill`` on the tiny random-weight SD pipeline (CPU, one thread).

The convergence test distils on one fixed trajectory (fixed prompt and initial latents, so every pipeline call
repeats it) and checks that the training loss falls >= 5x and that the distilled pipeline reproduces the original's
output on that trajectory better than the undistilled one. It tests the training machinery (hooks, per-layer
losses, gradients, optimizer, installation of the result), not how well linear attention generalises: on fresh
trajectories of this random-weight model the feature loss falls far less.
"""

from __future__ import annotations

import pytest
import torch

import diffboost
from diffboost.integrations.linear_attention import LinearAttentionConfig
from diffboost.linear import LinearAttentionModules, distill, latest_checkpoint
from diffboost.models import PROMPTS


@pytest.fixture(autouse=True)
def _one_thread():
    """Distillation runs thousands of tiny ops, which a second thread only slows down."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_loss_falls_5x_and_output_gets_closer(tiny_sd):
    steps_per_call = 4
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    call = dict(prompt=[PROMPTS[0]], latents=latents, num_inference_steps=steps_per_call, output_type="pt")
    original = tiny_sd(**call).images
    diffboost.patch(tiny_sd, linear_attention=LinearAttentionConfig(backend="reference"))
    undistilled = tiny_sd(**call).images
    diffboost.unpatch(tiny_sd)

    result = distill(
        tiny_sd, [PROMPTS[0]], steps=64, lr=1e-3, num_inference_steps=steps_per_call,
        pipeline_kwargs={"latents": latents}, progress=False,
    )
    losses = result.losses
    assert len(losses) == 64 and all(loss > 0 for loss in losses)
    # Compare whole trajectories: the loss depends strongly on the denoising step.
    first, last = sum(losses[:steps_per_call]), sum(losses[-steps_per_call:])
    print(f"feature MSE per trajectory: first {first / steps_per_call:.3e}, last {last / steps_per_call:.3e}")
    assert first >= 5 * last

    assert all(p.grad is None for p in tiny_sd.unet.parameters()), "teachers must not train"
    assert torch.equal(tiny_sd(**call).images, original), "distill must leave the pipeline as it was"
    diffboost.patch(tiny_sd, linear_attention=LinearAttentionConfig(weights=result.modules, backend="reference"))
    distilled = tiny_sd(**call).images
    diffboost.unpatch(tiny_sd)
    err_before = (undistilled - original).pow(2).mean().item()
    err_after = (distilled - original).pow(2).mean().item()
    print(f"output MSE vs the original pipeline: undistilled {err_before:.3e}, distilled {err_after:.3e}")
    assert err_after < 0.5 * err_before


def test_checkpoints_and_resume_reproduce_an_uninterrupted_run(tiny_sd, tmp_path):
    """Optimizer steps that end inside a pipeline call (3 denoising steps, 2 per optimizer step), prompt embeddings
    as data; resuming from the step-2 checkpoint must give the very same weights and losses as running on."""
    embeds = torch.randn(3, 77, tiny_sd.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    common = dict(lr=1e-3, grad_accum=2, num_inference_steps=3, batch_size=2, seed=5)
    full = distill(tiny_sd, embeds, steps=4, checkpoint_dir=tmp_path / "full", save_every=2, **common)
    assert [p.name for p in full.checkpoints] == ["step-000002", "step-000004"]
    assert latest_checkpoint(tmp_path / "full").name == "step-000004"
    on_disk = LinearAttentionModules.load(tmp_path / "full" / "step-000004")
    for key, value in full.modules.state_dict().items():
        assert torch.equal(on_disk.state_dict()[key], value), key

    resumed = distill(tiny_sd, embeds, steps=4, resume_from=tmp_path / "full" / "step-000002", progress=False,
                      **common)
    assert resumed.losses == full.losses
    for key, value in full.modules.state_dict().items():
        assert torch.equal(resumed.modules.state_dict()[key], value), key


def test_bad_arguments(tiny_sd, tmp_path):
    with pytest.raises(ValueError, match="steps must be a positive int"):
        distill(tiny_sd, ["a"], steps=0)
    with pytest.raises(ValueError, match="lr must be a positive number"):
        distill(tiny_sd, ["a"], lr=-1.0)
    with pytest.raises(ValueError, match="save_every needs checkpoint_dir"):
        distill(tiny_sd, ["a"], save_every=10)
    with pytest.raises(ValueError, match="may not set output_type"):
        distill(tiny_sd, ["a"], pipeline_kwargs={"output_type": "pil"})
    with pytest.raises(ValueError, match="prompts_or_embeds must be"):
        distill(tiny_sd, [])
    with pytest.raises(ValueError, match="optimizer='lion' not supported"):
        distill(tiny_sd, ["a"], optimizer="lion", steps=1)
    with pytest.raises(ValueError, match="neither a checkpoint nor"):
        distill(tiny_sd, ["a"], resume_from=tmp_path)
    with pytest.raises(ValueError, match="init or resume_from, not both"):
        distill(tiny_sd, ["a"], resume_from=tmp_path, init=tmp_path)
    diffboost.patch(tiny_sd, linear_attention=True)
    with pytest.raises(ValueError, match="unpatch it"):
        distill(tiny_sd, ["a"])
    diffboost.unpatch(tiny_sd)
