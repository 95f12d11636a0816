"""Deterministic samplers: DPM-Solver++ (multistep, and the released single-step 'fast' variant) and DDIM.

All integrate the probability-flow ODE from t = 1 (pure noise) to t_end and return x at t_end, with no
extra denoising step (as released: DPM_Solver.sample(..., eps=1/N, T=1, denoise=False)).

Which DPM-Solver the release used: eval.py calls DPM_Solver(predict_x0=True).sample(z, steps=250,
eps=1/N, T=1) with the defaults order=3, skip_type='time_uniform', method='fast', i.e. the SINGLE-step
DPM-Solver-3 with data prediction (DPM-Solver++(3S) updates), steps grouped as 3,3,...,3 and a final 1
or 2 (sampler 'dpm_solver++_fast' here). Its 'multistep' branch cannot run as released (it reads an
unset `timesteps`). 'dpm_solver++' here is the multistep DPM-Solver++ of Lu et al. 2022 (orders 1-3).
Coefficients are computed in float64 and applied as Python floats, so x keeps its dtype.

Every sampler is `fn(eps_fn, x_T, schedule, *, steps, order, t_end, skip_type) -> x`, where
`eps_fn(x, t)` takes the schedule's continuous time t (B,) float64 and returns the guided noise prediction
(`sample` builds it: time input, labels, guidance); they are registered in `dimr_lab.catalog`.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from dimr_lab.errors import UserError, unknown_name_message

from .guidance import guided_eps_fn
from .schedule import NoiseSchedule

SKIP_TYPES = ("time_uniform", "logSNR")


class _Coeffs:
    """alpha, sigma, lambda of the continuous schedule at one time t, as floats."""

    def __init__(self, schedule: NoiseSchedule, t: float):
        tt = torch.tensor(t, dtype=torch.float64)
        self.t = float(t)
        self.alpha = float(schedule.marginal_alpha(tt))
        self.sigma = float(schedule.marginal_std(tt))
        self.lam = float(schedule.marginal_lambda(tt))


def time_grid(schedule: NoiseSchedule, steps: int, t_end: float = 1e-3, skip_type: str = "time_uniform") -> list[float]:
    """steps + 1 decreasing times from 1 to t_end, uniform in t or in lambda (DPM-Solver get_time_steps)."""
    if skip_type not in SKIP_TYPES:
        raise UserError(unknown_name_message("skip type", skip_type, SKIP_TYPES))
    if skip_type == "time_uniform":
        return torch.linspace(1.0, t_end, steps + 1, dtype=torch.float64).tolist()
    lam = torch.linspace(
        float(schedule.marginal_lambda(torch.tensor(1.0))),
        float(schedule.marginal_lambda(torch.tensor(float(t_end)))),
        steps + 1,
        dtype=torch.float64,
    )  # (steps+1,)
    ts = schedule.inverse_lambda(lam).tolist()
    ts[0], ts[-1] = 1.0, float(t_end)  # exact end points (the inverse is exact only up to rounding)
    return ts


def _make_x0_fn(eps_fn: Callable) -> Callable:
    """x0_fn(x, t) = (x - sigma_t eps) / alpha_t, the data prediction (DPM-Solver++ sec. 4)."""

    def x0_fn(x: torch.Tensor, c: _Coeffs) -> torch.Tensor:
        """Data prediction at time c.t."""
        eps = eps_fn(x, torch.full((x.shape[0],), c.t, dtype=torch.float64, device=x.device))  # (B, C, H, W)
        return (x - c.sigma * eps) / c.alpha  # x0 = (x_t - sigma_t eps) / alpha_t

    return x0_fn


def _multistep_update(x: torch.Tensor, hist: list, cs: list, ct: _Coeffs, order: int) -> torch.Tensor:
    """One DPM-Solver++ multistep update of the given order from history (oldest first) to time ct."""
    c0, d0 = cs[-1], hist[-1]
    h = ct.lam - c0.lam
    phi1 = math.expm1(-h)  # e^{-h} - 1
    # first order (DPM-Solver++(1) = DDIM): x_t = sigma_t/sigma_s x_s - alpha_t (e^{-h} - 1) D0
    out = (ct.sigma / c0.sigma) * x - (ct.alpha * phi1) * d0
    if order == 1:
        return out
    c1, d1m = cs[-2], hist[-2]
    h0 = c0.lam - c1.lam
    r0 = h0 / h
    dd0 = (d0 - d1m) / r0  # D1_0 = (D0 - D_{-1}) / r0
    if order == 2:
        # DPM-Solver++(2M), Lu et al. 2022 alg. 2: - 0.5 alpha_t (e^{-h} - 1) D1
        return out - (0.5 * ct.alpha * phi1) * dd0
    c2, d2m = cs[-3], hist[-3]
    h1 = c1.lam - c2.lam
    r1 = h1 / h
    dd1 = (d1m - d2m) / r1  # D1_1 = (D_{-1} - D_{-2}) / r1
    big_d1 = dd0 + (r0 / (r0 + r1)) * (dd0 - dd1)  # first-derivative estimate
    big_d2 = (dd0 - dd1) / (r0 + r1)  # second-derivative estimate
    # third order (DPM-Solver++ multistep, Taylor form): + alpha_t phi_2 D1 - alpha_t phi_3 D2
    phi2 = phi1 / h + 1.0
    phi3 = (phi1 + h) / h**2 - 0.5
    return out + (ct.alpha * phi2) * big_d1 - (ct.alpha * phi3) * big_d2


def _dpm_multistep(x, x0_fn, schedule, ts, order, lower_order_final):
    """Multistep DPM-Solver++: lower orders while warming up, and at the end when steps < 10."""
    steps = len(ts) - 1
    cs = [_Coeffs(schedule, ts[0])]
    hist = [x0_fn(x, cs[0])]
    for i in range(1, steps + 1):
        p = min(order, i)  # warm-up: only i previous predictions exist
        if lower_order_final and steps < 10:
            p = min(p, steps + 1 - i)  # official DPM-Solver: lower orders at the final steps for few steps
        ct = _Coeffs(schedule, ts[i])
        x = _multistep_update(x, hist, cs, ct, p)
        if i < steps:
            cs = (cs + [ct])[-order:]
            hist = (hist + [x0_fn(x, ct)])[-order:]
    return x


def _fast_orders(steps: int, order: int) -> list[int]:
    """Step orders of DPM-Solver-fast: 3,...,3 then [2, 1], [1] or [2]; or 2,...,2 then [1]."""
    if order == 3:
        k = steps // 3 + 1
        tail = {0: [2, 1], 1: [1], 2: [2]}[steps % 3]
        return [3] * (k - len(tail)) + tail
    if order == 2:
        return [2] * (steps // 2) + [1] * (steps % 2)
    return [1] * steps


def _singlestep_update(x, x0_fn, cs: _Coeffs, c_mid: list, ct: _Coeffs, order: int) -> torch.Tensor:
    """One single-step DPM-Solver++ update (1S, 2S or 3S) from cs to ct through intermediate times."""
    h = ct.lam - cs.lam
    phi1 = math.expm1(-h)
    d_s = x0_fn(x, cs)
    out = (ct.sigma / cs.sigma) * x - (ct.alpha * phi1) * d_s  # DPM-Solver++(1)
    if order == 1:
        return out
    c1 = c_mid[0]
    r1 = (c1.lam - cs.lam) / h
    # intermediate state at s1 by a first-order step
    x_s1 = (c1.sigma / cs.sigma) * x - (c1.alpha * math.expm1(-r1 * h)) * d_s
    d_s1 = x0_fn(x_s1, c1)
    if order == 2:
        # DPM-Solver++(2S): - (1 / (2 r1)) alpha_t (e^{-h} - 1) (D_s1 - D_s)
        return out - (0.5 / r1) * (ct.alpha * phi1) * (d_s1 - d_s)
    c2 = c_mid[1]
    r2 = (c2.lam - cs.lam) / h
    phi12 = math.expm1(-r2 * h)
    phi22 = phi12 / (r2 * h) + 1.0
    # intermediate state at s2 by a second-order step using D_s1
    x_s2 = (c2.sigma / cs.sigma) * x - (c2.alpha * phi12) * d_s + (r2 / r1) * (c2.alpha * phi22) * (d_s1 - d_s)
    d_s2 = x0_fn(x_s2, c2)
    # DPM-Solver++(3S): + (1 / r2) alpha_t phi_2(h) (D_s2 - D_s), phi_2(h) = (e^{-h} - 1) / h + 1
    return out + (1.0 / r2) * (ct.alpha * (phi1 / h + 1.0)) * (d_s2 - d_s)


def _dpm_fast(x, x0_fn, schedule, ts, order):
    """Single-step DPM-Solver++ over the grid ts, one model call per grid interval (released 'fast')."""
    i = 0
    for p in _fast_orders(len(ts) - 1, order):
        cs = _Coeffs(schedule, ts[i])
        mids = [_Coeffs(schedule, ts[i + j]) for j in range(1, p)]
        x = _singlestep_update(x, x0_fn, cs, mids, _Coeffs(schedule, ts[i + p]), p)
        i += p
    return x


def ddim_steps(schedule: NoiseSchedule, steps: int, t_end: float = 1e-3) -> list[int]:
    """Decreasing integer steps N = n_0 > ... > n_steps = round(t_end N) (n = 0: clean data, abar = 1)."""
    N = schedule.num_steps
    grid = torch.linspace(1.0, t_end, steps + 1, dtype=torch.float64) * N  # (steps+1,)
    ns = torch.round(grid).long().tolist()
    if any(a <= b for a, b in zip(ns, ns[1:])) or ns[-1] < 0:
        raise UserError(
            f"DDIM needs distinct integer steps: {steps} steps from t=1 to t_end={t_end} do not fit a"
            f" {N}-step schedule (at most {N - round(t_end * N)})"
        )
    return ns


def ddim(eps_fn: Callable, x: torch.Tensor, schedule: NoiseSchedule, *, steps: int, t_end: float = 1e-3,
         order: int = 1, skip_type: str = "time_uniform") -> torch.Tensor:
    """DDIM, eta = 0, on the discrete steps from ddim_steps (Song et al. 2021, eq. 12 with sigma = 0)."""
    if not isinstance(schedule, NoiseSchedule):
        raise UserError("DDIM runs on the integer steps of a discrete schedule (diffusion.schedule)")
    ns = ddim_steps(schedule, steps, t_end)
    abar = [1.0] + schedule.alphas_cumprod.tolist()  # abar[n]: 1-based step n, abar[0] = 1
    B = x.shape[0]
    for n, m in zip(ns, ns[1:]):
        t = torch.full((B,), n / schedule.num_steps, dtype=torch.float64, device=x.device)  # (B,) = n / N
        eps = eps_fn(x, t)  # (B, C, H, W)
        a_n, a_m = abar[n], abar[m]
        x0 = (x - math.sqrt(1 - a_n) * eps) / math.sqrt(a_n)  # predicted x0
        x = math.sqrt(a_m) * x0 + math.sqrt(1 - a_m) * eps  # x_m = sqrt(abar_m) x0 + sqrt(1 - abar_m) eps
    return x


def _check(steps: int, order: int, t_end: float) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise UserError(f"sampling steps must be a positive integer, got {steps!r}")
    if order not in (1, 2, 3):
        raise UserError(f"DPM-Solver order must be 1, 2 or 3, got {order!r}")
    if not 0.0 < float(t_end) < 1.0:
        raise UserError(f"t_end must lie in (0, 1), got {t_end!r}")


def dpm_solver_pp_multistep(eps_fn: Callable, x_T: torch.Tensor, schedule: NoiseSchedule, *, steps: int,
                            order: int = 3, t_end: float = 1e-3, skip_type: str = "time_uniform",
                            lower_order_final: bool = True) -> torch.Tensor:
    """Multistep DPM-Solver++ (data prediction) on `steps` intervals uniform in t or in log-SNR."""
    _check(steps, order, t_end)
    ts = time_grid(schedule, steps, float(t_end), skip_type)
    return _dpm_multistep(x_T, _make_x0_fn(eps_fn), schedule, ts, order, lower_order_final)


def dpm_solver_pp_fast(eps_fn: Callable, x_T: torch.Tensor, schedule: NoiseSchedule, *, steps: int,
                       order: int = 3, t_end: float = 1e-3, skip_type: str = "time_uniform") -> torch.Tensor:
    """Single-step DPM-Solver++ on a fine grid of `steps` intervals, orders 3..3 then 2/1 (DiMR's eval)."""
    _check(steps, order, t_end)
    ts = time_grid(schedule, steps, float(t_end), skip_type)
    return _dpm_fast(x_T, _make_x0_fn(eps_fn), schedule, ts, order)


@torch.no_grad()
def sample(
    model_fn: Callable,
    x_T: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    sampler: str = "dpm_solver++",
    steps: int,
    order: int = 3,
    schedule: NoiseSchedule,
    t_end: float = 1e-3,
    skip_type: str = "time_uniform",
    guidance_scale: float = 0.0,
    guidance_form: str = "uvit",
    guidance_schedule: str = "constant",
    guidance_power: float = 1.0,
    null_label: int | None = None,
    time_input: str = "discrete",
    lower_order_final: bool = True,
) -> torch.Tensor:
    """x at t_end from x_T ~ N(0, I) by the probability-flow ODE.

    model_fn(x, t, y) -> eps (or the branch list, lowest resolution first), called with the network time
    the `time_input` gives (and tau=... where it gives one); guidance in one batched forward."""
    from dimr_lab.registry import SAMPLERS, TIME_INPUTS

    if sampler not in SAMPLERS:
        raise UserError(unknown_name_message("sampler", sampler, SAMPLERS.names()))
    _check(steps, order, t_end)
    if skip_type not in SKIP_TYPES:
        raise UserError(unknown_name_message("skip type", skip_type, SKIP_TYPES))
    to_net = TIME_INPUTS.get(time_input)

    def net_fn(x: torch.Tensor, t: torch.Tensor, yy: torch.Tensor | None) -> torch.Tensor:
        t_net, tau = to_net(schedule, t)
        t_net = t_net.to(x.device)
        return model_fn(x, t_net, yy) if tau is None else model_fn(x, t_net, yy, tau=tau.to(x.device))

    eps_fn = guided_eps_fn(net_fn, y, scale=guidance_scale, form=guidance_form, schedule=guidance_schedule,
                           power=guidance_power, null_label=null_label)
    fn = SAMPLERS.get(sampler)
    extra = {"lower_order_final": lower_order_final} if sampler == "dpm_solver++" else {}
    return fn(eps_fn, x_T, schedule, steps=steps, order=order, t_end=float(t_end), skip_type=skip_type, **extra)
