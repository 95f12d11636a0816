"""Paired statistics of the steps of an ablation: consecutive variants with published numbers (or each variant
against the baseline when none has one), paired by seed, Holm-adjusted, read against the paper's sign."""

from __future__ import annotations

import json
import math
from typing import Any, NamedTuple, Sequence

import pandas as pd

from dimr_lab import stats
from dimr_lab.errors import UserError, unknown_name_message
from dimr_lab.table.aggregate import base_variant
from dimr_lab.table.paper import PAPER_OF
from dimr_lab.table.render import Section, render
from dimr_lab.table.values import LABELS, decimals, fixed, is_missing, json_object, label, quietly, settings_diff

TESTS = {"t": "p_t", "perm": "p_perm"}
ALPHA = 0.05
# `dimr-lab table --steps --format csv`: these columns first, in this order
STEP_COLUMNS = ("ablation", "profile", "grid", "step", "n", "from_mean", "to_mean", "diff", "t_lo", "t_hi",
                "boot_lo", "boot_hi", "p_perm", "p_t", "p_holm", "paper_diff", "verdict", "fid_floor", "detectable")
EXTRA_COLUMNS = ("title", "metric", "test", "from_variant", "to_variant", "from_step", "to_step", "data_key",
                 "sd_diff", "note")
NOT_COMPARED = "not compared"
# the runs frame's column that says which training step a row was collected at for a pair that names its steps
# (`--pair a@S:b@T`); rows without it (NaN) are each run's evaluation chosen for the table
AT_STEP = "at_step"


class Pair(NamedTuple):
    """A comparison asked for: from variant a to variant b, each at its own training step where given (both or
    neither; a variant may then be compared with itself at another step), else at the step the table shows."""

    a: str
    b: str
    a_step: int | None = None
    b_step: int | None = None

    @property
    def at_steps(self) -> bool:
        return self.a_step is not None

    @property
    def label(self) -> str:
        if not self.at_steps:
            return f"{self.a} → {self.b}"
        return f"{self.a}@{self.a_step} → {self.b}@{self.b_step}"


def _variant_order(group: pd.DataFrame) -> list[str]:
    """Variants in table order: variant_index, then name."""
    first = group.groupby("variant", sort=False)["variant_index"].min()
    return sorted(first.index, key=lambda v: (math.isnan(first[v]), 0 if math.isnan(first[v]) else first[v], v))


def _pairs(group: pd.DataFrame, paper_col: str | None) -> list[tuple[str, str]]:
    """The steps of one ablation/profile/grid: between consecutive published variants, and each variant
    without a published number against the baseline (every variant when none is published)."""
    order = _variant_order(group)
    published = []
    if paper_col is not None and paper_col in group and group[paper_col].notna().any():
        published = [v for v in order if group.loc[group["variant"] == v, paper_col].notna().any()]
    pairs = list(zip(published, published[1:]))
    base = base_variant(group)
    if base in order:
        pairs += [(base, v) for v in order if v != base and v not in published]
    return pairs


def _published(group: pd.DataFrame, variant: str, paper_col: str | None) -> float:
    if paper_col is None or paper_col not in group:
        return math.nan
    values = group.loc[group["variant"] == variant, paper_col].dropna()
    return float(values.iloc[0]) if len(values) else math.nan


def _paper_tables(group: pd.DataFrame, variant: str, paper_col: str | None) -> list[str]:
    """The published tables a variant's numbers come from (its runs' `paper` references)."""
    if paper_col is None or paper_col not in group:
        return []
    refs = group.loc[(group["variant"] == variant) & group[paper_col].notna(), "paper"].dropna()
    tables = {json_object(ref).get("table") for ref in refs}
    return sorted(t for t in tables if isinstance(t, str))


def _side(group: pd.DataFrame, variant: str, at: int | None) -> pd.DataFrame:
    """One side of a step: the variant's rows chosen for the table, or its rows collected at step `at`."""
    rows = group[group["variant"] == variant]
    if AT_STEP not in rows:
        return rows if at is None else rows.iloc[0:0]
    return rows[rows[AT_STEP].isna()] if at is None else rows[rows[AT_STEP] == at]


