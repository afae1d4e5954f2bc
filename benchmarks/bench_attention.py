"""Attention forward benchmark: diffboost's exact and INT8 kernels vs torch SDPA backends and SageAttention.

    python -m benchmarks.bench_attention [--dtype bf16|fp16] [--shapes sd15,sdxl,pixart,flux|all]
                                         [--quick] [--out benchmarks/results] [--device auto|cuda|cpu]
                                         [--threads N]

Shapes are the self-attention (and SD 1.5 cross-attention) calls of real diffusion models, in SDPA layout
(B, H, S, D).  Every shape is a harness group whose baseline is the fastest torch SDPA backend measured in
the same run.  Each row also carries its accuracy against an fp32 SDPA reference on the same inputs.

Without CUDA only ``--quick`` runs: the same head dims with tiny batch, heads and sequence lengths, so the
script can be tested end to end on a CPU.  On CUDA ``--quick`` keeps the real shapes and shortens timing.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import warnings
from collections.abc import Sequence
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.harness import Case, SkipCase, add_common_arguments, finish, resolve_device, run_cases


@dataclasses.dataclass(frozen=True)
class Shape:
    """One attention call: batch, heads, query length, key/value length, head dim."""

    family: str
    B: int
    H: int
    Lq: int
    Lk: int
    D: int

    @property
    def name(self) -> str:
        """Group name, e.g. ``sd15-s4096-d40`` or ``sd15-s4096-kv77-d40`` for cross-attention."""
        kv = f"-kv{self.Lk}" if self.Lk != self.Lq else ""
        return f"{self.family}-s{self.Lq}{kv}-d{self.D}"

    @property
    def flops(self) -> int:
        """Forward FLOPs: two matmuls (QK^T and PV) of 2*Lq*Lk*D each, per batch and head."""
        return 4 * self.B * self.H * self.Lq * self.Lk * self.D

    def dims(self) -> dict[str, int]:
        """The dimensions as recorded in a row's ``shapes``."""
        return {"B": self.B, "H": self.H, "Lq": self.Lq, "Lk": self.Lk, "D": self.D}

    def tiny(self) -> Shape:
        """CPU-sized: one batch, two heads, lengths / 16; keeps the head dim (what decides kernel support),
        the text length of cross-attention, and distinct group names."""
        def shrink(length: int) -> int:
            return max(16, length // 16)
        return dataclasses.replace(self, B=1, H=2, Lq=shrink(self.Lq),
                                   Lk=shrink(self.Lk) if self.Lk == self.Lq else self.Lk)


FAMILIES: dict[str, tuple[Shape, ...]] = {
    "sd15": (Shape("sd15", 2, 8, 4096, 4096, 40), Shape("sd15", 2, 8, 1024, 1024, 80),
             Shape("sd15", 2, 8, 256, 256, 160), Shape("sd15", 2, 8, 4096, 77, 40)),
    "sdxl": (Shape("sdxl", 2, 10, 4096, 4096, 64), Shape("sdxl", 2, 20, 1024, 1024, 64)),
    "pixart": (Shape("pixart", 2, 16, 4096, 4096, 72),),
    "flux": (Shape("flux", 1, 24, 4608, 4608, 128),),
}

SDPA_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}

#: The math backend materializes the Lq x Lk scores and is never competitive; above this many scores per
#: head it is skipped rather than timed (SD 1.5's S=1024 is the largest shape it still runs on).
MATH_MAX_SCORES = 1024 * 1024

#: Scores (fp32) materialized at once by the reference: bounds its memory on the largest shapes.
REFERENCE_CHUNK_BYTES = 512 * 2**20

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

#: torch's messages when the forced backend cannot take the inputs (CUDA, CPU).
SDPA_REFUSALS = ("No available kernel", "No viable backend")


