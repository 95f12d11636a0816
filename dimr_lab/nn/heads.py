"""Cascades (features from a lower-resolution branch into the next) and output heads."""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from dimr_lab.nn.time_dependent import Cond
from dimr_lab.registry import NORMS


def pixel_shuffle_channels_last(x: torch.Tensor, r: int) -> torch.Tensor:
    """(B, h, w, r*r*d) -> (B, h*r, w*r, d), reading channels as (r_h, r_w, d) as the released code does
    (torch's nn.PixelShuffle reads (d, r_h, r_w))."""
    return rearrange(x, "b h w (rh rw d) -> b (h rh) (w rw) d", rh=r, rw=r)


class Cascade(nn.Module):
    """Features of the branch below -> an addition to this branch's input embedding."""


class DiMRCascade(Cascade):
    def __init__(self, spec, in_dim: int, dim: int, ratio: int, cond_dim: int):
        super().__init__()
        self.ratio = ratio
        self.norm_in = NORMS.get(spec.outer_norm)(in_dim, cond_dim)
        self.proj = nn.Linear(in_dim, dim * ratio * ratio)
        self.norm_out = NORMS.get(spec.outer_norm)(dim, cond_dim)

    def forward(self, features: torch.Tensor, cond: Cond) -> torch.Tensor:
        x = self.proj(self.norm_in(features, cond)[0])  # (B, h, w, r*r*d)
        return self.norm_out(pixel_shuffle_channels_last(x, self.ratio), cond)[0]  # (B, h*r, w*r, d)


class NoCascade(Cascade):
    def __init__(self, spec, in_dim: int, dim: int, ratio: int, cond_dim: int):
        super().__init__()

    def forward(self, features: torch.Tensor, cond: Cond) -> None:
        return None


class Head(nn.Module):
    """A branch's features -> its noise prediction (B, C, h, w)."""


class ConvHead(Head):
    def __init__(self, spec, branch, cond_dim: int):
        super().__init__()
        self.norm = NORMS.get(spec.outer_norm)(branch.width, cond_dim)
        k = branch.out_kernel
        self.conv = nn.Conv2d(branch.width, spec.out_channels, k, padding=k // 2)

    def forward(self, x: torch.Tensor, cond: Cond) -> torch.Tensor:
        return self.conv(self.norm(x, cond)[0].permute(0, 3, 1, 2))  # (B, C, h, w)


class UnpatchifyHead(Head):
    def __init__(self, spec, branch, cond_dim: int):
        super().__init__()
        self.patch, self.channels = branch.patch, spec.out_channels
        self.norm = NORMS.get(spec.outer_norm)(branch.width, cond_dim)
        self.linear = nn.Linear(branch.width, branch.patch ** 2 * spec.out_channels)

    def forward(self, x: torch.Tensor, cond: Cond) -> torch.Tensor:
        x = self.linear(self.norm(x, cond)[0])  # (B, h, w, p*p*C), channels read as (p_h, p_w, C)
        return rearrange(x, "b h w (ph pw c) -> b c (h ph) (w pw)", ph=self.patch, pw=self.patch, c=self.channels)


class UnpatchifyConvHead(UnpatchifyHead):
    def __init__(self, spec, branch, cond_dim: int):
        super().__init__(spec, branch, cond_dim)
        k = branch.out_kernel
        self.conv = nn.Conv2d(spec.out_channels, spec.out_channels, k, padding=k // 2)

    def forward(self, x: torch.Tensor, cond: Cond) -> torch.Tensor:
        return self.conv(super().forward(x, cond))
