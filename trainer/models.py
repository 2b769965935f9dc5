"""BatchNorm network architectures the trainer builds by name.

Every network starts with :class:`Normalize` (the input normalisation, stored as buffers), so a checkpoint
takes raw inputs and carries everything needed to rebuild it: ``build_model(arch, arch_args)`` plus the
state dict. All networks are torch.fx traceable (no data-dependent control flow), which the folding
pass relies on.

``bn_placement`` chooses where BN sits in a conv/linear unit:

* ``"before"`` (the BN paper's choice): producer -> BN -> activation. The producer has no bias (BN's
  shift makes it redundant) and BN folds backwards into it.
* ``"after"``: producer -> activation -> BN. The producer keeps its bias; BN can only fold forwards into a
  following Linear or unpadded conv.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from foldserve.errors import ConfigError

logger = logging.getLogger(__name__)

PLACEMENTS = ("before", "after")


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` with the training set's statistics as buffers."""

    def __init__(self, channels: int, view_dims: int) -> None:
        super().__init__()
        shape = (1, channels) + (1,) * view_dims
        self.register_buffer("mean", torch.zeros(shape))
        self.register_buffer("std", torch.ones(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def _act(name: str) -> nn.Module:
    if name == "relu":
        return nn.ReLU(inplace=False)
    if name == "relu6":
        return nn.ReLU6(inplace=False)
    if name == "silu":
        return nn.SiLU()
    if name == "none":
        return nn.Identity()
    raise ConfigError(f"unknown activation {name!r}")


class ConvUnit(nn.Sequential):
    """conv + BN + activation in the chosen placement; ``act='none'`` gives a linear conv + BN."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1,
                 act: str = "relu", placement: str = "before", dims: int = 2, transpose: bool = False) -> None:
        conv_cls = {1: (nn.Conv1d, nn.ConvTranspose1d), 2: (nn.Conv2d, nn.ConvTranspose2d),
                    3: (nn.Conv3d, nn.ConvTranspose3d)}[dims][int(transpose)]
        bn_cls = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
        after = placement == "after" and act != "none"
        if transpose:
            conv = conv_cls(cin, cout, kernel, stride=stride, padding=(kernel - 1) // 2,
                            output_padding=stride - 1, groups=groups, bias=after)
        else:
            conv = conv_cls(cin, cout, kernel, stride=stride, padding=(kernel - 1) // 2, groups=groups,
                            bias=after)
        layers = [conv, _act(act), bn_cls(cout)] if after else [conv, bn_cls(cout), _act(act)]
        super().__init__(*[m for m in layers if not isinstance(m, nn.Identity)])


# --- ResNet ---------------------------------------------------------------------------------------

class ResidualBlock(nn.Module):
    """``relu(conv_n(...conv1(x)) + shortcut(x))``: a block's units are ``conv1``, ``conv2``, ... (their names are
    the checkpoint's keys), the last without activation; the shortcut is a 1x1 conv + BN where the shape changes."""

    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int, placement: str, units: list[ConvUnit]) -> None:
        super().__init__()
        self.depth = len(units)
        for i, unit in enumerate(units, 1):
            self.add_module(f"conv{i}", unit)
        self.shortcut = (ConvUnit(cin, cout, 1, stride, act="none", placement=placement)
                         if stride != 1 or cin != cout else nn.Identity())
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        for i in range(1, self.depth + 1):
            y = getattr(self, f"conv{i}")(y)
        return self.act(y + self.shortcut(x))


class BasicBlock(ResidualBlock):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int, placement: str) -> None:
        cout = planes * self.expansion
        super().__init__(cin, cout, stride, placement, [
            ConvUnit(cin, planes, 3, stride, placement=placement),
            ConvUnit(planes, cout, 3, 1, act="none", placement=placement)])


class Bottleneck(ResidualBlock):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int, placement: str) -> None:
        cout = planes * self.expansion
        super().__init__(cin, cout, stride, placement, [
            ConvUnit(cin, planes, 1, 1, placement=placement),
            ConvUnit(planes, planes, 3, stride, placement=placement),
            ConvUnit(planes, cout, 1, 1, act="none", placement=placement)])


