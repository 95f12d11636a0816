"""Fault injection: runs killed at random points of training, checkpointing and evaluation (SIGKILL, SIGINT,
SIGTERM, again and again), a full disk during a save, two writers racing for one folder. After each the
run resumes and ends bit-identical to an uninterrupted one, with nothing left behind.

Kill points are random but seeded: every test prints its seed and each kill (delay, signal), and
DIMR_LAB_FAULT_SEED replays a failure.
"""

from __future__ import annotations

import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

SEED = int(os.environ.get("DIMR_LAB_FAULT_SEED", "20261129"))

SPEC = """
[model]
preset = "dimr_tiny_2r"
branches = [{width = 16, depth = 2, heads = 2}, {width = 8, depth = 1}]
[data]
train_size = 64
[train]
steps = 24
batch_size = 8
lr = 1e-3
warmup_steps = 2
ema_decay = 0.9
checkpoint_every = 3
keep_checkpoints = [6]
log_every = 2
[sample]
steps = 4
grid_size = 4
[eval]
samples = 48
batch_size = 8
steps = [12]
metrics = ["fid", "sample_accuracy"]
"""


def cmd(*args) -> list[str]:
    return [sys.executable, "-c", "from dimr_lab.cli import main; main()", *map(str, args)]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A child environment with one thread and a classifier cache trained once for the module."""
    cache = tmp_path_factory.mktemp("cache")
    e = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", DIMR_LAB_CACHE=str(cache))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_NTASKS", "SLURM_PROCID"):
        e.pop(k, None)
    return e


@pytest.fixture(scope="module")
def reference(tmp_path_factory, env):
    """The spec and an uninterrupted run of it."""
    tmp = tmp_path_factory.mktemp("ref")
    spec = tmp / "spec.toml"
    spec.write_text(SPEC)
    t0 = time.monotonic()
    subprocess.run(cmd("train", spec, "--out", tmp / "run", "--no-progress"), env=env, check=True,
                   capture_output=True, timeout=600)
    return spec, tmp / "run", time.monotonic() - t0


def state(run: Path) -> dict:
    """What must be identical: final weights, EMA, optimizer state, every evaluation's metrics, the log's
    rows (steps and losses: a resumed window of the loss average holds the steps before the checkpoint)."""
    ckpt = torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    evals = {}
    for m in sorted(run.glob("evals/*/metrics.json")):
        data = json.loads(m.read_text())
        evals[m.parent.name] = {k: data.get(k) for k in ("fid", "sample_accuracy", "step", "samples")}
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    log = [(r["step"], r["loss"], r["loss_branches"]) for r in rows]
    return {"step": ckpt["step"], "model": ckpt["model"], "ema": ckpt["ema"], "log": log,
            "opt": [v for s in ckpt["optimizer"]["state"].values() for v in s.values()], "evals": evals,
            "kept": sorted(p.name for p in (run / "checkpoints").glob("step-*.pt"))}


def assert_same(a: dict, b: dict, why: str) -> None:
    assert a["step"] == b["step"] and a["evals"] == b["evals"] and a["kept"] == b["kept"], why
    assert a["log"] == b["log"], why
    for k in ("model", "ema"):
        for name in a[k]:
            assert torch.equal(a[k][name], b[k][name]), f"{why}: {k} {name}"
    assert all(torch.equal(x, y) for x, y in zip(a["opt"], b["opt"])), why


def leftovers(run: Path) -> list[str]:
    """Temporary files and unfinished sample chunks a finished run must not hold."""
    return [str(p.relative_to(run)) for p in run.rglob("*") if p.name.endswith(".tmp") or p.name == "chunks"]


@pytest.mark.timeout(900)
def test_random_kills_during_training_checkpointing_and_evaluation(reference, env, tmp_path):
    spec, ref, seconds = reference
    rng = random.Random(SEED)
    print(f"fault seed {SEED}")
    run = tmp_path / "run"
    kills = []
    for attempt in range(40):
        proc = subprocess.Popen(cmd("train", spec, "--out", run, "--no-progress"), env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        delay = rng.uniform(0.5, seconds * 1.1)
        sig = rng.choice([signal.SIGKILL, signal.SIGKILL, signal.SIGINT, signal.SIGTERM])
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(sig)
            if sig != signal.SIGKILL and rng.random() < 0.3:  # impatient: a second signal soon after
                time.sleep(rng.uniform(0.0, 0.3))
                if proc.poll() is None:
                    proc.send_signal(sig)
            out, err = proc.communicate(timeout=120)
            kills.append((round(delay, 2), signal.Signals(sig).name, proc.returncode))
            print(f"attempt {attempt}: {signal.Signals(sig).name} after {delay:.2f} s -> exit {proc.returncode}")
            assert b"Traceback" not in err or sig == signal.SIGINT and proc.returncode != 0, err.decode()[-2000:]
            if len(kills) >= 6 and rng.random() < 0.5:
                continue
            continue
        out, err = proc.communicate()
        assert proc.returncode == 0, err.decode()[-2000:]
        break
    else:
        pytest.fail(f"never finished (seed {SEED}, kills {kills})")
    assert kills, f"no kill landed before the run finished (seed {SEED})"
    assert_same(state(run), state(ref), f"seed {SEED}, kills {kills}")
    assert leftovers(run) == [], f"seed {SEED}: left behind {leftovers(run)}"


@pytest.mark.timeout(600)
def test_an_evaluation_killed_again_and_again_resumes_to_the_same_metrics(reference, env, tmp_path):
    import shutil

    spec, ref, _ = reference
    rng = random.Random(SEED + 1)
    run = tmp_path / "run"
    shutil.copytree(ref, run)
    args = ("eval", run, "--set", "eval.samples=64", "--set", "sample.seed=3", "--json")
    t0 = time.monotonic()
    once = subprocess.run(cmd(*args), env=env, capture_output=True, timeout=300, cwd=tmp_path)
    seconds = time.monotonic() - t0
    expected = json.loads(once.stdout.decode().splitlines()[-1])
    shutil.rmtree(run / "evals" / expected["eval_name"])
    kills = []
    for _ in range(30):
        proc = subprocess.Popen(cmd(*args), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        delay = rng.uniform(0.3, seconds)
        sig = rng.choice([signal.SIGKILL, signal.SIGINT, signal.SIGTERM])
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(sig)
            proc.communicate(timeout=120)
            kills.append((round(delay, 2), signal.Signals(sig).name))
            continue
        out, _ = proc.communicate()
        assert proc.returncode == 0
        got = json.loads(out.decode().splitlines()[-1])
        break
    else:
        pytest.fail(f"never finished (seed {SEED + 1}, kills {kills})")
    print(f"fault seed {SEED + 1}: kills {kills}")
    for k in ("fid", "sample_accuracy", "samples", "eval_name"):
        assert got[k] == expected[k], (k, kills)
    assert leftovers(run) == [], leftovers(run)


def _limit_file_size(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_a_failed_save_says_whether_a_previous_file_was_kept(tmp_path, monkeypatch):
    # "the previous one is intact" was said of a first save too, where there was no previous file
    import errno

    import dimr_lab.nn.checkpoint as ckpt
    from dimr_lab.errors import UserError

    def full(path, write):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "atomic_write", full)
    with pytest.raises(UserError, match=r"first\.pt: cannot write the checkpoint \(no space left on the device\); "
                                        r"nothing was written$"):
        ckpt.save_file({"w": torch.zeros(2)}, tmp_path / "first.pt")
    (tmp_path / "again.pt").write_bytes(b"old")
    with pytest.raises(UserError, match=r"again\.pt: .*; the previous one is intact$"):
        ckpt.save_file({"w": torch.zeros(2)}, tmp_path / "again.pt")
    assert not (tmp_path / "first.pt").exists() and (tmp_path / "again.pt").read_bytes() == b"old"


@pytest.mark.timeout(600)
def test_a_full_disk_during_a_save_keeps_the_last_checkpoint_and_resumes(reference, env, tmp_path):
    spec, ref, _ = reference
    run = tmp_path / "run"
    # first a few checkpoints with room, then a limit below a checkpoint's size: the next save fails
    first = spec.read_text().replace("steps = 24", "steps = 6").replace("steps = [12]", "steps = []\nenabled = false")
    (tmp_path / "first.toml").write_text(first)
    subprocess.run(cmd("train", tmp_path / "first.toml", "--out", run, "--no-progress"), env=env, check=True,
                   capture_output=True, timeout=300)
    size = (run / "checkpoints" / "last.pt").stat().st_size
    before = (run / "checkpoints" / "last.pt").read_bytes()
    full = subprocess.run(cmd("train", spec, "--out", run, "--no-progress"), env=env, capture_output=True,
                          timeout=300, preexec_fn=_limit_file_size(size // 2))
    err = full.stderr.decode()
    assert full.returncode == 2 and "cannot write the checkpoint" in err and "Traceback" not in err, err[-2000:]
    assert (run / "checkpoints" / "last.pt").read_bytes() == before  # the previous one is intact
    assert leftovers(run) == []
    subprocess.run(cmd("train", spec, "--out", run, "--no-progress"), env=env, check=True, capture_output=True,
                   timeout=300)
    got = state(run)
    assert [e["step"] for e in got["evals"].values()].count(6) == 1  # the 6-step run's own (grid-only) record
    got["evals"] = {k: e for k, e in got["evals"].items() if e["step"] != 6}
    assert_same(got, state(ref), "after a full disk")


@pytest.mark.timeout(900)
def test_two_writers_racing_for_one_folder_never_both_train(reference, env, tmp_path):
    spec, _, _ = reference
    other = tmp_path / "other.toml"
    other.write_text(spec.read_text().replace("lr = 1e-3", "lr = 5e-4"))
    for i in range(4):
        run = tmp_path / f"race{i}"
        procs = [subprocess.Popen(cmd("train", s, "--out", run, "--no-progress"), env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE) for s in (spec, other)]
        results = [(p.wait(timeout=600), p.stderr.read().decode()) for p in procs]
        codes = [c for c, _ in results]
        assert sorted(codes) == [0, 2], results
        loser = results[codes.index(2)][1]
        assert "in use by pid" in loser or "holds another run" in loser, loser
        # the folder belongs to one spec: its record, spec, checkpoints and evaluations agree
        ident = json.loads((run / "spec.json").read_text())["identity"]
        assert json.loads((run / "run.json").read_text())["identity"] == ident
        assert json.loads((run / "checkpoints" / "index.json").read_text())["identity"] == ident
        assert {json.loads(m.read_text())["identity"] for m in run.glob("evals/*/metrics.json")} == {ident}
        steps = [json.loads(x)["step"] for x in (run / "log.jsonl").read_text().splitlines()]
        assert steps == sorted(set(steps)), "one run's log, in order"
