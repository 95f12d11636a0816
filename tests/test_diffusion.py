"""dimr_lab.diffusion: schedules, multi-scale loss, guidance and samplers on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dimr_lab.diffusion import (
    build_schedule,
    ddim_steps,
    default_loss_weights,
    diffusion_loss,
    guidance_scale_at,
    guided_eps_fn,
    multiscale_targets,
    power_cosine_ramp,
    sample,
    time_grid,
    draw,
    model_inputs,
)
from dimr_lab.errors import UserError

N = 1000
SCHED = build_schedule("scaled_linear", N)

# ---- fixed small models ----

MUS = torch.tensor([0.7, -1.2, 0.0, 0.3], dtype=torch.float64)  # class means; index 3 is the null label
STD0 = 0.5


def gauss_model(schedule=SCHED):
    """Exact eps for data x0 ~ N(mu_y, STD0^2 I): eps = sigma (x - alpha mu) / (alpha^2 STD0^2 + sigma^2)."""

    def fn(x, t, y):
        a = schedule.marginal_alpha(t.double()).view(-1, 1, 1, 1)
        s = schedule.marginal_std(t.double()).view(-1, 1, 1, 1)
        mu = MUS[y].view(-1, 1, 1, 1)
        eps = s * (x - a * mu) / (a * a * STD0**2 + s * s)
        return [F.avg_pool2d(eps, 2), eps]  # branch list, lowest resolution first

    return fn


def gauss_exact(x_T, y, t_end, schedule=SCHED):
    """Probability-flow ODE solution for Gaussian data: the standardised coordinate is preserved."""
    mu = MUS[y].view(-1, 1, 1, 1)
    a1, s1 = (float(f(torch.tensor(1.0))) for f in (schedule.marginal_alpha, schedule.marginal_std))
    ae, se = (float(f(torch.tensor(t_end))) for f in (schedule.marginal_alpha, schedule.marginal_std))
    z = (x_T - a1 * mu) / math.sqrt(a1 * a1 * STD0**2 + s1 * s1)
    return ae * mu + math.sqrt(ae * ae * STD0**2 + se * se) * z


class ConvModel:
    """A fixed random nonlinear conv net around the N(0, I)-data denoiser eps = sigma x; counts calls."""

    def __init__(self, schedule=SCHED, C=2, seed=1):
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(C, C, 3, 3, generator=g, dtype=torch.float64) * 0.3
        self.emb = torch.randn(4, C, generator=g, dtype=torch.float64) * 0.5
        self.schedule, self.batches = schedule, []

    def __call__(self, x, t, y):
        self.batches.append(x.shape[0])
        s = self.schedule.marginal_std(t.double()).to(x.dtype).view(-1, 1, 1, 1)
        tt = t.to(x.dtype).view(-1, 1, 1, 1)
        eps = s * x + 0.3 * torch.tanh(F.conv2d(x, self.w.to(x.dtype), padding=1)) * tt
        eps = eps + 0.2 * self.emb.to(x.dtype)[y].view(x.shape[0], -1, 1, 1) * tt
        return [F.avg_pool2d(eps, 2), eps]


def _xT(B=4, dtype=torch.float64, seed=0):
    """A seeded x_T (B, 2, 4, 4) and labels."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 2, 4, 4, generator=g, dtype=dtype), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1][:B])


# ---- schedule ----


def test_scaled_linear_betas_endpoints_and_monotone():
    b = SCHED.betas
    assert b.numel() == N and b.dtype == torch.float64
    assert float(b[0]) == pytest.approx(0.00085, rel=1e-12) and float(b[-1]) == pytest.approx(0.012, rel=1e-12)
    assert bool((b[1:] > b[:-1]).all())
    # squares of a linspace: sqrt(beta) is evenly spaced
    d = b.sqrt().diff()
    assert torch.allclose(d, d.mean().expand_as(d), rtol=1e-9, atol=0)
    ab = SCHED.alphas_cumprod
    assert bool((ab[1:] < ab[:-1]).all()) and float(ab[-1]) == pytest.approx(0.0046601, rel=1e-4)
    assert build_schedule("scaled_linear", 10).betas.numel() == 10


