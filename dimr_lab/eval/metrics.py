"""evaluate(): FID, KID, IS, precision/recall via torch-fidelity, the dataset classifier's sample accuracy
and distortion rate, and the evaluation's own floor (FID of real images against real images).

The metrics are registered (`dimr-lab components metric`); each entry below says which torch-fidelity
computation it takes part in.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from dimr_lab.errors import SpecError, UserError
from dimr_lab.registry import METRICS

INCEPTION = "inception-v3-compat"


@dataclass(frozen=True)
class Metric:
    """A registered metric: its name and the torch-fidelity computation it needs (None: our own)."""

    name: str
    fidelity: str | None = None


FID, KID, ISC, PRC = Metric("fid", "fid"), Metric("kid", "kid"), Metric("isc", "isc"), Metric("prc", "prc")
SampleAccuracy, DistortionRate = Metric("sample_accuracy"), Metric("distortion_rate")
FIDFloor = Metric("fid_floor")
FIDELITY = ("fid", "kid", "isc", "prc")
OUTPUT_KEY = {"kid": "kid_mean", "isc": "isc_mean", "prc": "precision"}  # the result a metric writes, if not its name


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


def real_images_uint8(data_spec, n: int, *, seed: int = 0, part: int = 0, floor: bool = True,
                      reference: int | None = None) -> torch.Tensor:
    """Up to n real uint8 images (N, C, H, W): part 0 is the reference set of FID (the test split's first n),
    part 1 a second real set, disjoint from a reference of `reference` images (default n), for the
    evaluation's floor (the test split's next n, or the train split where the test split is too small).
    floor=False: no floor set will be drawn (a folder's reference may then take the whole split rather
    than half of it)."""
    from dimr_lab.data import build_dataset
    from dimr_lab.registry import DATASETS

    if DATASETS.meta(data_spec.name, "kind") != "pixels":
        raise UserError(f"a {data_spec.name!r} dataset has no images to compare with: pass real_images or "
                        f"set eval.reference_stats")
    k = n if reference is None else reference
    if DATASETS.meta(data_spec.name, "procedural"):
        ds = build_dataset(replace(data_spec, train_size=k + n, flip=False), split="test", seed=seed)
    else:
        ds = build_dataset(replace(data_spec, flip=False), split="test", seed=seed)
    if hasattr(ds, "images"):
        if part == 0:
            return ds.images[:n]
        if len(ds.images) >= k + n:
            return ds.images[k:k + n]
        train = build_dataset(replace(data_spec, flip=False), split="train", seed=seed)
        return train.images[:n]
    # a folder: evenly spread picks (all classes), the floor's set shifted by half a step (so as many as the
    # reference's, to stay disjoint from them); without a floor the reference may take the whole split
    count = min(k if part else n, len(ds) // 2 if floor or part else len(ds))
    pick = (torch.arange(count, dtype=torch.float64) * (len(ds) / count)).long() + (part * len(ds) // (2 * count))
    return torch.stack([ds.load_uint8(int(i)) for i in pick.clamp(max=len(ds) - 1)])


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
    from dimr_lab.registry import EXTRACTORS

    return EXTRACTORS.get(eval_spec.feature_extractor, key="eval.feature_extractor")(eval_spec, classifier)


def evaluate(samples_uint8, labels, data_spec, eval_spec, *, cache_dir, real_images=None, seed: int = 0,
             log=None) -> dict:
    """Metrics of generated uint8 samples (N, C, H, W) with their conditioning labels (N,); see module doc."""
    import torch_fidelity

    samples = _as_uint8_images(samples_uint8, "samples")  # (N, 3, H, W)
    labels = torch.as_tensor(labels).long().cpu().reshape(-1)  # (N,)
    if len(labels) != len(samples):
        raise UserError(f"{len(samples)} samples but {len(labels)} labels")
    wanted = list(dict.fromkeys(eval_spec.metrics))
    for i, m in enumerate(wanted):
        METRICS.check(m, key=f"eval.metrics[{i}]")
    n = len(samples)
    out: dict = {"feature_extractor": eval_spec.feature_extractor, "num_samples": n, "metrics": wanted,
                 "skipped": {}, "distortion_threshold": float(eval_spec.distortion_threshold)}
    cuda = torch.cuda.is_available()

    # the classifier judges every sample: accuracy and the low-fidelity detector
    classifier = None
    from dimr_lab.registry import DATASETS

    if DATASETS.meta(data_spec.name, "classifier") and eval_spec.classifier:
        from dimr_lab.eval.classifier import get_classifier

        classifier = get_classifier(data_spec, cache_dir, seed=seed, max_images=eval_spec.classifier_images, log=log)
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
            classifier_epochs=getattr(classifier, "epochs", None),  # [trained, planned]: fewer = its time limit
            classifier_digest=getattr(classifier, "digest", None),  # which weights measured it (table compares)
        )
    else:
        why = "eval.classifier is off" if DATASETS.meta(data_spec.name, "classifier") else \
            f"{data_spec.name} dataset: no image classifier"
        out["skipped"].update(sample_accuracy=why, distortion_rate=why)

    name, weights = _extractor(eval_spec, classifier)
    out["torch_fidelity_extractor"] = name
    from dimr_lab.eval.extractors import INCEPTION, file_digest

    if name == INCEPTION and weights:
        out["extractor_digest"] = file_digest(weights)  # which Inception weights (table compares)
    ref_stats = _load_reference_stats(eval_spec.reference_stats) if eval_spec.reference_stats else None
    if ref_stats is not None:
        out["reference"] = f"reference_stats:{eval_spec.reference_stats}"
        out["reference_digest"] = file_digest(eval_spec.reference_stats)  # which reference batch

    need_real = [m for m in wanted if m in ("kid", "prc", "fid_floor") or (m == "fid" and ref_stats is None)]
    real = None
    if need_real:
        if real_images is not None:
            real, source = _as_uint8_images(real_images, "real_images"), "given"
        elif DATASETS.meta(data_spec.name, "kind") == "pixels":
            k = eval_spec.reference_samples or eval_spec.samples
            real, source = _as_uint8_images(real_images_uint8(data_spec, k, seed=seed,
                                                              floor="fid_floor" in wanted), "real"), "test split"
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
            if ref_stats is not None:  # FID is against the statistics; these real images serve KID and prc
                out["reference_kid_prc"] = source
    out["num_real"] = 0 if real is None else len(real)

    kid_size = min(eval_spec.kid_subset_size, n, out["num_real"] or n)
    flags = {m: m in wanted and (m not in ("kid", "prc") or real is not None) for m in FIDELITY}
    if flags["kid"] and kid_size < 2:
        flags["kid"], out["skipped"]["kid"] = False, "fewer than 2 images"
    fid_from_stats = flags["fid"] and ref_stats is not None
    if fid_from_stats:
        flags["fid"] = False
    kwargs = dict(feature_extractor=name, feature_extractor_weights_path=weights, cuda=cuda,
                  # IS over 10 splits, fewer with under 100 samples: a split of one image always scores 1
                  batch_size=eval_spec.batch_size, kid_subset_size=kid_size, isc_splits=max(1, min(10, n // 10)),
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
    if "fid_floor" in wanted:
        out.update(_fid_floor(real, n, data_spec, seed, real_images is not None, kwargs))
    for m in wanted:  # a registered metric with no computation here is said to be skipped, never a silent null
        if OUTPUT_KEY.get(m, m) not in out and m not in out["skipped"]:
            out["skipped"][m] = "registered, but evaluate() (dimr_lab/eval/metrics.py) does not compute it"
    return out


def _fid_floor(real, n_samples: int, data_spec, seed: int, given: bool, kwargs: dict) -> dict:
    """FID between a second real set of the samples' count and the reference images: what the evaluation
    gives a perfect model with this extractor, this reference and this many samples (where the data has
    that many images besides the reference; fid_floor_samples says how many it took)."""
    import torch_fidelity

    if real is None or given:
        return {"fid_floor": None}
    other = _as_uint8_images(real_images_uint8(data_spec, n_samples, seed=seed, part=1, reference=len(real)), "real")
    if len(other) < 2:
        return {"fid_floor": None, "fid_floor_samples": len(other)}
    res = torch_fidelity.calculate_metrics(input1=_Uint8Images(other), input2=_Uint8Images(real), fid=True,
                                           **{**kwargs, "kid_subset_size": min(kwargs["kid_subset_size"], len(other),
                                                                               len(real))})
    return {"fid_floor": float(res[torch_fidelity.KEY_METRIC_FID]), "fid_floor_samples": len(other)}


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
