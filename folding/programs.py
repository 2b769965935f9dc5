"""Models users bring: an ONNX file, a ``torch.export`` program (``.pt2``) or a TorchScript file.

``detect_kind`` tells them apart (and from a trainer checkpoint) by their content, not their name, and
answers a file of none of these kinds in one line. ``load_user_model`` turns one into what an entry
needs: the unfolded reference ONNX (BatchNormalization kept; for an ONNX file, the file itself), the
input's name, per-sample shape and batch axis, and the source record the verifier reruns it from.
The declared normalisation (``--normalize``) is prepended to the reference as ``(x - mean) / std`` nodes,
so it is part of both the reference and the served model, as the trainer's ``Normalize`` layer is.
"""
from __future__ import annotations

import contextlib
import io
import logging
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from foldserve.datatypes import lookup
from foldserve.entry import OUTPUT_NAME, SourceRecord
from foldserve.errors import CheckpointError, ConfigError, FoldError

logger = logging.getLogger(__name__)

OPSET = 17
DYNAMO_OPSET = 18
EXPECTED = ("a foldserve checkpoint, an ONNX model (.onnx), a torch.export program (torch.export.save, .pt2) "
            "or a TorchScript file (torch.jit.save)")


@dataclass
class UserModel:
    """A user's model made ready for folding: the reference ONNX and how to rerun the original."""

    reference: onnx.ModelProto          # unfolded, BatchNormalization kept, normalisation prepended
    record: SourceRecord
    program: Any = None                 # the loaded torch program (pt2 / TorchScript), None for ONNX
    external_data: bool = False         # the ONNX file kept its weights beside it: keep that layout


@dataclass
class Options:
    """What a model may not say about itself (flags of ``foldserve fold``)."""

    input_shape: list[int] | None = None
    normalize: dict[str, list[float]] | None = None
    input_name: str | None = None
    output_name: str | None = None
    data: str | None = None
    calibration_data: str | None = None   # int8: calibrate on these samples instead of --data / training data


# --- what kind of file ---------------------------------------------------------------------------------

def _zip_names(path: Path) -> list[str] | None:
    try:
        with zipfile.ZipFile(path) as z:
            return z.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return None


def detect_kind(path: str | Path) -> str:
    """checkpoint | onnx | pt2 | torchscript, from the file's content; CheckpointError (exit 2) otherwise."""
    path = Path(path)
    if path.is_dir() and (path / "checkpoint.pt").is_file():
        return "checkpoint"
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
            return "pt2"
        if "constants.pkl" in tails or any(t.startswith("code/") for t in tails):
            return "torchscript"
        if "data.pkl" in tails:
            return "checkpoint"         # a torch.save file: load_checkpoint tells a checkpoint from other pickles
        raise CheckpointError(f"{path.name}: a zip archive with none of the files of {EXPECTED}")
    if head[:1] == b"\x80":
        return "checkpoint"             # a legacy (non-zip) torch.save pickle
    _load_onnx(path, external=False)    # raises the one line when it is not ONNX either
    return "onnx"


def _load_onnx(path: Path, external: bool = True) -> onnx.ModelProto:
    try:
        model = onnx.load(str(path), load_external_data=external)
    except Exception as exc:  # DecodeError, ValueError, OSError (missing external data), ...
        what = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path.name}: not {EXPECTED}; read as ONNX it fails ({what})") from None
    if not model.graph.node or not model.opset_import or model.ir_version < 3:
        raise CheckpointError(f"{path.name}: not {EXPECTED} (read as ONNX it has no graph: a truncated or "
                              f"foreign file)")
    return model


# --- options ------------------------------------------------------------------------------------------

def parse_shape(text: str | None, flag: str = "--input-shape") -> list[int] | None:
    if not text:
        return None
    try:
        dims = [int(d) for d in text.replace("x", ",").split(",") if d.strip()]
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: expected positive integers per sample, e.g. 3,224,224") from None
    if not dims or min(dims) < 1:
        raise ConfigError(f"{flag} {text!r}: expected positive integers per sample, e.g. 3,224,224")
    return dims


