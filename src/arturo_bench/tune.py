"""``arturo-bench tune``: Optuna searches of an optimizer's hyperparameters on the workloads.

A study searches one optimizer's space (``search_spaces.yaml``) on one workload, or on several
at once (``--tune-across``: one configuration, best on the mean normalised score). Studies
live in an Optuna RDB storage (SQLite), named after what they tune (:func:`study_name`,
:func:`across_study_name`), so that a re-run resumes them and other commands read their best
configuration (:func:`best_params`, :func:`best_params_across`). docs/tuning.md gives the
protocol and the reasons for the spaces."""

from __future__ import annotations

import dataclasses
import json
import math
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from .optimizers import OptionalDependencyError

try:
    import optuna
    import yaml
    from optuna.trial import FrozenTrial, TrialState
except ImportError as exc:  # pragma: no cover - both ship with the bench extra
    raise OptionalDependencyError(
        "arturo-bench tune needs Optuna and PyYAML: pip install -c constraints.txt -e '.[bench]'"
    ) from exc

import numpy as np
import torch

from . import configs
from .optimizers import build_optimizer
from .workloads import Workload, WorkloadData, get_workload, normalized_score, train_workload

__all__ = [
    "Dimension",
    "TuneJob",
    "NotTunedError",
    "SCORE_FLOOR",
    "DEFAULT_TRIALS",
    "load_search_spaces",
    "base_config",
    "study_name",
    "across_study_name",
    "open_storage",
    "tune",
    "finished_trials",
    "best_params",
    "best_params_across",
    "best_config",
    "report",
    "clipped_score",
    "default_report_dir",
    "run_command",
]

DEFAULT_TRIALS = 20
# A diverged workload scores this in a --tune-across mean, and no workload scores lower: one
# trivial-to-AdamW gap below the trivial predictor, so a blow-up ranks below a config that
# merely fails to learn, yet one RMSE of 1e6 cannot swamp the other workloads' scores.
SCORE_FLOOR = -1.0
HEARTBEAT_S = 60  # a trial without a heartbeat for twice this long is marked failed
_FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


class NotTunedError(ValueError):
    """No such study in the storage, or it has no completed trial yet."""


# ----------------------------------------------------------------------------- search spaces
@dataclass(frozen=True)
class Dimension:
    """One searched hyperparameter: an Optuna float parameter and the config field it sets."""

    name: str  # the Optuna parameter name (shown in plots)
    low: float
    high: float
    log: bool = False
    field: str = ""  # the optimizer-config field; "" means ``name``
    transform: str | None = None  # "one_minus": field = 1 - sampled value

    def suggest(self, trial: optuna.Trial) -> float:
        return trial.suggest_float(self.name, self.low, self.high, log=self.log)

    def field_value(self, sampled: float) -> float:
        return 1.0 - sampled if self.transform == "one_minus" else sampled

    @property
    def target(self) -> str:
        return self.field or self.name


_DIMENSION_KEYS = {"low", "high", "log", "field", "transform"}


def _dimension(optimizer: str, name: str, spec: Any) -> Dimension:
    where = f"search space {optimizer}.{name}"
    if not isinstance(spec, dict) or not {"low", "high"} <= set(spec) <= _DIMENSION_KEYS:
        raise ValueError(f"{where}: needs low and high, may have {sorted(_DIMENSION_KEYS)}")
    dim = Dimension(
        name=name,
        low=float(spec["low"]),  # float(): YAML 1.1 reads 1e-5 (no decimal point) as a string
        high=float(spec["high"]),
        log=bool(spec.get("log", False)),
        field=str(spec.get("field", "")),
        transform=spec.get("transform"),
    )
    if not dim.low < dim.high or (dim.log and dim.low <= 0):
        raise ValueError(f"{where}: needs low < high (and low > 0 on a log scale)")
    if dim.transform not in (None, "one_minus"):
        raise ValueError(f"{where}: transform must be one_minus, got {dim.transform!r}")
    fields = {f.name for f in dataclasses.fields(configs.OPTIMIZERS[optimizer])}
    if dim.target not in fields:
        raise ValueError(f"{where}: {dim.target!r} is not a field of {optimizer}'s config")
    return dim


