"""Plan a suite (every workload x optimizer x seed, settings resolved up front) and run it."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..optimizers import build_optimizer
from ..runs import ConfigMismatchError, RunDirError, environment
from ..workloads import Workload, steps_to_target, train_workload
from .report import write_report
from .settings import (
    OptimizerSpec,
    ResolvedOptimizer,
    hyperparameters,
    parse_overrides,
    resolve_optimizer,
)
from .store import SuiteRun

__all__ = ["PlannedRun", "SuitePlan", "plan_suite", "check_finished", "run_suite"]

Log = Callable[[str], None]


@dataclass(frozen=True)
class PlannedRun:
    workload: Workload
    optimizer: ResolvedOptimizer
    seed: int

    @property
    def name(self) -> str:
        return f"{self.workload.name} {self.optimizer.spec.label} seed{self.seed}"

    def store(self, out: str | os.PathLike[str]) -> SuiteRun:
        return SuiteRun(out, self.workload.name, self.optimizer.spec.dirname, self.seed)

    def settings(self, quick: bool, steps: int | None) -> dict[str, Any]:
        """What the run is: recorded in config.json, and compared on a re-run."""
        budget_steps, eval_every = self.workload.budget(quick)
        return {
            "workload": self.workload.name,
            "optimizer": self.optimizer.spec.label,
            "optimizer_class": self.optimizer.spec.name,
            "hyperparameters": hyperparameters(self.optimizer.config),
            "tuned_from": self.optimizer.tuned_from,
            "seed": self.seed,
            "quick": quick,
            "steps": steps or budget_steps,
            "eval_every": eval_every,
            "metric": self.workload.metric.name,
            "direction": self.workload.metric.direction,
        }


@dataclass(frozen=True)
class SuitePlan:
    quick: bool
    steps: int | None  # a shorter budget for smoke tests; None: the workloads' own
    workloads: list[Workload]
    optimizers: list[OptimizerSpec]
    seeds: list[int]
    runs: list[PlannedRun]  # seed-major: an interrupted suite has whole seeds first


def plan_suite(
    workloads: Sequence[Workload],
    optimizers: Sequence[OptimizerSpec],
    seeds: Sequence[int],
    *,
    quick: bool,
    steps: int | None = None,
    overrides: Iterable[str] = (),
    storage: str | None = None,
) -> SuitePlan:
    """Resolve every optimizer's settings on every workload before anything trains, so that
    a bad --set or a missing study stops the suite at once."""
    if steps is not None and steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    grouped = parse_overrides(overrides, optimizers)
    resolved = {
        (w.name, spec.label): resolve_optimizer(
            spec, w.name, quick=quick, overrides=grouped.get(spec.label, ()), storage=storage
        )
        for w in workloads
        for spec in optimizers
    }
    runs = [
        PlannedRun(w, resolved[(w.name, spec.label)], seed)
        for seed in seeds
        for w in workloads
        for spec in optimizers
    ]
    return SuitePlan(quick, steps, list(workloads), list(optimizers), list(seeds), runs)


def check_finished(plan: SuitePlan, out: str | os.PathLike[str]) -> list[PlannedRun]:
    """The runs still to do. Every finished run must hold this plan's settings; all that do
    not are named in one error, before any training."""
    pending, conflicts = [], []
    for run in plan.runs:
        store = run.store(out)
        if not store.finished():
            pending.append(run)
            continue
        try:
            store.check_settings(run.settings(plan.quick, plan.steps))
        except RunDirError as exc:  # other settings, or an unreadable config.json
            conflicts.append(str(exc))
    if conflicts:
        raise ConfigMismatchError("\n".join(conflicts))
    return pending


@dataclass
class SuiteOutcome:
    trained: int = 0
    skipped: int = 0
    diverged: list[str] = field(default_factory=list)


def run_suite(
    plan: SuitePlan,
    out: str | os.PathLike[str],
    *,
    device: torch.device,
    data_dir: str | os.PathLike[str] | None = None,
    progress: bool = False,
    log: Log = print,
) -> SuiteOutcome:
    """Train every pending run of ``plan``, saving each when it finishes and rewriting the
    report after it."""
    pending = check_finished(plan, out)
    outcome = SuiteOutcome(skipped=len(plan.runs) - len(pending))
    if outcome.skipped:
        log(f"{outcome.skipped} of {len(plan.runs)} runs already finished: skipped")
    data_key, data = None, None
    for i, run in enumerate(pending, 1):
        if data_key != (run.seed, run.workload.name):  # the same data for every optimizer
            data_key, data = (run.seed, run.workload.name), run.workload.load(data_dir, device)
        history = _train_one(plan, run, out, device, data, progress, log, f"[{i}/{len(pending)}]")
        if history is None:
            outcome.skipped += 1
            continue
        outcome.trained += 1
        if any(row["diverged"] for row in history):
            outcome.diverged.append(run.name)
        write_report(out)
    if not pending:
        write_report(out)
    return outcome


def _train_one(
    plan: SuitePlan,
    run: PlannedRun,
    out: str | os.PathLike[str],
    device: torch.device,
    data: Any,
    progress: bool,
    log: Log,
    counter: str,
) -> list[dict[str, Any]] | None:
    """Train and save one run; its history, or None if another process finished it."""
    store = run.store(out)
    settings = run.settings(plan.quick, plan.steps)
    with store.lock():
        if store.finished():  # finished by another suite process since check_finished
            store.check_settings(settings)
            log(f"{counter} {run.name}: finished meanwhile by another process: skipped")
            return None
        store.clear()  # an unfinished run's leftovers: it restarts from step 0
        cfg = run.optimizer.config
        started = time.perf_counter()
        history = train_workload(
            run.workload,
            lambda params: build_optimizer(cfg, params, num_train=len(data.train)),
            seed=run.seed,
            quick=plan.quick,
            device=device,
            data=data,
            steps=plan.steps,
            progress=progress,
        )
        wall = time.perf_counter() - started
        store.save(settings, environment(device), history, wall)
    log(f"{counter} {run.name}: {_outcome_words(run.workload, history, plan.quick)} ({wall:.0f} s)")
    return history


def _outcome_words(workload: Workload, history: list[dict[str, Any]], quick: bool) -> str:
    metric = workload.metric
    final = history[-1]["metric"] if history else math.nan
    target = workload.quick_target if quick else workload.target
    reached = steps_to_target(history, target, metric.direction)
    where = f"reached at step {reached}" if reached is not None else "not reached"
    diverged = " DIVERGED" if history and history[-1]["diverged"] else ""
    return f"{metric.name} {final:.4g}{diverged} (target {target:.4g} {where})"
