"""The local runner: runs, skips finished runs, resumes unfinished ones, never overwrites; status/cancel.

The trainer is replaced by `standin_train` (same contract as dimr_lab.train.trainer.train_run: resumable,
deterministic, checkpoints, metrics.json at the end, should_stop, DDP through init_distributed), so the
runner's behaviour is tested in seconds. test_slurm.py uses it too.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from dimr_lab.errors import UserError
from conftest import cli

TESTS = Path(__file__).resolve().parent
STANDIN = "test_runner:standin_train"


def _atomic_save(obj, path: Path) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def standin_train(spec, out_dir, *, should_stop=None):
    """A tiny deterministic 'training': SGD on a linear regression, checkpointed, resumable bit-exactly.

    data.train_size == 13 makes it fail (to test failures); $STANDIN_STEP_S sleeps per step."""
    import torch
    import torch.distributed as dist

    from dimr_lab.runner.distributed import init_distributed
    from dimr_lab.runner.state import atomic_write_json, read_json
    from dimr_lab.spec.schema import to_dict

    out_dir = Path(out_dir)
    rank, world, _, _ = init_distributed()
    resolved = to_dict(spec)
    old = read_json(out_dir / "spec.json")
    if old is not None and old != resolved:
        raise UserError(f"{out_dir} holds a different spec")
    if (out_dir / "metrics.json").is_file():
        return json.loads((out_dir / "metrics.json").read_text())
    if spec.data.train_size == 13:
        raise RuntimeError("stand-in failure on purpose")
    if rank == 0:
        atomic_write_json(out_dir / "spec.json", resolved)
    ckpt = out_dir / "checkpoints" / "last.pt"
    gen = torch.Generator().manual_seed(1000 * spec.train.seed + rank)
    w = torch.zeros(4, dtype=torch.float64)
    step, resumed_from = 0, None
    if ckpt.is_file():
        state = torch.load(ckpt, weights_only=False)
        w, step, resumed_from = state["w"], state["step"], state["step"]
        gen.set_state(state["rng"][rank])
    target = torch.arange(1.0, 5.0, dtype=torch.float64)
    sleep = float(os.environ.get("STANDIN_STEP_S", "0"))
    log = out_dir / "log.jsonl"
    if rank == 0 and resumed_from is not None:
        with open(log, "a") as f:
            f.write(json.dumps({"event": "resumed", "from": resumed_from,
                                "restart": os.environ.get("SLURM_RESTART_COUNT")}) + "\n")

    def save():
        rngs = [gen.get_state()]
        if world > 1:
            rngs = [None] * world
            dist.all_gather_object(rngs, gen.get_state())
        if rank == 0:
            _atomic_save({"w": w, "step": step, "rng": rngs}, ckpt)

    while step < spec.train.steps:
        if should_stop is not None and should_stop():
            save()
            return {"interrupted": True, "step": step}
        x = torch.randn(8, 4, generator=gen, dtype=torch.float64)
        grad = 2 * x.T @ (x @ w - x @ target) / len(x)
        if world > 1:
            dist.all_reduce(grad)
            grad /= world
        w = w - spec.train.lr * grad
        step += 1
        if rank == 0:
            with open(log, "a") as f:
                f.write(json.dumps({"step": step, "loss": float(((w - target) ** 2).sum())}) + "\n")
        if step % spec.train.checkpoint_every == 0 or step == spec.train.steps:
            save()
        if sleep:
            time.sleep(sleep)
    check = None
    if world > 1:
        t = torch.tensor([float(rank + 1)])
        dist.all_reduce(t)
        check = float(t.item())
    metrics = {"fid": float(((w - target) ** 2).sum()), "kid": 0.0, "sample_accuracy": 1.0,
               "distortion_rate": 0.0, "params": 4, "gmacs": 0.0, "train_images_per_s": 1.0,
               "steps": step, "wall_s": 0.0, "w": w.tolist(), "world_size": world, "allreduce_check": check}
    if rank == 0:
        atomic_write_json(out_dir / "metrics.json", metrics)
    return metrics if rank == 0 else {"rank": rank}


ABLATION = """
[ablation]
name = "{name}"
seeds = {seeds}
paper = {{ table = "t2", rows = {{ a = 3 }} }}

