"""A run's life after training: continued to more steps, kept checkpoints, evaluated again without training,
evaluations shared by processes and resumed after a stop; the one training-step path."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from dimr_lab.spec.run_spec import load_run_spec
from conftest import classifiers_from_store, classifiers_to_store, cli, tiny_evaluated_ablation

TINY = [("model.preset", "dimr_tiny_2r"), ("model.branches", [{"width": 32, "depth": 2, "heads": 2},
                                                               {"width": 16, "depth": 1}]),
        ("data.train_size", 96), ("train.batch_size", 8), ("train.lr", 1e-3), ("train.warmup_steps", 3),
        ("train.ema_decay", 0.9), ("train.log_every", 1), ("sample.steps", 2), ("sample.grid_size", 4),
        ("eval.enabled", False)]


def spec(steps: int, *more):
    return load_run_spec(None, [*TINY, ("train.steps", steps), ("train.checkpoint_every", 2), *more])


def ckpt(run: Path, name: str = "last.pt") -> dict:
    return torch.load(run / "checkpoints" / name, map_location="cpu", weights_only=True)


def same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def train(s, out, **kw):
    from dimr_lab.train.trainer import train_run

    return train_run(s, out, progress=False, **kw)


def test_a_run_continued_to_2n_equals_one_trained_to_2n(tmp_path):
    train(spec(6), tmp_path / "direct")
    train(spec(3), tmp_path / "cont")
    first = json.loads((tmp_path / "cont" / "spec.json").read_text())["identity"]
    train(spec(6), tmp_path / "cont")  # the same command with more steps continues the run
    assert json.loads((tmp_path / "cont" / "spec.json").read_text())["identity"] == first
    a, b = ckpt(tmp_path / "direct"), ckpt(tmp_path / "cont")
    assert a["step"] == b["step"] == 6
    same_state(a["model"], b["model"])
    same_state(a["ema"], b["ema"])
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        same_state(sa, sb)
    assert torch.equal(a["rng"]["noise"], b["rng"]["noise"]) and a["data_position"] == b["data_position"]
    # both steps are evaluated (the run's end at 3 stays), the losses line up row for row
    assert sorted(p.name.split("-")[1] for p in (tmp_path / "cont" / "evals").iterdir()) == ["00000003", "00000006"]
    la = [json.loads(x)["loss"] for x in (tmp_path / "direct" / "log.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (tmp_path / "cont" / "log.jsonl").read_text().splitlines()]
    assert la == lb
    # the record and `status` follow the continued run (they kept saying step 3 of 3)
    from dimr_lab.runner.status import collect

    assert json.loads((tmp_path / "cont" / "run.json").read_text())["spec"]["train"]["steps"] == 6
    (st,) = collect(tmp_path / "cont")
    assert (st.state, st.step, st.steps) == ("done", 6, 6)


def test_a_resumed_run_logs_the_rows_of_an_uninterrupted_one(tmp_path):
    # rows every 4 steps; stopped after step 6, in the middle of a window, and resumed
    more = (("train.log_every", 4),)
    train(spec(10, *more), tmp_path / "direct")
    asked = iter(range(100))
    stopped = train(spec(10, *more), tmp_path / "cont", should_stop=lambda: next(asked) == 6)
    assert stopped == {"interrupted": True, "step": 6}
    train(spec(10, *more), tmp_path / "cont")

    def rows(run):
        return [(r["step"], r["loss"], r["loss_branches"])
                for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())]

    assert [r[0] for r in rows(tmp_path / "direct")] == [1, 4, 8, 10]
    assert rows(tmp_path / "cont") == rows(tmp_path / "direct")


def test_a_refused_continuation_leaves_the_records_as_they_were(tmp_path, capsys):
    out = tmp_path / "run"
    train(spec(6), out)
    before = {p: (out / p).read_bytes() for p in ("run.json", "spec.json", "log.jsonl")}
    from dimr_lab.errors import UserError

    with pytest.raises(UserError, match="step 5 was not kept"):
        train(spec(5), out)
    assert {p: (out / p).read_bytes() for p in before} == before


def test_tensorboard_drops_what_a_killed_session_logged_after_its_checkpoint(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, tb = tmp_path / "run", ("track.tensorboard", True)
    train(spec(6, tb, ("train.keep_checkpoints", [4]), ("train.checkpoint_every", 4)), out)
    # as if killed after logging step 6 but before its checkpoint: last.pt is step 4's again
    (out / "checkpoints" / "last.pt").unlink()
    (out / "checkpoints" / "last.pt").write_bytes((out / "checkpoints" / "step-00000004.pt").read_bytes())
    index = json.loads((out / "checkpoints" / "index.json").read_text())
    (out / "checkpoints" / "index.json").write_text(json.dumps({**index, "last": 4}))
    train(spec(6, tb, ("train.keep_checkpoints", [4]), ("train.checkpoint_every", 4)), out)
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    steps = [e.step for e in acc.Scalars("train/loss")]
    assert steps == sorted(set(steps)) and steps[-2:] == [5, 6], steps


def test_tensorboard_drops_what_a_session_killed_before_its_first_checkpoint_logged(tmp_path):
    import shutil

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, tb = tmp_path / "run", ("track.tensorboard", True)
    s = spec(4, tb, ("train.checkpoint_every", 4))
    train(s, out)
    # as if killed after logging step 4 but before its (first) checkpoint: the run starts over from step 0
    shutil.rmtree(out / "checkpoints")
    shutil.rmtree(out / "evals")
    train(s, out)
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    steps = [e.step for e in acc.Scalars("train/loss")]
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [r["step"] for r in rows] == [1, 2, 3, 4], steps
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx([r["loss"] for r in rows], rel=1e-6)


def test_a_schedule_over_the_total_refuses_to_continue(tmp_path, capsys):
    out = tmp_path / "run"
    train(spec(3, ("train.lr_schedule", "cosine")), out)
    before = (out / "checkpoints" / "last.pt").read_bytes()
    import tomli_w

    from dimr_lab.spec.schema import to_dict

    toml = tmp_path / "longer.toml"
    toml.write_text(tomli_w.dumps(to_dict(spec(6, ("train.lr_schedule", "cosine")))))
    code, _, err = cli(["train", toml, "--out", out, "--no-progress"], capsys)
    assert code == 2 and "train.steps is part of its identity" in err and "cosine" in err
    assert (out / "checkpoints" / "last.pt").read_bytes() == before


def test_kept_checkpoints_and_fewer_steps_than_trained(tmp_path):
    out = tmp_path / "run"
    train(spec(6, ("train.keep_checkpoints", [2]), ("train.keep_every", 3)), out)
    idx = json.loads((out / "checkpoints" / "index.json").read_text())
    assert idx["last"] == 6 and idx["kept"] == [2, 3, 6]
    assert ckpt(out, "step-00000002.pt")["step"] == 2 and ckpt(out, "step-00000003.pt")["step"] == 3
    # asking for 3 steps of a run trained to 6 evaluates the kept step 3, and trains nothing
    mtime = (out / "checkpoints" / "last.pt").stat().st_mtime_ns
    train(spec(3, ("train.keep_checkpoints", [2]), ("train.keep_every", 3)), out)
    assert (out / "checkpoints" / "last.pt").stat().st_mtime_ns == mtime
    assert any(p.name.startswith("step-00000003-") for p in (out / "evals").iterdir())
    from dimr_lab.errors import UserError

    with pytest.raises(UserError, match="step 5 was not kept"):
        train(spec(5), out)


@pytest.fixture(scope="module")
def sweep_source(tmp_path_factory, classifier_store) -> Path:
    """A run trained 4 steps and evaluated (24 samples, FID and sample accuracy), and the classifier cache it was
    measured with: trained once for the module, read through copies (_sweep_run)."""
    root = tmp_path_factory.mktemp("sweep")
    classifiers_from_store(classifier_store, root / "cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DIMR_LAB_CACHE", str(root / "cache"))
        train(spec(4, ("eval.enabled", True), ("eval.samples", 24), ("eval.batch_size", 8),
                   ("eval.metrics", ["fid", "sample_accuracy"]), ("sample.guidance_scale", 1.0)), root / "run")
    classifiers_to_store(root / "cache", classifier_store)
    return root


def _sweep_run(tmp_path: Path, source: Path) -> Path:
    """A copy of the module's evaluated run in tmp_path/run, its classifier cache in tmp_path/cache."""
    import shutil

    shutil.copytree(source / "cache", tmp_path / "cache", dirs_exist_ok=True)
    shutil.copytree(source / "run", tmp_path / "run")
    return tmp_path / "run"


