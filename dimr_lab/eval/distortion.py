"""The paper's distortion analysis: which samples a classifier finds low-fidelity, and how many.

DiMR (Sec. 4.3) counts a sample as distorted when a pretrained classifier gives its class a low
probability; here the classifier is the dataset's own (dimr_lab.eval.classifier) and the threshold is
`eval.distortion_threshold`. An evaluation keeps its samples and their class probabilities in
`per_sample.npz`; this module turns them into a grid of the flagged samples and the rate.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from dimr_lab.errors import UserError
from dimr_lab.rundir import PER_SAMPLE, RunDir, write_json


def load_per_sample(eval_dir: Path) -> dict[str, np.ndarray]:
    """images (N, 3, H, W) uint8, labels (N,), class_prob (N,) of one evaluation."""
    path = Path(eval_dir) / PER_SAMPLE
    if not path.is_file():
        raise UserError(f"{eval_dir}: no {PER_SAMPLE} (not evaluated with the dataset classifier, or "
                        f"eval.enabled = false)")
    try:
        with np.load(path, allow_pickle=False) as f:
            data = {k: f[k] for k in f.files}
    except Exception as err:  # truncated or foreign files
        from dimr_lab.eval.reuse import npz_error

        raise UserError(f"{path}: not readable ({npz_error(err)})") from None
    missing = [k for k in ("images", "labels", "class_prob") if k not in data]
    if missing:
        raise UserError(f"{path}: lacks {', '.join(missing)} (rerun the evaluation)")
    return data


def latest_evaluation_dir(run_dir: Path) -> Path:
    """The newest finished evaluation of a run that kept its per-sample data."""
    evals = [e for e in RunDir(run_dir).evaluations() if e.done and (e.path / PER_SAMPLE).is_file()]
    if not evals:
        raise UserError(f"{run_dir}: no evaluation with per-sample data (has the run been evaluated with the "
                        f"dataset classifier?)")
    return max(evals, key=lambda e: (e.step, (e.path / PER_SAMPLE).stat().st_mtime)).path


def distortion_report(eval_dir: str | Path, *, threshold: float = 0.5, max_images: int = 64,
                      out: str | Path | None = None, class_names: Sequence[str] | None = None,
                      stem: str = "distortion") -> dict[str, Any]:
    """Write a grid of the flagged samples (least likely first) and <stem>.json in the evaluation folder (the
    grid as <stem>.png there, or at `out`); return the numbers. Both follow from the evaluation's samples
    and the threshold alone, so writing them again writes the same."""
    from dimr_lab.images import write_grid

    eval_dir = Path(eval_dir)
    data = load_per_sample(eval_dir)
    threshold = float(threshold)
    if not 0.0 <= threshold <= 1.0:
        raise UserError(f"--threshold must be in [0, 1], got {threshold}")
    prob, labels = data["class_prob"].astype(np.float64), data["labels"].astype(np.int64)
    flagged = prob < threshold
    order = np.argsort(prob, kind="stable")[: int(flagged.sum())][:max_images]
    names = list(class_names or [])

    def name(c: int) -> str:
        return names[c] if 0 <= c < len(names) else str(c)

    per_class = {name(int(c)): float(flagged[labels == c].mean()) for c in np.unique(labels)}
    report: dict[str, Any] = {"distortion_rate": float(flagged.mean()), "threshold": threshold,
                              "samples": int(len(prob)), "flagged": int(flagged.sum()), "per_class": per_class}
    grid = Path(out) if out is not None else eval_dir / f"{stem}.png"
    if len(order):
        titles = [f"{name(int(labels[i]))} {prob[i]:.2f}" for i in order]
        write_grid(data["images"][order], grid, list(range(len(order))), titles)
        report["grid"] = str(grid)
    write_json(eval_dir / f"{stem}.json", report)
    return report
