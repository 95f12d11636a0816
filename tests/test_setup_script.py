"""scripts/setup.sh against a stand-in interpreter: what it asks pip for, and when it says it is done."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# a .venv/bin/python that records its arguments; pip fails while FAKE_PIP_FAIL is set
STAND_IN = """#!/usr/bin/env bash
echo "$*" >> "$(dirname "$0")/../calls.log"
if [ "$1 $2" = "-m pip" ] && [ -n "${FAKE_PIP_FAIL:-}" ]; then echo "ERROR: no matching distribution" >&2; exit 1; fi
exit 0
"""


@pytest.fixture
def tree(tmp_path):
    if shutil.which("sha1sum") is None:
        pytest.skip("setup.sh needs sha1sum")
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "setup.sh", tmp_path / "scripts" / "setup.sh")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    python = tmp_path / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(STAND_IN)
    python.chmod(0o755)
    return tmp_path


def setup(tree: Path, **env: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("DIMR_TORCH_SPEC", "FAKE_PIP_FAIL")} | env
    return subprocess.run(["bash", "scripts/setup.sh"], cwd=tree, env=env, capture_output=True, text=True,
                          timeout=60)


def pip_calls(tree: Path) -> list[str]:
    log = tree / ".venv" / "calls.log"
    return [ln for ln in log.read_text().splitlines() if ln.startswith("-m pip install")] if log.exists() else []


def test_another_torch_spec_is_installed_after_a_first_setup(tree):
    assert setup(tree).returncode == 0
    assert any("torch==" in c for c in pip_calls(tree))
    before = len(pip_calls(tree))
    assert setup(tree).returncode == 0
    assert len(pip_calls(tree)) == before  # done once: nothing to do
    assert setup(tree, DIMR_TORCH_SPEC="torch==9.9 torchvision==9.9").returncode == 0
    assert any("torch==9.9 torchvision==9.9" in c for c in pip_calls(tree)[before:]), pip_calls(tree)


def test_a_failed_pip_install_fails_the_setup_and_is_tried_again(tree):
    failed = setup(tree, FAKE_PIP_FAIL="1")
    assert failed.returncode != 0, failed.stderr
    assert "setup.sh: pip could not install" in failed.stderr
    assert "no matching distribution" in failed.stdout + failed.stderr  # pip's own reason is shown
    assert not list((tree / ".venv").glob(".dimr-lab-setup-*"))
    before = len(pip_calls(tree))
    assert setup(tree).returncode == 0
    assert len(pip_calls(tree)) > before
