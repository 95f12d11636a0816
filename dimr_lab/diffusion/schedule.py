"""Discrete-time VP noise schedules and their continuous-time interpolation for ODE solvers.

Conventions (checked against the released DiMR code, train.py / eval.py / dpm_solver.py):

- Discrete steps are n = 1..N. Step n noises with alphas_cumprod[n - 1] (0-based table):
  x_n = sqrt(abar_n) x_0 + sqrt(1 - abar_n) eps. (The released Schedule prepends beta_0 = 0, so its
  cum_alphas[n] is our alphas_cumprod[n - 1].)
- The network's time input is t = n / N in (0, 1] (the released code feeds log_snr = 8 t - 4 and the
  network converts; we only pass t).
- Continuous time for the solvers (DPM-Solver's 'discrete' schedule): knots t_i = i / N, i = 1..N, with
  log alpha(t_i) = 0.5 log(alphas_cumprod[i - 1]), linearly interpolated in t (and linearly extrapolated
  past the end knots). At a knot, the DPM-Solver 'discrete' model wrapper reads the 0-based step index
  (t - 1/N) N = i - 1, i.e. our 1-based step n = i; the released eval.py passes t_cont * N straight to the
  network's log_snr, i.e. network t = t_cont. Both agree: at the knots the solver's alpha equals the
  training alpha of step n = t N, and the network sees exactly the t = n / N it was trained with.
  Between knots the network sees the interpolated t (no rounding), as released.
- One deviation, only below the first knot (t < 1/N, unused by the released t_end = 1/N): DPM-Solver
  extrapolates the first segment linearly, which gives log alpha > 0 (NaN sigma) near t = 0; we add a knot
  (t = 0, alpha = 1) instead, so sigma(0) = 0.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from dimr_lab.errors import UserError


def scaled_linear_betas(num_steps: int, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """Stable Diffusion's betas: linspace(sqrt(beta_start), sqrt(beta_end), N) ** 2, float64."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=torch.float64) ** 2  # (N,)


