"""Quantize a whole denoiser (or a pipeline's denoisers) to W4A4 in place: ``quantize``, ``restore``, reports.

Per layer, SVDQuant's recipe with a SmoothQuant-style search (pure PyTorch, on the model's device):

1. Calibration (:mod:`diffboost.quant.calibrate`) gives the per-channel maxima of the layer's input over a sampling
   run and a sample of input rows.
2. For each candidate migration strength (``alpha`` in the grid, and no smoothing at all) the layer is quantized
   (smoothing, the rank-r branch by randomized SVD, INT4 residual) and its output on the sampled rows is computed
   with the exact W4A4 arithmetic (activation quantization included); the candidate with the smallest error wins.
3. The winner replaces the layer. The SVD is exact for layers up to 512 wide and randomized above (as good, and
   what keeps a FLUX-size model at minutes).

Layers the config marks weight-only (the modulation projections by default) get the same search without the
low-rank branch, their error measured with 16-bit activations (:mod:`diffboost.ops.w4a16`), and become
:class:`~diffboost.quant.W4A16Linear`.

The float layers are dropped unless ``keep_original`` (memory is the point); ``restore`` / ``diffboost.unpatch``
then cannot bring them back and say how to reload.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import time
from collections.abc import Mapping
from typing import Any, Optional

import torch
from torch import nn

from diffboost.ops.w4a4 import w4a4_gemm_reference, w4a4_quantize_act_reference
from diffboost.ops.w4a16 import w4a16_linear_reference
from diffboost.patching import DENOISER_NAMES, _push, _state, denoisers
from diffboost.quant.calibrate import ActivationStats, Calibration, run_calibration
from diffboost.quant.config import W4A4Config
from diffboost.quant.format import STORAGE_DTYPES, W4A4Weights, quantize_linear_weight, smooth_factors
from diffboost.quant.linear import Int4Linear, W4A4Conv2d, W4A4Linear, W4A16Conv2d, W4A16Linear, is_pointwise_conv

logger = logging.getLogger("diffboost")

__all__ = ["LayerReport", "QuantReport", "eligible_layers", "estimate", "module_bytes", "quantize", "report", "restore"]

FEATURE = "quant"  # the name of the feature in diffboost.patch (and in a target's patch state)
# Attribute of a quantized denoiser holding its (config, report): checkpoints read it.
MODEL_ATTR = "_diffboost_w4a4"
# Layers up to this size get the exact SVD; above it the randomized one is as good and much faster.
_EXACT_SVD_MAX_DIM = 512


@dataclasses.dataclass
class LayerReport:
    """One quantized layer: its sizes, the chosen smoothing and its relative output error on calibration rows."""

    kind: str  # "linear" or "conv1x1"
    in_features: int
    out_features: int
    rank: int
    alpha: Optional[float]  # None: no smoothing
    error: Optional[float]  # ||y_q - y||^2 / ||y||^2 on the sampled rows; None without calibration data
    scheme: str = "w4a4"  # or "w4a16" (weight-only)


@dataclasses.dataclass
class QuantReport:
    """What :func:`quantize` did to one denoiser (``str(report)`` is a summary).

    Attributes:
        layers: name -> :class:`LayerReport` of every quantized layer (W4A4 or weight-only W4A16).
        skipped: name -> why, for each linear / 1x1 conv layer kept in 16-bit.
        params_total, params_quantized: parameter counts of the denoiser before quantization, and of the layers
            that were replaced.
        bytes_before, bytes_after: memory of the denoiser's parameters and buffers.
        seconds: wall time of calibration plus quantization; None for an :func:`estimate`.
    """

    config: W4A4Config
    layers: dict[str, LayerReport]
    skipped: dict[str, str]
    params_total: int
    params_quantized: int
    bytes_before: int
    bytes_after: int
    seconds: Optional[float]

    @property
    def fraction_quantized(self) -> float:
        """Fraction of the denoiser's parameters now stored in 4-bit (W4A4 or weight-only)."""
        return self.params_quantized / max(1, self.params_total)

    def __str__(self) -> str:
        weight_only = sum(layer.scheme == "w4a16" for layer in self.layers.values())
        return (
            f"W4A4: {len(self.layers)} layers quantized ({weight_only} of them weight-only; "
            f"{self.fraction_quantized:.1%} of the parameters), "
            f"{len(self.skipped)} kept in 16-bit; denoiser {self.bytes_before / 2**20:.1f} MiB -> "
            f"{self.bytes_after / 2**20:.1f} MiB ({self.bytes_before / max(1, self.bytes_after):.2f}x smaller) "
            + ("estimated from the layer shapes" if self.seconds is None else f"in {self.seconds:.1f} s")
        )


