"""Datasets for the trainer: scikit-learn's bundled digits (default), synthetic, ``.npz`` and image folders.

Every source becomes a :class:`Dataset` of float32 arrays ``x`` (N, *sample_shape) and integer labels
``y``, split deterministically into train and validation by the seed. Normalisation statistics are
computed on the training split only.
"""
from __future__ import annotations

import logging
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from foldserve.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

DATASETS = ("digits", "digits32", "synthetic", "npz", "folder")
BUILTIN = ("digits", "digits32", "synthetic")   # need no --data: reloadable anywhere (verification, calibration)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


@dataclass
class Dataset:
    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    class_names: list[str]
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)

    @property
    def sample_shape(self) -> list[int]:
        return list(self.x_train.shape[1:])


def _split(x: np.ndarray, y: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, ...]:
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"TrainConfig.val_fraction must be in (0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    n_val = max(1, round(len(x) * val_fraction))
    if len(x) - n_val < 2:
        raise DataError(f"only {len(x)} samples: too few to split into training and validation sets")
    val, train = order[:n_val], order[n_val:]
    return x[train], y[train], x[val], y[val]


def _digits() -> tuple[np.ndarray, np.ndarray, list[str]]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = d.images.astype(np.float32)[:, None, :, :]  # (N, 1, 8, 8), pixel values 0..16
    return x, d.target.astype(np.int64), [str(int(t)) for t in d.target_names]


