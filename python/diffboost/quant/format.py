"""The W4A4 weight format, and how to build it from a float weight (SVDQuant's recipe).

The layout is specified in :mod:`diffboost.ops.w4a4` (module docstring): packed INT4 ``qweight [N, K/2]``,
``wscales [K/G, N]``, optional ``smooth [K]``, optional low-rank ``lora_down [K, r]`` / ``lora_up [r, N]``, optional
``bias [N]``. :class:`W4A4Weights` holds one layer's tensors; :func:`quantize_linear_weight` makes them:

1. Smoothing (optional): ``W' = W * smooth`` per input channel, while the layer divides its input by ``smooth``, so
   activation outliers migrate into the weight (SmoothQuant). ``smooth`` is rounded to the storage dtype *before*
   it multiplies ``W``, so the product with the divided input is exactly the original layer.
2. Low-rank branch (optional, ``rank > 0``): the top singular directions of ``W'``, ``W'^T ~ lora_down @ lora_up``
   with the singular values split evenly between the factors (balanced magnitudes for 16-bit storage). The factors
   are rounded to the storage dtype first and the residual is taken against the rounded factors, so the residual
   absorbs their rounding error.
3. The residual is quantized to symmetric INT4 per output row and group of ``G`` input channels, with 16-bit
   scales (``absmax / 7`` rounded to the storage dtype; values are rounded against the rounded scale).

A weight whose ``K`` is not a multiple of ``G`` is zero-padded to the next multiple (smoothing factors pad with 1):
the packed tensors have the padded ``K``, and the layer pads its input with zeros the same way
(:class:`~diffboost.quant.W4A4Linear` does), which adds nothing to the products or the activation ranges.

:func:`smooth_factors` computes SmoothQuant's factors from per-channel activation maxima; calibration over a model
(activation statistics across timesteps, the choice of alpha) builds on it.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from diffboost.ops.w4a4 import GROUP_SIZES, INT4_MAX, pack_int4, unpack_int4

__all__ = ["STORAGE_DTYPES", "W4A4Weights", "dequantize_weight", "quantize_linear_weight", "smooth_factors"]

#: dtypes the 16-bit parts (scales, smoothing, low-rank factors, bias) are stored in.
STORAGE_DTYPES = (torch.float16, torch.bfloat16)


@dataclasses.dataclass
class W4A4Weights:
    """One linear layer in the W4A4 layout (shapes in :mod:`diffboost.ops.w4a4`)."""

    qweight: torch.Tensor
    wscales: torch.Tensor
    smooth: Optional[torch.Tensor] = None
    lora_down: Optional[torch.Tensor] = None
    lora_up: Optional[torch.Tensor] = None
    bias: Optional[torch.Tensor] = None

    @property
    def group_size(self) -> int:
        """Input channels per scale group."""
        return self.qweight.shape[1] * 2 // self.wscales.shape[0]

    @property
    def rank(self) -> int:
        """Rank of the low-rank branch (0 without one)."""
        return 0 if self.lora_down is None else self.lora_down.shape[1]


def smooth_factors(act_amax: torch.Tensor, weight: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """SmoothQuant's per-input-channel factors ``act_amax^alpha / weight_amax^(1 - alpha)`` (fp32, ``[K]``).

    Args:
        act_amax: ``[K]`` maximum absolute activation per input channel (from calibration data).
        weight: ``[N, K]`` the layer's weight.
        alpha: migration strength in ``[0, 1]``: 0 leaves activations alone, 1 moves all their range to the weight.

    Channels where either maximum is zero get factor 1.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"smooth_factors: alpha must be in [0, 1], got {alpha}")
    if act_amax.dim() != 1 or weight.dim() != 2 or weight.shape[1] != act_amax.shape[0]:
        raise ValueError(
            f"smooth_factors: act_amax must be [K] and weight [N, K], got {list(act_amax.shape)} and "
            f"{list(weight.shape)}"
        )
    a = act_amax.detach().float().abs()
    w = weight.detach().float().abs().amax(dim=0).to(a.device)
    factors = a.pow(alpha) / w.pow(1.0 - alpha)
    usable = (a > 0) & (w > 0) & torch.isfinite(factors)
    return torch.where(usable, factors, torch.ones_like(factors))


