"""``W4A4Config``: which layers of a denoiser become W4A4 (or weight-only W4A16) and how they are calibrated."""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Any, Optional

import torch

from diffboost.ops.w4a4 import GROUP_SIZES
from diffboost.quant.format import STORAGE_DTYPES

__all__ = ["DEFAULT_SKIP", "DEFAULT_WEIGHT_ONLY", "W4A4Config"]

#: Layers kept in 16-bit by default: glob patterns (:mod:`fnmatch`) on a layer's qualified name inside its
#: denoiser (``down_blocks.1.attentions.0.proj_in``). These are the layers QuEST and SVDQuant single out as
#: sensitive: the first and last layers and the timestep / text / guidance embeddings, plus ControlNet's zero
#: convolutions. They hold a few percent of the weights. (The adaLN / modulation projections inside the blocks are
#: sensitive too, but hold a quarter of FLUX's weights: they get 4-bit weights only, see DEFAULT_WEIGHT_ONLY.)
DEFAULT_SKIP: tuple[str, ...] = (
    # first and last layers (top level only: the proj_in / proj_out inside blocks are ordinary GEMMs)
    "conv_in", "conv_out", "proj_in", "proj_out", "x_embedder", "context_embedder", "pos_embed.*", "norm_out.*",
    # timestep, text, guidance and class embeddings
    "time_embedding.*", "time_text_embed.*", "add_embedding.*", "adaln_single.*", "caption_projection.*",
    "encoder_hid_proj*", "class_embedding.*", "time_embed.*",
    # the U-Net ResNets' timestep projections: sensitive like the adaLN projections below, but ~3% of a U-Net's
    # weights, too few to be worth 4-bit weights (and the CPU has no W4A16 kernel yet)
    "*.time_emb_proj",
    # ControlNet: conditioning embedding and zero convolutions
    "controlnet_cond_embedding.*", "controlnet_down_blocks.*", "controlnet_mid_block",
)

#: Layers quantized to 4-bit weights with 16-bit activations (W4A16, :class:`~diffboost.quant.W4A16Linear`) by
#: default: the adaLN modulation projections inside DiT blocks (``AdaLayerNorm*.linear``). Their outputs scale and
#: shift every token of a block, so their inputs are not quantized (QuEST and SVDQuant single them out); they run on
#: one row per sample, so reading 4-bit weights is all they cost, and they hold 27% of FLUX.1's parameters (3.2 of
#: 11.9 B): in 16-bit they would cap its weight reduction near 2x. SVDQuant's FLUX models quantize them the same way.
DEFAULT_WEIGHT_ONLY: tuple[str, ...] = ("*norm*.linear",)

#: The denoiser components of a pipeline that are quantized unless ``components`` says otherwise.
DEFAULT_COMPONENTS = ("unet", "transformer")
_ALL_COMPONENTS = ("unet", "transformer", "controlnet")
#: SmoothQuant migration strengths tried per layer when ``smooth_alpha`` is None (plus no smoothing at all).
DEFAULT_ALPHA_GRID = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
_SEQUENCE_FIELDS = ("alpha_grid", "skip", "include", "weight_only", "components")


