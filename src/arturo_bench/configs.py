"""Experiment and optimizer configs: the paper's six experiments with the published hyperparameters.

Every value can be overridden from the command line with ``--set KEY=VALUE``:

- ``--set epochs=40`` or ``--set milestones=20,30`` change the experiment;
- ``--set arturo.lr=0.05`` or ``--set sgd.momentum=0.9`` change one optimizer.

``arturo`` is arTuRO with the published settings, in absolute units; ``arturo-relative`` is
the same optimizer in its unit-free (relative-units) mode, at the library's preset for it. A
name always means one mode: validation refuses an ``arturo`` config with relative units and
an ``arturo-relative`` one with absolute units, so results under one name stay comparable.

The published values are transcribed at full precision from the paper's code (docs/published.md
lists them, rounded). The code holds them, so an installed package needs no data files;
``arturo-bench show EXPERIMENT`` prints any of them.

Every value is validated when a config is resolved (:func:`validate_experiment`): a bad value
stops a run before it starts, with the field and its rule in the message.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

__all__ = [
    "ArturoConfig",
    "AdamConfig",
    "AdamWConfig",
    "SGDConfig",
    "IVONConfig",
    "ExperimentConfig",
    "EXPERIMENTS",
    "OPTIMIZERS",
    "ARTURO_UNITS",
    "QUICK",
    "arturo_defaults",
    "get_experiment",
    "apply_overrides",
    "scale_epochs",
    "validate_experiment",
    "with_defaults",
    "optimizer_fields_with_defaults",
    "to_dict",
]

DEFAULT_OPTIMIZERS = ("arturo", "adam", "adamw", "sgd")


# ----------------------------------------------------------------------------- optimizers
@dataclass(kw_only=True)
class ArturoConfig:
    """arTuRO; published names in brackets."""

    lr: float  # KL bound epsilon [kl_bound]; MultiStepLR scales it like a learning rate
    reg_weight: float  # entropy regularisation weight omega [reg_weight]
    units: str = "absolute"  # the published semantics; "relative" is Arturo's unit-free mode
    filter_measurement_noise: float  # Kalman-filter measurement noise r [measurement_noise]
    filter_process_noise: float  # filter process (dynamic-model) noise q [dynamic_model_noise]
    weight_decay: float  # kappa [weight_decay]
    prior_precision: float = 0.0015  # lambda_0 [prior_prec]
    init_variance: float = 0.01  # sigma_0^2 [var_init]
    precision_inertia: float = 1.3  # nu [nu]
    filter_init_cov: float = 5e-5  # p_0 [start_filter_cov]
    init_curvature: float = 0.1  # h_0; 0.1 in every published experiment
    outlier_threshold: float = 100.0  # skip a step whose gradient scale jumps this much (inf: off)
    newton_steps: int = 3  # Newton iterations of the dual solve per step (Arturo's default)
    foreach: bool | None = None  # multi-tensor path; None: the optimizer's own choice
    fused: bool | None = None  # compiled path; None: the optimizer's choice (CUDA yes, CPU no)
    gamma: float = 0.006  # MultiStepLR factor [multi_step_lr_gamma]; eta_tol is unused here

    # Fields the harness uses itself; every other field is an ``Arturo`` keyword argument.
    harness_fields: ClassVar[tuple[str, ...]] = ("gamma",)

    def optimizer_kwargs(self) -> dict[str, Any]:
        """The ``Arturo(...)`` keyword arguments: every field but the harness's own, so that
        a field added here reaches the optimizer without another line of code."""
        fields = dataclasses.asdict(self)
        return {k: v for k, v in fields.items() if k not in self.harness_fields}


@dataclass(kw_only=True)
class AdamConfig:
    """torch.optim.Adam."""

    lr: float  # learning rate
    beta1: float  # first-moment decay [beta_1]
    beta2: float  # second-moment decay [beta_2]
    weight_decay: float  # published value, kept for the record; see apply_weight_decay
    apply_weight_decay: bool = False  # the published harness never passed weight_decay to Adam
    gamma: float = 0.1  # MultiStepLR factor


@dataclass(kw_only=True)
class AdamWConfig:
    """torch.optim.AdamW (decoupled weight decay)."""

    lr: float  # learning rate
    beta1: float  # first-moment decay [beta_1]
    beta2: float  # second-moment decay [beta_2]
    weight_decay: float  # decoupled weight decay
    gamma: float = 0.1  # MultiStepLR factor


@dataclass(kw_only=True)
class SGDConfig:
    """torch.optim.SGD with heavy-ball momentum."""

    lr: float  # learning rate
    momentum: float  # heavy-ball momentum
    weight_decay: float  # L2 penalty added to the gradient (torch's coupled form)
    gamma: float = 0.1  # MultiStepLR factor


@dataclass(kw_only=True)
class IVONConfig:
    """IVON (PyPI ``ivon-opt``), an optional peer. Not tuned: the IVON authors' suggested
    starting point (lr 0.1, ess = training-set size, beta2 0.99999), their clip radius 1e-3,
    and one MC sample per step, so that it costs one forward/backward like the others."""

    lr: float = 0.1  # learning rate
    ess: float = 0.0  # effective sample size; 0 means "the training-set size"
    hess_init: float = 1.0  # initial Hessian estimate (library default)
    beta1: float = 0.9  # gradient momentum
    beta2: float = 0.99999  # Hessian momentum
    weight_decay: float = 1e-4  # prior precision (library default)
    mc_samples: int = 1  # weight samples per step (each costs a forward/backward)
    clip_radius: float = 1e-3  # elementwise clip of the update
    gamma: float = 0.1  # MultiStepLR factor


OptimizerConfig = ArturoConfig | AdamConfig | AdamWConfig | SGDConfig | IVONConfig
OPTIMIZERS: dict[str, type] = {
    "arturo": ArturoConfig,
    "arturo-relative": ArturoConfig,
    "adam": AdamConfig,
    "adamw": AdamWConfig,
    "sgd": SGDConfig,
    "ivon": IVONConfig,
}

# The units each arTuRO name means (ArturoConfig.units); validate_optimizer enforces them.
ARTURO_UNITS: dict[str, str] = {"arturo": "absolute", "arturo-relative": "relative"}


def arturo_defaults(units: str = "absolute") -> ArturoConfig:
    """An ArturoConfig holding ``Arturo``'s defaults in ``units`` for every field it passes:
    the hyperparameters of that mode's preset, the constructor's defaults for the rest, so
    that they cannot drift from the library."""
    from arturo import Arturo
    from arturo.optimizer import PRESETS

    params = inspect.signature(Arturo).parameters
    values: dict[str, Any] = {"units": units}
    for f in dataclasses.fields(ArturoConfig):
        if f.name in ArturoConfig.harness_fields or f.name in values:
            continue
        if f.name in PRESETS[units]:
            values[f.name] = PRESETS[units][f.name]
            continue
        param = params.get(f.name)
        if param is None or param.default is inspect.Parameter.empty:
            raise TypeError(f"ArturoConfig.{f.name} has no default in Arturo's signature")
        values[f.name] = param.default
    return ArturoConfig(**values)


# Optimizers without a published row in the experiments: `run` builds them on demand (from
# ``--optimizers`` or a ``--set NAME.KEY=VALUE``) at their own defaults.
UNPUBLISHED: dict[str, Callable[[], Any]] = {
    "arturo-relative": lambda: arturo_defaults("relative"),
    "ivon": IVONConfig,
}


# ----------------------------------------------------------------------------- experiments
@dataclass(kw_only=True)
class ExperimentConfig:
    """One paper experiment plus the optimizers it is run with."""

    name: str  # experiment name, also the first level of the run directory
    dataset: str  # fmnist | cifar10 | cifar100
    model: str  # cnn_f | cnn_c | resnet18 | resnet34 (see arturo_bench.models)
    epochs: int  # training epochs
    milestones: tuple[int, ...]  # MultiStepLR milestones (epochs), stepped once per epoch
    batch_size: int = 255  # training batch size (published: 255)
    test_batch_size: int = 255  # evaluation batch size (published: 255)
    drop_last: bool = False  # keep the last partial batch, like the published DataLoader
    train_subset: int = 0  # >0: train on this many examples (fixed subset); quick mode
    test_subset: int = 0  # >0: evaluate on this many test examples (fixed subset)
    stats_every: int = 10  # arturo: sample eta and kl every N steps (kept on the device)
    target_acc: float = 0.90  # "first epoch reaching" this test accuracy, for the summary
    # The calibration protocol (docs/uncertainty.md, "Harness"). 0 for both: off, as before.
    val_split: int = 0  # >0: hold out the last N training images; train on the rest
    eval_samples: int = 0  # K weight samples for the Bayesian model average (needs val_split)
    optimizers: dict[str, Any] = field(default_factory=dict)  # name -> optimizer config


def _arturo(lr: float, reg: float, r: float, q: float, wd: float) -> ArturoConfig:
    return ArturoConfig(
        lr=lr, reg_weight=reg, filter_measurement_noise=r, filter_process_noise=q, weight_decay=wd
    )


def _adam(lr: float, b1: float, b2: float, wd: float) -> AdamConfig:
    return AdamConfig(lr=lr, beta1=b1, beta2=b2, weight_decay=wd)


def _adamw(lr: float, b1: float, b2: float, wd: float) -> AdamWConfig:
    return AdamWConfig(lr=lr, beta1=b1, beta2=b2, weight_decay=wd)


def _sgd(lr: float, momentum: float, wd: float) -> SGDConfig:
    return SGDConfig(lr=lr, momentum=momentum, weight_decay=wd)


_ARTURO_FMNIST = (
    0.08567456308209788,
    0.05865661620286048,
    2.8167911612651997,
    0.017392958232048346,
    1.5403963328610538e-06,
)
_ARTURO_CIFAR_CNN = (
    0.0027874950489428373,
    0.29678595692807475,
    1.2197500060716369,
    0.0024552552650014426,
    0.0,
)
_ADAM_CIFAR_CNN = (
    0.001128815397451714,
    0.8511573305016629,
    0.9989395313299604,
    0.0010896508199628118,
)
_SGD_CIFAR_CNN = (0.01783363359054504, 0.9467621764163304, 0.0001632297890687358)


def _experiments() -> dict[str, ExperimentConfig]:
    fmnist = dict(dataset="fmnist", epochs=120, milestones=(60, 90))
    cifar = dict(epochs=160, milestones=(80, 120))
    return {
        "fmnist_cnn": ExperimentConfig(
            name="fmnist_cnn",
            model="cnn_f",
            **fmnist,
            optimizers={
                "arturo": _arturo(*_ARTURO_FMNIST),
                "adam": _adam(0.0010124381281468571, 0.9452561249176903, 0.9903417453021011, 0.0),
                "adamw": _adamw(
                    0.0010042022959335032,
                    0.9222472693342788,
                    0.9999446218805058,
                    0.00014236954411167154,
                ),
                "sgd": _sgd(0.07104941466307176, 0.8657299202128064, 0.0002247076258274683),
            },
        ),
        "fmnist_resnet18": ExperimentConfig(
            name="fmnist_resnet18",
            model="resnet18",
            **fmnist,
            optimizers={
                "arturo": _arturo(*_ARTURO_FMNIST),
                "adam": _adam(
                    0.0451147209563554,
                    0.9078947277729217,
                    0.9999988329626311,
                    1.6446860037361782e-06,
                ),
                "adamw": _adamw(
                    0.01874380569980047,
                    0.8627483006856222,
                    0.999998647239106,
                    3.9621663585780745e-05,
                ),
                "sgd": _sgd(0.13703143914683882, 0.8540867186466918, 0.0019628778027380735),
            },
        ),
        "cifar10_cnn": ExperimentConfig(
            name="cifar10_cnn",
            dataset="cifar10",
            model="cnn_c",
            **cifar,
            optimizers={
                "arturo": _arturo(*_ARTURO_CIFAR_CNN),
                "adam": _adam(*_ADAM_CIFAR_CNN),
                "adamw": _adamw(*_ADAM_CIFAR_CNN),
                "sgd": _sgd(*_SGD_CIFAR_CNN),
            },
        ),
        "cifar10_resnet34": ExperimentConfig(
            name="cifar10_resnet34",
            dataset="cifar10",
            model="resnet34",
            **cifar,
            optimizers={
                "arturo": _arturo(
                    0.007132920002311371,
                    1.5973544349997737,
                    9.328440015416716,
                    0.08938098738904834,
                    0.0007029104518730781,
                ),
                "adam": _adam(
                    0.006651718336327752,
                    0.8903129562149071,
                    0.9993867068533816,
                    0.0004466189480608125,
                ),
                "adamw": _adamw(
                    0.006651718336327752,
                    0.8903129562149071,
                    0.9993867068533816,
                    0.0004466189480608125,
                ),
                "sgd": _sgd(0.05647954851010358, 0.8664874765380984, 0.0016973382637335273),
            },
        ),
        "cifar100_cnn": ExperimentConfig(
            name="cifar100_cnn",
            dataset="cifar100",
            model="cnn_c",
            **cifar,
            optimizers={
                "arturo": _arturo(*_ARTURO_CIFAR_CNN),
                "adam": _adam(*_ADAM_CIFAR_CNN),
                "adamw": _adamw(*_ADAM_CIFAR_CNN),
                "sgd": _sgd(*_SGD_CIFAR_CNN),
            },
        ),
        "cifar100_resnet34": ExperimentConfig(
            name="cifar100_resnet34",
            dataset="cifar100",
            model="resnet34",
            **cifar,
            optimizers={
                "arturo": _arturo(
                    0.007233730017485263,
                    1.676769985136136,
                    4.822031633849579,
                    0.009778753916444217,
                    0.0,
                ),
                "adam": _adam(
                    0.0016122378636394955,
                    0.8645823617461754,
                    0.9999529451468949,
                    0.0019414937179368932,
                ),
                "adamw": _adamw(
                    0.001245107913473811,
                    0.8586426410012914,
                    0.9988019396111851,
                    0.0018037506582507632,
                ),
                "sgd": _sgd(0.06799373956698931, 0.8673695434076598, 0.0017998911061911822),
            },
        ),
    }


EXPERIMENTS: dict[str, ExperimentConfig] = _experiments()

# Quick mode: a fixed 10,200-image subset of Fashion-MNIST (40 batches of 255), 5,000 test
# images and 8 epochs (320 steps). The two decays come late (after epochs 6 and 7) rather than
# at the published fractions (4 and 6): with so few steps, an early decay stops learning
# before the optimizers differ. About 2 minutes for arturo, adam and sgd on a 2-core CPU.
QUICK: dict[str, Any] = {
    "experiment": "fmnist_cnn",
    "optimizers": ("arturo", "adam", "sgd"),
    "epochs": 8,
    "milestones": (6, 7),
    "train_subset": 10_200,
    "test_subset": 5_000,
}


def get_experiment(name: str) -> ExperimentConfig:
    """A fresh (deep-copied) config of a published experiment."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; choose one of {sorted(EXPERIMENTS)}")
    exp = EXPERIMENTS[name]
    return dataclasses.replace(
        exp, optimizers={k: dataclasses.replace(v) for k, v in exp.optimizers.items()}
    )


