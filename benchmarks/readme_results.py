"""Regenerate the README's results section from the recorded JSON in ``benchmarks/results/`` (never typed by hand).

    python -m benchmarks.readme_results            # rewrite the block between the markers in README.md
    python -m benchmarks.readme_results --check    # exit 1 if README.md is not what the results give (CI)
    python -m benchmarks.readme_results --print    # print the block instead

The block lies between ``<!-- results:start -->`` and ``<!-- results:end -->``. It holds, for every results file,
the machine, the software, the command and the table: first the end-to-end ``diffboost bench`` runs, then the
kernel microbenchmarks, GPU results before CPU results within each. ``diffboost bench`` documents (they carry a
``config``) are rendered with the same table the command prints (:mod:`diffboost.bench.report`); harness documents
with :mod:`benchmarks.report`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks.harness import REPO_ROOT, RESULTS_DIR
from benchmarks.report import document_header, load_results, render_document

START = "<!-- results:start -->"
END = "<!-- results:end -->"
README = REPO_ROOT / "README.md"


def _is_bench(doc: Mapping[str, Any]) -> bool:
    return "config" in doc


def _on_gpu(doc: Mapping[str, Any]) -> bool:
    if _is_bench(doc):
        return doc["config"]["device"].startswith("cuda")
    return any(row.get("device") == "cuda" for row in doc["rows"])


def render_bench(doc: Mapping[str, Any], heading_level: int = 3) -> str:
    """Markdown for one ``diffboost bench`` document: heading, machine, software, command, settings, table, notes."""
    from diffboost.bench.report import describe_settings, headline, markdown

    machine = doc["machine"]
    title = machine["gpu"]["name"] if _on_gpu(doc) else machine["cpu"]["model"]
    lines = document_header(doc, f"diffboost bench: {headline(doc['config'])} ({title})", heading_level)
    lines.append(f"- Settings: {describe_settings(doc['config'])}")
    load = machine["cpu"].get("load_average_1m")
    if load is not None:  # a busy machine slows CPU timings down
        lines.append(f"- Load: 1-minute load average {load} on {machine['cpu']['available_cores']} cores when it ended")
    lines += ["", markdown(doc["rows"])]
    if doc.get("notes"):
        lines += ["", *(f"Note: {note}" for note in doc["notes"])]
    return "\n".join(lines) + "\n"


def render_block(paths: Sequence[Path], heading_level: int = 3) -> str:
    """The text between the markers for these results files."""
    docs = load_results(sorted(paths))
    docs.sort(key=lambda doc: (not _is_bench(doc), not _on_gpu(doc)))  # stable: file order within each kind
    parts = [] if docs else ["No results recorded yet."]
    parts += [render_bench(doc, heading_level) if _is_bench(doc) else render_document(doc, heading_level)
              for doc in docs]
    return "\n\n".join(part.rstrip("\n") for part in parts)


def replace_block(text: str, block: str) -> str:
    """``text`` with the content between the markers replaced by ``block``; ValueError if the markers are not
    there exactly once each, in order."""
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise ValueError(f"README must contain {START} and then {END}, once each")
    head, rest = text.split(START)
    _, tail = rest.split(END)
    return f"{head}{START}\n{block}\n{END}{tail}"


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the process exit code."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.readme_results", description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help="directory of results JSON files")
    parser.add_argument("--readme", type=Path, default=README, help="the markdown file to update")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="exit 1 if the README is out of date; change nothing")
    mode.add_argument("--print", action="store_true", help="print the block; change nothing")
    args = parser.parse_args(argv)

    block = render_block(list(args.results.glob("*.json")))
    if args.print:
        sys.stdout.write(block + "\n")
        return 0
    text = args.readme.read_text(encoding="utf-8")
    try:
        updated = replace_block(text, block)
    except ValueError as exc:
        parser.error(f"{args.readme}: {exc}")
    if args.check:
        if updated != text:
            print(f"{args.readme} is out of date: run python -m benchmarks.readme_results", file=sys.stderr)
            return 1
        return 0
    if updated != text:
        args.readme.write_text(updated, encoding="utf-8")
        print(f"updated {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
