"""Training runs: resume bit-exactness after SIGKILL, DDP equivalence, refusals, LR/EMA/optimizer maths, files."""

from __future__ import annotations

import copy
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dimr_lab.cli import main as cli_main
from dimr_lab.spec.run_spec import load_run_spec

# a tiny 2-branch DiMR on 16x16 shapes: a step takes tens of milliseconds on one core
TINY_TOML = """
[model]
preset = "dimr_tiny_2r"
image_size = 16
branches = [{width = 32, depth = 2, heads = 2}, {width = 16, depth = 1}]
[data]
image_size = 16
train_size = 96
[train]
steps = {steps}
batch_size = 8
lr = 1e-3
warmup_steps = 3
ema_decay = 0.9
checkpoint_every = {ckpt}
log_every = 1
[sample]
steps = 2
grid_size = 8
[eval]
enabled = false
"""


def tiny_spec_file(tmp: Path, steps: int = 6, ckpt: int = 2) -> Path:
    path = tmp / f"tiny_{steps}_{ckpt}.toml"
    path.write_text(TINY_TOML.replace("{steps}", str(steps)).replace("{ckpt}", str(ckpt)))
    return path


def tiny_spec(tmp: Path, steps: int = 6, ckpt: int = 2, overrides=None):
    return load_run_spec(tiny_spec_file(tmp, steps, ckpt), overrides)


def cli(*args: str) -> int:
    """Run the CLI in-process; its exit status."""
    try:
        cli_main([str(a) for a in args])
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def cli_cmd(*args: str) -> list[str]:
    return [sys.executable, "-c", "from dimr_lab.cli import main; main()", *[str(a) for a in args]]


def child_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_NTASKS", "SLURM_PROCID"):
        env.pop(k, None)
    return env


def load_ckpt(run: Path, name: str = "last.pt") -> dict:
    return torch.load(run / "checkpoints" / name, map_location="cpu", weights_only=True)


def evals(run: Path) -> list[Path]:
    return sorted((run / "evals").glob("step-*"))


def assert_state_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def done_run(tmp_path_factory) -> Path:
    """A finished tiny run (train + grid; eval off)."""
    from dimr_lab.train.trainer import train_run

    tmp = tmp_path_factory.mktemp("done")
    train_run(tiny_spec(tmp, steps=4, ckpt=2), tmp / "run", progress=False)
    return tmp / "run"


# ---------------------------------------------------------------- resume

