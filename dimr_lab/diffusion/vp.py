"""The continuous-time VP SDE with a linear beta(t) (Song et al. 2021), as used by the released pixel-space code.

beta(t) = beta_min + t (beta_max - beta_min) on t in [0, T], defaults beta_min = 0.1, beta_max = 20, T = 1.
Marginals q(x_t | x_0) = N(alpha(t) x_0, sigma(t)^2 I) with

    log alpha(t) = -0.25 t^2 (beta_max - beta_min) - 0.5 t beta_min,   sigma(t) = sqrt(1 - alpha(t)^2).

Sources (read, not copied):
- U-ViT sde.py VPSDE (squared_diffusion, squared_diffusion_integral, cum_alpha, nsr, snr) and SDE.sample
  (training: t = torch.rand(B), no floor); U-ViT sde.py ScoreModel.predict (network time 999 t).
- U-ViT dpm_solver_pytorch.py NoiseScheduleVP('linear') (marginal_log_mean_coeff, marginal_std,
  marginal_lambda, inverse_lambda): the same marginals, used by the released pixel sampler (U-ViT eval.py).
- DiMR sde.py VPSDE.nsr / VPSDE.snr (clamped) and ScoreModel.predict (log_snr = snr(t).log());
  DiMR libs/core/sigmoid/module.py TimeDependentParameter.seed_time (tau = log_snr / 4).

All schedule maths is float64; `add_noise` keeps x0's dtype. The interface matches NoiseSchedule
(schedule.py) where the ODE solvers need it: marginal_log_mean_coeff, marginal_alpha, marginal_std,
marginal_lambda, inverse_lambda.
"""

from __future__ import annotations

import torch

from dimr_lab.errors import UserError

# DiMR sde.py VPSDE.nsr / VPSDE.snr clamp both ratios to this range
SNR_CLAMP_MIN = 1e-12
SNR_CLAMP_MAX = 1e6


def _f64(t) -> torch.Tensor:
    """t as a float64 tensor (on its own device if already a tensor)."""
    return torch.as_tensor(t, dtype=torch.float64)


