"""REST body <-> core types: v2 JSON tensors and Triton's binary tensor data extension.

A request body is a JSON header, optionally followed by binary tensor data when the
``Inference-Header-Content-Length`` header says how long the JSON part is; inputs with
``parameters.binary_data_size`` take their bytes from the binary part, in order. JSON is parsed with
orjson straight into Python lists, which numpy turns into arrays in one call; outputs are encoded with
orjson's numpy support, or as binary when the client asks (``binary_data`` per output, or
``binary_data_output`` for all).
"""
from __future__ import annotations

import zlib
from typing import Any

import numpy as np
import orjson
from fastapi.responses import JSONResponse

from foldserve.datatypes import numpy_dtype, raw_bytes
from foldserve.errors import InvalidInput, PayloadTooLarge, UnsupportedDataType
from server.core.shm import shm_ref
from server.core.types import InferInput, InferRequest, InferResponse, ModelSpec, RequestedOutput

HEADER = "inference-header-content-length"


class ORJSONResponse(JSONResponse):
    """JSON responses encoded by orjson (numpy arrays included)."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


def error_response(status: int, message: str) -> ORJSONResponse:
    """Triton's error body: ``{"error": message}``."""
    return ORJSONResponse({"error": message}, status_code=status)


def decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """gzip/deflate request bodies, never inflating past ``limit`` bytes (no decompression bombs)."""
    if not encoding or encoding == "identity":
        return body
    if encoding not in ("gzip", "deflate"):
        raise InvalidInput(f"Content-Encoding {encoding!r} is not supported (use gzip or deflate)")
    wbits = 16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS
    d = zlib.decompressobj(wbits)
    try:
        out = d.decompress(body, limit + 1)
    except zlib.error as exc:
        raise InvalidInput(f"body is not valid {encoding} data ({exc})") from None
    if len(out) > limit or d.unconsumed_tail:
        raise PayloadTooLarge(f"decompressed body exceeds the {limit}-byte request limit")
    if not d.eof:
        raise InvalidInput(f"truncated {encoding} body")
    return out


_KINDS = {str: "a string", int: "an integer", list: "a list", bool: "true or false", dict: "an object"}
_JSON_NAMES = {str: "a string", int: "a number", float: "a number", list: "a list", bool: "a boolean",
               dict: "an object"}


def _typed(value: Any, kind: type, what: str) -> Any:
    """``value`` if it is of ``kind``, else an InvalidInput naming ``what`` and what was expected."""
    if value is None:
        raise InvalidInput(f"{what} is missing: expected {_KINDS.get(kind, kind.__name__)}")
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise InvalidInput(f"{what} must be {kind.__name__} ({_KINDS.get(kind, kind.__name__)}), got "
                           f"{_JSON_NAMES.get(type(value), type(value).__name__)}")
    return value


MAX_JSON_DEPTH = 100      # Triton's limit, and its words when a request passes it


def check_json_depth(doc: Any, limit: int = MAX_JSON_DEPTH) -> None:
    """Refuse a document nested deeper than ``limit`` (objects and arrays). A list whose first and last
    elements are scalars is a tensor's data and is not walked element by element (validation checks those)."""
    stack: list[tuple[Any, int]] = [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            raise InvalidInput(f"JSON nesting depth exceeds maximum allowed limit ({limit})")
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values() if isinstance(v, (dict, list)))
        elif isinstance(node, list) and node:
            if not isinstance(node[0], (dict, list)) and not isinstance(node[-1], (dict, list)):
                continue
            stack.extend((v, depth + 1) for v in node if isinstance(v, (dict, list)))


