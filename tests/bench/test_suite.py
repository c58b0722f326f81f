"""The transfer suite: settings, `:tuned` names, table and profile math, and a 2-step
end-to-end `arturo-bench suite` on tiny data."""

from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path

import pytest
import torch
from benchdata import make_fmnist

import arturo_bench.suite.runner as runner_mod
from arturo import Arturo
from arturo.optimizer import HYPERPARAMETERS, PRESETS
from arturo_bench.cli import main
from arturo_bench.configs import AdamWConfig
from arturo_bench.suite import (
    SUITE_DEFAULTS,
    arturo_defaults,
    parse_optimizer,
    resolve_optimizer,
)
from arturo_bench.suite.report import SuiteData, render_markdown, run_result
from arturo_bench.suite.runner import plan_suite
from arturo_bench.suite.settings import TunedSettingsUnavailable, parse_overrides
from arturo_bench.suite.tables import RunResult, cell, median_steps, performance_profile, winners
from arturo_bench.workloads import get_workload

WORKLOADS = ["fmnist_mlp", "diabetes_regression"]  # one max metric, one min metric


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_fmnist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 256 training images: one batch of fmnist_mlp's 128.
    return make_fmnist(tmp_path_factory.mktemp("fmnist"), n_train=256, n_test=40)


def suite(out: Path, data_dir: Path, *args: str) -> int:
    return main(
        [
            "suite",
            "--out",
            str(out),
            "--data-dir",
            str(data_dir),
            "--workloads",
            *WORKLOADS,
            "--optimizers",
            "arturo",
            "adamw",
            "--steps",
            "2",
            "--no-progress",
            *args,
        ]
    )


# ----------------------------------------------------------------------------- settings
@pytest.mark.parametrize("units", ["absolute", "relative"])
def test_arturo_defaults_are_the_constructors(units: str) -> None:
    built = Arturo([torch.zeros(1, requires_grad=True)], units=units).defaults
    kwargs = arturo_defaults(units).optimizer_kwargs()
    for name in HYPERPARAMETERS:
        if name in kwargs:
            assert kwargs[name] == built[name], name


def test_each_arturo_name_holds_its_modes_preset() -> None:
    """``arturo`` stays the published settings in absolute units; ``arturo-relative`` is the
    library's relative-units preset, field for field."""
    for name, units in (("arturo", "absolute"), ("arturo-relative", "relative")):
        resolved = resolve_optimizer(parse_optimizer(name), "diabetes_regression", quick=True)
        cfg = resolved.config
        assert cfg == SUITE_DEFAULTS[name]() == arturo_defaults(units)
        assert cfg.units == units
        assert {k: getattr(cfg, k) for k in PRESETS[units]} == PRESETS[units]
    relative = parse_optimizer("arturo-relative")
    with pytest.raises(ValueError, match=r"arturo-relative\.units must be 'relative'"):
        resolve_optimizer(
            relative, "diabetes_regression", quick=True, overrides=[("units", "absolute", "k")]
        )


def test_torch_defaults_are_torchs() -> None:
    """The AdamW default defines each workload's target (normalised score 1)."""
    p = [torch.zeros(1, requires_grad=True)]
    for name, optimizer in (("adamw", torch.optim.AdamW), ("adam", torch.optim.Adam)):
        cfg, built = SUITE_DEFAULTS[name](), optimizer(p).defaults
        assert (cfg.lr, (cfg.beta1, cfg.beta2), cfg.weight_decay) == (
            built["lr"],
            built["betas"],
            built["weight_decay"],
        ), name
    sgd = SUITE_DEFAULTS["sgd"]()
    assert (sgd.lr, sgd.momentum, sgd.weight_decay) == (1e-2, 0.9, 0.0)