def test_cosine_schedule():
    sch = build_schedule("cosine", 100)
    b = sch.betas
    assert bool((b > 0).all()) and float(b.max()) == pytest.approx(0.999)  # last beta is clipped
    s = 0.008
    f = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    assert float(sch.alphas_cumprod[49]) == pytest.approx(f(0.5) / f(0.0), rel=1e-9)
    assert bool((sch.alphas_cumprod.diff() < 0).all())


def test_build_schedule_errors():
    with pytest.raises(UserError, match="scaled_linear"):
        build_schedule("scaled_lin", 1000)
    with pytest.raises(UserError):
        build_schedule("cosine", 1)


def test_noise_schedule_rejects_betas_outside_the_open_unit_interval_and_non_integer_steps():
    from dimr_lab.diffusion.schedule import NoiseSchedule

    for betas in ([0.0, 0.1], [0.5, 1.0], [0.1, -0.2]):
        with pytest.raises(UserError, match="betas"):
            NoiseSchedule(torch.tensor(betas))
    x0 = torch.zeros(2, 1, 2, 2)
    with pytest.raises(UserError, match="integers"):
        SCHED.add_noise(x0, x0, torch.tensor([1.5, 2.0]))  # a float step would be truncated silently


def test_add_noise_formula_and_variance():
    x0 = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    eps = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    n = torch.tensor([1, 500, N])
    xt = SCHED.add_noise(x0, eps, n)
    for i, k in enumerate(n.tolist()):
        ab = float(SCHED.alphas_cumprod[k - 1])  # step n uses alphas_cumprod[n - 1]
        assert torch.allclose(xt[i], math.sqrt(ab) * x0[i] + math.sqrt(1 - ab) * eps[i])
    # unit-variance data stays unit variance at every step
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(4000, 1, 2, 2, generator=g)
    eps = torch.randn(4000, 1, 2, 2, generator=g)
    n = torch.randint(1, N + 1, (4000,), generator=g)
    assert float(SCHED.add_noise(x0, eps, n).var()) == pytest.approx(1.0, abs=0.05)
    assert float(SCHED.add_noise(torch.zeros_like(x0), eps, torch.full((4000,), N)).std()) == pytest.approx(
        math.sqrt(1 - float(SCHED.alphas_cumprod[-1])), rel=0.05
    )
    for bad in (torch.tensor([0, 1, 2]), torch.tensor([1, 2, N + 1]), torch.tensor([0.5, 1.0, 2.0])):
        with pytest.raises(UserError):
            SCHED.add_noise(x0[:3], eps[:3], bad)


def test_model_time_and_continuous_schedule_match_grid():
    n = torch.arange(1, N + 1)
    t = SCHED.model_time(n)
    assert t.dtype == torch.float32 and torch.allclose(t, n.float() / N)
    tk = n.double() / N  # continuous time at the knots
    assert torch.allclose(SCHED.marginal_alpha(tk) ** 2, SCHED.alphas_cumprod, rtol=1e-12, atol=0)
    assert torch.allclose(SCHED.marginal_std(tk) ** 2, 1 - SCHED.alphas_cumprod, rtol=1e-10, atol=0)
    lam = SCHED.marginal_lambda(tk)
    assert torch.allclose(lam, 0.5 * torch.log(SCHED.alphas_cumprod / (1 - SCHED.alphas_cumprod)), atol=1e-10)
    assert bool((lam.diff() < 0).all())
    # the network sees t = n / N at the knots, exactly what training uses for step n
    from dimr_lab.diffusion.time_input import discrete

    t_net, tau = discrete(SCHED, tk)
    assert torch.equal(t_net, t) and tau is None
    # between knots: linear in t for log alpha, and inverse_lambda inverts marginal_lambda
    tm = (tk[:-1] + tk[1:]) / 2
    la = SCHED.marginal_log_mean_coeff(tm)
    assert torch.allclose(la, 0.25 * torch.log(SCHED.alphas_cumprod[:-1] * SCHED.alphas_cumprod[1:]), atol=1e-12)
    tr = torch.linspace(1e-3, 1.0, 37, dtype=torch.float64)
    assert torch.allclose(SCHED.inverse_lambda(SCHED.marginal_lambda(tr)), tr, atol=1e-9)


