"""Build a model-repository entry in Triton's layout from a trainer checkpoint.

::

    REPO/NAME/config.pbtxt            platform onnxruntime_onnx, max_batch_size, inputs/outputs, batching
    REPO/NAME/labels.txt              class names (Triton's label_filename)
    REPO/NAME/VERSION/model.onnx      the folded model that is served
    REPO/NAME/VERSION/reference.onnx  the unfolded model, BatchNormalization nodes kept
    REPO/NAME/VERSION/source.pt       the trainer checkpoint's model (weights_only loadable, no optimiser)
    REPO/NAME/VERSION/fold_report.json, preprocess.json, labels.txt, verification.json

The served ``model.onnx`` is ``fold_onnx(reference.onnx)``: every fold site keeps its tensor name, which
is what lets the verifier compare the two graphs layer by layer. ``fold_module`` folds the same model in
PyTorch; both reports are saved and must agree. A version folder is assembled in a staging folder and
renamed into place, so a reader never sees half an entry.
"""
from __future__ import annotations

import io
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import torch

from foldserve import __version__
from foldserve.atomic import write_json, write_text
from foldserve.errors import CheckpointError, ConfigError, FoldError
from foldserve.names import RULE, is_valid_model_name
from folding.onnx_fold import fold_onnx
from folding.torch_fold import fold_module
from trainer.checkpoint import file_sha256, load_checkpoint, model_from_checkpoint, save_checkpoint

logger = logging.getLogger(__name__)

OPSET = 17
INPUT_NAME, OUTPUT_NAME = "input", "output"
ONNX_TO_TRITON = {onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.FLOAT16: "TYPE_FP16",
                  onnx.TensorProto.BFLOAT16: "TYPE_BF16", onnx.TensorProto.DOUBLE: "TYPE_FP64",
                  onnx.TensorProto.INT64: "TYPE_INT64", onnx.TensorProto.INT32: "TYPE_INT32"}


@dataclass
class EntryResult:
    model_dir: Path
    version_dir: Path
    version: int
    onnx_report: Any
    torch_report: Any
    verification: dict[str, Any] | None


def check_model_name(name: str) -> str:
    if not is_valid_model_name(name):
        raise ConfigError(f"model name {name!r}: {RULE}")
    return name


def export_onnx(model: torch.nn.Module, example: torch.Tensor, *, keep_bn: bool) -> onnx.ModelProto:
    """TorchScript export with a dynamic batch axis. ``keep_bn`` turns constant folding off, which is
    what keeps torch's exporter from folding Conv+BN on its own."""
    buf = io.BytesIO()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), buf, dynamo=False, do_constant_folding=not keep_bn,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], opset_version=OPSET,
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
    return onnx.load_from_string(buf.getvalue())


def example_input(ckpt: dict[str, Any], batch: int, seed: int = 0) -> torch.Tensor:
    """Random inputs matching the saved normalisation: per channel mean + std * N(0, 1)."""
    shape = list(ckpt["arch_args"]["input_shape"])
    g = torch.Generator().manual_seed(seed)
    x = torch.randn([batch, *shape], generator=g, dtype=torch.float64)
    norm = ckpt["normalization"]
    view = [1, -1] + [1] * (len(shape) - 1)
    mean = torch.tensor(norm["mean"], dtype=torch.float64).view(view)
    std = torch.tensor(norm["std"], dtype=torch.float64).view(view)
    return (x * std + mean).to(torch.float32)


def config_pbtxt(name: str, model: onnx.ModelProto, max_batch_size: int, max_queue_delay_us: int,
                 has_labels: bool) -> str:
    def tensor_block(vi: onnx.ValueInfoProto, labels: bool) -> str:
        t = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim][1:]
        extra = '\n    label_filename: "labels.txt"' if labels else ""
        return (f'  {{\n    name: "{vi.name}"\n    data_type: {ONNX_TO_TRITON.get(t.elem_type, "TYPE_FP32")}\n'
                f'    dims: [ {", ".join(str(d) for d in dims)} ]{extra}\n  }}')

    inputs = ",\n".join(tensor_block(i, False) for i in model.graph.input
                        if i.name not in {t.name for t in model.graph.initializer})
    outputs = ",\n".join(tensor_block(o, has_labels) for o in model.graph.output)
    preferred = sorted({b for b in (4, 8, 16, 32, 64) if b <= max_batch_size})
    return (f'name: "{name}"\nplatform: "onnxruntime_onnx"\nbackend: "onnxruntime"\n'
            f"max_batch_size: {max_batch_size}\n"
            f"input [\n{inputs}\n]\noutput [\n{outputs}\n]\n"
            f"dynamic_batching {{\n  preferred_batch_size: [ {', '.join(map(str, preferred))} ]\n"
            f"  max_queue_delay_microseconds: {max_queue_delay_us}\n}}\n"
            f"version_policy: {{ latest: {{ num_versions: 1 }} }}\n"
            f"instance_group [ {{ count: 1 kind: KIND_AUTO }} ]\n")


def _next_version(model_dir: Path) -> int:
    versions = [int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()] if model_dir.is_dir() else []
    return max(versions, default=0) + 1


