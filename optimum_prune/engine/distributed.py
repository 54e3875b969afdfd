"""Several processes pruning one model together on torch.distributed (``torchrun``; NCCL on GPUs, gloo on CPUs).

Every rank holds the model (memory-mapped checkpoints share the page cache on a node) and runs its own shard of
the calibration samples through the current block. Statistics are summed over the ranks as sums (token-weighted
for running means), so they do not depend on how the samples are split; each block's layers are then shared out
by pruning cost, each rank prunes its own, and the pruned weights and masks are broadcast from their owner. Each
rank then runs its samples through the pruned block. With one process, every operation here is a no-op.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ..errors import InputError

TIMEOUT = timedelta(minutes=30)  # a collective that waits longer means a rank died or hangs


@dataclass(frozen=True)
class Ranks:
    """This process's place in a job: ``rank`` of ``world`` (``Ranks()`` is a single process)."""

    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> Ranks:
        """The process group torch.distributed holds, if one is initialized."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        """Whether this rank writes outputs, reports and uploads (rank 0)."""
        return self.rank == 0

    def shard(self, samples: torch.Tensor | list) -> torch.Tensor | list:
        """This rank's calibration samples (rows of token ids, or a list): contiguous, as even as the count allows."""
        if self.world > len(samples):
            raise InputError(
                f"{self.world} ranks but only {len(samples)} calibration samples: every rank needs at least one; "
                f"use --num-samples {self.world} or more, or fewer processes."
            )
        if isinstance(samples, torch.Tensor):
            return torch.tensor_split(samples, self.world)[self.rank]
        return [samples[i] for i in torch.tensor_split(torch.arange(len(samples)), self.world)[self.rank].tolist()]

    def all_reduce(self, tensor: torch.Tensor) -> None:
        """Sum ``tensor`` over the ranks, in place."""
        if self.distributed:
            dist.all_reduce(tensor)

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (any picklable object), in rank order."""
        if not self.distributed:
            return [value]
        values: list[Any] = [None] * self.world
        dist.all_gather_object(values, value)
        return values

    def broadcast(self, tensor: torch.Tensor, owner: int) -> None:
        """Give every rank ``owner``'s ``tensor``, in place."""
        if self.distributed:
            dist.broadcast(tensor, owner)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def owners(self, costs: list[float]) -> list[int]:
        """The rank that does each job of ``costs``: the costliest first, each to the least loaded rank (the same
        answer on every rank)."""
        loads = [0.0] * self.world
        owners = [0] * len(costs)
        for job in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
            owner = min(range(self.world), key=lambda r: (loads[r], r))
            owners[job] = owner
            loads[owner] += costs[job]
        return owners

    def check_same(self, what: str, value: Any) -> None:
        """Raise on every rank unless every rank has the same ``value`` (compared by a hash of its JSON)."""
        if not self.distributed:
            return
        digest = hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()
        digests: list[str | None] = [None] * self.world
        dist.all_gather_object(digests, digest)
        if len(set(digests)) > 1:
            groups = {d: [r for r, other in enumerate(digests) if other == d] for d in digests}
            raise InputError(
                f"The ranks disagree on {what}: ranks {' vs '.join(str(g) for g in groups.values())} differ. Every rank "
                "must run the same command on the same model and data."
            )


def world_size() -> int:
    """How many processes ``torchrun`` started for this job (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_by_torchrun() -> bool:
    """Whether ``torchrun`` started this process as one of several (``WORLD_SIZE`` > 1)."""
    return world_size() > 1


def init_from_environment(device: str | None) -> Ranks:
    """Join the job ``torchrun`` describes in the environment (``WORLD_SIZE`` > 1): NCCL for CUDA devices, gloo
    otherwise; a single process stays one. Returns this process's `Ranks`."""
    world = world_size()
    if not launched_by_torchrun() or (dist.is_available() and dist.is_initialized()):
        return Ranks.current()
    if not dist.is_available():
        raise RuntimeError("torchrun started several processes, but this torch build has no torch.distributed.")
    cuda = (device or "").startswith("cuda")
    backend = "nccl" if cuda else "gloo"
    if not (dist.is_nccl_available() if cuda else dist.is_gloo_available()):
        raise RuntimeError(
            f"torchrun started {world} processes on {device or 'cpu'}, but the {backend} backend is not available "
            "in this torch build: use CPU devices (gloo) or a CUDA build of torch (NCCL)."
        )
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=TIMEOUT)
    return Ranks.current()
