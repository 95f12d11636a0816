"""Paired-by-seed statistics for comparing two variants of an ablation.

Pairing.  Every comparison ("step") sets a variant A against a variant B trained
with the same seeds.  A seed fixes the data order, the diffusion noise draws
(timesteps and Gaussian noise) and the initialisation stream, and every run is
evaluated from the same sampling noise (sample.seed).  The initial weights are
not shared: the stream is drawn in construction order, so a module that one
variant adds or changes shifts the draws of every module built after it (on
Table 2's small profile, seed 0, variants share almost no randomly initialised
tensor bit for bit).  We work on the per-seed differences d_s = B_s - A_s,
which cancels the seed-to-seed variation the two runs share (the data order and
noise above), instead of comparing two independent samples; the variation of
the initial weights stays in d_s.  With train.init_draws = "by_name" (opt-in;
"stream", the default, is the above) each random tensor is drawn from its own
generator keyed by (train.seed, its parameter name), so the two runs of a seed
also share the initial values of every tensor they have alike (name, shape and
module); only the tensors a variant adds or changes differ.
Pairs where either run is missing (None/NaN) are dropped.

Estimate.  The effect is the mean difference mean(d).  Its 95% interval is the
Student-t interval mean(d) +/- t_{0.975, n-1} * sd(d) / sqrt(n); a percentile
bootstrap of the mean is reported beside it.  With few seeds the bootstrap is
narrower than the t interval by construction (about 0.7x at n = 6: it uses
z rather than t and sd with 1/n), so it can confirm a sign but is no check on
the t interval's width.

Tests.  Two p-values.  The paired t-test p (identical to scipy.stats.ttest_rel)
drives the table's verdicts by default (`dimr-lab table --steps --test t`); it
leans on the differences being roughly normal.  The paired sign-flip
(permutation) test (`--test perm`; `compare_steps` defaults to it) needs no
normality: under H0
"A and B are exchangeable within a seed", each d_s is equally likely to carry
either sign, so the observed |mean(d)| is compared with |mean| over all 2^n
sign patterns.  It assumes no normality and is exact for small n (all patterns
are enumerated up to n = 20, Monte Carlo beyond).  Its price is granularity:
the observed pattern and its mirror image always count, so the smallest
attainable p is 2 / 2^n.  With 3 seeds p >= 0.25, so a 3-seed comparison can
NEVER be significant at alpha = 0.05 with this test, however large the effect
(the same holds up to 5 seeds, p >= 0.0625); 6 seeds give p >= 0.03125, and
after Holm over k steps the floor is k * 2 / 2^n for the smallest p.  The t
test's p can be smaller for few seeds, but only by leaning on normality.

Multiplicity.  The steps of one ablation, profile and grid point at one
evaluation point (training step) are read together, so their p-values are
adjusted with Holm's step-down procedure, which controls the
family-wise error rate (the chance of any false "significant" among the steps)
at alpha, uniformly more powerful than plain Bonferroni.

Verdict.  A step is significant when its Holm-adjusted p < alpha AND its
t interval excludes 0; it then "agrees" with the paper when the signs of the
measured and the published difference match, else "disagrees".  Anything else
is "inconclusive"; `detectable_effect` says how large a difference n seeds
could have resolved (paired t-test, two-sided, given alpha and power, before
Holm's correction: a verdict among k steps needs more).
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import numpy as np

def _student_t() -> Any:
    """scipy's Student t distribution, imported on first use: scipy.stats takes longer to import than a plain
    `dimr-lab table` of hundreds of runs takes to read them, and only the statistics need it."""
    from scipy import stats

    return stats.t


VERDICTS = ("agrees", "disagrees", "inconclusive", "no published sign")

_MAX_EXACT_LIMIT = 26  # 2^26 float64 sums = 512 MiB: refuse exact enumeration beyond this
_MC_CHUNK = 8192  # Monte Carlo sign patterns drawn per batch (bounds memory)


def _as_1d(x: Any) -> np.ndarray:
    """A 1-D float array from a sequence, None becoming NaN."""
    arr = np.asarray(x, dtype=float)
    if arr.ndim != 1:
        raise ValueError(f"expected a 1-D sequence, got shape {arr.shape}")
    return arr


def _finite(d: Any) -> np.ndarray:
    """The finite entries of d as a 1-D float array."""
    arr = _as_1d(d)
    return arr[np.isfinite(arr)]


def _is_missing(x: Any) -> bool:
    """True for None or a float NaN."""
    return x is None or (isinstance(x, (float, np.floating)) and math.isnan(x))


def paired_differences(a: Sequence[Any], b: Sequence[Any]) -> np.ndarray:
    """b - a per seed, dropping pairs where either value is None/NaN."""
    xa, xb = _as_1d(a), _as_1d(b)
    if xa.shape != xb.shape:
        raise ValueError(f"paired sequences differ in length: {len(xa)} vs {len(xb)}")
    keep = np.isfinite(xa) & np.isfinite(xb)
    return xb[keep] - xa[keep]


def t_interval(d: Any, confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, lo, hi): Student-t interval of the mean of d with n-1 degrees of freedom."""
    x = _finite(d)
    n = x.size
    if n < 2:
        return (float(x[0]) if n == 1 else math.nan, math.nan, math.nan)
    m = float(x.mean())
    # half-width = t_{(1+c)/2, n-1} * s / sqrt(n), s with ddof=1
    half = float(_student_t().ppf((1.0 + confidence) / 2.0, n - 1)) * float(x.std(ddof=1)) / math.sqrt(n)
    return m, m - half, m + half


