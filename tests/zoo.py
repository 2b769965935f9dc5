"""Networks written here, not by the trainer, for the bring-your-own-model tests.

``resnet18`` and ``mobilenet_v3_small`` follow torchvision's definitions layer for layer (the same module
names, so a torchvision state_dict loads into them); torchvision itself has no CPU wheel for our torch.
``ResidualNet`` is a small hand-written network with a residual block, a grouped ConvTranspose followed
by BN and a Linear -> BatchNorm1d head.
"""
from __future__ import annotations

import torch
from torch import nn

from bench.libraries import library, randomize_bn  # noqa: F401 (tests import them from here)

# --- ResNet-18 (torchvision.models.resnet18) ----------------------------------------------------------

class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18(nn.Module):
    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        chans = [64, 128, 256, 512]
        cin = 64
        for i, c in enumerate(chans):
            stride = 1 if i == 0 else 2
            setattr(self, f"layer{i + 1}", nn.Sequential(BasicBlock(cin, c, stride), BasicBlock(c, c)))
            cin = c
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes: int = 1000, seed: int = 0) -> ResNet18:
    torch.manual_seed(seed)
    return randomize_bn(ResNet18(num_classes), seed)


# --- MobileNetV3-small (torchvision.models.mobilenet_v3_small) ----------------------------------------

