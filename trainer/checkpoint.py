"""The trainer's checkpoint format: what ``folding/`` reads to rebuild a model without guessing.

A checkpoint is a ``torch.save`` of a dict holding only tensors and plain Python values (so it loads
with ``weights_only=True``)::

    format          "foldserve.checkpoint"
    format_version  1
    arch            architecture name (trainer.models.ARCHITECTURES)
    arch_args       complete arguments of trainer.models.build_model (input_shape, num_classes, ...)
    task            "classification" or "denoising"
    model_state     state dict of build_model(arch, arch_args): Normalize buffers + network
    optimizer_state, scheduler_state, epoch, rng_state
    config          the resolved training configuration
    normalization   {"mean": [...], "std": [...]} per input channel
    class_names     list of label names
    metrics         last epoch's metrics
    dataset         {"name", "data", "seed", "val_fraction", "image_size"}: enough to reload the data

Writes are atomic (temp file + ``os.replace``): a crash never leaves a half-written checkpoint.
"""
from __future__ import annotations

import logging
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from foldserve.atomic import write_with
from foldserve.entry import sha256_file
from foldserve.errors import CheckpointError, ConfigError, NotACheckpoint, UnreadableCheckpoint
from foldserve.records import CheckpointMeta, RecordError, first_line

logger = logging.getLogger(__name__)

FORMAT = "foldserve.checkpoint"
FORMAT_VERSION = 1
REQUIRED = ("arch", "arch_args", "model_state", "task", "normalization", "class_names")


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    path = Path(path)
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, **payload}
    write_with(path, lambda tmp: torch.save(payload, tmp))
    logger.info("checkpoint written: %s (epoch %s)", path, payload.get("epoch"))
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load and validate a checkpoint; every problem is a :class:`CheckpointError` naming the file."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: no such file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError,
            AttributeError, TypeError) as exc:
        reason = _first_sentence(exc)
        raise UnreadableCheckpoint(f"checkpoint {path}: cannot be read as a torch checkpoint ({reason})",
                                   reason) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise NotACheckpoint(f"checkpoint {path}: not a foldserve checkpoint (no format marker "
                              f"{FORMAT!r}); write it with `foldserve train`")
    if ckpt.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path}: format version {ckpt.get('format_version')!r} is not "
                              f"supported (this foldserve reads version {FORMAT_VERSION})")
    missing = [k for k in REQUIRED if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {path}: missing fields {missing}")
    try:
        CheckpointMeta.of(ckpt, f"checkpoint {path}")
    except RecordError as exc:
        raise CheckpointError(str(exc)) from None
    return ckpt


def _first_sentence(exc: Exception, limit: int = 240) -> str:
    """The first sentence of an exception's message, without terminal colour codes, never cut mid-word."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", str(exc)).strip()
    if not text:
        return type(exc).__name__
    line = text.splitlines()[0].strip()
    m = re.search(r"(?<=[.!?])\s", line)
    sentence = line[:m.start()] if m else line
    detail = next((ln.strip() for ln in text.splitlines() if ln.strip().startswith("WeightsUnpickler error")), "")
    if detail:  # torch names what the pickle tried to load: the useful part
        sentence = f"{sentence} {detail.split('. ')[0].rstrip('.')}."
    if len(sentence) > limit:
        sentence = sentence[:limit].rsplit(" ", 1)[0] + " ..."
    return sentence


def model_from_checkpoint(ckpt: dict[str, Any]) -> torch.nn.Module:
    """Rebuild the eval-mode model from a loaded checkpoint."""
    from trainer.models import build_model

    meta = CheckpointMeta.of(ckpt)
    try:
        model = build_model(meta.arch, meta.arch_args)
    except ConfigError as exc:
        raise CheckpointError(f"checkpoint describes a model this foldserve cannot build: {exc}") from None
    try:
        model.load_state_dict(ckpt["model_state"])
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint weights do not fit architecture {meta.arch!r}: "
                              f"{first_line(exc)}") from None
    return model.eval()


def file_sha256(path: str | Path) -> str:
    return sha256_file(Path(path))