@dataclasses.dataclass(frozen=True)
class W4A4Config:
    """What ``diffboost.quant.quantize`` / ``diffboost.patch(pipe, quant=...)`` do (SVDQuant's recipe per layer).

    Every ``nn.Linear`` and 1x1 ``nn.Conv2d`` of the chosen components whose name matches ``include`` (all, when
    None) and no pattern of ``skip`` becomes a :class:`~diffboost.quant.W4A4Linear` (the convolution as a GEMM over
    pixels), or a weight-only :class:`~diffboost.quant.W4A16Linear` (``W4A16Conv2d``) when it matches
    ``weight_only``. Per layer: smoothing factors from the calibration activations, the rank-``rank`` SVD branch of the
    smoothed weight (W4A4 only), INT4 groups of ``group_size`` for the residual.

    Args:
        rank: rank of the 16-bit low-rank branch (multiple of 16, 0 for none); clamped per layer to the largest
            multiple of 16 not above ``min(in_features, out_features)``.
        group_size: input channels per INT4 scale: 32, 64 or 128.
        smooth_alpha: SmoothQuant migration strength in ``[0, 1]``; None searches ``alpha_grid`` (and no smoothing)
            per layer for the smallest output error on the calibration activations.
        alpha_grid: the strengths tried when ``smooth_alpha`` is None.
        smooth: False quantizes without smoothing (then no calibration data is needed).
        skip: glob patterns of layer names kept in 16-bit (:data:`DEFAULT_SKIP`); they win over ``include``.
        include: glob patterns of the layers to quantize; None means every eligible layer.
        weight_only: glob patterns of the quantized layers that get 4-bit weights but keep 16-bit activations
            (:data:`DEFAULT_WEIGHT_ONLY`: the modulation projections); ``()`` makes every quantized layer W4A4,
            ``("*",)`` every one W4A16.
        components: pipeline components to quantize (``"unet"``, ``"transformer"``, ``"controlnet"``); ignored when
            a bare model is quantized.
        keep_original: keep the float layers so that ``diffboost.unpatch`` can restore them (costs their memory).
        dtype: storage dtype of scales, smoothing, low-rank factors and bias; None: the layer's dtype if it is
            16-bit, else bfloat16.
        calibration_tokens: activation rows per layer kept for the alpha search, sampled evenly across calls.
        backend: W4A4 kernel backend of the new layers (``"auto"`` dispatches per device).
    """

    rank: int = 32
    group_size: int = 64
    smooth_alpha: Optional[float] = None
    alpha_grid: tuple[float, ...] = DEFAULT_ALPHA_GRID
    smooth: bool = True
    skip: tuple[str, ...] = DEFAULT_SKIP
    include: Optional[tuple[str, ...]] = None
    weight_only: tuple[str, ...] = DEFAULT_WEIGHT_ONLY
    components: tuple[str, ...] = DEFAULT_COMPONENTS
    keep_original: bool = False
    dtype: Optional[torch.dtype] = None
    calibration_tokens: int = 512
    backend: str = "auto"

    def __post_init__(self) -> None:
        # Lists are accepted for convenience and stored as tuples, so configs compare and hash by value.
        for name in _SEQUENCE_FIELDS:
            value = getattr(self, name)
            if isinstance(value, str):
                raise TypeError(f"W4A4Config: {name} must be a sequence of strings/values, not one string")
            if value is not None:
                object.__setattr__(self, name, tuple(value))
        if not isinstance(self.rank, int) or self.rank < 0 or self.rank % 16:
            raise ValueError(f"W4A4Config: rank={self.rank!r} must be 0 or a multiple of 16")
        if self.group_size not in GROUP_SIZES:
            raise ValueError(f"W4A4Config: group_size={self.group_size!r} not supported "
                             f"({', '.join(map(str, GROUP_SIZES))})")
        alphas = self.alpha_grid if self.smooth_alpha is None else (self.smooth_alpha,)
        if not alphas or not all(isinstance(a, (int, float)) and 0.0 <= a <= 1.0 for a in alphas):
            raise ValueError(f"W4A4Config: smooth_alpha / alpha_grid must be numbers in [0, 1], got {alphas!r}")
        unknown = sorted(set(self.components) - set(_ALL_COMPONENTS))
        if unknown or not self.components:
            raise ValueError(f"W4A4Config: components {list(self.components)} not supported; choose from "
                             f"{', '.join(_ALL_COMPONENTS)}")
        if self.dtype is not None and self.dtype not in STORAGE_DTYPES:
            raise ValueError(f"W4A4Config: dtype {self.dtype} not supported (None, torch.float16, torch.bfloat16)")
        if not isinstance(self.calibration_tokens, int) or self.calibration_tokens < 1:
            raise ValueError(f"W4A4Config: calibration_tokens={self.calibration_tokens!r} must be a positive int")

    def scheme(self, name: str) -> Optional[str]:
        """How the layer called ``name`` (qualified, inside its denoiser) is quantized by name: ``"w4a4"``,
        ``"w4a16"`` (weight-only) or None (kept in 16-bit)."""
        def matches(patterns):
            return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)

        if matches(self.skip) or (self.include is not None and not matches(self.include)):
            return None
        return "w4a16" if matches(self.weight_only) else "w4a4"

    def to_json(self) -> dict[str, Any]:
        """A JSON-serializable dict (for checkpoints); :meth:`from_json` inverts it."""
        out = dataclasses.asdict(self)
        out["dtype"] = None if self.dtype is None else str(self.dtype).replace("torch.", "")
        for name in _SEQUENCE_FIELDS:
            if out[name] is not None:
                out[name] = list(out[name])
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "W4A4Config":
        """The config :meth:`to_json` wrote; unknown keys raise ValueError."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ValueError(f"W4A4Config: unknown field(s) {', '.join(unknown)}")
        data = dict(data)
        if data.get("dtype") is not None:
            data["dtype"] = getattr(torch, data["dtype"])
        return cls(**data)
