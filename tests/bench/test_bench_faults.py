"""Faults in and around a run directory: each gives a clear error (no traceback), touches no
file it should not, and says how to recover. Tiny data: 2 steps per epoch."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import weakref
from pathlib import Path

import pytest
import torch

import arturo_bench.runs as runs_mod
import arturo_bench.train as train_mod
from arturo_bench.cli import main
from arturo_bench.runs import RunStore

TINY = ["--set", "batch_size=32", "--set", "test_batch_size=16", "--no-progress"]
# Fixed milestones, so that a run resumed with more --epochs keeps its config.
TINY += ["--set", "milestones=9"]


def run(fmnist_dir: Path, out: Path, *args: str) -> int:
    return main(
        ["run", "fmnist_cnn", *TINY, "--data-dir", str(fmnist_dir), "--out", str(out), *args]
    )


def run_path(out: Path, opt: str, seed: int = 0) -> Path:
    return out / "fmnist_cnn" / opt / f"seed{seed}"


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file of a run directory, to show that a refused resume changed none of them."""
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


def clean_error(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and "arturo-bench: error:" in err
    return err


# ----------------------------------------------------------------------------- checkpoints
def test_checkpoint_of_another_config_is_refused(
    tmp_path: Path, fmnist_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    out, other = tmp_path / "out", tmp_path / "other"
    assert run(fmnist_dir, out, "--optimizers", "sgd", "--epochs", "1") == 0
    assert (
        run(fmnist_dir, other, "--optimizers", "sgd", "--epochs", "1", "--set", "sgd.lr=0.5") == 0
    )
    mine = run_path(out, "sgd")
    shutil.copy(run_path(other, "sgd") / "checkpoint.pt", mine / "checkpoint.pt")
    before = snapshot(mine)
    capsys.readouterr()

    assert run(fmnist_dir, out, "--optimizers", "sgd", "--epochs", "2") == 2
    err = clean_error(capsys)
    assert str(mine / "checkpoint.pt") in err and "optimizer_config.lr" in err
    assert "--restart" in err
    assert snapshot(mine) == before  # metrics, config and env untouched


@pytest.mark.parametrize("legacy", [False, True], ids=["with-config", "legacy-without-config"])
def test_adam_checkpoint_in_an_arturo_run_is_refused(
    tmp_path: Path, fmnist_dir: Path, capsys: pytest.CaptureFixture, legacy: bool
) -> None:
    out = tmp_path / "out"
    assert run(fmnist_dir, out, "--optimizers", "arturo", "adam", "--epochs", "1") == 0
    adam = torch.load(run_path(out, "adam") / "checkpoint.pt", weights_only=True)
    if legacy:  # as written before checkpoints stored their config
        del adam["config"]
    torch.save(adam, run_path(out, "arturo") / "checkpoint.pt")
    before = snapshot(run_path(out, "arturo"))
    capsys.readouterr()

    assert run(fmnist_dir, out, "--optimizers", "arturo", "--epochs", "2") == 2
    err = clean_error(capsys)
    assert str(run_path(out, "arturo") / "checkpoint.pt") in err
    assert ("optimizer settings" if legacy else "different config") in err
    assert snapshot(run_path(out, "arturo")) == before  # metrics.jsonl not truncated


def test_run_of_an_older_harness_resumes(tmp_path: Path, fmnist_dir: Path) -> None:
    """A config.json without the fields added since, and a checkpoint without its config."""
    out = tmp_path / "out"
    assert run(fmnist_dir, out, "--optimizers", "arturo", "--epochs", "1") == 0
    d = run_path(out, "arturo")
    config = json.loads((d / "config.json").read_text())
    for key in ("newton_steps", "foreach", "fused"):
        del config["optimizer_config"][key]
    (d / "config.json").write_text(json.dumps(config))
    checkpoint = torch.load(d / "checkpoint.pt", weights_only=True)
    del checkpoint["config"]
    torch.save(checkpoint, d / "checkpoint.pt")

    assert run(fmnist_dir, out, "--optimizers", "arturo", "--epochs", "2") == 0
    assert [r["epoch"] for r in RunStore(d).metrics()] == [1, 2]


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_checkpoint_names_the_file_and_restart_recovers(
    tmp_path: Path, fmnist_dir: Path, capsys: pytest.CaptureFixture, damage: str
) -> None:
    out = tmp_path / "out"
    args = ["--optimizers", "sgd", "--epochs", "2"]
    assert run(fmnist_dir, out, *args) == 0
    d = run_path(out, "sgd")
    fresh = RunStore(d).metrics()
    data = (d / "checkpoint.pt").read_bytes()
    (d / "checkpoint.pt").write_bytes(
        data[: len(data) // 2] if damage == "truncated" else b"x" * 99
    )
    before = snapshot(d)
    capsys.readouterr()

    assert run(fmnist_dir, out, *args) == 2
    err = clean_error(capsys)
    assert str(d / "checkpoint.pt") in err and "--restart" in err
    assert snapshot(d) == before

    assert run(fmnist_dir, out, *args, "--restart") == 0  # starts over, same results
    redone = RunStore(d).metrics()
    timing = ("train_time_s", "step_time_s", "eval_time_s", "wall_time_s")
    strip = [{k: v for k, v in r.items() if k not in timing} for r in (*fresh, *redone)]
    assert strip[:2] == strip[2:]


def test_missing_checkpoint_with_metrics_is_refused(
    tmp_path: Path, fmnist_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    assert run(fmnist_dir, out, "--optimizers", "sgd", "--epochs", "1") == 0
    d = run_path(out, "sgd")
    (d / "checkpoint.pt").unlink()
    before = snapshot(d)
    capsys.readouterr()

    assert run(fmnist_dir, out, "--optimizers", "sgd", "--epochs", "2") == 2
    err = clean_error(capsys)
    assert "checkpoint.pt is missing" in err and "--restart" in err
    assert snapshot(d) == before  # the finished epoch's metrics are not overwritten
    assert run(fmnist_dir, out, "--optimizers", "sgd", "--epochs", "2", "--restart") == 0
    assert [r["epoch"] for r in RunStore(d).metrics()] == [1, 2]


def test_failed_checkpoint_write_leaves_no_temporary_file(
    tmp_path: Path, fmnist_dir: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk during epoch 2's checkpoint: epoch 1's checkpoint stays intact."""
    real_save = torch.save
    calls = {"n": 0}

    def disk_full(obj: object, f: object, *a: object, **k: object) -> None:
        calls["n"] += 1
        if calls["n"] < 2:
            return real_save(obj, f, *a, **k)
        f.write(b"PK\x03\x04 part of a checkpoint")  # type: ignore[attr-defined]
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(runs_mod.torch, "save", disk_full)
    out = tmp_path / "out"
    assert run(fmnist_dir, out, "--optimizers", "sgd", "--epochs", "2") == 2
    err = clean_error(capsys)
    d = run_path(out, "sgd")
    assert f"could not write {d / 'checkpoint.pt'}" in err and "No space left" in err
    assert not list(d.glob(".*.tmp"))
    assert torch.load(d / "checkpoint.pt", weights_only=True)["epoch"] == 1


# ----------------------------------------------------------------------------- the directory
def test_second_run_in_a_locked_directory_is_refused(
    tmp_path: Path, fmnist_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    d = run_path(out, "sgd")
    d.mkdir(parents=True)
    with open(d / ".lock", "w") as held:  # another process training here
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert run(fmnist_dir, out, "--optimizers", "sgd", "--epochs", "1") == 2
        err = clean_error(capsys)
        assert "another arturo-bench process" in err and str(d) in err
        assert {p.name for p in d.iterdir()} == {".lock"}
    assert run(fmnist_dir, out, "--optimizers", "sgd", "--epochs", "1") == 0  # lock released


def test_unwritable_output_is_a_clean_error(
    tmp_path: Path, fmnist_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("not a directory")
    assert run(fmnist_dir, a_file / "runs", "--optimizers", "sgd", "--epochs", "1") == 2
    assert "cannot create the run directory" in clean_error(capsys)
    assert main(["report", str(tmp_path), "--out", str(a_file / "report")]) == 2
    clean_error(capsys)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through directory permissions")
def test_read_only_output_is_a_clean_error(
    tmp_path: Path, fmnist_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    read_only = tmp_path / "ro"
    read_only.mkdir(mode=0o555)
    assert run(fmnist_dir, read_only, "--optimizers", "sgd", "--epochs", "1") == 2
    assert "cannot create the run directory" in clean_error(capsys)


def test_corrupt_metrics_line_is_named(
    tmp_path: Path, fmnist_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    assert run(fmnist_dir, out, "--optimizers", "sgd", "--epochs", "2") == 0
    metrics = run_path(out, "sgd") / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text(lines[0] + "\n" + lines[1][:20] + "\n")
    capsys.readouterr()

    assert main(["report", str(out), "--out", str(tmp_path / "report")]) == 2
    assert f"{metrics}, line 2 is not valid JSON" in clean_error(capsys)
    assert run(fmnist_dir, out, "--optimizers", "sgd", "--epochs", "3") == 2  # on resume
    assert f"{metrics}, line 2" in clean_error(capsys)


# ----------------------------------------------------------------------------- bad values
@pytest.mark.parametrize(
    "override,message",
    [
        ("epochs=-2", "epochs must be an integer >= 1"),
        ("batch_size=0", "batch_size must be an integer >= 1"),
        ("stats_every=0", "stats_every must be an integer >= 1"),
        ("test_batch_size=0", "test_batch_size must be an integer >= 1"),
        ("sgd.lr=nan", r"sgd\.lr must be a finite number >= 0"),
        ("arturo.gamma=nan", r"arturo\.gamma must be a number in \(0, 1\]"),
        ("arturo.gamma=-1", r"arturo\.gamma must be a number in \(0, 1\]"),
        ("arturo.lr=nan", r"arturo: .*\blr\b"),  # the optimizer's own rule, naming lr
    ],
)
def test_bad_set_values_stop_before_training(
    tmp_path: Path, fmnist_dir: Path, capsys: pytest.CaptureFixture, override: str, message: str
) -> None:
    out = tmp_path / "out"
    assert run(fmnist_dir, out, "--optimizers", "arturo", "sgd", "--set", override) == 2
    assert re.search(message, clean_error(capsys))
    assert not out.exists()


# ----------------------------------------------------------------------------- non-finite loss
@pytest.fixture
def nan_first_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first training batch of every run gets NaN inputs: NaN loss and gradients."""
    real = train_mod._forward_backward
    seen: weakref.WeakSet = weakref.WeakSet()  # ids of freed optimizers could be reused

    def poisoned(model, optimizer, x, y, mc_samples):  # type: ignore[no-untyped-def]
        if optimizer not in seen:
            seen.add(optimizer)
            x = x * float("nan")
        return real(model, optimizer, x, y, mc_samples)

    monkeypatch.setattr(train_mod, "_forward_backward", poisoned)


def test_applied_nonfinite_loss_stops_the_run(
    tmp_path: Path, fmnist_dir: Path, capsys: pytest.CaptureFixture, nan_first_batch: None
) -> None:
    out = tmp_path / "out"
    assert run(fmnist_dir, out, "--optimizers", "sgd", "arturo", "--epochs", "1") == 3
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert "fmnist_cnn sgd seed0, epoch 1" in captured.err and "--allow-nonfinite" in captured.err
    assert not (run_path(out, "sgd") / "checkpoint.pt").exists()  # nothing of epoch 1 saved
    assert RunStore(run_path(out, "sgd")).metrics() == []
    # arturo skipped the NaN step and trained on: counted and reported, not fatal
    (row,) = RunStore(run_path(out, "arturo")).metrics()
    assert row["skipped_steps"] == 1 and row["nonfinite_batches"] == 1
    assert row["train_loss"] == row["train_loss"] and row["train_loss"] > 0  # finite
    assert "1 step(s) skipped" in captured.out


def test_allow_nonfinite_trains_on(
    tmp_path: Path, fmnist_dir: Path, capsys: pytest.CaptureFixture, nan_first_batch: None
) -> None:
    out = tmp_path / "out"
    assert run(fmnist_dir, out, "--optimizers", "sgd", "--epochs", "1", "--allow-nonfinite") == 0
    (row,) = RunStore(run_path(out, "sgd")).metrics()
    assert row["nonfinite_batches"] == 2  # the NaN weights spoil the second batch as well
    assert "warning:" in capsys.readouterr().out
