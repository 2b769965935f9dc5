"""Source kinds: what ``foldserve fold`` accepts, one class per kind in one registry.

Each kind knows how to recognise its files (``detect_kind`` reads the content, not the name), how to make one
ready for an entry (``prepare``: the unfolded reference ONNX, the fold, the records and the files to keep),
and how the verifier reruns the unfolded truth later (``open``: a :class:`folding.source.SourceModel`):

* :class:`CheckpointKind`: a foldserve trainer checkpoint (``source.pt``); folded by both passes;
* :class:`OnnxKind`: an ONNX file (kept as ``reference.onnx``, with the declared normalisation);
* :class:`Pt2Kind` / :class:`TorchScriptKind` (:class:`ProgramKind`): a ``torch.export`` program or a
  TorchScript module (kept as ``source.pt2`` / ``source.torchscript.pt``), exported with BN kept.

A new kind is one subclass and one entry in ``KINDS`` (plus its branch in ``detect_kind``, which sniffs file
content in one place).
"""
from __future__ import annotations

import json
import logging
import shutil
import warnings
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnx
import torch

from folding.onnx_io import check_bn_kept, export_dynamo, export_torchscript
from folding.onnx_passes import fold_onnx
from folding.programs import EXPECTED, Options, finish_reference, load_onnx_file, resolve_shape
from folding.source import CheckpointSource, OnnxSource, ProgramSource, SourceModel, example_input, training_samples
from folding.torch_fold import fold_module
from foldserve.entry import (
    INPUT_NAME,
    OUTPUT_NAME,
    PROGRAM_FILE,
    REFERENCE_FILE,
    SOURCE_FILE,
    TORCHSCRIPT_FILE,
    read_source_record,
)
from foldserve.errors import CheckpointError, ConfigError, EntryError, FoldError, NotACheckpoint, UnreadableCheckpoint
from foldserve.records import CheckpointMeta, FoldReport, Preprocess, SourceRecord, first_line
from trainer.checkpoint import file_sha256, load_checkpoint, model_from_checkpoint, save_checkpoint

logger = logging.getLogger(__name__)

#: the checkpoint keys a version's source.pt keeps (the weights and what rebuilds the model; no optimiser state)
SOURCE_KEYS = ("arch", "arch_args", "model_state", "task", "normalization", "class_names", "input_shape", "config",
               "dataset", "metrics", "epoch", "input_range")

Calibration = Callable[[int], "tuple[np.ndarray | None, str]"]


@dataclass
class Prepared:
    """A source made ready to install: reference and folded ONNX, reports, and how to write its files."""

    reference: onnx.ModelProto
    folded: onnx.ModelProto
    onnx_report: FoldReport
    record: SourceRecord
    preprocess: Preprocess
    default_name: str
    write_source: Callable[[Path], None]          # staging dir -> None: the source's own files
    torch_report: FoldReport | None = None
    labels: list[str] = field(default_factory=list)
    stamp: dict[str, str] = field(default_factory=dict)
    external_data: bool = False
    calibration: Calibration | None = None        # n -> (training samples, where from): int8 without --data


class SourceKind(ABC):
    """One kind of model ``foldserve fold`` takes."""

    name: ClassVar[str]
    source_file: ClassVar[str]           # what the version folder keeps of it
    description: ClassVar[str]

    @abstractmethod
    def prepare(self, path: Path, opts: Options, labels_file: str | None) -> Prepared: ...

    @abstractmethod
    def open(self, vdir: Path, record: SourceRecord) -> SourceModel: ...

    def check_options(self, opts: Options, labels_file: str | None) -> None:
        """Flags that make no sense for this kind (before any work)."""


# --- a trainer checkpoint --------------------------------------------------------------------------------