@pytest.mark.parametrize("num_steps", [49, 1000])
def test_steps_of_recovers_every_step_from_its_time(num_steps):
    # t = n / N in float64 is not always exactly n / N (1 / 49 * 49 < 1): the step must be rounded, not truncated
    from dimr_lab.diffusion.schedule import NoiseSchedule

    sched = NoiseSchedule(torch.linspace(1e-4, 2e-2, num_steps, dtype=torch.float64))
    n = torch.arange(1, num_steps + 1)
    assert torch.equal(sched.steps_of(n.double() / num_steps), n)


# ---- loss ----


@pytest.mark.parametrize("f", [2, 4])
def test_multiscale_targets_unit_variance(f):
    g = torch.Generator().manual_seed(f)
    eps = torch.randn(64, 2, 32, 32, generator=g)
    low, full = multiscale_targets(eps, [32 // f, 32])  # lowest resolution first
    assert full is eps
    assert low.shape == (64, 2, 32 // f, 32 // f)
    assert float(low.var()) == pytest.approx(1.0, abs=0.1)
    # f x f block sum / f (the released 2x2 sum / 2 for f = 2)
    blocks = eps.reshape(64, 2, 32 // f, f, 32 // f, f).sum(dim=(3, 5)) / f
    assert torch.allclose(low, blocks, atol=1e-5)
    with pytest.raises(UserError):
        multiscale_targets(eps, [5])


def test_loss_hand_computation():
    eps = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])  # (1, 1, 2, 2)
    outs = [torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 2, 2)]
    total, per = diffusion_loss(outs, eps, [0.25, 1.0])
    # low target = mean(1..4) * 2 = 5 -> MSE 25; full MSE = (1 + 4 + 9 + 16) / 4 = 7.5
    assert [float(p) for p in per] == pytest.approx([25.0, 7.5])
    assert float(total) == pytest.approx(0.25 * 25.0 + 7.5)
    total1, per1 = diffusion_loss(outs[1], eps, [1.0])
    assert float(total1) == pytest.approx(7.5) and len(per1) == 1
    # zero weight: the branch is reported, keeps a (zero) gradient, but adds nothing
    o = [torch.zeros(1, 1, 1, 1, requires_grad=True), torch.zeros(1, 1, 2, 2, requires_grad=True)]
    total0, _ = diffusion_loss(o, eps, [0.0, 1.0])
    total0.backward()
    assert float(total0.detach()) == pytest.approx(7.5) and o[0].grad is not None and float(o[0].grad.abs().sum()) == 0
    with pytest.raises(UserError):
        diffusion_loss(outs, eps, [1.0])


def test_default_loss_weights():
    assert default_loss_weights(2) == [0.25, 1.0]
    assert default_loss_weights(3) == [1 / 16, 0.25, 1.0]
    assert default_loss_weights(1) == [1.0]
    assert default_loss_weights(3, multiscale=False) == [0.0, 0.0, 1.0]


def test_loss_weights_of_a_spec_keep_only_the_last_custom_weight_without_multiscale():
    from dimr_lab.diffusion.training import loss_weights
    from dimr_lab.spec.run_spec import DiffusionSpec

    assert loss_weights(DiffusionSpec(loss_weights=[0.5, 2.0]), 2) == [0.5, 2.0]
    assert loss_weights(DiffusionSpec(loss_weights=[0.5, 2.0], multiscale_loss=False), 2) == [0.0, 2.0]
    assert loss_weights(DiffusionSpec(multiscale_loss=False), 3) == [0.0, 0.0, 1.0]
    with pytest.raises(UserError):
        loss_weights(DiffusionSpec(loss_weights=[0.5, 2.0]), 3)


def test_training_draws_come_from_the_generator_in_the_documented_order():
    # time, noise, label drop, flips from one CPU generator: a checkpointed generator state replays them
    d = draw(SCHED, 6, (1, 2, 2), label_drop=0.3, flip=True, generator=torch.Generator().manual_seed(9))
    g = torch.Generator().manual_seed(9)
    n = torch.randint(1, N + 1, (6,), generator=g)
    eps = torch.randn(6, 1, 2, 2, generator=g)
    drop = torch.rand(6, generator=g) < 0.3
    flip = torch.rand(6, generator=g) < 0.5
    assert torch.equal(d.t, n.double() / N) and torch.equal(d.eps, eps)
    assert torch.equal(d.drop, drop) and torch.equal(d.flip, flip)
    # the noise is untruncated N(0, 1): tails beyond 3.5 sd turn up in 80000 draws (about 37 expected)
    big = draw(SCHED, 20000, (1, 2, 2), label_drop=0.0, flip=False, generator=torch.Generator().manual_seed(2)).eps
    assert float(big.abs().max()) > 3.5


def test_training_flips_are_horizontal_and_half_the_batch():
    g = torch.Generator().manual_seed(0)
    x0 = torch.arange(2 * 1 * 2 * 3, dtype=torch.float32).view(2, 1, 2, 3)  # distinct values, H != W
    d = draw(SCHED, 2, (1, 2, 3), label_drop=0.0, flip=False, generator=g)
    d.flip[:] = torch.tensor([True, False])
    x_t, _, _, _, eps = model_inputs(SCHED, "discrete", x0, None, d, null_label=10)
    x0_seen = torch.stack([x0[0].flip(-1), x0[1]])  # sample 0 mirrored left-right (width axis), sample 1 as is
    assert torch.allclose(x_t, SCHED.add_noise_at(x0_seen, eps, d.t))
    flips = draw(SCHED, 20000, (1, 1, 1), label_drop=0.0, flip=True, generator=torch.Generator().manual_seed(1)).flip
    assert float(flips.float().mean()) == pytest.approx(0.5, abs=0.015)  # sd of the mean 0.0035


def test_training_draws_dropout_rate_range_and_determinism():
    x0 = torch.randn(20000, 1, 2, 2)
    y = torch.randint(0, 10, (20000,))

    def inputs(seed, yy=y, drop=0.1, n=20000):
        d = draw(SCHED, n, (1, 2, 2), label_drop=drop, flip=False, generator=torch.Generator().manual_seed(seed))
        return d, model_inputs(SCHED, "discrete", x0[:n], None if yy is None else yy[:n], d, null_label=10)

    d, (x_t, t, tau, yd, eps) = inputs(0)
    dropped = yd == 10
    assert float(dropped.float().mean()) == pytest.approx(0.1, abs=0.01)
    assert torch.equal(yd[~dropped], y[~dropped])
    n = SCHED.steps_of(d.t)
    assert int(n.min()) == 1 and int(n.max()) == N and tau is None
    assert torch.allclose(t, n.float() / N) and torch.allclose(x_t, SCHED.add_noise(x0, eps, n))
    assert float(eps.std()) == pytest.approx(1.0, abs=0.02)
    again = inputs(0)[1]
    assert all(torch.equal(a, b) for a, b in zip((x_t, t, yd, eps), (again[0], again[1], again[3], again[4])))
    assert not torch.equal(inputs(1)[1][4], eps)
    assert bool((inputs(0, drop=0.0, n=50)[1][3] == y[:50]).all())
    assert bool((inputs(0, drop=1.0, n=50)[1][3] == 10).all())
    assert inputs(0, yy=None, n=4)[1][3] is None
    with pytest.raises(UserError):
        inputs(0, drop=1.5, n=4)
    # a slice of the global batch is that process's share of the same numbers
    assert torch.equal(d.slice(4, 8).eps, d.eps[4:8]) and torch.equal(d.slice(4, 8).t, d.t[4:8])


# ---- guidance ----


def test_guidance_identities_and_batching():
    x, y = _xT()
    t = torch.full((4,), 0.3)
    m = ConvModel()
    cond = m(x, t, y)[-1]
    m.batches.clear()
    for form, s in (("uvit", 0.0), ("dit", 1.0)):
        for sched in ("constant", "power_cosine"):
            out = guided_eps_fn(m, y, scale=s, form=form, schedule=sched, null_label=3)(x, t)
            assert torch.equal(out, cond)
    assert m.batches == [4] * 4  # no unconditional pass when guidance is off
    uncond = m(x, t, torch.full_like(y, 3))[-1]
    m.batches.clear()
    g_uvit = guided_eps_fn(m, y, scale=0.4, form="uvit", null_label=3)(x, t)
    assert m.batches == [8]  # conditional and unconditional in one forward
    assert torch.allclose(g_uvit, cond + 0.4 * (cond - uncond))
    g_dit = guided_eps_fn(m, y, scale=1.4, form="dit", null_label=3)(x, t)
    assert torch.allclose(g_dit, g_uvit, atol=1e-12)  # s_dit = 1 + s_uvit
    with pytest.raises(UserError):
        guided_eps_fn(m, scale=0.4, form="uvit")  # no null label
    with pytest.raises(UserError):
        guided_eps_fn(m, scale=0.4, form="cfg", null_label=3)


def test_guidance_rejects_missing_labels_and_non_positive_power():
    m = ConvModel()
    with pytest.raises(UserError, match="labels"):
        guided_eps_fn(m, None, scale=0.4, form="uvit", null_label=3)
    for power in (0.0, -1.0):
        with pytest.raises(UserError, match="power"):
            guided_eps_fn(m, torch.tensor([0]), scale=0.4, schedule="power_cosine", power=power, null_label=3)


def test_power_cosine_ramp_clamps_time_to_the_unit_interval():
    # (1 - t)^p for t slightly past 1 (a rounded grid end) would be NaN for fractional p: t is clamped first
    t = torch.tensor([1.0 + 1e-6, 1.5, -0.5], dtype=torch.float64)
    torch.testing.assert_close(power_cosine_ramp(t, 0.5), torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))


