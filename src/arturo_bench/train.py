"""The training loop: one (experiment, optimizer, seed) run, resumable, read top to bottom.

Fairness and reproducibility:

- The model is built on the CPU right after ``torch.manual_seed(seed)``, so every optimizer
  starts from the same weights, on every device.
- Each epoch's randomness is a pure function of (seed, epoch): the data order and CIFAR's
  crop/flip draws come from a CPU generator seeded with it, and dropout from the global RNG
  re-seeded with it. Every optimizer sees the same batches in the same order, and a resumed run
  needs no saved RNG state to continue exactly.
- Whole datasets sit on the training device as uint8; each batch is an index slice there,
  converted and augmented on the device (no per-item DataLoader).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .configs import ExperimentConfig, IVONConfig, optimizer_config, to_dict
from .data import CIFAR_STATS, Dataset, prepare_batch
from .distributed import SINGLE_PROCESS, DistEnv
from .models import build_model
from .optimizers import build_optimizer
from .runs import RunStore, environment

__all__ = ["train_run", "run_config", "resolve_device"]


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available (use --device cpu)")
    return device


def run_config(exp: ExperimentConfig, optimizer: str, seed: int, *, quick: bool) -> dict[str, Any]:
    """The resolved config saved as config.json: the experiment without the other optimizers."""
    fields = to_dict(exp)
    fields.pop("optimizers")
    fields["milestones"] = list(exp.milestones)
    return {
        **fields,
        "optimizer": optimizer,
        "optimizer_config": to_dict(optimizer_config(exp, optimizer)),
        "seed": seed,
        "quick": quick,
    }


def _epoch_seed(seed: int, epoch: int) -> int:
    return seed * 1_000_003 + epoch


class _StepTimer:
    """Time spent in optimizer.step(). CUDA events avoid a host sync per step on the GPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.seconds = 0.0
        self.events: list[tuple[Any, Any]] = []

    def __enter__(self) -> None:
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            self.events.append((start, torch.cuda.Event(enable_timing=True)))
        else:
            self._t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            self.events[-1][1].record()
        else:
            self.seconds += time.perf_counter() - self._t0

    def total(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            self.seconds += sum(s.elapsed_time(e) for s, e in self.events) / 1e3
            self.events.clear()
        return self.seconds


def _forward_backward(
    model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor, mc_samples: int
) -> tuple[Tensor, Tensor]:
    """Loss and gradients of one batch. IVON evaluates them at sampled weights."""
    if mc_samples == 0:
        optimizer.zero_grad(set_to_none=True)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        loss.backward()
        return logits, loss
    for _ in range(mc_samples):  # IVON: average over weight samples (it accumulates internally)
        with optimizer.sampled_params(train=True):  # type: ignore[attr-defined]
            optimizer.zero_grad(set_to_none=True)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            loss.backward()
    return logits, loss


def _progress(total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # the bench extra brings tqdm; without it, only epoch lines
        return None
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, unit="step")


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: Dataset,
    exp: ExperimentConfig,
    *,
    seed: int,
    epoch: int,
    mc_samples: int,
    desc: str,
    progress: bool,
    dist_env: DistEnv = SINGLE_PROCESS,
) -> dict[str, float]:
    """One pass over the training set; returns loss, accuracy and timings. Under DDP each
    rank trains on its slice of every batch, and the loss and accuracy are over all ranks."""
    model.train()
    device = data.train_x.device
    n = len(data.train_y)
    bs = exp.batch_size
    num_batches = n // bs if exp.drop_last else -(-n // bs)

    # This epoch's data order and augmentation draws: a function of (seed, epoch) only.
    gen = torch.Generator().manual_seed(_epoch_seed(seed, epoch))
    order = torch.randperm(n, generator=gen).to(device)
    crop = flip = None
    if data.name in CIFAR_STATS:
        crop = torch.randint(0, 9, (n, 2), generator=gen).to(device)
        flip = (torch.rand(n, generator=gen) < 0.5).to(device)
    # Dropout masks (and IVON's weight noise): another stream, also a function of (seed, epoch).
    torch.manual_seed(_epoch_seed(seed, epoch) + 500_009)

    # Running sums stay on the device; reading them syncs, so that happens only for the bar.
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    timer = _StepTimer(device)
    has_stats = callable(getattr(optimizer, "stats", None))
    etas: list[float] = []
    kls: list[float] = []
    bar = _progress(num_batches, desc, progress)

    t0 = time.perf_counter()
    for i in range(num_batches):
        sl = dist_env.batch_slice(i * bs, min((i + 1) * bs, n))  # all of it on one rank
        idx = order[sl]
        x = prepare_batch(
            data.name,
            data.train_x[idx],
            crop=None if crop is None else crop[sl],
            flip=None if flip is None else flip[sl],
        )
        y = data.train_y[idx]

        logits, loss = _forward_backward(model, optimizer, x, y, mc_samples)
        with timer:
            optimizer.step()

        loss_sum += loss.detach() * len(y)
        correct += (logits.detach().argmax(1) == y).sum()
        seen += len(y)
        last = i == num_batches - 1
        # opt.stats() reads device values (a sync): sample it every stats_every steps.
        if has_stats and ((i + 1) % exp.stats_every == 0 or last):
            groups = optimizer.stats()  # type: ignore[attr-defined]
            etas.append(sum(g["eta"] for g in groups) / len(groups))
            kls.append(sum(g["kl"] for g in groups) / len(groups))
        if bar is not None:
            bar.update(1)
            if i % 10 == 0 or last:
                bar.set_postfix(
                    loss=f"{loss_sum.item() / seen:.4f}", acc=f"{correct.item() / seen:.2%}"
                )
    # Syncs, so the wall time below includes all work; under DDP, sums over the ranks.
    loss_total, correct_total, seen = dist_env.sum(loss_sum, correct, seen)
    train_loss = loss_total / seen
    train_acc = correct_total / seen
    train_time = time.perf_counter() - t0
    if bar is not None:
        bar.close()

    row = {
        "train_loss": train_loss,
        "train_acc": train_acc,
        "train_time_s": train_time,
        "step_time_s": timer.total(),
        "steps": num_batches,
    }
    if has_stats:
        groups = optimizer.stats()  # type: ignore[attr-defined]
        row["eta"] = sum(etas) / len(etas)
        row["kl"] = sum(kls) / len(kls)
        row["kl_bound"] = groups[0]["kl_bound"]
        row["skipped_steps"] = sum(int(g.get("skipped_steps", 0)) for g in groups)
    return row


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset, batch_size: int) -> dict[str, float]:
    """Test loss and accuracy (at the mean weights, for IVON too)."""
    model.eval()
    device = data.test_x.device
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    t0 = time.perf_counter()
    for start in range(0, len(data.test_y), batch_size):
        x = prepare_batch(data.name, data.test_x[start : start + batch_size])
        y = data.test_y[start : start + batch_size]
        logits = model(x)
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
    n = len(data.test_y)
    return {
        "test_loss": loss_sum.item() / n,
        "test_acc": correct.item() / n,
        "eval_time_s": time.perf_counter() - t0,
    }


