"""The v2 model metadata as a typed object: what the server answers and what the client reads back."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class TensorMetadata:
    name: str
    datatype: str
    shape: list[int]     # full shape, -1 for a dynamic dimension (the batch axis of batched models)


@dataclass(frozen=True)
class ModelMetadata:
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
