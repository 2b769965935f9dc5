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
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from foldserve.datatypes import lookup
from foldserve.entry import REFERENCE_FILE, SOURCE_FILE
from foldserve.errors import CheckpointError, DataError
from foldserve.records import CheckpointMeta, InputRecord, SourceRecord, first_line
from trainer.checkpoint import load_checkpoint
from trainer.data import BUILTIN

logger = logging.getLogger(__name__)

Feed = dict[str, np.ndarray]            # input name -> batch
Outputs = dict[str, np.ndarray]         # output name -> batch, in the model's output order
Run = Callable[[Feed], Outputs]
InputSets = dict[str, tuple[Feed, "np.ndarray | None"]]


# The float64 truth is computed this many samples at a time: torch's float64 convolutions run 1.6x faster per
# sample at batch 2 than at batch 32 (torchvision ResNet-50, 2 cores: 2.7 vs 4.2 s for 32 samples; the large
# float64 activations leave the caches), and the truth of a sample does not depend on its batch.
TRUTH_CHUNK = 2
# The float32 baseline (``unfolded_torch``) likewise: 0.042 s per sample at batch 7 vs 0.062 at batch 32.
BASELINE_CHUNK = 8


def as_float64(outputs: Outputs) -> Outputs:
    """Float outputs in float64 (what truths are compared in); integers, booleans and strings (BYTES) as they
    are: they are compared exactly."""
    return {k: v.astype(np.float64) if v.dtype.kind == "f" else v for k, v in outputs.items()}


def feed_len(feed: Feed) -> int:
    return len(next(iter(feed.values())))


def feed_slice(feed: Feed, start: int, stop: int) -> Feed:
    return {k: v[start:stop] for k, v in feed.items()}


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
    return model_input_dtypes(model)[model.graph.input[0].name]


def model_input_dtypes(model: onnx.ModelProto) -> dict[str, np.dtype]:
    """The numpy dtype of each of the model's inputs (initializers listed as inputs excluded)."""
    inits = {t.name for t in model.graph.initializer}
    out: dict[str, np.dtype] = {}
    for t in model.graph.input:
        if t.name not in inits:
            dtype = lookup(t.type.tensor_type.elem_type, "onnx", f"model input {t.name!r}").numpy
            assert dtype is not None
            out[t.name] = dtype
    return out


def random_feed(inputs: list[InputRecord], batch: int, seed: int, dtypes: Any) -> Feed:
    """Random draws for every input (the first input's draws are what a one-input model always got)."""
    return {r.name: random_input(r.shape, r.normalization, batch, seed + 7919 * k,
                                 dtypes.get(r.name, np.float32) if isinstance(dtypes, dict) else dtypes)
            for k, r in enumerate(inputs)}


def load_samples(path: str | Path, input_shape: list[int], limit: int,
                 dtype: Any) -> tuple[np.ndarray, np.ndarray | None]:
    """``--data FILE.npz`` of a one-input model: array ``x`` [N, *input_shape] and optional ``y`` [N]."""
    feed, y = load_feed(path, [InputRecord("x", list(input_shape))], limit, dtype)
    return feed["x"], y


def load_feed(path: str | Path, inputs: list[InputRecord], limit: int, dtypes: Any) -> tuple[Feed, np.ndarray | None]:
    """``--data FILE.npz``: one array per input name (``x`` for the only input), each [N, *shape], and an optional
    ``y`` [N] of class indices."""
    path = Path(path)
    want = ["x"] if len(inputs) == 1 else [r.name for r in inputs]
    expected = ", ".join(f"{n} [N, {', '.join(map(str, r.shape))}]" for n, r in zip(want, inputs, strict=True))
    try:
        with np.load(path, allow_pickle=False) as z:
            names = {n: n for n in want}
            if len(inputs) == 1 and "x" not in z.files and inputs[0].name in z.files:
                names = {"x": inputs[0].name}
            missing = [n for n in want if names[n] not in z.files]
            if missing:
                raise DataError(f"Options.data {path.name}: no array named {missing[0]!r} (it has {z.files}); expected "
                                f"{expected} and optional y [N]")
            arrays = {n: z[names[n]] for n in want}
            y = z["y"] if "y" in z.files else None
    except DataError:
        raise
    except Exception as exc:  # missing, not an npz, pickled objects
        raise DataError(f"Options.data {path.name}: not a readable .npz of arrays ({type(exc).__name__}: "
                        f"{exc})") from None
    count = len(arrays[want[0]])
    for n, r in zip(want, inputs, strict=True):
        a = arrays[n]
        if a.ndim != 1 + len(r.shape) or list(a.shape[1:]) != list(r.shape) or len(a) == 0 or len(a) != count:
            raise DataError(f"Options.data {path.name}: {n} has shape {list(a.shape)}; the model takes "
                            f"[{count or 'N'}, "
                            f"{', '.join(map(str, r.shape))}]")
    if y is not None and (y.ndim != 1 or len(y) != count or not np.issubdtype(y.dtype, np.integer)):
        raise DataError(f"Options.data {path.name}: y must be {count} integer class indices, got {y.dtype} "
                        f"{list(y.shape)}")
    k = min(count, limit)
    feed = {r.name: arrays[n][:k].astype(dtypes.get(r.name, np.float32) if isinstance(dtypes, dict) else dtypes)
            for n, r in zip(want, inputs, strict=True)}
    return feed, (None if y is None else y[:k].astype(np.int64))


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
               max_validation: int = 512, input_name: str = "input") -> InputSets:
    sets: InputSets = {}
    if batch_sizes:                  # one draw; each batch size gets its first rows (see SourceModel.input_sets)
        x = example_input(meta, max(batch_sizes), seed=seed).numpy()
        for b in batch_sizes:
            sets[f"random_b{b}"] = ({input_name: x[:b]}, None)
    val = validation_set(meta, max_validation)
    if val is not None:
        sets["validation"] = ({input_name: val[0]}, val[1])
    return sets


