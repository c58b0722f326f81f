"""Each recipe of docs/integrations.md is a script under examples/; run each for a few steps.

Most run in this process (their frameworks are imported once for all tests); the Accelerate
loop runs as a script in its own process, so that Accelerate's process-wide state stays out
of this one.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
# Lightning's own use of a deprecated torch API, not the examples'.
pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec")


def load_example(name: str, *requires: str) -> ModuleType:
    for module in requires:
        pytest.importorskip(module, reason=f"{module} (an optional extra) is not installed")
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _finite_and_not_skipped(stats: list[dict[str, float]]) -> None:
    assert stats
    for group in stats:
        assert group["skipped_steps"] == 0
        assert 0.0 < group["kl"] < float("inf")


@pytest.mark.parametrize("amp", ["none", "bf16", "fp16"])
def test_pytorch_amp_example(amp):
    example = load_example("pytorch_amp")
    _finite_and_not_skipped(example.main(["--steps", "3", "--amp", amp]))


def test_hf_trainer_example(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    example = load_example("hf_trainer", "transformers", "accelerate")
    stats = example.main(["--steps", "3", "--output-dir", str(tmp_path)])
    assert {"arturo/group0/kl", "arturo/group1/kl"} <= stats.keys()
    assert stats["arturo/group0/skipped_steps"] == 0


def test_accelerate_example_as_a_script(tmp_path):
    pytest.importorskip("accelerate", reason="accelerate (the 'hf' extra) is not installed")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "true"}
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / "accelerate_loop.py"), "--steps", "3"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("step 3 ") and "'skipped_steps': 0" in last


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_lightning_automatic_example(tmp_path, precision):
    example = load_example("lightning_automatic", "lightning")
    stats = example.main(["--steps", "5", "--precision", precision, "--log-dir", str(tmp_path)])
    _finite_and_not_skipped(stats)
    (metrics_file,) = tmp_path.rglob("metrics.csv")
    with open(metrics_file, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("arturo/group0/kl")]
    assert [r["step"] for r in rows] == ["4"]  # log_every_n_steps=5: the fifth step


def test_lightning_manual_example():
    example = load_example("lightning_manual", "lightning")
    _finite_and_not_skipped(example.main(["--steps", "3"]))
