"""Against the local SLURM (scripts/slurm.sh start): job arrays through submitit, sacct, a requeue in the
middle of training that resumes to the same result, a 2-task job with torch.distributed (gloo), cancel.

Skipped, with the reason, where SLURM is not up. The trainer is test_runner.standin_train.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import tiny_evaluated_ablation
from test_runner import STANDIN, TESTS, cli, final_metrics, run_dirs, standin_train, write_ablation

pytestmark = pytest.mark.slurm
# seconds to wait for a job; about 10 s is usual, but a loaded 2-core machine starts python + torch slowly
WAIT = float(os.environ.get("DIMR_LAB_SLURM_WAIT_S", "300"))


def _unavailable() -> str | None:
    reason = os.environ.get("DIMR_LAB_SLURM_UNAVAILABLE")
    if reason:
        return reason
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "SLURM client not on PATH (start it as root with: bash scripts/slurm.sh start)"
    try:
        r = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as err:
        return f"sinfo failed: {err}"
    if r.returncode != 0 or not any(s.strip("*~#") in ("idle", "mix", "alloc", "comp") for s in r.stdout.split()):
        return f"SLURM is not up (sinfo: {(r.stdout + r.stderr).strip() or r.returncode})"
    r = subprocess.run(["sacct", "-n", "-X", "-S", "now"], capture_output=True, text=True, timeout=20)
    if r.returncode != 0:
        return f"SLURM accounting (sacct) unavailable: {r.stderr.strip()}"
    return None


@pytest.fixture(scope="module")
def slurm_up():
    reason = _unavailable()
    if reason:
        print(f"SLURM tests skipped: {reason}")
        pytest.skip(reason)


@pytest.fixture
def job_env(monkeypatch, slurm_up):
    """Jobs inherit the submitting environment (sbatch --export=ALL): the stand-in's folder, one thread."""
    old = os.environ.get("PYTHONPATH", "")
    monkeypatch.setenv("PYTHONPATH", str(TESTS) + (os.pathsep + old if old else ""))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("STANDIN_STEP_S", raising=False)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    return monkeypatch


def _wait(pred, timeout: float, what: str, poll: float = 0.5):
    t0 = time.time()
    while time.time() - t0 < timeout:
        v = pred()
        if v:
            return v
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _sacct(job: str) -> dict[str, str]:
    out = subprocess.run(["sacct", "-n", "-P", "-X", "-o", "JobID,State", "-j", job], capture_output=True,
                         text=True, timeout=30).stdout
    return {ln.split("|")[0]: ln.split("|")[1].split()[0] for ln in out.splitlines() if "|" in ln}


def _release_soon(job_id: str) -> None:
    """Let a requeued job, pending, start in about 5 s: SLURM holds it back ~2 minutes (BeginTime). Not at once:
    slurmd revokes the first run's credential as it cleans up, and a restart within that moment is killed ("Job
    credential revoked"; seen once under load). Once the 5 s are over the start time is set again, which has the
    scheduler look at the job then: on its own it looks again only at its next periodic pass (up to 30 s)."""
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now+5"], timeout=30)
    time.sleep(5.5)
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], capture_output=True, timeout=30)


def _scancel_all(dirs):
    from dimr_lab.runner.status import cancel

    for d in dirs:
        if Path(d).exists():
            cancel(Path(d))