def load_search_spaces(path: str | Path | None = None) -> dict[str, tuple[Dimension, ...]]:
    """The search spaces by optimizer name: the packaged ``search_spaces.yaml``, or ``path``."""
    if path is None:
        text = resources.files("arturo_bench").joinpath("search_spaces.yaml").read_text()
    else:
        text = Path(path).read_text()
    raw = yaml.safe_load(text)
    if not isinstance(raw, dict):
        raise ValueError("a search-space file maps optimizer names to their dimensions")
    spaces = {}
    for optimizer, dims in raw.items():
        if optimizer not in configs.OPTIMIZERS:
            raise ValueError(f"search space for unknown optimizer {optimizer!r}")
        if not isinstance(dims, dict) or not dims:
            raise ValueError(f"search space {optimizer}: needs at least one dimension")
        spaces[optimizer] = tuple(_dimension(optimizer, n, s) for n, s in dims.items())
    return spaces


def _space_record(space: Sequence[Dimension]) -> dict[str, dict[str, Any]]:
    return {d.name: dataclasses.asdict(d) for d in space}


def _space_from_record(record: dict[str, dict[str, Any]]) -> tuple[Dimension, ...]:
    return tuple(Dimension(**spec) for spec in record.values())


# ----------------------------------------------------------------------------- configs
def base_config(optimizer: str, overrides: Iterable[str] = ()) -> Any:
    """The config a search starts from: the transfer suite's untuned settings
    (``suite.settings.SUITE_DEFAULTS``: torch's defaults, the Arturo constructor's), then
    ``KEY=VALUE`` overrides, where KEY is a field name, optionally prefixed by ``optimizer.``."""
    if optimizer not in configs.OPTIMIZERS:
        raise ValueError(
            f"unknown optimizer {optimizer!r}; choose one of {sorted(configs.OPTIMIZERS)}"
        )
    from .suite.settings import SUITE_DEFAULTS  # the suite's untuned settings, one place

    cfg: Any = SUITE_DEFAULTS[optimizer]()
    for item in overrides:
        key, sep, value = item.partition("=")
        attr = key.strip().removeprefix(f"{optimizer}.")
        if not sep or not attr:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        cfg = configs._set_field(cfg, attr, value, key.strip())
    configs.validate_optimizer(optimizer, cfg)
    return cfg


def _apply(cfg: Any, space: Sequence[Dimension], params: dict[str, float]) -> Any:
    """``cfg`` with the sampled ``params`` (Optuna names) written to their fields."""
    return dataclasses.replace(cfg, **{d.target: d.field_value(params[d.name]) for d in space})


# ----------------------------------------------------------------------------- studies
def study_name(workload: str, optimizer: str, quick: bool) -> str:
    return f"{workload}-{optimizer}" + ("-quick" if quick else "")


def across_study_name(workloads: Iterable[str], optimizer: str, quick: bool) -> str:
    return "across-" + "+".join(sorted(workloads)) + f"-{optimizer}" + ("-quick" if quick else "")


@dataclass(frozen=True)
class TuneJob:
    """What a study tunes; everything that changes its objective is part of its identity."""

    workloads: tuple[str, ...]
    optimizer: str
    across: bool = False
    quick: bool = False
    seed: int = 0
    steps: int | None = None  # overrides each workload's step budget (tests, smoke runs)
    overrides: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.workloads or (not self.across and len(self.workloads) != 1):
            raise ValueError("tune one WORKLOAD, or several with --tune-across")
        for name in self.workloads:
            get_workload(name)  # an unknown name fails here, naming the choices
        if self.across:  # sorted: the name and the order of training do not depend on argv
            object.__setattr__(self, "workloads", tuple(sorted(set(self.workloads))))

    @property
    def name(self) -> str:
        if self.across:
            return across_study_name(self.workloads, self.optimizer, self.quick)
        return study_name(self.workloads[0], self.optimizer, self.quick)

    @property
    def direction(self) -> str:
        if self.across:
            return "maximize"
        metric = get_workload(self.workloads[0]).metric
        return "maximize" if metric.direction == "max" else "minimize"