[base]
"model.preset" = "dimr_tiny_3r"
"train.steps" = {steps}
"train.lr" = 0.05
"train.checkpoint_every" = {ckpt}
"train.warmup_steps" = 0
"eval.enabled" = false

[[variant]]
name = "a"
factors = {{ norm = "TD-LN" }}
"model.norm" = "tdrmsnorm"

[[variant]]
name = "b"
factors = {{ norm = "LN" }}
"model.conditioning" = "token"
"model.norm" = "layernorm"
"model.outer_norm" = "layernorm"
{extra}
[profile.tiny]
[profile.other]
"train.steps" = 3

[slurm]
time_min = 10
cpus_per_task = 1
array_parallelism = 2
"""


def write_ablation(tmp: Path, *, name: str = "abl", seeds: str = "[0, 1]", steps: int = 6, ckpt: int = 2,
                   extra: str = "") -> Path:
    path = tmp / f"{name}.toml"
    path.write_text(ABLATION.format(name=name, seeds=seeds, steps=steps, ckpt=ckpt, extra=extra))
    return path


@pytest.fixture
def standin_env(monkeypatch):
    """Worker processes import the stand-in from this folder."""
    old = os.environ.get("PYTHONPATH", "")
    monkeypatch.setenv("PYTHONPATH", str(TESTS) + (os.pathsep + old if old else ""))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def run_dirs(results: Path, name: str = "abl") -> list[Path]:
    return sorted(p for p in (results / name).iterdir() if p.is_dir() and not p.name.startswith("."))


def test_local_run_skip_and_rerun(tmp_path, capsys, standin_env):
    abl = write_ablation(tmp_path)
    results = tmp_path / "results"
    code, out, err = cli(["run", abl, "--results", results, "--train-fn", STANDIN], capsys)
    assert code == 0, out + err
    dirs = run_dirs(results)
    assert [d.name.split("-")[0] + "-" + d.name.split("-")[1] for d in dirs] == ["a-s0", "a-s1", "b-s0", "b-s1"]
    for d in dirs:
        assert (d / "metrics.json").is_file()
        info = json.loads((d / "run.json").read_text())
        for key in ("ablation", "variant", "seed", "grid", "factors", "paper", "profile", "spec_hash", "spec",
                    "baseline", "executor", "created", "ablation_file"):
            assert key in info
        assert info["spec"]["train"]["seed"] == info["seed"]
        assert d.name == f"{info['variant']}-s{info['seed']}-{info['spec_hash']}"
        assert info["paper"] == ({"table": "t2", "row": 3} if info["variant"] == "a" else None)
        local = json.loads((d / "local.json").read_text())
        assert local["state"] == "done" and local["returncode"] == 0
    # same spec, different seed -> different weights; everything deterministic
    w = {d.name: json.loads((d / "metrics.json").read_text())["w"] for d in dirs}
    assert w[dirs[0].name] != w[dirs[1].name]

    mtimes = {d: (d / "metrics.json").stat().st_mtime_ns for d in dirs}
    runinfo = {d: (d / "run.json").read_bytes() for d in dirs}
    t0 = time.time()
    code, out, err = cli(["run", abl, "--results", results, "--train-fn", STANDIN, "--json"], capsys)
    assert code == 0
    assert time.time() - t0 < 10
    lines = [json.loads(x) for x in out.splitlines()]
    assert [x["status"] for x in lines] == ["skipped"] * 4
    for d in dirs:  # finished runs are never touched
        assert (d / "metrics.json").stat().st_mtime_ns == mtimes[d]
        assert (d / "run.json").read_bytes() == runinfo[d]

    # a changed variant gets a new folder; the old ones stay
    abl.write_text(abl.read_text().replace('"train.lr" = 0.05', '"train.lr" = 0.04'))
    code, out, err = cli(["run", abl, "--results", results, "--train-fn", STANDIN, "--json"], capsys)
    assert code == 0
    assert len(run_dirs(results)) == 8
    assert [json.loads(x)["status"] for x in out.splitlines()] == ["done"] * 4


def test_resume_matches_uninterrupted(tmp_path, capsys, standin_env):
    from dimr_lab.runner.ablation import expand, load_ablation
    from dimr_lab.runner.local import prepare, run_local
    from dimr_lab.runner.worker import EXIT_INTERRUPTED, train_one

    abl = load_ablation(write_ablation(tmp_path, seeds="[0]", steps=9, ckpt=2))
    run_a, run_b = [r for r in expand(abl, results=tmp_path / "r1")]
    calls = {"n": 0}

    def stop_after_5():
        calls["n"] += 1
        return calls["n"] > 5

    prepare([run_a], executor="debug")
    code, res = train_one(run_a.run_dir, standin_train, stop_after_5)
    assert code == EXIT_INTERRUPTED and res["step"] == 5
    assert not (run_a.run_dir / "metrics.json").exists()
    out = run_local([run_a, run_b], jobs=2, train_fn=STANDIN, show_progress=False)
    assert [o.status for o in out] == ["done", "done"]
    log = [json.loads(x) for x in (run_a.run_dir / "log.jsonl").read_text().splitlines()]
    assert {"event": "resumed", "from": 5, "restart": None} in log
    # the same run never interrupted
    fresh = expand(abl, results=tmp_path / "r2")[0]
    prepare([fresh], executor="debug")
    train_one(fresh.run_dir, standin_train)
    w1 = json.loads((run_a.run_dir / "metrics.json").read_text())["w"]
    w2 = json.loads((fresh.run_dir / "metrics.json").read_text())["w"]
    assert w1 == w2  # bit for bit (floats in JSON round-trip exactly)


def test_failed_run_status_and_rest_continue(tmp_path, capsys, standin_env):
    extra = '\n[[variant]]\nname = "broken"\n"data.train_size" = 13\n'
    abl = write_ablation(tmp_path, seeds="[0]", extra=extra)
    results = tmp_path / "results"
    code, out, err = cli(["run", abl, "--results", results, "--train-fn", STANDIN], capsys)
    assert code == 1
    code, out, err = cli(["status", results / "abl", "--json"], capsys)
    assert code == 0
    st = {json.loads(x)["run"].split("-")[0]: json.loads(x) for x in out.splitlines()}
    assert st["a"]["state"] == "done" and st["b"]["state"] == "done"
    assert st["broken"]["state"] == "failed"
    assert any("stand-in failure on purpose" in ln for ln in st["broken"]["log_tail"])
    code, out, err = cli(["status", results], capsys)
    assert code == 0 and "failed" in out and "stand-in failure on purpose" in out
    code, out, err = cli(["cancel", results], capsys)
    assert code == 0 and "nothing queued" in out


def test_debug_executor_in_process(tmp_path, capsys, standin_env):
    abl = write_ablation(tmp_path, seeds="[3]")
    results = tmp_path / "results"
    code, out, err = cli(["run", abl, "--results", results, "--executor", "debug", "--profile", "other",
                          "--train-fn", STANDIN], capsys)
    assert code == 0, err
    dirs = run_dirs(results)
    assert len(dirs) == 2 and all(d.name.split("-")[1] == "s3" for d in dirs)
    assert json.loads((dirs[0] / "metrics.json").read_text())["steps"] == 3


def test_busy_run_is_left_alone(tmp_path, standin_env):
    from dimr_lab.runner.ablation import expand, load_ablation
    from dimr_lab.runner.local import run_local
    from dimr_lab.runner.state import run_lock

    abl = load_ablation(write_ablation(tmp_path, seeds="[0]"))
    runs = expand(abl, results=tmp_path / "r")
    with run_lock(runs[0].run_dir) as got:
        assert got
        out = run_local(runs, train_fn=STANDIN, show_progress=False)
    assert [o.status for o in out] == ["busy", "done"]
    assert not (runs[0].run_dir / "metrics.json").exists()


def test_status_of_unstarted_and_interrupted(tmp_path, capsys):
    from dimr_lab.runner.ablation import expand, load_ablation
    from dimr_lab.runner.local import prepare
    from dimr_lab.runner.state import atomic_write_json

    abl = load_ablation(write_ablation(tmp_path, seeds="[0]"))
    runs = expand(abl, results=tmp_path / "r")
    prepare(runs, executor="local")
    atomic_write_json(runs[1].run_dir / "local.json", {"state": "running", "pid": 2 ** 22 + 12345,
                                                       "host": os.uname().nodename, "started": time.time()})
    code, out, err = cli(["status", tmp_path / "r", "--json"], capsys)
    st = [json.loads(x) for x in out.splitlines()]
    assert [s["state"] for s in st] == ["pending", "failed"]
    assert "gone" in st[1]["detail"]


def test_worker_entry_point_errors(tmp_path):
    from dimr_lab.runner.worker import EXIT_BAD, main, resolve_train_fn

    assert main([str(tmp_path / "nothing-here")]) == EXIT_BAD
    with pytest.raises(UserError):
        resolve_train_fn("no_such_module_xyz:fn")
    with pytest.raises(UserError):
        resolve_train_fn("json")
    assert resolve_train_fn(STANDIN.replace("test_runner", __name__)) is standin_train


def test_setup_env_from_slurm(monkeypatch):
    from dimr_lab.runner import distributed as d

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(k, "x")  # recorded, so monkeypatch restores (removes) what the helper sets
        monkeypatch.delenv(k)
    assert d.setup_env_from_slurm({}) == {}
    env = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123456",
           "SLURM_JOB_NODELIST": "localhost"}
    got = d.setup_env_from_slurm(env)
    assert got["RANK"] == "3" and got["WORLD_SIZE"] == "4" and got["LOCAL_RANK"] == "1"
    assert got["MASTER_ADDR"] == "localhost"
    assert got["MASTER_PORT"] == str(d.port_for_job("123456"))
    assert os.environ["RANK"] == "3"
    assert d.port_for_job("123456") != d.port_for_job("123457")
    assert d.PORT_BASE <= d.port_for_job("99999999") < d.PORT_BASE + d.PORT_SPAN
    # values from torchrun are kept
    monkeypatch.setenv("RANK", "0")
    assert "RANK" not in d.setup_env_from_slurm(env)
    monkeypatch.setattr(d.subprocess, "run", lambda *a, **k: (_ for _ in ()).throw(OSError("no scontrol")))
    assert d._first_host("node[07-09,12],gpu3") == "node07"
    assert d._first_host("gpu3,node[1-2]") == "gpu3"
    # inside a SLURM job the task's values win over stale ones from the submitting shell
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert d.setup_env_from_slurm({**env, "SLURM_NTASKS": "2"}, overwrite=True)["WORLD_SIZE"] == "2"


def test_init_distributed_single_process(monkeypatch):
    from dimr_lab.runner.distributed import init_distributed

    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    rank, world, local, device = init_distributed()
    assert (rank, world) == (0, 1) and str(device) in ("cpu", "cuda:0")


def test_jobs_zero_runs_one_single_threaded_run_per_core(tmp_path, monkeypatch, standin_env):
    """--jobs 0 (the default): as many runs at once as cores (up to 8), each with one thread; an explicit
    --jobs splits the cores between its runs."""
    import dimr_lab.runner.local as local
    from dimr_lab.runner.ablation import expand, load_ablation

    seen = []
    spawn = local._spawn

    def recording_spawn(run, train_fn, threads):
        seen.append(threads)
        return spawn(run, train_fn, threads)

    monkeypatch.setattr(local, "_spawn", recording_spawn)
    monkeypatch.setattr(local, "usable_cores", lambda: 4)
    runs = expand(load_ablation(write_ablation(tmp_path)), results=tmp_path / "r0")
    out = local.run_local(runs, jobs=0, train_fn=STANDIN, show_progress=False)
    assert {o.status for o in out} == {"done"} and seen == [1] * len(runs)
    seen.clear()
    monkeypatch.setattr(local, "usable_cores", lambda: 16)
    runs = expand(load_ablation(write_ablation(tmp_path, name="abl2")), results=tmp_path / "r1")
    local.run_local(runs, jobs=0, train_fn=STANDIN, show_progress=False)
    assert seen == [2] * len(runs), "16 cores: 8 runs at a time, 2 threads each"
