"""The repository entry: the files one model version consists of, as ``folding/`` writes them and
``server/`` reads them (Triton's layout plus foldserve's records)::

    REPO/NAME/config.pbtxt            ModelConfig in text format (see foldserve.model_config)
    REPO/NAME/labels.txt              class names, one a line (Triton's label_filename)
    REPO/NAME/VERSION/model.onnx      the folded model that is served
    REPO/NAME/VERSION/reference.onnx  the unfolded model, BatchNormalization nodes kept
    REPO/NAME/VERSION/source.json     what the entry was made from (SourceRecord): its kind and how to rerun it
    REPO/NAME/VERSION/source.pt       a trainer checkpoint (weights_only loadable), or source.pt2 (a
                                      torch.export program) or source.torchscript.pt; none for an ONNX source
                                      (reference.onnx is the user's file, with the declared normalisation)
    REPO/NAME/VERSION/precision.json  fp16/int8 variants: precision, calibration (absent for fp32)
    REPO/NAME/VERSION/fold_report.json, preprocess.json, labels.txt, verification.json

This module knows names and layouts only; it imports nothing heavier than the standard library.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from foldserve.errors import EntryError
from foldserve.names import is_version_folder

MODEL_FILE = "model.onnx"
REFERENCE_FILE = "reference.onnx"
SOURCE_FILE = "source.pt"
SOURCE_RECORD_FILE = "source.json"
# the kinds of model `foldserve fold` accepts, and the file each keeps in the version folder
SOURCE_KINDS = ("checkpoint", "onnx", "pt2", "torchscript")
SOURCE_FILES = {"checkpoint": SOURCE_FILE, "onnx": REFERENCE_FILE, "pt2": "source.pt2",
                "torchscript": "source.torchscript.pt"}
FOLD_REPORT_FILE = "fold_report.json"
PREPROCESS_FILE = "preprocess.json"
VERIFICATION_FILE = "verification.json"
VERIFICATION_FAILED_FILE = "verification.failed.json"   # a failing re-verification never overwrites a pass
PRECISION_FILE = "precision.json"         # fp32 | fp16 | int8 and how the served model was made (absent: fp32)
LABELS_FILE = "labels.txt"
# tensor names of the models foldserve exports itself (other models keep their own)
INPUT_NAME, OUTPUT_NAME = "input", "output"


def version_numbers(model_dir: Path) -> list[int]:
    """The version folders of a model folder, ascending."""
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and is_version_folder(p.name))


def next_version(model_dir: Path) -> int:
    return max(version_numbers(model_dir), default=0) + 1


def read_labels(model_dir: Path, version_dir: Path | None = None) -> list[str]:
    """Per-version labels win over the model's labels.txt."""
    for p in ((version_dir / LABELS_FILE) if version_dir else None, model_dir / LABELS_FILE):
        if p is not None and p.is_file():
            return [line.strip() for line in p.read_text().splitlines() if line.strip()]
    return []


@dataclass
class Preprocess:
    """How raw data becomes the model's input, recorded next to the model (and served in its metadata)."""

    input_name: str = INPUT_NAME
    output_name: str = OUTPUT_NAME
    input_shape: list[int] = field(default_factory=list)       # per sample, without the batch axis
    normalization: dict[str, list[float]] | None = None       # {"mean": [...], "std": [...]} per channel
    normalization_in_model: bool = True                        # the served model normalises itself
    input_range: list[float] | None = None                     # [min, max] of the raw data it was trained on
    task: str = "classification"                               # classification | denoising | other
    class_names: list[str] = field(default_factory=list)
    dataset: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Preprocess":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def read_preprocess(version_dir: Path) -> Preprocess | None:
    path = version_dir / PREPROCESS_FILE
    if not path.is_file():
        return None
    try:
        return Preprocess.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError) as exc:
        raise EntryError(f"{version_dir.name}/{PREPROCESS_FILE}: unreadable ({exc})") from None


@dataclass
class SourceRecord:
    """What a version was folded from, so that the verifier can rebuild the unfolded truth later."""

    kind: str = "checkpoint"                                   # one of SOURCE_KINDS
    original: str = ""                                         # the file's name as the user gave it (no path)
    sha256: str = ""                                           # of that file
    input_name: str = INPUT_NAME
    output_name: str = OUTPUT_NAME
    input_shape: list[int] = field(default_factory=list)       # per sample, concrete (random inputs are drawn so)
    batch: int | None = None                                   # None: dynamic batch axis; N: the model's fixed one
    normalization: dict[str, list[float]] | None = None       # declared with --normalize, baked into both models
    data: str | None = None                                    # --data FILE.npz (x, optional y): real samples
    data_skip: int = 0                                         # the first N of them calibrated int8: not verified on
    task: str = "classification"
    truth_dtype: str = "float64"                               # what the unfolded program runs in as the truth

    @property
    def file(self) -> str:
        return SOURCE_FILES[self.kind]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SourceRecord":
        record = cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})
        if record.kind not in SOURCE_KINDS:
            raise EntryError(f"{SOURCE_RECORD_FILE}: unknown source kind {record.kind!r}; expected one of "
                             f"{', '.join(SOURCE_KINDS)}")
        return record


def read_source_record(version_dir: Path) -> SourceRecord:
    """The version's source record; versions folded before records existed are trainer checkpoints."""
    path = version_dir / SOURCE_RECORD_FILE
    if not path.is_file():
        if (version_dir / SOURCE_FILE).is_file():
            return SourceRecord(kind="checkpoint")
        raise EntryError(f"{version_dir.name}: not a version written by `foldserve fold` (no {SOURCE_RECORD_FILE} "
                         f"or {SOURCE_FILE})")
    try:
        return SourceRecord.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError) as exc:
        raise EntryError(f"{version_dir.name}/{SOURCE_RECORD_FILE}: unreadable ({exc})") from None


def read_precision(version_dir: Path) -> dict[str, Any]:
    """The served model's precision record ({"precision": "fp32"} for versions without one)."""
    path = Path(version_dir) / PRECISION_FILE
    if not path.is_file():
        return {"precision": "fp32"}
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise EntryError(f"{Path(version_dir).name}/{PRECISION_FILE}: unreadable ({exc})") from None
    if not isinstance(record, dict) or record.get("precision") not in ("fp32", "fp16", "int8"):
        raise EntryError(f"{Path(version_dir).name}/{PRECISION_FILE}: precision must be fp32, fp16 or int8")
    return record


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def entry_digests(version_dir: Path) -> dict[str, str]:
    """SHA-256 of every file of a version (relative names), except the verification reports themselves:
    what a verification covers, so that a version whose bytes changed since is never served as verified."""
    root = Path(version_dir)
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.startswith("verification")}


def digest_mismatches(version_dir: Path, recorded: dict[str, str]) -> list[str]:
    """The recorded files that are gone or whose bytes differ now."""
    root = Path(version_dir)
    bad = []
    for name, digest in sorted(recorded.items()):
        path = root / name
        if not path.is_file() or sha256_file(path) != digest:
            bad.append(name)
    return bad


def split_entry_path(path: Path) -> tuple[Path, str, int]:
    """REPO/NAME/VERSION -> (REPO, NAME, VERSION); EntryError when the last part is not a version."""
    path = Path(path)
    if not is_version_folder(path.name):
        raise EntryError(f"{path}: expected a version folder REPO/NAME/VERSION (e.g. model_repository/digits/1)")
    return path.parent.parent, path.parent.name, int(path.name)
