"""Build a model-repository entry (the layout in :mod:`foldserve.entry`) from a trainer checkpoint, an ONNX
file, a ``torch.export`` program or a TorchScript file (:mod:`folding.programs` tells them apart).

The served ``model.onnx`` is ``fold_onnx(reference.onnx)``: every fold site keeps its tensor name, which
is what lets the verifier compare the two graphs layer by layer. For a checkpoint, ``fold_module`` folds
the same model in PyTorch as a second opinion, and the two passes must agree on what they fold (the fold
fails otherwise); for a user's model the verifier's comparison with the unfolded program is the proof.
A version folder is assembled in a staging folder and swapped into place (:mod:`foldserve.swap`), so a
reader never sees half an entry and a kill never leaves a model without its version. A model whose
existing versions have another interface (input shape, datatypes, outputs) or other labels is refused:
its older versions would stay READY and fail every request.
"""
from __future__ import annotations

import errno
import io
import logging
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from foldserve import __version__
from foldserve.atomic import write_bytes, write_json, write_text
from foldserve.datatypes import lookup
from foldserve.entry import (FOLD_REPORT_FILE, INPUT_NAME, LABELS_FILE, MODEL_FILE, OUTPUT_NAME, PRECISION_FILE,
                             PREPROCESS_FILE, REFERENCE_FILE, SOURCE_FILE, SOURCE_RECORD_FILE, Preprocess, SourceRecord, next_version,
                             read_labels, version_numbers)
from foldserve.errors import CheckpointError, ConfigError, FoldError, WriteError
from foldserve.model_config import CONFIG_FILE, TensorSpec, interface, make_config, read_config, write_config
from foldserve.names import RULE, is_valid_model_name
from foldserve.swap import clean_leftovers, install_dir, staging_dir
from folding.onnx_fold import fold_onnx
from folding.precision import (DEFAULT_CALIBRATION_SAMPLES, PrecisionInfo, check_precision_options,
                               to_precision)
from folding.programs import EXPECTED, Options, detect_kind, load_user_model
from folding.report import FoldReport
from folding.source import example_input
from folding.torch_fold import fold_module
from trainer.checkpoint import file_sha256, load_checkpoint, model_from_checkpoint, save_checkpoint

logger = logging.getLogger(__name__)

OPSET = 17
SOURCE_KEYS = ("arch", "arch_args", "model_state", "task", "normalization", "class_names", "input_shape", "config",
               "dataset", "metrics", "epoch", "input_range")


@dataclass
class EntryResult:
    model_dir: Path
    version_dir: Path
    version: int
    onnx_report: FoldReport
    torch_report: FoldReport | None
    verification: dict[str, Any] | None


def check_model_name(name: str) -> str:
    if not is_valid_model_name(name):
        raise ConfigError(f"model name {name!r}: {RULE}")
    return name


def export_onnx(model: torch.nn.Module, example: torch.Tensor, *, keep_bn: bool) -> onnx.ModelProto:
    """TorchScript export with a dynamic batch axis. ``keep_bn`` turns constant folding off, which is
    what keeps torch's exporter from folding Conv+BN on its own."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), buf, dynamo=False, do_constant_folding=not keep_bn,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], opset_version=OPSET,
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
    return onnx.load_from_string(buf.getvalue())


def tensor_specs(model: onnx.ModelProto, batched: bool) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The graph's inputs and outputs (initializers excluded) as TensorSpecs, without the batch axis."""
    inits = {t.name for t in model.graph.initializer}

    def spec(vi: onnx.ValueInfoProto) -> TensorSpec:
        t = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
        return TensorSpec(vi.name, lookup(t.elem_type, "onnx", f"tensor {vi.name!r}").v2,
                          tuple(dims[1:] if batched else dims))
    return [spec(i) for i in model.graph.input if i.name not in inits], [spec(o) for o in model.graph.output]


def check_agreement(onnx_report: FoldReport, torch_report: FoldReport) -> None:
    """The ONNX pass (what is served) and the torch.fx pass (the second opinion) must fold the same BNs."""
    if (len(onnx_report.folded), len(onnx_report.skipped)) != (len(torch_report.folded), len(torch_report.skipped)):
        raise FoldError(f"the ONNX and torch.fx passes disagree: ONNX folded {len(onnx_report.folded)} and skipped "
                        f"{len(onnx_report.skipped)}, torch.fx folded {len(torch_report.folded)} and skipped "
                        f"{len(torch_report.skipped)} of {onnx_report.bn_before} BNs (the exported graph differs "
                        f"from the module); skipped: ONNX {[s.reason for s in onnx_report.skipped][:3]}, torch "
                        f"{[s.reason for s in torch_report.skipped][:3]}")