def _step(group: pd.DataFrame, pair: Pair, metric: str, paper_col: str | None) -> dict[str, Any]:
    """One step a -> b: runs paired by seed (seeds present in both) at one step (or, for a pair that names its
    steps, each side at its own), one evaluation's settings and the same data."""
    a, b = pair.a, pair.b
    left, right = _side(group, a, pair.a_step), _side(group, b, pair.b_step)
    # the published numbers carry two decimals: their difference is rounded so float noise never shows
    paper_diff = round(_published(group, b, paper_col) - _published(group, a, paper_col), 10) if a != b else math.nan
    notes = []
    tables = (_paper_tables(group, a, paper_col), _paper_tables(group, b, paper_col))
    if not math.isnan(paper_diff) and (tables[0] != tables[1] or len(tables[0]) != 1):
        # rows of two published tables (ImageNet 256 and 512, say) differ in dataset and protocol: no sign
        paper_diff = math.nan
        notes.append(f"{a} and {b} are published in different tables ({', '.join(tables[0])} vs "
                     f"{', '.join(tables[1])}): no published difference")
    if a == b:
        notes.append("a variant against itself at two training steps: no published difference")
    if not math.isnan(paper_diff) and pair.at_steps and pair.a_step != pair.b_step:
        notes.append("a pair at two training steps: the paper's difference is at equal training")
    row: dict[str, Any] = {"from_variant": a, "to_variant": b, "step": pair.label, "from_step": pair.a_step,
                           "to_step": pair.b_step,
                           "paper_diff": None if math.isnan(paper_diff) else paper_diff, "note": "; ".join(notes)}
    keys_a, keys_b = set(left["data_key"]), set(right["data_key"])
    if not keys_a & keys_b:
        row.update(n=0, verdict=NOT_COMPARED, data_key=" vs ".join(sorted(keys_a) + sorted(keys_b)),
                   note="; ".join([f"different data ({', '.join(sorted(keys_a))} vs {', '.join(sorted(keys_b))}): "
                                   f"not compared", *notes]))
        return row
    # a pair is one seed evaluated at the same step with the same sampling and evaluation settings (sample
    # count, sampler, reference: one evaluation hash) on the same data: anything else is not the
    # architectural change alone
    keys = ["seed", "data_key", "eval_hash"] + ([] if pair.at_steps else ["step"])
    cols = [*keys, metric, "fid_floor", *(["machine"] if "machine" in left and "machine" in right else [])]
    paired = left[cols].merge(right[cols], on=keys, suffixes=("_a", "_b"))
    common = set(left["seed"]) & set(right["seed"])
    found = stats.compare(paired[f"{metric}_a"].to_numpy(float), paired[f"{metric}_b"].to_numpy(float), paper_diff)
    kept = paired[paired[f"{metric}_a"].notna() & paired[f"{metric}_b"].notna()]
    floors = pd.concat([kept["fid_floor_a"], kept["fid_floor_b"]]).dropna()
    row.update({k: found[k] for k in ("n", "diff", "t_lo", "t_hi", "boot_lo", "boot_hi", "p_perm", "p_t", "sd_diff",
                                      "detectable")})
    row.update(from_mean=found["mean_a"], to_mean=found["mean_b"], data_key=", ".join(sorted(keys_a & keys_b)),
               fid_floor=float(floors.mean()) if metric == "fid" and len(floors) else math.nan)
    unpaired = sorted(common - set(paired["seed"]))
    if unpaired:
        notes.append(f"{len(unpaired)} of {len(common)} seeds not paired: "
                     + _why_unpaired(left, right, unpaired, a, b, same_step=not pair.at_steps))
    for v, at, side in ((a, pair.a_step, left), (b, pair.b_step, right)):
        seeds = sorted(set(side["seed"]) - common)
        if seeds:  # a seed on one side only is left out of the step: said, since the means shown are the pairs'
            notes.append(f"{_seeds(seeds)} of {v}{'' if at is None else f' at step {at}'} without a partner, "
                         f"left out")
    if "machine_a" in kept:  # where both sides recorded theirs: a seed's two runs on two machines
        split = kept[kept["machine_a"].notna() & kept["machine_b"].notna() & (kept["machine_a"] != kept["machine_b"])]
        if len(split):
            names = sorted({*split["machine_a"], *split["machine_b"]})
            notes.append(f"{_seeds(sorted(split['seed']))} evaluated on different machines on the two sides "
                         f"({'; '.join(names)}): floating point differs between machines, a difference of its own")
    no_value = sorted(set(paired["seed"]) - set(kept["seed"]))
    if no_value:  # a NaN metric on either side drops the pair: named, as the n shown is smaller
        notes.append(f"{_seeds(no_value)} without a {metric} value on one side, left out")
    row["note"] = "; ".join(notes) or ("no seed with a value in both" if found["n"] == 0 else "")
    return row


def _seeds(seeds: list[Any]) -> str:
    return f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}"


