"""How time and class enter the network.

A conditioning component builds, for the whole network, an optional condition vector (adaLN) and, for
each branch made of attention blocks, optional tokens prepended to its sequence (U-ViT, DiMR's class
token). Time-dependent norms read time directly (Cond.tau) and need nothing here.
"""

from __future__ import annotations

import torch
from torch import nn

from dimr_lab.nn.layers import timestep_embedding


class Conditioning(nn.Module):
    """Base: no vector, no tokens."""

    def __init__(self, num_classes: int, dims: list[int], attention: list[bool], vector_dim: int):
        super().__init__()
        self.num_classes = num_classes

    def vector(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        return None

    def tokens(self, branch: int, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        return None


class NormConditioning(Conditioning):
    def __init__(self, num_classes: int, dims: list[int], attention: list[bool], vector_dim: int):
        super().__init__(num_classes, dims, attention, vector_dim)
        # one row more than classes: the null label of classifier-free guidance
        self.class_embed = nn.ModuleDict({str(i): nn.Embedding(num_classes + 1, d)
                                          for i, (d, a) in enumerate(zip(dims, attention)) if a})

    def tokens(self, branch: int, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        key = str(branch)
        return self.class_embed[key](y)[:, None] if key in self.class_embed else None  # (B, 1, d)


class TokenConditioning(NormConditioning):
    def tokens(self, branch: int, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        cls = super().tokens(branch, t, y)
        if cls is None:
            return None
        time = timestep_embedding(t, cls.shape[-1]).to(cls.dtype)[:, None]  # (B, 1, d)
        return torch.cat([time, cls], dim=1)  # (B, 2, d)


class AdaLNConditioning(Conditioning):
    freq_dim = 256

    def __init__(self, num_classes: int, dims: list[int], attention: list[bool], vector_dim: int):
        super().__init__(num_classes, dims, attention, vector_dim)
        self.time_mlp = nn.Sequential(nn.Linear(self.freq_dim, vector_dim), nn.SiLU(),
                                      nn.Linear(vector_dim, vector_dim))
        self.class_embed = nn.Embedding(num_classes + 1, vector_dim)

    def vector(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        freqs = timestep_embedding(t, self.freq_dim).to(self.class_embed.weight.dtype)  # the weights' dtype
        return self.time_mlp(freqs) + self.class_embed(y)  # (B, D)
