"""The transfer suite's optimizers and their settings, declared in one place.

- ``arturo``: ``arturo.Arturo``'s defaults in absolute units (the published settings), read
  from the library's presets and signature so that they cannot drift from it
  (``configs.arturo_defaults``);
- ``arturo-relative``: the same in relative units (the unit-free mode), from the library's
  preset for that mode; ``lr`` there is a KL budget per coordinate;
- ``adamw``: torch's defaults (lr 1e-3, betas 0.9/0.999, weight_decay 1e-2): the settings
  every workload's ``target`` was measured with, so they score 1 on the normalised scale;
- ``adam``: torch's defaults (lr 1e-3, betas 0.9/0.999, no weight decay);
- ``sgd``: lr 1e-2, heavy-ball momentum 0.9, no weight decay (torch has no SGD default lr);
- ``ivon``: ``IVONConfig``'s defaults (optional package).

Each workload's warmup-cosine schedule scales every optimizer's lr alike; the configs'
``gamma`` (``run``'s MultiStepLR factor) plays no part here.

``NAME:tuned`` takes, per workload, the config of the best trial of the Optuna study
``WORKLOAD-NAME`` (``WORKLOAD-NAME-quick`` for the quick budget; ``arturo_bench.tune``'s
``study_name``) in ``--storage``, as ``arturo-bench tune`` wrote it: these suite defaults with
the trial's parameters. ``NAME:tuned-quick`` reads the quick-budget study at any budget, so a
full-budget suite can use the default tuning campaign (20 trials at the quick budget).
``--set NAME.KEY=VALUE`` (``NAME:tuned.KEY=VALUE`` for the tuned one) overrides a field, with
``run``'s parsing and validation."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from ..configs import (
    OPTIMIZERS,
    AdamConfig,
    AdamWConfig,
    IVONConfig,
    SGDConfig,
    _set_field,
    arturo_defaults,
    optimizer_fields_with_defaults,
    to_dict,
    validate_optimizer,
)
from ..optimizers import OptionalDependencyError

__all__ = [
    "DEFAULT_OPTIMIZERS",
    "QUICK_OPTIMIZERS",
    "SUITE_DEFAULTS",
    "OptimizerSpec",
    "ResolvedOptimizer",
    "TunedSettingsUnavailable",
    "UNSUPPORTED",
    "arturo_defaults",
    "parse_optimizer",
    "parse_overrides",
    "resolve_optimizer",
    "hyperparameters",
    "recorded_hyperparameters",
]

DEFAULT_OPTIMIZERS = ("arturo", "adamw", "sgd")
QUICK_OPTIMIZERS = ("arturo", "adamw")  # the quick suite must fit in 10 minutes on 2 cores
TUNED = "tuned"
TUNED_QUICK = "tuned-quick"  # settings tuned at the quick budget, used at any budget

# Fields that belong to ``run``'s MultiStepLR, not to the optimizer; the suite ignores them.
_NOT_HYPERPARAMETERS = ("gamma",)

# Optimizers the suite cannot train yet, and why.
UNSUPPORTED = {
    "ivon": "IVON takes its training steps at sampled weights (optimizer.sampled_params), "
    "which the workloads' training loop (train_workload) does not do yet",
}


# One factory per optimizer: a fresh config each time, since the dataclasses are mutable.
SUITE_DEFAULTS: dict[str, Callable[[], Any]] = {
    "arturo": lambda: arturo_defaults("absolute"),
    "arturo-relative": lambda: arturo_defaults("relative"),
    "adamw": lambda: AdamWConfig(lr=1e-3, beta1=0.9, beta2=0.999, weight_decay=1e-2),
    "adam": lambda: AdamConfig(lr=1e-3, beta1=0.9, beta2=0.999, weight_decay=0.0),
    "sgd": lambda: SGDConfig(lr=1e-2, momentum=0.9, weight_decay=0.0),
    "ivon": IVONConfig,
}


class TunedSettingsUnavailable(ValueError):
    """``NAME:tuned`` was asked for, but no tuned settings can be read."""


@dataclass(frozen=True)
class OptimizerSpec:
    """An optimizer as the suite names it: ``adamw`` (suite defaults) or ``adamw:tuned``."""

    name: str  # a key of configs.OPTIMIZERS
    tuned: bool = False
    tuned_quick: bool = False  # tuned at the quick budget (``NAME:tuned-quick``)

    @property
    def variant(self) -> str | None:
        return TUNED_QUICK if self.tuned_quick else TUNED if self.tuned else None

    @property
    def label(self) -> str:
        """The name in tables, ``--optimizers`` and ``--set`` keys."""
        return f"{self.name}:{self.variant}" if self.variant else self.name

    @property
    def dirname(self) -> str:
        """The run directory level (no ':' in paths)."""
        return f"{self.name}-{self.variant}" if self.variant else self.name


def parse_optimizer(text: str) -> OptimizerSpec:
    """``adamw`` -> defaults, ``adamw:tuned`` -> tuned; anything else is a ValueError."""
    name, sep, variant = text.strip().partition(":")
    if name not in OPTIMIZERS:
        raise ValueError(
            f"unknown optimizer {text!r}; choose one of {sorted(OPTIMIZERS)}, "
            f"optionally as NAME:{TUNED}"
        )
    if sep and variant not in (TUNED, TUNED_QUICK):
        raise ValueError(
            f"optimizer {text!r}: the variants are {name}:{TUNED} (tuned at the suite's budget) "
            f"and {name}:{TUNED_QUICK} (tuned at the quick budget)"
        )
    if name in UNSUPPORTED:
        raise ValueError(f"the transfer suite cannot train {name} yet: {UNSUPPORTED[name]}")
    return OptimizerSpec(name, tuned=bool(sep), tuned_quick=variant == TUNED_QUICK)


def parse_overrides(
    items: Iterable[str], specs: Iterable[OptimizerSpec]
) -> dict[str, list[tuple[str, str, str]]]:
    """``--set LABEL.KEY=VALUE`` strings grouped by label, as (key, value text, item) each.
    Every label must be one of ``specs``, and ``gamma`` is refused (it does nothing here)."""
    labels = {s.label for s in specs}
    grouped: dict[str, list[tuple[str, str, str]]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        label, dot, attr = key.strip().partition(".")
        if not sep or not dot or not attr:
            raise ValueError(f"--set expects OPTIMIZER.KEY=VALUE, got {item!r}")
        if label not in labels:
            raise ValueError(f"--set {key}: {label!r} is not among --optimizers {sorted(labels)}")
        if attr in _NOT_HYPERPARAMETERS:
            raise ValueError(
                f"--set {key}: {attr} is the MultiStepLR factor of `arturo-bench run`; every "
                "suite workload has its own warmup-cosine schedule"
            )
        grouped.setdefault(label, []).append((attr, value, key.strip()))
    return grouped


def _tuned_config(storage: str | None, workload: str, optimizer: str, quick: bool) -> tuple:
    """(config, study name) of the best trial of ``arturo-bench tune``'s study: the tune
    module's base config with the trial's parameters, i.e. the config the trial trained."""
    if not storage:
        raise TunedSettingsUnavailable(
            f"{optimizer}:{TUNED} needs --storage sqlite:///PATH (the `arturo-bench tune` study)"
        )
    try:
        from ..tune import best_config, best_params, study_name
    except OptionalDependencyError:
        raise  # the tune module is there, Optuna is not; its message says what to install
    except ImportError as exc:
        if exc.name != "arturo_bench.tune":
            raise OptionalDependencyError(f"tuned settings need {exc.name}") from exc
        raise TunedSettingsUnavailable(
            "tuned settings need arturo_bench.tune (`arturo-bench tune`), which this version lacks"
        ) from None
    config = best_config(optimizer, best_params(storage, workload, optimizer, quick))
    return config, study_name(workload, optimizer, quick)


@dataclass(frozen=True)
class ResolvedOptimizer:
    """One optimizer's settings on one workload, ready to build and to record."""

    spec: OptimizerSpec
    config: Any  # a configs.OPTIMIZERS dataclass
    tuned_from: dict[str, str] | None = None  # storage and study of tuned settings