def bootstrap_interval(
    d: Any, confidence: float = 0.95, n_boot: int = 10000, seed: int = 0
) -> tuple[float, float]:
    """(lo, hi): percentile bootstrap interval of the mean, deterministic given seed."""
    x = _finite(d)
    n = x.size
    if n < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    # resample n values with replacement n_boot times; quantiles (1-c)/2, (1+c)/2 of the means
    means = x[rng.integers(0, n, size=(n_boot, n))].mean(axis=1)
    lo, hi = np.quantile(means, [(1.0 - confidence) / 2.0, (1.0 + confidence) / 2.0])
    return float(lo), float(hi)


def _sign_flip_sums(x: np.ndarray) -> np.ndarray:
    """sum_i s_i x_i over all 2^n sign patterns s, built by doubling."""
    sums = np.zeros(1)
    for v in x:
        sums = np.concatenate((sums + v, sums - v))
    return sums


def sign_flip_p(d: Any, max_exact: int = 20, n_mc: int = 100000, seed: int = 0) -> float:
    """Two-sided paired sign-flip permutation p-value for mean(d) = 0 (statistic |mean|)."""
    x = _finite(d)
    n = x.size
    if n == 0:
        return math.nan
    obs = abs(float(x.sum()))  # |mean| ordering equals |sum| ordering for fixed n
    tol = 1e-10 * max(float(np.abs(x).sum()), 1e-300)  # absorbs float rounding of tied patterns
    if n <= min(max_exact, _MAX_EXACT_LIMIT):
        # exact: p = #{s : |sum s_i d_i| >= |sum d_i|} / 2^n, observed pattern included
        hits = np.count_nonzero(np.abs(_sign_flip_sums(x)) >= obs - tol)
        return float(hits) / float(2**n)
    # Monte Carlo: p = (1 + #{draws with stat >= observed}) / (1 + n_mc)
    rng = np.random.default_rng(seed)
    hits, left = 0, int(n_mc)
    while left > 0:
        k = min(left, _MC_CHUNK)
        signs = rng.integers(0, 2, size=(k, n)) * 2 - 1
        hits += int(np.count_nonzero(np.abs(signs @ x) >= obs - tol))
        left -= k
    return (hits + 1.0) / (n_mc + 1.0)


def paired_t_p(d: Any) -> float:
    """Two-sided paired t-test p-value (as scipy.stats.ttest_rel); zero variance gives 1 or 0."""
    x = _finite(d)
    n = x.size
    if n < 2:
        return math.nan
    m, s = float(x.mean()), float(x.std(ddof=1))
    if s == 0.0:
        return 1.0 if m == 0.0 else 0.0
    # t = mean / (s / sqrt(n)), p = 2 * P(T_{n-1} > |t|)
    t = m / (s / math.sqrt(n))
    return float(2.0 * _student_t().sf(abs(t), n - 1))


