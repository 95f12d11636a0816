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


_CHECKED_WEIGHTS: set[tuple[str, int, int]] = set()  # (path, size, mtime) of files that loaded
_DIGESTS: dict[tuple[str, int, int], str] = {}


def _version(p: Path) -> tuple[str, int, int]:
    """(path, size, mtime): one version of a file, read or checked once per process."""
    st = p.stat()
    return str(p.resolve()), st.st_size, st.st_mtime_ns


def file_digest(path: str | Path) -> str:
    """The first 12 hex digits of a file's SHA-256: which weights or reference statistics measured an
    evaluation (metrics.json records it; `table` says when an ablation's evaluations differ). An
    evaluation's name holds the file's path, not its content: a file replaced at the same path is told
    apart only by this. Each version of a file (path, size, mtime) is read once per process."""
    import hashlib

    p = Path(path).expanduser()
    key = _version(p)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        _DIGESTS[key] = h.hexdigest()[:12]
    return _DIGESTS[key]


def check_inception_weights(eval_spec: Any) -> None:
    """With evaluation on and the Inception extractor: eval.inception_weights loads (weights_only) into
    torch-fidelity's Inception-v3; one SpecError naming the key otherwise. Made before an evaluation writes
    or samples anything: torch-fidelity would only read the file after every sample was made, and fail with
    a traceback. Each version of a file is checked once per process."""
    if not eval_spec.enabled or eval_spec.feature_extractor != INCEPTION:
        return
    p = inception_weights_path(eval_spec)
    key = _version(p)
    if key in _CHECKED_WEIGHTS:
        return
    import torch

    def first_line(err: Exception) -> str:
        return ((str(err).strip().splitlines() or [""])[0])[:200]

    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # not a torch file, truncated, or one that needs unpickling code
        raise SpecError(f"{eval_spec.inception_weights!r} is not a torch weights file loadable with "
                        f"weights_only=True ({type(err).__name__})", key="eval.inception_weights") from None
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise SpecError(f"{eval_spec.inception_weights!r} holds a {type(state).__name__}, not a state dict of "
                        f"tensors ({INCEPTION_FILE})", key="eval.inception_weights")
    del state
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        FeatureExtractorInceptionV3(INCEPTION, ["2048"], feature_extractor_weights_path=str(p))
    except Exception as err:  # load_state_dict: missing or unexpected keys, other shapes
        why = "its keys or shapes are not Inception-v3's" if "state_dict" in str(err) else \
            f"{type(err).__name__}: {first_line(err)}"
        raise SpecError(f"{eval_spec.inception_weights!r} does not load into torch-fidelity's Inception-v3 ({why})",
                        key="eval.inception_weights") from None
    _CHECKED_WEIGHTS.add(key)
