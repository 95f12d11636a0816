"""One training step's diffusion maths, the only copy the trainer uses: the random draws, the noisy
input and what the network is given as time, the loss weights and DiMR's multi-scale eps loss.

    draws = draw(schedule, B, (C, H, W), label_drop=..., flip=..., generator=g)   # one global batch
    loss, per_branch = training_loss(model, schedule, time_input, x0, y, draws, weights, null_label)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from dimr_lab.errors import UserError


def _side(size) -> tuple[int, int]:
    """(h, w) from an int side or an (h, w) pair."""
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def multiscale_targets(eps: torch.Tensor, output_sizes: Sequence) -> list[torch.Tensor]:
    """Per-branch targets (lowest resolution first): eps block-averaged by f = H / s, times f."""
    if eps.dim() != 4:
        raise UserError(f"eps must be (B, C, H, W), got shape {tuple(eps.shape)}")
    H, W = eps.shape[-2:]
    targets = []
    for size in output_sizes:
        h, w = _side(size)
        if h < 1 or w < 1 or H % h or W % w or H // h != W // w:
            raise UserError(f"branch output {h}x{w} does not divide the input {H}x{W} by one integer factor")
        f = H // h
        if f == 1:
            targets.append(eps)  # (B, C, H, W)
            continue
        # mean of f*f i.i.d. unit normals has variance 1/f^2; times f restores unit variance
        # (released code: f x f box sum / f, the same thing; paper sec. 3.3 multi-scale loss)
        targets.append(F.avg_pool2d(eps, kernel_size=f, stride=f) * f)  # (B, C, H/f, W/f)
    return targets


def diffusion_loss(
    outputs: Sequence[torch.Tensor] | torch.Tensor, eps: torch.Tensor, weights: Sequence[float]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(sum_k c_k mean((out_k - target_k)^2), per-branch mean squared errors), branches lowest first."""
    if isinstance(outputs, torch.Tensor):
        outputs = [outputs]
    outputs = list(outputs)
    weights = list(weights)
    if len(weights) != len(outputs):
        raise UserError(f"{len(outputs)} branch outputs but {len(weights)} loss weights")
    targets = multiscale_targets(eps, [tuple(o.shape[-2:]) for o in outputs])
    per_branch = []
    total = eps.new_zeros((), dtype=torch.float32)
    for out, target, c in zip(outputs, targets, weights):
        if out.shape != target.shape:
            raise UserError(f"branch output shape {tuple(out.shape)} != target shape {tuple(target.shape)}")
        mse = (out.float() - target.float()).pow(2).mean()  # () mean over B, C, H, W
        per_branch.append(mse)
        # L = sum_k c_k * MSE_k (paper eq. for the multi-scale loss); a zero weight keeps the branch in the
        # graph with zero gradient, so DDP sees every parameter used
        total = total + float(c) * mse
    return total, per_branch


def default_loss_weights(num_branches: int, multiscale: bool = True) -> list[float]:
    """c_k = 4^-(K-1-k) (released 2R: [1/4, 1]; 3R inferred), or [0, ..., 0, 1] without multi-scale.
    The weight follows the branch's place, not its resolution ratio: 1/4 a step down assumes the released
    ratio of 2 (a ratio-4 cascade would by the same rule take 1/16: set diffusion.loss_weights)."""
    if isinstance(num_branches, bool) or not isinstance(num_branches, int) or num_branches < 1:
        raise UserError(f"number of branches must be a positive integer, got {num_branches!r}")
    if not multiscale:
        return [0.0] * (num_branches - 1) + [1.0]
    return [4.0 ** -(num_branches - 1 - k) for k in range(num_branches)]


