"""``foldserve train``: train a BatchNorm network and write a checkpoint (see trainer/)."""
from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from typing import Any

from foldserve.errors import ConfigError

REQUIRES = ("torch", "sklearn", "matplotlib")


def _parse_kv(items: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--arch-arg {item!r}: expected KEY=VALUE (e.g. width=32)")
        key, value = item.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _bn_momentum(value: str) -> float | None:
    if value.lower() in ("cumulative", "none"):
        return None
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1] or 'cumulative', got {value!r}") from None


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a BatchNorm network and write DIR/checkpoint.pt",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--arch", default="resnet", help="architecture name (see --list-archs)")
    p.add_argument("--list-archs", action="store_true", help="list the architectures and exit")
    p.add_argument("--dataset", default="digits", help="digits | digits32 (3x32x32 colour) | synthetic | npz | folder")
    p.add_argument("--data", help="path for --dataset npz (arrays x, y) or folder (one sub-folder per class)")
    p.add_argument("--out", default="runs/default", help="output directory")
    p.add_argument("--epochs", type=int, default=30, help="passes over the training split")
    p.add_argument("--batch-size", type=int, default=64, help="samples per step (at least 2: BatchNorm)")
    p.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd", help="the optimiser")
    p.add_argument("--lr", type=float, default=None, help="default: 0.1 for sgd, 3e-3 for adamw")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="not applied to BN and bias parameters")
    p.add_argument("--warmup-epochs", type=float, default=1.0, help="linear warm-up before the cosine schedule")
    p.add_argument("--bn-momentum", type=_bn_momentum, default=0.1,
                   help="BN running-average momentum, or 'cumulative' for an equal-weight average")
    p.add_argument("--bn-placement", choices=("before", "after"), default="before",
                   help="BN before the activation (BN paper) or after it")
    p.add_argument("--precise-bn", type=int, default=0, metavar="N",
                   help="after training, recompute BN statistics exactly over N batches")
    p.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm under torchrun (saved as plain BN)")
    p.add_argument("--seed", type=int, default=0, help="weights, data split and order")
    p.add_argument("--val-fraction", type=float, default=0.2, help="held out for validation")
    p.add_argument("--image-size", type=int, default=32, help="--dataset folder: images are resized to this")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--no-amp", action="store_true", help="disable mixed precision on GPU")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--arch-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="architecture size knob, e.g. --arch-arg width=32 --arch-arg blocks=2")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=run, options={o: a.dest for a in p._actions for o in a.option_strings})


#: what a resumed run may change; everything else (architecture, data, split, batch, optimiser) is the run's own
RESUMABLE = {"epochs", "device", "amp", "progress", "precise_bn"}


def _flag_config(args: argparse.Namespace) -> dict[str, Any]:
    """The flags as TrainConfig fields."""
    lr = args.lr if args.lr is not None else (0.1 if args.optimizer == "sgd" else 3e-3)
    return dict(arch=args.arch, dataset=args.dataset, data=args.data, out=args.out, epochs=args.epochs,
                batch_size=args.batch_size, optimizer=args.optimizer, lr=lr, weight_decay=args.weight_decay,
                warmup_epochs=args.warmup_epochs, bn_momentum=args.bn_momentum, bn_placement=args.bn_placement,
                precise_bn=args.precise_bn, sync_bn=args.sync_bn, seed=args.seed, val_fraction=args.val_fraction,
                image_size=args.image_size, device=args.device, amp=not args.no_amp, resume=args.resume,
                arch_args=_parse_kv(args.arch_arg), progress=not args.no_progress)


def resumed_config(args: argparse.Namespace) -> dict[str, Any]:
    """``--resume``: the run's own configuration (OUT/config.json), with the flags given on this command line where a
    resumed run may change them (more epochs, another device); a flag that would change what was trained is one
    error naming the difference, before any work. Without a config.json the flags are taken as they are (the
    checkpoint is then what refuses a mismatch)."""
    from pathlib import Path

    path = Path(args.out) / "config.json"
    flags = _flag_config(args)
    if not path.is_file():
        return flags
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--resume: {path} cannot be read ({exc})") from None
    fields_of = {"no_amp": "amp", "no_progress": "progress", "arch_arg": "arch_args"}     # flag dest -> field
    words = [w.split("=", 1)[0] for w in getattr(args, "argv", [])]
    named = {fields_of.get(args.options[w], args.options[w]) for w in words if w in args.options}
    given = {k: v for k, v in flags.items() if k in named and k not in ("out", "resume")}
    changed = {k: v for k, v in given.items() if k in saved and saved[k] != v}
    refused = sorted(k for k in changed if k not in RESUMABLE)
    if refused:
        had = ", ".join(f"--{k.replace('_', '-')} {saved[k]!r}" for k in refused)
        asked = ", ".join(f"--{k.replace('_', '-')} {changed[k]!r}" for k in refused)
        raise ConfigError(f"--resume: {args.out} holds a {saved.get('arch')!r} model trained with {had}; the flags "
                          f"ask for {asked}: a resumed run keeps what it was trained with (give another --out for a "
                          f"new run)")
    from dataclasses import fields

    from trainer.train import TrainConfig

    known = {k: v for k, v in saved.items() if k in {f.name for f in fields(TrainConfig)}}
    return {**known, **changed, "out": args.out, "resume": True}


def list_archs() -> list[str]:
    from trainer.models import ARCHITECTURES

    return [f"{name:<18} {spec.task:<15} {spec.input_kind:<9} {spec.doc}; defaults {spec.defaults}"
            for name, spec in ARCHITECTURES.items()]


def run(args: argparse.Namespace) -> int:
    if args.list_archs:
        print("\n".join(list_archs()))
        return 0
    from trainer.train import TrainConfig, train

    cfg = TrainConfig(**(resumed_config(args) if args.resume else _flag_config(args)))
    result = train(cfg)
    metrics = {k: v for k, v in result.metrics.items() if v is not None}
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"checkpoint: {result.checkpoint}")
        print(f"metrics: {json.dumps(metrics, sort_keys=True)}")
        print(f"wall time: {result.wall_s:.1f} s")
    return 0
