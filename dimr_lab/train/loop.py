"""Pieces of the training loop with no side effects: LR schedule, EMA, resumable batch order."""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from dimr_lab.errors import UserError


def build_optimizer(model: nn.Module, *, lr: float = 1e-4, betas: tuple[float, float] = (0.99, 0.99),
                    weight_decay: float = 0.0, no_decay: str = "td_norms_biases") -> torch.optim.AdamW:
    """AdamW over the decay / no-decay groups, with the fused kernel where the device has one (CPU and CUDA
    do: one pass over all tensors instead of a dozen elementwise ops per tensor)."""
    from dimr_lab.nn.network import optimizer_param_groups

    groups = optimizer_param_groups(model, weight_decay, no_decay)
    device = next(model.parameters()).device.type
    fused = device in ("cpu", "cuda")
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), weight_decay=weight_decay, fused=fused)


def lr_at(step: int, lr: float, warmup_steps: int) -> float:
    """Learning rate of update number `step` (0-based): linear warm-up from 0, then constant.

    As the released code's LambdaLR: factor min(step / warmup, 1), so update 0 runs at lr 0.
    """
    if warmup_steps <= 0:
        return lr
    return lr * min(step / warmup_steps, 1.0)


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model on parameters (fp32 copy); buffers are copied."""
    src = dict(model.named_parameters())
    for name, p_ema in ema.named_parameters():
        p = src[name].detach().to(p_ema.dtype)
        p_ema.lerp_(p, 1.0 - decay)  # = decay * ema + (1 - decay) * p
    src_buf = dict(model.named_buffers())
    for name, b_ema in ema.named_buffers():
        b_ema.copy_(src_buf[name])


class BatchOrder:
    """Global batches of dataset indices: a seeded permutation per epoch, read from (epoch, index).

    The whole state is two integers, so a resumed run continues with exactly the next batch; the last
    incomplete batch of an epoch is dropped. Every rank computes the same global batch and takes its slice.
    """

    def __init__(self, size: int, batch_size: int, seed: int, epoch: int = 0, index: int = 0):
        if batch_size > size:
            raise UserError(f"train.batch_size {batch_size} is larger than the dataset ({size} items)")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.epoch, self.index = epoch, index
        self._perm_epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def perm(self, epoch: int) -> np.ndarray:
        """The permutation of epoch `epoch` (depends on seed and epoch only)."""
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.size)
            self._perm_epoch = epoch
        return self._perm

    def next(self) -> np.ndarray:
        """The next global batch of indices, (batch_size,)."""
        if self.index + self.batch_size > self.size:
            self.epoch, self.index = self.epoch + 1, 0
        out = self.perm(self.epoch)[self.index: self.index + self.batch_size]
        self.index += self.batch_size
        return out

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def copy(self) -> "BatchOrder":
        return BatchOrder(self.size, self.batch_size, self.seed, self.epoch, self.index)


def rank_slice(batch: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """Rank `rank`'s contiguous share of a global batch (the global batch divides evenly)."""
    per = len(batch) // world_size
    return batch[rank * per: (rank + 1) * per]


def collate(items: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """[(x (C,H,W), label), ...] -> x (B,C,H,W) float, y (B,) long."""
    xs = torch.stack([torch.as_tensor(x) for x, _ in items]).float()  # (B,C,H,W)
    ys = torch.as_tensor([int(y) for _, y in items], dtype=torch.long)  # (B,)
    return xs, ys


class _RankBatches(torch.utils.data.Sampler):
    """Infinite batch sampler for a DataLoader with workers: this rank's slices from a BatchOrder copy."""

    def __init__(self, order: BatchOrder, rank: int, world_size: int):
        self.order, self.rank, self.world_size = order.copy(), rank, world_size

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            yield rank_slice(self.order.next(), self.rank, self.world_size).tolist()


def batch_iterator(dataset: Any, order: BatchOrder, rank: int, world_size: int,
                   num_workers: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's batches from the order's current position onwards (workers keep the same order)."""
    if num_workers <= 0:
        local = order.copy()
        while True:
            idx = rank_slice(local.next(), rank, world_size)
            yield collate([dataset[int(i)] for i in idx])
    else:
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=_RankBatches(order, rank, world_size),
                                             num_workers=num_workers, collate_fn=collate,
                                             persistent_workers=False)
        yield from loader
