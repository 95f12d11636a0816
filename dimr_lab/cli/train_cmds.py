"""Commands: train (one run: train, then evaluate; resumable, continuable), eval (evaluate a trained run),
sample (a grid from a run), distortion (the low-fidelity samples of an evaluation)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any, Iterator, Optional

import typer

from dimr_lab.cli import app

EXIT_INTERRUPTED = 130


def _main_process() -> bool:
    """Whether this is the job's first process (or the only one): the one that speaks for the job."""
    return int(os.environ.get("RANK", "0") or 0) == 0


@contextlib.contextmanager
def _peer_death_is_one_line(run_dir: Path) -> Iterator[None]:
    """In a job of several processes, one that dies (or hangs past $DIMR_LAB_DIST_TIMEOUT_S) makes the others'
    next collective fail with a page of gloo's or NCCL's traceback: one line instead, naming the checkpoint a
    rerun resumes from."""
    from dimr_lab.dist import TIMEOUT_ENV, peer_lost, peer_timed_out
    from dimr_lab.errors import JobFailed

    try:
        yield
    except RuntimeError as err:
        if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1 or not peer_lost(err):
            raise
        from dimr_lab.rundir import RunDir

        idx = RunDir(run_dir).index()
        kept = f"its checkpoint of step {idx.last} is kept" if idx else "no checkpoint was written yet"
        slow = (f" (a process that is only slow, as in a first compiled step, needs a larger ${TIMEOUT_ENV})"
                if peer_timed_out(err) else "")
        raise JobFailed(f"{run_dir}: another process of this job stopped ({_first_line(err)}); {kept}: run the "
                        f"job again to resume{slow}") from None


def _first_line(err: BaseException) -> str:
    text = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return text.split("] ", 1)[-1].split(". ", 1)[0][:160]  # its first sentence, without gloo's source location