class ResNet(nn.Module):
    """CIFAR-style ResNet: a 3x3 stem, stages of ``blocks`` blocks at widths w, 2w, 4w, ..."""

    def __init__(self, in_channels: int, num_classes: int, block: str = "basic", blocks: int = 1,
                 width: int = 16, stages: int = 3, placement: str = "before", stem_stride: int = 1) -> None:
        super().__init__()
        block_cls = {"basic": BasicBlock, "bottleneck": Bottleneck}.get(block)
        if block_cls is None:
            raise ConfigError(f"unknown ResNet block {block!r}; expected 'basic' or 'bottleneck'")
        self.stem = ConvUnit(in_channels, width, 3, stem_stride, placement=placement)
        layers: list[nn.Module] = []
        cin = width
        for stage in range(stages):
            planes = width * 2 ** stage
            for i in range(blocks):
                layers.append(block_cls(cin, planes, 2 if (stage > 0 and i == 0) else 1, placement))
                cin = planes * block_cls.expansion
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


# --- MobileNetV2 ----------------------------------------------------------------------------------

class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int, placement: str) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(ConvUnit(cin, hidden, 1, act="relu6", placement=placement))
        layers.append(ConvUnit(hidden, hidden, 3, stride, groups=hidden, act="relu6", placement=placement))
        layers.append(ConvUnit(hidden, cout, 1, act="none", placement=placement))  # linear bottleneck
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.residual:
            return x + self.block(x)
        return self.block(x)


class MobileNetV2(nn.Module):
    """MobileNetV2-style: depthwise 3x3 + pointwise, ReLU6, linear bottlenecks."""

    # (expansion, channels, repeats, stride) scaled by width_mult
    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 2, 2), (6, 64, 1, 1))

    def __init__(self, in_channels: int, num_classes: int, width_mult: float = 1.0, stem: int = 32,
                 last: int = 128, placement: str = "before") -> None:
        super().__init__()
        ch = max(8, int(stem * width_mult))
        layers: list[nn.Module] = [ConvUnit(in_channels, ch, 3, 1, act="relu6", placement=placement)]
        for t, c, n, s in self.SETTINGS:
            cout = max(8, int(c * width_mult))
            for i in range(n):
                layers.append(InvertedResidual(ch, cout, s if i == 0 else 1, t, placement))
                ch = cout
        layers.append(ConvUnit(ch, last, 1, act="relu6", placement=placement))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.1)
        self.fc = nn.Linear(last, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(torch.flatten(self.pool(self.features(x)), 1)))


# --- MLP ------------------------------------------------------------------------------------------