def test_sigkill_resume_is_bit_exact(tmp_path):
    spec = tiny_spec_file(tmp_path, steps=40, ckpt=4)
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert cli("train", spec, "--out", ref, "--no-progress") == 0  # the uninterrupted run: in this process
    proc = subprocess.Popen(cli_cmd("train", spec, "--out", run, "--no-progress"), env=child_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = run / "checkpoints" / "last.pt"
    deadline = time.time() + 240
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert ckpt.exists(), "the run ended before its first checkpoint"
    killed_at = load_ckpt(run)["step"]
    assert 0 < killed_at < 40, f"killed after step {killed_at}: too late to test resuming"
    assert not evals(run)
    subprocess.run(cli_cmd("train", spec, "--out", run, "--no-progress"), env=child_env(), check=True,
                   capture_output=True, timeout=300)
    a, b = load_ckpt(ref), load_ckpt(run)
    assert a["step"] == b["step"] == 40
    assert_state_equal(a["model"], b["model"])
    assert_state_equal(a["ema"], b["ema"])
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert_state_equal(sa, sb)
    assert torch.equal(a["rng"]["noise"], b["rng"]["noise"])
    assert a["data_position"] == b["data_position"]
    # the log is cut back to the checkpoint and written again: the same losses, line for line
    la = [json.loads(x)["loss"] for x in (ref / "log.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (run / "log.jsonl").read_text().splitlines()]
    assert la == lb and len(la) == 40


def test_should_stop_checkpoints_and_resumes_exactly(tmp_path):
    from dimr_lab.train.trainer import train_run

    spec = tiny_spec(tmp_path, steps=6, ckpt=100)  # only the stop and the end save
    train_run(spec, tmp_path / "ref", progress=False)
    calls = {"n": 0}

    def stop_after_3() -> bool:
        calls["n"] += 1
        return calls["n"] > 3

    out = train_run(spec, tmp_path / "run", should_stop=stop_after_3, progress=False)
    assert out == {"interrupted": True, "step": 3}
    assert load_ckpt(tmp_path / "run")["step"] == 3
    train_run(spec, tmp_path / "run", progress=False)
    assert_state_equal(load_ckpt(tmp_path / "ref")["model"], load_ckpt(tmp_path / "run")["model"])


# ---------------------------------------------------------------- DDP

def _ddp_worker(rank: int, world: int, port: int, spec_path: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from dimr_lab.train.trainer import train_run

    train_run(load_run_spec(spec_path), Path(out), progress=False)


class _RankOneStopsFrom:
    """should_stop for a DDP worker: only rank 1 asks to stop, from its `n`th call on (picklable for spawn)."""

    def __init__(self, n: int):
        self.n, self.calls = n, 0

    def __call__(self) -> bool:
        self.calls += 1
        return int(os.environ["RANK"]) == 1 and self.calls >= self.n


def _ddp_stop_worker(rank: int, world: int, port: int, spec_path: str, out: str, results) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from dimr_lab.train.trainer import train_run

    results.put((rank, train_run(load_run_spec(spec_path), Path(out), should_stop=_RankOneStopsFrom(2),
                                 progress=False)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(300)
def test_ddp_two_processes_match_one(tmp_path):
    from dimr_lab.train.trainer import train_run

    spec_path = tiny_spec_file(tmp_path, steps=4, ckpt=4)
    train_run(load_run_spec(spec_path), tmp_path / "one", progress=False)
    torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), str(spec_path), str(tmp_path / "two")),
                                nprocs=2, join=True)
    a, b = load_ckpt(tmp_path / "one"), load_ckpt(tmp_path / "two")
    assert b["world_size"] == 2 and a["step"] == b["step"] == 4
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-4, atol=1e-5, msg=k)
    la = [json.loads(x)["loss"] for x in (tmp_path / "one" / "log.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    assert la == pytest.approx(lb, rel=1e-5)
    assert [p.name for p in evals(tmp_path / "two")] == [p.name for p in evals(tmp_path / "one")]
    assert (evals(tmp_path / "two")[0] / "metrics.json").exists()  # the evaluation finished too


@pytest.mark.timeout(300)
def test_ddp_ranks_agree_on_a_stop_at_the_same_step_without_asking_every_step(tmp_path):
    """One rank asks to stop after its first step; the ranks agree only every STOP_CHECK_EVERY steps (agreeing
    is a host sync), so both stop together at that step with one checkpoint, and resuming finishes the run."""
    from dimr_lab.train.trainer import STOP_CHECK_EVERY, train_run

    steps = STOP_CHECK_EVERY + 2
    spec_path = tiny_spec_file(tmp_path, steps=steps, ckpt=steps)
    ctx = torch.multiprocessing.get_context("spawn")
    results = ctx.SimpleQueue()
    torch.multiprocessing.spawn(_ddp_stop_worker, args=(2, _free_port(), str(spec_path), str(tmp_path / "two"),
                                                        results), nprocs=2, join=True)
    got = dict(results.get() for _ in range(2))
    assert got[0] == got[1] == {"interrupted": True, "step": STOP_CHECK_EVERY}
    assert load_ckpt(tmp_path / "two")["step"] == STOP_CHECK_EVERY
    train_run(load_run_spec(spec_path), tmp_path / "two", progress=False)  # one process resumes it to the end
    assert load_ckpt(tmp_path / "two")["step"] == steps


def test_a_damaged_last_checkpoint_and_index_fall_back_to_a_kept_file_on_disk(tmp_path, capsys):
    """The fall-back to a kept checkpoint read the kept steps from index.json only: with the index damaged too,
    the good kept file on disk was ignored and the run could not resume."""
    from dimr_lab.train.trainer import train_run

    toml = tiny_spec_file(tmp_path, steps=6, ckpt=2)
    spec = load_run_spec(toml, [("train.keep_checkpoints", [2]), ("train.steps", 4)])
    train_run(spec, tmp_path / "run", progress=False)
    (tmp_path / "run" / "checkpoints" / "last.pt").write_bytes(b"damaged")
    (tmp_path / "run" / "checkpoints" / "index.json").write_text("{not json")
    capsys.readouterr()
    assert cli("train", toml, "--out", tmp_path / "run", "--no-progress") == 0
    assert "resuming from the kept checkpoint step-00000002.pt (step 2)" in capsys.readouterr().err
    assert load_ckpt(tmp_path / "run")["step"] == 6


def test_only_the_first_process_of_a_job_says_it_stopped_or_fell_back(tmp_path, capsys, monkeypatch):
    """Every process of a job gets the signal, falls back from a damaged last.pt and returns the stop: each
    said so, one copy of every line per process. Only rank 0 speaks now."""
    import dimr_lab.cli.train_cmds as train_cmds
    from dimr_lab.dist import DistInfo
    from dimr_lab.rundir import RunDir
    from dimr_lab.train.trainer import Trainer, train_run

    toml = tiny_spec_file(tmp_path, steps=6, ckpt=2)
    spec = load_run_spec(toml, [("train.keep_checkpoints", [2]), ("train.steps", 4)])
    train_run(spec, tmp_path / "run", progress=False)
    (tmp_path / "run" / "checkpoints" / "last.pt").write_bytes(b"damaged")
    capsys.readouterr()
    said = {}
    for rank in (0, 1):
        trainer = Trainer(spec, RunDir(tmp_path / "run"), DistInfo(rank, 1, 0, torch.device("cpu"), False), None,
                          False)
        trainer.build()
        assert trainer.resume() and trainer.step == 2
        said[rank] = capsys.readouterr().err
    assert "resuming from the kept checkpoint step-00000002.pt" in said[0] and said[1] == ""

    monkeypatch.setattr("dimr_lab.train.trainer.train_run", lambda *a, **k: {"interrupted": True, "step": 3})
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    try:
        for rank in ("0", "1"):
            monkeypatch.setenv("RANK", rank)
            assert cli("train", toml, "--out", tmp_path / "run", "--no-progress") == 130
            train_cmds._Stop()._set(signal.SIGTERM, None)
            said[rank] = capsys.readouterr().err
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert "stopped at step 3" in said["0"] and "SIGTERM: stopping" in said["0"] and said["1"] == ""
    # and `eval`, stopped in the middle of its sampling
    monkeypatch.setattr("dimr_lab.eval.command.evaluate_run", lambda *a, **k: [{"interrupted": True}])
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        assert cli("eval", tmp_path / "run") == 130
        said[rank] = capsys.readouterr().err
    assert "stopped; the samples made so far are kept" in said["0"] and said["1"] == ""


def test_a_process_of_the_job_dying_is_one_line_on_the_others(tmp_path, capsys, monkeypatch):
    """The survivors' next all-reduce failed with a page of gloo's traceback; now one line naming the checkpoint
    a rerun resumes from, exit status 1. Alone, a RuntimeError stays what it is."""
    toml = tiny_spec_file(tmp_path, steps=4, ckpt=2)
    assert cli("train", toml, "--out", tmp_path / "run", "--no-progress") == 0
    capsys.readouterr()
    gloo = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:53671: "
                        "Connection reset by peer. This is typically caused by a remote worker hanging")

    def dies(*args, **kwargs):
        raise gloo

    monkeypatch.setattr("dimr_lab.train.trainer.train_run", dies)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli("train", toml, "--out", tmp_path / "run", "--no-progress") == 1
    err = capsys.readouterr().err.strip()
    assert err == (f"error: {tmp_path / 'run'}: another process of this job stopped (Read error [127.0.0.1]:53671: "
                   f"Connection reset by peer); its checkpoint of step 4 is kept: run the job again to resume")
    monkeypatch.setattr("dimr_lab.eval.command.evaluate_run", dies)
    assert cli("eval", tmp_path / "run") == 1 and "another process of this job stopped" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(RuntimeError, match="Connection reset by peer"):
        cli("train", toml, "--out", tmp_path / "run", "--no-progress")


@pytest.mark.timeout(400)
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["dies", "hangs"])
def test_the_survivor_of_a_dead_or_hung_process_stops_within_the_timeout_with_one_line(tmp_path, sig):
    """A process of a two-process job is killed (its connection closes) or stopped (it hangs, as one on a machine
    that is gone does) mid-training: the other waited up to the 600 s of every collective; with
    $DIMR_LAB_DIST_TIMEOUT_S lowered it stops within it, with one line naming the checkpoint kept, exit 1."""
    toml = tiny_spec_file(tmp_path, steps=100000, ckpt=5)
    out = tmp_path / "run"
    env = dict(child_env(), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               DIMR_LAB_DIST_TIMEOUT_S="3")
    procs = [subprocess.Popen(cli_cmd("train", toml, "--out", out, "--no-progress"),
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for r in range(2)]
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not (out / "checkpoints" / "last.pt").exists():
            assert procs[0].poll() is None, procs[0].communicate()[1].decode()[-2000:]
            time.sleep(0.1)
        procs[1].send_signal(sig)
        t0 = time.time()
        _, err = procs[0].communicate(timeout=120)  # well under the 600 s a hung peer cost
        waited = time.time() - t0
    finally:
        for p in procs:
            p.kill()
            p.wait()
    lines = err.decode().strip().splitlines()
    assert procs[0].returncode == 1 and len(lines) == 1, err.decode()[-3000:]
    assert lines[0].startswith(f"error: {out}: another process of this job stopped (")
    assert "its checkpoint of step" in lines[0] and "run the job again to resume" in lines[0]
    assert waited < 3 + 60
    if sig == signal.SIGSTOP:
        assert "Timed out" in lines[0] and "$DIMR_LAB_DIST_TIMEOUT_S" in lines[0]


def test_a_bad_dist_timeout_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    toml = tiny_spec_file(tmp_path, steps=2, ckpt=2)
    for bad in ("ten", "0", "nan", "-5"):
        monkeypatch.setenv("DIMR_LAB_DIST_TIMEOUT_S", bad)
        assert cli("train", toml, "--out", tmp_path / "run", "--no-progress") == 2
        err = capsys.readouterr().err.strip()
        assert err == f"error: $DIMR_LAB_DIST_TIMEOUT_S: seconds from 1 to 86400, got {bad!r}", err
        assert not (tmp_path / "run").exists()
    monkeypatch.setenv("DIMR_LAB_DIST_TIMEOUT_S", " 30 ")
    from dimr_lab.dist import timeout_s

    assert timeout_s() == 30.0 and timeout_s({}) == 600.0


def test_flipped_pixel_batches_in_process_draw_from_the_global_stream_as_before():
    """Seeding every item's read (as latents need) cost about 5 ms a batch of 32 and changed the flips, so what
    every existing run of a flipped pixel dataset trains on; in-process reads of such datasets stay dataset[i]
    on the global RNG's stream, which checkpoints restore."""
    from dimr_lab.data import build_dataset
    from dimr_lab.spec.run_spec import DataSpec
    from dimr_lab.train.loop import BatchOrder, batch_iterator

    ds = build_dataset(DataSpec(name="shapes", image_size=8, train_size=64, flip=True))
    order = BatchOrder(len(ds), 16, seed=3)
    torch.manual_seed(11)
    got = [next(batch_iterator(ds, order, 0, 1))[0] for _ in range(1)][0]
    torch.manual_seed(11)
    want = torch.stack([ds[int(i)][0] for i in order.copy().next()])
    assert torch.equal(got, want)
    assert not torch.equal(want, torch.stack([ds.batch([int(i)])[0][0] for i in order.copy().next()]))  # flips drawn


@pytest.mark.parametrize("workers", [0, 1])
def test_latent_posterior_samples_do_not_depend_on_the_rank_or_worker_that_reads_them(tmp_path, workers):
    """Every rank seeds torch's global RNG alike, and a latents item drew its posterior sample from it: rank 1's
    items got the noise rank 0's got, so two processes trained on another batch than one. An item's draw now
    follows (seed, epoch, index): the ranks' slices put together are the one-process batch."""
    import numpy as np

    from dimr_lab.data import build_dataset
    from dimr_lab.spec.run_spec import DataSpec
    from dimr_lab.train.loop import BatchOrder, batch_iterator

    (tmp_path / "lat").mkdir()
    for i in range(8):  # the released layout: (moments = mean and log-variance on channels, label); std 1
        pair = np.empty(2, dtype=object)
        pair[0] = np.concatenate([np.full((4, 4, 4), float(i), np.float32), np.zeros((4, 4, 4), np.float32)])
        pair[1] = np.int64(i % 2)
        np.save(tmp_path / "lat" / f"{i}.npy", pair)
    ds = build_dataset(DataSpec(name="latents", root=str(tmp_path / "lat"), image_size=4, num_classes=2))

    def first_batch(rank: int, world: int, num_workers: int) -> torch.Tensor:
        torch.manual_seed(0)  # as every rank's trainer does
        return next(batch_iterator(ds, BatchOrder(len(ds), 8, seed=3), rank, world, num_workers))[0]

    one = first_batch(0, 1, 0)
    assert torch.equal(torch.cat([first_batch(r, 2, workers) for r in (0, 1)]), one)
    from dimr_lab.train.loop import read_item

    assert torch.equal(read_item(ds, 3, 0, 5)[0], read_item(ds, 3, 0, 5)[0])
    assert not torch.equal(read_item(ds, 3, 0, 5)[0], read_item(ds, 3, 1, 5)[0])  # a new epoch, a new sample


# ---------------------------------------------------------------- refusals

def test_different_spec_is_refused(done_run, capsys):
    spec = json.loads((done_run / "spec.json").read_text())
    before = (done_run / "spec.json").read_bytes()
    toml = tiny_spec_file(done_run.parent, steps=4, ckpt=2)
    assert cli("train", toml, "--out", done_run, "--set", "train.lr=0.5", "--no-progress") == 2
    err = capsys.readouterr().err
    assert "holds another run" in err and "train.lr" in err and err.count("\n") == 1
    assert (done_run / "spec.json").read_bytes() == before and spec["format"] == "dimr-lab-spec/1"
    # the same spec again: done already, nothing retrained
    mtime = (done_run / "checkpoints" / "last.pt").stat().st_mtime_ns
    assert cli("train", toml, "--out", done_run, "--no-progress") == 0
    assert (done_run / "checkpoints" / "last.pt").stat().st_mtime_ns == mtime


def _interrupted_run(tmp: Path) -> tuple[Path, Path]:
    from dimr_lab.train.trainer import train_run

    toml = tiny_spec_file(tmp, steps=6, ckpt=100)
    calls = {"n": 0}

    def stop() -> bool:
        calls["n"] += 1
        return calls["n"] > 2

    assert train_run(load_run_spec(toml), tmp / "run", should_stop=stop, progress=False)["interrupted"]
    return toml, tmp / "run"


def _snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def test_corrupt_checkpoint_is_refused_untouched(tmp_path, capsys):
    toml, run = _interrupted_run(tmp_path)
    ckpt = run / "checkpoints" / "last.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])  # a truncated file
    before = _snapshot(run)
    assert cli("train", toml, "--out", run, "--no-progress") == 2
    err = capsys.readouterr().err
    assert str(ckpt) in err and "corrupt" in err
    assert _snapshot(run) == before  # nothing half-resumed, nothing rewritten


def test_mismatching_checkpoint_is_refused(tmp_path, capsys):
    toml, run = _interrupted_run(tmp_path)
    ckpt = run / "checkpoints" / "last.pt"
    state = torch.load(ckpt, weights_only=True)
    state["model"] = {k: v[..., :1] if v.dim() else v for k, v in state["model"].items()}  # wrong shapes
    torch.save(state, ckpt)
    before = _snapshot(run)
    assert cli("train", toml, "--out", run, "--no-progress") == 2
    assert str(ckpt) in capsys.readouterr().err
    assert _snapshot(run) == before
    state["format"] = "something-else"
    torch.save(state, ckpt)
    assert cli("sample", run, "--n", "2", "--out", tmp_path / "g.png") == 2
    assert "not a dimr-lab checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["numpy keys a list", "noise state a string", "window of strings",
                                    "elapsed time a string", "data position past the data",
                                    "data position before it"])
def test_a_checkpoint_with_odd_contents_is_one_line(tmp_path, capsys, damage):
    toml, run = _interrupted_run(tmp_path)
    ckpt = run / "checkpoints" / "last.pt"
    state = torch.load(ckpt, weights_only=True)
    if damage == "numpy keys a list":
        state["rng"]["numpy"]["keys"] = [1, 2, 3]
    elif damage == "noise state a string":
        state["rng"]["noise"] = "x"
    elif damage == "elapsed time a string":
        state["elapsed_s"] = "x"
    elif damage == "data position past the data":  # 96 items: it would have read another run's batches
        state["data_position"] = {"epoch": 0, "index": 10**6}
    elif damage == "data position before it":  # no batch at all: a traceback mid-run
        state["data_position"] = {"epoch": -1, "index": 0}
    else:  # an odd loss window is ignored (the window starts empty), never a failure
        state["log_window"] = {"loss": ["a"], "steps": "b"}
    torch.save(state, ckpt)
    before = _snapshot(run)
    code = cli("train", toml, "--out", run, "--no-progress")
    err = capsys.readouterr().err
    if damage == "window of strings":
        assert code == 0, err
        return
    assert code == 2 and str(ckpt) in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert _snapshot(run) == before


def test_a_run_refused_while_building_leaves_no_folder(tmp_path, capsys):
    """A failure found only once the data is read (three class folders, two label rows) leaves nothing."""
    from PIL import Image

    for c in ("a", "b", "c"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (16, 16), (40 * i, 80, 120)).save(tmp_path / "imgs" / c / f"{i}.png")
    toml = tiny_spec_file(tmp_path)
    out = tmp_path / "new" / "run"
    code = cli("train", toml, "--out", out, "--no-progress", "--set", 'data.name="folder"',
               "--set", f'data.root="{tmp_path / "imgs"}"', "--set", "model.num_classes=2")
    err = capsys.readouterr().err
    assert code == 2 and "3 classes" in err, err
    assert not out.exists()
    # a folder that was there before keeps being there (only what this call made goes)
    out.mkdir()
    assert cli("train", toml, "--out", out, "--no-progress", "--set", 'data.name="folder"',
               "--set", f'data.root="{tmp_path / "imgs"}"',
               "--set", "model.num_classes=2") == 2
    assert out.is_dir()


def test_a_diverged_run_stops_and_keeps_its_last_finite_checkpoint(tmp_path, monkeypatch):
    """A NaN loss stops the run with one line; no checkpoint of the diverged weights replaces the last one."""
    import dimr_lab.diffusion.training as training
    from dimr_lab.errors import UserError
    from dimr_lab.train.trainer import train_run

    real, calls = training.training_loss, {"n": 0}

    def diverging(*args, **kwargs):
        loss, per = real(*args, **kwargs)
        calls["n"] += 1
        return (loss * float("nan"), per) if calls["n"] > 3 else (loss, per)

    monkeypatch.setattr(training, "training_loss", diverging)
    spec = tiny_spec(tmp_path, steps=8, ckpt=2, overrides=[("train.log_every", 3)])
    with pytest.raises(UserError, match=r"training loss is nan by step 4 \(before its checkpoint\); the "
                                        r"checkpoint of step 2 is kept"):
        train_run(spec, tmp_path / "run", progress=False)
    assert load_ckpt(tmp_path / "run")["step"] == 2
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 3]
    # found at a log row too (rows every step, checkpoints every 4)
    calls["n"] = 0
    spec = tiny_spec(tmp_path, steps=8, ckpt=4, overrides=[("train.log_every", 1)])
    with pytest.raises(UserError, match="training loss is nan by step 4 \\(log.jsonl\\); no checkpoint"):
        train_run(spec, tmp_path / "run2", progress=False)


