"""The shipped network counts (dimr_lab/spec/counts.json) are complete and equal a fresh count."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_shipped_counts_cover_every_preset_and_ablation_network_and_are_right():
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "update_counts.py"), "--check"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr[-2000:] + "\nrun: python scripts/update_counts.py"


def test_a_new_network_is_counted_once_and_remembered(tmp_path, monkeypatch):
    import dimr_lab.nn.describe as describe
    from dimr_lab.spec.counts import lookup
    from dimr_lab.spec.model_spec import resolve_model

    monkeypatch.setenv("DIMR_LAB_CACHE", str(tmp_path))
    spec = resolve_model({"preset": "dimr_tiny_2r", "branches": [{"width": 40}, {"width": 24}]})
    assert lookup(spec) is None
    first = describe.counts_for(spec)
    assert first["params"] > 0 and lookup(spec) == json.loads((tmp_path / "counts.json").read_text())[
        next(iter(json.loads((tmp_path / "counts.json").read_text())))]
    monkeypatch.setattr(describe, "count", lambda *_: pytest.fail("counted again"))
    assert describe.counts_for(spec) == first
    # checkpointing does not change a count
    assert lookup(resolve_model({"preset": "dimr_tiny_2r", "branches": [{"width": 40}, {"width": 24}],
                                 "checkpointing": True})) == first
