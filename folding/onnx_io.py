"""ONNX in and out of folding, in one place: the TorchScript and dynamo exports (BN kept or folded by torch),
the opsets, external data (weights in a file beside the model), and the check that an unfolded export kept
every batch norm (the verifier's reference must be the model as written, not a graph the exporter rewrote).
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper

from foldserve.errors import FoldError
from foldserve.records import first_line
from foldserve.swap import staging_dir

logger = logging.getLogger(__name__)

OPSET = 17             # the TorchScript exporter's
DYNAMO_OPSET = 18      # the dynamo exporter's lowest
EXTERNAL_DATA_THRESHOLD = 1024


def export_torchscript(module: Any, example: torch.Tensor | list[torch.Tensor], input_name: str | list[str],
                       output_name: str | list[str], *, keep_bn: bool) -> onnx.ModelProto:
    """TorchScript export with a dynamic batch axis on every input and output. ``keep_bn`` turns constant folding
    off, which is what keeps torch's exporter from folding Conv+BN on its own."""
    examples = example if isinstance(example, list) else [example]
    inputs = input_name if isinstance(input_name, list) else [input_name]
    outputs = output_name if isinstance(output_name, list) else [output_name]
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, tuple(examples), buf, dynamo=False, do_constant_folding=not keep_bn,
                          input_names=inputs, output_names=outputs, opset_version=OPSET,
                          dynamic_axes={n: {0: "batch"} for n in (*inputs, *outputs)})
    return onnx.load_from_string(buf.getvalue())