def test_weights_that_went_non_finite_in_a_checkpoint_step_are_not_saved(tmp_path, monkeypatch):
    """The update after the loss made a weight NaN in a checkpoint's own step: the loss was finite, so the
    checkpoint of weights that can never resume replaced the last good one."""
    from dimr_lab.errors import UserError
    from dimr_lab.train.trainer import Trainer, train_run

    real = Trainer._update

    def update(self, loss):
        real(self, loss)
        if self.step == 3:  # the update that makes step 4, a checkpoint step
            with torch.no_grad():
                next(self.model.parameters()).view(-1)[0] = float("nan")

    monkeypatch.setattr(Trainer, "_update", update)
    spec = tiny_spec(tmp_path, steps=8, ckpt=2, overrides=[("train.log_every", 8)])
    with pytest.raises(UserError, match=r"the weights hold NaN or inf by step 4 \(.+\); the checkpoint of step 2 is "
                                        r"kept"):
        train_run(spec, tmp_path / "run", progress=False)
    assert load_ckpt(tmp_path / "run")["step"] == 2


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    toml, run = _interrupted_run(tmp_path)
    (run / "checkpoints" / "last.pt").unlink()
    assert cli("sample", run, "--n", "2", "--out", tmp_path / "g.png") == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "g.png").exists()
    assert cli("sample", tmp_path, "--n", "2", "--out", tmp_path / "g.png") == 2
    assert "not a run folder" in capsys.readouterr().err


