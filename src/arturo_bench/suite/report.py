"""``DIR/suite.md`` and ``DIR/performance_profile.png`` from a suite's finished runs.

Made from the files only (suite.json and each run's config.json and history.json), so that
``arturo-bench suite --report-only`` and the report written after every finished run agree,
and an interrupted suite still has one."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..runs import MetricsError, _atomic_write, _atomic_write_text
from ..workloads import get_workload, normalized_score, steps_to_target
from .store import MANIFEST, find_suite_runs, load_manifest, utc_now
from .tables import (
    PROFILE_TAUS,
    Cell,
    RunResult,
    cell,
    median_steps,
    performance_profile,
    profile_ratios,
    winners,
)

__all__ = ["SuiteData", "load_suite", "render_markdown", "plot_profile", "write_report"]

REPORT = "suite.md"
PROFILE_PNG = "performance_profile.png"
PROFILE_MAX_TAU = 4.0
_ARROW = {"max": "↑", "min": "↓"}


@dataclass
class SuiteData:
    """A suite's plan and its finished runs."""

    quick: bool
    steps: int | None  # every run cut to this many steps (smoke tests); None: the budgets
    workloads: list[str]
    optimizers: list[str]
    seeds: list[int]
    results: list[RunResult] = field(default_factory=list)
    configs: list[dict[str, Any]] = field(default_factory=list)  # of the finished runs
    commands: list[str] = field(default_factory=list)

    def results_of(self, workload: str, optimizer: str) -> list[RunResult]:
        return [r for r in self.results if (r.workload, r.optimizer) == (workload, optimizer)]

    def target(self, workload: str) -> float:
        w = get_workload(workload)
        return w.quick_target if self.quick else w.target

    def median_steps(self) -> dict[str, dict[str, float]]:
        return {
            w: {o: median_steps(self.results_of(w, o)) for o in self.optimizers}
            for w in self.workloads
        }


def run_result(config: dict[str, Any], history: list[dict[str, Any]]) -> RunResult:
    """A finished run's final metric and steps to its workload's (quick) target."""
    workload = get_workload(config["workload"])
    target = workload.quick_target if config["quick"] else workload.target
    final = float(history[-1]["metric"]) if history else math.nan
    return RunResult(
        workload=workload.name,
        optimizer=config["optimizer"],
        seed=int(config["seed"]),
        final=final,
        steps_to_target=steps_to_target(history, target, workload.metric.direction),
        diverged=any(bool(r.get("diverged")) for r in history),
    )


def load_suite(out: str | os.PathLike[str]) -> SuiteData:
    manifest = load_manifest(out)
    if manifest is None:
        raise FileNotFoundError(f"{Path(out) / MANIFEST} not found: {out} holds no suite")
    data = SuiteData(
        quick=manifest.quick,
        steps=manifest.steps,
        workloads=manifest.planned("workloads"),
        optimizers=manifest.planned("optimizers"),
        seeds=manifest.planned("seeds"),
        commands=list(manifest.data.get("commands", [])),
    )
    for run in find_suite_runs(out):
        config = run.config()
        if bool(config.get("quick")) != data.quick:
            raise MetricsError(f"{run.config_path}: its budget differs from {manifest.path}'s")
        result = run_result(config, run.history())
        data.results.append(result)
        data.configs.append(config)
        for key, value in (
            ("workloads", result.workload),
            ("optimizers", result.optimizer),
            ("seeds", result.seed),
        ):
            if value not in getattr(data, key):
                getattr(data, key).append(value)
    return data


# ----------------------------------------------------------------------------- markdown
def _number(x: float) -> str:
    return f"{x:.4g}"


def _metric_cell(c: Cell, n_seeds: int, bold: bool) -> str:
    if c.n == 0:
        return "not run"
    if c.diverged:
        text = f"diverged ({c.diverged} of {c.n} seeds)"
    else:
        text = _number(c.mean) + ("" if math.isnan(c.std) else f" ± {c.std:.2g}")
        text = f"**{text}**" if bold else text
    return text + (f" (n={c.n})" if c.n < n_seeds else "")


