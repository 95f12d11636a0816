"""Where a run's process wrote its output: the newest of its local output.log and its SLURM job's logs."""

from __future__ import annotations

from pathlib import Path

from dimr_lab.rundir import OUTPUT_LOG, SLURM, RunDir, try_read_json_object


def run_log_file(run: RunDir) -> Path | None:
    """The most recently written process log of a run (SLURM stdout/stderr or the local output.log)."""
    candidates = run_log_files(run)
    if not candidates:
        return None
    return max(candidates, key=lambda p: p.stat().st_mtime)


def run_log_files(run: RunDir) -> list[Path]:
    """The process logs of a run there are now: its latest SLURM job's stderr and stdout, its output.log."""
    candidates = []
    info = try_read_json_object(run.path / SLURM)
    jobs = info.get("jobs") if isinstance(info, dict) else None
    if isinstance(jobs, list) and jobs and isinstance(jobs[-1], dict):
        for key in ("stderr", "stdout"):
            p = jobs[-1].get(key)
            if isinstance(p, str) and p and Path(p).is_file():
                candidates.append(Path(p))
    if (run.path / OUTPUT_LOG).is_file():
        candidates.append(run.path / OUTPUT_LOG)
    return candidates
