"""evaluate(): FID, KID, IS, precision/recall via torch-fidelity, plus classifier accuracy and distortion rate."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from dimr_lab.errors import SpecError, UserError

METRICS = ("fid", "kid", "isc", "prc")
INCEPTION = "inception-v3-compat"


class _Uint8Images(Dataset):
    """In-memory uint8 images (N, 3, H, W) as the Dataset torch-fidelity reads."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


def _as_uint8_images(x, what: str) -> torch.Tensor:
    """uint8 (N, 3, H, W) on the CPU from a tensor/array (N, 1|3, H, W); grey is repeated to RGB."""
    x = torch.as_tensor(x).detach().cpu()
    if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] not in (1, 3):
        raise UserError(f"{what}: expected uint8 images (N, 1|3, H, W), got {x.dtype} {tuple(x.shape)}")
    return x.expand(-1, 3, -1, -1).contiguous() if x.shape[1] == 1 else x  # (N, 3, H, W)


def real_images_uint8(data_spec, n: int, *, seed: int = 0) -> torch.Tensor:
    """Up to n real uint8 images (N, C, H, W) from the dataset's test split (the references for FID)."""
    from dimr_lab.data import build_dataset

    if data_spec.name == "latents":
        raise UserError("a 'latents' dataset has no images to compare with: pass real_images or eval.reference_stats")
    if data_spec.name == "shapes":
        ds = build_dataset(replace(data_spec, train_size=n, flip=False), split="test", seed=seed)
    else:
        ds = build_dataset(replace(data_spec, flip=False), split="test", seed=seed)
    if hasattr(ds, "images"):
        return ds.images[:n]
    pick = torch.linspace(0, len(ds) - 1, min(n, len(ds))).round().long().unique()  # spread over all classes
    return torch.stack([ds.load_uint8(int(i)) for i in pick])


