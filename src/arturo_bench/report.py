"""Tables and plots made from saved runs only (config.json + metrics.jsonl).

``summarize`` groups runs by (experiment, optimizer) and aggregates over seeds; ``markdown_table``
formats it; ``plot`` writes PNGs (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .configs import with_defaults
from .runs import MetricsError, find_runs

__all__ = [
    "Group",
    "accuracy_at_epochs_table",
    "load_groups",
    "markdown_table",
    "paired_table",
    "plot",
    "summarize",
    "write_report",
]


@dataclass
class Group:
    """All seeds of one (experiment, optimizer)."""

    experiment: str
    optimizer: str
    seeds: list[int] = field(default_factory=list)
    histories: list[list[dict[str, Any]]] = field(default_factory=list)
    epochs_planned: int = 0
    eval_samples: int = 0  # K of the model average, in calibration runs


def load_groups(paths: list[str | os.PathLike[str]]) -> list[Group]:
    """Runs grouped by (experiment, optimizer, config except the seed): seeds of the same
    config are aggregated; runs whose configs differ are never averaged together."""
    groups: dict[tuple[str, str, str], Group] = {}
    for store in find_runs(paths):
        # An older harness's config lacks the fields added since: at their defaults, its runs
        # group with new runs of the same settings.
        cfg = with_defaults(store.config())
        missing = [k for k in ("name", "optimizer", "seed", "epochs") if k not in cfg]
        if missing:
            raise MetricsError(f"{store.config_path} lacks {missing}: not a run's config")
        history = store.metrics()
        if not history:
            continue
        # quick runs get their own label so they never mix with full-schedule runs
        exp = cfg["name"] + ("-quick" if cfg.get("quick") else "")
        variant = json.dumps({k: v for k, v in cfg.items() if k != "seed"}, sort_keys=True)
        key = (exp, cfg["optimizer"], variant)
        g = groups.setdefault(key, Group(exp, cfg["optimizer"]))
        g.seeds.append(int(cfg["seed"]))
        g.histories.append(history)
        g.epochs_planned = max(g.epochs_planned, int(cfg["epochs"]))
        g.eval_samples = int(cfg.get("eval_samples", 0))
    # Several configs of one (experiment, optimizer): tell them apart in the labels.
    clashes: dict[tuple[str, str], list[Group]] = defaultdict(list)
    for (exp, opt, _variant), g in groups.items():
        clashes[(exp, opt)].append(g)
    for same in clashes.values():
        if len(same) > 1:
            by_epochs = len({g.epochs_planned for g in same}) == len(same)
            for i, g in enumerate(same, 1):
                g.experiment += f"-{g.epochs_planned}ep" if by_epochs else f"-variant{i}"
    return sorted(groups.values(), key=lambda g: (g.experiment, _opt_order(g.optimizer)))


def _opt_order(name: str) -> tuple[int, str]:
    order = ["arturo", "arturo-relative", "adam", "adamw", "sgd", "ivon"]
    return (order.index(name) if name in order else len(order), name)


def _mean_std(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, float("nan")
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))  # sample std


def summarize(groups: list[Group], target: float = 0.90) -> list[dict[str, Any]]:
    """Per group: final and best test accuracy, first epoch reaching ``target``, times.

    Seeds are compared at the same point: while some runs are unfinished, every figure is
    taken over the epochs all of them reached (the "epochs" column, "n of N"), never a
    finished run's final accuracy averaged with an unfinished one's."""
    rows = []
    for g in groups:
        n = min(len(h) for h in g.histories)
        histories = [h[:n] for h in g.histories]
        final = [h[-1]["test_acc"] for h in histories]
        best = [max(r["test_acc"] for r in h) for h in histories]
        first = [next((r["epoch"] for r in h if r["test_acc"] >= target), None) for h in histories]
        reached = [f for f in first if f is not None]
        rows.append(
            {
                "experiment": g.experiment,
                "optimizer": g.optimizer,
                "seeds": len(g.seeds),
                "epochs": n,
                "epochs_planned": g.epochs_planned,
                "final_acc": _mean_std(final),
                "best_acc": _mean_std(best),
                "first_epoch": _mean_std([float(f) for f in reached]) if reached else None,
                "reached": len(reached),
                "train_time_s": _mean_std([sum(r["train_time_s"] for r in h) for h in histories]),
                "step_time_s": _mean_std([sum(r["step_time_s"] for r in h) for h in histories]),
                "epoch_time_s": _mean_std(
                    [sum(r["train_time_s"] for r in h) / n for h in histories]
                ),
            }
        )
    return rows


def _pm(ms: tuple[float, float], scale: float = 1.0, digits: int = 2, unit: str = "") -> str:
    m, s = ms
    if math.isnan(s):
        return f"{m * scale:.{digits}f}{unit}"
    return f"{m * scale:.{digits}f} ± {s * scale:.{digits}f}{unit}"


def markdown_table(rows: list[dict[str, Any]], target: float = 0.90) -> str:
    head = (
        f"| experiment | optimizer | seeds | epochs | final test acc | best test acc "
        f"| first epoch ≥ {target:.0%} | train time (s) | of which optimizer.step (s) "
        f"| s/epoch |\n|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        epochs = f"{r['epochs']}" + (
            f" of {r['epochs_planned']}" if r["epochs"] < r["epochs_planned"] else ""
        )
        if r["first_epoch"] is None:
            first = "not reached"
        else:
            first = _pm(r["first_epoch"], digits=1)
            if r["reached"] < r["seeds"]:
                first += f" ({r['reached']}/{r['seeds']} seeds)"
        lines.append(
            f"| {r['experiment']} | {r['optimizer']} | {r['seeds']} | {epochs} "
            f"| {_pm(r['final_acc'], 100, unit='%')} | {_pm(r['best_acc'], 100, unit='%')} "
            f"| {first} | {_pm(r['train_time_s'], digits=1)} | {_pm(r['step_time_s'], digits=1)} "
            f"| {_pm(r['epoch_time_s'], digits=2)} |"
        )
    return head + "\n".join(lines) + "\n"


def accuracy_at_epochs_table(groups: list[Group], epochs: list[int]) -> str:
    """Test accuracy (mean ± std over seeds) at the given epochs; "–" where a run stopped
    earlier. docs/published.md quotes the published figures this way (@ 10, @ 20, @ 40)."""
    cols = " | ".join(f"@ {e}" for e in epochs)
    head = f"| experiment | optimizer | {cols} |\n|---|---|{'---|' * len(epochs)}\n"
    lines = []
    for g in groups:
        cells = []
        for e in epochs:
            accs = [h[e - 1]["test_acc"] for h in g.histories if len(h) >= e]
            cells.append(
                _pm(_mean_std(accs), 100, unit="%") if len(accs) == len(g.histories) else "–"
            )
        lines.append(f"| {g.experiment} | {g.optimizer} | {' | '.join(cells)} |")
    return head + "\n".join(lines) + "\n"


def paired_table(groups: list[Group], reference: str) -> str:
    """``reference``'s final test accuracy minus each other optimizer's, seed by seed.

    A seed fixes the initial weights and the data order for every optimizer, so the per-seed
    difference removes the part of the seed noise both runs share. Each pair is compared at
    the last epoch both runs reached. ``t`` is the paired t statistic (mean / (std/√n)), with
    n − 1 degrees of freedom; it is left blank with fewer than two seeds."""
    head = (
        f"| experiment | {reference} − optimizer | seeds | per seed (points) | mean ± std "
        f"| t | {reference} ahead |\n|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for ref in (g for g in groups if g.optimizer == reference):
        ref_runs = dict(zip(ref.seeds, ref.histories, strict=True))
        for g in groups:
            if g.experiment != ref.experiment or g is ref:
                continue
            seeds = sorted(set(g.seeds) & set(ref_runs))
            if not seeds:
                continue
            runs = dict(zip(g.seeds, g.histories, strict=True))
            diffs = []
            for s in seeds:
                n = min(len(runs[s]), len(ref_runs[s]))
                diffs.append(100 * (ref_runs[s][n - 1]["test_acc"] - runs[s][n - 1]["test_acc"]))
            m, sd = _mean_std(diffs)
            t = "" if math.isnan(sd) or sd == 0 else f"{m / (sd / math.sqrt(len(diffs))):.2f}"
            lines.append(
                f"| {g.experiment} | {g.optimizer} | {', '.join(map(str, seeds))} "
                f"| {', '.join(f'{d:+.2f}' for d in diffs)} | {_pm((m, sd), unit=' points')} "
                f"| {t} | {sum(d > 0 for d in diffs)}/{len(diffs)} |"
            )
    if not lines:
        raise ValueError(f"--paired {reference}: no runs of {reference!r} share a seed with others")
    return head + "\n".join(lines) + "\n"


def _series(g: Group, key: str, x: str) -> tuple[list[float], list[float], list[float]]:
    """Mean and std over seeds at each epoch all seeds reached. Against wall-clock, the x value
    is the seeds' mean cumulative training time at that epoch."""
    n = min(len(h) for h in g.histories)
    xs, means, stds = [], [], []
    for e in range(n):
        vals = [h[e][key] for h in g.histories]
        m, s = _mean_std(vals)
        xs.append(_mean_std([h[e][x] for h in g.histories])[0] if x != "epoch" else e + 1)
        means.append(m)
        stds.append(0.0 if math.isnan(s) else s)
    return xs, means, stds