def scale_epochs(exp: ExperimentConfig, epochs: int) -> ExperimentConfig:
    """Shorten or lengthen the schedule, keeping milestones at the same fractions of training
    (120 epochs at 60/90 becomes 40 at 20/30, the shortened schedule in docs/published.md)."""
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    # At least 1: torch's MultiStepLR treats a milestone 0 as "decay before the first epoch".
    milestones = sorted({max(1, round(m * epochs / exp.epochs)) for m in exp.milestones})
    return dataclasses.replace(exp, epochs=epochs, milestones=tuple(milestones))


_NONE_WORDS = ("none", "null", "auto")


def _optional_inner(annotation: Any) -> Any | None:
    """``X`` for an ``X | None`` (or ``Optional[X]``) annotation, else None."""
    if typing.get_origin(annotation) not in (typing.Union, types.UnionType):
        return None
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if len(args) == 1 else None


def _coerce(text: str, annotation: Any, key: str) -> Any:
    """Parse a command-line string into the type a config field declares. For ``X | None``
    fields, "none", "null" and "auto" mean None (the optimizer's own choice)."""
    origin = typing.get_origin(annotation)
    inner = _optional_inner(annotation)
    try:
        if inner is not None:
            if text.strip().lower() in _NONE_WORDS:
                return None
            return _coerce(text, inner, key)
        if annotation is bool:
            lowered = text.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if annotation is int:
            return int(text)
        if annotation is float:
            return float(text)
        if annotation is str:
            return text
        if origin is tuple:
            (elem, _ellipsis) = typing.get_args(annotation)
            parts = [p for p in text.replace(" ", "").split(",") if p]
            return tuple(_coerce(p, elem, key) for p in parts)
    except ValueError:
        raise ValueError(f"--set {key}={text}: cannot parse {text!r} as {annotation}") from None
    raise ValueError(f"--set {key}: field type {annotation} cannot be set from the command line")