def test_eval_sweeps_guidance_without_training(tmp_path, capsys, monkeypatch, sweep_source):
    monkeypatch.setenv("DIMR_LAB_CACHE", str(tmp_path / "cache"))
    out = _sweep_run(tmp_path, sweep_source)
    checkpoints = {p.name: p.read_bytes() for p in (out / "checkpoints").iterdir()}
    (own,) = list((out / "evals").iterdir())
    own_metrics = json.loads((own / "metrics.json").read_text())
    rows = []
    for s in (0.0, 1.0, 2.0):
        code, stdout, err = cli(["eval", out, "--set", f"sample.guidance_scale={s}", "--json"], capsys)
        assert code == 0, err
        rows += [json.loads(line) for line in stdout.splitlines()]
    assert {p.name: p.read_bytes() for p in (out / "checkpoints").iterdir()} == checkpoints  # nothing trained
    assert len(list((out / "evals").iterdir())) == 3  # 0 and 2 are new; 1.0 is the run's own, skipped
    same = [r for r in rows if r["settings"]["sample"]["guidance_scale"] == 1.0]
    assert same == [own_metrics]
    assert {r["settings"]["sample"]["guidance_scale"] for r in rows} == {0.0, 1.0, 2.0}
    # only sample.* / eval.* may change
    code, _, err = cli(["eval", out, "--set", "train.lr=0.1"], capsys)
    assert code == 2 and "--set: train.lr" in err


