"""The transfer suite's workloads and their training loop, on tiny or small data."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from benchdata import make_fmnist
from torch import nn

from arturo import Arturo
from arturo_bench.data import DataNotFoundError
from arturo_bench.workloads import (
    WORKLOADS,
    BatchOrder,
    TensorSplit,
    TokenWindows,
    WorkloadData,
    evaluate,
    get_workload,
    normalized_score,
    steps_to_target,
    train_workload,
    warmup_cosine,
)
from arturo_bench.workloads.datasets import VOCAB_SIZE, encode_chars
from arturo_bench.workloads.metrics import (
    majority_class_accuracy,
    mean_predictor_mse,
    mean_predictor_rmse,
    unigram_cross_entropy,
)

FMNIST_WORKLOADS = ["fmnist_mlp", "fmnist_cnn_small", "fmnist_resnet_bn", "fmnist_autoencoder"]
OFFLINE_WORKLOADS = ["text_transformer", "diabetes_regression", "digits_gru"]
ROW_KEYS = {"step", "train_loss", "metric", "lr", "time_s", "diverged"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def adamw(params):
    return torch.optim.AdamW(params)


@pytest.fixture(scope="module")
def tiny_fmnist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 256 training images: enough for one batch of the largest batch size (128).
    return make_fmnist(tmp_path_factory.mktemp("fmnist"), n_train=256, n_test=40)


@pytest.fixture(scope="module")
def loaded(tiny_fmnist: Path) -> dict[str, WorkloadData]:
    """Each workload's data: tiny IDX files for Fashion-MNIST, the real (small) rest."""
    return {name: w.load(tiny_fmnist, "cpu") for name, w in WORKLOADS.items()}


# ----------------------------------------------------------------------------- registry
def test_registry_holds_seven_families_with_consistent_budgets() -> None:
    assert len(WORKLOADS) >= 7
    assert len({w.family for w in WORKLOADS.values()}) == len(WORKLOADS)
    for name, w in WORKLOADS.items():
        assert w.name == name and get_workload(name) is w
        assert w.metric.direction in ("max", "min")
        assert 0 < w.quick_steps < w.steps
        assert 0 < w.eval_every <= w.steps and 0 < w.quick_eval_every <= w.quick_steps
        for reference in (w.target, w.quick_target, w.trivial):
            assert math.isfinite(reference), name
        # AdamW's defaults beat the trivial predictor, and the full budget beats the quick one.
        assert w.metric.reached(w.target, w.trivial) and w.target != w.trivial
        assert w.metric.reached(w.target, w.quick_target)


def test_unknown_workload_names_the_choices() -> None:
    with pytest.raises(ValueError, match="fmnist_mlp"):
        get_workload("nope")


# ----------------------------------------------------------------------------- data and models
@pytest.mark.parametrize("name", FMNIST_WORKLOADS)
def test_fmnist_workloads_read_idx_files_from_data_dir(
    name: str, loaded: dict[str, WorkloadData]
) -> None:
    data = loaded[name]
    assert len(data.train) == 256 and len(data.test) == 40  # the subsets take all there is
    inputs, targets = data.train.batch(torch.arange(4))
    assert inputs.dtype == torch.float32 and 0.0 <= inputs.min() and inputs.max() <= 1.0
    if name == "fmnist_autoencoder":
        assert targets.shape == (4, 784) and torch.equal(inputs, targets)
    else:
        assert targets.dtype == torch.int64 and targets.shape == (4,)


def test_fmnist_workloads_fail_clearly_without_data(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError, match="Fashion-MNIST not found"):
        get_workload("fmnist_mlp").load(tmp_path, "cpu")