def test_job_array_sacct_and_skip(tmp_path, capsys, job_env):
    extra = '\n[[variant]]\nname = "c"\n"train.lr" = 0.02\n'
    abl = write_ablation(tmp_path, seeds="[0]", steps=4, ckpt=2, extra=extra)
    results = tmp_path / "results"
    try:
        code, out, err = cli(["run", abl, "--results", results, "--executor", "slurm", "--train-fn", STANDIN,
                              "--json"], capsys)
        assert code == 0, err
        sub = [json.loads(x) for x in out.splitlines()]
        assert [s["status"] for s in sub] == ["submitted"] * 3
        ids = [s["job_id"] for s in sub]
        array = ids[0].split("_")[0]
        assert ids == [f"{array}_{i}" for i in range(3)]
        dirs = run_dirs(results)
        _wait(lambda: all(list(d.glob("evals/*/metrics.json")) for d in dirs), WAIT, "the array to finish")
        for d in dirs:
            info = json.loads((d / "slurm.json").read_text())["jobs"][-1]
            assert info["array_job_id"] == array and Path(info["stdout"]).parent.parent.name == ".submitit"
        def recorded():
            s = _sacct(array)
            return s if all(s.get(i) == "COMPLETED" for i in ids) else None
        states = _wait(recorded, 30, "sacct to record the array tasks")
        assert all(states[i] == "COMPLETED" for i in ids)
        code, out, err = cli(["status", results, "--json"], capsys)
        assert [json.loads(x)["state"] for x in out.splitlines()] == ["done"] * 3
        # submitted again: nothing to do
        code, out, err = cli(["run", abl, "--results", results, "--executor", "slurm", "--train-fn", STANDIN,
                              "--json"], capsys)
        assert code == 0 and [json.loads(x)["status"] for x in out.splitlines()] == ["done (skipped)"] * 3
    finally:
        _scancel_all([results])


@pytest.mark.parametrize("how", ["scontrol_requeue", "preemption_signal"])
def test_requeue_mid_training_resumes_to_the_same_weights(tmp_path, job_env, how):
    """`scontrol requeue` (SIGTERM: checkpoint at the next step, SLURM requeues), or the preemption/timeout
    signal (USR2: checkpoint, then submitit's Checkpointable handler requeues the job itself)."""
    from dimr_lab.rundir import RunDir
    from dimr_lab.runner.local import prepare
    from dimr_lab.runner.plan import expand
    from dimr_lab.runner.slurm import submit
    from dimr_lab.runner.worker import train_one
    from dimr_lab.spec.ablation import load_ablation
    from dimr_lab.spec.slurm import slurm_settings

    abl = load_ablation(write_ablation(tmp_path, seeds="[0]", steps=30, ckpt=4))
    run = expand(abl, results=tmp_path / "results")[0]
    job_env.setenv("STANDIN_STEP_S", "0.3")
    try:
        res = submit([run], slurm_settings(abl), ablation=abl.name, ablation_dir=run.run_dir.parent,
                     train_fn=STANDIN)
        (_, job_id), = res["submitted"]
        _wait(lambda: (RunDir(run.run_dir).last_logged_step() or 0) >= 9, WAIT, "training to pass step 9")
        if how == "scontrol_requeue":
            subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=30)
        else:
            subprocess.run(["scancel", "--signal=USR2", job_id], check=True, timeout=30)
        def released():  # a requeued job waits ~2 minutes (BeginTime) before it may start again: see _release_soon
            st = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True).stdout
            if "PENDING" in st:
                _release_soon(job_id)
                return True
            return False
        _wait(released, 30, "the requeued job to be pending")
        _wait(lambda: list(run.run_dir.glob("evals/*/metrics.json")), WAIT, "the requeued job to finish")
    finally:
        _scancel_all([run.run_dir])
    log = [json.loads(x) for x in (run.run_dir / "log.jsonl").read_text().splitlines()]
    resumed = [e for e in log if e.get("event") == "resumed"]
    assert resumed and resumed[0]["restart"] == "1" and 4 <= resumed[0]["from"] < 30
    # the same run, never interrupted, in this process
    job_env.setenv("STANDIN_STEP_S", "0")
    fresh = expand(abl, results=tmp_path / "fresh")[0]
    prepare([fresh], executor="debug")
    train_one(fresh.run_dir, standin_train)
    w_requeued = json.loads(final_metrics(run.run_dir).read_text())["w"]
    w_fresh = json.loads(final_metrics(fresh.run_dir).read_text())["w"]
    assert w_requeued == w_fresh


