"""The one place where arTuRO's global reductions meet torch.distributed.

The trust-region dual sums a KL over every coordinate of a param group. When parameters are
sharded (FSDP2 ``fully_shard``: DTensor parameters), each rank holds a slice of every sum, and
the slices must be added up before the Newton update. ``functional.arturo_step`` routes every
such sum through the function returned here, so a step issues a fixed, small number of
collectives of a few floats each, independent of the number of tensors: one for the gradient
check (count of non-finite gradients and gradient scale), then one per evaluation of the dual
(``newton_steps + 1`` of them), each an all-reduce of a ``[G, 2]`` tensor for G param groups.

Under DDP every rank holds all of every parameter, so no reduction is needed.

The math itself never sees a DTensor: :func:`local_shard` gives the optimizer the local shard
of a parameter, of its gradient and of its state (which is created sharded like the
parameter), and the elementwise updates run on those in place.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from types import ModuleType

import torch.distributed as dist
from torch import Tensor

__all__ = ["local_shard", "partial_sum_reducer"]


def _dtensor_module() -> ModuleType | None:
    # Importing torch.distributed.tensor takes seconds; no tensor can be a DTensor before
    # someone else has imported it, so `import arturo` never pays for it.
    return sys.modules.get("torch.distributed.tensor")


def _is_dtensor(t: Tensor) -> bool:
    module = _dtensor_module()
    return module is not None and isinstance(t, module.DTensor)


def local_shard(t: Tensor) -> Tensor:
    """The part of ``t`` that lives on this rank: a DTensor's local tensor, else ``t`` itself.

    The result shares storage with ``t``, so in-place updates of it update ``t``. Under FSDP2
    a local shard may be empty (a parameter with fewer rows than ranks).
    """
    if _is_dtensor(t):
        return t._local_tensor  # to_local() without autograd: the same tensor, no copy
    return t


def _is_sharded(placement: object) -> bool:
    # FSDP2 + tensor parallel on the same tensor dim uses the private _StridedShard, which
    # does not call itself a shard.
    return placement.is_shard() or type(placement).__name__ == "_StridedShard"  # type: ignore[attr-defined]


def _layout(p: Tensor) -> tuple[object, tuple[int, ...]]:
    """(device mesh, mesh dims over which ``p`` is sharded) of a DTensor parameter."""
    placements = p.placements  # type: ignore[attr-defined]
    if any(pl.is_partial() for pl in placements):
        raise ValueError(
            f"Arturo cannot step a parameter with a Partial placement ({placements}); "
            "parameters must be sharded or replicated"
        )
    return p.device_mesh, tuple(i for i, pl in enumerate(placements) if _is_sharded(pl))  # type: ignore[attr-defined]


def partial_sum_reducer(params: Sequence[Tensor]) -> Callable[[Tensor], Tensor] | None:
    """A function that sums partial reductions over the shards of ``params``.

    Returns ``None`` when no parameter is sharded, so single-process and DDP training pay
    nothing. Otherwise the function all-reduces (SUM) its small tensor argument in place and
    returns it, over the mesh dimensions along which the parameters are sharded only: under
    HSDP (mesh ``(replicate, shard)``) every replica group already holds the whole sum after
    the shard-dim reduction, and reducing over the replicate dim too would count it twice.

    All sharded parameters must share one device mesh and one set of sharded mesh dims (the
    case for FSDP2 and HSDP). A mix of sharded and unsharded parameters, or of different
    shardings, would need per-parameter weights in the sums and raises ``ValueError``.
    """
    sharded = [p for p in params if _is_dtensor(p)]
    if not sharded:
        return None
    mesh, dims = _layout(sharded[0])
    for p in sharded[1:]:
        other_mesh, other_dims = _layout(p)
        if other_mesh != mesh or other_dims != dims:
            raise ValueError(
                "Arturo sums its trust-region KL over all parameters that step together, so "
                "they must be sharded alike; found DTensor parameters on meshes "
                f"{mesh} (sharded over mesh dims {dims}) and {other_mesh} (dims {other_dims}). "
                "Put differently sharded parameters in separate optimizers."
            )
    if not dims:  # replicated DTensors, like plain tensors, hold every coordinate
        return None
    if len(sharded) != len(params):
        raise ValueError(
            "Arturo sums its trust-region KL over all parameters that step together, and "
            f"{len(params) - len(sharded)} of them are plain tensors while the others are "
            "sharded DTensors: the plain ones would be counted once per rank. Shard the whole "
            "model (fully_shard on the root module) or use separate optimizers."
        )
    groups = [mesh.get_group(d) for d in dims]  # type: ignore[attr-defined]

    def all_reduce_sum(partial: Tensor) -> Tensor:
        # One collective of a few floats per call (per mesh dim the params are sharded over;
        # one for FSDP2 and HSDP).
        for group in groups:
            dist.all_reduce(partial, op=dist.ReduceOp.SUM, group=group)
        return partial

    return all_reduce_sum