def test_power_cosine_schedule():
    t = torch.tensor([1.0, 0.5, 0.0])
    assert power_cosine_ramp(t, 1.0).tolist() == pytest.approx([0.0, 0.5, 1.0], abs=1e-7)
    assert float(power_cosine_ramp(torch.tensor(0.5), 2.0)) == pytest.approx((1 - math.cos(math.pi / 4)) / 2)
    u = guidance_scale_at(t, 0.4, form="uvit", schedule="power_cosine", power=1.0)
    assert u.tolist() == pytest.approx([0.0, 0.2, 0.4], abs=1e-7)  # 0 (conditional) at noise, s at data
    d = guidance_scale_at(t, 1.4, form="dit", schedule="power_cosine", power=1.0)
    assert d.tolist() == pytest.approx([1.0, 1.2, 1.4], abs=1e-7)  # released: 1 at noise, s at data
    assert guidance_scale_at(t, 0.4, form="uvit").tolist() == pytest.approx([0.4] * 3)
    # the guided eps uses the per-sample scheduled scale
    x, y = _xT()
    tt = torch.tensor([1.0, 0.75, 0.5, 0.0])
    m = ConvModel()
    c, u_ = m(x, tt, y)[-1], m(x, tt, torch.full_like(y, 3))[-1]
    out = guided_eps_fn(m, y, scale=0.4, schedule="power_cosine", power=2.0, null_label=3)(x, tt)
    s = (0.4 * (1 - torch.cos(math.pi * (1 - tt.double()) ** 2)) / 2).view(-1, 1, 1, 1)
    assert torch.allclose(out, c + s * (c - u_), atol=1e-6)