def check_compatible(model_dir: Path, config: Any, labels: list[str], replacing: int) -> None:
    """Refuse a version whose interface or labels differ from the model's other versions."""
    others = [v for v in version_numbers(model_dir) if v != replacing]
    if not others or not (model_dir / CONFIG_FILE).is_file():
        return
    old, new, old_labels = interface(read_config(model_dir)), interface(config), read_labels(model_dir)
    what = None
    if old != new:
        what = f"its interface (max_batch_size, inputs, outputs) {_fmt(old)}; this model's is {_fmt(new)}"
    elif old_labels != labels:
        what = f"{len(old_labels)} labels; this model has {len(labels)} other ones"
    if what:
        raise ConfigError(f"model {model_dir.name!r} (versions {others}) has {what}: its versions would stop "
                          f"working; fold it under a new --name")


def _fmt(iface: tuple) -> str:
    mbs, ins, outs = iface
    return f"{mbs}, " + ", ".join(f"{t.name} {t.datatype} {list(t.dims)}" for t in ins + outs)


def _fold(ckpt: dict[str, Any], model: torch.nn.Module) -> tuple[onnx.ModelProto, onnx.ModelProto, FoldReport, FoldReport]:
    example = example_input(ckpt, 2)
    reference = export_onnx(model, example, keep_bn=True)
    n_bn = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    n_bn_onnx = sum(n.op_type == "BatchNormalization" for n in reference.graph.node)
    if n_bn_onnx != n_bn:
        raise FoldError(f"the unfolded export has {n_bn_onnx} BatchNormalization nodes for {n_bn} BN layers: "
                        f"the exporter changed the graph, so it cannot serve as the reference")
    folded, onnx_report = fold_onnx(reference)
    _, torch_report = fold_module(model, (example,))
    check_agreement(onnx_report, torch_report)
    return reference, folded, onnx_report, torch_report


def _stamp(models: dict[str, onnx.ModelProto], meta: dict[str, str]) -> None:
    for role, m in models.items():
        onnx.helper.set_model_props(m, {**meta, "foldserve_role": role})
        m.producer_name, m.producer_version = "foldserve", __version__
        try:
            onnx.checker.check_model(m, full_check=True)
        except onnx.checker.ValidationError as exc:
            raise FoldError(f"the {role} ONNX model fails onnx.checker: {exc}") from None


@dataclass
class Prepared:
    """A source made ready to install: reference and folded ONNX, reports, and how to write its files."""

    reference: onnx.ModelProto
    folded: onnx.ModelProto
    onnx_report: FoldReport
    torch_report: FoldReport | None
    record: SourceRecord
    preprocess: Preprocess
    labels: list[str]
    default_name: str
    stamp: dict[str, str]
    write_source: Any                    # staging dir -> None: the source's own files
    external_data: bool = False
    calibration: Any = None              # n -> (training samples, where from): int8 without --data, or None


def _prepare_checkpoint(path: Path, opts: Options) -> Prepared:
    for flag, value in (("--normalize", opts.normalize), ("--input-shape", opts.input_shape),
                        ("--input-name", opts.input_name), ("--output-name", opts.output_name)):
        if value:
            raise ConfigError(f"{flag} is for models brought from elsewhere: a foldserve checkpoint records its own "
                              f"input, names and normalisation")
    ckpt_path = path / "checkpoint.pt" if path.is_dir() else path
    try:
        ckpt = load_checkpoint(ckpt_path)
    except CheckpointError as exc:
        if "not a foldserve checkpoint" in str(exc):
            raise CheckpointError(f"{ckpt_path.name}: a torch.save file that is not a foldserve checkpoint; fold "
                                  f"takes {EXPECTED}") from None
        if "cannot be read" not in str(exc):
            raise
        raise CheckpointError(f"{ckpt_path.name}: a torch.save pickle that is not a foldserve checkpoint "
                              f"({str(exc).split('(', 1)[-1].rstrip(')')}); foldserve does not unpickle code: save a "
                              f"module with torch.export.save(torch.export.export(model, (x,)), 'model.pt2'), "
                              f"torch.jit.save, or as ONNX") from None
    model = model_from_checkpoint(ckpt)
    reference, folded, onnx_report, torch_report = _fold(ckpt, model)
    labels = list(ckpt["class_names"]) if ckpt["task"] == "classification" else []
    shape = list(ckpt["arch_args"]["input_shape"])
    record = SourceRecord(kind="checkpoint", original=ckpt_path.name, sha256=file_sha256(ckpt_path),
                          input_shape=shape, normalization=ckpt["normalization"], task=ckpt["task"],
                          data=str(Path(opts.data).resolve()) if opts.data else None)
    preprocess = Preprocess(input_shape=shape, normalization=ckpt["normalization"], input_range=ckpt.get("input_range"),
                            task=ckpt["task"], class_names=labels, dataset=ckpt.get("dataset", {}))
    source = {k: ckpt[k] for k in SOURCE_KEYS if k in ckpt}

    def calibration(n: int) -> tuple[np.ndarray | None, str]:
        from folding.source import training_samples

        x = training_samples(ckpt, n)
        return x, f"{len(x) if x is not None else 0} samples of the training split of {ckpt.get('dataset', {}).get('name')}"
    return Prepared(reference, folded, onnx_report, torch_report, record, preprocess, labels,
                    f"{ckpt.get('dataset', {}).get('name', 'model')}_{ckpt['arch']}",
                    {"task": ckpt["task"], "arch": ckpt["arch"]},
                    lambda staging: save_checkpoint(staging / SOURCE_FILE, source), calibration=calibration)


