"""``diffboost.patch`` on ``torch.compile``'d denoisers.

Users compile the denoiser before patching (``pipe.unet = torch.compile(pipe.unet)``) or after; diffboost patches the
module inside the compiled wrapper either way. What is checked: the compiled, patched pipeline computes what the
eager one does, and the step bookkeeping of caching stays out of the graphs — the number of graphs does not grow
with the number of steps (traced, the step number would be a constant of each graph: one recompilation per step).

No Inductor: its code generation takes minutes on a CPU and tests Inductor rather than diffboost.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import diffboost
from diffboost import BlockCacheConfig, W4A4Config
from diffboost.models import build_denoiser, build_pipeline, example_denoiser_inputs, example_inputs
from diffboost.patching import uncompiled
from diffboost.quant import load_quantized, quantize, save_quantized

BACKEND = "eager"
# Generous, so that per-step recompilation would show as a growing graph count instead of stopping at the default
# limit (8 per function) and falling back to eager.
RECOMPILE_LIMIT = 64


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
        yield
    torch._dynamo.reset()


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def run(pipe, steps: int) -> torch.Tensor:
    kwargs = example_inputs(pipe, steps=steps)
    kwargs["output_type"] = "latent"
    return pipe(**kwargs).images


def role(pipe) -> str:
    return "unet" if hasattr(pipe, "unet") else "transformer"


CASES = [
    # (preset, patch keywords, order, backend). attention + DeepCache on a U-Net in both orders; quantization
    # calibrated through the compiled module (compiled first) with AOTAutograd, whose graphs call the ops' fake
    # implementations; block caching on a DiT. Dynamo's own backend elsewhere: tracing is what is tested, and the
    # tiny models' tracing already takes seconds.
    ("tiny-sd", dict(attention="exact", cache=3), "compile-then-patch", BACKEND),
    ("tiny-sd", dict(attention="exact", cache=3), "patch-then-compile", BACKEND),
    ("tiny-flux", dict(quant=W4A4Config(rank=16), calibration=lambda pipe: run(pipe, 2), cache=BlockCacheConfig(interval=2)),
     "compile-then-patch", "aot_eager"),
    ("tiny-flux", dict(cache=BlockCacheConfig(interval=2)), "patch-then-compile", BACKEND),
]


@pytest.mark.parametrize("preset, features, order, backend", CASES,
                         ids=[f"{case[0]}-{'+'.join(k for k in case[1] if k != 'calibration')}-{case[2]}"
                              for case in CASES])
def test_compiled_and_patched_matches_eager(preset, features, order, backend):
    eager = build_pipeline(preset)
    diffboost.patch(eager, **features)
    expected = {steps: run(eager, steps) for steps in (4, 7)}

    pipe = build_pipeline(preset)
    compile_first = order == "compile-then-patch"
    if compile_first:
        setattr(pipe, role(pipe), torch.compile(getattr(pipe, role(pipe)), backend=backend))
    diffboost.patch(pipe, **features)
    if not compile_first:
        setattr(pipe, role(pipe), torch.compile(getattr(pipe, role(pipe)), backend=backend))
    assert isinstance(getattr(pipe, role(pipe)), torch._dynamo.eval_frame.OptimizedModule)

    torch.testing.assert_close(run(pipe, 4), expected[4], rtol=1e-5, atol=1e-6)
    after_first_call = graphs()
    assert after_first_call > 0, "nothing was compiled"
    torch.testing.assert_close(run(pipe, 7), expected[7], rtol=1e-5, atol=1e-6)
    run(pipe, 4)
    # A longer call may add the graph of a mode the shorter one did not use (a last full step with no partial step
    # after it runs without recording), never one per step.
    assert graphs() - after_first_call <= 2, f"graphs grew from {after_first_call} to {graphs()} with more steps"
    assert diffboost.cache.stats(pipe).partial_steps > 0


@pytest.mark.parametrize("compile_first", [True, False])
def test_caching_a_fullgraph_compiled_denoiser_says_what_to_do(compile_first):
    pipe = build_pipeline("tiny-flux")
    if compile_first:
        pipe.transformer = torch.compile(pipe.transformer, backend=BACKEND, fullgraph=True)
    diffboost.patch(pipe, cache=2)
    if not compile_first:
        pipe.transformer = torch.compile(pipe.transformer, backend=BACKEND, fullgraph=True)
    with pytest.raises(RuntimeError, match=r"transformer cannot be compiled whole with fullgraph=True.*"
                                           r"compile_repeated_blocks"):
        run(pipe, 2)
    assert graphs() == 0  # refused before anything ran
    pipe.transformer = torch.compile(uncompiled(pipe.transformer), backend=BACKEND)
    run(pipe, 2)  # the same patch works once compiled without fullgraph


def test_unpatch_under_compile_restores_the_compiled_output():
    pipe = build_pipeline("tiny-flux")
    pipe.transformer = torch.compile(pipe.transformer, backend=BACKEND)
    reference = run(pipe, 4)
    diffboost.patch(pipe, attention="exact", cache=2)
    assert not torch.equal(run(pipe, 4), reference)
    diffboost.unpatch(pipe)
    assert torch.equal(run(pipe, 4), reference)
    assert not diffboost.is_patched(pipe)


@pytest.mark.parametrize("preset, cache", [
    ("tiny-sd", 3),  # the U-Net's transformer blocks are compiled, DeepCache wraps the blocks around them
    ("tiny-flux", BlockCacheConfig(mode="first_block", threshold=1e9)),  # the blocks block caching skips
], ids=["deepcache", "first-block"])
def test_regional_fullgraph_compilation(preset, cache):
    """diffusers' regional compilation (``compile_repeated_blocks(fullgraph=True)``) with caching: the compiled
    blocks never see the cache's state, so they compile once per block shape."""
    eager = build_pipeline(preset)
    diffboost.patch(eager, cache=cache)
    expected = run(eager, 7)
    pipe = build_pipeline(preset)
    getattr(pipe, role(pipe)).compile_repeated_blocks(backend=BACKEND, fullgraph=True)
    diffboost.patch(pipe, cache=cache)
    torch.testing.assert_close(run(pipe, 7), expected, rtol=1e-5, atol=1e-6)
    assert diffboost.cache.stats(pipe).partial_steps > 0
    assert 0 < graphs() <= 4


def test_quantized_checkpoint_of_a_compiled_model(tmp_path):
    """Layer names are the model's own (no ``_orig_mod.`` prefix): a checkpoint moves between compiled and eager."""
    model = torch.compile(build_denoiser("tiny-sd"), backend=BACKEND)
    inputs = example_denoiser_inputs(model, batch=2)
    quantize(model, W4A4Config(rank=16), calibration="data-free", progress=False)
    save_quantized(model, tmp_path)
    fresh = build_denoiser("tiny-sd")
    load_quantized(fresh, tmp_path)
    with torch.no_grad():
        expected = uncompiled(model)(**inputs, return_dict=False)[0]
        assert torch.equal(fresh(**inputs, return_dict=False)[0], expected)


def test_uncompiled():
    model = torch.nn.Linear(2, 2)
    assert uncompiled(model) is model
    assert uncompiled(torch.compile(model)) is model
