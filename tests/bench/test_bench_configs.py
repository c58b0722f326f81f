from __future__ import annotations

import dataclasses

import pytest
import torch

from arturo_bench import configs as C
from arturo_bench.optimizers import build_optimizer


@pytest.mark.parametrize("name", sorted(C.EXPERIMENTS))
def test_published_experiments_pass_validation_and_build(name: str) -> None:
    """The transcribed values obey the same rules as --set values, and every optimizer of
    every experiment can be built (a typo in the table would surface here)."""
    exp = C.get_experiment(name)
    C.validate_experiment(exp)
    assert all(m <= exp.epochs for m in exp.milestones)  # every decay happens
    for cfg in exp.optimizers.values():
        build_optimizer(cfg, [torch.zeros(2, requires_grad=True)], num_train=10)


def test_arturo_is_built_from_every_config_field() -> None:
    """Each field but gamma reaches Arturo: set all of them away from their defaults."""
    cfg = C.ArturoConfig(
        lr=0.02,
        reg_weight=0.3,
        filter_measurement_noise=1.5,
        filter_process_noise=0.002,
        weight_decay=1e-3,
        prior_precision=0.002,
        init_variance=0.02,
        precision_inertia=1.1,
        filter_init_cov=6e-5,
        init_curvature=0.2,
        outlier_threshold=50.0,
        newton_steps=5,
        foreach=False,
        fused=False,
        gamma=0.5,
    )
    opt = build_optimizer(cfg, [torch.zeros(2, requires_grad=True)], num_train=10)
    group = opt.param_groups[0]
    expected = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "gamma"}
    # Hyperparameters live in the param group, implementation options on the optimizer.
    built = {k: group[k] if k in group else getattr(opt, k) for k in expected}
    assert built == expected
    assert "gamma" not in group


def test_arturo_implementation_options_from_the_command_line() -> None:
    exp = C.get_experiment("fmnist_cnn")
    default = exp.optimizers["arturo"]
    assert (default.fused, default.foreach, default.newton_steps) == (None, None, 3)
    fused = C.apply_overrides(exp, ["arturo.fused=true", "arturo.newton_steps=4"])
    assert fused.optimizers["arturo"].fused is True and fused.optimizers["arturo"].newton_steps == 4
    for word in ("none", "null", "auto", "None"):
        assert C.apply_overrides(fused, [f"arturo.fused={word}"]).optimizers["arturo"].fused is None
    assert C.apply_overrides(exp, ["arturo.foreach=false"]).optimizers["arturo"].foreach is False
    with pytest.raises(ValueError, match="cannot parse 'maybe'"):
        C.apply_overrides(exp, ["arturo.fused=maybe"])
    with pytest.raises(ValueError, match="fused"):  # Arturo's own rule: not both
        C.apply_overrides(exp, ["arturo.fused=true", "arturo.foreach=true"])


def _every_field() -> list[tuple[str, str]]:
    fields = [
        ("", f.name) for f in dataclasses.fields(C.ExperimentConfig) if f.name != "optimizers"
    ]
    return fields + [
        (o, f.name) for o, cls in C.OPTIMIZERS.items() for f in dataclasses.fields(cls)
    ]


@pytest.mark.parametrize("optimizer,field", _every_field())
def test_every_field_is_validated(optimizer: str, field: str) -> None:
    """NaN is wrong for every field (a number, a flag, a name, a list): each must be refused
    with an error that names the field, so no field can be added without a rule."""
    exp = C.get_experiment("fmnist_cnn")
    if optimizer:  # optimizer_config: the unpublished ones (ivon, arturo-relative) too
        bad = dataclasses.replace(C.optimizer_config(exp, optimizer), **{field: float("nan")})
        exp = dataclasses.replace(exp, optimizers={**exp.optimizers, optimizer: bad})
    else:
        exp = dataclasses.replace(exp, **{field: float("nan")})
    with pytest.raises(ValueError, match=rf"\b{field}\b"):
        C.validate_experiment(exp)