# ---------------------------------------------------------------- maths

def test_lr_warmup_linear_then_constant(done_run):
    from dimr_lab.train.loop import lr_at

    assert [lr_at(s, 1e-3, 4) for s in range(6)] == pytest.approx([0, 2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3])
    assert lr_at(0, 1e-3, 0) == 1e-3
    rows = [json.loads(x) for x in (done_run / "log.jsonl").read_text().splitlines()]
    # warmup_steps = 3: updates 0..3 run at 0, 1/3, 2/3, 1 of lr (a row logs the lr of its last update)
    assert [r["lr"] for r in rows] == pytest.approx([0.0, 1e-3 / 3, 2e-3 / 3, 1e-3])


def test_loop_cosine_lr_closed_form():
    import math
    from dataclasses import replace

    from dimr_lab.spec.run_spec import TrainSpec
    from dimr_lab.train.loop import learning_rate

    tr = replace(TrainSpec(), lr_schedule="cosine", lr=1e-3, lr_min=1e-5, warmup_steps=4, steps=12)
    lr = lambda s: learning_rate(s, tr)  # noqa: E731
    assert [lr(s) for s in range(5)] == pytest.approx([0.0, 2.5e-4, 5e-4, 7.5e-4, 1e-3])  # linear warm-up
    # cosine over the 8 updates after warm-up: lr_min + (lr - lr_min) (1 + cos(pi k / 8)) / 2
    for k in range(9):
        want = 1e-5 + (1e-3 - 1e-5) * (1 + math.cos(math.pi * k / 8)) / 2
        assert lr(4 + k) == pytest.approx(want, rel=1e-12)
    assert lr(8) == pytest.approx((1e-3 + 1e-5) / 2) and lr(12) == pytest.approx(1e-5)
    assert lr(13) == pytest.approx(1e-5) and lr(100) == pytest.approx(1e-5)  # stays at lr_min past train.steps
    assert learning_rate(7, replace(tr, lr_schedule="constant")) == 1e-3


