"""Paper-style tables over a results tree: one row per variant, mean ± std over seeds, deltas to the base
variant, the paper's numbers beside ours; paired-by-seed statistics of each step; bar and learning-curve plots.

    collect      run folders -> runs frame (one evaluation per run)      collect.py
    aggregate    runs -> one row per variant and grid point              aggregate.py
    step_statistics  paired statistics of each step, Holm, verdicts     steps.py
    format_table compact/wide text tables (rich, markdown, latex, csv)   columns.py, render.py
    plot_metric, plot_curves                                             plots.py
    paper_row    the published numbers                                   paper.py

Never imports torch: tables are made on machines without it (tests/test_table.py checks).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Iterable

from dimr_lab.errors import UserError, unknown_name_message
from dimr_lab.table.aggregate import aggregate
from dimr_lab.table.collect import Damaged, collect, collect_curves, parse_eval_filter, read_runs
from dimr_lab.table.columns import (DEFAULT_COLUMNS, DEFAULT_METRICS, FORMATS, OPTIONAL_COLUMNS, format_table,
                                    parse_columns, parse_metrics)
from dimr_lab.table.paper import PAPER_COLUMNS, paper_row, paper_table, paper_tables
from dimr_lab.table.plots import plot_curves, plot_metric
from dimr_lab.table.steps import AT_STEP, STEP_COLUMNS, TESTS, Pair, format_steps, step_statistics
from dimr_lab.table.values import quiet

__all__ = ["render_table", "collect", "collect_curves", "aggregate", "format_table", "format_steps",
           "step_statistics", "plot_metric", "plot_curves", "paper_row", "paper_table", "paper_tables",
           "PAPER_COLUMNS", "FORMATS", "OPTIONAL_COLUMNS", "DEFAULT_COLUMNS", "DEFAULT_METRICS", "STEP_COLUMNS",
           "TESTS"]


def parse_compare(items: Iterable[str] | None) -> list[Pair]:
    """--pair items, FROM:TO or FROM@STEP:TO@STEP, as Pairs in order, each once; a malformed item is a
    UserError. With steps a variant may be compared with itself (is it still improving between two steps?)."""
    out: list[Pair] = []
    for item in items or ():
        sides = [p.strip() for p in str(item).split(":")]
        if len(sides) != 2 or not all(sides):
            raise UserError(f"--pair {item!r}: give FROM:TO, two variant names (e.g. tdln:adaln_zero), or "
                            f"FROM@STEP:TO@STEP to compare each at its own training step")
        parsed = [_pair_side(item, side) for side in sides]
        (a, a_step), (b, b_step) = parsed
        if (a_step is None) != (b_step is None):
            raise UserError(f"--pair {item!r}: give a training step on both sides or on neither "
                            f"(e.g. {a}@{a_step or b_step}:{b}@{b_step or a_step})")
        if (a, a_step) == (b, b_step):
            raise UserError(f"--pair {item!r}: give FROM:TO, two different variant names (e.g. tdln:adaln_zero), "
                            f"or one variant at two training steps (e.g. {a}@1000:{a}@2000)")
        pair = Pair(a, b, a_step, b_step)
        if Pair(b, a, b_step, a_step) in out:  # the same comparison with its sign turned: Holm would count it twice
            raise UserError(f"--pair {item!r}: {Pair(b, a, b_step, a_step).label.replace(' → ', ':')} is given "
                            f"too, the same comparison reversed; give one of them")
        if pair not in out:
            out.append(pair)
    return out


def _pair_side(item: str, side: str) -> tuple[str, int | None]:
    """'name' or 'name@STEP' of a --pair item."""
    name, at, step = side.partition("@")
    name = name.strip()
    if not at:
        return name, None
    step = step.strip()
    if not name or not (step.isascii() and step.isdigit()):
        raise UserError(f"--pair {item!r}: {side!r}: give VARIANT@STEP with a training step, a whole number "
                        f"(e.g. tdln@3000)")
    return name, int(step)


def _warn_stderr(line: str) -> None:
    print(f"warning: {line}", file=sys.stderr)


def render_table(results_dir: str | Path, fmt: str = "rich", plot: str | Path | None = None,
                 on_warning: Callable[[str], None] | None = None, steps: bool = False, step: int | None = None,
                 eval_filter: Iterable[Any] | None = None, columns: Any = None, metrics: Any = None,
                 wide: bool = False, curves: str | Path | None = None, test: str = "t",
                 skip_damaged: bool = False, compare: Iterable[str] | None = None) -> str:
    """collect + aggregate + format_table (or step_statistics with steps=True), plus the plots asked for;
    warning lines go to on_warning (default: stderr, prefixed 'warning: '). A damaged record or metrics file
    stops it (UserError) unless skip_damaged, which leaves those runs out with a warning. `compare` (steps
    only): 'FROM:TO' or 'FROM@STEP:TO@STEP' pairs that replace the default steps (see parse_compare)."""
    # every argument is checked before the (slow) walk over the results tree
    if fmt not in FORMATS:
        raise UserError("--format: " + unknown_name_message("table format", fmt, FORMATS))
    if test not in TESTS:
        raise UserError("--test: " + unknown_name_message("test", test, TESTS))
    chosen, _ = parse_metrics(metrics), parse_columns(columns)
    pairs = parse_eval_filter(eval_filter)
    chosen_pairs = parse_compare(compare)
    if chosen_pairs and not steps:
        raise UserError("--pair: only with --steps (it chooses which variants the paired statistics compare)")
    # every pair names its steps: the table's own choice of evaluations (--step, its deltas) is not read
    named_only = bool(chosen_pairs) and all(p.at_steps for p in chosen_pairs)
    if step is not None and named_only:
        raise UserError(f"--step {step}: every --pair names its own training steps (FROM@STEP:TO@STEP); "
                        f"give --step or the steps, not both")
    warn = on_warning or _warn_stderr
    at_steps = sorted({s for p in chosen_pairs if p.at_steps for s in (p.a_step, p.b_step)})
    with quiet():
        # with curves or pairs at named steps: the tree read once, for all (held in memory); without: each run
        # dropped once it is a row
        folders = read_runs(results_dir) if curves is not None or at_steps else None
        runs, warnings = collect(results_dir, step=step, eval_filter=pairs, folders=folders)
        damaged = [w for w in warnings if isinstance(w, Damaged)]
        if damaged and not skip_damaged:
            more = f" (and {len(damaged) - 1} more)" if len(damaged) > 1 else ""
            raise UserError(f"{damaged[0]}{more}; --skip-damaged makes the table without the runs it names")
        if runs.empty:  # one line: the first reason and how many more
            n = len(warnings) - 1
            why = f": {warnings[0]}" + (f" (and {n} more warning{'s' if n > 1 else ''})" if n else "") \
                if warnings else ""
            raise UserError(f"no finished runs under {results_dir}{why}")
        for line in warnings:
            warn(line)
        # pairs at named steps read no row of this table: what it would warn about (deltas between a run's last
        # evaluation and the base's) is not what they show
        table = aggregate(runs, on_warning=None if named_only else warn)
        first = (chosen or ["fid"])[0]
        if plot is not None:
            plot_metric(table, plot, metric=first)
        if curves is not None:
            found, more = collect_curves(results_dir, eval_filter=pairs, folders=folders)
            for line in more:
                if line not in warnings:
                    warn(line)
            plot_curves(found if not found.empty else runs, curves, metric=first)
        if steps:
            if chosen_pairs:
                known = sorted(set(runs["variant"]))
                for name in dict.fromkeys(n for pair in chosen_pairs for n in pair[:2]):
                    if name not in known:
                        raise UserError(f"--pair: {results_dir}: " + unknown_name_message("variant", name, known))
            if at_steps:
                runs = _with_pair_steps(results_dir, runs, chosen_pairs, at_steps, pairs, folders, warnings, warn)
            stats = step_statistics(runs, metric=first, test=test, compare=chosen_pairs or None)
            if stats.empty and chosen_pairs:
                raise UserError(f"--pair: no ablation under {results_dir} has both variants of "
                                f"{', '.join(p.label.replace(' → ', ':') for p in chosen_pairs)} (pairs compare "
                                f"within one ablation, profile and grid point)")
            if stats.empty:
                raise UserError(f"no two variants to compare under {results_dir}")
            return format_steps(stats, fmt)
        return format_table(table, fmt, metrics=chosen, columns=columns, wide=wide, step_given=step is not None)


def _with_pair_steps(results_dir: str | Path, runs: Any, chosen: list[Pair], at_steps: list[int], eval_filter: Any,
                     folders: Any, said: list[str], warn: Callable[[str], None]) -> Any:
    """The runs frame with, for each training step a pair names, every run's evaluation at that step (AT_STEP
    says which); a variant with no evaluation at a step its pair names is a UserError naming the steps it has."""
    import pandas as pd

    frames = [runs.assign(**{AT_STEP: float("nan")})]
    for at in at_steps:
        found, warnings = collect(results_dir, step=at, eval_filter=eval_filter, folders=folders)
        # runs of other variants, or not evaluated there, are skipped by design: only what else is said shows
        for line in warnings:
            if line not in said and not str(line).startswith("skipped "):
                warn(line)
        if not found.empty:
            frames.append(found.assign(**{AT_STEP: float(at)}))
    combined = pd.concat(frames, ignore_index=True)
    for pair in chosen:
        if not pair.at_steps:
            continue
        for name, at in ((pair.a, pair.a_step), (pair.b, pair.b_step)):
            if not ((combined["variant"] == name) & (combined[AT_STEP] == at)).any():
                curves, _ = collect_curves(results_dir, eval_filter=eval_filter, folders=folders)
                have = sorted({int(s) for s in curves.loc[curves["variant"] == name, "step"].dropna()}) \
                    if not curves.empty else []
                raise UserError(f"--pair {pair.label.replace(' → ', ':')}: no run of {name} under {results_dir} "
                                f"has a finished evaluation at step {at} (its evaluated steps: "
                                f"{', '.join(map(str, have)) or 'none'})")
    return combined