def test_set_overrides_one_label_and_refuses_the_rest() -> None:
    specs = [parse_optimizer("arturo"), parse_optimizer("adamw")]
    workloads = [get_workload("diabetes_regression")]
    plan = plan_suite(
        workloads, specs, [0], quick=True, overrides=["adamw.lr=3e-3", "arturo.reg_weight=0.5"]
    )
    configs = {r.optimizer.spec.label: r.optimizer.config for r in plan.runs}
    assert configs["adamw"].lr == 3e-3 and configs["adamw"].weight_decay == 1e-2
    assert configs["arturo"].reg_weight == 0.5
    assert configs["arturo"].lr == arturo_defaults().lr
    # Names with a dash: the label is what comes before the first dot.
    relative = [parse_optimizer("arturo"), parse_optimizer("arturo-relative:tuned-quick")]
    grouped = parse_overrides(["arturo-relative:tuned-quick.lr=1e-6", "arturo.lr=0.01"], relative)
    assert grouped == {
        "arturo-relative:tuned-quick": [("lr", "1e-6", "arturo-relative:tuned-quick.lr")],
        "arturo": [("lr", "0.01", "arturo.lr")],
    }
    with pytest.raises(ValueError, match=r"arturo\.units must be 'absolute'"):
        plan_suite(workloads, specs, [0], quick=True, overrides=["arturo.units=relative"])
    for bad, words in (
        ("sgd.lr=0.1", "not among --optimizers"),
        ("adamw.gamma=0.5", "warmup-cosine"),
        ("adamw.lr=-1", "adamw.lr must be"),
        ("adamw.nope=1", "no field"),
        ("lr=0.1", "OPTIMIZER.KEY=VALUE"),
    ):
        with pytest.raises(ValueError, match=words):
            plan_suite(workloads, specs, [0], quick=True, overrides=[bad])


# ----------------------------------------------------------------------------- :tuned
def test_tuned_names_parse() -> None:
    plain, tuned = parse_optimizer("adamw"), parse_optimizer("adamw:tuned")
    assert (plain.tuned, plain.label, plain.dirname) == (False, "adamw", "adamw")
    assert (tuned.tuned, tuned.label, tuned.dirname) == (True, "adamw:tuned", "adamw-tuned")
    assert parse_optimizer("arturo:tuned").name == "arturo"
    relative = parse_optimizer("arturo-relative:tuned-quick")
    assert (relative.name, relative.label, relative.dirname) == (
        "arturo-relative",
        "arturo-relative:tuned-quick",
        "arturo-relative-tuned-quick",
    )
    quick = parse_optimizer("adamw:tuned-quick")
    assert (quick.tuned, quick.tuned_quick, quick.label, quick.dirname) == (
        True,
        True,
        "adamw:tuned-quick",
        "adamw-tuned-quick",
    )
    with pytest.raises(ValueError, match="the variants are adamw:tuned"):
        parse_optimizer("adamw:best")
    with pytest.raises(ValueError, match="unknown optimizer"):
        parse_optimizer("lamb:tuned")
    with pytest.raises(ValueError, match="sampled"):
        parse_optimizer("ivon")


def test_tuned_quick_reads_the_quick_study_at_the_full_budget(tmp_path) -> None:
    pytest.importorskip("optuna")
    from arturo_bench import tune

    storage = f"sqlite:///{tmp_path / 'studies.db'}"
    job = tune.TuneJob(("diabetes_regression",), "adamw", quick=True, steps=3)
    tune.tune(job, storage, 2)
    resolved = resolve_optimizer(
        parse_optimizer("adamw:tuned-quick"), "diabetes_regression", quick=False, storage=storage
    )
    assert resolved.tuned_from["study"] == "diabetes_regression-adamw-quick"
    best = tune.best_params(storage, "diabetes_regression", "adamw", True)
    assert resolved.config.lr == best["lr"]
    assert resolved.config.beta1 == 0.9  # the suite's default where the search did not go