def _prepare_user_model(path: Path, kind: str, opts: Options, labels_file: str | None) -> Prepared:
    um = load_user_model(path, kind, opts, file_sha256(path))
    folded, onnx_report = fold_onnx(um.reference)
    record = um.record
    labels = _read_labels_file(labels_file, folded, record) if labels_file else []
    preprocess = Preprocess(input_name=record.input_name, output_name=record.output_name,
                            input_shape=record.input_shape, normalization=record.normalization,
                            normalization_in_model=True, task=record.task, class_names=labels,
                            dataset={"data": Path(record.data).name} if record.data else {})

    def write_source(staging: Path) -> None:
        if kind != "onnx":
            shutil.copyfile(path, staging / record.file)
    return Prepared(um.reference, folded, onnx_report, None, record, preprocess, labels, _default_name(path),
                    {"task": record.task, "source_kind": kind, "source_file": path.name}, write_source,
                    um.external_data)


def _calibration(prepared: Prepared, opts: Options, n: int) -> tuple[np.ndarray | None, str]:
    """int8 calibration samples: --calibration-data, else the first n of --data, else the training split."""
    if opts.calibration_data:
        return _data_calibration(opts.calibration_data, prepared.record.input_shape, n, None)
    if opts.data:
        return _data_calibration(opts.data, prepared.record.input_shape, n, prepared.record)
    return prepared.calibration(n) if prepared.calibration else (None, "")


def _data_calibration(data: str, shape: list[int], n: int, record: SourceRecord | None) -> tuple[np.ndarray, str]:
    """The first ``n`` samples of --data calibrate; verification then uses the others (when there are any).
    With --calibration-data (``record`` None) the file is for calibration only."""
    from folding.source import load_samples

    x, _ = load_samples(data, shape, 1 << 30, np.float32)
    if record is None:
        return x[:n], f"{min(n, len(x))} samples of {Path(data).name}"
    if len(x) > n:
        record.data_skip = n
        return x[:n], f"the first {n} of {len(x)} samples of {Path(data).name} (verification uses the other {len(x) - n})"
    logger.warning("--data has %d samples, not more than --calibration-samples %d: calibration and verification "
                   "use the same samples", len(x), n)
    return x, f"all {len(x)} samples of {Path(data).name} (also the verification samples)"


def _default_name(path: Path) -> str:
    stem = path.name.split(".")[0]
    if not is_valid_model_name(stem):
        raise ConfigError(f"{path.name}: its name does not make a model name ({RULE}); pass --name")
    return stem