def holm(pvalues: Iterable[Any]) -> list[float]:
    """Holm-Bonferroni adjusted p-values; NaN/None pass through and do not count toward m."""
    p = np.array([math.nan if v is None else v for v in pvalues], dtype=float)
    out = np.full(p.shape, math.nan)
    idx = np.flatnonzero(np.isfinite(p))
    m = idx.size
    if m == 0:
        return out.tolist()
    order = idx[np.argsort(p[idx], kind="stable")]
    # p_adj_(i) = max_{j <= i} min(1, (m - j + 1) * p_(j)), i over ascending p (1-based j)
    scaled = (m - np.arange(m)) * p[order]
    out[order] = np.minimum(np.maximum.accumulate(scaled), 1.0)
    return out.tolist()


def verdict(
    diff: float, lo: float, hi: float, p_adjusted: float, paper_diff: Any, alpha: float = 0.05
) -> str:
    """Agrees/disagrees with the paper's sign when significant (p_adj < alpha, [lo, hi] excludes 0)."""
    if _is_missing(paper_diff) or paper_diff == 0:
        return "no published sign"
    if any(_is_missing(v) for v in (diff, lo, hi, p_adjusted)):
        return "inconclusive"
    significant = p_adjusted < alpha and (lo > 0 or hi < 0)
    if not significant:
        return "inconclusive"
    return "agrees" if np.sign(diff) == np.sign(paper_diff) else "disagrees"


def detectable_effect(d: Any, alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest true mean difference a two-sided paired t-test on these n pairs detects at alpha/power."""
    x = _finite(d)
    n = x.size
    if n < 2:
        return math.nan
    # delta = (t_{1-alpha/2, n-1} + t_{power, n-1}) * sd / sqrt(n)
    q = float(_student_t().ppf(1.0 - alpha / 2.0, n - 1) + _student_t().ppf(power, n - 1))
    return q * float(x.std(ddof=1)) / math.sqrt(n)


def compare(
    a: Sequence[Any],
    b: Sequence[Any],
    paper_diff: Any = None,
    *,
    confidence: float = 0.95,
    n_boot: int = 10000,
    seed: int = 0,
) -> dict[str, Any]:
    """All per-step statistics for variant b versus variant a, paired by seed."""
    xa, xb = _as_1d(a), _as_1d(b)
    if xa.shape != xb.shape:
        raise ValueError(f"paired sequences differ in length: {len(xa)} vs {len(xb)}")
    keep = np.isfinite(xa) & np.isfinite(xb)
    xa, xb = xa[keep], xb[keep]
    d = xb - xa
    n = int(d.size)
    diff, t_lo, t_hi = t_interval(d, confidence)
    boot_lo, boot_hi = bootstrap_interval(d, confidence, n_boot=n_boot, seed=seed)
    return {
        "n": n,
        "mean_a": float(xa.mean()) if n else math.nan,
        "mean_b": float(xb.mean()) if n else math.nan,
        "diff": diff,
        "t_lo": t_lo,
        "t_hi": t_hi,
        "boot_lo": boot_lo,
        "boot_hi": boot_hi,
        "p_perm": sign_flip_p(d, seed=seed),
        "p_t": paired_t_p(d),
        "sd_diff": float(d.std(ddof=1)) if n >= 2 else math.nan,
        "detectable": detectable_effect(d),
        "paper_diff": None if _is_missing(paper_diff) else float(paper_diff),
    }


def compare_steps(
    steps: Sequence[dict[str, Any]], alpha: float = 0.05, p_key: str = "p_perm"
) -> list[dict[str, Any]]:
    """Copies of the step dicts with p_holm (Holm over p_key) and verdict (t interval, p_holm)."""
    adjusted = holm([s.get(p_key) for s in steps])
    out = []
    for s, p_adj in zip(steps, adjusted):
        v = verdict(s["diff"], s["t_lo"], s["t_hi"], p_adj, s.get("paper_diff"), alpha)
        out.append({**s, "p_holm": p_adj, "verdict": v})
    return out
