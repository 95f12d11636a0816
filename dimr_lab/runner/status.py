"""Every run's state under a folder (pending, running, done, failed) and cancelling what is queued.

A run folder made by `dimr-lab run` or by `dimr-lab train` is read through dimr_lab.rundir: its planned
spec, checkpoint index, evaluations and log; local runs also from local.json and the folder's lock, SLURM
runs from slurm.json plus squeue/sacct. Odd or damaged files make a run 'failed' with the reason, never a
crash. A failed run carries the tail of its log.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dimr_lab.errors import UserError
from dimr_lab.rundir import (LOCAL, LOCK, OUTPUT_LOG, RECORD_VERSION, SLURM, RunDir, all_jobs, find_runs,
                             is_locked, latest_job, pid_alive, session_totals, tail_lines, try_read_json_object)

LIVE_SLURM = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "RESV_DEL_HOLD",
              "SUSPENDED", "STOPPED", "RESIZING", "RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING"}
PENDING_SLURM = LIVE_SLURM - {"RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING"}


@dataclass
class RunStatus:
    run_dir: Path
    state: str                      # pending | running | done | failed
    detail: str = ""
    ablation: str = ""
    grid: dict[str, Any] = field(default_factory=dict)  # the grid point (run.json): what tells apart runs of
    step: int | None = None                             # one variant and seed in a gridded ablation
    steps: int | None = None
    loss: float | None = None
    images_per_s: float | None = None
    eta_s: float | None = None
    job_id: str | None = None
    node: str | None = None
    slurm_state: str | None = None
    executor: str | None = None
    log_tail: list[str] = field(default_factory=list)
    sessions: int = 0               # sessions sessions.json records, training and evaluation (rundir.SessionLog)
    restarts: int = 0               # resumes after a kill, a stop, a SLURM requeue (rundir.session_totals)
    continuations: int = 0          # sessions that went on from a finished one (a larger train.steps)
    evaluations: int = 0            # sessions that only evaluated (`dimr-lab eval`, `run --eval-only`)
    wall_s: float | None = None     # the sessions' wall time, summed (evaluation sessions included)
    eval_wall_s: float | None = None  # the evaluation sessions' part of it

    def history(self) -> str:
        """'resumed 2x, continued 1x, 1 evaluation session, 40m12s over 4 sessions' for a run of several
        sessions (every session counted, evaluation sessions among them); '' otherwise."""
        said = [f"{word} {n}x" for word, n in (("resumed", self.restarts), ("continued", self.continuations)) if n]
        if self.evaluations:
            said.append(f"{self.evaluations} evaluation session{'s' if self.evaluations > 1 else ''}")
        if not said:
            return ""
        took = (f", {format_duration(self.wall_s)} over {self.sessions} session{'s' if self.sessions != 1 else ''}"
                if self.wall_s is not None else "")
        return ", ".join(said) + took

    def as_dict(self) -> dict[str, Any]:
        return {"run_dir": str(self.run_dir), "run": self.run_dir.name, "ablation": self.ablation, "grid": self.grid,
                "state": self.state, "detail": self.detail, "step": self.step, "steps": self.steps,
                "loss": self.loss, "images_per_s": self.images_per_s, "eta_s": self.eta_s, "job_id": self.job_id,
                "node": self.node, "slurm_state": self.slurm_state, "executor": self.executor,
                "log_tail": self.log_tail, "sessions": self.sessions, "restarts": self.restarts,
                "continuations": self.continuations, "evaluations": self.evaluations, "wall_s": self.wall_s,
                "eval_wall_s": self.eval_wall_s}


def _slurm_states(job_ids: list[str]) -> dict[str, tuple[str, str, str]] | None:
    if not job_ids:
        return {}
    if shutil.which("sacct") is None and shutil.which("squeue") is None:
        return None
    from dimr_lab.runner.slurm import job_states  # imports submitit

    return job_states(job_ids, with_nodes=True)


def _planned(run: RunDir) -> tuple[Any | None, str, dict[str, Any], str]:
    """(the planned RunSpec or None, ablation, grid point, the reason it could not be read)."""
    from dimr_lab.spec.run_spec import load_run_spec

    ablation, grid = "", {}
    try:
        if run.record_path.exists():
            record = run.read_record()
            ablation, grid = record.ablation, record.grid
            return load_run_spec(record.spec, file=str(run.record_path)), ablation, grid, ""
        return load_run_spec(run.read_spec_document(), file=str(run.spec_path)), ablation, grid, ""
    except UserError as err:
        return None, ablation, grid, str(err)


def collect(root: Path) -> list[RunStatus]:
    """The state of every run folder at or under `root`."""
    root = Path(root)
    dirs = find_runs(root)
    jobs = {d: latest_job(d) for d in dirs}
    slurm = _slurm_states([j["job_id"] for j in jobs.values() if j])
    out = []
    for d in dirs:
        run = RunDir(d)
        sessions = run.sessions()  # read once: the state, a stop's detail and the totals all use it
        st = _one(run, jobs[d], slurm, sessions)
        for key, value in session_totals(sessions).items():  # sessions, restarts, ..., eval_wall_s: its fields
            setattr(st, key, value)
        out.append(st)
    for st in out:  # an ETA means something only for a run that is still to finish
        if st.state not in ("running", "pending"):
            st.eta_s = None
    return out


def _progress(st: RunStatus, run: RunDir, spec: Any) -> None:
    """Step, loss, speed and ETA from the checkpoint index and the log's last row."""
    rows = run.log_rows(tail_bytes=16384)
    last = rows[-1] if rows else {}
    st.step = run.trained_step()
    logged = last.get("step") if isinstance(last.get("step"), int) else None
    if logged is not None and (st.step is None or logged > st.step):
        st.step = logged
    st.loss = last.get("loss") if isinstance(last.get("loss"), (int, float)) else None
    speed = last.get("images_per_s")
    st.images_per_s = float(speed) if isinstance(speed, (int, float)) and speed > 0 else None
    if spec is not None:
        st.steps = spec.train.steps
        # the training left (evaluations are not estimated: a trained run waiting for them has no ETA, not 0)
        if st.images_per_s and st.step is not None and st.step < st.steps and st.state in ("running", "pending"):
            st.eta_s = (st.steps - st.step) * spec.train.batch_size / st.images_per_s