def _why_unpaired(left: pd.DataFrame, right: pd.DataFrame, seeds: list[Any], a: str, b: str,
                  same_step: bool = True) -> str:
    """Why seeds run by both variants are not paired: other data, another step (where the two sides are to be
    at one step) or other evaluation settings."""
    reasons: dict[str, list[Any]] = {}
    for seed in seeds:
        ra, rb = left[left["seed"] == seed].iloc[0], right[right["seed"] == seed].iloc[0]
        if ra["data_key"] != rb["data_key"]:
            why = f"on other data ({ra['data_key']} vs {rb['data_key']})"
        elif same_step and not (ra["step"] == rb["step"] or (is_missing(ra["step"]) and is_missing(rb["step"]))):
            why = f"evaluated at step {label(ra['step'])} ({a}) vs {label(rb['step'])} ({b})"
            if not (is_missing(ra["step"]) or is_missing(rb["step"])):  # the commands that pair them
                why += (f": --step N compares both at a step they evaluated, --pair {a}@{label(ra['step'])}:"
                        f"{b}@{label(rb['step'])} each at its own")
        else:
            why = f"evaluated with other settings ({settings_diff(ra['eval_settings'], rb['eval_settings'])})"
        reasons.setdefault(why, []).append(seed)
    return "; ".join(f"{_seeds(s)} {why}" for why, s in reasons.items())


@quietly
def step_statistics(runs: pd.DataFrame, metric: str = "fid", test: str = "t",
                    compare: Sequence[tuple[Any, ...]] | None = None) -> pd.DataFrame:
    """Every step of every ablation/profile/grid with paired-by-seed statistics of `metric` (see
    dimr_lab.stats), p_holm from `test` ("t": paired t, "perm": exact sign flip) over the steps read
    together, and the verdict against the paper's difference. `compare`, Pairs (or (from, to) tuples),
    replaces the default steps: each ablation/profile/grid holding both variants of a pair gets that step, and
    Holm runs over the pairs it holds. A pair that names its steps reads the rows collected at those steps
    (AT_STEP: render_table adds them)."""
    if test not in TESTS:
        raise UserError(unknown_name_message("test", test, TESTS))
    if runs.empty or metric not in runs:
        return pd.DataFrame(columns=[*STEP_COLUMNS, *EXTRA_COLUMNS])
    paper_col = PAPER_OF.get(metric)
    records = []
    pairs = None if compare is None else [p if isinstance(p, Pair) else Pair(*p) for p in compare]
    for (ablation, profile, grid), group in runs.groupby(["ablation", "profile", "grid"], sort=False):
        if pairs is None:
            chosen = [Pair(a, b) for a, b in _pairs(_side_rows(group), paper_col)]
        else:
            present = set(group["variant"])
            chosen = [p for p in pairs if p.a in present and p.b in present]
        steps = [_step(group, p, metric, paper_col) for p in chosen]
        # Holm over the comparable steps of this table; a step across datasets is no test
        tested = [i for i, s in enumerate(steps) if s.get("verdict") != NOT_COMPARED]
        judged = stats.compare_steps([steps[i] for i in tested], alpha=ALPHA, p_key=TESTS[test]) if tested else []
        for i, s in zip(tested, judged):
            steps[i] = s
        for s in steps:
            s.update(ablation=ablation, title=group["title"].iloc[0], profile=profile, grid=grid, metric=metric,
                     test=test)
            records.append(s)
    out = pd.DataFrame.from_records(records)
    for col in (*STEP_COLUMNS, *EXTRA_COLUMNS):
        if col not in out:
            out[col] = math.nan
    return out[[*STEP_COLUMNS, *EXTRA_COLUMNS]]


def _side_rows(group: pd.DataFrame) -> pd.DataFrame:
    """The rows chosen for the table (not those collected for pairs at named steps)."""
    return group if AT_STEP not in group else group[group[AT_STEP].isna()]


# ------------------------------------------------------------------------------------ text

def _interval(diff: Any, lo: Any, hi: Any, places: int) -> str:
    """'-11.8 [-52.6, +29.0]' (the interval left out when one seed gives none); a difference that would read
    0 at these decimals shows two significant figures, as the interval's ends do, never '-0.000'."""
    if is_missing(diff):
        return ""
    ci = "" if is_missing(lo) else f" [{_bound(lo, places)}, {_bound(hi, places)}]"
    return _bound(diff, places) + ci


def _bound(value: float, places: int) -> str:
    """An interval's end: fixed decimals, or two significant figures where those would read 0 (an end at
    -0.03 beside a verdict that needs the interval to exclude 0 must not read -0.0)."""
    text = fixed(value, places, sign=True)
    return f"{value:+.2g}" if float(text) == 0 and value != 0 else text


