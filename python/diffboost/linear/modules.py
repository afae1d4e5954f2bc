"""LinFusion's generalized linear attention as a module, and checkpoints in LinFusion's layout.

A U-Net self-attention (``attn1``) is replaced by :class:`GeneralizedLinearAttention`:

    Q = W_q (x + f_q(x)),  K = W_k (x + f_k(x)),  V = W_v x,   f = Linear -> LayerNorm -> LeakyReLU -> Linear
    out = to_out(linear_attention(Q, K, V, feature_map="elu", eps=1e-4))

:class:`LinearAttentionModules` holds the replacements for one U-Net and reads/writes LinFusion's checkpoint layout:
a directory with ``config.json`` (``modules_list`` = ``[{module_name, dim_n, heads, projection_mid_dim}, ...]``)
and ``diffusion_pytorch_model.safetensors`` keyed ``"{i}.to_q.weight"``, ``"{i}.to_out.0.bias"``,
``"{i}.to_q_.0.weight"`` (Linear), ``"{i}.to_q_.1.*"`` (LayerNorm), ``"{i}.to_q_.3.*"`` (Linear), the same for
``to_k_``; ``i`` indexes ``modules_list``. Module names are paths inside the U-Net, as in LinFusion.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch import nn

from diffboost.ops.linear_attention import linear_attention

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "GeneralizedLinearAttention",
    "LinearAttentionModules",
    "self_attentions",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
# An additive attention mask entry at or below this drops the key (diffusers writes -10000 or -inf); linear
# attention cannot apply any other bias.
_DROP_BELOW = -1000.0


def _residual_projection(dim: int, mid_dim: Optional[int]) -> nn.Module:
    """``f`` of ``x + f(x)``; ``mid_dim`` None means ``dim``, -1 means identity (LinFusion's conventions)."""
    if mid_dim == -1:
        return nn.Identity()
    mid = mid_dim or dim
    return nn.Sequential(nn.Linear(dim, mid), nn.LayerNorm(mid), nn.LeakyReLU(), nn.Linear(mid, dim))


def check_projection_mid_dim(mid_dim: Any, where: str) -> None:
    if mid_dim is None or mid_dim == -1:
        return
    if isinstance(mid_dim, bool) or not isinstance(mid_dim, int) or mid_dim <= 0:
        raise ValueError(f"{where}: projection_mid_dim must be None, -1 or a positive int, got {mid_dim!r}")


def _as_linear(module: nn.Module, name: str) -> nn.Linear:
    """``module`` as an ``nn.Linear``: itself, or the dequantized fp32 copy of a layer quantized by
    :mod:`diffboost.quant` (which has ``to_linear``)."""
    if isinstance(module, nn.Linear):
        return module
    if callable(getattr(module, "to_linear", None)):
        return module.to_linear(torch.float32)
    raise ValueError(
        f"{name} is a {type(module).__name__}, not an nn.Linear: cannot initialise linear attention from it"
    )


class GeneralizedLinearAttention(nn.Module):
    """LinFusion's linear self-attention: residual non-linear projections on Q and K, ``phi = elu + 1``.

    Args:
        dim: model width (query, key, value and output width; LinFusion's ``dim_n``).
        heads: number of heads; must divide ``dim``.
        projection_mid_dim: hidden width of ``f`` (None = ``dim``; -1 = no ``f``, i.e. ``x + x``, as LinFusion).
        qkv_bias, out_bias: whether ``to_q``/``to_k``/``to_v`` and ``to_out.0`` have biases.
        dropout: of ``to_out.1``.
        backend: the :func:`~diffboost.ops.linear_attention` backend (``"auto"``, ``"triton"``, ``"reference"``);
            not part of the checkpoint.

    Parameter names match LinFusion's, so ``state_dict()`` keys are its checkpoint keys. A new module's ``f`` ends in
    an all-zero Linear, so ``f(x) = 0`` until it is trained.
    """

    feature_map = "elu"
    eps = 1e-4

    def __init__(
        self,
        dim: int,
        heads: int,
        projection_mid_dim: Optional[int] = None,
        *,
        qkv_bias: bool = False,
        out_bias: bool = True,
        dropout: float = 0.0,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if dim <= 0 or heads <= 0 or dim % heads != 0:
            raise ValueError(f"GeneralizedLinearAttention: heads={heads} must divide dim={dim} (both positive)")
        check_projection_mid_dim(projection_mid_dim, "GeneralizedLinearAttention")
        self.dim = dim
        self.heads = heads
        self.projection_mid_dim = projection_mid_dim
        self.backend = backend
        self.to_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.to_k = nn.Linear(dim, dim, bias=qkv_bias)
        self.to_v = nn.Linear(dim, dim, bias=qkv_bias)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim, bias=out_bias), nn.Dropout(dropout)])
        self.to_q_ = _residual_projection(dim, projection_mid_dim)
        self.to_k_ = _residual_projection(dim, projection_mid_dim)
        for f in (self.to_q_, self.to_k_):
            if isinstance(f, nn.Sequential):
                nn.init.zeros_(f[3].weight)
                nn.init.zeros_(f[3].bias)

    @classmethod
    def from_attention(
        cls, attn: nn.Module, projection_mid_dim: Optional[int] = None, name: str = "attention"
    ) -> "GeneralizedLinearAttention":
        """A linear attention initialised from a diffusers self-attention: copies of its ``to_q``/``to_k``/``to_v``/
        ``to_out`` (the original is not touched), ``f = 0``; same device and dtype.

        A projection quantized by :mod:`diffboost.quant` is copied as its dequantized ``nn.Linear`` (the linear
        attention's own layers are float; fp32 then, as the quantized layer keeps no compute dtype).
        """
        check_self_attention(attn, name)
        projections = {proj: _as_linear(getattr(attn, proj), f"{name}.{proj}") for proj in ("to_q", "to_k", "to_v")}
        projections["to_out"] = _as_linear(attn.to_out[0], f"{name}.to_out.0")
        dropout = attn.to_out[1].p if len(attn.to_out) > 1 and isinstance(attn.to_out[1], nn.Dropout) else 0.0
        new = cls(
            attn.inner_dim,
            attn.heads,
            projection_mid_dim,
            qkv_bias=projections["to_q"].bias is not None,
            out_bias=projections["to_out"].bias is not None,
            dropout=dropout,
        )
        weight = projections["to_q"].weight
        new.to(device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            for proj in ("to_q", "to_k", "to_v"):
                getattr(new, proj).load_state_dict(projections[proj].state_dict())
            new.to_out[0].load_state_dict(projections["to_out"].state_dict())
        return new

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        **cross_attention_kwargs: Any,
    ) -> torch.Tensor:
        """``(batch, tokens, dim) -> (batch, tokens, dim)``; the call signature of a diffusers ``Attention``.

        ``encoder_hidden_states`` (if given) provides keys and values. ``attention_mask`` may be a key-padding mask
        (boolean, True = attend, or additive with 0 = attend and <= -1000 = drop) of shape ``(batch, keys)`` or
        ``(batch, 1, keys)``. Other keyword arguments (LoRA scale, ...) are ignored, as LinFusion does.
        """
        if hidden_states.dim() != 3:
            raise ValueError(
                "GeneralizedLinearAttention: hidden_states must be (batch, tokens, dim), "
                f"got {tuple(hidden_states.shape)}"
            )
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query = self.to_q(hidden_states + self.to_q_(hidden_states))
        key = self.to_k(context + self.to_k_(context))
        value = self.to_v(context)
        query, key, value = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (query, key, value))
        keep = _key_padding_mask(attention_mask, context.shape[0], context.shape[1])
        out = linear_attention(
            query, key, value, feature_map=self.feature_map, eps=self.eps, key_padding_mask=keep, backend=self.backend
        )
        out = out.transpose(1, 2).flatten(2).to(hidden_states.dtype)
        return self.to_out[1](self.to_out[0](out))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, projection_mid_dim={self.projection_mid_dim}"