def _one(run: RunDir, job: dict[str, Any] | None, slurm: dict[str, tuple[str, str, str]] | None,
         sessions: list[dict[str, Any]]) -> RunStatus:
    """The state of one run; `sessions` its sessions.json rows (RunDir.sessions, read once by the caller)."""
    d = run.path
    spec, ablation, grid, problem = _planned(run)
    st = RunStatus(d, "pending", ablation=ablation, grid=grid)
    if spec is None:
        # a folder of an older version whose spec no longer loads still shows its finished metrics; a
        # damaged record (of this version, or no JSON object at all) is a failure, whatever else the folder holds
        record = try_read_json_object(run.record_path)
        current = (isinstance(record, dict) and record.get("version") == RECORD_VERSION) \
            or (record is None and run.record_path.exists())
        legacy = [] if current else run.evaluations()
        if legacy and all(e.done for e in legacy):
            st.state = "done"
            return st
        st.state, st.detail = "failed", problem
        return st
    _progress(st, run, spec)
    evaluations = run.evaluations()  # read once: the damaged ones and the steps still to evaluate
    bad = [e for e in evaluations if e.problem]
    pending = run.unfinished_evaluations(spec, evaluations=evaluations)
    if not pending:
        st.state = "done"
        st.step = spec.train.steps
        if is_locked(d):  # its plan is done, and a process evaluates it with other settings (run --eval-only --set)
            st.state, st.detail = "running", f"evaluating beyond its plan: {_holder(d)}"
        return st
    if bad:
        st.state, st.detail = "failed", bad[0].problem
        return st
    local = try_read_json_object(d / LOCAL)
    use_slurm = job is not None and not (isinstance(local, dict) and _num(local.get("started")) > _num(job.get("submitted")))
    if use_slurm:
        return _from_slurm(st, job, slurm, run.trained_step())
    st.executor = "local" if isinstance(local, dict) else ("train" if not run.record_path.exists() or
                                                           _record_executor(run) == "train" else None)
    if is_locked(d):
        st.state, st.detail = "running", _holder(d)
        return st
    if isinstance(local, dict):
        state, pid, host = local.get("state"), local.get("pid"), local.get("host")
        if state == "running":
            if host != socket.gethostname():
                st.state, st.detail = "running", f"on {host} (cannot check from here)"
                return st
            if pid_alive(pid) and _is_worker(pid, d):
                st.state, st.detail = "running", f"pid {pid}"
                return st
            st.state, st.detail = "failed", "its process is gone (killed?); rerun to resume from the checkpoint"
            st.log_tail = tail_lines(d / OUTPUT_LOG)
            return st
        if state == "interrupted":
            st.detail = run.stop_detail(spec.train.steps, sessions=sessions)
            return st
        if state in ("failed", "done"):
            rc = local.get("returncode")
            st.state = "failed"
            st.detail = f"exit status {rc}" if state == "failed" else "ended without its evaluations"
            st.log_tail = tail_lines(d / OUTPUT_LOG)
            return st
    if sessions and sessions[-1].get("outcome") in ("stopped", "time_limit"):  # train stopped, or its time limit
        st.detail = run.stop_detail(spec.train.steps, sessions=sessions)
    elif run.trained_step() is not None:
        st.detail = "has a checkpoint; rerun to resume"
    elif run.last_logged_step() is not None:  # killed before its first checkpoint: a rerun starts it again
        st.detail = "stopped before its first checkpoint; rerun to start it"
    else:
        st.detail = "not started"
    return st


