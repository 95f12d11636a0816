"""Train one planned run from its folder: `python -m dimr_lab.runner.worker RUN_DIR [--train-fn MOD:FN]`.

Reads the resolved spec from RUN_DIR/run.json, holds RUN_DIR/.lock, and calls the trainer
(`train_run(spec, out_dir, should_stop=...)`), which runs or resumes the run. SIGINT/SIGTERM ask the
trainer to stop at the next step boundary (it saves a checkpoint first).
Exit status: 0 done (metrics.json written), 3 interrupted (resumable), 4 another process holds the
run, 1 the trainer failed (traceback on stderr), 2 a bad run folder.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

from dimr_lab.errors import UserError

DEFAULT_TRAIN_FN = "dimr_lab.train.trainer:train_run"
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


def load_planned_spec(run_dir: Path):
    """The resolved RunSpec stored in run_dir/run.json (validated again)."""
    from dimr_lab.runner.state import RUN_INFO, read_json
    from dimr_lab.spec.run_spec import load_run_spec

    info = read_json(Path(run_dir) / RUN_INFO)
    if not isinstance(info, dict) or not isinstance(info.get("spec"), dict):
        raise UserError(f"{run_dir}: no readable {RUN_INFO} with a resolved spec (plan the run with dimr-lab run)")
    return load_run_spec(info["spec"], file=str(Path(run_dir) / RUN_INFO)), info


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
              *, lock_wait_s: float = 0.0) -> tuple[int, dict | None]:
    """Train (or resume) the run in run_dir under its lock: (exit status, trainer result)."""
    from dimr_lab.runner.state import is_done, run_lock

    run_dir = Path(run_dir)
    if is_done(run_dir):
        return EXIT_DONE, None
    spec, _ = load_planned_spec(run_dir)
    with run_lock(run_dir, wait_s=lock_wait_s) as got:
        if not got:
            return EXIT_BUSY, None
        if is_done(run_dir):
            return EXIT_DONE, None
        result = train_fn(spec, run_dir, should_stop=should_stop)
    if isinstance(result, dict) and result.get("interrupted"):
        return EXIT_INTERRUPTED, result
    if not is_done(run_dir):
        raise RuntimeError(f"the trainer returned without writing {run_dir / 'metrics.json'}")
    return EXIT_DONE, result if isinstance(result, dict) else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dimr_lab.runner.worker")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--train-fn", default=DEFAULT_TRAIN_FN)
    args = p.parse_args(argv)
    stop = StopFlag()
    signal.signal(signal.SIGINT, stop.set)
    signal.signal(signal.SIGTERM, stop.set)
    try:
        fn = resolve_train_fn(args.train_fn)
        code, _ = train_one(args.run_dir, fn, stop)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return EXIT_BAD
    except Exception:  # the trainer failed: keep the whole traceback in the run's log
        traceback.print_exc()
        return EXIT_FAILED
    if code == EXIT_BUSY:
        print(f"{args.run_dir}: another process is training this run", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