def test_loop_build_optimizer_takes_the_specs_betas_lr_and_weight_decay():
    from dimr_lab.train.loop import build_optimizer

    model = torch.nn.Linear(3, 2)
    opt = build_optimizer(model, lr=3e-4, betas=(0.9, 0.95), weight_decay=0.05)
    assert isinstance(opt, torch.optim.AdamW)
    for group in opt.param_groups:
        assert group["betas"] == (0.9, 0.95) and group["lr"] == 3e-4
    assert max(group["weight_decay"] for group in opt.param_groups) == 0.05


def test_loop_ema_decay_warm_up():
    from dimr_lab.train.loop import ema_decay_at

    # TensorFlow's num_updates rule: min(decay, (1 + n) / (10 + n))
    assert [ema_decay_at(n, 0.9999, True) for n in (0, 8, 90)] == pytest.approx([0.1, 0.5, 0.91])
    assert ema_decay_at(10**6, 0.9999, True) == 0.9999  # the cap takes over
    assert ema_decay_at(0, 0.9999, False) == 0.9999  # no warm-up: the decay from update 0


@pytest.mark.parametrize("warmup", [True, False])
def test_the_trainer_warms_the_ema_decay_up_when_asked(tmp_path, monkeypatch, warmup):
    """train.ema_warmup reaches the EMA: update n averages with min(ema_decay, (1 + n) / (10 + n))."""
    import dimr_lab.train.trainer as trainer

    seen = []
    monkeypatch.setattr(trainer.EMA, "update", lambda self, decay: seen.append(decay))
    trainer.train_run(tiny_spec(tmp_path, steps=3, ckpt=3, overrides=[("train.ema_warmup", warmup)]),
                      tmp_path / "run", progress=False)
    want = [min(0.9, (1 + n) / (10 + n)) for n in range(3)] if warmup else [0.9] * 3
    assert seen == pytest.approx(want)


