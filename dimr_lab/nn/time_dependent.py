"""Time-dependent parameters (DiMR's TD-LN, Sec. 3.3) and the per-forward conditioning they read.

Paper: s(t) = sigmoid(w t + b), gamma(t) = s p1 + (1 - s) p2. The released code keeps four tensors of
the parameter's shape, `p0, p1, w, b`, and evaluates

    theta(tau) = p1 + sigmoid((1 + w) * tau + b) * (p0 - p1)                      (released form)

which is the paper's with w_paper = 1 + w; at init p0 = p1 and w = b = 0, so theta is time-independent.
tau = log_snr / 4 with the code's "log_snr" = 8t - 4, i.e. tau = 2t - 1 for t = n / 1000.
All time-dependent tensors of a network are evaluated together once per forward (`evaluate_all`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn


class TimeDependentParameter(nn.Module):
    """A tensor of shape `shape` that varies with time: theta(tau) = p1 + sigmoid((1+w) tau + b)(p0 - p1)."""

    def __init__(self, shape: tuple[int, ...], init: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        value = init(torch.empty(shape))
        self.shape = tuple(shape)
        self.p0 = nn.Parameter(value.clone())
        self.p1 = nn.Parameter(value.clone())
        self.w = nn.Parameter(torch.zeros(shape))  # no weight decay (optimizer_param_groups)
        self.b = nn.Parameter(torch.zeros(shape))
        self.index = -1  # slot in Cond.td (in its block's window inside a block), assigned by the network

    def forward(self, cond: "Cond") -> torch.Tensor:
        """theta(tau) for this forward: (T, *shape), T = 1 (shared time) or batch size."""
        return cond.td[self.index]

    def evaluate(self, tau: torch.Tensor) -> torch.Tensor:
        """theta(tau) computed on its own: (T, *shape)."""
        view = (-1,) + (1,) * len(self.shape)
        s = torch.sigmoid((1 + self.w) * tau.view(view) + self.b)
        return self.p1 + s * (self.p0 - self.p1)

    def extra_repr(self) -> str:
        return f"shape={self.shape}"


@dataclass
class Cond:
    """What a forward pass knows besides the features: time, class, and the evaluated TD tensors."""

    t: torch.Tensor                      # (B,) in [0, 1]
    tau: torch.Tensor                    # (T,) T = 1 when the whole batch shares t, else B
    y: torch.Tensor | None               # (B,) class labels, null label = num_classes
    td: list[torch.Tensor] = field(default_factory=list)
    vector: torch.Tensor | None = None   # (B, D) adaLN condition (time + class embedding)

    def window(self, slots: tuple[int, int] | None) -> "Cond":
        """The Cond a block sees: its own TD tensors only, numbered from 0 (see `localize`)."""
        if slots is None:
            return self
        return Cond(t=self.t, tau=self.tau, y=self.y, td=self.td[slots[0]:slots[1]], vector=self.vector)


def time_to_tau(t: torch.Tensor) -> torch.Tensor:
    """tau = log_snr / 4 with the released code's log_snr = 8t - 4."""
    return (8.0 * t - 4.0) / 4.0


def collect(module: nn.Module) -> list[TimeDependentParameter]:
    """Every TD tensor below `module`, numbered in order (their slot in Cond.td)."""
    params = [m for m in module.modules() if isinstance(m, TimeDependentParameter)]
    for i, p in enumerate(params):
        p.index = i
    return params


def localize(scope: nn.Module) -> tuple[int, int] | None:
    """Renumber the TD tensors below `scope` (numbered by `collect`) from 0 and return their slots in Cond.td,
    (start, end), or None when it has none. A block then reads the same indices as every block of its kind:
    torch.compile guards on integer attributes of modules, so global slots would compile each block of a
    depth on its own (and past the recompile limit run the rest eagerly)."""
    params = [m for m in scope.modules() if isinstance(m, TimeDependentParameter)]
    if not params:
        return None
    start = params[0].index
    if [p.index for p in params] != list(range(start, start + len(params))):
        raise ValueError("the TD tensors of a block must be numbered in order by collect() first")
    for i, p in enumerate(params):
        p.index = i
    return start, start + len(params)


def evaluate_all(params: list[TimeDependentParameter], tau: torch.Tensor) -> list[torch.Tensor]:
    """theta(tau) of every TD tensor in one fused pass: one sigmoid over all of them, not one per module."""
    if not params:
        return []
    p0 = torch.cat([p.p0.reshape(-1) for p in params])  # (P,)
    p1 = torch.cat([p.p1.reshape(-1) for p in params])
    w = torch.cat([p.w.reshape(-1) for p in params])
    b = torch.cat([p.b.reshape(-1) for p in params])
    s = torch.sigmoid(torch.addcmul(b, tau[:, None].to(b.dtype), 1 + w))  # (T, P), in the weights' dtype
    values = torch.addcmul(p1, s, p0 - p1)  # (T, P)
    sizes = [p.p0.numel() for p in params]
    return [v.view(tau.shape[0], *p.shape) for v, p in zip(values.split(sizes, dim=1), params)]
