"""Paper-style tables over a results tree: one row per variant, mean ± std over seeds, deltas, paper numbers."""

from __future__ import annotations

import functools
import io
import json
import math
import os
import sys
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from dimr_lab.errors import UserError, unknown_name_message

FORMATS = ("rich", "markdown", "latex", "csv")

# metrics.json key -> runs column; params is rescaled to millions so every table shows the paper's unit
METRICS = {
    "params": "params_m",
    "gmacs": "gmacs",
    "fid": "fid",
    "kid": "kid",
    "isc": "isc",
    "precision": "precision",
    "recall": "recall",
    "sample_accuracy": "sample_accuracy",
    "distortion_rate": "distortion_rate",
    "train_images_per_s": "train_images_per_s",
}
# the metrics a variant is judged by, so each gets a delta to the base row
MAIN_METRICS = ("fid", "kid", "isc", "precision", "recall", "sample_accuracy", "distortion_rate")
# per-run extras kept in the runs frame (not aggregated)
EXTRAS = ("kid_std", "isc_std", "steps", "wall_s")

# paper CSV column -> our column; tables name IS "is"
PAPER_COLUMNS = {
    "fid": "paper_fid",
    "params_m": "paper_params_m",
    "gflops": "paper_gflops",
    "is": "paper_is",
    "precision": "paper_precision",
    "recall": "paper_recall",
    "distortion_rate": "paper_distortion_rate",
}

# (header, column, decimals) of the human formats, in display order
_DISPLAY = (
    ("Params (M)", "params_m", 1),
    ("GMACs", "gmacs", 3),
    ("FID", "fid", 2),
    ("ΔFID", "fid_delta", 2),
    ("KID", "kid", 4),
    ("IS", "isc", 2),
    ("ΔIS", "isc_delta", 2),
    ("Precision", "precision", 3),
    ("Recall", "recall", 3),
    ("Sample acc.", "sample_accuracy", 3),
    ("Distortion", "distortion_rate", 3),
    ("img/s", "train_images_per_s", 1),
    ("Paper FID", "paper_fid", 2),
    ("Paper IS", "paper_is", 2),
    ("Paper prec.", "paper_precision", 2),
    ("Paper rec.", "paper_recall", 2),
    ("Paper params (M)", "paper_params_m", 1),
    ("Paper GFLOPs", "paper_gflops", 0),
    ("Paper distortion", "paper_distortion_rate", 3),
)

# architecture numbers, the same for every seed: shown without ± (the csv keeps their std)
_CONSTANT = ("params_m", "gmacs")

_RUN_FILES = ("run.json", "metrics.json", "spec.json")


# ---------------------------------------------------------------- published numbers


def paper_tables() -> list[str]:
    """Names of the published tables shipped in dimr_lab/paper/."""
    folder = resources.files("dimr_lab") / "paper"
    return sorted(p.name[: -len(".csv")] for p in folder.iterdir() if p.name.endswith(".csv"))


@functools.lru_cache(maxsize=None)
def paper_table(name: str) -> pd.DataFrame:
    """One published table, read from the package copy."""
    if name not in paper_tables():
        raise UserError(unknown_name_message("paper table", name, paper_tables()))
    with (resources.files("dimr_lab") / "paper" / f"{name}.csv").open("r", encoding="utf-8") as fh:
        return pd.read_csv(fh)


