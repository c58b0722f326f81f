"""On-disk layout of one run: ``OUT/EXPERIMENT/OPTIMIZER/seedN/``.

- ``config.json``: the resolved config (experiment, optimizer, seed, device);
- ``env.json``: versions, device, CPU, git SHA, one entry per (re)start;
- ``metrics.jsonl`` and ``metrics.csv``: one row per finished epoch (the CSV without nested
  values such as a calibration run's reliability bins);
- ``checkpoint.pt``: model, optimizer, scheduler, metrics and the resolved config after the
  last finished epoch;
- ``.lock``: held (``flock``) by the process training in the directory.

Every file is written to a temporary name and renamed (``os.replace`` is atomic on POSIX), so a
Ctrl-C or a crash leaves either the previous epoch's files or the new ones, never a torn file;
a failed write (a full disk) removes its temporary file. The metrics files are rewritten from
the checkpoint's history, so they always agree with it.

Every problem with a run directory raises a :class:`RunDirError` whose message names the file
and says how to recover; the command line prints it without a traceback.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import errno
import fcntl
import importlib.metadata
import io
import json
import os
import platform
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import torch

from .configs import with_defaults

__all__ = [
    "RunStore",
    "run_dir",
    "environment",
    "find_runs",
    "config_differences",
    "RunDirError",
    "ConfigMismatchError",
    "CheckpointError",
    "MetricsError",
    "RunLockedError",
]

# Config keys that may change when a run is resumed: extending a run is fine.
_RESUMABLE_KEYS = ("epochs",)

# What to do about a run directory that cannot be resumed, for the error messages.
RESTART_HINT = "re-run with --restart to start this run over (it deletes the run's files)"


class RunDirError(RuntimeError):
    """A run directory cannot be used as asked; the message names the file and the way out."""


class ConfigMismatchError(RunDirError):
    """A run directory (or its checkpoint) holds a run with a different config."""


class CheckpointError(RunDirError):
    """A checkpoint is unreadable, missing, or does not belong to this run."""


class MetricsError(RunDirError):
    """A metrics or config file is not what the harness wrote."""


class RunLockedError(RunDirError):
    """Another process is training in the same run directory."""


def run_dir(out: str | os.PathLike[str], experiment: str, optimizer: str, seed: int) -> Path:
    return Path(out) / experiment / optimizer / f"seed{seed}"


def _temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


def _atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` through ``write(file)`` into a temporary file, then rename it. If anything
    fails (a full disk, Ctrl-C), the temporary file is removed and ``path`` is untouched."""
    tmp = _temporary_name(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise RunDirError(
                f"could not write {path}: {exc.strerror or exc}. The previous version of the "
                "file is intact; fix the cause (e.g. free disk space) and re-run the same "
                "command to resume."
            ) from exc
        raise


def _atomic_write_text(path: Path, text: str) -> None:
    _atomic_write(path, lambda f: f.write(text.encode()))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as exc:
        raise MetricsError(
            f"{path} is not valid JSON ({exc}); restore it, or delete the run directory "
            f"{path.parent} (or {RESTART_HINT})"
        ) from None


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Keys (``optimizer_config.lr`` for nested ones) whose values differ, as (old, new).
    ``old`` may come from an older harness: fields added since count at their defaults, and
    keys that may change on resume (``epochs``) are left out."""

    def flat(config: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for key, value in config.items():
            if isinstance(value, dict):
                out |= {f"{key}.{k}": v for k, v in value.items()}
            else:
                out[key] = value
        return out

    before, after = flat(with_defaults(old)), flat(new)
    return {
        k: (before.get(k), after.get(k))
        for k in sorted(set(before) | set(after))
        if k not in _RESUMABLE_KEYS and before.get(k) != after.get(k)
    }


def _git_sha() -> dict[str, Any]:
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {"git_sha": None, "git_dirty": None}
    return {"git_sha": sha or None, "git_dirty": bool(dirty) if sha else None}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict[str, Any]:
    """Versions, hardware and code version, recorded beside each run's metrics."""
    import numpy

    try:
        import arturo

        arturo_version = getattr(arturo, "__version__", "unknown")
    except ImportError:
        arturo_version = None
    env: dict[str, Any] = {
        "time_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "arturo": arturo_version,
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    try:
        env["ivon_opt"] = importlib.metadata.version("ivon-opt")
    except importlib.metadata.PackageNotFoundError:
        pass
    env.update(_git_sha())
    return env


class RunStore:
    """Files of one (experiment, optimizer, seed) run."""

    # The files the harness writes: what --restart removes, nothing else.
    FILE_NAMES = ("config.json", "env.json", "metrics.jsonl", "metrics.csv", "checkpoint.pt")

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.config_path = self.path / "config.json"
        self.env_path = self.path / "env.json"
        self.metrics_path = self.path / "metrics.jsonl"
        self.csv_path = self.path / "metrics.csv"
        self.checkpoint_path = self.path / "checkpoint.pt"
        self.lock_path = self.path / ".lock"

    # -- the directory
    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold an exclusive lock on the run directory (created if need be) while training in
        it: two processes writing one run would interleave their checkpoints."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise RunDirError(
                f"cannot create the run directory {self.path}: {exc.strerror or exc}; "
                "choose a writable --out"
            ) from exc
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                raise RunLockedError(
                    f"another arturo-bench process is training in {self.path} (it holds "
                    f"{self.lock_path}); wait for it to finish, or use another --out"
                ) from None
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def clear(self) -> None:
        """Delete the run's files (for --restart), and any temporary file a crash left."""
        for name in self.FILE_NAMES:
            (self.path / name).unlink(missing_ok=True)
            _temporary_name(self.path / name).unlink(missing_ok=True)

    # -- config and environment
    def saved_config(self) -> dict[str, Any] | None:
        """The config.json of an earlier start, or None."""
        if not self.config_path.exists():
            return None
        config = _read_json(self.config_path)
        if not isinstance(config, dict):
            raise MetricsError(f"{self.config_path} does not hold a config; {RESTART_HINT}")
        return config

    def check_config(self, config: dict[str, Any]) -> None:
        """Refuse to resume a run whose config.json differs from ``config`` (bar ``epochs``)."""
        old = self.saved_config()
        diff = {} if old is None else config_differences(old, config)
        if diff:
            raise ConfigMismatchError(
                f"{self.path} holds a run with a different config (old, new): {diff}. Use "
                f"another --out, or {RESTART_HINT}."
            )

    def init(self, config: dict[str, Any], env: dict[str, Any]) -> None:
        """Write config.json and add this start to env.json (after the checks have passed)."""
        self.path.mkdir(parents=True, exist_ok=True)
        starts = []
        if self.env_path.exists():
            saved = _read_json(self.env_path)
            starts = saved.get("starts") if isinstance(saved, dict) else None
            if not isinstance(starts, list):
                raise MetricsError(
                    f"{self.env_path} does not hold a list of starts; {RESTART_HINT}"
                )
        starts.append(env)
        _atomic_write_text(self.config_path, json.dumps(config, indent=2) + "\n")
        _atomic_write_text(self.env_path, json.dumps({"starts": starts}, indent=2) + "\n")

    def config(self) -> dict[str, Any]:
        config = self.saved_config()
        if config is None:
            raise MetricsError(f"{self.config_path} is missing")
        return config

    # -- checkpoint
    def save_checkpoint(self, state: dict[str, Any]) -> None:
        # Streamed into the file: no second in-memory copy of a large checkpoint.
        _atomic_write(self.checkpoint_path, lambda f: torch.save(state, f))

    def load_checkpoint(self) -> dict[str, Any] | None:
        """The checkpoint, or None if there is none. An unreadable one raises CheckpointError."""
        if not self.checkpoint_path.exists():
            return None
        try:
            # weights_only: a checkpoint holds tensors, numbers, strings and containers only.
            checkpoint = torch.load(self.checkpoint_path, map_location="cpu", weights_only=True)
        except Exception as exc:  # any failure to read it means the same: it is unusable
            raise self.checkpoint_error(f"cannot be read ({type(exc).__name__})") from exc
        if not isinstance(checkpoint, dict):
            raise self.checkpoint_error("does not hold a checkpoint")
        return checkpoint

    def checkpoint_error(self, problem: str) -> CheckpointError:
        return CheckpointError(
            f"{self.checkpoint_path} {problem}. The run cannot resume from it: delete the run "
            f"directory {self.path}, or {RESTART_HINT}."
        )

    # -- metrics
    def write_metrics(self, history: list[dict[str, Any]]) -> None:
        _atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in history))
        # The CSV holds the scalar columns; nested values (the reliability bins of a
        # calibration run) are in metrics.jsonl only.
        keys: list[str] = []
        for row in history:
            keys += [k for k, v in row.items() if k not in keys and not isinstance(v, dict | list)]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)
        _atomic_write_text(self.csv_path, buf.getvalue())

    def metrics(self) -> list[dict[str, Any]]:
        """The rows of metrics.jsonl; a line that is not a JSON object raises MetricsError
        naming the file and the line."""
        if not self.metrics_path.exists():
            return []
        rows = []
        for number, line in enumerate(self.metrics_path.read_bytes().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)  # bytes: a line that is not UTF-8 fails here too
            except ValueError as exc:
                raise self._metrics_error(number, f"is not valid JSON ({exc})") from None
            if not isinstance(row, dict) or not isinstance(row.get("epoch"), int):
                raise self._metrics_error(number, "is not a metrics row (no epoch)")
            rows.append(row)
        return rows

    def _metrics_error(self, line: int, problem: str) -> MetricsError:
        return MetricsError(
            f"{self.metrics_path}, line {line} {problem}. metrics.jsonl is rewritten from "
            f"checkpoint.pt: delete it and re-run the same `arturo-bench run` command, or "
            f"{RESTART_HINT}."
        )


def find_runs(paths: list[str | os.PathLike[str]]) -> list[RunStore]:
    """Every run directory (one holding config.json) at or below the given paths."""
    found: dict[Path, RunStore] = {}
    for p in paths:
        p = Path(p)
        if (p / "config.json").is_file():
            found[p.resolve()] = RunStore(p)
            continue
        for cfg in sorted(p.rglob("config.json")):
            found[cfg.parent.resolve()] = RunStore(cfg.parent)
    return list(found.values())