def _quantize_groups(weight: torch.Tensor, group_size: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric INT4 per row and group: ``(qweight uint8 [N, K/2], wscales [K/G, N] in dtype)``."""
    n, k = weight.shape
    w = weight.float().view(n, k // group_size, group_size)
    scales = (w.abs().amax(dim=-1) / INT4_MAX).to(dtype)  # [N, K/G], rounded to storage first
    s = scales.float().unsqueeze(-1)
    q = torch.where(s > 0, torch.round(w / torch.where(s > 0, s, torch.ones_like(s))), torch.zeros_like(w))
    q = q.clamp(-INT4_MAX, INT4_MAX).to(torch.int8).view(n, k)
    return pack_int4(q), scales.t().contiguous()


def quantize_linear_weight(
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    group_size: int = 64,
    rank: int = 32,
    smooth: Optional[torch.Tensor] = None,
    dtype: torch.dtype = torch.bfloat16,
    svd: str = "exact",
) -> W4A4Weights:
    """Build the W4A4 form of ``y = x @ weight^T + bias`` (see the module docstring for the recipe).

    Args:
        weight: ``[N, K]`` float weight; K is zero-padded to a multiple of ``group_size`` (see the module docstring).
        bias: ``[N]`` or None.
        group_size: 32, 64 or 128.
        rank: rank of the low-rank branch, a multiple of 16 (0 for none), at most ``min(N, K)``.
        smooth: ``[K]`` positive smoothing factors (e.g. :func:`smooth_factors`) or None.
        dtype: storage dtype of the 16-bit parts (fp16 or bf16).
        svd: ``"exact"`` (``torch.linalg.svd``) or ``"randomized"``: seeded subspace iteration for the top
            ``rank`` directions, much faster on large layers; any shortfall in the branch lands in the residual,
            which is quantized like the rest.
    """
    fn = "quantize_linear_weight"
    if weight.dim() != 2 or not weight.dtype.is_floating_point:
        raise ValueError(f"{fn}: weight must be a 2-D float tensor, got {weight.dtype} {list(weight.shape)}")
    n, k = weight.shape
    if group_size not in GROUP_SIZES:
        raise ValueError(f"{fn}: group_size={group_size!r} not supported ({', '.join(map(str, GROUP_SIZES))})")
    if not isinstance(rank, int) or rank < 0 or rank % 16 or rank > min(n, k):
        raise ValueError(f"{fn}: rank={rank!r} must be 0 or a multiple of 16 no larger than min(N, K)={min(n, k)}")
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"{fn}: dtype {dtype} not supported (float16, bfloat16)")
    if svd not in ("exact", "randomized"):
        raise ValueError(f"{fn}: svd={svd!r} not supported ('exact', 'randomized')")
    w = weight.detach().float()
    smooth16 = None
    if smooth is not None:
        if smooth.shape != (k,):
            raise ValueError(f"{fn}: smooth must have shape [{k}], got {list(smooth.shape)}")
        smooth16 = smooth.detach().to(device=w.device, dtype=dtype)
        if not bool((smooth16.float() > 0).all()) or not bool(torch.isfinite(smooth16.float()).all()):
            raise ValueError(f"{fn}: smooth factors must be positive and finite in {dtype}")
        w = w * smooth16.float()
    pad = -k % group_size
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
        if smooth16 is not None:
            smooth16 = torch.cat([smooth16, smooth16.new_ones(pad)])
    lora_down = lora_up = None
    if rank:
        u, s, vh = torch.linalg.svd(w, full_matrices=False) if svd == "exact" else _randomized_svd(w, rank)
        root = s[:rank].sqrt()
        lora_down = (vh[:rank].t() * root).to(dtype).contiguous()  # [K, r]
        lora_up = (root.unsqueeze(1) * u[:, :rank].t()).to(dtype).contiguous()  # [r, N]
        w = w - (lora_down.float() @ lora_up.float()).t()
    qweight, wscales = _quantize_groups(w, group_size, dtype)
    return W4A4Weights(
        qweight=qweight,
        wscales=wscales,
        smooth=smooth16,
        lora_down=lora_down,
        lora_up=lora_up,
        bias=None if bias is None else bias.detach().to(dtype),
    )


# Subspace iteration: oversampling and power iterations that make the top directions of a diffusion weight (slowly
# decaying spectrum) match the exact SVD's to well below the INT4 step.
_SVD_OVERSAMPLE = 16
_SVD_ITERATIONS = 4


def _randomized_svd(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` ``(u, s, vh)`` of ``w`` by randomized subspace iteration (Halko, Martinsson, Tropp 2011).

    The Gaussian test matrix comes from a generator seeded with 0, so the result is deterministic and the global
    RNG (which the user's sampling depends on) is untouched.
    """
    n, k = w.shape
    width = min(rank + _SVD_OVERSAMPLE, n, k)
    generator = torch.Generator(device=w.device).manual_seed(0)
    basis = torch.linalg.qr(w @ torch.randn(k, width, generator=generator, device=w.device)).Q
    for _ in range(_SVD_ITERATIONS):  # re-orthonormalize every half step: fp32 would lose the small directions
        basis = torch.linalg.qr(w @ torch.linalg.qr(w.t() @ basis).Q).Q
    u, s, vh = torch.linalg.svd(basis.t() @ w, full_matrices=False)
    return (basis @ u)[:, :rank], s[:rank], vh[:rank]


def dequantize_weight(weights: W4A4Weights, in_features: Optional[int] = None) -> torch.Tensor:
    """The fp32 ``[N, K]`` weight the W4A4 layer represents (its activations still get quantized at run time).

    ``in_features`` drops the zero padding of a K that is not a multiple of the group size.
    """
    n, half = weights.qweight.shape
    g = weights.group_size
    q = unpack_int4(weights.qweight).float().view(n, -1, g)
    w = (q * weights.wscales.float().t().unsqueeze(-1)).view(n, half * 2)
    if weights.lora_down is not None:
        w = w + (weights.lora_down.float() @ weights.lora_up.float()).t()
    if weights.smooth is not None:
        w = w / weights.smooth.float()
    return w if in_features is None else w[:, :in_features]
