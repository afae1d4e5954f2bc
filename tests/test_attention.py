"""diffboost.ops.attention: fused Triton kernels (exact and INT8) against an fp64 reference.

On CPU the Triton kernels run under the interpreter (conftest); shapes are kept small but cover every head dim
diffusion uses, ragged lengths, both memory layouts, masks and the dtypes each backend accepts.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import diffboost
from diffboost.ops import BackendUnavailableError, attention, dispatch_log
from diffboost.ops.attention import attention_reference

HEAD_DIMS = (8, 40, 64, 72, 80, 128, 160, 256)
FUSED_DTYPES = (torch.float16, torch.bfloat16)


def make_qkv(b, h, lq, lk, d, dtype, device, layout="bhsd"):
    """Random Q/K/V in SDPA layout; ``bshd`` gives the strided views diffusers' processors produce."""

    def one(length):
        if layout == "bhsd":
            return torch.randn(b, h, length, d, dtype=dtype, device=device)
        return torch.randn(b, length, h, d, dtype=dtype, device=device).transpose(1, 2)

    return one(lq), one(lk), one(lk)


def attention_fp64(q, k, v, mask=None, scale=None):
    out, lse = attention_reference(q.double(), k.double(), v.double(), mask, scale=scale)
    return out, lse


def attention_same_dtype(q, k, v, mask=None, scale=None):
    """PyTorch computing in the input dtype (scores and P rounded to it): what 'PyTorch's own error' means in the
    flash-attention tolerance rule."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.to(s.dtype)
    p = torch.softmax(s.float(), dim=-1).to(v.dtype)
    return p @ v


def assert_within_torch_error(out, q, k, v, mask=None, scale=None):
    ref, _ = attention_fp64(q, k, v, mask, scale)
    torch_err = (attention_same_dtype(q, k, v, mask, scale).double() - ref).abs().max().item()
    atol = 2 * torch.finfo(q.dtype).eps * ref.abs().max().item()
    err = (out.double() - ref).abs().max().item()
    assert torch.isfinite(out).all(), "output has NaN/Inf (unwritten or masked rows?)"
    assert err <= 2 * torch_err + atol, f"max error {err:.3e} > 2 x torch's {torch_err:.3e} + {atol:.1e}"


def _cases():
    """Every head dim, each with a different (Lq, Lk, layout, mask) combination, so the grid stays small while
    every value of every axis is covered (several times)."""
    lengths = [(1, 77), (77, 250), (250, 77), (77, 77), (250, 250), (1, 250)]
    layouts = ["bhsd", "bshd"]
    masks = [None, "bool", "additive", "bool-per-query"]
    cases = []
    for i, d in enumerate(HEAD_DIMS):
        lq, lk = lengths[i % len(lengths)]
        cases.append((d, lq, lk, layouts[i % 2], masks[i % len(masks)]))
    return cases


def make_mask(kind, b, h, lq, lk, device, dtype):
    if kind is None:
        return None
    if kind == "bool":  # key padding, as text encoders give: (B, 1, 1, Lk)
        keep = torch.rand(b, 1, 1, lk, device=device) > 0.3
        keep[..., 0] = True  # no fully masked row
        return keep
    if kind == "bool-per-query":
        keep = torch.rand(b, h, lq, lk, device=device) > 0.5
        keep[..., 0] = True
        return keep
    return torch.randn(1, h, lq, lk, device=device, dtype=dtype)


@pytest.mark.parametrize("dtype", FUSED_DTYPES, ids=str)
@pytest.mark.parametrize("d,lq,lk,layout,mask_kind", _cases())
def test_fused_exact_matches_reference(d, lq, lk, layout, mask_kind, dtype, device):
    if dtype == torch.bfloat16 and d not in (40, 72, 160):
        pytest.skip("bf16 covered on three head dims to keep the interpreter run short")
    q, k, v = make_qkv(2, 3, lq, lk, d, dtype, device, layout)
    mask = make_mask(mask_kind, 2, 3, lq, lk, device, dtype)
    out = attention(q, k, v, mask, backend="triton")
    assert out.shape == (2, 3, lq, d) and out.dtype == dtype
    assert out.stride() == torch.empty_like(q).stride(), "output must be laid out like query"
    assert_within_torch_error(out, q, k, v, mask)


def test_launcher_writes_every_element(device):
    """Poisoned output and LSE buffers must be fully overwritten, including ragged tile edges and the head-dim tail."""
    from diffboost.kernels.attention import attention_fwd

    q, k, v = make_qkv(1, 2, 67, 93, 72, torch.float16, device)
    for int8 in (False, True):
        out = torch.full_like(q, float("nan"))
        lse = torch.full((1, 2, 67), float("nan"), device=device)
        attention_fwd(q, k, v, out, mask=None, is_causal=False, scale=0.1, int8=int8, lse=lse)
        assert torch.isfinite(out).all() and torch.isfinite(lse).all()


@pytest.mark.parametrize("precision", ["exact", "int8"])
def test_lse_matches_reference(precision, device):
    q, k, v = make_qkv(2, 2, 70, 130, 80, torch.float16, device, "bshd")
    k = k + 3.0  # a large K offset: smoothing removes it, the reported LSE must not
    mask = make_mask("bool", 2, 2, 70, 130, device, q.dtype)
    out, lse = attention(q, k, v, mask, precision=precision, return_lse=True, backend="triton")
    _, ref_lse = attention_fp64(q, k, v, mask)
    assert lse.shape == (2, 2, 70) and lse.dtype == torch.float32
    tol = 2e-3 if precision == "exact" else 0.05
    torch.testing.assert_close(lse.double(), ref_lse.double(), atol=tol, rtol=0)


def test_lse_merges_partial_results(device):
    """Attention over [K1; K2] equals the LSE-weighted merge of attention over K1 and over K2 (ring attention)."""
    q, k, v = make_qkv(1, 2, 50, 160, 64, torch.float16, device)
    o1, l1 = attention(q, k[:, :, :90], v[:, :, :90], return_lse=True, backend="triton")
    o2, l2 = attention(q, k[:, :, 90:], v[:, :, 90:], return_lse=True, backend="triton")
    lse = torch.logaddexp(l1, l2)
    merged = o1.float() * (l1 - lse).exp().unsqueeze(-1) + o2.float() * (l2 - lse).exp().unsqueeze(-1)
    ref, _ = attention_fp64(q, k, v)
    torch.testing.assert_close(merged.double(), ref, atol=3e-3, rtol=0)


def test_fully_masked_rows_give_zeros(device):
    q, k, v = make_qkv(1, 1, 20, 40, 64, torch.float16, device)
    keep = torch.ones(1, 1, 20, 40, dtype=torch.bool, device=device)
    keep[:, :, 5] = False
    out, lse = attention(q, k, v, keep, return_lse=True, backend="triton")
    assert torch.equal(out[:, :, 5], torch.zeros_like(out[:, :, 5]))
    assert torch.isneginf(lse[:, :, 5]).all()
    assert_within_torch_error(out[:, :, :5], q[:, :, :5], k, v)


def test_causal(device):
    q, k, v = make_qkv(1, 2, 100, 100, 40, torch.float16, device)
    out = attention(q, k, v, is_causal=True, backend="triton")
    causal = torch.ones(100, 100, dtype=torch.bool, device=device).tril()
    assert_within_torch_error(out, q, k, v, causal)


def test_custom_scale(device):
    q, k, v = make_qkv(1, 2, 33, 77, 64, torch.float16, device)
    out = attention(q, k, v, scale=0.3, backend="triton")
    assert_within_torch_error(out, q, k, v, scale=0.3)


# ---------------------------------------------------------------------------------------------------------------
# INT8
# ---------------------------------------------------------------------------------------------------------------


def diffusion_like_qkv(b, h, lq, lk, d, dtype, device, k_offset=8.0):
    """Q/K/V shaped like diffusion activations: a few outlier channels and a large per-channel offset in K that is
    shared by all tokens (what makes naive INT8 quantization of K fail)."""
    q, k, v = make_qkv(b, h, lq, lk, d, torch.float32, device)
    channel_scale = torch.ones(d, device=device)
    channel_scale[torch.randperm(d, device=device)[: max(1, d // 16)]] = 6.0
    q = q * channel_scale
    k = k * channel_scale + k_offset * torch.randn(1, h, 1, d, device=device)
    return (t.to(dtype) for t in (q, k, v))


def rel_l1(a, b):
    return ((a.double() - b.double()).abs().sum() / b.double().abs().sum()).item()


def cosine(a, b):
    return F.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


@pytest.mark.parametrize("d", [40, 64, 72, 80, 128, 160])
def test_int8_accuracy_on_diffusion_like_inputs(d, device):
    q, k, v = diffusion_like_qkv(2, 2, 200, 200, d, torch.float16, device)
    exact, _ = attention_fp64(q, k, v)
    out = attention(q, k, v, precision="int8", backend="triton")
    cos, l1 = cosine(out, exact), rel_l1(out, exact)
    print(f"int8 d={d}: cosine {cos:.5f}, relative L1 {l1:.4f}")
    assert cos >= 0.999 and l1 <= 0.03


def test_int8_needs_smoothing(device):
    """The K offset of the inputs above must defeat INT8 without smoothing — so the accuracy test really tests it."""
    q, k, v = diffusion_like_qkv(2, 2, 200, 200, 64, torch.float16, device, k_offset=30.0)
    exact, _ = attention_fp64(q, k, v)
    smoothed = attention(q, k, v, precision="int8", backend="triton")
    raw = attention(q, k, v, precision="int8", backend="triton", smooth_k=False)
    print(f"int8 with smoothing: rel L1 {rel_l1(smoothed, exact):.4f}; without: {rel_l1(raw, exact):.4f}")
    assert rel_l1(smoothed, exact) <= 0.03
    assert rel_l1(raw, exact) > 0.03


@pytest.mark.parametrize("d,mask_kind", [(40, "bool"), (160, "additive"), (72, None)])
def test_int8_kernel_matches_its_emulation(d, mask_kind, device):
    """The kernel and the reference's INT8 emulation compute the same integer products; what is left is fp32
    rounding order and P's 16-bit rounding."""
    q, k, v = diffusion_like_qkv(1, 2, 77, 150, d, torch.float16, device)
    mask = make_mask(mask_kind, 1, 2, 77, 150, device, q.dtype)
    out = attention(q, k, v, mask, precision="int8", backend="triton")
    emu = attention(q, k, v, mask, precision="int8", backend="reference")
    exact = attention(q, k, v, mask, precision="exact", backend="reference")
    assert (out.double() - emu.double()).abs().max() <= 0.5 * (exact.double() - emu.double()).abs().max() + 2e-3


