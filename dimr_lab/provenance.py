"""Where a result came from: package versions, the git commit (with whether the tree was clean) and the machine."""

from __future__ import annotations

import functools
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any


def versions() -> dict[str, str]:
    """Versions of python, torch and dimr_lab (torch's as the running process has it, if loaded)."""
    from importlib import metadata

    from dimr_lab import __version__

    torch = sys.modules.get("torch")
    try:
        torch_version = torch.__version__ if torch is not None else metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_version = "not installed"
    return {"python": platform.python_version(), "torch": str(torch_version), "dimr_lab": __version__}


def git_commit() -> dict[str, Any]:
    """{"commit": sha or None, "dirty": bool or None} of the repository holding this package; untracked
    files count as clean, tracked changes as dirty."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        if not sha:
            return {"commit": None, "dirty": None}
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                                capture_output=True, text=True, timeout=10).stdout
        return {"commit": sha, "dirty": bool(status.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


@functools.lru_cache(maxsize=1)
def _cpu_model() -> str | None:
    """The CPU's model name (/proc/cpuinfo on Linux, else what platform says), None when nothing says."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "Hardware") and value.strip():
                    return " ".join(value.split())
    except OSError:
        pass
    return platform.processor() or platform.machine() or None


def machine() -> dict[str, object]:
    """What this process computes on: {"cpu": model name, "cpus": CPUs it may use, "accelerator": the current
    CUDA device's name or None}. Floating point differs between machines (kernels, vector widths, thread
    counts), so a seed trained on two machines is two results; runs and evaluations record this beside the
    commit. torch is asked only when the process has loaded it."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 0
    accelerator = None
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            if torch.cuda.is_available():
                accelerator = torch.cuda.get_device_name(torch.cuda.current_device())
        except Exception:  # informative only: never fails a run
            accelerator = None
    return {"cpu": _cpu_model(), "cpus": cpus, "accelerator": accelerator}


def machine_label(m: object) -> str | None:
    """One line for a recorded machine: the accelerator where there was one, else the CPU and its count;
    None for a record without one (runs from before it was recorded) or one that does not read."""
    if not isinstance(m, dict):
        return None
    if isinstance(m.get("accelerator"), str) and m["accelerator"]:
        return m["accelerator"]
    cpu, n = m.get("cpu"), m.get("cpus")
    if not isinstance(cpu, str) or not cpu:
        return None
    return f"{cpu} x{n}" if isinstance(n, int) and not isinstance(n, bool) and n > 0 else cpu