# ---- samplers ----


def test_dpm_solver_pp_order1_equals_ddim_on_same_grid():
    x, y = _xT()
    assert ddim_steps(SCHED, 9) == [1000, 889, 778, 667, 556, 445, 334, 223, 112, 1]
    assert time_grid(SCHED, 9) == pytest.approx([n / N for n in ddim_steps(SCHED, 9)], abs=1e-12)
    m = ConvModel()
    ref = sample(m, x, y, sampler="ddim", steps=9, schedule=SCHED)
    for s in ("dpm_solver++", "dpm_solver++_fast"):
        out = sample(m, x, y, sampler=s, steps=9, order=1, schedule=SCHED)
        assert torch.allclose(out, ref, atol=1e-10, rtol=0)
    assert m.batches == [4] * 27  # one model call per step


def test_samplers_match_gaussian_closed_form_time_uniform():
    x, y = _xT()
    model = gauss_model()
    exact = gauss_exact(x, y, 1e-3)
    ddim = sample(model, x, y, sampler="ddim", steps=999, schedule=SCHED)
    o1 = sample(model, x, y, sampler="dpm_solver++", steps=200, order=1, schedule=SCHED)
    o2 = sample(model, x, y, sampler="dpm_solver++", steps=200, order=2, schedule=SCHED)
    o3 = sample(model, x, y, sampler="dpm_solver++", steps=200, order=3, schedule=SCHED)
    f3 = sample(model, x, y, sampler="dpm_solver++_fast", steps=200, order=3, schedule=SCHED)
    err = lambda a: float((a - exact).abs().max())  # noqa: E731
    # measured: ddim 4.2e-3, o1 2.1e-2, o2 8.3e-3, o3 2.2e-3, fast-3 1.6e-3
    assert err(ddim) < 6e-3 and err(o2) < 1.2e-2 and err(o3) < 3.5e-3 and err(f3) < 2.5e-3
    assert err(o3) < err(o2) < err(o1)
    for out in (o2, o3, f3):
        assert float((out - ddim).abs().max()) < 1.5e-2  # high-step DPM-Solver++ agrees with DDIM-999


