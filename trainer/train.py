"""Train a BatchNorm network and write a checkpoint that the folding stage can rebuild.

Read top to bottom: configuration, data, model, optimiser and schedule, then the epoch loop
(``train_one_epoch``, ``evaluate``, ``save_checkpoint``), then precise BN and the final artifacts.

Runs on one process, or under ``torchrun --nproc-per-node N`` with DistributedDataParallel (gloo on CPU,
nccl on GPU). With ``sync_bn`` the BN layers are synchronised during training and saved as plain BN;
without it the running statistics are all-reduced before every checkpoint, so all ranks agree.
"""
from __future__ import annotations

import copy
import csv
import dataclasses
import io
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from foldserve import __version__
from foldserve.atomic import write_json, write_text, write_with
from foldserve.errors import CheckpointError, ConfigError
from trainer import bn_stats
from trainer.checkpoint import load_checkpoint, save_checkpoint
from trainer.data import Dataset, load_dataset
from trainer.models import arch_spec, build_model, resolve_arch_args

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Every training option; the resolved copy is saved in the checkpoint and as ``config.json``."""

    arch: str = "resnet"
    dataset: str = "digits"
    data: str | None = None          # path for --dataset npz/folder
    out: str = "runs/default"
    epochs: int = 30
    batch_size: int = 64
    optimizer: str = "sgd"           # sgd | adamw
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    bn_momentum: float | None = 0.1  # None: cumulative moving average
    bn_placement: str = "before"
    precise_bn: int = 0              # batches for the precise-BN recomputation (0: off)
    sync_bn: bool = False
    seed: int = 0
    val_fraction: float = 0.2
    image_size: int = 32
    noise_std: float = 0.5           # denoising tasks: input noise, in units of the data's std
    device: str = "auto"             # auto | cpu | cuda | cuda:N
    amp: bool = True                 # mixed precision (only on GPU)
    resume: bool = False
    arch_args: dict[str, Any] = field(default_factory=dict)
    progress: bool = True

    def validate(self) -> None:
        arch_spec(self.arch)
        if self.epochs < 1:
            raise ConfigError(f"TrainConfig.epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 2:
            raise ConfigError(f"TrainConfig.batch_size must be >= 2 (BatchNorm needs 2 samples), got {self.batch_size}")
        if self.optimizer not in ("sgd", "adamw"):
            raise ConfigError(f"TrainConfig.optimizer must be 'sgd' or 'adamw', got {self.optimizer!r}")
        if self.lr <= 0:
            raise ConfigError(f"TrainConfig.lr must be > 0, got {self.lr}")
        if self.bn_momentum is not None and not 0.0 < self.bn_momentum <= 1.0:
            raise ConfigError(f"TrainConfig.bn_momentum must be in (0, 1] or 'cumulative', got {self.bn_momentum}")
        if self.precise_bn < 0:
            raise ConfigError(f"TrainConfig.precise_bn must be >= 0, got {self.precise_bn}")
        _check_writable_dir(Path(self.out))


def _check_writable_dir(out: Path) -> None:
    """--out must be a directory this process can write (checked before any training time is spent)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"TrainConfig.out {out}: exists and is not a directory; choose a directory for the run")
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"TrainConfig.out {out}: {probe} is a file, not a directory; choose a directory for the run")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"TrainConfig.out {out}: {probe} is not writable; choose a directory you can write")


@dataclass
class TrainResult:
    checkpoint: Path
    metrics: dict[str, Any]
    wall_s: float
    model: nn.Module | None = None  # the trained model (plain BN), in eval mode


# --- distributed --------------------------------------------------------------------------------

@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: torch.device) -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"TrainConfig.device {name}: CUDA is not available on this machine")
    return torch.device(name)


# --- data iteration -----------------------------------------------------------------------------

def iterate_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, *, shuffle: bool, seed: int = 0,
                    rank: int = 0, world: int = 1,
                    drop_last: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of one rank's share of the data (a strided slice of one permutation, as DistributedSampler)."""
    n = len(x)
    if shuffle:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    else:
        order = torch.arange(n)
    if world > 1:
        per_rank = math.ceil(n / world)
        order = torch.cat([order, order[: per_rank * world - n]])[rank::world]
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        if len(idx) < 2 or (drop_last and len(idx) < batch_size):
            continue
        yield x[idx], y[idx]