def test_a_job_stopped_by_the_time_limit_requeues_itself_and_the_run_finishes(tmp_path, job_env):
    """train.time_limit_s shorter than the run: each job stops at a checkpoint with no signal, requeues itself
    as on the timeout notice, and the next job resumes; the result is the uninterrupted run's."""
    from dimr_lab.rundir import RunDir
    from dimr_lab.runner.local import prepare
    from dimr_lab.runner.plan import expand
    from dimr_lab.runner.slurm import submit
    from dimr_lab.runner.worker import train_one
    from dimr_lab.spec.ablation import load_ablation
    from dimr_lab.spec.slurm import slurm_settings

    abl = load_ablation(write_ablation(tmp_path, seeds="[0]", steps=20, ckpt=2, extra='"train.time_limit_s" = 3.0'))
    (run,) = [r for r in expand(abl, results=tmp_path / "results") if r.run_dir.name.startswith("b-")]
    job_env.setenv("STANDIN_STEP_S", "0.3")
    try:
        res = submit([run], slurm_settings(abl), ablation=abl.name, ablation_dir=run.run_dir.parent,
                     train_fn=STANDIN)
        (_, job_id), = res["submitted"]

        released = set()

        def finished_or_released():  # a requeued job waits ~2 minutes before it may start: let it start soon,
            if list(run.run_dir.glob("evals/*/metrics.json")):  # once per requeue (each update postpones it)
                return True
            job = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True).stdout
            restarts = re.search(r"\bRestarts=(\d+)", job)
            if "JobState=PENDING" in job and restarts and int(restarts[1]) > 0 and restarts[1] not in released:
                released.add(restarts[1])
                _release_soon(job_id)
            return False
        _wait(finished_or_released, 2 * WAIT, "the run to finish over its requeued jobs", poll=2)
    finally:
        _scancel_all([run.run_dir])
    assert RunDir(run.run_dir).last_logged_step() == 20
    log = [json.loads(x) for x in (run.run_dir / "log.jsonl").read_text().splitlines()]
    resumed = [e for e in log if e.get("event") == "resumed"]
    assert resumed and resumed[0]["restart"] == "1" and 2 <= resumed[0]["from"] < 20, resumed
    job_logs = "".join(p.read_text() for p in run.run_dir.parent.glob(".submitit/**/*_log.out"))
    assert "train.time_limit_s reached at step" in job_logs and "requeueing" in job_logs, job_logs[-2000:]
    job_env.setenv("STANDIN_STEP_S", "0")
    fresh = expand(abl, results=tmp_path / "fresh")
    (fresh,) = [r for r in fresh if r.run_dir.name.startswith("b-")]
    prepare([fresh], executor="debug")
    train_one(fresh.run_dir, standin_train)  # 20 unslept steps end within the time limit
    assert json.loads(final_metrics(run.run_dir).read_text())["w"] == \
        json.loads(final_metrics(fresh.run_dir).read_text())["w"]


def test_two_task_job_all_reduces(tmp_path, capsys, job_env):
    abl = write_ablation(tmp_path, seeds="[0]", steps=4, ckpt=2)
    results = tmp_path / "results"
    try:
        code, out, err = cli(["run", abl, "--results", results, "--executor", "slurm", "--train-fn", STANDIN,
                              "--set", "slurm.tasks_per_node=2", "--set", "ablation.seeds=[5]", "--json"], capsys)
        assert code == 0, err
        dirs = run_dirs(results)
        d = dirs[0]
        _wait(lambda: list(d.glob("evals/*/metrics.json")), WAIT, "the 2-task job to finish")
        m = json.loads(final_metrics(d).read_text())
        assert m["world_size"] == 2 and m["allreduce_check"] == 3.0
        assert json.loads((d / "slurm.json").read_text())["jobs"][-1]["tasks"] == 2
    finally:
        _scancel_all([results])


