"""The ``diffboost`` command (also ``python -m diffboost``).

    diffboost info            what runs here and why faster paths don't
    diffboost bench [...]     end-to-end pipeline benchmark (``diffboost bench --help``)
"""

from __future__ import annotations

import argparse
import json
import sys


def _info(args: argparse.Namespace) -> int:
    from diffboost.info import collect, render

    info = collect()
    print(json.dumps(info, indent=2, default=str) if args.json else render(info))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit code (2 for bad arguments)."""
    parser = argparse.ArgumentParser(prog="diffboost", description="diffboost: faster diffusers pipelines")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions, GPU, _C build, and which backend each op uses here")
    info.add_argument("--json", action="store_true", help="print the report as JSON")
    info.set_defaults(run=_info)
    try:
        from diffboost.bench import add_bench_parser
    except ImportError as exc:
        if exc.name != "diffboost.bench":  # a real error inside the bench module must not be hidden
            raise
    else:
        add_bench_parser(sub)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