def make_inputs(task: str, xb: torch.Tensor, yb: torch.Tensor, ds_std: torch.Tensor, noise_std: float,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(model input, target) for a batch: labels for classification, the clean image for denoising."""
    if task == "denoising":
        noise = torch.randn(xb.shape, generator=generator).to(xb.device) * (noise_std * ds_std)
        return xb + noise, xb
    return xb, yb


# --- one epoch, evaluation -----------------------------------------------------------------------

def loss_fn(task: str, model: nn.Module, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if task == "denoising":
        norm = model.module[0] if isinstance(model, nn.parallel.DistributedDataParallel) else model[0]
        return F.mse_loss(out, norm(target))  # the decoder predicts the normalised clean image
    return F.cross_entropy(out, target)


def train_one_epoch(model: nn.Module, task: str, ds: Dataset, tensors: dict[str, torch.Tensor],
                    optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any, cfg: TrainConfig,
                    epoch: int, dist_info: DistInfo, device: torch.device) -> dict[str, float]:
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    noise_gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
    batches = list(iterate_batches(tensors["x_train"], tensors["y_train"], cfg.batch_size, shuffle=True,
                                   seed=cfg.seed * 1000 + epoch, rank=dist_info.rank, world=dist_info.world,
                                   drop_last=len(tensors["x_train"]) > cfg.batch_size * dist_info.world))
    use_amp = scaler is not None
    for i, (xb, yb) in enumerate(batches):
        inputs, target = make_inputs(task, xb, yb, tensors["std"], cfg.noise_std, noise_gen)
        inputs, target = inputs.to(device, non_blocking=True), target.to(device, non_blocking=True)
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
            out = model(inputs)
            loss = loss_fn(task, model, out.float(), target)
        optimizer.zero_grad(set_to_none=True)
        if use_amp:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        scheduler.step()
        total_loss += loss.item() * len(xb)
        seen += len(xb)
        if task == "classification":
            correct += int((out.argmax(1) == target).sum())
        if cfg.progress and dist_info.main:
            _progress(epoch, cfg.epochs, i + 1, len(batches), total_loss / seen,
                      correct / seen if task == "classification" else None)
    if cfg.progress and dist_info.main:
        sys.stderr.write("\n")
    return {"train_loss": total_loss / max(seen, 1),
            "train_acc": correct / max(seen, 1) if task == "classification" else None}


def _progress(epoch: int, epochs: int, step: int, steps: int, loss: float, acc: float | None) -> None:
    width = 24
    filled = int(width * step / max(steps, 1))
    bar = "#" * filled + "." * (width - filled)
    acc_s = f" acc {acc:.3f}" if acc is not None else ""
    sys.stderr.write(f"\repoch {epoch + 1}/{epochs} [{bar}] {step}/{steps} loss {loss:.4f}{acc_s}")
    sys.stderr.flush()


@torch.no_grad()
def evaluate(model: nn.Module, task: str, tensors: dict[str, torch.Tensor], cfg: TrainConfig,
             device: torch.device) -> dict[str, float | None]:
    model.eval()
    total_loss, correct, seen = 0.0, 0, 0
    gen = torch.Generator().manual_seed(12345)
    for xb, yb in iterate_batches(tensors["x_val"], tensors["y_val"], 256, shuffle=False):
        inputs, target = make_inputs(task, xb, yb, tensors["std"], cfg.noise_std, gen)
        inputs, target = inputs.to(device), target.to(device)
        out = model(inputs).float()
        total_loss += loss_fn(task, model, out, target).item() * len(xb)
        seen += len(xb)
        if task == "classification":
            correct += int((out.argmax(1) == target).sum())
    return {"val_loss": total_loss / max(seen, 1),
            "val_acc": correct / max(seen, 1) if task == "classification" else None}


# --- optimiser ---------------------------------------------------------------------------------

def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on BN parameters and biases (1-D tensors): decaying them only hurts."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(total_steps: int, warmup_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(warmup_steps, 1)
        progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return factor


# --- artifacts ---------------------------------------------------------------------------------

def _plain_model(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def checkpoint_payload(model: nn.Module, optimizer, scheduler, scaler, epoch: int, cfg: TrainConfig,
                       arch_args: dict[str, Any], ds: Dataset, history: list[dict[str, Any]]) -> dict[str, Any]:
    plain = _plain_model(model)
    if cfg.sync_bn:  # saved checkpoints hold plain BN; convert a copy, training goes on with SyncBN
        plain = bn_stats.revert_sync_batchnorm(copy.deepcopy(plain))
    return {
        "arch": cfg.arch,
        "arch_args": arch_args,
        "task": arch_spec(cfg.arch).task,
        "model_state": {k: v.detach().cpu().clone() for k, v in plain.state_dict().items()},
        "optimizer_state": optimizer.state_dict(),
        "scheduler_state": scheduler.state_dict(),
        "scaler_state": scaler.state_dict() if scaler is not None else None,
        "epoch": epoch,
        "config": dataclasses.asdict(cfg),
        "normalization": {"mean": ds.mean, "std": ds.std},
        "input_range": [float(ds.x_train.min()), float(ds.x_train.max())] if ds.x_train.size else None,
        "class_names": ds.class_names,
        "input_shape": ds.sample_shape,
        "metrics": history[-1] if history else {},
        "history": history,
        "dataset": {"name": cfg.dataset, "data": cfg.data, "seed": cfg.seed, "val_fraction": cfg.val_fraction,
                    "image_size": cfg.image_size},
        "rng_state": torch.get_rng_state(),
        "foldserve_version": __version__,
    }


def write_metrics(out: Path, history: list[dict[str, Any]]) -> None:
    write_json(out / "metrics.json", history)
    buf = io.StringIO()
    keys = list(dict.fromkeys(k for row in history for k in row))  # later rows may add columns (precise BN)
    writer = csv.DictWriter(buf, fieldnames=keys, restval="")
    writer.writeheader()
    writer.writerows(history)
    write_text(out / "metrics.csv", buf.getvalue())


def plot_curves(out: Path, history: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    axes[0].plot(epochs, [h["train_loss"] for h in history], label="train")
    axes[0].plot(epochs, [h["val_loss"] for h in history], label="val")
    axes[0].set_xlabel("epoch"), axes[0].set_ylabel("loss"), axes[0].legend()
    if history and history[0].get("val_acc") is not None:
        axes[1].plot(epochs, [h["train_acc"] for h in history], label="train")
        axes[1].plot(epochs, [h["val_acc"] for h in history], label="val")
        axes[1].set_ylabel("accuracy"), axes[1].legend()
    else:
        axes[1].set_axis_off()
    axes[1].set_xlabel("epoch")
    fig.tight_layout()
    write_with(out / "curves.png", lambda tmp: fig.savefig(tmp, format="png", dpi=90))
    plt.close(fig)


# --- the run ---------------------------------------------------------------------------------

def train(cfg: TrainConfig) -> TrainResult:
    """Train per ``cfg``; returns where the checkpoint is. Only rank 0 writes files."""
    t0 = time.perf_counter()
    cfg.validate()
    spec = arch_spec(cfg.arch)
    out = Path(cfg.out)
    ckpt_path = out / "checkpoint.pt"

    device = resolve_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")))
    dist_info = setup_distributed(device)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)

    ds = load_dataset(cfg.dataset, data=cfg.data, seed=cfg.seed, val_fraction=cfg.val_fraction,
                      image_size=cfg.image_size, input_kind=spec.input_kind)
    num_classes = len(ds.class_names)
    arch_args = resolve_arch_args(cfg.arch, ds.sample_shape, num_classes, cfg.bn_placement, cfg.arch_args)
    if spec.task == "classification" and num_classes < 2:
        raise ConfigError("classification needs at least 2 classes")

    model = build_model(cfg.arch, arch_args)
    norm = model[0]
    norm.mean.copy_(torch.tensor(ds.mean).view_as(norm.mean))
    norm.std.copy_(torch.tensor(ds.std).view_as(norm.std))
    bn_stats.set_bn_momentum(model, cfg.bn_momentum)
    model.to(device)

    tensors = {"x_train": torch.from_numpy(ds.x_train), "y_train": torch.from_numpy(ds.y_train),
               "x_val": torch.from_numpy(ds.x_val), "y_val": torch.from_numpy(ds.y_val),
               "std": torch.tensor(ds.std, dtype=torch.float32).view([1, -1] + [1] * (ds.x_train.ndim - 2))}

    groups = param_groups(model, cfg.weight_decay)
    if cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    else:
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
    steps_per_epoch = max(1, len(ds.x_train) // (cfg.batch_size * dist_info.world))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(steps_per_epoch * cfg.epochs, int(cfg.warmup_epochs * steps_per_epoch)))
    scaler = torch.amp.GradScaler("cuda") if (cfg.amp and device.type == "cuda") else None

    start_epoch, history = 0, []
    if cfg.resume:
        start_epoch, history = _resume(ckpt_path, cfg, arch_args, model, optimizer, scheduler, scaler)

    if dist_info.enabled:
        if cfg.sync_bn:
            model = bn_stats.convert_sync_batchnorm(model, on_gpu=device.type == "cuda")
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    if dist_info.main:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", dataclasses.asdict(cfg))
        logger.info("config: %s", json.dumps(dataclasses.asdict(cfg), sort_keys=True))

    for epoch in range(start_epoch, cfg.epochs):
        train_metrics = train_one_epoch(model, spec.task, ds, tensors, optimizer, scheduler, scaler, cfg,
                                        epoch, dist_info, device)
        if dist_info.enabled and not cfg.sync_bn:
            bn_stats.all_reduce_bn_stats(_plain_model(model))
        val_metrics = evaluate(model, spec.task, tensors, cfg, device)
        history.append({"epoch": epoch + 1, **train_metrics, **val_metrics,
                        "lr": optimizer.param_groups[0]["lr"], "time_s": round(time.perf_counter() - t0, 3)})
        logger.info("epoch %d/%d %s", epoch + 1, cfg.epochs,
                    " ".join(f"{k}={v:.4f}" for k, v in history[-1].items() if isinstance(v, float)))
        if dist_info.main:
            save_checkpoint(ckpt_path, checkpoint_payload(model, optimizer, scheduler, scaler, epoch + 1, cfg,
                                                          arch_args, ds, history))
            write_metrics(out, history)
        _barrier(dist_info)

    if cfg.precise_bn:
        xs = tensors["x_train"].to(device)
        batches = (xb for xb, _ in iterate_batches(xs, tensors["y_train"], cfg.batch_size, shuffle=False,
                                                   rank=dist_info.rank, world=dist_info.world))
        bn_stats.recompute_precise_bn(_plain_model(model), batches, cfg.precise_bn, all_reduce=dist_info.enabled)
        history[-1].update({f"precise_bn_{k}": v for k, v in evaluate(model, spec.task, tensors, cfg, device).items()})
        if dist_info.main:
            save_checkpoint(ckpt_path, checkpoint_payload(model, optimizer, scheduler, scaler, cfg.epochs, cfg,
                                                          arch_args, ds, history))
            write_metrics(out, history)
        _barrier(dist_info)

    logger.info("rank %d running-statistics digest %s", dist_info.rank, bn_stats.stats_digest(_plain_model(model)))
    if dist_info.main and history:
        try:
            plot_curves(out, history)
        except Exception:  # a plot is a convenience; never fail a finished training run for it
            logger.exception("could not draw the training curves")
    if dist_info.enabled:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    final = _plain_model(model)
    if cfg.sync_bn:
        final = bn_stats.revert_sync_batchnorm(final)
    return TrainResult(ckpt_path, history[-1] if history else {}, time.perf_counter() - t0, final.cpu().eval())


def _barrier(dist_info: DistInfo) -> None:
    if dist_info.enabled:
        import torch.distributed as dist

        dist.barrier()


def _resume(path: Path, cfg: TrainConfig, arch_args: dict[str, Any], model: nn.Module, optimizer, scheduler,
            scaler) -> tuple[int, list[dict[str, Any]]]:
    if not path.is_file():
        raise CheckpointError(f"TrainConfig.resume: no checkpoint at {path} to resume from")
    ckpt = load_checkpoint(path)
    if ckpt["arch"] != cfg.arch or ckpt["arch_args"] != arch_args:
        raise CheckpointError(f"TrainConfig.resume: {path} holds a {ckpt['arch']!r} model with arguments "
                              f"{ckpt['arch_args']}, not the requested {cfg.arch!r} {arch_args}")
    model.load_state_dict(ckpt["model_state"])
    optimizer.load_state_dict(ckpt["optimizer_state"])
    scheduler.load_state_dict(ckpt["scheduler_state"])
    if scaler is not None and ckpt.get("scaler_state"):
        scaler.load_state_dict(ckpt["scaler_state"])
    if "rng_state" in ckpt:
        torch.set_rng_state(ckpt["rng_state"])
    epoch = int(ckpt.get("epoch", 0))
    logger.info("resuming from %s at epoch %d", path, epoch)
    return epoch, list(ckpt.get("history", []))
