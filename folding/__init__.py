"""Folding: fuse BatchNorm into neighbouring conv/linear weights (torch.fx and ONNX), export, verify.

Public API: :func:`fold_module`, :func:`fold_onnx`, :class:`FoldReport`.
"""
from __future__ import annotations

from foldserve.records import FoldedPair, FoldReport, SkippedBN

__all__ = ["FoldReport", "FoldedPair", "SkippedBN", "fold_module", "fold_onnx"]


def __getattr__(name: str):
    # torch and onnx are imported on first use, so `import folding` stays cheap
    if name == "fold_module":
        from folding.torch_fold import fold_module
        return fold_module
    if name == "fold_onnx":
        from folding.onnx_passes import fold_onnx
        return fold_onnx
    raise AttributeError(name)