def open_storage(url: str, heartbeat_s: int = HEARTBEAT_S) -> optuna.storages.RDBStorage:
    """An RDB storage whose running trials send heartbeats: a trial whose process was killed
    is marked failed (and not counted) when a later trial starts, once it has been silent for
    two heartbeat intervals. A SQLite file's directory is created."""
    database = _sqlite_path(url)
    if database is not None:
        database.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(url, heartbeat_interval=heartbeat_s)


def _sqlite_path(url: str) -> Path | None:
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


def _identity(job: TuneJob, cfg: Any, space: Sequence[Dimension]) -> dict[str, Any]:
    overridden = {attr: getattr(cfg, attr) for attr in _override_fields(job)}
    record = {
        "workloads": list(job.workloads),
        "across": job.across,
        "optimizer": job.optimizer,
        "quick": job.quick,
        "seed": job.seed,
        "steps": job.steps,
        "overrides": overridden,
        "space": _space_record(space),
    }
    return json.loads(json.dumps(record))  # as it reads back from the storage


def _override_fields(job: TuneJob) -> list[str]:
    return [i.partition("=")[0].strip().removeprefix(f"{job.optimizer}.") for i in job.overrides]


def _open_study(
    job: TuneJob, storage: optuna.storages.BaseStorage, identity: dict[str, Any]
) -> optuna.Study:
    study = optuna.create_study(
        study_name=job.name, storage=storage, direction=job.direction, load_if_exists=True
    )
    stored = study.user_attrs.get("identity")
    if stored is None and not study.trials:
        study.set_user_attr("identity", identity)
    elif stored != identity:
        raise ValueError(_mismatch(job.name, stored, identity))
    return study


def _mismatch(name: str, stored: dict[str, Any] | None, new: dict[str, Any]) -> str:
    if stored is None:
        return f"study {name!r} exists but was not made by arturo-bench tune"
    keys = [k for k in new if stored.get(k) != new[k]]
    shown = "; ".join(f"{k}: study has {stored.get(k)!r}, this command {new[k]!r}" for k in keys)
    return (
        f"study {name!r} was run with other settings ({shown}); resume it with the same "
        "flags, or use another --storage"
    )


def _sampler(seed: int, trials_so_far: int) -> optuna.samplers.TPESampler:
    """A TPE sampler seeded by ``seed`` and the study's length: the same trial sequence gives
    the same proposals, and a resumed session does not replay the first one's random draws."""
    mixed = int(np.random.SeedSequence([seed, trials_so_far]).generate_state(1)[0])
    return optuna.samplers.TPESampler(seed=mixed)


def _pruner(job: TuneJob) -> optuna.pruners.BasePruner:
    if job.across:
        # Between workloads: stop a trial whose running mean score is in the bottom quarter
        # (Optuna's percentile is the share of trials kept: 75 keeps the top three quarters).
        return optuna.pruners.PercentilePruner(75.0, n_startup_trials=5)
    steps, _ = get_workload(job.workloads[0]).budget(job.quick)
    # No pruning in the first quarter of training: warmup and the largest learning rates make
    # early metrics poor predictors of the final one.
    return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=(job.steps or steps) // 4)


