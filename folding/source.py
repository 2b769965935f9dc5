"""The source model of a repository entry: its checkpoint, the model rebuilt from it, and the inputs the
verifier feeds it (random draws matching the saved normalisation, and the real validation samples)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from foldserve.datatypes import lookup
from foldserve.entry import SOURCE_FILE
from foldserve.errors import CheckpointError
from trainer.checkpoint import load_checkpoint

logger = logging.getLogger(__name__)


def load_source(version_dir: Path) -> dict[str, Any]:
    try:
        return load_checkpoint(Path(version_dir) / SOURCE_FILE)
    except CheckpointError as exc:
        raise CheckpointError(f"{Path(version_dir).name}/{SOURCE_FILE}: {exc}") from None


def example_input(ckpt: dict[str, Any], batch: int, seed: int = 0) -> torch.Tensor:
    """Random inputs matching the saved normalisation: per channel mean + std * N(0, 1)."""
    shape = list(ckpt["arch_args"]["input_shape"])
    g = torch.Generator().manual_seed(seed)
    x = torch.randn([batch, *shape], generator=g, dtype=torch.float64)
    norm = ckpt["normalization"]
    view = [1, -1] + [1] * (len(shape) - 1)
    mean = torch.tensor(norm["mean"], dtype=torch.float64).view(view)
    std = torch.tensor(norm["std"], dtype=torch.float64).view(view)
    return (x * std + mean).to(torch.float32)


def model_input_dtype(model: onnx.ModelProto) -> np.dtype:
    """The numpy dtype of the model's first input (an unknown type is an error, not float32)."""
    t = model.graph.input[0]
    return lookup(t.type.tensor_type.elem_type, "onnx", f"model input {t.name!r}").numpy


def validation_set(ckpt: dict[str, Any], limit: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Up to ``limit`` validation samples of the data the checkpoint was trained on, when they can be reloaded."""
    ds_info = ckpt.get("dataset") or {}
    if not (ds_info.get("name") in ("digits", "synthetic") or (ds_info.get("data") and Path(ds_info["data"]).exists())):
        return None
    try:
        from trainer.data import load_dataset
        from trainer.models import arch_spec

        ds = load_dataset(ds_info["name"], data=ds_info.get("data"), seed=ds_info.get("seed", 0),
                          val_fraction=ds_info.get("val_fraction", 0.2), image_size=ds_info.get("image_size", 32),
                          input_kind=arch_spec(ckpt["arch"]).input_kind)
    except Exception as exc:  # the random sets still verify the fold
        logger.warning("validation data not available for verification: %s", exc)
        return None
    n = min(len(ds.x_val), limit)
    return ds.x_val[:n], ds.y_val[:n]


def input_sets(ckpt: dict[str, Any], batch_sizes: tuple[int, ...], seed: int = 0,
               max_validation: int = 512) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    sets: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
    for i, b in enumerate(batch_sizes):
        sets[f"random_b{b}"] = (example_input(ckpt, b, seed=seed + i).numpy(), None)
    val = validation_set(ckpt, max_validation)
    if val is not None:
        sets["validation"] = val
    return sets
