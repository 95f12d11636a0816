"""Train or evaluate one planned run from its folder:
`python -m dimr_lab.runner.worker RUN_DIR [--mode train|eval] [--train-fn MOD:FN] [--resample] [--set KEY=JSON]`.

Reads the resolved spec from RUN_DIR/run.json (with `--set` settings on top: `run --eval-only` leaves run.json
as it was, the run's own plan, and hands the settings it evaluates with this way) and calls the trainer
(`train_run(spec, run_dir, should_stop=...)`, which takes the folder's lock, resumes or continues the run, and
evaluates it) or, with `--mode eval`, only the evaluations (the run must have trained). `--resample` (from
`dimr-lab run --resample`) has its evaluations sample anew rather than take a finished sibling evaluation's samples
(dimr_lab.eval.reuse); it reaches the function as resample=True, and is not passed at all otherwise.
SIGINT/SIGTERM ask it to stop at the next step boundary (it saves a checkpoint first); one that came before
it began (the local runner starts it with both blocked) stops it at once, interrupted.
Exit status: 0 done (its evaluations written), 3 interrupted (resumable), 4 another process holds the
run, 1 the trainer failed (traceback on stderr), 2 a bad run folder or spec.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import signal
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

from dimr_lab.errors import UserError

DEFAULT_TRAIN_FN = "dimr_lab.train.trainer:train_run"
EVAL_FN = "dimr_lab.eval.command:evaluate_planned"
EXIT_DONE, EXIT_FAILED, EXIT_BAD, EXIT_INTERRUPTED, EXIT_BUSY = 0, 1, 2, 3, 4


def resolve_train_fn(ref: str | Callable[..., Any] | None) -> Callable[..., Any]:
    """'package.module:function' -> the function (imported now; this is code of the project, not of a spec)."""
    if ref is None:
        ref = DEFAULT_TRAIN_FN
    if callable(ref):
        return ref
    mod_name, _, attr = ref.partition(":")
    if not mod_name or not attr:
        raise UserError(f"train function {ref!r}: expected 'module:function'")
    try:
        module = importlib.import_module(mod_name)
    except ImportError as err:
        raise UserError(f"cannot import the trainer {ref!r}: {err}") from None
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise UserError(f"train function {ref!r}: {mod_name} has no {attr!r}")
    return fn  # type: ignore[return-value]


def load_planned_spec(run_dir: Path, overrides: list[tuple[str, Any]] | None = None) -> tuple[Any, Any]:
    """(RunSpec, RunRecord) of a planned run folder (run.json, validated again, with `overrides` on top)."""
    from dimr_lab.rundir import RunDir
    from dimr_lab.spec.run_spec import load_run_spec

    run = RunDir(run_dir)
    record = run.read_record()
    return load_run_spec(record.spec, overrides, file=str(run.record_path)), record


def pending_evaluations(spec: Any, run_dir: Path) -> list[int]:
    """Steps whose evaluation with the spec's settings has not finished."""
    from dimr_lab.rundir import RunDir

    return RunDir(run_dir).unfinished_evaluations(spec)


class StopFlag:
    """Set by SIGINT/SIGTERM (and by callers); the trainer polls it at step boundaries."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __call__(self) -> bool:
        return self.signum is not None

    def set(self, signum: int, frame: Any = None) -> None:
        if self.signum is None:
            print(f"[dimr-lab] signal {signal.Signals(signum).name}: checkpointing at the next step boundary",
                  file=sys.stderr, flush=True)
        self.signum = signum


def train_one(run_dir: Path, train_fn: Callable[..., Any], should_stop: Callable[[], bool] | None = None,
              resample: bool = False, overrides: list[tuple[str, Any]] | None = None) -> tuple[int, dict | None]:
    """Train (or resume, continue, evaluate) the run in run_dir: (exit status, trainer result). `resample` is
    passed on as resample=True only when set (a trainer of tests need not take it); `overrides` go on top of
    run.json's spec (PlannedRun.record_overrides)."""
    from dimr_lab.rundir import RunBusy

    run_dir = Path(run_dir)
    spec, _ = load_planned_spec(run_dir, overrides)
    if not pending_evaluations(spec, run_dir):
        return EXIT_DONE, None
    try:
        result = train_fn(spec, run_dir, should_stop=should_stop, **({"resample": True} if resample else {}))
    except RunBusy:
        return EXIT_BUSY, None
    if isinstance(result, dict) and result.get("interrupted"):
        return EXIT_INTERRUPTED, result
    if isinstance(result, dict) and "rank" in result:
        return EXIT_DONE, result
    missing = pending_evaluations(spec, run_dir)
    if missing:
        raise RuntimeError(f"the trainer returned without the evaluations {missing} of {run_dir}")
    return EXIT_DONE, result if isinstance(result, dict) else None


def _json_settings(items: list[str]) -> list[tuple[str, Any]]:
    """['sample.steps=3', 'eval.metrics=["fid"]'] -> [('sample.steps', 3), ('eval.metrics', ['fid'])]"""
    import json

    out = []
    for item in items:
        key, _, raw = item.partition("=")
        try:
            out.append((key, json.loads(raw)))
        except ValueError:
            raise UserError(f"--set {item!r}: expected KEY=JSON") from None
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dimr_lab.runner.worker")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--train-fn", default=DEFAULT_TRAIN_FN)
    p.add_argument("--mode", choices=("train", "eval"), default="train")
    p.add_argument("--resample", action="store_true", help="evaluations sample anew (no samples taken from a "
                                                           "finished sibling evaluation)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=JSON",
                   help="a setting on top of run.json's spec (run --eval-only's); repeatable")
    args = p.parse_args(argv)
    stop = StopFlag()
    signal.signal(signal.SIGINT, stop.set)
    signal.signal(signal.SIGTERM, stop.set)
    # the local runner starts a worker with these signals blocked: one sent while it was starting arrives now
    signal.pthread_sigmask(signal.SIG_UNBLOCK, (signal.SIGINT, signal.SIGTERM))
    if stop():
        print(f"{args.run_dir}: stopped before it started; rerun to start it", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    try:
        fn = resolve_train_fn(EVAL_FN if args.mode == "eval" else args.train_fn)
        code, _ = train_one(args.run_dir, fn, stop, resample=args.resample, overrides=_json_settings(args.overrides))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return EXIT_BAD
    except Exception:  # the trainer failed: keep the whole traceback in the run's log
        traceback.print_exc()
        return EXIT_FAILED
    if code == EXIT_BUSY:
        print(f"{args.run_dir}: another process is training this run", file=sys.stderr)
    if code == EXIT_INTERRUPTED and args.mode == "train":  # the run's log says where (and why) it stopped
        from dimr_lab.rundir import RunDir

        with contextlib.suppress(UserError, OSError):
            spec, _ = load_planned_spec(args.run_dir)
            print(f"[dimr-lab] {RunDir(args.run_dir).stop_detail(spec.train.steps)}", file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