def _p(value: Any) -> str:
    return "" if is_missing(value) else (f"{value:.3f}" if value >= 0.001 else f"{value:.1e}")


def step_sections(found: pd.DataFrame) -> list[Section]:
    """One section per ablation: each step's means, diff [95% t interval], p_holm, the paper's diff, verdict."""
    out = []
    for ablation, rows in found.groupby("ablation", sort=False):
        metric = rows["metric"].iloc[0]
        name = LABELS.get(metric, metric)
        places = decimals(pd.concat([rows["from_mean"], rows["to_mean"]]))
        columns: list[tuple[str, list[str]]] = []
        if rows["profile"].nunique() > 1:
            columns.append(("Profile", list(rows["profile"])))
        if (rows["grid"] != "{}").any():
            columns.append(("Grid", [_grid_text(g) for g in rows["grid"]]))
        columns.append(("Step", list(rows["step"])))
        n_text = len(columns)
        columns += [
            ("n", ["" if is_missing(n) else str(int(n)) for n in rows["n"]]),
            (f"{name} from → to", [f"{fixed(a, places)} → {fixed(b, places)}" if not is_missing(a) else ""
                                   for a, b in zip(rows["from_mean"], rows["to_mean"])]),
            (f"Δ{name} [95% CI]", [_interval(d, lo, hi, places) for d, lo, hi in
                                   zip(rows["diff"], rows["t_lo"], rows["t_hi"])]),
            ("p_holm", [_p(p) for p in rows["p_holm"]]),
            ("Paper Δ", [fixed(p, 2, sign=True) for p in rows["paper_diff"]]),
            ("Verdict", list(rows["verdict"])),
        ]
        if rows["fid_floor"].notna().any():
            columns.append(("FID floor", [fixed(f, decimals(rows["fid_floor"])) for f in rows["fid_floor"]]))
        kept = [(h, c) for i, (h, c) in enumerate(columns) if i < n_text or any(c)]
        notes = [f"{name}, paired by seed"] + sorted({n for n in rows["note"].fillna("") if n})
        header = [h for h, _ in kept]
        title = rows["title"].iloc[0]
        out.append(Section(title=f"Steps: {title}", key=ablation if title != ablation else "", header=header,
                           rows=[list(r) for r in zip(*(c for _, c in kept))], n_text=n_text, notes=notes,
                           left=(header.index("Verdict"),)))
    return out


def _grid_text(grid: str) -> str:
    try:
        return " ".join(f"{k}={v}" for k, v in sorted(json.loads(grid).items()))
    except (TypeError, ValueError, AttributeError):
        return str(grid)


def step_legend(found: pd.DataFrame) -> str:
    """The paragraph under the steps tables: pairing, test, Holm family size, the sign-flip p floor."""
    test = found["test"].iloc[0]
    tested = found[found["verdict"] != NOT_COMPARED]
    sizes = sorted({int(k) for k in tested.groupby(["ablation", "profile", "grid"]).size()})
    ns = sorted({int(n) for n in tested["n"].dropna() if n > 0})
    k = ", ".join(map(str, sizes)) or "0"
    floors = "; ".join(f"with n = {n} seeds the exact sign-flip p cannot be below 2/2^{n} = {2 / 2 ** n:.3g}"
                       for n in ns)
    which = "the paired t-test (p_t)" if test == "t" else "the exact sign-flip permutation test (p_perm)"
    at_steps = ("A step named a@S → b@T pairs each seed's evaluation of a at training step S with its "
                "evaluation of b at step T. ") if found["from_step"].notna().any() else ""
    return (f"Paired by seed: each step compares the two variants' runs of the same seed (seeds present in "
            f"both, evaluated at the same step with the same settings, on the same data), diff = to - from with "
            f"its 95% t interval (the csv adds the bootstrap interval, p_perm, p_t and the detectable effect: "
            f"the true difference the paired t test finds "
            f"with 80% power at 5% before Holm's correction). {at_steps}p_holm: {which}, Holm-adjusted over the "
            f"k = {k} steps of each ablation, profile and grid point read together. Verdict: agrees or "
            f"disagrees with the paper's sign when p_holm < {ALPHA} and the interval excludes 0, else "
            f"inconclusive (no published sign: the paper has no number for one side, or the two are in different "
            f"published tables). "
            + (floors[0].upper() + floors[1:] + "." if floors else ""))


@quietly
def format_steps(found: pd.DataFrame, fmt: str = "rich") -> str:
    """The step statistics as text: csv (every column, raw numbers) or a compact rich/markdown/latex table."""
    if fmt == "csv":
        return found.to_csv(index=False)
    return render(step_sections(found), fmt, step_legend(found))