def test_cancel_queued(tmp_path, capsys, job_env):
    abl = write_ablation(tmp_path, seeds="[0]", steps=200, ckpt=50)
    results = tmp_path / "results"
    job_env.setenv("STANDIN_STEP_S", "0.5")
    try:
        code, out, err = cli(["run", abl, "--results", results, "--executor", "slurm", "--train-fn", STANDIN,
                              "--set", "slurm.array_parallelism=1"], capsys)
        assert code == 0, err
        code, out, err = cli(["status", results, "--json"], capsys)
        assert {json.loads(x)["state"] for x in out.splitlines()} <= {"pending", "running"}
        code, out, err = cli(["cancel", results], capsys)
        assert code == 0 and "scancel" in out
        def cancelled():
            code, out, err = cli(["status", results, "--json"], capsys)
            st = [json.loads(x) for x in out.splitlines()]
            # wait for accounting too: right after scancel sacct may not have the records yet (seen on a
            # freshly started slurmdbd), and status then reports the job as unknown to SLURM
            done = all(s["state"] == "failed" and s.get("slurm_state") in ("CANCELLED", "FAILED") for s in st)
            return st if done else None
        st = _wait(cancelled, WAIT, "the jobs to be cancelled")
        # a task that had started may end FAILED: it checkpoints on SIGTERM and exits non-zero
        assert all(s["slurm_state"] in ("CANCELLED", "FAILED") for s in st), st
        assert any(s["slurm_state"] == "CANCELLED" for s in st), st
    finally:
        _scancel_all([results])


EVAL_ONLY = tiny_evaluated_ablation("evalonly", "[0, 1]",
                                    '[[variant]]\nname = "a"\n[[variant]]\nname = "b"\n"train.lr" = 1e-3\n')


def test_eval_only_evaluates_every_run_as_an_array(tmp_path, capsys, job_env, classifier_cache):
    abl = tmp_path / "evalonly.toml"
    abl.write_text(EVAL_ONLY)
    results = tmp_path / "results"
    code, out, err = cli(["run", abl, "--results", results, "--executor", "debug"], capsys)
    assert code == 0, err
    dirs = run_dirs(results, "evalonly")
    checkpoints = {d: (d / "checkpoints" / "last.pt").read_bytes() for d in dirs}
    try:
        code, out, err = cli(["run", abl, "--results", results, "--executor", "slurm", "--eval-only", "--set",
                              "eval.samples=16", "--json"], capsys)
        assert code == 0, err
        sub = [json.loads(x) for x in out.splitlines()]
        assert [s["status"] for s in sub] == ["submitted"] * 4
        assert len({s["job_id"].split("_")[0] for s in sub}) == 1  # one array
        _wait(lambda: all(len(list(d.glob("evals/*/metrics.json"))) == 2 for d in dirs), WAIT,
              "the evaluation array to finish")
    finally:
        _scancel_all([results])
    for d in dirs:
        assert (d / "checkpoints" / "last.pt").read_bytes() == checkpoints[d]  # nothing trained
        samples = sorted(json.loads(m.read_text())["samples"] for m in d.glob("evals/*/metrics.json"))
        assert samples == [8, 16]
    # an untrained run is refused by --eval-only with one line, before any folder is made (the dry run says so)
    code, out, err = cli(["run", abl, "--results", tmp_path / "other", "--executor", "debug", "--eval-only"], capsys)
    assert code == 2 and "--eval-only evaluates trained checkpoints" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "other").exists()
    code, out, err = cli(["run", abl, "--results", tmp_path / "other", "--eval-only", "--dry-run"], capsys)
    assert code == 0 and "evaluates trained checkpoints" in " ".join(out.split())


def test_a_pass_through_setting_reaches_sacct(tmp_path, capsys, job_env):
    abl = write_ablation(tmp_path, seeds="[0]", steps=2, ckpt=2)
    results = tmp_path / "results"
    try:
        code, out, err = cli(["run", abl, "--results", results, "--executor", "slurm", "--train-fn", STANDIN,
                              "--only", "a", "--set", 'slurm.comment="dimr pass-through"', "--set",
                              'slurm.additional={ wckey = "dimrtest" }', "--set", 'slurm.time="0:02:00"',
                              "--set", "slurm.signal_delay_s=30", "--json"],
                             capsys)
        assert code == 0, err
        (job,) = [json.loads(x)["job_id"] for x in out.splitlines()]

        def recorded():
            res = subprocess.run(["sacct", "-n", "-P", "-X", "-o", "JobID,Comment,Timelimit", "-j", job.split("_")[0]],
                                 capture_output=True, text=True, timeout=30).stdout
            # the comment can reach the database before the time limit does: wait for both fields
            fields = res.strip().split("\n")[0].split("|") if res.strip() else []
            return res if len(fields) >= 3 and "dimr pass-through" in fields[1] and fields[2] else None
        res = _wait(recorded, WAIT, "sacct to show the comment and the time limit")
        assert "00:02:00" in res
    finally:
        _scancel_all([results])