class CheckpointKind(SourceKind):
    name = "checkpoint"
    source_file = SOURCE_FILE
    description = "a foldserve checkpoint"

    def check_options(self, opts: Options, labels_file: str | None) -> None:
        if labels_file:
            raise ConfigError("FoldRequest.labels_file is for models brought from elsewhere: a checkpoint records "
                              "its class names")
        for flag, value in (("Options.normalize", opts.normalize), ("Options.input_shape", opts.input_shape),
                            ("Options.input_name", opts.input_name), ("Options.output_name", opts.output_name),
                            ("Options.accuracy_output", opts.accuracy_output)):
            if value:
                raise ConfigError(f"{flag} is for models brought from elsewhere: a foldserve checkpoint records its "
                                  f"own input, names and normalisation")

    def prepare(self, path: Path, opts: Options, labels_file: str | None) -> Prepared:
        ckpt_path = path / "checkpoint.pt" if path.is_dir() else path
        try:
            ckpt = load_checkpoint(ckpt_path)
        except NotACheckpoint:
            raise CheckpointError(f"{ckpt_path.name}: a torch.save file that is not a foldserve checkpoint; fold "
                                  f"takes {EXPECTED}") from None
        except UnreadableCheckpoint as exc:
            raise CheckpointError(f"{ckpt_path.name}: a torch.save pickle that is not a foldserve checkpoint "
                                  f"({exc.reason}); foldserve does not unpickle code: save a module with "
                                  f"torch.export.save(torch.export.export(model, (x,)), 'model.pt2'), torch.jit.save, "
                                  f"or as ONNX") from None
        meta = CheckpointMeta.of(ckpt, ckpt_path.name)
        model = model_from_checkpoint(ckpt)
        reference, folded, onnx_report, torch_report = fold_both(meta, model)
        labels = list(meta.class_names) if meta.task == "classification" else []
        record = SourceRecord(kind=self.name, original=ckpt_path.name, sha256=file_sha256(ckpt_path),
                              input_shape=meta.input_shape, normalization=meta.normalization, task=meta.task,
                              data=str(Path(opts.data).resolve()) if opts.data else None)
        preprocess = Preprocess(input_shape=meta.input_shape, normalization=meta.normalization,
                                input_range=meta.input_range, task=meta.task, class_names=labels,
                                dataset=meta.dataset.to_json())
        source = {k: ckpt[k] for k in SOURCE_KEYS if k in ckpt}

        def calibration(n: int) -> tuple[np.ndarray | None, str]:
            x = training_samples(meta, n)
            return x, f"{len(x) if x is not None else 0} samples of the training split of {meta.dataset.name}"

        return Prepared(reference, folded, onnx_report, record, preprocess, meta.default_name,
                        lambda staging: save_checkpoint(staging / SOURCE_FILE, source), torch_report=torch_report,
                        labels=labels, stamp={"task": meta.task, "arch": meta.arch}, calibration=calibration)

    def open(self, vdir: Path, record: SourceRecord) -> SourceModel:
        return CheckpointSource(vdir, record)


def fold_both(meta: CheckpointMeta, model: torch.nn.Module) -> tuple[onnx.ModelProto, onnx.ModelProto, FoldReport,
                                                                      FoldReport]:
    """A trainer model: its unfolded export, the ONNX fold (served) and the torch.fx fold, which must agree."""
    example = example_input(meta, 2)
    reference = export_torchscript(model, example, INPUT_NAME, OUTPUT_NAME, keep_bn=True)
    check_bn_kept(reference, sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()),
                  "the trainer's model")
    folded, onnx_report = fold_onnx(reference)
    _, torch_report = fold_module(model, (example,))
    check_agreement(onnx_report, torch_report)
    return reference, folded, onnx_report, torch_report


def check_agreement(onnx_report: FoldReport, torch_report: FoldReport) -> None:
    """The ONNX pass (what is served) and the torch.fx pass (the second opinion) must fold the same BNs."""
    if (len(onnx_report.folded), len(onnx_report.skipped)) != (len(torch_report.folded), len(torch_report.skipped)):
        raise FoldError(f"the ONNX and torch.fx passes disagree: ONNX folded {len(onnx_report.folded)} and skipped "
                        f"{len(onnx_report.skipped)}, torch.fx folded {len(torch_report.folded)} and skipped "
                        f"{len(torch_report.skipped)} of {onnx_report.bn_before} BNs (the exported graph differs "
                        f"from the module); skipped: ONNX {[s.reason for s in onnx_report.skipped][:3]}, torch "
                        f"{[s.reason for s in torch_report.skipped][:3]}")


# --- models brought from elsewhere -----------------------------------------------------------------------

