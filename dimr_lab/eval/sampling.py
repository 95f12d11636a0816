"""Samples of a trained network: labels and starting noise by sample index, a model from a run's checkpoint.

Sample i of an evaluation asks for label `labels_for(i)` and starts from noise drawn from a generator
seeded with `sample_seed(sample.seed, i)`. So the sample set is the same however the indices are split into
batches or over processes, and a resumed evaluation continues with exactly the samples it had not made yet.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from dimr_lab.errors import UserError


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A counter-based hash: the same key gives the same 64 bits wherever it is computed."""
    mask = np.uint64(0xFFFFFFFFFFFFFFFF)
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & mask
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & mask
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & mask
        return x ^ (x >> np.uint64(31))


# Knuth's multiplicative constant, 2**32 / golden ratio (odd): the offsets of seeds 0, 1, 2, ... lie far apart
# on the circle of 2**32 generator seeds (consecutive seeds about 1.6e9 apart)
_SEED_STRIDE = 0x9E3779B1


def sample_seed(seed: int, index: int) -> int:
    """The generator seed of sample `index` of an evaluation seeded `seed` (both < 2**32): index + seed * K
    modulo 2**32. torch's CPU generator keeps only a seed's low 32 bits, so both must fit in 32 bits (the
    seed packed above the index was dropped, and every sample.seed drew the same noise). Per seed it is a
    bijection of the index, so no two samples of an evaluation share noise; seed 0 gives the index itself
    (the noise of every evaluation made before); the index ranges of two seeds overlap only when their
    offsets lie within the sample count of each other on the circle (seeds 0-9999 and 100K samples: none)."""
    return (int(index) + int(seed) * _SEED_STRIDE) % 2**32


def noise_for(indices: np.ndarray, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Starting noise (N, *shape) float32 of the given sample indices: N(0, I) from a per-index generator."""
    g = torch.Generator()
    out = torch.empty((len(indices), *shape))
    for row, i in enumerate(indices):
        g.manual_seed(sample_seed(seed, int(i)))
        out[row] = torch.randn(shape, generator=g)
    return out


def labels_for(indices: np.ndarray, num_classes: int, *, rule: str = "balanced", seed: int = 0,
               class_counts: np.ndarray | None = None) -> torch.Tensor:
    """Labels (N,) of sample indices: 'balanced' = i mod K (every class n/K times); 'frequency' = i.i.d.
    draws in proportion to the training set's class counts (U-ViT's ImageNet evaluation), by index."""
    idx = np.asarray(indices, dtype=np.int64)
    if rule == "balanced" or class_counts is None:
        return torch.from_numpy(idx % max(1, num_classes))
    counts = np.asarray(class_counts, dtype=np.float64)[:num_classes]
    cdf = np.cumsum(counts) / counts.sum()
    key = _splitmix64(_splitmix64(np.full(len(idx), seed, dtype=np.uint64)) ^ idx.astype(np.uint64))
    u = (key >> np.uint64(11)).astype(np.float64) / float(1 << 53)  # uniform [0, 1) per index
    return torch.from_numpy(np.minimum(np.searchsorted(cdf, u, side="right"), num_classes - 1).astype(np.int64))


def class_balanced_labels(n: int, num_classes: int) -> torch.Tensor:
    """Labels 0, 1, ..., K-1, 0, 1, ... (n,)."""
    return labels_for(np.arange(n), num_classes)


def data_classes(spec: Any) -> int:
    """The classes samples are drawn for: the dataset's (a network may have more label rows than it uses)."""
    from dimr_lab.registry import DATASETS

    own = spec.data.num_classes or DATASETS.meta(spec.data.name, "classes") or spec.model.num_classes
    return min(own, spec.model.num_classes) if spec.model.num_classes else own


def network_fn(model: Any, spec: Any) -> Callable:
    """model_fn(x, t, y[, tau]) -> full-resolution eps under the run's autocast (GPU)."""
    device = next(model.parameters()).device
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(spec.train.precision) if device.type == "cuda" else None

    def fn(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None, tau: torch.Tensor | None = None) -> torch.Tensor:
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            return model(x, t, y, tau=tau)[-1].float()  # (b, C, H, W)

    return fn


@torch.no_grad()
def generate(model: Any, spec: Any, indices: np.ndarray, labels: torch.Tensor, *, schedule: Any = None,
             **overrides: Any) -> torch.Tensor:
    """Samples (N, C, H, W) float32 on the CPU of the given sample indices and labels, with spec.sample
    (keyword arguments override its fields: sampler, steps, order, guidance_scale, ...)."""
    from dimr_lab.diffusion.samplers import sample
    from dimr_lab.diffusion.schedule import build_schedule

    s = {k: getattr(spec.sample, k) for k in ("sampler", "steps", "order", "t_end", "skip_type", "guidance_scale",
                                              "guidance_form", "guidance_schedule", "guidance_power")}
    s.update({k: v for k, v in overrides.items() if v is not None})
    mspec = model.spec
    device = next(model.parameters()).device
    schedule = schedule or build_schedule(spec.diffusion)
    shape = (mspec.in_channels, mspec.image_size, mspec.image_size)
    x_T = noise_for(np.asarray(indices), shape, spec.sample.seed).to(device)  # (N, C, H, W) ~ N(0, I)
    x = sample(network_fn(model, spec), x_T, labels.to(device), schedule=schedule,
               time_input=spec.diffusion.time_input, null_label=int(getattr(model, "null_label", mspec.num_classes)),
               **s)
    return x.float().cpu()


def to_uint8(x: torch.Tensor, data_spec: Any = None) -> torch.Tensor:
    """Model-space samples (N, C, H, W) -> uint8 images (N, 3, H, W); pixels in [-1, 1] map to 0..255."""
    if data_spec is not None and getattr(data_spec, "name", "") == "latents":
        from dimr_lab.data.latents import decode_latents  # through data.vae (a SpecError without one)

        x = decode_latents(x, data_spec)
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (N, C, H, W)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)  # grey -> RGB for extractors and grids
    return x.contiguous()


def load_run_model(run_dir: Path, *, step: int | None = None, ema: bool = True,
                   device: str | torch.device = "cpu") -> tuple[Any, Any, int]:
    """(model in eval mode, RunSpec, step) of a run folder: the checkpoint at `step` (default the newest)."""
    from dimr_lab.nn.checkpoint import load_weights, read_checkpoint
    from dimr_lab.nn.network import build_model
    from dimr_lab.rundir import RunDir
    from dimr_lab.spec.run_spec import load_run_spec
    from dimr_lab.spec.schema import to_dict

    from dimr_lab.rundir import is_run_folder

    run = RunDir(run_dir)
    if not run.path.is_dir() or not is_run_folder(run.path):
        raise UserError(f"{run_dir}: not a run folder (no spec.json or run.json)")
    spec = load_run_spec(run.spec_data(), file=str(run.spec_path))
    step = run.trained_step() if step is None else step
    path = run.checkpoint_for(step) if step is not None else None
    if path is None:
        have = run.available_steps()
        raise UserError(f"{run_dir}: no checkpoint" + (f" at step {step}" if step is not None else "")
                        + (f" (kept: {', '.join(map(str, have))})" if have else " (has this run trained and saved a step?)"))
    ckpt = read_checkpoint(path, identity=spec.identity_hash(), model_spec=to_dict(spec.model))
    model = build_model(spec.model)
    load_weights(model, ckpt["ema" if ema and ckpt.get("ema") else "model"], path)
    return model.to(device).eval(), spec, int(ckpt.get("step", step))