def parse_normalize(text: str | None) -> dict[str, list[float]] | None:
    """``MEAN,..:STD,..`` -> {"mean": [...], "std": [...]} (one value per channel, or one for all)."""
    if not text:
        return None
    try:
        mean_s, std_s = text.split(":")
        mean = [float(v) for v in mean_s.split(",")]
        std = [float(v) for v in std_s.split(",")]
    except ValueError:
        raise ConfigError(f"--normalize {text!r}: expected MEAN,..:STD,.. e.g. 0.485,0.456,0.406:0.229,0.224,0.225"
                          ) from None
    if len(mean) != len(std) or not all(np.isfinite(mean)) or not all(np.isfinite(s) and s > 0 for s in std):
        raise ConfigError(f"--normalize {text!r}: as many means as standard deviations, finite, std > 0")
    return {"mean": mean, "std": std}


def _resolve_shape(model_dims: list[int | None], given: list[int] | None, where: str) -> list[int]:
    """Per-sample dims: the model's where it says, --input-shape where a dimension is symbolic."""
    if given is None:
        if any(d is None for d in model_dims):
            raise ConfigError(f"{where} has symbolic dimensions {['?' if d is None else d for d in model_dims]} "
                              f"(per sample): pass --input-shape with concrete ones, e.g. "
                              f"{','.join(str(d or 224) for d in model_dims)}")
        return [int(d) for d in model_dims]
    if len(given) != len(model_dims) or any(d is not None and d != g for d, g in zip(model_dims, given)):
        raise ConfigError(f"--input-shape {','.join(map(str, given))} does not fit {where}, whose per-sample shape "
                          f"is {['?' if d is None else d for d in model_dims]}")
    return given


def _check_normalization(norm: dict[str, list[float]] | None, shape: list[int]) -> None:
    if norm and len(norm["mean"]) not in (1, shape[0] if shape else 1):
        raise ConfigError(f"--normalize has {len(norm['mean'])} values per statistic; the input has {shape[0] if shape else 0} "
                          f"channels (axis 1): give one per channel or one for all")


# --- ONNX graph edits ---------------------------------------------------------------------------------

def rename_tensor(model: onnx.ModelProto, old: str, new: str) -> None:
    """Rename a graph input/output (and every use of it)."""
    if old == new:
        return
    g = model.graph
    if any(new in (*n.input, *n.output) for n in g.node) or any(new == i.name for i in g.initializer):
        raise ConfigError(f"cannot name a tensor {new!r}: the model already has a tensor of that name")
    for n in g.node:
        n.input[:] = [new if i == old else i for i in n.input]
        n.output[:] = [new if o == old else o for o in n.output]
    for vi in (*g.input, *g.output, *g.value_info):
        if vi.name == old:
            vi.name = new


def prepend_normalization(model: onnx.ModelProto, norm: dict[str, list[float]], rank: int) -> None:
    """``input -> (input - mean) / std -> the model``, constants shaped [1, C, 1, ...] in the input's type."""
    g = model.graph
    name = g.input[0].name
    dtype = lookup(g.input[0].type.tensor_type.elem_type, "onnx", f"input {name!r}").numpy
    inner = f"{name}__normalized"
    for n in g.node:
        n.input[:] = [inner if i == name else i for i in n.input]
    view = (1, -1) + (1,) * max(rank - 2, 0)
    mean = onnx.numpy_helper.from_array(np.asarray(norm["mean"], np.float64).reshape(view).astype(dtype),
                                        f"{name}__mean")
    std = onnx.numpy_helper.from_array(np.asarray(norm["std"], np.float64).reshape(view).astype(dtype),
                                       f"{name}__std")
    g.initializer.extend([mean, std])
    centred = f"{name}__centred"
    nodes = [onnx.helper.make_node("Sub", [name, mean.name], [centred], name="foldserve_normalize_sub"),
             onnx.helper.make_node("Div", [centred, std.name], [inner], name="foldserve_normalize_div")]
    for i, n in enumerate(nodes):
        g.node.insert(i, n)


def _input_dims(vi: onnx.ValueInfoProto) -> list[int | None]:
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
            for d in vi.type.tensor_type.shape.dim]