def _key_padding_mask(mask: Optional[torch.Tensor], batch: int, keys: int) -> Optional[torch.Tensor]:
    """A diffusers attention mask as the op's boolean ``(batch, keys)`` key mask."""
    if mask is None:
        return None
    if mask.dim() == 3 and mask.shape[1] == 1:
        mask = mask[:, 0]
    if tuple(mask.shape) != (batch, keys):
        raise ValueError(
            f"GeneralizedLinearAttention: attention_mask shape {tuple(mask.shape)} is not a key-padding mask "
            f"(batch, keys) = {(batch, keys)} or (batch, 1, keys); linear attention cannot apply per-query masks"
        )
    if mask.dtype == torch.bool:
        return mask
    keep = mask == 0
    if not bool((keep | (mask <= _DROP_BELOW)).all()):
        raise ValueError(
            "GeneralizedLinearAttention: an additive attention_mask must hold only 0 (attend) and values <= -1000 "
            "(drop); linear attention cannot apply other biases"
        )
    return keep


def check_self_attention(attn: nn.Module, name: str) -> None:
    """Raise ValueError unless ``attn`` is a diffusers ``Attention`` that LinFusion's module can stand in for: plain
    self-attention with square projections and no norms, residual or rescaling inside."""
    from diffusers.models.attention_processor import Attention

    if not isinstance(attn, Attention):
        raise ValueError(f"{name} is a {type(attn).__name__}, not a diffusers Attention")
    problems = []
    if attn.is_cross_attention:
        problems.append("it is a cross-attention")
    for part in ("spatial_norm", "group_norm", "norm_q", "norm_k", "norm_cross", "add_q_proj"):
        if getattr(attn, part, None) is not None:
            problems.append(f"it has {part}")
    if attn.residual_connection or attn.rescale_output_factor != 1.0:
        problems.append("it has a residual connection or output rescaling")
    if not (attn.query_dim == attn.inner_dim == attn.out_dim):
        problems.append(f"query/inner/out widths differ ({attn.query_dim}/{attn.inner_dim}/{attn.out_dim})")
    if problems:
        raise ValueError(f"{name} cannot be replaced by linear attention: {'; '.join(problems)}")


