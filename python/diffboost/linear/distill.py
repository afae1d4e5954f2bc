"""Distil linear attention from a pipeline's own softmax self-attention (LinFusion's feature loss).

The pipeline runs its ordinary denoising loop, unpatched, so the trajectories are its own. A forward hook on every
U-Net self-attention (the frozen teacher) hands the student the teacher's input and trains it to reproduce the
teacher's output (per-layer feature MSE); each layer's graph is built and released inside the hook, so memory stays
at one layer's activations. One U-Net call is one micro-batch; every ``grad_accum`` of them the optimizer steps.

The data order is a function of the micro-batch index alone (pipeline call ``c`` uses batch ``c mod len(batches)``
and seed ``seed + c``), and a checkpoint records where it stopped, so resuming replays the interrupted call up to that
point without training and then continues exactly as an uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from diffboost.linear.modules import CONFIG_NAME, LinearAttentionModules, check_projection_mid_dim

logger = logging.getLogger("diffboost")

__all__ = ["DistillResult", "distill", "latest_checkpoint"]

STATE_NAME = "distill_state.pt"
_RESERVED = ("output_type", "generator", "num_inference_steps", "callback_on_step_end")


@dataclasses.dataclass
class DistillResult:
    """What :func:`distill` returns.

    Attributes:
        modules: the trained linear attentions (fp32, on the U-Net's device); install them with
            ``diffboost.patch(pipe, linear_attention=LinearAttentionConfig(weights=result.modules))``.
        losses: per optimizer step, the feature MSE averaged over layers and accumulated micro-batches (a resumed
            run includes the steps before the checkpoint).
        checkpoints: directories written by this call.
    """

    modules: LinearAttentionModules
    losses: list[float]
    checkpoints: list[Path]


class _Finished(Exception):
    """Raised from a hook to end the pipeline call in which the last optimizer step happened."""


@dataclasses.dataclass
class _Position:
    call: int = 0  # pipeline calls started
    forward: int = 0  # U-Net calls done within the current pipeline call


def latest_checkpoint(path: Union[str, os.PathLike]) -> Path:
    """``path`` itself if it is a checkpoint, else its ``step-*`` subdirectory with the highest step."""
    path = Path(path)
    if (path / CONFIG_NAME).is_file():
        return path
    steps = sorted(path.glob("step-*"), key=lambda p: int(p.name.split("-", 1)[1]) if p.name[5:].isdigit() else -1)
    steps = [p for p in steps if (p / CONFIG_NAME).is_file()]
    if not steps:
        raise ValueError(f"resume_from={os.fspath(path)!r}: neither a checkpoint nor a directory of step-* checkpoints")
    return steps[-1]


def _batches(prompts_or_embeds: Any, batch_size: int) -> list[dict[str, Any]]:
    """Pipeline keyword arguments, one dict per pipeline call."""
    data = prompts_or_embeds
    if isinstance(data, str):
        data = [data]
    if isinstance(data, torch.Tensor):
        if data.dim() != 3 or data.shape[0] == 0:
            raise ValueError(
                f"distill: prompt embeddings must be (count, tokens, width), got shape {tuple(data.shape)}"
            )
        return [{"prompt_embeds": data[i : i + batch_size]} for i in range(0, data.shape[0], batch_size)]
    if isinstance(data, Sequence) and data and all(isinstance(p, str) for p in data):
        return [{"prompt": list(data[i : i + batch_size])} for i in range(0, len(data), batch_size)]
    if isinstance(data, Sequence) and data and all(isinstance(p, dict) for p in data):
        for kwargs in data:
            reserved = sorted(set(kwargs) & set(_RESERVED))
            if reserved:
                raise ValueError(f"distill: pipeline kwargs may not set {', '.join(reserved)} (distill sets them)")
        return [dict(kwargs) for kwargs in data]
    raise ValueError(
        "distill: prompts_or_embeds must be a non-empty list of prompts, a (count, tokens, width) tensor of prompt "
        "embeddings, or a non-empty list of pipeline keyword dicts"
    )


def _make_optimizer(optimizer: Any, params: list[torch.nn.Parameter], lr: float, weight_decay: float):
    if callable(optimizer):
        return optimizer(params, lr=lr)
    factories = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam}
    if optimizer in factories:
        return factories[optimizer](params, lr=lr, weight_decay=weight_decay)
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    raise ValueError(f"distill: optimizer={optimizer!r} not supported ('adamw', 'adam', 'sgd' or a callable)")


def _check_args(steps, lr, grad_accum, batch_size, num_inference_steps, save_every, checkpoint_dir, pipeline_kwargs):
    for name, value in (("steps", steps), ("grad_accum", grad_accum), ("batch_size", batch_size),
                        ("num_inference_steps", num_inference_steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"distill: {name} must be a positive int, got {value!r}")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"distill: lr must be a positive number, got {lr!r}")
    if save_every is not None:
        if isinstance(save_every, bool) or not isinstance(save_every, int) or save_every < 1:
            raise ValueError(f"distill: save_every must be a positive int or None, got {save_every!r}")
        if checkpoint_dir is None:
            raise ValueError("distill: save_every needs checkpoint_dir")
    reserved = sorted(set(pipeline_kwargs or {}) & set(_RESERVED))
    if reserved:
        raise ValueError(f"distill: pipeline_kwargs may not set {', '.join(reserved)} (distill sets them)")


def distill(
    pipe: Any,
    prompts_or_embeds: Any,
    *,
    steps: int = 1000,
    lr: float = 1e-4,
    optimizer: Union[str, Callable[..., torch.optim.Optimizer]] = "adamw",
    weight_decay: float = 0.0,
    grad_accum: int = 1,
    batch_size: int = 1,
    num_inference_steps: int = 25,
    pipeline_kwargs: Optional[dict[str, Any]] = None,
    init: Union[str, os.PathLike, LinearAttentionModules, None] = None,
    projection_mid_dim: Optional[int] = None,
    checkpoint_dir: Union[str, os.PathLike, None] = None,
    save_every: Optional[int] = None,
    resume_from: Union[str, os.PathLike, None] = None,
    seed: int = 0,
    progress: bool = True,
) -> DistillResult:
    """Train linear attentions to reproduce every U-Net self-attention of ``pipe`` on its own trajectories.

    Only the new modules train; the pipeline is not modified (hooks are removed on return, the teachers stay
    frozen and in place).

    Args:
        pipe: a diffusers U-Net pipeline (SD 1.x/2.x, SDXL, ...), not patched with ``linear_attention``.
        prompts_or_embeds: prompts (``list[str]``), prompt embeddings (a ``(count, tokens, width)`` tensor, passed
            as ``prompt_embeds``), or a list of pipeline keyword dicts (one per call, e.g. SDXL's pooled embeddings).
            Used cyclically.
        steps: optimizer steps to reach (counting those before ``resume_from``).
        lr, optimizer, weight_decay: ``"adamw"`` (default), ``"adam"``, ``"sgd"`` (momentum 0.9), or a callable
            ``optimizer(params, lr=lr)``.
        grad_accum: U-Net calls (denoising steps) per optimizer step.
        batch_size: prompts (or embeddings) per pipeline call.
        num_inference_steps: denoising steps per pipeline call: each call yields that many micro-batches.
        pipeline_kwargs: more keyword arguments for every call (``guidance_scale``, ``height``, ``negative_prompt``).
        init: start from a checkpoint directory or a :class:`LinearAttentionModules` instead of the U-Net's own
            projections (``projection_mid_dim`` then applies).
        checkpoint_dir, save_every: write ``checkpoint_dir/step-NNNNNN`` (LinFusion layout plus ``distill_state.pt``
            with the optimizer state and data position) every ``save_every`` steps and after the last one.
        resume_from: a checkpoint directory (or a ``checkpoint_dir``, meaning its latest step) to continue from:
            weights, optimizer state, step count and data position.
        seed: seeds pipeline call ``c`` with ``seed + c``.
        progress: show a progress bar (tqdm, if installed; else a log line every 5% of the steps).

    Returns:
        :class:`DistillResult` with the trained modules and the loss of every step.
    """
    from diffboost.integrations.linear_attention import unet_of
    from diffboost.patching import patched_features

    _check_args(steps, lr, grad_accum, batch_size, num_inference_steps, save_every, checkpoint_dir, pipeline_kwargs)
    check_projection_mid_dim(projection_mid_dim, "distill")
    if init is not None and resume_from is not None:
        raise ValueError("distill: pass init or resume_from, not both (a checkpoint carries its own weights)")
    if "linear_attention" in patched_features(pipe):
        raise ValueError(
            "distill: the pipeline is patched with linear_attention; unpatch it so its own attention teaches"
        )
    unet = unet_of(pipe)
    batches = _batches(prompts_or_embeds, batch_size)

    position, done_steps, losses = _Position(), 0, []
    saved_optimizer, skip = None, 0  # skip: U-Net calls of the interrupted pipeline call already trained on
    if resume_from is not None:
        resume_dir = latest_checkpoint(resume_from)
        students = LinearAttentionModules.load(resume_dir)
        saved = torch.load(resume_dir / STATE_NAME, map_location="cpu", weights_only=True)
        done_steps, losses, saved_optimizer = saved["step"], list(saved["losses"]), saved["optimizer"]
        position, skip = _Position(saved["call"], 0), saved["forward"]
        source = f"checkpoint {resume_dir}"
    elif isinstance(init, LinearAttentionModules):
        students, source = init.clone(), "init"
    elif init is not None:
        students, source = LinearAttentionModules.load(init), f"checkpoint {os.fspath(init)}"
    else:
        students, source = LinearAttentionModules.from_unet(unet, projection_mid_dim), "the U-Net's projections"
    teachers = students.check_matches(unet, source)
    device = next(p for p in unet.parameters() if p.is_floating_point()).device
    students.to(device=device, dtype=torch.float32).train().requires_grad_(True)
    opt = _make_optimizer(optimizer, list(students.parameters()), lr, weight_decay)
    if saved_optimizer is not None:
        opt.load_state_dict(saved_optimizer)
    if done_steps >= steps:
        return DistillResult(students.eval().requires_grad_(False), losses, [])

    layers = len(teachers)
    micro_loss = torch.zeros((), device=device)  # this U-Net call, summed over layers
    step_loss = torch.zeros((), device=device)  # this optimizer step, summed over micro-batches
    micro = 0
    checkpoints: list[Path] = []
    bar = _progress_bar(steps, done_steps) if progress else None

    def teacher_hook(student):
        def hook(module, args, kwargs, output):
            nonlocal micro_loss
            if skip > 0:
                return
            hidden = args[0] if args else kwargs["hidden_states"]
            context = kwargs.get("encoder_hidden_states")
            with torch.enable_grad():
                pred = student(
                    hidden.detach().float(),
                    encoder_hidden_states=None if context is None else context.detach().float(),
                    attention_mask=kwargs.get("attention_mask"),
                )
                loss = F.mse_loss(pred, output.detach().float())
                (loss / (layers * grad_accum)).backward()
            micro_loss = micro_loss + loss.detach()

        return hook

    def unet_hook(module, args, output):
        nonlocal skip, micro, micro_loss, step_loss, done_steps
        position.forward += 1
        if skip > 0:
            skip -= 1
            return
        step_loss = step_loss + micro_loss / layers
        micro_loss = torch.zeros((), device=device)
        micro += 1
        if micro % grad_accum:
            return
        opt.step()
        opt.zero_grad(set_to_none=True)
        done_steps += 1
        losses.append(step_loss.item() / grad_accum)
        step_loss = torch.zeros((), device=device)
        _report(bar, done_steps, steps, losses[-1])
        if checkpoint_dir is not None and (done_steps == steps or (save_every and done_steps % save_every == 0)):
            checkpoints.append(_save(Path(checkpoint_dir), students, opt, done_steps, position, losses))
        if done_steps >= steps:
            raise _Finished

    handles = [unet.register_forward_hook(unet_hook)]
    by_name = dict(students.items())
    for name, teacher in teachers.items():
        handles.append(teacher.register_forward_hook(teacher_hook(by_name[name]), with_kwargs=True))
    saved_bar_config = dict(getattr(pipe, "_progress_bar_config", {}))
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    try:
        while True:
            kwargs = {**batches[position.call % len(batches)], **(pipeline_kwargs or {})}
            generator = torch.Generator("cpu").manual_seed(seed + position.call)
            try:
                pipe(**kwargs, num_inference_steps=num_inference_steps, output_type="latent", generator=generator)
            except _Finished:
                break
            if skip > 0:
                raise RuntimeError(
                    f"distill: the checkpoint stopped after U-Net call {position.forward + skip} of pipeline call "
                    f"{position.call}, but that call makes only {position.forward}; num_inference_steps changed?"
                )
            position = _Position(position.call + 1, 0)
    finally:
        for handle in handles:
            handle.remove()
        if hasattr(pipe, "set_progress_bar_config"):
            pipe._progress_bar_config = saved_bar_config
        if bar is not None:
            bar.close()
    return DistillResult(students.eval().requires_grad_(False), losses, checkpoints)


def _save(root: Path, students: LinearAttentionModules, opt, step: int, position: _Position, losses) -> Path:
    path = students.save(root / f"step-{step:06d}")
    state = {
        "step": step,
        "call": position.call,
        "forward": position.forward,
        "losses": list(losses),
        "optimizer": opt.state_dict(),
    }
    torch.save(state, path / STATE_NAME)
    return path


def _progress_bar(total: int, initial: int):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, desc="distill linear attention", unit="step")


def _report(bar, step: int, total: int, loss: float) -> None:
    if bar is not None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4g}")
    elif step == total or step % max(1, total // 20) == 0:
        logger.info("diffboost distill: step %d/%d, feature MSE %.4g", step, total, loss)
