"""Typed records: the JSON files two stages share (and the checkpoint's metadata), each a dataclass with one
codec.

``encode(record)`` gives the JSON form; ``decode(cls, data, where)`` reads it back, checking every field's
type from the dataclass's annotations (nested records, ``list[X]``, ``dict[str, X]``, ``X | None``). What a
reader cannot trust is a :class:`RecordError` naming the file and the field: an unknown field, a field of the
wrong type, a missing required field, or a format version newer than this foldserve reads. An older version
is read (a record's ``upgrade`` brings it forward). ``read_record`` / ``write_record`` do the same for files.

A record class declares ``VERSION_FIELD`` (the key that carries its format version, or ``None`` for records
that are nested in others) and ``VERSION``. Readers never walk a record's dict: they use its attributes.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar, Union

from foldserve.atomic import write_json
from foldserve.errors import EntryError

T = TypeVar("T", bound="Record")


class RecordError(EntryError):
    """A record file that is unreadable, of an unknown shape, or newer than this foldserve."""


class Record:
    """Base of every typed record (subclasses are dataclasses)."""

    VERSION_FIELD: ClassVar[str | None] = None
    VERSION: ClassVar[int] = 1

    @classmethod
    def upgrade(cls, data: dict[str, Any], version: int) -> dict[str, Any]:
        """Bring the JSON form of an older format version to the current one (the default: unchanged)."""
        return data

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = encode(self)
        return out

    @classmethod
    def from_json(cls: type[T], data: Any, where: str = "") -> T:
        return decode(cls, data, where or cls.__name__)


# --- the codec ---------------------------------------------------------------------------------------------

def encode(value: Any) -> Any:
    """A record (and what it holds) as plain JSON values; the format version goes first."""
    if isinstance(value, Record):
        out: dict[str, Any] = {}
        if value.VERSION_FIELD:
            out[value.VERSION_FIELD] = value.VERSION
        for f in dataclasses.fields(value):  # type: ignore[arg-type]
            out[f.name] = encode(getattr(value, f.name))
        return out
    if isinstance(value, dict):
        return {str(k): encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [encode(v) for v in value]
    return value


def decode(cls: type[T], data: Any, where: str) -> T:
    """``data`` (JSON) as a ``cls``; RecordError naming ``where`` and the field on anything unexpected."""
    if not isinstance(data, dict):
        raise RecordError(f"{where}: expected a JSON object, got {type(data).__name__}")
    data = dict(data)
    if cls.VERSION_FIELD:
        version = data.pop(cls.VERSION_FIELD, 1)
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise RecordError(f"{where}: {cls.VERSION_FIELD} must be a positive integer, got {version!r}")
        if version > cls.VERSION:
            raise RecordError(f"{where}: format version {version} was written by a newer foldserve (this one reads "
                              f"versions up to {cls.VERSION}): upgrade foldserve, or fold the model again")
        if version < cls.VERSION:
            data = cls.upgrade(data, version)
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise RecordError(f"{where}: unknown field(s) {unknown} (this foldserve knows {sorted(names)})")
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise RecordError(f"{where}: required field {f.name!r} is missing")
            continue
        kwargs[f.name] = _value(hints[f.name], data[f.name], f"{where}: {f.name}")
    return cls(**kwargs)


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _value(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _value(option, value, where)
            except RecordError as exc:
                errors.append(str(exc))
        raise RecordError(errors[0] if len(errors) == 1 else f"{where}: {value!r} is none of {_name(tp)}")
    if isinstance(tp, type) and issubclass(tp, Record):
        return decode(tp, value, where)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise RecordError(f"{where}: expected a list, got {type(value).__name__}")
        (item,) = typing.get_args(tp) or (Any,)
        return [_value(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise RecordError(f"{where}: expected an object, got {type(value).__name__}")
        _, item = typing.get_args(tp) or (str, Any)
        return {str(k): _value(item, v, f"{where}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp in (str, bool):
        if isinstance(value, tp):
            return value
    else:
        raise RecordError(f"{where}: field type {_name(tp)} is not supported by the record codec")
    raise RecordError(f"{where}: expected {_name(tp)}, got {type(value).__name__} {value!r:.40}")


def _name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def read_record(cls: type[T], path: Path, where: str | None = None) -> T:
    """Read and decode a record file; RecordError (naming the file) when it is unreadable or malformed."""
    shown = where or f"{path.parent.name}/{path.name}"
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise RecordError(f"{shown}: unreadable ({type(exc).__name__}: {first_line(exc, 160)})") from None
    return decode(cls, data, shown)


def write_record(path: Path, record: Record) -> Path:
    """Write a record atomically (temp file + rename)."""
    write_json(path, encode(record))
    return Path(path)


def first_line(exc: BaseException | str, limit: int = 240) -> str:
    """An exception's first non-empty line, at most ``limit`` characters (its class name when it says nothing):
    what a one-line error message quotes of a library's error."""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__ if isinstance(exc, BaseException) else ""
    line = text.splitlines()[0].strip()
    return line if len(line) <= limit else line[:limit - 3].rstrip() + "..."


