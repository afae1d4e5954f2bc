"""Tables and plots of ``diffboost bench`` results, from the rows (live) or a recorded JSON document (README).

The same :func:`table` feeds the plain-text table the command prints and the markdown the README generator
(``benchmarks/readme_results.py``) writes, so both always show the same columns and numbers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["describe_settings", "headline", "markdown", "plot", "rounded", "table", "text_table"]


def rounded(obj: Any, digits: int) -> Any:
    """``obj`` (JSON-like) with every float rounded to ``digits`` significant digits, so that a rerun's diff of a
    results file shows real changes rather than float noise."""
    if isinstance(obj, float):
        return obj if not math.isfinite(obj) or obj == 0 else float(f"{obj:.{digits}g}")
    if isinstance(obj, Mapping):
        return {key: rounded(value, digits) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [rounded(item, digits) for item in obj]
    return obj

def _seconds(ms: float | None) -> str:
    if ms is None:
        return ""
    seconds = ms / 1e3
    return f"{seconds:.3f}" if seconds < 100 else f"{seconds:.1f}"


def _backends(row: Mapping[str, Any]) -> str:
    return ", ".join(f"{op}: {'/'.join(sorted(used))}" for op, used in sorted(row.get("backends", {}).items()))


def _fidelity(row: Mapping[str, Any]) -> str:
    if row.get("finite") is False:
        return "non-finite output"
    if row.get("identical"):
        return "identical"
    return f"{row['psnr_db']:.2f}" if row.get("psnr_db") is not None else ""


def table(rows: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[str]], list[str]]:
    """Headers, string cells and numbered footnotes for a results table.

    Columns: variant, median time per image and its min-max spread (seconds), speedup over the unpatched
    pipeline, the denoiser's share of the time per image, peak memory, PSNR against the unpatched images (and
    LPIPS when some row has it), the diffboost op backends that ran, and a note. Long explanations (why a row was
    not timed, why an op fell back) are footnotes, numbered once each.
    """
    has_lpips = any(row.get("lpips") is not None for row in rows)
    headers = ["variant", "s/image", "min-max s", "speedup", "denoiser s/image", "peak MiB", "PSNR dB"]
    headers += ["LPIPS"] * has_lpips + ["ops ran", "note"]
    footnotes: list[str] = []

    def ref(text: str) -> str:
        if text not in footnotes:
            footnotes.append(text)
        return f"[{footnotes.index(text) + 1}]"

    cells = []
    for row in rows:
        ok = row["status"] == "ok"
        line = [
            row["name"],
            _seconds(row.get("median_ms")),
            f"{_seconds(row['min_ms'])}-{_seconds(row['max_ms'])}" if ok else "",
            f"{row['speedup']:.2f}x" if row.get("speedup") is not None else "",
            _seconds(row.get("denoiser_ms")),
            f"{row['peak_memory_mib']:.0f}" if row.get("peak_memory_mib") is not None else "",
            _fidelity(row) if ok else "",
        ]
        if has_lpips:
            line.append(f"{row['lpips']:.4f}" if row.get("lpips") is not None else "")
        line.append(_backends(row))
        refs = [ref(row["reason"])] if row.get("reason") else []
        refs += [ref(note) for note in row.get("fallbacks", [])]
        if row.get("unpatch_error"):
            refs.append(ref(f"not undoable in place ({row['unpatch_error']}): the pipeline was reloaded after it"))
        line.append(" ".join(([] if ok else [row["status"]]) + refs))
        cells.append(line)
    return headers, cells, [f"[{i}] {text}" for i, text in enumerate(footnotes, 1)]


def text_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The table as aligned plain text, footnotes below it."""
    headers, cells, footnotes = table(rows)
    widths = [max(len(text) for text in column) for column in zip(headers, *cells)]
    lines = ["  ".join(text.ljust(w) for text, w in zip(line, widths)).rstrip()
             for line in [headers, ["-" * w for w in widths], *cells]]
    return "\n".join(lines + ([""] + footnotes if footnotes else []))


def markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """The table as markdown, footnotes below it as a list."""
    headers, cells, footnotes = table(rows)

    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(text) for text in line) + " |" for line in cells]
    if footnotes:
        lines += [""] + [f"- {cell(text)}" for text in footnotes]
    return "\n".join(lines)


def headline(config: Mapping[str, Any]) -> str:
    """A short title: model, size, steps, batch, dtype, device."""
    return (f"{config['model']}, {config['height']}x{config['width']} px, {config['steps']} steps, batch "
            f"{config['batch']}, {config['dtype']} on {config['device']}")


def describe_settings(config: Mapping[str, Any]) -> str:
    """One line saying what was run: model, size, steps, batch, dtype, device, timing protocol."""
    text = (f"{headline(config)}; median of {config['repeat']} timed calls after a 1-step probe and "
            f"{config['warmup']} warm-up "
            f"call{'s' if config['warmup'] != 1 else ''}, seed {config['seed']}; peak memory: {config['memory']}")
    return text + (f". {config['sizing']}" if config.get("sizing") else "")


def plot(rows: Sequence[Mapping[str, Any]], path: str | Path, title: str = "") -> Path:
    """Bar chart PNG of the speedup and the PSNR of every timed row; needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")  # files only: never needs a display
    import matplotlib.pyplot as plt

    timed = [row for row in rows if row["status"] == "ok" and row.get("speedup") is not None]
    names = [row["name"] for row in timed]
    speedups = [row["speedup"] for row in timed]
    # Identical images have an infinite PSNR: no bar, a label instead.
    psnrs = [0.0 if row.get("identical") else row.get("psnr_db") or 0.0 for row in timed]
    fig, (ax_speed, ax_psnr) = plt.subplots(1, 2, figsize=(11, 0.5 * len(timed) + 1.8), sharey=True)
    ax_speed.barh(names, speedups, color="tab:blue")
    ax_speed.axvline(1.0, color="black", linewidth=0.8)
    ax_speed.set_xlabel("speedup over unpatched (time per image)")
    ax_speed.set_xlim(0, max(speedups, default=1.0) * 1.2)
    for y, value in enumerate(speedups):
        ax_speed.text(value, y, f" {value:.2f}x", va="center")
    ax_psnr.barh(names, psnrs, color="tab:green")
    ax_psnr.set_xlabel("PSNR vs unpatched images, dB (higher is closer)")
    ax_psnr.set_xlim(0, max(psnrs, default=0.0) * 1.2 or 50.0)
    for y, (row, value) in enumerate(zip(timed, psnrs)):
        ax_psnr.text(value, y, " identical" if row.get("identical") else f" {value:.1f}", va="center")
    ax_speed.invert_yaxis()  # first row at the top, as in the table
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