def paper_row(ref: Any) -> dict[str, Any]:
    """The published numbers for a run.json `paper` reference ({table, row} or {table, model[, epochs]})."""
    if not isinstance(ref, dict) or not isinstance(ref.get("table"), str):
        raise UserError("paper reference must be an object with a 'table' name")
    name = ref["table"]
    table = paper_table(name)
    if "row" in ref:
        if "row" not in table.columns:
            raise UserError(f"paper table {name} has no row numbers; refer to a model")
        hit = table[table["row"] == ref["row"]]
        label = f"{name} row {ref['row']}"
    elif "model" in ref:
        models = [ref["model"]]
        epochs = ref.get("epochs")
        if epochs is not None and "epochs" not in table.columns:
            # distortion_rate names the epochs inside the model name
            models.append(f"{ref['model']} ({epochs} epochs)")
        hit = table[table["model"].isin(models)]
        if epochs is not None and "epochs" in table.columns:
            hit = hit[hit["epochs"] == epochs]
        label = f"{name} {ref['model']}" + (f" ({epochs} ep)" if epochs is not None else "")
    else:
        raise UserError("paper reference needs 'row' or 'model'")
    if len(hit) == 0:
        raise UserError(f"no {label} in the published numbers")
    if len(hit) > 1:
        raise UserError(f"{label} matches {len(hit)} published rows; add 'epochs'")
    row = hit.iloc[0]
    out: dict[str, Any] = {"paper_ref": label}
    for src, dst in PAPER_COLUMNS.items():
        if src in table.columns and pd.notna(row[src]):
            out[dst] = float(row[src])
    return out


# ---------------------------------------------------------------- collecting runs


def _run_folders(root: Path) -> list[Path]:
    """Every folder below root that holds a run file; run folders are not searched further."""
    found = []
    for here, dirs, files in os.walk(root):
        if any(f in files for f in _RUN_FILES):
            found.append(Path(here))
            dirs[:] = []
        else:
            dirs.sort()
    return sorted(found)


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from path; UserError describing what is wrong otherwise."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path.name} cannot be read ({err})") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{path.name} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path.name} is not a JSON object")
    return data


def _number(value: Any) -> float | None:
    """value as a float, None for null or anything that is not a number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _scalar(value: Any) -> Any:
    """A factor or grid value pandas can group and print: lists and objects become JSON."""
    return value if value is None or isinstance(value, (str, int, float, bool)) else json.dumps(value)


def _read_run(folder: Path) -> tuple[dict[str, Any], list[str]]:
    """One finished run as a flat record plus warnings about individual values; UserError to skip it."""
    if not (folder / "run.json").is_file():
        raise UserError("no run.json")
    run = _read_json(folder / "run.json")
    for key, kind in (("ablation", str), ("variant", str), ("seed", int)):
        if not isinstance(run.get(key), kind) or isinstance(run.get(key), bool):
            raise UserError(f"run.json: '{key}' missing or not a {kind.__name__}")
    if not (folder / "metrics.json").is_file():
        raise UserError("unfinished (no metrics.json)")
    metrics = _read_json(folder / "metrics.json")
    notes = []
    record: dict[str, Any] = {
        "ablation": run["ablation"],
        "title": run.get("title") or run["ablation"],
        "profile": run.get("profile") or "",
        "variant": run["variant"],
        "variant_index": _number(run.get("variant_index")),
        "seed": run["seed"],
        "base_variant": run.get("baseline"),
        "grid": json.dumps(run.get("grid") or {}, sort_keys=True),
        "folder": str(folder),
        "paper": json.dumps(run["paper"], sort_keys=True) if run.get("paper") else None,
    }
    for kind in ("factor", "grid"):
        values = run.get("factors" if kind == "factor" else "grid") or {}
        if not isinstance(values, dict):
            raise UserError(f"run.json: '{kind}s' is not an object")
        record.update({f"{kind}.{k}": _scalar(v) for k, v in values.items()})
    for key in (*METRICS, *EXTRAS):
        value = metrics.get(key)
        if value is not None and _number(value) is None:
            notes.append(f"metrics.json: {key}={value!r} is not a number; left empty")
        number = _number(value)
        if key == "params" and number is not None:
            number /= 1e6
        record[METRICS.get(key, key)] = number
    record["metrics_mtime"] = (folder / "metrics.json").stat().st_mtime
    return record, notes


def collect(results_dir: str | Path) -> tuple[pd.DataFrame, list[str]]:
    """Every finished run below results_dir as a row (factor.*/grid.* columns), plus warning lines."""
    root = Path(results_dir)
    if not root.is_dir():
        raise UserError(f"results folder {root} does not exist")
    records, warnings = [], []
    for folder in _run_folders(root):
        try:
            record, notes = _read_run(folder)
        except UserError as err:
            warnings.append(f"skipped {folder}: {err}")
            continue
        warnings.extend(f"{folder}: {note}" for note in notes)
        records.append(record)
    runs = pd.DataFrame.from_records(records)
    if runs.empty:
        return runs, warnings
    runs, dropped = _drop_superseded(runs)
    warnings.extend(dropped)
    warnings.extend(_attach_paper(runs))
    return runs.drop(columns=["metrics_mtime"]).reset_index(drop=True), warnings


def _drop_superseded(runs: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Keep the newest of several runs of one variant and seed (a changed spec gets a new folder)."""
    key = ["ablation", "profile", "variant", "grid", "seed"]
    runs = runs.sort_values("metrics_mtime", ascending=False, kind="stable")
    dup = runs.duplicated(key, keep="first")
    newest = runs[~dup].set_index(key)["folder"]
    warnings = [
        f"skipped {row.folder}: superseded by the newer {newest.loc[tuple(row[k] for k in key)]}"
        for _, row in runs[dup].iterrows()
    ]
    return runs[~dup].sort_values("folder", kind="stable"), warnings


