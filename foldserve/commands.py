"""Subcommands of the later stages (fold, verify, pipeline, serve, infer), registered on the CLI."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

from foldserve.errors import ConfigError


def _verify_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rtol", type=float, default=None, help="override the dtype's relative tolerance")
    p.add_argument("--atol", type=float, default=None, help="override the dtype's absolute tolerance")
    p.add_argument("--provider", choices=("auto", "cpu", "cuda"), default="auto",
                   help="execution provider the server will use (default: CUDA when present)")
    p.add_argument("--batch-sizes", default="1,7,32", help="comma-separated batch sizes of random inputs")


def _verify_options(args: argparse.Namespace):
    from folding.verify import VerifyOptions

    try:
        sizes = tuple(int(b) for b in args.batch_sizes.split(",") if b.strip())
    except ValueError:
        raise ConfigError(f"--batch-sizes {args.batch_sizes!r}: expected integers like 1,7,32") from None
    if not sizes or min(sizes) < 1:
        raise ConfigError(f"--batch-sizes {args.batch_sizes!r}: need positive integers")
    return VerifyOptions(batch_sizes=sizes, rtol=args.rtol, atol=args.atol, provider=args.provider)


# --- fold ------------------------------------------------------------------------------------------

def add_fold(sub: argparse._SubParsersAction) -> None:
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
    p.add_argument("--onnx", help="fold this ONNX file instead of a checkpoint")
    p.add_argument("--out", help="with --onnx: where to write the folded model")
    _verify_flags(p)
    p.set_defaults(func=cmd_fold)


def cmd_fold(args: argparse.Namespace) -> int:
    if args.onnx:
        if not args.out or args.checkpoint:
            raise ConfigError("fold --onnx IN.onnx needs --out OUT.onnx and no checkpoint")
        from folding.export import fold_onnx_file

        report = fold_onnx_file(args.onnx, args.out)
        _print_report(report)
        print(f"wrote {args.out}")
        return 0
    if not args.checkpoint or not args.repository:
        raise ConfigError("fold needs CHECKPOINT and --repository DIR (or --onnx IN --out OUT)")
    from folding.export import build_entry

    result = build_entry(args.checkpoint, args.repository, args.name, args.version,
                         max_batch_size=args.max_batch_size, max_queue_delay_us=args.max_queue_delay_us,
                         verify=not args.no_verify, verify_options=_verify_options(args), force=args.force)
    _print_report(result.onnx_report)
    print(f"model: {result.version_dir}")
    if result.verification is not None:
        from folding.verify import summary_table

        print(summary_table(result.verification))
        return 0 if result.verification["passed"] else 1
    return 0


def _print_report(report) -> None:
    print(report.summary())
    for f in report.folded:
        print(f"  folded   {f.bn} -> {f.into} ({f.direction}, {f.producer_type})")
    for s in report.skipped:
        print(f"  skipped  {s.bn}: {s.reason}")
    for w in report.warnings:
        print(f"  warning  {w}")


# --- verify ----------------------------------------------------------------------------------------

def add_verify(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="check a folded repository entry against the unfolded model")
    p.add_argument("entry", nargs="?", help="REPO/NAME/VERSION written by `foldserve fold`")
    p.add_argument("--server", help="HOST:PORT of a running server (gRPC): verify what it serves")
    p.add_argument("--model", help="with --server: model name")
    p.add_argument("--json", action="store_true", help="print the JSON report instead of the table")
    _verify_flags(p)
    p.set_defaults(func=cmd_verify)


def cmd_verify(args: argparse.Namespace) -> int:
    if args.server:
        from folding.live import verify_live

        if not args.model or not args.entry:
            raise ConfigError("verify --server HOST:PORT needs --model NAME and the local entry REPO/NAME/VERSION "
                              "to compare against")
        report = verify_live(args.server, args.model, Path(args.entry), _verify_options(args))
        print(json.dumps(report, indent=2) if args.json else report["table"])
        return 0 if report["passed"] else 1
    if not args.entry:
        raise ConfigError("verify needs REPO/NAME/VERSION (or --server HOST:PORT --model NAME)")
    from folding.verify import summary_table, verify_entry

    report = verify_entry(args.entry, _verify_options(args))
    print(json.dumps(report, indent=2) if args.json else summary_table(report))
    return 0 if report["passed"] else 1


# --- pipeline --------------------------------------------------------------------------------------

def add_pipeline(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pipeline", help="train -> fold -> verify the default model into a repository")
    p.add_argument("--repository", default="model_repository")
    p.add_argument("--name", default="digits_resnet")
    p.add_argument("--arch", default="resnet")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--runs", default="runs", help="where training runs are written")
    p.set_defaults(func=cmd_pipeline)


def cmd_pipeline(args: argparse.Namespace) -> int:
    from folding.export import build_entry
    from folding.verify import summary_table
    from trainer.train import TrainConfig, train

    out = Path(args.runs) / args.name
    result = train(TrainConfig(arch=args.arch, dataset=args.dataset, epochs=args.epochs, out=str(out),
                               progress=sys.stderr.isatty()))
    print(f"checkpoint: {result.checkpoint}  val metrics: "
          f"{ {k: round(v, 4) for k, v in result.metrics.items() if k.startswith('val') and v is not None} }")
    entry = build_entry(result.checkpoint, args.repository, args.name, force=False)
    _print_report(entry.onnx_report)
    print(summary_table(entry.verification))
    print(f"model: {entry.version_dir}")
    return 0 if entry.verification["passed"] else 1


# --- serve -----------------------------------------------------------------------------------------

def add_serve(sub: argparse._SubParsersAction) -> None:
    """Every server setting is a flag (``--http-port``) and an environment variable (``FOLDSERVE_HTTP_PORT``)."""
    import typing

    from server.settings import Settings

    p = sub.add_parser("serve", help="serve a model repository over KServe v2 gRPC (:8001) and REST (:8000)")
    for name, field in Settings.model_fields.items():
        if name == "log_level":
            continue
        flag = "--" + name.replace("_", "-")
        help_ = field.description or ""
        ann = field.annotation
        origin = typing.get_origin(ann)
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        if ann is bool:
            p.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_)
        elif origin is list:
            p.add_argument(flag, dest=name, nargs="+", default=None, help=help_)
        elif origin is typing.Literal:
            p.add_argument(flag, dest=name, choices=list(typing.get_args(ann)), default=None, help=help_)
        else:
            base = args[0] if args else ann
            conv = {int: int, float: float}.get(base, str)
            p.add_argument(flag, dest=name, type=conv, default=None, help=help_)
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from server.main import run
    from server.settings import Settings

    overrides = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ConfigError(f"--{'-'.join(str(x) for x in first['loc']).replace('_', '-')}: {first['msg']}") from None
    if not settings.repository.is_dir():
        raise ConfigError(f"--repository {settings.repository}: no such directory (build one with `foldserve fold` "
                          f"or `make model`)")
    if bool(settings.tls_cert) != bool(settings.tls_key):
        raise ConfigError("--tls-cert and --tls-key go together")
    return run(settings)


# --- infer -----------------------------------------------------------------------------------------

def add_infer(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("infer", help="send an image or .npy/.npz to a running server and print the top classes")
    p.add_argument("file", help="an image (png/jpg/...), .npy, or .npz (first array, or --key)")
    p.add_argument("--url", default="127.0.0.1:8001", help="server address: HOST:PORT (gRPC) or http://HOST:PORT")
    p.add_argument("--model", required=True)
    p.add_argument("--version", default="")
    p.add_argument("--protocol", choices=("grpc", "http"), default=None, help="default: from --url")
    p.add_argument("--key", help="array name inside an .npz")
    p.add_argument("--top", type=int, default=3)
    p.add_argument("--token", help="bearer token, if the server requires one")
    p.add_argument("--scale", type=float, default=1.0,
                   help="images: multiply pixel values (0..255) by this, e.g. 0.0627 for the 0..16 digits range")
    p.set_defaults(func=cmd_infer)


def cmd_infer(args: argparse.Namespace) -> int:
    from server.client import infer_file

    for line in infer_file(args.url, args.model, args.file, version=args.version, protocol=args.protocol,
                           key=args.key, top=args.top, token=args.token, scale=args.scale):
        print(line)
    return 0


# --- bench -----------------------------------------------------------------------------------------

def add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmark the limits, the server and the baselines; JSON + Markdown")
    p.add_argument("--quick", action="store_true", help="fewer requests and points (under 5 minutes on 2 cores)")
    p.add_argument("--out", default="bench/results", help="directory for bench-*.json / .md and latest.*")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from bench.suite import markdown, run, _intkeys

    report = run(Path(args.out), quick=args.quick)
    print(markdown(_intkeys(report)))
    print(f"written to {args.out}/latest.json and latest.md ({report['meta']['wall_s']} s)")
    return 0


REGISTER: list[Callable[[argparse._SubParsersAction], None]] = [add_fold, add_verify, add_pipeline, add_serve,
                                                                 add_infer, add_bench]
