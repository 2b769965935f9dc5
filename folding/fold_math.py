"""The arithmetic of BatchNorm folding, on numpy arrays, in float64, cast once.

At inference BN is an affine map per channel c (population statistics, unbiased variance as PyTorch
stores it)::

    BN(z)_c = gamma_c * (z_c - mean_c) / sqrt(var_c + eps) + beta_c = s_c * z_c + t_c
    s_c = gamma_c / sqrt(var_c + eps),   t_c = beta_c - mean_c * s_c

**Backward fold** (producer -> BN), producer ``z = W * x + b`` with output channel c::

    W'[c] = W[c] * s_c,   b'_c = (b_c - mean_c) * s_c + beta_c

The output channel is weight axis 0 for Conv/Linear/Gemm(transB=1), axis 1 for ConvTranspose (inside
each group: weight shape (C_in, C_out/groups, k...), output channel g*C_out/groups + j) and for
MatMul/Gemm(transB=0) weights shaped (K, M).

**Forward fold** (BN -> consumer), consumer ``y = W * u + b`` reading u = s * x + t, input channel i::

    W'[:, i] = W[:, i] * s_i,   b' = b + sum_{i,k} W[:, i, k] * t_i

Exact only when every output of the consumer sees the shift t on every tap: no zero padding (a padded
border would see 0 instead of t).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FP16_MAX = 65504.0


@dataclass
class BNParams:
    """One BN's parameters in float64 (gamma=1, beta=0 when the BN has no affine parameters)."""

    mean: np.ndarray
    var: np.ndarray
    gamma: np.ndarray
    beta: np.ndarray
    eps: float

    @classmethod
    def create(cls, mean, var, gamma, beta, eps: float) -> BNParams:
        mean = np.asarray(mean, dtype=np.float64)
        var = np.asarray(var, dtype=np.float64)
        gamma = np.ones_like(mean) if gamma is None else np.asarray(gamma, dtype=np.float64)
        beta = np.zeros_like(mean) if beta is None else np.asarray(beta, dtype=np.float64)
        return cls(mean, var, gamma, beta, float(eps))

    @property
    def scale(self) -> np.ndarray:
        return self.gamma / np.sqrt(self.var + self.eps)

    @property
    def shift(self) -> np.ndarray:
        return self.beta - self.mean * self.scale

    def lint(self, where: str) -> list[str]:
        """Warnings about statistics that make a fold fragile."""
        out = []
        bad = ~np.isfinite(self.mean) | ~np.isfinite(self.var) | ~np.isfinite(self.gamma) | ~np.isfinite(self.beta)
        if bad.any():
            out.append(f"{where}: NaN/Inf in BN statistics or parameters at channels "
                       f"{np.flatnonzero(bad)[:10].tolist()}")
        tiny = np.flatnonzero(np.isfinite(self.var) & (self.var < 1e-6))
        if tiny.size:
            out.append(f"{where}: running_var < 1e-6 at {tiny.size} channel(s) {tiny[:10].tolist()} "
                       f"(min {self.var[tiny].min():.3g}): the fold scales those channels by up to "
                       f"{np.abs(self.scale[tiny]).max():.3g}")
        return out


def fold_backward(weight: np.ndarray, bias: np.ndarray | None, bn: BNParams, out_axis: int = 0,
                  groups: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """W', b' (float64) of ``BN(producer(x))``; ``out_axis=1`` with ``groups`` for ConvTranspose."""
    w = np.asarray(weight, dtype=np.float64)
    s = bn.scale
    if out_axis == 0:
        if w.shape[0] != s.size:
            raise ValueError(f"producer has {w.shape[0]} output channels, BN has {s.size}")
        w2 = w * s.reshape((-1,) + (1,) * (w.ndim - 1))
    elif out_axis == 1:
        cin, cout_g = w.shape[0], w.shape[1]
        if cin % groups or cout_g * groups != s.size:
            raise ValueError(f"producer weight {w.shape} with groups={groups} does not give {s.size} output channels")
        rest = w.shape[2:]
        wg = w.reshape((groups, cin // groups, cout_g) + rest)
        sg = s.reshape((groups, 1, cout_g) + (1,) * len(rest))
        w2 = (wg * sg).reshape(w.shape)
    else:
        raise ValueError(f"out_axis must be 0 or 1, got {out_axis}")
    b = np.zeros_like(s) if bias is None else np.asarray(bias, dtype=np.float64).reshape(-1)
    b2 = (b - bn.mean) * s + bn.beta
    return w2, b2


def fold_forward(weight: np.ndarray, bias: np.ndarray | None, bn: BNParams,
                 groups: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """W', b' (float64) of ``consumer(BN(x))`` for Conv (W: C_out, C_in/groups, k...) or Linear (W: out, in)."""
    w = np.asarray(weight, dtype=np.float64)
    s, t = bn.scale, bn.shift
    cout, cin_g = w.shape[0], w.shape[1]
    if cin_g * groups != s.size or cout % groups:
        raise ValueError(f"consumer weight {w.shape} with groups={groups} does not read {s.size} channels")
    rest = (1,) * (w.ndim - 2)
    out_g = cout // groups
    # input channel of (o, i_local) is group(o) * cin_g + i_local
    s_in = s.reshape(groups, 1, cin_g).repeat(out_g, axis=1).reshape(cout, cin_g)
    t_in = t.reshape(groups, 1, cin_g).repeat(out_g, axis=1).reshape(cout, cin_g)
    w2 = w * s_in.reshape((cout, cin_g) + rest)
    b = np.zeros(cout) if bias is None else np.asarray(bias, dtype=np.float64).reshape(-1)
    spatial_sum = w.reshape(cout, cin_g, -1).sum(axis=2)
    b2 = b + (spatial_sum * t_in).sum(axis=1)
    return w2, b2


def overflow_warning(where: str, *arrays: np.ndarray) -> list[str]:
    peak = max((float(np.nanmax(np.abs(a))) for a in arrays if a.size), default=0.0)
    if peak > FP16_MAX:
        return [f"{where}: folded weights reach {peak:.3g}, beyond the float16 range ({FP16_MAX})"]
    return []
