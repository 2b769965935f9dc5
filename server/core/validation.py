"""Check an inference request against the model's metadata before anything is allocated.

Order matters: names, datatypes and declared shapes are checked first (pure arithmetic on Python ints,
so no shape product can overflow), then the payload's byte length or element count is compared with
what the shape declares, and only then is the data turned into an array (zero-copy for raw bytes).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from foldserve.datatypes import V2_NAMES, deserialize_bytes, numpy_dtype, string_array
from foldserve.errors import InvalidInput, PayloadTooLarge, UnsupportedDataType
from server.core.types import InferInput, InferRequest, ModelSpec, TensorSpec
from server.settings import flag

INT64_MAX = (1 << 63) - 1
#: bytes per element of the fixed-size v2 datatypes (for the byte-size overflow check)
DTYPE_SIZES = {"BOOL": 1, "UINT8": 1, "INT8": 1, "UINT16": 2, "INT16": 2, "FP16": 2, "BF16": 2, "UINT32": 4,
               "INT32": 4, "FP32": 4, "UINT64": 8, "INT64": 8, "FP64": 8}


def _check_shape(t: InferInput, spec: TensorSpec, model: ModelSpec, max_elements: int,
                 max_string_elements: int = 1 << 62) -> int:
    """Returns the batch size of this input (1 for unbatched models)."""
    if any(not isinstance(d, int) or isinstance(d, bool) for d in t.shape):
        raise InvalidInput(f"input {t.name!r}: shape must be a list of integers, got {t.shape!r}")
    if any(d < 0 for d in t.shape):
        raise InvalidInput(f"input {t.name!r}: shape {t.shape} has a negative dimension")
    n = math.prod(t.shape)          # Python integers: no overflow, so the checks below are exact
    if n > INT64_MAX:
        raise InvalidInput(f"input {t.name!r}: shape {t.shape} causes total element count to exceed maximum size of "
                           f"{INT64_MAX}")
    itemsize = DTYPE_SIZES.get(t.datatype, 1)
    if n * itemsize > INT64_MAX:
        raise InvalidInput(f"byte size overflow for input '{t.name}': shape {t.shape} of {t.datatype} is "
                           f"{n * itemsize} bytes")
    expected = spec.full_shape(model.max_batch_size)
    if len(t.shape) != len(expected):
        raise InvalidInput(f"input {t.name!r}: expected rank {len(expected)} with shape {_fmt(expected)}, "
                           f"got shape {t.shape}")
    for i, (got, want) in enumerate(zip(t.shape, expected, strict=False)):
        if want >= 0 and got != want:
            raise InvalidInput(f"input {t.name!r}: dimension {i} is {got}, expected {want} "
                               f"(shape {_fmt(expected)}, got {t.shape})")
    batch = 1
    if model.max_batch_size > 0:
        batch = t.shape[0]
        if batch < 1:
            raise InvalidInput(f"input {t.name!r}: batch size must be >= 1, got {batch}")
        if batch > model.max_batch_size:
            raise InvalidInput(f"input {t.name!r}: batch size {batch} exceeds the model's max_batch_size "
                               f"{model.max_batch_size}")
    if n > max_elements:
        raise PayloadTooLarge(f"input {t.name!r}: shape {t.shape} causes total element count to exceed maximum "
                              f"size of {max_elements} ({n} elements; {flag('max_elements')})")
    if t.datatype == "BYTES" and n > max_string_elements:
        raise PayloadTooLarge(f"input {t.name!r}: shape {t.shape} holds {n} strings, more than the "
                              f"{max_string_elements} one BYTES input may hold ({flag('max_string_elements')})")
    return batch


def _fmt(shape: list[int]) -> str:
    return "[" + ", ".join("-1" if d < 0 else str(d) for d in shape) + "]"


def _flatten(values: Any) -> list[Any]:
    """JSON's nested lists (or protobuf's flat contents) as one flat list, row-major."""
    if not isinstance(values, (list, tuple)):
        return list(values)
    out: list[Any] = []
    stack = [iter(values)]
    while stack:
        for v in stack[-1]:
            if isinstance(v, (list, tuple)):
                stack.append(iter(v))
                break
            out.append(v)
        else:
            stack.pop()
    return out


def _decode_bytes(t: InferInput, n: int, model: str, opaque: bool = False) -> np.ndarray:
    """A BYTES input: length-prefixed raw bytes (binary extension, raw contents, shared memory), a JSON array of
    strings, or protobuf bytes_contents; an object array of the request's shape, of str (UTF-8 text), or for a
    model that only moves its strings (``opaque``) of the elements as given (any bytes)."""
    where = f"input {t.name!r}"
    try:
        if t.raw is not None:
            try:
                items: list[Any] = deserialize_bytes(t.raw, n, where)
            except UnsupportedDataType as exc:   # Triton's words first
                got = _whole_elements(t.raw)
                raise InvalidInput((f"expected {n} string elements for inference input '{t.name}' for model "
                                    f"'{model}', got {got}" if got < n else
                                    f"unexpected number of string elements {n + 1} for inference input '{t.name}' "
                                    f"for model '{model}', expecting {n}") + f": {exc}") from None
        elif t.values is None:
            raise InvalidInput(f"{where}: no data (give 'data', bytes_contents, raw_input_contents or a "
                               f"binary_data_size)")
        else:
            items = _flatten(t.values)
            if len(items) != n:
                raise InvalidInput(f"{where}: {len(items)} elements of data, shape {t.shape} needs {n}")
        return string_array(items, t.shape, where, text=not opaque)
    except UnsupportedDataType as exc:
        raise InvalidInput(str(exc)) from None


def _whole_elements(raw: bytes | memoryview) -> int:
    """How many whole length-prefixed elements ``raw`` starts with."""
    off, count = 0, 0
    while off + 4 <= len(raw):
        off += 4 + int.from_bytes(raw[off:off + 4], "little")
        if off > len(raw):
            break
        count += 1
    return count


def _decode(t: InferInput, dtype: np.dtype, model: str, opaque: bool = False) -> np.ndarray:
    n = math.prod(t.shape)
    if t.datatype == "BYTES":
        return _decode_bytes(t, n, model, opaque)
    if t.raw is not None:
        expected = n * dtype.itemsize
        if len(t.raw) != expected:
            raise InvalidInput(f"input byte size mismatch for input '{t.name}' for model '{model}'. Expected "
                               f"{expected}, got {len(t.raw)} ({n} elements of {t.datatype}, {dtype.itemsize} bytes "
                               f"each, shape {t.shape})")
        return np.frombuffer(t.raw, dtype=dtype).reshape(t.shape)
    if t.values is None:
        raise InvalidInput(f"input {t.name!r}: no data (give 'data', typed contents, raw_input_contents or a "
                           f"binary_data_size)")
    if not isinstance(t.values, (list, tuple)) and not hasattr(t.values, "__len__"):
        raise InvalidInput(f"input {t.name!r}: data must be an array of {n} elements, got a "
                           f"{type(t.values).__name__}")
    if not isinstance(t.values, (list, tuple)) and len(t.values) != n:
        # protobuf's typed contents are flat: count before converting (64 MiB of decompressed fp32_contents
        # for a 4096-element input must not become a 16M-element Python array first)
        raise InvalidInput(f"input {t.name!r}: {len(t.values)} elements of data, shape {t.shape} needs {n}")
    try:
        arr = np.asarray(t.values)
    except (ValueError, TypeError):
        raise InvalidInput(f"input {t.name!r}: data is not a regular (non-ragged) array of numbers") from None
    if arr.size != n:
        raise InvalidInput(f"input {t.name!r}: {arr.size} elements of data, shape {t.shape} needs {n}")
    if arr.dtype == object or arr.dtype.kind not in "biuf":
        raise InvalidInput(f"input {t.name!r}: data must be numbers (or booleans for BOOL)")
    if dtype.kind in "iu" and arr.dtype.kind == "f":
        raise InvalidInput(f"input {t.name!r}: {t.datatype} data must be integers")
    if dtype.kind in "iu" and arr.size:
        info = np.iinfo(dtype)
        if arr.min() < info.min or arr.max() > info.max:
            raise InvalidInput(f"input {t.name!r}: values out of range for {t.datatype}")
    return arr.astype(dtype, copy=False).reshape(t.shape)


def validate_request(req: InferRequest, model: ModelSpec, max_elements: int) -> tuple[dict[str, np.ndarray], int]:
    """Returns (feeds, batch size). Raises :class:`InvalidInput` naming the tensor and what was expected."""
    batch = check_request(req, model, max_elements)
    return decode_inputs(req, model.opaque_strings), batch


def check_shm_inputs(req: InferRequest, model: ModelSpec, max_request_bytes: int) -> None:
    """Every shared-memory reference of a request checked (after :func:`check_request`) before a byte of it is
    read: a fixed-size input's byte size must be what its shape needs (Triton's words), and all of them together
    within --max-request-bytes, so a small request naming large regions costs no memory."""
    total = 0
    for t in req.inputs:
        if t.shm is None:
            continue
        total += t.shm.byte_size
        if t.datatype in DTYPE_SIZES:
            expected = math.prod(t.shape) * DTYPE_SIZES[t.datatype]
            if t.shm.byte_size != expected:
                raise InvalidInput(f"input byte size mismatch for input '{t.name}' for model '{model.name}'. "
                                   f"Expected {expected}, got {t.shm.byte_size} (bytes: shared_memory_byte_size of "
                                   f"region {t.shm.region!r}, for shape {t.shape} of {t.datatype})")
    if total > max_request_bytes:
        raise PayloadTooLarge(f"the request's shared-memory inputs are {total} bytes together, more than the "
                              f"{max_request_bytes} bytes a request may carry ({flag('max_request_bytes')})")


def check_request(req: InferRequest, model: ModelSpec, max_elements: int, max_string_elements: int = 1 << 62) -> int:
    """Names, datatypes, shapes, batch sizes and requested outputs, before any data is read or decoded; returns
    the batch size."""
    seen: set[str] = set()
    batches: set[int] = set()
    for t in req.inputs:
        spec = model.input(t.name)
        if spec is None:
            raise InvalidInput(f"unknown input {t.name!r}; model {model.name!r} expects "
                               f"{[i.name for i in model.inputs]}")
        if t.name in seen:
            raise InvalidInput(f"input {t.name!r} is given twice")
        seen.add(t.name)
        if t.datatype not in V2_NAMES:
            raise InvalidInput(f"input {t.name!r}: unknown datatype {t.datatype!r}; expected {spec.datatype}")
        if t.datatype != spec.datatype:
            raise InvalidInput(f"input {t.name!r}: datatype {t.datatype}, expected {spec.datatype}")
        batches.add(_check_shape(t, spec, model, max_elements, max_string_elements))
    _check_count(req, model, seen)
    if len(batches) > 1:
        raise InvalidInput(f"inputs disagree on the batch size: {sorted(batches)}")
    requested: set[str] = set()
    for o in req.outputs:
        if o.name in requested:
            raise InvalidInput(f"output '{o.name}' already exists in request: request each output once")
        requested.add(o.name)
        if model.output(o.name) is None:
            raise InvalidInput(f"unexpected inference output '{o.name}' for model '{model.name}': it has "
                               f"{[t.name for t in model.outputs]}")
        if o.class_count < 0:
            raise InvalidInput(f"output {o.name!r}: classification count must be >= 0")
        if o.class_count and model.output(o.name).datatype == "BYTES":  # type: ignore[union-attr]
            raise InvalidInput(f"output {o.name!r}: classification needs numeric scores, this output is BYTES")
    return batches.pop() if batches else 1


def _check_count(req: InferRequest, model: ModelSpec, seen: set[str]) -> None:
    """Every required input given (an optional one may be left out), in Triton's words."""
    missing = [i.name for i in model.inputs if i.name not in seen and not i.optional]
    if not missing:
        return
    required = sum(not i.optional for i in model.inputs)
    expected = (f"{required} inputs" if required == len(model.inputs)
                else f"number of inputs between {required} and {len(model.inputs)}")
    given, absent = (",".join(f"'{n}'" for n in names) for names in ([t.name for t in req.inputs], missing))
    raise InvalidInput(f"expected {expected} but got {len(req.inputs)} inputs for model '{model.name}'. Got input(s) "
                       f"[{given}], but missing required input(s) [{absent}]. Please provide all required input(s).")


