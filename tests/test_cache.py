"""Step caching on U-Net pipelines: DeepCache, encoder propagation, ControlNet, step tracking, state, stats.

Pipelines are the tiny random-weight presets; most calls stop at the latents (``output_type="latent"``) since the
VAE adds nothing to what is tested. Which modules ran is counted with forward hooks on modules *inside* the parts a
cache skips (a hook on the skipped module itself would fire even when it only replays). Exact oracles: a partial
DeepCache step equals the plain U-Net with the cut feature overridden (by a hook) with the one from the full step;
a non-key encoder-propagation step equals the plain U-Net with its encoder outputs overridden the same way.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import diffboost
from diffboost.cache import DeepCacheConfig, EncoderPropagationConfig, stats
from diffboost.models import example_denoiser_inputs, example_inputs


@pytest.fixture(autouse=True)
def single_thread():
    """One torch thread: tiny models gain nothing from a second one, and on a busy 2-core machine OpenMP threads
    waiting on each other make them 10-20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run(pipe, steps, seed=0, **extra):
    kwargs = example_inputs(pipe, steps=steps, seed=seed)
    kwargs.update(output_type="latent")
    kwargs.update(extra)
    return pipe(**kwargs).images


@contextlib.contextmanager
def count_calls(*modules):
    """Yield a list that counts, per module, how many times its forward actually ran."""
    counts = [0] * len(modules)
    handles = [m.register_forward_hook(lambda *_, i=i: counts.__setitem__(i, counts[i] + 1))
               for i, m in enumerate(modules)]
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def record_calls(module):
    """Yield a list of ``(args, kwargs, output)`` of every call of ``module``."""
    calls = []

    def hook(_, args, kwargs, output):
        calls.append((args, dict(kwargs), output))

    handle = module.register_forward_hook(hook, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


@contextlib.contextmanager
def override_outputs(outputs):
    """While active, each module in ``outputs`` (module -> output) returns the given output instead of its own."""
    handles = [m.register_forward_hook(lambda *_, out=out: out) for m, out in outputs.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def deep(unet):
    """A module inside the mid block: it runs only when the deep part of the U-Net does."""
    return unet.mid_block.resnets[0]


# --------------------------------------------------------------------------------------------------------------
# Schedules (no pipeline)
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("steps", [10, 25, 50])
@pytest.mark.parametrize("interval", [2, 3, 5])
def test_quadratic_schedule_spends_the_uniform_budget_near_the_center(steps, interval):
    uniform = DeepCacheConfig(interval=interval).full_steps(steps)
    quadratic = DeepCacheConfig(interval=interval, schedule="quadratic", center=0.3).full_steps(steps)
    full = [k for k, f in enumerate(quadratic) if f]
    assert len(quadratic) == steps and full[0] == 0 and len(full) == sum(uniform)
    center = 0.3 * steps
    spread = [abs(k - center) for k in full]
    assert sum(spread) <= sum(abs(k - center) for k, f in enumerate(uniform) if f)


def test_window_and_presets():
    # 0.3 * 10 = 3.0000000000000004: the window must still open at step 3 (step 2 is the last full one before it)
    assert DeepCacheConfig(interval=100, start=0.3).full_steps(10) == [True] * 3 + [False] * 7
    assert DeepCacheConfig(interval=2, end=0.5).full_steps(6) == [True, False, True, True, True, True]
    preset = EncoderPropagationConfig().full_steps(50)
    assert [k for k, f in enumerate(preset) if f] == list(diffboost.cache.FASTER_DIFFUSION_KEY_STEPS)
    explicit = EncoderPropagationConfig(key_steps=[4, 2, 2, 9]).full_steps(6)
    assert explicit == [True, False, True, False, True, False]  # step 0 added, 9 beyond the end ignored
    assert EncoderPropagationConfig(interval=2).full_steps(5) == [True, False, True, False, True]
    first_block = diffboost.cache.BlockCacheConfig(mode="first_block", start=0.25, end=0.75).full_steps(8)
    assert first_block == [True, True, False, False, False, False, True, True]


# --------------------------------------------------------------------------------------------------------------
# Exactness: interval 1, unpatch, and the partial step against an oracle
# --------------------------------------------------------------------------------------------------------------

def test_interval_one_is_bit_identical_and_unpatch_restores(tiny_sd):
    pipe = tiny_sd
    cls, unet_dict = type(pipe), dict(pipe.unet.__dict__)
    reference = run(pipe, 4)
    diffboost.patch(pipe, cache=1)
    assert torch.equal(run(pipe, 4), reference)
    assert stats(pipe).partial_steps == 0 and stats(pipe).macs_skipped_fraction == 0
    diffboost.patch(pipe, cache=DeepCacheConfig(interval=2))  # patching again replaces the patch
    assert type(pipe) is not cls and isinstance(pipe, cls) and type(pipe).__name__ == cls.__name__
    cached = run(pipe, 4)
    assert not torch.equal(cached, reference)
    inputs = example_denoiser_inputs(pipe.unet, batch=2)
    direct = pipe.unet(**inputs).sample  # outside a pipeline call the patched U-Net is the plain one
    diffboost.unpatch(pipe)
    assert torch.equal(pipe.unet(**inputs).sample, direct)
    assert type(pipe) is cls
    assert "forward" not in pipe.unet.__dict__ and pipe.unet.__dict__.keys() == unet_dict.keys()
    assert not any("forward" in m.__dict__ for m in pipe.unet.modules())
    assert "step" not in pipe.scheduler.__dict__
    assert torch.equal(run(pipe, 4), reference)


def test_encoder_propagation_every_step_is_bit_identical(tiny_sd):
    reference = run(tiny_sd, 3)
    diffboost.patch(tiny_sd, cache=EncoderPropagationConfig(interval=1, parallel_decoder=True))
    assert torch.equal(run(tiny_sd, 3), reference)


# Where DeepCache's shallow branch meets the cache in tiny-sd (down blocks with 3, 3, 2 skips; up blocks of 3
# resnets): the module whose (cached) output is the input of the first up-path layer that runs.
CUT_MODULES = {
    0: lambda unet: unet.up_blocks[2].attentions[1],  # only conv_in's skip is fresh: the last up layer runs
    3: lambda unet: unet.up_blocks[1].attentions[1],  # conv_in + down block 0 fresh
    8: lambda unet: unet.mid_block,  # every skip fresh: only the mid block is cached
}


def test_partial_step_equals_unet_with_cached_cut_feature(tiny_sd):
    pipe, unet = tiny_sd, tiny_sd.unet
    cuts = {branch: make(unet) for branch, make in CUT_MODULES.items()}
    with record_calls(unet) as plain_calls, contextlib.ExitStack() as stack:
        cut_calls = {b: stack.enter_context(record_calls(m)) for b, m in cuts.items()}
        run(pipe, 2)
    args, kwargs, _ = plain_calls[1]
    for branch, cut in cuts.items():
        diffboost.patch(pipe, cache=DeepCacheConfig(interval=2, branch=branch))
        with record_calls(unet) as cached_calls, count_calls(deep(unet)) as deep_runs:
            run(pipe, 2)
        diffboost.unpatch(pipe)
        assert deep_runs == [1]
        assert torch.equal(cached_calls[0][2][0], plain_calls[0][2][0])  # step 0 is full
        with override_outputs({cut: cut_calls[branch][0][2]}):
            expected = unet(*args, **kwargs)[0]
        assert torch.equal(cached_calls[1][2][0], expected), f"branch {branch}"


@pytest.mark.parametrize("preset", ["tiny_sd", "tiny_sdxl"])
def test_same_output_as_the_deepcache_package(preset, request):
    """At equal settings the output is the DeepCache package's, bit for bit: the same computation."""
    package = pytest.importorskip("DeepCache", reason="the DeepCache package (the peer) is not installed")
    pipe = request.getfixturevalue(preset)
    helper = package.DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=3, cache_branch_id=4)
    helper.enable()
    theirs = run(pipe, 5)
    helper.disable()
    diffboost.patch(pipe, cache=DeepCacheConfig(interval=3, branch=4))
    assert torch.equal(run(pipe, 5), theirs)


def test_non_key_step_equals_decoder_on_key_step_encoder(tiny_sd):
    pipe, unet = tiny_sd, tiny_sd.unet
    encoder = [unet.conv_in, *unet.down_blocks, unet.mid_block]
    with record_calls(unet) as plain_calls, contextlib.ExitStack() as stack:
        encoder_calls = [stack.enter_context(record_calls(m)) for m in encoder]
        run(pipe, 3)
    diffboost.patch(pipe, cache=EncoderPropagationConfig(key_steps=(0,)))
    with record_calls(unet) as cached_calls, count_calls(unet.down_blocks[0].resnets[0]) as encoder_runs:
        run(pipe, 3)
    assert encoder_runs == [1]
    diffboost.unpatch(pipe)
    with override_outputs({m: calls[0][2] for m, calls in zip(encoder, encoder_calls)}):
        for step in (1, 2):  # step 2's input depends on step 1's cached output: replay the patched inputs
            args, kwargs, out = cached_calls[step]
            assert torch.equal(out[0], unet(*args, **kwargs)[0])
    assert not torch.equal(cached_calls[1][2][0], plain_calls[1][2][0])


def test_parallel_decoder_matches_step_by_step(tiny_sd):
    config = EncoderPropagationConfig(key_steps=(0, 3))
    diffboost.patch(tiny_sd, cache=config)
    sequential = run(tiny_sd, 5)
    diffboost.patch(tiny_sd, cache=EncoderPropagationConfig(key_steps=(0, 3), parallel_decoder=True))
    with count_calls(tiny_sd.unet.conv_out) as decoder_runs:
        parallel = run(tiny_sd, 5)
    # key step 0, its batched decoder for steps 1-2, key step 3, its batched decoder for step 4
    assert decoder_runs == [4]
    s = stats(tiny_sd)
    assert (s.full_steps, s.partial_steps) == (2, 3)
    # Batched and single calls may use different kernels: not bit-identical, but as close as float32 allows.
    torch.testing.assert_close(parallel, sequential, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------------------
# Schedules, counted with hooks: uniform, quadratic, windows, Heun, img2img
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("config, steps, full", [
    (DeepCacheConfig(interval=3), 7, [0, 3, 6]),
    (DeepCacheConfig(interval=2, start=0.3, end=0.8), 10, [0, 1, 2, 4, 6, 8, 9]),
    (DeepCacheConfig(interval=3, schedule="quadratic", center=0.5), 10, [0, 4, 5, 6]),
], ids=["uniform", "window", "quadratic"])
def test_deep_blocks_run_on_scheduled_steps(tiny_sd, config, steps, full):
    assert [k for k, f in enumerate(config.full_steps(steps)) if f] == full
    diffboost.patch(tiny_sd, cache=config)
    runs = []
    with count_calls(deep(tiny_sd.unet)) as deep_runs:
        run(tiny_sd, steps, callback_on_step_end=lambda p, i, t, kw: runs.append(deep_runs[0]) or {})
    ran = [k for k in range(steps) if runs[k] > (runs[k - 1] if k else 0)]
    assert ran == full
    s = stats(tiny_sd)
    assert (s.num_steps, s.full_steps, s.partial_steps) == (steps, len(full), steps - len(full))


def test_heun_repeated_timesteps(tiny_sd):
    from diffusers import HeunDiscreteScheduler

    diffboost.patch(tiny_sd, cache=2)
    # swapped after patching: the tracker reads the pipeline's scheduler at each call
    tiny_sd.scheduler = HeunDiscreteScheduler.from_config(tiny_sd.scheduler.config)
    with count_calls(deep(tiny_sd.unet), tiny_sd.unet.conv_out) as counts:
        run(tiny_sd, 4)
    # 4 steps = 7 denoiser calls (2 per step, 1 in the last); steps 0 and 2 are full, 2 calls each.
    assert counts == [4, 7]
    s = stats(tiny_sd)
    assert (s.num_steps, s.full_steps, s.partial_steps) == (4, 2, 2)
    assert (s.denoisers["unet"].full_calls, s.denoisers["unet"].partial_calls) == (4, 3)


def test_img2img_strength(tiny_sd_img2img):
    pipe = tiny_sd_img2img
    diffboost.patch(pipe, cache=2)
    with count_calls(deep(pipe.unet), pipe.unet.conv_out) as counts:
        run(pipe, 3, num_inference_steps=6, strength=0.5)  # runs the last 3 of 6 steps
    assert counts == [2, 3]
    assert stats(pipe).num_steps == 3


# --------------------------------------------------------------------------------------------------------------
# State: per call, reset after an exception; per sample
# --------------------------------------------------------------------------------------------------------------

def test_calls_in_a_row_and_after_an_exception_behave_like_fresh_calls(tiny_sd):
    config = DeepCacheConfig(interval=2)
    diffboost.patch(tiny_sd, cache=config)
    fresh_3 = run(tiny_sd, 3, seed=1)
    run(tiny_sd, 5)

    def fail(pipe, i, t, kwargs):
        if i == 1:
            raise RuntimeError("stop")
        return {}

    with pytest.raises(RuntimeError, match="stop"):
        run(tiny_sd, 4, callback_on_step_end=fail)
    assert "step" not in tiny_sd.scheduler.__dict__  # the scheduler was restored despite the exception
    with count_calls(deep(tiny_sd.unet)) as deep_runs:
        again = run(tiny_sd, 3, seed=1)
    assert deep_runs == [2]
    assert torch.equal(again, fresh_3)
    assert stats(tiny_sd).num_steps == 3


def test_cfg_batch_samples_equal_samples_alone(tiny_sd):
    pipe = tiny_sd
    latents = torch.randn(2, 4, 8, 8)
    prompts = ["a red cube on a table", "a watercolor of a lighthouse"]
    diffboost.patch(pipe, cache=DeepCacheConfig(interval=3, branch=2))
    common = dict(num_inference_steps=4, guidance_scale=7.5, output_type="latent", height=64, width=64)
    batched = pipe(prompt=prompts, latents=latents, **common).images
    for i, prompt in enumerate(prompts):
        alone = pipe(prompt=prompt, latents=latents[i:i + 1], **common).images
        # Batch size changes which kernels torch picks (and the text encoder pads), so equality is up to float32
        # rounding, not bit for bit; latents are O(1), and mixing samples' caches would change them by O(0.1).
        torch.testing.assert_close(batched[i:i + 1], alone, rtol=1e-4, atol=1e-4)
    assert stats(pipe).partial_steps == 2


# --------------------------------------------------------------------------------------------------------------
# Other pipelines: ControlNet, SDXL, inpainting; stay close to the uncached output
# --------------------------------------------------------------------------------------------------------------

def assert_close_to_uncached(cached, reference, mean_tol, max_tol):
    """The stated distance of a cached image (values in [0, 1]) from the uncached one of the same seed."""
    diff = (cached.float() - reference.float()).abs()
    assert diff.mean() <= mean_tol and diff.max() <= max_tol, (diff.mean().item(), diff.max().item())


def test_controlnet_runs_on_full_steps_and_is_reused(tiny_sd_controlnet):
    pipe = tiny_sd_controlnet
    kwargs = example_inputs(pipe, steps=5)
    reference = pipe(**kwargs).images
    diffboost.patch(pipe, cache=DeepCacheConfig(interval=5))
    with record_calls(pipe.unet) as unet_calls, count_calls(pipe.controlnet.controlnet_mid_block) as control_runs:
        cached = pipe(**example_inputs(pipe, steps=5)).images
    assert control_runs == [1]
    first, later = unet_calls[0][1], unet_calls[3][1]
    assert all(a is b for a, b in zip(first["down_block_additional_residuals"],
                                      later["down_block_additional_residuals"]))
    assert_close_to_uncached(cached, reference, mean_tol=0.03, max_tol=0.25)
    s = stats(pipe)
    assert s.denoisers["controlnet"].full_calls == 1 and s.denoisers["controlnet"].partial_calls == 4
    # control_guidance_end=0.6: the conditioning scale drops to 0 at step 3, so the ControlNet runs again there.
    with count_calls(pipe.controlnet.controlnet_mid_block) as control_runs:
        pipe(**example_inputs(pipe, steps=5), control_guidance_end=0.6)
    assert control_runs == [2]


@pytest.mark.parametrize("preset", ["tiny_sdxl", "tiny_sd_inpaint"])
def test_sdxl_and_inpainting(preset, request):
    pipe = request.getfixturevalue(preset)
    reference = pipe(**example_inputs(pipe, steps=4)).images
    diffboost.patch(pipe, cache=DeepCacheConfig(interval=2, branch=1))
    with count_calls(deep(pipe.unet)) as deep_runs:
        cached = pipe(**example_inputs(pipe, steps=4)).images
    assert deep_runs == [2]
    assert_close_to_uncached(cached, reference, mean_tol=0.03, max_tol=0.25)
    assert 0 < stats(pipe).macs_skipped_fraction < 0.5


# --------------------------------------------------------------------------------------------------------------
# Stats, composition, errors
# --------------------------------------------------------------------------------------------------------------

def test_macs_match_torch_flop_counter(tiny_sd):
    """The MACs diffboost attributes to the calls equal half the FLOPs torch's own counter sees in them."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    pipe = tiny_sd
    prompt_embeds, negative = pipe.encode_prompt("a cat", "cpu", 1, True)  # no text encoder in the counted call
    diffboost.patch(pipe, cache=DeepCacheConfig(interval=3, branch=4))
    kwargs = dict(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative, num_inference_steps=4,
                  output_type="latent", height=64, width=64)
    pipe(**kwargs)  # the first call measures the costs with hooks; the counted call below runs without them
    # The math backend computes attention with bmm, which the counter counts (its CPU flash kernel it does not).
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        pipe(**kwargs)
    s = stats(pipe)
    assert (s.full_steps, s.partial_steps) == (2, 2)
    assert 2 * s.macs_run == counter.get_total_flops()
    assert 0.0 < s.macs_skipped_fraction < 0.5


def test_composes_with_attention(tiny_sd):
    pipe = tiny_sd
    reference = run(pipe, 3)
    diffboost.patch(pipe, cache=2)
    cache_only = run(pipe, 3)
    diffboost.patch(pipe, attention="exact", cache=2)
    assert diffboost.patching.patched_features(pipe) == ["attention", "cache"]
    torch.testing.assert_close(run(pipe, 3), cache_only, rtol=2e-4, atol=2e-4)
    assert stats(pipe).partial_steps == 1
    diffboost.unpatch(pipe)
    assert torch.equal(run(pipe, 3), reference)


@pytest.mark.parametrize("make, match", [
    (lambda: DeepCacheConfig(interval=0), r"DeepCacheConfig.interval=0: .* >= 1"),
    (lambda: DeepCacheConfig(branch=-1), r"DeepCacheConfig.branch=-1: .* >= 0"),
    (lambda: DeepCacheConfig(schedule="cubic"), r"DeepCacheConfig.schedule='cubic'"),
    (lambda: DeepCacheConfig(start=0.5, end=0.5), r"DeepCacheConfig.start=0.5, end=0.5"),
    (lambda: DeepCacheConfig(end=1.5), r"DeepCacheConfig.end=1.5: .*\[0, 1\]"),
    (lambda: EncoderPropagationConfig(interval=0), r"EncoderPropagationConfig.interval=0"),
    (lambda: EncoderPropagationConfig(key_steps=(0, -2)), r"EncoderPropagationConfig.key_steps\[\]=-2"),
    (lambda: EncoderPropagationConfig(key_steps=(0,), interval=2), r"key_steps or interval, not both"),
])
def test_bad_configs_name_the_field(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_config_that_does_not_fit_the_pipeline(tiny_sd, tiny_pixart):
    with pytest.raises(ValueError, match=r"DeepCacheConfig.branch=9: this U-Net .* branches 0-8"):
        diffboost.patch(tiny_sd, cache=DeepCacheConfig(branch=9))
    with pytest.raises(ValueError, match=r"BlockCacheConfig.* is for transformer denoisers"):
        diffboost.patch(tiny_sd, cache=diffboost.cache.BlockCacheConfig())
    with pytest.raises(ValueError, match=r"DeepCacheConfig.* needs a UNet2DConditionModel.*PixArtTransformer2DModel"):
        diffboost.patch(tiny_pixart, cache=DeepCacheConfig())
    with pytest.raises(ValueError, match=r"cache=0: an interval must be an integer >= 1"):
        diffboost.patch(tiny_sd, cache=0)
    with pytest.raises(TypeError, match=r"cache must be an int"):
        diffboost.patch(tiny_sd, cache="deepcache")
    with pytest.raises(ValueError, match=r"needs a diffusers pipeline"):
        diffboost.patch(tiny_sd.unet, cache=2)
    with pytest.raises(ValueError, match=r"not patched with cache="):
        stats(tiny_sd)
    assert not diffboost.is_patched(tiny_sd) and not any("forward" in m.__dict__ for m in tiny_sd.unet.modules())
