"""``arturo-bench tune``: Optuna studies on tiny budgets of the offline workloads."""

from __future__ import annotations

import math
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from optuna.trial import TrialState

from arturo_bench import tune as tune_mod
from arturo_bench.cli import main
from arturo_bench.configs import OPTIMIZERS
from arturo_bench.tune import (
    SCORE_FLOOR,
    Dimension,
    NotTunedError,
    TuneJob,
    base_config,
    best_config,
    best_params,
    best_params_across,
    clipped_score,
    finished_trials,
    load_search_spaces,
    tune,
)
from arturo_bench.workloads import get_workload

ROOT = Path(__file__).resolve().parents[2]
STEPS = "20"  # a tiny budget: one evaluation, at the end


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def storage_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'studies' / 'tune.db'}"


def tune_cli(url: str, *extra: str, workload: str = "diabetes_regression") -> int:
    args = [workload] if workload else []
    return main(["tune", *args, "--storage", url, "--device", "cpu", "--steps", STEPS, *extra])


def load(url: str, name: str = "diabetes_regression-adamw-quick") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=url)


# ----------------------------------------------------------------------------- search spaces
def test_packaged_search_spaces() -> None:
    spaces = load_search_spaces()
    assert set(spaces) == {"adamw", "adam", "sgd", "arturo", "arturo-relative"}
    adamw = {d.name: d for d in spaces["adamw"]}
    assert (adamw["lr"].low, adamw["lr"].high, adamw["lr"].log) == (1e-5, 1e-1, True)
    assert (adamw["weight_decay"].low, adamw["weight_decay"].high) == (1e-6, 1.0)
    arturo = spaces["arturo"]
    assert len(arturo) <= 4 and all(d.log for d in arturo)
    assert {d.target for d in arturo} == {
        "lr",
        "reg_weight",
        "filter_measurement_noise",
        "filter_process_noise",
    }
    for name, space in spaces.items():
        assert 1 <= len(space) <= 4, name  # comparable sizes
    (one_minus,) = [d for d in spaces["adam"] if d.target == "beta2"]
    assert one_minus.field_value(one_minus.low) == pytest.approx(0.9999)
    assert one_minus.field_value(one_minus.high) == pytest.approx(0.9)


def test_arturo_relative_space_is_arturos_centred_on_the_relative_preset() -> None:
    from arturo.optimizer import PRESETS

    spaces = load_search_spaces()
    relative = {d.target: d for d in spaces["arturo-relative"]}
    assert set(relative) == {d.target for d in spaces["arturo"]}
    assert all(d.log for d in relative.values())
    for field, dim in relative.items():
        assert dim.low < PRESETS["relative"][field] < dim.high, field
    assert (relative["lr"].low, relative["lr"].high) == (1e-9, 1e-4)  # a budget per coordinate
    assert (relative["reg_weight"].low, relative["reg_weight"].high) == (0.1, 1000.0)


def test_search_spaces_ship_with_the_package() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "search_spaces.yaml" in pyproject["tool"]["setuptools"]["package-data"]["arturo_bench"]
    bench = " ".join(pyproject["project"]["optional-dependencies"]["bench"])
    assert "optuna" in bench and "PyYAML" in bench
    assert not any("optuna" in d for d in pyproject["project"]["dependencies"])


def test_a_bad_search_space_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "spaces.yaml"
    bad.write_text("sgd:\n  lr: {low: 0.0, high: 1.0, log: true}\n")
    with pytest.raises(ValueError, match="low > 0"):
        load_search_spaces(bad)
    bad.write_text("sgd:\n  nesterov: {low: 0.0, high: 1.0}\n")
    with pytest.raises(ValueError, match="not a field"):
        load_search_spaces(bad)


def test_base_configs_are_the_defaults() -> None:
    assert base_config("adamw") == OPTIMIZERS["adamw"](
        lr=1e-3, beta1=0.9, beta2=0.999, weight_decay=1e-2
    )
    from arturo import Arturo

    arturo = base_config("arturo", ["arturo.weight_decay=0"])
    published = Arturo([torch.zeros(1, requires_grad=True)], units="absolute").defaults
    assert arturo.units == "absolute" and arturo.lr == published["lr"]
    assert arturo.weight_decay == 0.0
    with pytest.raises(ValueError, match="no field"):
        base_config("sgd", ["nesterov=1"])