def decode_inputs(req: InferRequest, opaque_strings: bool = False) -> dict[str, np.ndarray]:
    """The checked inputs (:func:`check_request`) as arrays (zero-copy for raw bytes); BYTES elements as any
    bytes where the model only moves its strings (``opaque_strings``), else as UTF-8 text."""
    feeds = {}
    problems = []        # every BYTES input that does not decode, named (Triton names the last one)
    for t in req.inputs:
        try:
            dtype = numpy_dtype(t.datatype, f"input {t.name!r}")
        except UnsupportedDataType as exc:
            raise InvalidInput(str(exc)) from None
        try:
            feeds[t.name] = _decode(t, dtype, req.model_name, opaque_strings)
        except InvalidInput as exc:
            if t.datatype != "BYTES":
                raise
            problems.append(str(exc))
    if problems:
        raise InvalidInput("; ".join(problems))
    return feeds


JSON_BYTES_PER_ELEMENT = 32        # the longest JSON number ("-1.2345678901234567e-308") with its separator
BODY_OVERHEAD = 64 * 1024          # names, shapes, parameters, whitespace


def request_elements_limit(model: ModelSpec, max_elements: int, max_string_elements: int = 1 << 62) -> int:
    """The most tensor elements one request to this model can carry (all inputs, the largest batch; a BYTES input
    at most ``max_string_elements``): a JSON body with more numbers or strings than this is refused before it is
    parsed, so parsing never builds more Python objects than the model's largest legitimate request."""
    total = 0
    for t in model.inputs:
        dims = ([model.max_batch_size] if model.max_batch_size > 0 else []) + list(t.dims)
        most = min(max_elements, max_string_elements) if t.datatype == "BYTES" else max_elements
        total += most if any(d < 0 for d in dims) else min(math.prod(dims), most)
    return total