def test_a_refused_submission_is_one_line_and_leaves_nothing(tmp_path, capsys, job_env):
    abl = write_ablation(tmp_path, seeds="[0]", steps=2, ckpt=2)
    results = tmp_path / "results"
    code, out, err = cli(["run", abl, "--results", results, "--executor", "slurm", "--train-fn", STANDIN,
                          "--only", "a", "--set", "slurm.partition=nosuch"], capsys)
    assert code == 2 and err.count("\n") == 1 and "sbatch refused" in err and "nosuch" in err, err
    assert "Traceback" not in err + out
    assert not results.exists() or not any(p.is_file() for p in results.rglob("*")), list(results.rglob("*"))


def test_an_option_sbatch_does_not_know_is_one_line_and_leaves_nothing(tmp_path, capsys, job_env):
    """sbatch says 'unrecognized option' without the word error, then a pointer to --help: still one line."""
    abl = write_ablation(tmp_path, seeds="[0]", steps=2, ckpt=2)
    results = tmp_path / "results"
    code, out, err = cli(["run", abl, "--results", results, "--executor", "slurm", "--train-fn", STANDIN,
                          "--only", "a", "--set", 'slurm.sbatch_lines=["--no-such-option=1"]'], capsys)
    assert code == 2 and err.count("\n") == 1 and "sbatch refused" in err, err
    assert "unrecognized option" in err and "--no-such-option" in err and "--help" not in err, err
    assert not results.exists() or not any(p.is_file() for p in results.rglob("*")), list(results.rglob("*"))


def test_queued_jobs_survive_an_unanswering_squeue_and_cancel_finds_every_job(tmp_path, capsys, job_env):
    """A run with a job still queued is never submitted again while squeue does not answer (it cannot be told
    from a gone job); the dry run shows it queued; cancel reaches every job a run's history records."""
    abl = write_ablation(tmp_path, seeds="[0]", steps=2, ckpt=2)
    results = tmp_path / "results"
    args = ["run", abl, "--results", results, "--executor", "slurm", "--train-fn", STANDIN, "--only", "a",
            "--set", 'slurm.additional={ begin = "now+600" }']
    real_path = os.environ["PATH"]
    try:
        code, out, err = cli([*args, "--json"], capsys)
        assert code == 0, err
        (job,) = [json.loads(x)["job_id"] for x in out.splitlines()]
        (run,) = run_dirs(results)
        code, out, err = cli([*args, "--dry-run", "--json"], capsys)
        assert [json.loads(x)["status"] for x in out.splitlines() if '"run_dir"' in x] == ["queued"]
        fake = tmp_path / "bin"
        fake.mkdir()
        (fake / "squeue").write_text('#!/bin/sh\necho "squeue: error: Socket timed out" >&2\nexit 1\n')
        (fake / "squeue").chmod(0o755)
        path = os.environ["PATH"]
        job_env.setenv("PATH", f"{fake}{os.pathsep}{path}")
        code, out, err = cli(args, capsys)
        assert code == 2 and "squeue did not answer" in err and "nothing submitted" in err, err
        # the dry run says so too, rather than calling the queued run one to run
        code, out, err = cli([*args, "--dry-run", "--json"], capsys)
        (planned,) = [json.loads(x) for x in out.splitlines() if '"run_dir"' in x]
        assert code == 0 and planned["status"] == "unknown" and "squeue did not answer" in planned["problem"], out
        assert [j["job_id"] for j in json.loads((run / "slurm.json").read_text())["jobs"]] == [job]
        code, out, err = cli(["cancel", results], capsys)
        assert code == 2 and "none cancelled" in err
        job_env.setenv("PATH", path)
        # a second job recorded before the first (as a lost answer once made): cancel reaches both
        history = json.loads((run / "slurm.json").read_text())
        history["jobs"].append({**history["jobs"][0], "job_id": "999999999"})
        (run / "slurm.json").write_text(json.dumps(history))
        code, out, err = cli(["cancel", results], capsys)
        assert code == 0 and job in out, out
        _wait(lambda: _sacct(job.split("_")[0]).get(job, "").startswith("CANCELLED") or None, 60, "the cancel")
    finally:
        job_env.setenv("PATH", real_path)  # the real squeue, also when an assertion failed under the fake one
        _scancel_all([results])


