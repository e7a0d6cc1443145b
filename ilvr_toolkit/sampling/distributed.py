"""Process layout of a sampling run: torchrun / srun ranks inside one shard of a job array."""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    rank: int
    world_size: int
    local_rank: int
    initialised_here: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_ranks(device: torch.device) -> Ranks:
    """The rank layout from torchrun (RANK/WORLD_SIZE), else from the srun step this process is a
    task of (SLURM_PROCID/SLURM_STEP_NUM_TASKS; a batch script itself, which has SLURM_PROCID=0 and the
    job's SLURM_NTASKS but no step, is one process); a process group (gloo, nccl on CUDA) only for
    several ranks with a rendezvous address (MASTER_ADDR, which the batch scripts export): barriers,
    never data."""
    env = os.environ
    names = ("WORLD_SIZE", "RANK", "LOCAL_RANK")
    if "RANK" not in env and "SLURM_STEP_NUM_TASKS" in env:
        names = ("SLURM_STEP_NUM_TASKS", "SLURM_PROCID", "SLURM_LOCALID")
    world, rank, local = (int(env.get(name) or 0) for name in names)
    world = max(world, 1)
    initialised = world > 1 and "MASTER_ADDR" in env and not dist.is_initialized()
    if initialised:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    return Ranks(rank, world, local, initialised)


def barrier(ranks: Ranks) -> None:
    if ranks.world_size > 1 and dist.is_initialized():
        dist.barrier()


def finish(ranks: Ranks) -> None:
    if ranks.initialised_here and dist.is_initialized():
        dist.destroy_process_group()