@pytest.mark.parametrize(
    "override,match",
    [
        ("adam.beta2=1", r"adam\.beta2 must be a number in \[0, 1\)"),
        ("adamw.weight_decay=-1", r"adamw\.weight_decay must be a finite number >= 0"),
        ("sgd.momentum=inf", r"sgd\.momentum"),
        ("ivon.mc_samples=0", r"ivon\.mc_samples must be an integer >= 1"),
        ("arturo.reg_weight=-1", r"arturo: .*\breg_weight\b"),
        ("arturo.newton_steps=1", r"arturo: .*\bnewton_steps\b"),
        ("target_acc=1.5", r"target_acc must be a number in \[0, 1\]"),
        ("train_subset=-1", r"train_subset must be an integer >= 0"),
        ("name=../elsewhere", r"name must be .* \(it names a directory\)"),
    ],
)
def test_bad_values_name_the_field_and_the_rule(override: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        C.apply_overrides(C.get_experiment("fmnist_cnn"), [override])


def test_ivon_clip_radius_may_be_infinite() -> None:
    exp = C.apply_overrides(C.get_experiment("fmnist_cnn"), ["ivon.clip_radius=inf"])
    assert exp.optimizers["ivon"].clip_radius == float("inf")


def test_older_run_configs_take_the_defaults_of_newer_fields() -> None:
    saved = {"name": "fmnist_cnn", "optimizer": "arturo", "optimizer_config": {"lr": 0.1}}
    filled = C.with_defaults(saved)
    assert filled["optimizer_config"] == {"lr": 0.1, **_arturo_defaults()}
    assert filled["stats_every"] == C.ExperimentConfig.__dataclass_fields__["stats_every"].default
    assert saved == {"name": "fmnist_cnn", "optimizer": "arturo", "optimizer_config": {"lr": 0.1}}


def test_a_name_means_one_mode_of_units() -> None:
    """``arturo`` is always the published (absolute-units) arTuRO and ``arturo-relative``
    always the unit-free mode: a config of the other mode under a name is refused."""
    assert C.OPTIMIZERS["arturo-relative"] is C.ArturoConfig
    relative = C.arturo_defaults("relative")
    C.validate_optimizer("arturo-relative", relative)
    with pytest.raises(ValueError, match=r"arturo-relative\.units must be 'relative'.*'arturo'"):
        C.validate_optimizer("arturo-relative", dataclasses.replace(relative, units="absolute"))
    with pytest.raises(ValueError, match=r"arturo\.units must be 'absolute'.*'arturo-relative'"):
        C.validate_optimizer("arturo", dataclasses.replace(C.arturo_defaults(), units="relative"))
    exp = C.get_experiment("fmnist_cnn")
    with pytest.raises(ValueError, match=r"arturo\.units must be 'absolute'"):
        C.apply_overrides(exp, ["arturo.units=relative"])
    # The optimizer name is what comes before the first dot, dashes and all.
    with pytest.raises(ValueError, match=r"arturo-relative\.units must be 'relative'"):
        C.apply_overrides(exp, ["arturo-relative.units=absolute"])
    assert C.apply_overrides(exp, ["arturo-relative.lr=1e-6"]).optimizers["arturo-relative"] == (
        dataclasses.replace(relative, lr=1e-6)
    )


def test_run_builds_arturo_relative_on_demand_at_the_relative_preset() -> None:
    """It has no published row: ``run`` takes the library's relative preset, as for ivon."""
    exp = C.get_experiment("fmnist_cnn")
    assert "arturo-relative" not in exp.optimizers
    cfg = C.optimizer_config(exp, "arturo-relative")
    assert cfg == C.arturo_defaults("relative") and cfg.units == "relative"
    opt = build_optimizer(cfg, [torch.zeros(2, requires_grad=True)], num_train=10)
    assert opt.param_groups[0]["units"] == "relative"
    assert opt.param_groups[0]["lr"] == cfg.lr


def test_saved_configs_take_the_units_their_name_means() -> None:
    """Runs saved before ``units`` existed were absolute, the field's default."""
    for name, units in (("arturo", "absolute"), ("arturo-relative", "relative")):
        saved = {"name": "fmnist_cnn", "optimizer": name, "optimizer_config": {"lr": 0.1}}
        assert C.with_defaults(saved)["optimizer_config"]["units"] == units
    kept = {"optimizer": "arturo", "optimizer_config": {"units": "relative"}}
    assert C.with_defaults(kept)["optimizer_config"]["units"] == "relative"  # never rewritten


def _arturo_defaults() -> dict:
    return {
        f.name: f.default
        for f in dataclasses.fields(C.ArturoConfig)
        if f.default is not dataclasses.MISSING
    }


def test_adam_ignores_weight_decay_as_published() -> None:
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
    with pytest.raises(ValueError, match="milestones must be integers >= 1"):
        C.apply_overrides(exp, ["milestones=0,5"])