class UserKind(SourceKind):
    """A model not made by foldserve: names, shapes and normalisation come from the model and the flags."""

    @abstractmethod
    def reference(self, path: Path, opts: Options) -> tuple[onnx.ModelProto, bool, list[str] | None]:
        """The unfolded reference ONNX (BN kept), whether it keeps its weights as external data, and the names
        of its outputs (None: the file's own)."""

    def truth_dtype(self) -> str:
        return "float64"

    def prepare(self, path: Path, opts: Options, labels_file: str | None) -> Prepared:
        record = SourceRecord(kind=self.name, original=path.name, sha256=file_sha256(path))
        reference, external, output_names = self.reference(path, opts)
        finish_reference(reference, record, opts, path.name, output_names=output_names)
        record.truth_dtype = self.truth_dtype()
        folded, onnx_report = fold_onnx(reference)
        if onnx_report.bn_before == 0 and not any(s.done for s in onnx_report.sections.values()):
            note = (f"{path.name} has no BatchNormalization node, so there is nothing to fold: if torch.onnx.export "
                    f"wrote it, the exporter fused BN already (torch 2.13's default dynamo exporter does, and so "
                    f"does the TorchScript one with constant folding); export with dynamo=False, "
                    f"do_constant_folding=False to keep BN, or bring the .pt2 / TorchScript program")
            onnx_report.warnings.append(note)
            logger.warning("%s", note)
        labels = read_labels_file(labels_file, folded, record) if labels_file else []
        preprocess = Preprocess(input_name=record.input_name, output_name=record.output_name,
                                input_shape=record.input_shape, normalization=record.normalization,
                                normalization_in_model=True, task=record.task, class_names=labels,
                                dataset={"data": Path(record.data).name} if record.data else {})

        def write_source(staging: Path) -> None:
            if self.source_file != REFERENCE_FILE:      # an ONNX source is the reference itself
                shutil.copyfile(path, staging / self.source_file)

        return Prepared(reference, folded, onnx_report, record, preprocess, default_name(path), write_source,
                        labels=labels, stamp={"task": record.task, "source_kind": self.name, "source_file": path.name},
                        external_data=external)


class OnnxKind(UserKind):
    name = "onnx"
    source_file = REFERENCE_FILE
    description = "an ONNX model (.onnx)"

    def reference(self, path: Path, opts: Options) -> tuple[onnx.ModelProto, bool, list[str] | None]:
        header = onnx.load(str(path), load_external_data=False)
        external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in header.graph.initializer)
        model = load_onnx_file(path, external=True)
        try:
            onnx.checker.check_model(model if not external else str(path))
        except onnx.checker.ValidationError as exc:
            raise CheckpointError(f"{path.name}: an invalid ONNX model ({first_line(exc, 200)})") from None
        return model, external, None

    def truth_dtype(self) -> str:
        return "float32"          # the file itself, run by onnxruntime with optimisations off

    def open(self, vdir: Path, record: SourceRecord) -> SourceModel:
        return OnnxSource(vdir, record)


