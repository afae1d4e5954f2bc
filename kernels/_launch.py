"""Launch helpers shared by the kernel modules: the GPU's SM count, and launching the first config that fits it."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

import torch
import triton


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached)."""
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


# (kernel name, key) -> the config that fitted, so a config that does not fit is tried once per process.
_fitted: dict[tuple[str, Any], triton.Config] = {}


def launch_first_fitting(
    kernel: Any, grid: Callable[[dict], tuple], args: tuple, meta: dict, configs: Iterable[triton.Config], key: Any
) -> None:
    """Launch ``kernel[grid](*args, **meta)`` with the first of ``configs`` whose resources the GPU has.

    A config's shared memory is known only once it is compiled for the GPU at hand: the same tiles that fit an H100
    (227 KiB per block) may not fit an Ada or Ampere consumer part (99 KiB), where Triton raises ``OutOfResources``
    when it loads the kernel. The config that fitted is remembered under ``key`` (the launch's shape class).
    """
    name = getattr(kernel, "__name__", repr(kernel))
    remembered = _fitted.get((name, key))
    candidates = [remembered] if remembered is not None else list(configs)
    for i, config in enumerate(candidates):
        try:
            kernel[grid](*args, **meta, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
        except triton.OutOfResources:
            if i == len(candidates) - 1:
                raise
            continue
        _fitted[(name, key)] = config
        return