def _set_field(obj: Any, attr: str, text: str, key: str) -> Any:
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj) if f.name != "optimizers"]
    if attr not in names:
        raise ValueError(
            f"--set {key}: {type(obj).__name__} has no field {attr!r}; fields: {names}"
        )
    return dataclasses.replace(obj, **{attr: _coerce(text, hints[attr], key)})


def apply_overrides(exp: ExperimentConfig, overrides: list[str]) -> ExperimentConfig:
    """Apply ``KEY=VALUE`` strings: ``epochs=40``, ``milestones=20,30``, ``arturo.lr=0.05``.

    Keys of an unpublished optimizer (``ivon.*``, ``arturo-relative.*``) create its config on
    demand. The optimizer name is everything before the first dot (names may hold dashes)."""
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        if "." in key:
            opt_name, attr = key.split(".", 1)
            optimizers = dict(exp.optimizers)
            if opt_name not in optimizers:
                if opt_name not in UNPUBLISHED:
                    raise ValueError(
                        f"--set {key}: experiment {exp.name!r} has no optimizer {opt_name!r}; "
                        f"choose one of {sorted(optimizers)} or {' '.join(UNPUBLISHED)}"
                    )
                optimizers[opt_name] = UNPUBLISHED[opt_name]()
            optimizers[opt_name] = _set_field(optimizers[opt_name], attr, value, key)
            exp = dataclasses.replace(exp, optimizers=optimizers)
        else:
            exp = _set_field(exp, key, value, key)
    validate_experiment(exp)
    return exp