class VPSchedule:
    """Continuous VP SDE with linear beta(t) = beta_min + t (beta_max - beta_min), t in [0, T]."""

    continuous = True
    num_steps = None  # no discrete steps: training and sampling use continuous t

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, T: float = 1.0):
        beta_min, beta_max, T = float(beta_min), float(beta_max), float(T)
        if not (0.0 < beta_min < beta_max) or not T > 0.0:
            raise UserError(
                f"a linear VP schedule needs 0 < beta_min < beta_max and T > 0, got {beta_min}, {beta_max}, {T}"
            )
        self.beta_min = beta_min
        self.beta_max = beta_max
        self.T = T
        self.name = "vp_linear"

    def __repr__(self) -> str:
        return f"VPSchedule(beta_min={self.beta_min}, beta_max={self.beta_max}, T={self.T})"

    # ---- SDE coefficients (U-ViT sde.py VPSDE) ----

    def beta(self, t) -> torch.Tensor:
        """beta(t) = beta_min + t (beta_max - beta_min) (U-ViT sde.py VPSDE.squared_diffusion); float64."""
        return self.beta_min + _f64(t) * (self.beta_max - self.beta_min)

    def beta_integral(self, t) -> torch.Tensor:
        """int_0^t beta = beta_min t + (beta_max - beta_min) t^2 / 2 (U-ViT sde.py squared_diffusion_integral)."""
        t = _f64(t)
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2

    # ---- marginals (U-ViT dpm_solver_pytorch.py NoiseScheduleVP('linear')) ----

    def marginal_log_mean_coeff(self, t) -> torch.Tensor:
        """log alpha(t) = -0.25 t^2 (b1 - b0) - 0.5 t b0 (NoiseScheduleVP.marginal_log_mean_coeff); float64."""
        t = _f64(t)
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def marginal_alpha(self, t) -> torch.Tensor:
        """alpha(t) = exp(log alpha(t)); alpha^2 is U-ViT sde.py VPSDE.cum_alpha; float64."""
        return torch.exp(self.marginal_log_mean_coeff(t))

    def marginal_std(self, t) -> torch.Tensor:
        """sigma(t) = sqrt(1 - alpha^2) = sqrt(-expm1(2 log alpha)) (NoiseScheduleVP.marginal_std); float64."""
        return torch.sqrt(-torch.expm1(2.0 * self.marginal_log_mean_coeff(t)))

    def alpha_sigma(self, t) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha(t), sigma(t)), both float64."""
        log_alpha = self.marginal_log_mean_coeff(t)
        return torch.exp(log_alpha), torch.sqrt(-torch.expm1(2.0 * log_alpha))

    def marginal_lambda(self, t) -> torch.Tensor:
        """Half log-SNR lambda(t) = log alpha - log sigma (NoiseScheduleVP.marginal_lambda); float64."""
        log_alpha = self.marginal_log_mean_coeff(t)
        return log_alpha - 0.5 * torch.log(-torch.expm1(2.0 * log_alpha))

    def inverse_lambda(self, lam) -> torch.Tensor:
        """The t with lambda(t) = lam, closed form (NoiseScheduleVP.inverse_lambda, 'linear'); float64.

        log alpha = -0.5 log(1 + e^{-2 lam}) and 0.25 (b1 - b0) t^2 + 0.5 b0 t + log alpha = 0, so with
        L = logaddexp(-2 lam, 0): t = 2 (b1 - b0) L / (sqrt(b0^2 + 2 (b1 - b0) L) + b0) / (b1 - b0)
        (the positive root, rationalised so it stays accurate as L -> 0).
        """
        lam = _f64(lam)
        db = self.beta_max - self.beta_min
        tmp = 2.0 * db * torch.logaddexp(-2.0 * lam, torch.zeros_like(lam))
        return tmp / (torch.sqrt(self.beta_min**2 + tmp) + self.beta_min) / db

    # ---- SNR (DiMR sde.py VPSDE) ----

    def log_snr(self, t, clamp: bool = True) -> torch.Tensor:
        """ln SNR(t) = ln(alpha^2 / sigma^2) = -ln expm1(int_0^t beta); float64.

        clamp=True follows DiMR sde.py VPSDE.nsr / VPSDE.snr: nsr = expm1(int beta) clamped to [1e-12, 1e6],
        then snr = 1 / nsr clamped to [1e-12, 1e6], and ScoreModel.predict takes snr(t).log(). Composed, the
        SNR ends up in [1e-6, 1e6]; for t in [0, 1] only the upper bound acts (t below about 1e-5).
        """
        nsr = torch.expm1(self.beta_integral(t))
        if not clamp:
            return -torch.log(nsr)
        nsr = nsr.clamp(min=SNR_CLAMP_MIN, max=SNR_CLAMP_MAX)
        snr = (1.0 / nsr).clamp(min=SNR_CLAMP_MIN, max=SNR_CLAMP_MAX)
        return torch.log(snr)

    # ---- training ----

    def sample_time(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """t ~ U[0, 1) scaled to [0, T): (B,) float64 on the CPU.

        As U-ViT sde.py SDE.sample with t_init = 0: torch.rand(B) (float32, no floor), drawn from the given
        CPU generator; the float32 draws are exactly representable in float64.
        """
        t = torch.rand(int(batch), generator=generator, dtype=torch.float32).to(torch.float64)  # (B,)
        return t if self.T == 1.0 else t * self.T

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
        """x_t = alpha(t) x0 + sigma(t) eps per sample t (U-ViT sde.py SDE.marginal_prob / sample); x0's dtype."""
        if x0.shape != eps.shape:
            raise UserError(f"x0 and eps shapes differ: {tuple(x0.shape)} vs {tuple(eps.shape)}")
        t = _f64(t).to(x0.device).reshape(-1)  # (B,)
        if t.numel() != x0.shape[0]:
            raise UserError(f"need one time per sample: {t.numel()} times for a batch of {x0.shape[0]}")
        alpha, sigma = self.alpha_sigma(t)  # (B,)
        view = (-1,) + (1,) * (x0.dim() - 1)
        return alpha.to(x0.dtype).view(view) * x0 + sigma.to(x0.dtype).view(view) * eps  # (B, ...)

    add_noise_at = add_noise  # the training step's name for it (discrete schedules map t to steps first)


def build(spec) -> VPSchedule:
    """The schedule of a DiffusionSpec with schedule = 'vp_linear' (diffusion.beta_min, diffusion.beta_max)."""
    return VPSchedule(beta_min=spec.beta_min, beta_max=spec.beta_max)
