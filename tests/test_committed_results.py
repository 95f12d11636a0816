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


def _markdown_tables(text: str) -> list[list[str]]:
    """Each markdown table of `text` as its lines (header first)."""
    tables: list[list[str]] = []
    current: list[str] = []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    return tables


def test_results_md_quotes_the_tables_and_legends_the_code_prints(capsys):
    """RESULTS.md says its tables are `dimr-lab table` output pasted as printed: every table whose header the
    code prints is the code's, row for row, and every legend of the per-step tables is the one printed now.
    (The learning-curve summaries, put together from several `--step N` calls, have headers of their own.)"""
    printed: set[str] = set()
    for ablation in sorted(p for p in RESULTS.iterdir() if p.is_dir() and p.name != "paper"):
        for args in (["--steps"], ["--columns", "+floor", "--metrics", "fid,sample_accuracy,precision,recall"]):
            code, out, err = cli(["table", ablation, *args, "--format", "markdown"], capsys)
            assert code == 0, err
            printed.update(out.splitlines())
    text = (ROOT / "RESULTS.md").read_text()
    checked = 0
    for table in _markdown_tables(text):
        if table[0] in printed:
            missing = [row for row in table if row not in printed]
            assert not missing, f"RESULTS.md quotes rows `dimr-lab table` no longer prints: {missing[:2]}"
            checked += 1
    assert checked >= 5, "RESULTS.md quotes fewer `dimr-lab table` tables than its five ablations"
    legends = [ln for ln in text.splitlines() if ln.startswith("Paired by seed: each step compares")]
    assert legends and all(ln in printed for ln in legends), "a per-step legend in RESULTS.md is not the printed one"


def test_paired_spread_compares_the_per_seed_differences_of_two_folders(capsys):
    """scripts/paired_spread.py on the committed runs: a folder against itself is a ratio of 1 with the
    F interval of its seeds, and against another folder the standard deviations of B - A are the ones the
    metrics.json files give when read directly."""
    import math

    import numpy as np
    from scipy import stats

    from conftest import script_module

    script = script_module("paired_spread")

    def rows(first, second):
        assert script.main([str(RESULTS / first), str(RESULTS / second), "--variants", "tdln,adaln_zero",
                            "--metrics", "fid"]) == 0
        out = capsys.readouterr().out.splitlines()
        return {int(line.split()[1]): line.split() for line in out if line.startswith("fid ")}

    same = rows("tdln_vs_adaln", "tdln_vs_adaln")
    assert sorted(same) == [1000, 2000, 3000]
    half = math.sqrt(stats.f.ppf(0.975, 5, 5))
    for cells in same.values():
        assert cells[2] == "6" and cells[7] == "1.00" and cells[10] == "1.00"
        assert f"[{1 / half:.2f}," == cells[8] and f"{half:.2f}]" == cells[9]

    def direct(folder, step):  # B - A per seed, from the files, not through the table's reader
        values = {}
        for m in (RESULTS / folder).glob(f"*/evals/step-{step:08d}-*/metrics.json"):
            run = json.loads((m.parents[2] / "run.json").read_text())
            values[(run["variant"], run["seed"])] = json.loads(m.read_text())["fid"]
        return np.array([values[("adaln_zero", s)] - values[("tdln", s)] for s in range(6)])

    other = rows("tdln_vs_adaln", "table2_components")
    for step in (1000, 3000):
        d1, d2 = direct("tdln_vs_adaln", step), direct("table2_components", step)
        assert float(other[step][4]) == pytest.approx(d1.std(ddof=1), rel=5e-3)  # printed to 3 digits
        assert float(other[step][6]) == pytest.approx(d2.std(ddof=1), rel=5e-3)  # printed to 3 digits
        assert float(other[step][7]) == pytest.approx(d2.std(ddof=1) / d1.std(ddof=1), abs=0.006)
    assert script.main([str(RESULTS / "nowhere"), str(RESULTS / "tdln_vs_adaln"), "--variants", "a,b"]) == 2
    assert script.main([str(RESULTS), str(RESULTS), "--variants", "tdln"]) == 2