def _eval_worker(rank: int, world: int, port: int, run: str, cache: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DIMR_LAB_CACHE=cache)
    torch.set_num_threads(1)
    from dimr_lab.eval.command import evaluate_run

    evaluate_run(run, overrides=[("eval.samples", 20), ("sample.seed", 5)])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(300)
def test_two_process_evaluation_equals_one_and_a_stopped_one_resumes(tmp_path, monkeypatch, sweep_source):
    import shutil

    from dimr_lab.eval.command import evaluate_run

    cache = tmp_path / "cache"
    monkeypatch.setenv("DIMR_LAB_CACHE", str(cache))
    one = _sweep_run(tmp_path, sweep_source)
    two = tmp_path / "two"
    shutil.copytree(one, two)
    (one_metrics,) = evaluate_run(one, overrides=[("eval.samples", 20), ("sample.seed", 5)])
    torch.multiprocessing.spawn(_eval_worker, args=(2, _free_port(), str(two), str(cache)), nprocs=2, join=True)
    name = one_metrics["eval_name"]
    a, b = (np.load(r / "evals" / name / "per_sample.npz") for r in (one, two))
    assert np.array_equal(a["images"], b["images"]) and np.array_equal(a["labels"], b["labels"])
    two_metrics = json.loads((two / "evals" / name / "metrics.json").read_text())
    assert two_metrics["world_size"] == 2 and two_metrics["fid"] == one_metrics["fid"]
    # stopped after its first chunk, then run again: the same samples and metrics
    three = tmp_path / "three"
    shutil.copytree(one, three, ignore=shutil.ignore_patterns(name))
    calls = {"n": 0}

    def stop() -> bool:
        calls["n"] += 1
        return calls["n"] >= 1

    (first,) = evaluate_run(three, overrides=[("eval.samples", 20), ("sample.seed", 5)], should_stop=stop)
    assert first.get("interrupted") and len(list((three / "evals" / name / "chunks").iterdir())) == 1
    (again,) = evaluate_run(three, overrides=[("eval.samples", 20), ("sample.seed", 5)])
    c = np.load(three / "evals" / name / "per_sample.npz")
    assert np.array_equal(a["images"], c["images"]) and again["fid"] == one_metrics["fid"]
    assert again["sampled_now"] == 20 - 8 and not (three / "evals" / name / "chunks").exists()


# _sweep_run's spec (on the built-in default's betas) with a time limit passed by the time the evaluation begins
LIMITED_TOML = """
[model]
preset = "dimr_tiny_2r"
branches = [{width = 32, depth = 2, heads = 2}, {width = 16, depth = 1}]
[data]
train_size = 96
[train]
steps = 4
batch_size = 8
lr = 1e-3
warmup_steps = 3
ema_decay = 0.9
log_every = 1
checkpoint_every = 2
betas = [0.9, 0.99]
time_limit_s = 1e-6
[sample]
steps = 2
grid_size = 4
guidance_scale = 1.0
[eval]
enabled = true
samples = 24
batch_size = 8
metrics = ["fid", "sample_accuracy"]
"""