def test_a_bad_setting_found_on_the_node_is_one_line_in_the_jobs_log(tmp_path, capsys, job_env):
    abl = write_ablation(tmp_path, seeds="[0]", steps=2, ckpt=2)
    results = tmp_path / "results"
    try:
        code, out, err = cli(["run", abl, "--results", results, "--executor", "slurm", "--only", "a",
                              "--train-fn", "test_runner:standin_bad_setting", "--json"], capsys)
        assert code == 0, err

        def failed():
            code, out, _ = cli(["status", results, "--json"], capsys)
            (st,) = [json.loads(x) for x in out.splitlines()]
            return st if st["state"] == "failed" else None
        st = _wait(failed, WAIT, "the job to fail")
        tail = "\n".join(st["log_tail"])
        assert "error: " in tail and "data.root: no such folder on this node" in tail and "Traceback" not in tail
    finally:
        _scancel_all([results])


def test_slurm_sh_status_tells_a_user_who_is_not_root_the_daemons_are_up(slurm_up):
    """`scripts/slurm.sh status` by a user who may not signal root's daemons (nor read every pid file) still
    sees them up: it used to call every daemon down while the cluster took jobs."""
    if os.geteuid() != 0 or shutil.which("runuser") is None:
        pytest.skip("needs root (to run the script as another user) and runuser")
    script = Path(__file__).resolve().parent.parent / "scripts" / "slurm.sh"
    with open(script) as f:  # through stdin: the user may not read the checkout
        r = subprocess.run(["runuser", "-u", "nobody", "--", "bash", "-s", "status"], stdin=f, cwd="/",
                           capture_output=True, text=True, timeout=60)
    lines = r.stdout.splitlines()
    assert r.returncode == 0, r.stdout + r.stderr
    for daemon in ("slurmctld", "slurmd"):
        assert any(ln.startswith("up") and f" {daemon} (pid" in ln for ln in lines), r.stdout
    assert not any(ln.startswith("down") for ln in lines), r.stdout
    assert "Permission denied" not in r.stderr, r.stderr


def _signal_until_it_fails(results, job: str, capsys) -> tuple:
    """The one run under results, once its job has passed step 3, been sent the checkpoint signal (USR2, as
    SLURM's --signal does before the time limit) and ended FAILED: (its folder, its status)."""
    from dimr_lab.rundir import RunDir

    (run,) = run_dirs(results)
    _wait(lambda: (RunDir(run).last_logged_step() or 0) >= 3, WAIT, "training to pass step 3")
    subprocess.run(["scancel", "--signal=USR2", job], check=True, timeout=30)

    def ended():
        _, out, _ = cli(["status", results, "--json"], capsys)
        (st,) = [json.loads(x) for x in out.splitlines()]
        return st if st["state"] == "failed" and st["slurm_state"] == "FAILED" else None
    return run, _wait(ended, WAIT, "the job to end")


