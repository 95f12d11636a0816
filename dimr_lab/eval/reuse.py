"""Samples kept by one evaluation, taken by another that would draw the same images.

An evaluation's name hashes every sample.* and eval.* setting (but a few), so measuring the same samples
another way (other metrics, another feature extractor, another KID subset size, ...) is a new evaluation.
Sampling is its costly part; when a finished evaluation of the same run at the same step drew exactly the
images the new one would, `evaluate_step` takes them from its per_sample.npz instead (`dimr-lab eval
--resample` refuses). Whether two evaluations draw the same images is decided by `same_samples`, from
the settings they record, never from their folder names.

A finished evaluation of M samples also lends its first N < M (`first_samples_of`) when it sampled in
chunks of the same eval.batch_size, with the same eval.compile, and N is a multiple of that size: sample i's
noise and label come from i alone (dimr_lab.eval.sampling) and the sampler is deterministic, so chunk
[s, s + b) is the same computation on the same batch in both. Otherwise the N-sample evaluation's last chunk
is a smaller batch than the one the larger evaluation sampled those indices in, and a batch of another shape
may round differently (matrix kernels are chosen by shape), so it is sampled anew.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

# The settings of the sample and eval sections that decide which images an evaluation of a checkpoint draws
# (see `same_samples`), and those that do not; every field of both sections is in exactly one of the two.
DECIDE_SAMPLES = {
    "sample": ("sampler", "steps", "order", "skip_type", "t_end", "guidance_scale", "guidance_form",
               "guidance_schedule", "guidance_power", "use_ema", "seed"),
    "eval": ("samples", "labels"),
}
DO_NOT_DECIDE_SAMPLES = {
    "sample": ("grid_size",),
    "eval": ("enabled", "batch_size", "compile", "steps", "feature_extractor", "inception_weights",
             "reference_stats", "reference_samples", "metrics", "classifier", "classifier_images",
             "distortion_threshold", "kid_subset_size"),
}
_MISSING = object()


def same_samples(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two evaluations' settings ({"sample": {...}, "eval": {...}}, as eval.json and metrics.json
    record them) draw the same images from the same checkpoint of a run.

    What decides the samples: the sampler and its time grid (sample.sampler, steps, order, skip_type,
    t_end), guidance (sample.guidance_scale, guidance_form, guidance_schedule, guidance_power), the weights
    sampled (sample.use_ema), the noise and the labels (sample.seed, eval.labels) and how many images are
    drawn (eval.samples). Sample i's noise and label come from its index alone, so the batch size, the
    number of processes and eval.compile change the images by float rounding only, as the device does (they
    are no part of an evaluation's name either). The rest of the eval section measures the images and
    leaves them as they are. The run (its network, data, diffusion process and precision) and the
    checkpoint's step are the caller's to match. A setting missing from either record counts as different.
    """
    for section, keys in DECIDE_SAMPLES.items():
        sa, sb = a.get(section), b.get(section)
        if not isinstance(sa, dict) or not isinstance(sb, dict):
            return False
        for k in keys:
            va, vb = sa.get(k, _MISSING), sb.get(k, _MISSING)
            if va is _MISSING or vb is _MISSING or va != vb:
                return False
    return True


def first_samples_of(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether the first b["eval"]["samples"] images of an evaluation with settings `a` (more samples) are, by
    construction, those an evaluation with settings `b` draws: the same samples but for their number, the same
    eval.batch_size and eval.compile, and b's number a multiple of the batch size (every chunk of b is a chunk
    of a; see the module's docstring)."""
    ea, eb = a.get("eval"), b.get("eval")
    if not isinstance(ea, dict) or not isinstance(eb, dict):
        return False
    na, nb, size = ea.get("samples"), eb.get("samples"), eb.get("batch_size")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (na, nb, size)) or na <= nb:
        return False
    if nb % size or ea.get("batch_size", _MISSING) != size \
            or ea.get("compile", _MISSING) != eb.get("compile", _MISSING):
        return False
    return same_samples({**a, "eval": {**ea, "samples": nb}}, b)


def sibling_sources(run: Any, step: int, ckpt_step: int, identity: str, settings: dict[str, Any],
                    exclude: Path) -> list[Any]:
    """Finished evaluations of `run` at `step` (checkpoint step `ckpt_step`, run identity `identity`) whose
    recorded settings draw the same samples as `settings` and that kept them (eval.enabled): the
    candidates to take samples from: those that drew exactly these samples by name, then those whose first
    samples are these (`first_samples_of`) by name."""
    out = []
    for ev in run.evaluations():
        if ev.path.parent != run.evals or ev.path == exclude or ev.step != step or not ev.serves(True):
            continue
        m = ev.metrics
        if m.get("enabled") is not True or m.get("checkpoint_step") != ckpt_step or m.get("identity") != identity:
            continue
        if same_samples(ev.settings, settings) and same_samples(m.get("settings") or {}, settings):
            out.append((0, ev))
        elif first_samples_of(ev.settings, settings) and first_samples_of(m.get("settings") or {}, settings):
            out.append((1, ev))
    return [ev for _, ev in sorted(out, key=lambda pair: pair[0])]


def npz_error(err: BaseException) -> str:
    """Why an .npz file did not read, in a phrase: numpy takes a file without the zip or .npy signature for a
    pickle and suggests loading it unsafely, which is no advice for a damaged file of ours."""
    if isinstance(err, ValueError) and "pickle" in str(err):
        return "not an .npz archive"
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


def load_stored_samples(path: Path, labels: np.ndarray, prefix: bool = False
                        ) -> tuple[np.ndarray, np.ndarray] | str:
    """(images uint8 (N, 3, H, W), labels (N,)) of a per_sample.npz when it reads whole and holds the N
    images with the given labels, in order, first (`prefix`: of more; else exactly those); else why not (one
    phrase)."""
    n = len(labels)
    try:
        with np.load(path, allow_pickle=False) as f:
            if "images" not in f.files or "labels" not in f.files:
                return "holds no images or labels"
            got_labels = f["labels"]
            images = f["images"]  # read whole: a damaged file fails its checksum here
    except FileNotFoundError:
        return "is missing"
    except Exception as err:  # a truncated or damaged archive
        return f"does not read ({npz_error(err)})"
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] != 3:
        return f"holds images of shape {images.shape} and type {images.dtype}, not (N, 3, H, W) uint8"
    if len(images) != len(got_labels) or (len(images) < n if prefix else len(images) != n):
        return f"holds {len(images)} images and {len(got_labels)} labels, not {'at least ' if prefix else ''}{n}"
    images, got_labels = images[:n], got_labels[:n]
    if not np.array_equal(got_labels, labels):
        return "holds other labels than these settings draw"
    return images, got_labels


def stored_samples(run: Any, step: int, ckpt_step: int, identity: str, settings: dict[str, Any], exclude: Path,
                   labels: np.ndarray, say: Callable[[str], None]) -> tuple[np.ndarray, np.ndarray, str] | None:
    """(images, labels, the evaluation's folder name) of the first sibling evaluation whose per_sample.npz
    holds the samples these settings draw (or begins with them: `first_samples_of`), or None (sample them);
    a sibling whose file does not serve is said in one line."""
    from dimr_lab.rundir import PER_SAMPLE

    for ev in sibling_sources(run, step, ckpt_step, identity, settings, exclude):
        got = load_stored_samples(ev.path / PER_SAMPLE, labels,
                                  prefix=not same_samples(ev.settings, settings))
        if isinstance(got, str):
            say(f"{ev.path / PER_SAMPLE}: {got}; not taking the samples from it")
            continue
        return got[0], got[1], ev.name
    return None
