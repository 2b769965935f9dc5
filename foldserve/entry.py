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

This module knows names and layouts only; the records themselves are typed in :mod:`foldserve.records`.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from foldserve.errors import EntryError
from foldserve.names import is_version_folder
from foldserve.records import EntryFoldReport, PrecisionInfo, Preprocess, SourceRecord, VerificationReport, read_record

MODEL_FILE = "model.onnx"
REFERENCE_FILE = "reference.onnx"
SOURCE_FILE = "source.pt"
SOURCE_RECORD_FILE = "source.json"
# the source file a version keeps, by kind (folding.kinds: one class per kind says which it keeps)
PROGRAM_FILE = "source.pt2"
TORCHSCRIPT_FILE = "source.torchscript.pt"
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


#: the largest labels.txt read (a million class names of 15 characters): a larger one is refused before it is read
MAX_LABELS_BYTES = 16 << 20


def read_labels(model_dir: Path, version_dir: Path | None = None) -> list[str]:
    """Per-version labels win over the model's labels.txt."""
    for p in ((version_dir / LABELS_FILE) if version_dir else None, model_dir / LABELS_FILE):
        if p is not None and p.is_file():
            size = p.stat().st_size
            if size > MAX_LABELS_BYTES:
                raise EntryError(f"{p.parent.name}/{LABELS_FILE} is {size} bytes, more than the {MAX_LABELS_BYTES} "
                                 f"bytes of class names foldserve reads")
            return [line.strip() for line in p.read_text().splitlines() if line.strip()]
    return []


def read_preprocess(version_dir: Path) -> Preprocess | None:
    path = Path(version_dir) / PREPROCESS_FILE
    return read_record(Preprocess, path) if path.is_file() else None


def read_source_record(version_dir: Path) -> SourceRecord:
    """The version's source record; versions folded before records existed are trainer checkpoints."""
    version_dir = Path(version_dir)
    path = version_dir / SOURCE_RECORD_FILE
    if not path.is_file():
        if (version_dir / SOURCE_FILE).is_file():
            return SourceRecord(kind="checkpoint")
        raise EntryError(f"{version_dir.name}: not a version written by `foldserve fold` (no {SOURCE_RECORD_FILE} "
                         f"or {SOURCE_FILE})")
    return read_record(SourceRecord, path)


def read_precision(version_dir: Path) -> PrecisionInfo:
    """The served model's precision record (fp32 for versions without one)."""
    path = Path(version_dir) / PRECISION_FILE
    return read_record(PrecisionInfo, path) if path.is_file() else PrecisionInfo()


def read_fold_report(version_dir: Path) -> EntryFoldReport:
    return read_record(EntryFoldReport, Path(version_dir) / FOLD_REPORT_FILE)


def read_verification_report(version_dir: Path) -> VerificationReport:
    return read_record(VerificationReport, Path(version_dir) / VERIFICATION_FILE)


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
        versions = version_numbers(path)
        if versions:      # a model folder: name one of its versions
            raise EntryError(f"{path}: a model folder, not a version; verify one of its versions, e.g. "
                             f"{path / str(versions[-1])}")
        raise EntryError(f"{path}: expected a version folder REPO/NAME/VERSION (e.g. model_repository/digits/1)")
    return path.parent.parent, path.parent.name, int(path.name)
