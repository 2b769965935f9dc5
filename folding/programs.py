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
from typing import Any

import numpy as np
import onnx

from foldserve.datatypes import lookup
from foldserve.errors import CheckpointError, ConfigError
from foldserve.records import InputRecord, SourceRecord, first_line

logger = logging.getLogger(__name__)
EXPECTED = ("a foldserve checkpoint, an ONNX model (.onnx), a torch.export program (torch.export.save, .pt2) "
            "or a TorchScript file (torch.jit.save)")


Norm = dict[str, list[float]]


@dataclass
class Options:
    """What a model may not say about itself (flags of ``foldserve fold``). ``input_shape`` and ``normalize`` are
    by input name; the key ``""`` is the unnamed form (``--input-shape 3,224,224``), which means the only input."""

    input_shape: dict[str, list[int]] | None = None
    normalize: dict[str, Norm] | None = None
    input_name: str | None = None          # NAME or NAME,NAME,... (one per input, in order)
    output_name: str | None = None         # NAME or NAME,NAME,... (one per output, in order)
    data: str | None = None
    calibration_data: str | None = None   # int8: calibrate on these samples instead of --data / training data
    accuracy_output: str | None = None     # with several outputs: the classifier whose accuracy --data y measures

    def for_input(self, table: dict[str, Any] | None, name: str, inputs: list[str], flag: str) -> Any:
        """The value given for input ``name`` (the unnamed one where the model has one input)."""
        if not table:
            return None
        unknown = sorted(set(table) - {"", *inputs})
        if unknown:
            raise ConfigError(f"{flag} names input {unknown[0]!r}; the model's inputs are {inputs}")
        if "" in table and len(inputs) > 1:
            raise ConfigError(f"{flag} without a name, but the model has inputs {inputs}: give NAME:... for each")
        return table.get(name, table.get("") if len(inputs) == 1 else None)


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

def parse_names(text: str | None, count: int, flag: str, what: str) -> list[str] | None:
    """``--input-name`` / ``--output-name``: one name per tensor, comma-separated, in the model's order."""
    if not text:
        return None
    names = [n.strip() for n in text.split(",")]
    if len(names) != count or not all(names) or len(set(names)) != len(names):
        raise ConfigError(f"{flag} {text!r}: the model has {count} {what}; give {count} distinct name(s), "
                          f"comma-separated in order")
    return names


def resolve_shape(model_dims: list[int | None], given: list[int] | None, where: str) -> list[int]:
    """Per-sample dims: the model's where it says, --input-shape where a dimension is symbolic."""
    if given is None:
        if any(d is None for d in model_dims):
            raise ConfigError(f"{where} has symbolic dimensions {['?' if d is None else d for d in model_dims]} "
                              f"(per sample): pass Options.input_shape with concrete ones, e.g. "
                              f"{','.join(str(d or 224) for d in model_dims)}")
        return [int(d) for d in model_dims]
    if len(given) != len(model_dims) or any(d is not None and d != g for d, g in zip(model_dims, given, strict=False)):
        raise ConfigError(f"Options.input_shape {','.join(map(str, given))} does not fit {where}, whose per-sample "
                          "shape "
                          f"is {['?' if d is None else d for d in model_dims]}")
    return given


def _check_normalization(norm: Norm | None, shape: list[int], name: str) -> None:
    if norm and len(norm["mean"]) not in (1, shape[0] if shape else 1):
        raise ConfigError(f"Options.normalize has {len(norm['mean'])} values per statistic; input {name!r} has "
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


def unique_outputs(model: onnx.ModelProto) -> int:
    """Give every graph output a tensor of its own: a program that returns one tensor twice (``(y.mean(), y, y)``,
    ultralytics' segmentation head) is exported with the same name listed twice, which no name-keyed runtime can
    tell apart; each repeat becomes an ``Identity`` of the first. Returns how many were added."""
    g = model.graph
    seen: set[str] = set()
    taken = {t for n in g.node for t in (*n.input, *n.output)} | {i.name for i in (*g.input, *g.initializer)}
    added = 0
    for out in g.output:
        if out.name not in seen:
            seen.add(out.name)
            continue
        k, new = 1, f"{out.name}__{1}"
        while new in taken:
            k += 1
            new = f"{out.name}__{k}"
        g.node.append(onnx.helper.make_node("Identity", [out.name], [new], name=f"foldserve_output_copy_{new}"))
        taken.add(new)
        out.name = new
        added += 1
    return added


def prepend_normalization(model: onnx.ModelProto, norm: Norm, rank: int, name: str | None = None) -> None:
    """``input -> (input - mean) / std -> the model``, constants shaped [1, C, 1, ...] in the input's type."""
    g = model.graph
    vi = next(i for i in g.input if i.name == name) if name else g.input[0]
    name = vi.name
    dtype = lookup(vi.type.tensor_type.elem_type, "onnx", f"input {name!r}").numpy
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
    suffix = "" if vi is g.input[0] else f"_{name}"
    nodes = [onnx.helper.make_node("Sub", [name, mean.name], [centred], name=f"foldserve_normalize_sub{suffix}"),
             onnx.helper.make_node("Div", [centred, std.name], [inner], name=f"foldserve_normalize_div{suffix}")]
    for i, n in enumerate(nodes):
        g.node.insert(i, n)


def _input_dims(vi: onnx.ValueInfoProto) -> list[int | None]:
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
            for d in vi.type.tensor_type.shape.dim]


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The model's inputs; initializers listed as graph inputs (old exporters) become plain constants."""
    g = model.graph
    inits = {t.name for t in g.initializer}
    inputs = [i for i in g.input if i.name not in inits]
    rest = [i for i in g.input if i.name in inits] if model.ir_version < 4 else []
    del g.input[:]
    g.input.extend(inputs + rest)
    return inputs


