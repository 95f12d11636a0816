"""Command: `dimr-lab table DIR`, the paper-style table of a results tree (and its step statistics and plots)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from dimr_lab.cli import app

# kept here as text (not imported from dimr_lab.table) so `dimr-lab --help` never loads pandas
COLUMNS_HELP = ("Optional columns, comma-separated: factors (labels that vary), seeds, params, gmacs, imgs "
                "(train images/s), delta (Δ of the first metric to the base), paper (the paper's number of the "
                "first metric), floor (FID floor), step (evaluation step and settings). Default: "
                "factors,seeds,params,gmacs,delta,paper; '+imgs,floor' adds to the default.")
METRICS_HELP = ("Metrics, comma-separated, the first one drives Δ, paper, --steps and the plots: fid, kid, isc, "
                "precision, recall, sample_accuracy, distortion_rate, fid_floor, train_images_per_s, params_m, "
                "gmacs. Default: fid and, where present, sample_accuracy.")


@app.command("table")
def table_cmd(
    results_dir: Path = typer.Argument(..., help="A results folder: one ablation, a tree of them, or a run."),
    fmt: str = typer.Option("rich", "--format", "-f", help="rich, markdown, latex or csv (every column, raw numbers)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the table to FILE instead of stdout."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Also write a PNG: a bar per variant (± std over "
                                                              "seeds), the paper's numbers on their own axis."),
    curves: Optional[Path] = typer.Option(None, "--curves", help="Also write a PNG of learning curves: the metric "
                                                                  "vs training step and vs training compute."),
    steps: bool = typer.Option(False, "--steps", help="Instead: each step between consecutive variants with "
                                                       "published numbers, and each unpublished variant vs the "
                                                       "baseline, "
                                                       "paired by seed, Holm-adjusted, read against the paper."),
    pair: Optional[List[str]] = typer.Option(None, "--pair", help="--steps: compare these variants instead, "
                                                                  "FROM:TO (e.g. tdln_deep:adaln_zero), or "
                                                                  "FROM@STEP:TO@STEP, each at its own training "
                                                                  "step (e.g. adaln_zero@6615:multi_branch@3000); "
                                                                  "repeatable, Holm over the pairs given."),
    step: Optional[int] = typer.Option(None, "--step", help="Use the evaluations at this training step "
                                                             "(default: each run's latest)."),
    eval_filter: Optional[List[str]] = typer.Option(None, "--eval", help="Only evaluations with this setting, "
                                                                         "KEY=VALUE (e.g. sample.guidance_scale"
                                                                         "=1.5); repeatable."),
    metrics: Optional[str] = typer.Option(None, "--metrics", help=METRICS_HELP),
    columns: Optional[str] = typer.Option(None, "--columns", help=COLUMNS_HELP),
    wide: bool = typer.Option(False, "--wide", help="Every metric, delta and paper column (no width limit)."),
    test: str = typer.Option("t", "--test", help="--steps: p_holm from the paired t-test (t) or the exact "
                                                 "sign-flip permutation test (perm)."),
    skip_damaged: bool = typer.Option(False, "--skip-damaged", help="Leave out runs whose record or metrics "
                                                                     "file does not read (default: stop on them)."),
    force: bool = typer.Option(False, "--force", help="Replace existing --out, --plot and --curves files."),
) -> None:
    """One row per variant: mean ± std over seeds, deltas to the base variant, the paper's numbers beside ours."""
    # pandas and matplotlib load here only, so `dimr-lab --help` stays fast
    from dimr_lab.atomic import atomic_write_text
    from dimr_lab.errors import UserError
    from dimr_lab.spec.preflight import check_out_file
    from dimr_lab.table import render_table

    if out is not None and out.is_dir():
        raise UserError(f"--out {out}: is a directory; give a file name")
    for option, path in (("--out", out), ("--plot", plot), ("--curves", curves)):
        if path is not None and path.is_file() and not force:
            raise UserError(f"{option} {path}: exists; refusing to overwrite it (use --force to replace it)")
        if path is not None:
            check_out_file(path, option)
    text = render_table(results_dir, fmt=fmt, plot=plot, steps=steps, step=step, eval_filter=eval_filter,
                        columns=columns, metrics=metrics, wide=wide, curves=curves, test=test,
                        skip_damaged=skip_damaged, compare=pair)
    if out is None:
        typer.echo(text, nl=False)
        return
    try:
        atomic_write_text(out, text)
    except OSError as err:
        raise UserError(f"cannot write {out}: {err.strerror or err}") from None