def _check_single_io(model: onnx.ModelProto, what: str) -> None:
    """One input and one output; initializers listed as graph inputs (old exporters) become plain constants."""
    g = model.graph
    inits = {t.name for t in g.initializer}
    inputs = [i for i in g.input if i.name not in inits]
    outputs = [o.name for o in g.output]
    if len(inputs) != 1 or len(outputs) != 1:
        raise ConfigError(f"{what} has inputs {[i.name for i in inputs]} and outputs {outputs}: foldserve folds "
                          f"and verifies models with one input and one output")
    rest = [i for i in g.input if i.name in inits] if model.ir_version < 4 else []
    del g.input[:]
    g.input.extend(inputs + rest)


def _finish(reference: onnx.ModelProto, record: SourceRecord, opts: Options, what: str) -> None:
    """Names, shape, batch axis and normalisation, common to every kind."""
    _check_single_io(reference, what)
    vi = reference.graph.input[0]
    elem = vi.type.tensor_type.elem_type
    dtype = lookup(elem, "onnx", f"{what} input {vi.name!r}").numpy
    if not np.issubdtype(dtype, np.floating) and not opts.data:
        raise ConfigError(f"{what} takes {dtype.name} input {vi.name!r}: random verification inputs need a float "
                          f"input; pass real samples with --data FILE.npz")
    dims = _input_dims(vi)
    if not dims:
        raise ConfigError(f"{what}: input {vi.name!r} has no shape; export it with a shape (batch first)")
    record.batch = dims[0]                 # None: dynamic batch axis
    record.input_shape = _resolve_shape(dims[1:], opts.input_shape, f"{what} input {vi.name!r}")
    if opts.input_name:
        rename_tensor(reference, vi.name, opts.input_name)
    if opts.output_name or record.kind != "onnx":
        rename_tensor(reference, reference.graph.output[0].name, opts.output_name or OUTPUT_NAME)
    record.input_name = reference.graph.input[0].name
    record.output_name = reference.graph.output[0].name
    if opts.normalize:
        if not np.issubdtype(dtype, np.floating):
            raise ConfigError(f"--normalize needs a float input; {what}'s is {dtype.name}")
        _check_normalization(opts.normalize, record.input_shape)
        prepend_normalization(reference, opts.normalize, 1 + len(record.input_shape))
        record.normalization = opts.normalize
    out_rank = len(reference.graph.output[0].type.tensor_type.shape.dim)
    record.task = "classification" if out_rank == 2 else "other"
    record.data = str(Path(opts.data).resolve()) if opts.data else None


# --- loading each kind --------------------------------------------------------------------------------

def load_user_model(path: str | Path, kind: str, opts: Options, sha256: str) -> UserModel:
    path = Path(path)
    record = SourceRecord(kind=kind, original=path.name, sha256=sha256)
    if kind == "onnx":
        return _from_onnx(path, record, opts)
    program = load_program(path, kind)
    reference = export_program(program, kind, opts, path.name)
    _finish(reference, record, opts, path.name)
    return UserModel(reference, record, program)


def _from_onnx(path: Path, record: SourceRecord, opts: Options) -> UserModel:
    header = onnx.load(str(path), load_external_data=False)
    external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in header.graph.initializer)
    model = _load_onnx(path, external=True)
    try:
        onnx.checker.check_model(model if not external else str(path))
    except onnx.checker.ValidationError as exc:
        raise CheckpointError(f"{path.name}: an invalid ONNX model ({str(exc).splitlines()[0][:200]})") from None
    _finish(model, record, opts, path.name)
    record.truth_dtype = "float32"         # the file itself, run by onnxruntime with optimisations off
    return UserModel(model, record, None, external)


def _check_pt2_schema(path: Path) -> None:
    """A program saved by a torch with another export schema (major version) cannot load: say which."""
    import json

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


def load_program(path: Path, kind: str) -> Any:
    """A torch.export ExportedProgram or a TorchScript module, in eval mode; one line when it cannot load."""
    if kind == "pt2":
        _check_pt2_schema(path)
    export_log = logging.getLogger("torch.export")
    level = export_log.level
    try:
        export_log.setLevel(logging.CRITICAL)   # torch.export.load logs a traceback before it raises
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if kind == "pt2":
                return torch.export.load(str(path))
            module = torch.jit.load(str(path), map_location="cpu")
            module.eval()
            return module
    except Exception as exc:  # SerializeError (another torch's schema), RuntimeError (bad archive), ...
        what = str(exc).strip().splitlines()[0][:240] if str(exc).strip() else type(exc).__name__
        label = "torch.export program" if kind == "pt2" else "TorchScript file"
        raise CheckpointError(f"{path.name}: a {label} that torch {torch.__version__.split('+')[0]} cannot load "
                              f"({what})") from None
    finally:
        export_log.setLevel(level)