def optimizer_config(exp: ExperimentConfig, name: str) -> Any:
    """The config of one optimizer for this experiment (an unpublished optimizer's defaults
    if not set)."""
    if name in exp.optimizers:
        return exp.optimizers[name]
    if name in UNPUBLISHED:
        cfg = UNPUBLISHED[name]()
        validate_optimizer(name, cfg)
        return cfg
    raise ValueError(
        f"unknown optimizer {name!r} for {exp.name}; choose from {sorted(exp.optimizers)} or "
        + " ".join(UNPUBLISHED)
    )


# ----------------------------------------------------------------------------- validation
@dataclass(frozen=True)
class _Rule:
    """What a field's value must be, and how an error message says it."""

    text: str
    holds: Callable[[Any], bool]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    """A finite int or float (NaN and ±inf are not: they train to NaN or freeze training)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _in_range(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> _Rule:
    brackets = ("(" if lo_open else "[", ")" if hi_open else "]")
    return _Rule(
        f"a number in {brackets[0]}{lo:g}, {hi:g}{brackets[1]}",
        lambda v: (
            _is_real(v) and (lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi)
        ),
    )


_INT_AT_LEAST_1 = _Rule("an integer >= 1", lambda v: _is_int(v) and v >= 1)
_SUBSET_SIZE = _Rule("an integer >= 0 (0: all of it)", lambda v: _is_int(v) and v >= 0)
_NON_NEGATIVE = _Rule("a finite number >= 0", lambda v: _is_real(v) and v >= 0)
_POSITIVE = _Rule("a finite number > 0", lambda v: _is_real(v) and v > 0)
_BOOL = _Rule("true or false", lambda v: isinstance(v, bool))
_DECAY_FACTOR = _in_range(0, 1, lo_open=True)  # MultiStepLR gamma: <= 0 freezes training
_BETA = _in_range(0, 1, hi_open=True)
_NAME = _Rule(
    "letters, digits, '_', '-' or '.', not starting with '.' (it names a directory)",
    lambda v: isinstance(v, str) and re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*", v) is not None,
)
_MILESTONES = _Rule(
    "integers >= 1 (a decay after that many epochs; torch's MultiStepLR treats 0 as "
    '"before the first epoch")',
    lambda v: isinstance(v, tuple) and all(_is_int(m) and m >= 1 for m in v),
)


def _experiment_rules() -> dict[str, _Rule]:
    from .data import DATASETS  # imported here: configs stays free of torch until validation
    from .models import MODELS

    return {
        "name": _NAME,
        "dataset": _Rule(f"one of {sorted(DATASETS)}", lambda v: v in DATASETS),
        "model": _Rule(f"one of {sorted(MODELS)}", lambda v: v in MODELS),
        "epochs": _INT_AT_LEAST_1,
        "milestones": _MILESTONES,
        "batch_size": _INT_AT_LEAST_1,
        "test_batch_size": _INT_AT_LEAST_1,
        "drop_last": _BOOL,
        "train_subset": _SUBSET_SIZE,
        "test_subset": _SUBSET_SIZE,
        "stats_every": _INT_AT_LEAST_1,
        "target_acc": _in_range(0, 1),
        "val_split": _SUBSET_SIZE,
        "eval_samples": _Rule("an integer >= 0 (0: no model average)", _SUBSET_SIZE.holds),
    }


# Every field of every optimizer config has a rule here, except arturo's own hyperparameters:
# the Arturo constructor checks those (see _check_arturo), so its rules live in one place.
_OPTIMIZER_RULES: dict[type, dict[str, _Rule]] = {
    ArturoConfig: {"gamma": _DECAY_FACTOR},
    AdamConfig: {
        "lr": _NON_NEGATIVE,
        "beta1": _BETA,
        "beta2": _BETA,
        "weight_decay": _NON_NEGATIVE,
        "apply_weight_decay": _BOOL,
        "gamma": _DECAY_FACTOR,
    },
    AdamWConfig: {
        "lr": _NON_NEGATIVE,
        "beta1": _BETA,
        "beta2": _BETA,
        "weight_decay": _NON_NEGATIVE,
        "gamma": _DECAY_FACTOR,
    },
    SGDConfig: {
        "lr": _NON_NEGATIVE,
        "momentum": _BETA,  # heavy-ball momentum >= 1 diverges
        "weight_decay": _NON_NEGATIVE,
        "gamma": _DECAY_FACTOR,
    },
    IVONConfig: {  # IVON's own bounds, made strict about NaN and inf
        "lr": _NON_NEGATIVE,
        "ess": _Rule("a finite number >= 0 (0: the training-set size)", _NON_NEGATIVE.holds),
        "hess_init": _POSITIVE,
        "beta1": _in_range(0, 1),
        "beta2": _in_range(0, 1),
        "weight_decay": _NON_NEGATIVE,
        "mc_samples": _INT_AT_LEAST_1,
        "clip_radius": _Rule(
            "a number > 0 (inf: no clipping)", lambda v: v == math.inf or _is_real(v) and v > 0
        ),
        "gamma": _DECAY_FACTOR,
    },
}


def _check_fields(obj: Any, rules: dict[str, _Rule], prefix: str) -> None:
    for name, rule in rules.items():
        value = getattr(obj, name)
        if not rule.holds(value):
            shown = list(value) if isinstance(value, tuple) else value
            raise ValueError(f"{prefix}{name} must be {rule.text}, got {shown!r}")


def _check_arturo(cfg: ArturoConfig) -> None:
    """The Arturo constructor validates its own arguments (ValueError naming the argument):
    building one on a dummy parameter applies exactly the optimizer's rules."""
    import torch

    from arturo import Arturo

    try:
        Arturo([torch.zeros(1, requires_grad=True)], **cfg.optimizer_kwargs())
    except ValueError as exc:
        raise ValueError(f"arturo: {exc}") from None


