"""The SLURM executor: one submitit job array per ablation, runs that survive timeouts and preemption.

Every array task trains one run folder (`TrainJob(run_dir)`): each SLURM task of it sets the
torch.distributed environment from SLURM's (`setup_env_from_slurm`) and calls the trainer, which
resumes from the run's last checkpoint. On the pre-timeout/preemption signal (USR2, `[slurm]
signal_delay_s` before the limit) the trainer stops at the next step boundary with a fresh checkpoint,
then submitit's handler requeues the task (Checkpointable). On SIGTERM (scancel, `scontrol requeue`,
preemption) it also checkpoints at the next step boundary before exiting; a requeued task resumes. A task
that train.time_limit_s stops (at a checkpoint, or between an evaluation's chunks) requeues itself as on the
timeout signal, so a run longer than a job's limit goes on in the next job.

Job ids go to run_dir/slurm.json; submitit's pickles and logs to <results>/<ablation>/.submitit/.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import submitit

from dimr_lab.errors import UserError
from dimr_lab.rundir import SLURM, RunBusy, is_locked, latest_job, try_read_json_object, write_json
from dimr_lab.runner.plan import PlannedRun
from dimr_lab.spec.slurm import SlurmSettings
from dimr_lab.runner.worker import (DEFAULT_TRAIN_FN, EVAL_FN, EXIT_BAD, EXIT_BUSY, EXIT_INTERRUPTED, StopFlag,
                                    resolve_train_fn, train_one)

SUBMITIT_DIR = ".submitit"
PENDING_STATES = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "RESV_DEL_HOLD",
                  "SUSPENDED", "STOPPED", "RESIZING"}
RUNNING_STATES = {"RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING"}
FAILED_STATES = {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
                 "DEADLINE", "REVOKED", "SPECIAL_EXIT"}


class TrainJob(submitit.helpers.Checkpointable):
    """The callable every array task runs: `TrainJob(train_fn)(run_dir)`.

    checkpoint() (submitit calls it on USR2) resubmits the same call: the trainer resumes from the
    run's checkpoints/last.pt, so nothing is lost.
    """

    def __init__(self, train_fn: str = DEFAULT_TRAIN_FN, lock_wait_s: float = 120.0, resample: bool = False,
                 overrides: dict[str, list[tuple[str, Any]]] | None = None) -> None:
        self.train_fn = train_fn
        self.lock_wait_s = lock_wait_s
        self.resample = resample  # `run --resample`: the evaluations sample anew (pickled with the job, requeues too)
        # `run --eval-only`: by run folder, the settings on top of its run.json (left as it was; worker.train_one)
        self.overrides = dict(overrides or {})

    def __call__(self, run_dir: str) -> dict[str, Any]:
        from dimr_lab.dist import setup_env_from_slurm

        # SLURM's task variables are the truth here: RANK/WORLD_SIZE/... exported from the submitting shell
        # (sbatch passes its environment on) must not leak into the job
        setup_env_from_slurm(overwrite=True)
        rank = int(os.environ.get("RANK", "0"))
        stop = StopFlag()
        usr_sig = submitit.JobEnvironment._usr_sig()
        submitit_handler = signal.getsignal(usr_sig)
        signal.signal(usr_sig, stop.set)
        signal.signal(signal.SIGTERM, stop.set)
        fn = resolve_train_fn(self.train_fn)
        print(f"[dimr-lab] {run_dir}: rank {rank}/{os.environ.get('WORLD_SIZE', '1')} "
              f"job {os.environ.get('SLURM_JOB_ID')} restart {os.environ.get('SLURM_RESTART_COUNT', '0')}",
              flush=True)
        deadline = time.monotonic() + self.lock_wait_s
        while True:  # a requeued task may start while its predecessor is still letting go of the lock
            try:
                code, result = train_one(Path(run_dir), fn, stop, resample=getattr(self, "resample", False),
                                         overrides=getattr(self, "overrides", {}).get(run_dir))
            except UserError as err:  # a bad setting or file found on the node: one line in the job's log
                print(f"error: {err}", file=sys.stderr, flush=True)
                sys.exit(EXIT_BAD)
            if code != EXIT_BUSY or rank != 0 or time.monotonic() > deadline:
                break
            time.sleep(5)
        if code == EXIT_BUSY:
            raise RuntimeError(f"{run_dir}: another process holds the run's lock")
        if code == EXIT_INTERRUPTED:
            # stopped with no signal: train.time_limit_s ended this job's share; it requeues as on a timeout notice
            by_time_limit = stop.signum is None
            if (stop.signum == usr_sig or by_time_limit) and callable(submitit_handler):
                # timeout or preemption notice: checkpoint() + requeue + exit (rank 0; no-op elsewhere)
                step = result.get("step") if isinstance(result, dict) else None
                if by_time_limit and rank == 0:
                    print(f"[dimr-lab] {run_dir}: train.time_limit_s reached at step {step} after a checkpoint; "
                          f"requeueing", flush=True)
                why = None
                try:
                    submitit_handler(usr_sig, None)
                except submitit.core.utils.UncompletedJobError as err:  # e.g. timed out slurm.max_requeues times
                    why = (str(err).removeprefix("Job not requeued because: ").rstrip(".")
                           + "; slurm.max_requeues bounds the timeouts")
                except (subprocess.SubprocessError, OSError) as err:  # SLURM refused the requeue
                    why = f"scontrol requeue failed: {err}"
                if why is not None:
                    print(f"error: {run_dir}: not requeued ({why}); its checkpoint at step {step} is kept: run the "
                          f"ablation again to resume there", file=sys.stderr, flush=True)
                    sys.exit(EXIT_INTERRUPTED)
            if by_time_limit:  # a rank other than 0: rank 0 requeues the job
                print(f"[dimr-lab] {run_dir}: stopped at train.time_limit_s after a checkpoint", flush=True)
                sys.exit(EXIT_INTERRUPTED)
            print(f"[dimr-lab] {run_dir}: stopped by signal {stop.signum} after a checkpoint", flush=True)
            sys.exit(128 + stop.signum)
        return result if isinstance(result, dict) else {"done": True}


def executor_parameters(settings: SlurmSettings, ablation: str) -> dict[str, Any]:
    """[slurm] -> submitit.SlurmExecutor parameters (sbatch flags); options submitit has no name for pass
    through its additional_parameters."""
    p: dict[str, Any] = {
        "job_name": settings.job_name or f"dimr-{ablation}",
        "time": settings.minutes(),
        "nodes": settings.nodes,
        "ntasks_per_node": settings.node_tasks(),
        "array_parallelism": settings.array_parallelism,
        "signal_delay_s": settings.signal_delay_s,
        "wckey": settings.wckey,
    }
    for key in ("gpus_per_node", "gpus_per_task", "cpus_per_task", "cpus_per_gpu"):
        if getattr(settings, key):
            p[key] = getattr(settings, key)
    if settings.mem_gb:
        mem = settings.mem_gb
        p["mem"] = f"{int(mem)}GB" if mem == int(mem) else f"{int(mem * 1024)}MB"
    for key in ("partition", "account", "qos", "constraint", "exclude", "mem", "mem_per_gpu", "mem_per_cpu", "gres",
                "nodelist", "dependency", "comment", "mail_type", "mail_user"):
        if getattr(settings, key):
            p[key] = getattr(settings, key)
    if settings.exclusive:
        p["exclusive"] = True
    if settings.setup:
        p["setup"] = list(settings.setup)
    if settings.srun_args:
        p["srun_args"] = list(settings.srun_args)
    # requeueable whatever the cluster's default (JobRequeue=0 is common): a timed-out or preempted task
    # requeues itself (`scontrol requeue`), which SLURM refuses for a job submitted without --requeue
    extra: dict[str, Any] = {"requeue": True, **settings.additional}
    if settings.reservation:
        extra["reservation"] = settings.reservation
    for line in settings.sbatch_lines:
        key, _, value = line.strip()[2:].partition("=")
        extra[key] = value if value else True
    if extra:
        p["additional_parameters"] = extra
    return p


def submitit_folder(ablation_dir: Path) -> Path:
    return Path(ablation_dir).resolve() / SUBMITIT_DIR / "%j"


def sbatch_script(settings: SlurmSettings, ablation: str, ablation_dir: Path, n_tasks: int,
                  sources: dict[str, str] | None = None) -> str:
    """The sbatch script submitit would submit for an array of n_tasks runs (writes nothing), preceded by
    where each setting came from when `sources` is given."""
    from submitit.slurm.slurm import _make_sbatch_string

    folder = submitit_folder(ablation_dir)
    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])
    params = executor_parameters(settings, ablation)
    script = _make_sbatch_string(command=command, folder=folder, map_count=max(1, n_tasks) if n_tasks > 1 else None,
                                 **params)
    if not sources:
        return script
    head = ["# where the settings came from:"] + [f"#   slurm.{k} = {getattr(settings, k)!r}  <- {src}"
                                                  for k, src in sorted(sources.items())]
    lines = script.splitlines()
    return "\n".join(lines[:1] + head + lines[1:]) + "\n"


def live_jobs(runs: list[PlannedRun]) -> dict[Path, str] | None:
    """Run folder -> its latest job where that is still queued or running; None when squeue does not answer
    (then a queued run cannot be told from a gone one)."""
    prior = {r.run_dir: job for r in runs if (job := latest_job(r.run_dir))}
    states = job_states([j["job_id"] for j in prior.values()])
    if states is None:
        return None
    return {d: j["job_id"] for d, j in prior.items() if states.get(j["job_id"]) in PENDING_STATES | RUNNING_STATES}


def submit(runs: list[PlannedRun], settings: SlurmSettings, *, ablation: str, ablation_dir: Path,
           train_fn: str | None = None, eval_only: bool = False, resample: bool = False) -> dict[str, list[Any]]:
    """Submit every unfinished, not already queued run as one job array (`resample`: their evaluations sample
    anew, TrainJob.resample).
    Returns {"submitted": [(run, job_id)], "done": [run], "queued": [(run, job_id)], "busy": [run]}."""
    out: dict[str, list[Any]] = {"submitted": [], "done": [], "queued": [], "busy": []}
    todo = []
    live = live_jobs(runs)
    if live is None:  # submitting again could run a queued run twice
        raise UserError("squeue did not answer, so whether these runs' earlier jobs are still queued is unknown; "
                        "nothing submitted: try again when SLURM answers")
    for r in runs:
        if r.is_done():
            out["done"].append(r)
            continue
        if r.run_dir in live:
            out["queued"].append((r, live[r.run_dir]))
            continue
        if is_locked(r.run_dir):
            out["busy"].append(r)
            continue
        todo.append(r)
    if not todo:
        return out
    from dimr_lab.runner.local import write_record

    # what a refused submission must leave as it was: folders made here, records rewritten here
    made = {r.run_dir for r in todo if not r.run_dir.exists()}
    records = {r.run_dir: r.folder.record_path.read_bytes() for r in todo if r.folder.record_path.is_file()}
    ready = []
    for r in todo:
        try:
            write_record(r, "slurm")
            ready.append(r)
        except RunBusy:
            out["busy"].append(r)
    todo = ready
    if not todo:
        return out
    folder = submitit_folder(ablation_dir)
    base = folder.parent  # <ablation>/.submitit: submitit files of every job
    before = set(base.rglob("*")) if base.exists() else set()
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=settings.max_requeues)
    executor.update_parameters(**executor_parameters(settings, ablation))
    fn = EVAL_FN if eval_only else (train_fn or DEFAULT_TRAIN_FN)
    overrides = {str(r.run_dir): r.record_overrides() for r in todo} if eval_only else {}
    try:
        with _stderr_captured() as captured:  # sbatch's own complaint goes into the one line below
            jobs = executor.map_array(TrainJob(fn, resample=resample, overrides=overrides),
                                      [str(r.run_dir) for r in todo])
    except (submitit.core.utils.FailedJobError, subprocess.SubprocessError, OSError) as err:
        _undo_submission(todo, made, records, base, before)
        raise UserError(f"sbatch refused the job array ({_sbatch_complaint(captured.get('text', ''), err)}); "
                        f"nothing submitted (`run ... --executor slurm --dry-run` shows the slurm.* settings)"
                        ) from None
    if captured.get("text"):
        sys.stderr.write(captured["text"])
    now = time.time()
    for r, job in zip(todo, jobs):
        path = r.run_dir / SLURM
        info = try_read_json_object(path) or {}
        history = info.get("jobs") if isinstance(info.get("jobs"), list) else []
        job_id = str(job.job_id)
        base, _, task = job_id.partition("_")
        history.append({
            "job_id": job_id, "array_job_id": base, "array_task_id": int(task) if task.isdigit() else None,
            "submitted": now, "folder": str(job.paths.folder), "stdout": str(job.paths.stdout),
            "stderr": str(job.paths.stderr), "nodes": settings.nodes,
            "tasks": settings.tasks(),
        })
        write_json(path, {"jobs": history})
        out["submitted"].append((r, job_id))
    return out


def _sbatch_complaint(captured: str, err: BaseException) -> str:
    """What sbatch said, on one line: its error lines, else its other lines (an unknown option is said without
    the word error), without the pointer to --help; at most two of them."""
    lines = [ln.strip() for ln in (captured + "\n" + str(err)).splitlines() if ln.strip()]
    errors = [ln.replace("sbatch: error: ", "") for ln in lines if "error" in ln.lower()]
    said = list(dict.fromkeys(errors or [ln for ln in lines if not ln.lower().startswith("try ")]))
    return "; ".join(said[:2])[:300] or type(err).__name__


@contextlib.contextmanager
def _stderr_captured() -> Iterator[dict[str, str]]:
    """Collect what this process and its children write to file descriptor 2 (sbatch's messages, which
    submitit lets through) into the yielded dict's "text"."""
    import io
    import tempfile

    out: dict[str, str] = {}
    sys.stderr.flush()
    saved = os.dup(2)
    python_level = io.StringIO()  # what Python code writes to sys.stderr where that is not file descriptor 2
    with tempfile.TemporaryFile() as tmp, contextlib.redirect_stderr(python_level):
        os.dup2(tmp.fileno(), 2)
        try:
            yield out
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            out["text"] = tmp.read().decode(errors="replace") + python_level.getvalue()


