"""Resuming a run: every check on an existing run directory, made before any file is written.

A run resumes from its checkpoint.pt only if

- config.json, when present, holds the same config (``epochs`` may grow);
- the checkpoint can be read and holds the same config. Checkpoints written before the config
  was stored in them are checked by their optimizer hyperparameters, which every checkpoint
  must match too;
- the model, optimizer and scheduler states load into this run's;
- metrics.jsonl holds no epoch the checkpoint lacks.

Metrics without a checkpoint are refused rather than overwritten by a fresh start. Each refusal
names the file and says how to recover; nothing in the directory has been changed by then.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .runs import RESTART_HINT, CheckpointError, ConfigMismatchError, RunStore, config_differences

__all__ = ["restore"]

_CHECKPOINT_KEYS = ("epoch", "model", "optimizer", "scheduler", "history")

# Param-group entries that are not settings: the parameters, the scheduled value of lr (its
# base value is checked as initial_lr) and tensors (arturo's eta, kl, skipped_steps).
_NOT_SETTINGS = ("params", "lr")


def restore(
    store: RunStore,
    config: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> list[dict[str, Any]]:
    """Load the run's checkpoint into the freshly built model, optimizer and scheduler and
    return its history (empty for a new run). Raises a RunDirError if anything is amiss."""
    store.check_config(config)
    metrics = store.metrics()
    checkpoint = store.load_checkpoint()
    if checkpoint is None:
        if metrics:
            raise CheckpointError(
                f"{store.metrics_path} holds {len(metrics)} finished epochs but "
                f"{store.checkpoint_path} is missing, so the run cannot resume, and starting "
                f"over would overwrite them. Restore the checkpoint, or {RESTART_HINT}."
            )
        return []
    history = _checked_history(store, checkpoint)
    _check_checkpoint_config(store, checkpoint, config)
    _check_optimizer_settings(store, checkpoint["optimizer"], optimizer)
    _load_states(store, checkpoint, model, optimizer, scheduler)
    if len(metrics) > len(history):
        raise store.checkpoint_error(
            f"holds {len(history)} epochs but metrics.jsonl holds {len(metrics)}: the "
            "checkpoint is older than the metrics"
        )
    return history


def _checked_history(store: RunStore, checkpoint: dict[str, Any]) -> list[dict[str, Any]]:
    missing = [k for k in _CHECKPOINT_KEYS if k not in checkpoint]
    if missing:
        raise store.checkpoint_error(f"is not an arturo-bench checkpoint (it lacks {missing})")
    history = checkpoint["history"]
    epochs = [row.get("epoch") for row in history] if isinstance(history, list) else None
    if epochs is None or not all(isinstance(r, dict) for r in history):
        raise store.checkpoint_error("holds no list of metrics rows")
    if epochs != list(range(1, len(history) + 1)) or checkpoint["epoch"] != len(history):
        raise store.checkpoint_error(
            f"is inconsistent: epoch {checkpoint['epoch']!r}, history of epochs {epochs}"
        )
    return history


def _check_checkpoint_config(
    store: RunStore, checkpoint: dict[str, Any], config: dict[str, Any]
) -> None:
    saved = checkpoint.get("config")
    if saved is None:  # written before checkpoints stored their config
        return
    if not isinstance(saved, dict):
        raise store.checkpoint_error("holds no valid config")
    diff = config_differences(saved, config)
    if diff:
        raise ConfigMismatchError(
            f"{store.checkpoint_path} belongs to a run with a different config (checkpoint, "
            f"this run): {diff}. Was it copied from another run? Put back this run's "
            f"checkpoint, or {RESTART_HINT}."
        )


def _check_optimizer_settings(
    store: RunStore, saved: Any, optimizer: torch.optim.Optimizer
) -> None:
    """Each saved param group must hold the fresh optimizer's settings, wherever both have
    the same key: another optimizer's checkpoint, or another run's, differs in some (at the
    least its initial_lr). Keys only one side has are left alone, so that a torch or arturo
    upgrade that adds a setting does not make old checkpoints unusable."""
    groups = saved.get("param_groups") if isinstance(saved, dict) else None
    if not isinstance(groups, list) or len(groups) != len(optimizer.param_groups):
        raise store.checkpoint_error("holds an optimizer state that does not fit this run")
    diff = {}
    for i, (old, new) in enumerate(zip(groups, optimizer.param_groups, strict=True)):
        for key in sorted(set(old) & set(new)):
            if key in _NOT_SETTINGS or isinstance(new[key], Tensor):
                continue
            if old[key] != new[key]:
                diff[f"group {i} {key}"] = (old[key], new[key])
    if diff:
        raise ConfigMismatchError(
            f"{store.checkpoint_path} holds optimizer settings that differ from this run's "
            f"(checkpoint, this run): {diff}. Was it copied from another run? Put back this "
            f"run's checkpoint, or {RESTART_HINT}."
        )


def _load_states(
    store: RunStore,
    checkpoint: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> None:
    """Load the saved states; they only change these in-memory objects, not the files."""
    try:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
    except (RuntimeError, KeyError, ValueError, TypeError, AttributeError) as exc:
        first_line = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        raise store.checkpoint_error(
            f"does not fit this run's model and optimizer ({type(exc).__name__}: {first_line})"
        ) from exc
    if "ivon_current_step" in checkpoint:  # IVON keeps its step count outside state_dict
        optimizer.current_step = checkpoint["ivon_current_step"]  # type: ignore[attr-defined]
