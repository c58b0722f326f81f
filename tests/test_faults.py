"""Faults that must never silently ruin a run: gradient spikes, bad hyperparameters set after
construction, foreign or old checkpoints (the optimizer side; the harness has its own)."""

import copy
import math

import pytest
import torch

from arturo import Arturo
from arturo import optimizer as arturo_optimizer

IMPLS = [
    pytest.param({"foreach": False}, id="single"),
    pytest.param({"foreach": True}, id="foreach"),
]
UNITS = ["absolute", "relative"]


def regression(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 20, generator=gen)
    y = x @ (0.1 * torch.randn(20, 1, generator=gen))
    torch.manual_seed(seed)
    return torch.nn.Linear(20, 1), x, y


def train_with_spike(scale: float, steps: int = 200, spike_step: int = 20, **kw):
    """The reviewer's setting: Arturo(lr=0.05) on a linear regression, loss × scale at one
    step. Returns the losses (losses[k] after k steps) and the optimizer."""
    model, x, y = regression()
    opt = Arturo(model.parameters(), lr=0.05, **kw)
    losses = []
    for k in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        losses.append(loss.item())
        (loss * (scale if k == spike_step else 1.0)).backward()
        opt.step()
    return losses, opt


def all_state_finite(opt: Arturo) -> bool:
    tensors = [v for s in opt.state.values() for v in s.values()]
    tensors += [g[k] for g in opt.param_groups for k in arturo_optimizer.GROUP_STATE_DTYPES]
    return all(bool(torch.isfinite(t).all()) for t in tensors)


# ------------------------------------------------------------------------------------------
# Gradient spikes
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("units", UNITS)
@pytest.mark.parametrize("scale", [1e3, 1e6, 1e12, 1e18, 1e30])
def test_a_single_spike_does_not_stop_training(impl, units, scale):
    # Before: 1e18 froze η at inf, 1e30 turned the state to NaN, 1e6-1e12 stalled at ~0.3.
    losses, opt = train_with_spike(scale, units=units, **impl)
    assert all_state_finite(opt)
    assert math.isfinite(opt.stats()[0]["eta"])
    assert losses[199] < losses[21]
    assert losses[199] < 1e-6  # the unspiked run reaches ~5e-10


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("units", UNITS)
@pytest.mark.parametrize("scale", [1e18, 1e30])
def test_without_the_outlier_check_the_state_still_stays_finite(impl, units, scale):
    # The filter's bounded innovation and the dual's overflow guard hold on their own; in
    # relative units a gradient whose Σ g² overflows (1e30) cancels its group's step too.
    losses, opt = train_with_spike(scale, outlier_threshold=math.inf, units=units, **impl)
    assert all_state_finite(opt)
    assert math.isfinite(opt.stats()[0]["eta"])
    assert all(math.isfinite(v) for v in losses)
    if units == "absolute" or scale == 1e30:
        assert opt.stats()[0]["skipped_steps"] > 0  # an overflow cancelled steps
    else:  # 1e18 is just a larger unit to relative units: the step is taken, not cancelled
        assert opt.stats()[0]["skipped_steps"] == 0


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("units", UNITS)
def test_a_spike_is_skipped_and_counted(impl, units):
    spiked, opt = train_with_spike(1e6, steps=30, units=units, **impl)
    clean, _ = train_with_spike(1.0, steps=30, spike_step=-1, units=units, **impl)
    assert opt.stats()[0]["skipped_steps"] == 1
    # The spiked step is dropped, so the run continues as if that batch never came.
    assert spiked[21:] == clean[20:29]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("units", UNITS)
def test_a_lasting_change_of_loss_scale_is_accepted_after_a_few_steps(impl, units):
    model, x, y = regression()
    opt = Arturo(model.parameters(), lr=0.05, units=units, **impl)
    for k in range(60):
        opt.zero_grad()
        (torch.nn.functional.mse_loss(model(x), y) * (1e6 if k >= 20 else 1.0)).backward()
        opt.step()
    skipped = opt.stats()[0]["skipped_steps"]
    assert 1 <= skipped <= 10


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("units", UNITS)
def test_overflowing_dual_cancels_only_its_group(impl, units):
    # Absolute units: the dual's sums overflow; relative units: the gradient's Σ g² does.
    a = torch.nn.Parameter(torch.ones(3))
    b = torch.nn.Parameter(torch.ones(3))
    opt = Arturo(
        [{"params": [a]}, {"params": [b]}], outlier_threshold=math.inf, units=units, **impl
    )
    a.grad, b.grad = torch.full((3,), 1e30), torch.ones(3)
    a0, b0 = a.detach().clone(), b.detach().clone()
    lam_a = None
    opt.step()
    lam_a = opt.state[a]["precision"].clone()
    a.grad, b.grad = torch.full((3,), 1e30), torch.ones(3)
    opt.step()
    stats = opt.stats()
    assert stats[0]["skipped_steps"] >= 1 and stats[1]["skipped_steps"] == 0
    assert torch.equal(a.detach(), a0) and torch.equal(opt.state[a]["precision"], lam_a)
    assert not torch.equal(b.detach(), b0)
    assert all_state_finite(opt)