def in_chunks(run: Run, size: int) -> Run:
    """``run`` on at most ``size`` samples at a time: a model with a fixed batch axis of ``size`` on any multiple
    of it, or a run whose answer does not depend on the batch in the chunks it runs fastest in."""
    def go(feed: Feed) -> Outputs:
        n = feed_len(feed)
        if n <= size:
            return run(feed)
        parts = [run(feed_slice(feed, i, min(i + size, n))) for i in range(0, n, size)]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return go


def flatten_outputs(out: Any) -> list[Any]:
    """A torch program's result as its list of tensors, in the order the ONNX export writes them (dicts by
    insertion order, tuples and lists in order, nested ones depth first)."""
    if isinstance(out, dict):
        return [t for v in out.values() for t in flatten_outputs(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in flatten_outputs(v)]
    return [out]


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

    @property
    def input_names(self) -> list[str]:
        return [r.name for r in self.record.input_records()]

    @property
    def output_names(self) -> list[str]:
        return self.record.output_names()

    @property
    def accuracy_output(self) -> str | None:
        """The output that labels are compared with (a classification model's only output, or the named one)."""
        if self.record.accuracy_output:
            return self.record.accuracy_output
        return self.output_names[0] if self.task == "classification" and len(self.output_names) == 1 else None

    def named(self, values: list[np.ndarray]) -> Outputs:
        if len(values) != len(self.output_names):
            raise DataError(f"the source model returned {len(values)} outputs, the entry has {self.output_names}")
        return dict(zip(self.output_names, values, strict=True))

    def truth(self, feed: Feed) -> Outputs:
        raise NotImplementedError

    def candidates(self) -> dict[str, Run]:
        """The unfolded (and torch-folded) runs of the source checked next to the served model."""
        return {}

    def reference_onnx(self) -> Run:
        """reference.onnx in onnxruntime with optimisations off (the server's runtime class, on the CPU)."""
        sess = ort_session(self.vdir / REFERENCE_FILE, "disable", "cpu")
        names = [o.name for o in sess.get_outputs()]
        return lambda feed: dict(zip(names, sess.run(None, feed), strict=True))

    def input_sets(self, batch_sizes: tuple[int, ...], seed: int = 0, max_validation: int = 512,
                   dtype: Any = np.float32) -> InputSets:
        r = self.record
        sizes = batch_sizes if self.batched else (r.batch,) * min(len(batch_sizes), 3)
        types = [dtype.get(i.name, np.float32) if isinstance(dtype, dict) else dtype for i in r.input_records()]
        if any(np.dtype(t).kind == "O" for t in types):
            sizes = ()                     # strings (BYTES) have no random draws: --data is what verifies them
        sets: InputSets = {}
        if self.batched and sizes:
            # one draw, each batch size its first rows: the truth is computed once, and the same samples run
            # at every batch size are the batch-invariance check (verify.prefix_pairs)
            draw = random_feed(r.input_records(), max(int(b or 0) for b in sizes), seed, dtype)
            for b in sizes:
                sets[f"random_b{b}"] = (feed_slice(draw, 0, b), None)
        else:
            for i, b in enumerate(sizes):
                sets[f"random_{i}"] = (random_feed(r.input_records(), b, seed + i, dtype), None)
        if r.data:
            if not Path(r.data).is_file():
                logger.warning("Options.data %s of this entry is gone: verifying on random inputs only",
                               Path(r.data).name)
            else:
                feed, y = load_feed(r.data, r.input_records(), max_validation + r.data_skip, dtype)
                n = feed_len(feed)
                feed, y = feed_slice(feed, r.data_skip, n), (None if y is None else y[r.data_skip:])
                if not self.batched:
                    n = feed_len(feed) - feed_len(feed) % r.batch
                    if n == 0:
                        logger.warning("Options.data has fewer samples than the model's fixed batch of %d", r.batch)
                        return sets
                    feed, y = feed_slice(feed, 0, n), (None if y is None else y[:n])
                sets["validation"] = (feed, y)
        return sets

    def fit(self, run: Run) -> Run:
        """``run`` fed the way the model's batch axis allows (chunks of a fixed batch)."""
        return run if self.batched else in_chunks(run, int(self.record.batch or 1))


class CheckpointSource(SourceModel):
    def __init__(self, vdir: Path, record: SourceRecord) -> None:
        from trainer.checkpoint import model_from_checkpoint

        super().__init__(vdir, record)
        self.ckpt = load_source(vdir)
        self.meta = CheckpointMeta.of(self.ckpt, f"{vdir.name}/{SOURCE_FILE}")
        self.model = model_from_checkpoint(self.ckpt)
        self.model64 = copy.deepcopy(self.model).double()
        record.task = self.meta.task

    def _x(self, feed: Feed) -> np.ndarray:
        return feed[self.input_names[0]]

    def truth(self, feed: Feed) -> Outputs:
        with torch.no_grad():
            return self.named([self.model64(torch.from_numpy(self._x(feed)).double()).numpy()])

    def candidates(self) -> dict[str, Run]:
        from folding.torch_fold import fold_module

        folded, _ = fold_module(self.model)
        ref = self.reference_onnx()
        return {"unfolded_torch": lambda f: self.named([_torch_run(self.model, self._x(f))]),
                "folded_torch": lambda f: self.named([_torch_run(folded, self._x(f))]),
                "reference_onnx": lambda f: ref(_float32(f))}

    def input_sets(self, batch_sizes: tuple[int, ...], seed: int = 0, max_validation: int = 512,
                   dtype: Any = np.float32) -> InputSets:
        sets = input_sets(self.meta, batch_sizes, seed, max_validation, self.input_names[0])
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
            with warnings.catch_warnings():      # deepcopy of an unlifted program warns about its pytree specs
                warnings.simplefilter("ignore")
                module = copy.deepcopy(module).to(torch.float64)
            probe = random_feed(self.record.input_records(), self.record.batch or 2, 0, np.float64)
            with torch.no_grad():
                outs = flatten_outputs(module(*self._tensors(probe, np.float64)))
            if any(o.dtype != torch.float64 for o in outs if o.is_floating_point()):
                raise TypeError(f"outputs are {sorted({str(o.dtype) for o in outs})}")
            return module, "float64"
        except Exception as exc:  # the float32 program is the truth then, and the report says so
            logger.warning("%s does not run in float64 (%s): the float32 program is the reference",
                           self.record.original, first_line(exc, 120))
            return None, "float32"

    def _tensors(self, feed: Feed, dtype: Any) -> list[torch.Tensor]:
        """The program's arguments: each input normalised as declared, floats in ``dtype``, in input order."""
        out = []
        for r in self.record.input_records():
            x = feed[r.name]
            if np.issubdtype(x.dtype, np.floating):
                x = x.astype(dtype)
                if r.normalization:
                    view = [1, -1] + [1] * (x.ndim - 2)
                    mean = np.asarray(r.normalization["mean"], np.float64).reshape(view)
                    std = np.asarray(r.normalization["std"], np.float64).reshape(view)
                    x = ((x.astype(np.float64) - mean) / std).astype(dtype)
            out.append(torch.from_numpy(np.ascontiguousarray(x)))
        return out

    def _run(self, module: Any, feed: Feed, dtype: Any) -> Outputs:
        with torch.no_grad():
            return self.named([o.numpy() for o in flatten_outputs(module(*self._tensors(feed, dtype)))])

    def truth(self, feed: Feed) -> Outputs:
        if self.module64 is None:
            run32 = self.fit(self._batched(lambda f: self._run(self.module, f, np.float32), BASELINE_CHUNK))
            return as_float64(run32(feed))
        return self.fit(self._batched(lambda f: self._run(self.module64, f, np.float64), TRUTH_CHUNK))(feed)

    def _batched(self, run: Run, size: int) -> Run:
        return in_chunks(run, size) if self.batched else run

    def candidates(self) -> dict[str, Run]:
        ref = self.reference_onnx()
        return {"unfolded_torch": self._batched(lambda f: self._run(self.module, f, np.float32), BASELINE_CHUNK),
                "reference_onnx": lambda f: ref(_float32(f))}


class OnnxSource(SourceModel):
    truth_dtype = "float32"

    def __init__(self, vdir: Path, record: SourceRecord) -> None:
        super().__init__(vdir, record)
        self._ref = self.reference_onnx()

    def truth(self, feed: Feed) -> Outputs:
        return as_float64(self.fit(self._ref)(feed))


def _float32(feed: Feed) -> Feed:
    return {k: v.astype(np.float32) if np.issubdtype(v.dtype, np.floating) else v for k, v in feed.items()}


def _torch_run(model: Any, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()