def test_loop_batch_order_epochs_resume_and_rank_slices():
    import numpy as np

    from dimr_lab.errors import UserError
    from dimr_lab.train.loop import BatchOrder, rank_slice

    order = BatchOrder(11, 5, seed=7)  # two full batches per epoch; the 11th item is dropped each epoch
    batches = [order.next() for _ in range(6)]
    for e in range(3):
        first, second = batches[2 * e], batches[2 * e + 1]
        both = np.concatenate([first, second])
        assert len(set(both.tolist())) == 10 and set(both.tolist()) <= set(range(11))  # no item twice in an epoch
        assert np.array_equal(both, order.perm(e)[:10])  # the epoch's permutation, from its start
    assert not np.array_equal(order.perm(0), order.perm(1))  # each epoch is shuffled anew
    assert order.state() == {"epoch": 2, "index": 10}
    # resuming from the two-integer state continues with exactly the next batches
    resumed = BatchOrder(11, 5, seed=7, **BatchOrder(11, 5, seed=7, epoch=1, index=5).state())
    assert np.array_equal(resumed.next(), batches[3])
    mid = BatchOrder(11, 5, seed=7)
    mid.next()
    assert np.array_equal(mid.copy().next(), batches[1])
    assert np.array_equal(BatchOrder(5, 5, seed=0).next(), np.random.default_rng([0, 0]).permutation(5))
    with pytest.raises(UserError):
        BatchOrder(4, 5, seed=0)
    # a rank takes a contiguous share, as Draws.slice does for the noise: items and draws stay paired
    g = np.arange(8)
    assert [rank_slice(g, r, 2).tolist() for r in (0, 1)] == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_ema_update_maths():
    from dimr_lab.train.loop import EMA

    model, ema = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    e0 = {k: v.clone() for k, v in ema.state_dict().items()}
    step = EMA(ema, model)
    step.update(0.9)
    for k, v in ema.state_dict().items():
        torch.testing.assert_close(v, 0.9 * e0[k] + 0.1 * model.state_dict()[k])
    step.update(0.0)  # decay 0 copies
    assert_state_equal(ema.state_dict(), model.state_dict())


def test_the_trainers_ema_follows_in_place_updates_of_the_model():
    """The EMA object gathers its parameter lists once: it must see every optimizer step and a loaded state."""
    from dimr_lab.train.loop import EMA

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    ema = copy.deepcopy(model).requires_grad_(False)
    step, opt = EMA(ema, model), torch.optim.AdamW(model.parameters(), lr=0.1)
    want = {k: v.clone() for k, v in ema.state_dict().items()}
    for _ in range(3):
        model(torch.randn(5, 3)).square().sum().backward()
        opt.step()
        opt.zero_grad()
        step.update(0.5)
        for k, v in model.state_dict().items():
            want[k] = 0.5 * want[k] + 0.5 * v if v.is_floating_point() and "running" not in k else v.clone()
        got = ema.state_dict()
        assert got.keys() == want.keys() and all(torch.allclose(got[k].double(), want[k].double()) for k in want)
    model.load_state_dict({k: torch.zeros_like(v) for k, v in model.state_dict().items()})
    step.update(0.0)
    assert all(not v.any() for v in ema.state_dict().values())
    with pytest.raises(ValueError, match="EMA of"):
        EMA(torch.nn.Linear(3, 4), model)


def test_optimizer_groups_free_td_norms_biases():
    from dimr_lab.nn.network import build_model, optimizer_param_groups
    from dimr_lab.nn.time_dependent import TimeDependentParameter

    model = build_model({"preset": "dimr_tiny_2r", "image_size": 16,
                         "branches": [{"width": 32, "depth": 2, "heads": 2}, {"width": 16, "depth": 1}]})
    decay, free = optimizer_param_groups(model, 0.03)
    assert decay["weight_decay"] == 0.03 and free["weight_decay"] == 0.0
    free_ids = {id(p) for p in free["params"]}
    decay_ids = {id(p) for p in decay["params"]}
    assert not free_ids & decay_ids and len(free_ids | decay_ids) == len(list(model.parameters()))
    td = [m for m in model.modules() if isinstance(m, TimeDependentParameter)]
    assert td and all(id(m.w) in free_ids and id(m.b) in free_ids for m in td)
    for name, p in model.named_parameters():
        if name.endswith(".bias"):
            assert id(p) in free_ids, name
    linear_weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linear_weights and all(id(w) in decay_ids for w in linear_weights)


# ---------------------------------------------------------------- files and the sample command

def test_run_files_have_the_keys(done_run):
    assert {"spec.json", "run.json", "log.jsonl", "loss.png", "checkpoints", "evals"} <= \
        {p.name for p in done_run.iterdir()}
    row = json.loads((done_run / "log.jsonl").read_text().splitlines()[-1])
    assert {"step", "loss", "loss_branches", "lr", "images_per_s", "gmacs_per_s"} <= row.keys()
    assert len(row["loss_branches"]) == 2
    (ev,) = evals(done_run)
    assert {"eval.json", "metrics.json", "samples.png"} <= {p.name for p in ev.iterdir()}
    m = json.loads((ev / "metrics.json").read_text())
    for key in ("params", "gmacs", "train_images_per_s", "step", "samples", "settings", "versions", "git_commit",
                "git_dirty", "identity", "eval_hash", "sample_s"):
        assert key in m, key
    assert m["step"] == 4 and m["params"] > 0 and m["train_images_per_s"] > 0 and m["enabled"] is False
    assert {"sampler", "steps", "guidance_scale", "guidance_form", "use_ema", "seed"} <= m["settings"]["sample"].keys()
    assert {"python", "torch", "dimr_lab"} <= m["versions"].keys()
    from dimr_lab.provenance import machine

    assert m["machine"] == machine()  # where it was evaluated (CPU here: no accelerator)
    assert json.loads((done_run / "sessions.json").read_text())["sessions"][0]["machine"] == machine()
    ckpt = load_ckpt(done_run)
    assert ckpt["format"] == "dimr-lab/2" and ckpt["step"] == 4 and ckpt["identity"] == m["identity"]
    assert {"torch", "numpy", "python", "noise"} <= ckpt["rng"].keys()
    assert {"epoch", "index"} <= ckpt["data_position"].keys()


