"""diffboost.ops.linear_attention: the Triton kernel against an fp64 reference.

On CPU the kernel runs under the Triton interpreter (conftest), which is slow per op: shapes are small, and the
head dims {40, 64, 80, 160} x lengths {1, 77, 257, 1024} grid is covered diagonally (every value several times, with
feature maps, masks, dtypes and layouts rotating through the cases) rather than as a full product.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffboost.ops import BackendUnavailableError, dispatch_log
from diffboost.ops.linear_attention import linear_attention, linear_attention_reference

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Relative rounding the kernel may add beyond PyTorch's in the same dtype: its fp32 dots are tf32x3 (three TF32
# products, about 1e-6 relative) rather than exact fp32.
ROUNDING = {torch.float32: 2.0**-17}


def make_qkv(b, h, lq, lk, d, dtype, device, layout="bhsd", dv=None):
    """Random Q/K/V; ``bshd`` gives the strided ``(B, S, H, D).transpose(1, 2)`` views diffusers produces."""

    def one(length, width):
        if layout == "bhsd":
            return torch.randn(b, h, length, width, dtype=dtype, device=device)
        return torch.randn(b, length, h, width, dtype=dtype, device=device).transpose(1, 2)

    return one(lq, d), one(lk, d), one(lk, dv or d)


def make_keep(b, lk, device):
    """A key-padding mask with a different number of kept keys per batch element (at least one)."""
    keep = torch.rand(b, lk, device=device) > 0.4
    keep[:, 0] = True
    return keep


def same_dtype_torch(q, k, v, feature_map, eps, keep):
    """The formula computed by PyTorch in the input dtype: what 'PyTorch's own error' means in the tolerance."""
    phi = (lambda x: F.elu(x) + 1) if feature_map == "elu" else F.relu
    pq, pk = phi(q), phi(k)
    count = float(k.shape[2])
    if keep is not None:
        pk = pk.masked_fill(~keep[:, None, :, None], 0)
        v = v.masked_fill(~keep[:, None, :, None], 0)
        count = keep.sum(1).clamp_min(1).to(q.dtype)[:, None, None, None]
    state = pk.transpose(-1, -2) @ v / count
    k_mean = pk.sum(2, keepdim=True) / count
    return (pq @ state) / ((pq * k_mean).sum(-1, keepdim=True) + eps)


def assert_close_to_reference(out, q, k, v, feature_map="elu", eps=1e-4, keep=None):
    """``|out - ref| <= 2 |torch_same_dtype - ref| + 2 eps(dtype) max|ref|`` against the fp64 reference."""
    ref = linear_attention_reference(
        q.double(), k.double(), v.double(), feature_map=feature_map, eps=eps, key_padding_mask=keep
    )
    torch_err = (same_dtype_torch(q, k, v, feature_map, eps, keep).double() - ref).abs().max().item()
    atol = 2 * ROUNDING.get(q.dtype, torch.finfo(q.dtype).eps) * ref.abs().max().item()
    assert torch.isfinite(out).all(), "output has NaN/Inf (unwritten elements?)"
    err = (out.double() - ref).abs().max().item()
    assert err <= 2 * torch_err + atol, f"max error {err:.3e} > 2 x torch's {torch_err:.3e} + {atol:.1e}"


