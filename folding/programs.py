"""What models users bring need before they fold: the flags that say what a model may not say about itself
(``Options``), reading an ONNX file, and the graph edits every kind shares (``finish_reference``: names,
per-sample shape, batch axis, normalisation). The kinds themselves are classes in :mod:`folding.kinds`.

The declared normalisation (``--normalize``) is prepended to the reference as ``(x - mean) / std`` nodes,
so it is part of both the reference and the served model, as the trainer's ``Normalize`` layer is.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from foldserve.datatypes import lookup
from foldserve.entry import OUTPUT_NAME
from foldserve.errors import CheckpointError, ConfigError
from foldserve.records import SourceRecord, first_line

logger = logging.getLogger(__name__)
EXPECTED = ("a foldserve checkpoint, an ONNX model (.onnx), a torch.export program (torch.export.save, .pt2) "
            "or a TorchScript file (torch.jit.save)")


@dataclass
class Options:
    """What a model may not say about itself (flags of ``foldserve fold``)."""

    input_shape: list[int] | None = None
    normalize: dict[str, list[float]] | None = None
    input_name: str | None = None
    output_name: str | None = None
    data: str | None = None
    calibration_data: str | None = None   # int8: calibrate on these samples instead of --data / training data


# --- reading ONNX -------------------------------------------------------------------------------------

def load_onnx_file(path: Path, external: bool = True) -> onnx.ModelProto:
    try:
        model = onnx.load(str(path), load_external_data=external)
    except Exception as exc:  # DecodeError, ValueError, OSError (missing external data), ...
        raise CheckpointError(f"{path.name}: not {EXPECTED}; read as ONNX it fails ({first_line(exc, 200)})") from None
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


def resolve_shape(model_dims: list[int | None], given: list[int] | None, where: str) -> list[int]:
    """Per-sample dims: the model's where it says, --input-shape where a dimension is symbolic."""
    if given is None:
        if any(d is None for d in model_dims):
            raise ConfigError(f"{where} has symbolic dimensions {['?' if d is None else d for d in model_dims]} "
                              f"(per sample): pass --input-shape with concrete ones, e.g. "
                              f"{','.join(str(d or 224) for d in model_dims)}")
        return [int(d) for d in model_dims]
    if len(given) != len(model_dims) or any(d is not None and d != g for d, g in zip(model_dims, given, strict=False)):
        raise ConfigError(f"--input-shape {','.join(map(str, given))} does not fit {where}, whose per-sample shape "
                          f"is {['?' if d is None else d for d in model_dims]}")
    return given


def _check_normalization(norm: dict[str, list[float]] | None, shape: list[int]) -> None:
    if norm and len(norm["mean"]) not in (1, shape[0] if shape else 1):
        raise ConfigError(f"--normalize has {len(norm['mean'])} values per statistic; the input has "
                          f"{shape[0] if shape else 0} "
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


def finish_reference(reference: onnx.ModelProto, record: SourceRecord, opts: Options, what: str, *,
                     rename_output: bool) -> None:
    """Names, shape, batch axis and normalisation, common to every kind (``rename_output``: the output is
    called ``output`` unless --output-name says otherwise; an ONNX file keeps its own)."""
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
    record.input_shape = resolve_shape(dims[1:], opts.input_shape, f"{what} input {vi.name!r}")
    if opts.input_name:
        rename_tensor(reference, vi.name, opts.input_name)
    if opts.output_name or rename_output:
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
