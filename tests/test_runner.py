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


def standin_bad_setting(spec, out_dir, *, should_stop=None):
    """A trainer that finds a bad setting on the node (as a missing file there would be)."""
    from dimr_lab.errors import SpecError

    raise SpecError("no such folder on this node", file=str(out_dir), key="data.root")


def standin_train(spec, out_dir, *, should_stop=None):
    """A tiny deterministic 'training': SGD on a linear regression, checkpointed, resumable bit-exactly, with
    the trainer's contract: the run folder's lock, its identity check, checkpoints/index.json, and the
    evaluations of spec.eval_steps() (metrics.json with the weights) at the end.

    train.lr == 0.0123 makes it fail (to test failures); $STANDIN_STEP_S sleeps per step of a first job (a requeued
    SLURM job, restarted already, trains on unslept); train.time_limit_s stops it at a step boundary with a
    checkpoint, as the trainer."""
    import contextlib

    import torch
    import torch.distributed as dist

    from dimr_lab import dist as distributed
    from dimr_lab.nn.checkpoint import load_file, save_file
    from dimr_lab.rundir import CheckpointIndex, RunDir, RunRecord, run_lock, write_eval_record, write_json
    from dimr_lab.spec.schema import to_dict

    run = RunDir(out_dir)
    info = distributed.setup()
    rank, world = info.rank, info.world_size
    identity = spec.identity_hash()
    with run_lock(run.path) if rank == 0 else contextlib.nullcontext():
        if rank == 0:
            if run.spec_path.exists() and json.loads(run.spec_path.read_text())["identity"] != identity:
                raise UserError(f"{run.path} holds another run")
            if not run.record_path.exists():
                run.write_record(RunRecord(spec=to_dict(spec), identity=identity, variant=run.path.name))
            run.write_spec_document(to_dict(spec), identity)
        if spec.train.lr == 0.0123:
            raise RuntimeError("stand-in failure on purpose")
        distributed.barrier(info)
        gen = torch.Generator().manual_seed(1000 * spec.train.seed + rank)
        w = torch.zeros(4, dtype=torch.float64)
        step, resumed_from = 0, None
        if run.last_checkpoint.is_file():
            state = load_file(run.last_checkpoint)
            w, step, resumed_from = state["w"], state["step"], state["step"]
            gen.set_state(state["rng"][rank])
        target = torch.arange(1.0, 5.0, dtype=torch.float64)
        # the sleep gives a test time to interrupt the job; once requeued, nothing waits for its steps
        restarted = int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0
        sleep = 0.0 if restarted else float(os.environ.get("STANDIN_STEP_S", "0"))
        log = run.log_path
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
                save_file({"w": w, "step": step, "rng": rngs}, run.last_checkpoint)
                CheckpointIndex(step, [], identity).write(run.index_path)

        t0 = time.monotonic()
        limit = spec.train.time_limit_s
        try:
            while step < spec.train.steps:
                if (should_stop is not None and should_stop()) or (limit and time.monotonic() - t0 > limit):
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
                       "step": step, "steps": step, "w": w.tolist(), "world_size": world, "allreduce_check": check,
                       "compile_threads": os.environ.get("TORCHINDUCTOR_COMPILE_THREADS")}
            if rank == 0:
                for s in spec.eval_steps():
                    d = run.eval_dir(s, spec.eval_hash())
                    d.mkdir(parents=True, exist_ok=True)
                    write_eval_record(d, s, spec.eval_hash(), {"sample": to_dict(spec.sample),
                                                               "eval": to_dict(spec.eval)}, "")
                    write_json(d / "metrics.json", metrics)
            return metrics if rank == 0 else {"rank": rank}
        finally:
            distributed.cleanup(info)