def metric_table(data: SuiteData) -> str:
    """Rows: workloads; columns: optimizers; the row's best in bold; a last row of the mean
    normalised score per optimizer."""
    head = "| workload | metric | " + " | ".join(data.optimizers) + " |\n"
    head += "|---|---|" + "---|" * len(data.optimizers) + "\n"
    lines = []
    for w in data.workloads:
        metric = get_workload(w).metric
        cells = {o: cell(data.results_of(w, o)) for o in data.optimizers}
        best = winners(cells, metric.direction)
        shown = [_metric_cell(cells[o], len(data.seeds), o in best) for o in data.optimizers]
        lines.append(f"| {w} | {metric.name} {_ARROW[metric.direction]} | {' | '.join(shown)} |")
    lines.append(
        "| mean normalised score | trivial 0, AdamW defaults 1 ↑ | "
        + " | ".join(_score_cells(data))
        + " |"
    )
    return head + "\n".join(lines) + "\n"


def _score_cells(data: SuiteData) -> list[str]:
    """Each optimizer's mean normalised score over the workloads it finished without
    diverging; the best is bold among those that finished every workload."""
    scores: dict[str, tuple[float, int, int]] = {}
    for o in data.optimizers:
        values, diverged = [], 0
        for w in data.workloads:
            c = cell(data.results_of(w, o))
            if c.usable:
                values.append(normalized_score(get_workload(w), c.mean, quick=data.quick))
            elif c.n:
                diverged += 1
        mean = math.fsum(values) / len(values) if values else math.nan
        scores[o] = (mean, len(values), diverged)
    complete = {o: s[0] for o, s in scores.items() if s[1] == len(data.workloads)}
    best = max(complete.values(), default=None)
    out = []
    for o in data.optimizers:
        mean, n, diverged = scores[o]
        if not n:
            out.append("—" + (f" ({diverged} diverged)" if diverged else ""))
            continue
        text = f"{mean:.3f}"
        text = f"**{text}**" if o in complete and mean == best else text
        notes = [f"{n} of {len(data.workloads)} workloads"] if n < len(data.workloads) else []
        notes += [f"{diverged} diverged"] if diverged else []
        out.append(text + (f" ({'; '.join(notes)})" if notes else ""))
    return out


def _steps_cell(results: list[RunResult]) -> str:
    if not results:
        return "not run"
    median = median_steps(results)
    reached = sum(r.steps_to_target is not None for r in results)
    text = "—" if math.isinf(median) else f"{median:g}"
    return text + (f" ({reached}/{len(results)} seeds)" if 0 < reached < len(results) else "")


def steps_table(data: SuiteData) -> str:
    head = "| workload | target | " + " | ".join(data.optimizers) + " |\n"
    head += "|---|---|" + "---|" * len(data.optimizers) + "\n"
    lines = []
    for w in data.workloads:
        metric = get_workload(w).metric
        sign = "≥" if metric.direction == "max" else "≤"
        cells = [_steps_cell(data.results_of(w, o)) for o in data.optimizers]
        target = f"{metric.name} {sign} {_number(data.target(w))}"
        lines.append(f"| {w} | {target} | {' | '.join(cells)} |")
    return head + "\n".join(lines) + "\n"


def profile_table(data: SuiteData) -> str:
    profile = performance_profile(data.median_steps(), data.optimizers, PROFILE_TAUS)
    head = "| optimizer | " + " | ".join(f"τ = {t:g}" for t in PROFILE_TAUS) + " |\n"
    head += "|---|" + "---|" * len(PROFILE_TAUS) + "\n"
    lines = [
        f"| {o} | " + " | ".join(f"{f:.2f}" for f in profile[o]) + " |" for o in data.optimizers
    ]
    return head + "\n".join(lines) + "\n"


def _environment_lines(configs: list[dict[str, Any]]) -> list[str]:
    """One line per distinct machine/software setup the runs had, with its run count."""
    setups: dict[str, int] = {}
    for config in configs:
        env = config.get("environment", {})
        device = env.get("gpu") or env.get("device", "?")
        git = env.get("git_sha")
        code = f"git {git[:10]}" + (" (uncommitted changes)" if env.get("git_dirty") else "")
        line = (
            f"{env.get('cpu', '?')}, {env.get('cpu_count', '?')} cores, "
            f"torch threads: {env.get('torch_threads', '?')}, device {device}; "
            f"torch {env.get('torch', '?')}, arturo {env.get('arturo', '?')}, "
            f"Python {env.get('python', '?')}; " + (code if git else "git commit unknown")
        )
        setups[line] = setups.get(line, 0) + 1
    if len(setups) == 1:
        return [f"- hardware and software: {next(iter(setups))}"]
    return [f"- hardware and software ({n} runs): {line}" for line, n in setups.items()]


