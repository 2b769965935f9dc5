"""The transport-free core: model repository, onnxruntime runtime, dynamic batcher, validation."""
from __future__ import annotations
