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
from dimr_lab.table.steps import STEP_COLUMNS, TESTS, format_steps, step_statistics
from dimr_lab.table.values import quiet

__all__ = ["render_table", "collect", "collect_curves", "aggregate", "format_table", "format_steps",
           "step_statistics", "plot_metric", "plot_curves", "paper_row", "paper_table", "paper_tables",
           "PAPER_COLUMNS", "FORMATS", "OPTIONAL_COLUMNS", "DEFAULT_COLUMNS", "DEFAULT_METRICS", "STEP_COLUMNS",
           "TESTS"]


def parse_compare(items: Iterable[str] | None) -> list[tuple[str, str]]:
    """--pair FROM:TO items as (from, to) variant pairs, in order, each once; a malformed item is a UserError."""
    out: list[tuple[str, str]] = []
    for item in items or ():
        parts = str(item).split(":")
        if len(parts) != 2 or not all(p.strip() for p in parts) or parts[0].strip() == parts[1].strip():
            raise UserError(f"--pair {item!r}: give FROM:TO, two different variant names (e.g. tdln:adaln_zero)")
        pair = (parts[0].strip(), parts[1].strip())
        if pair[::-1] in out:  # the same comparison with its sign turned: Holm would count it twice
            raise UserError(f"--pair {item!r}: {pair[1]}:{pair[0]} is given too, the same comparison reversed; "
                            f"give one of them")
        if pair not in out:
            out.append(pair)
    return out


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
    only): 'FROM:TO' variant pairs that replace the default steps (see parse_compare)."""
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
    warn = on_warning or _warn_stderr
    with quiet():
        # with curves: the tree read once, for both (held in memory); without: each run dropped once it is a row
        folders = read_runs(results_dir) if curves is not None else None
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
        table = aggregate(runs, on_warning=warn)
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
                for name in dict.fromkeys(n for pair in chosen_pairs for n in pair):
                    if name not in known:
                        raise UserError(f"--pair: {results_dir}: " + unknown_name_message("variant", name, known))
            stats = step_statistics(runs, metric=first, test=test, compare=chosen_pairs or None)
            if stats.empty and chosen_pairs:
                raise UserError(f"--pair: no ablation under {results_dir} has both variants of "
                                f"{', '.join(f'{a}:{b}' for a, b in chosen_pairs)} (pairs compare within one "
                                f"ablation, profile and grid point)")
            if stats.empty:
                raise UserError(f"no two variants to compare under {results_dir}")
            return format_steps(stats, fmt)
        return format_table(table, fmt, metrics=chosen, columns=columns, wide=wide, step_given=step is not None)
