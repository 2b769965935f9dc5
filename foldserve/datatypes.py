"""Tensor datatypes: the one table that relates the v2 protocol, numpy, ONNX, Triton's config and onnxruntime.

Every stage that names a datatype goes through :func:`lookup`; a type that is not in the table is an
error that says which types are known, never a silent FP32.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from foldserve.errors import UnsupportedDataType


@dataclass(frozen=True)
class DataType:
    """One tensor element type under each of its names."""

    v2: str                       # KServe v2 / Triton wire name ("FP32")
    onnx: int                     # onnx.TensorProto.DataType value
    config: str                   # Triton config.pbtxt enum name ("TYPE_FP32")
    ort: str                      # onnxruntime's type string ("tensor(float)")
    numpy: np.dtype | None        # little-endian numpy dtype; None where numpy has none (BF16); BYTES: object


TABLE: tuple[DataType, ...] = (
    DataType("BOOL", 9, "TYPE_BOOL", "tensor(bool)", np.dtype("?")),
    DataType("UINT8", 2, "TYPE_UINT8", "tensor(uint8)", np.dtype("<u1")),
    DataType("UINT16", 4, "TYPE_UINT16", "tensor(uint16)", np.dtype("<u2")),
    DataType("UINT32", 12, "TYPE_UINT32", "tensor(uint32)", np.dtype("<u4")),
    DataType("UINT64", 13, "TYPE_UINT64", "tensor(uint64)", np.dtype("<u8")),
    DataType("INT8", 3, "TYPE_INT8", "tensor(int8)", np.dtype("<i1")),
    DataType("INT16", 5, "TYPE_INT16", "tensor(int16)", np.dtype("<i2")),
    DataType("INT32", 6, "TYPE_INT32", "tensor(int32)", np.dtype("<i4")),
    DataType("INT64", 7, "TYPE_INT64", "tensor(int64)", np.dtype("<i8")),
    DataType("FP16", 10, "TYPE_FP16", "tensor(float16)", np.dtype("<f2")),
    DataType("FP32", 1, "TYPE_FP32", "tensor(float)", np.dtype("<f4")),
    DataType("FP64", 11, "TYPE_FP64", "tensor(double)", np.dtype("<f8")),
    DataType("BF16", 16, "TYPE_BF16", "tensor(bfloat16)", None),
    DataType("BYTES", 8, "TYPE_STRING", "tensor(string)", np.dtype(object)),   # an object array of str
)

_BY: dict[str, dict[object, DataType]] = {
    "v2": {t.v2: t for t in TABLE},
    "onnx": {t.onnx: t for t in TABLE},
    "config": {t.config: t for t in TABLE},
    "ort": {t.ort: t for t in TABLE},
    "numpy": {t.numpy: t for t in TABLE if t.numpy is not None},
}
V2_NAMES: tuple[str, ...] = tuple(t.v2 for t in TABLE)


def lookup(value: object, kind: str = "v2", where: str = "datatype") -> DataType:
    """The table row for ``value`` named the ``kind`` way (v2, onnx, config, ort, numpy); raises
    :class:`UnsupportedDataType` naming ``where`` and the known names otherwise."""
    key: Any = value
    if kind == "numpy" and value is not None:
        key = np.dtype(value).newbyteorder("<")  # type: ignore[call-overload]
    row = _BY[kind].get(key)
    if row is None:
        known = sorted(str(k) for k in _BY[kind])
        raise UnsupportedDataType(f"{where}: unknown {kind} datatype {value!r}; known: {', '.join(known)}")
    return row


def numpy_dtype(v2: str, where: str = "datatype") -> np.dtype:
    """The numpy dtype of a v2 datatype that the server can carry as an array."""
    row = lookup(v2, "v2", where)
    if row.numpy is None:
        raise UnsupportedDataType(f"{where}: datatype {v2} cannot be carried as a numpy array by foldserve")
    return row.numpy


def string_array(items: list[Any], shape: list[int], where: str, text: bool = True) -> np.ndarray:
    """BYTES elements (bytes or str) as an object array. ``text``: as the str onnxruntime takes for a model that
    reads its strings (UTF-8: bytes that are not UTF-8 are refused naming the element); else kept as given, any
    bytes (for a model that only moves its strings: server/core/strings.py)."""
    out = np.empty(len(items), dtype=object)
    for i, item in enumerate(items):
        if isinstance(item, (bytes, bytearray, memoryview)):
            if not text:
                out[i] = bytes(item)
                continue
            try:
                item = bytes(item).decode("utf-8")
            except UnicodeDecodeError:
                raise UnsupportedDataType(f"{where}: element {i} is not UTF-8 text, and this model reads its "
                                          f"strings as text (onnxruntime takes them as UTF-8; a model that only "
                                          f"moves its strings carries any bytes)") from None
        elif not isinstance(item, str):
            raise UnsupportedDataType(f"{where}: BYTES elements must be strings, element {i} is "
                                      f"{type(item).__name__}")
        out[i] = item
    return out.reshape(shape)


def serialize_bytes(arr: np.ndarray) -> bytes:
    """Triton's raw layout for BYTES tensors (gRPC raw contents and REST binary data alike): each element as
    a 4-byte little-endian length followed by its bytes."""
    out = []
    for item in arr.reshape(-1):
        b = item if isinstance(item, bytes) else str(item).encode()
        out.append(len(b).to_bytes(4, "little") + b)
    return b"".join(out)


def deserialize_bytes(raw: bytes | memoryview, count: int | None = None, where: str = "BYTES data") -> list[bytes]:
    """The inverse of :func:`serialize_bytes`; with ``count``, exactly that many elements that fill ``raw``, else
    :class:`UnsupportedDataType` saying where the layout breaks."""
    items: list[bytes] = []
    off, size = 0, len(raw)
    while off + 4 <= size and (count is None or len(items) < count):
        n = int.from_bytes(raw[off:off + 4], "little")
        if off + 4 + n > size:
            raise UnsupportedDataType(f"{where}: element {len(items)} claims {n} bytes, {size - off - 4} remain")
        items.append(bytes(raw[off + 4:off + 4 + n]))
        off += 4 + n
    if count is not None and (len(items) != count or off != size):
        raise UnsupportedDataType(f"{where}: {size} bytes hold {len(items)} length-prefixed elements"
                                  f"{' and ' + str(size - off) + ' bytes more' if off != size else ''}; the shape "
                                  f"needs {count} (each a 4-byte little-endian length, then its bytes)")
    return items


def raw_bytes(datatype: str, arr: np.ndarray) -> bytes:
    """A tensor as raw bytes, in row-major order."""
    return serialize_bytes(arr) if datatype == "BYTES" else np.ascontiguousarray(arr).tobytes()
