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
- Nothing in the timed loop reads a device value: the sums (loss, accuracy, arturo's
  diagnostics) stay on the device and are read once the epoch's time is taken.

A run stops (:class:`NonFiniteLossError`) when an epoch applied a step whose training loss was
NaN or inf, unless ``allow_nonfinite``: its weights are no longer trustworthy. A step that
arturo skipped (non-finite gradients) is counted, not fatal.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .configs import (
    ExperimentConfig,
    IVONConfig,
    optimizer_config,
    to_dict,
    validate_experiment,
)
from .data import CIFAR_STATS, Dataset, prepare_batch
from .distributed import SINGLE_PROCESS, DistEnv
from .models import build_model
from .optimizers import build_optimizer
from .resume import restore
from .runs import RunStore, environment

__all__ = ["train_run", "run_config", "resolve_device", "NonFiniteLossError"]


class NonFiniteLossError(FloatingPointError):
    """An epoch applied a step whose training loss was NaN or inf; nothing of it was saved."""


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


class _ArturoDiagnostics:
    """arturo's eta and kl, sampled every ``stats_every`` steps and summed on the device.

    An Arturo param group holds its eta, kl (of the last step) and skipped_steps (cumulative)
    as 0-dim device tensors. Reading them in the loop would sync the device, a cost the other
    optimizers do not pay; the sums are read once, after the epoch's time is taken."""

    KEYS = ("eta", "kl", "skipped_steps")

    @classmethod
    def of(
        cls, optimizer: torch.optim.Optimizer, device: torch.device
    ) -> _ArturoDiagnostics | None:
        """Diagnostics for an optimizer whose groups hold these keys (arturo), else None."""
        groups = optimizer.param_groups
        return cls(groups, device) if all(k in g for g in groups for k in cls.KEYS) else None

    def __init__(self, groups: list[dict[str, Any]], device: torch.device) -> None:
        self.groups = groups
        self.device = device
        # float64, as the host-side sums this replaces: the metrics keep their values.
        self.eta_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.kl_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.samples = 0
        self.skipped_before = self._skipped()

    def _mean_over_groups(self, key: str) -> Tensor:
        values = [torch.as_tensor(g[key]).to(self.device, torch.float64) for g in self.groups]
        return torch.stack(values).mean()

    def _skipped(self) -> Tensor:
        return torch.stack(
            [torch.as_tensor(g["skipped_steps"]).to(self.device) for g in self.groups]
        ).sum()

    def sample(self) -> None:
        self.eta_sum += self._mean_over_groups("eta")
        self.kl_sum += self._mean_over_groups("kl")
        self.samples += 1

    def skipped_this_epoch(self) -> Tensor:
        return self._skipped() - self.skipped_before

    def read(self) -> dict[str, float]:
        """The epoch's metrics: mean eta and kl over the samples, the KL bound, and the steps
        skipped so far (cumulative over the run)."""
        return {
            "eta": (self.eta_sum / self.samples).item(),
            "kl": (self.kl_sum / self.samples).item(),
            "kl_bound": float(self.groups[0]["lr"]),
            "skipped_steps": int(self._skipped()),
        }


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
) -> tuple[dict[str, float], int]:
    """One pass over the training set: the metrics row (loss, accuracy, timings) and the
    number of batches whose loss was NaN or inf yet whose step was applied (arturo skips a
    step with non-finite gradients; the others apply it). Under DDP each rank trains on its
    slice of every batch, and the sums are over all ranks.

    ``train_loss`` is the mean over the batches with a finite loss; ``nonfinite_batches``
    counts the others."""
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
    nonfinite_batches = torch.zeros((), device=device, dtype=torch.long)
    nonfinite_examples = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    timer = _StepTimer(device)
    diagnostics = _ArturoDiagnostics.of(optimizer, device)
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

        batch_loss = loss.detach() * len(y)
        nonfinite = ~batch_loss.isfinite()
        loss_sum += batch_loss.where(~nonfinite, 0.0)  # one NaN batch must not hide the rest
        nonfinite_batches += nonfinite
        nonfinite_examples += nonfinite * len(y)
        correct += (logits.detach().argmax(1) == y).sum()
        seen += len(y)
        last = i == num_batches - 1
        if diagnostics is not None and ((i + 1) % exp.stats_every == 0 or last):
            diagnostics.sample()
        if bar is not None:
            bar.update(1)
            if i % 10 == 0 or last:
                finite_seen = max(seen - nonfinite_examples.item(), 1)
                bar.set_postfix(
                    loss=f"{loss_sum.item() / finite_seen:.4f}",
                    acc=f"{correct.item() / seen:.2%}",
                )
    # Non-finite losses beyond the steps the optimizer skipped were applied to the weights.
    skipped = diagnostics.skipped_this_epoch() if diagnostics is not None else 0
    applied_nonfinite = (nonfinite_batches - skipped).clamp(min=0)
    # Syncs, so the wall time below includes all work; under DDP, sums over the ranks.
    loss_total, correct_total, seen, bad_batches, bad_examples, applied = dist_env.sum(
        loss_sum, correct, seen, nonfinite_batches, nonfinite_examples, applied_nonfinite
    )
    train_time = time.perf_counter() - t0
    if bar is not None:
        bar.close()

    finite_seen = seen - bad_examples
    row = {
        "train_loss": loss_total / finite_seen if finite_seen else math.nan,
        "train_acc": correct_total / seen,
        "train_time_s": train_time,
        "step_time_s": timer.total(),
        "steps": num_batches,
        "nonfinite_batches": int(bad_batches),
    }
    if diagnostics is not None:
        row |= diagnostics.read()
    return row, int(applied)


