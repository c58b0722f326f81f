"""What a workload is: its data splits, metric, schedule and budgets, in one dataclass."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR

__all__ = [
    "Metric",
    "TensorSplit",
    "TokenWindows",
    "Split",
    "WorkloadData",
    "Workload",
    "warmup_cosine",
]

DataDir = str | os.PathLike[str] | None
Direction = Literal["max", "min"]


@dataclass(frozen=True)
class Metric:
    """How a model is scored on the evaluation split.

    ``total(output, targets)`` sums the quantity over one batch (a 0-d tensor, left on the
    device so evaluation syncs once); the metric is ``finish(sum of totals / number of target
    elements)``: ``finish`` is ``math.sqrt`` for an RMSE, the identity otherwise."""

    name: str
    direction: Direction
    total: Callable[[Tensor, Tensor], Tensor]
    finish: Callable[[float], float] = float

    def reached(self, value: float, target: float) -> bool:
        """Whether ``value`` is at least as good as ``target`` (NaN never is)."""
        return value >= target if self.direction == "max" else value <= target

    @property
    def worst(self) -> float:
        """What a diverged run records: NaN for a score, inf for an error."""
        return math.nan if self.direction == "max" else math.inf


@dataclass
class TensorSplit:
    """Examples as rows of two tensors (inputs and targets), already on the training device."""

    inputs: Tensor
    targets: Tensor

    def __len__(self) -> int:
        return len(self.targets)

    def batch(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        return self.inputs[idx], self.targets[idx]


@dataclass
class TokenWindows:
    """Windows of ``context`` tokens of one token stream; example ``i`` starts at
    ``i * stride`` and its targets are the same window shifted by one token."""

    tokens: Tensor  # int64 (N,)
    context: int
    stride: int = 1
    _offsets: Tensor | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return (len(self.tokens) - 1 - self.context) // self.stride + 1

    def batch(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        if self._offsets is None or self._offsets.device != self.tokens.device:
            self._offsets = torch.arange(self.context + 1, device=self.tokens.device)
        windows = self.tokens[idx[:, None] * self.stride + self._offsets]
        return windows[:, :-1], windows[:, 1:]


Split = TensorSplit | TokenWindows


@dataclass
class WorkloadData:
    """A workload's training and evaluation splits, on one device."""

    train: Split
    test: Split
    source: str = ""  # where the data came from, for the record


def warmup_cosine(total_steps: int, warmup_fraction: float) -> Callable[[int], float]:
    """The LR multiplier of step ``s`` (0-based): a linear ramp over the first
    ``warmup_fraction`` of the steps, then a cosine down to 0 at ``total_steps``.

    The ramp starts at 1/warmup rather than 0 so that the first step moves (a zero lr is a
    no-op for some optimizers and an error for others)."""
    warmup = max(1, round(warmup_fraction * total_steps))
    decay = max(1, total_steps - warmup)

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / decay)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return multiplier


@dataclass(frozen=True)
class Workload:
    """One benchmark task: data, model, loss, metric, budgets and reference scores.

    ``target`` is the metric that torch's AdamW with its defaults (lr 1e-3, weight_decay 1e-2)
    reaches at the end of the full budget on seed 0; ``trivial`` is the metric of the trivial
    predictor (``trivial_of`` computes it from the data). Scores are normalised so that
    trivial -> 0 and target -> 1 (see ``normalized_score``)."""

    name: str
    family: str
    description: str
    load: Callable[[DataDir, torch.device | str], WorkloadData]
    make_model: Callable[[], nn.Module]  # unseeded; ``build_model`` seeds it
    loss: Callable[[Tensor, Tensor], Tensor]
    metric: Metric
    batch_size: int
    steps: int
    quick_steps: int
    eval_every: int
    quick_eval_every: int
    target: float
    quick_target: float
    trivial: float
    trivial_of: Callable[[WorkloadData], float]
    warmup_fraction: float = 0.05
    eval_batch_size: int = 1000

    def build_model(self, seed: int) -> nn.Module:
        """The model's initial weights, a function of ``seed`` alone (built on the CPU, so the
        same on every device), without touching the caller's RNG state."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.make_model()

    def budget(self, quick: bool = False) -> tuple[int, int]:
        """(steps, eval_every) of the full or the quick budget."""
        if quick:
            return self.quick_steps, self.quick_eval_every
        return self.steps, self.eval_every

    def schedule(self, optimizer: torch.optim.Optimizer, steps: int) -> LambdaLR:
        """The one schedule every optimizer gets: it scales each group's ``lr`` (arTuRO's KL
        bound included) by the same multiplier."""
        return LambdaLR(optimizer, warmup_cosine(steps, self.warmup_fraction))
