"""Paired-by-seed statistics: checked against scipy and brute-force enumeration."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats as st

from dimr_lab import stats


def _random_pair(n, seed):
    """Two correlated length-n samples (a shared seed effect plus noise)."""
    rng = np.random.default_rng(seed)
    base = rng.normal(10.0, 2.0, n)
    return base + rng.normal(0, 0.5, n), base + rng.normal(0.3, 0.5, n)


def _brute_sign_flip(d):
    """Two-sided sign-flip p by enumerating every sign pattern with itertools.product."""
    obs = abs(sum(d) / len(d))
    hits = 0
    for signs in itertools.product((1.0, -1.0), repeat=len(d)):
        if abs(sum(s * x for s, x in zip(signs, d)) / len(d)) >= obs - 1e-12:
            hits += 1
    return hits / 2 ** len(d)


# ---------------------------------------------------------------- paired_differences


def test_paired_differences_is_b_minus_a_and_drops_missing():
    d = stats.paired_differences([1.0, None, 3.0, 4.0, float("nan")], [2.0, 5.0, float("nan"), 1.0, 7.0])
    np.testing.assert_array_equal(d, [1.0, -3.0])


def test_paired_differences_rejects_unequal_lengths():
    with pytest.raises(ValueError):
        stats.paired_differences([1.0, 2.0], [1.0])


# ---------------------------------------------------------------- paired_t_p / t_interval


@pytest.mark.parametrize("n", range(3, 11))
def test_paired_t_p_matches_scipy_ttest_rel(n):
    a, b = _random_pair(n, seed=n)
    expected = st.ttest_rel(b, a).pvalue
    assert stats.paired_t_p(stats.paired_differences(a, b)) == pytest.approx(expected, rel=1e-10)


def test_paired_t_p_edge_cases():
    assert math.isnan(stats.paired_t_p([1.0]))
    assert stats.paired_t_p([2.0, 2.0, 2.0]) == 0.0
    assert stats.paired_t_p([0.0, 0.0, 0.0]) == 1.0


@pytest.mark.parametrize("n", [3, 5, 8, 10])
@pytest.mark.parametrize("confidence", [0.9, 0.95])
def test_t_interval_matches_scipy(n, confidence):
    a, b = _random_pair(n, seed=100 + n)
    d = b - a
    m, lo, hi = stats.t_interval(d, confidence)
    exp_lo, exp_hi = st.t.interval(confidence, n - 1, loc=d.mean(), scale=st.sem(d))
    assert m == pytest.approx(d.mean())
    assert (lo, hi) == pytest.approx((exp_lo, exp_hi), rel=1e-10)


def test_t_interval_small_n():
    m, lo, hi = stats.t_interval([1.5])
    assert m == 1.5 and math.isnan(lo) and math.isnan(hi)
    assert all(math.isnan(v) for v in stats.t_interval([]))


# ---------------------------------------------------------------- sign_flip_p


@pytest.mark.parametrize("n", range(1, 9))
def test_sign_flip_p_matches_brute_force(n):
    rng = np.random.default_rng(7 * n)
    d = rng.normal(0.4, 1.0, n)
    assert stats.sign_flip_p(d) == pytest.approx(_brute_sign_flip(list(d)), abs=1e-12)


def test_sign_flip_p_matches_brute_force_with_ties():
    d = [1.0, 2.0, -1.0, 2.0, 1.0, 0.0]  # many patterns share the observed |mean| exactly
    assert stats.sign_flip_p(d) == pytest.approx(_brute_sign_flip(d))


@pytest.mark.parametrize("n, floor", [(3, 0.25), (5, 0.0625), (6, 0.03125)])
def test_sign_flip_p_minimum_is_two_over_two_to_n(n, floor):
    assert stats.sign_flip_p([3.0] * n) == floor
    # no data of this size can do better: a 3-seed comparison is never significant at 0.05
    rng = np.random.default_rng(n)
    assert min(stats.sign_flip_p(rng.normal(5.0, 1.0, n)) for _ in range(20)) >= floor


def test_sign_flip_p_float_rounding_ties_count():
    # 0.1 + 0.2 - 0.3 is not exactly 0 in floating point; every pattern ties with the observed one
    assert stats.sign_flip_p([0.1, 0.2, -0.3]) == 1.0


def _decimal_sign_flip(d):
    """Sign-flip p in exact rational arithmetic on the decimal values as written (ties are exact)."""
    from fractions import Fraction

    x = [Fraction(str(v)) for v in d]
    obs = abs(sum(x))
    hits = sum(abs(sum(s * v for s, v in zip(signs, x))) >= obs for signs in itertools.product((1, -1), repeat=len(x)))
    return hits / 2 ** len(x)


@pytest.mark.parametrize("d", [[0.1, 0.2, 0.3, -0.6, 1.0], [1.1, 2.2, -3.3, 0.5]])
def test_sign_flip_p_counts_decimal_ties_that_float_sums_break(d):
    # a subset of d sums to exactly 0 in decimal, so flipping it ties with the observed pattern;
    # in floating point the two sums differ by rounding, and the tie must still count
    assert stats.sign_flip_p(d) == _decimal_sign_flip(d)


def test_sign_flip_p_is_exact_by_default_up_to_twenty_seeds():
    # the documented default: every pattern enumerated up to n = 20 (here n = 14, not Monte Carlo)
    d = np.random.default_rng(22).normal(0.2, 1.0, 14)
    assert stats.sign_flip_p(d) == pytest.approx(_brute_sign_flip(list(d)), abs=1e-12)


def test_sign_flip_p_is_exact_at_max_exact():
    # "all patterns are enumerated up to n = max_exact": n == max_exact is the exact path, not Monte Carlo
    d = np.random.default_rng(21).normal(0.3, 1.0, 8)
    assert stats.sign_flip_p(d, max_exact=8) == pytest.approx(_brute_sign_flip(list(d)), abs=1e-12)


def test_sign_flip_p_edge_cases():
    assert math.isnan(stats.sign_flip_p([]))
    assert stats.sign_flip_p([0.0, 0.0, 0.0, 0.0]) == 1.0
    assert stats.sign_flip_p([0.0] * 30) == 1.0  # Monte Carlo path too


def test_sign_flip_p_monte_carlo_agrees_with_exact():
    rng = np.random.default_rng(12)
    d = rng.normal(0.5, 1.0, 12)
    exact = stats.sign_flip_p(d)
    mc = stats.sign_flip_p(d, max_exact=5, n_mc=100000, seed=3)
    assert mc != exact  # really took the Monte Carlo path
    assert mc == pytest.approx(exact, abs=0.01)
    assert mc == stats.sign_flip_p(d, max_exact=5, n_mc=100000, seed=3)  # deterministic


def test_sign_flip_p_monte_carlo_plus_one_correction():
    # an extreme all-positive sample: no random pattern beats it except all-plus, p stays > 0
    p = stats.sign_flip_p([1.0] * 40, max_exact=10, n_mc=1000)
    assert p == pytest.approx(1.0 / 1001.0)


# ---------------------------------------------------------------- holm


def test_holm_worked_example():
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])


def test_holm_nan_passes_through_and_does_not_count():
    out = stats.holm([0.01, float("nan"), 0.04, None])
    assert math.isnan(out[1]) and math.isnan(out[3])
    assert out[0] == pytest.approx(0.02) and out[2] == pytest.approx(0.04)  # m = 2, not 4
    assert all(math.isnan(v) for v in stats.holm([float("nan")]))
    assert stats.holm([]) == []


def test_holm_monotone_and_capped():
    rng = np.random.default_rng(5)
    p = rng.uniform(0, 0.6, 15)
    adj = np.array(stats.holm(p))
    order = np.argsort(p)
    assert np.all(np.diff(adj[order]) >= 0)  # same ordering as raw p
    assert np.all(adj >= p) and np.all(adj <= 1.0)
    assert stats.holm([0.5, 0.6, 0.9]) == [1.0, 1.0, 1.0]


# ---------------------------------------------------------------- bootstrap_interval


def test_bootstrap_interval_contains_mean_and_is_deterministic():
    rng = np.random.default_rng(1)
    d = rng.normal(2.0, 1.0, 8)
    lo, hi = stats.bootstrap_interval(d, seed=4)
    assert lo < d.mean() < hi
    assert stats.bootstrap_interval(d, seed=4) == (lo, hi)
    assert stats.bootstrap_interval(d, seed=5) != (lo, hi)
    assert all(math.isnan(v) for v in stats.bootstrap_interval([1.0]))


@pytest.mark.parametrize("n", [4, 8])
def test_bootstrap_interval_resamples_every_value(n):
    # d = (0, ..., 0, 1): a resample's mean is Binomial(n, 1/n) / n, so the upper 97.5% bound is
    # that binomial's 0.975 quantile over n (its CDF is far from 0.975 at every jump for these n)
    lo, hi = stats.bootstrap_interval([0.0] * (n - 1) + [1.0], n_boot=20000, seed=1)
    assert lo == 0.0
    assert hi == pytest.approx(st.binom.ppf(0.975, n, 1.0 / n) / n)


def test_bootstrap_interval_close_to_t_interval_for_normal_data():
    rng = np.random.default_rng(30)
    d = rng.normal(1.0, 2.0, 30)
    m, t_lo, t_hi = stats.t_interval(d)
    b_lo, b_hi = stats.bootstrap_interval(d)
    assert (b_hi - b_lo) == pytest.approx(t_hi - t_lo, rel=0.2)
    assert (b_lo + b_hi) / 2 == pytest.approx(m, abs=0.1 * (t_hi - t_lo))


# ---------------------------------------------------------------- verdict


@pytest.mark.parametrize(
    "diff, lo, hi, p, paper, expected",
    [
        (2.0, 1.0, 3.0, 0.01, 1.5, "agrees"),
        (-2.0, -3.0, -1.0, 0.01, -0.4, "agrees"),
        (2.0, 1.0, 3.0, 0.01, -1.5, "disagrees"),
        (-2.0, -3.0, -1.0, 0.01, 0.7, "disagrees"),
        (0.5, -1.0, 2.0, 0.01, 1.0, "inconclusive"),  # interval straddles 0
        (2.0, 1.0, 3.0, 0.2, 1.0, "inconclusive"),  # p too large
        (2.0, 1.0, 3.0, 0.05, 1.0, "inconclusive"),  # p == alpha is not < alpha
        (2.0, 1.0, 3.0, float("nan"), 1.0, "inconclusive"),
        (2.0, 1.0, 3.0, 0.01, None, "no published sign"),
        (2.0, 1.0, 3.0, 0.01, float("nan"), "no published sign"),
        (2.0, 1.0, 3.0, 0.01, 0.0, "no published sign"),
    ],
)
def test_verdict(diff, lo, hi, p, paper, expected):
    assert stats.verdict(diff, lo, hi, p, paper) == expected


def test_verdict_respects_alpha():
    assert stats.verdict(2.0, 1.0, 3.0, 0.03, 1.0, alpha=0.01) == "inconclusive"
    assert stats.verdict(2.0, 1.0, 3.0, 0.03, 1.0, alpha=0.05) == "agrees"


# ---------------------------------------------------------------- detectable_effect


def _with_sd(n, sd, seed=0):
    """n values with sample standard deviation exactly sd."""
    x = np.random.default_rng(seed).normal(0, 1, n)
    return (x - x.mean()) / x.std(ddof=1) * sd


def test_detectable_effect_formula():
    d = _with_sd(6, 1.5)
    expected = (st.t.ppf(0.975, 5) + st.t.ppf(0.8, 5)) * 1.5 / math.sqrt(6)
    assert stats.detectable_effect(d) == pytest.approx(expected)
    assert math.isnan(stats.detectable_effect([1.0]))


def test_detectable_effect_shrinks_with_n_and_scales_with_sd():
    sizes = [3, 5, 10, 30]
    effects = [stats.detectable_effect(_with_sd(n, 1.0)) for n in sizes]
    assert all(x > y for x, y in zip(effects, effects[1:]))
    one, three = stats.detectable_effect(_with_sd(8, 1.0)), stats.detectable_effect(_with_sd(8, 3.0))
    assert three == pytest.approx(3 * one)
    # higher power or stricter alpha needs a bigger effect
    d = _with_sd(8, 1.0)
    assert stats.detectable_effect(d, power=0.9) > stats.detectable_effect(d)
    assert stats.detectable_effect(d, alpha=0.01) > stats.detectable_effect(d)


# ---------------------------------------------------------------- compare / compare_steps

KEYS = {"n", "mean_a", "mean_b", "diff", "t_lo", "t_hi", "boot_lo", "boot_hi"}
KEYS |= {"p_perm", "p_t", "sd_diff", "detectable", "paper_diff"}


def _known_effect(effect, seed=0):
    """Six seeds of a metric and of the same metric shifted by effect plus small noise."""
    rng = np.random.default_rng(seed)
    a = rng.normal(20.0, 3.0, 6)
    return a, a + effect + rng.normal(0, 0.2, 6)


def test_compare_reports_every_statistic():
    a, b = _known_effect(5.0)
    r = stats.compare(a, b, paper_diff=4.0, n_boot=2000)
    assert set(r) == KEYS
    assert r["n"] == 6
    assert r["diff"] == pytest.approx(r["mean_b"] - r["mean_a"])
    assert r["t_lo"] < r["diff"] < r["t_hi"] and r["boot_lo"] < r["diff"] < r["boot_hi"]
    assert r["p_perm"] == 0.03125  # every difference positive: the 6-seed floor
    assert r["p_t"] == pytest.approx(st.ttest_rel(b, a).pvalue)
    assert r["sd_diff"] == pytest.approx(np.std(b - a, ddof=1))
    assert r["detectable"] == pytest.approx(stats.detectable_effect(b - a))
    assert r["paper_diff"] == 4.0


def test_compare_p_perm_is_the_sign_flip_p_of_the_paired_differences():
    # differences of mixed sign, on metric values that are all positive: p_perm must come from b - a
    a = np.array([20.0, 21.0, 19.5, 22.0, 20.5, 21.5])
    b = a + np.array([0.9, -0.4, 1.2, 0.3, -0.2, 0.8])
    r = stats.compare(a, b, n_boot=200)
    assert r["p_perm"] == pytest.approx(_brute_sign_flip(list(b - a)), abs=1e-12)
    assert r["p_perm"] > 0.1


def test_compare_drops_missing_pairs():
    r = stats.compare([1.0, 2.0, None, 4.0], [2.0, float("nan"), 3.0, 6.0], n_boot=200)
    assert r["n"] == 2 and r["mean_a"] == 2.5 and r["mean_b"] == 4.0 and r["diff"] == 1.5
    assert r["paper_diff"] is None


@pytest.mark.parametrize("paper, expected", [(3.0, "agrees"), (-3.0, "disagrees"), (None, "no published sign")])
def test_compare_steps_known_effect(paper, expected):
    a, b = _known_effect(5.0)
    (step,) = stats.compare_steps([stats.compare(a, b, paper, n_boot=2000)])
    assert step["p_holm"] == pytest.approx(step["p_perm"])
    assert step["verdict"] == expected


def test_compare_steps_negative_known_effect_agrees_with_negative_paper():
    a, b = _known_effect(-5.0, seed=1)
    (step,) = stats.compare_steps([stats.compare(a, b, -2.0, n_boot=2000)])
    assert step["verdict"] == "agrees"


def test_compare_steps_null_effect_is_inconclusive():
    a = np.random.default_rng(2).normal(20.0, 3.0, 6)
    b = a + np.array([0.3, -0.2, 0.1, -0.3, 0.2, -0.1])  # noise with mean exactly 0
    for key in ("p_perm", "p_t"):
        (step,) = stats.compare_steps([stats.compare(a, b, 1.0, n_boot=2000)], p_key=key)
        assert step["t_lo"] < 0 < step["t_hi"]
        assert step["verdict"] == "inconclusive"


def test_compare_steps_holm_across_steps():
    # two clear 6-seed effects read together: Holm doubles the 2/2^6 floor past 0.05 for p_perm
    a1, b1 = _known_effect(5.0, seed=3)
    a2, b2 = _known_effect(-4.0, seed=4)
    a3 = np.arange(6.0)
    b3 = a3 + np.array([0.3, -0.2, 0.1, -0.3, 0.2, -0.1])
    rows = [stats.compare(a, b, paper, n_boot=500) for a, b, paper in ((a1, b1, 1.0), (a2, b2, -1.0), (a3, b3, 1.0))]
    perm = stats.compare_steps(rows)
    assert [r["p_holm"] for r in perm] == pytest.approx(stats.holm([r["p_perm"] for r in rows]))
    assert [r["verdict"] for r in perm] == ["inconclusive"] * 3
    # the paired t-test has no such floor and resolves the two real effects
    tt = stats.compare_steps(rows, p_key="p_t")
    assert [r["verdict"] for r in tt] == ["agrees", "agrees", "inconclusive"]
    assert "p_holm" not in rows[0]  # inputs are not mutated