class ProgramKind(UserKind):
    """A torch program the verifier reruns from the copy kept in the entry."""

    label: ClassVar[str]

    @abstractmethod
    def _load(self, path: Path) -> Any: ...

    @abstractmethod
    def module(self, program: Any) -> torch.nn.Module:
        """A fresh callable module of the program."""

    @abstractmethod
    def input_signature(self, program: Any, opts: Options, name: str) -> list[tuple[str, list[int | None]]]:
        """(input name, dims with None where symbolic) of each input, in order."""

    @abstractmethod
    def count_bns(self, program: Any) -> int: ...

    @abstractmethod
    def export(self, program: Any, examples: list[torch.Tensor], input_names: list[str],
               output_names: list[str]) -> onnx.ModelProto: ...

    def load(self, path: Path) -> Any:
        """The program in eval mode; one line when it cannot load."""
        export_log = logging.getLogger("torch.export")
        level = export_log.level
        try:
            export_log.setLevel(logging.CRITICAL)   # torch.export.load logs a traceback before it raises
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return self._load(path)
        except CheckpointError:
            raise
        except Exception as exc:  # SerializeError (another torch's schema), RuntimeError (bad archive), ...
            raise CheckpointError(f"{path.name}: a {self.label} that torch {torch.__version__.split('+')[0]} cannot "
                                  f"load ({first_line(exc)})") from None
        finally:
            export_log.setLevel(level)

    def reference(self, path: Path, opts: Options) -> tuple[onnx.ModelProto, bool, list[str] | None]:
        """The program as ONNX with BatchNormalization kept (no exporter-side fusion) and a dynamic batch axis
        where the program has one; its outputs named after what the program returns (dict keys)."""
        program = self.load(path)
        self.check_eval(program, path.name)
        signature = self.input_signature(program, opts, path.name)
        names = [n for n, _ in signature]
        examples = [torch.randn([dims[0] or 2, *resolve_shape(
            dims[1:], opts.for_input(opts.input_shape, name, names, "Options.input_shape"),
            f"{path.name} input {name!r}")]) for name, dims in signature]
        output_names = program_output_names(self._check_runs(program, examples, path.name, opts), path.name)
        try:
            model = self.export(program, examples, names, output_names)
        except ConfigError:
            raise
        except Exception as exc:
            raise FoldError(f"{path.name}: the ONNX export failed ({type(exc).__name__}: {first_line(exc)})") from None
        check_bn_kept(model, self.count_bns(program), path.name)
        return model, False, output_names

    def open(self, vdir: Path, record: SourceRecord) -> SourceModel:
        return ProgramSource(vdir, record, self)

    def check_eval(self, program: Any, name: str) -> None:
        """Refuse a program whose batch norms use batch statistics (exported in training mode), before any work."""

    def _check_runs(self, program: Any, examples: list[torch.Tensor], name: str, opts: Options) -> Any:
        """Run the program once on the examples before exporting it (returns what it returns): an input shape it
        does not take is one line naming the shape (the exporter's own error is a page of TorchScript IR)."""
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return self.module(program)(*examples)
        except Exception as exc:  # the program's own error: a shape, a dtype, a missing op
            shapes = " and ".join(str(list(e.shape)) for e in examples)
            flag = (" (Options.input_shape " + " ".join(",".join(map(str, e.shape[1:])) for e in examples) + ")"
                    if opts.input_shape else "")
            raise ConfigError(f"{name}: the program does not run on input of shape {shapes}{flag}: "
                              f"{_telling_line(exc)}") from None


def program_output_names(out: Any, what: str) -> list[str]:
    """Names for what a program returns, in the order the ONNX export flattens it: ``output`` for one tensor,
    dict keys (``key_sub`` when nested), ``output_0, output_1, ...`` for a tuple or list."""
    if isinstance(out, torch.Tensor):
        return [OUTPUT_NAME]
    names: list[str] = []

    def walk(value: Any, path: list[str]) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, [*path, str(k)])
        elif isinstance(value, (tuple, list)):
            for i, v in enumerate(value):
                walk(v, [*path, str(i)])
        elif isinstance(value, torch.Tensor):
            name = "_".join(path)
            names.append(name if name and not name[0].isdigit() else f"{OUTPUT_NAME}_{name}")
        else:
            raise ConfigError(f"{what}: the program returns a {type(value).__name__} at {'/'.join(path) or 'top'}; "
                              f"foldserve serves tensors (return tensors, or a dict / tuple of them)")
    walk(out, [])
    if not names:
        raise ConfigError(f"{what}: the program returns no tensor")
    return names