@pytest.mark.timeout(300)
def test_the_time_limit_stops_an_evaluation_between_chunks_and_the_next_job_resumes_it(tmp_path, capsys,
                                                                                        monkeypatch, sweep_source):
    """train.time_limit_s bounded training only: the evaluation after it ran on, to be killed by SLURM's limit
    mid-sampling. Now it stops after a chunk past the limit, keeps it, says so like a stopped training (exit 130),
    and the next job resumes at the first missing chunk: the same samples and metrics as an uninterrupted run."""
    import shutil

    from dimr_lab.eval.command import evaluate_planned

    monkeypatch.setenv("DIMR_LAB_CACHE", str(tmp_path / "cache"))
    ref = _sweep_run(tmp_path, sweep_source)  # trained and evaluated in one go, no limit
    (name,) = [p.name for p in (ref / "evals").iterdir()]
    ref_metrics = json.loads((ref / "evals" / name / "metrics.json").read_text())
    ref_samples = np.load(ref / "evals" / name / "per_sample.npz")
    toml = tmp_path / "limited.toml"
    toml.write_text(LIMITED_TOML)
    limited = load_run_spec(toml)
    assert limited.identity_hash() == json.loads((ref / "spec.json").read_text())["identity"]  # the same run
    for how in ("train", "eval-only"):
        out = tmp_path / how
        shutil.copytree(ref, out, ignore=shutil.ignore_patterns("evals"))  # trained, not evaluated
        if how == "train":
            code, _, err = cli(["train", toml, "--out", out, "--no-progress"], capsys)
            assert code == 130 and (f"stopped evaluating step 4 at train.time_limit_s (1e-06 s); the samples made so "
                                    f"far are kept in {out}") in err, err
            assert json.loads((out / "sessions.json").read_text())["sessions"][-1]["outcome"] == "time_limit"
            code, st, _ = cli(["status", out, "--json"], capsys)
            assert json.loads(st)["detail"] == ("stopped evaluating step 4 (8 of 24 samples made) by "
                                                "train.time_limit_s; rerun to resume")
            assert json.loads(st)["eta_s"] is None  # trained: no training left to estimate (not "0m00s")
        else:  # `run --eval-only`'s worker
            assert evaluate_planned(limited, out) == {"interrupted": True, "step": 4}
            last = json.loads((out / "sessions.json").read_text())["sessions"][-1]
            assert (last["kind"], last["outcome"]) == ("eval", "time_limit")
        assert len(list((out / "evals" / name / "chunks").iterdir())) == 1  # one chunk, then the limit
        assert not (out / "evals" / name / "metrics.json").exists()
        # the next job, without the limit (or with a longer one), resumes at the second chunk
        again = train(spec(4, ("eval.enabled", True), ("eval.samples", 24), ("eval.batch_size", 8),
                           ("eval.metrics", ["fid", "sample_accuracy"]), ("sample.guidance_scale", 1.0)), out)
        assert again["sampled_now"] == 24 - 8 and not (out / "evals" / name / "chunks").exists()
        for k in ("fid", "sample_accuracy", "samples", "eval_hash", "identity"):
            assert again[k] == ref_metrics[k], k
        got_samples = np.load(out / "evals" / name / "per_sample.npz")
        assert np.array_equal(got_samples["images"], ref_samples["images"])
        assert np.array_equal(got_samples["labels"], ref_samples["labels"])


@pytest.mark.timeout(300)
def test_a_compiled_evaluation_samples_what_the_eager_one_does(tmp_path, monkeypatch, sweep_source):
    """eval.compile compiles the sampling network's blocks (the GPU suite measured it faster on an H200): the
    same evaluation (its name leaves the setting out, as it does the batch size), samples equal to the eager
    ones within float rounding, and every kind of block compiled."""
    import shutil

    from torch._dynamo.utils import counters

    from dimr_lab.eval.command import evaluate_run

    monkeypatch.setenv("DIMR_LAB_CACHE", str(tmp_path / "cache"))
    eager = _sweep_run(tmp_path, sweep_source)
    compiled = tmp_path / "compiled"
    shutil.copytree(eager, compiled, ignore=shutil.ignore_patterns("evals"))
    settings = [("eval.samples", 20), ("sample.seed", 5)]
    (a,) = evaluate_run(eager, overrides=settings)
    torch._dynamo.reset()
    counters.clear()
    (b,) = evaluate_run(compiled, overrides=[*settings, ("eval.compile", True)])
    assert counters["stats"]["unique_graphs"] >= 2 and counters["frames"]["total"] == counters["frames"]["ok"]
    assert a["eval_name"] == b["eval_name"]
    x, y = (np.load(r / "evals" / a["eval_name"] / "per_sample.npz") for r in (eager, compiled))
    assert np.array_equal(x["labels"], y["labels"])
    diff = np.abs(x["images"].astype(int) - y["images"].astype(int))
    assert diff.max() <= 2 and diff.mean() < 0.05  # uint8 levels: rounding, not another sampler
    assert b["fid"] == pytest.approx(a["fid"], rel=0.02)


def test_the_trainer_uses_the_diffusion_packages_loss(tmp_path):
    """The first logged loss of a run equals dimr_lab.diffusion.training_loss on the same batch and draws."""
    from dimr_lab.data import build_dataset
    from dimr_lab.diffusion import draw, loss_weights, training_loss
    from dimr_lab.diffusion.schedule import build_schedule
    from dimr_lab.nn.network import build_model
    from dimr_lab.train.loop import BatchOrder, collate

    for extra in ([], [("diffusion.schedule", "vp_linear"), ("diffusion.time_input", "vp_logsnr")]):
        s = spec(1, ("train.seed", 3), *extra)
        out = tmp_path / f"run{len(extra)}"
        train(s, out)
        logged = json.loads((out / "log.jsonl").read_text().splitlines()[0])["loss"]
        torch.manual_seed(3)
        import dataclasses

        ds = build_dataset(dataclasses.replace(s.data, flip=False), split="train")
        model = build_model(s.model)
        x0, y = collate([ds[int(i)] for i in BatchOrder(len(ds), 8, 3).next()])
        schedule = build_schedule(s.diffusion)
        draws = draw(schedule, 8, tuple(x0.shape[1:]), label_drop=s.diffusion.label_drop, flip=True,
                     generator=torch.Generator().manual_seed(3))
        loss, _ = training_loss(model, schedule, s.diffusion.time_input, x0, y, draws,
                                loss_weights(s.diffusion, 2), model.null_label)
        assert float(loss.detach()) == pytest.approx(logged, rel=1e-6), extra


