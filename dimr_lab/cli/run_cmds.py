"""Commands: `dimr-lab run FILE` (an ablation, locally or on SLURM), `status DIR`, `cancel DIR`, `logs RUN`.

torch and submitit are imported inside the command bodies only; planning (and a dry run) needs neither.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, List, Optional

import typer

from dimr_lab.cli import app
from dimr_lab.errors import UserError, closest

EXECUTORS = ("local", "slurm", "debug")


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=False)


def _fmt_params(n: Any) -> str:
    return f"{n / 1e6:.2f}M" if isinstance(n, (int, float)) else "-"


def _fmt_gmacs(g: Any) -> str:
    return f"{g:.3g}" if isinstance(g, (int, float)) else "-"


def network_counts(runs: list[Any]) -> dict[str, dict[str, Any] | None]:
    """params/GMACs of each distinct network of the runs, by model key: remembered counts first, each
    network not known yet counted once."""
    from dimr_lab.spec.counts import lookup, model_key

    counts: dict[str, dict[str, Any] | None] = {}
    for r in runs:
        key = model_key(r.spec.model)
        if key not in counts:
            counts[key] = lookup(r.spec.model)
            if counts[key] is None:  # a network not counted before: build it on the meta device once
                from dimr_lab.nn.describe import counts_for

                counts[key] = counts_for(r.spec.model)
    return counts


def _parse_list(text: str | None, what: str, *, ints: bool = False) -> list[Any] | None:
    if text is None:
        return None
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise UserError(f"{what} {text!r}: expected a comma-separated list")
    if ints:
        try:
            return [int(t) for t in items]
        except ValueError:
            raise UserError(f"{what} {text!r}: expected integers, e.g. 0,1,2") from None
    return items


@app.command("run")
def run_cmd(
    file: Path = typer.Argument(..., help="the ablation file (.toml)", show_default=False),
    profile: str = typer.Option("tiny", "--profile", "-p", help="[profile.NAME] of the file: tiny (CPU), paper, ..."),
    executor: str = typer.Option("local", "--executor", "-e", help="local | slurm | debug (in-process, tracebacks)"),
    results: Path = typer.Option(Path("results"), "--results", "-r", help="results folder"),
    set_: Optional[List[str]] = typer.Option(None, "--set", "-s",
                                             help="override: run-spec key (train.steps=10), slurm.KEY=V, "
                                                  "ablation.seeds=[0]; key=a,b,c makes a grid; repeatable"),
    only: Optional[str] = typer.Option(None, "--only", help="only these variants: NAME[,NAME]"),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="these seeds instead of the file's: 0,1,2,3"),
    eval_only: bool = typer.Option(False, "--eval-only", help="evaluate trained runs (with --set sample./eval. "
                                                             "settings); train nothing"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the plan (and the sbatch script); write nothing"),
    as_json: bool = typer.Option(False, "--json", help="one JSON object per run (with its resolved spec)"),
    jobs: int = typer.Option(0, "--jobs", "-j", help="local: runs trained at the same time, each with an equal "
                                                     "share of the CPU threads; 0 = one per core, up to 8"),
    reuse: bool = typer.Option(True, "--reuse/--no-reuse", help="copy a trained run of the same identity (what "
                                                                "it trains) from another ablation under --results "
                                                                "instead of training it again"),
    resample: bool = typer.Option(False, "--resample", help="evaluations still to make sample anew even where "
                                                            "another evaluation of the step kept the same samples "
                                                            "(as `eval --resample`; finished runs are skipped as "
                                                            "ever, and no run's name changes)"),
    train_fn: str = typer.Option("", "--train-fn", hidden=True, help="module:function of the trainer (tests)"),
) -> None:
    """Run every variant x grid point x seed of an ablation; finished runs are skipped, others resumed."""
    from dimr_lab.runner.plan import expand, grid_overrides, split_overrides
    from dimr_lab.spec.slurm import resolve_slurm
    from dimr_lab.spec.ablation import load_ablation
    from dimr_lab.spec.preflight import check_files
    from dimr_lab.spec.schema import parse_overrides

    if executor not in EXECUTORS:
        hint = closest(executor, EXECUTORS)
        raise UserError(f"--executor {executor!r}: allowed: {', '.join(EXECUTORS)}"
                        + (f" (did you mean {hint!r}?)" if hint else ""))
    if jobs < 0:
        raise UserError(f"--jobs {jobs}: must be >= 0 (0 = one run per CPU core, up to 8)")
    if results.exists() and not results.is_dir():
        raise UserError(f"--results {results}: exists and is not a folder")
    from dimr_lab.dist import timeout_s

    timeout_s()  # a bad $DIMR_LAB_DIST_TIMEOUT_S, which every worker and SLURM task inherits: said once, up front
    if not dry_run:  # a file above it, an unwritable folder: said once, not as each run's lock failing
        from dimr_lab.spec.preflight import check_out_dir

        check_out_dir(results, "--results")
    plain, grid = grid_overrides(set_)
    run_over, slurm_upd, set_seeds = split_overrides(parse_overrides(plain))
    abl = load_ablation(file)
    given = _parse_list(seeds, "--seeds", ints=True)
    if given is not None:
        from dimr_lab.spec.ablation import check_seeds

        given = check_seeds(given, file=None, key="--seeds")
    runs = expand(abl, profile, run_over, results=results, seeds=given or set_seeds,
                  only=_parse_list(only, "--only"), grid=grid)
    evaluated = [(k, v) for k, v in run_over if k.split(".", 1)[0] in ("sample", "eval")]
    if eval_only:  # run.json keeps each run's own plan: the command line's sample./eval. settings only evaluate
        own = expand(abl, profile, [kv for kv in run_over if kv not in evaluated], results=results,
                     seeds=given or set_seeds, only=_parse_list(only, "--only"), grid=grid) if evaluated else runs
        for r, o in zip(runs, own):
            r.recorded = o.spec
    settings, sources = resolve_slurm(abl, profile, slurm_upd)
    ablation_dir = results.resolve() / abl.name
    out = _console()

    if dry_run:  # the plan, with what a real run would refuse said beside it (no checkpoint: _dry_run)
        problems = {}
        for r in runs:
            try:
                check_files(r.spec, file=str(file))
                if executor == "slurm":
                    _check_job_processes(r, settings)
            except UserError as err:
                problems[r.run_dir] = str(err)
            if eval_only and r.run_dir not in problems:
                missing = _untrained_for_eval(r, results.resolve() if reuse else None)
                if missing:
                    problems[r.run_dir] = missing
        _dry_run(out, abl, runs, settings, profile, executor, ablation_dir, as_json, eval_only, problems, sources,
                 results.resolve() if reuse else None)
        _print_notes(runs)
        return
    for r in runs:  # files the runs read, and a batch the job's processes share: before anything is written
        check_files(r.spec, file=str(file))
        if executor == "slurm":
            _check_job_processes(r, settings)
    # a trained run's outputs without its checkpoints: starting over would train over them
    _refuse_first([r.cannot_continue() for r in runs])
    if eval_only:  # evaluating needs the checkpoints: refused before any folder is made
        _refuse_first([_untrained_for_eval(r, results.resolve() if reuse else None) for r in runs])
    if reuse:
        from dimr_lab.runner.reuse import reuse_runs

        for r, source in reuse_runs(runs, results.resolve(), executor):
            _say(out, as_json, r, "reused", source=str(source.path.relative_to(results.resolve())),
                 step=source.step)

    if executor == "slurm":
        if shutil.which("sbatch") is None:
            raise UserError("--executor slurm: sbatch is not on PATH (no SLURM client here)")
        from dimr_lab.runner.slurm import submit

        res = submit(runs, settings, ablation=abl.name, ablation_dir=ablation_dir, train_fn=train_fn or None,
                     eval_only=eval_only, resample=resample)
        for r, job_id in res["submitted"]:
            _say(out, as_json, r, "submitted", job_id=job_id)
        for r, job_id in res["queued"]:
            _say(out, as_json, r, "queued before", job_id=job_id)
        for r in res["done"]:
            _say(out, as_json, r, "done (skipped)")
        for r in res["busy"]:
            _say(out, as_json, r, "busy (another process holds it)")
        if not eval_only:  # after the submission: a refused one is its one line alone
            _print_notes(runs)
        if not as_json:
            out.print(f"{len(res['submitted'])} submitted, {len(res['queued'])} already queued, "
                      f"{len(res['done'])} done; follow with: dimr-lab status {ablation_dir}")
        return

    if not eval_only:
        _print_notes(runs)
    if executor == "debug":
        from dimr_lab.runner.local import run_debug

        outcomes = run_debug(runs, train_fn=train_fn or None, eval_only=eval_only, resample=resample)
    else:
        from dimr_lab.runner.local import run_local

        outcomes = run_local(runs, jobs=jobs, train_fn=train_fn or None, show_progress=not as_json,
                             eval_only=eval_only, resample=resample)
    counts_by: dict[str, int] = {}
    for o in outcomes:
        counts_by[o.status] = counts_by.get(o.status, 0) + 1
        if as_json:
            _say(out, True, o.run, o.status, seconds=round(o.seconds, 2))
    if not as_json:
        out.print(", ".join(f"{n} {s}" for s, n in sorted(counts_by.items())))
        _print_table(out, ablation_dir, _naming(evaluated) if eval_only else None)
    if counts_by.get("failed", 0) + counts_by.get("interrupted", 0):
        raise typer.Exit(1)


def _print_notes(runs: list[Any]) -> None:
    """Each note of the runs' specs (RunSpec.notes: valid, likely not what was meant) once, with the variants
    it concerns, on stderr (stdout may be --json)."""
    variants: dict[str, list[str]] = {}
    for r in runs:
        for note in r.spec.notes():
            names = variants.setdefault(note, [])
            if r.variant not in names:
                names.append(r.variant)
    for note, names in variants.items():
        print(f"note ({', '.join(names)}): {note}", file=sys.stderr)


def _refuse_first(problems: list[str | None]) -> None:
    """One UserError for the first of the runs' problems, counting the others alike."""
    found = [p for p in problems if p]
    if found:
        more = len(found) - 1
        raise UserError(found[0] + (f" (and {more} more run{'s' if more > 1 else ''} alike)" if more else ""))


