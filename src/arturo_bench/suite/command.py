"""``arturo-bench suite``: its options, the command itself, and its part of ``list``."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch

from ..workloads import WORKLOADS, get_workload
from .report import REPORT, write_report
from .settings import (
    DEFAULT_OPTIMIZERS,
    QUICK_OPTIMIZERS,
    SUITE_DEFAULTS,
    UNSUPPORTED,
    parse_optimizer,
)
from .store import Manifest, load_manifest

__all__ = ["add_arguments", "run_command", "listing"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="suite directory (runs, suite.md, the PNG)")
    p.add_argument(
        "--optimizers",
        nargs="+",
        metavar="NAME[:tuned]",
        help=f"default: {' '.join(DEFAULT_OPTIMIZERS)} (--quick: {' '.join(QUICK_OPTIMIZERS)}); "
        "NAME:tuned takes the best trial of the `arturo-bench tune` study in --storage",
    )
    p.add_argument(
        "--workloads",
        nargs="+",
        choices=list(WORKLOADS),
        metavar="WORKLOAD",
        help="default: all (see `arturo-bench list`)",
    )
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="default: 0")
    p.add_argument(
        "--quick", action="store_true", help="each workload's quick budget and quick target"
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="OPT.KEY=VALUE",
        help="override a suite optimizer setting, e.g. --set adamw.lr=3e-3 (repeatable)",
    )
    p.add_argument("--storage", help="Optuna storage of the tuned settings, e.g. sqlite:///tune.db")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default: 1, as for `tune`: on a shared CPU a second thread of "
        "these small models mostly waits)",
    )
    p.add_argument("--data-dir", help="Fashion-MNIST directory (as for `run`)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--steps",
        type=int,
        help="for smoke tests only: train every run this many steps (results are not "
        "comparable with the targets)",
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="only rewrite suite.md and performance_profile.png from the finished runs",
    )


def _command_line(args: argparse.Namespace, optimizers: list[str]) -> str:
    """The invocation, with defaults spelled out, for suite.md's header."""
    words = ["arturo-bench", "suite", "--out", args.out]
    words += ["--quick"] if args.quick else []
    words += ["--workloads", *args.workloads] if args.workloads else []
    words += ["--optimizers", *optimizers, "--seeds", *map(str, args.seeds)]
    for item in args.overrides:
        words += ["--set", item]
    words += ["--storage", args.storage] if args.storage else []
    words += ["--steps", str(args.steps)] if args.steps else []
    words += ["--device", args.device] if args.device != "auto" else []
    words += ["--threads", str(args.threads)] if args.threads != 1 else []
    return shlex.join(words)


def run_command(args: argparse.Namespace) -> int:
    from ..train import resolve_device
    from .runner import check_finished, plan_suite, run_suite

    out = Path(args.out)
    if args.report_only:
        md, png = write_report(out)
        print(f"wrote {md} and {png}")
        return 0
    optimizers = args.optimizers or list(QUICK_OPTIMIZERS if args.quick else DEFAULT_OPTIMIZERS)
    plan = plan_suite(
        [get_workload(w) for w in args.workloads or WORKLOADS],
        [parse_optimizer(o) for o in optimizers],
        args.seeds,
        quick=args.quick,
        steps=args.steps,
        overrides=args.overrides,
        storage=args.storage,
    )
    manifest = load_manifest(out) or Manifest(out, {"quick": args.quick, "steps": args.steps})
    manifest.check_budget(args.quick, args.steps)
    check_finished(plan, out)  # before the command is recorded: a refused one never ran
    device = resolve_device(args.device)
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)  # each run records it (environment.torch_threads)
    print(
        f"suite: {len(plan.workloads)} workloads x {len(plan.optimizers)} optimizers x "
        f"{len(plan.seeds)} seeds, {'quick' if args.quick else 'full'} budget, device {device} "
        f"({args.threads} threads)"
    )
    manifest.record(
        _command_line(args, [s.label for s in plan.optimizers]),
        [w.name for w in plan.workloads],
        [s.label for s in plan.optimizers],
        list(plan.seeds),
    )
    try:
        outcome = run_suite(
            plan,
            out,
            device=device,
            data_dir=args.data_dir,
            progress=not args.no_progress and sys.stderr.isatty(),
        )
    except KeyboardInterrupt:
        print(
            f"\ninterrupted: finished runs are saved and {out / REPORT} reports them; re-run "
            "the same command to do the rest (the interrupted run starts over).",
            file=sys.stderr,
        )
        return 130
    print(f"{outcome.trained} runs trained, {outcome.skipped} skipped; report: {out / REPORT}")
    if outcome.diverged:
        print(f"diverged: {', '.join(outcome.diverged)}", file=sys.stderr)
    return 0


def listing() -> str:
    """The suite's workloads and optimizers, for ``arturo-bench list``."""
    lines = [
        "transfer suite workloads (arturo-bench suite; docs/suite.md):",
        f"  {'name':<20} {'family':<36} {'metric':<20} {'steps':>6} {'quick':>6}",
    ]
    for w in WORKLOADS.values():
        metric = f"{w.metric.name} ({w.metric.direction})"
        lines.append(f"  {w.name:<20} {w.family:<36} {metric:<20} {w.steps:>6} {w.quick_steps:>6}")
    usable = [name for name in SUITE_DEFAULTS if name not in UNSUPPORTED]
    lines.append(
        f"suite optimizers: {', '.join(usable)} at the suite's settings (docs/suite.md), "
        f"each also as NAME:tuned; not yet: {', '.join(UNSUPPORTED)}"
    )
    return "\n".join(lines)
