"""``W4A4Linear``: a drop-in ``nn.Linear`` replacement with 4-bit weights and 4-bit activations."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from diffboost.ops.w4a4 import GROUP_SIZES, w4a4_linear
from diffboost.quant.format import STORAGE_DTYPES, W4A4Weights, dequantize_weight, quantize_linear_weight

__all__ = ["W4A4Linear"]


class W4A4Linear(nn.Module):
    """``y = x W^T + b`` with W in the W4A4 layout and x quantized to INT4 on the fly (SVDQuant's scheme).

    Build one with :meth:`from_linear`. The forward pass runs :func:`diffboost.ops.w4a4.w4a4_linear`, dispatched per
    device (CUDA / CPU ``_C`` kernels, Triton, or the PyTorch reference); ``backend`` forces one. Inputs may be
    fp16, bf16 or fp32 of any leading shape; the output has x's dtype. The tensors are buffers (``state_dict``
    saves them, ``.to(device)`` moves them); absent parts (no smoothing, ``rank=0``, no bias) are ``None``.

    Attributes:
        in_features, out_features, group_size, rank: the layer's sizes.
        backend: ``"auto"`` or a backend name of the W4A4 ops.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        group_size: int = 64,
        rank: int = 32,
        bias: bool = True,
        smooth: bool = False,
        dtype: torch.dtype = torch.bfloat16,
        device: Optional[torch.device] = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if group_size not in GROUP_SIZES:
            supported = ", ".join(map(str, GROUP_SIZES))
            raise ValueError(f"W4A4Linear: group_size={group_size!r} not supported ({supported})")
        if in_features <= 0 or in_features % group_size:
            raise ValueError(f"W4A4Linear: in_features {in_features} is not a positive multiple of group_size")
        if rank < 0 or rank % 16:
            raise ValueError(f"W4A4Linear: rank={rank} must be 0 or a multiple of 16")
        if dtype not in STORAGE_DTYPES:
            raise ValueError(f"W4A4Linear: dtype {dtype} not supported (float16, bfloat16)")
        self.in_features, self.out_features = in_features, out_features
        self.group_size, self.rank = group_size, rank
        self.backend = backend
        k, n = in_features, out_features
        self.register_buffer("qweight", torch.zeros(n, k // 2, dtype=torch.uint8, device=device))
        self.register_buffer("wscales", torch.zeros(k // group_size, n, dtype=dtype, device=device))
        self.register_buffer("smooth", torch.ones(k, dtype=dtype, device=device) if smooth else None)
        self.register_buffer("lora_down", torch.zeros(k, rank, dtype=dtype, device=device) if rank else None)
        self.register_buffer("lora_up", torch.zeros(rank, n, dtype=dtype, device=device) if rank else None)
        self.register_buffer("bias", torch.zeros(n, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        group_size: int = 64,
        rank: int = 32,
        smooth: Optional[torch.Tensor] = None,
        *,
        dtype: Optional[torch.dtype] = None,
        backend: str = "auto",
    ) -> "W4A4Linear":
        """Quantize ``linear`` (see :func:`diffboost.quant.format.quantize_linear_weight` for the recipe).

        Args:
            linear: the layer; it is not modified.
            group_size: 32, 64 or 128 input channels per scale; ``in_features`` must be a multiple.
            rank: rank of the 16-bit low-rank branch (multiple of 16; 0 for none).
            smooth: ``[in_features]`` smoothing factors (e.g. :func:`diffboost.quant.smooth_factors` of calibration
                activations), or None.
            dtype: storage dtype of scales, smoothing, low-rank factors and bias; default: the layer's dtype if it
                is 16-bit, else bf16.
            backend: see the class docstring.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"W4A4Linear.from_linear: expected an nn.Linear, got {type(linear).__name__}")
        if dtype is None:
            dtype = linear.weight.dtype if linear.weight.dtype in STORAGE_DTYPES else torch.bfloat16
        weights = quantize_linear_weight(
            linear.weight, linear.bias, group_size=group_size, rank=rank, smooth=smooth, dtype=dtype
        )
        module = cls(
            linear.in_features, linear.out_features, group_size=group_size, rank=rank, bias=linear.bias is not None,
            smooth=smooth is not None, dtype=dtype, device=linear.weight.device, backend=backend,
        )
        module.load_weights(weights)
        return module

    def load_weights(self, weights: W4A4Weights) -> None:
        """Copy a :class:`~diffboost.quant.format.W4A4Weights` of this layer's shapes into the buffers."""
        for name in ("qweight", "wscales", "smooth", "lora_down", "lora_up", "bias"):
            mine, theirs = getattr(self, name), getattr(weights, name)
            if (mine is None) != (theirs is None):
                raise ValueError(f"W4A4Linear.load_weights: {name} is {'absent' if theirs is None else 'present'} "
                                 "in the weights but not in this layer")
            if mine is not None:
                if mine.shape != theirs.shape:
                    raise ValueError(f"W4A4Linear.load_weights: {name} has shape {list(theirs.shape)}, "
                                     f"expected {list(mine.shape)}")
                mine.copy_(theirs)

    @property
    def weights(self) -> W4A4Weights:
        """The layer's tensors (views of the buffers, not copies)."""
        return W4A4Weights(self.qweight, self.wscales, self.smooth, self.lora_down, self.lora_up, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return w4a4_linear(
            x, self.qweight, self.wscales, smooth=self.smooth, lora_down=self.lora_down, lora_up=self.lora_up,
            bias=self.bias, backend=self.backend,
        )

    def memory(self) -> dict[str, int]:
        """Bytes held: ``qweight`` (packed INT4), ``scales`` (group scales and smoothing), ``low_rank``, ``bias``,
        ``total``, and ``dense_16bit`` (the same layer as a 16-bit ``nn.Linear``, for comparison)."""
        def size(*tensors):
            return sum(t.numel() * t.element_size() for t in tensors if t is not None)

        out = {
            "qweight": size(self.qweight),
            "scales": size(self.wscales, self.smooth),
            "low_rank": size(self.lora_down, self.lora_up),
            "bias": size(self.bias),
        }
        out["total"] = sum(out.values())
        out["dense_16bit"] = 2 * (self.in_features * self.out_features + (self.out_features if self.bias is not None
                                                                            else 0))
        return out

    def to_linear(self, dtype: Optional[torch.dtype] = None) -> nn.Linear:
        """A float ``nn.Linear`` with the dequantized weight (in ``dtype``, default the storage dtype).

        It computes with the weight's INT4 rounding but unquantized activations.
        """
        dtype = self.wscales.dtype if dtype is None else dtype
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.qweight.device, dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(dequantize_weight(self.weights))
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        parts = [f"in_features={self.in_features}", f"out_features={self.out_features}",
                 f"group_size={self.group_size}", f"rank={self.rank}", f"smooth={self.smooth is not None}",
                 f"bias={self.bias is not None}", f"dtype={str(self.wscales.dtype).replace('torch.', '')}"]
        if self.backend != "auto":
            parts.append(f"backend={self.backend!r}")
        return ", ".join(parts)
