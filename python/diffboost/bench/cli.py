"""``diffboost bench``: arguments, their validation (exit code 2 with a clear message), and the run."""

from __future__ import annotations

import argparse
import datetime
import json
import re
import shlex
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

__all__ = ["add_bench_parser", "run"]

DEFAULT_PRESET = "sd15"
#: GPU defaults are the model's native resolution and these steps; FLUX.1-dev and SD3 are usually sampled with 28
#: (the default of their pipelines).
GPU_STEPS = 50
GPU_STEPS_BY_PIPELINE = {"FluxPipeline": 28, "StableDiffusion3Pipeline": 28}
#: On a CPU a model runs with this many steps and, above TINY_MAX_RESOLUTION, at a quarter of its native
#: resolution (SD 1.5: 128 px), so the default run of every variant finishes in a few minutes: SD 1.5's U-Net at
#: 256 px already takes 4-17 s per step on 2 cores.
CPU_STEPS = 10
CPU_SCALE = 4
TINY_MAX_RESOLUTION = 128
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
#: Memory a pipeline needs beyond its weights (activations, VAE decode, allocator slack), as a fraction.
MEMORY_HEADROOM = 0.25


class BenchError(ValueError):
    """A bad argument found after parsing (model directory, device, size for this model, ...)."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def _non_negative_int(text: str) -> int:
    return 0 if text.strip() == "0" else _positive_int(text)


def _size(text: str) -> tuple[int, int]:
    """``512`` or ``HEIGHTxWIDTH`` (``768x512``), each a positive multiple of 8."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+)\s*)?", text)
    if not match:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size: give N or HEIGHTxWIDTH in pixels, e.g. 512 or 768x512")
    height = int(match.group(1))
    width = int(match.group(2) or height)
    for value in (height, width):
        if value < 8 or value % 8:
            raise argparse.ArgumentTypeError(
                f"{value} px is not a positive multiple of 8 (the VAE downsamples by 8); e.g. {max(8, value // 8 * 8)}")
    return height, width


def _preset(text: str) -> str:
    from diffboost.models import resolve_preset

    try:
        return resolve_preset(text)
    except KeyError as exc:
        raise argparse.ArgumentTypeError(exc.args[0]) from None


def _model_dir(text: str) -> Path:
    path = Path(text).expanduser()
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{text}: no such directory")
    if not path.is_dir() or not (path / "model_index.json").is_file():
        raise argparse.ArgumentTypeError(
            f"{text}: not a diffusers pipeline directory (no model_index.json); pass the directory that "
            "DiffusionPipeline.save_pretrained wrote")
    return path


