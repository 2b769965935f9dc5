"""What several commands share: the verifier's flags and the printing of a fold report."""
from __future__ import annotations

import argparse
from typing import Any

from foldserve.errors import ConfigError
from foldserve.records import FoldReport


def add_verify_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rtol", type=float, default=None, help="override the dtype's relative tolerance")
    p.add_argument("--atol", type=float, default=None, help="override the dtype's absolute tolerance")
    p.add_argument("--provider", choices=("auto", "cpu", "cuda"), default="auto",
                   help="execution provider the server will use (default: CUDA when present)")
    p.add_argument("--batch-sizes", default="1,7,32", help="comma-separated batch sizes of random inputs")
    p.add_argument("--max-accuracy-drop", type=float, default=None,
                   help="fp16/int8 entries: most accuracy points the served model may lose against the float64 "
                        "truth (default 1)")


def verify_options(args: argparse.Namespace) -> Any:
    from folding.verify import VerifyOptions

    try:
        sizes = tuple(int(b) for b in args.batch_sizes.split(",") if b.strip())
    except ValueError:
        raise ConfigError(f"--batch-sizes {args.batch_sizes!r}: expected integers like 1,7,32") from None
    if not sizes or min(sizes) < 1:
        raise ConfigError(f"--batch-sizes {args.batch_sizes!r}: need positive integers")
    if args.max_accuracy_drop is not None and args.max_accuracy_drop < 0:
        raise ConfigError(f"--max-accuracy-drop must be >= 0 points, got {args.max_accuracy_drop}")
    return VerifyOptions(batch_sizes=sizes, rtol=args.rtol, atol=args.atol, provider=args.provider,
                         max_accuracy_drop=args.max_accuracy_drop)


def print_fold_report(report: FoldReport) -> None:
    print(report.summary())
    for line in report.lines():
        print(f"  {line}")