def _read_labels_file(labels_file: str, folded: onnx.ModelProto, record: SourceRecord) -> list[str]:
    try:
        labels = [line.strip() for line in Path(labels_file).read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--labels {Path(labels_file).name}: unreadable ({exc.strerror or exc})") from None
    dims = [d.dim_value for d in folded.graph.output[0].type.tensor_type.shape.dim]
    classes = dims[-1] if dims and dims[-1] > 0 else None
    if record.task != "classification" or (classes is not None and classes != len(labels)):
        raise ConfigError(f"--labels has {len(labels)} names; the model's output {record.output_name!r} has shape "
                          f"{dims}: labels need an output [batch, {len(labels)}]")
    return labels


def _write_version(staging: Path, prepared: Prepared, reports: dict[str, Any], served: onnx.ModelProto,
                   precision: PrecisionInfo) -> None:
    for role, model in ((REFERENCE_FILE, prepared.reference), (MODEL_FILE, served)):
        if prepared.external_data:
            onnx.save(model, str(staging / role), save_as_external_data=True, all_tensors_to_one_file=True,
                      location=f"{role}.data", size_threshold=1024)
        else:
            onnx.save(model, str(staging / role))
    prepared.write_source(staging)
    write_json(staging / SOURCE_RECORD_FILE, prepared.record.to_dict())
    if prepared.labels:
        write_text(staging / LABELS_FILE, "\n".join(prepared.labels) + "\n")
    write_json(staging / PREPROCESS_FILE, prepared.preprocess.to_dict())
    write_json(staging / FOLD_REPORT_FILE, reports)
    if precision.precision != "fp32":
        write_json(staging / PRECISION_FILE, precision.to_dict())


def build_entry(source: str | Path, repository: str | Path, name: str | None = None,
                version: int | None = None, *, max_batch_size: int = 64, max_queue_delay_us: int = 2000,
                verify: bool = True, verify_options: Any = None, force: bool = False,
                options: Options | None = None, labels_file: str | None = None, precision: str = "fp32",
                calibration_method: str = "minmax",
                calibration_samples: int = DEFAULT_CALIBRATION_SAMPLES) -> EntryResult:
    """model (checkpoint, ONNX, .pt2, TorchScript) -> fold -> (fp16 / int8) -> (verify) -> REPO/NAME/VERSION,
    atomically."""
    path, opts = Path(source), options or Options()
    check_precision_options(precision, calibration_method, calibration_samples)
    kind = detect_kind(path)
    _check_options(kind, opts, max_batch_size, precision, labels_file)
    if name is not None:
        check_model_name(name)
    model_dir = Path(repository) / name if name else None
    if model_dir is not None:
        version = _check_version(model_dir, name, version, force)
    prepared = (_prepare_checkpoint(path, opts) if kind == "checkpoint"
                else _prepare_user_model(path, kind, opts, labels_file))
    if model_dir is None:
        name = check_model_name(prepared.default_name)
        model_dir = Path(repository) / name
        version = _check_version(model_dir, name, version, force)
    version_dir = model_dir / str(version)
    batched = prepared.record.batch is None
    inputs, outputs = tensor_specs(prepared.folded, batched=batched)
    config = make_config(name, inputs, outputs, max_batch_size=max_batch_size if batched else 0,
                         max_queue_delay_us=max_queue_delay_us,
                         label_output=outputs[0].name if prepared.labels else None)
    config.parameters["foldserve_precision"].string_value = _model_precision(model_dir, version, precision)
    calibration, calibration_source = (_calibration(prepared, opts, calibration_samples) if precision == "int8"
                                       else (None, ""))
    served, precision_info = to_precision(prepared.folded, precision, calibration=calibration,
                                          method=calibration_method, source=calibration_source)
    check_compatible(model_dir, config, prepared.labels, version)
    onnx_report, torch_report = prepared.onnx_report, prepared.torch_report
    sha = prepared.record.sha256
    _stamp({"reference": prepared.reference, "served": prepared.folded}, {
        "foldserve_version": __version__, "source_sha256": sha, "bn_before": str(onnx_report.bn_before),
        "bn_folded": str(len(onnx_report.folded)), "bn_skipped": str(len(onnx_report.skipped)),
        "precision": precision, **prepared.stamp})
    if served is not prepared.folded:
        _stamp({"served": served}, {"foldserve_version": __version__, "source_sha256": sha, "precision": precision,
                                    **prepared.stamp})
    reports = {"onnx": onnx_report.to_dict(), "torch": torch_report.to_dict() if torch_report else None,
               "source_kind": kind, "source_sha256": sha, "foldserve_version": __version__}
    created = not model_dir.exists()
    try:
        verification = _install(model_dir, version_dir, config, prepared.labels, verify, verify_options,
                                lambda staging: _write_version(staging, prepared, reports, served, precision_info))
    except BaseException:
        if created and not version_numbers(model_dir):
            shutil.rmtree(model_dir, ignore_errors=True)  # an interrupted first fold leaves no empty model
        raise
    logger.info("repository entry %s version %d: %s", name, version, onnx_report.summary())
    return EntryResult(model_dir, version_dir, version, onnx_report, torch_report, verification)


def _check_options(kind: str, opts: Options, max_batch_size: int, precision: str, labels_file: str | None) -> None:
    if max_batch_size < 1:
        raise ConfigError(f"--max-batch-size must be >= 1, got {max_batch_size}")
    for flag, value in (("--data", opts.data), ("--calibration-data", opts.calibration_data)):
        if value and not Path(value).is_file():
            raise ConfigError(f"{flag} {value}: no such file (expected an .npz with x and optional y)")
    if opts.calibration_data and precision != "int8":
        raise ConfigError("--calibration-data goes with --precision int8")
    if labels_file and kind == "checkpoint":
        raise ConfigError("--labels is for models brought from elsewhere: a checkpoint records its class names")


def _model_precision(model_dir: Path, version: int, precision: str) -> str:
    """config.pbtxt's foldserve_precision: the precision of every version, or "mixed" (each version's
    precision.json, and the config the server serves per version, say which)."""
    from foldserve.entry import read_precision

    others = {read_precision(model_dir / str(v)).get("precision", "fp32") for v in version_numbers(model_dir)
              if v != version}
    return precision if others <= {precision} else "mixed"


def _check_version(model_dir: Path, name: str, version: int | None, force: bool) -> int:
    version = version if version is not None else next_version(model_dir)
    if version < 1:
        raise ConfigError(f"--version must be >= 1, got {version}")
    if (model_dir / str(version)).exists() and not force:
        raise ConfigError(f"{name}/{version} already exists; choose another --version or pass --force")
    return version


def _install(model_dir: Path, version_dir: Path, config: Any, labels: list[str], verify: bool, verify_options: Any,
             write_files: Any) -> dict[str, Any] | None:
    """Stage the version (files, verification), swap it into place, then write the model's shared files."""
    from folding.verify import verify_entry

    try:
        model_dir.mkdir(parents=True, exist_ok=True)
        clean_leftovers(model_dir)
        staging = staging_dir(model_dir, version_dir.name)
    except OSError as exc:
        raise WriteError(_write_failure(exc, model_dir)) from None
    try:
        write_files(staging)
        verification = verify_entry(staging, verify_options) if verify else None
        install_dir(staging, version_dir)
        if labels:
            write_text(model_dir / LABELS_FILE, "\n".join(labels) + "\n")
        write_config(model_dir, config)
        return verification
    except OSError as exc:
        raise WriteError(_write_failure(exc, model_dir)) from None
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _write_failure(exc: OSError, where: Path) -> str:
    reason = "the disk is full" if exc.errno == errno.ENOSPC else (exc.strerror or type(exc).__name__)
    return f"cannot write the entry in {where.name!r}: {reason}; the repository is unchanged"


def fold_onnx_file(src: str | Path, dst: str | Path) -> FoldReport:
    """``foldserve fold --onnx IN --out OUT``: fold any ONNX file, check it, write it atomically."""
    src = Path(src)
    if not src.is_file():
        raise ConfigError(f"--onnx {src}: no such file")
    try:
        model = onnx.load(str(src))
    except Exception as exc:  # onnx raises DecodeError, ValueError, ... for a bad file
        raise FoldError(f"--onnx {src}: not a readable ONNX model ({type(exc).__name__}: {exc})") from None
    folded, report = fold_onnx(model)
    try:
        onnx.checker.check_model(folded, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise FoldError(f"the folded model fails onnx.checker: {exc}") from None
    try:
        if _has_external_data(src):
            _save_with_external_data(folded, Path(dst))
        else:
            write_bytes(dst, folded.SerializeToString())
        write_json(Path(str(dst) + ".fold_report.json"), report.to_dict())
    except OSError as exc:
        raise WriteError(_write_failure(exc, Path(dst).parent)) from None
    return report


def _has_external_data(path: Path) -> bool:
    header = onnx.load(str(path), load_external_data=False)
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in header.graph.initializer)


def _save_with_external_data(model: onnx.ModelProto, dst: Path) -> None:
    """Keep the input's layout: DST plus its weights in DST.data beside it, both moved into place atomically
    (the data file first, so the model file never points at data that is not there)."""
    staging = staging_dir(dst.parent, dst.name)
    try:
        data_name = f"{dst.name}.data"
        onnx.save(model, str(staging / dst.name), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=data_name, size_threshold=1024)
        if (staging / data_name).exists():
            os.replace(staging / data_name, dst.parent / data_name)
        os.replace(staging / dst.name, dst)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