def cosine_betas(num_steps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal (2021) cosine betas, float64, clipped at max_beta."""
    # abar(u) = f(u) / f(0), f(u) = cos((u + s) / (1 + s) * pi / 2)^2  (Improved DDPM, eq. 17)
    u = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps  # (N+1,)
    f = torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2  # (N+1,)
    # beta_n = 1 - abar(n/N) / abar((n-1)/N), clipped (Improved DDPM, sec. 3.2)
    return (1 - f[1:] / f[:-1]).clamp(max=max_beta)  # (N,)


def _interp(x: torch.Tensor, xp: torch.Tensor, yp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear y(x) through knots (xp increasing), extended linearly past both ends."""
    k = xp.numel()
    idx = torch.searchsorted(xp, x.contiguous()).clamp(1, k - 1)  # (...,) right knot of the segment
    x0, x1 = xp[idx - 1], xp[idx]  # (...,)
    y0, y1 = yp[idx - 1], yp[idx]  # (...,)
    return y0 + (x - x0) * (y1 - y0) / (x1 - x0)  # (...,)


class NoiseSchedule:
    """A discrete VP schedule with N steps plus the continuous-time view the ODE solvers use."""

    def __init__(self, betas: torch.Tensor, name: str = "custom"):
        betas = torch.as_tensor(betas, dtype=torch.float64).flatten()  # (N,)
        if betas.numel() < 2 or not bool(((betas > 0) & (betas < 1)).all()):
            raise UserError("a noise schedule needs at least 2 betas, each in (0, 1)")
        self.name = name
        self.continuous = False
        self.num_steps = betas.numel()
        self.betas = betas  # (N,)
        self.alphas = 1.0 - betas  # (N,)
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)  # (N,) abar_n = prod_{i<=n} (1 - beta_i)
        # knots of the continuous view: t_i = i / N, log alpha(t_i) = 0.5 log abar_i (DPM-Solver 'discrete'),
        # plus t_0 = 0 with alpha = 1 (clean data, the released Schedule's abar_0 = 1)
        self.t_knots = torch.arange(0, self.num_steps + 1, dtype=torch.float64) / self.num_steps  # (N+1,)
        zero = torch.zeros(1, dtype=torch.float64)
        self.log_alpha_knots = torch.cat([zero, 0.5 * torch.log(self.alphas_cumprod)])  # (N+1,)

    def __repr__(self) -> str:
        return f"NoiseSchedule({self.name!r}, num_steps={self.num_steps})"

    # ---- discrete view (training, DDIM) ----

    def _check_steps(self, n: torch.Tensor) -> torch.Tensor:
        """n as an int64 tensor, checked to lie in 1..N where its values are on the CPU (reading them back
        from a GPU would stall the host every training step; training draws its steps on the CPU and they
        are checked there, before they move)."""
        n = torch.as_tensor(n)
        if n.dtype.is_floating_point or n.dtype == torch.bool:
            raise UserError(f"diffusion steps must be integers in 1..{self.num_steps}, got dtype {n.dtype}")
        if n.numel() and n.device.type == "cpu" and (int(n.min()) < 1 or int(n.max()) > self.num_steps):
            raise UserError(f"diffusion steps must lie in 1..{self.num_steps}, got {int(n.min())}..{int(n.max())}")
        return n.long()

    def alpha_bar(self, n: torch.Tensor) -> torch.Tensor:
        """abar_n = alphas_cumprod[n - 1] for integer steps n in 1..N (float64, on n's device)."""
        n = self._check_steps(n)
        return self.alphas_cumprod.to(n.device)[n - 1]  # (B,)

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        """x_n = sqrt(abar_n) x0 + sqrt(1 - abar_n) eps, per sample step n in 1..N (DDPM eq. 4)."""
        if x0.shape != eps.shape:
            raise UserError(f"x0 and eps shapes differ: {tuple(x0.shape)} vs {tuple(eps.shape)}")
        n = self._check_steps(n).to(x0.device).reshape(-1)  # (B,)
        if n.numel() != x0.shape[0]:
            raise UserError(f"need one step per sample: {n.numel()} steps for a batch of {x0.shape[0]}")
        abar = self.alpha_bar(n)  # (B,)
        view = (-1,) + (1,) * (x0.dim() - 1)
        a = abar.sqrt().to(x0.dtype).view(view)  # (B, 1, ...)
        s = (1 - abar).sqrt().to(x0.dtype).view(view)  # (B, 1, ...)
        return a * x0 + s * eps  # (B, ...)

    def model_time(self, n: torch.Tensor) -> torch.Tensor:
        """The network's time input t = n / N (float32) for integer steps n in 1..N."""
        n = self._check_steps(n)
        return n.to(torch.float32) / self.num_steps  # (B,)

    # ---- training: times as t = n / N ----

    def sample_time(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n ~ U{1..N} (as released: torch.randint), returned as t = n / N: (B,) float64."""
        n = torch.randint(1, self.num_steps + 1, (int(batch),), generator=generator)  # (B,)
        return n.to(torch.float64) / self.num_steps

    def steps_of(self, t: torch.Tensor) -> torch.Tensor:
        """The integer steps n = t N of times on the grid t = n / N."""
        return torch.round(torch.as_tensor(t, dtype=torch.float64) * self.num_steps).long()

    def add_noise_at(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """add_noise at the steps n = t N (t from sample_time)."""
        return self.add_noise(x0, eps, self.steps_of(t))

    # ---- continuous view (DPM-Solver) ----

    def marginal_log_mean_coeff(self, t: torch.Tensor) -> torch.Tensor:
        """log alpha(t): piecewise-linear in t through (0, 0) and (i / N, 0.5 log abar_i); float64."""
        t = torch.as_tensor(t, dtype=torch.float64)
        return _interp(t, self.t_knots.to(t.device), self.log_alpha_knots.to(t.device))  # (...,)

    def marginal_alpha(self, t: torch.Tensor) -> torch.Tensor:
        """alpha(t) = exp(log alpha(t)); float64."""
        return torch.exp(self.marginal_log_mean_coeff(t))

    def marginal_std(self, t: torch.Tensor) -> torch.Tensor:
        """sigma(t) = sqrt(1 - alpha(t)^2) (VP); float64."""
        return torch.sqrt(-torch.expm1(2.0 * self.marginal_log_mean_coeff(t)))

    def marginal_lambda(self, t: torch.Tensor) -> torch.Tensor:
        """Half log-SNR lambda(t) = log alpha(t) - log sigma(t) (DPM-Solver eq. 3.1 notation); float64."""
        log_alpha = self.marginal_log_mean_coeff(t)
        return log_alpha - 0.5 * torch.log(-torch.expm1(2.0 * log_alpha))

    def inverse_lambda(self, lam: torch.Tensor) -> torch.Tensor:
        """The t with marginal_lambda(t) = lam (inverse of the piecewise-linear map); float64."""
        lam = torch.as_tensor(lam, dtype=torch.float64)
        # alpha^2 = sigmoid(2 lambda) => log alpha = -0.5 log(1 + exp(-2 lambda))
        log_alpha = -0.5 * torch.nn.functional.softplus(-2.0 * lam)  # (...,)
        # log alpha decreases with t: flip the knots so the abscissa increases
        xp = torch.flip(self.log_alpha_knots, [0]).to(lam.device)  # (N,)
        yp = torch.flip(self.t_knots, [0]).to(lam.device)  # (N,)
        return _interp(log_alpha, xp, yp)  # (...,)



def scaled_linear(spec: Any) -> NoiseSchedule:
    """The released latent schedule with diffusion.num_steps steps."""
    return NoiseSchedule(scaled_linear_betas(_num_steps(spec)), name="scaled_linear")


def cosine(spec: Any) -> NoiseSchedule:
    """Nichol & Dhariwal's cosine schedule with diffusion.num_steps steps."""
    return NoiseSchedule(cosine_betas(_num_steps(spec)), name="cosine")


def _num_steps(spec: Any) -> int:
    n = getattr(spec, "num_steps", spec)
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise UserError(f"num_steps of a noise schedule must be an integer >= 2, got {n!r}")
    return n


def build_schedule(spec: Any = "scaled_linear", num_steps: int = 1000) -> Any:
    """The schedule a DiffusionSpec names (registry: `dimr-lab components schedule`), or one by name."""
    from dimr_lab.registry import SCHEDULES

    if isinstance(spec, str):
        from dimr_lab.spec.run_spec import DiffusionSpec

        spec = DiffusionSpec(schedule=SCHEDULES.check(spec, key="diffusion.schedule"), num_steps=_num_steps(num_steps))
    return SCHEDULES.get(spec.schedule)(spec)
