"""Evaluation: a small per-dataset classifier (torch-fidelity extractor 'dimr-classifier') and evaluate()."""

from __future__ import annotations


def get_classifier(data_spec, cache_dir, *, seed: int = 0, log=None):
    """The dataset's small CNN classifier, trained once and cached under cache_dir."""
    from dimr_lab.eval.classifier import get_classifier as _get

    return _get(data_spec, cache_dir, seed=seed, log=log)


def evaluate(samples_uint8, labels, data_spec, eval_spec, *, cache_dir, real_images=None, seed: int = 0, log=None):
    """FID/KID/IS/precision/recall plus sample_accuracy, distortion_rate and per-sample class_prob."""
    from dimr_lab.eval.metrics import evaluate as _evaluate

    return _evaluate(samples_uint8, labels, data_spec, eval_spec, cache_dir=cache_dir, real_images=real_images,
                     seed=seed, log=log)


def register_feature_extractor() -> str:
    """Register 'dimr-classifier' with torch-fidelity (idempotent); returns the name."""
    from dimr_lab.eval.fidelity import register

    return register()


__all__ = ["evaluate", "get_classifier", "register_feature_extractor"]