def _batch_axis(dims: dict[str, list[int | None]], what: str) -> int | None:
    """The batch every input shares: None (dynamic) or the fixed N; inputs that disagree are refused."""
    firsts = {name: d[0] for name, d in dims.items()}
    if len(set(firsts.values())) > 1:
        raise ConfigError(f"{what}: inputs disagree on the batch axis (first dimension): "
                          f"{ {k: v if v is not None else '?' for k, v in firsts.items()} }; foldserve needs one batch "
                          f"axis shared by every input (all dynamic, or all the same size)")
    return next(iter(firsts.values()))


# long function: every input, then every output, each named, shaped and checked in one place
def finish_reference(reference: onnx.ModelProto, record: SourceRecord, opts: Options, what: str, *,
                     output_names: list[str] | None) -> None:
    """Names, shapes, batch axis and normalisation of every input and output, common to every kind
    (``output_names``: what a torch program calls its outputs; an ONNX file keeps its own; --output-name wins)."""
    vis = graph_inputs(reference)
    if not vis:
        raise ConfigError(f"{what} has no inputs")
    unique_outputs(reference)
    names = [vi.name for vi in vis]
    dims: dict[str, list[int | None]] = {}
    for vi in vis:
        dtype = lookup(vi.type.tensor_type.elem_type, "onnx", f"{what} input {vi.name!r}").numpy
        if not np.issubdtype(dtype, np.floating) and not opts.data:
            raise ConfigError(f"{what} takes {dtype.name} input {vi.name!r}: random verification inputs need float "
                              f"inputs; pass real samples with Options.data FILE.npz")
        dims[vi.name] = _input_dims(vi)
        if not dims[vi.name]:
            raise ConfigError(f"{what}: input {vi.name!r} has no shape; export it with a shape (batch first)")
    record.batch = _batch_axis(dims, what)                 # None: dynamic batch axis
    inputs = []
    for vi in vis:
        given = opts.for_input(opts.input_shape, vi.name, names, "Options.input_shape")
        shape = resolve_shape(dims[vi.name][1:], given, f"{what} input {vi.name!r}")
        inputs.append(InputRecord(vi.name, shape))
    renamed = parse_names(opts.input_name, len(vis), "Options.input_name", "input(s)")
    norms = {r.name: opts.for_input(opts.normalize, r.name, names, "Options.normalize") for r in inputs}
    outs = [o.name for o in reference.graph.output]
    wanted = parse_names(opts.output_name, len(outs), "Options.output_name", "output(s)") or output_names
    if wanted is not None and len(wanted) != len(outs):
        raise ConfigError(f"{what} has {len(outs)} outputs, its program returns {len(wanted)}: pass "
                          "Options.output_name")
    if renamed:
        for r, new in zip(inputs, renamed, strict=True):
            rename_tensor(reference, r.name, new)
            norms[new] = norms.pop(r.name)
            r.name = new
    if wanted:
        for old, new in zip(outs, wanted, strict=True):
            rename_tensor(reference, old, new)
        outs = list(wanted)
    numbered = [o for o in outs if o.isdigit()]
    if numbered:
        logger.warning("%s: outputs %s are numbers the exporter gave; name them with Options.output_name %s", what,
                       numbered, ",".join(f"NAME{i}" for i in range(len(outs))))
    for r in inputs:
        norm = norms.get(r.name)
        if norm:
            vi = next(i for i in reference.graph.input if i.name == r.name)
            if not np.issubdtype(lookup(vi.type.tensor_type.elem_type, "onnx", r.name).numpy, np.floating):
                raise ConfigError(f"Options.normalize needs a float input; {what}'s {r.name!r} is not")
            _check_normalization(norm, r.shape, r.name)
            prepend_normalization(reference, norm, 1 + len(r.shape), r.name)
            r.normalization = norm
    record.inputs, record.outputs = inputs, outs
    first = inputs[0]
    record.input_name, record.input_shape, record.normalization = first.name, first.shape, first.normalization
    record.output_name = outs[0]
    ranks = {o.name: len(o.type.tensor_type.shape.dim) for o in reference.graph.output}
    if opts.accuracy_output is not None:
        if opts.accuracy_output not in ranks:
            raise ConfigError(f"Options.accuracy_output {opts.accuracy_output!r}: the model's outputs are {outs}")
        if ranks[opts.accuracy_output] != 2:
            raise ConfigError(f"Options.accuracy_output {opts.accuracy_output!r} has rank "
                              f"{ranks[opts.accuracy_output]}; "
                              f"accuracy needs class scores [batch, classes]")
        record.accuracy_output = opts.accuracy_output
    numeric = {o.name: o.type.tensor_type.elem_type not in (onnx.TensorProto.STRING, onnx.TensorProto.BOOL)
               for o in reference.graph.output}
    single = len(outs) == 1 and ranks[outs[0]] == 2 and numeric[outs[0]]
    record.task = "classification" if single or record.accuracy_output else "other"
    record.data = str(Path(opts.data).resolve()) if opts.data else None
