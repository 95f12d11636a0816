"""Every run's state under a folder (pending, running, done, failed) and cancelling what is queued.

Local runs are read from their files (metrics.json, local.json, .lock); SLURM runs from slurm.json
plus squeue/sacct. A failed run carries the tail of its log.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dimr_lab.runner.state import (LOCAL_INFO, OUTPUT_LOG, RUN_INFO, SLURM_INFO, find_runs, is_done, is_locked,
                                   last_step, pid_alive, read_json, tail)

LIVE_SLURM = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "RESV_DEL_HOLD",
              "SUSPENDED", "STOPPED", "RESIZING", "RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING"}


@dataclass
class RunStatus:
    run_dir: Path
    state: str                      # pending | running | done | failed
    detail: str = ""
    step: int | None = None
    steps: int | None = None
    job_id: str | None = None
    slurm_state: str | None = None
    executor: str | None = None
    log_tail: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"run_dir": str(self.run_dir), "run": self.run_dir.name, "state": self.state, "detail": self.detail,
                "step": self.step, "steps": self.steps, "job_id": self.job_id, "slurm_state": self.slurm_state,
                "executor": self.executor, "log_tail": self.log_tail}


def _latest_job(run_dir: Path) -> dict[str, Any] | None:
    info = read_json(run_dir / SLURM_INFO)
    jobs = info.get("jobs") if isinstance(info, dict) else None
    return jobs[-1] if isinstance(jobs, list) and jobs and isinstance(jobs[-1], dict) else None


def _slurm_states(job_ids: list[str]) -> dict[str, str] | None:
    if not job_ids:
        return {}
    if shutil.which("sacct") is None and shutil.which("squeue") is None:
        return None
    from dimr_lab.runner.slurm import job_states  # imports submitit

    return job_states(job_ids)


def collect(root: Path) -> list[RunStatus]:
    """The state of every run folder at or under `root`."""
    root = Path(root)
    dirs = find_runs(root)
    jobs = {d: _latest_job(d) for d in dirs}
    slurm_states = _slurm_states([j["job_id"] for j in jobs.values() if j and j.get("job_id")])
    out = []
    for d in dirs:
        info = read_json(d / RUN_INFO) or {}
        steps = None
        try:
            steps = int(info["spec"]["train"]["steps"])
        except (KeyError, TypeError, ValueError):
            pass
        st = _one(d, jobs[d], slurm_states, info)
        st.step, st.steps = last_step(d), steps
        if st.state == "done" and steps is not None:
            st.step = steps if st.step is None else st.step
        out.append(st)
    return out


def _one(d: Path, job: dict[str, Any] | None, slurm_states: dict[str, str] | None, info: dict) -> RunStatus:
    local = read_json(d / LOCAL_INFO)
    executor = info.get("executor")
    if is_done(d):
        if read_json(d / "metrics.json") is None:
            return RunStatus(d, "failed", "metrics.json is not valid JSON (corrupt)", executor=executor)
        return RunStatus(d, "done", executor=executor, job_id=job.get("job_id") if job else None)
    use_slurm = job is not None and not (isinstance(local, dict) and
                                         float(local.get("started") or 0) > float(job.get("submitted") or 0))
    if use_slurm:
        job_id = str(job.get("job_id"))
        logs = [Path(p) for p in (job.get("stderr"), job.get("stdout")) if p]
        if slurm_states is None:
            return RunStatus(d, "pending", "SLURM commands unavailable here; state unknown", job_id=job_id,
                             executor="slurm")
        sstate = slurm_states.get(job_id)
        if sstate is None:
            return RunStatus(d, "failed", "SLURM no longer knows the job and there is no metrics.json",
                             job_id=job_id, executor="slurm", log_tail=_tail_logs(logs))
        if sstate in {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "RESV_DEL_HOLD",
                      "SUSPENDED", "STOPPED", "RESIZING"}:
            return RunStatus(d, "pending", f"queued ({sstate})", job_id=job_id, slurm_state=sstate, executor="slurm")
        if sstate in {"RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING"}:
            return RunStatus(d, "running", sstate, job_id=job_id, slurm_state=sstate, executor="slurm")
        detail = (f"job ended {sstate} without metrics.json" if sstate == "COMPLETED" else f"job {sstate}")
        return RunStatus(d, "failed", detail, job_id=job_id, slurm_state=sstate, executor="slurm",
                         log_tail=_tail_logs(logs))
    if isinstance(local, dict):
        state = local.get("state")
        same_host = local.get("host") == socket.gethostname()
        if is_locked(d):
            return RunStatus(d, "running", f"pid {local.get('pid')} on {local.get('host')}", executor="local")
        if state == "running":
            if not same_host:
                return RunStatus(d, "running", f"on {local.get('host')} (cannot check from here)", executor="local")
            pid = local.get("pid")
            if isinstance(pid, int) and pid_alive(pid) and _is_worker(pid, d):
                return RunStatus(d, "running", f"pid {pid}", executor="local")
            return RunStatus(d, "failed", "its process is gone (killed?); rerun to resume from the checkpoint",
                             executor="local", log_tail=tail(d / OUTPUT_LOG))
        if state == "interrupted":
            return RunStatus(d, "pending", "interrupted after a checkpoint; rerun to resume", executor="local")
        if state in ("failed", "done"):
            why = f"exit status {local.get('returncode')}" if state == "failed" else "ended without metrics.json"
            return RunStatus(d, "failed", why, executor="local", log_tail=tail(d / OUTPUT_LOG))
    has_ckpt = (d / "checkpoints" / "last.pt").exists()
    return RunStatus(d, "pending", "has a checkpoint; rerun to resume" if has_ckpt else "not started",
                     executor=executor)


def _tail_logs(paths: list[Path]) -> list[str]:
    for p in paths:
        lines = tail(p, 8)
        if lines:
            return lines
    return []


def _is_worker(pid: int, run_dir: Path) -> bool:
    """Whether pid is a dimr-lab worker training run_dir (guards against pid reuse)."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    args = [c.decode(errors="replace") for c in cmd]
    return "dimr_lab.runner.worker" in args and str(run_dir) in args


def cancel(root: Path) -> dict[str, list[str]]:
    """scancel the SLURM jobs of runs under root that are still queued or running, and ask local workers
    under root (on this host) to checkpoint and stop (SIGTERM). Returns what was cancelled."""
    out: dict[str, list[str]] = {"slurm": [], "local": []}
    statuses = collect(root)
    job_ids = [s.job_id for s in statuses if s.job_id and s.slurm_state in LIVE_SLURM]
    if job_ids:
        from dimr_lab.runner.slurm import cancel_jobs

        cancel_jobs(job_ids)
        out["slurm"] = job_ids
    for s in statuses:
        if s.executor != "local" or s.state != "running":
            continue
        local = read_json(s.run_dir / LOCAL_INFO) or {}
        pid = local.get("pid")
        if local.get("host") == socket.gethostname() and isinstance(pid, int) and _is_worker(pid, s.run_dir):
            os.kill(pid, signal.SIGTERM)
            out["local"].append(f"{s.run_dir.name} (pid {pid})")
    return out
