"""Where a run's process wrote its output: the newest of its local output.log and its SLURM job's logs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dimr_lab.rundir import OUTPUT_LOG, SLURM, RunDir, try_read_json_object


def run_log_file(run: RunDir) -> Path | None:
    """The most recently written process log of a run (SLURM stdout/stderr or the local output.log)."""
    candidates = run_log_files(run)
    if not candidates:
        return None
    return max(candidates, key=lambda p: p.stat().st_mtime)


def _latest_job_streams(run: RunDir) -> list[Path]:
    """The stderr and stdout files slurm.json names for the run's latest SLURM job (there or not yet)."""
    info = try_read_json_object(run.path / SLURM)
    jobs: Any = info.get("jobs") if isinstance(info, dict) else None
    if not (isinstance(jobs, list) and jobs and isinstance(jobs[-1], dict)):
        return []
    return [Path(p) for p in (jobs[-1].get(k) for k in ("stderr", "stdout")) if isinstance(p, str) and p]


def run_log_files(run: RunDir) -> list[Path]:
    """The process logs of a run there are now: its latest SLURM job's stderr and stdout, its output.log."""
    candidates = [p for p in _latest_job_streams(run) if p.is_file()]
    if (run.path / OUTPUT_LOG).is_file():
        candidates.append(run.path / OUTPUT_LOG)
    return candidates


def run_log_streams(run: RunDir) -> list[Path]:
    """Every stream of the run's newest process log: its latest SLURM job's stderr and stdout (submitit writes
    them apart; one may not be there yet) when that job wrote last, else the local output.log (stdout and
    stderr in one file); [] when the run has no process log."""
    newest = run_log_file(run)
    if newest is None:
        return []
    job = _latest_job_streams(run)
    return job if newest in job else [newest]
