"""Runs -> one row per variant (and profile, grid point, dataset): mean, std and count over seeds, deltas to
the base variant at the same point, the paper's numbers."""

from __future__ import annotations

import json
import math
from typing import Any, Callable

import pandas as pd

from dimr_lab.table.paper import PAPER_COLUMNS
from dimr_lab.table.values import MAIN_METRICS, METRIC_COLUMNS, integer_columns, quietly, settings_diff

# one aggregated row per group; data_key keeps runs on different data apart even within a variant
GROUP = ["ablation", "profile", "variant", "grid", "data_key"]
# where a row is compared with its base row: the same profile, grid point and data
POINT = ["profile", "grid", "data_key"]


def label_columns(frame: pd.DataFrame) -> list[str]:
    """The factor.* and grid.* columns of a runs or aggregated frame."""
    return [c for c in frame.columns if c.startswith(("factor.", "grid."))]


def _grid_sort_key(grid_json: str) -> tuple:
    """Order grid points by their values, numbers before text."""
    try:
        grid = json.loads(grid_json)
    except (TypeError, ValueError):
        grid = {}
    return tuple((k, 0, v, "") if isinstance(v, (int, float)) and not isinstance(v, bool) else (k, 1, 0, str(v))
                 for k, v in sorted(grid.items()))


def _first(values: pd.Series) -> Any:
    present = values.dropna()
    return present.iloc[0] if len(present) else None


def _seeds_text(seeds: Any) -> str:
    return ", ".join(str(s) for s in sorted(seeds))


def _point_text(profile: str, grid: str) -> str:
    """' (tiny, train.lr=0.001)': where a row sits, for warnings."""
    try:
        parts = [profile] if profile else []
        parts += [f"{k}={v}" for k, v in sorted(json.loads(grid).items())]
    except (TypeError, ValueError):
        parts = [profile]
    return f" ({', '.join(parts)})" if parts else ""


@quietly
def aggregate(runs: pd.DataFrame, *, on_warning: Callable[[str], None] | None = None) -> pd.DataFrame:
    """One row per ablation, profile, variant, grid point and dataset: for each metric the mean and sample
    std over seeds and `<metric>_n`, the seeds that have a value; deltas to the base variant; the paper's
    numbers. A metric with values for fewer seeds than the row has runs is reported to on_warning."""
    if runs.empty:
        return pd.DataFrame()
    labels = label_columns(runs)
    rows = []
    for (ablation, profile, variant, grid, data_key), group in runs.groupby(GROUP, sort=False, dropna=False):
        row: dict[str, Any] = {"ablation": ablation, "title": group["title"].iloc[0], "profile": profile,
                               "variant": variant, "grid": grid, "data_key": data_key}
        row.update({col: _first(group[col]) for col in labels})
        row["n_seeds"] = len(group)
        row["seeds"] = ",".join(str(s) for s in sorted(group["seed"]))
        for col in METRIC_COLUMNS:
            values = pd.to_numeric(group[col], errors="coerce")
            have = values.notna()
            # sample std (ddof=1): NaN for a single seed, shown without ±
            row[f"{col}_mean"], row[f"{col}_std"], row[f"{col}_n"] = values.mean(), values.std(), int(have.sum())
            if not have.all() and runs[col].notna().any() and on_warning is not None:
                missing = _seeds_text(group.loc[~have, "seed"])
                on_warning(f"{ablation}/{variant}{_point_text(profile, grid)}: {col} has values for "
                           f"{int(have.sum())} of {len(group)} seeds (missing: seed {missing}); "
                           f"the table shows n={int(have.sum())}/{len(group)}")
        steps = pd.to_numeric(group["step"], errors="coerce")
        row["step_min"], row["step_max"] = steps.min(), steps.max()
        row["eval_label"] = "; ".join(sorted({x for x in group["eval_label"].fillna("") if x}))
        # where the runs were evaluated (empty for evaluations from before it was recorded)
        row["machines"] = "; ".join(sorted({x for x in group["machine"].fillna("") if x})) \
            if "machine" in group else ""
        row["_settings"] = sorted(set(group["eval_settings"].fillna("")))
        row["paper_ref"] = _first(group["paper_ref"])
        for col in PAPER_COLUMNS.values():
            row[col] = _first(group[col]) if _first(group[col]) is not None else math.nan
        index = group["variant_index"].dropna()
        row["_order"] = (len(index) == 0, index.min() if len(index) else 0, variant, _grid_sort_key(grid))
        row["_base"] = _first(group["base_variant"])
        rows.append(row)
    rows.sort(key=lambda r: (r["ablation"], str(r["profile"]), r["_order"]))  # each profile its own block
    table = pd.DataFrame(rows)
    integer_columns(table, labels)
    _add_deltas(table, on_warning)
    ids = ["ablation", "title", "profile", "variant", "grid", "data_key", *labels, "n_seeds", "seeds", "base",
           "step_min", "step_max", "eval_label", "machines"]
    stats = [f"{c}_{s}" for c in METRIC_COLUMNS for s in ("mean", "std", "n")]
    deltas = [f"{c}_delta" for c in MAIN_METRICS]
    return table[ids + stats + deltas + ["paper_ref", *PAPER_COLUMNS.values()]]


