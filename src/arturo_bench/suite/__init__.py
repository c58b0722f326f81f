"""The transfer suite: every workload x optimizer x seed, at declared settings, with a report.

- ``settings``: the suite's optimizers and their settings (one place), ``NAME:tuned``;
- ``store``: the directory layout, finished-run records, the manifest;
- ``runner``: planning (settings resolved up front) and training;
- ``tables``: the table and performance-profile math;
- ``report``: suite.md and performance_profile.png from the files;
- ``command``: the ``arturo-bench suite`` command line. See docs/suite.md."""

from .command import add_arguments, listing, run_command
from .report import load_suite, write_report
from .runner import SuitePlan, plan_suite, run_suite
from .settings import (
    DEFAULT_OPTIMIZERS,
    QUICK_OPTIMIZERS,
    SUITE_DEFAULTS,
    OptimizerSpec,
    arturo_defaults,
    parse_optimizer,
    resolve_optimizer,
)

__all__ = [
    "DEFAULT_OPTIMIZERS",
    "QUICK_OPTIMIZERS",
    "SUITE_DEFAULTS",
    "OptimizerSpec",
    "SuitePlan",
    "add_arguments",
    "arturo_defaults",
    "listing",
    "load_suite",
    "parse_optimizer",
    "plan_suite",
    "resolve_optimizer",
    "run_command",
    "run_suite",
    "write_report",
]
