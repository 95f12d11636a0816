"""Run planned runs on this machine: one after another or N at a time, each in its own process.

Finished runs (every evaluation they ask for is written) are skipped and never touched; unfinished ones
are resumed (or continued, or only evaluated) by the trainer; a run another process holds (its .lock) is
left alone. run.json is written (atomically, under the run's lock) before a run starts; local.json records
the process and its outcome; output.log keeps the process's output. A rich display shows each active run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from dimr_lab.rundir import (LOCAL, OUTPUT_LOG, RunBusy, RunDir, is_locked, run_lock, tail_lines,
                             try_read_json_object, write_json)
from dimr_lab.runner.plan import PlannedRun
from dimr_lab.runner.worker import (DEFAULT_TRAIN_FN, EVAL_FN, EXIT_BUSY, EXIT_DONE, EXIT_INTERRUPTED,
                                    resolve_train_fn, train_one)

POLL_S = 0.5


@dataclass
class Outcome:
    run: PlannedRun
    status: str            # done | skipped | failed | interrupted | busy
    seconds: float = 0.0
    detail: str = ""


def _local_info(run_dir: Path, **fields: Any) -> None:
    path = run_dir / LOCAL
    old = try_read_json_object(path) or {}
    write_json(path, {**old, **fields})


def write_record(run: PlannedRun, executor: str) -> None:
    """run.json of a planned run, under the run's lock (RunBusy when another process holds it); the first
    'created' time is kept. A run only evaluated (`run --eval-only`: run.recorded) keeps a readable run.json
    as it is, its own plan: evaluations with other settings land beside the planned ones, as `eval --set`'s."""
    folder = run.folder
    with run_lock(run.run_dir, purpose="plan"):
        record = run.record(executor)
        if run.recorded is not None:
            from dimr_lab.spec.schema import to_dict

            record.spec = to_dict(run.recorded)
        if folder.record_path.exists():
            try:
                old = folder.read_record()
            except Exception:  # a damaged run.json is replaced by the planned one
                old = None
            if old is not None and run.recorded is not None:
                if old.reused_from or not run.reused_from:
                    return
                old.reused_from, record = run.reused_from, old
            elif old is not None:
                record.created = old.created or record.created
                record.reused_from = record.reused_from or old.reused_from
        folder.write_record(record)


def prepare(runs: list[PlannedRun], *, executor: str) -> tuple[list[PlannedRun], list[PlannedRun], list[PlannedRun]]:
    """(to do, already done, busy); writes run.json of every unfinished run that no other process holds."""
    todo, done, busy = [], [], []
    for r in runs:
        if r.is_done():
            done.append(r)
            continue
        try:
            write_record(r, executor)
        except RunBusy:
            busy.append(r)
            continue
        todo.append(r)
    return todo, done, busy


def run_debug(runs: list[PlannedRun], *, train_fn: str | Callable[..., Any] | None = None,
              eval_only: bool = False, resample: bool = False) -> list[Outcome]:
    """In this process, one after another, no display; exceptions propagate (for debugging). `resample`: the
    runs' evaluations sample anew (worker.train_one)."""
    fn = resolve_train_fn(EVAL_FN if eval_only else train_fn)
    todo, done, busy = prepare(runs, executor="debug")
    out = [Outcome(r, "skipped", detail="done before") for r in done]
    out += [Outcome(r, "busy", detail="another process holds it") for r in busy]
    for r in todo:
        t0 = time.time()
        code, _ = train_one(r.run_dir, fn, resample=resample, overrides=r.record_overrides() if eval_only else None)
        status = {EXIT_DONE: "done", EXIT_INTERRUPTED: "interrupted", EXIT_BUSY: "busy"}.get(code, "failed")
        out.append(Outcome(r, status, time.time() - t0))
    return out


