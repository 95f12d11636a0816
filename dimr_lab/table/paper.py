"""Published numbers: the paper's tables shipped as CSVs in dimr_lab/paper/, looked up by a run's reference."""

from __future__ import annotations

import functools
import json
import math
from importlib import resources
from typing import Any

import pandas as pd

from dimr_lab.errors import UserError, unknown_name_message
from dimr_lab.spec.ablation import paper_tables

__all__ = ["PAPER_COLUMNS", "paper_tables", "paper_table", "paper_row", "attach_paper"]

# paper CSV column -> our column; the tables name IS "is"
PAPER_COLUMNS = {
    "fid": "paper_fid",
    "params_m": "paper_params_m",
    "gflops": "paper_gflops",
    "is": "paper_is",
    "precision": "paper_precision",
    "recall": "paper_recall",
    "distortion_rate": "paper_distortion_rate",
}
# our metric column -> its published column
PAPER_OF = {"fid": "paper_fid", "isc": "paper_is", "precision": "paper_precision", "recall": "paper_recall",
            "distortion_rate": "paper_distortion_rate", "params_m": "paper_params_m"}


@functools.lru_cache(maxsize=None)
def paper_table(name: str) -> pd.DataFrame:
    """One published table, read from the package copy."""
    if name not in paper_tables():
        raise UserError(unknown_name_message("paper table", name, paper_tables()))
    with (resources.files("dimr_lab") / "paper" / f"{name}.csv").open("r", encoding="utf-8") as fh:
        return pd.read_csv(fh)


def at_step(ref: Any, step: Any) -> Any:
    """The reference for one evaluated step: `epochs_at` names the published rows of earlier steps (the
    paper's 400-epoch numbers of a run trained to 800); any other step takes the final row."""
    if not isinstance(ref, dict) or not isinstance(ref.get("epochs_at"), dict):
        return ref
    out = {k: v for k, v in ref.items() if k != "epochs_at"}
    try:
        epochs = ref["epochs_at"].get(str(int(step)))
    except (TypeError, ValueError, OverflowError):  # a NaN step: the run's own, final row
        epochs = None
    if epochs is not None:
        out["epochs"] = epochs
    return out


def paper_row(ref: Any) -> dict[str, Any]:
    """The published numbers for a run.json `paper` reference ({table, row} or {table, model[, epochs]})."""
    if not isinstance(ref, dict) or not isinstance(ref.get("table"), str):
        raise UserError("paper reference must be an object with a 'table' name")
    name = ref["table"]
    table = paper_table(name)
    # a hand-edited run.json may hold anything: a list here would reach pandas' == and fail there
    for key, kinds in (("row", (int,)), ("model", (str,)), ("epochs", (int, type(None)))):
        if key in ref and (isinstance(ref[key], bool) or not isinstance(ref[key], kinds)):
            raise UserError(f"paper reference: '{key}' must be {'text' if key == 'model' else 'a whole number'}, "
                            f"got {json.dumps(ref[key], default=str)[:40]}")
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


def attach_paper(runs: pd.DataFrame) -> list[str]:
    """Fill paper_ref and the paper_* columns of runs in place (from its `paper` JSON); a bad reference
    warns once and leaves them empty."""
    warnings = []
    values: dict[str, list[Any]] = {col: [] for col in ("paper_ref", *PAPER_COLUMNS.values())}
    looked_up: dict[tuple[str, Any], dict[str, Any]] = {}
    for ref, folder, step in zip(runs["paper"], runs["folder"], runs["step"]):
        found: dict[str, Any] = {}
        if isinstance(ref, str) and ref:
            if (ref, step) not in looked_up:
                try:
                    looked_up[ref, step] = paper_row(at_step(json.loads(ref), step))
                except UserError as err:
                    looked_up[ref, step] = {}
                    line = f"{folder}: paper reference {ref}: {err}"
                    if line not in warnings:
                        warnings.append(line)
            found = looked_up[ref, step]
        for col in values:
            values[col].append(found.get(col, None if col == "paper_ref" else math.nan))
    for col, column in values.items():
        runs[col] = pd.Series(column, index=runs.index, dtype=object if col == "paper_ref" else float)
    return warnings