@functools.lru_cache(maxsize=1)
def make_inputs(shape: Shape, dtype: torch.dtype, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded random q, k, v in SDPA layout; cached for the group currently being timed."""
    generator = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(shape.B, shape.H, shape.Lq, shape.D, generator=generator, device=device, dtype=dtype)
    k = torch.randn(shape.B, shape.H, shape.Lk, shape.D, generator=generator, device=device, dtype=dtype)
    v = torch.randn(shape.B, shape.H, shape.Lk, shape.D, generator=generator, device=device, dtype=dtype)
    return q, k, v


@functools.lru_cache(maxsize=1)
def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """fp32 SDPA (math backend) on the same inputs, chunked over batch x heads to bound memory.

    Cached by tensor identity, so the cases of one group share it.  TF32 stays off unless the caller
    enabled it globally (torch's default), so this is true fp32.
    """
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    q3, k3, v3 = (t.reshape(B * H, t.shape[2], D).float() for t in (q, k, v))
    out = torch.empty(B * H, Lq, D, device=q.device, dtype=torch.float32)
    step = max(1, REFERENCE_CHUNK_BYTES // (Lq * Lk * 4))
    with sdpa_kernel(SDPBackend.MATH):
        for start in range(0, B * H, step):
            chunk = slice(start, start + step)
            out[chunk] = F.scaled_dot_product_attention(q3[chunk], k3[chunk], v3[chunk])
    return out.reshape(B, H, Lq, D)


def accuracy(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> dict[str, float]:
    """Max abs error and cosine similarity of ``out`` against the fp32 reference."""
    ref = reference_attention(q, k, v)
    out = out.float()
    cos = F.cosine_similarity(out.flatten().double(), ref.flatten().double(), dim=0)
    return {"max_abs_err": (out - ref).abs().max().item(), "cos_sim": cos.item()}


def _sdpa_refusal(exc: RuntimeError, caught: list[warnings.WarningMessage]) -> str | None:
    """The reason torch gives when the forced backend refuses the inputs, or None for a real error."""
    if not any(marker in str(exc) for marker in SDPA_REFUSALS):
        return None
    # torch explains a refusal through warnings; drop the "(Triggered internally at ...)" source location.
    reasons = [str(w.message).split("(Triggered internally", 1)[0].strip() for w in caught]
    reasons = [r for r in dict.fromkeys(reasons) if r and "kernel not used because" not in r]
    return "; ".join(reasons) or str(exc).split(". ", 1)[0]


def make_sdpa(backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Callable[[], torch.Tensor]:
    """SDPA call for one forced backend (the harness holds ``sdpa_kernel`` around setup and timing).

    A probe call turns the backend refusing these inputs into a skipped row with torch's reason.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            F.scaled_dot_product_attention(q, k, v)
        except RuntimeError as exc:
            reason = _sdpa_refusal(exc, caught)
            if reason is None:
                raise
            raise SkipCase(f"sdpa {backend} backend refused: {reason}") from exc
    return functools.partial(F.scaled_dot_product_attention, q, k, v)


def make_sageattn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Callable[[], torch.Tensor]:
    """``sageattention.sageattn`` in HND layout; its assertions (head dim, device) become skip reasons."""
    try:
        from sageattention import sageattn
    except ImportError as exc:
        raise SkipCase(f"sageattention not installed ({exc})") from exc
    if not q.is_cuda:
        raise SkipCase("sageattention needs CUDA")
    # sageattn subtracts k's mean from k in place (smooth_k); a private copy keeps the group's shared k,
    # which the reference and the other cases use, untouched.
    k = k.clone()
    call = functools.partial(sageattn, q, k, v, tensor_layout="HND", is_causal=False)
    try:
        call()
    except AssertionError as exc:
        raise SkipCase(f"sageattention refuses this shape: {exc}") from exc
    return call


def make_diffboost(precision: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Callable[[], torch.Tensor]:
    """``diffboost.ops.attention`` at ``precision`` with its backend forced: the Triton kernels on CUDA, the
    reference (which emulates the INT8 arithmetic) on CPU.  A missing op, or the forced backend refusing
    these inputs, becomes a skipped row, so the script runs before the kernels exist."""
    try:
        from diffboost import ops
    except ImportError as exc:
        raise SkipCase(f"diffboost.ops not importable ({exc})") from exc
    attention = getattr(ops, "attention", None)
    if attention is None:
        raise SkipCase("diffboost.ops has no attention op")
    call = functools.partial(attention, q, k, v, precision=precision, backend=diffboost_backend(q.device.type))
    try:
        call()
    except ops.BackendUnavailableError as exc:
        raise SkipCase(str(exc)) from exc
    return call


def diffboost_backend(device: str) -> str:
    """The diffboost attention backend benchmarked on ``device``."""
    return "triton" if device == "cuda" else "reference"


def build_cases(shapes: Sequence[Shape], dtype: torch.dtype, device: str) -> list[Case]:
    """All cases for ``shapes``: every SDPA backend (baseline candidates), sageattention, diffboost."""
    cases = []
    for shape in shapes:
        common: dict[str, Any] = {
            "group": shape.name,
            "inputs": functools.partial(make_inputs, shape, dtype, device),
            "flops": shape.flops,
            "shapes": shape.dims(),
            "dtype": str(dtype).removeprefix("torch."),
            "device": device,
            "check": accuracy,
        }
        for backend, enum in SDPA_BACKENDS.items():
            too_big = backend == "math" and shape.Lq * shape.Lk > MATH_MAX_SCORES
            cases.append(Case(
                name=f"sdpa-{backend}", make_fn=functools.partial(make_sdpa, backend), baseline=True,
                context=functools.partial(sdpa_kernel, enum), params={"impl": "torch.sdpa", "backend": backend},
                skip=f"math backend not timed above Lq*Lk={MATH_MAX_SCORES}" if too_big else None, **common))
        cases.append(Case(name="sageattention", make_fn=make_sageattn,
                          params={"impl": "sageattention", "backend": "triton"}, **common))
        for precision in ("exact", "int8"):
            cases.append(Case(
                name=f"diffboost-{precision}", make_fn=functools.partial(make_diffboost, precision),
                params={"impl": "diffboost", "backend": diffboost_backend(device), "precision": precision},
                **common))
    return cases


def select_shapes(spec: str, quick_cpu: bool) -> list[Shape]:
    """Shapes for a ``--shapes`` value (comma-separated families or ``all``)."""
    names = list(FAMILIES) if spec == "all" else [name.strip() for name in spec.split(",") if name.strip()]
    unknown = [name for name in names if name not in FAMILIES]
    if unknown or not names:
        raise ValueError(f"unknown shape families {unknown}; choose from {', '.join(FAMILIES)} or all")
    shapes = [shape for name in names for shape in FAMILIES[name]]
    return [shape.tiny() for shape in shapes] if quick_cpu else shapes


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the process exit code."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_attention",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--shapes", default="all", help="comma-separated of sd15,sdxl,pixart,flux, or all")
    add_common_arguments(parser, quick_help="short timing; without CUDA also tiny shapes (the only mode that runs on CPU)")
    args = parser.parse_args(argv)
    device = resolve_device(parser, args, cpu_needs_quick="the full shapes")
    try:
        shapes = select_shapes(args.shapes, quick_cpu=device == "cpu")
    except ValueError as exc:
        parser.error(str(exc))

    timing = {"warmup_ms": 10, "rep_ms": 30} if args.quick else {"warmup_ms": 25, "rep_ms": 100}
    rows = run_cases(build_cases(shapes, DTYPES[args.dtype], device), **timing)
    return finish(rows, "attention", args, argv, script="bench_attention", packages=("sageattention",))


if __name__ == "__main__":
    sys.exit(main())