def export_dynamo(program: Any) -> onnx.ModelProto:
    """torch.onnx's dynamo exporter without its optimiser (which fuses Conv+BN itself); constants folded."""
    import onnx_ir
    from onnxscript.optimizer import fold_constants, remove_unused_nodes

    for noisy in ("torch.onnx", "onnx_ir", "onnxscript"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():   # it prints its progress
        warnings.simplefilter("ignore")
        onnx_program = torch.onnx.export(program, dynamo=True, optimize=False, opset_version=DYNAMO_OPSET,
                                         verbose=False)
    fold_constants(onnx_program.model)
    remove_unused_nodes(onnx_program.model)
    model: onnx.ModelProto = onnx_ir.serde.serialize_model(onnx_program.model)
    repair_zero_biases(model)
    name_by_module(model)
    return model


def name_by_module(model: onnx.ModelProto) -> int:
    """Name each node of a dynamo export after the module that computed it, as the TorchScript exporter does
    (``layer2.0.bn1/BatchNormalization`` instead of ``node__native_batch_norm_legit_no_training_1__0``): the fold
    report, the verifier's localisation and every message then say which layer. The path is read from the
    exporter's ``pkg.torch.onnx.name_scopes`` metadata; nodes without one keep their name. Returns how many were
    renamed."""
    import ast

    taken = {n.name for n in model.graph.node}
    renamed = 0
    for n in model.graph.node:
        scopes = next((p.value for p in n.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), None)
        try:
            path = ast.literal_eval(scopes)[-2] if scopes else ""
        except (ValueError, SyntaxError, IndexError, TypeError):
            path = ""
        if not isinstance(path, str) or not path:
            continue
        base = f"{path}/{n.op_type}"
        name, k = base, 1
        while name in taken:
            k += 1
            name = f"{base}_{k}"
        taken.add(name)
        n.name = name
        renamed += 1
    return renamed


def repair_zero_biases(model: onnx.ModelProto) -> int:
    """The dynamo exporter writes a convolution without bias (``Conv3d(bias=False)``) with a bias of
    ``Expand(0, [C, 2])``, which constant folding turns into a [C, 2] zero tensor that onnxruntime refuses
    ("bias must be a 1D tensor of size output_channels"). Such an all-zero bias becomes zeros of shape [C]
    (exact); returns how many were repaired."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    uses: dict[str, int] = {}
    for n in model.graph.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    repaired = 0
    for n in model.graph.node:
        if n.op_type not in ("Conv", "ConvTranspose") or len(n.input) < 3 or n.input[2] not in inits \
                or n.input[1] not in inits:
            continue
        weight, bias = inits[n.input[1]], numpy_helper.to_array(inits[n.input[2]])
        group = next((a.i for a in n.attribute if a.name == "group"), 1)
        channels = weight.dims[0] if n.op_type == "Conv" else weight.dims[1] * group
        if (bias.ndim == 1 and bias.shape[0] == channels) or bias.any():
            continue
        name = n.input[2] if uses.get(n.input[2], 0) == 1 else f"{n.input[2]}__bias{repaired}"
        fixed = numpy_helper.from_array(np.zeros(channels, bias.dtype), name)
        if name == n.input[2]:
            inits[name].CopyFrom(fixed)
            stale = [vi for vi in model.graph.value_info if vi.name == name]   # its old [C, 2] shape
            for vi in stale:
                model.graph.value_info.remove(vi)
        else:
            model.graph.initializer.append(fixed)
            n.input[2] = name
        repaired += 1
    return repaired


def count_bn_nodes(model: onnx.ModelProto) -> int:
    return sum(n.op_type == "BatchNormalization" for n in model.graph.node)


def check_bn_kept(model: onnx.ModelProto, expected: int, what: str) -> None:
    """The unfolded export must hold one BatchNormalization per batch norm of the source."""
    found = count_bn_nodes(model)
    if found != expected:
        raise FoldError(f"{what}: the unfolded export has {found} BatchNormalization nodes for {expected} batch "
                        f"norms: the exporter changed the graph, so it cannot serve as the reference")


def has_external_data(path: Path) -> bool:
    header = onnx.load(str(path), load_external_data=False)
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in header.graph.initializer)


def save_model(model: onnx.ModelProto, path: Path, *, external_data: bool) -> None:
    """``path`` (and ``path.data`` beside it when ``external_data``)."""
    if external_data:
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=f"{Path(path).name}.data", size_threshold=EXTERNAL_DATA_THRESHOLD)
    else:
        onnx.save(model, str(path))


def save_with_external_data(model: onnx.ModelProto, dst: Path) -> None:
    """Keep an input's layout: DST plus its weights in DST.data beside it, both moved into place atomically
    (the data file first, so the model file never points at data that is not there)."""
    staging = staging_dir(dst.parent, dst.name)
    try:
        data_name = f"{dst.name}.data"
        save_model(model, staging / dst.name, external_data=True)
        if (staging / data_name).exists():
            os.replace(staging / data_name, dst.parent / data_name)
        os.replace(staging / dst.name, dst)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def without_weights(model: onnx.ModelProto, limit: int = 4096) -> onnx.ModelProto:
    """The model with every initializer over ``limit`` elements turned into a typed graph input: shape inference
    needs their shapes only (small constants such as Reshape targets stay), and serialising 100 MB of weights for
    each inference took most of a fold's time on large models."""
    g = model.graph
    light = onnx.ModelProto()
    light.ir_version, light.producer_name = model.ir_version, model.producer_name
    light.opset_import.extend(model.opset_import)
    lg = light.graph
    lg.name = g.name
    lg.node.extend(g.node)
    lg.output.extend(g.output)
    lg.value_info.extend(g.value_info)
    names = {i.name for i in g.input}
    lg.input.extend(g.input)
    for t in g.initializer:
        if int(np.prod(t.dims)) > limit:
            if t.name not in names:
                lg.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        else:
            lg.initializer.append(t)
    light.functions.extend(model.functions)
    return light


def check_onnx(model: onnx.ModelProto, role: str, limit: int = 4096) -> None:
    """``onnx.checker`` with full checks (strict shape inference) on the graph without its large weights, whose
    sizes are checked here: the same verdict as on the whole model for the weights ``onnx`` itself wrote, at a
    fraction of the cost (the checker serialises the whole model: 0.3 s for a ResNet-50, 4 ms without weights)."""
    try:
        onnx.checker.check_model(without_weights(model, limit), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise FoldError(f"the {role} ONNX model fails onnx.checker: {first_line(exc)}") from None
    packed = {getattr(onnx.TensorProto, k) for k in ("INT4", "UINT4", "FLOAT4E2M1", "COMPLEX64", "COMPLEX128")
              if hasattr(onnx.TensorProto, k)}            # two values per byte, or two fields per value
    for t in model.graph.initializer:
        n = int(np.prod(t.dims))
        if n <= limit or t.data_location == onnx.TensorProto.EXTERNAL or t.data_type in packed:
            continue
        if t.HasField("raw_data"):
            have, want = len(t.raw_data), n * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        else:
            have, want = len(getattr(t, helper.tensor_dtype_to_field(t.data_type))), n
        if have != want:
            raise FoldError(f"the {role} ONNX model fails onnx.checker: initializer {t.name!r} of shape "
                            f"{list(t.dims)} holds {have} values/bytes, expected {want}")
