"""The core's own request, response and model-description types (no protobuf, no HTTP).

Each transport renders these; none of them travels as an untyped dict inside the core.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from foldserve.metadata import ModelMetadata, TensorMetadata
from foldserve.model_config import TensorSpec

__all__ = [
    "BatchingSpec",
    "IndexEntry",
    "InferInput",
    "InferOutput",
    "InferRequest",
    "InferResponse",
    "ModelMetadata",
    "ModelSpec",
    "Readiness",
    "RequestedOutput",
    "ServerMetadata",
    "ShmRef",
    "TensorMetadata",
    "TensorSpec",
]


@dataclass(frozen=True)
class BatchingSpec:
    """Dynamic batching from config.pbtxt: the batch window, Triton's default queue policy and priority levels."""

    max_queue_delay_us: int
    max_queue_size: int = 0              # 0: only the server's --max-queue-size bounds the queue
    queue_timeout_us: int = 0            # 0: a request may wait in the queue as long as it takes
    timeout_action: str = "REJECT"       # REJECT: fail a request past its queue timeout; DELAY: serve it last
    allow_timeout_override: bool = False  # a request's "timeout" parameter (microseconds) replaces queue_timeout_us
    priority_levels: int = 0             # 0: one queue; N: requests' "priority" 1 (first) .. N
    default_priority_level: int = 0


@dataclass
class ModelSpec:
    """A loaded version's interface and serving parameters, from its (completed) config.pbtxt."""

    name: str
    platform: str
    max_batch_size: int
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    batching: BatchingSpec | None
    version_policy: dict[str, Any]
    instances: int = 1
    labels: list[str] = field(default_factory=list)
    parameters: dict[str, str] = field(default_factory=dict)
    config: Any = None            # the completed ModelConfig message (foldserve.model_config.ModelConfig)
    opaque_strings: bool = False  # BYTES elements are moved, never read: any bytes (server/core/strings.py)

    def input(self, name: str) -> TensorSpec | None:
        return next((t for t in self.inputs if t.name == name), None)

    def output(self, name: str) -> TensorSpec | None:
        return next((t for t in self.outputs if t.name == name), None)


@dataclass(frozen=True)
class ShmRef:
    """Where a tensor lives in system shared memory: a registered region, an offset in it, a byte size."""

    region: str
    offset: int
    byte_size: int


@dataclass
class InferInput:
    """One input as the transport received it; ``raw`` or ``values`` holds the data until validated."""

    name: str
    datatype: str
    shape: list[int]
    raw: bytes | memoryview | None = None
    values: Any = None            # nested lists / flat list (JSON, typed protobuf contents)
    shm: ShmRef | None = None     # shared-memory extension: the data is in a registered region


@dataclass
class RequestedOutput:
    name: str
    binary: bool | None = None    # REST binary extension: send this output as binary
    class_count: int = 0          # classification extension: top-k labels instead of the tensor
    shm: ShmRef | None = None     # shared-memory extension: write the tensor into this region


@dataclass
class InferRequest:
    model_name: str
    model_version: str = ""
    id: str = ""
    inputs: list[InferInput] = field(default_factory=list)
    outputs: list[RequestedOutput] = field(default_factory=list)
    parameters: dict[str, Any] = field(default_factory=dict)
    trace: dict[str, str] | None = None      # the client's W3C trace context headers, where tracing is on


@dataclass
class InferOutput:
    name: str
    datatype: str
    shape: list[int]
    data: np.ndarray
    binary: bool | None = None
    shm: ShmRef | None = None     # written to this region; the response carries no data for it


@dataclass
class InferResponse:
    model_name: str
    model_version: str
    id: str
    outputs: list[InferOutput]
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ServerMetadata:
    name: str
    version: str
    extensions: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Readiness:
    """A model's readiness as the data plane decides it; ``error`` says why not (its class says whether the
    model is unknown, ModelNotFound, or known but not ready, ModelNotReady)."""

    ready: bool
    error: Exception | None = None


@dataclass(frozen=True)
class IndexEntry:
    name: str
    version: str
    state: str      # READY | UNAVAILABLE | LOADING | UNLOADING
    reason: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)