def test_another_runs_checkpoint_is_refused(tmp_path, capsys):
    from dimr_lab.errors import UserError

    train(spec(2), tmp_path / "a")
    train(spec(2, ("train.lr", 5e-4)), tmp_path / "b")
    (tmp_path / "b" / "checkpoints" / "index.json").unlink()
    (tmp_path / "a" / "checkpoints" / "last.pt").replace(tmp_path / "b" / "checkpoints" / "last.pt")
    with pytest.raises(UserError, match="checkpoint of another run"):
        train(spec(4, ("train.lr", 5e-4)), tmp_path / "b")


def _tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under root but the folder lock's holder line."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
            and p.name != ".lock"}


@pytest.mark.timeout(300)  # were the refusal gone, the run would train for minutes: fail, do not hang
def test_committed_outputs_without_checkpoints_are_refused_not_trained_over(tmp_path, capsys):
    """A committed run (outputs, no checkpoints) asked for a new evaluation: starting over would cut its log
    back to step 0 and train over it. `run` (and --eval-only) refuse in one line, exit 2, before writing;
    the dry run says so beside the run."""
    import shutil

    root = Path(__file__).resolve().parents[1]
    src = next((root / "results" / "tdln_vs_adaln").glob("tdln-s0-*"))
    shutil.copytree(src, tmp_path / "tdln_vs_adaln" / src.name)
    before = _tree_bytes(tmp_path)
    args = ["run", root / "ablations" / "tdln_vs_adaln.toml", "--profile", "small", "--set", "sample.steps=10",
            "--only", "tdln", "--seeds", "0", "-r", tmp_path]
    for extra in ([], ["--eval-only"]):
        code, out, err = cli([*args, *extra], capsys)
        assert code == 2 and err.count("\n") == 1 and "no checkpoint" in err and src.name in err, err
        assert _tree_bytes(tmp_path) == before
    code, out, err = cli([*args, "--dry-run", "--json"], capsys)
    (row,) = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and row["status"] == "no checkpoint" and "no checkpoint" in row["problem"]
    assert _tree_bytes(tmp_path) == before
    # the same settings it was made with: done, nothing to do
    code, out, err = cli(args[:4] + args[6:] + ["--json"], capsys)
    assert code == 0 and json.loads(out.splitlines()[0])["status"] == "skipped"


@pytest.mark.timeout(300)
def test_a_damaged_evaluation_of_committed_outputs_is_named_not_blamed_on_missing_checkpoints(tmp_path, capsys):
    """A committed run whose last metrics.json is damaged is not done; `run` refuses it naming that file (it
    said only that the folder holds no checkpoint, and to move it away and train again from step 0)."""
    import shutil

    root = Path(__file__).resolve().parents[1]
    src = next((root / "results" / "tdln_vs_adaln").glob("tdln-s0-*"))
    run = tmp_path / "tdln_vs_adaln" / src.name
    shutil.copytree(src, run)
    metrics = sorted(run.glob("evals/*/metrics.json"))[-1]
    metrics.write_text('{"fid": ')
    before = _tree_bytes(tmp_path)
    args = ["run", root / "ablations" / "tdln_vs_adaln.toml", "--profile", "small", "--only", "tdln", "--seeds", "0",
            "-r", tmp_path]
    code, out, err = cli(args, capsys)
    assert code == 2 and err.count("\n") == 1 and str(metrics) in err and "not valid JSON" in err, err
    assert _tree_bytes(tmp_path) == before
    code, out, err = cli([*args, "--dry-run", "--json"], capsys)
    (row,) = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and str(metrics) in row["problem"]


def test_train_refuses_outputs_without_checkpoints_but_restarts_a_run_killed_before_its_first(tmp_path):
    from dimr_lab.errors import UserError

    train(spec(4), tmp_path / "run")
    log = (tmp_path / "run" / "log.jsonl").read_bytes()
    removed = [p.unlink() for p in (tmp_path / "run" / "checkpoints").iterdir()]
    assert removed
    with pytest.raises(UserError, match="no checkpoint to train on"):
        train(spec(6), tmp_path / "run")
    assert (tmp_path / "run" / "log.jsonl").read_bytes() == log
    # killed before its first checkpoint (step 2): a log to step 1 and nothing else starts over
    train(spec(1, ("train.checkpoint_every", 2), ("eval.steps", [])), tmp_path / "early", evaluate=False)
    for p in (tmp_path / "early" / "checkpoints").iterdir():
        p.unlink()
    assert train(spec(4), tmp_path / "early") is not None
    assert ckpt(tmp_path / "early")["step"] == 4