def _spawn(run: PlannedRun, train_fn: str, threads: int | None, mode: str = "train",
           resample: bool = False) -> subprocess.Popen:
    import json

    overrides = run.record_overrides() if mode == "eval" else []  # run.json kept as it was: the worker's --set
    env = dict(os.environ)
    if threads:
        env.setdefault("OMP_NUM_THREADS", str(threads))
        env.setdefault("MKL_NUM_THREADS", str(threads))
        # torch.compile's worker pool too: each run compiles with its share of the cores, not a pool of all
        env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", str(threads))
    log = open(run.run_dir / OUTPUT_LOG, "ab")
    try:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} start on {socket.gethostname()} ===\n".encode())
        log.flush()
        proc = subprocess.Popen([sys.executable, "-m", "dimr_lab.runner.worker", str(run.run_dir),
                                 "--train-fn", train_fn, "--mode", mode, *(["--resample"] if resample else []),
                                 *(a for k, v in overrides for a in ("--set", f"{k}={json.dumps(v)}"))],
                                stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env)
    finally:
        log.close()
    # `runner`: this process, which `cancel` stops too, so that it starts no further runs of its queue
    _local_info(run.run_dir, pid=proc.pid, runner=os.getpid(), host=socket.gethostname(), state="running",
                started=time.time(), ended=None, returncode=None, log=OUTPUT_LOG)
    return proc


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class _RunnerStop:
    """The runner's SIGINT/SIGTERM: a KeyboardInterrupt (the runs are stopped at a checkpoint), held back while
    a worker is started and entered in the table (`hold`), so that no worker escapes the stop unknown."""

    def __init__(self) -> None:
        self.held = False
        self.pending = False

    def __call__(self, signum: int, frame: Any) -> None:
        if self.held:
            self.pending = True
            return
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def hold(self) -> Any:
        """The signals wait until the block ends. They are blocked in this thread too: a worker started here
        begins with them blocked, so one sent to it before its handlers are in place waits for them (the worker
        unblocks them) instead of killing it or being lost between fork and exec."""
        on_main = threading.current_thread() is threading.main_thread()
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS) if on_main else None
        self.held = True
        try:
            yield
        finally:
            if mask is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # a signal held meanwhile arrives now
            self.held = False
        if self.pending:
            self.pending = False
            raise KeyboardInterrupt


