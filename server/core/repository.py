"""The model repository on disk (Triton's layout): which models and versions exist and what their files
say. Discovery only: loading and the loaded versions live in :mod:`server.core.registry`.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from foldserve.entry import (
    LABELS_FILE,
    MODEL_FILE,
    PREPROCESS_FILE,
    VERIFICATION_FILE,
    digest_mismatches,
    read_labels,
    read_preprocess,
    version_numbers,
)
from foldserve.errors import EntryError, InvalidInput, ModelNotFound, ModelNotReady
from foldserve.model_config import CONFIG_FILE, ModelConfig
from foldserve.names import RULE, VERSION_RULE, is_valid_model_name, parse_version
from foldserve.records import RecordError, VerificationReport, read_record
from server.core.model_config import read_servable_config

logger = logging.getLogger(__name__)


def check_model_name(name: str, field_name: str = "model name", loading: bool = False) -> str:
    """``name`` if it can name a model; a load of one that cannot is answered in Triton's words first."""
    if not is_valid_model_name(name):
        shown = name if len(name) <= 64 else name[:64] + "..."
        why = f"{field_name} {shown!r} is not valid: {RULE}"
        if loading and not name.strip():
            raise InvalidInput(f"Model name cannot be empty. Please enter a valid name to deploy. ({why})")
        if loading and ("/" in name or "\\" in name or name.strip() in (".", "..")):
            raise InvalidInput(f"model name must not contain path traversal characters ({why})")
        if loading:
            raise InvalidInput(f"failed to load {shown!r}: failed to poll from model repository: {why}")
        raise InvalidInput(why)
    return name


def check_version(version: str | None) -> int | None:
    try:
        return parse_version(version)
    except ValueError:
        shown = str(version) if len(str(version)) <= 32 else str(version)[:32] + "..."
        raise InvalidInput(f"model version {shown!r} is not valid: {VERSION_RULE}") from None


@dataclass(frozen=True)
class VerificationSummary:
    """What a version's verification.json says, as the server needs it (and shows in metadata)."""

    passed: bool
    reason: str = ""
    max_abs_error: float | None = None
    max_rel_error: float | None = None
    top1_agreement: float | None = None
    provider: str | None = None
    tolerance: dict[str, Any] | None = None
    warnings: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_verification(version_dir: Path, model_file: str = MODEL_FILE,
                      loaded: dict[str, str] | None = None) -> VerificationSummary:
    """The version's verification, which counts only for the bytes it verified: every file it recorded a
    SHA-256 for must still have it (perturbed weights are never served as verified). ``loaded`` gives the
    SHA-256 of the bytes that will really be served (the model file and its external data, as read once):
    those are compared, not the files as they are on disk by now."""
    path = version_dir / VERIFICATION_FILE
    if not path.is_file():
        return VerificationSummary(False, "no verification.json (run `foldserve verify`)")
    try:
        report = read_record(VerificationReport, path)
    except RecordError as exc:
        return VerificationSummary(False, f"unusable verification.json ({exc})")
    served = report.served
    summary = VerificationSummary(report.passed, report.failure or "", served.max_abs if served else None,
                                  served.max_rel if served else None, served.top1_agreement if served else None,
                                  report.provider or None, report.tolerance.to_json() if report.tolerance else None,
                                  len(report.warnings))
    files = report.files
    if not summary.passed:
        return summary
    if model_file not in files:
        return VerificationSummary(False, f"verification.json records no SHA-256 of {model_file} (written by an "
                                          f"older foldserve?): re-run `foldserve verify`")
    loaded = loaded or {}
    changed = sorted({n for n, d in loaded.items() if files.get(n) != d} |
                     set(digest_mismatches(version_dir, {n: d for n, d in files.items() if n not in loaded})))
    if changed:
        shown = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
        return VerificationSummary(False, f"{shown} changed since verification (SHA-256 differs from "
                                          f"verification.json): re-run `foldserve verify`")
    return summary


class ModelRepository:
    """One repository folder: model names, their version folders, configs, labels and records."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def names(self) -> list[str]:
        """Models in the repository: folders with a config.pbtxt."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir()
                      if p.is_dir() and is_valid_model_name(p.name) and (p / CONFIG_FILE).is_file())

    def model_dir(self, name: str) -> Path:
        check_model_name(name)
        path = (self.root / name).resolve()
        if path.parent != self.root.resolve():
            raise InvalidInput(f"model name {name!r} is not valid")
        return path

    def inside(self, path: Path, what: str) -> Path:
        """``path`` when it (followed through any symbolic link) stays inside the repository; ModelNotReady
        otherwise: no file from outside it (a link to /etc/shadow as labels.txt) may reach a client."""
        root, real = self.root.resolve(), Path(path).resolve()
        if real != root and root not in real.parents:
            raise ModelNotReady(f"{what}: {Path(path).name} leads outside the model repository (a symbolic link to "
                                f"{'an absolute path' if Path(path).is_symlink() else 'elsewhere'}); refusing to read "
                                f"it")
        return Path(path)

    def has(self, name: str) -> bool:
        return is_valid_model_name(name) and (self.root / name / CONFIG_FILE).is_file()

    def config(self, name: str) -> ModelConfig:
        model_dir = self.model_dir(name)
        if not (model_dir / CONFIG_FILE).is_file():
            raise ModelNotFound(f"model {name!r} is not in the repository (no {name}/{CONFIG_FILE})")
        self.inside(model_dir / CONFIG_FILE, f"model {name!r}")
        return read_servable_config(model_dir)

    def versions(self, name: str) -> list[int]:
        versions = version_numbers(self.model_dir(name))
        if not versions:
            raise ModelNotReady(f"model {name!r} has no version folders (expected {name}/1/model.onnx)")
        return versions

    def version_dir(self, name: str, version: int) -> Path:
        return self.model_dir(name) / str(version)

    def labels(self, name: str, version: int) -> list[str]:
        model_dir, vdir = self.model_dir(name), self.version_dir(name, version)
        for candidate in (vdir / LABELS_FILE, model_dir / LABELS_FILE):
            if candidate.exists() or candidate.is_symlink():
                self.inside(candidate, f"model {name!r} version {version}")
        return read_labels(model_dir, vdir)

    def preprocess(self, name: str, version: int) -> dict[str, Any] | None:
        """The version's preprocess.json in its JSON form (served as metadata as it is), or None."""
        path = self.version_dir(name, version) / PREPROCESS_FILE
        if path.exists() or path.is_symlink():
            self.inside(path, f"model {name!r} version {version}")
        try:
            record = read_preprocess(self.version_dir(name, version))
        except EntryError as exc:
            logger.warning("%s", exc)
            return None
        return record.to_json() if record else None

    def describe(self) -> str:
        """What a repository looks like, for messages about an empty or wrong one."""
        return (f"a model repository holds one folder per model, each with {CONFIG_FILE} and numbered version "
                f"folders: {self.root}/NAME/{CONFIG_FILE}, {self.root}/NAME/1/model.onnx")
