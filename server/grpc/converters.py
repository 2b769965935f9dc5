"""The one place where protobuf messages meet the core's types (gRPC transport)."""
from __future__ import annotations

from typing import Any

from google.protobuf import json_format

from foldserve.datatypes import raw_bytes
from foldserve.errors import InvalidInput
from foldserve.protocol import grpc_service_pb2 as pb
from server.core.shm import shm_ref
from server.core.types import (
    IndexEntry,
    InferInput,
    InferRequest,
    InferResponse,
    ModelMetadata,
    RequestedOutput,
    ServerMetadata,
)

# typed contents field for each v2 datatype (FP16/BF16 travel only as raw bytes)
CONTENTS_FIELD = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
                  "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
                  "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
                  "FP64": "fp64_contents", "BYTES": "bytes_contents"}


def _param(p: pb.InferParameter) -> Any:
    which = p.WhichOneof("parameter_choice")
    return getattr(p, which) if which else None


def _shm(params, what: str):
    return shm_ref({k: _param(v) for k, v in params.items()}, what) if params else None


def request_from_proto(msg: pb.ModelInferRequest) -> InferRequest:
    refs = [_shm(t.parameters, f"input {t.name!r}") for t in msg.inputs]
    raw = msg.raw_input_contents
    in_messages = sum(r is None for r in refs)       # inputs in shared memory have no raw entry
    if raw and len(raw) != in_messages:
        raise InvalidInput(f"raw_input_contents has {len(raw)} entries for {in_messages} inputs not in shared "
                           f"memory; give one per such input, in the order of 'inputs'")
    inputs = []
    next_raw = 0
    for t, ref in zip(msg.inputs, refs, strict=False):
        inp = InferInput(t.name, t.datatype, list(t.shape), shm=ref)
        if ref is not None:
            if t.HasField("contents"):
                raise InvalidInput(f"input {t.name!r}: give either shared_memory_region or contents, not both")
        elif raw:
            if t.HasField("contents"):
                raise InvalidInput(f"input {t.name!r}: give either raw_input_contents or contents, not both")
            inp.raw = raw[next_raw]
            next_raw += 1
        elif t.HasField("contents"):
            field = CONTENTS_FIELD.get(t.datatype)
            if field is None:
                raise InvalidInput(f"input {t.name!r}: datatype {t.datatype!r} must be sent in raw_input_contents")
            others = [f.name for f, _ in t.contents.ListFields() if f.name != field]
            if others:
                raise InvalidInput(f"input {t.name!r}: {t.datatype} data must be in contents.{field}, found {others}")
            inp.values = getattr(t.contents, field)
        inputs.append(inp)
    outputs = []
    for o in msg.outputs:
        cc = 0
        if "classification" in o.parameters:
            given = o.parameters["classification"]
            if given.WhichOneof("parameter_choice") != "int64_param":
                raise InvalidInput(f"output {o.name!r}: parameter 'classification' must be an int64_param (the "
                                   f"number of top classes), got {given.WhichOneof('parameter_choice')}")
            cc = given.int64_param
        outputs.append(RequestedOutput(o.name, None, int(cc), _shm(o.parameters, f"output {o.name!r}")))
    params = {k: _param(v) for k, v in msg.parameters.items()}
    return InferRequest(msg.model_name, msg.model_version, msg.id, inputs, outputs, params)


def response_to_proto(resp: InferResponse) -> pb.ModelInferResponse:
    out = pb.ModelInferResponse(model_name=resp.model_name, model_version=resp.model_version, id=resp.id)
    raws = []
    for o in resp.outputs:
        t = out.outputs.add(name=o.name, datatype=o.datatype, shape=o.shape)
        if o.shm is not None:  # written to the region; an empty entry keeps raw_output_contents positional
            t.parameters["shared_memory_region"].string_param = o.shm.region
            t.parameters["shared_memory_byte_size"].int64_param = len(raw_bytes(o.datatype, o.data))
            raws.append(b"")
            continue
        raws.append(raw_bytes(o.datatype, o.data))
    out.raw_output_contents.extend(raws)  # always raw: what tritonclient decodes
    return out


def server_metadata_to_proto(meta: ServerMetadata) -> pb.ServerMetadataResponse:
    return pb.ServerMetadataResponse(name=meta.name, version=meta.version, extensions=meta.extensions)


def metadata_to_proto(meta: ModelMetadata) -> pb.ModelMetadataResponse:
    out = pb.ModelMetadataResponse(name=meta.name, versions=meta.versions, platform=meta.platform)
    for t in meta.inputs:
        out.inputs.add(name=t.name, datatype=t.datatype, shape=t.shape)
    for t in meta.outputs:
        out.outputs.add(name=t.name, datatype=t.datatype, shape=t.shape)
    return out


def stats_to_proto(stats: list[dict[str, Any]]) -> pb.ModelStatisticsResponse:
    return json_format.ParseDict({"model_stats": stats}, pb.ModelStatisticsResponse())


def index_to_proto(index: list[IndexEntry]) -> pb.RepositoryIndexResponse:
    return pb.RepositoryIndexResponse(models=[pb.RepositoryIndexResponse.ModelIndex(**m.to_dict()) for m in index])


def shm_status_to_proto(regions: list[dict]) -> pb.SystemSharedMemoryStatusResponse:
    out = pb.SystemSharedMemoryStatusResponse()
    for r in regions:
        out.regions[r["name"]].CopyFrom(pb.SystemSharedMemoryStatusResponse.RegionStatus(**r))
    return out
