"""Counting the multiply-accumulates a denoiser call actually executes.

One call runs with forward hooks on every convolution, linear layer and attention module; each hook adds the MACs
of what it just computed, from the real shapes: a convolution ``out.numel() * in_channels / groups * kernel area``,
a linear layer ``out.numel() * in_features``, an attention module ``batch * Lq * Lk * (q_dim + v_dim)`` for the
``Q K^T`` and ``P V`` products (whatever processor computes them). Norms, activations and elementwise ops are not
counted (about 1% of a U-Net's or DiT's MACs). The MACs are attributed to named groups of modules (the parts a
cache may skip) so that a later call's cost follows from which groups ran, without hooks slowing it down.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

__all__ = ["count_macs"]

OTHER = "other"


def _tokens(x: torch.Tensor) -> int:
    """Sequence length of an attention input: ``(B, S, C)`` or an image ``(B, C, H, W)``."""
    return x.shape[2] * x.shape[3] if x.ndim == 4 else x.shape[1]


def _is_attention(module: torch.nn.Module) -> bool:
    # diffusers' Attention, FluxAttention and the other AttentionModuleMixin classes all have heads and Q/V
    # projections; the products between them happen inside the processor, where no module hook sees them.
    return (isinstance(getattr(module, "heads", None), int)
            and isinstance(getattr(module, "to_q", None), torch.nn.Linear)
            and isinstance(getattr(module, "to_v", None), torch.nn.Linear))


def _is_linear_like(module: torch.nn.Module) -> bool:
    # nn.Linear and its subclasses, plus weight-replacing layers (quantized linears) that keep its interface.
    if isinstance(module, torch.nn.Linear):
        return True
    return (not any(True for _ in module.children()) and isinstance(getattr(module, "in_features", None), int)
            and isinstance(getattr(module, "out_features", None), int))


def _attention_macs(module: torch.nn.Module, args: tuple, kwargs: dict) -> int:
    hidden = args[0] if args else kwargs.get("hidden_states")
    context = args[1] if len(args) > 1 else kwargs.get("encoder_hidden_states")
    if not isinstance(hidden, torch.Tensor):
        return 0
    q_len = k_len = _tokens(hidden)
    if isinstance(context, torch.Tensor):
        if getattr(module, "added_kv_proj_dim", None) is not None:  # joint attention: text and image tokens together
            q_len = k_len = q_len + _tokens(context)
        else:
            k_len = _tokens(context)
    return hidden.shape[0] * q_len * k_len * (module.to_q.out_features + module.to_v.out_features)


def count_macs(model: torch.nn.Module, call: Callable[[], Any],
               groups: Mapping[str, Iterable[torch.nn.Module]]) -> tuple[Any, dict[str, int]]:
    """Run ``call()`` with counting hooks on ``model`` and return ``(its output, MACs per group)``.

    Every counted module belongs to the innermost listed module that contains it, or to ``"other"``; the result
    has every group of ``groups``, ``"other"`` and ``"total"``. The hooks are removed before returning.
    """
    owner: dict[torch.nn.Module, str] = {}
    for name, modules in groups.items():
        for module in modules:
            for sub in module.modules():
                owner[sub] = name
    counts = dict.fromkeys([*groups, OTHER], 0)

    def add(module: torch.nn.Module, macs: int) -> None:
        counts[owner.get(module, OTHER)] += int(macs)

    def conv_hook(module, args, output):
        kernel = math.prod(module.kernel_size)
        add(module, output.numel() * (module.in_channels // module.groups) * kernel)

    def linear_hook(module, args, output):
        if isinstance(output, torch.Tensor):
            add(module, output.numel() * module.in_features)

    def attention_hook(module, args, kwargs, output):
        add(module, _attention_macs(module, args, kwargs))

    handles = []
    try:
        for module in model.modules():
            if isinstance(module, torch.nn.modules.conv._ConvNd):
                handles.append(module.register_forward_hook(conv_hook))
            elif _is_attention(module):
                handles.append(module.register_forward_hook(attention_hook, with_kwargs=True))
            elif _is_linear_like(module):
                handles.append(module.register_forward_hook(linear_hook))
        output = call()
    finally:
        for handle in handles:
            handle.remove()
    counts["total"] = sum(counts.values())
    return output, counts
