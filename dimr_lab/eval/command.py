"""Evaluating trained runs without training them: `dimr-lab eval RUN_DIR` and `run FILE --eval-only`."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any, Callable

from dimr_lab import dist as distributed
from dimr_lab.errors import UserError
from dimr_lab.rundir import RunDir, run_lock


def run_spec_with(run: RunDir, overrides: list[tuple[str, Any]] | None = None) -> Any:
    """A run's resolved spec with sample.* / eval.* overrides (errors name --set)."""
    from dimr_lab.eval.run import check_eval_overrides
    from dimr_lab.spec.run_spec import load_run_spec, with_overrides

    from dimr_lab.rundir import is_run_folder

    if not run.path.is_dir() or not is_run_folder(run.path):
        raise UserError(f"{run.path}: not a run folder (no spec.json or run.json)")
    spec = load_run_spec(run.spec_data(), file=str(run.spec_path if run.spec_path.exists() else run.record_path))
    if overrides:
        check_eval_overrides(overrides)
        spec = with_overrides(spec, overrides)
    return spec


def steps_to_evaluate(run: RunDir, spec: Any, *, step: int | None = None, all_steps: bool = False) -> list[int]:
    """--step N, --all-steps (every kept checkpoint and the last), or the last trained step."""
    have = run.available_steps()
    if not have:
        raise UserError(f"{run.path}: no checkpoint to evaluate (has it trained?)")
    if all_steps:
        return have
    if step is None:
        return [have[-1]]
    if step not in have:
        raise UserError(f"{run.path}: no checkpoint at step {step}; kept: {', '.join(map(str, have))}")
    return [step]


def evaluate_run(run_dir: str | Path, *, step: int | None = None, all_steps: bool = False,
                 overrides: list[tuple[str, Any]] | None = None, should_stop: Callable[[], bool] | None = None,
                 log: Callable[[str], None] | None = None,
                 progress: Callable[[int, int], None] | None = None, resample: bool = False) -> list[dict[str, Any]]:
    """Evaluate a run's checkpoints with its settings (or overridden ones); done evaluations are skipped, and
    samples another evaluation of the step drew with the same settings are taken from it unless `resample`.
    Returns the metrics of each step ({"interrupted": True} when stopped)."""
    from dimr_lab.eval.run import evaluate_step, train_summary
    from dimr_lab.spec.preflight import check_files

    run = RunDir(run_dir)
    spec = run_spec_with(run, overrides)
    check_files(spec, file="--set" if overrides else None)
    steps = steps_to_evaluate(run, spec, step=step, all_steps=all_steps)
    info = distributed.setup()
    out = []
    try:
        with run_lock(run.path, purpose="eval") if info.main else contextlib.nullcontext():
            for s in steps:
                res = evaluate_step(spec, run, s, info=info, should_stop=should_stop, log=log, progress=progress,
                                    train_info=train_summary(run, s, spec), resample=resample)
                if res is None:
                    out.append({"interrupted": True, "step": s})
                    break
                out.append(res)
    finally:
        distributed.cleanup(info)
    return out


def evaluate_planned(spec: Any, run_dir: Path, *, should_stop: Callable[[], bool] | None = None,
                     resample: bool = False) -> dict[str, Any]:
    """The worker's --mode eval: a planned run's evaluations, without training (it must have trained); they stop
    between chunks at train.time_limit_s, as they do after training in the same job. `resample` (`run --eval-only
    --resample`): they sample anew rather than take a finished sibling evaluation's samples."""
    from dimr_lab.eval.run import evaluate_step, train_summary, within_time_limit
    from dimr_lab.spec.preflight import check_files

    t0 = time.perf_counter()

    run = RunDir(run_dir)
    check_files(spec)
    trained = run.trained_step()
    if trained is None or trained < spec.train.steps:
        raise UserError(f"{run.path}: trained to step {trained or 0} of {spec.train.steps}; run it without "
                        f"--eval-only to train it first")
    info = distributed.setup()
    metrics: dict[str, Any] = {}
    try:
        with run_lock(run.path, purpose="eval") if info.main else contextlib.nullcontext():
            for s in spec.eval_steps():
                res = evaluate_step(spec, run, s, info=info,
                                    should_stop=within_time_limit(should_stop, spec.train.time_limit_s, t0),
                                    train_info=train_summary(run, s, spec), resample=resample)
                if res is None:
                    return {"interrupted": True, "step": s}
                metrics = res
    finally:
        distributed.cleanup(info)
    return metrics