class MLP(nn.Module):
    """Linear + BatchNorm1d + ReLU (+ dropout) layers, then a linear classifier."""

    def __init__(self, in_features: int, num_classes: int, hidden: tuple[int, ...] | list[int] = (256, 128),
                 dropout: float = 0.1, placement: str = "before") -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        cin = in_features
        for h in hidden:
            if placement == "after":
                layers += [nn.Linear(cin, h), nn.ReLU(), nn.BatchNorm1d(h)]
            else:
                layers += [nn.Linear(cin, h, bias=False), nn.BatchNorm1d(h), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            cin = h
        layers.append(nn.Linear(cin, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# --- encoder-decoder (ConvTranspose + BN upsampling) ------------------------------------------------

class EncoderDecoder(nn.Module):
    """Denoising encoder-decoder: strided conv + BN down, ConvTranspose + BN up (grouped on the way up)."""

    def __init__(self, in_channels: int, width: int = 16, groups: int = 2, placement: str = "before") -> None:
        super().__init__()
        w = width
        self.encoder = nn.Sequential(
            ConvUnit(in_channels, w, 3, 1, placement=placement),
            ConvUnit(w, 2 * w, 3, 2, placement=placement),
            ConvUnit(2 * w, 4 * w, 3, 2, placement=placement),
        )
        self.decoder = nn.Sequential(
            ConvUnit(4 * w, 2 * w, 3, 2, groups=groups, placement=placement, transpose=True),
            ConvUnit(2 * w, w, 3, 2, groups=groups, placement=placement, transpose=True),
        )
        self.head = nn.Conv2d(w, in_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.decoder(self.encoder(x)))


# --- 1-D conv net --------------------------------------------------------------------------------

class Conv1dNet(nn.Module):
    """Conv1d + BatchNorm1d stack for sequences shaped (channels, length)."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 32, layers: int = 3,
                 placement: str = "before") -> None:
        super().__init__()
        units: list[nn.Module] = []
        cin = in_channels
        for i in range(layers):
            cout = width * 2 ** min(i, 2)
            units.append(ConvUnit(cin, cout, 5 if i == 0 else 3, 2 if i > 0 else 1, dims=1, placement=placement))
            cin = cout
        self.features = nn.Sequential(*units)
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


# --- registry ------------------------------------------------------------------------------------

class ArchSpec:
    """How to build one architecture and what input it takes."""

    def __init__(self, name: str, build: Callable[..., nn.Module], input_kind: str, task: str,
                 defaults: dict[str, Any], doc: str) -> None:
        self.name, self.build, self.input_kind, self.task = name, build, input_kind, task
        self.defaults, self.doc = defaults, doc


def _on_channels(cls: Callable[..., nn.Module], classes: bool = True) -> Callable[..., nn.Module]:
    """A builder for a network that takes the input's channels first (and the class count, unless it has none)."""
    def build(in_shape, num_classes, **kw):
        return cls(in_shape[0], num_classes, **kw) if classes else cls(in_shape[0], **kw)
    return build


def _mlp(in_shape, num_classes, **kw):
    n = 1
    for d in in_shape:
        n *= d
    return MLP(n, num_classes, **kw)


_resnet, _mobilenet, _conv1d = _on_channels(ResNet), _on_channels(MobileNetV2), _on_channels(Conv1dNet)
_encdec = _on_channels(EncoderDecoder, classes=False)


ARCHITECTURES: dict[str, ArchSpec] = {
    s.name: s for s in (
        ArchSpec("resnet", _resnet, "image", "classification",
                 {"block": "basic", "blocks": 1, "width": 16, "stages": 3, "stem_stride": 1}, "CIFAR-style ResNet"),
        ArchSpec("resnet20", _resnet, "image", "classification",
                 {"block": "basic", "blocks": 3, "width": 16, "stages": 3, "stem_stride": 1},
                 "ResNet-20 (3 basic blocks/stage)"),
        ArchSpec("resnet18", _resnet, "image", "classification",
                 {"block": "basic", "blocks": 2, "width": 64, "stages": 4, "stem_stride": 4},
                 "ResNet-18-sized (2 basic blocks x 4 stages, widths 64..512, strided stem for 224x224)"),
        ArchSpec("resnet_bottleneck", _resnet, "image", "classification",
                 {"block": "bottleneck", "blocks": 1, "width": 8, "stages": 3}, "ResNet with bottleneck blocks"),
        ArchSpec("mobilenetv2", _mobilenet, "image", "classification",
                 {"width_mult": 0.5, "stem": 32, "last": 128}, "MobileNetV2-style"),
        ArchSpec("mlp", _mlp, "any", "classification", {"hidden": [256, 128], "dropout": 0.1},
                 "MLP with Linear + BatchNorm1d"),
        ArchSpec("encdec", _encdec, "image", "denoising", {"width": 16, "groups": 2},
                 "encoder-decoder with ConvTranspose + BN (denoising)"),
        ArchSpec("conv1d", _conv1d, "sequence", "classification", {"width": 32, "layers": 3},
                 "1-D conv net for sequences"),
    )
}


def arch_spec(name: str) -> ArchSpec:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ConfigError(f"unknown architecture {name!r}; choose one of: {', '.join(ARCHITECTURES)}") from None


def resolve_arch_args(name: str, input_shape: list[int], num_classes: int, placement: str = "before",
                      overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The complete, JSON-able argument set that :func:`build_model` needs (saved in checkpoints)."""
    spec = arch_spec(name)
    if placement not in PLACEMENTS:
        raise ConfigError(f"unknown TrainConfig.bn_placement {placement!r}; expected one of {PLACEMENTS}")
    args = dict(spec.defaults)
    for key, value in (overrides or {}).items():
        if key not in spec.defaults:
            raise ConfigError(f"architecture {name!r} has no size knob {key!r}; knobs: {', '.join(spec.defaults)}")
        args[key] = value
    return {"input_shape": [int(d) for d in input_shape], "num_classes": int(num_classes),
            "placement": placement, **args}


def build_model(name: str, arch_args: dict[str, Any]) -> nn.Module:
    """Build ``Normalize -> network`` from a name and the arguments saved by :func:`resolve_arch_args`."""
    spec = arch_spec(name)
    args = dict(arch_args)
    in_shape = list(args.pop("input_shape"))
    num_classes = args.pop("num_classes")
    if spec.input_kind == "image" and len(in_shape) != 3:
        raise ConfigError(f"architecture {name!r} takes images (C, H, W); the data has per-sample shape {in_shape}")
    if spec.input_kind == "sequence" and len(in_shape) != 2:
        raise ConfigError(f"architecture {name!r} takes sequences (C, L); the data has per-sample shape {in_shape}")
    net = spec.build(in_shape, num_classes, **args)
    return nn.Sequential(Normalize(in_shape[0], len(in_shape) - 1), net)


def count_bn(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
