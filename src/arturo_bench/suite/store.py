"""On-disk layout of a suite: ``DIR/<workload>/<optimizer>/seed<N>/`` plus ``DIR/suite.json``.

A run directory holds ``config.json`` (the run's settings and environment) and
``history.json`` (its evaluation rows), both written when the run finishes, config first:
``history.json`` marks a finished run. Runs take 1-3 minutes, so an interrupted run simply
restarts. ``suite.json`` records the suite's budget, what was asked for (workloads,
optimizers, seeds, the union over invocations) and each command, for the report.

Writes are atomic and run directories are locked with ``arturo_bench.runs``'s helpers."""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..runs import ConfigMismatchError, MetricsError, RunStore, _atomic_write_text, run_dir
from .settings import recorded_hyperparameters

__all__ = ["SuiteRun", "Manifest", "load_manifest", "find_suite_runs", "utc_now"]

CONFIG = "config.json"
HISTORY = "history.json"
MANIFEST = "suite.json"
# Parts of config.json that describe where and when a run ran, not what it is.
_RECORD_ONLY = ("environment", "finished_utc", "wall_time_s")


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as exc:
        raise MetricsError(
            f"{path} is not valid JSON ({exc}); delete its run directory {path.parent} to "
            "run it again"
        ) from None


def _write_json(path: Path, value: Any) -> None:
    _atomic_write_text(path, json.dumps(value, indent=2) + "\n")


def _differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Keys (dotted for nested dicts) whose values differ, as (old, new)."""
    diff: dict[str, Any] = {}
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diff |= _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            diff[f"{prefix}{key}"] = (a, b)
    return diff


class SuiteRun:
    """Files of one (workload, optimizer, seed) run of a suite."""

    def __init__(self, out: str | os.PathLike[str], workload: str, optimizer_dir: str, seed: int):
        self.path = run_dir(out, workload, optimizer_dir, seed)
        self.config_path = self.path / CONFIG
        self.history_path = self.path / HISTORY

    @classmethod
    def at(cls, path: Path) -> SuiteRun:
        run = cls.__new__(cls)
        run.path, run.config_path, run.history_path = path, path / CONFIG, path / HISTORY
        return run

    def finished(self) -> bool:
        return self.history_path.is_file() and self.config_path.is_file()

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive while training: two processes on one run would overwrite each other."""
        with RunStore(self.path).lock():
            yield

    def config(self) -> dict[str, Any]:
        config = _read_json(self.config_path)
        if not isinstance(config, dict):
            raise MetricsError(f"{self.config_path} does not hold a suite run's config")
        return config

    def history(self) -> list[dict[str, Any]]:
        rows = _read_json(self.history_path)
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise MetricsError(f"{self.history_path} does not hold a list of evaluation rows")
        return rows

    def check_settings(self, settings: dict[str, Any]) -> None:
        """Refuse a finished run whose settings differ: its results would be mixed with
        results of other settings under one label."""
        saved = {k: v for k, v in self.config().items() if k not in _RECORD_ONLY}
        if isinstance(saved.get("hyperparameters"), dict):  # written by an older harness?
            saved["hyperparameters"] = recorded_hyperparameters(
                str(saved.get("optimizer_class", "")), saved["hyperparameters"]
            )
        diff = _differences(saved, json.loads(json.dumps(settings)))
        if diff:
            raise ConfigMismatchError(
                f"{self.path} holds a finished run with other settings (old, new): {diff}. "
                "Use another --out, or delete that run directory to run it with the new ones."
            )

    def clear(self) -> None:
        """Remove an unfinished run's leftovers before it restarts."""
        for path in (self.config_path, self.history_path):
            path.unlink(missing_ok=True)

    def save(
        self,
        settings: dict[str, Any],
        environment: dict[str, Any],
        history: list[dict[str, Any]],
        wall_time_s: float,
    ) -> None:
        """Write config.json, then history.json: the second one marks the run finished."""
        config = {
            **settings,
            "environment": environment,
            "finished_utc": utc_now(),
            "wall_time_s": wall_time_s,
        }
        _write_json(self.config_path, config)
        _write_json(self.history_path, history)


def find_suite_runs(out: str | os.PathLike[str]) -> list[SuiteRun]:
    """Every finished run below ``out`` (``<workload>/<optimizer>/seed<N>/history.json``)."""
    runs = [SuiteRun.at(p.parent) for p in sorted(Path(out).glob(f"*/*/seed*/{HISTORY}"))]
    return [r for r in runs if r.finished()]


class Manifest:
    """``DIR/suite.json``: the suite's budget, the plan (union over invocations), commands."""

    def __init__(self, out: str | os.PathLike[str], data: dict[str, Any]) -> None:
        self.path = Path(out) / MANIFEST
        self.data = data

    @property
    def quick(self) -> bool:
        return bool(self.data.get("quick"))

    @property
    def steps(self) -> int | None:
        return self.data.get("steps")

    def planned(self, key: str) -> list[Any]:
        return list(self.data.get("plan", {}).get(key, []))

    def check_budget(self, quick: bool, steps: int | None) -> None:
        """One budget per directory: quick and full results must never share a table."""
        if (self.quick, self.steps) != (quick, steps):
            raise ConfigMismatchError(
                f"{self.path.parent} holds a suite with "
                f"{_budget_words(self.quick, self.steps)}, not "
                f"{_budget_words(quick, steps)}; use another --out"
            )

    def record(
        self, command: str, workloads: list[str], optimizers: list[str], seeds: list[int]
    ) -> None:
        plan = self.data.setdefault("plan", {})
        for key, new in (("workloads", workloads), ("optimizers", optimizers), ("seeds", seeds)):
            plan[key] = list(dict.fromkeys([*plan.get(key, []), *new]))
        commands = self.data.setdefault("commands", [])
        if command not in commands:
            commands.append(command)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _write_json(self.path, self.data)


def _budget_words(quick: bool, steps: int | None) -> str:
    words = "the quick budget" if quick else "the full budget"
    return words + (f" cut to {steps} steps" if steps else "")


def load_manifest(out: str | os.PathLike[str]) -> Manifest | None:
    """The directory's manifest, or None where there is none yet."""
    path = Path(out) / MANIFEST
    if not path.exists():
        return None
    data = _read_json(path)
    if not isinstance(data, dict):
        raise MetricsError(f"{path} does not hold a suite manifest")
    return Manifest(out, data)