def train_run(
    exp: ExperimentConfig,
    optimizer_name: str,
    seed: int,
    data: Dataset,
    store: RunStore,
    *,
    quick: bool = False,
    progress: bool = False,
    log: Callable[[str], None] = print,
    dist_env: DistEnv = SINGLE_PROCESS,
) -> list[dict[str, Any]]:
    """Train (or resume) one run; returns its per-epoch history. ``data`` is already on the
    training device. Each finished epoch is checkpointed, so an interrupt loses at most one."""
    device = data.train_x.device
    opt_cfg = optimizer_config(exp, optimizer_name)
    started = environment(device) | {"world_size": dist_env.world_size}
    store.init(run_config(exp, optimizer_name, seed, quick=quick), started)

    # Same initial weights for every optimizer: built on the CPU from the seed alone.
    torch.manual_seed(seed)
    model = build_model(exp.model, num_classes=data.num_classes, in_channels=data.in_channels)
    model.to(device)
    optimizer = build_optimizer(opt_cfg, model.parameters(), num_train=len(data.train_y))
    scheduler = torch.optim.lr_scheduler.MultiStepLR(
        optimizer, milestones=list(exp.milestones), gamma=opt_cfg.gamma
    )
    mc_samples = opt_cfg.mc_samples if isinstance(opt_cfg, IVONConfig) else 0
    net = dist_env.wrap(model)  # DDP when several ranks: it averages the gradients

    history: list[dict[str, Any]] = []
    checkpoint = store.load_checkpoint()
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        history = checkpoint["history"]
        if "ivon_current_step" in checkpoint:  # IVON keeps its step count outside state_dict
            optimizer.current_step = checkpoint["ivon_current_step"]  # type: ignore[attr-defined]
        store.write_metrics(history)  # in case the last write was interrupted
        if len(history) < exp.epochs:
            log(f"resuming {store.path} after epoch {len(history)}")
    wall = history[-1]["wall_time_s"] if history else 0.0

    tag = f"{exp.name} {optimizer_name} seed{seed}"
    for epoch in range(len(history) + 1, exp.epochs + 1):
        lr = optimizer.param_groups[0]["lr"]
        row: dict[str, Any] = {"epoch": epoch, "lr": lr}
        row |= train_epoch(
            net,
            optimizer,
            data,
            exp,
            seed=seed,
            epoch=epoch,
            mc_samples=mc_samples,
            desc=f"{tag} {epoch}/{exp.epochs}",
            progress=progress,
            dist_env=dist_env,
        )
        row |= evaluate(model, data, exp.test_batch_size)
        scheduler.step()
        wall += row["train_time_s"]
        row["wall_time_s"] = wall  # cumulative training time, evaluation excluded
        history.append(row)

        checkpoint = {
            "epoch": epoch,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "history": history,
        }
        if hasattr(optimizer, "current_step"):
            checkpoint["ivon_current_step"] = optimizer.current_step
        store.save_checkpoint(checkpoint)
        store.write_metrics(history)
        extra = f" eta {row['eta']:.3g} kl {row['kl']:.3g}" if "eta" in row else ""
        log(
            f"{tag} epoch {epoch}/{exp.epochs}: train loss {row['train_loss']:.4f} "
            f"acc {row['train_acc']:.2%} | test loss {row['test_loss']:.4f} "
            f"acc {row['test_acc']:.2%} | {row['train_time_s']:.1f}s "
            f"(step {row['step_time_s']:.2f}s){extra}"
        )
    return history