def test_an_evaluation_made_with_evaluation_off_does_not_stand_for_the_full_one(tmp_path, capsys, classifier_cache):
    """eval.enabled is not in an evaluation's name, so a sample grid made with it off sits where the full
    evaluation goes: it stays done for specs with evaluation off, and is replaced by the metrics when asked."""
    from dimr_lab.runner.worker import pending_evaluations

    full = [("eval.samples", 24), ("eval.batch_size", 8), ("eval.metrics", ["fid", "sample_accuracy"])]
    off = spec(2, *full)  # TINY: eval.enabled = false
    train(off, tmp_path / "run")
    (grid,) = list((tmp_path / "run" / "evals").iterdir())
    assert json.loads((grid / "metrics.json").read_text())["enabled"] is False
    assert pending_evaluations(off, tmp_path / "run") == []
    on = spec(2, *full, ("eval.enabled", True))
    assert on.eval_hash() == off.eval_hash() and pending_evaluations(on, tmp_path / "run") == [2]
    code, out, err = cli(["eval", tmp_path / "run", "--json"], capsys)  # the run's own spec: evaluation off
    assert code == 0 and "eval.enabled=true" in err and json.loads(out)["enabled"] is False
    code, out, err = cli(["eval", tmp_path / "run", "--set", "eval.enabled=true", "--json"], capsys)
    got = json.loads(out)
    assert code == 0 and got["enabled"] is True and got["fid"] is not None and got["sample_accuracy"] is not None
    assert list((tmp_path / "run" / "evals").iterdir()) == [grid]
    assert json.loads((grid / "metrics.json").read_text()) == got and pending_evaluations(on, tmp_path / "run") == []


def test_evaluating_a_damaged_checkpoint_writes_nothing(tmp_path, capsys):
    train(spec(2), tmp_path / "run")
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])
    before = _tree_bytes(tmp_path / "run")
    code, _, err = cli(["eval", tmp_path / "run", "--set", "sample.steps=3"], capsys)
    assert code == 2 and err.count("\n") == 1 and "last.pt" in err, err
    assert _tree_bytes(tmp_path / "run") == before


@pytest.mark.timeout(600)
def test_sessions_json_counts_the_restarts_and_wall_time_of_a_killed_and_resumed_run(tmp_path, capsys, monkeypatch):
    """A run killed (SIGKILL, under a SLURM job id), stopped and resumed twice: sessions.json holds its three
    sessions (how each ended, from and to which step, which process and job), the restarts and the wall time
    they add up to, and `status` says 'resumed 2x' (and --json the same numbers)."""
    import signal
    import subprocess
    import sys
    import time

    from dimr_lab.runner.status import format_duration

    run = tmp_path / "run"
    argv = ["train", "--out", str(run), "--no-progress", "--set", "train.steps=400",
            "--set", "train.checkpoint_every=2"]
    def toml(v):  # TINY's values as --set takes them
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k} = {toml(x)}" for k, x in v.items()) + "}"
        return "[" + ", ".join(map(toml, v)) + "]" if isinstance(v, list) else json.dumps(v)

    for key, value in TINY:
        argv += ["--set", f"{key}={toml(value)}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", SLURM_JOB_ID="4242", SLURM_RESTART_COUNT="3")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_ARRAY_JOB_ID"):
        env.pop(k, None)
    proc = subprocess.Popen([sys.executable, "-c", "from dimr_lab.cli import main; main()", *argv], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (run / "checkpoints" / "index.json").exists() and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)
    proc.kill()  # no chance to say how it ended
    err = proc.communicate(timeout=60)[1].decode()
    assert (run / "checkpoints" / "index.json").exists(), err[-2000:]
    # where the run resumes: last.pt, written whole before the index names it (a kill between the two leaves the
    # index a checkpoint behind, and the resumed session settles it)
    killed_at = ckpt(run)["step"]

    asked = iter(range(1000))
    assert train(spec(400), run, should_stop=lambda: next(asked) == 3)["interrupted"]
    train(spec(killed_at + 10), run)  # continued to a nearer end: the rest of the run

    data = json.loads((run / "sessions.json").read_text())
    first, second, third = data["sessions"]
    assert [s["outcome"] for s in data["sessions"]] == ["running", "stopped", "done"]  # killed: never ended
    assert [s["resumed"] for s in data["sessions"]] == [False, True, True]
    assert (first["pid"], first["job_id"], first["slurm_restart"]) == (proc.pid, "4242", 3)
    assert (second["pid"], second["job_id"]) == (os.getpid(), None) and second["host"] == socket.gethostname()
    assert first["machine"] == second["machine"] == third["machine"] and second["machine"]["cpu"]
    assert first["from_step"] == 0 and first["to_step"] >= 2  # its last sign of life: at least its checkpoint
    assert second["from_step"] == killed_at and second["to_step"] == killed_at + 3
    assert (third["from_step"], third["to_step"]) == (killed_at + 3, killed_at + 10)
    assert all(s["started"] <= s["last"] for s in data["sessions"])
    assert first["last"] <= second["started"] <= second["last"] <= third["started"]
    wall = sum(s["last"] - s["started"] for s in data["sessions"])
    assert data["restarts"] == 2 and data["wall_s"] == pytest.approx(wall, abs=1e-3) and wall > 0

    code, out, _ = cli(["status", run, "--json"], capsys)
    (st,) = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and (st["state"], st["sessions"], st["restarts"]) == ("done", 3, 2)
    assert st["wall_s"] == data["wall_s"]
    monkeypatch.setenv("COLUMNS", "200")  # the detail on one line
    code, out, _ = cli(["status", run], capsys)
    assert code == 0 and f"resumed 2x, {format_duration(data['wall_s'])} over 3 sessions" in out, out

    train(spec(killed_at + 10), run)  # a finished run trained again: nothing to do, no session
    assert len(json.loads((run / "sessions.json").read_text())["sessions"]) == 3