def test_sample_command_writes_png(done_run, tmp_path):
    out = tmp_path / "grid.png"
    assert cli("sample", done_run, "--n", "5", "--out", out, "--steps", "2", "--guidance", "0.5") == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # never over an existing file without --force, and only to a .png name
    keep = tmp_path / "keep.txt"
    keep.write_text("mine")
    assert cli("sample", done_run, "--n", "2", "--out", keep, "--steps", "2") == 2 and keep.read_text() == "mine"
    before = out.read_bytes()
    assert cli("sample", done_run, "--n", "2", "--out", out, "--steps", "2") == 2 and out.read_bytes() == before
    assert cli("sample", done_run, "--n", "2", "--out", out, "--steps", "2", "--force") == 0
    assert out.read_bytes() != before


def test_save_grid_accepts_both_layouts(tmp_path):
    from dimr_lab.images import write_grid

    imgs = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)
    write_grid(imgs, tmp_path / "a.png", [0, 1, 2], class_names=["a", "b", "c"])
    write_grid(imgs.permute(0, 2, 3, 1), tmp_path / "b.png")
    assert (tmp_path / "a.png").stat().st_size > 0 and (tmp_path / "b.png").stat().st_size > 0


def test_eval_results_reach_metrics(tmp_path, monkeypatch):
    """evaluate() gets class-balanced uint8 samples; its numbers land in metrics.json, arrays beside it."""
    import numpy as np

    import dimr_lab.eval
    from dimr_lab.train.trainer import train_run

    seen = {}

    def fake_evaluate(samples, labels, data_spec, eval_spec, *, cache_dir, seed=0, **kw):
        seen.update(samples=samples, labels=labels, cache_dir=cache_dir)
        return {"fid": 12.5, "kid_mean": 0.25, "kid_std": 0.01, "isc_mean": 3.0, "sample_accuracy": 0.75,
                "distortion_rate": 0.125, "class_prob": np.full(len(labels), 0.5, np.float32)}

    monkeypatch.setattr(dimr_lab.eval, "evaluate", fake_evaluate)
    monkeypatch.setenv("DIMR_LAB_CACHE", str(tmp_path / "cache"))
    spec = tiny_spec(tmp_path, steps=2, ckpt=2, overrides=[("eval.enabled", True), ("eval.samples", 10)])
    m = train_run(spec, tmp_path / "run", progress=False)
    assert seen["samples"].dtype == torch.uint8 and tuple(seen["samples"].shape) == (10, 3, 16, 16)
    assert torch.bincount(seen["labels"]).tolist() == [2, 2, 1, 1, 1, 1, 1, 1]
    assert seen["cache_dir"] == tmp_path / "cache"
    (ev,) = evals(tmp_path / "run")
    disk = json.loads((ev / "metrics.json").read_text())
    assert disk["fid"] == m["fid"] == 12.5 and disk["kid"] == 0.25 and disk["sample_accuracy"] == 0.75
    assert disk["samples"] == 10 and "class_prob" not in disk
    assert np.load(ev / "per_sample.npz")["class_prob"].shape == (10,)


def test_samples_use_the_datasets_classes_when_the_network_has_more(tmp_path, monkeypatch):
    """data.num_classes 4 on an 8-class network: the grid and the evaluated samples ask for classes 0..3 only."""
    import dimr_lab.eval
    from dimr_lab.train.trainer import train_run

    seen = {}

    def fake_evaluate(samples, labels, data_spec, eval_spec, *, cache_dir, seed=0, **kw):
        seen["labels"] = labels
        return {"sample_accuracy": 1.0}

    monkeypatch.setattr(dimr_lab.eval, "evaluate", fake_evaluate)
    spec = tiny_spec(tmp_path, steps=1, ckpt=1, overrides=[("eval.enabled", True), ("eval.samples", 12),
                                                           ("data.num_classes", 4)])
    assert spec.model.num_classes == 8
    train_run(spec, tmp_path / "run", progress=False)
    assert torch.bincount(seen["labels"]).tolist() == [3, 3, 3, 3]


def test_thread_governor_gives_a_busy_core_away_and_takes_it_back(monkeypatch):
    """train.threads = 0: every core while others are idle, one fewer per core other processes keep busy."""
    import dimr_lab.train.threads as th

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(th, "usable_cores", lambda: 2)
    samples = iter([])
    clock = {"t": 0.0}

    def fake_sample(self):
        busy, total, own = next(samples)
        return busy, total, own, clock["t"]

    monkeypatch.setattr(th.ThreadGovernor, "_sample", fake_sample)
    monkeypatch.setattr(th.time, "sleep", lambda s: None)
    set_to = []
    monkeypatch.setattr(th.torch, "set_num_threads", lambda n: set_to.append(n))
    monkeypatch.setattr(th.torch, "get_num_threads", lambda: set_to[-1] if set_to else 2)
    # start: over 100 jiffies of 2 cores, others used 95 (one core): one thread
    samples = iter([(0, 0, 0), (95, 200, 0)])
    gov = th.ThreadGovernor(0, every_s=5.0)
    assert gov.threads == 1 and set_to == [1]
    # 5 s later the other process is gone: this run used its core alone -> both cores again
    clock["t"] = 6.0
    samples = iter([(95 + 100, 200 + 200, 100)])
    assert gov.tick() == 2 and set_to == [1, 2]
    # an explicit count is kept whatever the load
    samples = iter([])
    assert th.ThreadGovernor(3).threads == 3 and set_to[-1] == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert not th.ThreadGovernor(0).auto