# --- precisions and calibration ------------------------------------------------------------------------------

#: the served model's numeric precision; fp32 is the default (no precision.json)
PRECISIONS = ("fp32", "fp16", "int8")
#: int8 calibration: how activation ranges are chosen from the samples
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
DEFAULT_PRECISION = "fp32"
DEFAULT_CALIBRATION_METHOD = "minmax"
DEFAULT_CALIBRATION_SAMPLES = 300


@dataclass
class PrecisionInfo(Record):
    """What the served model's precision is and how it was made (the version's precision.json; absent: fp32)."""

    VERSION_FIELD: ClassVar[str | None] = "format_version"

    precision: str = DEFAULT_PRECISION
    calibration_method: str | None = None
    calibration_samples: int | None = None
    calibration_source: str | None = None
    activation_type: str | None = None
    weight_type: str | None = None
    kept_float32: list[str] = field(default_factory=list)     # nodes left in float32 and why
    quantized_ops: int = 0

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise RecordError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")

    @property
    def reduced(self) -> bool:
        return self.precision != DEFAULT_PRECISION


# --- the fold report -------------------------------------------------------------------------------------------

@dataclass
class FoldedPair(Record):
    bn: str
    into: str
    direction: str        # "backward" (producer -> BN) or "forward" (BN -> consumer)
    producer_type: str
    bn_type: str = "BatchNorm"
    tensor: str = ""      # ONNX: the tensor at the fold site, same name in the unfolded and folded graph

    def describe(self, section: str) -> str:
        what = "" if section == BATCHNORM else f"{self.bn_type} "      # a BN is a BN; an affine site says its ops
        return f"folded   {what}{self.bn} -> {self.into} ({self.direction}, {self.producer_type})"

    def site(self) -> FoldedPair:
        return self


@dataclass
class SkippedBN(Record):
    bn: str
    reason: str

    @property
    def name(self) -> str:
        return self.bn


@dataclass
class MergedBranches(Record):
    """Parallel branches over one tensor, summed by Add, merged into one Conv (structural re-parameterisation)."""

    into: str              # the Conv that now computes the sum
    sum: str               # the Add at the top of the sum, whose output tensor the Conv takes over
    branches: list[str]    # each branch, e.g. "Conv 'b1' 3x3", "BatchNormalization 'bn' (identity)", "identity"
    tensor: str = ""       # the sum's tensor, same name in the unfolded and folded graph

    def describe(self, section: str) -> str:
        return f"merged   {' + '.join(self.branches)} -> {self.into}"

    def site(self) -> FoldedPair:
        return FoldedPair(self.sum, self.into, "merge", "Conv", "Add", self.tensor)


@dataclass
class SkippedMerge(Record):
    sum: str
    reason: str

    @property
    def name(self) -> str:
        return self.sum


#: the sections the fold passes write (their ``name``; ``folding.onnx_passes.PASSES`` lists the ONNX ones)
BATCHNORM, AFFINE, MERGE = "batchnorm", "affine", "merge"


