"""On-disk layout of one run: ``OUT/EXPERIMENT/OPTIMIZER/seedN/``.

- ``config.json``: the resolved config (experiment, optimizer, seed, device);
- ``env.json``: versions, device, CPU, git SHA, one entry per (re)start;
- ``metrics.jsonl`` and ``metrics.csv``: one row per finished epoch;
- ``checkpoint.pt``: model, optimizer, scheduler and metrics after the last finished epoch.

Every file is written to a temporary name and renamed (``os.replace`` is atomic on POSIX), so a
Ctrl-C or a crash leaves either the previous epoch's files or the new ones, never a torn file.
The metrics files are rewritten from the checkpoint's history, so they always agree with it.
"""

from __future__ import annotations

import csv
import datetime as _dt
import importlib.metadata
import io
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

__all__ = ["RunStore", "run_dir", "environment", "find_runs", "ConfigMismatchError"]

# Config keys that may change when a run is resumed: extending a run is fine.
_RESUMABLE_KEYS = ("epochs",)


class ConfigMismatchError(RuntimeError):
    """A run directory holds a run with a different config."""


def run_dir(out: str | os.PathLike[str], experiment: str, optimizer: str, seed: int) -> Path:
    return Path(out) / experiment / optimizer / f"seed{seed}"


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_write_text(path: Path, text: str) -> None:
    _atomic_write_bytes(path, text.encode())


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

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.config_path = self.path / "config.json"
        self.env_path = self.path / "env.json"
        self.metrics_path = self.path / "metrics.jsonl"
        self.csv_path = self.path / "metrics.csv"
        self.checkpoint_path = self.path / "checkpoint.pt"

    # -- config and environment
    def init(self, config: dict[str, Any], env: dict[str, Any]) -> None:
        """Create the directory, or check that an existing run has a compatible config."""
        self.path.mkdir(parents=True, exist_ok=True)
        if self.config_path.exists():
            old = json.loads(self.config_path.read_text())
            diff = {
                k: (old.get(k), config.get(k))
                for k in set(old) | set(config)
                if k not in _RESUMABLE_KEYS and old.get(k) != config.get(k)
            }
            if diff:
                raise ConfigMismatchError(
                    f"{self.path} holds a run with a different config "
                    f"(old, new): {diff}. Use another --out, or delete the directory to start over."
                )
        _atomic_write_text(self.config_path, json.dumps(config, indent=2) + "\n")
        starts = []
        if self.env_path.exists():
            starts = json.loads(self.env_path.read_text()).get("starts", [])
        starts.append(env)
        _atomic_write_text(self.env_path, json.dumps({"starts": starts}, indent=2) + "\n")

    def config(self) -> dict[str, Any]:
        return json.loads(self.config_path.read_text())

    # -- checkpoint
    def save_checkpoint(self, state: dict[str, Any]) -> None:
        buf = io.BytesIO()
        torch.save(state, buf)
        _atomic_write_bytes(self.checkpoint_path, buf.getvalue())

    def load_checkpoint(self) -> dict[str, Any] | None:
        if not self.checkpoint_path.exists():
            return None
        # weights_only: a checkpoint holds tensors, numbers, strings and containers only.
        return torch.load(self.checkpoint_path, map_location="cpu", weights_only=True)

    # -- metrics
    def write_metrics(self, history: list[dict[str, Any]]) -> None:
        _atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in history))
        keys: list[str] = []
        for row in history:
            keys += [k for k in row if k not in keys]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
        writer.writeheader()
        writer.writerows(history)
        _atomic_write_text(self.csv_path, buf.getvalue())

    def metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.exists():
            return []
        lines = self.metrics_path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()]


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
