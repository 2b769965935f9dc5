"""Fold orchestration: one :class:`FoldRequest` (a model file and what to do with it) into a verified repository
entry (the layout in :mod:`foldserve.entry`).

The source's kind (:mod:`folding.kinds`, read from the file's content) prepares the unfolded reference and
its fold; the served ``model.onnx`` is ``fold_onnx(reference.onnx)``, where every fold site keeps its tensor
name (what lets the verifier compare the two graphs layer by layer), then optionally cast to fp16 or
quantised to int8 (:mod:`folding.precision`). The version is written, verified and swapped into place by
:mod:`folding.install`; a model whose other versions have another interface or other labels is refused.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from folding.calibration import calibration_samples
from folding.install import (
    check_compatible,
    check_model_name,
    check_version,
    install,
    model_precision,
    rejected_dir,
    write_failure,
)
from folding.kinds import Prepared, SourceKind, detect_kind
from folding.onnx_io import check_onnx, has_external_data, save_model, save_with_external_data
from folding.onnx_passes import fold_onnx
from folding.precision import to_precision
from folding.programs import Options
from folding.source import example_input
from folding.verify import VerifyOptions, verify_entry
from foldserve import __version__
from foldserve.atomic import write_bytes, write_json, write_text
from foldserve.datatypes import lookup
from foldserve.entry import (
    FOLD_REPORT_FILE,
    LABELS_FILE,
    MODEL_FILE,
    PRECISION_FILE,
    PREPROCESS_FILE,
    REFERENCE_FILE,
    SOURCE_RECORD_FILE,
)
from foldserve.errors import ConfigError, FoldError, WriteError
from foldserve.model_config import ModelConfig, TensorSpec, make_config
from foldserve.records import (
    CALIBRATION_METHODS,
    DEFAULT_CALIBRATION_METHOD,
    DEFAULT_CALIBRATION_SAMPLES,
    DEFAULT_PRECISION,
    PRECISIONS,
    EntryFoldReport,
    FoldReport,
    PrecisionInfo,
    VerificationReport,
    first_line,
    write_record,
)

logger = logging.getLogger(__name__)

__all__ = ["EntryResult", "FoldRequest", "build_entry", "example_input", "fold_onnx_file", "tensor_specs"]


@dataclass
class FoldRequest:
    """What ``foldserve fold`` was asked: the model, where it goes, and how to fold, verify and serve it."""

    source: str | Path
    repository: str | Path
    name: str | None = None                   # default: the source's own (DATASET_ARCH, or the file's stem)
    version: int | None = None                # default: the next free one
    max_batch_size: int = 64
    max_queue_delay_us: int = 2000
    verify: bool = True
    verify_options: VerifyOptions | None = None
    force: bool = False                       # replace an existing version
    install_unverified: bool = False          # install a version whose verification failed (else kept aside)
    options: Options = field(default_factory=Options)
    labels_file: str | None = None
    precision: str = DEFAULT_PRECISION
    calibration_method: str = DEFAULT_CALIBRATION_METHOD
    calibration_samples: int = DEFAULT_CALIBRATION_SAMPLES

    def check(self) -> CheckedRequest:
        """The one check of a fold request, before any work: the precision and its calibration, the batch bound,
        the data files, the options against the source's kind (which it detects), and the install target (the
        name, and the version and its clash where the name is given). The stages after it trust it; only what the
        prepared model tells is checked where it becomes known (a clash under the model's own name, int8's one
        input, the interface of the model's other versions)."""
        if self.precision not in PRECISIONS:
            raise ConfigError(f"FoldRequest.precision {self.precision!r}: choose one of {', '.join(PRECISIONS)}")
        if self.calibration_method not in CALIBRATION_METHODS:
            raise ConfigError(f"FoldRequest.calibration_method {self.calibration_method!r}: choose one of "
                              f"{', '.join(CALIBRATION_METHODS)}")
        if self.calibration_samples < 1:
            raise ConfigError(f"FoldRequest.calibration_samples must be >= 1, got {self.calibration_samples}")
        if self.max_batch_size < 1:
            raise ConfigError(f"FoldRequest.max_batch_size must be >= 1, got {self.max_batch_size}")
        opts = self.options
        for field_name, value in (("Options.data", opts.data), ("Options.calibration_data", opts.calibration_data)):
            if value and not Path(value).is_file():
                raise ConfigError(f"{field_name} {value}: no such file (expected an .npz with x and optional y)")
        if opts.calibration_data and self.precision != "int8":
            raise ConfigError("Options.calibration_data goes with FoldRequest.precision int8")
        path = Path(self.source)
        kind = detect_kind(path)
        kind.check_options(opts, self.labels_file)
        version = None
        if self.name is not None:       # a clash is refused before any work
            check_model_name(self.name)
            version = check_version(Path(self.repository) / self.name, self.name, self.version, self.force)
        return CheckedRequest(path, kind, version)


@dataclass(frozen=True)
class CheckedRequest:
    """What :meth:`FoldRequest.check` found: the source, its kind, and the version to write where the request
    names the model (else it is known once the source names it)."""

    path: Path
    kind: SourceKind
    version: int | None


@dataclass
class EntryResult:
    model_dir: Path
    version_dir: Path
    version: int
    onnx_report: FoldReport
    torch_report: FoldReport | None
    verification: VerificationReport | None
    installed: bool = True       # False: verification failed, the version is kept aside (version_dir says where)


def tensor_specs(model: onnx.ModelProto, batched: bool) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The graph's inputs and outputs (initializers excluded) as TensorSpecs, without the batch axis."""
    inits = {t.name for t in model.graph.initializer}

    def spec(vi: onnx.ValueInfoProto) -> TensorSpec:
        t = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
        return TensorSpec(vi.name, lookup(t.elem_type, "onnx", f"tensor {vi.name!r}").v2,
                          tuple(dims[1:] if batched else dims))
    return [spec(i) for i in model.graph.input if i.name not in inits], [spec(o) for o in model.graph.output]


def _stamp(models: dict[str, onnx.ModelProto], meta: dict[str, str]) -> None:
    for role, m in models.items():
        onnx.helper.set_model_props(m, {**meta, "foldserve_role": role})
        m.producer_name, m.producer_version = "foldserve", __version__
        check_onnx(m, role)


def _write_version(staging: Path, prepared: Prepared, reports: EntryFoldReport, served: onnx.ModelProto,
                   precision: PrecisionInfo) -> None:
    for role, model in ((REFERENCE_FILE, prepared.reference), (MODEL_FILE, served)):
        save_model(model, staging / role, external_data=prepared.external_data)
    prepared.write_source(staging)
    write_record(staging / SOURCE_RECORD_FILE, prepared.record)
    if prepared.labels:
        write_text(staging / LABELS_FILE, "\n".join(prepared.labels) + "\n")
    write_record(staging / PREPROCESS_FILE, prepared.preprocess)
    write_record(staging / FOLD_REPORT_FILE, reports)
    if precision.reduced:
        write_record(staging / PRECISION_FILE, precision)


def _config(request: FoldRequest, name: str, model_dir: Path, version: int, prepared: Prepared) -> ModelConfig:
    batched = prepared.record.batch is None
    inputs, outputs = tensor_specs(prepared.folded, batched=batched)
    config = make_config(name, inputs, outputs, max_batch_size=request.max_batch_size if batched else 0,
                         max_queue_delay_us=request.max_queue_delay_us,
                         label_output=(prepared.record.accuracy_output or outputs[0].name) if prepared.labels else None)
    config.parameters["foldserve_precision"].string_value = model_precision(model_dir, version, request.precision)
    return config


def build_entry(request: FoldRequest) -> EntryResult:
    """model (checkpoint, ONNX, .pt2, TorchScript) -> fold -> (fp16 / int8) -> (verify) -> REPO/NAME/VERSION,
    atomically."""
    checked = request.check()
    kind, opts, name, version = checked.kind, request.options, request.name, checked.version
    prepared = kind.prepare(checked.path, opts, request.labels_file)
    if name is None or version is None:
        name = check_model_name(prepared.default_name)
        version = check_version(Path(request.repository) / name, name, request.version, request.force)
    model_dir = Path(request.repository) / name
    version_dir = model_dir / str(version)
    config = _config(request, name, model_dir, version, prepared)
    if request.precision == "int8" and len(prepared.record.input_records()) > 1:
        raise ConfigError(f"FoldRequest.precision int8 calibrates models with one input; this one has "
                          f"{[r.name for r in prepared.record.input_records()]} (fp32 and fp16 serve it)")
    calibration, calibration_source = (calibration_samples(prepared, opts, request.calibration_samples)
                                       if request.precision == "int8" else (None, ""))
    served, precision_info = to_precision(prepared.folded, request.precision, calibration=calibration,
                                          method=request.calibration_method, source=calibration_source)
    check_compatible(model_dir, config, prepared.labels, version)
    onnx_report, torch_report = prepared.onnx_report, prepared.torch_report
    sha = prepared.record.sha256
    _stamp({"reference": prepared.reference, "served": prepared.folded}, {
        "foldserve_version": __version__, "source_sha256": sha, "bn_before": str(onnx_report.bn_before),
        "bn_folded": str(len(onnx_report.folded)), "bn_skipped": str(len(onnx_report.skipped)),
        "precision": request.precision, **prepared.stamp})
    if served is not prepared.folded:
        _stamp({"served": served}, {"foldserve_version": __version__, "source_sha256": sha,
                                    "precision": request.precision, **prepared.stamp})
    reports = EntryFoldReport(onnx=onnx_report, torch=torch_report, source_kind=kind.name, source_sha256=sha,
                              foldserve_version=__version__)

    def write_and_verify(staging: Path) -> VerificationReport | None:
        _write_version(staging, prepared, reports, served, precision_info)
        return verify_entry(staging, request.verify_options) if request.verify else None

    def accept(report: VerificationReport | None) -> bool:
        return report is None or report.passed or request.install_unverified

    verification = install(model_dir, version_dir, config, prepared.labels, write_and_verify, accept)
    installed = accept(verification)
    if not installed:
        version_dir = rejected_dir(version_dir)
    logger.info("repository entry %s version %d%s: %s", name, version, "" if installed else " NOT installed",
                onnx_report.summary())
    return EntryResult(model_dir, version_dir, version, onnx_report, torch_report, verification, installed)


def fold_onnx_file(src: str | Path, dst: str | Path) -> FoldReport:
    """``foldserve fold --onnx IN --out OUT``: fold any ONNX file, check it, write it atomically."""
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise ConfigError(f"{src}: no such file")
    try:
        model = onnx.load(str(src))
    except Exception as exc:  # onnx raises DecodeError, ValueError, ... for a bad file
        raise FoldError(f"{src}: not a readable ONNX model ({type(exc).__name__}: {first_line(exc)})") from None
    folded, report = fold_onnx(model)
    check_onnx(folded, "folded")
    try:
        if has_external_data(src):
            save_with_external_data(folded, dst)
        else:
            write_bytes(dst, folded.SerializeToString())
        write_json(Path(str(dst) + ".fold_report.json"), report.to_json())
    except OSError as exc:
        raise WriteError(write_failure(exc, dst.parent)) from None
    return report
