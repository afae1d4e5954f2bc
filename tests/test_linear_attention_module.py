"""LinFusion-style linear attention module, its checkpoints, and ``diffboost.patch(pipe, linear_attention=...)``.

Pipelines are the tiny random-weight SD preset. The op's kernel is tested in test_linear_attention.py; here pipelines
run the op's PyTorch reference (``backend="reference"``), except one run of the kernel inside the pipeline (under
the Triton interpreter on CPU, which is slow per call).
"""

from __future__ import annotations

import json

import pytest
import torch
from diffusers.models.attention_processor import Attention

import diffboost
from diffboost.integrations.linear_attention import LinearAttentionConfig
from diffboost.linear import GeneralizedLinearAttention, LinearAttentionModules, self_attentions
from diffboost.linear.modules import CONFIG_NAME, WEIGHTS_NAME
from diffboost.models import example_inputs
from diffboost.ops.linear_attention import linear_attention_reference


@pytest.fixture(autouse=True)
def _one_thread():
    """These tests run many tiny ops, which a second thread only slows down (badly, when other jobs share the
    cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


REFERENCE = LinearAttentionConfig(backend="reference")


def run(pipe):
    return pipe(**example_inputs(pipe, steps=2, seed=3)).images


def perturb(modules: torch.nn.Module) -> None:
    """Random values everywhere, so that a round trip cannot pass by restoring initial (zero/one) values."""
    with torch.no_grad():
        for p in modules.parameters():
            p.copy_(torch.randn_like(p) * 0.1)


def test_init_copies_projections_and_computes_the_linfusion_formula():
    attn = Attention(query_dim=80, heads=2, dim_head=40)
    new = GeneralizedLinearAttention.from_attention(attn)
    x = torch.randn(2, 30, 80)
    assert torch.equal(new.to_q_(x), torch.zeros_like(x)), "f must start at zero"
    for name in ("to_q", "to_k", "to_v"):
        assert torch.equal(getattr(new, name).weight, getattr(attn, name).weight)
        assert getattr(new, name).weight is not getattr(attn, name).weight, "the original must not be shared"
    q, k, v = (getattr(attn, name)(x).unflatten(-1, (2, 40)).transpose(1, 2) for name in ("to_q", "to_k", "to_v"))
    expected = attn.to_out[0](linear_attention_reference(q, k, v).transpose(1, 2).flatten(2))
    with torch.no_grad():
        torch.testing.assert_close(new(x), expected, atol=1e-5, rtol=1e-5)


def test_attention_masks():
    new = GeneralizedLinearAttention(48, 2)
    x = torch.randn(2, 10, 48)
    keep = torch.rand(2, 10) > 0.3
    keep[:, 0] = True
    additive = torch.zeros(2, 1, 10).masked_fill(~keep[:, None], -10000.0)  # what UNet2DConditionModel passes
    with torch.no_grad():
        torch.testing.assert_close(new(x, attention_mask=additive), new(x, attention_mask=keep), atol=0, rtol=0)
        assert not torch.allclose(new(x, attention_mask=keep), new(x))
        with pytest.raises(ValueError, match="cannot apply other biases"):
            new(x, attention_mask=torch.randn(2, 10))
        with pytest.raises(ValueError, match="per-query masks"):
            new(x, attention_mask=torch.ones(2, 10, 10, dtype=torch.bool))


def test_state_dict_is_linfusion_layout(tiny_sd):
    modules = LinearAttentionModules.from_unet(tiny_sd.unet)
    names = [entry["module_name"] for entry in modules.modules_list]
    assert names == list(self_attentions(tiny_sd.unet)) and all(name.endswith(".attn1") for name in names)
    per_module = {"to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight", "to_out.0.bias"}
    per_module |= {f"{f}.{i}.{p}" for f in ("to_q_", "to_k_") for i in (0, 1, 3) for p in ("weight", "bias")}
    expected = {f"{i}.{key}" for i in range(len(names)) for key in per_module}
    assert set(modules.state_dict()) == expected
    entry = modules.modules_list[0]
    assert entry == {"module_name": names[0], "dim_n": 48, "heads": 2, "projection_mid_dim": None}


@pytest.mark.parametrize("mid,dtype", [(None, torch.float32), (16, torch.float16), (-1, torch.bfloat16)])
def test_save_load_save_is_exact(tiny_sd, tmp_path, mid, dtype):
    modules = LinearAttentionModules.from_unet(tiny_sd.unet, projection_mid_dim=mid).to(dtype)
    perturb(modules)
    modules.save(tmp_path / "a")
    loaded = LinearAttentionModules.load(tmp_path / "a")
    loaded.save(tmp_path / "b")
    again = LinearAttentionModules.load(tmp_path / "b")
    for state in (loaded.state_dict(), again.state_dict()):
        assert state.keys() == modules.state_dict().keys()
        for key, value in modules.state_dict().items():
            assert state[key].dtype == dtype and torch.equal(state[key], value), key
    config = json.loads((tmp_path / "b" / CONFIG_NAME).read_text())
    assert config["_class_name"] == "LinFusion" and config["modules_list"] == modules.modules_list
    assert (tmp_path / "a" / WEIGHTS_NAME).read_bytes() == (tmp_path / "b" / WEIGHTS_NAME).read_bytes()


def test_patch_replaces_self_attention_only_and_unpatch_is_exact(tiny_sd):
    originals = dict(tiny_sd.unet.named_modules())
    reference = run(tiny_sd)
    diffboost.patch(tiny_sd, linear_attention=True)
    for name, module in tiny_sd.unet.named_modules():
        if name.endswith("attn1"):
            assert isinstance(module, GeneralizedLinearAttention), name
        elif name.endswith("attn2"):
            assert module is originals[name], "cross-attention must stay"
    kernel = run(tiny_sd)
    diffboost.patch(tiny_sd, linear_attention=REFERENCE)  # patching again replaces the previous patch
    patched = run(tiny_sd)
    assert torch.isfinite(patched).all()
    assert (patched - reference).abs().max() > 1e-4, "linear attention should change the output"
    torch.testing.assert_close(kernel, patched, atol=1e-5, rtol=0)
    diffboost.unpatch(tiny_sd)
    assert all(module is originals[name] for name, module in tiny_sd.unet.named_modules())
    assert torch.equal(run(tiny_sd), reference)


def test_patch_from_checkpoint_and_from_memory_agree(tiny_sd, tmp_path):
    modules = LinearAttentionModules.from_unet(tiny_sd.unet)
    perturb(modules)
    modules.save(tmp_path)
    diffboost.patch(tiny_sd, linear_attention=LinearAttentionConfig(weights=tmp_path, backend="reference"))
    installed = {name: module for name, module in tiny_sd.unet.named_modules() if name.endswith("attn1")}
    for name, module in modules.items():
        for key, value in module.state_dict().items():
            assert torch.equal(installed[name].state_dict()[key], value), f"{name}.{key}"
    from_disk = run(tiny_sd)
    diffboost.patch(tiny_sd, linear_attention=LinearAttentionConfig(weights=modules, backend="reference"))
    assert torch.equal(run(tiny_sd), from_disk)
    assert next(iter(modules.items()))[1] is not tiny_sd.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    diffboost.unpatch(tiny_sd)


def _edit_config(path, change):
    config = json.loads((path / CONFIG_NAME).read_text())
    change(config["modules_list"])
    (path / CONFIG_NAME).write_text(json.dumps(config))


def _edit_weights(path, change):
    from safetensors.torch import load_file, save_file

    state = load_file(str(path / WEIGHTS_NAME))
    change(state)
    save_file(state, str(path / WEIGHTS_NAME))


MISMATCHES = {
    "wrong width": (lambda p: _edit_config(p, lambda m: m[0].update(dim_n=96, heads=2)), "has shape"),
    "wrong heads": (lambda p: _edit_config(p, lambda m: m[0].update(heads=4)), "heads=4 but the U-Net's has"),
    "unknown module": (lambda p: _edit_config(p, lambda m: m[0].update(module_name="mid_block.attn9")),
                       "has no self-attention mid_block.attn9"),
    "missing module": (lambda p: (_edit_config(p, lambda m: m.pop()),
                                  _edit_weights(p, lambda s: [s.pop(k) for k in list(s) if k.startswith("10.")])),
                       "no module for the U-Net's mid_block"),
    "tensor shape": (lambda p: _edit_weights(p, lambda s: s.update({"3.to_k_.0.weight": torch.zeros(80, 40)})),
                     r"3.to_k_.0.weight has shape \(80, 40\), expected \(80, 80\)"),
    "missing key": (lambda p: _edit_weights(p, lambda s: s.pop("0.to_v.weight")), "missing 0.to_v.weight"),
    "unexpected key": (lambda p: _edit_weights(p, lambda s: s.update({"0.extra": torch.zeros(1)})),
                       "unexpected keys 0.extra"),
    "no weights": (lambda p: (p / WEIGHTS_NAME).unlink(), "diffusion_pytorch_model.safetensors is missing"),
    "bad config": (lambda p: (p / CONFIG_NAME).write_text('{"modules_list": [{"module_name": "x"}]}'),
                   "lacks dim_n, heads"),
}


def test_mismatching_checkpoints_raise_and_leave_the_pipeline_unchanged(tiny_sd, tmp_path):
    originals = dict(tiny_sd.unet.named_modules())
    reference = run(tiny_sd)
    good = LinearAttentionModules.from_unet(tiny_sd.unet)
    for case, (spoil, message) in MISMATCHES.items():
        path = tmp_path / case.replace(" ", "-")
        good.save(path)
        spoil(path)
        with pytest.raises(ValueError, match=message):
            diffboost.patch(tiny_sd, linear_attention=str(path))
        assert not diffboost.is_patched(tiny_sd), case
        assert all(module is originals[name] for name, module in tiny_sd.unet.named_modules()), case
    assert torch.equal(run(tiny_sd), reference)


def test_composes_with_fused_attention(tiny_sd):
    reference = run(tiny_sd)
    diffboost.patch(tiny_sd, attention="exact", linear_attention=REFERENCE)
    attn2 = tiny_sd.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    assert type(attn2.processor).__module__ == "diffboost.integrations.attention"
    assert isinstance(tiny_sd.unet.mid_block.attentions[0].transformer_blocks[0].attn1, GeneralizedLinearAttention)
    assert torch.isfinite(run(tiny_sd)).all()
    diffboost.unpatch(tiny_sd)
    assert torch.equal(run(tiny_sd), reference)


def test_bad_configs_and_targets():
    with pytest.raises(TypeError, match="LinearAttentionConfig.weights must be"):
        LinearAttentionConfig(weights=3)
    with pytest.raises(ValueError, match="projection_mid_dim applies only with weights=None"):
        LinearAttentionConfig(weights="somewhere", projection_mid_dim=32)
    with pytest.raises(ValueError, match="projection_mid_dim must be None, -1 or a positive int"):
        LinearAttentionConfig(projection_mid_dim=0)
    with pytest.raises(ValueError, match="backend='cuda' not supported"):
        LinearAttentionConfig(backend="cuda")
    with pytest.raises(TypeError, match="linear_attention must be"):
        diffboost.patch(torch.nn.Linear(2, 2), linear_attention=1.5)
    with pytest.raises(ValueError, match="has no U-Net self-attention"):
        diffboost.patch(torch.nn.Linear(2, 2), linear_attention=True)

    class TransformerPipeline:
        transformer = torch.nn.Linear(2, 2)

    with pytest.raises(ValueError, match="TransformerPipeline has no unet"):
        diffboost.patch(TransformerPipeline(), linear_attention=True)
    cross = Attention(query_dim=32, cross_attention_dim=16, heads=2, dim_head=16)
    with pytest.raises(ValueError, match="it is a cross-attention"):
        GeneralizedLinearAttention.from_attention(cross, name="blk.attn1")