# ----------------------------------------------------------------------------- studies
def test_interrupted_study_resumes_and_the_interrupted_trial_does_not_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    url = storage_url(tmp_path)
    calls = {"n": 0}
    real = tune_mod.train_workload

    def interrupt_third(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the third trial
        return real(*args, **kwargs)

    monkeypatch.setattr(tune_mod, "train_workload", interrupt_third)
    common = ("--optimizer", "adamw", "--quick")
    assert tune_cli(url, *common, "--trials", "4") == 130
    assert "re-run the same command" in capsys.readouterr().err
    monkeypatch.setattr(tune_mod, "train_workload", real)
    assert tune_cli(url, *common, "--trials", "2") == 0

    study = load(url)
    states = [t.state for t in study.trials]
    assert states == [TrialState.COMPLETE] * 2 + [TrialState.FAIL] + [TrialState.COMPLETE] * 2
    assert len(finished_trials(study)) == 4
    lrs = [t.params["lr"] for t in study.trials]
    assert len(set(lrs)) == 5  # a resumed session does not replay the first one's draws
    done = study.trials[0]
    assert done.user_attrs["history"][-1]["step"] == int(STEPS)
    assert done.user_attrs["config"]["lr"] == done.params["lr"]
    assert done.user_attrs["wall_time_s"] > 0
    assert done.intermediate_values == {int(STEPS): done.value}  # reported for the pruner


@pytest.mark.slow  # a second Python process (imports torch and Optuna): ~10 s
def test_a_killed_trial_is_marked_failed_by_its_missing_heartbeat(tmp_path: Path) -> None:
    url = storage_url(tmp_path)
    args = ["tune", "diabetes_regression", "--optimizer", "adamw", "--storage", url]
    args += ["--device", "cpu", "--steps", STEPS, "--heartbeat", "1"]
    # The child hangs in its second trial, as if training were slow, and is killed there.
    script = (
        "import sys, time\n"
        "from arturo_bench import tune\n"
        "from arturo_bench.cli import main\n"
        "real, calls = tune.train_workload, []\n"
        "def slow(*a, **k):\n"
        "    calls.append(1)\n"
        "    if len(calls) == 2:\n"
        "        time.sleep(600)\n"
        "    return real(*a, **k)\n"
        "tune.train_workload = slow\n"
        f"sys.exit(main({[*args, '--trials', '3']!r}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    child = subprocess.Popen([sys.executable, "-c", script], env=env)
    try:
        _wait_for_running_trial(url, "diabetes_regression-adamw", child)
        time.sleep(1.5)  # a heartbeat or two
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    finally:
        if child.poll() is None:
            child.kill()
    time.sleep(4.0)  # well past the grace period of two missed heartbeats, even under load
    assert main([*args, "--trials", "1"]) == 0
    study = load(url, "diabetes_regression-adamw")
    assert [t.state for t in study.trials] == [
        TrialState.COMPLETE,
        TrialState.FAIL,
        TrialState.COMPLETE,
    ]
    assert len(finished_trials(study)) == 2


def _wait_for_running_trial(url: str, name: str, child: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert child.poll() is None, "the tune process ended before it could be killed"
        try:
            states = [t.state for t in load(url, name).trials]
        except Exception:  # not created yet, or the file is being written
            states = []
        # Optuna fails only stale trials that have a heartbeat on record; under CPU load the
        # child's heartbeat thread can lag the RUNNING state, so wait for its first beat too.
        if states == [TrialState.COMPLETE, TrialState.RUNNING] and _has_heartbeat(url):
            return
        time.sleep(0.2)
    raise AssertionError("no second trial started within 120 s")


def _has_heartbeat(url: str) -> bool:
    with sqlite3.connect(url.removeprefix("sqlite:///")) as db:
        beats = db.execute(
            "SELECT count(*) FROM trial_heartbeats JOIN trials USING (trial_id)"
            " WHERE trials.state = 'RUNNING'"
        )
        return beats.fetchone()[0] > 0


def test_a_diverging_trial_is_pruned_and_counts(tmp_path: Path) -> None:
    url = storage_url(tmp_path)
    explosive = {"sgd": (Dimension("lr", 1e3, 1e4, log=True),)}
    job = TuneJob(("diabetes_regression",), "sgd", quick=True, steps=int(STEPS))
    study = tune(job, url, trials=2, spaces=explosive)
    assert [t.state for t in study.trials] == [TrialState.PRUNED] * 2
    for trial in study.trials:
        assert trial.user_attrs["history"][-1]["diverged"]
        assert trial.user_attrs["pruned"].startswith("diverged at step")
    with pytest.raises(NotTunedError, match="no completed trial"):
        best_params(url, "diabetes_regression", "sgd", quick=True)


def test_the_pruner_stops_training_at_an_evaluation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Any RMSE above 0 is "bad": the first report prunes, and training stops there.
    monkeypatch.setattr(tune_mod, "_pruner", lambda job: optuna.pruners.ThresholdPruner(upper=0))
    job = TuneJob(("diabetes_regression",), "adamw", quick=True, steps=250)  # evals: 100, 200, 250
    (trial,) = tune(job, storage_url(tmp_path), trials=1).trials
    assert trial.state == TrialState.PRUNED
    assert [row["step"] for row in trial.user_attrs["history"]] == [100]
    assert list(trial.intermediate_values) == [100]


def test_seeded_sampler_makes_studies_reproducible(tmp_path: Path) -> None:
    def params(folder: str) -> list[dict[str, float]]:
        job = TuneJob(("diabetes_regression",), "sgd", quick=True, steps=int(STEPS))
        study = tune(job, storage_url(tmp_path / folder), trials=3)
        return [t.params for t in study.trials]

    assert params("a") == params("b")


def test_resuming_with_other_settings_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = storage_url(tmp_path)
    assert tune_cli(url, "--optimizer", "adamw", "--trials", "1") == 0
    assert tune_cli(url, "--optimizer", "adamw", "--trials", "1", "--seed", "1") == 2
    assert "seed: study has 0, this command 1" in capsys.readouterr().err
    assert tune_cli(url, "--optimizer", "adamw", "--trials", "1", "--set", "lr=0.1") == 2
    assert "searched by tune" in capsys.readouterr().err
    assert len(load(url, "diabetes_regression-adamw").trials) == 1


def test_best_params_map_to_config_fields(tmp_path: Path) -> None:
    url = storage_url(tmp_path)
    job = TuneJob(("diabetes_regression",), "adam", steps=int(STEPS), overrides=("beta1=0.8",))
    study = tune(job, url, trials=2)
    params = best_params(url, "diabetes_regression", "adam", quick=False)
    assert set(params) == {"lr", "beta2", "beta1"} and params["beta1"] == 0.8
    assert params["beta2"] == pytest.approx(1 - study.best_params["one_minus_beta2"])
    assert best_config("adam", params).lr == study.best_params["lr"]
    assert study.best_trial.user_attrs["config"]["beta2"] == params["beta2"]
    with pytest.raises(NotTunedError, match="no study"):
        best_params(url, "diabetes_regression", "adam", quick=True)


def test_tune_arturo_relative_and_read_it_back_in_the_suite(tmp_path: Path) -> None:
    """The unit-free mode is tuned under its own name, and every trial trains it."""
    from arturo_bench.suite import parse_optimizer, resolve_optimizer

    url = storage_url(tmp_path)
    assert tune_cli(url, "--optimizer", "arturo-relative", "--quick", "--trials", "2") == 0
    study = load(url, "diabetes_regression-arturo-relative-quick")
    assert len(finished_trials(study)) == 2
    for trial in study.trials:
        assert trial.user_attrs["config"]["units"] == "relative"
        assert 1e-9 <= trial.user_attrs["config"]["lr"] <= 1e-4
    resolved = resolve_optimizer(
        parse_optimizer("arturo-relative:tuned-quick"),
        "diabetes_regression",
        quick=False,
        storage=url,
    )
    assert resolved.tuned_from["study"] == "diabetes_regression-arturo-relative-quick"
    assert resolved.config.units == "relative"
    assert resolved.config.lr == study.best_params["lr"]
    across = TuneJob(("digits_gru", "diabetes_regression"), "arturo-relative", across=True)
    assert across.name == "across-diabetes_regression+digits_gru-arturo-relative"


# ----------------------------------------------------------------------------- report
def test_report_prints_the_best_trials_and_writes_pngs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = storage_url(tmp_path)
    assert tune_cli(url, "--optimizer", "adamw", "--quick", "--trials", "3") == 0
    capsys.readouterr()
    assert tune_cli(url, "--optimizer", "adamw", "--quick", "--report") == 0
    out = capsys.readouterr().out
    assert "3 trials (3 complete)" in out and "best 3 of 3 completed trials" in out
    study = load(url)
    best = min(study.trials, key=lambda t: t.value)
    assert f"trial {best.number:>4}  value {best.value:.6g}" in out.splitlines()[2]
    folder = tmp_path / "studies"  # next to the SQLite file
    for kind in ("history", "importance"):
        png = folder / f"diabetes_regression-adamw-quick-{kind}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_skips_importance_without_two_completed_trials(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = storage_url(tmp_path)
    assert tune_cli(url, "--optimizer", "sgd", "--trials", "1") == 0
    out_dir = tmp_path / "report"
    assert tune_cli(url, "--optimizer", "sgd", "--report", "--out", str(out_dir)) == 0
    assert "parameter importance: skipped" in capsys.readouterr().out
    assert sorted(p.name for p in out_dir.iterdir()) == ["diabetes_regression-sgd-history.png"]


def test_report_on_a_missing_study_names_the_ones_there(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = storage_url(tmp_path)
    assert tune_cli(url, "--optimizer", "sgd", "--trials", "1") == 0
    assert tune_cli(url, "--optimizer", "adamw", "--report") == 2
    assert "diabetes_regression-sgd" in capsys.readouterr().err
    missing = f"sqlite:///{tmp_path / 'nowhere.db'}"
    assert tune_cli(missing, "--optimizer", "sgd", "--report") == 2
    assert "no storage file" in capsys.readouterr().err
    assert not (tmp_path / "nowhere.db").exists()


# ----------------------------------------------------------------------------- across
def test_tune_across_maximises_the_mean_normalised_score(tmp_path: Path) -> None:
    url = storage_url(tmp_path)
    workloads = ["digits_gru", "diabetes_regression"]
    rc = tune_cli(
        url,
        "--tune-across",
        *workloads,
        "--optimizer",
        "adamw",
        "--quick",
        "--trials",
        "2",
        workload="",
    )
    assert rc == 0
    study = load(url, "across-diabetes_regression+digits_gru-adamw-quick")
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE
    assert len(finished_trials(study)) == 2
    for trial in study.get_trials(states=(TrialState.COMPLETE,)):
        histories, scores = trial.user_attrs["histories"], trial.user_attrs["scores"]
        for name in workloads:
            final = histories[name][-1]["metric"]
            assert scores[name] == clipped_score(get_workload(name), final, quick=True)
        assert trial.value == pytest.approx(np.mean([scores[n] for n in workloads]))
    params = best_params_across(url, workloads, "adamw", quick=True)
    assert set(params) == {"lr", "weight_decay"}


def test_tune_across_prunes_only_the_bottom_quarter() -> None:
    job = TuneJob(("digits_gru", "diabetes_regression"), "adamw", across=True)
    study = optuna.create_study(direction=job.direction, pruner=tune_mod._pruner(job))
    for value in range(8):  # running means 0..7 after the first workload
        trial = study.ask()
        trial.report(float(value), 0)
        study.tell(trial, float(value))

    def pruned(first_mean: float) -> bool:
        trial = study.ask()
        trial.report(first_mean, 0)
        return trial.should_prune()

    assert pruned(1.0) and not pruned(2.5) and not pruned(6.0)


def test_scores_are_floored_and_a_diverged_workload_scores_the_floor() -> None:
    rmse, accuracy = get_workload("diabetes_regression"), get_workload("fmnist_mlp")
    assert clipped_score(rmse, math.inf, quick=True) == SCORE_FLOOR
    assert clipped_score(accuracy, math.nan, quick=False) == SCORE_FLOOR
    assert clipped_score(rmse, 1e6, quick=True) == SCORE_FLOOR  # far worse than trivial
    assert clipped_score(accuracy, accuracy.quick_target, quick=True) == pytest.approx(1.0)
    assert clipped_score(accuracy, accuracy.trivial, quick=True) == pytest.approx(0.0)


def test_tune_needs_exactly_one_of_workload_and_tune_across(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = storage_url(tmp_path)
    assert tune_cli(url, "--optimizer", "sgd", workload="") == 2
    assert "--tune-across" in capsys.readouterr().err
    assert tune_cli(url, "--optimizer", "ivon") == 2
    assert "no search space for 'ivon'" in capsys.readouterr().err