@dataclass
class PassSection(Record):
    """What one pass did over the rounds of a fold: the sites it changed (``done``), those it left and why (the
    last round's), and how many of what it acts on (BatchNormalization nodes, affine nodes next to a layer, Conv
    nodes) the graph had when it first ran and has at the end (0 when it had none before)."""

    done: list[FoldedPair | MergedBranches] = field(default_factory=list)
    left: list[SkippedBN | SkippedMerge] = field(default_factory=list)
    before: int = 0
    after: int = 0


#: how the terminal shows what a section left (a pass without a row: ``left     NAME NAME: REASON``)
LEFT_LINES = {BATCHNORM: "skipped  {name}: {reason}", AFFINE: "left     affine {name}: {reason}",
              MERGE: "left     sum {name}: {reason}"}


def _section_summary(name: str, s: PassSection) -> str | None:
    """One section's part of the summary line (None: nothing to say)."""
    if name == AFFINE:
        return (f"affine Mul/Add/Sub/Div next to a layer: {s.before} -> {s.after} ({len(s.done)} folded, "
                f"{len(s.left)} left)") if s.before else None
    if name == MERGE:
        return (f"branches merged: {len(s.done)} sums ({len(s.left)} left), Conv {s.before} -> {s.after}"
                if s.done or s.left else None)
    return f"{name}: {len(s.done)} done ({s.before} -> {s.after}), {len(s.left)} left" if s.done or s.left else None


V = TypeVar("V")


class _View(Generic[V]):
    """One attribute of one section of a :class:`FoldReport`, read and set as an attribute of the report (not a
    field: the record's JSON holds the sections)."""

    def __init__(self, section: str, attr: str) -> None:
        self.section, self.attr = section, attr

    def __get__(self, report: FoldReport, owner: type | None = None) -> V:
        value: V = getattr(report.section(self.section), self.attr)
        return value

    def __set__(self, report: FoldReport, value: V) -> None:
        setattr(report.section(self.section), self.attr, value)


@dataclass
class FoldReport(Record):
    """What a fold did: one section per pass (BN folds, and for ONNX the affine folds and branch merges: see
    :class:`PassSection`), warnings, constant subgraphs evaluated, node and parameter counts. ``folded``,
    ``affines``, ``merges`` and the like are views of the sections, for readers."""

    sections: dict[str, PassSection] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    nodes_before: int = 0
    nodes_after: int = 0
    constants_folded: int = 0

    def section(self, name: str) -> PassSection:
        return self.sections.setdefault(name, PassSection())

    # views of the sections (what readers and the tests name)
    folded = _View[list[FoldedPair]](BATCHNORM, "done")
    skipped = _View[list[SkippedBN]](BATCHNORM, "left")
    affines = _View[list[FoldedPair]](AFFINE, "done")
    affines_skipped = _View[list[SkippedBN]](AFFINE, "left")
    merges = _View[list[MergedBranches]](MERGE, "done")
    merges_skipped = _View[list[SkippedMerge]](MERGE, "left")
    bn_before = _View[int](BATCHNORM, "before")
    bn_after = _View[int](BATCHNORM, "after")
    affine_before = _View[int](AFFINE, "before")
    affine_after = _View[int](AFFINE, "after")
    conv_before = _View[int](MERGE, "before")
    conv_after = _View[int](MERGE, "after")

    def summary(self) -> str:
        text = (f"folded {len(self.folded)} BN ({self.bn_before} -> {self.bn_after} left), "
                f"skipped {len(self.skipped)}, {len(self.warnings)} warning(s); "
                f"parameters {self.params_before} -> {self.params_after}")
        for name, s in self.sections.items():
            part = _section_summary(name, s) if name != BATCHNORM else None
            if part:
                text += f"; {part}"
        if self.constants_folded:
            text += f"; {self.constants_folded} constant node(s) evaluated or dropped as no-ops"
        return text

    def lines(self) -> list[str]:
        """Every site of every section, one line each, as the terminal shows them."""
        out = []
        for name, s in self.sections.items():
            out += [item.describe(name) for item in s.done]
            template = LEFT_LINES.get(name, f"left     {name} {{name}}: {{reason}}")
            out += [template.format(name=item.name, reason=item.reason) for item in s.left]
        return out + [f"warning  {w}" for w in self.warnings]

    def sites(self) -> list[FoldedPair]:
        """Every place a pass changed (merges as direction "merge"), each with the tensor both graphs compute
        there: what localisation compares."""
        return [item.site() for s in self.sections.values() for item in s.done]


