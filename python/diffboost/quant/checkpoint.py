"""Quantized checkpoints: a W4A4 denoiser saved as safetensors plus a JSON header, loaded without calibration.

A checkpoint directory holds, per denoiser (the directory itself for a model, ``<dir>/<component>`` for each
quantized component of a pipeline):

``diffboost_w4a4.safetensors``  the model's whole ``state_dict``: the W4A4 buffers of the quantized layers
                                (:mod:`diffboost.ops.w4a4` layout) and the 16-bit tensors of everything else, so a
                                randomly initialised (or meta-device) skeleton becomes the quantized model.
``diffboost_w4a4.json``         ``format``, ``version``, the model class, the :class:`W4A4Config`, per quantized
                                layer its kind, scheme (W4A4 or weight-only W4A16) and sizes, and per tensor its
                                dtype, shape and SHA-256.

Version 2 added the per-layer ``scheme``; version 1 files (every layer W4A4) still load. A version 1 reader refuses
version 2 files instead of running a weight-only layer as W4A4.

:func:`load_quantized` checks everything (format and version, model class, that every layer exists with the saved
shapes, every tensor's presence, shape, dtype and checksum) before it changes the model: a checkpoint of another
model, a truncated or corrupted file, or an unknown version raises ValueError and leaves the model as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Optional

import torch
from torch import nn

from diffboost.patching import DENOISER_NAMES, _push, uncompiled
from diffboost.quant.config import W4A4Config
from diffboost.quant.linear import Int4Linear, W4A4Conv2d, W4A4Linear, W4A16Conv2d, W4A16Linear, is_pointwise_conv
from diffboost.quant.model import FEATURE, MODEL_ATTR, LayerReport, QuantReport, _quant_entry, _QuantState, module_bytes

__all__ = ["FORMAT", "VERSION", "load_quantized", "save_quantized"]

FORMAT = "diffboost-w4a4"
VERSION = 2
_READABLE_VERSIONS = (1, 2)
_LAYER_CLASSES = {(cls.KIND, cls.SCHEME): cls for cls in (W4A4Linear, W4A4Conv2d, W4A16Linear, W4A16Conv2d)}
HEADER = "diffboost_w4a4.json"
TENSORS = "diffboost_w4a4.safetensors"
_BUFFERS = ("qweight", "wscales", "smooth", "lora_down", "lora_up", "bias")


def _safetensors():
    try:
        import safetensors.torch
    except ImportError:
        raise ImportError("diffboost.quant checkpoints need safetensors: pip install safetensors") from None
    return safetensors


def _sha256(tensor: torch.Tensor) -> str:
    data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(data.numpy()).hexdigest()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _quantized_components(target: Any) -> dict[str, nn.Module]:
    """component -> quantized denoiser (``""`` for a bare model)."""
    if isinstance(target, nn.Module):
        target = uncompiled(target)
        if not isinstance(getattr(target, MODEL_ATTR, None), QuantReport):
            raise ValueError(f"diffboost.quant.save_quantized: this {type(target).__name__} is not quantized; "
                             "quantize it first (diffboost.quant.quantize or diffboost.patch(..., quant=...))")
        return {"": target}
    found = {name: uncompiled(getattr(target, name)) for name in DENOISER_NAMES
             if isinstance(getattr(getattr(target, name, None), MODEL_ATTR, None), QuantReport)}
    if not found:
        raise ValueError(f"diffboost.quant.save_quantized: no quantized denoiser in {type(target).__name__}")
    return found


def _layer_spec(layer: Int4Linear, report: Optional[LayerReport]) -> dict[str, Any]:
    return {
        "kind": layer.KIND,
        "scheme": layer.SCHEME,
        "in_features": layer.in_features,
        "out_features": layer.out_features,
        "group_size": layer.group_size,
        "rank": layer.rank,
        "smooth": layer.smooth is not None,
        "bias": layer.bias is not None,
        "dtype": _dtype_name(layer.wscales.dtype),
        "alpha": None if report is None else report.alpha,
    }


def save_quantized(target: Any, directory: str | os.PathLike) -> None:
    """Write the quantized denoiser(s) of ``target`` (a model or a pipeline) to ``directory``.

    See the module docstring for the layout; :func:`load_quantized` reads it back onto an unquantized model.
    """
    safetensors = _safetensors()
    for component, model in _quantized_components(target).items():
        path = os.path.join(directory, component) if component else os.fspath(directory)
        os.makedirs(path, exist_ok=True)
        report: QuantReport = getattr(model, MODEL_ATTR)
        layers = {name: _layer_spec(module, report.layers.get(name)) for name, module in model.named_modules()
                  if isinstance(module, Int4Linear)}
        tensors = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
        header = {
            "format": FORMAT,
            "version": VERSION,
            "model_class": type(model).__name__,
            "config": report.config.to_json(),
            "layers": layers,
            "tensors": {key: {"dtype": _dtype_name(t.dtype), "shape": list(t.shape), "sha256": _sha256(t)}
                        for key, t in tensors.items()},
        }
        # Tensors first, header last: a directory with a header always has the tensors it describes.
        safetensors.torch.save_file(tensors, os.path.join(path, TENSORS), metadata={"format": "pt"})
        with open(os.path.join(path, HEADER), "w") as f:
            json.dump(header, f, indent=1)


def _fail(path: str, message: str) -> None:
    raise ValueError(f"diffboost.quant.load_quantized: {path}: {message}; the model was not changed")


def _read_header(path: str) -> dict[str, Any]:
    file = os.path.join(path, HEADER)
    if not os.path.isfile(file):
        _fail(path, f"no {HEADER} (not a diffboost W4A4 checkpoint, or the wrong component directory)")
    try:
        with open(file) as f:
            header = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        _fail(path, f"{HEADER} is unreadable or corrupted ({error})")
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        _fail(path, f"{HEADER} is not a {FORMAT} header")
    if header.get("version") not in _READABLE_VERSIONS:
        readable = ", ".join(map(str, _READABLE_VERSIONS))
        _fail(path, f"format version {header.get('version')!r} is not supported (this diffboost reads {readable}); "
                    "upgrade diffboost or re-quantize")
    for key in ("model_class", "config", "layers", "tensors"):
        if key not in header:
            _fail(path, f"{HEADER} lacks {key!r}")
    return header


def _empty_layer(spec: dict[str, Any]) -> Int4Linear:
    cls = _LAYER_CLASSES[spec["kind"], spec.get("scheme", "w4a4")]  # version 1 files have W4A4 layers only
    return cls(spec["in_features"], spec["out_features"], group_size=spec["group_size"], rank=spec["rank"],
               bias=spec["bias"], smooth=spec["smooth"], dtype=getattr(torch, spec["dtype"]), device="meta")


def _check_layers(path: str, model: nn.Module, header: dict[str, Any]) -> dict[str, Int4Linear]:
    """Every saved layer exists in ``model`` as a float layer of the same shape; returns name -> empty quantized
    layer."""
    modules = dict(model.named_modules())
    empty = {}
    for name, spec in header["layers"].items():
        module = modules.get(name)
        try:
            kind, k, n = spec["kind"], spec["in_features"], spec["out_features"]
            empty[name] = _empty_layer(spec)
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            _fail(path, f"layer {name!r} has a malformed entry ({error})")
        if module is None:
            _fail(path, f"layer {name!r} does not exist in this {type(model).__name__} (a checkpoint of another "
                        "model?)")
        if isinstance(module, Int4Linear):
            _fail(path, f"layer {name!r} is already quantized; load onto an unquantized model")
        if kind == "linear":
            ok = type(module) is nn.Linear
            shape = (module.in_features, module.out_features) if ok else None
        else:
            ok = is_pointwise_conv(module)
            shape = (module.in_channels, module.out_channels) if ok else None
        if not ok or shape != (k, n) or (module.bias is not None) != spec["bias"]:
            _fail(path, f"layer {name!r} is {module!r} here but a {kind} {k} -> {n} (bias={spec['bias']}) in the "
                        "checkpoint (a checkpoint of another model?)")
    return empty


def _expected_shapes(model: nn.Module, empty: dict[str, Int4Linear]) -> dict[str, tuple[int, ...]]:
    """State-dict key -> shape of ``model`` once the layers in ``empty`` are swapped in."""
    expected = {key: tuple(t.shape) for key, t in model.state_dict().items()}
    for name, layer in empty.items():
        for suffix in ("weight", "bias"):
            expected.pop(f"{name}.{suffix}", None)
        for buffer, t in layer.state_dict().items():
            expected[f"{name}.{buffer}"] = tuple(t.shape)
    return expected


def _read_tensors(path: str, header: dict[str, Any], expected: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    saved = header["tensors"]
    missing, unexpected = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    if missing or unexpected:
        _fail(path, f"the checkpoint's tensors do not match this model (missing {missing[:5]}, unexpected "
                    f"{unexpected[:5]}; a checkpoint of another model?)")
    file = os.path.join(path, TENSORS)
    try:
        tensors = _safetensors().torch.load_file(file, device="cpu")
    except Exception as error:  # safetensors raises its own error types for truncated / malformed files
        _fail(path, f"{TENSORS} is missing, truncated or corrupted ({type(error).__name__}: {error})")
    if set(tensors) != set(saved):
        _fail(path, f"{TENSORS} does not hold the tensors {HEADER} lists (the two files are from different saves?)")
    for key, info in saved.items():
        t = tensors[key]
        if list(t.shape) != list(info.get("shape", [])) or _dtype_name(t.dtype) != info.get("dtype"):
            _fail(path, f"tensor {key!r} is {_dtype_name(t.dtype)} {list(t.shape)} in {TENSORS} but "
                        f"{info.get('dtype')} {info.get('shape')} in {HEADER}")
        if tuple(t.shape) != expected[key]:
            _fail(path, f"tensor {key!r} has shape {list(t.shape)}, this model's is {list(expected[key])}")
        if _sha256(t) != info.get("sha256"):
            _fail(path, f"tensor {key!r} fails its checksum (corrupted file)")
    return tensors


def load_quantized(
    target: Any, directory: str | os.PathLike, *, device: Optional[torch.device | str] = None
) -> dict[str, QuantReport]:
    """Load a checkpoint written by :func:`save_quantized` onto an unquantized ``target`` (model or pipeline).

    The quantized layers are rebuilt in place without calibration and every other tensor of the denoiser is loaded
    too, so a freshly initialised skeleton (parameters on the meta device included) becomes the saved model.
    Everything is validated first (see the module docstring); on any mismatch ValueError is raised and the model is
    left as it was.

    Args:
        target: the model, or a pipeline whose quantized components were saved (``<directory>/<component>``).
        directory: what :func:`save_quantized` wrote.
        device: where the tensors go; default: each replaced layer's device (CPU for a meta skeleton).

    Returns:
        component -> :class:`QuantReport` (``""`` for a bare model), as :func:`diffboost.quant.quantize` returns.
    """
    directory = os.fspath(directory)
    if _quant_entry(target) is not None:
        raise ValueError("diffboost.quant.load_quantized: the target is already quantized; load onto a fresh model")
    if isinstance(target, nn.Module):
        components = {"": uncompiled(target)}
    else:
        components = {name: uncompiled(getattr(target, name)) for name in DENOISER_NAMES
                      if isinstance(getattr(target, name, None), nn.Module)
                      and os.path.isfile(os.path.join(directory, name, HEADER))}
        if not components:
            _fail(directory, f"no component directory ({', '.join(DENOISER_NAMES)}) with a {HEADER}")
    plans = {}
    for component, model in components.items():  # validate every component before changing any
        path = os.path.join(directory, component) if component else directory
        header = _read_header(path)
        if header["model_class"] != type(model).__name__:
            _fail(path, f"saved from a {header['model_class']}, this is a {type(model).__name__}")
        try:
            config = W4A4Config.from_json(header["config"])
        except (TypeError, ValueError, AttributeError) as error:
            _fail(path, f"the saved W4A4Config is invalid ({error})")
        empty = _check_layers(path, model, header)
        tensors = _read_tensors(path, header, _expected_shapes(model, empty))
        plans[component] = (model, header, config, tensors)

    swaps, reports = {}, {}
    for component, (model, header, config, tensors) in plans.items():
        params_total = sum(p.numel() for p in model.parameters())
        bytes_before = module_bytes(model)
        undo, layers, params_quantized = [], {}, 0
        for name, spec in header["layers"].items():
            original = model.get_submodule(name)
            layer_device = device or (original.weight.device if original.weight.device.type != "meta" else "cpu")
            layer = _empty_layer(spec).to_empty(device=layer_device)
            layer.backend = config.backend
            layer.load_state_dict({b: tensors.pop(f"{name}.{b}") for b in _BUFFERS if f"{name}.{b}" in tensors})
            parent_name, _, attribute = name.rpartition(".")
            setattr(model.get_submodule(parent_name), attribute, layer)
            undo.append((model.get_submodule(parent_name), attribute, None))
            params_quantized += sum(p.numel() for p in original.parameters())
            layers[name] = LayerReport(spec["kind"], spec["in_features"], spec["out_features"], spec["rank"],
                                       spec.get("alpha"), None, layer.SCHEME)
        meta = any(t.device.type == "meta" for t in (*model.parameters(), *model.buffers()))
        if meta or device is not None:
            # Assigned tensors (meta skeleton) become the parameters: give them their own allocations, in one copy.
            # safetensors' tensors are views into the file's buffer at 8-byte alignment, on which CPU BLAS takes
            # other code paths (results differed in the last bit from the same model built normally).
            tensors = {key: t.to(device or "cpu", copy=meta) for key, t in tensors.items()}
        model.load_state_dict(tensors, strict=False, assign=meta)
        swaps[component] = undo
        reports[component] = QuantReport(config, layers, {}, params_total, params_quantized, bytes_before,
                                          module_bytes(model), 0.0)
        setattr(model, MODEL_ATTR, reports[component])
    # No originals (None): the skeleton's float layers were never the real weights, so this cannot be undone.
    _push(target, FEATURE, next(iter(plans.values()))[2], _QuantState(swaps, reports))
    return reports
