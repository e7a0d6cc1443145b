"""Process layout of a sampling run: torchrun / srun ranks inside one shard of a job array."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["Ranks", "init_ranks", "barrier", "finish"]


@dataclass(frozen=True)
class Ranks:
    rank: int
    world_size: int
    local_rank: int
    initialised_here: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(*names: str, default: int) -> int:
    for name in names:
        if os.environ.get(name):
            return int(os.environ[name])
    return default


def init_ranks(device: torch.device) -> Ranks:
    """Read the rank layout from torchrun (RANK/WORLD_SIZE) or srun (SLURM_PROCID/SLURM_NTASKS).

    A process group (gloo on CPU, nccl on CUDA) is set up only when there are several ranks
    and a rendezvous address is known; it is used for barriers, never for data.
    """
    world = _env_int("WORLD_SIZE", default=1)
    rank = _env_int("RANK", default=0)
    local = _env_int("LOCAL_RANK", default=0)
    if world == 1 and "MASTER_ADDR" not in os.environ:
        world = _env_int("SLURM_NTASKS", default=1) if "SLURM_PROCID" in os.environ else 1
        rank = _env_int("SLURM_PROCID", default=0) if world > 1 else 0
        local = _env_int("SLURM_LOCALID", default=0) if world > 1 else 0
    initialised = False
    if world > 1 and "MASTER_ADDR" in os.environ and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world)
        initialised = True
    return Ranks(rank, world, local, initialised)


def barrier(ranks: Ranks) -> None:
    if ranks.world_size > 1 and dist.is_initialized():
        dist.barrier()


def finish(ranks: Ranks) -> None:
    if ranks.initialised_here and dist.is_initialized():
        dist.destroy_process_group()
