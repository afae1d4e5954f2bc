"""Render recorded benchmark results (``benchmarks/results/*.json``) as markdown.

    python -m benchmarks.report benchmarks/results/*.json [--heading-level 3] [-o results.md]

The README's results section is generated with `render_markdown`, never typed by hand.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks.harness import table


def load_results(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Read results documents written by `benchmarks.harness.write_results`, in the given order."""
    return [json.loads(Path(path).read_text(encoding="utf-8")) for path in paths]


def machine_summary(machine: Mapping[str, Any]) -> str:
    """One line naming the accelerator (or CPU) the results were measured on."""
    cpu = machine["cpu"]
    host = f"{cpu['model']} ({cpu['available_cores']} cores, {cpu['torch_threads']} torch threads)"
    gpu = machine.get("gpu")
    if not gpu:
        return host
    return (f"{gpu['name']} (sm_{gpu['capability'].replace('.', '')}, {gpu['sm_count']} SMs, "
            f"{gpu['memory_gib']} GiB, L2 {gpu['l2_cache_mib']} MiB); host {host}")


def software_summary(machine: Mapping[str, Any]) -> str:
    """The recorded versions, skipping packages that were not installed."""
    return ", ".join(f"{name} {version}" for name, version in machine["versions"].items() if version)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _markdown_table(headers: Sequence[str], cells: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(_cell(text) for text in line) + " |" for line in cells]
    return lines


def _shape_text(shapes: Mapping[str, Any] | None) -> str:
    if not shapes:
        return ""
    return " ".join(f"{key}={'x'.join(map(str, value)) if isinstance(value, list) else value}"
                    for key, value in shapes.items())


def document_header(doc: Mapping[str, Any], heading: str, heading_level: int = 3) -> list[str]:
    """Markdown lines opening one results document: the heading, then the machine, software, command and
    recording time (with the commit) lines. Shared with ``benchmarks.readme_results``."""
    machine = doc["machine"]
    commit = (machine.get("git") or {}).get("commit")
    return [
        f"{'#' * heading_level} {heading}",
        "",
        f"- Machine: {machine_summary(machine)}",
        f"- Software: {software_summary(machine)}",
        f"- Command: `{doc['command']}`",
        f"- Recorded: {doc['timestamp']}" + (f" at commit `{commit[:12]}`" if commit else ""),
    ]


def render_document(doc: Mapping[str, Any], heading_level: int = 3) -> str:
    """Markdown for one results document: a heading, the machine/software/command lines, and one table
    per group (shapes, dtype and baseline in the group's heading line when the group shares them)."""
    machine = doc["machine"]
    title = machine["gpu"]["name"] if machine.get("gpu") and any(
        row.get("device") == "cuda" for row in doc["rows"]) else machine["cpu"]["model"]
    lines = document_header(doc, f"{doc['name']} on {title}", heading_level)
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for row in doc["rows"]:
        groups.setdefault(row["group"], []).append(row)
    for group, rows in groups.items():
        # Rows skipped before their inputs were built carry no shapes/dtype; they do not split the group.
        shapes = {json.dumps(row["shapes"]): row["shapes"] for row in rows if row.get("shapes")}
        dtypes = {row["dtype"] for row in rows if row.get("dtype")}
        shared_shape = len(shapes) <= 1
        details = [f"`{_shape_text(shape)}`" for shape in shapes.values()] if shared_shape else []
        details += list(dtypes) if len(dtypes) == 1 else []
        baseline = rows[0].get("baseline_name")
        details.append(f"baseline: {baseline}" if baseline else "no baseline measured")
        headers, cells = table(rows, columns=("name",) if shared_shape else ("name", "shapes"), note_width=None)
        if not shared_shape:
            shape_col = headers.index("shapes")
            for line, row in zip(cells, rows):
                line[shape_col] = _shape_text(row.get("shapes"))
        lines += ["", f"{'#' * (heading_level + 1)} {group}", "", " · ".join(details), "",
                  *_markdown_table(headers, cells)]
    return "\n".join(lines) + "\n"


def render_markdown(sources: Iterable[str | Path | Mapping[str, Any]], heading_level: int = 3) -> str:
    """Markdown for several results documents (paths or already-loaded dicts), separated by blank lines.

    This is the entry point for the README generator.
    """
    docs = [source if isinstance(source, Mapping) else load_results([source])[0] for source in sources]
    return "\n".join(render_document(doc, heading_level) for doc in docs)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: print (or write with ``-o``) the markdown for the given results files."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path, help="results JSON files")
    parser.add_argument("--heading-level", type=int, default=3, help="markdown level of each file's heading")
    parser.add_argument("-o", "--output", type=Path, help="write to this file instead of stdout")
    args = parser.parse_args(argv)
    text = render_markdown(sorted(args.paths), args.heading_level)
    if args.output:
        args.output.write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
