"""Processes of one job: torch.distributed from the launcher's environment (SLURM tasks or torchrun).

`setup_env_from_slurm()` turns a SLURM task's environment (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID,
SLURM_JOB_NODELIST, SLURM_JOB_ID) into the variables torch.distributed reads (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT). `setup()` joins (or starts) the process group the environment
describes (gloo on the CPU, nccl with CUDA) and `cleanup()` ends the one it started. Training and
evaluation both use it; torch is imported inside the functions only.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from typing import Any, Mapping

# Ports a job may derive its rendezvous port from: [PORT_BASE, PORT_BASE + PORT_SPAN).
PORT_BASE = 20000
PORT_SPAN = 20000


def port_for_job(job_id: str | int) -> int:
    """A rendezvous port derived from the SLURM job id (the same on every task of a job; array tasks
    have their own SLURM_JOB_ID, so two array tasks on one node do not collide)."""
    digits = "".join(ch for ch in str(job_id) if ch.isdigit()) or "0"
    return PORT_BASE + int(digits) % PORT_SPAN


def _first_host(nodelist: str) -> str:
    """The first host of a SLURM node list ('gpu[01-04],cpu7' -> 'gpu01'), via `scontrol show hostnames`
    where it is available, else a small parser of the common forms."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=30, check=True).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    first = nodelist.split(",")[0] if "[" not in nodelist.split(",")[0] else nodelist
    if "[" in first:
        prefix, rest = first.split("[", 1)
        inner = rest.split("]", 1)[0].split(",")[0].split("-")[0]
        return prefix + inner
    return first


def setup_env_from_slurm(environ: Mapping[str, str] | None = None, *, overwrite: bool = False) -> dict[str, str]:
    """Set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT in os.environ from a SLURM task's
    environment and return what was set. Outside SLURM (no SLURM_PROCID) it sets nothing and returns {}.
    Values already present (e.g. from torchrun) are kept unless `overwrite`.
    """
    env = os.environ if environ is None else environ
    if "SLURM_PROCID" not in env:
        return {}
    ntasks = env.get("SLURM_NTASKS") or env.get("SLURM_NPROCS") or "1"
    local = env.get("SLURM_LOCALID", "0")
    job_id = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID") or "0"
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "localhost"
    values = {
        "RANK": str(int(env["SLURM_PROCID"])),
        "WORLD_SIZE": str(int(ntasks)),
        "LOCAL_RANK": str(int(local)),
        "MASTER_PORT": str(port_for_job(job_id)),
    }
    if "MASTER_ADDR" not in os.environ or overwrite:
        values["MASTER_ADDR"] = _first_host(nodelist) if int(ntasks) > 1 else "127.0.0.1"
    applied = {}
    for k, v in values.items():
        if overwrite or k not in os.environ:
            os.environ[k] = v
            applied[k] = v
    return applied


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: Any                 # torch.device
    owns_group: bool            # this call initialised the process group (and so destroys it)

    @property
    def main(self) -> bool:
        return self.rank == 0


def _env_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's or SLURM's environment; (0, 1, 0) alone."""
    env = os.environ
    if "WORLD_SIZE" in env and "RANK" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_NTASKS" in env and "SLURM_PROCID" in env and int(env["SLURM_NTASKS"]) > 1:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def _device(local_rank: int) -> Any:
    import torch

    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


TIMEOUT_ENV = "DIMR_LAB_DIST_TIMEOUT_S"
# generous: the first step of a compiled network can take minutes on one rank while the others wait for it
DEFAULT_TIMEOUT_S = 600.0


def timeout_s(environ: Mapping[str, str] | None = None) -> float:
    """How long a process of a job waits in a collective for the others before it fails: $DIMR_LAB_DIST_TIMEOUT_S
    seconds, else DEFAULT_TIMEOUT_S. A setting of the machine, not of a run (no run's identity holds it)."""
    from dimr_lab.errors import UserError

    raw = (os.environ if environ is None else environ).get(TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 1.0 <= value <= 86400.0:  # also NaN
        raise UserError(f"${TIMEOUT_ENV}: seconds from 1 to 86400, got {raw!r}")
    return value


def setup(timeout: float | None = None) -> DistInfo:
    """Join (or start) the process group the environment describes; a single process needs none. A collective
    that waits longer than `timeout` seconds (default: timeout_s()) for another process fails, so that the
    survivors of a dead or hung process stop with an error instead of waiting on."""
    import datetime

    import torch
    import torch.distributed as dist

    timeout = timeout_s() if timeout is None else timeout  # a bad setting is found alone too
    if dist.is_available() and dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
        return DistInfo(dist.get_rank(), dist.get_world_size(), local, _device(local), owns_group=False)
    rank, world, local = _env_world()
    if world == 1:
        return DistInfo(0, 1, 0, _device(0), owns_group=False)
    setup_env_from_slurm()  # SLURM tasks -> RANK, WORLD_SIZE, MASTER_ADDR... (keeps torchrun's)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = _device(local)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(port_for_job(os.environ.get("SLURM_JOB_ID", "0"))))
    kwargs: dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
    if device.type == "cuda" and not ({"TORCH_NCCL_ASYNC_ERROR_HANDLING", "NCCL_ASYNC_ERROR_HANDLING"}
                                      & set(os.environ)):
        # NCCL's watchdog ends the process when a collective passes the timeout (torch's default since 2.2;
        # said here for the versions before, a user's own setting kept); without it a survivor waits forever
        os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "3"
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", init_method="env://", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=timeout), **kwargs)
    return DistInfo(rank, world, local, torch.device(device), owns_group=True)


def cleanup(info: DistInfo) -> None:
    """Destroy the process group if setup() created it."""
    import torch.distributed as dist

    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.world_size > 1:
        import torch.distributed as dist

        dist.barrier()


def any_flag(info: DistInfo, flag: bool) -> bool:
    """True on every rank when `flag` is true on any (a stop request agreed over the job)."""
    if info.world_size == 1:
        return flag
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(flag)], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


# what gloo and NCCL say when another process of the job is gone
_PEER_LOST = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "NCCL communicator was aborted",
              "remote process exited", "Connection refused")
# ... and when it has not answered within the timeout (hung, stopped, or on a machine that is gone)
_PEER_TIMED_OUT = ("Timed out waiting", "Watchdog caught collective operation timeout")


def peer_timed_out(err: BaseException) -> bool:
    """Whether `err` is this process's collective giving up on another process of the job after the timeout."""
    return isinstance(err, RuntimeError) and any(s in str(err) for s in _PEER_TIMED_OUT)


def peer_lost(err: BaseException) -> bool:
    """Whether `err` is this process's collective failing because another process of the job died or hung."""
    return isinstance(err, RuntimeError) and (any(s in str(err) for s in _PEER_LOST) or peer_timed_out(err))