@torch.no_grad()
def evaluate(
    model: nn.Module, data: Dataset, batch_size: int, *, calibration: bool = False
) -> dict[str, float]:
    """Test loss and accuracy (at the mean weights, for IVON too); with ``calibration``, also
    the Brier score and ECE of the same predictions (``arturo_bench.uncertainty``)."""
    model.eval()
    device = data.test_x.device
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    kept: list[Tensor] = []
    t0 = time.perf_counter()
    for start in range(0, len(data.test_y), batch_size):
        x = prepare_batch(data.name, data.test_x[start : start + batch_size])
        y = data.test_y[start : start + batch_size]
        logits = model(x)
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
        if calibration:
            kept.append(logits.float())
    n = len(data.test_y)
    row = {"test_loss": loss_sum.item() / n, "test_acc": correct.item() / n}
    if calibration:
        from .uncertainty import mean_model_metrics  # torchmetrics, only when asked for

        row |= mean_model_metrics(torch.cat(kept), data.test_y)
    return row | {"eval_time_s": time.perf_counter() - t0}


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
    restart: bool = False,
    allow_nonfinite: bool = False,
) -> list[dict[str, Any]]:
    """Train (or resume) one run; returns its per-epoch history. ``data`` is already on the
    training device. Each finished epoch is checkpointed, so an interrupt loses at most one.

    The run directory is locked while training. Everything in it is checked before anything
    is written (see ``arturo_bench.resume``); ``restart`` deletes its files and starts over.
    ``allow_nonfinite`` trains on through epochs with non-finite losses instead of stopping."""
    validate_experiment(exp)  # the command line did; a library caller may not have
    _check_has_batches(exp, len(data.train_y))
    _check_validation_split(exp, data)
    device = data.train_x.device
    opt_cfg = optimizer_config(exp, optimizer_name)
    config = run_config(exp, optimizer_name, seed, quick=quick)

    with store.lock():
        if restart:
            store.clear()
        # Same initial weights for every optimizer: built on the CPU from the seed alone.
        torch.manual_seed(seed)
        model = build_model(exp.model, num_classes=data.num_classes, in_channels=data.in_channels)
        model.to(device)
        optimizer = build_optimizer(opt_cfg, model.parameters(), num_train=len(data.train_y))
        scheduler = torch.optim.lr_scheduler.MultiStepLR(
            optimizer, milestones=list(exp.milestones), gamma=opt_cfg.gamma
        )
        # After --restart nobody resumes: other ranks must not read what rank 0 deletes.
        history = [] if restart else restore(store, config, model, optimizer, scheduler)
        store.init(config, environment(device) | {"world_size": dist_env.world_size})
        if history:
            store.write_metrics(history)  # in case the last write was interrupted
            if len(history) < exp.epochs:
                log(f"resuming {store.path} after epoch {len(history)}")
        mc_samples = opt_cfg.mc_samples if isinstance(opt_cfg, IVONConfig) else 0
        net = dist_env.wrap(model)  # DDP when several ranks: it averages the gradients
        wall = history[-1]["wall_time_s"] if history else 0.0

        tag = f"{exp.name} {optimizer_name} seed{seed}"
        for epoch in range(len(history) + 1, exp.epochs + 1):
            lr = optimizer.param_groups[0]["lr"]
            row: dict[str, Any] = {"epoch": epoch, "lr": lr}
            trained, applied_nonfinite = train_epoch(
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
            row |= trained
            problem = _nonfinite_problem(row, applied_nonfinite)
            if problem and not allow_nonfinite:
                raise NonFiniteLossError(
                    f"{tag}, epoch {epoch}: {problem}, so the weights can no longer be trusted. "
                    f"The run stopped before saving epoch {epoch} ({store.path} keeps "
                    f"{epoch - 1} finished epochs). Lower the learning rate (--set "
                    f"{optimizer_name}.lr=...), or re-run with --allow-nonfinite to train on."
                )
            calibration = exp.val_split > 0
            row |= evaluate(model, data, exp.test_batch_size, calibration=calibration)
            if calibration and _is_full_evaluation(epoch, exp.epochs):
                from .uncertainty import full_evaluation  # torchmetrics, only when asked for

                t_eval = time.perf_counter()
                row |= full_evaluation(
                    model,
                    optimizer,
                    data,
                    samples=exp.eval_samples,
                    seed=_epoch_seed(seed, epoch) + 900_001,  # a stream of its own
                    batch_size=exp.test_batch_size,
                    fit_posterior_temperature=epoch == exp.epochs,
                )
                row["eval_time_s"] += time.perf_counter() - t_eval
            scheduler.step()
            wall += row["train_time_s"]
            row["wall_time_s"] = wall  # cumulative training time, evaluation excluded
            previous = history[-1] if history else {}
            history.append(row)

            checkpoint = {
                "epoch": epoch,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "history": history,
                "config": config,  # so that a checkpoint copied from another run is refused
            }
            if hasattr(optimizer, "current_step"):
                checkpoint["ivon_current_step"] = optimizer.current_step
            store.save_checkpoint(checkpoint)
            store.write_metrics(history)
            log(
                f"{tag} epoch {epoch}/{exp.epochs}: train loss {row['train_loss']:.4f} "
                f"acc {row['train_acc']:.2%} | test loss {row['test_loss']:.4f} "
                f"acc {row['test_acc']:.2%} | {row['train_time_s']:.1f}s "
                f"(step {row['step_time_s']:.2f}s){_epoch_notes(row, previous)}"
                f"{_calibration_notes(row)}"
            )
            if problem:
                log(f"warning: {tag} epoch {epoch}: {problem} (--allow-nonfinite: training on)")
    return history


def _is_full_evaluation(epoch: int, epochs: int) -> bool:
    """The model average, temperature scaling and OOD check run at the last epoch and every
    10th: each costs several passes over the evaluation sets."""
    return epoch % 10 == 0 or epoch == epochs


def _check_validation_split(exp: ExperimentConfig, data: Dataset) -> None:
    """The data must hold the split the config promises: results say how many images were
    held out, and a library caller could pass data split otherwise (or not at all)."""
    held_out = 0 if data.val_y is None else len(data.val_y)
    if held_out != exp.val_split:
        raise ValueError(
            f"val_split is {exp.val_split} but the data holds {held_out} validation images; "
            f"split it with data.hold_out({exp.val_split}) before any subset"
        )


def _check_has_batches(exp: ExperimentConfig, num_train: int) -> None:
    if exp.drop_last and exp.batch_size > num_train:
        raise ValueError(
            f"batch_size {exp.batch_size} with drop_last leaves no batch of the {num_train} "
            "training examples"
        )


def _nonfinite_problem(row: dict[str, Any], applied_nonfinite: int) -> str | None:
    """Why the epoch's weights are not trustworthy, or None if they are."""
    if applied_nonfinite:
        return (
            f"{applied_nonfinite} batch(es) had a NaN or inf training loss and the optimizer "
            "applied their steps (the mean training loss over the applied steps is non-finite)"
        )
    if not math.isfinite(row["train_loss"]):
        return f"the mean training loss is {row['train_loss']} (no batch had a finite loss)"
    return None


def _epoch_notes(row: dict[str, Any], previous: dict[str, Any]) -> str:
    """arturo's diagnostics, and what was skipped or left out this epoch."""
    notes = f" eta {row['eta']:.3g} kl {row['kl']:.3g}" if "eta" in row else ""
    skipped = row.get("skipped_steps", 0) - previous.get("skipped_steps", 0)
    if skipped:
        notes += f" | {skipped} step(s) skipped: non-finite gradients"
    if row.get("nonfinite_batches"):
        notes += f" | {row['nonfinite_batches']} batch(es) with a non-finite loss, not in the mean"
    return notes


def _calibration_notes(row: dict[str, Any]) -> str:
    """The calibration metrics of a full evaluation, when there was one."""
    notes = ""
    for kind, label in (("test", "mean"), ("ts", "temp-scaled"), ("bma", "BMA")):
        if f"{kind}_ece" in row and f"{kind}_ood_auroc" in row:
            nll = row["test_loss"] if kind == "test" else row[f"{kind}_nll"]
            notes += (
                f"\n    {label}: NLL {nll:.4f} ECE {row[f'{kind}_ece']:.4f} "
                f"Brier {row[f'{kind}_brier']:.4f} OOD AUROC {row[f'{kind}_ood_auroc']:.3f}"
            )
    if "bma_temperature" in row:
        notes += "\n    posterior temperature fitted on the validation split: "
        notes += f"{row['bma_temperature']:.3g}"
    return notes
