"""The process group every run lives in: torchrun's, or a single-process one of world size 1.

Single process is DDP with world size 1, so training and evaluation have one code path.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    """This process's place in the job and the device it trains on."""

    rank: int
    world_size: int
    device: torch.device
    control: Any = None  # a CPU (gloo) group for small host-side votes; None in a world of one

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ranks (on the backend's device) and return it on this device."""
        backend_tensor = tensor.to(self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(backend_tensor, op=dist.ReduceOp.SUM)
        return backend_tensor.to(tensor.device)

    def shard(self, indices: torch.Tensor, even: bool) -> torch.Tensor:
        """This rank's share of ``indices``; ``even`` drops the tail so shards are equal,
        which DDP needs in training (every rank must take the same number of steps)."""
        if even:
            indices = indices[: len(indices) - len(indices) % self.world_size]
        return indices[self.rank :: self.world_size]

    def from_main(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (pickled and broadcast; as is in a world of one),
        so that every rank acts on one decision taken by rank 0."""
        if self.world_size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order, on every rank."""
        if self.world_size == 1:
            return [value]
        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values


def choose_device(preference: str) -> torch.device:
    """``auto``: this rank's GPU when there is one, else the CPU; or the device named.

    This rank's GPU is number LOCAL_RANK of those it sees, modulo their number: a rank that
    sees one GPU (SLURM binding a GPU to each task) takes that one.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        local_rank %= torch.cuda.device_count()
    if preference == "auto":
        return (
            torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
        )
    device = torch.device(preference)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def setup(preference: str = "auto") -> Dist:
    """Join torchrun's process group, or start a world of one, once per process."""
    device = choose_device(preference)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend, init_method="env://")
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    world_size = dist.get_world_size()
    control = _control_group() if world_size > 1 else None
    return Dist(dist.get_rank(), world_size, device, control)


@functools.cache
def _control_group() -> Any:
    """The default group when it is gloo already, else one gloo group made once per process."""
    if dist.get_backend() == "gloo":
        return dist.group.WORLD
    return dist.new_group(backend="gloo")


def teardown() -> None:
    """Leave the process group (at the end of a process that ran under torchrun)."""
    if dist.is_initialized():
        dist.destroy_process_group()
