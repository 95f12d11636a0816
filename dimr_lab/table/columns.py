"""Which columns a table shows and their cells: the compact default, --metrics, --columns and --wide."""

from __future__ import annotations

from typing import Any, Iterable

import pandas as pd

from dimr_lab.errors import UserError, unknown_name_message
from dimr_lab.table.aggregate import label_columns
from dimr_lab.table.paper import PAPER_COLUMNS, PAPER_OF
from dimr_lab.table.render import FIT, Section, render
from dimr_lab.table.values import (ALIASES, CONSTANT, LABELS, MAIN_METRICS, METRIC_COLUMNS, decimals, fixed,
                                   is_missing, label, mean_std, quietly)

FORMATS = ("rich", "markdown", "latex", "csv")
DEFAULT_METRICS = ("fid", "sample_accuracy")
# --columns: the optional columns beside Variant and the metrics (documented in `dimr-lab table --help`)
OPTIONAL_COLUMNS = {
    "factors": "the factor and grid labels that vary between rows",
    "seeds": "the number of seeds",
    "params": "parameters (M)",
    "gmacs": "GMACs per image",
    "imgs": "training images/s",
    "delta": "Δ of the first metric to the base variant",
    "paper": "the paper's number of the first metric",
    "floor": "the FID floor of the evaluation (real vs real)",
    "step": "the evaluation's step and settings",
}
DEFAULT_COLUMNS = ("factors", "seeds", "params", "gmacs", "delta", "paper")
# under a table that shows published numbers beside ours: they are not the same measurement
PAPER_LEGEND = ("Paper columns: the published numbers, measured with the paper's protocol (Inception features, "
                "50K samples, the paper's data and scale). Ours are measured with each run's own extractor, "
                "sample count and data (the FID floor in the title is that evaluation's real-against-real "
                "value): compare the signs and order of differences, not the values.")
PAPER_LABELS = {"paper_fid": "Paper FID", "paper_is": "Paper IS", "paper_precision": "Paper prec.",
                "paper_recall": "Paper rec.", "paper_params_m": "Paper params (M)", "paper_gflops": "Paper GFLOPs",
                "paper_distortion_rate": "Paper distortion"}