def _digits32(seed: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The digits as CIFAR-shaped 3x32x32 colour images: each 8x8 digit upsampled (bilinear, x4), drawn in a
    random colour on a random dark background with a little noise; pixel values 0..255."""
    import torch
    import torch.nn.functional as F

    x, y, names = _digits()
    rng = np.random.default_rng(seed + 32)
    up = F.interpolate(torch.from_numpy(x / 16.0), size=(32, 32), mode="bilinear", align_corners=False).numpy()
    ink = rng.uniform(0.5, 1.0, size=(len(x), 3, 1, 1))
    background = rng.uniform(0.0, 0.3, size=(len(x), 3, 1, 1))
    img = background + (ink - background) * up + rng.normal(0.0, 0.03, size=(len(x), 3, 32, 32))
    return (np.clip(img, 0.0, 1.0) * 255.0).astype(np.float32), y, names


def _synthetic(seed: int, n: int = 1200, classes: int = 10, shape: tuple[int, ...] = (1, 8, 8)):
    """Class templates plus noise: learnable in a few epochs, for quick tests."""
    rng = np.random.default_rng(seed + 1)
    templates = rng.normal(0.0, 1.0, size=(classes, *shape)).astype(np.float32)
    y = rng.integers(0, classes, size=n)
    x = templates[y] * 3.0 + 5.0 + rng.normal(0.0, 1.0, size=(n, *shape)).astype(np.float32)
    return x.astype(np.float32), y.astype(np.int64), [f"class_{i}" for i in range(classes)]


def _npz(path: Path):
    if not path.is_file():
        raise DataError(f"TrainConfig.data {path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as f:
            if "x" not in f.files or "y" not in f.files:
                raise DataError(f"TrainConfig.data {path}: an .npz needs arrays 'x' and 'y'; it has {sorted(f.files)}")
            x, y = np.asarray(f["x"]), np.asarray(f["y"])
            names = [str(s) for s in f["class_names"]] if "class_names" in f.files else None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"TrainConfig.data {path}: not a readable .npz file ({exc})") from None
    if x.ndim < 2:
        raise DataError(f"TrainConfig.data {path}: 'x' must be (N, ...) with at least one feature axis; got shape "
                        f"{x.shape}")
    if y.ndim != 1 or len(y) != len(x):
        raise DataError(f"TrainConfig.data {path}: 'y' must be a 1-D array of {len(x)} labels; got shape {y.shape}")
    if not np.issubdtype(x.dtype, np.number) or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"TrainConfig.data {path}: 'x' must be numeric and 'y' integer; got {x.dtype} and {y.dtype}")
    if not np.isfinite(x).all():
        raise DataError(f"TrainConfig.data {path}: 'x' contains NaN or Inf")
    if y.min() < 0:
        raise DataError(f"TrainConfig.data {path}: labels must be >= 0; found {int(y.min())}")
    n_classes = int(y.max()) + 1
    names = names or [str(i) for i in range(n_classes)]
    if len(names) < n_classes:
        raise DataError(f"TrainConfig.data {path}: {len(names)} class_names for labels up to {n_classes - 1}")
    return x.astype(np.float32), y.astype(np.int64), names


def _folder(path: Path, image_size: int):
    from PIL import Image, UnidentifiedImageError

    if not path.is_dir():
        raise DataError(f"TrainConfig.data {path}: not a directory (expected one sub-folder of images per class)")
    classes = sorted(p.name for p in path.iterdir() if p.is_dir())
    if len(classes) < 2:
        raise DataError(f"TrainConfig.data {path}: found {len(classes)} class folders; need at least 2")
    xs, ys = [], []
    mode = None
    for label, cls in enumerate(classes):
        files = sorted(p for p in (path / cls).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"TrainConfig.data {path}: class folder {cls!r} has no images "
                            f"({', '.join(sorted(IMAGE_SUFFIXES))})")
        for f in files:
            try:
                with Image.open(f) as im:
                    if mode is None:
                        mode = "L" if im.mode in ("L", "1", "I;16", "I") else "RGB"
                    im = im.convert(mode).resize((image_size, image_size), Image.BILINEAR)
                    arr = np.asarray(im, dtype=np.float32)
            except (UnidentifiedImageError, OSError) as exc:
                raise DataError(f"TrainConfig.data {path}: cannot read image {f} ({exc})") from None
            xs.append(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
            ys.append(label)
    return np.stack(xs), np.asarray(ys, dtype=np.int64), classes


def load_dataset(name: str, *, data: str | None = None, seed: int = 0, val_fraction: float = 0.2,
                 image_size: int = 32, input_kind: str = "image") -> Dataset:
    """Load a dataset by name and shape its samples for an architecture's ``input_kind``."""
    if name == "digits":
        x, y, names = _digits()
    elif name == "digits32":
        x, y, names = _digits32(seed)
    elif name == "synthetic":
        x, y, names = _synthetic(seed)
    elif name in ("npz", "folder"):
        if not data:
            raise ConfigError(f"TrainConfig.dataset {name} needs TrainConfig.data PATH")
        x, y, names = _npz(Path(data)) if name == "npz" else _folder(Path(data), image_size)
    else:
        raise ConfigError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")

    x = _shape_for(x, input_kind, name)
    x_tr, y_tr, x_va, y_va = _split(x, y, val_fraction, seed)
    axes = (0,) + tuple(range(2, x.ndim))
    mean = x_tr.mean(axis=axes, dtype=np.float64)
    std = x_tr.std(axis=axes, dtype=np.float64)
    std = np.where(std < 1e-6, 1.0, std)
    logger.info("dataset %s: %d train / %d val samples of shape %s, %d classes",
                name, len(x_tr), len(x_va), list(x.shape[1:]), len(names))
    return Dataset(name, x_tr, y_tr, x_va, y_va, names, [float(m) for m in np.atleast_1d(mean)],
                   [float(s) for s in np.atleast_1d(std)])


def _shape_for(x: np.ndarray, input_kind: str, name: str) -> np.ndarray:
    if input_kind == "image":
        if x.ndim == 3:  # (N, H, W) grayscale
            x = x[:, None]
        if x.ndim != 4:
            raise DataError(f"dataset {name!r}: this architecture takes images (N, C, H, W); got {list(x.shape)}")
    elif input_kind == "sequence":
        if x.ndim == 2:
            x = x[:, None, :]
        elif x.ndim == 4:  # images read row by row as one long sequence
            x = x.reshape(x.shape[0], x.shape[1], -1)
        if x.ndim != 3:
            raise DataError(f"dataset {name!r}: this architecture takes sequences (N, C, L); got {list(x.shape)}")
    return np.ascontiguousarray(x, dtype=np.float32)