def test_samplers_match_gaussian_closed_form_logsnr():
    x, y = _xT()
    model = gauss_model()
    exact = gauss_exact(x, y, 1e-3)
    err = {}
    for name, order in (("dpm_solver++", 1), ("dpm_solver++", 2), ("dpm_solver++", 3), ("dpm_solver++_fast", 3)):
        out = sample(model, x, y, sampler=name, steps=100, order=order, schedule=SCHED, skip_type="logSNR")
        err[name, order] = float((out - exact).abs().max())
    # measured: 2.4e-2, 3.6e-4, 1.2e-4, 1.0e-6
    assert err["dpm_solver++", 2] < 6e-4 and err["dpm_solver++", 3] < 2e-4 and err["dpm_solver++_fast", 3] < 1e-5
    assert err["dpm_solver++", 1] > 1e-2


def test_high_step_dpm_solver_pp_agrees_with_ddim_on_conv_net():
    x, y = _xT()
    m = ConvModel()
    ref = sample(m, x, y, sampler="ddim", steps=999, schedule=SCHED)
    for order in (2, 3):
        out = sample(m, x, y, sampler="dpm_solver++", steps=200, order=order, schedule=SCHED)
        assert float((out - ref).abs().max()) < 5e-3 * max(1.0, float(ref.abs().max()))
    coarse = sample(m, x, y, sampler="dpm_solver++", steps=4, order=3, schedule=SCHED)
    assert float((coarse - ref).abs().max()) > 1e-3  # the check can fail


def test_lower_order_warmup_and_final_steps():
    # 3 steps, order 3: orders 1, 2 (warm-up) then min(3, steps + 1 - i) = 1 at the last step
    x, y = _xT()
    m = ConvModel()
    a = sample(m, x, y, sampler="dpm_solver++", steps=3, order=3, schedule=SCHED)
    b = sample(m, x, y, sampler="dpm_solver++", steps=3, order=2, schedule=SCHED)
    assert torch.allclose(a, b, atol=1e-12)  # order 2 also gives 1, 2, 1
    c = sample(m, x, y, sampler="dpm_solver++", steps=3, order=3, schedule=SCHED, lower_order_final=False)
    assert not torch.allclose(a, c)  # without lowering, the last step is order 3


def test_lower_order_final_acts_below_ten_steps_only():
    # official DPM-Solver multistep: lower_order_final lowers the last orders only when steps < 10
    x, y = _xT()
    m = ConvModel()
    run = lambda steps, lof: sample(m, x, y, sampler="dpm_solver++", steps=steps, order=3, schedule=SCHED,  # noqa: E731
                                    lower_order_final=lof)
    assert not torch.allclose(run(7, True), run(7, False), atol=1e-12, rtol=0)
    assert torch.equal(run(10, True), run(10, False))


@pytest.mark.parametrize("steps, orders", [(9, [3, 3, 2, 1]), (10, [3, 3, 3, 1]), (11, [3, 3, 3, 2]), (7, [2, 2, 2, 1])])
def test_fast_singlestep_orders(steps, orders):
    # DPM-Solver get_orders_and_timesteps_for_singlestep_solver: steps % 3 == 0 ends with 2 then 1
    from dimr_lab.diffusion.samplers import _fast_orders

    order = 2 if steps == 7 else 3
    assert _fast_orders(steps, order) == orders and sum(orders) == steps


@pytest.mark.parametrize("skip_type", ["time_uniform", "logSNR"])
def test_time_grid_starts_at_one_and_ends_at_t_end_exactly(skip_type):
    for sched in (SCHED, build_schedule("cosine", 100)):
        ts = time_grid(sched, 13, 2e-3, skip_type)
        assert len(ts) == 14 and ts[0] == 1.0 and ts[-1] == 2e-3
        assert all(a > b for a, b in zip(ts, ts[1:]))