def _flat_sections(report: dict[str, Any]) -> dict[str, Any]:
    """A fold report of format 1 or 2 (a flat pair of lists per pass) in sections."""
    r = dict(report)
    sections = {BATCHNORM: {"done": r.pop("folded", []), "left": r.pop("skipped", []),
                            "before": r.pop("bn_before", 0), "after": r.pop("bn_after", 0)}}
    if any(k in r for k in ("affines", "affines_skipped", "affine_before", "affine_after")):
        sections[AFFINE] = {"done": r.pop("affines", []), "left": r.pop("affines_skipped", []),
                            "before": r.pop("affine_before", 0), "after": r.pop("affine_after", 0)}
    if any(k in r for k in ("merges", "merges_skipped", "conv_before", "conv_after")):
        sections[MERGE] = {"done": r.pop("merges", []), "left": r.pop("merges_skipped", []),
                           "before": r.pop("conv_before", 0), "after": r.pop("conv_after", 0)}
    r["sections"] = sections
    return r


@dataclass
class EntryFoldReport(Record):
    """A version's fold_report.json: the ONNX pass (what is served) and the torch.fx pass (checkpoints)."""

    VERSION_FIELD: ClassVar[str | None] = "format_version"
    VERSION: ClassVar[int] = 3    # 2: affine folds, branch merges, constants evaluated (1 reads as none of them);
                                  # 3: one section per pass (2 reads into sections)

    @classmethod
    def upgrade(cls, data: dict[str, Any], version: int) -> dict[str, Any]:
        if version < 3:
            data = {k: _flat_sections(v) if k in ("onnx", "torch") and isinstance(v, dict) else v
                    for k, v in data.items()}
        return data

    onnx: FoldReport
    torch: FoldReport | None = None
    source_kind: str = ""
    source_sha256: str = ""
    foldserve_version: str = ""


# --- the verification report -----------------------------------------------------------------------------------

@dataclass
class ComparisonRecord(Record):
    """One comparison of a candidate with the truth (max abs / rel error and where the worst element is)."""

    max_abs: float
    max_rel: float
    mean_abs: float
    worst_index: list[int]
    frac_over: float
    bound: float
    passed: bool
    n: int
    top1_agreement: float | None = None
    floor: float | None = None     # the noise floor (times the margin) where it, not the tolerance, set the bound
    unstable: bool = False         # the unfolded model itself disagrees with the truth here: reported, not judged
    note: str | None = None        # what could not be compared (a shape that differs)

    def __str__(self) -> str:
        return (f"max_abs={self.max_abs:.3g} (bound {self.bound:.3g}) max_rel={self.max_rel:.3g} "
                f"mean_abs={self.mean_abs:.3g} worst={self.worst_index} over={self.frac_over:.2%}")


@dataclass
class Worst(Record):
    input: str
    index: list[int]


@dataclass
class CandidateResult(Record):
    """A candidate (served model, reference, torch runs) on every input set."""

    passed: bool = True
    inputs: dict[str, ComparisonRecord] = field(default_factory=dict)
    max_abs: float = 0.0
    max_rel: float = 0.0
    mean_abs: float = 0.0
    worst: Worst | None = None
    frac_over: float = 0.0
    top1_agreement: float | None = None


@dataclass
class VerifiedSource(Record):
    kind: str
    file: str
    truth: str                   # the dtype the truth ran in
    batch: int | str             # "dynamic" or the model's fixed batch


@dataclass
class ToleranceRecord(Record):
    rtol: float
    atol: float
    rel_floor: float = 0.0


