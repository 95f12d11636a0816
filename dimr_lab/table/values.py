"""The numbers of the table layer: which metrics there are, how odd JSON values become numbers, how cells print."""

from __future__ import annotations

import contextlib
import functools
import json
import math
import warnings
from typing import Any, Callable, Iterator, TypeVar

import numpy as np
import pandas as pd

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
    "fid_floor": "fid_floor",
    "train_images_per_s": "train_images_per_s",
}
METRIC_COLUMNS = tuple(METRICS.values())
# the metrics a variant is judged by: each gets a delta to the base row
MAIN_METRICS = ("fid", "kid", "isc", "precision", "recall", "sample_accuracy", "distortion_rate")
HIGHER_IS_BETTER = frozenset({"isc", "precision", "recall", "sample_accuracy"})
# architecture numbers, the same for every seed: shown without ±
CONSTANT = ("params_m", "gmacs")

LABELS = {
    "params_m": "Params (M)",
    "gmacs": "GMACs",
    "fid": "FID",
    "kid": "KID",
    "isc": "IS",
    "precision": "Precision",
    "recall": "Recall",
    "sample_accuracy": "Sample acc.",
    "distortion_rate": "Distortion",
    "fid_floor": "FID floor",
    "train_images_per_s": "img/s",
}
# names a user may type for a metric (--metrics)
ALIASES = {"is": "isc", "params": "params_m", "imgs": "train_images_per_s", "floor": "fid_floor",
           "accuracy": "sample_accuracy", "distortion": "distortion_rate"}

F = TypeVar("F", bound=Callable[..., Any])


# ------------------------------------------------------------------------------------ quiet pandas

@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """No pandas/numpy chatter (FutureWarning, SettingWithCopy, mean of empty slice) on the user's terminal."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        # pandas < 3 warns SettingWithCopy, pandas 3 ChainedAssignmentError: whichever this pandas has
        for name in ("SettingWithCopyWarning", "ChainedAssignmentError", "PerformanceWarning"):
            if isinstance(getattr(pd.errors, name, None), type):
                warnings.simplefilter("ignore", getattr(pd.errors, name))
        yield


def quietly(fn: F) -> F:
    """Decorator: run fn inside quiet()."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with quiet():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


# ------------------------------------------------------------------------------------ JSON values

def number(value: Any) -> tuple[float, str]:
    """(value as a finite float, "") or (NaN, why it is not a number); null is NaN without a reason."""
    if value is None:
        return math.nan, ""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        return math.nan, "is not a number"
    try:
        out = float(value)
    except OverflowError:  # an integer beyond float range
        return math.nan, "is too large"
    if not math.isfinite(out):
        return math.nan, "is not finite"
    return out, ""


def scalar(value: Any) -> Any:
    """A factor or grid value pandas can group and print: lists and objects become JSON text."""
    if value is None or isinstance(value, (str, bool, float)):
        return value
    if isinstance(value, int):
        # beyond int64 pandas falls back to objects that do not sort with the rest: keep it as text
        return value if -(2**63) <= value < 2**63 else str(value)
    return json.dumps(value, sort_keys=True, default=str)


def short(value: Any) -> str:
    """A setting's value as short text: 1.5, true, dpm_solver++, [1, 2]."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value, sort_keys=True, default=str)
    return str(value)


def json_object(text: Any) -> dict[str, Any]:
    """The JSON object in `text`, {} for anything else."""
    try:
        value = json.loads(text)
    except (TypeError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def settings_diff(a: Any, b: Any) -> str:
    """'eval.samples 1024 vs 256': the evaluation settings (JSON text) where two evaluations differ."""
    sa, sb = json_object(a), json_object(b)
    keys = [k for k in sorted(set(sa) | set(sb)) if k not in sa or k not in sb or sa[k] != sb[k]]
    parts = [f"{k} {short(sa[k]) if k in sa else '-'} vs {short(sb[k]) if k in sb else '-'}" for k in keys]
    text = ", ".join(parts[:3]) + (f" and {len(parts) - 3} more" if len(parts) > 3 else "")
    return text or "another evaluation"


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """{"sample": {"steps": 15}} -> {"sample.steps": 15} (lists stay values)."""
    if not isinstance(data, dict):
        return {prefix: data} if prefix else {}
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out.update(flatten(v, key) if isinstance(v, dict) else {key: v})
    return out


def integer_columns(frame: pd.DataFrame, columns: list[str]) -> None:
    """Make columns whose values are all whole numbers (not booleans) integer columns, in place, so a
    factor such as branches = 3 prints as 3 (pandas turns an int column with gaps into floats: 3.0)."""
    for col in columns:
        values = frame[col].dropna()
        if len(values) and all(isinstance(v, (int, float, np.integer, np.floating))
                               and not isinstance(v, (bool, np.bool_)) and float(v).is_integer()
                               and abs(float(v)) < 2**53 for v in values):
            frame[col] = frame[col].map(lambda v: None if is_missing(v) else int(v)).astype("Int64")


# ------------------------------------------------------------------------------------ printing

def is_missing(value: Any) -> bool:
    """None, NaN or pandas' NA."""
    if value is None or value is pd.NA:
        return True
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def label(value: Any) -> str:
    """A factor value as a cell: whole numbers as integers (never 1.0), booleans as yes/no."""
    if is_missing(value):
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else f"{value:g}"
    return str(value)


def decimals(values: Any, digits: int = 3, least: int = 1) -> int:
    """Decimals that show the largest finite |value| with `digits` significant digits (least..4): one count
    per column, so its numbers line up (114.4 and 60.2; 3.70; 0.152; 0.0194)."""
    arr = np.abs(np.asarray([v for v in values if not is_missing(v)], dtype=float))
    arr = arr[np.isfinite(arr) & (arr > 0)]
    if arr.size == 0:
        return 2
    return int(min(4, max(least, digits - 1 - math.floor(math.log10(arr.max())))))


def fixed(value: Any, places: int, *, sign: bool = False) -> str:
    """A number with fixed decimals ('' for missing)."""
    if is_missing(value):
        return ""
    return f"{value:+.{places}f}" if sign else f"{value:.{places}f}"


def mean_std(mean: Any, std: Any, n: Any, n_runs: int, places: int, *, gap: bool = False) -> str:
    """'61.2 ± 2.1', with '(n=2/3)' when fewer seeds than runs have a value: a mean over fewer seeds
    than the row claims is never shown silently. gap: show '(n=0/3)' for a row with no value at all."""
    n = 0 if is_missing(n) else int(n)
    if n == 0:
        return f"(n=0/{n_runs})" if gap else ""
    text = fixed(mean, places) + (f" ± {std:.{places}f}" if not is_missing(std) else "")
    return text + (f" (n={n}/{n_runs})" if n < n_runs else "")
