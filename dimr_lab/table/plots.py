"""PNG figures of a results tree: a bar per variant, and learning curves against steps and training compute.
The paper's numbers (Inception FID on ImageNet) never share an axis with ours (classifier features on small
data): they sit on a twin axis of their own."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dimr_lab.images import write_figure
from dimr_lab.table.paper import PAPER_OF
from dimr_lab.table.values import HIGHER_IS_BETTER, LABELS, is_missing, label, quietly

PAPER_AXIS = {"paper_fid": "paper FID (Inception, ImageNet)", "paper_is": "paper IS (Inception, ImageNet)",
              "paper_precision": "paper precision (ImageNet)", "paper_recall": "paper recall (ImageNet)",
              "paper_distortion_rate": "paper distortion rate (ImageNet)"}
PAPER_COLOR = "tab:red"
MACS_PER_IMAGE_STEP = 3  # forward + backward (about twice the forward) per training image


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _axis_label(metric: str) -> str:
    better = "higher" if metric in HIGHER_IS_BETTER else "lower"
    return f"{LABELS.get(metric, metric)} ({better} is better)"


def _title(text: str, width_in: float) -> str:
    """A panel title wrapped to its panel (about 9 characters per inch at 10 pt), so titles never overlap."""
    return textwrap.fill(text, width=max(20, int(width_in * 9)))


def _named(title: str, ablation: str) -> str:
    """'Title (name)', or the name alone for an ablation without a title of its own (its title is its name)."""
    return title if title == ablation else f"{title} ({ablation})"


def _point(row: pd.Series, cols: list[str]) -> str:
    """The row's grid point and (when several) profile, for a tick label or legend entry."""
    return " ".join(f"{c.split('.', 1)[1]}={label(row[c])}" for c in cols if not is_missing(row[c]))


def _grid_cols(rows: pd.DataFrame) -> list[str]:
    return [c for c in rows.columns if c.startswith("grid.") and rows[c].notna().any()]


def _paper_twin(ax: Any, paper_col: str, values: list[float]) -> Any:
    """A right-hand axis for the paper's numbers, its limits padded so the markers are not on the frame."""
    twin = ax.twinx()
    twin.set_ylabel(PAPER_AXIS.get(paper_col, paper_col), color=PAPER_COLOR, fontsize=8)
    twin.tick_params(axis="y", colors=PAPER_COLOR, labelsize=8)
    lo, hi = min(values), max(values)
    pad = 0.15 * (hi - lo) if hi > lo else max(0.5, 0.1 * abs(hi))
    twin.set_ylim(lo - pad, hi + pad)
    return twin