def loss_weights(diffusion: Any, num_branches: int) -> list[float]:
    """The per-branch weights of a DiffusionSpec: diffusion.loss_weights (with multiscale_loss off, only the
    last branch keeps its weight) or the default 4^-(K-1-k)."""
    if diffusion.loss_weights:
        if len(diffusion.loss_weights) != num_branches:
            raise UserError(f"diffusion.loss_weights has {len(diffusion.loss_weights)} entries, the network has "
                            f"{num_branches} branches")
        weights = [float(w) for w in diffusion.loss_weights]
        return weights if diffusion.multiscale_loss else [0.0] * (num_branches - 1) + [weights[-1]]
    return default_loss_weights(num_branches, diffusion.multiscale_loss)


@dataclass
class Draws:
    """The random numbers of one global training batch."""

    t: torch.Tensor        # (B,) float64 schedule time (t = n / N on a discrete schedule)
    eps: torch.Tensor      # (B, C, H, W) float32 noise
    drop: torch.Tensor     # (B,) bool: the label becomes the null label
    flip: torch.Tensor     # (B,) bool: horizontal flip of the image

    def slice(self, lo: int, hi: int) -> "Draws":
        """This process's share of the global batch."""
        return Draws(self.t[lo:hi], self.eps[lo:hi], self.drop[lo:hi], self.flip[lo:hi])


def draw(schedule: Any, batch: int, shape: Sequence[int], *, label_drop: float, flip: bool,
         generator: torch.Generator) -> Draws:
    """Draws of one global batch from one CPU generator in a fixed order (time, noise, label drop, flips):
    the same numbers on any device and for any number of processes (each takes its slice), and a
    checkpointed generator state replays them exactly."""
    if not 0.0 <= float(label_drop) <= 1.0:
        raise UserError(f"label_drop must lie in [0, 1], got {label_drop!r}")
    t = schedule.sample_time(batch, generator)  # (B,)
    eps = torch.randn((batch, *shape), generator=generator)  # (B, C, H, W)
    drop = torch.rand(batch, generator=generator) < float(label_drop)  # (B,)
    flips = torch.rand(batch, generator=generator) < 0.5 if flip else torch.zeros(batch, dtype=torch.bool)
    return Draws(t, eps, drop, flips)


def model_inputs(schedule: Any, time_input: str | Callable, x0: torch.Tensor, y: torch.Tensor | None,
                 draws: Draws, null_label: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None,
                                                        torch.Tensor | None, torch.Tensor]:
    """(x_t, t_net, tau, y_in, eps) for clean images x0 (B, C, H, W) and labels y (B,) on their device."""
    from dimr_lab.registry import TIME_INPUTS

    dev = x0.device
    flip = draws.flip.to(dev)
    x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)  # random horizontal flips
    eps = draws.eps.to(device=dev, dtype=x0.dtype)  # (B, C, H, W)
    x_t = schedule.add_noise_at(x0, eps, draws.t)  # (B, C, H, W) = alpha_t x0 + sigma_t eps; t checked on the CPU
    t = draws.t.to(dev)  # (B,)
    to_net = TIME_INPUTS.get(time_input) if isinstance(time_input, str) else time_input
    t_net, tau = to_net(schedule, t)  # what the network is given as time
    y_in = None
    if y is not None:
        # classifier-free guidance training: the null label is the extra embedding row num_classes
        y_in = torch.where(draws.drop.to(dev), torch.full_like(y, int(null_label)), y)  # (B,)
    return x_t, t_net.to(dev), None if tau is None else tau.to(dev), y_in, eps


def training_loss(model: Callable, schedule: Any, time_input: str | Callable, x0: torch.Tensor,
                  y: torch.Tensor | None, draws: Draws, weights: Sequence[float],
                  null_label: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The loss of one training step: model(x_t, t, y, tau) against the multi-scale eps targets."""
    x_t, t_net, tau, y_in, eps = model_inputs(schedule, time_input, x0, y, draws, null_label)
    outputs = model(x_t, t_net, y_in) if tau is None else model(x_t, t_net, y_in, tau=tau)  # lowest first
    # L = sum_k c_k mean((out_k - r_k avgpool_{r_k}(eps))^2)  (multi-scale loss, unit-variance targets)
    return diffusion_loss(outputs, eps, weights)
