from __future__ import annotations

import pytest

from arturo_bench import configs as C
from arturo_bench.optimizers import build_optimizer


def test_all_six_experiments_with_published_schedule() -> None:
    assert set(C.EXPERIMENTS) == {
        "fmnist_cnn",
        "fmnist_resnet18",
        "cifar10_cnn",
        "cifar10_resnet34",
        "cifar100_cnn",
        "cifar100_resnet34",
    }
    for name, exp in C.EXPERIMENTS.items():
        assert exp.batch_size == exp.test_batch_size == 255
        fm = name.startswith("fmnist")
        assert (exp.epochs, exp.milestones) == ((120, (60, 90)) if fm else (160, (80, 120)))
        assert set(exp.optimizers) == {"arturo", "adam", "adamw", "sgd"}
        assert exp.optimizers["arturo"].gamma == 0.006
        assert all(exp.optimizers[o].gamma == 0.1 for o in ("adam", "adamw", "sgd"))


def test_published_values_spot_check() -> None:
    a = C.EXPERIMENTS["cifar10_resnet34"].optimizers["arturo"]
    assert a.lr == 0.007132920002311371 and a.filter_measurement_noise == 9.328440015416716
    assert a.weight_decay == 0.0007029104518730781 and a.init_curvature == 0.1
    assert C.EXPERIMENTS["fmnist_cnn"].optimizers["sgd"].momentum == 0.8657299202128064
    assert C.EXPERIMENTS["cifar100_resnet34"].optimizers["adamw"].lr == 0.001245107913473811


def test_adam_ignores_weight_decay_as_published() -> None:
    import torch

    cfg = C.EXPERIMENTS["cifar10_cnn"].optimizers["adam"]
    assert cfg.weight_decay > 0 and not cfg.apply_weight_decay
    opt = build_optimizer(cfg, [torch.zeros(2, requires_grad=True)], num_train=10)
    assert opt.param_groups[0]["weight_decay"] == 0.0
    assert opt.param_groups[0]["betas"] == (cfg.beta1, cfg.beta2)


def test_overrides() -> None:
    exp = C.apply_overrides(
        C.get_experiment("fmnist_cnn"),
        ["arturo.lr=0.05", "epochs=3", "milestones=1,2", "adam.apply_weight_decay=true"],
    )
    assert exp.optimizers["arturo"].lr == 0.05 and exp.epochs == 3
    assert exp.milestones == (1, 2) and exp.optimizers["adam"].apply_weight_decay is True
    assert C.EXPERIMENTS["fmnist_cnn"].optimizers["arturo"].lr != 0.05  # registry untouched
    assert C.apply_overrides(exp, ["milestones="]).milestones == ()
    assert C.apply_overrides(exp, ["ivon.lr=0.2"]).optimizers["ivon"].lr == 0.2
    for bad, match in [
        ("arturo.nope=1", "has no field 'nope'"),
        ("epochs=abc", "cannot parse"),
        ("lion.lr=1", "no optimizer 'lion'"),
        ("epochs", "KEY=VALUE"),
    ]:
        with pytest.raises(ValueError, match=match):
            C.apply_overrides(exp, [bad])


def test_scale_epochs_matches_the_shortened_schedule() -> None:
    exp = C.scale_epochs(C.get_experiment("fmnist_cnn"), 40)
    assert (exp.epochs, exp.milestones) == (40, (20, 30))
    # Never a milestone 0: MultiStepLR would decay before the first epoch.
    assert C.scale_epochs(C.get_experiment("fmnist_cnn"), 1).milestones == (1,)
    with pytest.raises(ValueError, match="milestones must be >= 1"):
        C.apply_overrides(exp, ["milestones=0,5"])
