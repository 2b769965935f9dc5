"""``foldserve bench``: the limits, the server and the baselines, measured; JSON + Markdown."""
from __future__ import annotations

import argparse
from pathlib import Path

REQUIRES = ("torch", "onnx", "onnxruntime", "fastapi", "uvicorn")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmark the limits, the server and the baselines; JSON + Markdown")
    p.add_argument("--quick", action="store_true", help="fewer requests and points (about 3 minutes on 2 cores)")
    p.add_argument("--out", default="bench/results", help="directory for bench-*.json / .md and latest.*")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from bench.suite import markdown
    from bench.suite import run as run_suite

    report = run_suite(Path(args.out), quick=args.quick)
    print(markdown(report))
    print(f"written to {args.out}/latest.json and latest.md ({report['meta']['wall_s']} s)")
    return 0