def finished_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The trials that count toward ``--trials``: complete or pruned."""
    return study.get_trials(deepcopy=False, states=_FINISHED)


# ----------------------------------------------------------------------------- objectives
@dataclass
class _Context:
    job: TuneJob
    config: Any  # the base config; each trial replaces the searched fields
    space: tuple[Dimension, ...]
    data: dict[str, WorkloadData]
    device: torch.device
    progress: bool


def _train(
    ctx: _Context, name: str, cfg: Any, on_eval: Callable[[dict], bool] | None = None
) -> list[dict[str, Any]]:
    data = ctx.data[name]

    def make(params: Iterable[torch.Tensor]) -> torch.optim.Optimizer:
        return build_optimizer(cfg, params, num_train=len(data.train))

    return train_workload(
        get_workload(name),
        make,
        seed=ctx.job.seed,
        quick=ctx.job.quick,
        device=ctx.device,
        data=data,
        steps=ctx.job.steps,
        on_eval=on_eval,
        progress=ctx.progress,
    )


def _trial_config(trial: optuna.Trial, ctx: _Context) -> Any:
    cfg = _apply(ctx.config, ctx.space, {d.name: d.suggest(trial) for d in ctx.space})
    configs.validate_optimizer(ctx.job.optimizer, cfg)
    trial.set_user_attr("config", configs.to_dict(cfg))
    return cfg


def _single_objective(trial: optuna.Trial, ctx: _Context) -> float:
    cfg = _trial_config(trial, ctx)
    pruned_at: list[int] = []

    def on_eval(row: dict[str, Any]) -> bool:
        if row["diverged"]:
            return False  # training stops on its own; the trial is pruned below
        trial.report(row["metric"], row["step"])
        if trial.should_prune():
            pruned_at.append(row["step"])
        return bool(pruned_at)

    started = time.perf_counter()
    rows = _train(ctx, ctx.job.workloads[0], cfg, on_eval)
    trial.set_user_attr("history", rows)
    trial.set_user_attr("wall_time_s", time.perf_counter() - started)
    last = rows[-1]
    if last["diverged"]:
        _prune(trial, f"diverged at step {last['step']}")
    if pruned_at:
        _prune(trial, f"by the pruner at step {pruned_at[0]}")
    return float(last["metric"])


def _prune(trial: optuna.Trial, reason: str) -> None:
    trial.set_user_attr("pruned", reason)  # for the per-trial line and the record
    raise optuna.TrialPruned(reason)


def clipped_score(workload: Workload, metric: float, quick: bool) -> float:
    """A workload's normalised score in a --tune-across mean: NaN (diverged) and anything
    below ``SCORE_FLOOR`` count as ``SCORE_FLOOR``."""
    score = normalized_score(workload, metric, quick=quick)
    return SCORE_FLOOR if math.isnan(score) else max(SCORE_FLOOR, score)


def _across_objective(trial: optuna.Trial, ctx: _Context) -> float:
    cfg = _trial_config(trial, ctx)
    histories: dict[str, list[dict[str, Any]]] = {}
    scores: dict[str, float] = {}
    started = time.perf_counter()
    for k, name in enumerate(ctx.job.workloads):
        histories[name] = _train(ctx, name, cfg)
        final = histories[name][-1]["metric"]
        scores[name] = clipped_score(get_workload(name), final, ctx.job.quick)
        trial.set_user_attr("histories", histories)
        trial.set_user_attr("scores", scores)
        trial.set_user_attr("wall_time_s", time.perf_counter() - started)
        if k < len(ctx.job.workloads) - 1:
            trial.report(float(np.mean(list(scores.values()))), k)
            if trial.should_prune():
                _prune(trial, f"mean score {np.mean(list(scores.values())):.3g} after {name}")
    return float(np.mean(list(scores.values())))


# ----------------------------------------------------------------------------- running
def tune(
    job: TuneJob,
    storage: str | optuna.storages.BaseStorage,
    trials: int = DEFAULT_TRIALS,
    *,
    device: torch.device | str = "cpu",
    data_dir: str | Path | None = None,
    spaces: dict[str, tuple[Dimension, ...]] | None = None,
    progress: bool = False,
    callbacks: Sequence[Callable[[optuna.Study, FrozenTrial], None]] = (),
) -> optuna.Study:
    """Add ``trials`` finished (complete or pruned) trials to ``job``'s study, creating it if
    needed. A KeyboardInterrupt marks the running trial failed and propagates; failed trials
    do not count. Returns the study."""
    if trials < 1:
        raise ValueError(f"--trials must be >= 1, got {trials}")
    spaces = load_search_spaces() if spaces is None else spaces
    if job.optimizer not in spaces:
        raise ValueError(f"no search space for {job.optimizer!r}; choose one of {sorted(spaces)}")
    space = spaces[job.optimizer]
    cfg = base_config(job.optimizer, job.overrides)
    searched = {d.target for d in space} & set(_override_fields(job))
    if searched:
        raise ValueError(f"--set {', '.join(sorted(searched))}: searched by tune, cannot be set")
    if isinstance(storage, str):
        storage = open_storage(storage)
    study = _open_study(job, storage, _identity(job, cfg, space))
    study.sampler = _sampler(job.seed, len(study.trials))
    study.pruner = _pruner(job)
    device = torch.device(device)
    data = {name: get_workload(name).load(data_dir, device) for name in job.workloads}
    ctx = _Context(job, cfg, space, data, device, progress)
    objective = _across_objective if job.across else _single_objective
    stop = optuna.study.MaxTrialsCallback(len(finished_trials(study)) + trials, states=_FINISHED)
    study.optimize(lambda trial: objective(trial, ctx), callbacks=[*callbacks, stop])
    return study


# ----------------------------------------------------------------------------- reading studies
def _load(storage: str | optuna.storages.BaseStorage, name: str) -> optuna.Study:
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        names = optuna.get_all_study_names(storage)
        raise NotTunedError(f"no study {name!r} in the storage; it holds {names}") from None


def _best_params_of(study: optuna.Study) -> dict[str, Any]:
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        raise NotTunedError(f"study {study.study_name!r} has no completed trial yet")
    identity = study.user_attrs.get("identity")
    if identity is None:
        raise NotTunedError(f"study {study.study_name!r} was not made by arturo-bench tune")
    space = _space_from_record(identity["space"])
    best = study.best_trial.params
    params = dict(identity["overrides"])
    params.update({d.target: d.field_value(best[d.name]) for d in space})
    return params


def best_params(
    storage: str | optuna.storages.BaseStorage, workload_name: str, optimizer_name: str, quick: bool
) -> dict[str, Any]:
    """The best completed trial's hyperparameters by config field name (the searched fields
    and the study's ``--set`` overrides): ``dataclasses.replace(base_config(optimizer_name),
    **best_params(...))`` is the config it trained with. Raises NotTunedError without one."""
    return _best_params_of(_load(storage, study_name(workload_name, optimizer_name, quick)))


def best_params_across(
    storage: str | optuna.storages.BaseStorage,
    workload_names: Iterable[str],
    optimizer_name: str,
    quick: bool,
) -> dict[str, Any]:
    """Like :func:`best_params`, for the ``--tune-across`` study of these workloads."""
    name = across_study_name(workload_names, optimizer_name, quick)
    return _best_params_of(_load(storage, name))


def best_config(optimizer_name: str, params: dict[str, Any]) -> Any:
    """The optimizer config of ``best_params``'s result: the base config with ``params``."""
    cfg = dataclasses.replace(base_config(optimizer_name), **params)
    configs.validate_optimizer(optimizer_name, cfg)
    return cfg


