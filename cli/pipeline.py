"""``foldserve pipeline``: train -> fold -> verify the default model into a repository."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cli.common import print_fold_report

REQUIRES = ("torch", "onnx", "onnxruntime", "sklearn", "matplotlib")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pipeline", help="train -> fold -> verify the default model into a repository",
                       description="What `make model` runs: train a model, fold it into a repository entry and "
                                   "verify it, in one command (foldserve train / fold / verify do each step).",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--repository", default="model_repository", help="the model repository to write the entry in")
    p.add_argument("--name", default="digits_resnet", help="the model's name in the repository")
    p.add_argument("--arch", default="resnet", help="architecture (foldserve train --list-archs)")
    p.add_argument("--dataset", default="digits", help="digits | digits32 | synthetic | npz | folder")
    p.add_argument("--data", help="path for --dataset npz (arrays x, y) or folder (one sub-folder per class)")
    p.add_argument("--epochs", type=int, default=30, help="passes over the training split")
    p.add_argument("--runs", default="runs", help="where training runs are written (RUNS/NAME)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from folding.export import FoldRequest, build_entry
    from folding.verify import summary_table
    from trainer.train import TrainConfig, train

    out = Path(args.runs) / args.name
    result = train(TrainConfig(arch=args.arch, dataset=args.dataset, data=args.data, epochs=args.epochs, out=str(out),
                               progress=sys.stderr.isatty()))
    val = {k: round(v, 4) for k, v in result.metrics.items() if k.startswith("val") and v is not None}
    print(f"checkpoint: {result.checkpoint}  val metrics: {val}")
    entry = build_entry(FoldRequest(result.checkpoint, args.repository, args.name))
    print_fold_report(entry.onnx_report)
    verification = entry.verification
    if verification is None:        # FoldRequest verifies by default: never here
        raise RuntimeError("the pipeline's entry was not verified")
    print(summary_table(verification))
    print(f"model: {entry.version_dir}")
    return 0 if verification.passed else 1
