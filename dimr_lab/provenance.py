"""Where a result came from: package versions and the git commit (with whether the tree was clean)."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path
from typing import Any


def versions() -> dict[str, str]:
    """Versions of python, torch and dimr_lab (torch's as the running process has it, if loaded)."""
    import sys
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