def test_tuned_needs_storage_and_the_tune_module(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = parse_optimizer("adamw:tuned")
    with pytest.raises(TunedSettingsUnavailable, match="--storage"):
        resolve_optimizer(spec, "digits_gru", quick=True)
    monkeypatch.setitem(sys.modules, "arturo_bench.tune", None)  # as if it did not exist
    with pytest.raises(TunedSettingsUnavailable, match="need arturo_bench.tune"):
        resolve_optimizer(spec, "digits_gru", quick=True, storage="sqlite:///x.db")


def test_tuned_takes_the_best_trials_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tune module's contract: best_params(storage, workload, optimizer, quick) and
    best_config(optimizer, params) give the config the best trial trained with."""
    asked = []
    fake = types.ModuleType("arturo_bench.tune")

    def best_params(storage: str, workload: str, optimizer: str, quick: bool) -> dict:
        asked.append((storage, workload, optimizer, quick))
        return {"lr": 0.004, "weight_decay": 0.05}

    fake.best_params = best_params  # type: ignore[attr-defined]
    fake.best_config = lambda name, params: AdamWConfig(  # type: ignore[attr-defined]
        beta1=0.9, beta2=0.999, **params
    )
    fake.study_name = lambda w, o, q: f"{w}-{o}" + ("-quick" if q else "")  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "arturo_bench.tune", fake)
    resolved = resolve_optimizer(
        parse_optimizer("adamw:tuned"),
        "digits_gru",
        quick=True,
        overrides=[("beta2", "0.99", "adamw:tuned.beta2")],
        storage="sqlite:///t.db",
    )
    assert asked == [("sqlite:///t.db", "digits_gru", "adamw", True)]
    cfg = resolved.config
    assert (cfg.lr, cfg.weight_decay, cfg.beta2) == (0.004, 0.05, 0.99)
    assert resolved.tuned_from == {"storage": "sqlite:///t.db", "study": "digits_gru-adamw-quick"}


# ----------------------------------------------------------------------------- table math
def history(metrics: list[float], every: int = 100, diverged: bool = False) -> list[dict]:
    return [
        {"step": every * (i + 1), "metric": m, "diverged": diverged and i == len(metrics) - 1}
        for i, m in enumerate(metrics)
    ]


def crafted(runs: dict[tuple[str, str, int], list[dict]], quick: bool = True) -> SuiteData:
    data = SuiteData(
        quick=quick,
        steps=None,
        workloads=list(dict.fromkeys(w for w, _, _ in runs)),
        optimizers=list(dict.fromkeys(o for _, o, _ in runs)),
        seeds=sorted({s for _, _, s in runs}),
        commands=["arturo-bench suite --out X --quick"],
    )
    for (w, o, s), h in runs.items():
        config = {"workload": w, "optimizer": o, "seed": s, "quick": quick}
        data.results.append(run_result(config, h))
    return data


def table_row(markdown: str, first_cell: str) -> list[str]:
    line = next(x for x in markdown.splitlines() if x.startswith(f"| {first_cell} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_winner_marking_respects_direction_and_divergence() -> None:
    mlp, rmse = get_workload("fmnist_mlp"), get_workload("diabetes_regression")
    data = crafted(
        {
            ("fmnist_mlp", "arturo", 0): history([0.5, 0.86]),
            ("fmnist_mlp", "arturo", 1): history([0.5, 0.88]),
            ("fmnist_mlp", "adamw", 0): history([0.5, 0.80]),
            ("fmnist_mlp", "adamw", 1): history([0.5, 0.82]),
            ("diabetes_regression", "arturo", 0): history([70.0, 60.0]),
            ("diabetes_regression", "adamw", 0): history([70.0, 55.0]),
            ("diabetes_regression", "adamw", 1): history([70.0, 57.0]),
            ("diabetes_regression", "sgd", 0): history([70.0, 1.0], diverged=True),
        }
    )
    md = render_markdown(data)
    mlp_row = table_row(md, "fmnist_mlp")
    assert mlp_row[1] == "test_accuracy ↑"
    assert mlp_row[2] == "**0.87 ± 0.014**" and "**" not in mlp_row[3]
    assert mlp_row[4] == "not run"
    rmse_row = table_row(md, "diabetes_regression")
    assert rmse_row[1] == "test_rmse ↓"
    # lower wins for an error; a diverged run never does, and a missing seed shows n
    assert rmse_row[2] == "60 (n=1)" and rmse_row[3] == "**56 ± 1.4**"
    assert rmse_row[4].startswith("diverged")
    score = table_row(md, "mean normalised score")
    expected = {
        "arturo": (0.87 - mlp.trivial) / (mlp.quick_target - mlp.trivial) / 2
        + (60.0 - rmse.trivial) / (rmse.quick_target - rmse.trivial) / 2,
        "adamw": (0.81 - mlp.trivial) / (mlp.quick_target - mlp.trivial) / 2
        + (56.0 - rmse.trivial) / (rmse.quick_target - rmse.trivial) / 2,
    }
    assert score[2].strip("*") == f"{expected['arturo']:.3f}"
    assert score[3].strip("*") == f"{expected['adamw']:.3f}"
    assert score[4] == "— (1 diverged)"
    best = max(expected, key=expected.get)  # type: ignore[arg-type]
    assert score[2 if best == "arturo" else 3].startswith("**")


def test_winners_ties_and_empty() -> None:
    def results(*finals: float) -> list[RunResult]:
        return [RunResult("w", "o", i, f, None) for i, f in enumerate(finals)]

    cells = {"a": cell(results(1.0, 3.0)), "b": cell(results(2.0)), "c": cell([])}
    assert winners(cells, "max") == {"a", "b"}  # 2.0 each: a tie
    assert winners(cells, "min") == {"a", "b"}
    assert winners({"c": cell([])}, "max") == set()
    assert winners({"d": cell(results(math.nan))}, "max") == set()


def test_median_steps_counts_unreached_as_infinite() -> None:
    def runs(*steps: int | None) -> list[RunResult]:
        return [RunResult("w", "o", i, 0.0, s) for i, s in enumerate(steps)]

    assert median_steps(runs(100, None, 300)) == 300
    assert median_steps(runs(100, None, None)) == math.inf
    assert median_steps(runs(100, 200)) == 150
    assert median_steps([]) == math.inf


def test_performance_profile_fractions() -> None:
    inf = math.inf
    steps = {
        "w1": {"a": 100, "b": 200},
        "w2": {"a": 300, "b": 150},
        "w3": {"a": inf, "b": 400},
        "w4": {"a": inf, "b": inf},  # reached by nobody: counts against both
        "w5": {"b": 50},  # a did not run: never within
    }
    profile = performance_profile(steps, ["a", "b"], [1.0, 1.5, 2.0, 4.0])
    assert profile["a"] == [0.2, 0.2, 0.4, 0.4]
    assert profile["b"] == [0.6, 0.6, 0.8, 0.8]


def test_steps_to_target_and_profile_in_the_report() -> None:
    target = get_workload("digits_gru").quick_target
    hit, miss = target + 0.01, target - 0.2
    data = crafted(
        {
            ("digits_gru", "arturo", 0): history([miss, hit, hit]),  # step 200
            ("digits_gru", "arturo", 1): history([miss, miss, hit]),  # step 300
            ("digits_gru", "adamw", 0): history([hit, hit, hit]),  # step 100
            ("digits_gru", "adamw", 1): history([miss, miss, miss]),
        }
    )
    md = render_markdown(data)
    row = table_row(md.split("## Steps to target")[1], "digits_gru")
    assert row[1] == f"test_accuracy ≥ {target:.4g}"
    assert row[2] == "250" and row[3] == "— (1/2 seeds)"
    profile = md.split("## Performance profile")[1]
    assert table_row(profile, "arturo")[1:] == ["1.00", "1.00", "1.00", "1.00"]
    assert table_row(profile, "adamw")[1:] == ["0.00", "0.00", "0.00", "0.00"]


# ----------------------------------------------------------------------------- end to end
def test_suite_end_to_end_skip_and_conflict(
    tmp_path: Path,
    tiny_fmnist: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "suite"
    assert suite(out, tiny_fmnist, "--seeds", "0", "1") == 0
    printed = capsys.readouterr().out
    assert "8 runs trained, 0 skipped" in printed
    for w in WORKLOADS:
        for o in ("arturo", "adamw"):
            for seed in (0, 1):
                run = out / w / o / f"seed{seed}"
                rows = json.loads((run / "history.json").read_text())
                assert [r["step"] for r in rows] == [2]
                config = json.loads((run / "config.json").read_text())
                assert (config["workload"], config["optimizer"], config["seed"]) == (w, o, seed)
                assert config["steps"] == 2 and config["quick"] is False
                assert config["environment"]["torch"] == torch.__version__
    arturo_cfg = json.loads((out / "fmnist_mlp/arturo/seed0/config.json").read_text())
    assert arturo_cfg["hyperparameters"]["lr"] == arturo_defaults().lr
    assert "gamma" not in arturo_cfg["hyperparameters"]
    md = (out / "suite.md").read_text()
    assert "| workload | metric | arturo | adamw |" in md
    assert table_row(md, "fmnist_mlp") and table_row(md, "diabetes_regression")
    assert "mean normalised score" in md and "finished runs: 8 of 8" in md
    assert "--steps 2" in md and "smoke test" in md
    assert (out / "performance_profile.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # A re-run trains nothing: every run is finished.
    def no_training(*args: object, **kwargs: object) -> list:
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(runner_mod, "train_workload", no_training)
    assert suite(out, tiny_fmnist, "--seeds", "0", "1") == 0
    assert "8 of 8 runs already finished: skipped" in capsys.readouterr().out

    # Other settings for a finished run: refused, naming the setting; nothing changes.
    before = (out / "fmnist_mlp/adamw/seed0/config.json").read_text()
    assert suite(out, tiny_fmnist, "--seeds", "0", "--set", "adamw.lr=3e-3") == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "hyperparameters.lr" in err
    assert (out / "fmnist_mlp/adamw/seed0/config.json").read_text() == before
    assert "3e-3" not in (out / "suite.json").read_text()  # a refused command is not listed
    # ... as is another budget in the same directory.
    assert suite(out, tiny_fmnist, "--quick") == 2
    assert "use another --out" in capsys.readouterr().err


def test_suite_runs_arturo_relative_end_to_end(
    tmp_path: Path, tiny_fmnist: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "suite"
    args = ["suite", "--out", str(out), "--data-dir", str(tiny_fmnist), "--no-progress"]
    args += ["--workloads", "diabetes_regression", "--optimizers", "arturo-relative"]
    assert main([*args, "--steps", "2"]) == 0
    assert "1 runs trained, 0 skipped" in capsys.readouterr().out
    run = out / "diabetes_regression/arturo-relative/seed0"
    assert [r["step"] for r in json.loads((run / "history.json").read_text())] == [2]
    config = json.loads((run / "config.json").read_text())
    assert config["optimizer"] == "arturo-relative"
    assert config["hyperparameters"]["units"] == "relative"
    assert config["hyperparameters"]["lr"] == PRESETS["relative"]["lr"]
    assert "| workload | metric | arturo-relative |" in (out / "suite.md").read_text()


def test_arturo_runs_recorded_before_units_existed_are_absolute(
    tmp_path: Path, tiny_fmnist: Path, capsys: pytest.CaptureFixture
) -> None:
    """A finished ``arturo`` run whose config.json has no ``units`` (an older harness) holds
    the settings of today's ``arturo``: a re-run skips it rather than refusing it."""
    out = tmp_path / "suite"
    args = ["suite", "--out", str(out), "--data-dir", str(tiny_fmnist), "--no-progress"]
    args += ["--workloads", "diabetes_regression", "--optimizers", "arturo", "--steps", "2"]
    assert main(args) == 0
    config_path = out / "diabetes_regression/arturo/seed0/config.json"
    config = json.loads(config_path.read_text())
    del config["hyperparameters"]["units"]
    config_path.write_text(json.dumps(config))
    capsys.readouterr()
    assert main(args) == 0
    assert "1 of 1 runs already finished: skipped" in capsys.readouterr().out
    config["hyperparameters"]["units"] = "relative"  # not what `arturo` means: refused
    config_path.write_text(json.dumps(config))
    assert main(args) == 2
    assert "hyperparameters.units" in capsys.readouterr().err


def test_unfinished_run_restarts_and_report_only(
    tmp_path: Path,
    tiny_fmnist: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "suite"
    assert suite(out, tiny_fmnist) == 0
    capsys.readouterr()
    (out / "diabetes_regression/adamw/seed0/history.json").unlink()  # as if interrupted
    (out / "suite.md").unlink()
    trained = []
    real = runner_mod.train_workload

    def counting(workload, *args, **kwargs):  # type: ignore[no-untyped-def]
        trained.append(workload.name)
        return real(workload, *args, **kwargs)

    monkeypatch.setattr(runner_mod, "train_workload", counting)
    assert suite(out, tiny_fmnist) == 0
    assert trained == ["diabetes_regression"]
    assert "1 runs trained, 3 skipped" in capsys.readouterr().out
    (out / "suite.md").unlink()
    assert main(["suite", "--out", str(out), "--report-only"]) == 0
    assert "finished runs: 4 of 4" in (out / "suite.md").read_text()
    assert main(["suite", "--out", str(tmp_path / "empty"), "--report-only"]) == 2
    assert suite(out, tiny_fmnist, "--threads", "0") == 2
    assert "--threads must be >= 1" in capsys.readouterr().err


def test_list_shows_the_suite_workloads(capsys: pytest.CaptureFixture) -> None:
    assert main(["list"]) == 0
    printed = capsys.readouterr().out
    suite_part = printed.split("transfer suite workloads")[1]
    for name in ("fmnist_mlp", "text_transformer", "fmnist_autoencoder"):
        line = next(x for x in suite_part.splitlines() if x.strip().startswith(name))
        w = get_workload(name)
        assert w.family in line and w.metric.name in line
        assert str(w.steps) in line and str(w.quick_steps) in line
    suite_optimizers = next(x for x in suite_part.splitlines() if "suite optimizers" in x)
    assert "arturo, arturo-relative," in suite_optimizers
