"""Evaluate a run's checkpoint at one step with given sampling/evaluation settings.

    evals/step-00000600-<hash of the sample and eval settings>/
        eval.json        the step and the settings (written first)
        chunks/          samples in chunks of eval.batch_size, written as they are made (deleted at the end)
        samples.png      the first sample.grid_size samples, labelled
        per_sample.npz   the evaluated samples with their labels and class probabilities (not committed)
        metrics.json     written last: the metrics beside the settings; its presence means done

Every process of a job samples the chunks c with c mod world_size == rank; sample i's noise and label
come from its index (dimr_lab.eval.sampling), so the samples do not depend on the number of processes,
and an interrupted evaluation (a stop request, a preemption, a kill) resumes at the first missing chunk.
Rank 0 gathers the chunks from the run folder and computes the metrics.

A finished evaluation of the same step that drew the same samples (other metrics, say), or more of them in
chunks of the same size, lends them from its per_sample.npz instead of sampling again (dimr_lab.eval.reuse;
metrics.json names it as samples_from).
"""

from __future__ import annotations

import io
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from dimr_lab import dist as distributed
from dimr_lab.atomic import atomic_write, make_dirs
from dimr_lab.errors import UserError
from dimr_lab.rundir import (CHUNKS, METRICS, PER_SAMPLE, SAMPLES, RunDir, eval_name, jsonable, read_evaluation,
                             remove_stale_temporaries, write_eval_record, write_json)

EVAL_SECTIONS = ("sample", "eval")


def eval_settings(spec: Any) -> dict[str, Any]:
    """The resolved sample and eval sections, as eval.json and metrics.json record them."""
    from dimr_lab.spec.schema import to_dict

    return {k: to_dict(getattr(spec, k)) for k in EVAL_SECTIONS}


def check_eval_overrides(overrides: list[tuple[str, Any]]) -> None:
    """Only sample.* and eval.* keys change an evaluation; anything else would be another run."""
    from dimr_lab.errors import SpecError

    for key, _ in overrides:
        if key.split(".", 1)[0] not in EVAL_SECTIONS:
            raise SpecError("an evaluation takes only sample.* and eval.* keys (the run's training is fixed)",
                            file="--set", key=key)


def _chunk_path(chunks: Path, start: int, end: int) -> Path:
    return chunks / f"chunk-{start:09d}-{end:09d}.npz"


def _save_chunk(path: Path, images: torch.Tensor, labels: torch.Tensor) -> None:
    buf = io.BytesIO()
    np.savez(buf, images=images.numpy(), labels=labels.numpy())
    try:
        atomic_write(path, lambda f: f.write(buf.getvalue()))
    except OSError as err:
        raise UserError(f"{path}: cannot write samples ({err.strerror or err})") from None