def usable_cores() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def run_local(runs: list[PlannedRun], *, jobs: int = 1, train_fn: str | None = None, console: Any = None,
              show_progress: bool = True, eval_only: bool = False, resample: bool = False) -> list[Outcome]:
    """Train every unfinished run, `jobs` processes at a time (0: one per core, up to 8); one Outcome per run.
    `resample`: the runs' evaluations sample anew (the worker's --resample)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = console or Console(stderr=True)
    train_fn = train_fn or DEFAULT_TRAIN_FN
    if not isinstance(train_fn, str):
        raise TypeError("the local executor runs the trainer in a subprocess: pass train_fn as 'module:function'")
    cores = usable_cores()
    # 0: one single-threaded run per core (up to 8): tiny runs share threads poorly, so this trains more
    # images per second in all than one run on every core (2 cores: about 1.5x, BENCHMARKS.md)
    jobs = min(8, cores) if int(jobs) == 0 else max(1, int(jobs))
    threads = max(1, cores // jobs) if jobs > 1 else None
    todo, done, busy = prepare(runs, executor="local")
    outcomes: dict[Path, Outcome] = {r.run_dir: Outcome(r, "skipped", detail="done before") for r in done}
    outcomes.update({r.run_dir: Outcome(r, "busy", detail="another process holds it") for r in busy})
    queue = list(todo)
    active: dict[Path, tuple[PlannedRun, subprocess.Popen, float, Any]] = {}
    records: dict[Path, dict | None] = {}  # local.json as it was before this runner's worker started

    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=console, disable=not show_progress, transient=False)
    overall = progress.add_task(f"runs ({len(done)} done before)", total=len(runs), completed=len(done) + len(busy))

    def finish(run_dir: Path) -> None:
        run, proc, t0, task = active.pop(run_dir)
        code = proc.returncode
        seconds = time.time() - t0
        if run.is_done():  # also when a signal reached the worker as it exited after finishing
            status, detail = "done", ""
        elif code == EXIT_INTERRUPTED or (interrupted and code in (-signal.SIGTERM, -signal.SIGINT)):
            # the second: the stop reached a worker still starting, before it guards against signals
            status, detail = "interrupted", RunDir(run_dir).stop_detail(run.spec.train.steps)
        elif code == EXIT_BUSY:
            status, detail = "busy", "another process is training it"
        else:
            status = "failed"
            detail = "\n".join(tail_lines(run_dir / OUTPUT_LOG, 6))
        before = records.pop(run_dir, None)
        if status == "busy":  # lost the race for the run: local.json is the holder's again, unless rewritten
            now = try_read_json_object(run_dir / LOCAL)
            if isinstance(now, dict) and now.get("pid") == proc.pid:
                if before is None:
                    with contextlib.suppress(OSError):
                        (run_dir / LOCAL).unlink()
                else:
                    write_json(run_dir / LOCAL, before)
        else:
            _local_info(run_dir, state=status, ended=time.time(), returncode=code)
        outcomes[run_dir] = Outcome(run, status, seconds, detail)
        progress.remove_task(task)
        progress.advance(overall)
        style = {"done": "green", "failed": "red"}.get(status, "yellow")
        progress.console.print(f"[{style}]{status}[/] {run.run_dir.name} ({seconds:.1f} s)"
                               + (f"\n{detail}" if detail and status != "done" else ""), highlight=False)

    interrupted = False
    # `kill` of the runner or Ctrl-C: stop the runs at a checkpoint
    stopper = _RunnerStop()
    old_handlers = {sig: signal.signal(sig, stopper) for sig in STOP_SIGNALS} \
        if threading.current_thread() is threading.main_thread() else {}
    with progress:
        try:
            while queue or active:
                while queue and len(active) < jobs:
                    run = queue.pop(0)
                    if run.is_done():
                        outcomes[run.run_dir] = Outcome(run, "skipped", detail="done meanwhile")
                        progress.advance(overall)
                        continue
                    if is_locked(run.run_dir):
                        outcomes[run.run_dir] = Outcome(run, "busy", detail="another process is training it")
                        progress.console.print(f"[yellow]busy[/] {run.run_dir.name}: another process holds it")
                        progress.advance(overall)
                        continue
                    task = progress.add_task(f"  {run.run_dir.name}", total=max(1, run.spec.train.steps))
                    with stopper.hold():  # a stop now would miss a worker started but not yet in `active`
                        records[run.run_dir] = try_read_json_object(run.run_dir / LOCAL)
                        proc = _spawn(run, train_fn, threads, "eval" if eval_only else "train", resample)
                        active[run.run_dir] = (run, proc, time.time(), task)
                for run_dir in list(active):
                    run, proc, _, task = active[run_dir]
                    step = RunDir(run_dir).last_logged_step()
                    if step is not None:
                        progress.update(task, completed=min(step, run.spec.train.steps))
                    if proc.poll() is not None:
                        finish(run_dir)
                time.sleep(POLL_S)
        except KeyboardInterrupt:
            interrupted = True
            progress.console.print("[yellow]interrupted: waiting for the active runs to checkpoint[/]")
            deadline = time.time() + 120
            stopper.held = True  # a second signal does not cut the forwarding short (it is ignored)
            for run_dir in list(active):
                if active[run_dir][1].poll() is None:
                    active[run_dir][1].send_signal(signal.SIGTERM)  # the worker checkpoints, then exits
            stopper.held = stopper.pending = False  # from here a second signal stops the workers at once
            for run_dir in list(active):
                proc = active[run_dir][1]
                try:
                    proc.wait(timeout=max(1.0, deadline - time.time()))
                except (subprocess.TimeoutExpired, KeyboardInterrupt):
                    proc.kill()
                    proc.wait()
                finish(run_dir)
        finally:
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)
    result = [outcomes.get(r.run_dir) or Outcome(r, "skipped", detail="not started") for r in runs]
    if interrupted:
        raise KeyboardInterrupt
    return result
