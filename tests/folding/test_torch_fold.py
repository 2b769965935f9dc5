from __future__ import annotations

import pytest
import torch
from torch import nn

from folding import fold_module
from folding.tolerances import TOLERANCES
from foldserve.errors import FoldError
from tests.folding.helpers import assert_close, assert_unchanged, randomize_bn, state_snapshot
from trainer.models import ARCHITECTURES, arch_spec, build_model, resolve_arch_args

BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONVT = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
SPATIAL = {1: (11,), 2: (9, 10), 3: (5, 6, 7)}


def check_fold(model: nn.Module, x: torch.Tensor, expect_folded: int, expect_skipped: int = 0):
    model = randomize_bn(model).eval()
    snap = state_snapshot(model)
    with torch.no_grad():
        expected = model(x)
    folded, report = fold_module(model, (x,))
    assert len(report.folded) == expect_folded, report
    assert len(report.skipped) == expect_skipped, report
    assert report.bn_before - report.bn_after == expect_folded
    with torch.no_grad():
        assert_close(folded(x), expected)
    assert_unchanged(model, snap)
    return folded, report


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("stride,padding,dilation,groups,bias", [
    (1, 0, 1, 1, False), (2, 1, 1, 1, True), (1, 2, 2, 2, False), (1, 1, 1, 8, True),  # depthwise
])
@pytest.mark.parametrize("affine,eps", [(True, 1e-5), (False, 1e-3)])
def test_conv_bn(dims, stride, padding, dilation, groups, bias, affine, eps):
    model = nn.Sequential(CONV[dims](8, 8, 3, stride=stride, padding=padding, dilation=dilation, groups=groups,
                                     bias=bias), BN[dims](8, eps=eps, affine=affine))
    check_fold(model, torch.randn(3, 8, *SPATIAL[dims]) * 3 + 1, 1)


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("groups,bias,stride", [(1, False, 1), (2, True, 2), (4, False, 2)])
def test_conv_transpose_bn_group_aware(dims, groups, bias, stride):
    model = nn.Sequential(CONVT[dims](8, 12, 3, stride=stride, padding=1, output_padding=stride - 1,
                                      groups=groups, bias=bias), BN[dims](12))
    check_fold(model, torch.randn(2, 8, *SPATIAL[dims]), 1)


@pytest.mark.parametrize("bias", [True, False])
def test_linear_bn1d(bias):
    check_fold(nn.Sequential(nn.Linear(20, 16, bias=bias), nn.BatchNorm1d(16)), torch.randn(7, 20) * 2, 1)


def test_forward_fold_bn_into_linear_after_activation():
    model = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.BatchNorm1d(16), nn.Linear(16, 5))
    _, report = check_fold(model, torch.randn(7, 20), 1)
    assert report.folded[0].direction == "forward" and report.folded[0].into == "3"


@pytest.mark.parametrize("groups", [1, 4])
def test_forward_fold_bn_into_unpadded_conv(groups):
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(8),
                          nn.Conv2d(8, 12, 1, groups=groups), nn.ReLU(), nn.BatchNorm2d(12),
                          nn.Conv2d(12, 4, 3, padding=0))
    _, report = check_fold(model, torch.randn(2, 3, 9, 9), 2)
    assert {f.direction for f in report.folded} == {"forward"}


def test_forward_fold_into_padded_conv_is_skipped_with_reason():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 3, padding=1))
    _, report = check_fold(model, torch.randn(2, 3, 9, 9), 0, 1)
    reason = report.skipped[0].reason
    assert "nonlinearity" in reason and "zero-pads" in reason and "not exact at the borders" in reason


def test_producer_output_used_elsewhere_is_skipped():
    class TwoUses(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    _, report = check_fold(TwoUses(), torch.randn(2, 3, 8, 8), 0, 1)
    assert "also used by" in report.skipped[0].reason


def test_producer_called_twice_is_skipped():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn1, self.bn2 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn2(self.conv(self.bn1(self.conv(x))))

    _, report = check_fold(Shared(), torch.randn(2, 4, 5, 5), 0, 2)
    assert all("called 2 times" in s.reason for s in report.skipped)


def test_track_running_stats_false_is_skipped():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    _, report = check_fold(model, torch.randn(4, 3, 8, 8), 0, 1)
    assert "track_running_stats=False" in report.skipped[0].reason


def test_bn_after_nonlinearity_without_target_is_skipped():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.Sigmoid())
    _, report = check_fold(model, torch.randn(2, 3, 8, 8), 0, 1)
    assert "ReLU" in report.skipped[0].reason and "nonlinearity" in report.skipped[0].reason