def standin_resample(spec, out_dir, *, should_stop=None, **kwargs):
    """standin_train that writes the keyword arguments it was given besides should_stop to kwargs.json."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / "kwargs.json").write_text(json.dumps(kwargs))
    return standin_train(spec, out_dir, should_stop=should_stop)


def standin_unguarded(spec, out_dir, *, should_stop=None):
    """A worker not yet guarding against signals (the runner's SIGTERM ends it at once), waiting to be stopped."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    (Path(out_dir) / "started").write_text("")
    time.sleep(120)
    raise RuntimeError("never stopped")


def final_metrics(run_dir: Path) -> Path:
    """The metrics.json of a run's (only) last-step evaluation."""
    (path,) = sorted(Path(run_dir).glob("evals/*/metrics.json"))[-1:]
    return path


ABLATION = """
[ablation]
name = "{name}"
seeds = {seeds}
paper = {{ table = "table2_ablation_imagenet64", rows = {{ a = 3 }} }}

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
        assert final_metrics(d).is_file()
        info = json.loads((d / "run.json").read_text())
        for key in ("ablation", "variant", "seed", "grid", "factors", "paper", "profile", "identity", "spec",
                    "baseline", "executor", "created", "ablation_file", "version"):
            assert key in info
        assert info["spec"]["train"]["seed"] == info["seed"]
        assert d.name == f"{info['variant']}-s{info['seed']}-{info['identity']}"
        assert info["paper"] == ({"table": "table2_ablation_imagenet64", "row": 3} if info["variant"] == "a" else None)
        local = json.loads((d / "local.json").read_text())
        assert local["state"] == "done" and local["returncode"] == 0
    # same spec, different seed -> different weights; everything deterministic
    w = {d.name: json.loads(final_metrics(d).read_text())["w"] for d in dirs}
    assert w[dirs[0].name] != w[dirs[1].name]

    mtimes = {d: final_metrics(d).stat().st_mtime_ns for d in dirs}
    runinfo = {d: (d / "run.json").read_bytes() for d in dirs}
    code, out, err = cli(["run", abl, "--results", results, "--train-fn", STANDIN, "--json"], capsys)
    assert code == 0
    lines = [json.loads(x) for x in out.splitlines()]
    assert [x["status"] for x in lines] == ["skipped"] * 4
    for d in dirs:  # finished runs are never touched
        assert final_metrics(d).stat().st_mtime_ns == mtimes[d]
        assert (d / "run.json").read_bytes() == runinfo[d]

    # a changed variant gets a new folder; the old ones stay
    abl.write_text(abl.read_text().replace('"train.lr" = 0.05', '"train.lr" = 0.04'))
    code, out, err = cli(["run", abl, "--results", results, "--train-fn", STANDIN, "--json"], capsys)
    assert code == 0
    assert len(run_dirs(results)) == 8
    assert [json.loads(x)["status"] for x in out.splitlines()] == ["done"] * 4


def test_resume_matches_uninterrupted(tmp_path, capsys, standin_env):
    from dimr_lab.runner.plan import expand
    from dimr_lab.spec.ablation import load_ablation
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
    assert not list(run_a.run_dir.glob("evals/*/metrics.json"))
    out = run_local([run_a, run_b], jobs=2, train_fn=STANDIN, show_progress=False)
    assert [o.status for o in out] == ["done", "done"]
    log = [json.loads(x) for x in (run_a.run_dir / "log.jsonl").read_text().splitlines()]
    assert {"event": "resumed", "from": 5, "restart": None} in log
    # the same run never interrupted
    fresh = expand(abl, results=tmp_path / "r2")[0]
    prepare([fresh], executor="debug")
    train_one(fresh.run_dir, standin_train)
    w1 = json.loads(final_metrics(run_a.run_dir).read_text())["w"]
    w2 = json.loads(final_metrics(fresh.run_dir).read_text())["w"]
    assert w1 == w2  # bit for bit (floats in JSON round-trip exactly)


def test_failed_run_status_and_rest_continue(tmp_path, capsys, standin_env):
    extra = '\n[[variant]]\nname = "broken"\n"train.lr" = 0.0123\n'
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


def test_cancel_given_a_relative_path_stops_the_lock_holder_and_the_runners_queue(tmp_path, capsys, standin_env, monkeypatch):
    """`cancel results/abl` (relative) stops the active run at a checkpoint and the runner starts no other."""
    import signal
    import subprocess
    import sys

    abl = write_ablation(tmp_path, steps=200, ckpt=2)
    env = dict(os.environ, STANDIN_STEP_S="0.1")
    proc = subprocess.Popen([sys.executable, "-c", "from dimr_lab.cli import main; main()", "run", str(abl),
                             "--results", "results", "--jobs", "1", "--train-fn", STANDIN],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not list((tmp_path / "results" / "abl").glob("*/checkpoints/last.pt")):
            time.sleep(0.2)
        monkeypatch.chdir(tmp_path)
        # as a second runner that lost the race for the run leaves it: local.json names a worker long gone;
        # the lock's holder is the one to stop
        (local,) = (tmp_path / "results" / "abl").glob("a-s0-*/local.json")
        local.write_text(json.dumps({**json.loads(local.read_text()), "pid": 4194301}))
        code, out, err = cli(["cancel", "results/abl"], capsys)
        assert code == 0 and "a-s0" in out, out + err
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, proc.stderr.read().decode()[-2000:]
    started = [d.name.split("-")[0] + "-" + d.name.split("-")[1] for d in run_dirs(tmp_path / "results")
               if (d / "checkpoints").exists()]
    assert started == ["a-s0"]


def test_a_worker_the_runner_stops_before_it_guards_against_signals_is_interrupted_not_failed(tmp_path, capsys,
                                                                                              standin_env):
    # SIGTERM (or a terminal's Ctrl-C) can reach a worker still starting up: the run is stopped, as asked
    import signal
    import subprocess
    import sys

    abl = write_ablation(tmp_path, seeds="[0]")
    proc = subprocess.Popen([sys.executable, "-c", "from dimr_lab.cli import main; main()", "run", str(abl),
                             "--results", "results", "--jobs", "1", "--only", "a",
                             "--train-fn", "test_runner:standin_unguarded"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not list((tmp_path / "results" / "abl").glob("*/started")):
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err.decode()[-2000:]
    assert "interrupted a-s0" in err.decode() and "failed" not in err.decode()
    (run,) = run_dirs(tmp_path / "results")
    assert json.loads((run / "local.json").read_text())["state"] == "interrupted"
    code, out, _ = cli(["status", tmp_path / "results", "--json"], capsys)
    (st,) = [json.loads(x) for x in out.splitlines()]
    assert st["state"] == "pending" and "before its first checkpoint" in st["detail"], st


SLOW_REGISTER = """
import sys, time
from pathlib import Path
import dimr_lab.runner.local as local

spawn = local._spawn


def slow_spawn(run, *args, **kwargs):  # the second worker is started once the first trains, then entered slowly
    if run.run_dir.name.startswith("b-"):
        deadline = time.time() + 60
        while time.time() < deadline and not list(run.run_dir.parent.glob("a-*/checkpoints/last.pt")):
            time.sleep(0.05)
    proc = spawn(run, *args, **kwargs)
    if run.run_dir.name.startswith("b-"):
        (run.run_dir.parent / "spawned").write_text(str(proc.pid))
        time.sleep(4)
    return proc


local._spawn = slow_spawn
from dimr_lab.cli import main
main()
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").is_dir() and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()


def test_a_stop_between_a_workers_start_and_its_entry_in_the_runners_table_stops_it_too(tmp_path, capsys,
                                                                                         standin_env):
    """SIGTERM reached the runner after it had started a worker but before it knew of it: the runner stopped the
    workers it knew and left that one training, unstopped and unrecorded. Now the stop waits until the worker
    is entered, and every run ends interrupted at a checkpoint, none failed, no worker left behind."""
    import signal
    import subprocess
    import sys

    abl = write_ablation(tmp_path, seeds="[0]", steps=2000, ckpt=2)
    script = tmp_path / "slow_register.py"
    script.write_text(SLOW_REGISTER)
    proc = subprocess.Popen([sys.executable, str(script), "run", str(abl), "--results", "results", "--jobs", "2",
                             "--train-fn", STANDIN], cwd=tmp_path, env=dict(os.environ, STANDIN_STEP_S="0.05"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    spawned = tmp_path / "results" / "abl" / "spawned"
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not spawned.exists():
            time.sleep(0.05)
        assert spawned.exists(), proc.stderr.read().decode()[-2000:] if proc.poll() is not None else "no spawn"
        proc.send_signal(signal.SIGTERM)  # in the window: b's worker runs, the runner does not know it yet
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    workers = [int(json.loads((d / "local.json").read_text())["pid"]) for d in run_dirs(tmp_path / "results")]
    try:
        deadline = time.time() + 30  # a worker stopped as asked is gone soon; an orphan trains on
        while time.time() < deadline and any(_alive(pid) for pid in workers):
            time.sleep(0.2)
        assert not [pid for pid in workers if _alive(pid)], "a worker outlived its runner"
    finally:
        for pid in workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    err = err.decode()
    assert proc.returncode == 130, err[-2000:]
    assert "failed" not in err and "interrupted a-s0" in err and "interrupted b-s0" in err, err[-2000:]
    for d in run_dirs(tmp_path / "results"):
        assert json.loads((d / "local.json").read_text())["state"] == "interrupted", d.name
    code, out, _ = cli(["run", abl, "--results", tmp_path / "results", "--train-fn", STANDIN, "--json"], capsys)
    assert code == 0 and [json.loads(x)["status"] for x in out.splitlines()] == ["done", "done"]


def test_a_worker_stopped_as_it_starts_exits_interrupted_having_begun_nothing(tmp_path, standin_env):
    """A SIGTERM that reached a worker before its handlers were in place killed it (or, between fork and exec,
    was lost); the runner starts it with the signal blocked, so the worker sees the stop and exits interrupted."""
    import signal

    from dimr_lab.runner import local
    from dimr_lab.runner.plan import expand
    from dimr_lab.runner.worker import EXIT_INTERRUPTED
    from dimr_lab.spec.ablation import load_ablation

    (run,) = [r for r in expand(load_ablation(write_ablation(tmp_path, seeds="[0]")), results=tmp_path / "r")
              if r.run_dir.name.startswith("a-")]
    local.prepare([run], executor="local")
    with local._RunnerStop().hold():
        proc = local._spawn(run, STANDIN, None)
        proc.send_signal(signal.SIGTERM)  # before the worker's interpreter has begun
    assert proc.wait(timeout=120) == EXIT_INTERRUPTED
    assert "stopped before it started" in (run.run_dir / "output.log").read_text()
    assert not (run.run_dir / "checkpoints").exists() and not (run.run_dir / "log.jsonl").exists()


def test_debug_executor_in_process(tmp_path, capsys, standin_env):
    abl = write_ablation(tmp_path, seeds="[3]")
    results = tmp_path / "results"
    code, out, err = cli(["run", abl, "--results", results, "--executor", "debug", "--profile", "other",
                          "--train-fn", STANDIN], capsys)
    assert code == 0, err
    dirs = run_dirs(results)
    assert len(dirs) == 2 and all(d.name.split("-")[1] == "s3" for d in dirs)
    assert json.loads(final_metrics(dirs[0]).read_text())["steps"] == 3


def test_busy_run_is_left_alone(tmp_path, standin_env):
    from dimr_lab.runner.plan import expand
    from dimr_lab.spec.ablation import load_ablation
    from dimr_lab.rundir import run_lock
    from dimr_lab.runner.local import run_local

    abl = load_ablation(write_ablation(tmp_path, seeds="[0]"))
    runs = expand(abl, results=tmp_path / "r")
    with run_lock(runs[0].run_dir):
        out = run_local(runs, train_fn=STANDIN, show_progress=False)
    assert [o.status for o in out] == ["busy", "done"]
    assert not list(runs[0].run_dir.glob("evals/*/metrics.json"))


def test_a_runner_that_loses_the_race_for_a_run_leaves_the_holders_local_json(tmp_path, standin_env, monkeypatch):
    # two runners both saw the run free and both started a worker; the one whose worker found the lock taken
    # had rewritten local.json (its pid, state 'busy'), so that `status` after a kill of the holder said
    # "has a checkpoint" instead of "its process is gone"
    import dimr_lab.runner.local as local_mod
    from dimr_lab.rundir import run_lock, write_json
    from dimr_lab.runner.plan import expand
    from dimr_lab.spec.ablation import load_ablation

    runs = expand(load_ablation(write_ablation(tmp_path, seeds="[0]")), results=tmp_path / "r")
    local_mod.prepare(runs, executor="local")
    holder = {"state": "running", "pid": 2 ** 22 + 4321, "runner": 2 ** 22 + 4320, "host": os.uname().nodename,
              "started": time.time()}
    write_json(runs[0].run_dir / "local.json", holder)
    # the checks both runners passed before either worker took the lock
    monkeypatch.setattr(local_mod, "prepare", lambda runs, executor: (list(runs), [], []))
    monkeypatch.setattr(local_mod, "is_locked", lambda run_dir: False)
    with run_lock(runs[0].run_dir):
        out = local_mod.run_local(runs[:1], train_fn=STANDIN, show_progress=False)
    assert [o.status for o in out] == ["busy"]
    assert json.loads((runs[0].run_dir / "local.json").read_text()) == holder


def test_dry_run_says_busy_for_a_run_another_process_holds(tmp_path, capsys, standin_env):
    # as the real run leaves it alone (the dry run said 'to run')
    from dimr_lab.rundir import run_lock
    from dimr_lab.runner.plan import expand
    from dimr_lab.spec.ablation import load_ablation

    file = write_ablation(tmp_path, seeds="[0]")
    runs = expand(load_ablation(file), results=tmp_path / "r")
    with run_lock(runs[0].run_dir):
        code, out, err = cli(["run", file, "--results", tmp_path / "r", "--dry-run", "--json"], capsys)
        assert code == 0, err
        assert [json.loads(x)["status"] for x in out.splitlines()] == ["busy", "todo"]
        code, out, err = cli(["run", file, "--results", tmp_path / "r", "--dry-run"], capsys)
        assert code == 0 and "busy" in out and "to run" in out


def test_status_of_unstarted_and_interrupted(tmp_path, capsys):
    from dimr_lab.runner.plan import expand
    from dimr_lab.spec.ablation import load_ablation
    from dimr_lab.rundir import write_json
    from dimr_lab.runner.local import prepare

    abl = load_ablation(write_ablation(tmp_path, seeds="[0]"))
    runs = expand(abl, results=tmp_path / "r")
    prepare(runs, executor="local")
    write_json(runs[1].run_dir / "local.json", {"state": "running", "pid": 2 ** 22 + 12345,
                                                "host": os.uname().nodename, "started": time.time()})
    code, out, err = cli(["status", tmp_path / "r", "--json"], capsys)
    st = [json.loads(x) for x in out.splitlines()]
    assert [s["state"] for s in st] == ["pending", "failed"]
    assert "gone" in st[1]["detail"] and st[0]["detail"] == "not started"
    # a run killed before its first checkpoint has logged rows but nothing to resume: it was called "not started"
    (runs[0].run_dir / "log.jsonl").write_text(json.dumps({"step": 50, "loss": 0.5}) + "\n")
    code, out, err = cli(["status", tmp_path / "r", "--json"], capsys)
    st = [json.loads(x) for x in out.splitlines()]
    assert st[0]["state"] == "pending" and st[0]["detail"] == "stopped before its first checkpoint; rerun to start it"


def test_status_reads_each_file_of_a_run_once_and_loads_no_cluster_or_table_libraries(tmp_path):
    import shutil

    from conftest import opens_and_modules

    # finished runs as a results tree holds them (the committed ones: records, logs, evaluations)
    committed = sorted((Path(__file__).resolve().parents[1] / "results" / "branches").glob("*-s[01]-*"))[:2]
    assert len(committed) == 2
    for src in committed:
        shutil.copytree(src, tmp_path / "r" / "branches" / src.name)
    root = tmp_path / "r"
    opened, modules = opens_and_modules(f"""
        from dimr_lab.cli import main
        try:
            main(["status", {str(root)!r}, "--json"])
        except SystemExit as e:
            assert not e.code, e.code
    """, root)
    evals = [f for f in opened if "/evals/" in f]
    assert any(f.endswith("/metrics.json") for f in evals) and any(f.endswith("/run.json") for f in opened)
    assert set(opened.values()) == {1}, opened  # an evaluation's files were read twice: for damage, for what is due
    # status of runs never sent to SLURM needs neither submitit nor the table's or the network's libraries
    assert not {"submitit", "torch", "pandas", "scipy", "matplotlib"} & modules, modules


def test_status_shows_the_grid_point_that_tells_runs_apart(tmp_path, capsys, monkeypatch):
    """In a gridded ablation two runs of one variant and seed differ only by their hash in `status`."""
    from dimr_lab.runner.local import prepare
    from dimr_lab.runner.plan import expand
    from dimr_lab.spec.ablation import load_ablation

    abl = load_ablation(write_ablation(tmp_path, seeds="[0]", extra='[grid]\n"train.lr" = [1e-3, 3e-4]\n'))
    runs = expand(abl, results=tmp_path / "r")
    prepare(runs, executor="local")
    code, out, err = cli(["status", tmp_path / "r", "--json"], capsys)
    assert code == 0, err
    grids = {json.loads(x)["run"]: json.loads(x)["grid"] for x in out.splitlines()}
    assert grids == {r.run_dir.name: {"train.lr": r.spec.train.lr} for r in runs} and len(set(grids)) == 4
    monkeypatch.setenv("COLUMNS", "200")
    code, out, err = cli(["status", tmp_path / "r"], capsys)
    assert code == 0, err
    rows = {line.split()[1]: line for line in out.splitlines() if line.startswith("│ abl/")}
    for r in runs:
        assert f"train.lr={r.spec.train.lr}" in rows[f"abl/{r.run_dir.name}"], out
    (plain := tmp_path / "plain").mkdir()
    prepare(expand(load_ablation(write_ablation(plain, seeds="[0]")), results=plain / "r"), executor="local")
    assert "┃ grid" not in cli(["status", plain / "r"], capsys)[1]  # no grid: no column


def test_a_runs_line_is_one_line_at_any_width(tmp_path):
    """'reused  <run>  source=... step=200' broke after the source at 80 columns (output to a file or a pipe)."""
    import io

    from rich.console import Console

    from dimr_lab.cli.run_cmds import _say
    from dimr_lab.runner.plan import expand
    from dimr_lab.spec.ablation import load_ablation

    (run,) = expand(load_ablation(write_ablation(tmp_path, seeds="[0]")), results=tmp_path / "r", only=["a"])
    buf = io.StringIO()
    _say(Console(file=buf, width=40, highlight=False), False, run, "reused",
         source="another_ablation/a-s0-0123456789abcdef", step=200)
    assert buf.getvalue().count("\n") == 1 and buf.getvalue().rstrip().endswith("step=200"), buf.getvalue()


def test_worker_entry_point_errors(tmp_path):
    from dimr_lab.runner.worker import EXIT_BAD, main, resolve_train_fn

    assert main([str(tmp_path / "nothing-here")]) == EXIT_BAD
    with pytest.raises(UserError):
        resolve_train_fn("no_such_module_xyz:fn")
    with pytest.raises(UserError):
        resolve_train_fn("json")
    assert resolve_train_fn(STANDIN.replace("test_runner", __name__)) is standin_train


def test_setup_env_from_slurm(monkeypatch):
    from dimr_lab import dist as d

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
    from dimr_lab.dist import setup

    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    info = setup()
    assert (info.rank, info.world_size, info.main) == (0, 1, True) and str(info.device) in ("cpu", "cuda:0")


def test_jobs_zero_runs_one_single_threaded_run_per_core(tmp_path, monkeypatch, standin_env):
    """--jobs 0 (the default): as many runs at once as cores (up to 8), each with one thread; an explicit
    --jobs splits the cores between its runs."""
    import dimr_lab.runner.local as local
    from dimr_lab.runner.plan import expand
    from dimr_lab.spec.ablation import load_ablation

    seen = []
    spawn = local._spawn

    def recording_spawn(run, train_fn, threads, mode="train", resample=False):
        seen.append(threads)
        return spawn(run, train_fn, threads, mode, resample)

    monkeypatch.setattr(local, "_spawn", recording_spawn)
    monkeypatch.setattr(local, "usable_cores", lambda: 4)
    runs = expand(load_ablation(write_ablation(tmp_path, seeds="[0]")), results=tmp_path / "r0")  # 2 runs
    out = local.run_local(runs, jobs=0, train_fn=STANDIN, show_progress=False)
    assert {o.status for o in out} == {"done"} and seen == [1] * len(runs)
    seen.clear()
    monkeypatch.setattr(local, "usable_cores", lambda: 16)
    runs = expand(load_ablation(write_ablation(tmp_path, name="abl2", seeds="[0]")), results=tmp_path / "r1")
    local.run_local(runs, jobs=0, train_fn=STANDIN, show_progress=False)
    assert seen == [2] * len(runs), "16 cores: 8 runs at a time, 2 threads each"
    # torch.compile's worker pool gets the same share
    got = {json.loads(p.read_text())["compile_threads"] for p in (tmp_path / "r1").rglob("metrics.json")}
    assert got == {"2"}


def test_a_run_another_ablation_trained_is_reused_not_trained_again(tmp_path, capsys, standin_env):
    results = tmp_path / "results"
    one = write_ablation(tmp_path, name="one", seeds="[0]")
    assert cli(["run", one, "--results", results, "--train-fn", STANDIN], capsys)[0] == 0
    (src_a, src_b) = run_dirs(results, "one")
    # a second ablation sharing variant a (same identity) and a variant of its own
    two = tmp_path / "two.toml"
    two.write_text(one.read_text().replace('name = "one"', 'name = "two"')
                   .replace('name = "b"', 'name = "c"').replace('"model.norm" = "layernorm"', '"model.norm" = "rmsnorm"'))
    code, out, err = cli(["run", two, "--results", results, "--train-fn", STANDIN, "--dry-run", "--json"], capsys)
    plan = {json.loads(x)["variant"]: json.loads(x) for x in out.splitlines() if '"run_dir"' in x}
    assert plan["a"]["reuse"] == f"one/{src_a.name}" and plan["c"]["reuse"] is None
    assert not (results / "two").exists()  # a dry run writes nothing

    code, out, err = cli(["run", two, "--results", results, "--train-fn", STANDIN, "--json"], capsys)
    assert code == 0, err
    said = [json.loads(x) for x in out.splitlines()]
    reused = [x for x in said if x["status"] == "reused"]
    assert [(x["variant"], x["source"], x["step"]) for x in reused] == [("a", f"one/{src_a.name}", 6)]
    a2 = results / "two" / src_a.name
    record = json.loads((a2 / "run.json").read_text())
    assert record["ablation"] == "two" and record["reused_from"] == f"one/{src_a.name}"
    # the copy is the trained state, not a new training: same log, weights and evaluation
    assert (a2 / "log.jsonl").read_bytes() == (src_a / "log.jsonl").read_bytes()
    assert (a2 / "checkpoints" / "last.pt").read_bytes() == (src_a / "checkpoints" / "last.pt").read_bytes()
    assert final_metrics(a2).read_bytes() == final_metrics(src_a).read_bytes()
    assert not (a2 / "local.json").exists() or json.loads((a2 / "local.json").read_text()).get("state") != "running"
    assert [d.name.split("-")[0] for d in run_dirs(results, "two")] == ["a", "c"]
    assert not [p for p in (results / "two").iterdir() if p.name.startswith(".")]  # no temporary left
    # the source is untouched
    assert json.loads((src_a / "run.json").read_text())["ablation"] == "one"

    # more steps: the copy continues where the source stopped and ends where a direct run ends
    code, out, err = cli(["run", two, "--results", results / "x", "--train-fn", STANDIN, "--set", "train.steps=9",
                          "--only", "a", "--json"], capsys)
    assert code == 0 and not [x for x in map(json.loads, out.splitlines()) if x["status"] == "reused"]
    source_log = (src_a / "log.jsonl").read_bytes()
    longer = tmp_path / "three.toml"
    longer.write_text(two.read_text().replace('name = "two"', 'name = "three"'))
    code, out, err = cli(["run", longer, "--results", results, "--train-fn", STANDIN, "--set", "train.steps=9",
                          "--only", "a", "--json"], capsys)
    assert code == 0, err
    assert [x["status"] for x in map(json.loads, out.splitlines())][:1] == ["reused"]
    (a3,) = run_dirs(results, "three")
    (direct,) = run_dirs(results / "x", "two")
    assert json.loads(final_metrics(a3).read_text())["w"] == json.loads(final_metrics(direct).read_text())["w"]
    assert {"event": "resumed", "from": 6, "restart": None} in \
        [json.loads(x) for x in (a3 / "log.jsonl").read_text().splitlines()]
    assert json.loads(final_metrics(src_a).read_text())["step"] == 6  # the source did not move on
    assert (src_a / "log.jsonl").read_bytes() == source_log  # nor did its log (a copy, not a link)


def test_reuse_is_off_with_no_reuse_and_never_takes_a_longer_run(tmp_path, capsys, standin_env):
    results = tmp_path / "results"
    one = write_ablation(tmp_path, name="one", seeds="[0]", steps=8)
    assert cli(["run", one, "--results", results, "--train-fn", STANDIN, "--only", "a"], capsys)[0] == 0
    two = tmp_path / "two.toml"
    two.write_text(one.read_text().replace('name = "one"', 'name = "two"'))
    # the source went past this plan's end (8 > 6 steps): trained here from the start
    code, out, err = cli(["run", two, "--results", results, "--train-fn", STANDIN, "--set", "train.steps=6",
                          "--only", "a", "--json"], capsys)
    assert code == 0 and [x["status"] for x in map(json.loads, out.splitlines())] == ["done"]
    three = tmp_path / "three.toml"
    three.write_text(one.read_text().replace('name = "one"', 'name = "three"'))
    code, out, err = cli(["run", three, "--results", results, "--train-fn", STANDIN, "--only", "a", "--no-reuse",
                          "--json"], capsys)
    assert code == 0 and [x["status"] for x in map(json.loads, out.splitlines())] == ["done"]
    (a3,) = run_dirs(results, "three")
    assert json.loads((a3 / "run.json").read_text())["reused_from"] == ""
    assert not any(json.loads(x).get("event") == "resumed" for x in (a3 / "log.jsonl").read_text().splitlines())


def test_reuse_never_takes_a_run_that_went_past_an_evaluated_step_without_its_checkpoint(tmp_path, capsys,
                                                                                         standin_env):
    # the copy could never evaluate step 2 (its checkpoint was not kept), where training here keeps it
    results = tmp_path / "results"
    one = write_ablation(tmp_path, name="one", seeds="[0]")
    assert cli(["run", one, "--results", results, "--train-fn", STANDIN, "--only", "a"], capsys)[0] == 0
    (src,) = run_dirs(results, "one")
    assert not list((src / "checkpoints").glob("step-*.pt"))
    two = tmp_path / "two.toml"
    two.write_text(one.read_text().replace('name = "one"', 'name = "two"'))

    def plan(*more):
        code, out, err = cli(["run", two, "--results", results, "--train-fn", STANDIN, "--only", "a", "--json",
                              *more], capsys)
        assert code == 0, err
        return [json.loads(x) for x in out.splitlines() if '"run_dir"' in x]

    assert [x["reuse"] for x in plan("--dry-run", "--set", "eval.steps=[6]")] == [f"one/{src.name}"]
    assert [x["reuse"] for x in plan("--dry-run", "--set", "eval.steps=[2]")] == [None]
    assert [x["status"] for x in plan("--set", "eval.steps=[2]")] == ["done"]
    (a2,) = run_dirs(results, "two")
    assert json.loads((a2 / "run.json").read_text())["reused_from"] == ""


def _trained_and_planned_again(tmp_path, capsys):
    """(results, a planned run of ablation 'two' whose identity ablation 'one' has trained under results)."""
    from dimr_lab.runner.plan import expand
    from dimr_lab.spec.ablation import load_ablation

    results = tmp_path / "results"
    one = write_ablation(tmp_path, name="one", seeds="[0]")
    assert cli(["run", one, "--results", results, "--train-fn", STANDIN, "--only", "a"], capsys)[0] == 0
    two = tmp_path / "two.toml"
    two.write_text(one.read_text().replace('name = "one"', 'name = "two"'))
    (run,) = expand(load_ablation(two), results=results, only=["a"])
    return results, run


def test_reuse_leaves_a_planned_folder_another_process_holds_alone(tmp_path, capsys, standin_env):
    # its holder (a trainer that found no checkpoint and starts from step 0) owns what the folder holds
    from dimr_lab.rundir import run_lock
    from dimr_lab.runner.local import write_record
    from dimr_lab.runner.reuse import reuse

    results, run = _trained_and_planned_again(tmp_path, capsys)
    write_record(run, "local")
    with run_lock(run.run_dir):
        assert reuse(results, run.run_dir, run.identity, run.spec.train.steps) is None
        assert sorted(p.name for p in run.run_dir.iterdir()) == [".lock", "run.json"]
    assert reuse(results, run.run_dir, run.identity, run.spec.train.steps) is not None
    assert (run.run_dir / "checkpoints" / "last.pt").is_file()


def test_a_reuse_copy_left_by_a_killed_process_is_removed_by_the_next_reuse(tmp_path, capsys, standin_env):
    # a kill between the copy and its rename left .NAME.reuse-PID beside the folder, and nothing removed it
    import subprocess
    import sys

    from dimr_lab.runner.reuse import reuse

    results, run = _trained_and_planned_again(tmp_path, capsys)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    gone = run.run_dir.parent / f".{run.run_dir.name}.reuse-{int(dead.stdout)}"
    live = run.run_dir.parent / f".{run.run_dir.name}.reuse-{os.getppid()}"  # a process still copying
    for d in (gone, live):
        (d / "checkpoints").mkdir(parents=True)
    assert reuse(results, run.run_dir, run.identity, run.spec.train.steps) is not None
    assert not gone.exists() and live.is_dir()


def test_status_says_where_a_stopped_run_stopped_and_whether_its_time_limit_did(tmp_path, capsys):
    """A run stopped early (a stop request or train.time_limit_s) says so in `status`: the step it stopped at,
    by the time limit when sessions.json says so, and once trained, the evaluation it stopped in with the
    samples made; before, every one read 'interrupted after a checkpoint', the same for a run at 300/300
    whose evaluation was cut short."""
    from dimr_lab.runner.local import prepare
    from dimr_lab.runner.plan import expand
    from dimr_lab.rundir import CheckpointIndex, RunDir, write_eval_record, write_json
    from dimr_lab.spec.ablation import load_ablation

    abl = load_ablation(write_ablation(tmp_path, seeds="[0]", steps=6))
    runs = expand(abl, results=tmp_path / "r")
    prepare(runs, executor="local")
    run = RunDir(runs[0].run_dir)
    write_json(run.path / "local.json", {"state": "interrupted", "pid": 1, "host": os.uname().nodename})
    CheckpointIndex(4, [], runs[0].identity).write(run.index_path)
    session = {"started": 1.0, "last": 2.0, "kind": "start", "from_step": 0, "to_step": 4}
    write_json(run.sessions_path, {"sessions": [dict(session, outcome="time_limit")]})

    def detail():
        code, out, _ = cli(["status", run.path, "--json"], capsys)
        assert code == 0, out
        return json.loads(out)["detail"]

    assert detail() == "stopped at step 4 after a checkpoint by train.time_limit_s; rerun to resume"
    write_json(run.sessions_path, {"sessions": [dict(session, outcome="stopped")]})
    assert detail() == "stopped at step 4 after a checkpoint; rerun to resume"
    CheckpointIndex(6, [], runs[0].identity).write(run.index_path)  # trained; its evaluation cut short
    ev = run.eval_dir(6, "abcd1234")
    (ev / "chunks").mkdir(parents=True)
    write_eval_record(ev, 6, "abcd1234", {"sample": {}, "eval": {"samples": 64}}, "last.pt")
    for a, b in ((0, 16), (16, 32)):
        (ev / "chunks" / f"chunk-{a:09d}-{b:09d}.npz").write_bytes(b"")
    write_json(run.sessions_path, {"sessions": [dict(session, outcome="time_limit")]})
    assert detail() == "stopped evaluating step 6 (32 of 64 samples made) by train.time_limit_s; rerun to resume"
    (run.path / "local.json").unlink()  # a run `train` stopped: the same, from sessions.json
    assert detail() == "stopped evaluating step 6 (32 of 64 samples made) by train.time_limit_s; rerun to resume"


def test_status_reads_each_runs_sessions_json_once(tmp_path, capsys, monkeypatch):
    """`status` read a run's sessions.json for its state, again for a stop's detail and again for the session
    totals: two or three parses of a file that grows with every session, per run, per refresh of `status
    --watch`. It is read once per run now, and what status prints (table and --json) is what it printed."""
    import builtins
    import io

    from dimr_lab.runner.local import prepare
    from dimr_lab.runner.plan import expand
    from dimr_lab.rundir import CheckpointIndex, RunDir, write_json
    from dimr_lab.spec.ablation import load_ablation

    abl = load_ablation(write_ablation(tmp_path, seeds="[0]", steps=6))
    runs = expand(abl, results=tmp_path / "r")
    prepare(runs, executor="local")
    runs = sorted(runs, key=lambda r: r.run_dir.name)
    a, b = RunDir(runs[0].run_dir), RunDir(runs[1].run_dir)
    session = {"started": 1000.0, "last": 1600.0, "from_step": 0, "to_step": 2}
    # a: a local run interrupted by its time limit after a resume; b: one `train` stopped after a continuation
    write_json(a.path / "local.json", {"state": "interrupted", "pid": 1, "host": os.uname().nodename})
    CheckpointIndex(4, [], runs[0].identity).write(a.index_path)
    write_json(a.sessions_path, {"sessions": [dict(session, kind="start", outcome="running"),
                                              dict(session, started=2000.0, last=2125.0, kind="resume",
                                                   outcome="time_limit")]})
    (b.path / "run.json").write_text(json.dumps({**json.loads((b.path / "run.json").read_text()),
                                                 "executor": "train"}))
    CheckpointIndex(2, [], runs[1].identity).write(b.index_path)
    write_json(b.sessions_path, {"sessions": [dict(session, kind="start", outcome="done"),
                                              dict(session, started=3000.0, last=3061.0, kind="continue",
                                                   outcome="stopped")]})
    monkeypatch.setenv("COLUMNS", "200")  # the table's rows on one line each
    opened = []
    for module in (io, builtins):
        real = module.open

        def counting(file, *args, _real=real, **kwargs):
            if isinstance(file, (str, Path)) and os.path.basename(file) == "sessions.json":
                opened.append(Path(file).parent.name)
            return _real(file, *args, **kwargs)

        monkeypatch.setattr(module, "open", counting)
    code, text, err = cli(["status", tmp_path / "r"], capsys)
    assert code == 0, err
    opened_text = sorted(opened)
    opened.clear()
    code, out, err = cli(["status", tmp_path / "r", "--json"], capsys)
    assert code == 0, err
    opened_json = sorted(opened)
    rows = [[cell.strip() for cell in line.split("│")[1:-1]] for line in text.splitlines() if line.startswith("│")]
    assert rows == [  # what status printed before
        [f"abl/{a.path.name}", "pending", "4/6", "-", "-", "-", "-", "stopped at step 4 after a checkpoint by "
         "train.time_limit_s; rerun to resume; resumed 1x, 12m05s over 2 sessions"],
        [f"abl/{b.path.name}", "pending", "2/6", "-", "-", "-", "-", "stopped at step 2 after a checkpoint; rerun "
         "to resume; continued 1x, 11m01s over 2 sessions"],
    ], text
    assert text.splitlines()[-1] == "abl: 2 pending" and str(tmp_path / "r") in text.splitlines()[0]
    common = {"ablation": "abl", "eta_s": None, "images_per_s": None, "job_id": None, "log_tail": [], "loss": None,
              "node": None, "sessions": 2, "slurm_state": None, "state": "pending", "steps": 6,
              "evaluations": 0, "eval_wall_s": 0, "grid": {}}
    assert [json.loads(line) for line in out.splitlines()] == [
        {**common, "run_dir": str(a.path), "run": a.path.name, "executor": "local", "step": 4, "restarts": 1,
         "continuations": 0, "wall_s": 725.0,
         "detail": "stopped at step 4 after a checkpoint by train.time_limit_s; rerun to resume"},
        {**common, "run_dir": str(b.path), "run": b.path.name, "executor": "train", "step": 2, "restarts": 0,
         "continuations": 1, "wall_s": 661.0, "detail": "stopped at step 2 after a checkpoint; rerun to resume"},
    ], out
    assert opened_text == opened_json == sorted([a.path.name, b.path.name]), (opened_text, opened_json)


def test_a_refused_submission_puts_run_json_back_whole_or_not_at_all(tmp_path, monkeypatch):
    """After sbatch refused a job array, the run records the submission had rewritten were put back with
    Path.write_bytes: a kill while writing one left a truncated run.json, which `status` then reported as a
    failed run and `run` could not read. It is put back atomically: the rewritten record or the old one."""
    import io

    from dimr_lab.runner.local import prepare, write_record
    from dimr_lab.runner.plan import expand
    from dimr_lab.runner.slurm import _undo_submission
    from dimr_lab.spec.ablation import load_ablation

    runs = expand(load_ablation(write_ablation(tmp_path, seeds="[0]")), results=tmp_path / "r")[:1]
    prepare(runs, executor="local")
    record = runs[0].folder.record_path
    before = record.read_bytes()
    write_record(runs[0], "slurm")  # what the submission does before sbatch answers
    rewritten = record.read_bytes()
    assert rewritten != before
    real_open = io.open

    class Killed(BaseException):
        pass

    def killed_mid_write(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        name = os.readlink(f"/proc/self/fd/{f.fileno()}")
        if any(c in mode for c in "wa") and Path(name).parent == record.parent:
            def write(data, _write=f.write):
                _write(data[: len(data) // 2])
                f.flush()
                raise Killed()
            f.write = write
        return f

    monkeypatch.setattr(io, "open", killed_mid_write)
    with pytest.raises(Killed):
        _undo_submission(runs, set(), {runs[0].run_dir: before}, tmp_path / "r" / ".submitit" / "none", set())
    monkeypatch.undo()
    assert record.read_bytes() == rewritten, "the record the submission wrote, whole"
    assert [p.name for p in record.parent.iterdir() if p.name.endswith(".tmp")] == []
    _undo_submission(runs, set(), {runs[0].run_dir: before}, tmp_path / "r" / ".submitit" / "none", set())
    assert record.read_bytes() == before


@pytest.mark.parametrize("executor", ["local", "slurm"])
def test_run_refuses_a_bad_dist_timeout_before_any_worker_or_job(tmp_path, capsys, monkeypatch, executor):
    """$DIMR_LAB_DIST_TIMEOUT_S reaches every worker and SLURM task: a bad value is one line from `run`, exit 2,
    nothing written; before, each local worker failed with it in its own log (exit 1) and SLURM tasks would
    have failed on the cluster."""
    abl = write_ablation(tmp_path, seeds="[0]")
    results = tmp_path / "results"
    monkeypatch.setenv("DIMR_LAB_DIST_TIMEOUT_S", "abc")
    code, out, err = cli(["run", abl, "--results", results, "--executor", executor, "--train-fn", STANDIN], capsys)
    assert code == 2 and err.strip() == "error: $DIMR_LAB_DIST_TIMEOUT_S: seconds from 1 to 86400, got 'abc'", err
    assert not results.exists()


def test_a_local_run_stopped_by_its_time_limit_says_where_in_the_runner_and_its_log(tmp_path, capsys, standin_env,
                                                                                    monkeypatch):
    """train.time_limit_s stops a local run at a checkpoint: `run` and the run's output.log say at which step
    (before, the log ended at the progress bar, with no word of the stop)."""
    abl = write_ablation(tmp_path, seeds="[0]", steps=40, ckpt=2)
    results = tmp_path / "results"
    monkeypatch.setenv("STANDIN_STEP_S", "0.05")
    code, out, err = cli(["run", abl, "--results", results, "--train-fn", STANDIN, "--only", "a", "--jobs", "1",
                          "--set", "train.time_limit_s=0.5"], capsys)
    (d,) = run_dirs(results)
    step = json.loads((d / "checkpoints" / "index.json").read_text())["last"]
    said = f"stopped at step {step} after a checkpoint; rerun to resume"
    assert 0 < step < 40 and said in err, err
    assert f"[dimr-lab] {said}" in (d / "output.log").read_text()


@pytest.mark.parametrize("executor", ["local", "debug"])
def test_run_resample_reaches_each_runs_evaluations_and_names_no_other_run(tmp_path, capsys, standin_env, executor):
    """`run --resample` hands resample=True to the trainer of each run it starts (the worker's --resample;
    in-process with --executor debug), as `eval --resample` does; without it nothing is passed. The runs'
    names (their identities) are the same with it and without."""
    abl = write_ablation(tmp_path, seeds="[0]")
    results = tmp_path / "results"

    def planned(*extra):
        code, out, err = cli(["run", abl, "--results", results, "--dry-run", "--json", *extra], capsys)
        assert code == 0, err
        return [json.loads(x)["run_dir"] for x in out.splitlines() if '"run_dir"' in x]

    assert planned("--resample") == planned() and len(planned()) == 2
    fn = "test_runner:standin_resample"
    code, out, err = cli(["run", abl, "--results", results, "--train-fn", fn, "--executor", executor, "--only", "a",
                          "--resample", "--jobs", "1"], capsys)
    assert code == 0, out + err
    code, out, err = cli(["run", abl, "--results", results, "--train-fn", fn, "--executor", executor, "--only", "b",
                          "--jobs", "1"], capsys)
    assert code == 0, out + err
    a, b = run_dirs(results)
    assert json.loads((a / "kwargs.json").read_text()) == {"resample": True}
    assert json.loads((b / "kwargs.json").read_text()) == {}
    assert sorted(str(d) for d in (a, b)) == sorted(planned())


def test_run_resample_travels_in_the_slurm_job_payload(tmp_path, monkeypatch):
    """The SLURM runner pickles TrainJob into the job: `submit(..., resample=True)` puts resample on it, and the
    job on the node hands it to the trainer (the same TrainJob is requeued as it is)."""
    from dimr_lab.runner import slurm
    from dimr_lab.runner.plan import expand
    from dimr_lab.spec.ablation import load_ablation
    from dimr_lab.spec.slurm import slurm_settings

    abl = load_ablation(write_ablation(tmp_path, seeds="[0]"))
    runs = expand(abl, results=tmp_path / "results", only=["a"])
    sent = _fake_sbatch(monkeypatch, tmp_path)
    for resample in (True, False):
        slurm.submit(runs, slurm_settings(abl), ablation=abl.name, ablation_dir=runs[0].run_dir.parent,
                     train_fn=STANDIN, resample=resample)
    assert [job.resample for job in sent] == [True, False]

    calls = []
    monkeypatch.setattr(slurm, "train_one", lambda run_dir, fn, stop, resample=False, overrides=None:
                        (calls.append(resample), (0, {"done": True}))[1])
    monkeypatch.setattr(slurm.signal, "signal", lambda *a: None)
    monkeypatch.delenv("SLURM_PROCID", raising=False)
    for job in sent:
        job(str(runs[0].run_dir))
    assert calls == [True, False]


def test_a_trainer_that_returns_without_its_evaluations_is_named_with_the_steps_it_left(tmp_path, monkeypatch):
    """train_one asked for the missing evaluations twice on its error path, and named the second answer: an
    evaluation another process finished in between left 'without the evaluations []'. One look now."""
    from dimr_lab.runner import worker
    from dimr_lab.rundir import RunDir, RunRecord
    from dimr_lab.spec.run_spec import load_run_spec
    from dimr_lab.spec.schema import to_dict

    spec = load_run_spec(None, [("train.steps", 4)])
    RunDir(tmp_path).write_record(RunRecord(spec=to_dict(spec), identity=spec.identity_hash(), variant="a"))
    answers = iter([[4], [4], []])  # before the trainer, after it, and what a second look would find
    asked = []
    monkeypatch.setattr(worker, "pending_evaluations", lambda s, d: asked.append(d) or next(answers))
    with pytest.raises(RuntimeError, match=r"without the evaluations \[4\]"):
        worker.train_one(tmp_path, lambda s, d, should_stop=None: {})
    assert len(asked) == 2


def test_run_eval_only_hands_its_settings_to_the_slurm_job_and_keeps_the_runs_record(tmp_path, monkeypatch):
    """`run --eval-only --set sample.*` on SLURM: the job read the settings from run.json, which submit rewrote
    with them (the run's plan lost). run.json stays; the settings travel in the job's payload, by run folder."""
    from dimr_lab.runner import slurm
    from dimr_lab.runner.local import write_record
    from dimr_lab.runner.plan import expand
    from dimr_lab.spec.ablation import load_ablation
    from dimr_lab.spec.slurm import slurm_settings

    abl = load_ablation(write_ablation(tmp_path, seeds="[0]"))
    (own,) = expand(abl, results=tmp_path / "results", only=["a"])
    own.run_dir.mkdir(parents=True)
    write_record(own, "local")
    record = own.folder.record_path.read_bytes()
    (run,) = expand(abl, overrides=[("sample.guidance_scale", 0.5)], results=tmp_path / "results", only=["a"])
    run.recorded = own.spec  # as `run --eval-only` plans it
    sent = _fake_sbatch(monkeypatch, tmp_path)
    slurm.submit([run], slurm_settings(abl), ablation=abl.name, ablation_dir=run.run_dir.parent, eval_only=True)
    assert own.folder.record_path.read_bytes() == record
    calls = []
    monkeypatch.setattr(slurm, "train_one", lambda run_dir, fn, stop, resample=False, overrides=None:
                        (calls.append(overrides), (0, {"done": True}))[1])
    monkeypatch.setattr(slurm.signal, "signal", lambda *a: None)
    monkeypatch.delenv("SLURM_PROCID", raising=False)
    sent[0](str(run.run_dir))
    assert calls == [[("sample.guidance_scale", 0.5)]]


def _fake_sbatch(monkeypatch, tmp_path) -> list:
    """submitit's SlurmExecutor replaced by one that submits nothing: the list it returns collects each job
    array's pickled-and-unpickled TrainJob (what a node would run)."""
    import pickle

    import submitit

    from dimr_lab.runner import slurm

    sent = []

    class FakeJob:
        def __init__(self, i):
            self.job_id = f"77_{i}"
            self.paths = type("P", (), {"folder": tmp_path, "stdout": tmp_path / "o", "stderr": tmp_path / "e"})

    class FakeExecutor:
        def __init__(self, **kwargs):
            pass

        def update_parameters(self, **kwargs):
            pass

        def map_array(self, fn, args):
            sent.append(pickle.loads(pickle.dumps(fn)))
            return [FakeJob(i) for i in range(len(args))]

    monkeypatch.setattr(slurm, "live_jobs", lambda runs: {})
    monkeypatch.setattr(submitit, "SlurmExecutor", FakeExecutor)
    return sent


def _finished_run(tmp_path):
    """One run of a one-seed ablation trained to done by the stand-in trainer, under tmp_path/r."""
    from dimr_lab.runner.local import run_local
    from dimr_lab.runner.plan import expand
    from dimr_lab.spec.ablation import load_ablation

    (run,) = expand(load_ablation(write_ablation(tmp_path, seeds="[0]")), results=tmp_path / "r", only=["a"])
    assert [o.status for o in run_local([run], train_fn=STANDIN, show_progress=False)] == ["done"]
    return run


def test_status_shows_a_finished_run_that_a_process_evaluates_again_as_running(tmp_path, standin_env):
    """`run --eval-only --set sample.*` leaves run.json as planned, so the run's own plan is done while its worker
    evaluates it with other settings: status says running (who holds it), not done, until that process ends."""
    from dimr_lab.rundir import run_lock
    from dimr_lab.runner.status import collect

    run = _finished_run(tmp_path)
    assert [s.state for s in collect(tmp_path / "r")] == ["done"]
    with run_lock(run.run_dir, purpose="eval"):
        (st,) = collect(tmp_path / "r")
        assert st.state == "running" and "evaluating beyond its plan" in st.detail and str(os.getpid()) in st.detail
    assert [s.state for s in collect(tmp_path / "r")] == ["done"]


def test_cancel_stops_a_local_worker_evaluating_a_finished_run_beyond_its_plan(tmp_path, capsys, standin_env):
    """`run --eval-only --set sample.*` on a finished run: its worker holds the folder while status shows the run
    as running (no executor: the plan is done). cancel stops that worker, as it stops a training one, and leaves
    alone a process holding the folder that is no worker of it (`dimr-lab eval` in a terminal)."""
    import signal
    import subprocess
    import sys

    run = _finished_run(tmp_path)
    run_dir = str(run.run_dir.resolve())
    hold = ("import sys, time\n"
            "from dimr_lab.rundir import run_lock\n"
            "with run_lock(sys.argv[2], purpose='eval'):\n"
            "    print('held', flush=True)\n"
            "    time.sleep(120)\n")
    for argv, stopped in ((["dimr_lab.runner.worker", run_dir], True), (["eval", run_dir], False)):
        proc = subprocess.Popen([sys.executable, "-c", hold, *argv], stdout=subprocess.PIPE, start_new_session=True)
        try:
            assert proc.stdout.readline().strip() == b"held"
            code, out, err = cli(["cancel", tmp_path / "r"], capsys)
            assert code == 0, err
            if stopped:
                assert f"stopping local run {run.run_dir.name} (pid {proc.pid})" in out, out
                assert proc.wait(timeout=60) == -signal.SIGTERM
            else:
                assert "nothing queued or running" in out and proc.poll() is None, out
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