def _num(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def _record_executor(run: RunDir) -> str:
    try:
        return run.read_record().executor
    except UserError:
        return ""


def _holder(d: Path) -> str:
    from dimr_lab.rundir import lock_holder

    return lock_holder(d)


def _from_slurm(st: RunStatus, job: dict[str, Any], slurm: dict[str, tuple[str, str, str]] | None,
                trained: int | None = None) -> RunStatus:
    st.executor, st.job_id = "slurm", str(job.get("job_id"))
    logs = [Path(p) for p in (job.get("stderr"), job.get("stdout")) if isinstance(p, str) and p]
    if slurm is None:
        st.detail = "SLURM did not answer (or has no commands here); state unknown"
        return st
    found = slurm.get(st.job_id)
    if found is None:
        st.state, st.detail = "failed", "SLURM no longer knows the job and its evaluations are missing"
        st.log_tail = _tail_logs(logs)
        return st
    st.slurm_state, st.node, reason = found  # reason: squeue's (Priority, BeginTime, or one that never passes)
    if st.slurm_state in PENDING_SLURM:
        st.detail = f"queued ({st.slurm_state}{': ' + reason if reason else ''})"
    elif st.slurm_state in LIVE_SLURM:
        st.state, st.detail = "running", st.slurm_state
    elif st.slurm_state.startswith("CANCELLED") and trained:  # `dimr-lab cancel`: the task checkpointed first
        st.detail = f"cancelled after a checkpoint (step {trained}); rerun to resume"
    else:
        st.state = "failed"
        st.detail = (f"job ended {st.slurm_state} without its evaluations" if st.slurm_state == "COMPLETED"
                     else f"job {st.slurm_state}") + (f"; a rerun resumes from step {trained}" if trained else "")
        st.log_tail = _tail_logs(logs)
    return st


def _tail_logs(paths: list[Path]) -> list[str]:
    for p in paths:
        lines = tail_lines(p, 8)
        if lines:
            return lines
    return []


def _cmdline(pid: Any) -> list[str]:
    try:
        cmd = Path(f"/proc/{int(pid)}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError, TypeError, OverflowError):
        return []
    return [c.decode(errors="replace") for c in cmd]


def _is_worker(pid: Any, run_dir: Path) -> bool:
    """Whether pid is a dimr-lab worker training run_dir (guards against pid reuse); run_dir may be given
    relative or through a link, the worker's command line holds it absolute."""
    args = _cmdline(pid)
    target = os.path.realpath(run_dir)
    return "dimr_lab.runner.worker" in args and any(os.path.isabs(a) and os.path.realpath(a) == target
                                                    for a in args)


def _lock_pid(run_dir: Path, host: str) -> int | None:
    """The pid in run_dir's lock file when this host's process holds the lock now."""
    if not is_locked(run_dir):
        return None
    try:
        parts = (Path(run_dir) / LOCK).read_text(errors="replace").split()
        return int(parts[1]) if len(parts) >= 2 and parts[0] == host else None
    except (OSError, ValueError):
        return None


def _is_runner(pid: Any) -> bool:
    """Whether pid is a `dimr-lab run` process (the local runner that started a worker)."""
    args = _cmdline(pid)
    return "run" in args and any("dimr" in a for a in args[: args.index("run")])


def cancel(root: Path) -> dict[str, list[str]]:
    """scancel the SLURM jobs of runs under root that are still queued or running, and ask local workers
    under root (on this host) to checkpoint and stop (SIGTERM). Returns what was cancelled."""
    out: dict[str, list[str]] = {"slurm": [], "local": []}
    statuses = collect(root)
    runners: set[int] = set()
    for s in statuses:
        # a local worker: of a run in training (executor local), or of a finished run it evaluates beyond its
        # plan (run --eval-only --set: status shows it running with no executor); only a process whose command
        # line is a dimr-lab worker of this run folder is signalled
        if s.executor == "slurm" or s.state != "running":
            continue
        local = try_read_json_object(s.run_dir / LOCAL) or {}
        # the lock's holder first: a second runner that lost the race for this run wrote its own (now gone)
        # worker into local.json
        here = socket.gethostname()
        candidates = [_lock_pid(s.run_dir, here), local.get("pid") if local.get("host") == here else None]
        pid = next((p for p in candidates if p is not None and pid_alive(p) and _is_worker(p, s.run_dir)), None)
        if pid is not None:
            runner = local.get("runner")
            if isinstance(runner, int) and runner != os.getpid() and pid_alive(runner) and _is_runner(runner):
                runners.add(runner)
            os.kill(int(pid), signal.SIGTERM)
            out["local"].append(f"{s.run_dir.name} (pid {pid})")
    for runner in sorted(runners):  # the runner stops its other workers at a checkpoint and starts no more runs
        with contextlib.suppress(OSError):
            os.kill(runner, signal.SIGTERM)
    # every job a run's history records, not only its latest: an earlier one may still be queued
    recorded = sorted({j for s in statuses for j in _recorded_jobs(s.run_dir)})
    if recorded:
        from dimr_lab.runner.slurm import cancel_jobs, job_states

        states = job_states(recorded)
        if states is None:
            stopped = f"local runs asked to stop: {len(out['local'])}; " if out["local"] else ""
            raise UserError(f"{stopped}squeue did not answer, so which SLURM jobs are still queued is unknown; "
                            f"none cancelled: try again when SLURM answers")
        job_ids = [j for j in recorded if states.get(j) in LIVE_SLURM]
        if job_ids:
            cancel_jobs(job_ids)
            out["slurm"] = job_ids
    return out


def _recorded_jobs(run_dir: Path) -> list[str]:
    return all_jobs(run_dir) if (run_dir / SLURM).exists() else []


def summary(statuses: list[RunStatus]) -> dict[str, dict[str, int]]:
    """Per ablation: how many runs are in each state."""
    out: dict[str, dict[str, int]] = {}
    for s in statuses:
        tally = out.setdefault(s.ablation or "(single runs)", {})
        tally[s.state] = tally.get(s.state, 0) + 1
    return out


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def watch_interval(seconds: float) -> None:
    time.sleep(seconds)