def test_offline_data_splits_are_fixed_and_disjoint(loaded: dict[str, WorkloadData]) -> None:
    diabetes = loaded["diabetes_regression"]
    assert (len(diabetes.train), len(diabetes.test)) == (354, 88)
    assert diabetes.train.targets.min() >= 25 and diabetes.train.targets.max() <= 346  # raw
    again = get_workload("diabetes_regression").load(None, "cpu")
    assert torch.equal(again.test.targets, diabetes.test.targets)
    digits = loaded["digits_gru"]
    assert digits.train.inputs.shape[1:] == (8, 8) and len(digits.test) == 359


def test_text_windows_are_shifted_by_one_and_validation_does_not_overlap(
    loaded: dict[str, WorkloadData],
) -> None:
    text = loaded["text_transformer"]
    assert isinstance(text.train, TokenWindows) and isinstance(text.test, TokenWindows)
    inputs, targets = text.train.batch(torch.tensor([0, 5]))
    assert inputs.shape == targets.shape == (2, 64)
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    assert torch.equal(inputs[1], text.train.tokens[5:69])
    _, val_targets = text.test.batch(torch.arange(len(text.test)))
    covered = val_targets.flatten()
    assert torch.equal(covered, text.test.tokens[1 : 1 + covered.numel()])
    assert len(text.train.tokens) > 400_000 and int(text.train.tokens.max()) < VOCAB_SIZE


def test_characters_outside_the_vocabulary_share_one_token() -> None:
    ids = encode_chars("a\n—“")
    assert ids[2] == ids[3] == VOCAB_SIZE - 1 and ids[0] != ids[1]


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_models_depend_on_the_seed_alone(name: str) -> None:
    w = WORKLOADS[name]
    state = torch.random.get_rng_state()
    a, b, c = w.build_model(3), w.build_model(3), w.build_model(4)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is untouched
    pa, pb, pc = (torch.cat([p.flatten() for p in m.parameters()]) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)


# ----------------------------------------------------------------------------- training
@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_three_steps_of_every_workload(name: str, loaded: dict[str, WorkloadData]) -> None:
    w = WORKLOADS[name]
    history = train_workload(w, adamw, seed=0, data=loaded[name], steps=3)
    assert [row["step"] for row in history] == [3]  # eval_every > 3: only the final row
    row = history[0]
    assert set(row) == ROW_KEYS and not row["diverged"]
    assert math.isfinite(row["train_loss"]) and math.isfinite(row["metric"])
    assert row["time_s"] > 0 and 0 < row["lr"] <= 1e-3
    if w.metric.direction == "max":
        assert 0.0 <= row["metric"] <= 1.0
    else:
        assert row["metric"] > 0.0
    assert math.isfinite(w.trivial_of(loaded[name]))


def test_rows_come_every_eval_interval_and_at_the_end(loaded: dict[str, WorkloadData]) -> None:
    w = dataclasses.replace(get_workload("diabetes_regression"), eval_every=4)
    history = train_workload(w, adamw, seed=0, data=loaded["diabetes_regression"], steps=10)
    assert [row["step"] for row in history] == [4, 8, 10]
    assert history[0]["time_s"] < history[1]["time_s"] < history[2]["time_s"]


def test_runs_are_reproducible_and_seeds_differ(loaded: dict[str, WorkloadData]) -> None:
    w, data = get_workload("digits_gru"), loaded["digits_gru"]

    def final_loss(seed: int) -> float:
        return train_workload(w, adamw, seed=seed, data=data, steps=5)[-1]["train_loss"]

    assert final_loss(0) == final_loss(0) != final_loss(1)


def test_the_schedule_scales_every_optimizer_alike(loaded: dict[str, WorkloadData]) -> None:
    w, data = get_workload("diabetes_regression"), loaded["diabetes_regression"]
    rows = {}
    for name, make in (("adamw", adamw), ("arturo", lambda p: Arturo(p, lr=0.05))):
        w_every = dataclasses.replace(w, eval_every=1)
        rows[name] = train_workload(w_every, make, seed=0, data=data, steps=40)
    multiplier = warmup_cosine(40, w.warmup_fraction)
    for step in range(40):
        assert rows["adamw"][step]["lr"] == pytest.approx(1e-3 * multiplier(step))
        assert rows["arturo"][step]["lr"] == pytest.approx(0.05 * multiplier(step))


