"""Fixtures for folding tests: non-trivial BN statistics and the one tolerance check."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from folding.tolerances import LAYER_FP32, Tolerance, compare


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random means, variances far from 1 (log-uniform 1e-2..1e2), and one channel with var ~ 1e-7."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            c = m.num_features
            m.running_mean.copy_(torch.rand(c, generator=g) * 4 - 2)
            m.running_var.copy_(10 ** (torch.rand(c, generator=g) * 4 - 2))
            m.running_var[0] = 1e-7
            if m.affine:
                m.weight.data.copy_(torch.rand(c, generator=g) * 1.5 + 0.25)
                m.bias.data.copy_(torch.rand(c, generator=g) * 2 - 1)
    return model


def assert_close(actual, expected, tol: Tolerance = LAYER_FP32) -> None:
    a = actual.detach().numpy() if isinstance(actual, torch.Tensor) else np.asarray(actual)
    e = expected.detach().numpy() if isinstance(expected, torch.Tensor) else np.asarray(expected)
    c = compare(a, e, tol)
    assert c.passed, f"folded output differs: {c}"


def state_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    now = model.state_dict()
    assert now.keys() == snapshot.keys()
    for k, v in snapshot.items():
        assert torch.equal(now[k], v), f"input model was mutated at {k}"
