"""One training loop for every workload and optimizer, plus what is read off its history."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .core import DataDir, Split, Workload, WorkloadData

__all__ = [
    "BatchOrder",
    "evaluate",
    "train_workload",
    "steps_to_target",
    "normalized_score",
]

MakeOptimizer = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
OnEval = Callable[[dict[str, Any]], bool | None]


class BatchOrder:
    """Batch ``step`` (0-based) of training seed ``seed``: a pure function of the two.

    Each epoch is a fresh permutation drawn from (seed, epoch) and cut into full batches (the
    remainder is dropped), so every optimizer sees the same batches in the same order, and a
    run resumed at any step sees the ones it would have seen."""

    def __init__(self, n: int, batch_size: int, seed: int, device: torch.device | str) -> None:
        if n < batch_size:
            raise ValueError(f"{n} training examples cannot fill one batch of {batch_size}")
        self.n, self.batch_size, self.seed, self.device = n, batch_size, seed, device
        self.per_epoch = n // batch_size
        self._epoch, self._perm = -1, torch.empty(0)

    def indices(self, step: int) -> Tensor:
        epoch, k = divmod(step, self.per_epoch)
        if epoch != self._epoch:  # one host-to-device copy per epoch
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            self._epoch, self._perm = epoch, torch.from_numpy(perm).to(self.device)
        return self._perm[k * self.batch_size : (k + 1) * self.batch_size]


@torch.no_grad()
def evaluate(workload: Workload, model: nn.Module, split: Split) -> float:
    """The workload's metric of ``model`` on ``split`` (eval mode, one sync at the end)."""
    was_training = model.training
    model.eval()
    try:
        total: Tensor | float = 0.0
        count = 0
        device = next(model.parameters()).device
        for start in range(0, len(split), workload.eval_batch_size):
            stop = min(start + workload.eval_batch_size, len(split))
            inputs, targets = split.batch(torch.arange(start, stop, device=device))
            total = total + workload.metric.total(model(inputs), targets)
            count += targets.numel()
        mean = float(total) / count
    finally:
        model.train(was_training)
    return workload.metric.finish(mean) if math.isfinite(mean) else mean


@contextlib.contextmanager
def _seeded_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Seed the global RNG (dropout draws from it) without changing the caller's."""
    cuda = []
    if device.type == "cuda":
        cuda = [torch.cuda.current_device() if device.index is None else device.index]
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        yield


def train_workload(
    workload: Workload,
    make_optimizer: MakeOptimizer,
    *,
    seed: int,
    quick: bool = False,
    device: torch.device | str = "cpu",
    data: WorkloadData | None = None,
    data_dir: DataDir = None,
    steps: int | None = None,
    on_eval: OnEval | None = None,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Train ``workload``'s model from ``seed`` with ``make_optimizer(model.parameters())``
    under the workload's schedule, and return one row per evaluation.

    The budget is the workload's full or ``quick`` one (``steps`` overrides its length; the
    schedule then spans ``steps``). Every ``eval_every`` steps and at the end a row is
    appended: ``step``, ``train_loss`` (mean since the previous row), ``metric``, ``lr`` (of
    the first group at the last step), ``time_s`` (training time so far, evaluation excluded)
    and ``diverged``. ``on_eval(row)`` returning True stops training there (pruning).

    A non-finite training loss or metric ends the run: its row records the metric as
    ``workload.metric.worst`` (NaN for a score, inf for an error) and ``diverged: True``."""
    device = torch.device(device)
    if data is None:
        data = workload.load(data_dir, device)
    total_steps, eval_every = workload.budget(quick)
    if steps is not None:
        total_steps = steps
    if total_steps < 1:
        raise ValueError(f"steps must be >= 1, got {total_steps}")

    with _seeded_rng(seed, device):
        model = workload.build_model(seed).to(device)
        optimizer = make_optimizer(model.parameters())
        scheduler = workload.schedule(optimizer, total_steps)
        return _train_loop(
            workload,
            model,
            optimizer,
            scheduler,
            data,
            BatchOrder(len(data.train), workload.batch_size, seed, device),
            total_steps,
            eval_every,
            on_eval,
            progress,
        )


def _train_loop(
    workload: Workload,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    data: WorkloadData,
    order: BatchOrder,
    total_steps: int,
    eval_every: int,
    on_eval: OnEval | None,
    progress: bool,
) -> list[dict[str, Any]]:
    device = order.device
    history: list[dict[str, Any]] = []
    loss_sum = torch.zeros((), device=device)  # summed on the device: no per-step sync
    losses_summed = 0
    train_time = 0.0
    bar = _progress_bar(workload.name, total_steps, progress)
    model.train()
    started = time.perf_counter()
    try:
        for step in range(1, total_steps + 1):
            inputs, targets = data.train.batch(order.indices(step - 1))
            loss = workload.loss(model(inputs), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            lr = scheduler.get_last_lr()[0]  # the lr this step used
            scheduler.step()
            loss_sum += loss.detach()
            losses_summed += 1
            if bar is not None:
                bar.update()
            if step % eval_every and step != total_steps:
                continue
            train_loss = loss_sum.item() / losses_summed  # syncs, so the clock is honest
            train_time += time.perf_counter() - started
            row = _eval_row(workload, model, data, step, train_loss, lr, train_time)
            history.append(row)
            if bar is not None:
                bar.set_postfix(loss=f"{train_loss:.4g}", metric=f"{row['metric']:.4g}")
            if row["diverged"] or (on_eval is not None and on_eval(row)):
                break
            loss_sum.zero_()
            losses_summed = 0
            started = time.perf_counter()
    finally:
        if bar is not None:
            bar.close()
    return history


def _eval_row(
    workload: Workload,
    model: nn.Module,
    data: WorkloadData,
    step: int,
    train_loss: float,
    lr: Any,
    train_time: float,
) -> dict[str, Any]:
    metric = evaluate(workload, model, data.test) if math.isfinite(train_loss) else math.nan
    diverged = not math.isfinite(metric)
    return {
        "step": step,
        "train_loss": train_loss,
        "metric": workload.metric.worst if diverged else metric,
        "lr": float(lr),
        "time_s": train_time,
        "diverged": diverged,
    }


def _progress_bar(name: str, total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=name, unit="step", leave=False)


def steps_to_target(history: Iterable[dict[str, Any]], target: float, direction: str) -> int | None:
    """The first evaluated step whose metric reaches ``target`` (>= for "max", <= for
    "min"), or None if none does. NaN never reaches it."""
    if direction not in ("max", "min"):
        raise ValueError(f'direction must be "max" or "min", got {direction!r}')
    for row in history:
        value = row["metric"]
        if value >= target if direction == "max" else value <= target:
            return int(row["step"])
    return None


def normalized_score(workload: Workload, metric: float, *, quick: bool = False) -> float:
    """``metric`` on a scale where the trivial predictor is 0 and AdamW's defaults (the
    workload's target, or its quick target) are 1; higher is better for every workload.
    A diverged run's NaN or inf stays NaN or -inf."""
    target = workload.quick_target if quick else workload.target
    return (metric - workload.trivial) / (target - workload.trivial)
