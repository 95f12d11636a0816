"""Classifier-free guidance: wraps a multi-branch network into one guided eps function.

Forms (both are the same family; s_dit = 1 + s_uvit):
- 'uvit': eps = eps_c + s (eps_c - eps_u); s = 0 is the conditional model (released default, s = 0.4).
- 'dit':  eps = eps_u + s (eps_c - eps_u); s = 1 is the conditional model.

Schedules:
- 'constant': s at every t.
- 'power_cosine': the released eval.py (DiT form, flag cfg_scale_pow = p) uses
      ramp(t) = (1 - cos(pi * (1 - t)^p)) / 2,   s_dit(t) = 1 + (s_dit - 1) * ramp(t),
  with t = t_continuous in [0, 1] (its timesteps / 1000). ramp(1) = 0 (pure noise: conditional only) and
  ramp(0) = 1 (the full scale at the data end). In U-ViT form the same rule reads s_uvit(t) = s * ramp(t).
  We apply it per sample (the released code assumes one t for the whole batch).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from dimr_lab.errors import UserError, unknown_name_message

GUIDANCE_FORMS = ("uvit", "dit")
GUIDANCE_SCHEDULES = ("constant", "power_cosine")


def last_output(out) -> torch.Tensor:
    """The full-resolution prediction: the last of a list/tuple of branch outputs, or the tensor itself."""
    if isinstance(out, (list, tuple)):
        return out[-1]
    return out


def power_cosine_ramp(t: torch.Tensor, power: float = 1.0) -> torch.Tensor:
    """ramp(t) = (1 - cos(pi (1 - t)^p)) / 2: 0 at t = 1 (noise), 1 at t = 0 (data)."""
    t = torch.as_tensor(t).clamp(0.0, 1.0)
    # released eval.py: scale_step = (1 - cos((1 - t)^p * pi)) / 2
    return (1.0 - torch.cos(math.pi * (1.0 - t) ** power)) / 2.0


def guidance_scale_at(
    t: torch.Tensor, scale: float, *, form: str = "uvit", schedule: str = "constant", power: float = 1.0
) -> torch.Tensor:
    """The per-sample guidance scale at network time t, in the given form's convention."""
    _check(form, schedule, power)
    t = torch.as_tensor(t, dtype=torch.float32)
    if schedule == "constant":
        return torch.full_like(t, float(scale))
    ramp = power_cosine_ramp(t, power)  # (B,)
    # the excess over the conditional model is ramped: s_uvit(t) = s ramp(t); s_dit(t) = 1 + (s - 1) ramp(t)
    return float(scale) * ramp if form == "uvit" else 1.0 + (float(scale) - 1.0) * ramp


def _check(form: str, schedule: str, power: float) -> None:
    """Raise UserError for an unknown form or schedule, or a non-positive power."""
    if form not in GUIDANCE_FORMS:
        raise UserError(unknown_name_message("guidance form", form, GUIDANCE_FORMS))
    if schedule not in GUIDANCE_SCHEDULES:
        raise UserError(unknown_name_message("guidance schedule", schedule, GUIDANCE_SCHEDULES))
    if not float(power) > 0:
        raise UserError(f"guidance power must be > 0, got {power!r}")


def guidance_is_off(scale: float, form: str) -> bool:
    """True when the guided eps equals the conditional eps at every t (no unconditional pass needed)."""
    return float(scale) == (0.0 if form == "uvit" else 1.0)


def guided_eps_fn(
    model_fn: Callable,
    y: torch.Tensor | None = None,
    *,
    scale: float = 0.0,
    form: str = "uvit",
    schedule: str = "constant",
    power: float = 1.0,
    null_label: int | None = None,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """eps_fn(x, t) -> guided full-resolution eps for labels y, t the schedule's time (B,) in [0, 1] (the
    ramp's t, as the released eval.py); model_fn(x, t, y) -> eps or branch list. Conditional and
    unconditional share one batched forward."""
    _check(form, schedule, power)

    def cond_only(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The conditional (or unconditional-model) full-resolution eps."""
        return last_output(model_fn(x, t, y))

    if guidance_is_off(scale, form):
        return cond_only
    if null_label is None:
        raise UserError("classifier-free guidance needs null_label (the class index of the dropped label)")
    if y is None:
        raise UserError("classifier-free guidance needs class labels y")

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Guided eps: one batched forward of [conditional; unconditional]."""
        B = x.shape[0]
        x2 = torch.cat([x, x], dim=0)  # (2B, C, H, W)
        t2 = torch.cat([t, t], dim=0)  # (2B,)
        y2 = torch.cat([y, torch.full_like(y, int(null_label))], dim=0)  # (2B,)
        eps_c, eps_u = last_output(model_fn(x2, t2, y2)).split(B, dim=0)  # (B, C, H, W) each
        s = guidance_scale_at(t.float(), scale, form=form, schedule=schedule, power=power)  # (B,), on t's device
        s = s.to(device=x.device, dtype=eps_c.dtype).view((B,) + (1,) * (x.dim() - 1))  # (B, 1, 1, 1)
        if form == "uvit":
            return eps_c + s * (eps_c - eps_u)  # U-ViT: eps_c + s (eps_c - eps_u)
        return eps_u + s * (eps_c - eps_u)  # DiT (Ho & Salimans): eps_u + s (eps_c - eps_u)

    return guided
