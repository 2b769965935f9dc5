"""The source model of a repository entry, as the verifier reruns it: the unfolded truth, the other unfolded
candidates, and the inputs (random draws in the raw input space, and real samples when there are some).

``folding.kinds.open_source(version_dir)`` reads ``source.json`` (:class:`foldserve.records.SourceRecord`)
and has the source's kind return one of:

* :class:`CheckpointSource`: the trainer's model rebuilt from ``source.pt``; truth in float64, plus the
  model in float32, its torch.fx fold and ``reference.onnx`` as candidates;
* :class:`ProgramSource`: a ``torch.export`` program or TorchScript module; truth in float64 where the
  program runs in it (else float32, recorded), plus the program in float32 and ``reference.onnx``;
* :class:`OnnxSource`: an ONNX file; ``reference.onnx`` (the file with the declared normalisation) run by
  onnxruntime with optimisations off is the truth.
"""
from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from foldserve.datatypes import lookup
from foldserve.entry import REFERENCE_FILE, SOURCE_FILE
from foldserve.errors import CheckpointError, DataError
from foldserve.records import CheckpointMeta, SourceRecord, first_line
from trainer.checkpoint import load_checkpoint
from trainer.data import BUILTIN

logger = logging.getLogger(__name__)

Run = Callable[[np.ndarray], np.ndarray]
InputSets = dict[str, tuple[np.ndarray, "np.ndarray | None"]]


def ort_session(path_or_bytes: Any, optimization: str = "all", provider: str = "cpu"):
    """An onnxruntime session built the way the server builds them (for references and tools)."""
    from server.core.runtime import OnnxModel

    return OnnxModel(path_or_bytes, provider=provider, optimization=optimization, io_binding=False).session


def load_source(version_dir: Path) -> dict[str, Any]:
    try:
        return load_checkpoint(Path(version_dir) / SOURCE_FILE)
    except CheckpointError as exc:
        raise CheckpointError(f"{Path(version_dir).name}/{SOURCE_FILE}: {exc}") from None


def example_input(meta: CheckpointMeta, batch: int, seed: int = 0) -> torch.Tensor:
    """Random inputs matching the saved normalisation: per channel mean + std * N(0, 1)."""
    return torch.from_numpy(random_input(meta.input_shape, meta.normalization, batch, seed, np.float32))


def random_input(shape: list[int], norm: dict[str, list[float]] | None, batch: int, seed: int,
                 dtype: Any) -> np.ndarray:
    """[batch, *shape] draws of mean + std * N(0, 1) per channel (N(0, 1) without a normalisation)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn([batch, *shape], generator=g, dtype=torch.float64).numpy()
    if norm:
        view = [1, -1] + [1] * (len(shape) - 1)
        x = x * np.asarray(norm["std"], np.float64).reshape(view) + np.asarray(norm["mean"], np.float64).reshape(view)
    return x.astype(dtype)


def model_input_dtype(model: onnx.ModelProto) -> np.dtype:
    """The numpy dtype of the model's first input (an unknown type is an error, not float32)."""
    t = model.graph.input[0]
    return lookup(t.type.tensor_type.elem_type, "onnx", f"model input {t.name!r}").numpy


def load_samples(path: str | Path, input_shape: list[int], limit: int,
                 dtype: Any) -> tuple[np.ndarray, np.ndarray | None]:
    """``--data FILE.npz``: array ``x`` [N, *input_shape] and optional ``y`` [N] (class indices)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            if "x" not in z.files:
                raise DataError(f"--data {path.name}: no array named 'x' (it has {z.files}); expected x [N, "
                                f"{', '.join(map(str, input_shape))}] and optional y [N]")
            x, y = z["x"], (z["y"] if "y" in z.files else None)
    except DataError:
        raise
    except Exception as exc:  # missing, not an npz, pickled objects
        raise DataError(f"--data {path.name}: not a readable .npz of arrays ({type(exc).__name__}: {exc})") from None
    if x.ndim != 1 + len(input_shape) or list(x.shape[1:]) != list(input_shape) or len(x) == 0:
        raise DataError(f"--data {path.name}: x has shape {list(x.shape)}; the model takes [N, "
                        f"{', '.join(map(str, input_shape))}]")
    if y is not None and (y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer)):
        raise DataError(f"--data {path.name}: y must be {len(x)} integer class indices, got {y.dtype} {list(y.shape)}")
    n = min(len(x), limit)
    return x[:n].astype(dtype), (None if y is None else y[:n].astype(np.int64))


def _reload_dataset(meta: CheckpointMeta) -> Any:
    """The dataset the checkpoint was trained on, when it can be reloaded here (else None)."""
    ds = meta.dataset
    if not (ds.name in BUILTIN or (ds.data and Path(ds.data).exists())):
        return None
    from trainer.data import load_dataset
    from trainer.models import arch_spec

    return load_dataset(ds.name, data=ds.data, seed=ds.seed, val_fraction=ds.val_fraction, image_size=ds.image_size,
                        input_kind=arch_spec(meta.arch).input_kind)


def validation_set(meta: CheckpointMeta, limit: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Up to ``limit`` validation samples of the data the checkpoint was trained on, when they can be reloaded."""
    try:
        ds = _reload_dataset(meta)
    except Exception as exc:  # the random sets still verify the fold
        logger.warning("validation data not available for verification: %s", exc)
        return None
    if ds is None:
        return None
    n = min(len(ds.x_val), limit)
    return ds.x_val[:n], ds.y_val[:n]