# ------------------------------------------------------------------------------------------
# Hyperparameters changed after construction
# ------------------------------------------------------------------------------------------


def _stepped(impl=None, **kw):
    model = torch.nn.Linear(4, 2)
    opt = Arturo(model.parameters(), **(impl or {}), **kw)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    return model, opt


@pytest.mark.parametrize("bad", [math.nan, math.inf, -0.1])
def test_invalid_float_lr_set_later_raises_at_step_and_changes_nothing(bad):
    model, opt = _stepped()
    before = [p.detach().clone() for p in model.parameters()]
    opt.param_groups[0]["lr"] = bad
    with pytest.raises(ValueError, match="Invalid lr"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -0.1])
def test_invalid_tensor_lr_cancels_the_groups_step_on_the_device(impl, bad):
    model, opt = _stepped(impl, lr=torch.tensor(0.05))
    before = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict()["state"])
    opt.param_groups[0]["lr"].fill_(bad)
    opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    for i, s in opt.state_dict()["state"].items():
        assert all(torch.equal(v, state[i][k]) for k, v in s.items())
    assert opt.stats()[0]["skipped_steps"] == 1
    assert all_state_finite(opt)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("weight_decay", -1.0),
        ("reg_weight", math.nan),
        ("filter_measurement_noise", 0.0),
        ("precision_inertia", math.inf),
        ("outlier_threshold", 0.5),
    ],
)
def test_other_hyperparameters_set_later_are_checked_where_read(name, value):
    _, opt = _stepped()
    opt.param_groups[0][name] = value
    with pytest.raises(ValueError, match=f"Invalid {name}"):
        opt.step()


# ------------------------------------------------------------------------------------------
# Foreign and old checkpoints
# ------------------------------------------------------------------------------------------


def _snapshot(opt):
    return copy.deepcopy(opt.state_dict())


def _assert_unchanged(opt, snap):
    now = opt.state_dict()
    assert now["param_groups"] == snap["param_groups"] or all(
        set(a) == set(b) for a, b in zip(now["param_groups"], snap["param_groups"], strict=True)
    )
    for i, s in snap["state"].items():
        assert all(torch.equal(v, now["state"][i][k]) for k, v in s.items())


def test_loading_an_adam_state_is_refused_and_changes_nothing():
    model, opt = _stepped()
    adam = torch.optim.Adam(model.parameters())
    adam.step()
    snap = _snapshot(opt)
    with pytest.raises(ValueError, match="not an arTuRO state"):
        opt.load_state_dict(adam.state_dict())
    _assert_unchanged(opt, snap)
    opt.step()  # still usable


def test_loading_a_state_of_other_shapes_is_refused_and_changes_nothing():
    _, other = _stepped()
    model = torch.nn.Linear(5, 2)  # weight (2, 5) instead of (2, 4)
    opt = Arturo(model.parameters())
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    snap = _snapshot(opt)
    with pytest.raises(ValueError, match="shape"):
        opt.load_state_dict(other.state_dict())
    _assert_unchanged(opt, snap)


def test_loading_a_state_with_invalid_hyperparameters_is_refused():
    _, opt = _stepped()
    sd = _snapshot(opt)
    sd["param_groups"][0]["reg_weight"] = -1.0
    with pytest.raises(ValueError, match="reg_weight"):
        opt.load_state_dict(sd)


def test_a_format_1_checkpoint_loads_and_resumes():
    """Format 1 (before versioning): implementation options in each group, no grad_scale,
    no outlier_threshold and no version key."""
    model, opt = _stepped()
    sd = _snapshot(opt)
    del sd[arturo_optimizer.STATE_FORMAT_KEY]
    for g in sd["param_groups"]:
        g.update(foreach=None, fused=None, newton_steps=3)
        del g["grad_scale"], g["outlier_threshold"]
    opt2 = Arturo(model.parameters())
    opt2.load_state_dict(sd)
    group = opt2.param_groups[0]
    assert "foreach" not in group and group["outlier_threshold"] == 100.0
    assert float(group["grad_scale"]) == 0.0
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt2.step()
    assert opt2.state_dict()[arturo_optimizer.STATE_FORMAT_KEY] == arturo_optimizer.STATE_FORMAT


def test_a_newer_format_is_refused():
    _, opt = _stepped()
    sd = _snapshot(opt)
    sd[arturo_optimizer.STATE_FORMAT_KEY] = arturo_optimizer.STATE_FORMAT + 1
    with pytest.raises(ValueError, match="upgrade arturo"):
        opt.load_state_dict(sd)
