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
