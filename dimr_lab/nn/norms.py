"""Norms: plain (LN, RMSNorm), time-dependent (TD-LN, TD-RMSNorm, DiMR) and adaLN(-Zero) (DiT).

Every norm is called as `norm(x, cond) -> (x_normed, gate)` on channels-last features (..., d);
`gate` is None except for adaLN-Zero, whose gate multiplies the residual branch (DiT, Sec. 3.2).
`condition` says what a norm reads: "none", "time" (Cond.tau via TD tensors) or "vector" (Cond.vector).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dimr_lab.nn.time_dependent import Cond, TimeDependentParameter


def _per_sample(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(T, d) -> (T, 1, ..., 1, d) broadcasting over the token/spatial axes of x."""
    return v.view(v.shape[0], *([1] * (x.dim() - 2)), v.shape[-1])


def _rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    # released form: x / (||x||_2 / sqrt(d) + eps), eps outside the root
    rms = x.norm(2, dim=-1, keepdim=True) * x.shape[-1] ** -0.5
    return x / (rms + eps)


class Norm(nn.Module):
    """`norm(x, cond) -> (x_normed, gate or None)` on channels-last features (..., d)."""

    def __init__(self, dim: int, cond_dim: int = 0):
        super().__init__()
        self.dim = dim


class LayerNorm(Norm):
    def __init__(self, dim: int, cond_dim: int = 0):
        super().__init__(dim)
        self.norm = nn.LayerNorm(dim, eps=1e-5)

    def forward(self, x: torch.Tensor, cond: Cond) -> tuple[torch.Tensor, None]:
        return self.norm(x), None


class RMSNorm(Norm):
    def __init__(self, dim: int, cond_dim: int = 0):
        super().__init__(dim)
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, cond: Cond) -> tuple[torch.Tensor, None]:
        return _rms_normalize(x, 1e-8) * self.scale, None


class TDLayerNorm(Norm):
    def __init__(self, dim: int, cond_dim: int = 0):
        super().__init__(dim)
        self.weight = TimeDependentParameter((dim,), nn.init.ones_)
        self.bias = TimeDependentParameter((dim,), nn.init.zeros_)

    def forward(self, x: torch.Tensor, cond: Cond) -> tuple[torch.Tensor, None]:
        gamma, beta = self.weight(cond), self.bias(cond)  # (T, d)
        if gamma.shape[0] == 1:  # one time for the batch: the fused kernel
            return F.layer_norm(x, (self.dim,), gamma[0], beta[0], eps=1e-5), None
        x = F.layer_norm(x, (self.dim,), eps=1e-5)
        return torch.addcmul(_per_sample(beta, x), _per_sample(gamma, x), x), None


class TDRMSNorm(Norm):
    def __init__(self, dim: int, cond_dim: int = 0):
        super().__init__(dim)
        self.scale = TimeDependentParameter((dim,), nn.init.ones_)

    def forward(self, x: torch.Tensor, cond: Cond) -> tuple[torch.Tensor, None]:
        gamma = self.scale(cond)  # (T, d)
        return _rms_normalize(x, 1e-8) * _per_sample(gamma, x), None


class _AdaLNBase(Norm):
    chunks = 2

    def __init__(self, dim: int, cond_dim: int = 0):
        super().__init__(dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        # per-norm regression of the modulation from the condition (DiT's adaLN MLP: SiLU -> Linear)
        self.modulation = nn.Linear(cond_dim or dim, self.chunks * dim)
        nn.init.zeros_(self.modulation.weight)  # starts as a plain LN (adaLN-Zero's identity init)
        nn.init.zeros_(self.modulation.bias)
        self.modulation.skip_init = True

    def _modulate(self, x: torch.Tensor, cond: Cond) -> tuple[torch.Tensor, list[torch.Tensor]]:
        assert cond.vector is not None, "adaLN needs conditioning = 'adaln'"
        mods = self.modulation(F.silu(cond.vector)).chunk(self.chunks, dim=-1)  # chunks x (B, d)
        shift, scale = _per_sample(mods[0], x), _per_sample(mods[1], x)
        return self.norm(x) * (1 + scale) + shift, [_per_sample(m, x) for m in mods[2:]]


class AdaLN(_AdaLNBase):
    def forward(self, x: torch.Tensor, cond: Cond) -> tuple[torch.Tensor, None]:
        return self._modulate(x, cond)[0], None


class AdaLNZero(_AdaLNBase):
    chunks = 3

    def forward(self, x: torch.Tensor, cond: Cond) -> tuple[torch.Tensor, torch.Tensor]:
        x, (gate,) = self._modulate(x, cond)
        return x, gate
