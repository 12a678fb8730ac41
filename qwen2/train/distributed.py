"""torch.distributed set-up for `torchrun`: gloo on CPU, NCCL on GPU; a single process needs none."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed() -> DistEnv:
    """Join the process group that torchrun describes in the environment (RANK, WORLD_SIZE, ...)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend)
    return DistEnv(rank, world, local_rank)


def all_reduce_sum(value: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.enabled:
        value = value.clone()
        dist.all_reduce(value)
    return value


def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()


def shutdown(*, wait: bool) -> None:
    """Leave the process group, if this process joined one. Called on every rank when its work is
    over: a process that exits with gloo's threads still running can abort in C++ ("terminate called
    without an active exception"). `wait` (after success): first wait for the slowest rank (rank 0
    exports the model alone); never after an error, when the others may never arrive."""
    if dist.is_available() and dist.is_initialized():
        try:
            if wait:
                dist.barrier()
        finally:
            dist.destroy_process_group()