def _split_body(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    """(JSON part, binary part) of a body, by Inference-Header-Content-Length."""
    if header_length is None:
        return body, memoryview(b"")
    try:
        n = int(header_length)
    except ValueError:
        raise InvalidInput(f"Inference-Header-Content-Length {header_length!r} is not an integer") from None
    if n < 0 or n > len(body):
        raise InvalidInput(f"Inference-Header-Content-Length {n} is outside the body of {len(body)} bytes")
    return body[:n], memoryview(body)[n:]


def _parse_input(i: int, t: Any, binary: memoryview, offset: int) -> tuple[InferInput, int]:
    """One input tensor; returns it and the offset past the binary data it claims."""
    if not isinstance(t, dict):
        raise InvalidInput(f"inputs[{i}] must be an object with name, datatype, shape and data")
    name = _typed(t.get("name"), str, f"inputs[{i}].name")
    inp = InferInput(name, _typed(t.get("datatype"), str, f"input {name!r}: datatype (e.g. \"FP32\")"),
                     _typed(t.get("shape"), list, f"input {name!r}: shape"))
    tparams = t.get("parameters") or {}
    if not isinstance(tparams, dict):
        raise InvalidInput(f"input {name!r}: parameters must be an object")
    size = tparams.get("binary_data_size")
    inp.shm = shm_ref(tparams, f"input {name!r}")
    if inp.shm is not None:
        if size is not None or "data" in t:
            raise InvalidInput(f"input {name!r}: give shared_memory_region, 'data' or binary_data_size, not two")
    elif size is not None:
        size = _typed(size, int, f"input {name!r}: binary_data_size")
        if size < 0 or offset + size > len(binary):
            raise InvalidInput(f"input {name!r}: binary_data_size {size} runs past the {len(binary) - offset} "
                               f"bytes of binary data left in the body")
        if "data" in t:
            raise InvalidInput(f"input {name!r}: give 'data' or binary_data_size, not both")
        inp.raw = binary[offset:offset + size]
        offset += size
    elif "data" in t:
        if not isinstance(t["data"], list):
            raise InvalidInput(f"input {name!r}: data must be a JSON array of the tensor's elements (flat or nested), "
                               f"got {type(t['data']).__name__}")
        inp.values = t["data"]
    return inp, offset


def _parse_outputs(outs_doc: Any) -> list[RequestedOutput]:
    if not isinstance(outs_doc, list):
        raise InvalidInput("'outputs' must be a list")
    outputs = []
    for i, o in enumerate(outs_doc):
        if not isinstance(o, dict):
            raise InvalidInput(f"outputs[{i}] must be an object with a name")
        oname = _typed(o.get("name"), str, f"outputs[{i}].name")
        op = o.get("parameters") or {}
        if not isinstance(op, dict):
            raise InvalidInput(f"output {oname!r}: parameters must be an object")
        binary = op.get("binary_data")
        cc = op.get("classification", 0)
        outputs.append(RequestedOutput(oname, _typed(binary, bool, f"output {oname!r}: parameter binary_data")
                                       if binary is not None else None,
                                       _typed(cc, int, f"output {oname!r}: classification"),
                                       shm_ref(op, f"output {oname!r}")))
    return outputs


JSON_SEPARATOR_SLACK = 4096    # commas in names, shapes, outputs and parameters


def parse_infer_request(model: str, version: str, body: bytes, header_length: str | None,
                        max_numbers: int | None = None) -> InferRequest:
    """Parse a v2 JSON (+ binary) request. ``max_numbers`` is the most tensor elements the model can take in
    one request: a JSON part with more separators than that is refused before parsing (orjson builds one
    Python object per number; this bounds that to what the model's largest request would cost)."""
    json_part, binary = _split_body(body, header_length)
    if max_numbers is not None and json_part.count(b",") > max_numbers + JSON_SEPARATOR_SLACK:
        raise PayloadTooLarge(f"request body holds more than {max_numbers} numbers or strings, the most this model "
                              f"takes in one request (--max-elements, --max-string-elements)")
    try:
        doc = orjson.loads(json_part)
    except orjson.JSONDecodeError as exc:
        if "recursion" in str(exc):
            raise InvalidInput(f"JSON nesting depth exceeds maximum allowed limit ({MAX_JSON_DEPTH})") from None
        raise InvalidInput(f"request body is not valid JSON ({exc})") from None
    check_json_depth(doc)
    if not isinstance(doc, dict):
        raise InvalidInput("request body must be a JSON object with 'inputs'")
    inputs_doc = doc.get("inputs")
    if not isinstance(inputs_doc, list):
        raise InvalidInput("'inputs' must be a list of tensors")
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise InvalidInput("'parameters' must be an object")
    offset = 0
    inputs = []
    for i, t in enumerate(inputs_doc):
        inp, offset = _parse_input(i, t, binary, offset)
        inputs.append(inp)
    if offset != len(binary):
        raise InvalidInput(f"{len(binary) - offset} bytes of binary data are not claimed by any input's "
                           f"binary_data_size")
    rid = doc.get("id", "")
    if not isinstance(rid, str):
        raise InvalidInput("'id' must be a string")
    params["binary_data_output"] = _typed(params.get("binary_data_output", False), bool,
                                          "parameters.binary_data_output")     # "no" is not False
    return InferRequest(model, version, rid, inputs, _parse_outputs(doc.get("outputs") or []), params)


def parse_raw_request(model: str, version: str, body: bytes, spec: ModelSpec) -> InferRequest:
    """Triton's raw binary request (``Inference-Header-Content-Length: 0``): the whole body is the one input's
    little-endian bytes, its shape deduced from the model's (batch 1 where the model batches; at most one
    dimension may be variable), every output returned as binary data."""
    if len(spec.inputs) != 1:
        raise InvalidInput(f"Raw request must only have 1 input (found 1) to be deduced but got {len(spec.inputs)} "
                           f"inputs in '{model}' model configuration: a raw binary request (Inference-Header-"
                           f"Content-Length: 0) carries one input; model {model!r} has inputs "
                           f"{[t.name for t in spec.inputs]}: send the JSON header with them")
    t = spec.inputs[0]
    shape = ([1] if spec.max_batch_size > 0 else []) + list(t.dims)
    if t.datatype == "BYTES":        # the whole body is the one element (Triton's rule)
        if list(t.dims) != [1]:
            raise InvalidInput(f"For BYTE datatype raw input '{t.name}', the model must have input shape [1]: its "
                               f"shape is {list(t.dims)}")
        inp = InferInput(t.name, t.datatype, shape, values=[bytes(body)])
        return InferRequest(model, version, "", [inp], [], {"binary_data_output": True})
    variable = [i for i, d in enumerate(shape) if d < 0]
    if len(variable) > 1:
        raise InvalidInput(f"The shape of the raw input '{t.name}' can not be deduced because there are more than one "
                           f"variable-sized dimension: {shape} has {len(variable)} (at most one); send the JSON "
                           f"header")
    try:
        itemsize = np.dtype(numpy_dtype(t.datatype, f"input {t.name!r}")).itemsize
    except UnsupportedDataType as exc:
        raise InvalidInput(f"a raw binary request cannot carry input {t.name!r}: {exc}") from None
    fixed = int(np.prod([d for d in shape if d >= 0], dtype=np.int64))
    if len(body) % itemsize or (len(body) // itemsize) % max(fixed, 1):
        raise InvalidInput(f"a raw binary request of {len(body)} bytes does not fill input {t.name!r} of shape "
                           f"{shape} with {t.datatype} ({itemsize} bytes per element)")
    if variable:
        shape[variable[0]] = (len(body) // itemsize) // max(fixed, 1)
    inp = InferInput(t.name, t.datatype, shape)
    inp.raw = memoryview(body)
    return InferRequest(model, version, "", [inp], [], {"binary_data_output": True})


def _json_text(name: str, i: int, item: Any) -> str:
    """A BYTES output element as JSON text: JSON carries UTF-8 text only, other bytes travel as binary data."""
    if not isinstance(item, bytes):
        return str(item)
    try:
        return item.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidInput(f"output {name!r}: element {i} is not UTF-8 text, which JSON cannot carry; request the "
                           f"output as binary data (parameters: binary_data: true)") from None


def encode_infer_response(resp: InferResponse, binary_default: bool) -> tuple[bytes, int | None]:
    """(body, json header length or None)."""
    outputs = []
    blobs = []
    for o in resp.outputs:
        entry: dict[str, Any] = {"name": o.name, "datatype": o.datatype, "shape": o.shape}
        binary = o.binary if o.binary is not None else binary_default
        if o.shm is not None:  # written to the region: no data in the body
            entry["parameters"] = {"shared_memory_region": o.shm.region,
                                   "shared_memory_byte_size": len(raw_bytes(o.datatype, o.data))}
        elif binary:
            blob = raw_bytes(o.datatype, o.data)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif o.datatype == "BYTES":
            entry["data"] = [_json_text(o.name, i, x) for i, x in enumerate(o.data.reshape(-1))]
        else:
            entry["data"] = np.ascontiguousarray(o.data).reshape(-1)
        outputs.append(entry)
    doc = {"model_name": resp.model_name, "model_version": resp.model_version, "outputs": outputs}
    if resp.id:
        doc["id"] = resp.id
    header = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return header, None
    return header + b"".join(blobs), len(header)