def report(
    storage: str | optuna.storages.BaseStorage, name: str, out: str | Path, top: int = 5
) -> tuple[str, list[Path]]:
    """A text summary of study ``name`` (state counts, the ``top`` best trials) and its
    optimisation-history and parameter-importance plots as PNGs in ``out``."""
    study = _load(storage, name)
    lines = [_state_line(study), *_best_lines(study, top)]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pngs, notes = _plots(study, out)
    return "\n".join(lines + notes), pngs


def _state_line(study: optuna.Study) -> str:
    counts = {s: 0 for s in TrialState}
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state] += 1
    shown = ", ".join(f"{n} {s.name.lower()}" for s, n in counts.items() if n)
    direction = study.direction.name.lower()
    return f"study {study.study_name} ({direction}): {len(study.trials)} trials ({shown})"


def _best_lines(study: optuna.Study, top: int) -> list[str]:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return ["no completed trial yet"]
    reverse = study.direction == optuna.study.StudyDirection.MAXIMIZE
    best = sorted(complete, key=lambda t: t.value, reverse=reverse)[:top]
    lines = [f"best {len(best)} of {len(complete)} completed trials:"]
    for t in best:
        params = " ".join(f"{k}={v:.4g}" for k, v in t.params.items())
        wall = t.user_attrs.get("wall_time_s", math.nan)
        lines.append(f"  trial {t.number:>4}  value {t.value:.6g}  {wall:7.1f} s  {params}")
    return lines