def plot(groups: list[Group], out: str | os.PathLike[str]) -> list[Path]:
    """Two PNGs per experiment: test accuracy and train loss vs epoch, and vs wall-clock.
    One line per optimizer (mean over seeds), with a ±1 std band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    by_exp: dict[str, list[Group]] = defaultdict(list)
    for g in groups:
        by_exp[g.experiment].append(g)
    written = []
    for exp, gs in by_exp.items():
        for x, xlabel, suffix in (
            ("epoch", "epoch", "vs_epoch"),
            ("wall_time_s", "training wall-clock time (s)", "vs_time"),
        ):
            fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
            for ax, key, ylabel in (
                (axes[0], "test_acc", "test accuracy"),
                (axes[1], "train_loss", "train loss"),
            ):
                for g in gs:
                    xs, m, s = _series(g, key, x)
                    label = f"{g.optimizer} ({len(g.seeds)} seed{'s' if len(g.seeds) > 1 else ''})"
                    (line,) = ax.plot(xs, m, label=label, marker="." if len(xs) < 30 else None)
                    lo = [a - b for a, b in zip(m, s, strict=True)]
                    hi = [a + b for a, b in zip(m, s, strict=True)]
                    ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
                ax.set_xlabel(xlabel)
                ax.set_ylabel(ylabel)
                ax.grid(alpha=0.3)
                if key == "train_loss":
                    ax.set_yscale("log")
                ax.legend()
            fig.suptitle(f"{exp}: mean over seeds, band = ±1 std")
            path = out / f"{exp}_{suffix}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    return written


def write_report(
    paths: list[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    target: float = 0.90,
    at_epochs: list[int] | None = None,
    paired_with: str | None = None,
) -> tuple[str, list[Path]]:
    """report.md (the tables) and the PNGs under ``out``; returns the tables and PNG paths."""
    groups = load_groups(paths)
    if not groups:
        raise FileNotFoundError(f"no runs with metrics found under {[str(p) for p in paths]}")
    table = markdown_table(summarize(groups, target), target)
    if at_epochs:
        table += "\nTest accuracy at epoch:\n\n" + accuracy_at_epochs_table(groups, at_epochs)
    if paired_with:
        table += (
            f"\nFinal test accuracy, {paired_with} minus each optimizer, paired by seed:\n\n"
            + paired_table(groups, paired_with)
        )
    from .calibration_report import calibration_table, has_calibration, plot_calibration

    if has_calibration(groups):
        table += (
            "\nCalibration (runs with --eval-samples; mean ± std over seeds, at the last "
            "full evaluation; ECE with 15 bins; OOD: test images upside down, scored by "
            "predictive entropy):\n\n" + calibration_table(groups)
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pngs = plot(groups, out) + plot_calibration(groups, out)
    images = "\n".join(f"![{p.stem}]({p.name})" for p in pngs)
    (out / "report.md").write_text(f"# Runs\n\n{table}\n{images}\n")
    return table, pngs