def _divisible(v: float, d: int = 8) -> int:
    new = max(d, int(v + d / 2) // d * d)
    return new + d if new < 0.9 * v else new


class ConvBNAct(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: type | None = None) -> None:
        layers = [nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
                  nn.BatchNorm2d(cout, eps=0.001, momentum=0.01)]
        if act is not None:
            layers.append(act(inplace=True))
        super().__init__(*layers)


class SqueezeExcitation(nn.Module):
    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation = nn.ReLU()
        self.scale_activation = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return s * x


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, k: int, exp: int, cout: int, se: bool, act: str, stride: int) -> None:
        super().__init__()
        a = nn.Hardswish if act == "HS" else nn.ReLU
        self.use_res = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if exp != cin:
            layers.append(ConvBNAct(cin, exp, 1, act=a))
        layers.append(ConvBNAct(exp, exp, k, stride, groups=exp, act=a))
        if se:
            layers.append(SqueezeExcitation(exp, _divisible(exp // 4)))
        layers.append(ConvBNAct(exp, cout, 1))
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return y + x if self.use_res else y


SMALL = [(16, 3, 16, 16, True, "RE", 2), (16, 3, 72, 24, False, "RE", 2), (24, 3, 88, 24, False, "RE", 1),
         (24, 5, 96, 40, True, "HS", 2), (40, 5, 240, 40, True, "HS", 1), (40, 5, 240, 40, True, "HS", 1),
         (40, 5, 120, 48, True, "HS", 1), (48, 5, 144, 48, True, "HS", 1), (48, 5, 288, 96, True, "HS", 2),
         (96, 5, 576, 96, True, "HS", 1), (96, 5, 576, 96, True, "HS", 1)]


class MobileNetV3Small(nn.Module):
    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        layers: list[nn.Module] = [ConvBNAct(3, 16, 3, 2, act=nn.Hardswish)]
        layers += [InvertedResidual(*cfg) for cfg in SMALL]
        layers.append(ConvBNAct(96, 576, 1, act=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(576, 1024), nn.Hardswish(inplace=True), nn.Dropout(0.2, inplace=True),
                                        nn.Linear(1024, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def mobilenet_v3_small(num_classes: int = 1000, seed: int = 0) -> MobileNetV3Small:
    torch.manual_seed(seed)
    return randomize_bn(MobileNetV3Small(num_classes), seed)


# --- a small hand-written residual net with ConvTranspose and Linear heads ----------------------------

class ResidualNet(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.conv_a = nn.Conv2d(16, 16, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(16)
        self.conv_b = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn_b = nn.BatchNorm2d(16)
        self.up = nn.ConvTranspose2d(16, 8, 2, stride=2, groups=2)
        self.bn_up = nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(8, 32)
        self.bn_fc = nn.BatchNorm1d(32)
        self.fc2 = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.bn_b(self.conv_b(torch.relu(self.bn_a(self.conv_a(x))))))
        x = torch.relu(self.bn_up(self.up(x)))
        x = torch.flatten(self.pool(x), 1)
        return self.fc2(torch.relu(self.bn_fc(self.fc1(x))))


def residual_net(seed: int = 0) -> ResidualNet:
    torch.manual_seed(seed)
    return randomize_bn(ResidualNet(), seed)


# --- frozen BN and re-parameterisable branches (issue 22) ----------------------------------------------

class FrozenBatchNorm2d(nn.Module):
    """torchvision.ops.FrozenBatchNorm2d: fixed statistics as buffers, computed as ``x * scale + bias``."""

    def __init__(self, n: int, eps: float = 1e-5, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed + n)
        self.register_buffer("weight", torch.rand(n, generator=g) + 0.5)
        self.register_buffer("bias", torch.randn(n, generator=g) * 0.2)
        self.register_buffer("running_mean", torch.randn(n, generator=g) * 0.5)
        self.register_buffer("running_var", torch.rand(n, generator=g) * 1.5 + 0.25)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight.reshape(1, -1, 1, 1), self.bias.reshape(1, -1, 1, 1)
        rv, rm = self.running_var.reshape(1, -1, 1, 1), self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        return x * scale + (b - rm * scale)


class FrozenNet(nn.Module):
    """A detection-style backbone with frozen BN: Conv -> FrozenBN, grouped, a grouped ConvTranspose, a head."""

    frozen = 4

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.f1 = nn.Conv2d(3, 8, 3, 2, 1, bias=False), FrozenBatchNorm2d(8, seed=1)
        self.c2, self.f2 = nn.Conv2d(8, 8, 3, 1, 1, groups=4, bias=False), FrozenBatchNorm2d(8, seed=2)
        self.c3, self.f3 = nn.Conv2d(8, 16, 1, bias=False), FrozenBatchNorm2d(16, seed=3)
        self.up, self.f4 = nn.ConvTranspose2d(16, 8, 2, 2, groups=2), FrozenBatchNorm2d(8, seed=4)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.f1(self.c1(x)))
        x = torch.relu(self.f2(self.c2(x)) + x)
        x = torch.relu(self.f3(self.c3(x)))
        x = self.f4(self.up(x))
        return self.fc(x.mean((2, 3)))


def _conv_bn(cin: int, cout: int, k: int | tuple[int, int], stride: int, pad: int | tuple[int, int],
             groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, pad, groups=groups, bias=False), nn.BatchNorm2d(cout))


class RepVGGBlock(nn.Module):
    """RepVGG's training-time block: 3x3 conv+BN + 1x1 conv+BN (+ identity BN when shapes allow)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.rbr_dense, self.rbr_1x1 = _conv_bn(cin, cout, 3, stride, 1), _conv_bn(cin, cout, 1, stride, 0)
        self.rbr_identity = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.rbr_dense(x) + self.rbr_1x1(x)
        return torch.relu(y if self.rbr_identity is None else y + self.rbr_identity(x))


class MobileOneBlock(nn.Module):
    """MobileOne's training-time block: k over-parameterised kxk conv+BN branches, a 1x1 "scale" conv+BN
    (for k > 1), an identity BN when shapes allow; depthwise (groups = channels) or pointwise."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, groups: int, branches: int = 3,
                 act: bool = True) -> None:
        super().__init__()
        self.act = act
        self.rbr_conv = nn.ModuleList(_conv_bn(cin, cout, k, stride, k // 2, groups) for _ in range(branches))
        self.rbr_scale = _conv_bn(cin, cout, 1, stride, 0, groups) if k > 1 else None
        self.rbr_skip = nn.BatchNorm2d(cout) if cin == cout and stride == 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.rbr_conv[0](x)
        for conv in self.rbr_conv[1:]:
            y = y + conv(x)
        if self.rbr_scale is not None:
            y = y + self.rbr_scale(x)
        if self.rbr_skip is not None:
            y = y + self.rbr_skip(x)
        return torch.relu(y) if self.act else y


class RepMixer(nn.Module):
    """FastViT's training-time token mixer: ``x + layer_scale * (mixer(x) - norm(x))``, the mixer a depthwise
    MobileOne block without activation, the norm an identity BN, the layer scale per channel (random here, so
    that a wrong coefficient shows)."""

    def __init__(self, c: int, k: int = 3) -> None:
        super().__init__()
        self.mixer = MobileOneBlock(c, c, k, 1, c, branches=1, act=False)
        self.norm = nn.BatchNorm2d(c)
        self.layer_scale = nn.Parameter(torch.rand(c, 1, 1) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layer_scale * (self.mixer(x) - self.norm(x))


class ACBlock(nn.Module):
    """ACNet's asymmetric convolution block: 3x3 + 1x3 + 3x1, each with BN."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.square = _conv_bn(c, c, 3, 1, 1)
        self.hor, self.ver = _conv_bn(c, c, (1, 3), 1, (0, 1)), _conv_bn(c, c, (3, 1), 1, (1, 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.square(x) + self.hor(x) + self.ver(x))


class RepNet(nn.Module):
    """Training-time branches: RepVGG (stride 2 and 1), MobileOne (depthwise + pointwise, stride 1 and 2),
    FastViT's RepMixer and ACNet blocks; ``deploy_convs`` is the Conv count of its deploy form (one per block)."""

    deploy_convs = 8

    def __init__(self, width: int = 8, classes: int = 10) -> None:
        super().__init__()
        w = width
        self.stages = nn.Sequential(
            RepVGGBlock(3, w, 2), RepVGGBlock(w, w),
            MobileOneBlock(w, w, 3, 1, w), MobileOneBlock(w, 2 * w, 1, 1, 1),
            MobileOneBlock(2 * w, 2 * w, 3, 2, 2 * w), MobileOneBlock(2 * w, 2 * w, 1, 1, 1),
            RepMixer(2 * w), ACBlock(2 * w))
        self.head = nn.Linear(2 * w, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(x).mean((2, 3)))


def frozen_net() -> FrozenNet:
    return FrozenNet().eval()


def rep_net(width: int = 8) -> RepNet:
    return randomize_bn(RepNet(width))


class TwoTower(nn.Module):
    """Two inputs (an image and a feature vector) and two outputs (class scores and an embedding), BN on both
    towers (BatchNorm2d after convs, BatchNorm1d after a Linear)."""

    def __init__(self, classes: int = 5, features: int = 6) -> None:
        super().__init__()
        self.image = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                   nn.Conv2d(8, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.vector = nn.Sequential(nn.Linear(features, 16), nn.BatchNorm1d(16), nn.ReLU())
        self.head = nn.Linear(32, classes)
        self.embed = nn.Linear(32, 4)

    def forward(self, image: torch.Tensor, vector: torch.Tensor):
        z = torch.cat([self.image(image).mean((2, 3)), self.vector(vector)], dim=1)
        return {"scores": self.head(z), "embedding": self.embed(z)}


def two_tower() -> TwoTower:
    return randomize_bn(TwoTower())