class _Stop:
    """SIGINT, SIGTERM and SIGUSR1 (SLURM's notice) ask the work to stop at the next step boundary."""

    def __init__(self) -> None:
        self.signum: int | None = None
        for sig in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGUSR1", None)):
            if sig is not None:
                signal.signal(sig, self._set)

    def _set(self, signum: int, _frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now (the last checkpoint stays)
        self.signum = signum
        if not _main_process():  # every process of a job gets the signal: one notice
            return
        print(f"\n[dimr-lab] {signal.Signals(signum).name}: stopping at the next step boundary after a checkpoint "
              f"(Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def __call__(self) -> bool:
        return self.signum is not None


def _say_metrics(result: dict[str, Any], where: Path) -> str:
    keys = ("sample_accuracy", "distortion_rate", "fid", "fid_floor", "kid", "step", "samples")
    return ", ".join(f"{k}={result[k]:.4g}" if isinstance(result.get(k), float) else f"{k}={result.get(k)}"
                     for k in keys if result.get(k) is not None)


@app.command()
def train(
    spec: Optional[Path] = typer.Argument(None, help="run spec TOML; none = the built-in default"),
    out: Path = typer.Option(..., "--out", "-o", help="run directory (the same command on it again resumes; with "
                                                      "a larger train.steps it continues)"),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="override a spec key: section.key=value"),
    threads: Optional[int] = typer.Option(None, "--threads", min=0,
                                          help="CPU threads (train.threads; 0 = every core while the machine is "
                                               "otherwise idle, fewer as other processes load it)"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="rich progress bar"),
) -> None:
    """Train one run into OUT, then evaluate it (resumes OUT; refuses a folder holding another run).

    In a job of several processes (torchrun), each waits at most $DIMR_LAB_DIST_TIMEOUT_S seconds (default 600)
    for the others in a collective, then stops with one line."""
    from dimr_lab.spec.run_spec import load_run_spec
    from dimr_lab.spec.schema import parse_overrides

    overrides = parse_overrides(set_)
    if threads is not None:
        overrides.append(("train.threads", threads))
    run_spec = load_run_spec(spec, overrides)
    stop = _Stop()
    from dimr_lab.train.trainer import train_run

    with _peer_death_is_one_line(out):
        result = train_run(run_spec, out, should_stop=stop, progress=progress)
    if result.get("interrupted"):
        why = f" at train.time_limit_s ({run_spec.train.time_limit_s:g} s)" if result.get("time_limit") else ""
        if _main_process() and "evaluating" in result:
            print(f"stopped evaluating step {result['evaluating']}{why}; the samples made so far are kept in {out}; "
                  f"run the same command to resume", file=sys.stderr)
        elif _main_process():
            print(f"stopped at step {result.get('step')}{why}; checkpoint saved in {out}; run the same command to "
                  f"resume", file=sys.stderr)
        raise typer.Exit(EXIT_INTERRUPTED)
    if "rank" in result:
        return
    print(f"done: {out} ({_say_metrics(result, out)})")


@app.command("eval")
def eval_cmd(
    run_dir: Path = typer.Argument(..., help="a run folder (made by train or run)"),
    step: Optional[int] = typer.Option(None, "--step", min=0, help="the checkpoint at this step (default: the last)"),
    all_steps: bool = typer.Option(False, "--all-steps", help="every kept checkpoint and the last"),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="sample.KEY=V or eval.KEY=V (e.g. "
                                                                 "sample.guidance_scale=1.5, eval.samples=50000)"),
    as_json: bool = typer.Option(False, "--json", help="print the metrics object(s), one per line"),
    resample: bool = typer.Option(False, "--resample", help="sample anew even where another evaluation of the "
                                                            "step kept the same samples"),
) -> None:
    """Evaluate a trained run's checkpoints without training; each evaluation lands in RUN_DIR/evals/ under a
    name made of its step and settings, and a finished one is skipped. One that differs from a finished one
    only in how the samples are measured (eval.metrics, eval.feature_extractor, ...) takes its samples."""
    from dimr_lab.errors import UserError
    from dimr_lab.eval.command import evaluate_run
    from dimr_lab.spec.schema import parse_overrides

    if step is not None and all_steps:
        raise UserError("--step and --all-steps: give one of them")
    stop = _Stop()
    with _peer_death_is_one_line(run_dir):
        results = evaluate_run(run_dir, step=step, all_steps=all_steps, overrides=parse_overrides(set_),
                               should_stop=stop, log=None if as_json else lambda line: print(line, file=sys.stderr),
                               resample=resample)
    interrupted = any(r.get("interrupted") for r in results)
    if any(r.get("enabled") is False for r in results) and _main_process():
        print("note: evaluation is off in this run's spec (eval.enabled = false): a sample grid only; "
              "--set eval.enabled=true computes the metrics", file=sys.stderr)
    for r in results:
        if "rank" in r:
            continue
        if as_json:
            print(json.dumps(r, sort_keys=True))
        elif not r.get("interrupted"):
            print(f"{r.get('eval_name')}: {_say_metrics(r, run_dir)}")
    if interrupted:
        if _main_process():  # once for a job of several processes
            print("stopped; the samples made so far are kept: run the same command to resume", file=sys.stderr)
        raise typer.Exit(EXIT_INTERRUPTED)


def check_png_out(out: Path, force: bool) -> None:
    """A grid's --out: a .png name, not a folder, and no existing file unless --force."""
    from dimr_lab.errors import UserError
    from dimr_lab.spec.preflight import check_out_file

    if out.is_dir():
        raise UserError(f"--out {out}: is a directory; give a file name for the PNG")
    if out.suffix.lower() != ".png":
        raise UserError(f"--out {out}: the grid is a PNG; give a name ending in .png")
    if out.exists() and not force:
        raise UserError(f"--out {out}: exists; refusing to overwrite it (use --force to replace it)")
    check_out_file(out, "--out")


def _class_list(text: str | None) -> list[str] | None:
    """--classes as its comma-separated items (None when not given), refused when it holds none."""
    from dimr_lab.errors import UserError

    if text is None:
        return None
    items = [t.strip() for t in text.split(",")]
    if not all(items):
        raise UserError(f"--classes {text!r}: expected a comma-separated list of classes, e.g. 3,5")
    return items


