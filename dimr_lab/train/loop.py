"""Pieces of the training loop with no side effects: learning-rate schedules, EMA, resumable batch order,
every RNG state of a checkpoint."""

from __future__ import annotations

import math
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


def lr_constant(step: int, train: Any) -> float:
    """The released schedule (train.lr_schedule = 'constant'): warm-up, then train.lr; the total steps do
    not enter, so a run can be continued."""
    return lr_at(step, train.lr, train.warmup_steps)


def lr_cosine(step: int, train: Any) -> float:
    """Warm-up, then cosine decay from train.lr to train.lr_min at train.steps."""
    if step < train.warmup_steps:
        return lr_at(step, train.lr, train.warmup_steps)
    span = max(1, train.steps - train.warmup_steps)
    frac = min(1.0, (step - train.warmup_steps) / span)
    return train.lr_min + 0.5 * (train.lr - train.lr_min) * (1 + math.cos(math.pi * frac))


def learning_rate(step: int, train: Any) -> float:
    """The learning rate of update `step` under train.lr_schedule (registry: `dimr-lab components lr_schedule`)."""
    from dimr_lab.registry import LR_SCHEDULES

    return LR_SCHEDULES.get(train.lr_schedule)(step, train)


def ema_decay_at(update: int, decay: float, warmup: bool) -> float:
    """The EMA decay of update number `update` (0-based): min(decay, (1 + n) / (10 + n)) with warm-up
    (TensorFlow's ExponentialMovingAverage num_updates rule), else decay."""
    return min(decay, (1.0 + update) / (10.0 + update)) if warmup else decay


class EMA:
    """ema <- decay * ema + (1 - decay) * model on parameters (fp32 copy) in one foreach op; buffers are copied.
    The parameter lists are gathered once (gathering them every step cost a tiny network's step more than the
    update itself): the model's parameters must stay the same tensors, updated in place, as optimizers and
    load_state_dict do."""

    def __init__(self, ema: nn.Module, model: nn.Module):
        self.ema_params = list(ema.parameters())
        self.params = [p.detach() for p in model.parameters()]
        if len(self.params) != len(self.ema_params):
            raise ValueError(f"EMA of {len(self.ema_params)} parameters for a model of {len(self.params)}")
        self.cast = any(p.dtype != e.dtype for p, e in zip(self.params, self.ema_params))
        self.buffers = list(zip(ema.buffers(), model.buffers()))

    @torch.no_grad()
    def update(self, decay: float) -> None:
        params = [p.to(e.dtype) for p, e in zip(self.params, self.ema_params)] if self.cast else self.params
        torch._foreach_lerp_(self.ema_params, params, 1.0 - decay)  # = decay * ema + (1 - decay) * p
        for b_ema, b in self.buffers:
            b_ema.copy_(b)


def get_rng_state(noise: torch.Generator) -> dict[str, Any]:
    """Every RNG state as tensors/plain types (weights_only-loadable)."""
    import random

    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_state[0], "state": torch.tensor(py_state[1], dtype=torch.int64),
                   "gauss_next": py_state[2]},
        "noise": noise.get_state(),
    }


def set_rng_state(state: dict[str, Any], noise: torch.Generator) -> None:
    """Restore what get_rng_state captured."""
    import random

    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss_next"]))
    noise.set_state(state["noise"])


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


class _WorkerError:
    """A UserError raised while a DataLoader worker read a batch, sent to the main process as the batch itself.
    Raised in the worker, torch would re-raise it in the main process with the worker's traceback pasted into
    its message (some 25 lines where the user is owed one); carried as a value, it is raised there unchanged."""

    def __init__(self, error: UserError):
        self.error = error


def read_item(dataset: Any, seed: int, epoch: int, i: int, *, always: bool = False) -> Any:
    """dataset[i]; for a dataset whose items draw their own random numbers (`draws_per_item`: a latents item
    samples its VAE posterior), or with `always` (data workers), under the global torch RNG seeded by
    (seed, epoch, i) for the read and restored after: the item draws the same numbers whichever rank or worker
    reads it and whatever was read before, so any number of processes and workers, and a resumed session, see
    the numbers one process sees; a new epoch draws anew. Other datasets read in this process draw their
    flips from the global RNG's stream, which checkpoints restore (seeding each item, ~15 us, would change what
    every existing run of a flipped dataset trains on)."""
    if not always and not getattr(dataset, "draws_per_item", False):
        return dataset[int(i)]
    with torch.random.fork_rng(devices=[]):
        # the CPU generator only: torch.manual_seed also reseeds every CUDA device, which fork_rng(devices=[])
        # does not put back, at ~75 us a call. mt19937 keeps a seed's low 32 bits: the key's first 32-bit word
        # (the low half of the 64-bit word read before, so the same numbers)
        key = np.random.SeedSequence([seed, epoch, int(i)]).generate_state(1, np.uint32)[0]
        torch.default_generator.manual_seed(int(key))
        return dataset[int(i)]


class _WorkerItems(torch.utils.data.Dataset):
    """The dataset as a worker reads it, by (epoch, index) keys: an item's UserError becomes a _WorkerError in
    place of the item."""

    def __init__(self, dataset: Any, seed: int):
        self.dataset, self.seed = dataset, seed

    def __getitem__(self, key: tuple[int, int]) -> Any:
        try:
            return read_item(self.dataset, self.seed, *key, always=True)  # worker RNGs are seeded anew each session
        except UserError as err:
            return _WorkerError(err)


def _worker_collate(items: list[Any]) -> Any:
    """collate, or the first item's _WorkerError."""
    return next((item for item in items if isinstance(item, _WorkerError)), None) or collate(items)


class _RankBatches(torch.utils.data.Sampler):
    """Infinite batch sampler for a DataLoader with workers: this rank's slices from a BatchOrder copy."""

    def __init__(self, order: BatchOrder, rank: int, world_size: int):
        self.order, self.rank, self.world_size = order.copy(), rank, world_size

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        while True:
            idx = rank_slice(self.order.next(), self.rank, self.world_size)
            yield [(self.order.epoch, int(i)) for i in idx]


def batch_iterator(dataset: Any, order: BatchOrder, rank: int, world_size: int,
                   num_workers: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's batches from the order's position now (taken at the call, not at the first batch)
    onwards; workers keep the same order."""
    if num_workers <= 0:
        local = order.copy()

        gather = getattr(dataset, "batch", None)  # in-memory datasets: one indexing op per batch

        def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            while True:
                idx = rank_slice(local.next(), rank, world_size)
                yield gather(idx) if gather is not None and not dataset.flip else \
                    collate([read_item(dataset, order.seed, local.epoch, i) for i in idx])

        return batches()
    loader = torch.utils.data.DataLoader(_WorkerItems(dataset, order.seed),
                                         batch_sampler=_RankBatches(order, rank, world_size),
                                         num_workers=num_workers, collate_fn=_worker_collate, persistent_workers=False)

    def loaded() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in loader:
            if isinstance(batch, _WorkerError):
                raise batch.error  # the worker's one line, as with num_workers = 0
            yield batch

    return loaded()