def test_a_run_out_of_requeues_ends_with_one_line_and_status_says_it_resumes(tmp_path, capsys, job_env):
    """The checkpoint signal once more than slurm.max_requeues allows (a short time limit counts every signal as a
    timeout): the task checkpoints and ends with one line saying so, no traceback; status says a rerun resumes."""
    abl = write_ablation(tmp_path, seeds="[0]", steps=60, ckpt=50)
    results = tmp_path / "results"
    job_env.setenv("STANDIN_STEP_S", "0.3")
    try:
        code, out, err = cli(["run", abl, "--results", results, "--executor", "slurm", "--train-fn", STANDIN,
                              "--only", "a", "--set", "slurm.max_requeues=0", "--json"], capsys)
        assert code == 0, err
        (job,) = [json.loads(x)["job_id"] for x in out.splitlines()]
        run, st = _signal_until_it_fails(results, job, capsys)
    finally:
        _scancel_all([results])
    step = json.loads((run / "checkpoints" / "index.json").read_text())["last"]
    assert 3 <= step < 60
    tail = "\n".join(st["log_tail"])
    assert "Traceback" not in tail and "not requeued (timed-out too many times" in tail, tail
    assert f"a rerun resumes from step {step}" in st["detail"], st
    assert [j["job_id"] for j in json.loads((run / "slurm.json").read_text())["jobs"]] == [job]


def test_status_says_why_a_queued_job_waits(tmp_path, capsys, job_env):
    """A job that can never start here (two nodes asked of a one-node partition, which sbatch accepts) was shown
    'queued (PENDING)' forever; status gives squeue's reason."""
    nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True, timeout=20).stdout.split()
    if len(set(nodes)) != 1:
        pytest.skip("needs a one-node cluster")
    abl = write_ablation(tmp_path, seeds="[0]", steps=2, ckpt=2)
    results = tmp_path / "results"
    try:
        code, out, err = cli(["run", abl, "--results", results, "--executor", "slurm", "--train-fn", STANDIN,
                              "--only", "a", "--set", "slurm.nodes=2"], capsys)
        assert code == 0, err

        def said():
            code, out, _ = cli(["status", results, "--json"], capsys)
            (st,) = [json.loads(x) for x in out.splitlines()]
            return st if "PartitionNodeLimit" in st["detail"] else None  # the scheduler may say Priority first
        st = _wait(said, 60, "the scheduler to give the reason")
        assert st["state"] == "pending" and st["detail"] == "queued (PENDING: PartitionNodeLimit)", st
    finally:
        _scancel_all([results])


def test_jobs_are_requeueable_and_a_refused_requeue_is_one_line(tmp_path, capsys, job_env):
    """Jobs go in with --requeue (a cluster whose default is JobRequeue=0 refused `scontrol requeue` after the
    checkpoint signal, and the task ended with a traceback); where SLURM refuses the requeue all the same, the task
    ends with one line saying where its checkpoint is."""
    fake = tmp_path / "bin"
    fake.mkdir()
    real = shutil.which("scontrol")
    (fake / "scontrol").write_text(f'#!/bin/sh\nif [ "$1" = requeue ]; then\n  echo "Requested operation is '
                                   f'presently disabled for job $2" >&2\n  exit 1\nfi\nexec {real} "$@"\n')
    (fake / "scontrol").chmod(0o755)
    abl = write_ablation(tmp_path, seeds="[0]", steps=60, ckpt=50)
    results = tmp_path / "results"
    job_env.setenv("STANDIN_STEP_S", "0.3")
    job_env.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")  # the job's environment: sbatch passes it on
    try:
        code, out, err = cli(["run", abl, "--results", results, "--executor", "slurm", "--train-fn", STANDIN,
                              "--only", "a", "--json"], capsys)
        assert code == 0, err
        (job,) = [json.loads(x)["job_id"] for x in out.splitlines()]
        shown = subprocess.run([real, "show", "job", job], capture_output=True, text=True, timeout=30).stdout
        assert "Requeue=1" in shown, shown
        run, st = _signal_until_it_fails(results, job, capsys)
    finally:
        _scancel_all([results])
    tail = "\n".join(st["log_tail"])
    assert "Traceback" not in tail and "not requeued (scontrol requeue failed" in tail, tail
