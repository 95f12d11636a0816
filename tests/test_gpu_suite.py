"""scripts/gpu_suite.py, the one script a lent GPU machine runs: its --smoke mode takes every step on the CPU at
tiny sizes, so a broken step shows here rather than in the device's few minutes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_gpu_suite_smoke_takes_every_step_and_writes_the_summary(tmp_path):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "DIMR_OFFICIAL_SRC"}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_suite.py"), "--out", str(out), "--smoke"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "all.json").read_text())
    assert set(results) == {"environment", "train_dimr_tiny_2r_eager", "train_dimr_tiny_2r_compiled", "train_dit_tiny_4_eager",
                            "profile_train_step", "profile_sampling_step", "profile_train_step_compiled",
                            "profile_sampling_step_compiled", "released_side_by_side",
                            "gpu_profile_table2_components"}
    failed = {k: v["error"] for k, v in results.items() if "error" in v}
    assert not failed, failed
    assert "no checkout" in results["released_side_by_side"]["skipped"]
    for key in ("train_dimr_tiny_2r_eager", "train_dit_tiny_4_eager"):
        r = results[key]["result"]
        assert r["train_images_per_s"] > 0 and r["forward_images_per_s"] > 0 and not r["compile"]
        assert "compiled_graphs" not in r
        assert (out / f"{key}.json").exists()
    compiled = results["train_dimr_tiny_2r_compiled"]["result"]
    assert compiled["compile"] and compiled["train_images_per_s"] > 0
    assert compiled["first_calls_extra_s"] > 0 and len(compiled["train_warmup_s"]) == 1  # tracing took time
    # two kinds of block (5 Transformer and 3 ConvNeXt blocks), with and without gradients: at most 4 graphs,
    # and no block left eager
    assert 2 <= compiled["compiled_graphs"] <= 4 and compiled["compile_fallbacks"] == 0
    for key in ("train_dimr_tiny_2r_eager", "train_dimr_tiny_2r_compiled"):  # sampling eager and compiled
        sampling = results[key]["result"]["sampling"]
        assert [row["guidance"] for row in sampling] == [0.0, 1.4] and all(row["images_per_s"] > 0 for row in sampling)
    # eager samples at the training batch, compiled at the evaluation-sized one
    for key, b in (("train_dimr_tiny_2r_eager", 2), ("train_dimr_tiny_2r_compiled", 4)):
        assert [row["batch"] for row in results[key]["result"]["sampling"]] == [b, b]
    env = results["environment"]["result"]
    assert env["commit"] and len(env["commit"]) == 40 and env["torch"]  # the commit the numbers were taken at
    for key in ("profile_train_step", "profile_sampling_step", "profile_train_step_compiled",
                "profile_sampling_step_compiled"):
        r = results[key]["result"]
        assert abs(sum(r["shares"].values()) - 1.0) < 1e-6 and r["shares"].get("matmul", 0) > 0
        assert r["step_ms"] > 0 and r["compiled"] == key.endswith("_compiled")
    gpu = results["gpu_profile_table2_components"]["result"]
    assert gpu["exit"] == 0 and gpu["runs"], gpu["stderr"]
    metrics = list((out / "results" / "table2_components").glob("*/evals/*/metrics.json"))
    assert metrics and all("fid" in json.loads(m.read_text()) for m in metrics)
    summary = (out / "summary.md").read_text()
    assert "| train_dimr_tiny_2r_eager | DiMR-tiny/2R |" in summary and "## profile_train_step" in summary
    assert "sampling eager, batch 2, guidance 1.4:" in summary and " at 250 NFE" in summary
    assert "sampling compiled, batch 4, guidance 1.4:" in summary
    header = next(line for line in summary.splitlines() if line.startswith("| measurement"))
    row = next(line for line in summary.splitlines() if line.startswith("| train_dit_tiny_4_eager"))
    assert header.count("|") == row.count("|")  # every row fills the table's columns


@pytest.mark.timeout(300)
def test_count_ops_counts_a_training_steps_operators(tmp_path):
    """scripts/count_ops.py (the gpu profile's operator counts in its recipe and BENCHMARKS.md), eagerly: the
    deeper network runs more operators, and an unknown variant is one clear line."""
    script = [sys.executable, str(ROOT / "scripts" / "count_ops.py"), str(ROOT / "ablations" / "table2_components.toml"),
              "--profile", "tiny", "--batch", "4", "--eager-only"]
    proc = subprocess.run([*script, "--variants", "uvit,dimr", "--json"], cwd=ROOT, capture_output=True, text=True,
                          timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["variant"]: r for r in map(json.loads, proc.stdout.splitlines())}
    assert set(rows) == {"uvit", "dimr"} and rows["uvit"]["batch"] == 4
    assert 50 < rows["uvit"]["eager"] < rows["dimr"]["eager"]
    proc = subprocess.run([*script, "--variants", "nope"], cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 1 and "no variant" in proc.stderr and "Traceback" not in proc.stderr