def _undo_submission(todo: list[PlannedRun], made: set[Path], records: dict[Path, bytes], folder: Path,
                     before: set[Path]) -> None:
    """After sbatch refused: remove the run folders and submitit files this call made, and put back the
    run records it rewrote (atomically: a kill while one is put back leaves the rewritten record or the old
    one, never a truncated run.json that `status` and the next `run` would refuse)."""
    import shutil

    from dimr_lab.atomic import atomic_write

    for r in todo:
        if r.run_dir in made:
            shutil.rmtree(r.run_dir, ignore_errors=True)
        elif r.run_dir in records:
            old = records[r.run_dir]
            atomic_write(r.folder.record_path, lambda f: f.write(old))
        else:
            r.folder.record_path.unlink(missing_ok=True)
    if folder.exists():
        for p in sorted(set(folder.rglob("*")) - before, key=lambda p: len(p.parts), reverse=True):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        if not before:
            shutil.rmtree(folder, ignore_errors=True)
    try:  # the ablation's folder too, when nothing else is in it
        folder.parent.rmdir()
    except OSError:
        pass


def _run(cmd: list[str]) -> str | None:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout if res.returncode == 0 else None


def job_states(job_ids: list[str], *, with_nodes: bool = False) -> dict[str, Any] | None:
    """SLURM state (PENDING, RUNNING, COMPLETED, FAILED, ...) of each job id ('123' or '123_4'), from squeue
    for live jobs and sacct for the rest; ids SLURM no longer knows are left out. With `with_nodes`, each value
    is (state, node list, why a queued job waits: squeue's reason, '' when none). None when squeue does not
    answer (a timeout, slurmctld down): then which jobs are still queued is unknown, and nothing may be read
    as gone."""
    ids = sorted({str(j) for j in job_ids if j})
    if not ids:
        return {}
    states: dict[str, tuple[str, str, str]] = {}
    whole: dict[str, tuple[str, str, str]] = {}   # array job id -> state of records that stand for several tasks
    bases = sorted({i.split("_")[0] for i in ids})
    sacct = _run(["sacct", "-n", "-P", "-X", "-o", "JobID,State,NodeList", "-j", ",".join(bases)])
    for line in (sacct or "").splitlines():
        parts = line.strip().split("|")
        if len(parts) < 2 or not parts[0]:
            continue
        jid, state = parts[0], (parts[1].split()[0] if parts[1] else "UNKNOWN")
        node = parts[2] if len(parts) > 2 and parts[2] not in ("", "None assigned") else ""
        m = re.fullmatch(r"(\d+)_\[([0-9,\-]+)(?:%\d+)?\]", jid)
        if m:  # a pending (or never started) range of array tasks: 123_[2-4%2]
            for part in m.group(2).split(","):
                lo, _, hi = part.partition("-")
                for k in range(int(lo), int(hi or lo) + 1):
                    states.setdefault(f"{m.group(1)}_{k}", (state, node, ""))
        elif jid.isdigit():
            states[jid] = whole[jid] = (state, node, "")
        else:
            states[jid] = (state, node, "")
    # this user's live jobs, filtered here: `squeue -j` fails for ids slurmctld has forgotten, which would
    # read like squeue not answering
    squeue = _run(["squeue", "-h", "-r", "-o", "%i|%T|%N|%r", "-u", getpass.getuser()])
    if squeue is None:
        return None
    wanted = set(bases)
    for line in squeue.splitlines():
        if line.split("|", 1)[0].split("_", 1)[0] not in wanted:
            continue
        parts = line.strip().split("|")
        if len(parts) >= 2 and parts[0]:
            reason = parts[3] if len(parts) > 3 and parts[3] != "None" else ""
            states[parts[0]] = (parts[1], parts[2] if len(parts) > 2 else "", reason)
    for i in ids:  # array tasks sacct only lists as the array's own record (e.g. cancelled before starting)
        base, _, task = i.partition("_")
        if task and i not in states and base in whole:
            states[i] = whole[base]
    return {i: (states[i] if with_nodes else states[i][0]) for i in ids if i in states}


def cancel_jobs(job_ids: list[str]) -> None:
    if job_ids:
        subprocess.run(["scancel", *job_ids], check=False, timeout=60)