# ---------------------------------------------------------------------------------------------------------------
# Dispatch, fallbacks, torch.library
# ---------------------------------------------------------------------------------------------------------------


def test_fp32_falls_back_exactly(device):
    q, k, v = make_qkv(2, 2, 30, 40, 40, torch.float32, device)
    out = attention(q, k, v, precision="int8")  # no INT8 kernel for fp32: answered exactly, reason recorded
    ref, _ = attention_fp64(q, k, v)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)
    entries = [e for e in dispatch_log() if e["op"] == "attention" and e["dtype"] == "float32"]
    assert entries and any("dtype float32 not supported" in " ".join(r) for e in entries for r in e["skipped"].values())


def test_head_dim_above_256_falls_back(device):
    q, k, v = make_qkv(1, 1, 16, 16, 512, torch.float16, device)  # the VAE's single 512-wide head
    out = attention(q, k, v)
    assert_within_torch_error(out, q, k, v)
    with pytest.raises(BackendUnavailableError, match="head_dim 512 not supported"):
        attention(q, k, v, backend="triton")


def test_forced_unknown_backend():
    q, k, v = make_qkv(1, 1, 4, 4, 8, torch.float32, "cpu")
    with pytest.raises(ValueError, match="unknown backend='flash'"):
        attention(q, k, v, backend="flash")


