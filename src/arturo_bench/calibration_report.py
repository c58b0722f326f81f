"""The report's calibration part, from runs made with ``--eval-samples`` (saved files only):
a table of the metrics per optimizer and kind of prediction (mean ± std over seeds),
reliability diagrams and NLL against epochs.

The kinds, and the metrics keys each one's row reads (``arturo_bench.uncertainty``):

- mean model: ``test_acc``, ``test_loss`` (its NLL), ``test_brier``, ``test_ece``,
  ``test_ood_auroc``;
- temperature-scaled: ``ts_*``, with the fitted ``ts_temperature``;
- BMA: ``bma_*``, the K-sample model average;
- BMA at the fitted temperature: ``bma_t_*``, with the posterior's ``bma_temperature``.

Every figure is taken at the last full evaluation (every 10th epoch and the last) that all
seeds of a group reached, so seeds are never mixed across epochs.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

from .report import Group, _mean_std, _pm

__all__ = ["KINDS", "has_calibration", "calibration_table", "plot_calibration"]

# kind -> (label, {metric: key}); the temperature column is empty where a kind has none.
KINDS: dict[str, tuple[str, dict[str, str]]] = {
    "mean": (
        "mean model",
        {
            "acc": "test_acc",
            "nll": "test_loss",
            "brier": "test_brier",
            "ece": "test_ece",
            "ood_auroc": "test_ood_auroc",
        },
    ),
    "ts": (
        "temperature-scaled",
        {
            "acc": "ts_acc",
            "nll": "ts_nll",
            "brier": "ts_brier",
            "ece": "ts_ece",
            "ood_auroc": "ts_ood_auroc",
            "temperature": "ts_temperature",
        },
    ),
    "bma": (
        "BMA",
        {
            "acc": "bma_acc",
            "nll": "bma_nll",
            "brier": "bma_brier",
            "ece": "bma_ece",
            "ood_auroc": "bma_ood_auroc",
        },
    ),
    "bma_t": (
        "BMA, fitted temperature",
        {
            "acc": "bma_t_acc",
            "nll": "bma_t_nll",
            "brier": "bma_t_brier",
            "ece": "bma_t_ece",
            "ood_auroc": "bma_t_ood_auroc",
            "temperature": "bma_temperature",
        },
    ),
}


def _full_evaluation_epoch(g: Group) -> int | None:
    """The last epoch (1-based) that every seed reached and evaluated in full, or None."""
    n = min(len(h) for h in g.histories)
    for e in range(n, 0, -1):
        if all("reliability" in h[e - 1] for h in g.histories):
            return e
    return None


def has_calibration(groups: list[Group]) -> bool:
    return any(_full_evaluation_epoch(g) is not None for g in groups)


def calibration_table(groups: list[Group]) -> str:
    """Per group and kind of prediction: accuracy, NLL, Brier, ECE (15 bins), OOD AUROC and
    the fitted temperature, mean ± std over seeds, at the last full evaluation."""
    head = (
        "| experiment | optimizer | prediction | epoch | seeds | test acc | NLL | Brier "
        "| ECE | OOD AUROC | temperature |\n|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for g in groups:
        epoch = _full_evaluation_epoch(g)
        if epoch is None:
            continue
        rows = [h[epoch - 1] for h in g.histories]
        for kind, (label, keys) in KINDS.items():
            if not all(keys["ece"] in r for r in rows):
                continue
            if kind.startswith("bma") and g.eval_samples:
                label += f" (K = {g.eval_samples})"

            cells = [
                _cell(rows, keys.get("acc"), "acc", 100, 2, "%"),
                *(_cell(rows, keys.get(m), m) for m in ("nll", "brier", "ece")),
                _cell(rows, keys.get("ood_auroc"), "ood_auroc", 1.0, 3),
                _cell(rows, keys.get("temperature"), "temperature"),
            ]
            lines.append(
                f"| {g.experiment} | {g.optimizer} | {label} | {epoch} | {len(rows)} "
                f"| {' | '.join(cells)} |"
            )
    return head + "\n".join(lines) + "\n"


def _cell(
    rows: list[dict[str, Any]],
    key: str | None,
    metric: str,
    scale: float = 1.0,
    digits: int = 4,
    unit: str = "",
) -> str:
    if key is None:
        return ""
    m, s = _mean_std([r[key] for r in rows])
    if metric == "temperature":  # spans decades: significant digits
        return f"{m:.3g}" if math.isnan(s) else f"{m:.3g} ± {s:.2g}"
    return _pm((m, s), scale, digits, unit)


def _pooled_bins(rows: list[dict[str, Any]], kind: str) -> dict[str, list[float]] | None:
    """One kind's reliability bins, pooled over seeds: counts summed, confidence and accuracy
    weighted by each seed's counts."""
    bins = [r["reliability"].get(kind) for r in rows]
    if any(b is None for b in bins):
        return None
    n_bins = len(bins[0]["count"])
    count = [sum(b["count"][i] for b in bins) for i in range(n_bins)]

    def weighted(key: str) -> list[float]:
        return [
            sum(b[key][i] * b["count"][i] for b in bins) / count[i] if count[i] else math.nan
            for i in range(n_bins)
        ]

    return {"count": count, "confidence": weighted("confidence"), "accuracy": weighted("accuracy")}