def _plots(study: optuna.Study, out: Path) -> tuple[list[Path], list[str]]:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as optuna_plots

    pngs, notes = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        history = optuna_plots.plot_optimization_history(study)
        history.set_ylabel(_objective_label(study))
        pngs.append(_save(history.figure, out / f"{study.study_name}-history.png"))
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        varied = {k for t in complete for k in t.params if t.params[k] != complete[0].params[k]}
        if len(complete) < 2 or not varied:
            notes.append("parameter importance: skipped, needs 2 completed trials that differ")
        else:
            # PED-ANOVA: Optuna 5's default, needs no scikit-learn (Optuna 4's fANOVA does).
            evaluator = optuna.importance.PedAnovaImportanceEvaluator()
            try:
                importance = optuna_plots.plot_param_importances(study, evaluator=evaluator)
            except (RuntimeError, ValueError) as exc:  # e.g. every trial scored the same
                notes.append(f"parameter importance: skipped ({exc})")
            else:
                path = out / f"{study.study_name}-importance.png"
                pngs.append(_save(importance.figure, path))
    plt.close("all")
    return pngs, notes


def _objective_label(study: optuna.Study) -> str:
    identity = study.user_attrs.get("identity", {})
    if identity.get("across"):
        return "mean normalised score"
    names = identity.get("workloads", [])
    return get_workload(names[0]).metric.name if names else "objective value"


def _save(figure: Any, path: Path) -> Path:
    figure.set_size_inches(8, 5)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return path


def default_report_dir(storage: str) -> Path:
    """Where ``--report`` writes without ``--out``: next to a SQLite file, else here."""
    database = _sqlite_path(storage)
    return database.parent if database is not None else Path(".")


# ----------------------------------------------------------------------------- command line
def run_command(args: Any) -> int:
    """``arturo-bench tune`` with parsed ``args`` (see ``cli.build_parser``)."""
    if bool(args.workload) == bool(args.tune_across):
        raise ValueError("tune: give one WORKLOAD, or several with --tune-across (not both)")
    job = TuneJob(
        workloads=tuple(args.tune_across or [args.workload]),
        optimizer=args.optimizer,
        across=bool(args.tune_across),
        quick=args.quick,
        seed=args.seed,
        steps=args.steps,
        overrides=tuple(args.overrides),
    )
    database = _sqlite_path(args.storage)
    if args.report and database is not None and not database.is_file():
        raise ValueError(f"--report: no storage file {database}")
    storage = open_storage(args.storage, args.heartbeat)
    if args.report:
        text, pngs = report(storage, job.name, args.out or default_report_dir(args.storage))
        print(text)
        print("\n".join(f"wrote {p}" for p in pngs))
        return 0
    return _run_trials(job, storage, args)


def _run_trials(job: TuneJob, storage: optuna.storages.BaseStorage, args: Any) -> int:
    import sys

    from .train import resolve_device

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # one line per trial, printed below
    device = resolve_device(args.device)
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    # These models are small: a second intra-op thread mostly waits, and on a shared CPU the
    # waiting made runs 10-30x slower (docs/workloads.md). Parallel processes scale instead.
    torch.set_num_threads(args.threads)
    print(
        f"study {job.name} in {args.storage}: adding {args.trials} trials on {device} "
        f"({args.threads} threads)"
    )
    try:
        study = tune(
            job,
            storage,
            args.trials,
            device=device,
            data_dir=args.data_dir,
            progress=sys.stderr.isatty(),
            callbacks=[_print_trial],
        )
    except KeyboardInterrupt:
        study = optuna.load_study(study_name=job.name, storage=storage)
        print(
            f"\ninterrupted: {len(finished_trials(study))} finished trials are in the study, the "
            "running one is marked failed; re-run the same command to resume.",
            file=sys.stderr,
        )
        return 130
    print(_state_line(study))
    target = f"--tune-across {' '.join(job.workloads)}" if job.across else job.workloads[0]
    quick = " --quick" if job.quick else ""
    print(
        f"report: arturo-bench tune {target} --optimizer {job.optimizer}{quick} "
        f"--storage {args.storage} --report"
    )
    return 0


def _print_trial(study: optuna.Study, trial: FrozenTrial) -> None:
    params = " ".join(f"{k}={v:.4g}" for k, v in trial.params.items())
    value = f"value {trial.value:.6g}" if trial.value is not None else "pruned"
    value += f" ({trial.user_attrs['pruned']})" if "pruned" in trial.user_attrs else ""
    wall = trial.user_attrs.get("wall_time_s", math.nan)
    print(f"trial {trial.number:>4}  {value}  {wall:.1f} s  {params}", flush=True)
