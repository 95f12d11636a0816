"""DPM-Solver-fast with noise-prediction updates (DPM-Solver v1, Lu et al. 2022; not DPM-Solver++).

This is the sampler of the released U-ViT pixel-space evaluation (U-ViT eval.py: NoiseScheduleVP('linear'),
model_wrapper(time_input_type='0'), DPM_Solver.sample(x, steps=50, eps=1e-4, adaptive_step_size=False,
fast_version=True)), re-derived from the paper and checked against U-ViT dpm_solver_pytorch.py:

- Grid (DPM_Solver.get_time_steps_for_dpm_solver_fast): K = steps // 3 + 1 outer steps, K + 1 times uniform
  in lambda (half log-SNR) from lambda(t_start) to lambda(t_end), each mapped back with inverse_lambda.
  Orders: steps % 3 == 0 -> [3] * (K - 2) + [2, 1]; == 1 -> [3] * (K - 1) + [1]; == 2 -> [3] * (K - 1) + [2],
  so the number of model calls (NFE) is exactly `steps`.
- Updates (DPM_Solver.dpm_solver_{first,second,third}_update; paper Algorithms 1-2), with h = lambda_t - lambda_s:
    DPM-Solver-1: x_t = (alpha_t / alpha_s) x_s - sigma_t (e^h - 1) eps_s
    DPM-Solver-2: r1 = 1/2, s1 = lambda^{-1}(lambda_s + r1 h),
                  u = (alpha_s1 / alpha_s) x_s - sigma_s1 (e^{r1 h} - 1) eps_s,
                  x_t = (alpha_t / alpha_s) x_s - sigma_t (e^h - 1) eps_s
                        - (1 / (2 r1)) sigma_t (e^h - 1) (eps(u, s1) - eps_s)
    DPM-Solver-3: r1 = 1/3, r2 = 2/3, intermediate times s1, s2 likewise,
                  u1 = (alpha_s1 / alpha_s) x_s - sigma_s1 (e^{r1 h} - 1) eps_s,
                  u2 = (alpha_s2 / alpha_s) x_s - sigma_s2 (e^{r2 h} - 1) eps_s
                       - (r2 / r1) sigma_s2 ((e^{r2 h} - 1) / (r2 h) - 1) (eps(u1, s1) - eps_s),
                  x_t = (alpha_t / alpha_s) x_s - sigma_t (e^h - 1) eps_s
                        - (1 / r2) sigma_t ((e^h - 1) / h - 1) (eps(u2, s2) - eps_s)
- No final denoising step (the released v1 solver has none).

The released sample() ignores `order` when fast_version=True (always the order-3 grouping). For order=2 this
module also offers the order-2 grouping of later DPM-Solver releases: [2] * (steps // 2), plus [1] if steps is
odd; order=1 is DPM-Solver-1 (DDIM) on `steps` lambda-uniform steps.

Coefficients are computed in float64 and applied as Python floats, so x keeps its dtype. (The released code
builds its grid and coefficients in torch's default dtype, float32 in U-ViT's runs.)
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from dimr_lab.errors import UserError


class _At:
    """alpha, sigma, lambda of the schedule at one time t, as Python floats (float64)."""

    __slots__ = ("t", "alpha", "sigma", "lam")

    def __init__(self, schedule, t: float):
        tt = torch.tensor(float(t), dtype=torch.float64)
        self.t = float(t)
        self.alpha = float(schedule.marginal_alpha(tt))
        self.sigma = float(schedule.marginal_std(tt))
        self.lam = float(schedule.marginal_lambda(tt))


def _orders(steps: int, order: int) -> list[int]:
    """Order of each outer step; they sum to `steps` (the NFE)."""
    if order == 3:
        k = steps // 3 + 1
        tail = {0: [2, 1], 1: [1], 2: [2]}[steps % 3]  # U-ViT get_time_steps_for_dpm_solver_fast
        return [3] * (k - len(tail)) + tail
    if order == 2:
        return [2] * (steps // 2) + [1] * (steps % 2)
    return [1] * steps


def _check(steps, order, t_start, t_end) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise UserError(f"sampling steps must be a positive integer, got {steps!r}")
    if order not in (1, 2, 3):
        raise UserError(f"DPM-Solver order must be 1, 2 or 3, got {order!r}")
    if not 0.0 < float(t_end) < float(t_start):
        raise UserError(f"need 0 < t_end < t_start, got t_end={t_end!r}, t_start={t_start!r}")


def fast_orders_and_grid(schedule, steps: int, order: int = 3, t_start: float = 1.0,
                         t_end: float = 1e-4) -> tuple[list[int], list[float]]:
    """(orders, times): the order of each outer step and the K + 1 decreasing outer times, uniform in lambda.

    Each time is inverse_lambda of a point of linspace(lambda(t_start), lambda(t_end), K + 1), as U-ViT
    dpm_solver_pytorch.py get_time_steps('logSNR'); the two end points are then set to t_start and t_end
    exactly (the round trip differs from them only by rounding).
    """
    _check(steps, order, t_start, t_end)
    orders = _orders(steps, order)
    k = len(orders)
    lam = torch.linspace(
        float(schedule.marginal_lambda(torch.tensor(float(t_start), dtype=torch.float64))),
        float(schedule.marginal_lambda(torch.tensor(float(t_end), dtype=torch.float64))),
        k + 1,
        dtype=torch.float64,
    )  # (K+1,)
    times = schedule.inverse_lambda(lam).tolist()
    times[0], times[-1] = float(t_start), float(t_end)
    return orders, times


def _update(x: torch.Tensor, eps_fn: Callable, schedule, cs: _At, ct: _At, order: int) -> torch.Tensor:
    """One single-step DPM-Solver-`order` update (noise prediction) from time cs.t to ct.t."""
    B = x.shape[0]

    def eps_at(z: torch.Tensor, c: _At) -> torch.Tensor:
        return eps_fn(z, torch.full((B,), c.t, dtype=torch.float64, device=x.device))  # (B, ...)

    h = ct.lam - cs.lam
    phi1 = math.expm1(h)  # e^h - 1
    eps_s = eps_at(x, cs)
    # DPM-Solver-1 part, shared by all orders
    out = (ct.alpha / cs.alpha) * x - (ct.sigma * phi1) * eps_s
    if order == 1:
        return out
    if order == 2:
        r1 = 0.5
        c1 = _At(schedule, float(schedule.inverse_lambda(torch.tensor(cs.lam + r1 * h, dtype=torch.float64))))
        u1 = (c1.alpha / cs.alpha) * x - (c1.sigma * math.expm1(r1 * h)) * eps_s
        eps_1 = eps_at(u1, c1)
        return out - ((0.5 / r1) * ct.sigma * phi1) * (eps_1 - eps_s)
    r1, r2 = 1.0 / 3.0, 2.0 / 3.0
    c1 = _At(schedule, float(schedule.inverse_lambda(torch.tensor(cs.lam + r1 * h, dtype=torch.float64))))
    c2 = _At(schedule, float(schedule.inverse_lambda(torch.tensor(cs.lam + r2 * h, dtype=torch.float64))))
    u1 = (c1.alpha / cs.alpha) * x - (c1.sigma * math.expm1(r1 * h)) * eps_s
    eps_1 = eps_at(u1, c1)
    phi12 = math.expm1(r2 * h)
    phi22 = phi12 / (r2 * h) - 1.0  # (e^{r2 h} - 1) / (r2 h) - 1
    u2 = (c2.alpha / cs.alpha) * x - (c2.sigma * phi12) * eps_s - ((r2 / r1) * c2.sigma * phi22) * (eps_1 - eps_s)
    eps_2 = eps_at(u2, c2)
    phi2 = phi1 / h - 1.0  # (e^h - 1) / h - 1
    return out - ((1.0 / r2) * ct.sigma * phi2) * (eps_2 - eps_s)


@torch.no_grad()
def dpm_solver_fast(eps_fn: Callable, x_T: torch.Tensor, schedule, *, steps: int, t_end: float = 1e-4,
                    t_start: float = 1.0, order: int = 3) -> torch.Tensor:
    """x at t_end from x_T at t_start by DPM-Solver-fast (noise prediction), with exactly `steps` eps_fn calls.

    eps_fn(x, t) takes x (B, ...) and t (B,) float64 continuous time (on x's device) and returns the noise
    prediction; schedule gives marginal_alpha / marginal_std / marginal_lambda / inverse_lambda (e.g. VPSchedule).
    """
    orders, times = fast_orders_and_grid(schedule, steps, order, t_start, t_end)
    x = x_T
    for i, p in enumerate(orders):
        x = _update(x, eps_fn, schedule, _At(schedule, times[i]), _At(schedule, times[i + 1]), p)
    return x


def sampler(eps_fn: Callable, x_T: torch.Tensor, schedule, *, steps: int, order: int = 3, t_end: float = 1e-4,
            skip_type: str = "logSNR") -> torch.Tensor:
    """The registered form (`sample.sampler = "dpm_solver_fast"`): its grid is always uniform in log-SNR."""
    return dpm_solver_fast(eps_fn, x_T, schedule, steps=steps, t_end=t_end, order=order)