def _load_chunk(path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as f:
            return f["images"], f["labels"]
    except Exception:  # a damaged chunk is made again
        return None


def class_counts(spec: Any) -> np.ndarray | None:
    """The training set's class counts for eval.labels = 'frequency' (None for 'balanced'); a SpecError for a
    dataset that does not list its labels (drawing balanced labels instead would contradict the record)."""
    if spec.eval.labels != "frequency":
        return None
    from dataclasses import replace

    from dimr_lab.data import build_dataset
    from dimr_lab.errors import SpecError

    ds = build_dataset(replace(spec.data, flip=False), split="train")
    labels = getattr(ds, "labels", None)
    if labels is None:
        raise SpecError(f"'frequency' draws labels in proportion to the training set's class counts, which a "
                        f"{spec.data.name!r} dataset does not list; use 'balanced'", key="eval.labels")
    return np.bincount(np.asarray(labels), minlength=ds.num_classes)


def within_time_limit(should_stop: Callable[[], bool] | None, limit_s: float, t0: float
                      ) -> Callable[[], bool] | None:
    """should_stop, or also the wall time since t0 (time.perf_counter()) passing limit_s when limit_s > 0
    (train.time_limit_s: a job's evaluations stop between chunks as its training stops between steps)."""
    if not limit_s > 0:
        return should_stop
    return lambda: bool(should_stop and should_stop()) or time.perf_counter() - t0 > limit_s


def evaluate_step(spec: Any, run: RunDir, step: int, *, info: distributed.DistInfo | None = None,
                  should_stop: Callable[[], bool] | None = None, log: Callable[[str], None] | None = None,
                  progress: Callable[[int, int], None] | None = None, train_info: dict | None = None,
                  resample: bool = False) -> dict[str, Any] | None:
    """Evaluate the checkpoint at `step` with spec.sample/spec.eval: the metrics dict (also when done
    before), or None when a stop request ended it early (its chunks stay; the same call resumes). should_stop
    is asked after each round of chunks, so every call makes at least one round. The samples are taken from a
    finished evaluation of the same step that drew the same ones (dimr_lab.eval.reuse) unless `resample`;
    metrics.json names it as samples_from."""
    from dimr_lab.eval import cache_dir, evaluate
    from dimr_lab.eval.sampling import data_classes, generate, labels_for, load_run_model, to_uint8
    from dimr_lab.images import write_grid

    info = info or distributed.setup()
    ehash = spec.eval_hash()
    d = run.eval_dir(step, ehash)
    done = read_evaluation(d) if d.is_dir() else None
    if done is not None and done.serves(spec.eval.enabled):
        if resample and log is not None and info.main:  # not sampled anew: said, the result is the kept one
            log(f"{d.name}: evaluated before with these settings, kept as it is (--resample samples anew only "
                f"for an evaluation still to make)")
        return done.metrics
    # a sample grid made with evaluation off is replaced by the full evaluation (its metrics.json, at the end)
    if spec.eval.compile:  # before anything is written
        from dimr_lab.spec.preflight import check_compiler

        check_compiler(spec, info.device, keys=("eval.compile",))
    device = info.device
    # the checkpoint, the Inception weights and the label counts are read before anything is written: a
    # damaged file leaves no evaluation folder behind
    from dimr_lab.eval.extractors import check_inception_weights

    check_inception_weights(spec.eval)
    model, _, ckpt_step = load_run_model(run.path, step=step, ema=spec.sample.use_ema, device=device)
    classes = data_classes(spec)
    counts = class_counts(spec)
    settings = eval_settings(spec)
    chunks = d / CHUNKS
    if info.main:
        make_dirs(d)  # its entry in evals/ outlives a power loss with the metrics written into it
        remove_stale_temporaries(d)
        remove_stale_temporaries(chunks)
        write_eval_record(d, step, ehash, settings, str(run.checkpoint_for(step) or ""))
    distributed.barrier(info)

    if spec.eval.compile:
        model.compile_blocks()  # one graph per kind of block; guidance's doubled batch is one shape
    n = spec.eval.samples if spec.eval.enabled else spec.sample.grid_size
    size = spec.eval.batch_size
    bounds = [(s, min(s + size, n)) for s in range(0, n, size)]
    t0 = time.perf_counter()
    stored = None  # (images, labels, the evaluation they come from), read by rank 0
    if spec.eval.enabled and not resample and info.main:
        from dimr_lab.eval.reuse import stored_samples

        want = labels_for(np.arange(n), classes, rule=spec.eval.labels, seed=spec.sample.seed,
                          class_counts=counts).numpy()
        stored = stored_samples(run, step, ckpt_step, spec.identity_hash(), settings, d, want, _say(log))
        if stored is not None and log is not None:
            log(f"taking the {n} samples of step {step} from {stored[2]}, which drew the same ones or began "
                f"with them (--resample samples them anew)")
    sampling = distributed.any_flag(info, info.main and stored is None)  # rank 0's decision, on every rank
    made = 0
    rounds = -(-len(bounds) // info.world_size) if sampling else 0
    for r in range(rounds):
        c = r * info.world_size + info.rank
        if c < len(bounds):
            start, end = bounds[c]
            path = _chunk_path(chunks, start, end)
            if not (path.exists() and _load_chunk(path) is not None):
                idx = np.arange(start, end)
                labels = labels_for(idx, classes, rule=spec.eval.labels, seed=spec.sample.seed, class_counts=counts)
                x = generate(model, spec, idx, labels)
                chunks.mkdir(parents=True, exist_ok=True)
                _save_chunk(path, to_uint8(x, spec.data), labels)
                made += end - start
        if progress is not None and info.main:
            progress(min(n, (r + 1) * info.world_size * size), n)
        stop = bool(should_stop and should_stop())
        if distributed.any_flag(info, stop) and r < rounds - 1:
            return None
    sample_s = time.perf_counter() - t0
    distributed.barrier(info)
    if not info.main:
        distributed.barrier(info)
        return {"rank": info.rank}

    if stored is not None:
        images_t, labels_t = torch.from_numpy(stored[0]), torch.from_numpy(stored[1])
    else:
        images, labels = [], []
        for start, end in bounds:
            got = _load_chunk(_chunk_path(chunks, start, end))
            if got is None:
                raise UserError(f"{chunks}: samples {start}..{end} are missing or damaged; run the evaluation again")
            images.append(torch.from_numpy(got[0]))
            labels.append(torch.from_numpy(got[1]))
        images_t, labels_t = torch.cat(images), torch.cat(labels)
    class_names = _class_names(spec)
    write_grid(images_t[: spec.sample.grid_size], d / SAMPLES, labels_t[: spec.sample.grid_size].tolist(),
               class_names)
    t1 = time.perf_counter()
    results: dict[str, Any] = {}
    if spec.eval.enabled:
        if log is not None:
            log(f"evaluating {n} samples of step {step} ({', '.join(spec.eval.metrics)})")
        results = dict(evaluate(images_t, labels_t, spec.data, spec.eval, cache_dir=cache_dir(), seed=0, log=log))
        per_sample = {k: np.asarray(results.pop(k)) for k in list(results) if isinstance(results[k], np.ndarray)}
        buf = io.BytesIO()
        np.savez_compressed(buf, labels=labels_t.numpy(), images=images_t.numpy(), **per_sample)
        atomic_write(d / PER_SAMPLE, lambda f: f.write(buf.getvalue()))
        if "class_prob" in per_sample:
            from dimr_lab.eval.distortion import distortion_report

            distortion_report(d, threshold=spec.eval.distortion_threshold, class_names=class_names)
        results.setdefault("kid", results.get("kid_mean"))
        results.setdefault("isc", results.get("isc_mean"))
    eval_s = time.perf_counter() - t1
    metrics = _metrics_record(spec, step, ckpt_step, ehash, settings, results, info, n, made, sample_s, eval_s,
                              train_info or {}, samples_from=stored[2] if stored is not None else None)
    write_json(d / METRICS, metrics)
    shutil.rmtree(chunks, ignore_errors=True)
    distributed.barrier(info)
    return metrics


def _metrics_record(spec: Any, step: int, ckpt_step: int, ehash: str, settings: dict, results: dict,
                    info: distributed.DistInfo, n: int, made: int, sample_s: float, eval_s: float,
                    train_info: dict, samples_from: str | None = None) -> dict[str, Any]:
    from dimr_lab.provenance import git_commit, machine, versions

    keys = ("fid", "kid", "isc", "precision", "recall", "sample_accuracy", "distortion_rate", "fid_floor")
    metrics: dict[str, Any] = {k: results.get(k) for k in keys if k in results or k in spec.eval.metrics}
    metrics.update({k: v for k, v in results.items() if k not in metrics})
    nfe = spec.sample.steps * (2 if spec.sample.guidance_scale != (0.0 if spec.sample.guidance_form == "uvit" else 1.0)
                               else 1)
    metrics.update({
        "step": step, "checkpoint_step": ckpt_step, "steps": step, "eval_hash": ehash, "eval_name": eval_name(step, ehash),
        "identity": spec.identity_hash(), "enabled": spec.eval.enabled, "samples": n, "settings": settings,
        "sample_s": sample_s, "eval_s": eval_s, "sampled_now": made, "samples_from": samples_from,
        "sample_images_per_s": made / sample_s if made and sample_s > 0 else None,
        "nfe_per_sample": nfe, "device": str(info.device), "world_size": info.world_size,
        **train_info, "versions": versions(), "machine": machine(),
        **{f"git_{k}": v for k, v in git_commit().items()},
    })
    return jsonable(metrics)


def _say(log: Callable[[str], None] | None) -> Callable[[str], None]:
    """Where a line about the evaluation goes: `log`, else stderr (a line that must not be lost)."""
    if log is not None:
        return log
    import sys

    return lambda line: print(f"[dimr-lab] {line}", file=sys.stderr, flush=True)


def _class_names(spec: Any) -> list[str] | None:
    """The dataset's class names where cheap to know (built-in datasets), else None (numbers)."""
    if spec.data.name == "shapes":
        from dimr_lab.data.shapes import SHAPE_NAMES

        return list(SHAPE_NAMES)
    if spec.data.name == "digits":
        return [str(i) for i in range(10)]
    return None


def train_summary(run: RunDir, step: int, spec: Any) -> dict[str, Any]:
    """What an evaluation records of the training behind it: params, GMACs, loss and speed up to `step`."""
    from dimr_lab.nn.describe import counts_for

    rows = [r for r in run.log_rows() if isinstance(r.get("step"), int) and r["step"] <= step]
    speeds = [r["images_per_s"] for r in rows if isinstance(r.get("images_per_s"), (int, float))]
    c = counts_for(spec.model) or {}
    return {"params": c.get("params"), "gmacs": c.get("gmacs"),
            "final_loss": rows[-1].get("loss") if rows else None,
            "train_images_per_s": sum(speeds) / len(speeds) if speeds else None,
            "images_seen": step * spec.train.batch_size}