def validate_experiment(exp: ExperimentConfig) -> None:
    """Raise ValueError, naming the field and its rule, unless every value of ``exp`` and of
    its optimizers is usable: a bad value must stop a run before it starts, not after an
    epoch, and never train to NaN with a zero exit status."""
    _check_fields(exp, _experiment_rules(), "")
    if exp.eval_samples and not exp.val_split:
        # The model average is part of the calibration protocol, which needs its split.
        raise ValueError(
            f"eval_samples={exp.eval_samples} needs val_split > 0 (the validation split that "
            "temperatures are fitted on); --eval-samples sets both"
        )
    for name, cfg in exp.optimizers.items():
        validate_optimizer(name, cfg)


def validate_optimizer(name: str, cfg: Any) -> None:
    """Raise ValueError unless ``cfg`` is a valid config of the optimizer ``name``."""
    expected = OPTIMIZERS.get(name)
    if expected is None:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {sorted(OPTIMIZERS)}")
    if type(cfg) is not expected:
        raise ValueError(f"optimizer {name!r} needs a {expected.__name__}, got {cfg!r}")
    _check_fields(cfg, _OPTIMIZER_RULES[expected], f"{name}.")
    if isinstance(cfg, ArturoConfig):
        _check_arturo_units(name, cfg)
        _check_arturo(cfg)