def training_samples(meta: CheckpointMeta, limit: int, seed: int = 0) -> np.ndarray | None:
    """Up to ``limit`` samples of the checkpoint's training split (int8 calibration), None when the data is
    not available here."""
    ds = _reload_dataset(meta)
    if ds is None:
        return None
    idx = np.random.default_rng(seed).permutation(len(ds.x_train))[:limit]
    return ds.x_train[np.sort(idx)]


def input_sets(meta: CheckpointMeta, batch_sizes: tuple[int, ...], seed: int = 0,
               max_validation: int = 512) -> InputSets:
    sets: InputSets = {}
    for i, b in enumerate(batch_sizes):
        sets[f"random_b{b}"] = (example_input(meta, b, seed=seed + i).numpy(), None)
    val = validation_set(meta, max_validation)
    if val is not None:
        sets["validation"] = val
    return sets


def chunked(run: Run, batch: int) -> Run:
    """A model with a fixed batch axis of ``batch`` run on any multiple of it."""
    def go(x: np.ndarray) -> np.ndarray:
        if len(x) == batch:
            return run(x)
        return np.concatenate([run(x[i:i + batch]) for i in range(0, len(x), batch)])
    return go


# --- the sources ---------------------------------------------------------------------------------------

class SourceModel:
    """What the verifier needs from an entry's source (see the module docstring)."""

    record: SourceRecord
    truth_dtype = "float64"

    def __init__(self, vdir: Path, record: SourceRecord) -> None:
        self.vdir, self.record = vdir, record

    @property
    def task(self) -> str:
        return self.record.task

    @property
    def batched(self) -> bool:
        return self.record.batch is None

    def truth(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def candidates(self) -> dict[str, Run]:
        """The unfolded (and torch-folded) runs of the source checked next to the served model."""
        return {}

    def reference_onnx(self) -> Run:
        """reference.onnx in onnxruntime with optimisations off (the server's runtime class, on the CPU)."""
        sess = ort_session(self.vdir / REFERENCE_FILE, "disable", "cpu")
        name = sess.get_inputs()[0].name
        return lambda x: sess.run(None, {name: x})[0]

    def input_sets(self, batch_sizes: tuple[int, ...], seed: int = 0, max_validation: int = 512,
                   dtype: Any = np.float32) -> InputSets:
        r = self.record
        sizes = batch_sizes if self.batched else (r.batch,) * min(len(batch_sizes), 3)
        sets: InputSets = {}
        for i, b in enumerate(sizes):
            sets[f"random_b{b}" if self.batched else f"random_{i}"] = (
                random_input(r.input_shape, r.normalization, b, seed + i, dtype), None)
        if r.data:
            if not Path(r.data).is_file():
                logger.warning("--data %s of this entry is gone: verifying on random inputs only", Path(r.data).name)
            else:
                x, y = load_samples(r.data, r.input_shape, max_validation + r.data_skip, dtype)
                x, y = x[r.data_skip:], (None if y is None else y[r.data_skip:])
                if not self.batched:
                    n = len(x) - len(x) % r.batch
                    if n == 0:
                        logger.warning("--data has fewer samples than the model's fixed batch of %d", r.batch)
                        return sets
                    x, y = x[:n], (None if y is None else y[:n])
                sets["validation"] = (x, y)
        return sets

    def fit(self, run: Run) -> Run:
        """``run`` fed the way the model's batch axis allows (chunks of a fixed batch)."""
        return run if self.batched else chunked(run, self.record.batch)


class CheckpointSource(SourceModel):
    def __init__(self, vdir: Path, record: SourceRecord) -> None:
        from trainer.checkpoint import model_from_checkpoint

        super().__init__(vdir, record)
        self.ckpt = load_source(vdir)
        self.meta = CheckpointMeta.of(self.ckpt, f"{vdir.name}/{SOURCE_FILE}")
        self.model = model_from_checkpoint(self.ckpt)
        self.model64 = copy.deepcopy(self.model).double()
        record.task = self.meta.task

    def truth(self, x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.model64(torch.from_numpy(x).double()).numpy()

    def candidates(self) -> dict[str, Run]:
        from folding.torch_fold import fold_module

        folded, _ = fold_module(self.model)
        ref = self.reference_onnx()
        return {"unfolded_torch": lambda x: _torch_run(self.model, x),
                "folded_torch": lambda x: _torch_run(folded, x),
                "reference_onnx": lambda x: ref(x.astype(np.float32))}

    def input_sets(self, batch_sizes: tuple[int, ...], seed: int = 0, max_validation: int = 512,
                   dtype: Any = np.float32) -> InputSets:
        sets = input_sets(self.meta, batch_sizes, seed, max_validation)
        if self.record.data:
            sets.update({k: v for k, v in super().input_sets((), seed, max_validation, dtype).items()
                         if k == "validation"})
        return sets


class ProgramSource(SourceModel):
    """A torch.export program (.pt2) or TorchScript module, rerun from the copy kept in the entry."""

    def __init__(self, vdir: Path, record: SourceRecord, kind: Any) -> None:
        super().__init__(vdir, record)
        self.kind = kind                     # a folding.kinds.ProgramKind: loads the program, makes modules
        path = vdir / kind.source_file
        self.module = kind.module(kind.load(path))       # loaded once: a large program takes seconds to load
        self.module64, self.truth_dtype = self._float64(self.module)

    def _float64(self, module: Any) -> tuple[Any, str]:
        """A float64 copy of the program when it runs so (constants of a fixed dtype in the graph may prevent it)."""
        try:
            module = copy.deepcopy(module).to(torch.float64)
            probe = random_input(self.record.input_shape, self.record.normalization, self.record.batch or 2, 0,
                                 np.float64)
            with torch.no_grad():
                out = module(torch.from_numpy(self._normalize(probe)))
            if out.dtype != torch.float64:
                raise TypeError(f"output is {out.dtype}")
            return module, "float64"
        except Exception as exc:  # the float32 program is the truth then, and the report says so
            logger.warning("%s does not run in float64 (%s): the float32 program is the reference",
                           self.record.original, first_line(exc, 120))
            return None, "float32"

    def _normalize(self, x: np.ndarray) -> np.ndarray:
        norm = self.record.normalization
        if not norm:
            return x
        view = [1, -1] + [1] * (x.ndim - 2)
        mean = np.asarray(norm["mean"], np.float64).reshape(view)
        std = np.asarray(norm["std"], np.float64).reshape(view)
        return ((x.astype(np.float64) - mean) / std).astype(x.dtype)

    def truth(self, x: np.ndarray) -> np.ndarray:
        if self.module64 is None:
            run32 = self.fit(lambda b: _torch_run(self.module, self._normalize(b.astype(np.float32))))
            return run32(x).astype(np.float64)
        with torch.no_grad():
            return self.fit(lambda b: self.module64(torch.from_numpy(self._normalize(b.astype(np.float64)))).numpy())(x)

    def candidates(self) -> dict[str, Run]:
        ref = self.reference_onnx()
        return {"unfolded_torch": lambda x: _torch_run(self.module, self._normalize(x.astype(np.float32))),
                "reference_onnx": lambda x: ref(x.astype(np.float32))}


class OnnxSource(SourceModel):
    truth_dtype = "float32"

    def __init__(self, vdir: Path, record: SourceRecord) -> None:
        super().__init__(vdir, record)
        self._ref = self.reference_onnx()

    def truth(self, x: np.ndarray) -> np.ndarray:
        return self.fit(self._ref)(x).astype(np.float64)


def _torch_run(model: Any, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()
