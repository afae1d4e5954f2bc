"""Drop-in ``nn.Linear`` replacements with packed INT4 weights: ``W4A4Linear`` (4-bit activations too) and
``W4A16Linear`` (weight-only), sharing one weight layout (:mod:`diffboost.ops.w4a4`)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from diffboost.ops.w4a4 import GROUP_SIZES, w4a4_linear
from diffboost.ops.w4a16 import w4a16_linear
from diffboost.quant.format import STORAGE_DTYPES, W4A4Weights, dequantize_weight, quantize_linear_weight

__all__ = ["Int4Linear", "W4A16Conv2d", "W4A16Linear", "W4A4Conv2d", "W4A4Linear"]


class Int4Linear(nn.Module):
    """Base of the layers holding a weight in the packed INT4 layout (:class:`W4A4Linear`, :class:`W4A16Linear`).

    The tensors are buffers (``state_dict`` saves them, ``.to(device)`` moves them); absent parts (no smoothing,
    ``rank=0``, no bias) are ``None``. An ``in_features`` that is not a multiple of ``group_size`` is zero-padded
    (the buffers have the padded size and the input is padded on each call, a copy: real diffusion layers are
    multiples of 64 and never pay it). Subclasses define ``forward`` and ``SCHEME``.

    Attributes:
        in_features, out_features, group_size, rank: the layer's sizes.
        backend: ``"auto"`` or a backend name of the layer's ops.
    """

    SCHEME = ""  # "w4a4" or "w4a16" in the subclasses
    KIND = "linear"  # "conv1x1" for the 1x1 convolution forms (checkpoints record both)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        group_size: int = 64,
        rank: int = 0,
        bias: bool = True,
        smooth: bool = False,
        dtype: torch.dtype = torch.bfloat16,
        device: Optional[torch.device] = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if group_size not in GROUP_SIZES:
            supported = ", ".join(map(str, GROUP_SIZES))
            raise ValueError(f"{name}: group_size={group_size!r} not supported ({supported})")
        if in_features <= 0 or out_features <= 0:
            raise ValueError(f"{name}: in_features={in_features} and out_features={out_features} must be positive")
        if rank < 0 or rank % 16:
            raise ValueError(f"{name}: rank={rank} must be 0 or a multiple of 16")
        if dtype not in STORAGE_DTYPES:
            raise ValueError(f"{name}: dtype {dtype} not supported (float16, bfloat16)")
        self.in_features, self.out_features = in_features, out_features
        self.group_size, self.rank = group_size, rank
        self.backend = backend
        k, n = in_features + (-in_features % group_size), out_features
        self.register_buffer("qweight", torch.zeros(n, k // 2, dtype=torch.uint8, device=device))
        self.register_buffer("wscales", torch.zeros(k // group_size, n, dtype=dtype, device=device))
        self.register_buffer("smooth", torch.ones(k, dtype=dtype, device=device) if smooth else None)
        self.register_buffer("lora_down", torch.zeros(k, rank, dtype=dtype, device=device) if rank else None)
        self.register_buffer("lora_up", torch.zeros(rank, n, dtype=dtype, device=device) if rank else None)
        self.register_buffer("bias", torch.zeros(n, dtype=dtype, device=device) if bias else None)

    @classmethod
    def _from_weight(cls, weight, bias, group_size, rank, smooth, dtype, backend):
        """Quantize a ``[N, K]`` weight (and bias) into a new module of this class on the weight's device."""
        if dtype is None:
            dtype = weight.dtype if weight.dtype in STORAGE_DTYPES else torch.bfloat16
        weights = quantize_linear_weight(weight, bias, group_size=group_size, rank=rank, smooth=smooth, dtype=dtype)
        return cls.from_weights(weights, weight.shape[1], backend=backend)

    @classmethod
    def from_weights(cls, weights: W4A4Weights, in_features: int, *, backend: str = "auto") -> "Int4Linear":
        """A module holding ``weights`` (a layer of ``in_features`` inputs, before padding to the group size)."""
        if weights.qweight.shape[1] * 2 != in_features + (-in_features % weights.group_size):
            raise ValueError(f"{cls.__name__}.from_weights: packed K={weights.qweight.shape[1] * 2} does not fit "
                             f"in_features={in_features} with group_size={weights.group_size}")
        module = cls(
            in_features, weights.qweight.shape[0], group_size=weights.group_size, rank=weights.rank,
            bias=weights.bias is not None, smooth=weights.smooth is not None, dtype=weights.wscales.dtype,
            device=weights.qweight.device, backend=backend,
        )
        module.load_weights(weights)
        return module

    def load_weights(self, weights: W4A4Weights) -> None:
        """Copy a :class:`~diffboost.quant.format.W4A4Weights` of this layer's shapes into the buffers."""
        for name in ("qweight", "wscales", "smooth", "lora_down", "lora_up", "bias"):
            mine, theirs = getattr(self, name), getattr(weights, name)
            if (mine is None) != (theirs is None):
                where = "absent from" if theirs is None else "present in"
                raise ValueError(f"{type(self).__name__}.load_weights: {name} is {where} the weights but not in this "
                                 "layer")
            if mine is not None:
                if mine.shape != theirs.shape:
                    raise ValueError(f"{type(self).__name__}.load_weights: {name} has shape {list(theirs.shape)}, "
                                     f"expected {list(mine.shape)}")
                mine.copy_(theirs)

    @property
    def weights(self) -> W4A4Weights:
        """The layer's tensors (views of the buffers, not copies)."""
        return W4A4Weights(self.qweight, self.wscales, self.smooth, self.lora_down, self.lora_up, self.bias)

    @property
    def padded_in_features(self) -> int:
        """``in_features`` rounded up to a multiple of ``group_size``: the K of the packed tensors."""
        return self.qweight.shape[1] * 2

    def _padded(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{type(self).__name__}: input has {x.shape[-1]} features, expected "
                             f"in_features={self.in_features}")
        if self.padded_in_features != self.in_features:
            x = torch.nn.functional.pad(x, (0, self.padded_in_features - self.in_features))
        return x

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
            linear.weight.copy_(dequantize_weight(self.weights, self.in_features))
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


