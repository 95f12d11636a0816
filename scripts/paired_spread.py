"""Does one way of running an ablation pair its variants more tightly than another?

Reads two ablation folders that ran the same two variants with the same seeds (for instance
results/tdln_vs_adaln and results/init_draws, which differ only in train.init_draws) and prints, per
evaluated step and metric, the per-seed difference B - A in each folder: its mean and standard deviation,
the ratio of the two standard deviations with its 95% interval (F distribution, the seeds of each folder
taken as independent normal samples) and the two-sided F-test p-value, and the correlation of the two
variants' values over seeds in each folder (a tighter pairing raises it).

    .venv/bin/python scripts/paired_spread.py results/tdln_vs_adaln results/init_draws \
        --variants tdln,adaln_zero --metrics fid,sample_accuracy
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np


def differences(folder: Path, a: str, b: str, metric: str) -> dict[int, dict[int, tuple[float, float]]]:
    """{step: {seed: (value of a, value of b)}} for the seeds where both variants have the metric."""
    from dimr_lab.table.collect import collect_curves

    curves, _ = collect_curves(folder)
    out: dict[int, dict[int, tuple[float, float]]] = {}
    for (step, seed), rows in curves.groupby(["step", "seed"]):
        values = {r["variant"]: r[metric] for _, r in rows.iterrows()}
        if a in values and b in values and not (math.isnan(values[a]) or math.isnan(values[b])):
            out.setdefault(int(step), {})[int(seed)] = (float(values[a]), float(values[b]))
    return out


def spread(pairs: dict[int, tuple[float, float]]) -> tuple[np.ndarray, float]:
    """The per-seed differences b - a, and the correlation of a and b over seeds."""
    a = np.array([p[0] for p in pairs.values()])
    b = np.array([p[1] for p in pairs.values()])
    return b - a, float(np.corrcoef(a, b)[0, 1]) if len(a) > 2 else math.nan


def main(argv: list[str] | None = None) -> int:
    from scipy import stats

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("first", type=Path)
    p.add_argument("second", type=Path)
    p.add_argument("--variants", required=True, help="A,B: the difference is B - A")
    p.add_argument("--metrics", default="fid,sample_accuracy")
    args = p.parse_args(argv)
    try:
        a, b = args.variants.split(",")
    except ValueError:
        print(f"--variants: two names, A,B (got {args.variants!r})", file=sys.stderr)
        return 2
    for folder in (args.first, args.second):
        if not folder.is_dir():
            print(f"{folder}: no such folder", file=sys.stderr)
            return 2
    print(f"difference {b} - {a} per seed; first = {args.first}, second = {args.second}")
    print(f"{'metric':<16}{'step':>6}{'n':>4}{'mean 1st':>11}{'sd 1st':>9}{'mean 2nd':>11}{'sd 2nd':>9}"
          f"{'sd 2nd/1st':>12}{'95% interval':>18}{'F p':>7}{'r 1st':>7}{'r 2nd':>7}")
    for metric in args.metrics.split(","):
        first, second = (differences(f, a, b, metric) for f in (args.first, args.second))
        for step in sorted(set(first) & set(second)):
            d1, r1 = spread(first[step])
            d2, r2 = spread(second[step])
            n1, n2 = len(d1), len(d2)
            if n1 < 2 or n2 < 2:
                continue
            v1, v2 = d1.var(ddof=1), d2.var(ddof=1)
            ratio = v2 / v1 if v1 > 0 else math.inf
            lo = ratio / stats.f.ppf(0.975, n2 - 1, n1 - 1)
            hi = ratio / stats.f.ppf(0.025, n2 - 1, n1 - 1)
            cdf = stats.f.cdf(ratio, n2 - 1, n1 - 1)
            pval = min(1.0, 2 * min(cdf, 1 - cdf))
            interval = f"[{math.sqrt(lo):.2f}, {math.sqrt(hi):.2f}]"
            print(f"{metric:<16}{step:>6}{min(n1, n2):>4}{d1.mean():>11.4g}{math.sqrt(v1):>9.3g}{d2.mean():>11.4g}"
                  f"{math.sqrt(v2):>9.3g}{math.sqrt(ratio):>12.2f}{interval:>18}{pval:>7.2f}{r1:>7.2f}{r2:>7.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