def test_sessions_json_tells_a_continuation_to_more_steps_from_a_resume(tmp_path, capsys, monkeypatch):
    """A run stopped, resumed to its end and then continued to more steps: the resume is a restart, the
    continuation of the finished run is not ('continued 1x', a kind of its own); rows of an earlier version
    without a kind still count every later session as a restart."""
    from dimr_lab.rundir import session_totals

    run = tmp_path / "run"
    asked = iter(range(1000))
    assert train(spec(6), run, should_stop=lambda: next(asked) == 2)["interrupted"]
    train(spec(6), run)
    train(spec(8), run)  # the finished run continued
    data = json.loads((run / "sessions.json").read_text())
    assert [s["kind"] for s in data["sessions"]] == ["start", "resume", "continue"]
    assert [s["outcome"] for s in data["sessions"]] == ["stopped", "done", "done"]
    assert (data["restarts"], data["continuations"]) == (1, 1)
    code, out, _ = cli(["status", run, "--json"], capsys)
    st = json.loads(out)
    assert code == 0 and (st["sessions"], st["restarts"], st["continuations"]) == (3, 1, 1)
    monkeypatch.setenv("COLUMNS", "200")
    code, out, _ = cli(["status", run], capsys)
    assert code == 0 and "resumed 1x, continued 1x, " in out and "over 3 sessions" in out, out

    other = tmp_path / "other"
    train(spec(2), other)
    train(spec(4), other)  # continued only, never interrupted: no 'resumed'
    code, out, _ = cli(["status", other], capsys)
    assert "resumed" not in out and "continued 1x, " in out and "over 2 sessions" in out, out
    old = [{k: v for k, v in s.items() if k != "kind"} for s in json.loads((run / "sessions.json").read_text())
           ["sessions"]]
    assert (session_totals(old)["restarts"], session_totals(old)["continuations"]) == (2, 0)


def test_an_unreadable_sessions_json_is_kept_aside_with_one_line_and_the_run_goes_on(tmp_path, capsys):
    """A damaged sessions.json neither stops the run nor is written over in silence: it is renamed aside, a
    line says so, and the sessions start again from this one."""
    run = tmp_path / "run"
    asked = iter(range(1000))
    assert train(spec(6), run, should_stop=lambda: next(asked) == 2)["interrupted"]
    (run / "sessions.json").write_text('{"sessions": [{"start')  # truncated
    capsys.readouterr()
    assert train(spec(6), run)["step"] == 6
    err = capsys.readouterr().err
    (aside,) = run.glob("sessions.damaged-*.json")
    assert aside.read_text() == '{"sessions": [{"start' and f"{run / 'sessions.json'}: not readable" in err, err
    assert [s["outcome"] for s in json.loads((run / "sessions.json").read_text())["sessions"]] == ["done"]


def test_damaged_sessions_files_kept_aside_in_the_same_second_are_all_kept(tmp_path, monkeypatch):
    """The aside name carried the second only: a second damaged sessions.json within that second replaced the
    first one kept aside."""
    import time

    from dimr_lab.rundir import RunDir, SessionLog

    monkeypatch.setattr(time, "time", lambda: 1_700_000_000.0)
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    lines = []
    for n in range(3):
        run.sessions_path.write_text(f'{{"sessions": [{n}')  # truncated, a different one each time
        SessionLog(run, say=lines.append).begin(step=0, resumed=False)
    kept = sorted(p.read_text() for p in run.path.glob("sessions.damaged-*.json"))
    assert kept == ['{"sessions": [0', '{"sessions": [1', '{"sessions": [2'] and len(lines) == 3, lines


