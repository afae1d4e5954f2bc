"""``diffboost.ops.w4a4``: 4-bit weights x 4-bit activations (SVDQuant's W4A4 scheme) for linear layers.

Layout (one documented format; :mod:`diffboost.quant.format` builds it from an ``nn.Linear``)
--------------------------------------------------------------------------------------------
A layer ``y = x W^T + b`` with ``W`` of shape ``[N, K]`` and groups of ``G`` (32, 64 or 128) input channels:

``qweight``   ``uint8 [N, K/2]``: symmetric INT4 in two's complement, values in ``[-7, 7]`` (the kernels accept -8
              too). Byte ``j`` of row ``n`` holds channel ``2j`` in its low nibble, ``2j + 1`` in its high nibble.
``wscales``   ``[K/G, N]`` (16-bit; fp32 accepted): the residual weight is ``q[n, k] * wscales[k // G, n]``.
``smooth``    ``[K]`` or None: the layer quantizes ``x / smooth`` (the weight was multiplied by ``smooth``).
``lora_down`` ``[K, r]`` and ``lora_up`` ``[r, N]`` (16-bit) or None: low-rank branch on the smoothed input,
              ``r`` a multiple of 16.
``bias``      ``[N]`` or None.

Activations are quantized on the fly, per token in groups of ``G`` along K, into the same packing:
``qx uint8 [M, K/2]`` and ``ascales fp32 [K/G, M]`` (group-major, so a GEMM tile reads its rows' scales
contiguously).

Arithmetic (every backend computes exactly this; the reference below is its definition)
-------------------------------------------------------------------------------------
Activation pass, per row and group, in fp32: ``xs = x * (1 / smooth)`` (an IEEE reciprocal, then a product),
``amax = max |xs|``, ``scale = amax / 7``, ``q = round_half_even(xs * (7 / max(amax, 1e-30)))``; every operation is
individually rounded (no fused multiply-add), so the packed values and the scales are bit-identical across
backends. The low-rank input is ``xs`` rounded to x's dtype, ``lr = xs @ lora_down`` accumulated in fp32.

GEMM: ``out = sum_g (qx_g . qw_g) * (ascale_g * wscale_g) + lr @ lora_up + bias``: integer dot products per group
(exact in INT32), group scales applied in fp32 outside the inner loop, ``lr`` rounded to the output dtype before
the up-projection (the 16-bit tensor-core path of the kernels), output in x's dtype. Backends differ from each
other only by the order of the fp32 sums.

Backends, in priority order: ``cuda`` (GEMM only: ``_C``, mma.sync INT4 on sm80-89, INT8 on sm90, where automatic
dispatch prefers ``triton``), ``cpu`` (``_C``, AVX-512 VNNI / AVX2 / scalar, multithreaded), ``triton``
(``kernels/w4a4.py``, INT8 tensor-core dots), ``reference``. On a GPU the activation pass runs in Triton.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch.utils.weak import WeakIdKeyDictionary

from diffboost.ops.registry import Backend, get_op

__all__ = [
    "GROUP_SIZES",
    "INT4_MAX",
    "W4A4_GEMM_OP",
    "W4A4_QUANTIZE_OP",
    "gemm_cpu",
    "gemm_cuda",
    "pack_int4",
    "quantize_act_cpu",
    "unpack_int4",
    "w4a4_gemm",
    "w4a4_gemm_reference",
    "w4a4_linear",
    "w4a4_quantize_act",
    "w4a4_quantize_act_reference",
]

GROUP_SIZES = (32, 64, 128)
INT4_MAX = 7  # symmetric: [-7, 7], so a value and its negation are both representable
AMAX_FLOOR = 1e-30  # an all-zero group gets scale 0 and q = 0 instead of 0 * inf = NaN
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

W4A4_QUANTIZE_OP = get_op(
    "w4a4_quantize_act", "W4A4 activation pass: smooth, quantize + pack to INT4 per token and group, x @ lora_down"
)
W4A4_GEMM_OP = get_op("w4a4_gemm", "W4A4 GEMM: packed INT4 x packed INT4, group scales, low-rank and bias epilogue")


# ----------------------------------------------------------------------------------------------------------------
# Packing and the reference (the definition of the arithmetic, the test oracle and the fallback)
# ----------------------------------------------------------------------------------------------------------------


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack integers in ``[-8, 7]`` along the last dim (even length) two per byte: ``uint8 [..., K/2]``.

    Element ``2j`` goes to the low nibble of byte ``j``, element ``2j + 1`` to its high nibble (two's complement).
    """
    if q.shape[-1] % 2:
        raise ValueError(f"pack_int4: last dim must be even, got {q.shape[-1]}")
    q = q.to(torch.int16)
    return ((q[..., 0::2] & 0xF) | ((q[..., 1::2] & 0xF) << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: ``uint8 [..., K/2]`` to ``int8 [..., K]``."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"unpack_int4: packed must be uint8, got {packed.dtype}")
    p = packed.to(torch.int16)
    lo = ((p & 0xF) ^ 8) - 8  # sign-extend a 4-bit two's complement value
    hi = ((p >> 4) ^ 8) - 8
    return torch.stack((lo, hi), dim=-1).flatten(-2).to(torch.int8)


def _inverse(smooth: torch.Tensor) -> torch.Tensor:
    """``1 / smooth`` in fp32, an IEEE division per channel."""
    s = smooth.float()
    return torch.ones_like(s) / s  # tensor / tensor: CUDA turns division by a scalar into a product


def _smoothed(x: torch.Tensor, smooth: Optional[torch.Tensor]) -> torch.Tensor:
    xs = x.float()
    if smooth is not None:
        xs = xs * _inverse(smooth)
    return xs


def w4a4_quantize_act_reference(
    x: torch.Tensor,
    group_size: int,
    smooth: Optional[torch.Tensor] = None,
    lora_down: Optional[torch.Tensor] = None,
    *,
    compute: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The activation pass in PyTorch: ``(qx uint8 [M, K/2], ascales fp32 [K/G, M], lr fp32 [M, r])``.

    ``qx`` and ``ascales`` are computed in fp32 exactly as the kernels do (see the module docstring); ``compute``
    is the accumulation dtype of ``lr`` (fp64 makes this an oracle for the kernels' fp32 sums). ``r`` is 0 without
    ``lora_down``.
    """
    m, k = x.shape
    groups = k // group_size
    xs = _smoothed(x, smooth)
    xg = xs.view(m, groups, group_size)
    amax = xg.abs().amax(dim=-1)
    limit = torch.full_like(amax, float(INT4_MAX))
    ascales = amax / limit
    inv = limit / amax.clamp_min(AMAX_FLOOR)
    q = torch.round(xg * inv.unsqueeze(-1)).to(torch.int8)  # round half to even, as the kernels
    qx = pack_int4(q.view(m, k))
    if lora_down is None:
        lr = x.new_zeros((m, 0), dtype=torch.float32)
    else:
        lr = (xs.to(x.dtype).to(compute) @ lora_down.to(compute)).float()
    return qx, ascales.t().contiguous(), lr


def w4a4_gemm_reference(
    qx: torch.Tensor,
    ascales: torch.Tensor,
    qweight: torch.Tensor,
    wscales: torch.Tensor,
    lora_act: Optional[torch.Tensor] = None,
    lora_up: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    out_dtype: torch.dtype = torch.float32,
    *,
    compute: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The W4A4 GEMM in PyTorch: dequantize both operands per group, one matmul in ``compute``, the epilogue.

    With ``compute=torch.float64`` every product of an INT4 value and an fp32 scale is exact and the sums are
    far more precise than fp32, which makes it the oracle for the kernels' INT32 + fp32 arithmetic.
    """
    m, k = qx.shape[0], qx.shape[1] * 2
    n = qweight.shape[0]
    groups = wscales.shape[0]
    g = k // groups
    a = unpack_int4(qx).to(compute).view(m, groups, g) * ascales.t().to(compute).unsqueeze(-1)
    w = unpack_int4(qweight).to(compute).view(n, groups, g) * wscales.t().to(compute).unsqueeze(-1)
    out = a.view(m, k) @ w.view(n, k).t()
    if lora_act is not None and lora_act.shape[1] > 0:
        out += lora_act.to(out_dtype).to(compute) @ lora_up.to(compute)
    if bias is not None:
        out += bias.to(compute)
    return out.to(out_dtype)


# ----------------------------------------------------------------------------------------------------------------
# Backends
# ----------------------------------------------------------------------------------------------------------------


def _rank(lora: Optional[torch.Tensor], dim: int) -> int:
    return 0 if lora is None else lora.shape[dim]


def _cuda_device(t: torch.Tensor):
    # Triton launches on the current CUDA device; switch only when the inputs live on another one (the switch
    # costs more than a small layer).
    other_device = t.is_cuda and t.device.index != torch.cuda.current_device()
    return torch.cuda.device(t.device) if other_device else contextlib.nullcontext()


def _quantize_outputs(x: torch.Tensor, group_size: int, rank: int):
    m, k = x.shape
    qx = torch.empty(m, k // 2, dtype=torch.uint8, device=x.device)
    ascales = torch.empty(k // group_size, m, dtype=torch.float32, device=x.device)
    lr = torch.empty(m, rank, dtype=torch.float32, device=x.device)
    return qx, ascales, lr


def _triton_quantize(x, smooth, lora_down, group_size):
    from diffboost.kernels import w4a4 as kernels

    qx, ascales, lr = _quantize_outputs(x, group_size, _rank(lora_down, 1))
    with _cuda_device(x):
        kernels.quantize_act(x, _reciprocal(smooth), lora_down, qx, ascales, lr, group_size)
    return qx, ascales, lr


def _triton_gemm(qx, ascales, qweight, wscales, lora_act, lora_up, bias, out_dtype):
    from diffboost.kernels import w4a4 as kernels

    out = torch.empty(qx.shape[0], qweight.shape[0], dtype=out_dtype, device=qx.device)
    with _cuda_device(qx):
        kernels.gemm(qx, ascales, qweight, wscales, lora_act, lora_up, bias, out)
    return out


def _ptr(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def _derived(cache: WeakIdKeyDictionary, t: torch.Tensor, make) -> torch.Tensor:
    """``make(t)``, made once per parameter ``t`` (again after an in-place update of it)."""
    if t.is_inference():  # no version counter to tell an in-place update: make it every time
        return make(t)
    cached = cache.get(t)
    if cached is None or cached[0] != t._version:
        cached = (t._version, make(t))
        cache[t] = cached
    return cached[1]


# fp32 copies of the layers' 16-bit parameters for the CPU kernels: converting per call is a parallel torch op, and
# the OpenMP threads it wakes keep spinning for milliseconds on the cores the kernels' own threads then need
# (measured: a 1024 x 1280 x 1280 layer took 1.5x as long).
_F32_COPIES = WeakIdKeyDictionary()
# 1 / smooth in fp32 for the Triton activation pass: an IEEE division per channel, as the reference's, done once
# per layer instead of in every program of every call.
_RECIPROCALS = WeakIdKeyDictionary()


def _f32(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """fp32, contiguous form of a (small) parameter for the CPU kernels; None stays None."""
    if t is None or (t.dtype == torch.float32 and t.is_contiguous()):
        return t
    return _derived(_F32_COPIES, t, lambda t: t.float().contiguous())


def _reciprocal(smooth: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``1 / smooth`` in fp32 (contiguous); None stays None."""
    if smooth is None:
        return None
    return _derived(_RECIPROCALS, smooth, lambda s: _inverse(s).contiguous())


_CPU_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}


def quantize_act_cpu(x, smooth, lora_down, group_size, qx, ascales, lr, level: str = "auto") -> None:
    """Launch the C++ activation pass, writing ``qx``, ``ascales`` and ``lr`` in place (shapes as
    :func:`w4a4_quantize_act` returns them; x fp32 or bf16 on the CPU). ``level``: ``"auto"`` or a SIMD level
    (``"scalar"``, ``"avx2"``, ``"avx512_vnni"``; raises if it is not compiled in or this CPU lacks it)."""
    from diffboost import _ext

    smooth32, down32 = _f32(smooth), _f32(lora_down)
    _ext.get_ext().w4a4_quantize_cpu(
        level, x.data_ptr(), _CPU_DTYPE_CODES[x.dtype], x.shape[0], x.shape[1], x.stride(0),
        _ptr(smooth32), _ptr(down32), _rank(lora_down, 1), group_size,
        qx.data_ptr(), ascales.data_ptr(), lr.data_ptr(), torch.get_num_threads(),
    )


def gemm_cpu(qx, ascales, qweight, wscales, lora_act, lora_up, bias, out, level: str = "auto") -> None:
    """Launch the C++ GEMM into ``out [M, N]`` (fp32 or bf16, unit stride along N); see :func:`quantize_act_cpu`."""
    from diffboost import _ext

    m, n, k = qx.shape[0], qweight.shape[0], qx.shape[1] * 2
    wscales32, up32, bias32 = _f32(wscales), _f32(lora_up), _f32(bias)
    rank = _rank(lora_up, 0)
    _ext.get_ext().w4a4_gemm_cpu(
        level, qx.data_ptr(), ascales.data_ptr(), m, qweight.data_ptr(), wscales32.data_ptr(), n, k,
        k // wscales.shape[0], _ptr(lora_act) if rank else 0, _ptr(up32), rank, _ptr(bias32),
        out.data_ptr(), _CPU_DTYPE_CODES[out.dtype], out.stride(0), torch.get_num_threads(),
    )


def _cpu_quantize(x, smooth, lora_down, group_size):
    outputs = _quantize_outputs(x, group_size, _rank(lora_down, 1))
    quantize_act_cpu(x, smooth, lora_down, group_size, *outputs)
    return outputs


def _cpu_gemm(qx, ascales, qweight, wscales, lora_act, lora_up, bias, out_dtype):
    out = torch.empty(qx.shape[0], qweight.shape[0], dtype=out_dtype, device=qx.device)
    gemm_cpu(qx, ascales, qweight, wscales, lora_act, lora_up, bias, out)
    return out


_CUDA_DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1}


def gemm_cuda(qx, ascales, qweight, wscales, lora_act, lora_up, bias, out) -> None:
    """Launch the CUDA GEMM (``_C``) into ``out [M, N]`` on the current stream; ``wscales``, ``lora_up``, ``bias``
    and ``out`` share one 16-bit dtype, ``qx``/``qweight`` are 16-byte aligned (see :func:`_cuda_check`)."""
    from diffboost import _ext

    m, n, k = qx.shape[0], qweight.shape[0], qx.shape[1] * 2
    rank = _rank(lora_up, 0)
    _ext.get_ext().w4a4_gemm_cuda(
        qx.data_ptr(), ascales.data_ptr(), m, qweight.data_ptr(), wscales.data_ptr(), n, k, k // wscales.shape[0],
        _ptr(lora_act) if rank else 0, _ptr(lora_up), rank, _ptr(bias), out.data_ptr(), _CUDA_DTYPE_CODES[out.dtype],
        out.stride(0), torch.cuda.current_stream(out.device).cuda_stream,
    )


def _cuda_check(qx, ascales, qweight, wscales, lora_act, lora_up, bias, out_dtype) -> list[str]:
    reasons = []
    for name, t in (("wscales", wscales), ("lora_up", lora_up), ("bias", bias)):
        if t is not None and t.dtype != out_dtype:
            reasons.append(f"{name} dtype {t.dtype} differs from the output dtype {out_dtype}")
    for name, t in (("qx", qx), ("qweight", qweight)):
        if t.data_ptr() % 16:
            reasons.append(f"{name} is not 16-byte aligned (cp.async)")
    return reasons


def _cuda_gemm(qx, ascales, qweight, wscales, lora_act, lora_up, bias, out_dtype):
    out = torch.empty(qx.shape[0], qweight.shape[0], dtype=out_dtype, device=qx.device)
    with _cuda_device(qx):
        gemm_cuda(qx, ascales, qweight, wscales, lora_act, lora_up, bias, out)
    return out


def _reference_quantize(x, smooth, lora_down, group_size):
    return w4a4_quantize_act_reference(x, group_size, smooth, lora_down)


def _reference_gemm(qx, ascales, qweight, wscales, lora_act, lora_up, bias, out_dtype):
    return w4a4_gemm_reference(qx, ascales, qweight, wscales, lora_act, lora_up, bias, out_dtype)


W4A4_QUANTIZE_OP.register(
    Backend(
        name="cpu",
        impl=_cpu_quantize,
        devices=("cpu",),
        dtypes=(torch.float32, torch.bfloat16),
        needs=("_C",),
        description="C++ activation pass (AVX-512 VNNI / AVX2 / scalar, multithreaded)",
    )
)
W4A4_QUANTIZE_OP.register(
    Backend(
        name="triton",
        impl=_triton_quantize,
        devices=("cuda",),
        dtypes=_FLOAT_DTYPES,
        needs=("triton",),
        min_capability=(8, 0),
        description="fused Triton activation pass (one read of x)",
    )
)
W4A4_QUANTIZE_OP.register(
    Backend(name="reference", impl=_reference_quantize, description="PyTorch fp32 reference (test oracle)")
)

W4A4_GEMM_OP.register(
    Backend(
        name="cuda",
        impl=_cuda_gemm,
        devices=("cuda",),
        dtypes=(torch.float16, torch.bfloat16),
        needs=("_C.cuda",),
        min_capability=(8, 0),
        check=_cuda_check,
        # Hopper has no INT4 tensor cores; there Triton's wgmma kernel beat this one's mma.sync INT8 path at every
        # shape of bench_w4a4 (H100, session 3: GEMM alone 7-25% faster).
        auto_below_capability=((9, 0), "the Triton kernel (wgmma) is faster on Hopper (bench_w4a4, H100)"),
        description="CUDA W4A4 GEMM: mma.sync INT4 (sm80-89) / INT8 (sm90+), fp32 group scaling, fused epilogue",
    )
)
W4A4_GEMM_OP.register(
    Backend(
        name="cpu",
        impl=_cpu_gemm,
        devices=("cpu",),
        dtypes=(torch.float32, torch.bfloat16),
        needs=("_C",),
        description="C++ W4A4 GEMM (AVX-512 VNNI / AVX2 / scalar, multithreaded)",
    )
)
W4A4_GEMM_OP.register(
    Backend(
        name="triton",
        impl=_triton_gemm,
        devices=("cuda",),
        dtypes=_FLOAT_DTYPES,
        needs=("triton",),
        min_capability=(8, 0),
        description="Triton W4A4 GEMM on INT8 tensor cores (unpacked nibbles), fp32 group scaling",
    )
)
W4A4_GEMM_OP.register(
    Backend(name="reference", impl=_reference_gemm, description="PyTorch dequantize + matmul reference (test oracle)")
)


# ----------------------------------------------------------------------------------------------------------------
# torch.library ops: opaque nodes for torch.compile; dispatch happens when they run.
# ----------------------------------------------------------------------------------------------------------------


def _run_quantize(x, smooth, lora_down, group_size, backend):
    args = (x, smooth, lora_down, group_size)
    return W4A4_QUANTIZE_OP.select(x.device, x.dtype, *args, backend=backend).impl(*args)


def _run_gemm(qx, ascales, qweight, wscales, lora_act, lora_up, bias, out_dtype, backend):
    args = (qx, ascales, qweight, wscales, lora_act, lora_up, bias, out_dtype)
    return W4A4_GEMM_OP.select(qx.device, out_dtype, *args, backend=backend).impl(*args)


# Under torch.compile each op is one opaque node with a fake implementation; in eager mode the same code runs without
# the torch.library dispatch layers, which cost more than a small layer itself.
def _quantize_entry():
    return torch.ops.diffboost.w4a4_quantize_act if torch.compiler.is_compiling() else _run_quantize


def _gemm_entry():
    return torch.ops.diffboost.w4a4_gemm if torch.compiler.is_compiling() else _run_gemm


@torch.library.custom_op("diffboost::w4a4_quantize_act", mutates_args=())
def _quantize_op(
    x: torch.Tensor,
    smooth: Optional[torch.Tensor],
    lora_down: Optional[torch.Tensor],
    group_size: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _run_quantize(x, smooth, lora_down, group_size, backend)


@_quantize_op.register_fake
def _quantize_fake(x, smooth, lora_down, group_size, backend):
    m, k = x.shape
    return (
        x.new_empty((m, k // 2), dtype=torch.uint8),
        x.new_empty((k // group_size, m), dtype=torch.float32),
        x.new_empty((m, _rank(lora_down, 1)), dtype=torch.float32),
    )


@torch.library.custom_op("diffboost::w4a4_gemm", mutates_args=())
def _gemm_op(
    qx: torch.Tensor,
    ascales: torch.Tensor,
    qweight: torch.Tensor,
    wscales: torch.Tensor,
    lora_act: Optional[torch.Tensor],
    lora_up: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    out_dtype: torch.dtype,
    backend: str,
) -> torch.Tensor:
    return _run_gemm(qx, ascales, qweight, wscales, lora_act, lora_up, bias, out_dtype, backend)


@_gemm_op.register_fake
def _gemm_fake(qx, ascales, qweight, wscales, lora_act, lora_up, bias, out_dtype, backend):
    return qx.new_empty((qx.shape[0], qweight.shape[0]), dtype=out_dtype)


# ----------------------------------------------------------------------------------------------------------------
# Validation and public functions
# ----------------------------------------------------------------------------------------------------------------


def _dtype_names(dtypes) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def _check_tensor(fn: str, name: str, t, dtypes, shape: tuple, device: torch.device, contiguous: bool = True) -> None:
    """``shape`` entries of None match any size."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise ValueError(f"{fn}: {name} dtype {t.dtype} not supported ({_dtype_names(dtypes)})")
    if t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{fn}: {name} must have shape {want}, got {list(t.shape)}")
    if t.device != device:
        raise ValueError(f"{fn}: {name} is on {t.device}, expected {device}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{fn}: {name} must be contiguous (call .contiguous() once when loading the layer)")


def _check_group_size(fn: str, group_size) -> None:
    if group_size not in GROUP_SIZES:
        raise ValueError(f"{fn}: group_size={group_size!r} not supported ({', '.join(map(str, GROUP_SIZES))})")


def _check_lora_pair(fn: str, lora_a: Optional[torch.Tensor], lora_b: Optional[torch.Tensor], names: str) -> None:
    if (lora_a is None) != (lora_b is None):
        raise ValueError(f"{fn}: pass both of {names} or neither")


def _check_rank(fn: str, name: str, rank: int) -> None:
    if rank % 16:
        raise ValueError(f"{fn}: {name} rank {rank} must be a multiple of 16 (tensor-core tile)")


def _validate_quantize(fn: str, x, group_size, smooth, lora_down) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{fn}: x dtype {x.dtype} not supported ({_dtype_names(_FLOAT_DTYPES)})")
    _check_group_size(fn, group_size)
    k = x.shape[-1] if x.dim() else 0
    if x.dim() < 1 or k == 0 or k % group_size:
        raise ValueError(
            f"{fn}: x's last dim (in_features) {k} must be a positive multiple of group_size={group_size}"
        )
    if smooth is not None:
        _check_tensor(fn, "smooth", smooth, _FLOAT_DTYPES, (k,), x.device)
    if lora_down is not None:
        _check_tensor(fn, "lora_down", lora_down, _FLOAT_DTYPES, (k, None), x.device)
        _check_rank(fn, "lora_down", lora_down.shape[1])


def w4a4_quantize_act(
    x: torch.Tensor,
    group_size: int = 64,
    smooth: Optional[torch.Tensor] = None,
    lora_down: Optional[torch.Tensor] = None,
    *,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused activation pass: ``x / smooth``, per-token INT4 quantization in groups, and ``(x / smooth) @ lora_down``.

    Args:
        x: ``[M, K]`` fp16/bf16/fp32, unit stride along K (any row stride).
        group_size: 32, 64 or 128; K must be a multiple.
        smooth: ``[K]`` smoothing factors or None.
        lora_down: ``[K, r]`` (r a multiple of 16) or None.
        backend: ``"auto"``, ``"cpu"``, ``"triton"`` or ``"reference"``.

    Returns:
        ``(qx, ascales, lr)``: ``uint8 [M, K/2]`` packed as the weights (see the module docstring),
        ``fp32 [K/G, M]`` scales, ``fp32 [M, r]`` low-rank activations (``r = 0`` without ``lora_down``).
    """
    fn = "w4a4_quantize_act"
    _validate_quantize(fn, x, group_size, smooth, lora_down)
    if x.dim() != 2:
        raise ValueError(f"{fn}: x must be 2-D [M, K], got shape {list(x.shape)} (w4a4_linear flattens for you)")
    if x.stride(1) != 1:
        raise ValueError(f"{fn}: x must have unit stride along K, got strides {x.stride()}")
    return _quantize_entry()(x, smooth, lora_down, group_size, backend)


def _validate_weights(fn, qweight, wscales, lora_up, bias) -> tuple[int, int, int]:
    """Checks the layer's tensors; returns ``(N, K, groups)``."""
    _check_tensor(fn, "qweight", qweight, (torch.uint8,), (None, None), qweight.device)
    n, k = qweight.shape[0], qweight.shape[1] * 2
    device = qweight.device
    _check_tensor(fn, "wscales", wscales, _FLOAT_DTYPES, (None, n), device)
    groups = wscales.shape[0]
    if groups == 0 or k % groups or k // groups not in GROUP_SIZES:
        raise ValueError(
            f"{fn}: wscales has {groups} groups for K={k}; the group size K/groups must be one of "
            f"{', '.join(map(str, GROUP_SIZES))}"
        )
    if lora_up is not None:
        _check_tensor(fn, "lora_up", lora_up, _FLOAT_DTYPES, (None, n), device)
        _check_rank(fn, "lora_up", lora_up.shape[0])
    if bias is not None:
        _check_tensor(fn, "bias", bias, _FLOAT_DTYPES, (n,), device)
    return n, k, groups


def _validate_gemm(fn, qx, ascales, qweight, wscales, lora_act, lora_up, bias, out_dtype) -> None:
    _n, k, groups = _validate_weights(fn, qweight, wscales, lora_up, bias)
    _check_tensor(fn, "qx", qx, (torch.uint8,), (None, k // 2), qweight.device)
    _check_tensor(fn, "ascales", ascales, (torch.float32,), (groups, qx.shape[0]), qweight.device)
    _check_lora_pair(fn, lora_act, lora_up, "lora_act and lora_up")
    if lora_up is not None:
        _check_tensor(fn, "lora_act", lora_act, (torch.float32,), (qx.shape[0], lora_up.shape[0]), qweight.device)
    if out_dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{fn}: out_dtype {out_dtype} not supported ({_dtype_names(_FLOAT_DTYPES)})")


def w4a4_gemm(
    qx: torch.Tensor,
    ascales: torch.Tensor,
    qweight: torch.Tensor,
    wscales: torch.Tensor,
    *,
    lora_act: Optional[torch.Tensor] = None,
    lora_up: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    out_dtype: torch.dtype = torch.float32,
    backend: str = "auto",
) -> torch.Tensor:
    """W4A4 GEMM on packed operands: ``sum_g (qx_g . qweight_g) * ascales_g * wscales_g + lora_act @ lora_up + bias``.

    Args:
        qx, ascales: from :func:`w4a4_quantize_act` (``uint8 [M, K/2]``, ``fp32 [K/G, M]``).
        qweight, wscales: the layer's packed weight ``uint8 [N, K/2]`` and scales ``[K/G, N]``.
        lora_act, lora_up: ``fp32 [M, r]`` (from the activation pass) and ``[r, N]``, both or neither.
        bias: ``[N]`` or None.
        out_dtype: fp16, bf16 or fp32.
        backend: ``"auto"``, ``"cuda"``, ``"cpu"``, ``"triton"`` or ``"reference"``.

    Returns:
        ``[M, N]`` in ``out_dtype``.
    """
    _validate_gemm("w4a4_gemm", qx, ascales, qweight, wscales, lora_act, lora_up, bias, out_dtype)
    return _gemm_entry()(qx, ascales, qweight, wscales, lora_act, lora_up, bias, out_dtype, backend)


def _validate_layer_input(fn, x, qweight, k, groups, smooth, lora_down) -> None:
    """Checks a linear layer's input ``x [..., K]`` (and its smoothing factors) against the layer's weight."""
    if isinstance(x, torch.Tensor) and (x.dim() < 1 or x.shape[-1] != k):
        raise ValueError(f"{fn}: x's last dim must be the layer's in_features K={k}, got shape {list(x.shape)}")
    _validate_quantize(fn, x, k // groups, smooth, lora_down)
    if x.device != qweight.device:
        raise ValueError(f"{fn}: x is on {x.device}, qweight on {qweight.device}")


def _as_rows(x: torch.Tensor, k: int) -> torch.Tensor:
    """``x [..., K]`` as ``[M, K]`` with unit stride along K (a copy only when it has none)."""
    x2 = x.reshape(-1, k)
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def w4a4_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    wscales: torch.Tensor,
    *,
    smooth: Optional[torch.Tensor] = None,
    lora_down: Optional[torch.Tensor] = None,
    lora_up: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """A W4A4 linear layer: the activation pass then the GEMM, over x's leading dims.

    Args:
        x: ``[..., K]`` fp16/bf16/fp32, any strides.
        qweight, wscales, smooth, lora_down, lora_up, bias: the layer in the documented layout (module docstring);
            the group size is ``K / wscales.shape[0]``.
        backend: ``"auto"`` or one backend name for both steps (``"cuda"`` exists for the GEMM only: the
            activation pass then runs in Triton).

    Returns:
        ``[..., N]`` in x's dtype.
    """
    fn = "w4a4_linear"
    _n, k, groups = _validate_weights(fn, qweight, wscales, lora_up, bias)
    _check_lora_pair(fn, lora_down, lora_up, "lora_down and lora_up")
    _validate_layer_input(fn, x, qweight, k, groups, smooth, lora_down)
    if lora_down is not None and lora_down.shape[1] != lora_up.shape[0]:
        raise ValueError(f"{fn}: lora_down rank {lora_down.shape[1]} differs from lora_up rank {lora_up.shape[0]}")
    lead, x2 = x.shape[:-1], _as_rows(x, k)
    quantize_backend = "triton" if backend == "cuda" else backend  # the CUDA extension has the GEMM only
    qx, ascales, lr = _quantize_entry()(x2, smooth, lora_down, k // groups, quantize_backend)
    lora_act = lr if lora_up is not None else None
    out = _gemm_entry()(qx, ascales, qweight, wscales, lora_act, lora_up, bias, x.dtype, backend)
    return out.view(*lead, qweight.shape[0])
