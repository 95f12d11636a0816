"""Run-directory bookkeeping: the resolved spec file, versions, the git commit."""

from __future__ import annotations

import json
import platform
import subprocess
from pathlib import Path
from typing import Any

from dimr_lab.errors import UserError

SPEC_FORMAT = "dimr-lab-spec/1"


def spec_document(resolved: dict[str, Any]) -> dict[str, Any]:
    """What spec.json holds: {"format", "dimr_lab", "spec": resolved RunSpec dict}."""
    from dimr_lab import __version__

    return {"format": SPEC_FORMAT, "dimr_lab": __version__, "spec": resolved}


def check_spec_file(out_dir: Path, resolved: dict[str, Any]) -> bool:
    """True when out_dir/spec.json holds this spec, False when absent; UserError when it differs."""
    path = Path(out_dir) / "spec.json"
    if not path.exists():
        return False
    try:
        held = json.loads(path.read_text())["spec"]
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{path}: not a dimr-lab spec file; refusing to overwrite it (use another --out)") from None
    mine = json.loads(json.dumps(resolved))  # tuples -> lists, as the file has them
    if held != mine:
        diff = sorted(_diff(held, mine))
        shown = ", ".join(diff[:5]) + (f" and {len(diff) - 5} more" if len(diff) > 5 else "")
        raise UserError(f"{path}: this directory holds a run of a different spec (differs in {shown}); "
                        f"refusing to overwrite it: use another --out")
    return True


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted keys where two nested dicts differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else k)
        return out
    return [] if a == b else [prefix or "(top level)"]


def read_run_spec(run_dir: Path) -> Any:
    """The RunSpec of a run directory (from its spec.json)."""
    from dimr_lab.spec.run_spec import load_run_spec

    path = Path(run_dir) / "spec.json"
    if not path.is_file():
        raise UserError(f"{run_dir}: not a run directory (no spec.json)")
    try:
        data = json.loads(path.read_text())["spec"]
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{path}: not a dimr-lab spec file") from None
    return load_run_spec(data, file=str(path))


def versions() -> dict[str, str]:
    """Versions of python, torch and dimr_lab."""
    import torch

    from dimr_lab import __version__

    return {"python": platform.python_version(), "torch": torch.__version__, "dimr_lab": __version__}


def git_commit() -> dict[str, Any]:
    """{"commit": sha or None, "dirty": bool or None} of the repository holding this package."""
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
