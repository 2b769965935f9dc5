"""``foldserve fold``: a checkpoint into a verified repository entry, or one ONNX file into a folded file."""
from __future__ import annotations

import argparse
from pathlib import Path

from cli.common import add_verify_flags, print_fold_report, verify_options
from foldserve.errors import ConfigError

REQUIRES = ("torch", "onnx", "onnxruntime")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fold", help="fold a checkpoint into a model-repository entry, or fold an ONNX file")
    p.add_argument("checkpoint", nargs="?", help="trainer checkpoint (file or run directory)")
    p.add_argument("--repository", help="model repository directory (Triton layout)")
    p.add_argument("--name", help="model name (default: DATASET_ARCH)")
    p.add_argument("--version", type=int, help="version number (default: next free)")
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--max-queue-delay-us", type=int, default=2000)
    p.add_argument("--no-verify", action="store_true", help="skip verification (the server will not serve it "
                                                            "as ready unless told to)")
    p.add_argument("--force", action="store_true", help="replace an existing version")
    p.add_argument("--onnx", help="fold this ONNX file instead of a checkpoint (with --out)")
    p.add_argument("--out", help="with --onnx: where to write the folded model (not the input itself)")
    add_verify_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.onnx:
        return _fold_file(args)
    if args.out:
        raise ConfigError("--out goes with --onnx; a checkpoint is folded into --repository DIR")
    if not args.checkpoint or not args.repository:
        raise ConfigError("fold needs CHECKPOINT and --repository DIR (or --onnx IN --out OUT)")
    from folding.export import build_entry
    from folding.verify import summary_table

    result = build_entry(args.checkpoint, args.repository, args.name, args.version,
                         max_batch_size=args.max_batch_size, max_queue_delay_us=args.max_queue_delay_us,
                         verify=not args.no_verify, verify_options=verify_options(args), force=args.force)
    print_fold_report(result.onnx_report)
    print(f"model: {result.version_dir}")
    if result.verification is not None:
        print(summary_table(result.verification))
        return 0 if result.verification["passed"] else 1
    return 0


def _fold_file(args: argparse.Namespace) -> int:
    if not args.out or args.checkpoint:
        raise ConfigError("fold --onnx IN.onnx needs --out OUT.onnx and no checkpoint")
    if args.repository or args.name or args.version is not None:
        raise ConfigError("--repository/--name/--version do not go with --onnx IN --out OUT (which writes one "
                          "file); fold a checkpoint into a repository instead")
    if Path(args.out).resolve() == Path(args.onnx).resolve():
        raise ConfigError(f"--out {args.out} is the input file: the unfolded original would be overwritten; "
                          f"choose another --out")
    from folding.export import fold_onnx_file

    report = fold_onnx_file(args.onnx, args.out)
    print_fold_report(report)
    print(f"wrote {args.out}")
    return 0
