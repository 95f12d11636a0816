"""Command: `dimr-lab table DIR`, the paper-style table of a results tree."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from dimr_lab.cli import app


@app.command("table")
def table_cmd(
    results_dir: Path = typer.Argument(..., help="A results folder: one ablation or a tree of them."),
    fmt: str = typer.Option("rich", "--format", "-f", help="rich, markdown, latex or csv (raw numbers)."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Also write a PNG bar chart of FID per variant."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the table to FILE instead of stdout."),
    steps: bool = typer.Option(False, "--steps", help="Instead: each step between consecutive variants with "
                                                       "published rows, our FID change beside the paper's, "
                                                       "sign agreement and whether ours is beyond the seed spread."),
) -> None:
    """One row per variant: mean ± std over seeds, deltas to the base row, the paper's numbers beside ours."""
    # pandas and matplotlib load here only, so `dimr-lab --help` stays fast
    from dimr_lab.errors import UserError
    from dimr_lab.table import render_table

    text = render_table(results_dir, fmt=fmt, plot=plot, steps=steps)
    if out is None:
        typer.echo(text, nl=False)
        return
    try:
        out.write_text(text, encoding="utf-8")
    except OSError as err:
        raise UserError(f"cannot write {out}: {err.strerror or err}") from None
