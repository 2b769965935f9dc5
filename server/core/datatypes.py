"""KServe v2 tensor datatypes and their numpy, ONNX and Triton-config equivalents."""
from __future__ import annotations

import numpy as np

from foldserve.errors import InvalidInput

# v2 datatype -> numpy dtype (little-endian, as the binary extension and raw contents require)
V2_TO_NUMPY: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_), "UINT8": np.dtype("<u1"), "UINT16": np.dtype("<u2"), "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"), "INT8": np.dtype("<i1"), "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"), "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
}
NUMPY_TO_V2 = {v: k for k, v in V2_TO_NUMPY.items()}
# onnxruntime's type strings
ORT_TO_V2 = {
    "tensor(bool)": "BOOL", "tensor(uint8)": "UINT8", "tensor(uint16)": "UINT16", "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64", "tensor(int8)": "INT8", "tensor(int16)": "INT16", "tensor(int32)": "INT32",
    "tensor(int64)": "INT64", "tensor(float16)": "FP16", "tensor(float)": "FP32", "tensor(double)": "FP64",
}
# Triton config DataType enum name <-> v2 datatype
CONFIG_TO_V2 = {"TYPE_BOOL": "BOOL", "TYPE_UINT8": "UINT8", "TYPE_UINT16": "UINT16", "TYPE_UINT32": "UINT32",
                "TYPE_UINT64": "UINT64", "TYPE_INT8": "INT8", "TYPE_INT16": "INT16", "TYPE_INT32": "INT32",
                "TYPE_INT64": "INT64", "TYPE_FP16": "FP16", "TYPE_FP32": "FP32", "TYPE_FP64": "FP64",
                "TYPE_STRING": "BYTES", "TYPE_BF16": "BF16"}
V2_TO_CONFIG = {v: k for k, v in CONFIG_TO_V2.items()}
ALL_V2 = set(V2_TO_NUMPY) | {"BYTES", "BF16"}


def numpy_dtype(datatype: str, field: str = "datatype") -> np.dtype:
    try:
        return V2_TO_NUMPY[datatype]
    except KeyError:
        if datatype in ALL_V2:
            raise InvalidInput(f"{field}: datatype {datatype} is not supported by this server") from None
        raise InvalidInput(f"{field}: unknown datatype {datatype!r}; expected one of {sorted(ALL_V2)}") from None


def element_size(datatype: str) -> int:
    return numpy_dtype(datatype).itemsize


def serialize_bytes(arr: np.ndarray) -> bytes:
    """Triton's raw layout for BYTES tensors (gRPC raw contents and REST binary data alike): each element as a
    4-byte little-endian length followed by its bytes."""
    out = []
    for item in arr.reshape(-1):
        b = item if isinstance(item, bytes) else str(item).encode()
        out.append(len(b).to_bytes(4, "little") + b)
    return b"".join(out)


def raw_bytes(datatype: str, arr: np.ndarray) -> bytes:
    """An output tensor as raw bytes, in row-major order."""
    return serialize_bytes(arr) if datatype == "BYTES" else np.ascontiguousarray(arr).tobytes()