@dataclasses.dataclass
class _QuantState:
    """Undo information of one :func:`quantize` call: per denoiser, (parent, attribute, original); the originals are
    None when they were not kept."""

    swaps: dict[str, list[tuple[nn.Module, str, Optional[nn.Module]]]]
    reports: dict[str, QuantReport]


def module_bytes(module: nn.Module) -> int:
    """Bytes of ``module``'s parameters and buffers (each tensor counted once)."""
    seen, total = set(), 0
    for tensor in (*module.parameters(), *module.buffers()):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total


def eligible_layers(
    model: nn.Module, config: W4A4Config, *, allow_meta: bool = False
) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """The layers of ``model`` that ``config`` quantizes (name -> module) and the others with the reason.

    Eligible: ``nn.Linear`` and 1x1 ``nn.Conv2d`` (stride 1, no padding, one group). Other convolutions are not
    GEMMs and are not listed. ``config.scheme(name)`` says which scheme a chosen layer gets. Layers whose weight is
    on the meta device have nothing to quantize and are skipped, unless ``allow_meta`` (for :func:`estimate`).
    """
    chosen, skipped = {}, {}
    for name, module in model.named_modules():
        if isinstance(module, Int4Linear):
            raise ValueError(f"diffboost.quant: {name or type(model).__name__} is already quantized")
        if not (type(module) is nn.Linear or is_pointwise_conv(module)):
            continue
        scheme = config.scheme(name)
        if scheme is None:
            pattern = next((p for p in config.skip if fnmatch.fnmatchcase(name, p)), None)
            skipped[name] = f"skip pattern {pattern!r}" if pattern else "matches no include pattern"
        elif module.weight.dtype not in (torch.float32, *STORAGE_DTYPES):
            skipped[name] = f"weight dtype {module.weight.dtype} is not a float type"
        elif module.weight.device.type == "meta" and not allow_meta:
            skipped[name] = "weight is on the meta device"
        else:
            chosen[name] = module
    return chosen, skipped


def _weight_2d(module: nn.Module) -> torch.Tensor:
    return module.weight.reshape(module.weight.shape[0], -1)


def _output_error(x: torch.Tensor, reference: torch.Tensor, weights: W4A4Weights, in_features: int,
                  weight_only: bool) -> float:
    """Relative squared error of the quantized layer's output on rows ``x`` (the kernels' arithmetic, in PyTorch)."""
    pad = weights.qweight.shape[1] * 2 - in_features
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    if weight_only:
        out = w4a16_linear_reference(x, weights.qweight, weights.wscales, weights.smooth).float()
    else:
        qx, ascales, lr = w4a4_quantize_act_reference(x, weights.group_size, weights.smooth, weights.lora_down)
        out = w4a4_gemm_reference(qx, ascales, weights.qweight, weights.wscales, lr if weights.rank else None,
                                  weights.lora_up, None, torch.float32)
    return float((out - reference).pow(2).sum() / reference.pow(2).sum().clamp_min(1e-30))


def _quantize_layer(
    module: nn.Module, stats: Optional[ActivationStats], config: W4A4Config, scheme: str
) -> tuple[nn.Module, LayerReport]:
    weight = _weight_2d(module).detach()
    n, k = weight.shape
    weight_only = scheme == "w4a16"
    cls, rank, dtype = _layer_plan(module, config, scheme)
    svd = "exact" if min(n, k) <= _EXACT_SVD_MAX_DIM else "randomized"

    def build(alpha: Optional[float]) -> W4A4Weights:
        smooth = None if alpha is None else smooth_factors(stats.amax, weight, alpha)
        return quantize_linear_weight(weight, module.bias, group_size=config.group_size, rank=rank, smooth=smooth,
                                      dtype=dtype, svd=svd)

    if stats is None:
        alpha, weights, error = None, build(None), None
    else:
        candidates = [None]
        if config.smooth:
            candidates += list(config.alpha_grid if config.smooth_alpha is None else (config.smooth_alpha,))
        reference = stats.sample.float() @ weight.float().t()
        best = None
        for candidate in candidates:
            quantized = build(candidate)
            candidate_error = _output_error(stats.sample, reference, quantized, k, weight_only)
            if best is None or candidate_error < best[0]:
                best = (candidate_error, candidate, quantized)
        error, alpha, weights = best
    layer = cls.from_weights(weights, k, backend=config.backend)
    return layer, LayerReport(_kind(module), k, n, rank, alpha, error, scheme)


def _kind(module: nn.Module) -> str:
    return "conv1x1" if isinstance(module, nn.Conv2d) else "linear"


