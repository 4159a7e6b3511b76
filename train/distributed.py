"""One process per GPU under torchrun or srun; NCCL on GPUs, gloo on CPUs.

torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; a plain `srun python -m train`
sets SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID, which are read when torchrun's
variables are absent (MASTER_ADDR and MASTER_PORT must then be exported by
the job script). A single process needs none of it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(*names: str, default: int) -> int:
    for name in names:
        if name in os.environ:
            return int(os.environ[name])
    return default


def init(device: torch.device) -> Context:
    world = _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)
    if world == 1:
        return Context()
    rank = _env_int("RANK", "SLURM_PROCID", default=0)
    local = _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world)
    return Context(rank, world, local)


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few numbers over all ranks (a no-op in one process)."""
    if not dist.is_initialized():
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def all_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all ranks in place, on its device (no host synchronisation of its own)."""
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank.

    DDP sends them before each training forward, but each rank then updates
    its own copy from its own batch: evaluate with rank 0's, the ones it saves.
    """
    if dist.is_initialized():
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def gather_to_main(obj) -> list | None:
    """Every rank's `obj`, in rank order, on rank 0 (None elsewhere); [obj] in one process."""
    if not dist.is_initialized():
        return [obj]
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if it is True on one: ranks must agree to stop together."""
    return all_sum([float(flag)], device)[0] > 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