def program_module(program: Any, kind: str) -> torch.nn.Module:
    """A fresh callable module of the program (ExportedProgram.module() checks shapes as exported)."""
    return program.module() if kind == "pt2" else program


def _input_signature(program: Any, kind: str, opts: Options, name: str) -> tuple[str, list[int | None]]:
    """(input name, dims with None where symbolic) of a one-input program."""
    if kind == "pt2":
        users = list(program.graph_signature.user_inputs)
        if len(users) != 1:
            raise ConfigError(f"{name}: a torch.export program with inputs {users}: foldserve folds models with "
                              f"one input")
        node = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == users[0])
        val = node.meta.get("val")
        dims = [int(d) if isinstance(d, int) or str(d).isdigit() else None for d in val.shape]
        return users[0], dims
    args = [a.name for a in program.forward.schema.arguments][1:]
    if len(args) != 1:
        raise ConfigError(f"{name}: a TorchScript module whose forward takes {args}: foldserve folds models with "
                          f"one input")
    if not opts.input_shape:
        raise ConfigError(f"{name}: a TorchScript file does not record its input shape: pass --input-shape "
                          f"(per sample, without the batch axis), e.g. --input-shape 3,224,224")
    return args[0], [None] + list(opts.input_shape)


def count_program_bns(program: Any, kind: str) -> int:
    if kind == "pt2":
        return sum(1 for n in program.graph.nodes if n.op == "call_function" and "batch_norm" in str(n.target))
    return sum(1 for n in program.inlined_graph.nodes() if n.kind() in ("aten::batch_norm", "aten::_batch_norm_impl_index"))


def export_program(program: Any, kind: str, opts: Options, name: str) -> onnx.ModelProto:
    """The program as ONNX with BatchNormalization kept (no exporter-side fusion) and a dynamic batch axis
    where the program has one."""
    input_name, dims = _input_signature(program, kind, opts, name)
    shape = _resolve_shape(dims[1:], opts.input_shape, f"{name} input {input_name!r}")
    example = torch.randn([dims[0] or 2, *shape])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = _export_pt2(program) if kind == "pt2" else _export_torchscript(program, example, input_name)
    except ConfigError:
        raise
    except Exception as exc:
        raise FoldError(f"{name}: the ONNX export failed ({type(exc).__name__}: "
                        f"{str(exc).strip().splitlines()[0][:240] if str(exc).strip() else ''})") from None
    n_bn, n_onnx = count_program_bns(program, kind), sum(n.op_type == "BatchNormalization" for n in model.graph.node)
    if n_bn != n_onnx:
        raise FoldError(f"{name}: the unfolded export has {n_onnx} BatchNormalization nodes for the program's {n_bn} "
                        f"batch norms: the exporter changed the graph, so it cannot serve as the reference")
    return model


def _export_pt2(program: Any) -> onnx.ModelProto:
    """torch.onnx's dynamo exporter without its optimiser (which fuses Conv+BN itself); constants folded."""
    import onnx_ir
    from onnxscript.optimizer import fold_constants, remove_unused_nodes

    for noisy in ("torch.onnx", "onnx_ir", "onnxscript"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    with contextlib.redirect_stdout(io.StringIO()):   # the dynamo exporter prints its progress
        onnx_program = torch.onnx.export(program, dynamo=True, optimize=False, opset_version=DYNAMO_OPSET,
                                         verbose=False)
    fold_constants(onnx_program.model)
    remove_unused_nodes(onnx_program.model)
    return onnx_ir.serde.serialize_model(onnx_program.model)


def _export_torchscript(module: Any, example: torch.Tensor, input_name: str) -> onnx.ModelProto:
    buf = io.BytesIO()
    torch.onnx.export(module, (example,), buf, dynamo=False, do_constant_folding=False, input_names=[input_name],
                      output_names=[OUTPUT_NAME], opset_version=OPSET,
                      dynamic_axes={input_name: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
    return onnx.load_from_string(buf.getvalue())
