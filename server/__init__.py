"""KServe v2 (Open Inference Protocol) server on onnxruntime: gRPC and REST over one core.

``server/`` never imports torch: the server image stays small.
"""
from __future__ import annotations
