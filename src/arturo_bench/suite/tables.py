"""The suite's numbers, from finished runs' results: pure functions, no files.

- the metric table: each (workload, optimizer) cell is the final metric's mean ± sample std
  over seeds, the best cell of a row (by the metric's direction) is the winner;
- the mean normalised score per optimizer (trivial predictor 0, AdamW's defaults 1);
- steps to target (AlgoPerf-style): the median over seeds of the first evaluated step whose
  metric reaches the workload's target, a seed that never does counting as infinitely many;
- the performance profile (Dolan & Moré, as in AlgoPerf): for each optimizer, the fraction
  of workloads on which its steps to target are within a factor tau of the best optimizer's.
  A workload an optimizer does not reach (or did not run) is never within."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "RunResult",
    "Cell",
    "cell",
    "winners",
    "median_steps",
    "profile_ratios",
    "performance_profile",
    "PROFILE_TAUS",
]

PROFILE_TAUS = (1.0, 1.5, 2.0, 4.0)  # the profile's points tabulated in suite.md


@dataclass(frozen=True)
class RunResult:
    """What the tables need of one finished run."""

    workload: str
    optimizer: str
    seed: int
    final: float  # the metric at the end of the budget (worst value if diverged)
    steps_to_target: int | None  # None: target never reached
    diverged: bool = False


@dataclass(frozen=True)
class Cell:
    """One (workload, optimizer): the final metric over the seeds that finished."""

    mean: float
    std: float  # sample std; NaN with one seed
    n: int
    diverged: int  # seeds that diverged; the mean is then not finite

    @property
    def usable(self) -> bool:
        return self.n > 0 and not self.diverged and math.isfinite(self.mean)


def cell(results: Sequence[RunResult]) -> Cell:
    values = [r.final for r in results]
    if not values:
        return Cell(math.nan, math.nan, 0, 0)
    diverged = sum(r.diverged or not math.isfinite(r.final) for r in results)
    mean = math.fsum(values) / len(values)
    std = statistics.stdev(values) if len(values) > 1 and not diverged else math.nan
    return Cell(mean, std, len(values), diverged)


def winners(cells: dict[str, Cell], direction: str) -> set[str]:
    """The optimizers whose cell is best (highest for "max", lowest for "min"); ties all win,
    and a cell with a diverged seed never does."""
    usable = {opt: c.mean for opt, c in cells.items() if c.usable}
    if not usable:
        return set()
    best = max(usable.values()) if direction == "max" else min(usable.values())
    return {opt for opt, mean in usable.items() if mean == best}


def median_steps(results: Iterable[RunResult]) -> float:
    """Median over seeds of steps to target, a seed not reaching it counting as inf (so the
    median is inf unless more than half reached it); inf with no results."""
    steps = [math.inf if r.steps_to_target is None else float(r.steps_to_target) for r in results]
    return statistics.median(steps) if steps else math.inf


def profile_ratios(
    steps: dict[str, dict[str, float]], optimizers: Sequence[str]
) -> dict[str, list[float]]:
    """``steps[workload][optimizer]`` -> each optimizer's steps over the best of
    ``optimizers`` on each workload; inf where it (or every optimizer) did not reach the
    target, or did not run."""
    ratios: dict[str, list[float]] = {opt: [] for opt in optimizers}
    for per_opt in steps.values():
        best = min((per_opt.get(opt, math.inf) for opt in optimizers), default=math.inf)
        for opt in optimizers:
            s = per_opt.get(opt, math.inf)
            ratios[opt].append(s / best if math.isfinite(best) and math.isfinite(s) else math.inf)
    return ratios


def performance_profile(
    steps: dict[str, dict[str, float]], optimizers: Sequence[str], taus: Sequence[float]
) -> dict[str, list[float]]:
    """For each optimizer, the fraction of the workloads in ``steps`` on which its ratio to
    the best is at most ``tau``, at each ``tau`` (all 0 without workloads)."""
    ratios = profile_ratios(steps, optimizers)
    return {
        opt: [sum(r <= tau for r in ratios[opt]) / max(1, len(steps)) for tau in taus]
        for opt in optimizers
    }