PROTO_BYTES_PER_ELEMENT = 10       # the longest packed varint (int64 contents); raw contents need at most 8


def grpc_message_limit(model: ModelSpec, max_elements: int, max_request_bytes: int) -> int:
    """The most bytes a gRPC request to this model can need, decompressed: a message past it is refused
    before protobuf parses it (a 62 KB gzip message inflating to 64 MB no longer costs its parse)."""
    return _largest_request(model, max_elements, max_request_bytes, PROTO_BYTES_PER_ELEMENT)


def request_bytes_limit(model: ModelSpec, max_elements: int, max_request_bytes: int) -> int:
    """The most bytes a request to this model can need, decoded (JSON numbers or binary tensors): a REST
    body, compressed or not, is refused past it before it is parsed (no parse or decompression
    amplification). Variable-size inputs (BYTES, -1 dims) leave only the server-wide limit."""
    return _largest_request(model, max_elements, max_request_bytes, JSON_BYTES_PER_ELEMENT)


def _largest_request(model: ModelSpec, max_elements: int, max_request_bytes: int, bytes_per_element: int) -> int:
    """A full batch of every input at ``bytes_per_element``, plus the overhead; the server-wide limit where a
    size is variable."""
    total = BODY_OVERHEAD
    for t in model.inputs:
        dims = ([model.max_batch_size] if model.max_batch_size > 0 else []) + list(t.dims)
        if t.datatype == "BYTES" or any(d < 0 for d in dims):
            return max_request_bytes
        total += min(math.prod(dims), max_elements) * bytes_per_element
    return min(total, max_request_bytes)