def _attach_paper(runs: pd.DataFrame) -> list[str]:
    """Fill the paper_* columns in place; a bad reference warns once and leaves them empty."""
    warnings = []
    for col in ("paper_ref", *PAPER_COLUMNS.values()):
        runs[col] = None if col == "paper_ref" else math.nan
    for ref, idx in runs.groupby("paper", sort=False).groups.items():
        try:
            values = paper_row(json.loads(ref))
        except UserError as err:
            warnings.append(f"{runs.loc[idx[0], 'folder']}: paper reference {ref}: {err}")
            continue
        for col, value in values.items():
            runs.loc[idx, col] = value
    return warnings


# ---------------------------------------------------------------- aggregating


def _grid_sort_key(grid_json: str) -> tuple:
    """Order grid points by their values, numbers before text."""
    return tuple(
        (k, 0, v, "") if isinstance(v, (int, float)) else (k, 1, 0, str(v))
        for k, v in sorted(json.loads(grid_json).items())
    )


def aggregate(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per ablation, profile, variant and grid point: mean/std over seeds, deltas, paper numbers."""
    if runs.empty:
        return pd.DataFrame()
    labels = [c for c in runs.columns if c.startswith(("factor.", "grid."))]
    rows = []
    for (ablation, profile, variant, grid), group in runs.groupby(
        ["ablation", "profile", "variant", "grid"], sort=False, dropna=False
    ):
        row: dict[str, Any] = {"ablation": ablation, "title": group["title"].iloc[0], "profile": profile,
                               "variant": variant, "grid": grid}
        for col in labels:
            present = group[col].dropna()
            row[col] = present.iloc[0] if len(present) else None
        row["n_seeds"] = len(group)
        row["seeds"] = ",".join(str(s) for s in sorted(group["seed"]))
        for col in METRICS.values():
            # sample std (ddof=1): NaN for a single seed, shown without ±
            row[f"{col}_mean"] = group[col].mean()
            row[f"{col}_std"] = group[col].std()
        row["paper_ref"] = group["paper_ref"].dropna().iloc[0] if group["paper_ref"].notna().any() else None
        for col in PAPER_COLUMNS.values():
            row[col] = group[col].dropna().iloc[0] if group[col].notna().any() else math.nan
        index = group["variant_index"].dropna()
        row["_order"] = (len(index) == 0, index.min() if len(index) else 0, variant, _grid_sort_key(grid))
        base = group["base_variant"].dropna()
        row["_base"] = base.iloc[0] if len(base) else None
        rows.append(row)
    rows.sort(key=lambda r: (r["ablation"], r["_order"]))
    table = pd.DataFrame(rows)
    _add_deltas(table)
    ids = ["ablation", "title", "profile", "variant", *labels, "n_seeds", "seeds", "base"]
    stats = [f"{c}_{s}" for c in METRICS.values() for s in ("mean", "std")]
    deltas = [f"{c}_delta" for c in MAIN_METRICS]
    return table[ids + stats + deltas + ["paper_ref", *PAPER_COLUMNS.values()]]


def _add_deltas(table: pd.DataFrame) -> None:
    """Add `base` and `<metric>_delta` in place: each row against the base variant at its profile and grid."""
    table["base"] = False
    for col in MAIN_METRICS:
        table[f"{col}_delta"] = math.nan
    for _, rows in table.groupby("ablation", sort=False):
        named = rows["_base"].dropna()
        # no declared base: the first variant in table order; a declared base with no finished run: no deltas
        base_variant = named.iloc[0] if len(named) else rows["variant"].iloc[0]
        bases = rows[rows["variant"] == base_variant]
        table.loc[bases.index, "base"] = True
        for i, row in rows.iterrows():
            same_profile = bases[bases["profile"] == row["profile"]]
            same_grid = same_profile[same_profile["grid"] == row["grid"]]
            base = same_grid if len(same_grid) else same_profile
            if len(base) == 0:
                continue
            for col in MAIN_METRICS:
                table.loc[i, f"{col}_delta"] = row[f"{col}_mean"] - base[f"{col}_mean"].iloc[0]


# ---------------------------------------------------------------- steps between paper rows

VERDICTS = ("agrees, beyond the seed spread", "agrees, within the seed spread",
            "opposite, within the seed spread", "opposite, beyond the seed spread")


def step_deltas(runs: pd.DataFrame, metric: str = "fid") -> pd.DataFrame:
    """Each step between consecutive variants that carry a published number (in variant order): our change
    of `metric` (mean over seeds) beside the paper's, whether the signs agree, and whether ours is beyond
    the seed spread (the two variants' per-seed ranges do not overlap)."""
    paper_col = PAPER_COLUMNS.get(metric, f"paper_{metric}")
    if runs.empty or paper_col not in runs:
        return pd.DataFrame()
    records = []
    for (ablation, profile, grid), group in runs.groupby(["ablation", "profile", "grid"], sort=False):
        first = group[group[paper_col].notna()].groupby("variant", sort=False)["variant_index"].min()
        order = sorted(first.index, key=lambda v: (first[v], v))
        for prev, cur in zip(order, order[1:]):
            a = group.loc[group["variant"] == prev, metric].dropna()
            b = group.loc[group["variant"] == cur, metric].dropna()
            if a.empty or b.empty:
                continue
            ours = float(b.mean() - a.mean())
            paper = float(group.loc[group["variant"] == cur, paper_col].iloc[0]
                          - group.loc[group["variant"] == prev, paper_col].iloc[0])
            beyond = bool(b.min() > a.max() or b.max() < a.min())
            if paper == 0 or ours == 0:
                verdict = "no sign to compare"
            else:
                agrees = (ours > 0) == (paper > 0)
                verdict = VERDICTS[(0 if beyond else 1) if agrees else (3 if beyond else 2)]
            records.append({"ablation": ablation, "profile": profile, "grid": grid, "step": f"{prev} → {cur}",
                            "from_mean": float(a.mean()), "from_min": float(a.min()), "from_max": float(a.max()),
                            "to_mean": float(b.mean()), "to_min": float(b.min()), "to_max": float(b.max()),
                            "n_seeds": f"{len(a)}/{len(b)}", "ours_delta": ours, "paper_delta": paper,
                            "beyond_spread": beyond, "verdict": verdict})
    return pd.DataFrame.from_records(records)


def format_steps(steps: pd.DataFrame, fmt: str = "markdown", metric: str = "fid") -> str:
    """The step table in a human format (rich/markdown) or csv."""
    if fmt == "csv":
        return steps.to_csv(index=False)
    name = metric.upper() if metric in ("fid", "kid") else metric
    header = ["Ablation", "Profile", "Step", f"Ours {name} (seed range)", "Ours Δ", "Paper Δ", "Verdict"]
    body = [[r.ablation, r.profile, r.step,
             f"{r.from_mean:.2f} [{r.from_min:.2f}, {r.from_max:.2f}] → {r.to_mean:.2f} [{r.to_min:.2f}, "
             f"{r.to_max:.2f}]", f"{r.ours_delta:+.2f}", f"{r.paper_delta:+.2f}", r.verdict]
            for r in steps.itertuples()]
    if fmt == "rich":
        from rich.console import Console
        from rich.table import Table

        console = Console(file=io.StringIO(), width=400, color_system=None, highlight=False)
        out = Table(title=f"Steps between published rows: {name}", title_justify="left")
        for h in header:
            out.add_column(h, no_wrap=True)
        for cells in body:
            out.add_row(*cells)
        console.print(out)
        return "\n".join(line.rstrip() for line in console.file.getvalue().splitlines()) + "\n"
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |" for cells in body]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- rendering


def _fmt(value: Any, decimals: int) -> str:
    """A number with fixed decimals; empty for missing."""
    return "" if value is None or pd.isna(value) else f"{value:.{decimals}f}"


def _cells(rows: pd.DataFrame) -> tuple[list[str], list[list[str]], int]:
    """Header, cells and count of leading text columns of one ablation; empty columns are left out."""
    labels = [c for c in rows.columns if c.startswith(("factor.", "grid.")) and rows[c].notna().any()]
    columns: list[tuple[str, list[str]]] = [("Variant", [v + (" (base)" if b else "")
                                                         for v, b in zip(rows["variant"], rows["base"])])]
    if rows["profile"].nunique() > 1:
        columns.append(("Profile", list(rows["profile"])))
    columns += [(c.split(".", 1)[1], ["" if pd.isna(v) else str(v) for v in rows[c]]) for c in labels]
    n_text = len(columns)
    columns.append(("Seeds", [str(n) for n in rows["n_seeds"]]))
    for header, col, decimals in _DISPLAY:
        if col.endswith("_delta"):
            if rows[col].notna().sum() <= 1:
                continue
            cells = ["base" if b else ("" if pd.isna(v) else f"{v:+.{decimals}f}")
                     for v, b in zip(rows[col], rows["base"])]
        elif col.startswith("paper_"):
            cells = [_fmt(v, decimals) for v in rows[col]]
        elif col in _CONSTANT:
            cells = [_fmt(v, decimals) for v in rows[f"{col}_mean"]]
        else:
            mean, std = rows[f"{col}_mean"], rows[f"{col}_std"]
            cells = [_fmt(m, decimals) + (f" ± {s:.{decimals}f}" if pd.notna(m) and pd.notna(s) else "")
                     for m, s in zip(mean, std)]
        if any(cells):
            columns.append((header, cells))
    return [h for h, _ in columns], [list(r) for r in zip(*(c for _, c in columns))], n_text


def _ablations(table: pd.DataFrame):
    """(ablation, title, rows) per ablation in table order."""
    for ablation, rows in table.groupby("ablation", sort=False):
        yield ablation, rows["title"].iloc[0], rows


def _render_rich(table: pd.DataFrame) -> str:
    """rich Tables, one per ablation, as plain text."""
    from rich.console import Console
    from rich.table import Table

    # wide virtual console: tables take only the width they need, and cells never wrap
    console = Console(file=io.StringIO(), width=400, color_system=None, highlight=False)
    for ablation, title, rows in _ablations(table):
        header, body, n_text = _cells(rows)
        out = Table(title=f"{title} ({ablation})", title_justify="left")
        for i, h in enumerate(header):
            out.add_column(h, justify="left" if i < n_text else "right", no_wrap=True)
        for cells in body:
            out.add_row(*cells)
        console.print(out)
    # the wide console pads titles to its width
    return "\n".join(line.rstrip() for line in console.file.getvalue().splitlines()) + "\n"


def _render_markdown(table: pd.DataFrame) -> str:
    """A heading and a pipe table per ablation."""
    parts = []
    for ablation, title, rows in _ablations(table):
        header, body, n_text = _cells(rows)
        esc = lambda s: s.replace("|", "\\|")  # noqa: E731
        lines = [f"## {title} (`{ablation}`)", "", "| " + " | ".join(map(esc, header)) + " |",
                 "|" + "|".join(":---" if i < n_text else "---:" for i in range(len(header))) + "|"]
        lines += ["| " + " | ".join(map(esc, cells)) + " |" for cells in body]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


_LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def _latex(text: str) -> str:
    """text with LaTeX specials escaped and ± / Δ as math."""
    out = "".join(_LATEX_ESCAPES.get(ch, ch) for ch in text)
    return out.replace(" ± ", r" $\pm$ ").replace("Δ", r"$\Delta$")


def _render_latex(table: pd.DataFrame) -> str:
    """A booktabs tabular per ablation, its title as a comment above it."""
    parts = []
    for ablation, title, rows in _ablations(table):
        header, body, n_text = _cells(rows)
        lines = [f"% {title} ({ablation})", r"\begin{tabular}{" + "l" * n_text + "r" * (len(header) - n_text) + "}",
                 r"\toprule",
                 " & ".join(map(_latex, header)) + r" \\", r"\midrule"]
        lines += [" & ".join(map(_latex, cells)) + r" \\" for cells in body]
        lines += [r"\bottomrule", r"\end{tabular}"]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def format_table(table: pd.DataFrame, fmt: str = "rich") -> str:
    """An aggregated table as text: rich, markdown, latex or csv (csv keeps the raw numbers)."""
    if fmt not in FORMATS:
        raise UserError(unknown_name_message("table format", fmt, FORMATS))
    if fmt == "csv":
        return table.to_csv(index=False)
    return {"rich": _render_rich, "markdown": _render_markdown, "latex": _render_latex}[fmt](table)


def plot_fid(table: pd.DataFrame, path: str | Path) -> None:
    """A PNG bar chart of FID (± std over seeds) per variant, one panel per ablation; paper FID as markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(_ablations(table))
    widths = [max(3.0, 0.8 * len(rows) + 1.5) for _, _, rows in groups]
    fig, axes = plt.subplots(1, len(groups), figsize=(sum(widths), 4.0), squeeze=False,
                             gridspec_kw={"width_ratios": widths})
    for ax, (ablation, title, rows) in zip(axes[0], groups):
        x = range(len(rows))
        ax.bar(x, rows["fid_mean"].fillna(0), yerr=rows["fid_std"].fillna(0), capsize=3, color="tab:blue",
               label="ours")
        if rows["paper_fid"].notna().any():
            ax.plot(x, rows["paper_fid"], "rx", markersize=8, label="paper")
            ax.legend(fontsize=8)
        labels = [f"{v}\n{g}" if g else v for v, g in zip(rows["variant"], _grid_labels(rows))]
        ax.set_xticks(list(x), labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel("FID (lower is better)")
        if rows["fid_mean"].isna().all():
            ax.text(0.5, 0.5, "no FID", transform=ax.transAxes, ha="center")
    fig.tight_layout()
    try:
        fig.savefig(path, format="png", dpi=120)
    except OSError as err:
        raise UserError(f"cannot write the plot to {path}: {err.strerror or err}") from None
    finally:
        plt.close(fig)


def _grid_labels(rows: pd.DataFrame) -> list[str]:
    """'key=value' text of each row's grid point, for tick labels."""
    cols = [c for c in rows.columns if c.startswith("grid.") and rows[c].notna().any()]
    return [" ".join(f"{c[5:]}={row[c]}" for c in cols if pd.notna(row[c])) for _, row in rows.iterrows()]


def _warn_stderr(line: str) -> None:
    """One warning line on stderr."""
    print(f"warning: {line}", file=sys.stderr)


def render_table(results_dir: str | Path, fmt: str = "rich", plot: str | Path | None = None,
                 on_warning: Callable[[str], None] | None = None, steps: bool = False) -> str:
    """collect + aggregate + format_table (+ plot_fid); warnings go to on_warning (default: stderr)."""
    if fmt not in FORMATS:
        raise UserError(unknown_name_message("table format", fmt, FORMATS))
    runs, warnings = collect(results_dir)
    for line in warnings:
        (on_warning or _warn_stderr)(line)
    if runs.empty:
        raise UserError(f"no finished runs under {results_dir}")
    if steps:
        if fmt == "latex":
            raise UserError("--steps: formats rich, markdown or csv")
        found = step_deltas(runs)
        if found.empty:
            raise UserError(f"no two variants with published numbers under {results_dir}")
        return format_steps(found, fmt)
    table = aggregate(runs)
    if plot is not None:
        plot_fid(table, plot)
    return format_table(table, fmt)
