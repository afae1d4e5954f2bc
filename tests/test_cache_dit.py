"""Block caching on transformer pipelines (tiny FLUX and PixArt): uniform and first_block modes.

Oracle for a partial step: the plain transformer with its last block's output overridden (by a hook) with the
first block's input plus the residual the blocks added at the full step — what skipping the stack means.
"""

from __future__ import annotations

import pytest
import torch
from test_cache import count_calls, record_calls, single_thread  # noqa: F401  (single_thread: autouse fixture)

import diffboost
from diffboost.cache import BlockCacheConfig, stats
from diffboost.models import example_inputs


def run(pipe, steps, **extra):
    kwargs = example_inputs(pipe, steps=steps)
    kwargs.update(output_type="latent")
    kwargs.update(extra)
    return pipe(**kwargs).images


def first_and_last(model):
    """Modules inside the first and the last transformer block: they run only when their block does."""
    blocks = [*model.transformer_blocks, *getattr(model, "single_transformer_blocks", [])]
    return blocks[0].norm1, blocks[-1].norm1 if hasattr(blocks[-1], "norm1") else blocks[-1].norm


def stack_ends(model):
    blocks = [*model.transformer_blocks, *getattr(model, "single_transformer_blocks", [])]
    return blocks[0], blocks[-1]


def stack_input_embedders(model):
    """The modules whose outputs enter the first block (a skipped stack never calls the block itself): FLUX's image
    and text embedders, PixArt's patch embedding."""
    return (model.x_embedder, model.context_embedder) if hasattr(model, "x_embedder") else (model.pos_embed,)


def test_interval_one_is_bit_identical_and_unpatch_restores(tiny_flux):
    reference = run(tiny_flux, 3)
    diffboost.patch(tiny_flux, cache=1)  # an int on a DiT: uniform block caching
    assert stats(tiny_flux).method == "block_cache"
    assert torch.equal(run(tiny_flux, 3), reference)
    diffboost.patch(tiny_flux, cache=2)
    assert not torch.equal(run(tiny_flux, 3), reference)
    diffboost.unpatch(tiny_flux)
    assert not any("forward" in m.__dict__ for m in tiny_flux.transformer.modules())
    assert torch.equal(run(tiny_flux, 3), reference)


@pytest.mark.parametrize("preset", ["tiny_flux", "tiny_pixart"])
def test_uniform_partial_step_adds_the_cached_residual(preset, request):
    pipe = request.getfixturevalue(preset)
    model = pipe.transformer
    _, last = stack_ends(model)
    two_streams = preset == "tiny_flux"
    reference = pipe(**example_inputs(pipe, steps=5)).images
    diffboost.patch(pipe, cache=BlockCacheConfig(interval=2))
    embedders = stack_input_embedders(model)
    with record_calls(model) as calls, record_calls(embedders[0]) as hidden_calls, \
            record_calls(embedders[-1]) as encoder_calls, record_calls(last) as last_calls, \
            count_calls(*first_and_last(model)) as counts:
        cached = pipe(**example_inputs(pipe, steps=5)).images
    assert counts == [3, 3]  # full steps 0, 2, 4
    diffboost.unpatch(pipe)

    # step 0 ran fully: residual = last block's output - first block's input; step 1 skipped the stack.
    h0, e0, h1, e1 = (recorded[step][2] for step in (0, 1) for recorded in (hidden_calls, encoder_calls))
    out0 = last_calls[0][2]
    if two_streams:
        skipped = (e1 + (out0[0] - e0), h1 + (out0[1] - h0))
    else:
        skipped = h1 + (out0 - h0)
    args, kwargs, out = calls[1]
    handle = last.register_forward_hook(lambda *_: skipped)
    try:
        expected = model(*args, **kwargs)
    finally:
        handle.remove()
    assert torch.equal(out[0], expected[0])
    diff = (cached - reference).abs()
    assert diff.mean() <= 0.01 and diff.max() <= 0.05, (diff.mean().item(), diff.max().item())


def test_first_block_thresholds(tiny_pixart):
    pipe = tiny_pixart
    inner_first, inner_last = first_and_last(pipe.transformer)
    reference = run(pipe, 4)
    diffboost.patch(pipe, cache=BlockCacheConfig(mode="first_block", threshold=0.0))
    assert torch.equal(run(pipe, 4), reference)  # a change is never < 0: every step runs every block
    diffboost.patch(pipe, cache=BlockCacheConfig(mode="first_block", threshold=1e9))
    with count_calls(inner_first, inner_last) as counts:
        run(pipe, 4)
    assert counts == [4, 1]  # the first block every step, the rest only at step 0
    s = stats(pipe)
    assert (s.full_steps, s.partial_steps) == (1, 3) and 0 < s.macs_skipped_fraction < 0.75


def test_first_block_decides_per_sample(tiny_pixart, monkeypatch):
    """A batch where some rows take the cache and others do not gives each sample what it gets alone."""
    from diffboost.cache import block_cache

    pipe = tiny_pixart
    kwargs = example_inputs(pipe, batch=2, steps=4)
    kwargs.update(output_type="latent", latents=torch.randn(2, 4, 8, 8))
    changes = []
    original = block_cache._relative_change
    monkeypatch.setattr(block_cache, "_relative_change", lambda *a: changes.append(original(*a)) or changes[-1])
    diffboost.patch(pipe, cache=BlockCacheConfig(mode="first_block", threshold=0.0))
    pipe(**kwargs)
    # rows: (uncond 0, uncond 1, cond 0, cond 1); a threshold between the 2nd and 3rd change at step 1 splits them
    low, high = changes[0].sort().values[1:3].tolist()
    assert low < high
    diffboost.patch(pipe, cache=BlockCacheConfig(mode="first_block", threshold=(low + high) / 2))
    changes.clear()
    batched = pipe(**kwargs).images
    assert (changes[0] < (low + high) / 2).sum() == 2  # a mixed batch really happened
    per_sample = ("prompt_embeds", "prompt_attention_mask", "negative_prompt_embeds",
                  "negative_prompt_attention_mask", "latents")
    for i in range(2):
        alone = pipe(**{**kwargs, **{k: kwargs[k][i:i + 1] for k in per_sample}}).images
        torch.testing.assert_close(batched[i:i + 1], alone, rtol=1e-4, atol=1e-4)


