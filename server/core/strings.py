"""BYTES tensors carry any bytes, as in Triton; onnxruntime's Python API carries string tensors as UTF-8 text
only. A model whose string outputs are its string inputs moved about (Identity, Reshape, Concat, Gather, ...:
operators that never read an element) takes each element's bytes one-to-one as Latin-1 text, which every byte
sequence is, and gives them back the same way: any bytes round-trip unchanged. A model that reads its text
(compares, casts, tokenises it) gets UTF-8 text, and bytes that are not UTF-8 are refused naming the element."""
from __future__ import annotations

from typing import Any

import numpy as np

# operators that move string elements without reading them, with the inputs that carry elements (None: all)
_MOVERS: dict[str, int | None] = {
    "Identity": 1, "Reshape": 1, "Flatten": 1, "Squeeze": 1, "Unsqueeze": 1, "Transpose": 1, "Slice": 1,
    "Gather": 1, "GatherElements": 1, "GatherND": 1, "Expand": 1, "Tile": 1, "Split": 1, "Concat": None,
}


def opaque_strings(graph: Any) -> bool:
    """Whether every string the model reads reaches its outputs only through operators that move elements, and
    every string output is made of request strings (no string constants): then elements are opaque bytes."""
    import onnx

    string = onnx.TensorProto.STRING
    inits = {t.name for t in graph.initializer}
    moved = {vi.name for vi in graph.input if vi.type.tensor_type.elem_type == string and vi.name not in inits}
    if not moved:
        return False
    for node in graph.node:
        present = [i for i in node.input if i]
        if not any(i in moved for i in present):
            continue
        if node.op_type not in _MOVERS or node.domain not in ("", "ai.onnx"):
            return False
        carried = _MOVERS[node.op_type]
        if not all(i in moved for i in (present if carried is None else present[:carried])):
            return False                      # request strings mixed with strings of the model's own
        moved.update(o for o in node.output if o)
    outputs = [vi.name for vi in graph.output if vi.type.tensor_type.elem_type == string]
    return bool(outputs) and all(o in moved for o in outputs)


def as_latin1(arr: np.ndarray) -> np.ndarray:
    """Request elements (bytes, or str given as JSON text: its UTF-8 bytes) as Latin-1 str, one char per byte."""
    flat = arr.reshape(-1)
    out = np.empty(flat.shape[0], dtype=object)
    for i, item in enumerate(flat):
        out[i] = (bytes(item) if isinstance(item, (bytes, bytearray, memoryview)) else str(item).encode()
                  ).decode("latin-1")
    return out.reshape(arr.shape)


def from_latin1(arr: np.ndarray) -> np.ndarray:
    """The model's Latin-1 str elements back as the bytes they stand for."""
    flat = arr.reshape(-1)
    out = np.empty(flat.shape[0], dtype=object)
    for i, item in enumerate(flat):
        out[i] = str(item).encode("latin-1")
    return out.reshape(arr.shape)
