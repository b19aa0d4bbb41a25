"""torchrun: rank, world size, barriers, decisions every rank shares, and per-rank random states
(gloo on the CPU, NCCL on GPUs).

Whatever all ranks must agree on (which chunks are pending, whether and where a run resumes) is
decided on rank 0 and broadcast, never worked out by each rank from files another rank may be
writing; what each rank reads for itself (a source listing) is compared across ranks before
anything is written. Phases where rank 0 works alone while the others wait (preparing a store,
evaluating) can take long at ImageNet scale, so the process group's timeout is set on purpose
(`dist_timeout_minutes` in every stage's config) instead of PyTorch's default (10 minutes for
NCCL).
"""

from __future__ import annotations

import datetime
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

DEFAULT_TIMEOUT_MINUTES = 120.0


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def device(self, setting: str = "auto") -> torch.device:
        """This rank's device for a `device` setting (`choose_device`)."""
        return choose_device(setting, self.local_rank)

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

    def broadcast(self, value):
        """Rank 0's `value` (picklable) on every rank; every rank must call it."""
        if self.world == 1:
            return value
        box = [value if self.main else None]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def on_main(self, work: Callable[[], Any]):
        """`work()` run on rank 0 alone, its result given to every rank; when it raises a
        ValueError or OSError (bad input), every rank raises it, together."""
        outcome = None
        if self.main:
            try:
                outcome = (True, work())
            except (ValueError, OSError) as error:
                outcome = (False, error)
        ok, value = self.broadcast(outcome)
        if not ok:
            if self.world > 1:
                self.leave()
            raise value
        return value

    def check_same_listing(self, what: str, fingerprint: str, entries: Callable[[], list[tuple[str, int]]]) -> None:
        """Refuse, on every rank, when some rank's listing of `what` differs from rank 0's.
        `fingerprint` digests this rank's listing; `entries()` is its sorted (name, size) pairs,
        asked for only when the listings differ, to name the first differing path."""
        if self.world == 1:
            return
        seen = self.gather((fingerprint, socket.gethostname()))
        differing = [r for r, (digest, _) in enumerate(seen) if digest != seen[0][0]]
        if not differing:
            return
        reference = self.broadcast(entries() if self.main else None)
        first = _first_difference(reference, entries()) if self.rank in differing else None
        rank = differing[0]
        detail = self.gather(first)[rank]
        self.leave()
        raise ValueError(
            f"rank {rank} on host {seen[rank][1]} lists {what} differently from rank 0 on host {seen[0][1]} "
            f"({detail}{f', and {len(differing) - 1} more ranks differ' if len(differing) > 1 else ''}): every rank "
            "must see the same files, so mount the same data on every node, and nothing was written."
        )

    def check_same(self, what: str, value) -> None:
        """Refuse, on every rank, when some rank's `value` (picklable, comparable) differs from rank 0's."""
        if self.world == 1:
            return
        seen = self.gather((value, socket.gethostname()))
        differing = [r for r, (v, _) in enumerate(seen) if v != seen[0][0]]
        if differing:
            rank = differing[0]
            self.leave()
            raise ValueError(
                f"rank {rank} on host {seen[rank][1]} has {what} {seen[rank][0]!r} where rank 0 on host {seen[0][1]} "
                f"has {seen[0][0]!r}: every rank must read the same files, so put them on storage every node shares."
            )

    def any(self, flag: bool) -> bool:
        """Whether `flag` holds on some rank; every rank must call it (one small all-reduce: on
        the GPU under NCCL, else on the CPU)."""
        return self.first(flag) is not None

    def first(self, flag: bool) -> int | None:
        """The lowest rank where `flag` holds, or None; every rank must call it (one small all-reduce)."""
        if self.world == 1:
            return 0 if flag else None
        nccl = torch.distributed.get_backend() == "nccl"
        value = torch.tensor(
            [self.rank if flag else self.world], device=torch.device("cuda", self.local_rank) if nccl else "cpu"
        )
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MIN)
        rank = int(value.item())
        return None if rank == self.world else rank

    def resume_from(self, checkpoint: Path, resume: bool) -> bool:
        """Whether the run resumes from `checkpoint`: rank 0 decides; a rank that cannot see the
        file rank 0 resumes from is refused."""
        decided = self.broadcast(resume and checkpoint.exists() if self.main else None)
        if decided and not checkpoint.exists():
            raise ValueError(
                f"rank {self.rank} on host {socket.gethostname()} cannot see {checkpoint}, which rank 0 resumes "
                "from: put --out on storage every node shares."
            )
        return decided

    def rng_states(self, device: torch.device) -> list[dict]:
        """Every rank's torch random states (CPU, and CUDA on a GPU), for a checkpoint: drop path
        and the like draw from them, differently on each rank."""
        state = {"torch": torch.get_rng_state()}
        if device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(device)
        return self.gather(state)

    def restore_rng(self, saved: list[dict] | dict, device: torch.device, fallback: tuple[int, ...] = ()) -> None:
        """Restore this rank's states from what `rng_states` gathered, or from one state for every
        rank, as checkpoints written before it hold. A rank beyond the saved ones (a run resumed on
        more ranks) seeds its generators from `fallback` (config seed, step) and its rank."""
        if isinstance(saved, list) and self.rank >= len(saved):
            torch.manual_seed(int(np.random.SeedSequence([*fallback, self.rank]).generate_state(1)[0]))
            return
        state = saved[self.rank] if isinstance(saved, list) else saved
        torch.set_rng_state(state["torch"])
        if device.type == "cuda" and "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"], device)

    def leave(self) -> None:
        """Leave the group together, before every rank raises the same error: a rank that exits
        while another still talks to the group makes that one abort instead of saying why."""
        self.barrier()
        self.close()

    def close(self) -> None:
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _first_difference(reference: list[tuple[str, int]], mine: list[tuple[str, int]]) -> str:
    """The first entry where two sorted (name, size) listings part, in words."""
    theirs = dict(reference)
    ours = dict(mine)
    for name in sorted(set(theirs) | set(ours)):
        if name not in ours:
            return f"it lacks {name}, which rank 0 has"
        if name not in theirs:
            return f"it has {name}, which rank 0 lacks"
        if theirs[name] != ours[name]:
            return f"{name} is {ours[name]} bytes there and {theirs[name]} on rank 0"
    return "the listings differ in order only"


def choose_device(setting: str = "auto", local_rank: int = 0) -> torch.device:
    """The device a `device` setting means, the same in every command: 'auto' is this rank's GPU
    when there is one, else the CPU; 'cuda' (no index) is this rank's GPU; 'cuda:N', 'cpu' are
    taken as written."""
    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(setting)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {setting!r} is not a device: use auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {setting!r} needs a CUDA GPU, and torch sees none: use --set device=cpu (or auto)."
            )
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


def dali_device_id(device: torch.device) -> int | None:
    """The `device_id` DALI takes for a torch device: the GPU's index, or None on the CPU."""
    return (device.index or 0) if device.type == "cuda" else None


def init_dist(backend: str | None = None, timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES) -> Dist:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, LOCAL_RANK); one process
    otherwise. A collective (a barrier while rank 0 works alone) waits `timeout_minutes` at most."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    return Dist(rank, world, local_rank)
