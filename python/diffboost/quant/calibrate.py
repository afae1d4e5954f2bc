"""Calibration: run the model on real inputs and record what each target layer sees.

Activation ranges move with the timestep (Q-Diffusion), so the model runs whole sampling loops and every call of a
layer counts: per input channel the maximum ``|x|`` over all calls, and a sample of input rows (tokens, or pixels of
a 1x1 convolution) drawn evenly across calls, on which :mod:`diffboost.quant.model` measures each candidate's output
error. Nothing is downloaded; without user inputs the pipeline runs on generated prompt embeddings / prompts
(:func:`diffboost.models.example_inputs`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Optional, Union

import torch
from torch import nn

logger = logging.getLogger("diffboost")

__all__ = ["ActivationStats", "Calibration", "collect", "run_calibration"]

#: ``calibration=`` of :func:`diffboost.quant.quantize`: None (self-calibration), ``"data-free"``, prompts,
#: pipeline / model call kwargs, or a function that runs the target.
Calibration = Union[None, str, Sequence[str], Sequence[Mapping[str, Any]], Callable[[Any], Any]]

#: Self-calibration: denoising steps of each sampling loop and seeds (each seed one batch of two prompts).
SELF_CALIBRATION_STEPS = 8
SELF_CALIBRATION_SEEDS = (0,)


@dataclasses.dataclass
class ActivationStats:
    """What one layer saw during calibration.

    Attributes:
        amax: ``[K]`` fp32, maximum ``|x|`` per input channel over every row of every call.
        sample: ``[T, K]`` rows of the input (its dtype), at most the configured number, spread across calls.
        calls: how many times the layer ran.
        rows: how many input rows it saw.
    """

    amax: torch.Tensor
    sample: torch.Tensor
    calls: int = 0
    rows: int = 0
    # Random priority of each sampled row: keeping the highest priorities over all calls is a uniform sample of
    # (call, row) pairs in which every call offered the same number of candidates.
    _keys: Optional[torch.Tensor] = dataclasses.field(default=None, repr=False)


def _channel_amax_and_rows(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int, Callable]:
    """Per-input-channel ``max |x|`` (fp32), the number of GEMM rows (tokens of a linear layer, pixels of a 1x1
    convolution) and ``pick(index) -> [len(index), K]`` rows, without laying the whole input out as rows."""
    if isinstance(module, nn.Conv2d):
        pixels = x.flatten(2)  # [B, C, H*W], a view
        hw = pixels.shape[2]
        return x.abs().amax(dim=(0, 2, 3)).float(), x.shape[0] * hw, lambda i: pixels[i // hw, :, i % hw]
    rows = x.reshape(-1, x.shape[-1])
    return rows.abs().amax(dim=0).float(), rows.shape[0], lambda i: rows[i]


@contextlib.contextmanager
def collect(
    layers: Mapping[str, nn.Module], max_rows: int, seed: int = 0
) -> Iterator[dict[str, ActivationStats]]:
    """Hook ``layers`` (name -> module) while the ``with`` body runs the model; yields the stats, filled on exit.

    The hooks read the inputs and never change them, so the model computes exactly what it would without them.
    """
    stats: dict[str, ActivationStats] = {}
    generator = torch.Generator().manual_seed(seed)

    def hook(name: str, module: nn.Module, args: tuple) -> None:
        if not args:  # called with its input as a keyword: nothing to record (nn.Linear / nn.Conv2d never are)
            return
        x = args[0].detach()
        if x.numel() == 0:
            return
        amax, rows, pick = _channel_amax_and_rows(module, x)
        take = torch.randperm(rows, generator=generator)[:max_rows].to(x.device)
        keys = torch.rand(take.shape[0], generator=generator).to(x.device)
        entry = stats.get(name)
        if entry is None:
            entry = stats[name] = ActivationStats(amax, pick(take), _keys=keys)
        else:
            entry.amax = torch.maximum(entry.amax, amax)
            sample, keys = torch.cat([entry.sample, pick(take)]), torch.cat([entry._keys, keys])
            keep = keys.topk(min(max_rows, keys.shape[0])).indices
            entry.sample, entry._keys = sample[keep], keys[keep]
        entry.calls += 1
        entry.rows += rows

    handles = [module.register_forward_pre_hook(lambda m, a, n=name: hook(n, m, a)) for name, module in layers.items()]
    try:
        yield stats
    finally:
        for handle in handles:
            handle.remove()
        for entry in stats.values():
            entry._keys = None


def _self_calibration_runs(target: Any) -> list[Callable[[], Any]]:
    """Calls that run ``target`` (a pipeline or a bare denoiser) on generated inputs over a sampling trajectory."""
    from diffboost.models import example_denoiser_inputs, example_inputs

    if isinstance(target, nn.Module):
        # A bare denoiser: one call per timestep of a short trajectory, from pure noise to nearly clean.
        runs = []
        for seed in SELF_CALIBRATION_SEEDS:
            try:
                kwargs = example_denoiser_inputs(target, batch=2, seed=seed)
            except (TypeError, ValueError) as error:
                raise ValueError(
                    f"diffboost.quant: cannot self-calibrate a {type(target).__name__} ({error}); pass "
                    "calibration= (a list of forward kwargs, or a function that runs the model)"
                ) from None
            t = kwargs["timestep"]
            top = 1.0 if t.is_floating_point() and float(t.max()) <= 1.0 else 999.0  # FLUX takes t in [0, 1]
            for step in range(SELF_CALIBRATION_STEPS):
                level = top * (1.0 - step / SELF_CALIBRATION_STEPS)
                level = level if t.is_floating_point() else round(level)
                step_kwargs = dict(kwargs, timestep=torch.full_like(t, level))
                runs.append(lambda k=step_kwargs: target(**k))
        return runs
    runs = []
    for seed in SELF_CALIBRATION_SEEDS:
        try:
            kwargs = example_inputs(target, batch=2, steps=SELF_CALIBRATION_STEPS, seed=seed)
        except (TypeError, ValueError, KeyError) as error:
            raise ValueError(
                f"diffboost.quant: cannot self-calibrate a {type(target).__name__} ({error}); pass calibration= "
                "(prompts, a list of pipeline kwargs, or a function that runs the pipeline)"
            ) from None
        kwargs["output_type"] = "latent"  # the VAE decode does not touch the denoiser
        runs.append(lambda k=kwargs: target(**k))
    return runs


def _runs(target: Any, calibration: Calibration) -> list[Callable[[], Any]]:
    if calibration is None:
        return _self_calibration_runs(target)
    if callable(calibration):
        return [lambda: calibration(target)]
    if isinstance(calibration, (str, bytes)) or not isinstance(calibration, Sequence) or not calibration:
        raise TypeError(
            "diffboost.quant: calibration must be None (self-calibration), 'data-free', a non-empty list of prompts, "
            f"a list of call kwargs (dicts) or a callable; got {calibration!r:.80}"
        )
    if all(isinstance(item, str) for item in calibration):
        if isinstance(target, nn.Module):
            raise TypeError("diffboost.quant: prompts calibrate a pipeline; a bare model needs forward kwargs (dicts)")
        return [lambda p=prompt, s=seed: target(prompt=p, generator=torch.Generator().manual_seed(s),
                                                output_type="latent")
                for seed, prompt in enumerate(calibration)]
    if all(isinstance(item, Mapping) for item in calibration):
        return [lambda k=item: target(**k) for item in calibration]
    raise TypeError("diffboost.quant: calibration items must all be prompts (str) or all call kwargs (dict)")


def run_calibration(
    target: Any,
    layers: Mapping[str, nn.Module],
    calibration: Calibration,
    max_rows: int,
    progress: bool = True,
) -> dict[str, ActivationStats]:
    """Run ``target`` (pipeline or model) as ``calibration`` says while recording the inputs of ``layers``.

    ``calibration="data-free"`` records nothing (the caller quantizes without smoothing).
    """
    if calibration == "data-free":
        return {}
    runs = _runs(target, calibration)
    logger.info("diffboost.quant: calibrating %d layers on %d run(s)", len(layers), len(runs))
    # A compiled denoiser runs eagerly here: traced, every recording hook would be a recompilation.
    with torch.no_grad(), torch.compiler.set_stance("force_eager"), collect(layers, max_rows) as stats:
        for index, run in enumerate(runs):
            if progress:
                logger.info("diffboost.quant: calibration run %d/%d", index + 1, len(runs))
            run()
    return stats
