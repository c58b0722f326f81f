"""End to end through ``arturo_bench.cli.main`` on tiny data the tests write (2 steps/epoch)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import arturo_bench.train as train_mod
from arturo_bench import data as D
from arturo_bench.cli import main
from arturo_bench.runs import RunStore

TIMING_KEYS = {"train_time_s", "step_time_s", "eval_time_s", "wall_time_s"}
# 64 training images in batches of 32: two optimizer steps per epoch.
TINY = ["--set", "batch_size=32", "--set", "test_batch_size=16", "--no-progress"]


def run(*args: str) -> int:
    return main(["run", "fmnist_cnn", *TINY, *args])


def metrics(out: Path, opt: str, seed: int = 0) -> list[dict]:
    return RunStore(out / "fmnist_cnn" / opt / f"seed{seed}").metrics()


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def assert_same(a: object, b: object, where: str) -> None:
    """Equal containers, and tensors equal bit for bit (dtype, shape and values)."""
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, where  # type: ignore[union-attr]
        assert torch.equal(a, b), where  # type: ignore[arg-type]
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where  # type: ignore[union-attr]
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")  # type: ignore[index]
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where  # type: ignore[arg-type]
        for i, (x, y) in enumerate(zip(a, b, strict=True)):  # type: ignore[call-overload]
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def write_fixture_run(
    path: Path, optimizer: str, seed: int, epochs: int, test_accs: list[float]
) -> None:
    """A saved run written by hand: its config and one metrics row per finished epoch."""
    store = RunStore(path)
    store.path.mkdir(parents=True)
    cfg = {"name": "fmnist_cnn", "optimizer": optimizer, "seed": seed, "epochs": epochs}
    store.config_path.write_text(json.dumps(cfg))
    store.write_metrics(
        [
            {
                "epoch": e,
                "train_loss": 1.0 / e,
                "test_acc": acc,
                "train_time_s": 2.0,
                "step_time_s": 0.5,
                "wall_time_s": 2.0 * e,
            }
            for e, acc in enumerate(test_accs, 1)
        ]
    )


def test_run_end_to_end(tmp_path: Path, fmnist_dir: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "runs"
    args = ["--data-dir", str(fmnist_dir), "--out", str(out), "--epochs", "1"]
    assert run(*args, "--optimizers", "arturo", "adam", "sgd") == 0
    printed = capsys.readouterr().out
    assert "| fmnist_cnn | arturo | 1 | 1 |" in printed  # the summary table
    for opt in ("arturo", "adam", "sgd"):
        d = out / "fmnist_cnn" / opt / "seed0"
        assert {p.name for p in d.iterdir()} == {
            ".lock",
            "config.json",
            "env.json",
            "metrics.jsonl",
            "metrics.csv",
            "checkpoint.pt",
        }
        (row,) = metrics(out, opt)
        assert row["epoch"] == 1 and row["steps"] == 2
        assert 0.0 <= row["test_acc"] <= 1.0 and row["step_time_s"] > 0
        cfg = json.loads((d / "config.json").read_text())
        assert cfg["optimizer"] == opt and cfg["batch_size"] == 32 and cfg["seed"] == 0
        env = json.loads((d / "env.json").read_text())["starts"][0]
        assert {"torch", "python", "device", "git_sha", "cpu"} <= set(env)
        header = (d / "metrics.csv").read_text().splitlines()[0].split(",")
        assert {"train_loss", "test_acc", "step_time_s"} <= set(header)
    arturo_row = metrics(out, "arturo")[0]
    assert {"eta", "kl", "kl_bound"} <= set(arturo_row)
    assert arturo_row["kl"] <= arturo_row["kl_bound"] * (1 + 1e-4)


def test_same_init_data_and_dropout_across_optimizers(tmp_path: Path, fmnist_dir: Path) -> None:
    """With lr=0 nothing moves, so equal losses mean equal weights, batches and dropout masks."""
    out = tmp_path / "runs"
    args = ["--data-dir", str(fmnist_dir), "--out", str(out), "--epochs", "1"]
    assert run(*args, "--optimizers", "adam", "sgd", "--set", "adam.lr=0", "--set", "sgd.lr=0") == 0
    (a,), (s,) = metrics(out, "adam"), metrics(out, "sgd")
    assert a["train_loss"] == s["train_loss"] and a["test_loss"] == s["test_loss"]


def test_resume_after_interrupt_matches_uninterrupted(
    tmp_path: Path, fmnist_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    common = ["--data-dir", str(fmnist_dir), "--optimizers", "arturo", "adam", "--epochs", "3"]
    common += ["--set", "milestones=2"]
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert run(*common, "--out", str(ref)) == 0

    # Ctrl-C during arturo's epoch 3 evaluation: epochs 1-2 are saved, epoch 3 is lost.
    real_evaluate = train_mod.evaluate
    calls = {"n": 0}

    def interrupted(*a: object, **k: object) -> dict:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_evaluate(*a, **k)

    monkeypatch.setattr(train_mod, "evaluate", interrupted)
    assert run(*common, "--out", str(out)) == 130
    monkeypatch.setattr(train_mod, "evaluate", real_evaluate)
    saved = metrics(out, "arturo")
    assert [r["epoch"] for r in saved] == [1, 2]
    assert not (out / "fmnist_cnn" / "adam").exists()

    assert run(*common, "--out", str(out)) == 0  # the same command resumes
    resumed = metrics(out, "arturo")
    assert resumed[:2] == saved  # epochs 1-2 not recomputed: even their timings are unchanged
    for opt in ("arturo", "adam"):
        assert without_timing(metrics(out, opt)) == without_timing(metrics(ref, opt))
        # Bitwise the same weights and optimizer state (arturo's filter, Adam's moments).
        a, b = (torch.load(d / "fmnist_cnn" / opt / "seed0" / "checkpoint.pt") for d in (out, ref))
        for key in ("model", "optimizer", "scheduler", "config", "epoch"):
            assert_same(a[key], b[key], f"{opt} {key}")

    # Extending a finished run: only the new epoch is trained.
    assert run(*common[:-4], "--epochs", "4", "--set", "milestones=2", "--out", str(out)) == 0
    extended = metrics(out, "arturo")
    assert [r["epoch"] for r in extended] == [1, 2, 3, 4] and extended[:3] == resumed


def test_changed_config_is_refused(
    tmp_path: Path, fmnist_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    args = ["--data-dir", str(fmnist_dir), "--out", str(tmp_path), "--optimizers", "sgd"]
    assert run(*args, "--epochs", "1") == 0
    assert run(*args, "--epochs", "1", "--set", "sgd.lr=0.5") == 2
    assert "different config" in capsys.readouterr().err


def test_missing_data_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert run("--data-dir", str(tmp_path / "empty"), "--out", str(tmp_path)) == 2
    err = capsys.readouterr().err
    assert "Fashion-MNIST not found" in err and "apt-get install dataset-fashion-mnist" in err
    assert not (tmp_path / "fmnist_cnn").exists()


def test_quick_mode_uses_a_subset(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data_dir = tmp_path / "d"
    from benchdata import make_fmnist

    make_fmnist(data_dir, n_train=96, n_test=20)
    args = ["run", "--quick", "--epochs", "1", "--data-dir", str(data_dir), "--out", str(tmp_path)]
    assert main([*args, "--set", "batch_size=48", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "optimizers arturo adam sgd" in printed
    for opt in ("arturo", "adam", "sgd"):
        cfg = json.loads(
            (tmp_path / "fmnist_cnn-quick" / opt / "seed0" / "config.json").read_text()
        )
        assert cfg["quick"] and cfg["train_subset"] == 10_200 and cfg["epochs"] == 1


def test_ivon_peer(tmp_path: Path, fmnist_dir: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["--data-dir", str(fmnist_dir), "--out", str(tmp_path), "--epochs", "1"]
    code = run(*args, "--optimizers", "ivon")
    try:
        import ivon  # noqa: F401
    except ImportError:
        assert code == 2 and "pip install" in capsys.readouterr().err
        return
    assert code == 0
    (row,) = metrics(tmp_path, "ivon")
    assert row["steps"] == 2


def test_run_arturo_relative(
    tmp_path: Path, fmnist_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    """No published row: ``run`` trains the library's relative-units preset under its name,
    and refuses to file absolute units under it."""
    from arturo.optimizer import PRESETS

    args = ["--data-dir", str(fmnist_dir), "--out", str(tmp_path), "--epochs", "1"]
    assert run(*args, "--optimizers", "arturo-relative") == 0
    (row,) = metrics(tmp_path, "arturo-relative")
    assert row["steps"] == 2
    saved = RunStore(tmp_path / "fmnist_cnn" / "arturo-relative" / "seed0").config()
    assert saved["optimizer_config"]["units"] == "relative"
    assert saved["optimizer_config"]["lr"] == PRESETS["relative"]["lr"]
    capsys.readouterr()
    other = ["--data-dir", str(fmnist_dir), "--out", str(tmp_path / "refused"), "--epochs", "1"]
    refused = ["--optimizers", "arturo-relative", "--set", "arturo-relative.units=absolute"]
    assert run(*other, *refused) == 2
    assert "arturo-relative.units must be 'relative'" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()


def test_report_on_fixture_runs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Runs written by hand (3 seeds x 2 optimizers), then the report's table and PNGs."""
    runs = tmp_path / "runs"
    for opt, acc0 in (("arturo", 0.85), ("adam", 0.82)):
        for seed in range(3):
            accs = [acc0 + 0.03 * e + 0.001 * seed for e in (1, 2, 3)]
            write_fixture_run(runs / "fmnist_cnn" / opt / f"seed{seed}", opt, seed, 3, accs)
    out = tmp_path / "report"
    assert main(["report", str(runs), "--out", str(out), "--at-epochs", "2", "5"]) == 0
    table = (out / "report.md").read_text()
    assert "| fmnist_cnn | arturo | 91.10 ± 0.10% | – |" in table  # epoch 5 was never reached
    assert "| fmnist_cnn | arturo | 3 | 3 | 94.10 ± 0.10% | 94.10 ± 0.10% | 2.0 ± 0.0 |" in table
    # adam reaches 90% at epoch 3 on every seed
    assert "| fmnist_cnn | adam | 3 | 3 | 91.10 ± 0.10% | 91.10 ± 0.10% | 3.0 ± 0.0 |" in table
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["fmnist_cnn_vs_epoch.png", "fmnist_cnn_vs_time.png"]
    for p in out.glob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "94.10 ± 0.10%" in capsys.readouterr().out

    # A run of another schedule is reported apart, never averaged with the 3-epoch seeds.
    write_fixture_run(runs / "elsewhere" / "arturo" / "seed0", "arturo", 0, 1, [0.5])
    assert main(["report", str(runs), "--out", str(out)]) == 0
    table = (out / "report.md").read_text()
    assert "| fmnist_cnn-3ep | arturo | 3 | 3 | 94.10 ± 0.10% |" in table
    assert "| fmnist_cnn-1ep | arturo | 1 | 1 | 50.00% |" in table

    # An unfinished seed (1 of 3 epochs): the seeds are compared at epoch 1, all of them.
    write_fixture_run(runs / "fmnist_cnn" / "adam" / "seed3", "adam", 3, 3, [0.853])
    assert main(["report", str(runs), "--out", str(out)]) == 0
    table = (out / "report.md").read_text()
    # epoch-1 accuracies of seeds 0-3: 85.0, 85.1, 85.2, 85.3%; 90% not reached by epoch 1
    row = "| fmnist_cnn | adam | 4 | 1 of 3 | 85.15 ± 0.13% | 85.15 ± 0.13% | not reached |"
    assert row in table