def test_thread_governor_reads_only_the_cores_it_may_run_on(tmp_path):
    """On a node shared by pinning, cores outside this process's affinity do not count as load."""
    import dimr_lab.train.threads as th

    stat = tmp_path / "stat"
    # user nice system idle iowait ...: cpu0 and cpu1 idle, cpu2 and cpu3 fully busy
    stat.write_text("cpu  400 0 0 400 0 0 0\n"
                    "cpu0 0 0 0 200 0 0 0\ncpu1 0 0 0 200 0 0 0\n"
                    "cpu2 200 0 0 0 0 0 0\ncpu3 200 0 0 0 0 0 0\n"
                    "intr 12345\nctxt 678\n")
    assert th._total_busy_jiffies(None, str(stat)) == (400.0, 800.0)
    assert th._total_busy_jiffies(frozenset({0, 1}), str(stat)) == (0.0, 400.0)
    assert th._total_busy_jiffies(frozenset({1, 3}), str(stat)) == (200.0, 400.0)
    assert th._total_busy_jiffies(frozenset({7}), str(stat)) is None  # no line for it: unknown, not idle
    stat.write_text("garbage\n")
    assert th._total_busy_jiffies(None, str(stat)) is None


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_compiled_training_on_the_cpu_follows_the_eager_run(tmp_path):
    """train.compile = true on the CPU (each block compiled) trains the same run as the eager path
    within float rounding: the same losses step by step, checkpoints with the plain parameter names."""
    from dimr_lab.train.trainer import train_run

    torch.set_num_threads(1)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    for name, compile_ in (("eager", False), ("compiled", True)):
        train_run(tiny_spec(tmp_path, steps=4, ckpt=4, overrides=[("train.compile", compile_)]), tmp_path / name,
                  progress=False)
    la, lb = ([json.loads(x)["loss"] for x in (tmp_path / n / "log.jsonl").read_text().splitlines()]
              for n in ("eager", "compiled"))
    counters = torch._dynamo.utils.counters
    assert counters["stats"]["unique_graphs"] >= 1  # the compiled run did compile
    assert counters["frames"]["total"] == counters["frames"]["ok"]  # and left no block eager
    assert len(la) == len(lb) == 4
    assert la == pytest.approx(lb, rel=1e-4, abs=1e-6)
    a, b = load_ckpt(tmp_path / "eager"), load_ckpt(tmp_path / "compiled")
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-3, atol=1e-5, msg=k)


def test_a_missing_compiler_for_the_evaluation_stops_training_before_it_starts(tmp_path, monkeypatch):
    """eval.compile on the CPU without a C++ compiler: train_run evaluates after training, so the preflight
    refuses before step 0 (one line naming eval.compile), not after the training it would waste."""
    import shutil

    from dimr_lab.errors import SpecError
    from dimr_lab.train.trainer import train_run

    monkeypatch.setattr(shutil, "which", lambda name: None)
    spec = tiny_spec(tmp_path, overrides=[("eval.compile", True)])
    with pytest.raises(SpecError, match="eval.compile: torch.compile on the CPU needs a C\\+\\+ compiler"):
        train_run(spec, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "log.jsonl").exists()


def test_an_item_read_seeds_only_the_cpu_generator_it_forks(monkeypatch):
    """read_item seeded each item with torch.manual_seed, which also reseeds every CUDA device (fork_rng with
    devices=[] does not put those back) and, CUDA or not, costs ~75 us an item in torch's lazy CUDA seeding;
    the item's numbers come from the CPU generator alone, seeded with the low 32 bits of its (seed, epoch,
    index) key (all that torch's mt19937 keeps), as before."""
    import numpy as np

    from dimr_lab.train.loop import read_item

    class Draws:  # an item that draws from the global CPU generator, as a latents item does
        draws_per_item = True

        def __getitem__(self, i):
            return torch.randn(4), i

    seeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: seeded.append(seed))
    torch.manual_seed(123)
    before = torch.get_rng_state()
    seeded.clear()
    got = [read_item(Draws(), 3, 2, i)[0] for i in (0, 5, 2**20)]
    assert seeded == [], "an item read reseeded the CUDA generators"
    assert torch.equal(torch.get_rng_state(), before)  # the global stream is put back
    for x, i in zip(got, (0, 5, 2**20)):
        key = int(np.random.SeedSequence([3, 2, i]).generate_state(1, np.uint64)[0])
        want = torch.randn(4, generator=torch.Generator().manual_seed(key % 2**32))  # the numbers of before
        assert torch.equal(x, want)
    assert not torch.equal(got[0], got[1])


def test_the_data_order_depends_on_the_seed_and_epoch_only_and_ranks_split_the_global_batch():
    """BatchOrder: a permutation per (seed, epoch), none shared by two keys of seeds 0-5 and epochs 0-49; the
    same key the same permutation however it is reached (resumed from a position or read through); the ranks'
    slices put together are the global batch."""
    import numpy as np

    from dimr_lab.train.loop import BatchOrder, rank_slice

    perms = {(s, e): BatchOrder(64, 8, s).perm(e) for s in range(6) for e in range(50)}
    assert len({p.tobytes() for p in perms.values()}) == len(perms)
    assert all(sorted(p) == list(range(64)) for p in perms.values())
    through = BatchOrder(64, 8, 3)
    batches = [through.next() for _ in range(8 * 3 + 5)]  # into epoch 3
    resumed = BatchOrder(64, 8, 3, epoch=3, index=32)
    assert np.array_equal(resumed.next(), perms[(3, 3)][32:40]) and np.array_equal(batches[-1], perms[(3, 3)][32:40])
    assert np.array_equal(np.concatenate([rank_slice(batches[-1], r, 4) for r in range(4)]), batches[-1])


def test_a_fresh_start_says_the_specs_notes_once(tmp_path, capsys):
    """A short run whose EMA still holds much of the random initial weights is said when training starts (and
    not again when it resumes); with EMA warm-up there is nothing to say."""
    from dimr_lab.train.trainer import train_run

    toml = tiny_spec_file(tmp_path, steps=4, ckpt=2)  # EMA 0.9 over 4 steps: 66% initial weights
    assert cli("train", toml, "--out", tmp_path / "run", "--set", "train.steps=2") == 0
    err = capsys.readouterr().err
    assert err.count("note: train.ema_decay = 0.9 averages over about 10 steps: at step 2") == 1, err
    assert cli("train", toml, "--out", tmp_path / "run") == 0  # continued to 4 steps
    assert "note:" not in capsys.readouterr().err
    assert cli("train", toml, "--out", tmp_path / "warm", "--set", "train.ema_warmup=true") == 0
    assert "note:" not in capsys.readouterr().err
    train_run(load_run_spec(toml), tmp_path / "quiet", progress=False)  # as --no-progress and library calls
    assert "note:" not in capsys.readouterr().err