def build_entry(checkpoint: str | Path, repository: str | Path, name: str | None = None,
                version: int | None = None, *, max_batch_size: int = 64, max_queue_delay_us: int = 2000,
                verify: bool = True, verify_options: Any = None, force: bool = False) -> EntryResult:
    """checkpoint -> fold -> export -> (verify) -> REPO/NAME/VERSION, atomically."""
    ckpt_path = Path(checkpoint)
    if ckpt_path.is_dir():
        ckpt_path = ckpt_path / "checkpoint.pt"
    ckpt = load_checkpoint(ckpt_path)
    model = model_from_checkpoint(ckpt)
    name = check_model_name(name or f"{ckpt.get('dataset', {}).get('name', 'model')}_{ckpt['arch']}")
    if max_batch_size < 1:
        raise ConfigError(f"--max-batch-size must be >= 1, got {max_batch_size}")
    model_dir = Path(repository) / name
    version = version if version is not None else _next_version(model_dir)
    if version < 1:
        raise ConfigError(f"--version must be >= 1, got {version}")
    version_dir = model_dir / str(version)
    if version_dir.exists() and not force:
        raise ConfigError(f"{version_dir} already exists; choose another --version or pass --force")

    example = example_input(ckpt, 2)
    reference = export_onnx(model, example, keep_bn=True)
    n_bn = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    n_bn_onnx = sum(n.op_type == "BatchNormalization" for n in reference.graph.node)
    if n_bn_onnx != n_bn:
        raise FoldError(f"the unfolded export has {n_bn_onnx} BatchNormalization nodes for {n_bn} BN layers: "
                        f"the exporter changed the graph, so it cannot serve as the reference")
    folded, onnx_report = fold_onnx(reference)
    _, torch_report = fold_module(model, (example,))
    if len(torch_report.folded) != len(onnx_report.folded):
        logger.warning("torch.fx folded %d BN, the ONNX pass %d: see fold_report.json",
                       len(torch_report.folded), len(onnx_report.folded))
    sha = file_sha256(ckpt_path)
    meta = {"foldserve_version": __version__, "source_checkpoint_sha256": sha,
            "source_checkpoint": str(ckpt_path.resolve()), "bn_before": str(onnx_report.bn_before),
            "bn_folded": str(len(onnx_report.folded)), "bn_skipped": str(len(onnx_report.skipped)),
            "task": ckpt["task"], "arch": ckpt["arch"]}
    for m, role in ((reference, "reference"), (folded, "served")):
        onnx.helper.set_model_props(m, {**meta, "foldserve_role": role})
        m.producer_name, m.producer_version = "foldserve", __version__
        try:
            onnx.checker.check_model(m, full_check=True)
        except onnx.checker.ValidationError as exc:
            raise FoldError(f"the {role} ONNX model fails onnx.checker: {exc}") from None

    model_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{version}-", dir=model_dir))
    staging.chmod(0o755)
    try:
        onnx.save(reference, staging / "reference.onnx")
        onnx.save(folded, staging / "model.onnx")
        source = {k: ckpt[k] for k in ("arch", "arch_args", "model_state", "task", "normalization", "class_names",
                                       "input_shape", "config", "dataset", "metrics", "epoch") if k in ckpt}
        save_checkpoint(staging / "source.pt", source)
        labels = list(ckpt["class_names"]) if ckpt["task"] == "classification" else []
        if labels:
            write_text(staging / "labels.txt", "\n".join(labels) + "\n")
        write_json(staging / "preprocess.json", {
            "input_name": INPUT_NAME, "output_name": OUTPUT_NAME, "input_shape": ckpt["arch_args"]["input_shape"],
            "normalization": ckpt["normalization"], "normalization_in_model": True, "task": ckpt["task"],
            "class_names": labels, "dataset": ckpt.get("dataset", {})})
        write_json(staging / "fold_report.json", {
            "onnx": onnx_report.to_dict(), "torch": torch_report.to_dict(), "source_checkpoint_sha256": sha,
            "foldserve_version": __version__})
        verification = None
        if verify:
            from folding.verify import verify_entry

            verification = verify_entry(staging, verify_options)
        if version_dir.exists():
            shutil.rmtree(version_dir)
        os.replace(staging, version_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    if labels:
        write_text(model_dir / "labels.txt", "\n".join(labels) + "\n")
    write_text(model_dir / "config.pbtxt", config_pbtxt(name, folded, max_batch_size, max_queue_delay_us, bool(labels)))
    logger.info("repository entry %s version %d: %s", name, version, onnx_report.summary())
    return EntryResult(model_dir, version_dir, version, onnx_report, torch_report, verification)


def fold_onnx_file(src: str | Path, dst: str | Path) -> Any:
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
    from foldserve.atomic import write_bytes

    write_bytes(dst, folded.SerializeToString())
    write_json(Path(str(dst) + ".fold_report.json"), report.to_dict())
    return report


def load_source(version_dir: Path) -> dict[str, Any]:
    try:
        return load_checkpoint(version_dir / "source.pt")
    except CheckpointError as exc:
        raise CheckpointError(f"{version_dir}: {exc}") from None


def model_input_dtype(model: onnx.ModelProto) -> str:
    t = model.graph.input[0].type.tensor_type.elem_type
    return {onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.BFLOAT16: "bfloat16",
            onnx.TensorProto.DOUBLE: "float64"}.get(t, "float32")

