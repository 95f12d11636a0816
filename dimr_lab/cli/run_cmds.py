"""Commands: `dimr-lab run FILE` (an ablation, locally or on SLURM), `dimr-lab status DIR`, `dimr-lab cancel DIR`.

torch and submitit are imported inside the command bodies only.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any, List, Optional

import typer

from dimr_lab.cli import app
from dimr_lab.errors import UserError

EXECUTORS = ("local", "slurm", "debug")


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=False)


def _count(spec: Any) -> dict[str, Any] | None:
    """params/GMACs of a run's network via dimr_lab.nn.describe.count, when that module exists."""
    try:
        from dimr_lab.nn.describe import count
    except ImportError:
        return None
    from dimr_lab.spec.model_spec import resolve_model

    model = resolve_model(spec.model, key="model")
    try:
        return count(model)
    except (TypeError, AttributeError):
        return count(spec.model)


def _fmt_params(n: Any) -> str:
    return f"{n / 1e6:.2f}M" if isinstance(n, (int, float)) else "-"


def _fmt_gmacs(g: Any) -> str:
    return f"{g:.3g}" if isinstance(g, (int, float)) else "-"


@app.command("run")
def run_cmd(
    file: Path = typer.Argument(..., help="the ablation file (.toml)", show_default=False),
    profile: str = typer.Option("tiny", "--profile", "-p", help="[profile.NAME] of the file: tiny (CPU), paper, ..."),
    executor: str = typer.Option("local", "--executor", "-e", help="local | slurm | debug (in-process, tracebacks)"),
    results: Path = typer.Option(Path("results"), "--results", "-r", help="results folder"),
    set_: Optional[List[str]] = typer.Option(None, "--set", "-s",
                                             help="override: run-spec key (train.steps=10), slurm.KEY=V, "
                                                  "ablation.seeds=[0]; repeatable"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the plan (and the sbatch script); write nothing"),
    as_json: bool = typer.Option(False, "--json", help="one JSON object per run (with its resolved spec)"),
    jobs: int = typer.Option(0, "--jobs", "-j", help="local: runs trained at the same time, each with an equal "
                                                     "share of the CPU threads; 0 = one per core, up to 8"),
    train_fn: str = typer.Option("", "--train-fn", hidden=True, help="module:function of the trainer (tests)"),
) -> None:
    """Run every variant x grid point x seed of an ablation; finished runs are skipped, others resumed."""
    from dimr_lab.runner.ablation import expand, load_ablation, slurm_settings, split_overrides
    from dimr_lab.runner.state import is_done
    from dimr_lab.spec.schema import parse_overrides

    if executor not in EXECUTORS:
        raise UserError(f"--executor {executor!r}: allowed: {', '.join(EXECUTORS)}")
    if jobs < 0:
        raise UserError(f"--jobs {jobs}: must be >= 0 (0 = one run per CPU core, up to 8)")
    if results.exists() and not results.is_dir():
        raise UserError(f"--results {results}: exists and is not a folder")
    run_over, slurm_upd, seeds = split_overrides(parse_overrides(set_))
    abl = load_ablation(file)
    runs = expand(abl, profile, run_over, results=results, seeds=seeds)
    settings = slurm_settings(abl, profile, slurm_upd)
    ablation_dir = results.resolve() / abl.name
    out = _console()

    if dry_run:
        counts = {}
        for r in runs:
            key = json.dumps(r.spec.model, sort_keys=True)
            if key not in counts:
                counts[key] = _count(r.spec)
        if as_json:
            for r in runs:
                c = counts[json.dumps(r.spec.model, sort_keys=True)] or {}
                print(json.dumps({**r.info(), "run_dir": str(r.run_dir), "status": "done" if is_done(r.run_dir)
                                  else "todo", "params": c.get("params"), "gmacs": c.get("gmacs")}, sort_keys=True))
            return
        from rich.table import Table

        t = Table(title=f"{abl.name}: {len(runs)} runs (profile {profile}, executor {executor})")
        t.add_column("run", overflow="fold")
        for col in ("variant", "seed", "grid", "steps", "params", "GMACs", "state"):
            t.add_column(col, overflow="fold")
        for r in runs:
            c = counts[json.dumps(r.spec.model, sort_keys=True)] or {}
            t.add_row(r.run_dir.name, r.variant, str(r.seed),
                      ", ".join(f"{k}={v}" for k, v in r.grid.items()) or "-", str(r.spec.train.steps),
                      _fmt_params(c.get("params")), _fmt_gmacs(c.get("gmacs")),
                      "done (skipped)" if is_done(r.run_dir) else "to run")
        out.print(t)
        out.print(f"folder: {ablation_dir}")
        if not any(counts.values()):
            out.print("(params/GMACs: dimr_lab.nn.describe is not available yet)")
        if executor == "slurm":
            from dimr_lab.runner.slurm import sbatch_script

            todo = [r for r in runs if not is_done(r.run_dir)]
            out.print(f"\n# sbatch script ({len(todo)} array tasks; submitit writes it at submission):")
            print(sbatch_script(settings, abl.name, ablation_dir, len(todo)))
        out.print("(dry run: nothing written)")
        return

    if executor == "slurm":
        if shutil.which("sbatch") is None:
            raise UserError("--executor slurm: sbatch is not on PATH (no SLURM client here)")
        from dimr_lab.runner.slurm import submit

        res = submit(runs, settings, ablation=abl.name, ablation_dir=ablation_dir, train_fn=train_fn or None)
        for r, job_id in res["submitted"]:
            _say(out, as_json, r, "submitted", job_id=job_id)
        for r, job_id in res["queued"]:
            _say(out, as_json, r, "queued before", job_id=job_id)
        for r in res["done"]:
            _say(out, as_json, r, "done (skipped)")
        for r in res["busy"]:
            _say(out, as_json, r, "busy (another process trains it)")
        if not as_json:
            out.print(f"{len(res['submitted'])} submitted, {len(res['queued'])} already queued, "
                      f"{len(res['done'])} done; follow with: dimr-lab status {ablation_dir}")
        return

    if executor == "debug":
        from dimr_lab.runner.local import run_debug

        outcomes = run_debug(runs, train_fn=train_fn or None)
    else:
        from dimr_lab.runner.local import run_local

        outcomes = run_local(runs, jobs=jobs, train_fn=train_fn or None, show_progress=not as_json)
    counts_by: dict[str, int] = {}
    for o in outcomes:
        counts_by[o.status] = counts_by.get(o.status, 0) + 1
        if as_json:
            _say(out, True, o.run, o.status, seconds=round(o.seconds, 2))
    if not as_json:
        out.print(", ".join(f"{n} {s}" for s, n in sorted(counts_by.items())))
        _print_table(out, ablation_dir)
    failed = counts_by.get("failed", 0) + counts_by.get("interrupted", 0)
    if failed:
        raise typer.Exit(1)


def _say(out: Any, as_json: bool, run: Any, status: str, **extra: Any) -> None:
    if as_json:
        print(json.dumps({**run.info(), "run_dir": str(run.run_dir), "status": status, **extra}, sort_keys=True))
    else:
        more = " ".join(f"{k}={v}" for k, v in extra.items())
        out.print(f"{status:>16}  {run.run_dir.name}  {more}")


def _print_table(out: Any, ablation_dir: Path) -> None:
    try:
        from dimr_lab.table import render_table
    except ImportError:
        out.print(f"(dimr-lab table is not available yet; results in {ablation_dir})")
        return
    rendered = render_table(ablation_dir, fmt="rich")
    if rendered is not None:
        out.print(rendered)


@app.command("status")
def status_cmd(
    directory: Path = typer.Argument(Path("results"), help="results folder, an ablation's folder or a run folder"),
    as_json: bool = typer.Option(False, "--json", help="one JSON object per run"),
    lines: int = typer.Option(8, "--lines", "-n", help="log lines shown for failed runs"),
) -> None:
    """Each run's state: pending, running, done, or failed with the tail of its log."""
    from dimr_lab.runner.status import collect

    if not directory.exists():
        raise UserError(f"{directory}: no such folder")
    statuses = collect(directory)
    if as_json:
        for s in statuses:
            print(json.dumps(s.as_dict(), sort_keys=True))
        return
    out = _console()
    if not statuses:
        out.print(f"no runs under {directory}")
        return
    from rich.table import Table

    t = Table(title=str(directory))
    for col in ("run", "state", "step", "job", "detail"):
        t.add_column(col, overflow="fold")
    style = {"done": "green", "running": "cyan", "pending": "yellow", "failed": "red"}
    for s in statuses:
        rel = s.run_dir.relative_to(directory) if s.run_dir != directory else Path(s.run_dir.name)
        step = f"{s.step if s.step is not None else '-'}/{s.steps if s.steps is not None else '?'}"
        t.add_row(str(rel), f"[{style[s.state]}]{s.state}[/]", step, s.job_id or "-", s.detail)
    out.print(t)
    tally: dict[str, int] = {}
    for s in statuses:
        tally[s.state] = tally.get(s.state, 0) + 1
    out.print(", ".join(f"{n} {k}" for k, n in sorted(tally.items())))
    for s in statuses:
        if s.state == "failed" and s.log_tail:
            out.print(f"\n[red]{s.run_dir.name}[/]: last lines of its log")
            for ln in s.log_tail[-lines:]:
                out.print("  " + ln, markup=False)


@app.command("cancel")
def cancel_cmd(
    directory: Path = typer.Argument(..., help="results folder, an ablation's folder or a run folder"),
) -> None:
    """Cancel what is still queued or running for the runs under DIR (scancel; local runs checkpoint and stop)."""
    from dimr_lab.runner.status import cancel

    if not directory.exists():
        raise UserError(f"{directory}: no such folder")
    res = cancel(directory)
    out = _console()
    if not res["slurm"] and not res["local"]:
        out.print("nothing queued or running")
        return
    if res["slurm"]:
        out.print(f"scancel {' '.join(res['slurm'])}")
    for item in res["local"]:
        out.print(f"stopping local run {item} (it checkpoints first)")
    sys.stdout.flush()
