"""BatchNorm running statistics: precise recomputation, cross-rank agreement, SyncBN conversion.

The running statistics are what the folding pass bakes into the weights, so they must describe the data
the model will see. ``recompute_precise_bn`` replaces the exponential moving averages by the exact
population mean and unbiased variance of each BN layer's input over N batches (the "precise BN" of
fvcore/Detectron2, but aggregating sums in float64 rather than averaging per-batch variances, which
would miss the between-batch variance). As in fvcore, the pass runs in train mode, so each BN's input
is what it saw during training; dropout is off and no gradients are taken.
"""
from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

logger = logging.getLogger(__name__)


def bn_layers(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _BatchNorm)]


def set_bn_momentum(model: nn.Module, momentum: float | None) -> None:
    """``momentum=None`` makes BN keep a cumulative (equal-weight) average of batch statistics."""
    for _, bn in bn_layers(model):
        bn.momentum = momentum


class _Accumulator:
    def __init__(self) -> None:
        self.count = 0
        self.sum: torch.Tensor | None = None
        self.sumsq: torch.Tensor | None = None

    def __call__(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        x = inputs[0].detach().to(torch.float64)
        dims = [0] + list(range(2, x.dim()))
        s, ss = x.sum(dims), (x * x).sum(dims)
        n = x.numel() // x.shape[1]
        if self.sum is None:
            self.sum, self.sumsq = s, ss
        else:
            self.sum, self.sumsq = self.sum + s, self.sumsq + ss
        self.count += n


@torch.no_grad()
def recompute_precise_bn(model: nn.Module, batches: Iterable[torch.Tensor], num_batches: int,
                         all_reduce: bool = False) -> int:
    """Set every BN's running stats to the population statistics of its inputs over ``num_batches``.

    Returns the number of batches used. With ``all_reduce`` the sums are added across ranks first, so
    every rank ends with the same statistics.
    """
    layers = bn_layers(model)
    if not layers:
        return 0
    was_training = model.training
    model.train()
    dropouts = [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    for d in dropouts:
        d.eval()
    accs = [_Accumulator() for _ in layers]
    hooks = [bn.register_forward_pre_hook(acc) for (_, bn), acc in zip(layers, accs, strict=False)]
    used = 0
    try:
        for batch in batches:
            if used >= num_batches:
                break
            model(batch)
            used += 1
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
        for d in dropouts:
            d.train(was_training)
    for (_name, bn), acc in zip(layers, accs, strict=False):
        if acc.sum is None:
            continue
        total = torch.tensor([float(acc.count)], dtype=torch.float64, device=acc.sum.device)
        s, ss = acc.sum, acc.sumsq
        if all_reduce:
            import torch.distributed as dist

            packed = torch.cat([total, s, ss])
            dist.all_reduce(packed)
            total, s, ss = packed[:1], packed[1:1 + s.numel()], packed[1 + s.numel():]
        n = total.item()
        mean = s / n
        var = (ss - n * mean * mean) / max(n - 1.0, 1.0)
        bn.running_mean.copy_(mean.to(bn.running_mean.dtype))
        bn.running_var.copy_(var.clamp_min(0).to(bn.running_var.dtype))
    logger.info("precise BN: recomputed %d layers over %d batches", len(layers), used)
    return used


@torch.no_grad()
def all_reduce_bn_stats(model: nn.Module) -> None:
    """Make every rank's running statistics equal: the pooled mean and variance of the ranks' stats."""
    import torch.distributed as dist

    world = dist.get_world_size()
    for _, bn in bn_layers(model):
        if bn.running_mean is None:
            continue
        mean = bn.running_mean.to(torch.float64)
        packed = torch.cat([mean, bn.running_var.to(torch.float64) + mean * mean])
        dist.all_reduce(packed)
        packed /= world
        m, second = packed[: mean.numel()], packed[mean.numel():]
        bn.running_mean.copy_(m.to(bn.running_mean.dtype))
        bn.running_var.copy_((second - m * m).clamp_min(0).to(bn.running_var.dtype))


class CPUSyncBatchNorm(_BatchNorm):
    """SyncBatchNorm for the gloo backend (torch's SyncBatchNorm only runs on GPUs).

    In training, the batch mean and variance are those of the global batch across all ranks, computed
    with an autograd-aware all-reduce of per-channel sums, so gradients flow through the statistics as
    in ``nn.SyncBatchNorm``. In eval mode it is a plain BatchNorm.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, dims: int = 2) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self._foldserve_dims = dims

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {input.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        dims = [0] + list(range(2, x.dim()))
        c = x.shape[1]
        local_n = torch.tensor([x.numel() / c], dtype=x.dtype, device=x.device)
        packed = all_reduce(torch.cat([x.sum(dims), (x * x).sum(dims), local_n]))
        n = packed[-1]
        mean = packed[:c] / n
        var = (packed[c:2 * c] / n - mean * mean).clamp_min(0)  # biased, used to normalise
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                factor = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                          else self.momentum)
                unbiased = var.detach() * n / (n - 1).clamp_min(1)
                self.running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
                self.running_var.mul_(1 - factor).add_(unbiased, alpha=factor)
        shape = [1, c] + [1] * (x.dim() - 2)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


_PLAIN_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def _bn_dims(m: nn.Module) -> int:
    if isinstance(m, nn.BatchNorm1d):
        return 1
    if isinstance(m, nn.BatchNorm3d):
        return 3
    return getattr(m, "_foldserve_dims", 2)


def _swap_bn(module: nn.Module, make) -> nn.Module:
    out = make(module)
    if out is not module:
        out.load_state_dict(module.state_dict())
        out.train(module.training)
    for name, child in module.named_children():
        new = _swap_bn(child, make)
        if new is not child:
            setattr(out, name, new)
    return out


def convert_sync_batchnorm(model: nn.Module, on_gpu: bool) -> nn.Module:
    """Replace every BatchNorm by a synchronised one (torch's on GPU, :class:`CPUSyncBatchNorm` else)."""

    def make(m: nn.Module) -> nn.Module:
        if not isinstance(m, _BatchNorm) or isinstance(m, (nn.SyncBatchNorm, CPUSyncBatchNorm)):
            return m
        dims = _bn_dims(m)
        if on_gpu:
            new = nn.SyncBatchNorm(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
            new._foldserve_dims = dims
            return new
        return CPUSyncBatchNorm(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats, dims)

    return _swap_bn(model, make)


def revert_sync_batchnorm(model: nn.Module) -> nn.Module:
    """Replace every synchronised BN by the plain BatchNorm{1,2,3}d of its input rank, same state."""

    def make(m: nn.Module) -> nn.Module:
        if not isinstance(m, (nn.SyncBatchNorm, CPUSyncBatchNorm)):
            return m
        return _PLAIN_BN[_bn_dims(m)](m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)

    return _swap_bn(model, make)


def stats_digest(model: nn.Module) -> str:
    """sha256 of all running statistics, to compare ranks."""
    h = hashlib.sha256()
    for name, bn in bn_layers(model):
        h.update(name.encode())
        for t in (bn.running_mean, bn.running_var):
            if t is not None:
                h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
