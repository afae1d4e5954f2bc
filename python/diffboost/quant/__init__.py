"""Quantization of linear layers: the W4A4 format (:mod:`diffboost.quant.format`) and :class:`W4A4Linear`.

    from diffboost.quant import W4A4Linear, smooth_factors
    layer = W4A4Linear.from_linear(linear, group_size=64, rank=32, smooth=smooth_factors(act_amax, linear.weight))
    y = layer(x)                      # INT4 weights x INT4 activations, on the fastest kernel for x's device
    layer.memory()["total"]           # bytes: packed weights, scales, low-rank branch, bias
    dense = layer.to_linear()         # back to a float nn.Linear (dequantized)

The kernels and the exact layout are in :mod:`diffboost.ops.w4a4`.
"""

from diffboost.quant.format import (
    W4A4Weights,
    dequantize_weight,
    quantize_linear_weight,
    smooth_factors,
)
from diffboost.quant.linear import W4A4Linear

__all__ = ["W4A4Linear", "W4A4Weights", "dequantize_weight", "quantize_linear_weight", "smooth_factors"]