def test_sync_batchnorm_in_eval_folds_like_batchnorm():
    model = nn.Sequential(nn.Conv2d(3, 6, 3, bias=False), nn.SyncBatchNorm(6))
    check_fold(model, torch.randn(2, 3, 8, 8), 1)


def test_training_mode_is_refused_with_eval_hint():
    with pytest.raises(FoldError, match=r"Call model.eval\(\)"):
        fold_module(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train())


def test_untraceable_model_gives_a_clear_error():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            if x.sum() > 0:
                return self.bn(self.conv(x))
            return x

    with pytest.raises(FoldError, match="torch.fx cannot trace DataDependent"):
        fold_module(DataDependent().eval())


def test_efficientnet_style_block_with_squeeze_excitation_and_silu():
    class SE(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.pool, self.fc1, self.fc2 = nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, c // 4, 1), nn.Conv2d(c // 4, c, 1)

        def forward(self, x):
            return x * torch.sigmoid(self.fc2(nn.functional.silu(self.fc1(self.pool(x)))))

    class MBConv(nn.Module):
        def __init__(self, c=8, e=4):
            super().__init__()
            h = c * e
            self.expand, self.bn1 = nn.Conv2d(c, h, 1, bias=False), nn.BatchNorm2d(h)
            self.dw, self.bn2 = nn.Conv2d(h, h, 3, padding=1, groups=h, bias=False), nn.BatchNorm2d(h)
            self.se = SE(h)
            self.project, self.bn3 = nn.Conv2d(h, c, 1, bias=False), nn.BatchNorm2d(c)
            self.act = nn.SiLU()

        def forward(self, x):
            y = self.act(self.bn1(self.expand(x)))
            y = self.se(self.act(self.bn2(self.dw(y))))
            return x + self.bn3(self.project(y))

    check_fold(MBConv(), torch.randn(2, 8, 7, 7), 3)


def test_resnext_regnet_style_grouped_bottleneck():
    class Block(nn.Module):
        def __init__(self, c=32, groups=8):
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)
            self.c2, self.b2 = nn.Conv2d(c, c, 3, padding=1, groups=groups, bias=False), nn.BatchNorm2d(c)
            self.c3, self.b3 = nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)

        def forward(self, x):
            y = torch.relu(self.b1(self.c1(x)))
            y = torch.relu(self.b2(self.c2(y)))
            return torch.relu(x + self.b3(self.c3(y)))

    check_fold(nn.Sequential(Block(), Block()), torch.randn(2, 32, 6, 6), 6)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("placement", ["before", "after"])
def test_trainer_architectures_fold_exactly(arch, placement):
    """Every BN is folded or skipped for a stated reason, and the folded model stays exact against a
    float64 reference (as close as the unfolded float32 model is)."""
    spec = arch_spec(arch)
    shape = [1, 8, 8] if spec.input_kind != "sequence" else [1, 64]
    model = randomize_bn(build_model(arch, resolve_arch_args(arch, shape, 10, placement))).eval()
    x = torch.randn(6, *shape) * 3
    with torch.no_grad():
        truth = model.double()(x.double())
        model.float()
        unfolded_err = (model(x).double() - truth).abs().max().item()
    snap = state_snapshot(model)
    folded, report = fold_module(model, (x,))
    assert len(report.folded) + len(report.skipped) == report.bn_before
    assert report.bn_after == len(report.skipped)
    if placement == "before":
        assert not report.skipped, report.skipped  # BN-before-activation nets fold completely
    for s in report.skipped:
        assert "cannot fold backwards" in s.reason
    with torch.no_grad():
        err = (folded(x).double() - truth).abs().max().item()
    tol = TOLERANCES["float32"]
    assert err <= max(2 * unfolded_err, tol.rtol * truth.abs().max().item() + tol.atol)
    assert_unchanged(model, snap)


def test_both_passes_name_nonlinearities_alike():
    """One meaning of 'nonlinearity' in both passes: the torch pass's types map onto the ONNX op names."""
    from folding.rules import NONLINEARITIES
    from folding.torch_fold import NONLINEAR_FUNCTIONS, NONLINEAR_MODULES

    assert set(NONLINEAR_MODULES.values()) | set(NONLINEAR_FUNCTIONS.values()) <= NONLINEARITIES