def _layer_plan(module: nn.Module, config: W4A4Config, scheme: str) -> tuple[type[Int4Linear], int, torch.dtype]:
    """The class, low-rank rank and storage dtype the layer gets under ``scheme``."""
    n, k = _weight_2d(module).shape
    conv = isinstance(module, nn.Conv2d)
    if scheme == "w4a16":
        cls, rank = (W4A16Conv2d if conv else W4A16Linear), 0
    else:
        cls, rank = (W4A4Conv2d if conv else W4A4Linear), min(config.rank, min(n, k) // 16 * 16)
    dtype = config.dtype or (module.weight.dtype if module.weight.dtype in STORAGE_DTYPES else torch.bfloat16)
    return cls, rank, dtype


def estimate(target: Any, config: Optional[W4A4Config] = None) -> dict[str, QuantReport]:
    """What :func:`quantize` would make of ``target``'s memory, from the layer shapes alone (no weights needed).

    Works on a model built on the meta device (``with torch.device("meta"): Model.from_config(...)``), so the size
    of a quantized FLUX can be known on any machine. The layers, schemes, parameter counts and bytes are those
    :func:`quantize` gives, except that with ``config.smooth`` every layer is counted with its smoothing vector (the
    alpha search may choose none for some: at most ``2 * in_features`` bytes each over). Nothing is changed.

    Returns:
        component -> :class:`QuantReport` (``""`` for a bare model) with ``seconds=None`` and no alphas or errors.
    """
    config = W4A4Config() if config is None else config
    if not isinstance(config, W4A4Config):
        raise TypeError(f"diffboost.quant.estimate: config must be a W4A4Config, got {type(config).__name__}")
    reports = {}
    for component, model in _components(target, config).items():
        chosen, skipped = eligible_layers(model, config, allow_meta=True)
        bytes_before = module_bytes(model)
        bytes_after, params_quantized, layers = bytes_before, 0, {}
        for name, module in chosen.items():
            scheme = config.scheme(name)
            cls, rank, dtype = _layer_plan(module, config, scheme)
            n, k = _weight_2d(module).shape
            layer = cls(k, n, group_size=config.group_size, rank=rank, bias=module.bias is not None,
                        smooth=config.smooth, dtype=dtype, device="meta")
            bytes_after += module_bytes(layer) - module_bytes(module)
            params_quantized += sum(p.numel() for p in module.parameters())
            layers[name] = LayerReport(_kind(module), k, n, rank, None, None, scheme)
        params_total = sum(p.numel() for p in model.parameters())
        reports[component] = QuantReport(config, layers, skipped, params_total, params_quantized, bytes_before,
                                         bytes_after, None)
    return reports


def _components(target: Any, config: W4A4Config) -> dict[str, nn.Module]:
    if isinstance(target, nn.Module):
        return denoisers(target)
    found = {name: module for name, module in denoisers(target).items() if name in config.components}
    if not found:
        raise ValueError(f"diffboost.quant: {type(target).__name__} has none of the components "
                         f"{', '.join(config.components)} (W4A4Config.components); it has "
                         f"{', '.join(n for n in DENOISER_NAMES if getattr(target, n, None) is not None)}")
    return found


def _quant_entry(target: Any):
    return next((entry for entry in _state(target) if entry[0] == FEATURE), None)


def quantize(
    target: Any,
    config: Optional[W4A4Config] = None,
    calibration: Calibration = None,
    *,
    progress: bool = True,
) -> dict[str, QuantReport]:
    """Replace the linear and 1x1 conv layers of ``target``'s denoisers with W4A4 layers, in place.

    Args:
        target: a diffusers pipeline (its ``unet`` / ``transformer``, and ``controlnet`` if the config lists it) or
            a denoiser module.
        config: a :class:`~diffboost.quant.W4A4Config` (default ``W4A4Config()``).
        calibration: what to run to measure activations:
            ``None``: a short self-calibration on generated inputs (:func:`diffboost.models.example_inputs`:
            prompts or prompt embeddings of the right shape, a few seeds, a short sampling run);
            ``"data-free"``: no run, no smoothing (the low-rank branch and INT4 only);
            a list of prompts (pipelines; each runs with the pipeline's default number of steps);
            a list of dicts: keyword arguments of ``target(**kwargs)``, one run each;
            a callable: ``calibration(target)`` runs whatever it wants.
        progress: show a progress bar over the layers (tqdm) and log each calibration run
            (``logging.getLogger("diffboost")``).

    Returns:
        component name -> :class:`QuantReport` (``""`` for a bare model). ``diffboost.quant.report(target)`` gives
        it again later; :func:`restore` or ``diffboost.unpatch(target)`` undoes it when ``keep_original=True``.
    """
    config = W4A4Config() if config is None else config
    state = _quantize(target, config, calibration, progress)
    _push(target, FEATURE, config, state)
    return state.reports


def _quantize(target: Any, config: W4A4Config, calibration: Calibration, progress: bool) -> _QuantState:
    if not isinstance(config, W4A4Config):
        raise TypeError(f"diffboost.quant.quantize: config must be a W4A4Config, got {type(config).__name__}")
    if _quant_entry(target) is not None:
        raise ValueError("diffboost.quant.quantize: already quantized; diffboost.quant.restore(target) first")
    start = time.perf_counter()
    components = _components(target, config)
    plan = {name: eligible_layers(model, config) for name, model in components.items()}
    targets = {f"{c}.{n}" if c else n: m for c, (chosen, _) in plan.items() for n, m in chosen.items()}
    stats = {}
    if config.smooth and targets:
        stats = run_calibration(target, targets, calibration, config.calibration_tokens, progress)
    calibrated = time.perf_counter()
    swaps: dict[str, list] = {}
    reports: dict[str, QuantReport] = {}
    bar = _progress_bar(len(targets), progress)
    try:
        for component, model in components.items():
            chosen, skipped = plan[component]
            params_total = sum(p.numel() for p in model.parameters())
            bytes_before = module_bytes(model)
            layers, params_quantized = {}, 0
            undo = swaps[component] = []
            for name, module in chosen.items():
                key = f"{component}.{name}" if component else name
                if config.smooth and calibration != "data-free" and key not in stats:
                    logger.info("diffboost.quant: %s never ran during calibration; quantized without smoothing", key)
                with torch.no_grad():
                    new, layers[name] = _quantize_layer(module, stats.pop(key, None), config, config.scheme(name))
                parent_name, _, attribute = name.rpartition(".")
                parent = model.get_submodule(parent_name)
                setattr(parent, attribute, new)
                undo.append((parent, attribute, module))
                params_quantized += sum(p.numel() for p in module.parameters())
                if bar is not None:
                    bar.update()
            reports[component] = QuantReport(config, layers, skipped, params_total, params_quantized, bytes_before,
                                             module_bytes(model), 0.0)
    except BaseException:
        # A half-quantized model is worse than none: put every layer replaced so far back.
        for undo in swaps.values():
            for parent, attribute, original in reversed(undo):
                setattr(parent, attribute, original)
        raise
    finally:
        if bar is not None:
            bar.close()
    if not config.keep_original:
        swaps = {c: [(parent, attribute, None) for parent, attribute, _ in undo] for c, undo in swaps.items()}
    for component, model in components.items():
        setattr(model, MODEL_ATTR, reports[component])
    seconds = time.perf_counter() - start
    for component_report in reports.values():
        component_report.seconds = seconds
        logger.info("diffboost.quant: %s", component_report)
    logger.debug("diffboost.quant: calibration %.1f s, quantization %.1f s", calibrated - start,
                 seconds - (calibrated - start))
    return _QuantState(swaps, reports)


def _progress_bar(total: int, enabled: bool):
    """A tqdm bar over the layers (tqdm comes with diffusers), or None."""
    if not enabled or total == 0:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="diffboost W4A4", unit="layer")


