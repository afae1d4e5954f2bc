"""W4A4 quantization: the format, :class:`W4A4Linear` (and the weight-only :class:`W4A16Linear`), and whole-model
quantization with calibration.

    import diffboost
    diffboost.patch(pipe, quant="w4a4")                    # calibrate on generated inputs, quantize the denoiser
    diffboost.quant.report(pipe)["unet"].bytes_after       # memory of the quantized denoiser
    diffboost.quant.save_quantized(pipe.unet, "unet-w4a4") # safetensors + JSON header with checksums
    diffboost.quant.load_quantized(fresh_unet, "unet-w4a4")

    layer = W4A4Linear.from_linear(linear, group_size=64, rank=32, smooth=smooth_factors(act_amax, linear.weight))
    y = layer(x)                      # INT4 weights x INT4 activations, on the fastest kernel for x's device

The kernels and the exact layout are in :mod:`diffboost.ops.w4a4`; the per-layer recipe in
:mod:`diffboost.quant.format` and :mod:`diffboost.quant.model`.
"""

from diffboost.quant.checkpoint import load_quantized, save_quantized
from diffboost.quant.config import DEFAULT_SKIP, DEFAULT_WEIGHT_ONLY, W4A4Config
from diffboost.quant.format import (
    W4A4Weights,
    dequantize_weight,
    quantize_linear_weight,
    smooth_factors,
)
from diffboost.quant.linear import Int4Linear, W4A4Conv2d, W4A4Linear, W4A16Conv2d, W4A16Linear
from diffboost.quant.model import LayerReport, QuantReport, estimate, module_bytes, quantize, report, restore

__all__ = [
    "DEFAULT_SKIP",
    "DEFAULT_WEIGHT_ONLY",
    "Int4Linear",
    "LayerReport",
    "QuantReport",
    "W4A4Config",
    "W4A16Conv2d",
    "W4A16Linear",
    "W4A4Conv2d",
    "W4A4Linear",
    "W4A4Weights",
    "dequantize_weight",
    "estimate",
    "load_quantized",
    "module_bytes",
    "quantize",
    "quantize_linear_weight",
    "report",
    "restore",
    "save_quantized",
    "smooth_factors",
]
