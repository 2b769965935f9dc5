"""Precision variants of a folded model: fp16 and calibrated int8, made after the fold (in float64, cast once).

* ``fp16``: weights and activations in float16, inputs and outputs kept float32 (clients do not change);
  onnxruntime's converter, with every node whose folded constants do not fit float16 (a near-zero running
  variance scales a channel by up to 1/sqrt(eps)) kept in float32 instead of being clipped.
* ``int8``: onnxruntime's static quantisation in QDQ form: per-channel symmetric int8 weights, uint8
  activations on x86 (VNNI / VPMADDUBSW run u8 x s8) and int8 elsewhere, calibrated on real samples with
  minmax, entropy or percentile ranges.

The verifier (:mod:`folding.verify`) gates these on what matters to a user (top-1 agreement and accuracy
against the float64 truth, see ``PRECISION_GATES`` in :mod:`folding.tolerances`) and localises the first
layer whose error jumps.
"""
from __future__ import annotations

import logging
import platform
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from folding.fold_math import FP16_MAX
from foldserve.errors import ConfigError, FoldError
from foldserve.records import PrecisionInfo, first_line

logger = logging.getLogger(__name__)

FP16_HEADROOM = 16.0          # a constant beyond FP16_MAX / 16 keeps its node in float32 (products overflow first)


def to_precision(folded: onnx.ModelProto, precision: str, *, calibration: np.ndarray | None = None,
                 method: str = "minmax", source: str = "") -> tuple[onnx.ModelProto, PrecisionInfo]:
    """The served variant of a folded float32 model."""
    if precision == "fp32":
        return folded, PrecisionInfo()
    if precision == "fp16":
        return to_fp16(folded)
    if calibration is None or len(calibration) == 0:
        raise ConfigError("FoldRequest.precision int8 needs calibration samples: Options.calibration_data FILE.npz "
                          "or Options.data "
                          "FILE.npz (array x), or a checkpoint whose training data can be reloaded here")
    return to_int8(folded, calibration, method, source)


def _float_constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    out = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer
           if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE)}
    for n in model.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value" and a.t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE):
                    out[n.output[0]] = numpy_helper.to_array(a.t)
    return out


def to_fp16(folded: onnx.ModelProto) -> tuple[onnx.ModelProto, PrecisionInfo]:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    consts = _float_constants(folded)
    limit = FP16_MAX / FP16_HEADROOM
    kept, reasons = [], []
    for i, n in enumerate(folded.graph.node):
        big = [(name, float(np.abs(consts[name]).max())) for name in n.input if name in consts and consts[name].size
               and np.isfinite(consts[name]).all() and np.abs(consts[name]).max() > limit]
        if big:
            if not n.name:
                n.name = f"{n.op_type}_{i}"
            kept.append(n.name)
            reasons.append(f"{n.name}: {big[0][0]} reaches {big[0][1]:.3g} (float16 max {FP16_MAX:g})")
    try:
        model16 = convert_float_to_float16(folded, keep_io_types=True, node_block_list=kept or None,
                                           disable_shape_infer=False)
    except Exception as exc:  # the converter's errors are of many types
        raise FoldError(f"the float16 conversion failed ({type(exc).__name__}: {first_line(exc, 200)})"
                        ) from None
    _topological_sort(model16.graph)
    if reasons:
        logger.warning("fp16: %d node(s) kept in float32 (constants beyond the float16 range): %s", len(reasons),
                       "; ".join(reasons[:3]))
    return model16, PrecisionInfo(precision="fp16", kept_float32=reasons, weight_type="float16",
                                  activation_type="float16")


def _topological_sort(graph: onnx.GraphProto) -> None:
    """The converter appends its Cast nodes at the end; ONNX wants producers before consumers."""
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            raise FoldError("the float16 conversion left a graph with a cycle or a dangling input")
        for n in ready:
            ordered.append(n)
            available.update(n.output)
        pending = [n for n in pending if all(n is not r for r in ready)]
    del graph.node[:]
    graph.node.extend(ordered)


def activation_type_for_cpu() -> str:
    """uint8 activations on x86 (u8 x s8 is the fast path: VPMADDUBSW, VNNI), int8 elsewhere (ARM)."""
    return "uint8" if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686") else "int8"


def to_int8(folded: onnx.ModelProto, calibration: np.ndarray, method: str,
            source: str) -> tuple[onnx.ModelProto, PrecisionInfo]:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    name = folded.graph.input[0].name
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    act = activation_type_for_cpu()
    x = np.ascontiguousarray(calibration, dtype=np.float32)
    dim0 = folded.graph.input[0].type.tensor_type.shape.dim[0]
    fixed = dim0.dim_value if dim0.HasField("dim_value") and dim0.dim_value > 0 else None
    if fixed and len(x) % fixed:                 # a fixed batch axis takes whole batches: repeat samples
        x = x[np.arange(-(-len(x) // fixed) * fixed) % len(x)]
    step = fixed or 16
    batches = [{name: x[i:i + step]} for i in range(0, len(x), step)]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

    with tempfile.TemporaryDirectory(prefix="foldserve-int8-") as tmp:
        src, dst = Path(tmp) / "folded.onnx", Path(tmp) / "int8.onnx"
        onnx.save(folded, str(src))
        try:
            quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            weight_type=QuantType.QInt8,
                            activation_type=QuantType.QUInt8 if act == "uint8" else QuantType.QInt8,
                            calibrate_method=methods[method],
                            extra_options={"WeightSymmetric": True, "ActivationSymmetric": act == "int8",
                                           "CalibTensorRangeSymmetric": False})
        except Exception as exc:  # calibration and quantisation raise many types
            raise FoldError(f"int8 quantisation failed ({type(exc).__name__}: {first_line(exc, 200)})"
                            ) from None
        model8 = onnx.load(str(dst))
    n_q = sum(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model8.graph.node)
    if n_q == 0:
        raise FoldError("int8 quantisation produced no quantised operators (no Conv/Gemm/MatMul to quantise?)")
    return model8, PrecisionInfo(precision="int8", calibration_method=method, calibration_samples=len(x),
                                 calibration_source=source, activation_type=act, weight_type="int8 (per channel, "
                                 "symmetric)", quantized_ops=n_q)
