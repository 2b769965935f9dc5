"""The core's own request, response and model-description types (no protobuf, no HTTP)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class TensorSpec:
    name: str
    datatype: str                  # v2 datatype
    dims: list[int]                # per-sample dims (without the batch axis when max_batch_size > 0); -1: any

    def full_shape(self, max_batch_size: int) -> list[int]:
        return ([-1] if max_batch_size > 0 else []) + list(self.dims)


@dataclass
class BatchingSpec:
    preferred_batch_sizes: list[int]
    max_queue_delay_us: int


@dataclass
class ModelSpec:
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
    config: dict[str, Any] = field(default_factory=dict)   # the config in Triton's JSON form

    def input(self, name: str) -> TensorSpec | None:
        return next((t for t in self.inputs if t.name == name), None)

    def output(self, name: str) -> TensorSpec | None:
        return next((t for t in self.outputs if t.name == name), None)


@dataclass
class InferInput:
    """One input as the transport received it; ``raw`` or ``values`` holds the data until validated."""

    name: str
    datatype: str
    shape: list[int]
    raw: bytes | memoryview | None = None
    values: Any = None            # nested lists / flat list (JSON, typed protobuf contents)
    data: np.ndarray | None = None  # set by validation


@dataclass
class RequestedOutput:
    name: str
    binary: bool | None = None    # REST binary extension: send this output as binary
    class_count: int = 0          # classification extension: top-k labels instead of the tensor


@dataclass
class InferRequest:
    model_name: str
    model_version: str = ""
    id: str = ""
    inputs: list[InferInput] = field(default_factory=list)
    outputs: list[RequestedOutput] = field(default_factory=list)
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class InferOutput:
    name: str
    datatype: str
    shape: list[int]
    data: np.ndarray
    binary: bool | None = None


@dataclass
class InferResponse:
    model_name: str
    model_version: str
    id: str
    outputs: list[InferOutput]
    parameters: dict[str, Any] = field(default_factory=dict)