def _check_restorable(state: _QuantState) -> None:
    if any(original is None for undo in state.swaps.values() for _, _, original in undo):
        raise RuntimeError(
            "diffboost: the denoiser was quantized (diffboost.quant) with keep_original=False, so its original "
            "weights are gone and it cannot be restored in place; reload the model (e.g. "
            "DiffusionPipeline.from_pretrained(...)), or quantize with W4A4Config(keep_original=True) to undo it"
        )


def _restore(target: Any, state: _QuantState) -> None:
    """The quant feature's uninstall."""
    _check_restorable(state)
    for component, undo in state.swaps.items():
        for parent, attribute, original in reversed(undo):
            setattr(parent, attribute, original)
        model = target if component == "" else getattr(target, component)
        model.__dict__.pop(MODEL_ATTR, None)


def restore(target: Any) -> Any:
    """Put back the float layers :func:`quantize` replaced (kept with ``keep_original=True``) and return ``target``.

    Raises RuntimeError, changing nothing, when they were not kept. A no-op on a target that is not quantized.
    """
    import diffboost.integrations  # noqa: F401  (registers the quant feature that _uninstall looks up)
    from diffboost.patching import _uninstall

    entry = _quant_entry(target)
    if entry is not None:
        _check_restorable(entry[2])
        _uninstall(target, [entry])
    return target


def report(target: Any) -> Optional[Mapping[str, QuantReport]]:
    """The reports of the quantization currently on ``target`` (component -> :class:`QuantReport`), or None."""
    entry = _quant_entry(target)
    return None if entry is None else entry[2].reports
