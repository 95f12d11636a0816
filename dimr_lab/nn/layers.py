"""Feed-forward layers and position embeddings."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn



class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class GLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w0, self.w1, self.w2 = nn.Linear(dim, hidden), nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.gelu(self.w0(x)) * self.w1(x))


class PosEmbed(nn.Module):
    """Adds a position code to channels-last features (B, H, W, d)."""

    def __init__(self, height: int, width: int, dim: int):
        super().__init__()
        self.height, self.width = height, width


class LearnedPosEmbed(PosEmbed):
    def __init__(self, height: int, width: int, dim: int):
        super().__init__(height, width, dim)
        self.table = nn.Embedding(height * width, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        return x + self.table.weight.view(self.height, self.width, C)[:H, :W]


def sincos_2d(height: int, width: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine code (MAE/DiT): half the channels encode the row, half the column."""
    assert dim % 4 == 0, "sincos position embedding needs width divisible by 4"
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))

    def code(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.to(torch.float64)[:, None] * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)  # (n, dim/2)

    rows = code(torch.arange(height))[:, None, :].expand(height, width, dim // 2)
    cols = code(torch.arange(width))[None, :, :].expand(height, width, dim // 2)
    return torch.cat([cols, rows], dim=-1).float()  # (H, W, dim)


class SinCosPosEmbed(PosEmbed):
    def __init__(self, height: int, width: int, dim: int):
        super().__init__(height, width, dim)
        self.register_buffer("code", sincos_2d(height, width, dim), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.code[: x.shape[1], : x.shape[2]].to(x.dtype)


class NoPosEmbed(PosEmbed):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal code of the discrete step 1000 t (DDPM/U-ViT/DiT): (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = (1000.0 * t.float())[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))
