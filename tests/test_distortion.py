"""`dimr-lab distortion`: the flagged-sample grid and the rate, from an evaluation's saved samples."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dimr_lab.cli import main
from dimr_lab.eval.run import eval_settings
from dimr_lab.rundir import PER_SAMPLE, RunDir, write_eval_record, write_json
from dimr_lab.spec.run_spec import load_run_spec
from dimr_lab.spec.schema import to_dict


def _run_dir(tmp_path, probs, labels):
    run = RunDir(tmp_path / "run")
    spec = load_run_spec(None, [("eval.distortion_threshold", 0.5)])
    run.path.mkdir()
    run.write_spec_document(to_dict(spec), spec.identity_hash())
    d = run.eval_dir(1800, spec.eval_hash())
    d.mkdir(parents=True)
    write_eval_record(d, 1800, spec.eval_hash(), eval_settings(spec), "")
    write_json(d / "metrics.json", {"fid": 1.0})
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (len(probs), 3, 16, 16), dtype=np.uint8)
    np.savez_compressed(d / PER_SAMPLE, images=images, labels=np.asarray(labels),
                        class_prob=np.asarray(probs, dtype=np.float32))
    return run.path, d


def test_distortion_rate_grid_and_json(tmp_path, capsys):
    probs = [0.9, 0.1, 0.45, 0.99, 0.51, 0.2, 0.7, 0.05]
    labels = [0, 1, 2, 3, 0, 1, 2, 3]
    run, d = _run_dir(tmp_path, probs, labels)
    main(["distortion", str(run)])
    out = capsys.readouterr().out
    report = json.loads((d / "distortion.json").read_text())
    assert report["flagged"] == 4 and report["distortion_rate"] == pytest.approx(0.5)
    assert report["per_class"]["square"] == pytest.approx(1.0) and report["per_class"]["circle"] == 0.0
    assert "distortion rate 0.500" in out
    assert (d / "distortion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    own = {p.name: p.read_bytes() for p in d.glob("distortion.*")}
    main(["distortion", str(d), "--threshold", "0.15", "--out", str(tmp_path / "g.png")])
    # another threshold has its own files: the evaluation's (at its own threshold) stay as they were
    assert json.loads((d / "distortion-t0.15.json").read_text())["flagged"] == 2
    assert {p.name: p.read_bytes() for p in d.glob("distortion.*")} == own
    assert (tmp_path / "g.png").is_file()
    # an existing --out is refused unless --force; a name that is no PNG is refused
    for argv, fragment in (([str(tmp_path / "g.png")], "exists; refusing to overwrite"),
                           ([str(tmp_path / "g.txt")], "ending in .png")):
        with pytest.raises(SystemExit) as exit_:
            main(["distortion", str(d), "--threshold", "0.15", "--out", *argv])
        assert exit_.value.code == 2 and fragment in capsys.readouterr().err
    main(["distortion", str(d), "--threshold", "0.15", "--out", str(tmp_path / "g.png"), "--force"])


def test_distortion_without_an_evaluation_is_one_clear_error(tmp_path, capsys):
    run, d = _run_dir(tmp_path, [0.5], [0])
    (d / PER_SAMPLE).unlink()
    with pytest.raises(SystemExit) as exit_:
        main(["distortion", str(run)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "no evaluation with per-sample data" in err and "\n" not in err
    with pytest.raises(SystemExit) as exit_:
        main(["distortion", str(tmp_path / "nowhere")])
    assert exit_.value.code == 2