def _load_reference_stats(path: str) -> dict:
    """mu (D,), sigma (D, D) float64 from an ADM reference batch .npz."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise SpecError(f"reference statistics {str(p)!r} not found", key="eval.reference_stats")
    try:
        with np.load(p) as npz:
            mu, sigma = np.asarray(npz["mu"], np.float64), np.asarray(npz["sigma"], np.float64)
    except (KeyError, OSError, ValueError) as err:
        raise SpecError(f"{p}: not an .npz with 'mu' and 'sigma' ({err})", key="eval.reference_stats") from err
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise SpecError(f"{p}: mu {mu.shape} / sigma {sigma.shape} are not (D,) / (D, D)", key="eval.reference_stats")
    return {"mu": mu, "sigma": sigma}


def _extractor(eval_spec, classifier) -> tuple[str, str]:
    """(torch-fidelity extractor name, weights path) for eval.feature_extractor; clear errors, no downloads."""
    if eval_spec.feature_extractor == "classifier":
        if classifier is None:
            raise SpecError("'classifier' needs an image dataset; with latents use 'inception-v3-compat'",
                            key="eval.feature_extractor")
        if eval_spec.reference_stats:
            raise SpecError("holds Inception statistics: set eval.feature_extractor = 'inception-v3-compat'",
                            key="eval.reference_stats")
        from dimr_lab.eval.fidelity import register

        return register(), str(classifier.path)
    if eval_spec.feature_extractor == INCEPTION:
        path = eval_spec.inception_weights
        if not path:
            raise UserError("eval.inception_weights is empty: torch-fidelity would download the Inception weights "
                            "(weights-inception-2015-12-05-6726825d.pth), which is not possible here; set it to a "
                            "local copy, or use eval.feature_extractor = 'classifier'")
        if not Path(path).expanduser().is_file():
            raise SpecError(f"Inception weights {path!r} not found", key="eval.inception_weights")
        return INCEPTION, str(Path(path).expanduser())
    raise SpecError(f"unknown extractor {eval_spec.feature_extractor!r}", key="eval.feature_extractor")


def evaluate(samples_uint8, labels, data_spec, eval_spec, *, cache_dir, real_images=None, seed: int = 0,
             log=None) -> dict:
    """Metrics of generated uint8 samples (N, C, H, W) with their conditioning labels (N,); see module doc."""
    import torch_fidelity

    samples = _as_uint8_images(samples_uint8, "samples")  # (N, 3, H, W)
    labels = torch.as_tensor(labels).long().cpu().reshape(-1)  # (N,)
    if len(labels) != len(samples):
        raise UserError(f"{len(samples)} samples but {len(labels)} labels")
    wanted = list(dict.fromkeys(eval_spec.metrics))
    for m in wanted:
        if m not in METRICS:
            raise SpecError(f"unknown metric {m!r}; known: {', '.join(METRICS)}", key="eval.metrics")
    n = len(samples)
    out: dict = {"feature_extractor": eval_spec.feature_extractor, "num_samples": n, "metrics": wanted,
                 "skipped": {}, "distortion_threshold": float(eval_spec.distortion_threshold)}
    cuda = torch.cuda.is_available()

    # the classifier judges every sample: accuracy and the low-fidelity detector
    classifier = None
    if data_spec.name != "latents":
        from dimr_lab.eval.classifier import get_classifier

        classifier = get_classifier(data_spec, cache_dir, seed=seed, log=log)
        if labels.min() < 0 or labels.max() >= classifier.num_classes:
            raise UserError(f"labels must lie in 0..{classifier.num_classes - 1}")
        if cuda:
            classifier = classifier.cuda()
        prob = classifier.predict_proba(samples, eval_spec.batch_size)  # (N, K)
        class_prob = prob.gather(1, labels[:, None])[:, 0]  # (N,) p(conditioning class)
        out.update(
            sample_accuracy=float((prob.argmax(1) == labels).float().mean()),
            distortion_rate=float((class_prob < eval_spec.distortion_threshold).float().mean()),
            class_prob=class_prob.numpy().astype(np.float32), pred=prob.argmax(1).numpy(),
            classifier_accuracy=classifier.accuracy, classifier_path=str(classifier.path),
        )
    else:
        out["skipped"].update(sample_accuracy="latents dataset: no image classifier",
                              distortion_rate="latents dataset: no image classifier")

    name, weights = _extractor(eval_spec, classifier)
    out["torch_fidelity_extractor"] = name
    ref_stats = _load_reference_stats(eval_spec.reference_stats) if eval_spec.reference_stats else None
    if ref_stats is not None:
        out["reference"] = f"reference_stats:{eval_spec.reference_stats}"

    need_real = [m for m in wanted if m in ("kid", "prc") or (m == "fid" and ref_stats is None)]
    real = None
    if need_real:
        if real_images is not None:
            real, source = _as_uint8_images(real_images, "real_images"), "given"
        elif data_spec.name != "latents":
            k = eval_spec.reference_samples or eval_spec.samples
            real, source = _as_uint8_images(real_images_uint8(data_spec, k, seed=seed), "real"), "test split"
        elif ref_stats is not None:
            for m in need_real:
                out["skipped"][m] = "needs real images (pass real_images)"
            need_real = []
            source = None
        else:
            raise UserError("a 'latents' dataset has no images to compare with: pass real_images or "
                            "set eval.reference_stats")
        if real is not None:
            out.setdefault("reference", source)
    out["num_real"] = 0 if real is None else len(real)

    kid_size = min(eval_spec.kid_subset_size, n, out["num_real"] or n)
    flags = {m: m in wanted and (m not in ("kid", "prc") or real is not None) for m in METRICS}
    if flags["kid"] and kid_size < 2:
        flags["kid"], out["skipped"]["kid"] = False, "fewer than 2 images"
    fid_from_stats = flags["fid"] and ref_stats is not None
    if fid_from_stats:
        flags["fid"] = False
    kwargs = dict(feature_extractor=name, feature_extractor_weights_path=weights, cuda=cuda,
                  batch_size=eval_spec.batch_size, kid_subset_size=kid_size, isc_splits=min(10, n),
                  cache=False, verbose=False, save_cpu_ram=True, rng_seed=seed)
    res = {}
    if any(flags.values()):
        res = torch_fidelity.calculate_metrics(
            input1=_Uint8Images(samples), input2=_Uint8Images(real) if real is not None else None,
            fid=flags["fid"], kid=flags["kid"], isc=flags["isc"], prc=flags["prc"], **kwargs)
    if fid_from_stats:
        res.update(_fid_against_stats(samples, ref_stats, kwargs))
    keys = {torch_fidelity.KEY_METRIC_FID: "fid", torch_fidelity.KEY_METRIC_KID_MEAN: "kid_mean",
            torch_fidelity.KEY_METRIC_KID_STD: "kid_std", torch_fidelity.KEY_METRIC_ISC_MEAN: "isc_mean",
            torch_fidelity.KEY_METRIC_ISC_STD: "isc_std", torch_fidelity.KEY_METRIC_PRECISION: "precision",
            torch_fidelity.KEY_METRIC_RECALL: "recall", torch_fidelity.KEY_METRIC_F_SCORE: "f_score"}
    out.update({short: float(res[long]) for long, short in keys.items() if long in res})
    if flags["kid"] or "kid" in out["skipped"]:
        out["kid_subset_size"] = kid_size
    return out


def _fid_against_stats(samples: torch.Tensor, ref: dict, kwargs: dict) -> dict:
    """FID of the samples' features against stored mu/sigma, with torch-fidelity's own feature and FID code."""
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset

    layer = "2048" if kwargs["feature_extractor"] == INCEPTION else "penultimate"
    fe = create_feature_extractor(kwargs["feature_extractor"], [layer], **kwargs)
    feats = get_featuresdict_from_dataset(_Uint8Images(samples), fe, kwargs["batch_size"], kwargs["cuda"],
                                          True, False)[layer]  # (N, D)
    if feats.shape[1] != len(ref["mu"]):
        raise SpecError(f"reference statistics have {len(ref['mu'])} dims, the features {feats.shape[1]}",
                        key="eval.reference_stats")
    stats = fid_features_to_statistics(feats.double())
    stats = {k: np.asarray(v, np.float64) for k, v in stats.items()}
    return fid_statistics_to_metric(stats, ref, False)