def _check_arturo_units(name: str, cfg: ArturoConfig) -> None:
    """One name, one mode: results filed under ``arturo`` (the published, absolute settings)
    must never silently be relative-units runs, nor the reverse."""
    units = ARTURO_UNITS[name]
    if cfg.units == units:
        return
    name_for = {u: n for n, u in ARTURO_UNITS.items()}
    hint = f"; use the name {name_for[cfg.units]!r} for that mode" if cfg.units in name_for else ""
    raise ValueError(f"{name}.units must be {units!r}, got {cfg.units!r}{hint}")


def with_defaults(saved: dict[str, Any]) -> dict[str, Any]:
    """A run config saved by an older harness (config.json, a checkpoint), completed with the
    fields added since, at their defaults. The rule that makes this right: a field added to a
    config must default to what the harness did before it existed, so that old runs resume,
    and are grouped in reports, as before."""
    completed = _fill_defaults(saved, ExperimentConfig)
    if isinstance(saved.get("optimizer_config"), dict):
        name = saved.get("optimizer", "")
        completed["optimizer_config"] = optimizer_fields_with_defaults(
            name, saved["optimizer_config"]
        )
    return completed


def optimizer_fields_with_defaults(name: str, saved: dict[str, Any]) -> dict[str, Any]:
    """The fields of optimizer ``name``'s config as an older harness saved them, completed
    with the fields added since (:func:`with_defaults`'s rule). An arTuRO config takes the
    units its name means: "absolute" for ``arturo``, as every run made before ``units``
    existed was. An unknown name is returned as saved."""
    optimizer = OPTIMIZERS.get(name)
    if optimizer is None:
        return dict(saved)
    filled = dict(saved)
    if name in ARTURO_UNITS:
        filled.setdefault("units", ARTURO_UNITS[name])
    return _fill_defaults(filled, optimizer)


def _fill_defaults(saved: dict[str, Any], cls: type) -> dict[str, Any]:
    filled = dict(saved)
    for f in dataclasses.fields(cls):
        if f.name not in filled and f.default is not dataclasses.MISSING:
            filled[f.name] = list(f.default) if isinstance(f.default, tuple) else f.default
    return filled


def to_dict(obj: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass (tuples become lists)."""
    return dataclasses.asdict(obj)