def _class_numbers(items: list[str], text: str, num_classes: int, names: list[str] | None) -> list[int]:
    """--classes' items as class numbers of a run with num_classes classes (names: the dataset's, or None); one
    that is no class of the run is refused, naming what is allowed."""
    from dimr_lab.errors import UserError

    by_name = {name: i for i, name in enumerate(names or [])}
    allowed = f"numbers 0 to {num_classes - 1}" + (f" or names {', '.join(names[:num_classes])}" if names else "")
    out = []
    for item in items:
        try:
            number: int | None = int(item)
        except ValueError:
            number = by_name.get(item)
        if number is None or not 0 <= number < num_classes:
            what = "not a class" if number is None else "out of range"
            raise UserError(f"--classes {text!r}: {item!r} is {what}; this run's {num_classes} classes: {allowed}")
        out.append(number)
    return out


@app.command()
def sample(
    run_dir: Path = typer.Argument(..., help="a run folder (spec.json + a checkpoint)"),
    n: int = typer.Option(64, "--n", min=1, help="number of samples (class-balanced labels unless --classes)"),
    classes: Optional[str] = typer.Option(None, "--classes", help="these classes, in turn: 3,5 labels the samples "
                                                                  "3, 5, 3, 5, ... (numbers from 0, or the "
                                                                  "dataset's class names)"),
    out: Path = typer.Option(Path("grid.png"), "--out", "-o", help="PNG to write"),
    step: Optional[int] = typer.Option(None, "--step", min=0, help="the checkpoint at this step (default: the last)"),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="guidance scale (default: the run's)"),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="sampler steps (default: the run's)"),
    sampler: Optional[str] = typer.Option(None, "--sampler", help="a registered sampler (default: the run's)"),
    order: Optional[int] = typer.Option(None, "--order", min=1, max=3, help="DPM-Solver order"),
    seed: int = typer.Option(0, "--seed", min=0, help="seed of the starting noise"),
    ema: bool = typer.Option(True, "--ema/--no-ema", help="EMA weights (default) or the raw ones"),
    force: bool = typer.Option(False, "--force", help="replace an existing file"),
) -> None:
    """Write a labelled grid of N samples from RUN_DIR's checkpoint. Sample i's starting noise comes from i and
    --seed, its label from i: every class in turn, or the --classes given in turn."""
    import math

    import numpy as np
    import torch

    from dimr_lab.errors import UserError
    from dimr_lab.eval.run import _class_names
    from dimr_lab.eval.sampling import data_classes, generate, labels_for, load_run_model, to_uint8
    from dimr_lab.images import write_grid
    from dimr_lab.registry import SAMPLERS
    from dimr_lab.spec.run_spec import with_overrides

    check_png_out(out, force)
    asked = _class_list(classes)
    if sampler is not None:
        SAMPLERS.check(sampler, file="--sampler")
    if guidance is not None and not math.isfinite(guidance):
        raise UserError(f"--guidance {guidance}: must be a finite number")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, spec, _ = load_run_model(run_dir, step=step, ema=ema, device=device)
    if sampler is not None and order is None and spec.sample.order not in SAMPLERS.meta(sampler, "orders"):
        order = max(SAMPLERS.meta(sampler, "orders"))  # another sampler without --order: its own, not the run's
    # the options go through the spec's checks, as `eval --set sample.KEY=V` does: a guidance the run's training
    # never prepared for, an order the sampler does not read or a seed out of range is refused, not sampled
    options = {"--seed": ("sample.seed", seed), "--sampler": ("sample.sampler", sampler),
               "--steps": ("sample.steps", steps), "--order": ("sample.order", order),
               "--guidance": ("sample.guidance_scale", guidance)}
    given = {flag: kv for flag, kv in options.items() if kv[1] is not None}
    named = "/".join(flag for flag in given if flag != "--seed" or seed) or "--seed"  # --seed 0 is the default
    spec = with_overrides(spec, list(given.values()), source=named)
    idx = np.arange(n)
    if asked is None:
        labels = labels_for(idx, data_classes(spec))
    else:  # sample i keeps its noise; its label is the given classes' in turn
        if not spec.model.num_classes:
            raise UserError(f"--classes {classes!r}: this run's network takes no class labels (model.num_classes = 0)")
        chosen = _class_numbers(asked, classes or "", data_classes(spec), _class_names(spec))
        labels = torch.tensor(chosen, dtype=torch.int64)[torch.from_numpy(idx % len(chosen))]
    x = generate(model, spec, idx, labels)
    write_grid(to_uint8(x, spec.data), out, labels.tolist(), _class_names(spec))
    print(f"wrote {out} ({n} samples)")