def _check_job_processes(run: Any, settings: Any) -> None:
    """The global batch divides over the job's processes (slurm nodes x tasks per node), said before
    submitting rather than on the node after the queue."""
    from dimr_lab.errors import SpecError
    from dimr_lab.spec.preflight import check_processes

    try:
        check_processes(run.spec, settings.tasks())
    except SpecError as err:
        raise SpecError(f"{err.message} of a job with slurm.nodes = {settings.nodes} and "
                        f"{settings.node_tasks()} task(s) per node", file=f"run {run.run_dir.name}",
                        key=err.key) from None


def _untrained_for_eval(run: Any, reuse_from: Path | None) -> str | None:
    """Why `run --eval-only` cannot evaluate this run (a step it evaluates has no checkpoint, and no trained
    folder elsewhere under the results would be reused for it), or None."""
    from dimr_lab.rundir import RunDir
    from dimr_lab.runner.reuse import find_source

    if run.is_done():
        return None
    folder = RunDir(run.run_dir)
    missing = [s for s in run.spec.eval_steps() if folder.checkpoint_for(s) is None]
    if not missing:
        return None
    if reuse_from is not None and find_source(reuse_from, run.run_dir, run.identity, run.spec.train.steps,
                                                 run.spec.eval_steps()):
        return None
    have = folder.available_steps() if run.run_dir.is_dir() else []
    return (f"{run.run_dir}: --eval-only evaluates trained checkpoints, and this run has none at step "
            f"{missing[0]} (checkpoints: {', '.join(map(str, have)) or 'none'}); train it first (run without "
            f"--eval-only)")