def test_warmup_then_cosine_to_zero() -> None:
    f = warmup_cosine(200, 0.05)  # 10 warmup steps
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0) and f(10) == 1.0
    after = [f(s) for s in range(10, 200)]
    assert all(a >= b for a, b in zip(after, after[1:], strict=False))
    assert f(199) < 1e-3 and f(200) == pytest.approx(0.0)


def test_a_diverging_run_is_marked_and_stops(loaded: dict[str, WorkloadData]) -> None:
    for name, worst in (("diabetes_regression", math.inf), ("fmnist_mlp", math.nan)):
        w = dataclasses.replace(get_workload(name), eval_every=5)
        history = train_workload(
            w, lambda p: torch.optim.SGD(p, lr=1e6), seed=0, data=loaded[name], steps=100
        )
        last = history[-1]
        assert last["diverged"] and last["step"] < 100, name
        assert not any(row["diverged"] for row in history[:-1])
        if math.isnan(worst):
            assert math.isnan(last["metric"])
        else:
            assert last["metric"] == worst


def test_on_eval_returning_true_stops_training(loaded: dict[str, WorkloadData]) -> None:
    w = dataclasses.replace(get_workload("digits_gru"), eval_every=2)
    seen = []

    def prune(row: dict) -> bool:
        seen.append(row["step"])
        return row["step"] >= 4

    history = train_workload(w, adamw, seed=0, data=loaded["digits_gru"], steps=10, on_eval=prune)
    assert seen == [2, 4] and [row["step"] for row in history] == [2, 4]


def test_progress_bar_does_not_change_the_result(loaded: dict[str, WorkloadData]) -> None:
    w, data = get_workload("diabetes_regression"), loaded["diabetes_regression"]
    plain = train_workload(w, adamw, seed=0, data=data, steps=5)
    shown = train_workload(w, adamw, seed=0, data=data, steps=5, progress=True)
    assert plain[-1]["metric"] == shown[-1]["metric"]


def test_evaluate_restores_the_training_mode(loaded: dict[str, WorkloadData]) -> None:
    w = get_workload("fmnist_resnet_bn")
    model = w.build_model(0)
    evaluate(w, model, loaded["fmnist_resnet_bn"].test)
    assert model.training
    model.eval()
    evaluate(w, model, loaded["fmnist_resnet_bn"].test)
    assert not model.training


# ----------------------------------------------------------------------------- batch order
def test_batch_order_is_a_pure_function_of_seed_and_step() -> None:
    forward = BatchOrder(10, 3, seed=7, device="cpu")
    batches = [forward.indices(step).tolist() for step in range(9)]
    backward = BatchOrder(10, 3, seed=7, device="cpu")
    assert [backward.indices(step).tolist() for step in reversed(range(9))] == batches[::-1]
    for epoch in range(3):  # 3 full batches per epoch, 10th example dropped, no repeats
        seen = sum(batches[3 * epoch : 3 * epoch + 3], [])
        assert len(set(seen)) == 9 and set(seen) <= set(range(10))
    assert batches[:3] != batches[3:6]
    other_seed = BatchOrder(10, 3, seed=8, device="cpu")
    assert [other_seed.indices(step).tolist() for step in range(9)] != batches


def test_batch_order_needs_one_full_batch() -> None:
    with pytest.raises(ValueError, match="one batch"):
        BatchOrder(3, 4, seed=0, device="cpu")


# ----------------------------------------------------------------------------- read-offs
def test_steps_to_target_is_the_first_eval_that_reaches_it() -> None:
    history = [
        {"step": 100, "metric": 0.5},
        {"step": 200, "metric": math.nan},
        {"step": 300, "metric": 0.8},
        {"step": 400, "metric": 0.7},
        {"step": 500, "metric": 0.9},
    ]
    assert steps_to_target(history, 0.8, "max") == 300
    assert steps_to_target(history, 0.85, "max") == 500
    assert steps_to_target(history, 0.95, "max") is None
    assert steps_to_target(history, 0.7, "min") == 100
    assert steps_to_target(history, 0.4, "min") is None
    assert steps_to_target([], 0.1, "max") is None
    with pytest.raises(ValueError, match="direction"):
        steps_to_target(history, 0.8, "up")


