"""The torch.distributed group as the stages without a fit see it (docs/scale.md): which rank this process is, how
many there are, a barrier and an object gather. Without an initialised process group (one process) the rank is 0,
the world 1, and the barrier and gather do nothing, so the same code runs unchanged in one process.

Sharding rule shared by the sharded stages: unit ``i`` of a list of work units (a teacher shard, an evaluation
batch) is run by rank ``i % world``, the units themselves being the same as in one process.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist


def initialised() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    """(this process's global rank, the number of processes); (0, 1) without a process group."""
    if not initialised():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def barrier() -> None:
    """Wait for every rank; nothing without a process group."""
    if initialised():
        dist.barrier()


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (``all_gather_object``: picklable objects, CPU tensors);
    ``[obj]`` without a process group."""
    _, world = rank_and_world()
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def my_units(count: int) -> list[int]:
    """The units ``0..count-1`` this rank runs: ``i % world == rank``."""
    rank, world = rank_and_world()
    return list(range(rank, count, world))