class W4A4Linear(Int4Linear):
    """``y = x W^T + b`` with W in the W4A4 layout and x quantized to INT4 on the fly (SVDQuant's scheme).

    Build one with :meth:`from_linear`. The forward pass runs :func:`diffboost.ops.w4a4.w4a4_linear`, dispatched per
    device (CUDA / CPU ``_C`` kernels, Triton, or the PyTorch reference); ``backend`` forces one. Inputs may be
    fp16, bf16 or fp32 of any leading shape; the output has x's dtype. Buffers and padding: :class:`Int4Linear`.
    """

    SCHEME = "w4a4"

    def __init__(self, in_features: int, out_features: int, *, rank: int = 32, **kwargs) -> None:
        super().__init__(in_features, out_features, rank=rank, **kwargs)

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
            group_size: 32, 64 or 128 input channels per scale (``in_features`` is zero-padded to a multiple).
            rank: rank of the 16-bit low-rank branch (multiple of 16; 0 for none).
            smooth: ``[in_features]`` smoothing factors (e.g. :func:`diffboost.quant.smooth_factors` of calibration
                activations), or None.
            dtype: storage dtype of scales, smoothing, low-rank factors and bias; default: the layer's dtype if it
                is 16-bit, else bf16.
            backend: see the class docstring.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"W4A4Linear.from_linear: expected an nn.Linear, got {type(linear).__name__}")
        return cls._from_weight(linear.weight, linear.bias, group_size, rank, smooth, dtype, backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return w4a4_linear(
            self._padded(x), self.qweight, self.wscales, smooth=self.smooth, lora_down=self.lora_down,
            lora_up=self.lora_up, bias=self.bias, backend=self.backend,
        )


class W4A16Linear(Int4Linear):
    """``y = x W^T + b`` with W in packed INT4 (the W4A4 weight layout, no low-rank branch) and x left in 16-bit.

    By default for the adaLN modulation projections (see :mod:`diffboost.ops.w4a16`): one row per sample, so the
    layer is bound by reading its weight, which INT4 makes ~3.5x smaller, and its input stays exact; with
    ``quant="w4a16"`` for every quantized layer. ``rank`` must be 0 (it exists for a uniform constructor). The
    forward pass runs :func:`diffboost.ops.w4a16.w4a16_linear`.
    """

    SCHEME = "w4a16"

    def __init__(self, in_features: int, out_features: int, *, rank: int = 0, **kwargs) -> None:
        if rank:
            raise ValueError(f"W4A16Linear: rank={rank}: a weight-only layer has no low-rank branch (rank must be 0)")
        super().__init__(in_features, out_features, rank=0, **kwargs)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        group_size: int = 64,
        smooth: Optional[torch.Tensor] = None,
        *,
        dtype: Optional[torch.dtype] = None,
        backend: str = "auto",
    ) -> "W4A16Linear":
        """Quantize ``linear``'s weight to INT4 (round to nearest per row and group, after ``smooth`` if given;
        arguments as :meth:`W4A4Linear.from_linear`)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"W4A16Linear.from_linear: expected an nn.Linear, got {type(linear).__name__}")
        return cls._from_weight(linear.weight, linear.bias, group_size, 0, smooth, dtype, backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return w4a16_linear(self._padded(x), self.qweight, self.wscales, smooth=self.smooth, bias=self.bias,
                            backend=self.backend)


class _PointwiseConv:
    """A 1x1 ``nn.Conv2d`` (stride 1, no padding, one group) run as its base layer's GEMM over the pixels.

    ``forward`` takes ``[B, C, H, W]`` and returns ``[B, N, H, W]`` in the input's memory format: a channels-last
    input goes through without copies (the GEMM's rows are its pixels); a contiguous NCHW input is transposed on the
    way in and the output back to NCHW, since a channels-last tensor flowing into the model's 3x3 convolutions would
    make every one of them re-lay out its weight on each call (measured on CPU: slower than the copies).
    """

    KIND = "conv1x1"

    @staticmethod
    def _conv_weight(conv: nn.Conv2d, fn: str) -> torch.Tensor:
        if not is_pointwise_conv(conv):
            raise TypeError(f"{fn}: expected a 1x1 nn.Conv2d with stride 1, no padding and one group, got {conv!r}")
        return conv.weight.view(conv.out_channels, conv.in_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"{type(self).__name__}: expected a [B, C, H, W] input, got shape {list(x.shape)}")
        out = super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return out if x.is_contiguous(memory_format=torch.channels_last) else out.contiguous()

    def to_conv(self, dtype: Optional[torch.dtype] = None) -> nn.Conv2d:
        """A float 1x1 ``nn.Conv2d`` with the dequantized weight (see :meth:`Int4Linear.to_linear`)."""
        linear = self.to_linear(dtype)
        conv = nn.Conv2d(self.in_features, self.out_features, 1, bias=linear.bias is not None,
                         device=linear.weight.device, dtype=linear.weight.dtype)
        with torch.no_grad():
            conv.weight.copy_(linear.weight.view_as(conv.weight))
            if linear.bias is not None:
                conv.bias.copy_(linear.bias)
        return conv


class W4A4Conv2d(_PointwiseConv, W4A4Linear):
    """A 1x1 ``nn.Conv2d`` in W4A4: a GEMM over the pixels (memory formats: :class:`_PointwiseConv`). Build one
    with :meth:`from_conv`; everything else is :class:`W4A4Linear`'s."""

    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        group_size: int = 64,
        rank: int = 32,
        smooth: Optional[torch.Tensor] = None,
        *,
        dtype: Optional[torch.dtype] = None,
        backend: str = "auto",
    ) -> "W4A4Conv2d":
        """Quantize a 1x1 convolution; arguments as :meth:`W4A4Linear.from_linear`."""
        weight = cls._conv_weight(conv, "W4A4Conv2d.from_conv")
        return cls._from_weight(weight, conv.bias, group_size, rank, smooth, dtype, backend)


class W4A16Conv2d(_PointwiseConv, W4A16Linear):
    """A 1x1 ``nn.Conv2d`` with weight-only INT4: a GEMM over the pixels (memory formats: :class:`_PointwiseConv`).
    Build one with :meth:`from_conv`; everything else is :class:`W4A16Linear`'s."""

    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        group_size: int = 64,
        smooth: Optional[torch.Tensor] = None,
        *,
        dtype: Optional[torch.dtype] = None,
        backend: str = "auto",
    ) -> "W4A16Conv2d":
        """Quantize a 1x1 convolution's weight; arguments as :meth:`W4A16Linear.from_linear`."""
        weight = cls._conv_weight(conv, "W4A16Conv2d.from_conv")
        return cls._from_weight(weight, conv.bias, group_size, 0, smooth, dtype, backend)


def is_pointwise_conv(module: nn.Module) -> bool:
    """Whether ``module`` is an ``nn.Conv2d`` that is a plain GEMM over pixels (1x1, stride 1, no padding, groups 1)."""
    return (
        isinstance(module, nn.Conv2d)
        and module.kernel_size == (1, 1)
        and module.stride == (1, 1)
        and module.padding in ((0, 0), "valid")
        and module.dilation == (1, 1)
        and module.groups == 1
    )