def base_variant(rows: pd.DataFrame) -> str | None:
    """An ablation's base variant: the declared baseline (run.json), else the first variant in table order."""
    declared = rows["_base"] if "_base" in rows else rows["base_variant"]
    named = declared.dropna()
    named = named[named != ""]
    return named.iloc[0] if len(named) else (rows["variant"].iloc[0] if len(rows) else None)


def _settings_difference(mine: list[str], base: list[str]) -> str:
    """What differs between two rows' evaluation settings (each a list of JSON texts): a setting of one that
    the other lacks, compared key by key."""
    a = next((x for x in mine if x not in base), mine[0] if mine else "")
    b = next((x for x in base if x not in mine), base[0] if base else "")
    return settings_diff(a, b)


def _steps_text(row: Any) -> str:
    lo, hi = row["step_min"], row["step_max"]
    if pd.isna(lo) or pd.isna(hi):
        return "?"
    return f"{int(lo)}" if lo == hi else f"{int(lo)}-{int(hi)}"


def _add_deltas(table: pd.DataFrame, on_warning: Callable[[str], None] | None = None) -> None:
    """Add `base` and `<metric>_delta` in place: each row against the base variant at its profile, grid
    point and data; a declared base with no finished run (or none at that point) gives no deltas. A delta
    between rows evaluated at other training steps or with other evaluation settings is kept (it may be what
    was asked for, as with --step or --eval) but reported to on_warning: `--steps` does not pair such runs."""
    base_flags = pd.Series(False, index=table.index)
    deltas = {col: pd.Series(math.nan, index=table.index) for col in MAIN_METRICS}
    for _, rows in table.groupby("ablation", sort=False):
        bases = rows[rows["variant"] == base_variant(rows)]
        base_flags[bases.index] = True
        for i, row in rows.iterrows():
            same = bases[(bases[POINT] == row[POINT]).all(axis=1)]
            if len(same) == 0:
                continue
            for col in MAIN_METRICS:
                deltas[col][i] = row[f"{col}_mean"] - same[f"{col}_mean"].iloc[0]
            base = same.iloc[0]
            if on_warning is None or base_flags[i]:
                continue
            where = f"{row['ablation']}/{row['variant']}{_point_text(row['profile'], row['grid'])}"
            steps, base_steps = _steps_text(row), _steps_text(base)
            if steps != base_steps:
                on_warning(f"{where}: its deltas compare step {steps} with the base {base['variant']}'s step "
                           f"{base_steps} (a run still training, or evaluated at other steps)")
            if row["_settings"] != base["_settings"]:
                on_warning(f"{where}: its deltas compare evaluations with other settings than the base "
                           f"{base['variant']}'s ({_settings_difference(row['_settings'], base['_settings'])})")
    table["base"] = base_flags
    for col in MAIN_METRICS:
        table[f"{col}_delta"] = deltas[col]