@pytest.mark.parametrize("t_end", [0.0, 1.0, -0.1])
def test_sample_rejects_t_end_outside_the_open_unit_interval(t_end):
    x, y = _xT()
    with pytest.raises(UserError, match="t_end"):
        sample(ConvModel(), x, y, steps=5, schedule=SCHED, t_end=t_end)


@pytest.mark.parametrize("schedule_name", ["scaled_linear", "cosine"])
@pytest.mark.parametrize(
    "sampler,order",
    [("dpm_solver++", 1), ("dpm_solver++", 2), ("dpm_solver++", 3), ("dpm_solver++_fast", 3), ("ddim", 1)],
)
def test_every_sampler_and_schedule_runs_finite_and_deterministic(schedule_name, sampler, order):
    sch = build_schedule(schedule_name, 100)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 2, 4, 4, generator=g)  # float32
    y = torch.tensor([0, 2])
    kw = dict(sampler=sampler, steps=7, order=order, schedule=sch, t_end=1e-2, guidance_scale=0.4,
              guidance_schedule="power_cosine", null_label=3)
    out = sample(ConvModel(sch), x, y, **kw)
    assert out.shape == x.shape and out.dtype == torch.float32 and bool(torch.isfinite(out).all())
    x2 = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(5))
    assert torch.equal(sample(ConvModel(sch), x2, y, **kw), out)
    if sampler != "ddim":
        out_l = sample(ConvModel(sch), x, y, **{**kw, "skip_type": "logSNR"})
        assert bool(torch.isfinite(out_l).all())


def test_t_end_below_first_knot_is_finite():
    # below t = 1/N the continuous schedule runs to (t = 0, alpha = 1), not a NaN extrapolation
    assert float(SCHED.marginal_std(torch.tensor(0.0))) == 0.0
    assert 0.0 < float(SCHED.marginal_std(torch.tensor(0.5 / N))) < float(SCHED.marginal_std(torch.tensor(1.0 / N)))
    x, y = _xT()
    out = sample(gauss_model(), x, y, sampler="dpm_solver++", steps=20, order=3, schedule=SCHED, t_end=1e-4,
                 skip_type="logSNR")
    assert float((out - gauss_exact(x, y, 1e-4)).abs().max()) < 2e-2


def test_sampler_passes_network_time_in_unit_interval_and_uses_last_branch():
    seen = []

    def model(x, t, y):
        seen.append(t.clone())
        assert t.shape == (x.shape[0],) and t.dtype == torch.float32
        return [torch.full((x.shape[0], 2, 2, 2), float("nan")), torch.zeros_like(x)]  # low branch ignored

    x, y = _xT()
    out = sample(model, x, y, sampler="dpm_solver++", steps=5, order=2, schedule=SCHED)
    assert bool(torch.isfinite(out).all())
    ts = torch.stack(seen)
    assert float(ts.max()) == 1.0 and float(ts.min()) > 0 and bool((ts.diff(dim=0) < 0).all())


def test_sample_errors():
    x, y = _xT()
    m = ConvModel()
    with pytest.raises(UserError, match="sampler"):
        sample(m, x, y, sampler="dpm", steps=5, schedule=SCHED)
    with pytest.raises(UserError):
        sample(m, x, y, steps=5, order=4, schedule=SCHED)
    with pytest.raises(UserError):
        sample(m, x, y, steps=0, schedule=SCHED)
    with pytest.raises(UserError, match="DDIM"):
        sample(m, x, y, sampler="ddim", steps=1000, schedule=SCHED)  # 1000 steps to t_end = 1/N: 999 fit
    with pytest.raises(UserError, match="null_label"):
        sample(m, x, y, steps=5, schedule=SCHED, guidance_scale=0.4)