@app.command()
def distortion(
    run_dir: Path = typer.Argument(..., help="a run folder (its newest evaluation) or an evaluation folder"),
    threshold: Optional[float] = typer.Option(None, help="flag p(class) below this (default: the evaluation's "
                                                          "eval.distortion_threshold)"),
    max_images: int = typer.Option(64, "--max", min=1, help="at most this many flagged samples in the grid"),
    out: Optional[Path] = typer.Option(None, help="the grid PNG (default: in the evaluation folder, "
                                                  "distortion-t<threshold>.png for another threshold than its own)"),
    force: bool = typer.Option(False, "--force", help="replace an existing --out file"),
) -> None:
    """The paper's low-fidelity detector: a grid of the samples the classifier flags, and their share.
    The evaluation's own distortion.json and .png (at its eval.distortion_threshold) are never replaced: another
    threshold writes distortion-t<threshold>.json and .png beside them."""
    from dimr_lab.eval.distortion import distortion_report, latest_evaluation_dir
    from dimr_lab.eval.run import _class_names
    from dimr_lab.rundir import EVAL_RECORD, RunDir, read_evaluation
    from dimr_lab.spec.run_spec import load_run_spec

    if out is not None:
        check_png_out(out, force)
    eval_dir = run_dir if (run_dir / EVAL_RECORD).is_file() else latest_evaluation_dir(run_dir)
    run = RunDir(eval_dir.parent.parent)
    spec = load_run_spec(run.spec_data(), file=str(run.spec_path))
    ev = read_evaluation(eval_dir)
    default = (ev.settings.get("eval") or {}).get("distortion_threshold", 0.5) if ev else 0.5
    chosen = default if threshold is None else threshold
    report = distortion_report(eval_dir, threshold=chosen, max_images=max_images, out=out,
                               class_names=_class_names(spec),
                               stem="distortion" if chosen == default else f"distortion-t{chosen:g}")
    print(f"distortion rate {report['distortion_rate']:.3f} ({report['flagged']}/{report['samples']} samples "
          f"with p(class) < {report['threshold']})" + (f"; grid: {report['grid']}" if "grid" in report else ""))


@app.command()
def export(
    run_dir: Path = typer.Argument(..., help="a run folder"),
    out: Path = typer.Option(..., "--out", "-o", help="the file to write (.safetensors)"),
    step: Optional[int] = typer.Option(None, "--step", min=0, help="the checkpoint at this step (default: the last)"),
    fmt: str = typer.Option("safetensors", "--format", help="safetensors (weights + the resolved spec as metadata)"),
    ema: bool = typer.Option(True, "--ema/--raw", help="the EMA weights (default) or the raw ones"),
    force: bool = typer.Option(False, "--force", help="replace an existing file"),
) -> None:
    """Export a run's network: its weights and resolved model spec, loadable by dimr_lab.load_model and timm."""
    from dimr_lab.errors import UserError
    from dimr_lab.eval.sampling import load_run_model
    from dimr_lab.nn.checkpoint import export_safetensors
    from dimr_lab.spec.preflight import check_out_file
    from dimr_lab.spec.schema import to_dict

    if fmt != "safetensors":
        raise UserError(f"--format {fmt!r}: allowed: safetensors")
    if out.is_dir():
        raise UserError(f"--out {out}: is a directory; give a file name")
    if out.exists() and not force:
        raise UserError(f"--out {out}: exists; refusing to overwrite it (use --force)")
    if out.suffix != ".safetensors":
        raise UserError(f"--out {out}: name it *.safetensors")
    check_out_file(out, "--out")
    model, spec, at = load_run_model(run_dir, step=step, ema=ema)
    export_safetensors(out, to_dict(model.spec), model.state_dict(), identity=spec.identity_hash(), step=at,
                       weights="ema" if ema else "raw", run=str(run_dir))
    print(f"wrote {out} ({model.spec.name}, step {at}, {'EMA' if ema else 'raw'} weights)")