def test_flux_true_cfg_caches_each_call_of_a_step(tiny_flux):
    """FLUX's true CFG calls the transformer twice per step (cond, uncond): each call gets its own cache."""
    pipe = tiny_flux
    negative = example_inputs(pipe, steps=4, seed=1)
    negative = dict(true_cfg_scale=2.0, negative_prompt_embeds=negative["prompt_embeds"],
                    negative_pooled_prompt_embeds=negative["pooled_prompt_embeds"])
    reference = pipe(**example_inputs(pipe, steps=4), **negative).images
    diffboost.patch(pipe, cache=BlockCacheConfig(mode="first_block", threshold=1e9))
    with count_calls(*first_and_last(pipe.transformer)) as counts:
        cached = pipe(**example_inputs(pipe, steps=4), **negative).images
    assert counts == [8, 2]
    unet_stats = stats(pipe).denoisers["transformer"]
    assert (unet_stats.calls, unet_stats.full_calls) == (8, 2)
    diff = (cached - reference).abs()
    assert diff.mean() <= 0.01 and diff.max() <= 0.05, (diff.mean().item(), diff.max().item())


def test_macs_match_torch_flop_counter(tiny_flux):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    diffboost.patch(tiny_flux, cache=BlockCacheConfig(interval=3))
    run(tiny_flux, 4)
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        run(tiny_flux, 4)
    s = stats(tiny_flux)
    assert (s.full_steps, s.partial_steps) == (2, 2)
    # output_type="latent": the VAE does not run, and FLUX has no text encoder here; all MACs are the transformer's
    assert 2 * s.macs_run == counter.get_total_flops()


@pytest.mark.parametrize("make, match", [
    (lambda: BlockCacheConfig(mode="every"), r"BlockCacheConfig.mode='every'"),
    (lambda: BlockCacheConfig(interval=0), r"BlockCacheConfig.interval=0: .* >= 1"),
    (lambda: BlockCacheConfig(mode="first_block", threshold=-0.1), r"BlockCacheConfig.threshold=-0.1: .* >= 0"),
    (lambda: BlockCacheConfig(start=-0.1), r"BlockCacheConfig.start=-0.1: .*\[0, 1\]"),
])
def test_bad_configs_name_the_field(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_sd3_joint_blocks():
    """SD3.5-style joint blocks (one with the dual attention, the last context-pre-only) under block caching."""
    from diffboost.models import build_pipeline

    pipe = build_pipeline("tiny-sd3")

    def sd3(steps):
        kwargs = example_inputs(pipe, steps=steps)
        kwargs["output_type"] = "latent"
        return pipe(**kwargs).images

    reference = sd3(4)
    diffboost.patch(pipe, cache=1)
    assert torch.equal(sd3(4), reference)
    diffboost.patch(pipe, cache=BlockCacheConfig(interval=2))
    first, last = pipe.transformer.transformer_blocks[0].norm1, pipe.transformer.transformer_blocks[-1].norm1
    with count_calls(first, last) as counts:
        cached = sd3(4)
    assert counts == [2, 2]
    relative = (cached - reference).abs().mean() / reference.abs().mean()
    assert 0 < relative <= 0.05
    diffboost.unpatch(pipe)
    assert torch.equal(sd3(4), reference)


def test_bench_cache_quick_runs_end_to_end(tmp_path):
    """``benchmarks/bench_cache.py --quick`` on the tiny FLUX group (the fast one): rows, ratios, cache metrics."""
    import json
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:  # benchmarks/ is a directory of scripts next to the package
        sys.path.insert(0, root)
    from benchmarks import bench_cache

    assert bench_cache.main(["--quick", "--device", "cpu", "--models", "flux", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("cache-flux-quick-*.json")
    rows = json.loads(path.read_text())["rows"]
    assert [row["name"] for row in rows] == ["uncached", "diffboost-block-uniform-i2", "diffboost-block-uniform-i3",
                                             "diffboost-block-first-block-t0.1"]
    assert all(row["status"] == "ok" and row["ratio_to_baseline"] for row in rows)
    assert rows[0]["metrics"]["max_abs_diff"] == 0
    assert rows[2]["metrics"]["macs_skipped"] > rows[1]["metrics"]["macs_skipped"] > 0
    assert rows[2]["metrics"]["partial_steps"] == 5  # 8 steps, full at 0, 3, 6

    # --compile: the same rows with the transformer under torch.compile (Dynamo's eager backend: Inductor's CPU code
    # generation would take minutes), the same images, in a file of their own.
    assert bench_cache.main(["--quick", "--device", "cpu", "--models", "flux", "--out", str(tmp_path),
                             "--compile", "eager"]) == 0
    (path,) = tmp_path.glob("cache-compile-flux-quick-*.json")
    compiled = json.loads(path.read_text())["rows"]
    assert [row["name"] for row in compiled] == [row["name"] for row in rows]
    assert all(row["status"] == "ok" and row["params"]["compile"] == "eager" for row in compiled)
    for eager_row, compiled_row in zip(rows, compiled):
        assert compiled_row["metrics"] == pytest.approx(eager_row["metrics"], rel=1e-5, abs=1e-6)
