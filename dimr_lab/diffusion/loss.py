"""DiMR's multi-scale eps-prediction loss and the random draws of one training step."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from dimr_lab.errors import UserError

from .schedule import NoiseSchedule


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
    """c_k = 4^-(K-1-k) (released 2R: [1/4, 1]; 3R inferred), or [0, ..., 0, 1] without multi-scale."""
    if isinstance(num_branches, bool) or not isinstance(num_branches, int) or num_branches < 1:
        raise UserError(f"number of branches must be a positive integer, got {num_branches!r}")
    if not multiscale:
        return [0.0] * (num_branches - 1) + [1.0]
    return [4.0 ** -(num_branches - 1 - k) for k in range(num_branches)]


def training_targets(
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    y: torch.Tensor | None,
    num_classes: int,
    label_drop: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(x_t, t, y_dropped, eps, n): n ~ U{1..N}, eps ~ N(0, I), labels -> null label w.p. label_drop."""
    if not 0.0 <= float(label_drop) <= 1.0:
        raise UserError(f"label_drop must lie in [0, 1], got {label_drop!r}")
    B = x0.shape[0]
    gdev = generator.device
    # draw order is fixed (n, eps, drop mask) so a saved generator state replays the same step
    n = torch.randint(1, schedule.num_steps + 1, (B,), generator=generator, device=gdev)  # (B,)
    eps = torch.randn(x0.shape, generator=generator, device=gdev, dtype=torch.float32)  # (B, C, H, W)
    drop = torch.rand(B, generator=generator, device=gdev) < float(label_drop)  # (B,)
    n, eps, drop = n.to(x0.device), eps.to(device=x0.device, dtype=x0.dtype), drop.to(x0.device)
    x_t = schedule.add_noise(x0, eps, n)  # (B, C, H, W)
    t = schedule.model_time(n)  # (B,)
    y_dropped = None
    if y is not None:
        # classifier-free guidance training: the null label is index num_classes (the extra embedding row)
        y_dropped = torch.where(drop, torch.full_like(y, num_classes), y)  # (B,)
    return x_t, t, y_dropped, eps, n
