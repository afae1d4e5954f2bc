"""``diffboost.patch(pipe, quant=...)``: W4A4 quantization of the denoisers (:mod:`diffboost.quant`).

Quantization is a persistent feature (see :mod:`diffboost.patching`): asking for it again with an equal config keeps
the quantized layers (no second calibration), anything else removes it, which needs ``keep_original=True``.
"""

from __future__ import annotations

from typing import Any

from diffboost.patching import Feature, register_feature
from diffboost.quant.calibrate import Calibration
from diffboost.quant.config import W4A4Config
from diffboost.quant.model import _check_restorable, _quantize, _restore

__all__ = ["coerce", "install"]

#: ``quant=`` names: the default recipe, and every quantized layer weight-only (16-bit activations).
_NAMES = {"w4a4": {}, "w4a16": {"weight_only": ("*",)}}


def coerce(value: Any) -> W4A4Config:
    """``quant=`` of :func:`diffboost.patch`: ``"w4a4"`` (the default :class:`W4A4Config`), ``"w4a16"``
    (``W4A4Config(weight_only=("*",))``: 4-bit weights everywhere, activations left in 16-bit) or a W4A4Config."""
    if isinstance(value, W4A4Config):
        return value
    if isinstance(value, str) and value.lower() in _NAMES:
        return W4A4Config(**_NAMES[value.lower()])
    raise TypeError(f"diffboost.patch: quant={value!r:.80} not supported; use 'w4a4', 'w4a16' or a "
                    "diffboost.W4A4Config")


def install(pipe: Any, config: W4A4Config, calibration: Calibration = None):
    """Quantize ``pipe``'s denoisers (the state is what :func:`diffboost.quant.restore` needs)."""
    return _quantize(pipe, config, calibration, progress=True)


register_feature(
    Feature(
        name="quant",
        order=10,  # layer replacements first: processors and forward wrappers then see the quantized layers
        coerce=coerce,
        install=install,
        uninstall=_restore,
        options=("calibration",),
        persistent=True,
        check_uninstall=lambda pipe, state: _check_restorable(state),
    )
)
