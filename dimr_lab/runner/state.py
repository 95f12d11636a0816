"""Run folders on disk: what the runners write, how a run's state is read back, locks.

A run folder `<results>/<ablation>/<variant>-s<seed>-<hash>/` holds
  run.json        (runner, before training) ablation, title, variant, seed, grid, factors, paper, baseline,
                  profile, spec_hash, ablation_file, spec (the resolved run spec), created, executor
  local.json      (local runner) pid, host, state (running|done|failed|interrupted), started, ended,
                  returncode, log ("output.log")
  output.log      (local runner) the training process's stdout and stderr
  slurm.json      (slurm runner) {"jobs": [{job_id, array_job_id, array_task_id, submitted, folder,
                  stdout, stderr, nodes, tasks}, ...]} newest last
  .lock           held (flock) while a process trains the run
  spec.json, log.jsonl, checkpoints/last.pt, metrics.json   (the trainer; metrics.json = done)
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Iterator

from dimr_lab.atomic import atomic_write_text

RUN_INFO = "run.json"
LOCAL_INFO = "local.json"
SLURM_INFO = "slurm.json"
METRICS = "metrics.json"
OUTPUT_LOG = "output.log"
LOCK = ".lock"


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: Path) -> Any | None:
    """The JSON in `path`, or None when it is missing or unreadable (a corrupt file is not an error here)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def is_done(run_dir: Path) -> bool:
    return (Path(run_dir) / METRICS).is_file()


def write_run_info(run_dir: Path, info: dict[str, Any], *, executor: str) -> bool:
    """Write run.json atomically unless the run is finished (never touched then). Keeps the first
    'created' time; returns whether it wrote."""
    run_dir = Path(run_dir)
    if is_done(run_dir):
        return False
    path = run_dir / RUN_INFO
    old = read_json(path) or {}
    new = {**info, "executor": executor, "created": old.get("created", time.time())}
    if {k: v for k, v in old.items() if k != "updated"} == new:
        return False
    atomic_write_json(path, {**new, "updated": time.time()})
    return True


@contextlib.contextmanager
def run_lock(run_dir: Path, *, wait_s: float = 0.0) -> Iterator[bool]:
    """Hold run_dir/.lock (flock) for the duration; yields False (holding nothing) when another process
    holds it after waiting `wait_s` seconds."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    got = False
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                got = True
                break
            except OSError as err:
                if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
                if time.monotonic() >= deadline:
                    break
                time.sleep(0.5)
        if got:
            os.ftruncate(fd, 0)
            os.write(fd, f"{socket.gethostname()} {os.getpid()}\n".encode())
        yield got
    finally:
        if got:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def is_locked(run_dir: Path) -> bool:
    """Whether some process holds run_dir/.lock now (this host's view)."""
    path = Path(run_dir) / LOCK
    if not path.exists():
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def _tail_lines(path: Path, nbytes: int) -> list[str]:
    """The lines of the last `nbytes` of a file ([] when it cannot be read)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - nbytes))
            return f.read().decode(errors="replace").splitlines()
    except OSError:
        return []


def last_step(run_dir: Path) -> int | None:
    """The last 'step' the trainer logged in log.jsonl (reads the file's tail only)."""
    for line in reversed(_tail_lines(Path(run_dir) / "log.jsonl", 8192)):
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int):
            return rec["step"]
    return None


def tail(path: Path, n: int = 8) -> list[str]:
    lines = [ln.rstrip() for ln in _tail_lines(path, 16384) if ln.strip()]
    return lines[-n:]


def find_runs(root: Path) -> list[Path]:
    """Run folders (those holding run.json) at `root`, or below it up to two levels."""
    root = Path(root)
    if (root / RUN_INFO).is_file():
        return [root]
    found = []
    for pattern in ("*/" + RUN_INFO, "*/*/" + RUN_INFO):
        found.extend(p.parent for p in root.glob(pattern) if not any(part.startswith(".") for part in
                                                                      p.relative_to(root).parts))
    return sorted(set(found))


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
