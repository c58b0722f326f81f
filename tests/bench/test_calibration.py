"""The calibration protocol: the metrics on hand-computed cases, temperature scaling, the OOD
AUROC, and ``run --eval-samples`` end to end on tiny data (resume, report)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from benchdata import make_fmnist

import arturo_bench.uncertainty as unc
from arturo import Arturo
from arturo_bench import configs as C
from arturo_bench.calibration import (
    classification_metrics,
    fit_temperature,
    ood_auroc,
    predictive_entropy,
    reliability_bins,
)
from arturo_bench.cli import main
from arturo_bench.runs import RunStore


def test_metrics_match_a_hand_computation() -> None:
    # Confidences 0.95, 0.62, 0.71, 0.73, 0.83 (none on a bin edge of 15 equal bins).
    probs = torch.tensor([[0.95, 0.05], [0.62, 0.38], [0.29, 0.71], [0.73, 0.27], [0.17, 0.83]])
    labels = torch.tensor([0, 1, 1, 1, 1])  # right, wrong, right, wrong, right
    m = classification_metrics(probs, labels)
    assert m["acc"] == pytest.approx(3 / 5)
    nll = -(math.log(0.95) + math.log(0.38) + math.log(0.71) + math.log(0.27) + math.log(0.83)) / 5
    assert m["nll"] == pytest.approx(nll, rel=1e-6)
    # Brier, per example: (1 - p_true)² + (other p)² for two classes, i.e. 2·(1 - p_true)².
    brier = 2 * (0.05**2 + 0.62**2 + 0.29**2 + 0.73**2 + 0.17**2) / 5
    assert m["brier"] == pytest.approx(brier, rel=1e-6)
    # Bins [14/15, 1): 0.95 right; [9/15, 10/15): 0.62 wrong; [10/15, 11/15): 0.71 right and
    # 0.73 wrong (accuracy 1/2, confidence 0.72); [12/15, 13/15): 0.83 right.
    ece = (abs(1 - 0.95) + abs(0 - 0.62) + 2 * abs(0.5 - 0.72) + abs(1 - 0.83)) / 5
    assert m["ece"] == pytest.approx(ece, abs=1e-6)

    bins = reliability_bins(probs, labels)
    assert bins["count"][10] == 2 and bins["accuracy"][10] == 0.5
    assert bins["confidence"][10] == pytest.approx(0.72)
    assert sum(bins["count"]) == 5


def test_reliability_bins_agree_with_torchmetrics_ece() -> None:
    gen = torch.Generator().manual_seed(3)
    probs = torch.softmax(torch.randn(500, 10, generator=gen) * 2, dim=1)
    labels = torch.randint(0, 10, (500,), generator=gen)
    bins = reliability_bins(probs, labels)
    gaps = sum(
        n * abs(a - c)
        for n, a, c in zip(bins["count"], bins["accuracy"], bins["confidence"], strict=True)
    )
    assert gaps / 500 == pytest.approx(classification_metrics(probs, labels)["ece"], abs=1e-5)


def test_temperature_scaling_recovers_a_known_temperature() -> None:
    gen = torch.Generator().manual_seed(0)
    calibrated = torch.randn(20_000, 10, generator=gen, dtype=torch.float64) * 3
    labels = torch.multinomial(calibrated.softmax(1), 1, generator=gen).squeeze(1)
    # Logits 2.5 times too large are overconfident; T = 2.5 undoes that.
    assert fit_temperature(calibrated * 2.5, labels) == pytest.approx(2.5, rel=0.05)
    assert fit_temperature(calibrated * 0.5, labels) == pytest.approx(0.5, rel=0.05)


def test_ood_auroc_of_separable_and_reversed_cases() -> None:
    confident = torch.tensor([[0.98, 0.01, 0.01], [0.01, 0.9, 0.09]])
    unsure = torch.tensor([[0.4, 0.3, 0.3], [0.34, 0.33, 0.33], [0.5, 0.25, 0.25]])
    assert ood_auroc(confident, unsure) == 1.0  # every OOD input has the higher entropy
    assert ood_auroc(unsure, confident) == 0.0
    assert predictive_entropy(torch.tensor([[1.0, 0.0]])).item() == 0.0
    assert predictive_entropy(torch.tensor([[0.5, 0.5]])).item() == pytest.approx(math.log(2))


def test_model_average_needs_the_validation_split_in_the_config() -> None:
    exp = C.get_experiment("fmnist_cnn")
    with pytest.raises(ValueError, match="needs val_split > 0"):
        C.apply_overrides(exp, ["eval_samples=4"])
    with pytest.raises(ValueError, match="val_split must be"):
        C.apply_overrides(exp, ["val_split=-1"])


# ----------------------------------------------------------------------------- end to end
TINY = ["--set", "batch_size=32", "--set", "test_batch_size=16", "--no-progress"]
TIMING_KEYS = {"train_time_s", "step_time_s", "eval_time_s", "wall_time_s"}


@pytest.fixture
def data_96(tmp_path: Path) -> Path:
    # 96 training images: the last 32 held out, 64 trained on (2 steps per epoch).
    return make_fmnist(tmp_path / "fmnist96", n_train=96, n_test=32)


def calibration_run(data: Path, out: Path, *args: str) -> int:
    common = ["--data-dir", str(data), "--out", str(out), "--set", "milestones=2"]
    cal = ["--eval-samples", "2", "--val-split", "32"]
    return main(["run", "fmnist_cnn", *TINY, *common, *cal, *args])


def rows(out: Path, opt: str) -> list[dict]:
    return RunStore(out / "fmnist_cnn" / opt / "seed0").metrics()


def without_timing(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in history]


def test_run_with_eval_samples_end_to_end(
    tmp_path: Path, data_96: Path, monkeypatch: pytest.MonkeyPatch, one_torch_thread: None
) -> None:
    sampled_sizes: list[int | None] = []
    real_sampled_params = Arturo.sampled_params

    def spy(self: Arturo, **kwargs: object):  # type: ignore[no-untyped-def]
        sampled_sizes.append(kwargs.get("dataset_size"))  # type: ignore[arg-type]
        return real_sampled_params(self, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Arturo, "sampled_params", spy)
    out = tmp_path / "runs"
    assert calibration_run(data_96, out, "--epochs", "2", "--optimizers", "arturo", "adamw") == 0
    # arturo's posterior is for the 64 images trained on, not the 96 on disk.
    assert sampled_sizes and set(sampled_sizes) == {64}

    for opt in ("arturo", "adamw"):
        cfg = RunStore(out / "fmnist_cnn" / opt / "seed0").config()
        assert cfg["val_split"] == 32 and cfg["eval_samples"] == 2
        first, last = rows(out, opt)
        # Every epoch: the mean model's calibration; the full evaluation at the last only.
        assert {"test_brier", "test_ece"} <= set(first) and "reliability" not in first
        assert 0 <= first["test_ece"] <= 1 and 0 <= first["test_brier"] <= 2
        assert {"test_ood_auroc", "ts_temperature", "ts_nll", "ts_ece"} <= set(last)
        # Temperature scaling never changes the predicted class.
        assert last["ts_acc"] == last["test_acc"] and last["ts_temperature"] > 0
        assert set(last["reliability"]) >= {"mean", "ts"}
        assert sum(last["reliability"]["mean"]["count"]) == 32  # the test images
        csv_header = (out / "fmnist_cnn" / opt / "seed0" / "metrics.csv").read_text()
        assert "reliability" not in csv_header.splitlines()[0]
    arturo_last, adamw_last = rows(out, "arturo")[-1], rows(out, "adamw")[-1]
    assert {"bma_acc", "bma_nll", "bma_brier", "bma_ece", "bma_ood_auroc"} <= set(arturo_last)
    assert 1e-4 <= arturo_last["bma_temperature"] <= 1e2 and "bma_t_nll" in arturo_last
    assert not any(k.startswith("bma") for k in adamw_last)  # AdamW has no posterior

    report = tmp_path / "report"
    assert main(["report", str(out), "--out", str(report)]) == 0
    table = (report / "report.md").read_text()
    assert "| fmnist_cnn | arturo | BMA (K = 2) | 2 | 1 |" in table
    assert "| fmnist_cnn | adamw | temperature-scaled | 2 | 1 |" in table
    assert "| fmnist_cnn | adamw | BMA" not in table
    pngs = {p.name for p in report.glob("*.png")}
    expected = {"fmnist_cnn_arturo_reliability.png", "fmnist_cnn_adamw_reliability.png"}
    assert expected | {"fmnist_cnn_nll_vs_epoch.png"} <= pngs
    for name in pngs:
        assert (report / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_calibration_run_resumes_without_losing_or_recomputing(
    tmp_path: Path, data_96: Path, monkeypatch: pytest.MonkeyPatch, one_torch_thread: None
) -> None:
    ref, out = tmp_path / "ref", tmp_path / "out"
    args = ("--optimizers", "arturo")
    assert calibration_run(data_96, ref, "--epochs", "3", *args) == 0

    # A first command trains 2 epochs (a full evaluation at epoch 2, its last) ...
    assert calibration_run(data_96, out, "--epochs", "2", *args) == 0
    two = rows(out, "arturo")
    assert "bma_nll" in two[1]
    # ... then a longer one is interrupted in epoch 3's full evaluation.
    real = unc.full_evaluation
    calls = {"n": 0}

    def counting(*a: object, **k: object) -> dict:
        calls["n"] += 1
        if calls["n"] == 1 and k.get("fit_posterior_temperature") and interrupt["on"]:
            raise KeyboardInterrupt
        return real(*a, **k)  # type: ignore[arg-type]

    interrupt = {"on": True}
    monkeypatch.setattr(unc, "full_evaluation", counting)
    assert calibration_run(data_96, out, "--epochs", "3", *args) == 130
    assert rows(out, "arturo") == two  # nothing saved was lost, epoch 3 was not saved

    interrupt["on"], calls["n"] = False, 0
    assert calibration_run(data_96, out, "--epochs", "3", *args) == 0
    resumed = rows(out, "arturo")
    assert resumed[:2] == two  # not recomputed: even the timings are the same
    assert calls["n"] == 1  # only epoch 3's full evaluation ran
    # Epoch 2 of the reference run had no full evaluation (3 epochs: the last is epoch 3).
    assert "bma_nll" not in rows(ref, "arturo")[1]
    assert without_timing(resumed[2:]) == without_timing(rows(ref, "arturo")[2:])
    cfg = json.loads((out / "fmnist_cnn" / "arturo" / "seed0" / "config.json").read_text())
    assert cfg["epochs"] == 3 and cfg["val_split"] == 32