def self_attentions(unet: nn.Module) -> dict[str, nn.Module]:
    """The U-Net self-attentions LinFusion replaces: every diffusers ``Attention`` named ``...attn1``, by path."""
    from diffusers.models.attention_processor import Attention

    return {
        name: module
        for name, module in unet.named_modules()
        if name.rpartition(".")[2] == "attn1" and isinstance(module, Attention)
    }


class LinearAttentionModules(nn.Module):
    """The linear attentions of one U-Net, registered as ``"0"``, ``"1"``, ... so that ``state_dict()`` is
    LinFusion's checkpoint; ``modules_list[i]`` describes module ``i`` and names the U-Net module it replaces.

    Build with :meth:`from_unet` (initialised from the U-Net's own projections) or :meth:`load` (a LinFusion-layout
    directory); write with :meth:`save`.
    """

    def __init__(self, modules_list: list[dict[str, Any]], modules: list[GeneralizedLinearAttention]) -> None:
        super().__init__()
        if len(modules_list) != len(modules):
            raise ValueError(f"LinearAttentionModules: {len(modules_list)} entries but {len(modules)} modules")
        self.modules_list = [dict(entry) for entry in modules_list]
        for i, module in enumerate(modules):
            self.add_module(str(i), module)

    def items(self) -> Iterator[tuple[str, GeneralizedLinearAttention]]:
        """``(module_name, module)`` in checkpoint order."""
        for i, entry in enumerate(self.modules_list):
            yield entry["module_name"], getattr(self, str(i))

    @classmethod
    def from_unet(cls, unet: nn.Module, projection_mid_dim: Optional[int] = None) -> "LinearAttentionModules":
        """One :class:`GeneralizedLinearAttention` per U-Net self-attention, initialised from its projections."""
        check_projection_mid_dim(projection_mid_dim, "LinearAttentionModules.from_unet")
        targets = self_attentions(unet)
        if not targets:
            raise ValueError(f"{type(unet).__name__} has no U-Net self-attention (diffusers Attention named attn1)")
        entries, modules = [], []
        for name, attn in targets.items():
            modules.append(GeneralizedLinearAttention.from_attention(attn, projection_mid_dim, name))
            entries.append({
                "module_name": name, "dim_n": attn.inner_dim, "heads": attn.heads,
                "projection_mid_dim": projection_mid_dim,
            })
        return cls(entries, modules)

    def check_matches(self, unet: nn.Module, source: str = "linear attention weights") -> dict[str, nn.Module]:
        """Check that these modules replace exactly the U-Net's self-attentions, with the same widths and heads;
        return ``{module_name: original}``. Raises ValueError naming ``source`` and every mismatch."""
        targets = self_attentions(unet)
        names = [entry["module_name"] for entry in self.modules_list]
        problems = []
        missing = [name for name in targets if name not in names]
        unknown = [name for name in names if name not in targets]
        if missing:
            problems.append(f"no module for the U-Net's {', '.join(missing)}")
        if unknown:
            problems.append(f"the U-Net has no self-attention {', '.join(unknown)}")
        for entry in self.modules_list:
            attn = targets.get(entry["module_name"])
            if attn is None:
                continue
            try:
                check_self_attention(attn, entry["module_name"])
            except ValueError as exc:
                problems.append(str(exc))
                continue
            if (entry["dim_n"], entry["heads"]) != (attn.inner_dim, attn.heads):
                problems.append(
                    f"{entry['module_name']}: dim_n={entry['dim_n']}, heads={entry['heads']} but the U-Net's has "
                    f"dim {attn.inner_dim}, {attn.heads} heads"
                )
        if problems:
            raise ValueError(f"{source} do not match {type(unet).__name__}: " + "; ".join(problems))
        return {name: targets[name] for name in names}

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``config.json`` and ``diffusion_pytorch_model.safetensors`` (LinFusion's layout) into ``path``."""
        from safetensors.torch import save_file

        import diffusers

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        config = {
            "_class_name": "LinFusion",
            "_diffusers_version": diffusers.__version__,
            "modules_list": self.modules_list,
        }
        tensors = {key: value.detach().cpu().contiguous() for key, value in self.state_dict().items()}
        save_file(tensors, str(path / WEIGHTS_NAME), metadata={"format": "pt"})
        (path / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LinearAttentionModules":
        """Read a LinFusion-layout directory. Tensors keep the dtype they were saved in; every key and shape is
        checked against ``modules_list`` (ValueError naming the file and the offending keys)."""
        from safetensors.torch import load_file

        path = Path(path)
        config_path, weights_path = path / CONFIG_NAME, path / WEIGHTS_NAME
        for file in (config_path, weights_path):
            if not file.is_file():
                raise ValueError(f"{path} is not a LinFusion checkpoint directory: {file.name} is missing")
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{config_path}: not valid JSON ({exc})") from exc
        entries = config.get("modules_list") if isinstance(config, dict) else None
        if not isinstance(entries, list) or not entries:
            raise ValueError(f"{config_path}: needs a non-empty 'modules_list'")
        for i, entry in enumerate(entries):
            _check_entry(entry, f"{config_path}: modules_list[{i}]")

        state = load_file(str(weights_path))
        modules, problems, expected_keys = [], [], set()
        for i, entry in enumerate(entries):
            prefix = f"{i}."
            module = GeneralizedLinearAttention(
                entry["dim_n"],
                entry["heads"],
                entry["projection_mid_dim"],
                qkv_bias=f"{prefix}to_q.bias" in state,
                out_bias=f"{prefix}to_out.0.bias" in state,
            )
            for key, param in module.state_dict().items():
                full = prefix + key
                expected_keys.add(full)
                if full not in state:
                    problems.append(f"missing {full}")
                elif tuple(state[full].shape) != tuple(param.shape):
                    problems.append(f"{full} has shape {tuple(state[full].shape)}, expected {tuple(param.shape)}")
            modules.append(module)
        unexpected = sorted(set(state) - expected_keys)
        if unexpected:
            problems.append(f"unexpected keys {', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}")
        if problems:
            raise ValueError(f"{weights_path} does not match {CONFIG_NAME}: " + "; ".join(problems))
        for i, module in enumerate(modules):
            prefix = f"{i}."
            # assign=True keeps each tensor's stored dtype, so load -> save -> load is exact.
            module.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, assign=True)
        return cls(entries, modules)

    def clone(self) -> "LinearAttentionModules":
        """A deep copy (installing a copy leaves these modules free to keep training)."""
        return copy.deepcopy(self)


def _check_entry(entry: Any, where: str) -> None:
    if not isinstance(entry, dict):
        raise ValueError(f"{where} must be an object with module_name, dim_n, heads, projection_mid_dim")
    missing = [key for key in ("module_name", "dim_n", "heads") if key not in entry]
    if missing:
        raise ValueError(f"{where} lacks {', '.join(missing)}")
    if not isinstance(entry["module_name"], str) or not entry["module_name"]:
        raise ValueError(f"{where}: module_name must be a non-empty string")
    dim, heads = entry["dim_n"], entry["heads"]
    if not (isinstance(dim, int) and isinstance(heads, int) and dim > 0 and heads > 0 and dim % heads == 0):
        raise ValueError(f"{where}: dim_n={dim!r} and heads={heads!r} must be positive ints with heads dividing dim_n")
    entry.setdefault("projection_mid_dim", None)
    check_projection_mid_dim(entry["projection_mid_dim"], where)
