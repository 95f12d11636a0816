"""The paper's distortion analysis: which samples a classifier finds low-fidelity, and how many.

DiMR (Sec. 4.3) counts a sample as distorted when a pretrained classifier gives its class a low
probability; here the classifier is the dataset's own (dimr_lab.eval.classifier) and the threshold is
`eval.distortion_threshold`. A run's evaluation keeps its samples and their class probabilities in
`eval_per_sample.npz`; this module turns them into a grid of the flagged samples and the rate.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from dimr_lab.errors import UserError

PER_SAMPLE = "eval_per_sample.npz"


def load_per_sample(run_dir: Path) -> dict[str, np.ndarray]:
    """images (N, 3, H, W) uint8, labels (N,), class_prob (N,) of a run's evaluation."""
    path = Path(run_dir) / PER_SAMPLE
    if not path.is_file():
        raise UserError(f"{run_dir}: no {PER_SAMPLE} (the run has not been evaluated, or eval.enabled = false)")
    try:
        with np.load(path, allow_pickle=False) as f:
            data = {k: f[k] for k in f.files}
    except Exception as err:  # truncated or foreign files
        raise UserError(f"{path}: not readable ({err})") from None
    missing = [k for k in ("images", "labels", "class_prob") if k not in data]
    if missing:
        raise UserError(f"{path}: lacks {', '.join(missing)} (written by an older dimr-lab; rerun the evaluation)")
    return data


def distortion_report(run_dir: str | Path, *, threshold: float | None = None, max_images: int = 64,
                      out: str | Path | None = None) -> dict[str, Any]:
    """Write a grid of the flagged samples (least likely first) and distortion.json; return the numbers."""
    from dimr_lab.train.runinfo import read_run_spec
    from dimr_lab.train.sampling import save_grid

    run_dir = Path(run_dir)
    spec = read_run_spec(run_dir)
    data = load_per_sample(run_dir)
    threshold = spec.eval.distortion_threshold if threshold is None else float(threshold)
    if not 0.0 <= threshold <= 1.0:
        raise UserError(f"--threshold must be in [0, 1], got {threshold}")
    prob, labels = data["class_prob"].astype(np.float64), data["labels"].astype(np.int64)
    flagged = prob < threshold
    order = np.argsort(prob)[: int(flagged.sum())][:max_images]
    names = _class_names(spec)
    per_class = {names[c] if c < len(names) else str(c): float(flagged[labels == c].mean())
                 for c in np.unique(labels)}
    report = {"distortion_rate": float(flagged.mean()), "threshold": threshold, "samples": int(len(prob)),
              "flagged": int(flagged.sum()), "per_class": per_class}
    grid = Path(out) if out is not None else run_dir / "distortion.png"
    if len(order):
        titles = [f"{names[labels[i]] if labels[i] < len(names) else labels[i]} {prob[i]:.2f}" for i in order]
        save_grid(data["images"][order], list(range(len(order))), grid, class_names=titles)
        report["grid"] = str(grid)
    (run_dir / "distortion.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _class_names(spec: Any) -> list[str]:
    from dimr_lab.data import build_dataset

    try:
        return list(getattr(build_dataset(spec.data, split="test"), "class_names", None) or [])
    except UserError:
        return []