def plot_calibration(groups: list[Group], out: str | os.PathLike[str]) -> list[Path]:
    """Per calibration group, ``EXPERIMENT_OPTIMIZER_reliability.png`` (one diagram per kind
    of prediction); per experiment, ``EXPERIMENT_nll_vs_epoch.png`` (the mean model's test
    NLL every epoch, the other kinds at their full evaluations; mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    by_exp: dict[str, list[Group]] = defaultdict(list)
    for g in groups:
        epoch = _full_evaluation_epoch(g)
        if epoch is None:
            continue
        by_exp[g.experiment].append(g)
        rows = [h[epoch - 1] for h in g.histories]
        pooled = {k: _pooled_bins(rows, k) for k in KINDS}
        kinds = [k for k, b in pooled.items() if b is not None]
        fig, axes = plt.subplots(
            1, len(kinds), figsize=(3.6 * len(kinds), 3.8), squeeze=False, constrained_layout=True
        )
        for ax, kind in zip(axes[0], kinds, strict=True):
            b = pooled[kind]
            assert b is not None
            n_bins = len(b["count"])
            width = 1.0 / n_bins
            lefts = [i * width for i in range(n_bins)]
            acc = [0.0 if math.isnan(a) else a for a in b["accuracy"]]
            ax.bar(lefts, acc, width=width, align="edge", edgecolor="black", label="accuracy")
            ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
            conf = [
                (x, c) for x, c in zip(lefts, b["confidence"], strict=True) if not math.isnan(c)
            ]
            ax.plot(
                [x + width / 2 for x, _ in conf], [c for _, c in conf], "r.", label="confidence"
            )
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1)
            ax.set_xlabel("confidence")
            ax.set_ylabel("accuracy")
            ax.set_title(KINDS[kind][0])
            ax.legend(fontsize="small", loc="upper left")
        seeds = f"{len(rows)} seed{'s' if len(rows) > 1 else ''}"
        fig.suptitle(f"{g.experiment} {g.optimizer}, epoch {epoch}, {seeds} pooled")
        path = out / f"{g.experiment}_{g.optimizer}_reliability.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    for exp, gs in by_exp.items():
        fig, ax = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
        for g in gs:
            n = min(len(h) for h in g.histories)
            epochs = list(range(1, n + 1))
            mean_nll = [_mean_std([h[e - 1]["test_loss"] for h in g.histories])[0] for e in epochs]
            (line,) = ax.plot(epochs, mean_nll, label=f"{g.optimizer} mean model")
            for kind, marker in (("ts", "s"), ("bma", "o"), ("bma_t", "^")):
                key = KINDS[kind][1]["nll"]
                at = [e for e in epochs if all(key in h[e - 1] for h in g.histories)]
                if at:
                    ys = [_mean_std([h[e - 1][key] for h in g.histories])[0] for e in at]
                    label = f"{g.optimizer} {KINDS[kind][0]}"
                    ax.plot(at, ys, marker, color=line.get_color(), label=label)
        ax.set_xlabel("epoch")
        ax.set_ylabel("test NLL (nats)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        ax.set_title(f"{exp}: test NLL, mean over seeds")
        path = out / f"{exp}_nll_vs_epoch.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
