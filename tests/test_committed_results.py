"""The committed results/: every evaluation was made by a clean tree at a commit of this history, and the
committed tree renders as tables (what RESULTS.md is printed from)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import cli

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"
METRICS = sorted(RESULTS.glob("*/*/evals/*/metrics.json"))


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)


def test_there_are_committed_results():
    assert METRICS, "results/ holds no evaluations"


def test_every_committed_evaluation_was_made_by_a_clean_tree_at_a_commit_of_this_history():
    if shutil.which("git") is None or _git("rev-parse", "--git-dir").returncode != 0:
        pytest.skip("not a git checkout")
    if _git("rev-parse", "--is-shallow-repository").stdout.strip() == "true":
        pytest.skip("a shallow clone does not hold the history")
    commits: dict[str, list[str]] = {}
    for m in METRICS:
        data = json.loads(m.read_text())
        where = str(m.relative_to(ROOT))
        assert data.get("git_dirty") is False, f"{where}: made by a tree with uncommitted changes"
        assert data.get("git_commit"), f"{where}: no commit recorded"
        commits.setdefault(data["git_commit"], []).append(where)
    for commit, files in commits.items():
        ok = _git("merge-base", "--is-ancestor", commit, "HEAD").returncode == 0
        assert ok, f"{commit} (recorded by {files[0]} and {len(files) - 1} more) is not in this history"


def test_each_committed_run_folder_agrees_with_its_evaluations():
    for run in sorted({m.parents[2] for m in METRICS}):
        record = json.loads((run / "run.json").read_text())
        spec = json.loads((run / "spec.json").read_text())
        assert record["identity"] == spec["identity"] == run.name.rsplit("-", 1)[1], run
        for m in run.glob("evals/*/metrics.json"):
            assert json.loads(m.read_text())["identity"] == record["identity"], m


def test_the_committed_results_render_as_tables(capsys):
    code, out, err = cli(["table", RESULTS, "--steps", "--format", "csv"], capsys)
    assert code == 0, err
    assert "verdict" in out.splitlines()[0].lower() and len(out.splitlines()) > 1, out