@dataclass
class PrecisionGateRecord(Record):
    """fp16/int8: what the served model was judged on."""

    tolerance: ToleranceRecord
    basis: str = "elementwise"
    top1_agreement: float | None = None
    min_top1: float | None = None
    accuracy_drop_points: float | None = None
    max_accuracy_drop_points: float | None = None


@dataclass
class VerifiedPrecision(PrecisionInfo):
    """The precision record as verified, with the gate it was judged on."""

    VERSION_FIELD: ClassVar[str | None] = None

    gate: PrecisionGateRecord | None = None


@dataclass
class Localization(Record):
    first_failing_layer: str | None = None
    first_failing_bn: str | None = None
    sites: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class OutputFloor(Record):
    """One output's noise floor: the largest error of the unfolded model's own float32 runs on any input set."""

    floor: float                   # max abs error of the unfolded model on its own
    set_by: str                    # the run that showed it (unfolded_torch, reference_onnx_opt)
    tolerance: float               # the tolerance's bound on the same output (largest over the sets)
    unstable: bool = False
    reason: str | None = None      # why the output is unstable


@dataclass
class NoiseFloor(Record):
    """How the verifier judged outputs against the unfolded model's own noise (``folding.tolerances``)."""

    margin: float
    runs: list[str]                # the runs of the unfolded model that measured it
    outputs: dict[str, OutputFloor] = field(default_factory=dict)
    sites_checked: bool = False    # every fold site was compared (an output was unstable)
    sites_agreed: bool | None = None

    @property
    def unstable(self) -> list[str]:
        return [k for k, v in self.outputs.items() if v.unstable]

    def add(self, output: str, floor: float, set_by: str, tolerance: float, unstable: str | None) -> None:
        """One input set's measurement of ``output``: the floor is the largest, the tolerance the largest, and
        the output is unstable once any set found it so (the first reason is kept)."""
        f = self.outputs.setdefault(output, OutputFloor(floor, set_by, tolerance))
        if floor > f.floor:
            f.floor, f.set_by = floor, set_by
        f.tolerance = max(f.tolerance, tolerance)
        if unstable and not f.unstable:
            f.unstable, f.reason = True, unstable


@dataclass
class FoldCounts(Record):
    bn_before: int = 0
    folded: int = 0
    skipped: int = 0
    bn_after: int | None = None


@dataclass
class VerificationReport(Record):
    """A version's verification.json: every candidate against the truth, the verdict, and the SHA-256 of every
    file it covered (the server serves those bytes only)."""

    VERSION_FIELD: ClassVar[str | None] = "report_version"
    VERSION: ClassVar[int] = 2    # 2: the noise floor, unstable outputs, exact integer outputs (1 reads as none)

    passed: bool
    model_dir: str = ""
    dtype: str = "float32"
    source: VerifiedSource | None = None
    tolerance: ToleranceRecord | None = None
    provider: str = ""
    optimization: str = ""
    batch_sizes: list[int] = field(default_factory=list)
    inputs: dict[str, list[int]] = field(default_factory=dict)
    candidates: dict[str, CandidateResult] = field(default_factory=dict)
    accuracy: dict[str, float] = field(default_factory=dict)
    batch_invariance: dict[str, ComparisonRecord] = field(default_factory=dict)
    precision: VerifiedPrecision = field(default_factory=VerifiedPrecision)
    localization: Localization = field(default_factory=Localization)
    noise: NoiseFloor | None = None
    warnings: list[str] = field(default_factory=list)
    fold: FoldCounts = field(default_factory=FoldCounts)
    wall_s: float = 0.0
    failure: str | None = None
    files: dict[str, str] = field(default_factory=dict)
    written: str = ""
    kept: str | None = None

    @property
    def served(self) -> CandidateResult | None:
        return self.candidates.get("served_onnx")


# --- source and preprocessing records ---------------------------------------------------------------------------