def test_grad_uses_differentiable_reference():
    q, k, v = make_qkv(1, 2, 9, 11, 16, torch.float64, "cpu")
    q.requires_grad_(True)
    out = attention(q, k, v)
    out.sum().backward()
    q_ref = q.detach().clone().requires_grad_(True)
    F.scaled_dot_product_attention(q_ref, k, v).sum().backward()
    torch.testing.assert_close(q.grad, q_ref.grad)


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda q, k, v, m: (q[:1], k, v, m), "batch sizes differ"),
        (lambda q, k, v, m: (q[:, :1], k, v, m), "head counts differ"),
        (lambda q, k, v, m: (q[..., :32], k, v, m), "query head_dim 32 differs from key head_dim 40"),
        (lambda q, k, v, m: (q, k, v[:, :, :5], m), "key has 7 tokens but value has 5"),
        (lambda q, k, v, m: (q, k.double(), v, m), "one dtype"),
        (lambda q, k, v, m: (q, k, v, m[..., :3]), "attn_mask shape"),
        (lambda q, k, v, m: (q, k, v, m.int()), "attn_mask dtype"),
        (lambda q, k, v, m: (q[0], k, v, m), "query must be 4-D"),
        (lambda q, k, v, m: (q.int(), k, v, m), "query dtype"),
        (lambda q, k, v, m: (q, k.to("meta"), v, m), "one device"),
    ],
)
def test_bad_input_names_the_argument(change, message):
    q, k, v = make_qkv(2, 2, 5, 7, 40, torch.float32, "cpu")
    mask = torch.ones(2, 1, 5, 7, dtype=torch.bool)
    q, k, v, mask = change(q, k, v, mask)
    with pytest.raises(ValueError, match=message):
        attention(q, k, v, mask)