def _telling_line(exc: BaseException) -> str:
    """The line of a (TorchScript) error that says what went wrong: the last 'SomethingError: ...' line, else the
    last non-empty one."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    said = [ln for ln in lines if ln.split(":", 1)[0].endswith("Error") and ":" in ln]
    return first_line(said[-1] if said else (lines[-1] if lines else type(exc).__name__), 300)


class Pt2Kind(ProgramKind):
    name = "pt2"
    source_file = PROGRAM_FILE
    description = "a torch.export program (torch.export.save, .pt2)"
    label = "torch.export program"

    def _load(self, path: Path) -> Any:
        # loaded anew by each caller: the verifier's truth is the entry's copy, never an object the export
        # touched (a deep copy is no substitute: it renames placeholders such as 'input' to 'input_1')
        _check_pt2_schema(path)
        return torch.export.load(str(path))

    def module(self, program: Any) -> torch.nn.Module:
        module: torch.nn.Module = program.module()     # checks shapes as exported
        return module

    def input_signature(self, program: Any, opts: Options, name: str) -> list[tuple[str, list[int | None]]]:
        out = []
        for user in program.graph_signature.user_inputs:
            node = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == user)
            val = node.meta.get("val")
            if not isinstance(val, torch.Tensor):
                raise ConfigError(f"{name}: input {user!r} of the torch.export program is not a tensor "
                                  f"({type(val).__name__}); foldserve serves tensor inputs")
            out.append((user, [int(d) if isinstance(d, int) or str(d).isdigit() else None for d in val.shape]))
        if not out:
            raise ConfigError(f"{name}: a torch.export program without inputs")
        return out

    def count_bns(self, program: Any) -> int:
        return sum(1 for n in program.graph.nodes if n.op == "call_function" and "batch_norm" in str(n.target))

    def check_eval(self, program: Any, name: str) -> None:
        # aten.batch_norm(input, weight, bias, running_mean, running_var, training, ...); the functional
        # "legit" variants without "no_training" are the training-mode forms
        training = [n.name for n in program.graph.nodes if n.op == "call_function" and "batch_norm" in str(n.target)
                    and (("legit" in str(n.target) and "no_training" not in str(n.target))
                         or (len(n.args) > 5 and n.args[5] is True))]
        if training:
            raise FoldError(f"{name}: a torch.export program exported in training mode ({len(training)} batch norms "
                            f"use batch statistics, e.g. {training[0]}): its folded form could never match; export it "
                            f"after model.eval()")

    def export(self, program: Any, examples: list[torch.Tensor], input_names: list[str],
               output_names: list[str]) -> onnx.ModelProto:
        return export_dynamo(program)


class TorchScriptKind(ProgramKind):
    name = "torchscript"
    source_file = TORCHSCRIPT_FILE
    description = "a TorchScript file (torch.jit.save)"
    label = "TorchScript file"

    def _load(self, path: Path) -> Any:
        module = torch.jit.load(str(path), map_location="cpu")
        module.eval()
        return module

    def module(self, program: Any) -> torch.nn.Module:
        module: torch.nn.Module = program
        return module

    def input_signature(self, program: Any, opts: Options, name: str) -> list[tuple[str, list[int | None]]]:
        args = [a.name for a in program.forward.schema.arguments][1:]
        out: list[tuple[str, list[int | None]]] = []
        for arg in args:
            shape = opts.for_input(opts.input_shape, arg, args, "Options.input_shape")
            if not shape:
                example = "3,224,224" if len(args) == 1 else " ".join(f"{a}:3,224,224" for a in args)
                raise ConfigError(f"{name}: a TorchScript file does not record its input shapes: pass "
                                  "Options.input_shape "
                                  f"(per sample, without the batch axis) for {args}, e.g. Options.input_shape "
                                  f"{example.replace(' ', ' Options.input_shape ')}")
            out.append((arg, [None, *shape]))
        return out

    def count_bns(self, program: Any) -> int:
        return sum(1 for n in program.inlined_graph.nodes()
                   if n.kind() in ("aten::batch_norm", "aten::_batch_norm_impl_index"))

    def export(self, program: Any, examples: list[torch.Tensor], input_names: list[str],
               output_names: list[str]) -> onnx.ModelProto:
        return export_torchscript(program, examples, input_names, output_names, keep_bn=True)


def _check_pt2_schema(path: Path) -> None:
    """A program saved by a torch with another export schema (major version) cannot load: say which."""
    from torch._export.serde.schema import SCHEMA_VERSION

    try:
        with zipfile.ZipFile(path) as z:
            docs = [json.loads(z.read(n)) for n in z.namelist() if n.endswith(".json") and "/models/" in f"/{n}"]
    except (OSError, ValueError, zipfile.BadZipFile):
        return                                   # torch.export.load says what is wrong
    for doc in docs:
        v = doc.get("schema_version") if isinstance(doc, dict) else None
        if isinstance(v, dict) and v.get("major") != SCHEMA_VERSION[0]:
            saved = doc.get("torch_version") or "another torch"
            raise CheckpointError(f"{path.name}: a torch.export program saved with export schema {v.get('major')}."
                                  f"{v.get('minor')} ({saved}); torch {torch.__version__.split('+')[0]} reads schema "
                                  f"{SCHEMA_VERSION[0]}.x: export it again with this torch, or as ONNX")


def default_name(path: Path) -> str:
    from foldserve.names import RULE, is_valid_model_name

    stem = path.name.split(".")[0]
    if not is_valid_model_name(stem):
        raise ConfigError(f"{path.name}: its name does not make a model name ({RULE}); pass FoldRequest.name")
    return stem


def read_labels_file(labels_file: str, folded: onnx.ModelProto, record: SourceRecord) -> list[str]:
    try:
        labels = [line.strip() for line in Path(labels_file).read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"FoldRequest.labels_file {Path(labels_file).name}: unreadable "
                          f"({getattr(exc, 'strerror', None) or exc})") from None
    target = record.accuracy_output or record.output_name
    if record.task != "classification":
        raise ConfigError(f"FoldRequest.labels_file names classes, but the model's outputs are "
                          f"{record.output_names()}: with "
                          f"several, say which one is the classifier with Options.accuracy_output NAME")
    out = next(o for o in folded.graph.output if o.name == target)
    dims = [d.dim_value for d in out.type.tensor_type.shape.dim]
    classes = dims[-1] if dims and dims[-1] > 0 else None
    if classes is not None and classes != len(labels):
        raise ConfigError(f"FoldRequest.labels_file has {len(labels)} names; the model's output {target!r} has shape "
                          f"{dims}: labels need an output [batch, {len(labels)}]")
    return labels


# --- the registry ----------------------------------------------------------------------------------------

KINDS: dict[str, SourceKind] = {k.name: k for k in (CheckpointKind(), OnnxKind(), Pt2Kind(), TorchScriptKind())}
CHECKPOINT, ONNX, PT2, TORCHSCRIPT = (KINDS[n] for n in ("checkpoint", "onnx", "pt2", "torchscript"))


def kind_named(name: str) -> SourceKind:
    try:
        return KINDS[name]
    except KeyError:
        raise EntryError(f"unknown source kind {name!r}; expected one of {', '.join(KINDS)}") from None


def _zip_names(path: Path) -> list[str] | None:
    try:
        with zipfile.ZipFile(path) as z:
            return z.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return None


def detect_kind(path: str | Path) -> SourceKind:
    """The kind of a file, from its content; CheckpointError (exit 2) for a file of no kind."""
    path = Path(path)
    if path.is_dir() and (path / "checkpoint.pt").is_file():
        return CHECKPOINT
    if path.is_dir():
        raise ConfigError(f"{path}: a directory without checkpoint.pt (expected {EXPECTED}, or a `foldserve train` "
                          f"run directory)")
    if not path.is_file():
        raise ConfigError(f"{path.name or path}: no such file (expected {EXPECTED})")
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] == b"PK":
        names = _zip_names(path)
        if names is None:
            raise CheckpointError(f"{path.name}: a damaged zip archive (truncated?), not {EXPECTED}")
        tails = {n.split("/", 1)[-1] for n in names}
        if "archive_format" in tails or any(t.startswith("models/") and t.endswith(".json") for t in tails):
            return PT2
        if "constants.pkl" in tails or any(t.startswith("code/") for t in tails):
            return TORCHSCRIPT
        if "data.pkl" in tails:
            return CHECKPOINT           # a torch.save file: load_checkpoint tells a checkpoint from other pickles
        raise CheckpointError(f"{path.name}: a zip archive with none of the files of {EXPECTED}")
    if head[:1] == b"\x80":
        return CHECKPOINT               # a legacy (non-zip) torch.save pickle
    load_onnx_file(path, external=False)    # raises the one line when it is not ONNX either
    return ONNX


def open_source(version_dir: str | Path) -> SourceModel:
    """The entry's source as the verifier reruns it (see :mod:`folding.source`)."""
    vdir = Path(version_dir)
    record = read_source_record(vdir)
    return kind_named(record.kind).open(vdir, record)