def _dry_run(out: Any, abl: Any, runs: list[Any], settings: Any, profile: str, executor: str, ablation_dir: Path,
             as_json: bool, eval_only: bool, problems: dict[Path, str], sources: dict[str, str],
             reuse_root: Path | None) -> None:
    from dimr_lab.rundir import RunDir, is_locked
    from dimr_lab.runner.reuse import find_source
    from dimr_lab.spec.counts import model_key
    from dimr_lab.spec.schema import to_dict

    counts = network_counts(runs)
    state = {}
    queued: dict[Path, str] | None = {}
    if executor == "slurm" and shutil.which("squeue") is not None:
        from dimr_lab.runner.slurm import live_jobs

        queued = live_jobs(runs)  # what `submit` would leave to its job
    for r in runs:
        source = None
        if r.is_done():
            state[r.run_dir] = ("done", None)
            continue
        if queued is None:  # `submit` refuses them all: an earlier job may still be queued
            state[r.run_dir] = ("unknown", None)
            problems.setdefault(r.run_dir, "squeue did not answer, so whether these runs' earlier jobs are still "
                                           "queued is unknown; nothing would be submitted")
            continue
        if r.run_dir in queued:
            state[r.run_dir] = ("queued", queued[r.run_dir])
            continue
        blocked = r.cannot_continue()
        if blocked:
            state[r.run_dir] = ("no checkpoint", None)
            problems.setdefault(r.run_dir, blocked)
            continue
        if is_locked(r.run_dir):  # the run leaves it to the process that holds it
            state[r.run_dir] = ("busy", None)
            continue
        if reuse_root is not None and not RunDir(r.run_dir).spec_path.exists():
            source = find_source(reuse_root, r.run_dir, r.identity, r.spec.train.steps, r.spec.eval_steps())
        state[r.run_dir] = ("todo", None if source is None else str(source.path.relative_to(reuse_root)))
    if as_json:
        for r in runs:
            c = counts[model_key(r.spec.model)] or {}
            print(json.dumps({**r.record().to_json(), "run_dir": str(r.run_dir),
                              "status": state[r.run_dir][0], "reuse": state[r.run_dir][1],
                              "params": c.get("params"),
                              "gmacs": c.get("gmacs"), "network": model_key(r.spec.model),
                              "eval_hash": r.spec.eval_hash(), "eval_steps": r.spec.eval_steps(),
                              "problem": problems.get(r.run_dir)}, sort_keys=True))
        if executor == "slurm":
            print(json.dumps({"slurm": to_dict(settings), "slurm_sources": sources}, sort_keys=True))
        return
    from rich.table import Table

    t = Table(title=f"{abl.name}: {len(runs)} runs (profile {profile}, executor {executor}"
                    + (", evaluation only" if eval_only else "") + f"); {len(counts)} distinct networks")
    t.add_column("run", overflow="fold")
    for col in ("variant", "seed", "grid", "steps", "params", "GMACs", "state"):
        t.add_column(col, overflow="fold")
    for r in runs:
        c = counts[model_key(r.spec.model)] or {}
        t.add_row(r.run_dir.name, r.variant, str(r.seed),
                  ", ".join(f"{k}={v}" for k, v in r.grid.items()) or "-", str(r.spec.train.steps),
                  _fmt_params(c.get("params")), _fmt_gmacs(c.get("gmacs")),
                  "done (skipped)" if state[r.run_dir][0] == "done" else
                  "no checkpoint (refused)" if state[r.run_dir][0] == "no checkpoint" else
                  "busy (another process holds it)" if state[r.run_dir][0] == "busy" else
                  f"queued (job {state[r.run_dir][1]})" if state[r.run_dir][0] == "queued" else
                  "unknown (squeue did not answer)" if state[r.run_dir][0] == "unknown" else
                  (f"reuse {state[r.run_dir][1]}" if state[r.run_dir][1] else "to run"))
    out.print(t)
    out.print(f"folder: {ablation_dir}")
    for problem in sorted(set(problems.values())):
        out.print(f"[yellow]a real run would stop here:[/] {problem}", markup=True)
    if executor == "slurm":
        from dimr_lab.runner.slurm import sbatch_script

        todo = [r for r in runs if state[r.run_dir][0] not in ("done", "queued", "busy")]
        out.print(f"\n# sbatch script ({len(todo)} array tasks; submitit writes it at submission):")
        print(sbatch_script(settings, abl.name, ablation_dir, len(todo), sources))
    out.print("(dry run: nothing written)")


