"""Process-group setup for training: one process, or several under torchrun / SLURM (gloo on the CPU)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool  # this call initialised the process group (and so destroys it)


def _env_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's or SLURM's environment; (0, 1, 0) alone."""
    env = os.environ
    if "WORLD_SIZE" in env and "RANK" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_NTASKS" in env and "SLURM_PROCID" in env and int(env["SLURM_NTASKS"]) > 1:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def setup_distributed() -> DistInfo:
    """Join (or start) the process group the environment describes; a single process needs none."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
        return DistInfo(rank, world, local, _device(local), owns_group=False)
    rank, world, local = _env_world()
    if world == 1:
        return DistInfo(0, 1, 0, _device(0), owns_group=False)
    from dimr_lab.runner.distributed import init_distributed, setup_env_from_slurm

    setup_env_from_slurm()  # SLURM tasks -> RANK, WORLD_SIZE, MASTER_ADDR... (keeps torchrun's)
    rank, world, local, device = init_distributed()
    return DistInfo(rank, world, local, torch.device(device), owns_group=True)


def cleanup_distributed(info: DistInfo) -> None:
    """Destroy the process group if setup_distributed created it."""
    if info.owns_group and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _device(local_rank: int) -> torch.device:
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
