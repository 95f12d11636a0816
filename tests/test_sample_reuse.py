"""An evaluation that differs from a finished one only in how the samples are measured takes that one's
samples (per_sample.npz) instead of sampling again; other sampling settings, --resample or a damaged file
sample anew."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import classifiers_from_store, classifiers_to_store, cli
from dimr_lab.eval.reuse import DECIDE_SAMPLES, DO_NOT_DECIDE_SAMPLES, same_samples
from dimr_lab.spec.run_spec import OUTSIDE_EVAL_IDENTITY, EvalSpec, SampleSpec, load_run_spec
from dimr_lab.spec.schema import to_dict


def test_every_sample_and_eval_setting_is_classified_once():
    """A new sample.* or eval.* field must be put in DECIDE_SAMPLES or DO_NOT_DECIDE_SAMPLES: otherwise an
    evaluation could take samples drawn with another value of it."""
    for section, cls in (("sample", SampleSpec), ("eval", EvalSpec)):
        fields = {f.name for f in dataclasses.fields(cls)}
        decide, other = set(DECIDE_SAMPLES[section]), set(DO_NOT_DECIDE_SAMPLES[section])
        assert not decide & other, section
        assert decide | other == fields, (section, fields ^ (decide | other))
    assert set(DECIDE_SAMPLES) == set(DO_NOT_DECIDE_SAMPLES) == {"sample", "eval"}
    # what an evaluation's name leaves out cannot decide its samples (two would share a folder)
    for section, keys in OUTSIDE_EVAL_IDENTITY.items():
        assert set(keys) <= set(DO_NOT_DECIDE_SAMPLES[section])


def _other(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    return [*value, "x"]


def test_same_samples_follows_the_classification():
    base = {k: to_dict(v) for k, v in (("sample", SampleSpec()), ("eval", EvalSpec()))}
    assert same_samples(base, json.loads(json.dumps(base)))  # as read back from eval.json
    for section in ("sample", "eval"):
        for key in (*DECIDE_SAMPLES[section], *DO_NOT_DECIDE_SAMPLES[section]):
            changed = json.loads(json.dumps(base))
            changed[section][key] = _other(changed[section][key])
            assert same_samples(base, changed) is (key in DO_NOT_DECIDE_SAMPLES[section]), f"{section}.{key}"
        for key in DECIDE_SAMPLES[section]:  # a record without the setting (an older one) is not trusted
            missing = json.loads(json.dumps(base))
            del missing[section][key]
            assert not same_samples(missing, base) and not same_samples(base, missing), f"{section}.{key}"
    assert not same_samples(base, {"sample": base["sample"]})


TINY = [("model.preset", "dimr_tiny_2r"), ("model.branches", [{"width": 32, "depth": 2, "heads": 2},
                                                               {"width": 16, "depth": 1}]),
        ("data.train_size", 96), ("train.batch_size", 8), ("train.lr", 1e-3), ("train.warmup_steps", 3),
        ("train.ema_decay", 0.9), ("train.log_every", 1), ("train.steps", 4), ("train.checkpoint_every", 2),
        ("sample.steps", 2), ("sample.grid_size", 4), ("eval.samples", 16), ("eval.batch_size", 8),
        ("eval.metrics", ["fid", "sample_accuracy"])]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, classifier_store):
    """A tiny run trained 4 steps, with its own evaluation (16 samples, FID and sample accuracy), and the
    classifier cache it measured them with (the session's classifier where an earlier test trained it)."""
    from dimr_lab.train.trainer import train_run

    root = tmp_path_factory.mktemp("reuse")
    classifiers_from_store(classifier_store, root / "cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DIMR_LAB_CACHE", str(root / "cache"))
        train_run(load_run_spec(None, TINY), root / "run", progress=False)
    classifiers_to_store(root / "cache", classifier_store)
    (own,) = (root / "run" / "evals").iterdir()
    return root, own.name


@pytest.fixture
def run(trained, tmp_path, monkeypatch):
    root, _ = trained
    monkeypatch.setenv("DIMR_LAB_CACHE", str(root / "cache"))
    shutil.copytree(root / "run", tmp_path / "run")
    return tmp_path / "run"


def _own(trained, run: Path) -> tuple[dict, dict]:
    d = run / "evals" / trained[1]
    return json.loads((d / "metrics.json").read_text()), dict(np.load(d / "per_sample.npz"))


def _no_sampling(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("sampled although the samples were kept")

    monkeypatch.setattr("dimr_lab.eval.sampling.generate", refuse)


def _counting(monkeypatch) -> dict:
    from dimr_lab.eval import sampling

    calls = {"n": 0}
    real = sampling.generate

    def counted(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr("dimr_lab.eval.sampling.generate", counted)
    return calls


@pytest.mark.parametrize("override", [("eval.metrics", ["fid"]), ("eval.kid_subset_size", 8)])
def test_measuring_the_same_samples_another_way_takes_them(trained, run, monkeypatch, override):
    from dimr_lab.eval.command import evaluate_run

    own, own_samples = _own(trained, run)
    _no_sampling(monkeypatch)
    lines = []
    (res,) = evaluate_run(run, overrides=[override], log=lines.append)
    assert res["eval_name"] != own["eval_name"]  # a new evaluation, under its own name
    assert res["samples_from"] == own["eval_name"] and res["sampled_now"] == 0
    assert res["fid"] == own["fid"]
    assert res.get("sample_accuracy", own["sample_accuracy"]) == own["sample_accuracy"]
    assert any(own["eval_name"] in line for line in lines)
    d = run / "evals" / res["eval_name"]
    assert json.loads((d / "metrics.json").read_text())["samples_from"] == own["eval_name"]
    kept = np.load(d / "per_sample.npz")
    assert np.array_equal(kept["images"], own_samples["images"]) and np.array_equal(kept["labels"],
                                                                                    own_samples["labels"])
    assert (d / "samples.png").is_file() and not (d / "chunks").exists()


@pytest.mark.parametrize("override", [("sample.seed", 3), ("sample.steps", 3), ("eval.samples", 12),
                                      ("eval.samples", 32)])
def test_other_samples_are_sampled(trained, run, monkeypatch, override):
    """Other sampling settings, more samples than the finished evaluation kept, or fewer whose last chunk would
    be a smaller batch than the one they were drawn in (12 of 16 in chunks of 8): sampled anew."""
    from dimr_lab.eval.command import evaluate_run

    own, _ = _own(trained, run)
    calls = _counting(monkeypatch)
    (res,) = evaluate_run(run, overrides=[override, ("eval.metrics", ["fid"])])
    assert calls["n"] > 0 and res["samples_from"] is None and res["sampled_now"] == res["samples"]


def test_resample_refuses_the_kept_samples_and_samples_the_same_images(trained, run, monkeypatch, capsys):
    own, own_samples = _own(trained, run)
    calls = _counting(monkeypatch)
    code, out, err = cli(["eval", run, "--set", 'eval.metrics=["fid"]', "--resample", "--json"], capsys)
    assert code == 0, err
    res = json.loads(out)
    assert calls["n"] > 0 and res["samples_from"] is None and res["sampled_now"] == 16
    # the samples it would have taken are the ones it made (the same settings, the same CPU)
    made = np.load(run / "evals" / res["eval_name"] / "per_sample.npz")
    assert np.array_equal(made["images"], own_samples["images"]) and res["fid"] == own["fid"]
    # asked again, the evaluation is made: kept, and said so (it read as if sampled anew)
    calls["n"] = 0
    code, out, err = cli(["eval", run, "--set", 'eval.metrics=["fid"]', "--resample"], capsys)
    assert code == 0 and calls["n"] == 0 and out.startswith(f"{res['eval_name']}: "), err
    assert f"{res['eval_name']}: evaluated before with these settings, kept as it is" in err, err


@pytest.mark.parametrize("damage", ["truncate", "short", "not_npz"])
def test_a_damaged_or_short_store_is_sampled_again_and_said(trained, run, monkeypatch, capsys, damage):
    from dimr_lab.eval.command import evaluate_run

    own, own_samples = _own(trained, run)
    path = run / "evals" / own["eval_name"] / "per_sample.npz"
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "not_npz":  # numpy reads it as a pickle and advised loading it unsafely
        path.write_text("overwritten by something else\n")
        code, _, err = cli(["distortion", path.parent], capsys)
        assert code == 2 and f"{path}: not readable (not an .npz archive)" in err and "pickle" not in err, err
    else:
        np.savez_compressed(path, images=own_samples["images"][:10], labels=own_samples["labels"][:10])
    calls = _counting(monkeypatch)
    lines = []
    (res,) = evaluate_run(run, overrides=[("eval.metrics", ["fid"])], log=lines.append)
    assert calls["n"] > 0 and res["samples_from"] is None and res["sampled_now"] == 16
    said = [line for line in lines if str(path) in line]
    assert len(said) == 1 and {"truncate": "does not read (", "short": "holds 10 images",
                               "not_npz": "does not read (not an .npz archive)"}[damage] in said[0], said
    assert res["fid"] == own["fid"]


def _reuse_worker(rank: int, world: int, port: int, run: str, cache: str) -> None:
    import os

    import torch

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DIMR_LAB_CACHE=cache)
    torch.set_num_threads(1)
    from dimr_lab.eval import sampling
    from dimr_lab.eval.command import evaluate_run

    def refuse(*a, **k):
        raise AssertionError(f"rank {rank} sampled although the samples were kept")

    sampling.generate = refuse
    evaluate_run(run, overrides=[("eval.metrics", ["fid"])])


@pytest.mark.timeout(300)
def test_every_process_of_a_job_follows_rank_0s_decision(trained, run):
    import socket

    import torch

    own, _ = _own(trained, run)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_reuse_worker, args=(2, port, str(run), str(trained[0] / "cache")), nprocs=2,
                                join=True)
    (new,) = [p for p in (run / "evals").iterdir() if p.name != own["eval_name"]]
    res = json.loads((new / "metrics.json").read_text())
    assert res["samples_from"] == own["eval_name"] and res["world_size"] == 2 and res["fid"] == own["fid"]


@pytest.mark.parametrize("how", ["eval_only", "train"])
def test_run_resample_reaches_the_evaluations_of_a_planned_run(trained, run, monkeypatch, how):
    """`run --resample` hands resample=True to the trainer (`run`) or to evaluate_planned (`run --eval-only`):
    their evaluations sample anew where they would have taken a sibling's samples."""
    from dimr_lab.eval.command import evaluate_planned
    from dimr_lab.train.trainer import train_run

    own, own_samples = _own(trained, run)
    spec = load_run_spec(None, [*TINY, ("eval.metrics", ["fid"])])
    calls = _counting(monkeypatch)
    if how == "eval_only":
        res = evaluate_planned(spec, run, resample=True)
    else:
        res = train_run(spec, run, progress=False, resample=True)
    assert calls["n"] > 0 and res["samples_from"] is None and res["sampled_now"] == 16
    made = np.load(run / "evals" / res["eval_name"] / "per_sample.npz")
    assert np.array_equal(made["images"], own_samples["images"]) and res["fid"] == own["fid"]


def test_evaluations_without_training_are_sessions_of_the_run(trained, run, monkeypatch, capsys):
    """`dimr-lab eval` records each call that evaluates something in sessions.json (kind "eval"): done,
    stopped or failed; one with nothing to make records nothing. `status` counts them and their time and says
    so plainly; a later training session still reads as a continuation of the finished training."""
    from dimr_lab.eval.command import evaluate_run
    from dimr_lab.runner.status import format_duration
    from dimr_lab.train.trainer import train_run

    def rows():
        return json.loads((run / "sessions.json").read_text())["sessions"]

    assert [(r["kind"], r["outcome"]) for r in rows()] == [("start", "done")]
    code, out, err = cli(["eval", run, "--set", 'eval.metrics=["fid"]'], capsys)
    assert code == 0, err
    assert [(r["kind"], r["outcome"]) for r in rows()] == [("start", "done"), ("eval", "done")]
    assert (rows()[-1]["from_step"], rows()[-1]["to_step"]) == (4, 4) and rows()[-1]["last"] > rows()[-1]["started"]
    assert cli(["eval", run, "--set", 'eval.metrics=["fid"]'], capsys)[0] == 0  # made before: no session
    assert len(rows()) == 2

    (res,) = evaluate_run(run, overrides=[("sample.seed", 5)], should_stop=lambda: True)
    assert res["interrupted"] and rows()[-1]["outcome"] == "stopped"

    def broken(*a, **k):
        raise RuntimeError("the device fell over")

    monkeypatch.setattr("dimr_lab.eval.sampling.generate", broken)
    with pytest.raises(RuntimeError, match="fell over"):
        evaluate_run(run, overrides=[("sample.seed", 6)])
    monkeypatch.undo()
    monkeypatch.setenv("DIMR_LAB_CACHE", str(trained[0] / "cache"))
    assert [(r["kind"], r["outcome"]) for r in rows()] == [("start", "done"), ("eval", "done"), ("eval", "stopped"),
                                                           ("eval", "failed")]
    data = json.loads((run / "sessions.json").read_text())
    wall = sum(r["last"] - r["started"] for r in data["sessions"])
    evals = sum(r["last"] - r["started"] for r in data["sessions"][1:])
    assert (data["evaluations"], data["restarts"], data["continuations"]) == (3, 0, 0)
    assert data["wall_s"] == pytest.approx(wall, abs=1e-3) and data["eval_wall_s"] == pytest.approx(evals, abs=1e-3)

    code, out, _ = cli(["status", run, "--json"], capsys)
    st = json.loads(out)
    assert code == 0 and (st["sessions"], st["restarts"], st["continuations"], st["evaluations"]) == (4, 0, 0, 3)
    assert st["wall_s"] == data["wall_s"] and st["eval_wall_s"] == data["eval_wall_s"]
    monkeypatch.setenv("COLUMNS", "250")
    code, out, _ = cli(["status", run], capsys)
    assert code == 0 and f"3 evaluation sessions, {format_duration(data['wall_s'])} over 4 sessions" in out, out
    assert "resumed" not in out

    # trained on to more steps after a failed evaluation: a continuation of the finished training, no restart
    train_run(load_run_spec(None, [*TINY, ("train.steps", 6), ("eval.enabled", False)]), run, progress=False)
    assert [r["kind"] for r in rows()] == ["start", "eval", "eval", "eval", "continue"]


def test_the_first_samples_of_a_larger_evaluation_are_a_fresh_smaller_ones_bit_for_bit(trained, run, monkeypatch):
    """8 of the 16 samples (chunks of 8): taken from the larger evaluation, and exactly the images, labels and
    metrics a fresh 8-sample evaluation makes (fails if a sample's noise or label depended on eval.samples).
    In chunks of 4 the larger evaluation (chunks of 8) is no source: sampled anew."""
    from dimr_lab.eval.command import evaluate_run

    own, own_samples = _own(trained, run)
    fresh_run, chunks_of_4 = run.parent / "fresh", run.parent / "chunks_of_4"
    shutil.copytree(run, fresh_run)
    shutil.copytree(run, chunks_of_4)
    shutil.rmtree(fresh_run / "evals" / own["eval_name"])  # no source there: sampled
    calls = _counting(monkeypatch)
    (fresh,) = evaluate_run(fresh_run, overrides=[("eval.samples", 8)])
    assert calls["n"] > 0 and fresh["samples_from"] is None
    calls["n"] = 0
    lines = []
    (taken,) = evaluate_run(run, overrides=[("eval.samples", 8)], log=lines.append)
    assert calls["n"] == 0 and taken["samples_from"] == own["eval_name"] and taken["sampled_now"] == 0
    assert any(own["eval_name"] in line for line in lines)
    a = np.load(fresh_run / "evals" / fresh["eval_name"] / "per_sample.npz")
    b = np.load(run / "evals" / taken["eval_name"] / "per_sample.npz")
    assert np.array_equal(a["images"], b["images"]) and np.array_equal(a["labels"], b["labels"])
    assert np.array_equal(b["images"], own_samples["images"][:8])
    assert (taken["fid"], taken["sample_accuracy"]) == (fresh["fid"], fresh["sample_accuracy"])

    (other,) = evaluate_run(chunks_of_4, overrides=[("eval.samples", 8), ("eval.batch_size", 4)])
    assert calls["n"] > 0 and other["samples_from"] is None


def test_each_sample_seed_draws_its_own_noise_and_seed_0_keeps_the_index_stream():
    """torch's CPU generator keeps a seed's low 32 bits: a seed packed above the index was dropped and every
    sample.seed drew the same noise. Seed 0 stays the noise of every evaluation made so far (a generator
    seeded with the index), other seeds differ, and no two samples of one seed, nor of seeds 0-9999 over
    100K samples, share a generator seed."""
    import torch

    from dimr_lab.eval.sampling import noise_for, sample_seed

    idx = np.arange(6)
    zero = noise_for(idx, (3, 4, 4), 0)
    for i in idx:  # the stream evaluations have always used for seed 0, computed here by hand
        assert torch.equal(zero[i], torch.randn((3, 4, 4), generator=torch.Generator().manual_seed(int(i))))
    others = [noise_for(idx, (3, 4, 4), s) for s in (1, 2, 2**32 - 1)]
    for a in [zero, *others]:
        for b in [zero, *others]:
            if a is not b:
                assert not torch.isclose(a, b).any()  # a different draw in every element
    assert torch.equal(others[1], noise_for(idx, (3, 4, 4), 2))  # and the same seed the same draw
    n = 100_000
    seeds = np.array([sample_seed(s, 0) for s in range(10_000)], dtype=np.int64)
    assert all(sample_seed(s, i) == (seeds[s] + i) % 2**32 for s in (0, 7, 9999) for i in (0, 1, n - 1))
    ring = np.sort(seeds)
    gaps = np.diff(np.concatenate([ring, [ring[0] + 2**32]]))
    assert gaps.min() > n  # each seed's n generator seeds run up to the next seed's first: disjoint


def test_frequency_labels_follow_the_class_counts_by_index_and_seed():
    """eval.labels = 'frequency': sample i's label depends on (sample.seed, i) only (any chunking gives the same
    labels), follows the training set's class proportions, never draws a class without images, and another
    sample.seed draws other labels; 'balanced' is i mod K whatever the seed."""
    import torch

    from dimr_lab.eval.sampling import labels_for

    counts = np.array([600, 300, 0, 100])
    n = 20_000
    whole = labels_for(np.arange(n), 4, rule="frequency", seed=0, class_counts=counts)
    parts = torch.cat([labels_for(np.arange(s, min(s + 333, n)), 4, rule="frequency", seed=0, class_counts=counts)
                       for s in range(0, n, 333)])
    assert torch.equal(whole, parts)
    share = np.bincount(whole.numpy(), minlength=4) / n
    assert share[2] == 0 and np.allclose(share, counts / counts.sum(), atol=0.015)
    others = [labels_for(np.arange(n), 4, rule="frequency", seed=s, class_counts=counts) for s in (1, 2**32 - 1)]
    assert all((o != whole).float().mean() > 0.3 for o in others) and (others[0] != others[1]).float().mean() > 0.3
    assert torch.equal(labels_for(np.arange(10), 4, seed=5), torch.arange(10) % 4)