def test_normalized_score_maps_trivial_to_zero_and_target_to_one() -> None:
    for w in WORKLOADS.values():
        assert normalized_score(w, w.trivial) == pytest.approx(0.0)
        assert normalized_score(w, w.target) == pytest.approx(1.0)
        assert normalized_score(w, w.quick_target, quick=True) == pytest.approx(1.0)
    rmse = get_workload("diabetes_regression")
    assert normalized_score(rmse, math.inf) == -math.inf


def test_trivial_predictors_on_crafted_data() -> None:
    labels = WorkloadData(
        TensorSplit(torch.zeros(5, 1), torch.tensor([1, 1, 1, 0, 2])),
        TensorSplit(torch.zeros(4, 1), torch.tensor([1, 0, 0, 1])),
    )
    assert majority_class_accuracy(labels) == pytest.approx(0.5)
    values = WorkloadData(
        TensorSplit(torch.zeros(2, 1), torch.tensor([[1.0, 0.0], [3.0, 0.0]])),
        TensorSplit(torch.zeros(2, 1), torch.tensor([[2.0, 1.0], [4.0, 1.0]])),
    )
    assert mean_predictor_mse(values) == pytest.approx((0 + 1 + 4 + 1) / 4)
    assert mean_predictor_rmse(values) == pytest.approx(math.sqrt(1.5))
    text = WorkloadData(
        TokenWindows(torch.tensor([0, 1, 1, 1]), context=2),
        TokenWindows(torch.tensor([0, 1, 2]), context=2, stride=2),
    )
    # Train targets 1, 1, 1 -> counts 1 + 3 for token 1, 1 for the others (add-one).
    total = 3 + VOCAB_SIZE
    expected = -(math.log(4 / total) + math.log(1 / total)) / 2
    assert unigram_cross_entropy(text) == pytest.approx(expected)


# ----------------------------------------------------------------------------- real data
def test_stored_trivial_scores_match_the_real_data() -> None:
    for name, w in WORKLOADS.items():
        try:
            data = w.load(None, "cpu")
        except DataNotFoundError:
            continue  # Fashion-MNIST absent: the others are still checked
        # The text corpus varies a little between Python versions (docs/workloads.md).
        tolerance = 0.02 if name == "text_transformer" else 1e-9
        assert w.trivial_of(data) == pytest.approx(w.trivial, abs=tolerance), name


def test_models_have_the_expected_output_shapes(loaded: dict[str, WorkloadData]) -> None:
    for name, w in WORKLOADS.items():
        inputs, targets = loaded[name].test.batch(torch.arange(2))
        with torch.no_grad():
            out = w.build_model(0).eval()(inputs)
        assert isinstance(w.build_model(0), nn.Module)
        if w.metric.name == "test_accuracy":
            assert out.shape == (2, 10), name
        else:
            assert out.shape[: targets.dim()] == targets.shape, name


@pytest.mark.parametrize(
    ("name", "tolerance"), [("diabetes_regression", 0.5), ("digits_gru", 0.015)]
)
def test_adamw_defaults_reproduce_the_quick_target(
    name: str, tolerance: float, loaded: dict[str, WorkloadData]
) -> None:
    """The stored references come from this very loop (other CPUs round a little differently,
    hence the tolerance: half an RMSE unit, about five digits of 359)."""
    w = get_workload(name)
    history = train_workload(w, adamw, seed=0, quick=True, data=loaded[name])
    assert history[-1]["step"] == w.quick_steps
    assert history[-1]["metric"] == pytest.approx(w.quick_target, abs=tolerance)