def _budget_line(data: SuiteData) -> str:
    steps, target = ("quick_steps", "quick_target") if data.quick else ("steps", "target")
    line = (
        f"- budget: each workload's `{steps}`; target: its `{target}` (what AdamW with "
        "torch's defaults reaches at the end of that budget)"
    )
    if data.steps:
        line += f"; **every run cut to {data.steps} steps: a smoke test, not comparable**"
    return line


def _header(data: SuiteData, generated: str) -> str:
    budget = "quick" if data.quick else "full"
    planned = len(data.workloads) * len(data.optimizers) * len(data.seeds)
    dates = sorted(c.get("finished_utc", "") for c in data.configs)
    lines = [
        f"# Transfer suite ({budget} budget)",
        "",
        "Commands:",
        "",
        "```bash",
        *data.commands,
        "```",
        "",
        f"- report written {generated}"
        + (f"; runs finished {dates[0]} to {dates[-1]}" if dates else ""),
        *_environment_lines(data.configs),
        _budget_line(data),
        f"- seeds: {' '.join(map(str, data.seeds))}",
        f"- finished runs: {len(data.results)} of {planned}",
    ]
    return "\n".join(lines) + "\n"


def render_markdown(data: SuiteData, generated: str | None = None) -> str:
    return "\n".join(
        [
            _header(data, generated or utc_now()),
            "## Final metric",
            "",
            "Mean ± sample std over seeds of the metric at the end of the budget; **bold**: "
            "the best in the row (by the metric's direction, ↑ higher is better); (n=k): only "
            "k seeds have finished. The last row is the mean over workloads of the normalised "
            "score (the trivial predictor 0, AdamW's defaults' target 1; higher is better).",
            "",
            metric_table(data),
            "## Steps to target",
            "",
            "Median over seeds of the first evaluated step whose metric reaches the target "
            "(evaluations every `eval_every` steps); —: not reached by most seeds; (k/n "
            "seeds): reached by k of n.",
            "",
            steps_table(data),
            "## Performance profile",
            "",
            "Fraction of the workloads on which an optimizer's steps to target are within a "
            "factor τ of the best optimizer's on that workload (a workload not reached counts "
            "as never within).",
            "",
            profile_table(data),
            f"![performance profile]({PROFILE_PNG})",
            "",
        ]
    )


# ----------------------------------------------------------------------------- plot
def plot_profile(data: SuiteData, path: Path) -> None:
    """The performance profile for tau in [1, 4] (log axis), one step line per optimizer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = data.median_steps()
    ratios = profile_ratios(steps, data.optimizers)
    fig, ax = plt.subplots(figsize=(6, 4), constrained_layout=True)
    for o in data.optimizers:
        taus = sorted({1.0, PROFILE_MAX_TAU, *(r for r in ratios[o] if r <= PROFILE_MAX_TAU)})
        fractions = performance_profile(steps, data.optimizers, taus)[o]
        ax.step(taus, fractions, where="post", label=o)
    ax.set_xscale("log")
    ax.set_xlim(1.0, PROFILE_MAX_TAU)
    ticks = [1.0, 1.5, 2.0, 3.0, 4.0]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.set_xticks([], minor=True)
    ax.set_ylim(-0.03, 1.05)
    ax.set_xlabel("τ (steps to target / best optimizer's)")
    ax.set_ylabel("fraction of workloads")
    ax.set_title(f"Performance profile, {len(steps)} workloads")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    _atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)


def write_report(out: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write suite.md and performance_profile.png in ``out``; return their paths."""
    data = load_suite(out)
    md, png = Path(out) / REPORT, Path(out) / PROFILE_PNG
    plot_profile(data, png)
    _atomic_write_text(md, render_markdown(data))
    return md, png
