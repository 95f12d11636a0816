"""The base of the procedural datasets held in memory as uint8 (digits, shapes): item and batch reads."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset


class InMemoryImages(Dataset):
    """Subclasses set `images` (N, C, S, S) uint8, `labels` (N,) and `flip`; items are floats in [-1, 1]."""

    images: torch.Tensor
    labels: torch.Tensor
    flip: bool

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, idx) -> tuple[torch.Tensor, torch.Tensor]:
        """Items idx at once, unflipped: the same numbers as stacking dataset[i] (one gather, not many)."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        return self.images[idx].float() / 127.5 - 1, self.labels[idx].long()  # (B, C, S, S), (B,)

    def __getitem__(self, i: int):
        x = self.images[i].float() / 127.5 - 1  # (C, S, S) in [-1, 1]
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, int(self.labels[i])
