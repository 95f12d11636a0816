"""Evaluating trained runs without training them: `dimr-lab eval RUN_DIR` and `run FILE --eval-only`.

Each call that has an evaluation to make is a session of the run in its sessions.json (rundir.SessionLog,
kind "eval"; its steps are the checkpoints evaluated), ended done, stopped, time_limit (`run --eval-only`
at train.time_limit_s) or failed, so that `dimr-lab status` counts its time; a call whose evaluations were
all made before, or that is refused or stopped before any work, records nothing.
"""

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


@contextlib.contextmanager
def _eval_session(run: RunDir, spec: Any, steps: list[int], info: distributed.DistInfo, started: float
                  ) -> Any:
    """Records the evaluations of `steps` as one session (kind "eval") in sessions.json, rank 0, when one of
    them is still to make; yields a dict whose "outcome" (default "failed", also for an exception) and "step"
    (the last checkpoint step reached) the caller sets, and a touch(step) for signs of life. The session is
    written at the first sign of life (sampling began, or an evaluation finished) or when the call fails: a
    call refused before any work (a UserError: bad settings, a damaged checkpoint; one line, exit 2) leaves
    the run folder as it was."""
    from dimr_lab.eval.run import _say
    from dimr_lab.rundir import SessionLog

    state: dict[str, Any] = {"outcome": "failed", "step": steps[0] if steps else 0}
    todo = run.unfinished_evaluations(spec, steps) if info.main else []
    log = SessionLog(run, say=_say(None)) if todo else None
    begun = False

    def touch(step: int, force: bool = False) -> None:
        nonlocal begun
        if log is None:
            return
        if not begun:
            log.begin(step=todo[0], resumed=True, processes=info.world_size, started=started, kind="eval")
            begun = True
        log.touch(step, force=force)

    state["touch"] = touch
    try:
        yield state
    except UserError:
        if begun:  # refused after work began: that work's session ends failed
            log.end(state["outcome"], state["step"])
        raise
    except BaseException:
        if log is not None:  # a failure is a session even before its first sign of life
            touch(state["step"], force=True)
            log.end(state["outcome"], state["step"])
        raise
    else:
        if begun:
            log.end(state["outcome"], state["step"])


def _touching(progress: Callable[[int, int], None] | None, touch: Callable[[int], None], step: int
              ) -> Callable[[int, int], None]:
    """progress, and a sign of life in sessions.json (at most every SessionLog.TOUCH_S seconds)."""
    def fn(done: int, total: int) -> None:
        touch(step)
        if progress is not None:
            progress(done, total)

    return fn


def evaluate_run(run_dir: str | Path, *, step: int | None = None, all_steps: bool = False,
                 overrides: list[tuple[str, Any]] | None = None, should_stop: Callable[[], bool] | None = None,
                 log: Callable[[str], None] | None = None,
                 progress: Callable[[int, int], None] | None = None, resample: bool = False) -> list[dict[str, Any]]:
    """Evaluate a run's checkpoints with its settings (or overridden ones); done evaluations are skipped, and
    samples another evaluation of the step drew with the same settings are taken from it unless `resample`.
    Returns the metrics of each step ({"interrupted": True} when stopped)."""
    from dimr_lab.eval.run import evaluate_step, train_summary
    from dimr_lab.spec.preflight import check_files

    started = time.time()
    run = RunDir(run_dir)
    spec = run_spec_with(run, overrides)
    check_files(spec, file="--set" if overrides else None)
    steps = steps_to_evaluate(run, spec, step=step, all_steps=all_steps)
    info = distributed.setup()
    out = []
    try:
        with run_lock(run.path, purpose="eval") if info.main else contextlib.nullcontext(), \
                _eval_session(run, spec, steps, info, started) as session:
            for s in steps:
                session["step"] = s
                res = evaluate_step(spec, run, s, info=info, should_stop=should_stop, log=log,
                                    progress=_touching(progress, session["touch"], s),
                                    train_info=train_summary(run, s, spec), resample=resample)
                if res is None:
                    out.append({"interrupted": True, "step": s})
                    session["outcome"] = "stopped"
                    break
                session["touch"](s, force=True)
                out.append(res)
            else:
                session["outcome"] = "done"
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

    t0, started = time.perf_counter(), time.time()

    run = RunDir(run_dir)
    check_files(spec)
    trained = run.trained_step()
    if trained is None or trained < spec.train.steps:
        raise UserError(f"{run.path}: trained to step {trained or 0} of {spec.train.steps}; run it without "
                        f"--eval-only to train it first")
    info = distributed.setup()
    metrics: dict[str, Any] = {}
    try:
        with run_lock(run.path, purpose="eval") if info.main else contextlib.nullcontext(), \
                _eval_session(run, spec, spec.eval_steps(), info, started) as session:
            for s in spec.eval_steps():
                session["step"] = s
                res = evaluate_step(spec, run, s, info=info,
                                    should_stop=within_time_limit(should_stop, spec.train.time_limit_s, t0),
                                    progress=_touching(None, session["touch"], s),
                                    train_info=train_summary(run, s, spec), resample=resample)
                if res is None:
                    limit = spec.train.time_limit_s  # should_stop is not asked again: a flag may be one-shot
                    session["outcome"] = "time_limit" if limit > 0 and time.perf_counter() - t0 > limit \
                        else "stopped"
                    return {"interrupted": True, "step": s}
                session["touch"](s, force=True)
                metrics = res
            session["outcome"] = "done"
    finally:
        distributed.cleanup(info)
    return metrics
