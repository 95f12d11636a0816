"""Evaluation: samples of a run's checkpoints, metrics (torch-fidelity, the dataset classifier), distortion.

    dimr-lab eval RUN_DIR [--step N | --all-steps] [--set sample.K=V] [--set eval.K=V]

The training run's own end-of-training evaluation is the first of these (`evaluate_step`).
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Where trained evaluation classifiers are cached: $DIMR_LAB_CACHE or ~/.cache/dimr-lab."""
    return Path(os.environ.get("DIMR_LAB_CACHE") or Path.home() / ".cache" / "dimr-lab")


def get_classifier(data_spec, cache_dir, *, seed: int = 0, max_images: int = 20000, log=None):
    """The dataset's small CNN classifier, trained once and cached under cache_dir."""
    from dimr_lab.eval.classifier import get_classifier as _get

    return _get(data_spec, cache_dir, seed=seed, max_images=max_images, log=log)


def evaluate(samples_uint8, labels, data_spec, eval_spec, *, cache_dir, real_images=None, seed: int = 0, log=None):
    """FID/KID/IS/precision/recall, sample_accuracy, distortion_rate, fid_floor and per-sample class_prob."""
    from dimr_lab.eval.metrics import evaluate as _evaluate

    return _evaluate(samples_uint8, labels, data_spec, eval_spec, cache_dir=cache_dir, real_images=real_images,
                     seed=seed, log=log)


def register_feature_extractor() -> str:
    """Register 'dimr-classifier' with torch-fidelity (idempotent); returns the name."""
    from dimr_lab.eval.fidelity import register

    return register()


__all__ = ["cache_dir", "evaluate", "get_classifier", "register_feature_extractor"]
