"""Data-parallel runs: ``torchrun --nproc_per_node N -m arturo_bench run ...``.

Each rank holds the whole model under DistributedDataParallel and trains on its contiguous
slice of every batch, so the global batch is the configured ``batch_size``. DDP averages the
gradients, so with equal slices every optimizer sees the gradient of the whole batch. Rank 0
alone writes the run directory and prints; the other ranks read the checkpoint to resume.
Dropout masks and IVON's weight noise come from the same seed on every rank, so IVON samples
the same weights everywhere. Without torchrun (no ``WORLD_SIZE`` > 1 in the environment) all
of this is a no-op.
"""

from __future__ import annotations

import atexit
import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .runs import RunStore

__all__ = ["SINGLE_PROCESS", "DistEnv", "FollowerRunStore", "init_from_env"]


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the data-parallel job (a single process by default)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """One GPU per rank: ``cuda`` becomes ``cuda:LOCAL_RANK``."""
        if self.enabled and device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device

    def batch_slice(self, start: int, stop: int) -> slice:
        """This rank's contiguous part of the batch ``[start, stop)``, cut like
        ``tensor_split``: the first ``len % world_size`` ranks get one more."""
        if not self.enabled:
            return slice(start, stop)
        size, extra = divmod(stop - start, self.world_size)
        lo = start + self.rank * size + min(self.rank, extra)
        return slice(lo, lo + size + (self.rank < extra))

    def wrap(self, model: nn.Module) -> nn.Module:
        """The model under DDP when there are several ranks, else the model itself."""
        if not self.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel

        device = next(model.parameters()).device
        return DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )

    def sum(self, *values: Tensor | float) -> list[float]:
        """Each value summed over the ranks (one all-reduce), as Python floats."""
        device = next((v.device for v in values if isinstance(v, Tensor)), torch.device("cpu"))
        t = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in values])
        if self.enabled:
            dist.all_reduce(t)
        return t.tolist()


SINGLE_PROCESS = DistEnv()


def init_from_env(device: str) -> DistEnv:
    """Join the process group that torchrun describes in the environment, if any."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return SINGLE_PROCESS
    env = DistEnv(
        rank=int(os.environ["RANK"]),
        world_size=world_size,
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )
    cuda = device in ("auto", "cuda") and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(env.local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
        atexit.register(dist.destroy_process_group)
    return env


class FollowerRunStore(RunStore):
    """A run directory as ranks other than 0 see it: they resume from its checkpoint, but
    only rank 0 writes."""

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        yield  # rank 0 holds the run directory's lock for the whole job

    def clear(self) -> None:
        pass

    def init(self, config: dict[str, Any], env: dict[str, Any]) -> None:
        pass

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        pass

    def write_metrics(self, history: list[dict[str, Any]]) -> None:
        pass