def test_bad_precision_and_causal_with_mask():
    q, k, v = make_qkv(1, 1, 4, 4, 8, torch.float32, "cpu")
    with pytest.raises(ValueError, match="precision='fp8' not supported"):
        attention(q, k, v, precision="fp8")
    with pytest.raises(ValueError, match="not both"):
        attention(q, k, v, torch.ones(4, 4, dtype=torch.bool), is_causal=True)


def test_library_op_schema_and_fake():
    q, k, v = make_qkv(1, 2, 9, 11, 16, torch.float32, "cpu", "bshd")
    mask = torch.rand(1, 1, 9, 11) > 0.2
    torch.library.opcheck(
        torch.ops.diffboost.attention.default, (q, k, v, mask, False, 0.25, "exact", True, "reference", True)
    )


def test_compiles_fullgraph():
    q, k, v = make_qkv(1, 2, 9, 11, 16, torch.float32, "cpu", "bshd")

    def f(q, k, v):
        return diffboost.ops.attention(q * 2, k, v, precision="int8").transpose(1, 2).flatten(2)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v), f(q, k, v))


_FIT_SCRIPT = r"""
import sys, torch
from benchmarks.kernel_report import compile_only
from diffboost.kernels import attention as A

arch, limit = int(sys.argv[1]), int(sys.argv[2])
candidates = A._heuristic_configs
b, h, lq, lk = 2, 24, 1024, 1024  # enough query tiles for 128-row tiles, the largest configs
for d in (256, 224, 128):  # the largest tiles, and FLUX's head dim
    for int8 in (False, True):
        d0, d1 = A.split_head_dim(d, min_tail=32 if int8 else 16)
        fitted = None
        for config in candidates(d0 + d1, lq, programs=-(-lq // 128) * b * h, sm_count=1):
            A._heuristic_configs = lambda *args, config=config: [config]  # compile this one
            q, k, v = (torch.empty(b, h, n, d, dtype=torch.bfloat16) for n in (lq, lk, lk))
            with compile_only(arch, A, ("_attn_fwd_kernel", "_quantize_k_kernel")) as compiled:
                A.attention_fwd(q, k, v, torch.empty_like(q), mask=None, is_causal=False, scale=0.1, int8=int8)
            shared = [kernel.metadata.shared for name, _, kernel in compiled if name == "_attn_fwd_kernel"][0]
            if shared <= limit:
                fitted = (config.kwargs, config.num_stages, shared)
                break
        assert fitted is not None, f"sm_{arch}: no config of head dim {d} (int8={int8}) fits {limit} bytes"
        print(d, int8, fitted)
print("fits")
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests run the kernels")
@pytest.mark.parametrize("arch,limit", [(89, 101376), (80, 166912)])
def test_some_launch_config_fits_every_gpu(arch, limit):
    """The launcher tries its configs in order until one fits the GPU's shared memory (Triton raises OutOfResources
    otherwise, mid-generation). Compiled for Ada/consumer Ampere (99 KiB per block) and A100 (163 KiB), the largest
    head dims must have one that fits; H100 (227 KiB) fits the first config of each."""
    pytest.importorskip("triton.backends.nvidia")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _FIT_SCRIPT, str(arch), str(limit)], env=env, capture_output=True,
                            text=True, timeout=900, cwd=Path(__file__).resolve().parent.parent)
    assert result.returncode == 0 and "fits" in result.stdout, result.stderr[-3000:]


# ---------------------------------------------------------------------------------------------------------------
# GPU: the same comparisons at real sizes
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FUSED_DTYPES, ids=str)
@pytest.mark.parametrize(
    "b,h,lq,lk,d",
    [(2, 8, 4096, 4096, 40), (2, 8, 1024, 1024, 80), (2, 8, 256, 256, 160), (2, 8, 4096, 77, 40),
     (2, 10, 1024, 1024, 64), (2, 16, 1024, 1024, 72), (1, 24, 1536, 1536, 128)],
)
def test_gpu_real_sizes(b, h, lq, lk, d, dtype):
    q, k, v = make_qkv(b, h, lq, lk, d, dtype, "cuda", "bshd")
    assert_within_torch_error(attention(q, k, v, backend="triton"), q, k, v)
    q, k, v = diffusion_like_qkv(b, h, lq, lk, d, dtype, "cuda")
    exact, _ = attention_fp64(q, k, v)
    out = attention(q, k, v, precision="int8", backend="triton")
    assert cosine(out, exact) >= 0.999 and rel_l1(out, exact) <= 0.03


@pytest.mark.gpu
def test_gpu_compiles_fullgraph_inductor():
    q, k, v = make_qkv(2, 4, 256, 77, 64, torch.bfloat16, "cuda", "bshd")

    def f(q, k, v):
        return diffboost.ops.attention(q, k, v).transpose(1, 2).flatten(2) * 2

    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), f(q, k, v))