@quietly
def plot_metric(table: pd.DataFrame, path: str | Path, metric: str = "fid") -> Path:
    """One panel per ablation: a bar per row (variant and grid point) with its std over seeds as error bar;
    the paper's numbers as markers on a twin axis."""
    plt = _pyplot()
    groups = [(abl, rows) for abl, rows in table.groupby("ablation", sort=False)]
    width = max(6.0, 0.75 * max(len(rows) for _, rows in groups) + 3.0)
    fig, axes = plt.subplots(len(groups), 1, figsize=(width, 3.6 * len(groups)), squeeze=False)
    paper_col = PAPER_OF.get(metric)
    for ax, (ablation, rows) in zip(axes[:, 0], groups):
        x = np.arange(len(rows))
        mean, std = rows[f"{metric}_mean"].to_numpy(float), rows[f"{metric}_std"].to_numpy(float)
        colors = ["tab:orange" if b else "tab:blue" for b in rows["base"]]
        ax.bar(x, np.nan_to_num(mean), yerr=np.nan_to_num(std), capsize=3, color=colors, label="ours (± std)")
        cols, several = _grid_cols(rows), rows["profile"].nunique() > 1
        ticks = [" ".join(p for p in (v, pr if several else "", _point(r, cols)) if p)
                 for (_, r), v, pr in zip(rows.iterrows(), rows["variant"], rows["profile"])]
        ax.set_xticks(x, ticks, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(_axis_label(metric), fontsize=9)
        ax.set_title(_title(_named(rows["title"].iloc[0], ablation), width), fontsize=10)
        if np.isnan(mean).all():
            ax.text(0.5, 0.5, f"no {LABELS.get(metric, metric)}", transform=ax.transAxes, ha="center")
        handles, names = ax.get_legend_handles_labels()
        if paper_col is not None and rows[paper_col].notna().any():
            paper = rows[paper_col].to_numpy(float)
            twin = _paper_twin(ax, paper_col, [v for v in paper if np.isfinite(v)])
            line = twin.plot(x, paper, "D", color=PAPER_COLOR, markersize=6, label="paper")
            handles, names = handles + line, names + ["paper (right axis)"]
        ax.legend(handles, names, fontsize=7, loc="best")
    fig.tight_layout()
    return write_figure(fig, path)


def _series(curves: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """(legend label, runs) per line: variant, plus profile and grid point where they vary."""
    out = []
    cols, several = _grid_cols(curves), curves["profile"].nunique() > 1
    keys = ["variant", "profile", "grid", "data_key"]
    order = curves.groupby(keys, sort=False)["variant_index"].min().sort_values(kind="stable")
    for key in order.index:
        runs = curves[(curves[keys] == pd.Series(key, index=keys)).all(axis=1)]
        first = runs.iloc[0]
        name = " ".join(p for p in (key[0], key[1] if several else "", _point(first, cols)) if p)
        out.append((name, runs))
    return out


def _band(ax: Any, x: np.ndarray, by_step: pd.DataFrame, name: str, color: Any = None) -> Any:
    """Mean over seeds as a line, the seeds' min-max as a shaded band; the line's colour."""
    # float arrays: a metric column that held a None is of object dtype, which matplotlib < 3.8 cannot fill
    mean, low, high = (by_step[c].to_numpy(float) for c in ("mean", "min", "max"))
    (line,) = ax.plot(x, mean, "o-", markersize=3, color=color, label=f"{name} (n={int(by_step['n'].max())})")
    ax.fill_between(x, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    return line.get_color()


@quietly
def plot_curves(curves: pd.DataFrame, path: str | Path, metric: str = "fid") -> Path:
    """For each ablation: metric vs training step and vs training compute (GMACs x images seen x 3), one line
    per variant (mean over seeds, min-max band), the paper's final number as a dashed line on a twin axis."""
    plt = _pyplot()
    from matplotlib.lines import Line2D

    groups = [(abl, rows) for abl, rows in curves.groupby("ablation", sort=False)]
    fig, axes = plt.subplots(len(groups), 2, figsize=(13.0, 4.0 * len(groups)), squeeze=False)
    paper_col = PAPER_OF.get(metric)
    for (ablation, rows), (ax_step, ax_macs) in zip(groups, axes):
        rows = rows.assign(compute=rows["gmacs"] * rows["images_seen"] * MACS_PER_IMAGE_STEP)
        papers: list[tuple[float, str]] = []
        for name, runs in _series(rows):
            by_step = runs.groupby("step")[metric].agg(["mean", "min", "max", "count"]).rename(columns={"count": "n"})
            by_step = by_step[by_step["n"] > 0]
            if by_step.empty:
                continue
            color = _band(ax_step, by_step.index.to_numpy(float), by_step, name)
            compute = runs.groupby("step")["compute"].mean().reindex(by_step.index).to_numpy(float)
            if np.isfinite(compute).any():
                _band(ax_macs, compute, by_step, name, color)
            published = runs[paper_col].dropna() if paper_col in runs else pd.Series(dtype=float)
            if len(published):
                papers.append((float(published.iloc[0]), color))
        title = _named(rows["title"].iloc[0], ablation)
        for ax, xlabel in ((ax_step, "training step"), (ax_macs, "training compute (GMAC)")):
            ax.set_xlabel(xlabel, fontsize=9)
            ax.set_ylabel(_axis_label(metric), fontsize=9)
            ax.set_title(_title(f"{title}: {LABELS.get(metric, metric)} vs {xlabel}", 6.0), fontsize=10)
            ax.tick_params(labelsize=8)
            if not ax.lines:
                ax.text(0.5, 0.5, "no finished evaluations", transform=ax.transAxes, ha="center")
                continue
            handles, names = ax.get_legend_handles_labels()
            if papers:
                twin = _paper_twin(ax, paper_col, [v for v, _ in papers])
                for value, color in papers:
                    twin.axhline(value, color=color, linestyle="--", linewidth=1)
                handles = handles + [Line2D([], [], color="gray", linestyle="--")]
                names = names + ["paper, final (right axis)"]
            ax.legend(handles, names, fontsize=7, loc="best")
    fig.tight_layout()
    return write_figure(fig, path)