def _say(out: Any, as_json: bool, run: Any, status: str, **extra: Any) -> None:
    if as_json:
        print(json.dumps({**run.record().to_json(), "run_dir": str(run.run_dir), "status": status, **extra},
                         sort_keys=True))
    else:
        more = " ".join(f"{k}={v}" for k, v in extra.items())
        out.print(f"{status:>16}  {run.run_dir.name}  {more}".rstrip(), soft_wrap=True)  # one line, any width


def _naming(settings: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """The sample./eval. settings among `settings` that name an evaluation (`table --eval` chooses by them)."""
    from dimr_lab.spec.run_spec import OUTSIDE_EVAL_IDENTITY

    return [(k, v) for k, v in settings if k.split(".", 1)[1] not in OUTSIDE_EVAL_IDENTITY[k.split(".", 1)[0]]]


def _print_table(out: Any, ablation_dir: Path, eval_filter: list[tuple[str, Any]] | None = None) -> None:
    """The ablation's table; `eval_filter` (`run --eval-only --set ...`'s settings): the evaluations just made,
    as `table --eval K=V` shows them, where a plain table shows each run's planned ones."""
    from dimr_lab.table import render_table

    try:
        rendered = render_table(ablation_dir, fmt="rich", on_warning=lambda line: None, eval_filter=eval_filter)
    except UserError as err:
        out.print(f"(no table: {err})")
        return
    out.print(rendered, markup=False)


def _folder(directory: Path) -> None:
    """status and cancel read a results, ablation or run folder: anything else is one line."""
    if not directory.exists():
        raise UserError(f"{directory}: no such folder")
    if not directory.is_dir():
        raise UserError(f"{directory}: a file, not a folder (a results folder, an ablation's folder or a run folder)")


@app.command("status")
def status_cmd(
    directory: Path = typer.Argument(Path("results"), help="results folder, an ablation's folder or a run folder"),
    as_json: bool = typer.Option(False, "--json", help="one JSON object per run"),
    lines: int = typer.Option(8, "--lines", "-n", min=0, help="log lines shown for failed runs"),
    watch: float = typer.Option(0.0, "--watch", "-w", help="redraw every SECONDS until interrupted (0: once)"),
) -> None:
    """Each run's state, step, loss, images/s and ETA (and SLURM job and node); failed runs with their log."""
    from dimr_lab.runner.status import collect

    _folder(directory)
    if not watch >= 0 or watch == float("inf"):  # NaN and inf too (time.sleep raised on them)
        raise UserError(f"--watch {watch}: must be a finite number >= 0 of seconds")
    if as_json:
        for s in collect(directory):
            print(json.dumps(s.as_dict(), sort_keys=True))
        return
    if not watch:
        _console().print(_status_view(directory, collect(directory), lines))
        return
    from rich.live import Live

    try:
        with Live(_status_view(directory, collect(directory), lines), console=_console(), auto_refresh=False) as live:
            while True:
                time.sleep(watch)
                live.update(_status_view(directory, collect(directory), lines), refresh=True)
    except KeyboardInterrupt:
        pass


def _status_view(directory: Path, statuses: list[Any], lines: int) -> Any:
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    from dimr_lab.runner.status import format_duration, summary

    if not statuses:
        return Text(f"no runs under {directory}")
    t = Table(title=str(directory))
    gridded = any(s.grid for s in statuses)  # runs of one variant and seed told apart by their grid point only
    for col in ("run", *(("grid",) if gridded else ()), "state", "step", "loss", "img/s", "ETA", "job", "detail"):
        t.add_column(col, overflow="fold")
    style = {"done": "green", "running": "cyan", "pending": "yellow", "failed": "red"}
    for s in statuses:
        try:
            rel = s.run_dir.relative_to(directory)
        except ValueError:
            rel = Path(s.run_dir.name)
        rel = rel if str(rel) != "." else Path(s.run_dir.name)
        step = f"{s.step if s.step is not None else '-'}/{s.steps if s.steps is not None else '?'}"
        job = s.job_id or "-"
        if s.node:
            job += f" @{s.node}"
        grid = (Text(", ".join(f"{k}={v}" for k, v in s.grid.items()) or "-"),) if gridded else ()
        t.add_row(str(rel), *grid, f"[{style[s.state]}]{s.state}[/]", step,
                  f"{s.loss:.4f}" if s.loss is not None else "-",
                  f"{s.images_per_s:.0f}" if s.images_per_s is not None else "-", format_duration(s.eta_s), job,
                  Text("; ".join(x for x in (s.detail, s.history()) if x)))
    parts: list[Any] = [t]
    for ablation, tally in summary(statuses).items():
        parts.append(Text(f"{ablation}: " + ", ".join(f"{n} {k}" for k, n in sorted(tally.items()))))
    for s in statuses:
        if s.state == "failed" and s.log_tail:
            parts.append(Text(f"\n{s.run_dir.name}: last lines of its log", style="red"))
            parts.extend(Text("  " + ln) for ln in s.log_tail[-lines:])
    return Group(*parts)


@app.command("cancel")
def cancel_cmd(
    directory: Path = typer.Argument(..., help="results folder, an ablation's folder or a run folder"),
) -> None:
    """Cancel what is still queued or running for the runs under DIR (scancel; local runs checkpoint and stop)."""
    from dimr_lab.runner.status import cancel

    _folder(directory)
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


@app.command("logs")
def logs_cmd(
    run_dir: Path = typer.Argument(..., help="a run folder"),
    follow: bool = typer.Option(False, "--follow", "-f", help="keep printing what is appended"),
    lines: int = typer.Option(20, "--lines", "-n", min=1, help="how many lines to start with"),
) -> None:
    """A run's output: its process log (local or SLURM), else its training log."""
    from dimr_lab.rundir import LOG, OUTPUT_LOG, RunDir, is_run_folder, tail_lines
    from dimr_lab.runner.slurm_logs import run_log_file, run_log_files, run_log_streams

    if not run_dir.is_dir() or not is_run_folder(run_dir):
        raise UserError(f"{run_dir}: not a run folder (no run.json or spec.json)")
    path = run_log_file(RunDir(run_dir)) or (run_dir / OUTPUT_LOG if (run_dir / OUTPUT_LOG).exists() else run_dir / LOG)
    if not path.exists():
        raise UserError(f"{run_dir}: no log yet")
    present = {p: p.stat().st_size for p in run_log_files(RunDir(run_dir))}  # a move goes on from here
    streams = run_log_streams(RunDir(run_dir))
    for line in tail_lines(path, lines, nbytes=1 << 20):
        print(line)
    if not follow:
        return
    try:
        _follow(path, streams=streams if path in streams else [path], offsets=present,
                locate=lambda: run_log_streams(RunDir(run_dir)))
    except KeyboardInterrupt:
        pass


class _Stream:
    """One followed file: its open handle (None while it is not there), what was read of a line not yet ended."""

    def __init__(self, path: Path, f: Any = None):
        import codecs

        self.path, self.f, self.partial, self.quiet = path, f, b"", False
        # a line printed in pieces (a quiet poll) may be cut inside a character: its bytes wait for the rest
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")


def _follow(path: Path, sleep: Any = time.sleep, *, streams: Any = None, locate: Any = None,
            offsets: dict[Path, int] | None = None, poll_s: float = 0.5) -> None:
    """Print what is appended to every stream of a process log, `streams` (a SLURM job's stdout and stderr;
    default `path` alone), interleaved line by line as they grow: `path` (whose tail was printed) from its
    end, the others from where `offsets` (each file's size when the command began) says, a stream that
    appears later from its start. As `tail -f` does with several files, a '==> PATH <==' line comes before the
    lines of a stream other than the one printed last; a line not yet ended is printed once its stream has
    been quiet for a poll (a progress bar's '\r' ends a line).
    A file put in its place (a training session rewrites log.jsonl up to the checkpoint it resumes from, then
    appends) is followed on: what the new file adds to the lines both share is printed; a file cut shorter is
    followed from its start.
    `locate()` names the streams of the run's newest process log (a path or a list): when they are another
    process's (none of the followed ones: a SLURM job submitted again writes its own files in its own folder;
    a local rerun writes output.log) and it wrote last, following moves there, each stream from where
    `offsets` (a file's size when the command began, where it was left) says, else from its start."""
    import os

    offsets = dict(offsets or {})
    last_printed = [path]
    ended = [True]  # whether what was printed last ends a line

    def emit(stream: _Stream, data: bytes, final: bool = False) -> None:
        text = stream.decoder.decode(data, final=final)
        if not text:
            return
        if stream.path != last_printed[0]:
            sys.stdout.write(("" if ended[0] else "\n") + f"==> {stream.path} <==\n")
            last_printed[0] = stream.path
        sys.stdout.write(text)
        sys.stdout.flush()
        ended[0] = data.endswith((b"\n", b"\r"))

    def open_at(p: Path, at: int | None) -> Any:
        try:
            f = open(p, "rb")
        except OSError:  # named but not there (yet)
            return None
        size = os.fstat(f.fileno()).st_size
        f.seek(size if at is None else min(at, size))
        return f

    def group(located: Any) -> list[Path]:
        if located is None:
            return []
        return [Path(located)] if isinstance(located, (str, Path)) else [Path(p) for p in located]

    def newest_mtime(opened: list[Any]) -> float:
        return max((os.fstat(f.fileno()).st_mtime for f in opened if f is not None), default=float("-inf"))

    paths = list(dict.fromkeys([path, *group(streams)]))
    followed = [_Stream(p, open_at(p, None if p == path else offsets.get(p, None))) for p in paths]
    try:
        while True:
            got = False
            for st in followed:
                if st.f is None:
                    continue
                chunk = st.f.read()
                if not chunk:
                    continue
                got, st.quiet = True, False
                data = st.partial + chunk
                cut = max(data.rfind(b"\n"), data.rfind(b"\r")) + 1
                st.partial = data[cut:]
                emit(st, data[:cut])
            if got:
                continue
            for st in followed:  # a line a stream has left unended for a whole poll
                if st.partial and st.quiet:
                    emit(st, st.partial)
                    st.partial = b""
                st.quiet = True
            sleep(poll_s)
            located = group(locate()) if locate is not None else []
            if located and not set(located) & set(paths):
                opened = [open_at(p, offsets.get(p, 0)) for p in located]
                if any(f is not None for f in opened) and \
                        newest_mtime(opened) >= newest_mtime([st.f for st in followed]):
                    for st in followed:
                        if st.f is not None:
                            emit(st, st.partial, final=True)  # the old process's last, unended line
                            offsets[st.path] = st.f.tell()
                            st.f.close()
                    paths = located
                    followed = [_Stream(p, f) for p, f in zip(located, opened)]
                    continue
                for f in opened:  # older logs (a job submitted has written nothing yet): stay
                    if f is not None:
                        f.close()
            for st in followed:
                if st.f is None:  # a stream that was not there: from its start (or where it was left)
                    st.f = open_at(st.path, offsets.get(st.path, 0))
                    continue
                try:
                    new = open(st.path, "rb")
                except FileNotFoundError:  # gone for now: keep the one open
                    continue
                if os.fstat(new.fileno()).st_ino != os.fstat(st.f.fileno()).st_ino:
                    seen = st.f.seek(0, 1) - len(st.partial)
                    st.f.seek(0)
                    old, ahead = st.f.read(seen), new.read()
                    shared = 0  # the bytes of the lines both files begin with
                    for a, b in zip(old.splitlines(keepends=True), ahead.splitlines(keepends=True)):
                        if a != b:
                            break
                        shared += len(b)
                    new.seek(shared)  # from the first line that differs
                    st.f.close()
                    st.f, st.partial = new, b""
                    st.decoder.reset()
                else:
                    if os.fstat(st.f.fileno()).st_size < st.f.tell():
                        st.f.seek(0)
                        st.partial = b""
                        st.decoder.reset()
                    new.close()
    finally:
        for st in followed:
            if st.f is not None:
                st.f.close()