@pytest.mark.parametrize("text, why, carried", [
    ('{"sessions": 5}', "no list under 'sessions'", 0),
    ('[{"started": 1.0, "last": 2.0}]', "not a JSON object (a list)", 0),
    ('{"sessions": [{"started": 1.0, "last": 2.0, "kind": "start", "outcome": "done"}, "junk"]}',
     "1 of its 2 rows not a session", 1),
])
def test_a_sessions_json_of_the_wrong_shape_is_kept_aside_too(tmp_path, text, why, carried):
    """Valid JSON of the wrong shape was written over in silence (only text that did not parse was kept aside):
    it is kept aside now, with its line, and the sessions in it that still read carry over."""
    from dimr_lab.rundir import RunDir, SessionLog

    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.sessions_path.write_text(text)
    lines = []
    SessionLog(run, say=lines.append).begin(step=0, resumed=False)
    (aside,) = run.path.glob("sessions.damaged-*.json")
    assert aside.read_text() == text
    assert len(lines) == 1 and lines[0].startswith(f"{run.sessions_path}: {why}") and aside.name in lines[0], lines
    assert len(json.loads(run.sessions_path.read_text())["sessions"]) == carried + 1
    lines.clear()
    SessionLog(run, say=lines.append).begin(step=0, resumed=True)  # a sound file is neither moved nor said
    assert lines == [] and len(list(run.path.glob("sessions.damaged-*.json"))) == 1


@pytest.mark.timeout(300)
def test_an_evaluation_session_keeps_a_sessions_json_damaged_under_it_aside(tmp_path, capsys, monkeypatch,
                                                                          sweep_source):
    """An evaluation session (`dimr-lab eval`) whose sessions.json was damaged after it began wrote its record
    over the damaged file; it is kept aside now, as at a session's start, with one line on stderr, and the
    session's record (the training session before it too) is written again."""
    from dimr_lab.eval.command import evaluate_run

    monkeypatch.setenv("DIMR_LAB_CACHE", str(tmp_path / "cache"))
    run = _sweep_run(tmp_path, sweep_source)
    damaged = b'{"sessions": [{"started": 17'  # truncated
    calls = []

    def progress(done: int, total: int) -> None:
        if not calls:  # the session has begun (its first sign of life comes before progress)
            assert json.loads((run / "sessions.json").read_text())["sessions"][-1]["kind"] == "eval"
            (run / "sessions.json").write_bytes(damaged)
        calls.append(done)

    capsys.readouterr()
    (res,) = evaluate_run(run, overrides=[("sample.seed", 3)], progress=progress)
    assert "interrupted" not in res and calls
    err = capsys.readouterr().err
    (aside,) = run.glob("sessions.damaged-*.json")
    assert aside.read_bytes() == damaged
    said = [line for line in err.splitlines() if aside.name in line]
    assert len(said) == 1 and f"{run / 'sessions.json'}: not readable" in said[0], err
    rows = json.loads((run / "sessions.json").read_text())["sessions"]
    assert [(r["kind"], r["outcome"]) for r in rows] == [("start", "done"), ("eval", "done")]


AGAIN = tiny_evaluated_ablation("again")


@pytest.mark.parametrize("executor", ["debug", "local"])
def test_run_eval_only_with_other_settings_evaluates_beside_the_runs_plan_and_keeps_it(tmp_path, capsys,
                                                                                        classifier_cache, executor):
    """`run --eval-only --set sample.guidance_scale=...` rewrote run.json with the settings it evaluated with, so a
    plain `table` showed that evaluation as the run's own from then on. run.json now stays as planned: the new
    evaluation lands beside the planned one, as `eval --set`'s does, and `table --eval` chooses it."""
    from dimr_lab.rundir import RunDir
    from dimr_lab.table.collect import collect

    abl = tmp_path / "again.toml"
    abl.write_text(AGAIN)
    results = tmp_path / "results"
    code, out, err = cli(["run", abl, "--results", results, "--executor", "debug"], capsys)
    assert code == 0, err
    (run,) = [p for p in (results / "again").iterdir() if p.is_dir() and not p.name.startswith(".")]
    record = (run / "run.json").read_bytes()
    planned = json.loads(record)["spec"]["sample"]["guidance_scale"]
    assert planned != 0.5
    for _ in range(2):  # the second finds it made: nothing to do
        code, out, err = cli(["run", abl, "--results", results, "--executor", executor, "--eval-only",
                              "--set", "sample.guidance_scale=0.5"], capsys)
        assert code == 0, err
        assert (run / "run.json").read_bytes() == record
        evals = RunDir(run).evaluations()
        assert sorted(e.settings["sample"]["guidance_scale"] for e in evals if e.done) == sorted([planned, 0.5])
    assert "guidance_scale=0.5" in " ".join(out.split())  # the table after it shows what it evaluated
    frame, _ = collect(results)
    assert list(frame["eval_label"]) == [""]  # the run's planned evaluation
    frame, _ = collect(results, eval_filter=["sample.guidance_scale=0.5"])
    assert list(frame["eval_label"]) == ["sample.guidance_scale=0.5"]
