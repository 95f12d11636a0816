"""torch.distributed from the launcher's environment (SLURM tasks or torchrun).

`setup_env_from_slurm()` turns a SLURM task's environment (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID,
SLURM_JOB_NODELIST, SLURM_JOB_ID) into the variables torch.distributed reads (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT). `init_distributed()` then returns (rank, world_size,
local_rank, device) and initialises the process group when world_size > 1 (gloo on the CPU, nccl
with CUDA). torch is imported inside the functions only.
"""

from __future__ import annotations

import os
import subprocess
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


def init_distributed(backend: str | None = None, timeout_s: float = 600.0) -> tuple[int, int, int, Any]:
    """(rank, world_size, local_rank, device) from RANK/WORLD_SIZE/LOCAL_RANK; with world_size > 1 it
    initialises the default process group (env:// rendezvous; gloo on the CPU, nccl with CUDA) unless
    one is already initialised. The device is cuda:LOCAL_RANK when CUDA is available, else cpu."""
    import datetime

    import torch
    import torch.distributed as dist

    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local % max(1, torch.cuda.device_count()))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not (dist.is_available() and dist.is_initialized()):
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(port_for_job(os.environ.get("SLURM_JOB_ID", "0"))))
        backend = backend or ("nccl" if device.type == "cuda" else "gloo")
        kwargs: dict[str, Any] = {}
        if device.type == "cuda":
            kwargs["device_id"] = device
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return rank, world, local, device