def _names(value: str | Iterable[str] | None) -> list[str]:
    """'a,b' or ['a', 'b'] as names (blanks dropped)."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else [p for v in value for p in str(v).split(",")]
    return [p.strip() for p in items if p.strip()]


def parse_metrics(metrics: str | Iterable[str] | None) -> list[str] | None:
    """--metrics fid,kid,isc as metric columns (None: the default, fid and sample accuracy where present)."""
    names = _names(metrics)
    if not names:
        return None
    out = []
    for name in names:
        col = ALIASES.get(name, name)
        if col not in METRIC_COLUMNS:
            raise UserError("--metrics: " + unknown_name_message("metric column", name, [*METRIC_COLUMNS, *ALIASES]))
        out.append(col)
    return list(dict.fromkeys(out))


def parse_columns(columns: str | Iterable[str] | None) -> list[str]:
    """--columns a,b: exactly these optional columns; '+a,b' adds them to the default ones."""
    names = _names(columns)
    if not names:
        return list(DEFAULT_COLUMNS)
    add = names[0].startswith("+")
    names = [n.lstrip("+") for n in names]
    for name in names:
        if name not in OPTIONAL_COLUMNS:
            raise UserError("--columns: " + unknown_name_message("table column", name, OPTIONAL_COLUMNS))
    return list(dict.fromkeys([*DEFAULT_COLUMNS, *names] if add else names))


# ------------------------------------------------------------------------------------ cells

def _range(lo: float, hi: float, places: int = 0) -> str:
    return f"{lo:.{places}f}" if lo == hi else f"{lo:.{places}f}–{hi:.{places}f}"


def _step_cells(rows: pd.DataFrame) -> list[str]:
    cells = []
    for lo, hi, what in zip(rows["step_min"], rows["step_max"], rows["eval_label"].fillna("")):
        step = "" if is_missing(lo) else _range(lo, hi)
        cells.append(" ".join(p for p in (step, f"({what})" if what else "") if p))
    return cells


def _metric_cells(rows: pd.DataFrame, col: str) -> list[str]:
    places = decimals(rows[f"{col}_mean"])
    if col in CONSTANT:  # the same for every seed: no spread to show
        return [fixed(v, places) for v in rows[f"{col}_mean"]]
    gap = bool(rows[f"{col}_n"].sum() > 0)
    return [mean_std(m, s, n, runs, places, gap=gap)
            for m, s, n, runs in zip(rows[f"{col}_mean"], rows[f"{col}_std"], rows[f"{col}_n"], rows["n_seeds"])]


def _delta_cells(rows: pd.DataFrame, col: str) -> list[str]:
    places = decimals(rows[f"{col}_mean"])
    return ["base" if b else fixed(v, places, sign=True) for v, b in zip(rows[f"{col}_delta"], rows["base"])]


def _label_columns(rows: pd.DataFrame, every: bool) -> list[str]:
    """Factor/grid columns to show: those that vary between the rows (every: those with any value)."""
    out = []
    for col in label_columns(rows):
        cells = [label(v) for v in rows[col]]
        if any(cells) and (every or len(set(cells)) > 1):
            out.append(col)
    return out


def _notes(rows: pd.DataFrame, metrics: list[str], shown: set[str], step_given: bool) -> list[str]:
    """What the title line must say: a step that differs between runs (or was asked for), evaluation
    settings other than the planned ones, the FID floor."""
    notes = []
    if rows["profile"].nunique() == 1 and rows["profile"].iloc[0]:
        notes.append(f"profile {rows['profile'].iloc[0]}")
    lo, hi = rows["step_min"].min(), rows["step_max"].max()
    if not is_missing(lo) and "step" not in shown:
        if lo != hi:
            notes.append(f"evaluated at steps {_range(lo, hi)} (not the same for every run)")
        elif step_given:
            notes.append(f"step {lo:.0f}")
    labels = sorted({x for x in rows["eval_label"].fillna("") if x})
    if labels and "step" not in shown:
        planned = (rows["eval_label"].fillna("") == "").any()
        notes.append(("settings differ between runs: " if planned else "evaluation settings ")
                     + "; ".join(labels) + (" (and the planned ones)" if planned else " (not the planned ones)"))
    floors = rows["fid_floor_mean"].dropna()
    if "fid" in metrics and len(floors) and "floor" not in shown:
        places = decimals(floors)
        notes.append(f"FID floor (real vs real) {_range(floors.min(), floors.max(), places)}")
    return notes


def _section(rows: pd.DataFrame, metrics: list[str] | None, shown: list[str], wide: bool,
             step_given: bool) -> Section:
    """One ablation's table: a list of (header, cells) columns, empty ones left out."""
    present = list(metrics) if metrics is not None else [m for m in DEFAULT_METRICS if rows[f"{m}_n"].sum() > 0]
    if wide:
        present = [m for m in METRIC_COLUMNS if m not in CONSTANT and m != "train_images_per_s"]
        shown = [*OPTIONAL_COLUMNS]
    first = (present or ["fid"])[0]
    columns: list[tuple[str, list[str]]] = [("Variant", [v + (" (base)" if b else "")
                                                         for v, b in zip(rows["variant"], rows["base"])])]
    if rows["profile"].nunique() > 1:
        columns.append(("Profile", list(rows["profile"])))
    if rows["data_key"].nunique() > 1:
        columns.append(("Data", list(rows["data_key"])))
    if "factors" in shown:
        columns += [(c.split(".", 1)[1], [label(v) for v in rows[c]]) for c in _label_columns(rows, wide)]
    n_text = len(columns)
    if "seeds" in shown:
        columns.append(("Seeds", [str(n) for n in rows["n_seeds"]]))
    for name, col in (("params", "params_m"), ("gmacs", "gmacs")):
        if name in shown and col not in present:
            columns.append((LABELS[col], _metric_cells(rows, col)))
    for col in present:
        columns.append((LABELS[col], _metric_cells(rows, col)))
        if col in MAIN_METRICS and (wide or ("delta" in shown and col == first)):
            columns.append((f"Δ{LABELS[col]}", _delta_cells(rows, col)))
    if "floor" in shown and "fid_floor" not in present:
        columns.append(("FID floor", _metric_cells(rows, "fid_floor")))
    if "imgs" in shown:
        columns.append((LABELS["train_images_per_s"], _metric_cells(rows, "train_images_per_s")))
    if "step" in shown:
        columns.append(("Step", _step_cells(rows)))
    papers = list(PAPER_COLUMNS.values()) if wide else ([PAPER_OF[first]] if first in PAPER_OF else [])
    if "paper" in shown:
        for col in papers:
            columns.append((PAPER_LABELS[col], [fixed(v, decimals(rows[col])) for v in rows[col]]))
    # a column with nothing to say (no values, or only the base row's "base") is left out
    kept = [(h, cells) for i, (h, cells) in enumerate(columns)
            if i < n_text or any(c not in ("", "base") for c in cells)]
    return Section(title=rows["title"].iloc[0], key=rows["ablation"].iloc[0], header=[h for h, _ in kept],
                   rows=[list(r) for r in zip(*(cells for _, cells in kept))], n_text=n_text,
                   notes=_notes(rows, present, set(shown), step_given))


def sections(table: pd.DataFrame, *, metrics: Any = None, columns: Any = None, wide: bool = False,
             step_given: bool = False) -> list[Section]:
    """The sections (one per ablation, in table order) of an aggregated table."""
    chosen, shown = parse_metrics(metrics), parse_columns(columns)
    return [_section(rows, chosen, shown, wide, step_given) for _, rows in table.groupby("ablation", sort=False)]


@quietly
def format_table(table: pd.DataFrame, fmt: str = "rich", *, metrics: Any = None, columns: Any = None,
                 wide: bool = False, step_given: bool = False) -> str:
    """An aggregated table as text: rich, markdown or latex (compact unless wide), or csv (every column,
    raw numbers)."""
    if fmt not in FORMATS:
        raise UserError("--format: " + unknown_name_message("table format", fmt, FORMATS))
    if fmt == "csv":
        return table.to_csv(index=False)
    found = sections(table, metrics=metrics, columns=columns, wide=wide, step_given=step_given)
    papers = set(PAPER_LABELS.values())
    legend = PAPER_LEGEND if any(h in papers for sec in found for h in sec.header) else ""
    return render(found, fmt, legend, fit=None if wide else FIT)