def test_report_paired_by_seed(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--paired: per-seed differences of final accuracy, their mean ± std and paired t."""
    runs = tmp_path / "runs"
    finals = {"arturo": [0.924, 0.925, 0.926], "sgd": [0.920, 0.922, 0.920], "adam": [0.93]}
    for opt, accs in finals.items():
        for seed, acc in enumerate(accs):
            write_fixture_run(runs / "fmnist_cnn" / opt / f"seed{seed}", opt, seed, 2, [0.5, acc])
    out = tmp_path / "report"
    assert main(["report", str(runs), "--out", str(out), "--paired", "arturo"]) == 0
    table = (out / "report.md").read_text()
    # differences 0.4, 0.3, 0.6 points: mean 0.433, std 0.153, t = 0.433 / (0.153/√3) = 4.91
    assert (
        "| fmnist_cnn | sgd | 0, 1, 2 | +0.40, +0.30, +0.60 | 0.43 ± 0.15 points | 4.91 | 3/3 |"
        in table
    )
    # only seed 0 in common: no std, no t
    assert "| fmnist_cnn | adam | 0 | -0.60 | -0.60 points |  | 0/1 |" in table
    assert main(["report", str(runs), "--out", str(out), "--paired", "ivon"]) == 2
    assert "no runs of 'ivon'" in capsys.readouterr().err


def test_console_script_lists_experiments() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "arturo_bench", "list"], capture_output=True, text=True, check=True
    )
    assert "fmnist_cnn" in res.stdout and "cifar100_resnet34" in res.stdout
    assert "arturo-relative" in res.stdout  # the unit-free mode, among the optimizers


def test_show_prints_resolved_config(capsys: pytest.CaptureFixture) -> None:
    assert main(["show", "fmnist_cnn", "--epochs", "40", "--set", "arturo.lr=0.05"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["milestones"] == [20, 30] and cfg["optimizers"]["arturo"]["lr"] == 0.05


def test_data_info(fmnist_dir: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["data", "info", "fmnist", "--data-dir", str(fmnist_dir)]) == 0
    assert "(64, 1, 28, 28)" in capsys.readouterr().out
    assert D.load_fashion_mnist(fmnist_dir).train_x.shape[0] == 64
