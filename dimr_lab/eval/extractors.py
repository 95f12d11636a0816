"""Feature extractors for torch-fidelity: each returns (extractor name, weights path) for an EvalSpec.

Nothing here downloads: torch-fidelity's Inception needs a local weights file (`eval.inception_weights`),
and the dataset classifier is trained once and cached.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dimr_lab.errors import SpecError, UserError

INCEPTION = "inception-v3-compat"
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"


def classifier(eval_spec: Any, model: Any) -> tuple[str, str]:
    """The dataset classifier's penultimate features and logits ('dimr-classifier')."""
    if model is None:
        raise SpecError("'classifier' needs the dataset classifier (an image dataset with eval.classifier on); "
                        "use 'inception-v3-compat'", key="eval.feature_extractor")
    if eval_spec.reference_stats:
        raise SpecError("holds Inception statistics: set eval.feature_extractor = 'inception-v3-compat'",
                        key="eval.reference_stats")
    from dimr_lab.eval.fidelity import register

    return register(), str(model.path)


def inception(eval_spec: Any, model: Any = None) -> tuple[str, str]:
    """torch-fidelity's Inception-v3 from eval.inception_weights."""
    return INCEPTION, str(inception_weights_path(eval_spec))


def inception_weights_path(eval_spec: Any) -> Path:
    """The local Inception weights file; a clear error instead of a download."""
    path = eval_spec.inception_weights
    if not path:
        raise UserError(f"eval.inception_weights is empty: torch-fidelity would download the Inception weights "
                        f"({INCEPTION_FILE}), which is not possible here; set it to a local copy, or use "
                        f"eval.feature_extractor = 'classifier'")
    p = Path(path).expanduser()
    if not p.is_file():
        raise SpecError(f"Inception weights {path!r} not found", key="eval.inception_weights")
    return p
