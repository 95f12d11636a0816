"""`dimr-lab distortion`: the flagged-sample grid and the rate, from a run's saved evaluation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dimr_lab.cli import main
from dimr_lab.spec.run_spec import load_run_spec
from dimr_lab.spec.schema import to_dict


def _run_dir(tmp_path, probs, labels):
    run = tmp_path / "run"
    run.mkdir()
    spec = load_run_spec(None, [("eval.distortion_threshold", 0.5)])
    (run / "spec.json").write_text(json.dumps({"format": "dimr-lab-spec/1", "spec": to_dict(spec)}))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (len(probs), 3, 16, 16), dtype=np.uint8)
    np.savez_compressed(run / "eval_per_sample.npz", images=images, labels=np.asarray(labels),
                        class_prob=np.asarray(probs, dtype=np.float32))
    return run


def test_distortion_rate_grid_and_json(tmp_path, capsys):
    probs = [0.9, 0.1, 0.45, 0.99, 0.51, 0.2, 0.7, 0.05]
    labels = [0, 1, 2, 3, 0, 1, 2, 3]
    run = _run_dir(tmp_path, probs, labels)
    main(["distortion", str(run)])
    out = capsys.readouterr().out
    report = json.loads((run / "distortion.json").read_text())
    assert report["flagged"] == 4 and report["distortion_rate"] == pytest.approx(0.5)
    assert report["per_class"]["square"] == pytest.approx(1.0) and report["per_class"]["circle"] == 0.0
    assert "distortion rate 0.500" in out
    assert (run / "distortion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    main(["distortion", str(run), "--threshold", "0.15", "--out", str(tmp_path / "g.png")])
    assert json.loads((run / "distortion.json").read_text())["flagged"] == 2
    assert (tmp_path / "g.png").is_file()


def test_distortion_without_an_evaluation_is_one_clear_error(tmp_path, capsys):
    run = _run_dir(tmp_path, [0.5], [0])
    (run / "eval_per_sample.npz").unlink()
    with pytest.raises(SystemExit) as exit_:
        main(["distortion", str(run)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "no eval_per_sample.npz" in err and "\n" not in err
    with pytest.raises(SystemExit):
        main(["distortion", str(tmp_path / "nowhere")])
    assert "not a run directory" in capsys.readouterr().err
