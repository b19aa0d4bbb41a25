"""torchrun: rank, world size, barriers and per-rank random states (gloo on the CPU, NCCL on GPUs)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def gather(self, value) -> list:
        """Every rank's `value` (picklable), in rank order; every rank must call it."""
        if self.world == 1:
            return [value]
        values: list = [None] * self.world
        torch.distributed.all_gather_object(values, value)
        return values

    def rng_states(self, device: torch.device) -> list[dict]:
        """Every rank's torch random states (CPU, and CUDA on a GPU), for a checkpoint: drop path
        and the like draw from them, differently on each rank."""
        state = {"torch": torch.get_rng_state()}
        if device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(device)
        return self.gather(state)

    def restore_rng(self, saved: list[dict] | dict, device: torch.device) -> None:
        """Restore this rank's states from what `rng_states` gathered (the same world size), or
        from one state for every rank, as checkpoints written before it hold."""
        state = saved[self.rank] if isinstance(saved, list) else saved
        torch.set_rng_state(state["torch"])
        if device.type == "cuda" and "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"], device)

    def close(self) -> None:
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def init_dist(backend: str | None = None) -> Dist:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, LOCAL_RANK); one process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend)
    return Dist(rank, world, local_rank)