def _device(text: str) -> str:
    if text != "auto" and not re.fullmatch(r"cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"{text!r}: use auto, cpu, cuda or cuda:N")
    return text


def add_bench_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``bench`` (and its ``kernels`` subcommand) to the ``diffboost`` command's subparsers."""
    from diffboost.bench.kernels import add_kernels_parser
    from diffboost.bench.pipeline import COMBINED, FEATURE_VARIANTS

    variants = "; ".join(f"{name}: {', '.join(map(str, values))}" for name, values in FEATURE_VARIANTS.items())
    parser = subparsers.add_parser(
        "bench",
        help="end-to-end pipeline benchmark of every optimisation (and 'bench kernels')",
        description=(
            "Time a diffusers pipeline unpatched, then with each diffboost optimisation alone and combined, with "
            "the same seed, and print time per image, speedup, denoiser time, peak memory and fidelity to the "
            "unpatched images. Without arguments: Stable Diffusion 1.5's architecture with random weights (no "
            "download), 512x512 px and 50 steps on a GPU, smaller on a CPU (said in the output)."),
        epilog=(f"Settings benchmarked per feature (when installed): {variants}; combined: "
                + ", ".join(f"{k}={v}" for k, v in COMBINED.items())
                + ". 'diffboost bench kernels --help': the kernel microbenchmarks of a source checkout."),
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", type=_preset, metavar="NAME",
                        help="embedded architecture with random weights: sd15 (default), sdxl, flux, pixart, sd3, tiny, "
                             "tiny-sdxl, tiny-flux, tiny-pixart, tiny-sd3, ... (see diffboost.models.PRESETS)")
    source.add_argument("--model", type=_model_dir, metavar="PATH",
                        help="a local diffusers pipeline directory (SD 1.x/2.x, SDXL, FLUX, PixArt, SD3); nothing is "
                             "downloaded")
    parser.add_argument("--steps", type=_positive_int,
                        help="denoising steps (default: 50 on a GPU, 28 for FLUX and SD3; 10 on a CPU)")
    parser.add_argument("--size", type=_size, metavar="N|HxW",
                        help="image size in px, a multiple of 8 (default: the model's; on a CPU, a quarter of it "
                             "above 128 px)")
    parser.add_argument("--batch", type=_positive_int, default=1, help="prompts per call (default 1)")
    parser.add_argument("--dtype", choices=("auto", *DTYPES), default="auto",
                        help="auto: bf16 on a GPU, fp32 on a CPU")
    parser.add_argument("--device", type=_device, default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    parser.add_argument("--repeat", type=_positive_int, help="timed calls per variant (default: 5 GPU, 2 CPU)")
    parser.add_argument("--warmup", type=_non_negative_int,
                        help="untimed full calls per variant after its 1-step probe (default: 1 GPU, 0 CPU)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every call (default 0)")
    parser.add_argument("--threads", type=_positive_int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--features", metavar="A,B", help="only these features (default: every installed one)")
    parser.add_argument("--no-combined", action="store_true", help="skip the combined row")
    parser.add_argument("--time-fallbacks", action="store_true",
                        help="also time variants whose ops all fall back to PyTorch here")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write the rows, settings and machine as JSON")
    parser.add_argument("--plot", type=Path, metavar="FILE", help="bar chart PNG of speedup and PSNR (matplotlib)")
    parser.set_defaults(run=run, parser=parser)
    add_kernels_parser(parser.add_subparsers(dest="bench_command", metavar="{kernels}"))
    return parser


# ------------------------------------------------------------------------------------------------------------------
# Resolving the settings
# ------------------------------------------------------------------------------------------------------------------


def _resolve_device(text: str) -> torch.device:
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(text)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise BenchError(f"--device {text}: no CUDA device is visible to torch here (torch {torch.__version__}, "
                             f"CUDA build: {torch.version.cuda or 'none'})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise BenchError(f"--device {text}: only {torch.cuda.device_count()} CUDA device(s)")
    return device


def _denoiser_of_preset(preset: str) -> tuple[str, dict[str, Any]]:
    from diffboost.models import get_preset, load_config

    spec = get_preset(preset)
    return spec.pipeline, load_config(preset, spec.denoiser_role)


def _size_multiple(pipeline: str, denoiser_config: dict[str, Any]) -> int:
    """Pixel multiple the pipeline needs: 8 (the VAE) times the latent patch (FLUX packs 2x2 latents)."""
    if pipeline == "FluxPipeline":
        return 16
    return 8 * int(denoiser_config.get("patch_size") or 1)


def _preset_bytes(preset: str, dtype: torch.dtype) -> int:
    """Bytes of the preset's weights in ``dtype``, counted on the meta device (nothing is allocated)."""
    from diffboost.models import build_component, get_preset

    count = 0
    for role in get_preset(preset).components:
        if role != "scheduler":
            count += sum(p.numel() for p in build_component(preset, role, device="meta").parameters())
    return count * dtype.itemsize


def _available_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """Everything the run needs, resolved from the arguments and the machine; raises BenchError."""
    device = _resolve_device(args.device)
    cuda = device.type == "cuda"
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else (torch.bfloat16 if cuda else torch.float32)
    if args.model is not None:
        model = str(args.model)
        with open(args.model / "model_index.json", encoding="utf-8") as f:
            pipeline = json.load(f).get("_class_name", "?")
        native, denoiser_config = None, None  # read from the loaded pipeline (_check_loaded)
    else:
        preset = args.preset or DEFAULT_PRESET
        from diffboost.models import get_preset

        pipeline, denoiser_config = _denoiser_of_preset(preset)
        native = get_preset(preset).resolution
        model = f"{preset} (random weights)"
        need = _preset_bytes(preset, dtype) * (1 + MEMORY_HEADROOM)
        have = _available_bytes(device)
        if have is not None and need > have:
            raise BenchError(f"--preset {preset} needs about {need / 2**30:.1f} GiB in {str(dtype)[6:]} on {device}, "
                             f"{have / 2**30:.1f} GiB are available; try a smaller preset, e.g. --preset tiny")
    settings = {
        "device": device, "dtype": dtype, "model": model, "pipeline": pipeline, "size": args.size,
        "steps": args.steps or (_gpu_steps(pipeline) if cuda else CPU_STEPS), "sizing": None,
        "repeat": args.repeat or (5 if cuda else 2), "warmup": args.warmup if args.warmup is not None else int(cuda),
    }
    if native is not None:
        _size_defaults(settings, args, native)
        _check_size(settings["size"], pipeline, denoiser_config)
    return settings


def _gpu_steps(pipeline: str) -> int:
    return GPU_STEPS_BY_PIPELINE.get(pipeline, GPU_STEPS)


def _size_defaults(settings: dict[str, Any], args: argparse.Namespace, native: int) -> None:
    """Default size: the model's native one, divided by CPU_SCALE on a CPU above TINY_MAX_RESOLUTION; on a CPU, a
    note saying what was reduced from the GPU defaults."""
    cpu = settings["device"].type == "cpu"
    if settings["size"] is None:
        side = native // CPU_SCALE // 16 * 16 if cpu and native > TINY_MAX_RESOLUTION else native
        settings["size"] = (side, side)  # a multiple of 16 suits every pipeline
    if cpu and (args.size is None or args.steps is None):
        height, width = settings["size"]
        settings["sizing"] = (f"CPU run: {height}x{width} px and {settings['steps']} steps (a GPU run defaults to "
                              f"{native}x{native} px and {_gpu_steps(settings['pipeline'])} steps), so it finishes "
                              "in minutes; --size and --steps change it")


def _check_size(size: tuple[int, int], pipeline: str, denoiser_config: dict[str, Any]) -> None:
    multiple = _size_multiple(pipeline, denoiser_config)
    bad = [value for value in size if value % multiple]
    if bad:
        raise BenchError(f"--size {size[0]}x{size[1]}: {pipeline} needs multiples of {multiple} px; "
                         f"{bad[0]} is not one (e.g. {bad[0] // multiple * multiple or multiple})")


def _load(args: argparse.Namespace, settings: dict[str, Any]):
    """The pipeline on the device, progress bar off; the model directory's or the preset's."""
    device, dtype = settings["device"], settings["dtype"]
    if args.model is None:
        from diffboost.models import build_pipeline

        return build_pipeline(args.preset or DEFAULT_PRESET, dtype=dtype, device=device, seed=0)
    from diffusers import DiffusionPipeline

    with warnings.catch_warnings():
        # torch_dtype is what every supported diffusers accepts; newer ones call it dtype and warn about the old name.
        warnings.filterwarnings("ignore", message=".*torch_dtype.*deprecated", category=FutureWarning)
        pipe = DiffusionPipeline.from_pretrained(args.model, local_files_only=True, torch_dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _check_loaded(pipe: Any, settings: dict[str, Any], args: argparse.Namespace) -> None:
    """For a model directory: the size (its default or the given one) and whether inputs can be made for it."""
    from diffboost.models import example_inputs

    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    if denoiser is None:
        raise BenchError(f"--model: {type(pipe).__name__} has no unet or transformer to benchmark")
    try:
        kwargs = example_inputs(pipe, steps=1)
    except ValueError as exc:
        raise BenchError(f"--model: {exc}") from None
    _size_defaults(settings, args, kwargs.get("height") or kwargs["image"].shape[-2])
    _check_size(settings["size"], type(pipe).__name__, dict(denoiser.config))


# ------------------------------------------------------------------------------------------------------------------
# The command
# ------------------------------------------------------------------------------------------------------------------


def _command(args: argparse.Namespace) -> str:
    """The equivalent command line: every option the user gave."""
    parts = ["diffboost", "bench"]
    for action in args.parser._actions:
        value = getattr(args, action.dest, None)
        if not action.option_strings or value is None or value == action.default or action.dest == "help":
            continue
        flag = action.option_strings[-1]
        if isinstance(value, bool):
            parts.append(flag)
        elif action.dest == "size":
            parts += [flag, f"{value[0]}x{value[1]}"]
        else:
            parts += [flag, str(value)]
    return shlex.join(parts)


def _machine_line(machine: dict[str, Any]) -> str:
    cpu = machine["cpu"]
    host = f"{cpu['model']} ({cpu['available_cores']} cores, {cpu['torch_threads']} torch threads"
    host += f", load average {cpu['load_average_1m']} at the end)" if cpu.get("load_average_1m") is not None else ")"
    gpu = machine.get("gpu")
    return f"{gpu['name']} (sm_{gpu['capability'].replace('.', '')}); host {host}" if gpu else host


def _extension_line() -> str:
    from diffboost import _ext

    if _ext.get_ext() is None:
        return f"_C extension not loaded ({_ext.ext_error()}): ops that need it fall back"
    info = _ext.build_info()
    cuda = "with CUDA kernels" if info.get("cuda") else "without CUDA kernels"
    return f"_C extension loaded, {cuda}, CPU SIMD {info.get('cpu_simd_runtime')}"


def run(args: argparse.Namespace) -> int:
    """Run ``diffboost bench``; bad arguments exit with code 2 and a message saying what to change."""
    from diffboost.bench import report
    from diffboost.bench.machine import machine_info
    from diffboost.bench.pipeline import Settings, plan_variants, run_benchmark
    from diffboost.patching import _features

    parser = args.parser
    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("--plot needs matplotlib, which is not installed: pip install matplotlib "
                         "(or pip install 'diffboost[bench]')")
    only = None
    if args.features is not None:
        registered = [feature.name for feature in _features()]
        only = [name.strip() for name in args.features.split(",") if name.strip()]
        unknown = [name for name in only if name not in registered]
        if unknown or not only:
            parser.error(f"--features {args.features}: unknown {', '.join(unknown) or 'empty list'}; installed "
                         f"features: {', '.join(registered)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        settings = _settings(args)
    except BenchError as exc:
        parser.error(str(exc))
    log = sys.stderr

    print(f"diffboost bench: loading {settings['model']} on {settings['device']}...", file=log, flush=True)
    first = _load(args, settings)
    if args.model is not None:
        try:
            _check_loaded(first, settings, args)  # also settles the default size of a model directory
        except BenchError as exc:
            parser.error(str(exc))
    pending = [first]
    del first  # run_benchmark holds the only reference, so it can release a broken copy before reloading

    def load():
        return pending.pop() if pending else _load(args, settings)

    device = settings["device"]
    height, width = settings["size"]
    config = {
        "model": settings["model"], "pipeline": settings["pipeline"], "height": height, "width": width,
        "steps": settings["steps"], "batch": args.batch, "dtype": str(settings["dtype"]).removeprefix("torch."),
        "device": str(device), "repeat": settings["repeat"], "warmup": settings["warmup"], "seed": args.seed,
        "memory": "CUDA allocator peak during the timed calls" if device.type == "cuda"
        else "peak resident set size of the process during the timed calls (sampled)",
        "sizing": settings["sizing"],
    }
    variants, unbenchmarked = plan_variants(only)
    print(f"diffboost bench: {report.describe_settings(config)}", file=log, flush=True)
    bench_settings = Settings(height=height, width=width, steps=settings["steps"], batch=args.batch,
                              repeat=settings["repeat"], warmup=settings["warmup"], seed=args.seed,
                              time_fallbacks=args.time_fallbacks)
    rows, notes = run_benchmark(load, variants, bench_settings, device=device, progress=log,
                                combined=not args.no_combined)
    notes = [_extension_line(), *notes]
    notes += [f"feature {name!r} is installed but has no benchmark setting (diffboost.bench.FEATURE_VARIANTS)"
              for name in unbenchmarked]
    machine = machine_info(packages=("diffusers", "transformers", "lpips"))
    print(f"diffboost bench: {report.describe_settings(config)}")
    print(f"machine: {_machine_line(machine)}")
    print()
    print(report.text_table(rows))
    print()
    for note in notes:
        print(f"note: {note}")
    if args.json is not None:
        doc = {
            "name": "bench",
            "command": _command(args),
            "timestamp": datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat(),
            "machine": machine,
            "config": config,
            "notes": notes,
            "rows": rows,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        # 6 significant digits: timings are not more precise.
        args.json.write_text(json.dumps(report.rounded(doc, 6), indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    if args.plot is not None:
        path = report.plot(rows, args.plot, title=report.headline(config))
        print(f"wrote {path}")
    failed = [row["name"] for row in rows if row["status"] == "error"]
    return 1 if failed else 0
