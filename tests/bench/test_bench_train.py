"""The training loop itself, on tiny data: what it reads from the device, and when."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from arturo import Arturo
from arturo_bench import configs as C
from arturo_bench import data as D
from arturo_bench.models import build_model
from arturo_bench.optimizers import build_optimizer
from arturo_bench.train import train_epoch


def one_epoch(fmnist_dir: Path, overrides: list[str]) -> tuple[dict, list[tuple[float, float]]]:
    """An arturo epoch on 64 images; also eta and kl after each step, read by the test."""
    exp = C.apply_overrides(C.get_experiment("fmnist_cnn"), overrides)
    data = D.load_fashion_mnist(fmnist_dir)
    torch.manual_seed(0)
    model = build_model("cnn_f", num_classes=10, in_channels=1)
    optimizer = build_optimizer(exp.optimizers["arturo"], model.parameters(), num_train=64)
    after_each_step: list[tuple[float, float]] = []
    real_step = optimizer.step

    def step_and_record() -> None:
        real_step()
        group = optimizer.param_groups[0]
        after_each_step.append((float(group["eta"]), float(group["kl"])))

    optimizer.step = step_and_record  # type: ignore[method-assign]
    row, applied_nonfinite = train_epoch(
        model, optimizer, data, exp, seed=0, epoch=1, mc_samples=0, desc="", progress=False
    )
    assert applied_nonfinite == 0
    return row, after_each_step


class HostReads:
    """Counts the device reads (item, float, int, tolist) made by arturo_bench/train.py."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        for name in ("item", "__float__", "__int__", "tolist"):
            monkeypatch.setattr(torch.Tensor, name, self._counting(getattr(torch.Tensor, name)))

    def _counting(self, read):  # type: ignore[no-untyped-def]
        def counted(tensor, *args):  # type: ignore[no-untyped-def]
            if sys._getframe(1).f_code.co_filename.endswith("arturo_bench/train.py"):
                self.count += 1
            return read(tensor, *args)

        return counted


def test_arturo_diagnostics_stay_on_the_device_during_the_epoch(
    fmnist_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_stats(self: Arturo) -> None:
        raise AssertionError("stats() syncs the device; the loop must not call it")

    monkeypatch.setattr(Arturo, "stats", no_stats)
    reads = HostReads(monkeypatch)
    counts = {}
    for steps in (2, 4):
        reads.count = 0
        row, recorded = one_epoch(fmnist_dir, [f"batch_size={64 // steps}", "stats_every=1"])
        counts[steps] = reads.count
        # The mean over the samples (here every step) of the group's eta and kl.
        assert row["eta"] == pytest.approx(sum(e for e, _ in recorded) / steps, rel=1e-12)
        assert row["kl"] == pytest.approx(sum(k for _, k in recorded) / steps, rel=1e-12)
        assert row["skipped_steps"] == 0 and row["kl_bound"] == pytest.approx(0.08567456308209788)
    assert counts[2] == counts[4]  # reads after the loop only: none per step


def test_diagnostics_sample_every_stats_every_steps_and_the_last(fmnist_dir: Path) -> None:
    row, recorded = one_epoch(fmnist_dir, ["batch_size=16", "stats_every=3"])  # 4 steps
    sampled = [recorded[2], recorded[3]]  # after step 3, and the epoch's last step
    assert row["eta"] == pytest.approx(sum(e for e, _ in sampled) / 2, rel=1e-12)
    assert row["kl"] == pytest.approx(sum(k for _, k in sampled) / 2, rel=1e-12)