def resolve_optimizer(
    spec: OptimizerSpec,
    workload: str,
    *,
    quick: bool,
    overrides: Iterable[tuple[str, str, str]] = (),
    storage: str | None = None,
) -> ResolvedOptimizer:
    """The suite defaults (or, for ``:tuned``, the best trial's config), then ``--set``
    overrides; validated with ``run``'s rules. Raises ValueError naming the field."""
    tuned_from = None
    if spec.tuned:
        cfg, study = _tuned_config(storage, workload, spec.name, quick or spec.tuned_quick)
        tuned_from = {"storage": str(storage), "study": study}
    else:
        cfg = SUITE_DEFAULTS[spec.name]()
    for attr, value, key in overrides:
        cfg = _set_field(cfg, attr, value, key)
    validate_optimizer(spec.name, cfg)
    return ResolvedOptimizer(spec, cfg, tuned_from)


def hyperparameters(cfg: Any) -> dict[str, Any]:
    """What a run records of its optimizer: every config field but the ones the suite ignores."""
    return {k: v for k, v in to_dict(cfg).items() if k not in _NOT_HYPERPARAMETERS}


def recorded_hyperparameters(optimizer_class: str, saved: dict[str, Any]) -> dict[str, Any]:
    """A finished run's recorded ``hyperparameters``, completed with the config fields added
    since it was written, at their defaults, so that a re-run compares like with like (an
    ``arturo`` run recorded before ``units`` existed was in absolute units)."""
    filled = optimizer_fields_with_defaults(optimizer_class, saved)
    return {k: v for k, v in filled.items() if k not in _NOT_HYPERPARAMETERS or k in saved}
