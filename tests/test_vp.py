"""dimr_lab.diffusion.vp (continuous linear VP SDE) and dpm_solver_fast (DPM-Solver v1, noise prediction)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dimr_lab.diffusion.dpm_solver_fast import dpm_solver_fast, fast_orders_and_grid
from dimr_lab.diffusion.time_input import vp_logsnr
from dimr_lab.diffusion.vp import VPSchedule
from dimr_lab.errors import UserError

VP = VPSchedule()
B0, B1 = 0.1, 20.0


def f64(*v):
    return torch.tensor(v, dtype=torch.float64)


# ---------------- VPSchedule ----------------


def test_alpha_squared_is_uvit_cum_alpha():
    t = f64(0.0, 1e-4, 1e-3, 0.1, 0.37, 0.5, 0.9, 1.0)
    cum_alpha = torch.exp(-(B0 * t + (B1 - B0) * t**2 / 2))  # U-ViT sde.py VPSDE.cum_alpha
    torch.testing.assert_close(VP.marginal_alpha(t) ** 2, cum_alpha, rtol=1e-13, atol=0)
    torch.testing.assert_close(VP.marginal_std(t) ** 2, 1 - cum_alpha, rtol=1e-12, atol=1e-300)
    a, s = VP.alpha_sigma(t)
    torch.testing.assert_close(a, VP.marginal_alpha(t), rtol=0, atol=0)
    torch.testing.assert_close(s, VP.marginal_std(t), rtol=0, atol=0)
    assert VP.marginal_alpha(t).dtype == torch.float64
    # expm1 keeps sigma accurate where 1 - alpha^2 would cancel: sigma^2 ~ 0.1 t for small t
    assert float(VP.marginal_std(f64(1e-12))) ** 2 == pytest.approx(1e-13, rel=1e-6)
    assert VP.name and VP.continuous is True and VP.num_steps is None


def test_lambda_values_and_inverse():
    assert float(VP.marginal_lambda(f64(1.0))) == pytest.approx(-5.025, abs=1e-4)
    assert float(VP.marginal_lambda(f64(1e-4))) == pytest.approx(5.7515, abs=1e-4)
    t = torch.cat([f64(1e-6, 1e-5, 1e-4), torch.linspace(1e-3, 1.0, 101, dtype=torch.float64)])
    lam = VP.marginal_lambda(t)
    assert bool((lam[1:] < lam[:-1]).all())  # decreasing in t
    torch.testing.assert_close(VP.inverse_lambda(lam), t, rtol=0, atol=1e-10)
    # lambda = 0.5 log SNR (unclamped)
    torch.testing.assert_close(2 * lam, VP.log_snr(t, clamp=False), rtol=1e-12, atol=1e-12)


def test_log_snr_clamp_bites_only_for_tiny_t():
    t = torch.linspace(1e-4, 1.0, 200, dtype=torch.float64)
    torch.testing.assert_close(VP.log_snr(t), VP.log_snr(t, clamp=False), rtol=1e-14, atol=1e-14)
    assert float(VP.log_snr(f64(1.0))) == pytest.approx(-10.05, abs=1e-3)
    assert float(VP.log_snr(f64(1e-4))) == pytest.approx(11.50, abs=1e-2)
    tiny = f64(0.0, 1e-7, 1e-6)
    torch.testing.assert_close(VP.log_snr(tiny), torch.full((3,), math.log(1e6), dtype=torch.float64))
    assert bool((VP.log_snr(tiny[1:], clamp=False) > math.log(1e6)).all())


def test_released_pixel_time_inputs():
    t = f64(1e-4, 0.5, 1.0, 1e-7)
    t_token, tau = vp_logsnr(VP, t)
    torch.testing.assert_close(1000 * t_token.double(), 999 * t, rtol=1e-6, atol=1e-6)  # U-ViT: nnet(x, 999 t)
    torch.testing.assert_close(tau.double(), VP.log_snr(t) / 4, rtol=1e-6, atol=1e-6)  # DiMR: log_snr / 4, clamped
    assert float(tau[0]) == pytest.approx(11.50 / 4, abs=3e-3)
    assert float(tau[1]) == pytest.approx(-2.46 / 4, abs=3e-3)


def test_vp_logsnr_tau_is_clamped_at_snr_1e_minus_6_like_the_schedule():
    # beta_max = 40 drives ln SNR(1) to -20.05; DiMR's clamps stop it at ln 1e-6, for tau too
    vp = VPSchedule(beta_min=0.1, beta_max=40.0)
    t = f64(1.0, 0.5)
    _, tau = vp_logsnr(vp, t)
    torch.testing.assert_close(tau.double(), vp.log_snr(t) / 4, rtol=1e-6, atol=1e-6)
    assert float(tau[0]) == pytest.approx(math.log(1e-6) / 4, rel=1e-6)


def test_sample_time_seeded_and_in_unit_interval():
    t1 = VP.sample_time(1000, torch.Generator().manual_seed(7))
    t2 = VP.sample_time(1000, torch.Generator().manual_seed(7))
    assert t1.shape == (1000,) and t1.dtype == torch.float64
    assert torch.equal(t1, t2)
    assert float(t1.min()) >= 0.0 and float(t1.max()) < 1.0
    # the same draws as U-ViT's torch.rand(B) (t_init = 0, no floor)
    ref = torch.rand(1000, generator=torch.Generator().manual_seed(7))
    assert torch.equal(t1, ref.double())
    assert not torch.equal(t1, VP.sample_time(1000, torch.Generator().manual_seed(8)))


def test_add_noise_unit_variance_and_dtype():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4096, 3, 4, 4, generator=g)
    eps = torch.randn(4096, 3, 4, 4, generator=g)
    t = VP.sample_time(4096, g)
    xt = VP.add_noise(x0, eps, t)
    assert xt.dtype == torch.float32 and xt.shape == x0.shape
    assert float(xt.var()) == pytest.approx(1.0, abs=0.03)
    assert abs(float(xt.mean())) < 0.03
    # per-sample coefficients
    a, s = VP.alpha_sigma(t[:2])
    torch.testing.assert_close(xt[1], (a[1] * x0[1].double() + s[1] * eps[1].double()).float())
    with pytest.raises(UserError):
        VP.add_noise(x0, eps, t[:3])


def test_beta_is_linear_and_the_derivative_of_its_integral():
    torch.testing.assert_close(VP.beta(f64(0.0, 0.5, 1.0)), f64(B0, (B0 + B1) / 2, B1), rtol=1e-14, atol=0)
    t, h = f64(0.1, 0.4, 0.8), 1e-6
    deriv = (VP.beta_integral(t + h) - VP.beta_integral(t - h)) / (2 * h)
    torch.testing.assert_close(deriv, VP.beta(t), rtol=1e-8, atol=0)


def test_log_snr_clamps_below_at_1e_minus_6_when_the_integral_is_large():
    # beta_max = 40: int_0^1 beta = 20.05, nsr = e^20.05 - 1 > 1e6 is clamped to 1e6, so snr = 1e-6 (DiMR sde.py)
    vp = VPSchedule(beta_min=0.1, beta_max=40.0)
    assert float(vp.log_snr(f64(1.0))) == pytest.approx(math.log(1e-6), rel=1e-12)
    assert float(vp.log_snr(f64(1.0), clamp=False)) == pytest.approx(-math.log(math.expm1(20.05)), rel=1e-12)


def test_sample_time_scales_to_T():
    t = VPSchedule(T=2.0).sample_time(2000, torch.Generator().manual_seed(3))
    ref = torch.rand(2000, generator=torch.Generator().manual_seed(3)).double()
    torch.testing.assert_close(t, 2.0 * ref, rtol=0, atol=0)


def test_build_reads_beta_min_and_beta_max_from_the_spec():
    from dimr_lab.diffusion.schedule import build_schedule
    from dimr_lab.spec.run_spec import DiffusionSpec

    vp = build_schedule(DiffusionSpec(schedule="vp_linear", beta_min=0.05, beta_max=10.0))
    assert (vp.beta_min, vp.beta_max) == (0.05, 10.0)
    t = f64(0.3, 1.0)
    torch.testing.assert_close(vp.marginal_alpha(t) ** 2, torch.exp(-(0.05 * t + 9.95 * t**2 / 2)), rtol=1e-13, atol=0)


@pytest.mark.parametrize("args", [(0.0, 20.0), (20.0, 20.0), (5.0, 1.0), (0.1, 20.0, 0.0)])
def test_vp_schedule_rejects_bad_betas(args):
    with pytest.raises(UserError):
        VPSchedule(*args)


# ---------------- DPM-Solver-fast ----------------


def test_orders_and_grid():
    orders, times = fast_orders_and_grid(VP, 50, 3, 1.0, 1e-4)
    assert orders == [3] * 16 + [2] and len(times) == 18
    assert fast_orders_and_grid(VP, 12, 3, 1.0, 1e-4)[0] == [3, 3, 3, 2, 1]
    assert fast_orders_and_grid(VP, 10, 3, 1.0, 1e-4)[0] == [3, 3, 3, 1]
    assert fast_orders_and_grid(VP, 11, 3, 1.0, 1e-4)[0] == [3, 3, 3, 2]
    assert fast_orders_and_grid(VP, 11, 2, 1.0, 1e-4)[0] == [2] * 5 + [1]
    assert fast_orders_and_grid(VP, 10, 2, 1.0, 1e-4)[0] == [2] * 5
    assert times[0] == 1.0 and times[-1] == 1e-4
    lam = VP.marginal_lambda(torch.tensor(times, dtype=torch.float64))
    d = lam[1:] - lam[:-1]
    torch.testing.assert_close(d, torch.full_like(d, (5.7515 + 5.025) / 17), rtol=0, atol=1e-4)
    torch.testing.assert_close(d, d.mean().expand_as(d), rtol=0, atol=1e-10)
    with pytest.raises(UserError):
        fast_orders_and_grid(VP, 0, 3, 1.0, 1e-4)


@pytest.mark.parametrize("steps", [10, 11, 12, 50])
def test_nfe_equals_steps(steps):
    calls = []

    def eps_fn(x, t):
        assert t.shape == (x.shape[0],) and t.dtype == torch.float64
        calls.append(t)
        return 0.1 * x

    x = torch.randn(2, 3, 4, 4)
    out = dpm_solver_fast(eps_fn, x, VP, steps=steps)
    assert len(calls) == steps
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert float(calls[0][0]) == 1.0


MU = torch.tensor([0.7, -1.2, 0.3], dtype=torch.float64).view(1, 3, 1, 1)
S0 = 0.5


def gauss_eps(x, t):
    """Exact eps for x0 ~ N(MU, S0^2 I): sigma (x - alpha mu) / (alpha^2 S0^2 + sigma^2)."""
    a, s = VP.alpha_sigma(t)
    a, s = a.view(-1, 1, 1, 1), s.view(-1, 1, 1, 1)
    return s * (x - a * MU) / (a**2 * S0**2 + s**2)


def gauss_exact(x_T, t_start, t_end):
    """The probability-flow ODE preserves (x - alpha mu) / sqrt(alpha^2 S0^2 + sigma^2)."""
    (a1, s1), (a0, s0) = VP.alpha_sigma(f64(t_start)), VP.alpha_sigma(f64(t_end))
    z = (x_T - a1 * MU) / torch.sqrt(a1**2 * S0**2 + s1**2)
    return a0 * MU + torch.sqrt(a0**2 * S0**2 + s0**2) * z


def test_accuracy_on_gaussian_data():
    x_T = torch.randn(8, 3, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    exact = gauss_exact(x_T, 1.0, 1e-4)
    errs = []
    for steps in (12, 24, 48):
        out = dpm_solver_fast(gauss_eps, x_T, VP, steps=steps, t_end=1e-4)
        errs.append(float((out - exact).abs().max()))
    assert errs[0] > errs[1] > errs[2], errs
    assert errs[1] / errs[2] > 5, errs  # third order: about 2^3 per halving of the step
    assert errs[2] < 2e-3, errs
    # order 2 converges too
    e2 = [float((dpm_solver_fast(gauss_eps, x_T, VP, steps=n, order=2) - exact).abs().max()) for n in (12, 48)]
    assert e2[1] < e2[0], e2


def test_order_2_converges_at_second_order():
    # DPM-Solver-2 error falls about 4x per halving of the step (measured 4.3, 4.3); a first-order slip gives ~2x
    x_T = torch.randn(8, 3, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    exact = gauss_exact(x_T, 1.0, 1e-4)
    e = [float((dpm_solver_fast(gauss_eps, x_T, VP, steps=n, order=2) - exact).abs().max()) for n in (12, 24, 48)]
    assert 3.0 < e[0] / e[1] < 6.0 and 3.0 < e[1] / e[2] < 6.0, e


def test_registered_sampler_passes_the_order_and_t_end_through():
    from dimr_lab.diffusion.dpm_solver_fast import sampler

    x_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for order in (1, 2, 3):
        ref = dpm_solver_fast(gauss_eps, x_T, VP, steps=10, order=order, t_end=1e-3)
        assert torch.equal(sampler(gauss_eps, x_T, VP, steps=10, order=order, t_end=1e-3), ref)
    assert not torch.allclose(sampler(gauss_eps, x_T, VP, steps=10, order=2), sampler(gauss_eps, x_T, VP, steps=10, order=3))


def test_grid_rejects_t_end_not_below_t_start():
    with pytest.raises(UserError):
        fast_orders_and_grid(VP, 10, 3, 1e-4, 1.0)
    with pytest.raises(UserError):
        fast_orders_and_grid(VP, 10, 3, 0.5, 0.5)


# ---------------- equivalence with the released U-ViT solver ----------------


def _load_uvit_solver(tmp_path):
    from conftest import released_module

    return released_module("DIMR_UVIT_SRC", "dpm_solver_pytorch.py", "U-ViT's released solver", "baofff/U-ViT")


def _random_eps_model():
    g = torch.Generator().manual_seed(3)
    w = 0.4 * torch.randn(3, 3, 3, 3, generator=g, dtype=torch.float64)
    b = torch.randn(1, 3, 1, 1, generator=g, dtype=torch.float64)

    def eps(x, t):
        tt = t.view(-1, 1, 1, 1)
        return torch.tanh(F.conv2d(x, w, padding=1) * (0.5 + tt) + b * torch.cos(3 * tt)) + 0.3 * x * tt

    return eps


@pytest.mark.parametrize("steps", [50, 20])
def test_matches_released_uvit_solver(tmp_path, steps):
    uvit = _load_uvit_solver(tmp_path)
    eps = _random_eps_model()
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)

    theirs_t, ours_t = [], []

    def their_model(x, t_input):  # called through model_wrapper(time_input_type='0'): t_input = t_continuous
        theirs_t.append(t_input.clone())
        return eps(x, t_input)

    def our_eps(x, t):
        ours_t.append(t.clone())
        return eps(x, t)

    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # the released code builds its grid in the default dtype
    try:
        ns = uvit.NoiseScheduleVP(schedule="linear")
        model_fn = uvit.model_wrapper(their_model, ns, time_input_type="0", model_kwargs={})
        ref = uvit.DPM_Solver(model_fn, ns).sample(
            x_T.clone(), steps=steps, eps=1e-4, adaptive_step_size=False, fast_version=True
        )
        # the schedule formulas agree too
        t = torch.linspace(1e-4, 1.0, 50)
        torch.testing.assert_close(VP.marginal_lambda(t), ns.marginal_lambda(t), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(VP.inverse_lambda(ns.marginal_lambda(t)), ns.inverse_lambda(ns.marginal_lambda(t)))
    finally:
        torch.set_default_dtype(old)
    out = dpm_solver_fast(our_eps, x_T, VP, steps=steps, t_end=1e-4)

    assert len(theirs_t) == len(ours_t) == steps
    torch.testing.assert_close(torch.stack(ours_t), torch.stack(theirs_t), rtol=1e-12, atol=1e-12)
    assert out.dtype == ref.dtype == torch.float64
    rel = float((out - ref).norm() / ref.norm())
    assert rel < 1e-9, rel