@pytest.mark.parametrize("time_input,schedule_name", [("discrete", "scaled_linear"), ("vp_logsnr", "vp_linear")])
def test_a_training_step_and_every_sampler_read_nothing_back_from_the_device(time_input, schedule_name):
    """No host syncs: on the meta device no value can be read back (`bool`, `.item()`, `.tolist()` raise), so a
    training step (loss and backward) and every sampler with guidance running there read nothing back from the
    device at any step, as a GPU then never stalls the host between steps."""
    from dimr_lab.diffusion.training import training_loss
    from dimr_lab.nn.network import build_model
    from dimr_lab.registry import SAMPLERS

    spec = {"in_channels": 3, "image_size": 16, "num_classes": 5, "norm": "tdln", "outer_norm": "tdln",
            "branches": [{"block": "transformer", "width": 32, "depth": 1, "heads": 2, "patch": 2},
                         {"block": "convnext", "width": 16, "depth": 1, "patch": 1, "kernel": 3}]}
    schedule = build_schedule(schedule_name)
    model = build_model(spec).to("meta")
    x0 = torch.empty(4, 3, 16, 16, device="meta")
    y = torch.zeros(4, dtype=torch.long, device="meta")
    draws = draw(schedule, 4, (3, 16, 16), label_drop=0.1, flip=True, generator=torch.Generator().manual_seed(0))
    loss, _ = training_loss(model, schedule, time_input, x0, y, draws, [1.0, 1.0], 5)
    loss.backward()
    assert loss.device.type == "meta" and all(p.grad is not None for p in model.parameters())
    ran = []
    for name in SAMPLERS.names():
        if SAMPLERS.meta(name, "needs_discrete") and schedule_name == "vp_linear":
            continue
        out = sample(model, torch.empty_like(x0), y, sampler=name, steps=4, order=2, schedule=schedule,
                     guidance_scale=1.5, guidance_schedule="power_cosine", null_label=5, time_input=time_input)
        assert out.shape == x0.shape and out.device.type == "meta"
        ran.append(name)
    assert len(ran) >= 3


# ------------------------------------------- the latent sampler against the released DiMR solver (optional)


def _released_dimr_solver():
    """DiMR's dpm_solver.py from the checkout $DIMR_OFFICIAL_SRC names, or a skip."""
    from conftest import released_module

    return released_module("DIMR_OFFICIAL_SRC", "dpm_solver.py", "the released DiMR code", "qihao067/DiMR")


@pytest.mark.parametrize("steps", [250, 20, 21])
def test_latent_sampler_matches_released_dimr_eval(steps):
    """sampler 'dpm_solver++_fast' with the main-results settings (order 3, time_uniform, t_end 1e-3) is the
    released eval.py call DPM_Solver(model_fn, NoiseScheduleVP('discrete', betas), predict_x0=True,
    thresholding=False).sample(z, steps, eps=1/N, T=1.): the same model-call times and the same result."""
    from dimr_lab.diffusion.samplers import dpm_solver_pp_fast
    from dimr_lab.diffusion.schedule import NoiseSchedule, scaled_linear_betas

    released = _released_dimr_solver()
    g = torch.Generator().manual_seed(5)
    w = torch.randn(3, 3, 3, 3, generator=g, dtype=torch.float64) * 0.3

    def eps(x, t):  # a smooth, time-dependent stand-in for the network
        tt = t.reshape(-1, 1, 1, 1).to(x.dtype)
        return torch.tanh(F.conv2d(x, w, padding=1) * (0.5 + tt)) + 0.3 * x * tt

    theirs_t, ours_t = [], []
    x_T = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)
    betas = scaled_linear_betas(1000)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # the released code builds its grid in the default dtype
    try:
        ns = released.NoiseScheduleVP(schedule="discrete", betas=betas.clone())
        solver = released.DPM_Solver(lambda x, t: theirs_t.append(t.clone()) or eps(x, t), ns,
                                     predict_x0=True, thresholding=False)
        ref = solver.sample(x_T.clone(), steps=steps, eps=1.0 / 1000, T=1.0)
    finally:
        torch.set_default_dtype(old)
    out = dpm_solver_pp_fast(lambda x, t: ours_t.append(t.clone()) or eps(x, t), x_T.clone(),
                             NoiseSchedule(betas), steps=steps, order=3, t_end=1e-3, skip_type="time_uniform")
    assert len(theirs_t) == len(ours_t) == steps
    torch.testing.assert_close(torch.stack(ours_t), torch.stack(theirs_t), rtol=1e-12, atol=1e-12)
    assert float((out - ref).norm() / ref.norm()) < 1e-9
