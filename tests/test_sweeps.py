"""A cluster researcher's loop without a cluster: SLURM settings as written on a cluster (defaults, layers,
provenance, validation), sweeps from the command line, status of running runs."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from conftest import cli
from dimr_lab.spec.slurm import parse_time

ROOT = Path(__file__).resolve().parents[1]
FILE = ROOT / "ablations" / "tdln_vs_adaln.toml"


@pytest.mark.parametrize("text,minutes", [("90", 90), ("1:30", 2), ("01:30:00", 90), ("2-00:00:00", 2880),
                                          ("1-12", 2160), ("0-00:30", 30), (45, 45)])
def test_slurm_time_formats(text, minutes):
    assert parse_time(text) == minutes


def dry(capsys, tmp_path, *args):
    code, out, err = cli(["run", FILE, "--dry-run", "--executor", "slurm", "--results", tmp_path / "r", *args], capsys)
    return code, out, err


def sbatch_lines(out: str) -> dict[str, str]:
    lines = {}
    for ln in out.splitlines():
        if ln.startswith("#SBATCH --"):
            key, _, value = ln[len("#SBATCH --"):].partition("=")
            lines[key] = value
    return lines


def test_user_defaults_then_file_then_profile_then_set(tmp_path, capsys, monkeypatch):
    cfg = tmp_path / "config.toml"
    cfg.write_text('[slurm]\npartition = "gpu"\naccount = "lab"\ntime = "2-00:00:00"\nqos = "normal"\n'
                   'additional = { hint = "nomultithread" }\n')
    monkeypatch.setenv("DIMR_LAB_CONFIG", str(cfg))
    code, out, err = dry(capsys, tmp_path, "--set", "slurm.qos=high", "--set", 'slurm.comment="sweep 1"',
                         "--set", 'slurm.sbatch_lines=["--exclusive"]', "--set", 'slurm.srun_args=["--cpu-bind=none"]')
    assert code == 0, err
    sb = sbatch_lines(out)
    # the user's partition and account; the file's time limit (time_min = 30) beats the user's default
    assert sb["partition"] == "gpu" and sb["account"] == "lab" and sb["qos"] == "high" and sb["time"] == "30"
    assert sb["comment"] in ("'sweep 1'", "sweep 1") and sb["hint"] == "nomultithread" and "exclusive" in sb
    assert sb["cpus-per-task"] == "1" and sb["array"] == "0-14%2"  # from the file's [slurm]
    assert "--cpu-bind=none" in out
    assert "slurm.partition = 'gpu'  <- user config" in out and "slurm.qos = 'high'  <- --set" in out
    assert "slurm.array_parallelism = 2  <- " in out and "tdln_vs_adaln.toml [slurm]" in out
    # a profile's slurm.* entries sit between the file and --set
    code, out, err = dry(capsys, tmp_path, "--profile", "paper")
    sb = sbatch_lines(out)
    assert sb["gpus-per-node"] == "8" and sb["ntasks-per-node"] == "8" and sb["partition"] == "gpu"
    assert sb["time"] == "2880" and "[profile.paper]" in out
    code, out, err = dry(capsys, tmp_path, "--set", 'slurm.time="1:00:00"')
    assert sbatch_lines(out)["time"] == "60"
    # requeueable whatever the cluster's default: a timed-out or preempted task requeues itself
    assert "requeue" in sb


@pytest.mark.parametrize("args,fragment", [
    (["--set", 'slurm.time="2 days"'], "is not a SLURM time"),
    (["--set", 'slurm.time="25:61:00:00"'], "is not a SLURM time"),
    (["--set", "slurm.gpus_per_node=4"], "4 GPUs per node but 1 task(s) per node"),
    (["--set", "slurm.gpus_per_node=2", "--set", "slurm.tasks_per_node=4"], "2 task(s) would have no GPU"),
    (["--set", 'slurm.mem="lots"'], "not a SLURM memory size"),
    (["--set", 'slurm.sbatch_lines=["#SBATCH --x"]'], "expected an sbatch option"),
    (["--set", "slurm.partion=gpu"], "did you mean 'partition'"),
    (["--set", "slurm.signal_delay_s=7200"], "not shorter than the time limit (30 min)"),
    (["--set", 'slurm.gres="gpu:a100:8"'], "gres gives 8 GPUs per node but there are 1 task(s) per node"),
    (["--set", 'slurm.sbatch_lines=["--time=10"]'], "--time is checked or set by dimr-lab"),
    (["--set", 'slurm.sbatch_lines=["--output=/tmp/x"]'], "--output is checked or set by dimr-lab"),
    (["--set", "slurm.additional={ no-kill = false }"], "false is no sbatch value"),
    (["--set", "slurm.additional={ no-requeue = true }"], "dimr-lab submits every job with --requeue"),
    (["--set", 'slurm.sbatch_lines=["--no-requeue"]'], "dimr-lab submits every job with --requeue"),
])
def test_bad_slurm_settings_are_one_line(args, fragment, tmp_path, capsys):
    code, out, err = dry(capsys, tmp_path, *args)
    assert code == 2 and fragment in err and err.count("\n") == 1 and "Traceback" not in err, err


def test_slurm_time_as_a_number_and_gpus_from_gres(tmp_path, capsys):
    code, out, err = dry(capsys, tmp_path, "--set", "slurm.time=90")
    assert code == 0 and sbatch_lines(out)["time"] == "90", err
    code, out, err = dry(capsys, tmp_path, "--set", 'slurm.gres="gpu:a100:4"', "--set", "slurm.tasks_per_node=0",
                         "--set", "train.batch_size=32")
    assert code == 0 and sbatch_lines(out)["ntasks-per-node"] == "4", err  # one process per GPU gres asks for
    # a limit given one way replaces the other spelling's source line, and empty settings are not listed
    code, out, err = dry(capsys, tmp_path, "--set", 'slurm.time="1:00:00"')
    assert "slurm.time = '1:00:00'  <- --set" in out and "slurm.time_min =" not in out and "slurm.setup" not in out


def test_a_batch_that_does_not_divide_over_the_jobs_processes_is_refused_before_submitting(tmp_path, capsys):
    args = ["run", FILE, "--executor", "slurm", "--results", tmp_path / "r", "--only", "tdln", "--seeds", "0",
            "--set", "train.batch_size=33", "--set", "slurm.tasks_per_node=2"]
    code, out, err = cli([*args, "--dry-run", "--json"], capsys)
    (row,) = [json.loads(x) for x in out.splitlines() if '"run_dir"' in x]
    assert code == 0 and "33 does not divide over 2 processes" in row["problem"]
    code, out, err = cli(args, capsys)
    assert code == 2 and "33 does not divide over 2 processes of a job" in err and not (tmp_path / "r").exists()


def test_a_bad_user_config_names_its_file(tmp_path, capsys, monkeypatch):
    cfg = tmp_path / "config.toml"
    cfg.write_text('[slurm]\ntime = "whenever"\n')
    monkeypatch.setenv("DIMR_LAB_CONFIG", str(cfg))
    code, out, err = dry(capsys, tmp_path)
    assert code == 2 and str(cfg) in err and "slurm.time" in err


def plan(capsys, tmp_path, *args) -> list[dict]:
    code, out, err = cli(["run", FILE, "--dry-run", "--json", "--results", tmp_path / "r", *args], capsys)
    assert code == 0, err
    return [json.loads(x) for x in out.splitlines() if '"run_dir"' in x]


def test_only_seeds_and_a_grid_from_the_command_line_plan_exactly_these_runs(tmp_path, capsys):
    runs = plan(capsys, tmp_path, "--only", "tdln,adaln", "--seeds", "0,1,2,3", "--set", "train.lr=1e-3,3e-4",
                "--set", "model.mlp=mlp,glu")
    got = sorted((r["variant"], r["seed"], r["grid"]["train.lr"], r["grid"]["model.mlp"]) for r in runs)
    want = sorted((v, s, lr, mlp) for v in ("tdln", "adaln") for s in range(4) for lr in (1e-3, 3e-4)
                  for mlp in ("mlp", "glu"))
    assert got == want
    assert all(r["spec"]["train"]["lr"] == r["grid"]["train.lr"] for r in runs)
    assert len({r["run_dir"] for r in runs}) == len(runs)
    # a quoted value with a comma is one value, not a grid
    runs = plan(capsys, tmp_path, "--only", "tdln", "--seeds", "0", "--set", 'data.root="a,b"')
    assert len(runs) == 1 and runs[0]["spec"]["data"]["root"] == "a,b"
    # a grid over a list-valued key: split at the commas between the lists only
    runs = plan(capsys, tmp_path, "--only", "tdln", "--seeds", "0", "--set", "train.betas=[0.9,0.99],[0.9,0.95]")
    assert sorted(r["spec"]["train"]["betas"][1] for r in runs) == [0.95, 0.99]


@pytest.mark.parametrize("args,where", [(["--set", "train.betas=0.9,0.99"], "--set: train.betas: expected list"),
                                        (["--set", "train.steps=10,abc"], "--set: train.steps: expected an integer"),
                                        (["--seeds", "0,0"], "--seeds: duplicate seeds"),
                                        (["--profile", "small", "--set", "sample.skip_type=logSNR"],
                                         "--set: sample.skip_type: sampler 'dpm_solver_fast' does not read")])
def test_command_line_grid_and_seed_errors_name_the_command_line(args, where, tmp_path, capsys):
    code, out, err = cli(["run", FILE, "--dry-run", "--results", tmp_path / "r", *args], capsys)
    assert code == 2 and err.count("\n") == 1 and where in err and str(FILE.name) not in err, err


def test_rerunning_a_sweep_skips_what_is_done(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    args = ["run", FILE, "--results", tmp_path / "r", "--only", "tdln", "--seeds", "0,1", "--set", "train.lr=1e-3,3e-4",
            "--train-fn", "test_runner:standin_train", "--json", "--executor", "debug"]
    code, out, err = cli(args, capsys)
    assert code == 0, err
    assert [json.loads(x)["status"] for x in out.splitlines()] == ["done"] * 4
    code, out, err = cli(args, capsys)
    assert [json.loads(x)["status"] for x in out.splitlines()] == ["skipped"] * 4


def test_status_reports_step_loss_and_eta_of_a_running_local_run(tmp_path, capsys):
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", "from dimr_lab.cli import main; main()", "train", "--out", str(run),
                             "--set", "train.steps=100000", "--set", "train.log_every=2", "--set", "eval.enabled=false",
                             "--no-progress"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        st = None
        while time.monotonic() < deadline:
            code, out, err = cli(["status", run, "--json"], capsys)
            st = json.loads(out.splitlines()[0]) if out.strip() else None
            if st and st["state"] == "running" and (st["step"] or 0) >= 4 and st["eta_s"]:
                break
            time.sleep(1)
        assert st and st["state"] == "running" and st["loss"] > 0 and st["images_per_s"] > 0, st
        assert st["steps"] == 100000 and st["eta_s"] > 0 and "pid" in st["detail"]
        code, out, err = cli(["logs", run, "--lines", "2"], capsys)
        assert code == 0 and '"loss"' in out
    finally:
        proc.kill()
        proc.wait()


def test_a_slurm_run_cancelled_after_a_checkpoint_is_pending_not_failed(tmp_path):
    from dimr_lab.runner.status import RunStatus, _from_slurm

    job = {"job_id": "7_0", "stdout": str(tmp_path / "none.out")}
    st = _from_slurm(RunStatus(tmp_path, "pending"), job, {"7_0": ("CANCELLED", "", "")}, trained=40)
    assert st.state == "pending" and "cancelled after a checkpoint (step 40); rerun to resume" in st.detail
    st = _from_slurm(RunStatus(tmp_path, "pending"), job, {"7_0": ("CANCELLED", "", "")}, trained=None)
    assert st.state == "failed" and st.detail == "job CANCELLED"  # nothing to resume from
    st = _from_slurm(RunStatus(tmp_path, "pending"), job, None)
    assert st.state == "pending" and "state unknown" in st.detail


def test_finished_runs_show_no_eta():
    from dimr_lab.runner.status import collect

    statuses = collect(ROOT / "results" / "tdln_vs_adaln")
    assert statuses and all(s.state == "done" and s.eta_s is None for s in statuses)