def _cases():
    """(head dim, Lq, Lk, feature map, masked, dtype, layout): each head dim meets each key length once."""
    cases = []
    for i, d in enumerate((40, 64, 80, 160)):
        for j, lk in enumerate((1, 77, 257, 1024)):
            n = i * 4 + j
            lq = lk if n % 3 else max(1, lk // 2 + 5)  # mostly self-attention, sometimes other query lengths
            cases.append((d, lq, lk, ("elu", "relu")[n % 2], n % 4 >= 2, DTYPES[n % 3], ("bhsd", "bshd")[(n // 2) % 2]))
    return cases


@pytest.mark.parametrize("d,lq,lk,feature_map,masked,dtype,layout", _cases())
def test_kernel_matches_reference(d, lq, lk, feature_map, masked, dtype, layout, device):
    b, h = (1, 2) if d * lk >= 160 * 1024 else (2, 2)  # the interpreter's dots are slow: halve the largest case
    q, k, v = make_qkv(b, h, lq, lk, d, dtype, device, layout)
    keep = make_keep(b, lk, device) if masked else None
    out = linear_attention(q, k, v, feature_map=feature_map, key_padding_mask=keep, backend="triton")
    assert out.shape == (b, h, lq, d) and out.dtype == dtype
    assert out.stride() == torch.empty_like(q).stride(), "output must be laid out like query"
    assert_close_to_reference(out, q, k, v, feature_map, keep=keep)


@pytest.mark.parametrize("d,dv", [(8, 24), (24, 8), (40, 64), (256, 40), (200, 256)])
def test_head_dims_padding_and_value_width(d, dv, device):
    """Head dims below 16 (padded main block), with partial tails (24 = 16 + 8, 200 = 128 + 72 of 128), two full
    blocks (256), and a value width different from the key width."""
    q, k, v = make_qkv(1, 2, 70, 90, d, torch.float16, device, dv=dv)
    keep = make_keep(1, 90, device)
    out = linear_attention(q, k, v, key_padding_mask=keep, backend="triton")
    assert out.shape == (1, 2, 70, dv)
    assert_close_to_reference(out, q, k, v, keep=keep)


def test_every_output_element_is_written(device):
    """A poisoned output must be fully overwritten: ragged query tiles, partial value tails, strided output."""
    from diffboost.kernels.linear_attention import linear_attention_fwd

    q, k, v = make_qkv(2, 3, 67, 93, 40, torch.float16, device, "bshd", dv=24)
    out = torch.full((2, 67, 3, 24), float("nan"), dtype=torch.float16, device=device).transpose(1, 2)
    linear_attention_fwd(q, k, v, out, feature_map="elu", eps=1e-4, keep=None)
    assert torch.isfinite(out).all()
    assert_close_to_reference(out, q, k, v)


def test_sequence_splits_agree_and_repeat_bit_for_bit(device):
    """The two-level reduction: any number of chunks gives the same answer within tolerance, and a given number of
    chunks gives the same bits on every run (no atomics)."""
    from diffboost.kernels.linear_attention import linear_attention_fwd

    q, k, v = make_qkv(2, 2, 40, 520, 40, torch.float16, device)
    keep = make_keep(2, 520, device)
    results = {}
    for splits in (1, 3, 3):
        out = torch.full_like(q, float("nan"))
        linear_attention_fwd(q, k, v, out, feature_map="relu", eps=1e-4, keep=keep, num_splits=splits)
        assert_close_to_reference(out, q, k, v, "relu", keep=keep)
        if splits in results:
            assert torch.equal(out, results[splits]), "same split count, different bits"
        results[splits] = out
    first = linear_attention(q, k, v, feature_map="relu", key_padding_mask=keep, backend="triton")
    assert torch.equal(first, linear_attention(q, k, v, feature_map="relu", key_padding_mask=keep, backend="triton"))


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_dropped_keys_are_ignored_even_if_not_finite(backend, device):
    """Dropped keys count neither in N nor in the mean; NaN/Inf in their K or V must not leak into the output."""
    q, k, v = make_qkv(2, 2, 30, 50, 40, torch.float16, device)
    keep = torch.ones(2, 50, dtype=torch.bool, device=device)
    keep[0, 35:] = False
    keep[1, ::2] = False
    k_bad, v_bad = k.clone(), v.clone()
    k_bad[~keep[:, None, :].expand(-1, 2, -1)] = float("inf")
    v_bad[~keep[:, None, :].expand(-1, 2, -1)] = float("nan")
    out = linear_attention(q, k_bad, v_bad, key_padding_mask=keep, backend=backend)
    assert torch.isfinite(out).all()
    # Batch 0 equals attention over its first 35 keys alone.
    only = linear_attention(q[:1], k[:1, :, :35], v[:1, :, :35], backend="reference")
    torch.testing.assert_close(out[:1].float(), only.float(), atol=2e-3, rtol=0)
    assert_close_to_reference(out, q, k, v, keep=keep)


def test_no_kept_key_gives_zeros(device):
    q, k, v = make_qkv(2, 2, 20, 33, 64, torch.float16, device)
    keep = torch.ones(2, 33, dtype=torch.bool, device=device)
    keep[1] = False
    for backend in ("triton", "reference"):
        out = linear_attention(q, k, v, key_padding_mask=keep, backend=backend)
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        assert_close_to_reference(out[:1], q[:1], k[:1], v[:1])


def test_eps_is_applied(device):
    """With relu, a query whose features are all zero has normalizer 0 + eps: zeros out, not NaN; a large eps damps
    every output by the same rule as the reference."""
    q, k, v = make_qkv(1, 2, 16, 40, 64, torch.float32, device)
    q[:, :, 3] = -1.0  # relu(q) = 0 for this query
    out = linear_attention(q, k, v, feature_map="relu", eps=5.0, backend="triton")
    assert torch.equal(out[:, :, 3], torch.zeros_like(out[:, :, 3]))
    assert_close_to_reference(out, q, k, v, "relu", eps=5.0)


# ---------------------------------------------------------------------------------------------------------------
# Dispatch, fallbacks, validation, torch.library, autograd
# ---------------------------------------------------------------------------------------------------------------


def test_head_dim_above_256_falls_back_to_reference(device):
    q, k, v = make_qkv(1, 1, 9, 12, 320, torch.float16, device)
    out = linear_attention(q, k, v)
    assert_close_to_reference(out, q, k, v)
    entries = [e for e in dispatch_log() if e["op"] == "linear_attention" and e["backend"] == "reference"]
    assert any("head_dim 320 not supported" in " ".join(r) for e in entries for r in e["skipped"].values())
    with pytest.raises(BackendUnavailableError, match="head_dim 320 not supported"):
        linear_attention(q, k, v, backend="triton")


def test_fp64_runs_the_reference(device):
    q, k, v = make_qkv(1, 2, 9, 12, 40, torch.float64, device)
    out = linear_attention(q, k, v, feature_map="relu")
    torch.testing.assert_close(out, linear_attention_reference(q, k, v, feature_map="relu"), atol=0, rtol=0)
    with pytest.raises(BackendUnavailableError, match="dtype float64 not supported"):
        linear_attention(q, k, v, backend="triton")


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda q, k, v, m: (q[:1], k, v, m), "batch sizes differ"),
        (lambda q, k, v, m: (q[:, :1], k, v, m), "head counts differ"),
        (lambda q, k, v, m: (q[..., :32], k, v, m), "query head_dim 32 differs from key head_dim 40"),
        (lambda q, k, v, m: (q, k, v[:, :, :5], m), "key has 7 tokens but value has 5"),
        (lambda q, k, v, m: (q, k[:, :, :0], v[:, :, :0], m), "at least one token"),
        (lambda q, k, v, m: (q, k.double(), v, m), "one dtype"),
        (lambda q, k, v, m: (q[0], k, v, m), "query must be 4-D"),
        (lambda q, k, v, m: (q.int(), k, v, m), "query dtype"),
        (lambda q, k, v, m: (q, k.to("meta"), v, m), "one device"),
        (lambda q, k, v, m: (q, k, v, m[:, :3]), r"key_padding_mask shape \(2, 3\)"),
        (lambda q, k, v, m: (q, k, v, m.float()), "key_padding_mask dtype"),
    ],
)
def test_bad_input_names_the_argument(change, message):
    q, k, v = make_qkv(2, 2, 5, 7, 40, torch.float32, "cpu")
    q, k, v, mask = change(q, k, v, torch.ones(2, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match=message):
        linear_attention(q, k, v, key_padding_mask=mask)


def test_bad_options():
    q, k, v = make_qkv(1, 1, 4, 4, 8, torch.float32, "cpu")
    with pytest.raises(ValueError, match="feature_map='softmax' not supported"):
        linear_attention(q, k, v, feature_map="softmax")
    for eps in (0.0, -1e-4, float("nan"), True):
        with pytest.raises(ValueError, match="eps must be a positive finite number"):
            linear_attention(q, k, v, eps=eps)
    with pytest.raises(ValueError, match="unknown backend='flash'"):
        linear_attention(q, k, v, backend="flash")


def test_grad_matches_autograd_of_the_formula():
    """Distillation trains through the op: inputs that require grad take the differentiable reference."""
    q, k, v = make_qkv(2, 1, 4, 6, 4, torch.float64, "cpu")
    keep = make_keep(2, 6, "cpu")
    for feature_map in ("elu", "relu"):
        torch.autograd.gradcheck(
            lambda q, k, v: linear_attention(q, k, v, feature_map=feature_map, key_padding_mask=keep),
            (q.requires_grad_(), k.requires_grad_(), v.requires_grad_()),
            fast_mode=True,
        )
    with pytest.raises(ValueError, match="forward-only"):
        linear_attention(q, k, v, backend="triton")


def test_library_op_schema_and_fake():
    q, k, v = make_qkv(2, 2, 9, 11, 16, torch.float32, "cpu", "bshd", dv=8)
    keep = make_keep(2, 11, "cpu")
    torch.library.opcheck(torch.ops.diffboost.linear_attention.default, (q, k, v, keep, "elu", 1e-4, "reference"))


def test_compiles_fullgraph():
    q, k, v = make_qkv(1, 2, 9, 11, 16, torch.float32, "cpu", "bshd")

    def f(q, k, v):
        return linear_attention(q * 2, k, v, feature_map="relu").transpose(1, 2).flatten(2)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v), f(q, k, v))


# ---------------------------------------------------------------------------------------------------------------
# GPU: real sizes, and repeatability of the split reduction on the device
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("b,h,n,d", [(2, 8, 16384, 40), (2, 8, 4096, 80), (2, 8, 1024, 160), (2, 10, 4096, 64),
                                     (1, 2, 65536, 40), (1, 4, 3000, 256), (2, 3, 777, 72)])
def test_gpu_real_sizes(b, h, n, d, dtype):
    q, k, v = make_qkv(b, h, n, n, d, dtype, "cuda", "bshd")
    keep = make_keep(b, n, "cuda")
    for feature_map, mask in (("elu", None), ("relu", keep)):
        out = linear_attention(q, k, v, feature_map=feature_map, key_padding_mask=mask, backend="triton")
        assert_close_to_reference(out, q, k, v, feature_map, keep=mask)
        again = linear_attention(q, k, v, feature_map=feature_map, key_padding_mask=mask, backend="triton")
        assert torch.equal(out, again), "repeated runs must give the same bits"


@pytest.mark.gpu
def test_gpu_compiles_fullgraph_inductor():
    q, k, v = make_qkv(2, 4, 256, 256, 40, torch.bfloat16, "cuda", "bshd")

    def f(q, k, v):
        return linear_attention(q, k, v).transpose(1, 2).flatten(2) * 2

    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), f(q, k, v))
