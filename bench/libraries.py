"""Models from the libraries users have (torchvision, timm), for the benchmark and the tests.

PyPI's torchvision is a CUDA build whose import fails against our CPU torch ("operator torchvision::nms does
not exist") unless its two custom ops are defined first (../shared/NOTES.md); timm imports torchvision. Weights
are never downloaded: models are built with random weights and randomised BN statistics by the caller.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

_LIBS: list[Any] = []     # keeps the op library alive


def library(name: str) -> ModuleType:
    """Import ``torchvision`` or ``timm`` (or a module of theirs) against our CPU torch."""
    import torch

    try:
        torch.ops.torchvision.nms  # noqa: B018 (already defined, by torchvision or by us)
    except (AttributeError, RuntimeError):
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _LIBS.append(lib)
    return importlib.import_module(name)


def randomize_bn(model: Any, seed: int = 0) -> Any:
    """Non-trivial BN statistics and affine parameters (a freshly built net has mean 0, var 1); eval mode."""
    import torch

    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.25)
            if m.affine:
                m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.data.copy_(torch.randn(n, generator=g) * 0.2)
    return model.eval()


def _nms(dets: Any, scores: Any, iou_threshold: float) -> Any:
    """torchvision's nms in plain torch (greedy, highest score first): what its C++ kernel computes."""
    import torch

    x1, y1, x2, y2 = dets.unbind(1)
    area = (x2 - x1) * (y2 - y1)
    suppressed = torch.zeros(len(dets), dtype=torch.bool)
    keep = []
    for i in scores.argsort(descending=True).tolist():
        if suppressed[i]:
            continue
        keep.append(i)
        w = (torch.minimum(x2[i], x2) - torch.maximum(x1[i], x1)).clamp(min=0)
        h = (torch.minimum(y2[i], y2) - torch.maximum(y1[i], y1)).clamp(min=0)
        inter = w * h
        suppressed |= inter / (area[i] + area - inter) > iou_threshold
    return torch.tensor(keep, dtype=torch.long)


def _has_ops() -> bool:
    return True


def detection_ops() -> ModuleType:
    """torchvision with a CPU ``nms`` kernel (:func:`_nms`), so that whole detectors (SSDlite, RetinaNet with their
    NMS) run and export against our CPU torch; torchvision's ONNX exporter writes NonMaxSuppression for it."""
    import torch

    tv = library("torchvision")
    import torchvision.extension as ext

    if not ext._has_ops() and not any(getattr(lib, "_foldserve_nms", False) for lib in _LIBS):
        impl = torch.library.Library("torchvision", "IMPL")
        impl.impl("nms", _nms, "CPU")
        impl._foldserve_nms = True  # type: ignore[attr-defined]
        _LIBS.append(impl)
        ext._has_ops = _has_ops     # torchvision asks before it calls its own ops (a def: TorchScript compiles it)
    return tv