@dataclass
class Preprocess(Record):
    """How raw data becomes the model's input, recorded next to the model (and served in its metadata)."""

    VERSION_FIELD: ClassVar[str | None] = "format_version"

    input_name: str = "input"
    output_name: str = "output"
    input_shape: list[int] = field(default_factory=list)       # per sample, without the batch axis
    normalization: dict[str, list[float]] | None = None       # {"mean": [...], "std": [...]} per channel
    normalization_in_model: bool = True                        # the served model normalises itself
    input_range: list[float] | None = None                     # [min, max] of the raw data it was trained on
    task: str = "classification"                               # classification | denoising | other
    class_names: list[str] = field(default_factory=list)
    dataset: dict[str, Any] = field(default_factory=dict)


@dataclass
class InputRecord(Record):
    """One input of a folded model: its name, per-sample shape and declared normalisation."""

    name: str
    shape: list[int] = field(default_factory=list)
    normalization: dict[str, list[float]] | None = None


@dataclass
class SourceRecord(Record):
    """What a version was folded from, so that the verifier can rebuild the unfolded truth later. The single
    ``input_*`` / ``output_name`` fields describe the first input and output (all a model had before format
    2); ``inputs`` and ``outputs`` list every one."""

    VERSION_FIELD: ClassVar[str | None] = "format_version"
    VERSION: ClassVar[int] = 2    # 2: several inputs and outputs (1 reads as one of each)

    kind: str = "checkpoint"                                   # a source kind's name (folding.kinds)
    original: str = ""                                         # the file's name as the user gave it (no path)
    sha256: str = ""                                           # of that file
    input_name: str = "input"
    output_name: str = "output"
    input_shape: list[int] = field(default_factory=list)       # per sample, concrete (random inputs are drawn so)
    batch: int | None = None                                   # None: dynamic batch axis; N: the model's fixed one
    normalization: dict[str, list[float]] | None = None       # declared with --normalize, baked into both models
    data: str | None = None                                    # --data FILE.npz (x, optional y): real samples
    data_skip: int = 0                                         # the first N of them calibrated int8: not verified on
    task: str = "classification"
    truth_dtype: str = "float64"                               # what the unfolded program runs in as the truth
    inputs: list[InputRecord] = field(default_factory=list)    # every input, in the model's order
    outputs: list[str] = field(default_factory=list)           # every output, in the model's order
    accuracy_output: str | None = None                         # the output labels are compared with (--data y)

    def input_records(self) -> list[InputRecord]:
        return self.inputs or [InputRecord(self.input_name, list(self.input_shape), self.normalization)]

    def output_names(self) -> list[str]:
        return self.outputs or [self.output_name]


# --- the trainer checkpoint's metadata --------------------------------------------------------------------------

@dataclass
class DatasetInfo(Record):
    """Enough to reload the data a checkpoint was trained on."""

    name: str = ""
    data: str | None = None
    seed: int = 0
    val_fraction: float = 0.2
    image_size: int = 32


@dataclass
class CheckpointMeta(Record):
    """Everything of a trainer checkpoint but its tensors: what ``folding/`` rebuilds the model from.

    The checkpoint itself is a ``torch.save`` dict (``trainer.checkpoint``); its format marker and version are
    checked there, and these keys are read through this record."""

    arch: str
    arch_args: dict[str, Any]
    task: str
    normalization: dict[str, list[float]] | None
    class_names: list[str]
    config: dict[str, Any] = field(default_factory=dict)
    dataset: DatasetInfo = field(default_factory=DatasetInfo)
    metrics: dict[str, Any] = field(default_factory=dict)
    epoch: int | None = None
    input_range: list[float] | None = None

    KEYS: ClassVar[tuple[str, ...]] = ("arch", "arch_args", "task", "normalization", "class_names", "config",
                                       "dataset", "metrics", "epoch", "input_range")

    @classmethod
    def of(cls, checkpoint: dict[str, Any], where: str = "checkpoint") -> CheckpointMeta:
        """The metadata of a loaded checkpoint dict (its other keys, the tensors and states, are not read)."""
        return decode(cls, {k: checkpoint[k] for k in cls.KEYS if k in checkpoint}, where)

    @property
    def input_shape(self) -> list[int]:
        return [int(d) for d in self.arch_args["input_shape"]]

    @property
    def default_name(self) -> str:
        return f"{self.dataset.name or 'model'}_{self.arch}"
