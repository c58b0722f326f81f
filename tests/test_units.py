"""units="relative": invariance to the loss scale, the per-coordinate KL budget, tensors with
zero gradients, and state that records its units (docs/algorithm.md, "Relative units")."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from arturo import Arturo
from arturo.optimizer import PRESETS, STATE_FORMAT_KEY

STEPS = 20
PATHS = {"single": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def make_model(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)


def batches(dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        (torch.randn(32, 8, generator=gen).to(dtype), torch.randint(0, 3, (32,), generator=gen))
        for _ in range(STEPS)
    ]


def train(
    scale: float,
    path: str = "foreach",
    dtype: torch.dtype = torch.float32,
    **kwargs: object,
) -> tuple[nn.Module, Arturo]:
    """STEPS steps on a cross-entropy multiplied by ``scale``."""
    model = make_model(dtype)
    opt = Arturo(model.parameters(), **{"units": "relative", **PATHS[path], **kwargs})
    for x, y in batches(dtype):
        opt.zero_grad()
        (nn.functional.cross_entropy(model(x), y) * scale).backward()
        opt.step()
    return model, opt


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("path", ["single", "foreach"])
def test_powers_of_two_leave_the_float32_trajectory_bitwise_unchanged(path):
    base, base_opt = train(1.0, path)
    for k in range(-14, 15):
        c = 2.0**k
        model, opt = train(c, path)
        assert torch.equal(flat_params(model), flat_params(base)), f"loss × 2^{k}"
        for p, q in zip(model.parameters(), base.parameters(), strict=True):
            s, t = opt.state[p], base_opt.state[q]
            assert torch.equal(s["precision"], t["precision"]), f"λ, loss × 2^{k}"
            # The gradient model is in the loss's units: exactly c times the unscaled one.
            assert torch.equal(s["curvature"], t["curvature"] * c), f"h, loss × 2^{k}"
            assert torch.equal(s["grad_intercept"], t["grad_intercept"] * c), f"b, 2^{k}"
        (got,), (ref,) = opt.stats(), base_opt.stats()
        assert got["kl"] == ref["kl"] and got["eta"] == ref["eta"] * c  # η is in loss units


@pytest.mark.slow
def test_powers_of_two_on_the_fused_path():
    base, _ = train(1.0, "fused")
    for k in (-14, -5, 3, 14):
        model, _ = train(2.0**k, "fused")
        assert torch.equal(flat_params(model), flat_params(base)), f"loss × 2^{k}"


@pytest.mark.parametrize("c", [1e-4, 3e-3, 0.37, 7.0, 123.0, 1e4])
def test_other_scales_agree_within_float_rounding(c):
    base, _ = train(1.0)
    model, _ = train(c)
    torch.testing.assert_close(flat_params(model), flat_params(base), rtol=1e-4, atol=1e-6)


def test_absolute_units_are_not_invariant():
    """The check above can fail: the published semantics do depend on the loss scale."""
    base, _ = train(1.0, units="absolute")
    model, _ = train(0.01, units="absolute")
    assert (flat_params(model) - flat_params(base)).abs().max() > 1e-2


@pytest.mark.parametrize("path", ["foreach", pytest.param("fused", marks=pytest.mark.slow)])
def test_every_path_agrees_with_the_reference(path):
    ref, ref_opt = train(1.0, "single", torch.float64)
    got, opt = train(1.0, path, torch.float64)
    torch.testing.assert_close(flat_params(got), flat_params(ref), rtol=1e-9, atol=1e-12)
    for p, q in zip(got.parameters(), ref.parameters(), strict=True):
        for key, value in ref_opt.state[q].items():
            torch.testing.assert_close(opt.state[p][key], value, rtol=1e-9, atol=1e-12)


def test_the_kl_budget_is_per_coordinate():
    model, opt = train(1.0, lr=1e-5)
    d = sum(p.numel() for p in model.parameters())
    (stats,) = opt.stats()
    assert stats["kl_bound"] == pytest.approx(1e-5 * d)
    assert 0.9 * 1e-5 * d <= stats["kl"] <= 1e-5 * d * (1 + 1e-5)  # active and tight


def test_state_holds_the_running_mean_square_gradient():
    """The first step's mean of g² for each tensor, then the running mean of them."""
    model = make_model()
    opt = Arturo(model.parameters(), units="relative")
    seen: dict[nn.Parameter, list[torch.Tensor]] = {p: [] for p in model.parameters()}
    for x, y in batches(torch.float32)[:3]:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        for p in model.parameters():
            seen[p].append(p.grad.square().mean())
        opt.step()
    for p in model.parameters():
        expected = torch.stack(seen[p]).mean()  # the plain mean for the first 100 steps
        torch.testing.assert_close(opt.state[p]["grad_sq_avg"], expected, rtol=1e-5, atol=0)
        assert opt.state[p]["step"] == 3


@pytest.mark.parametrize("path", ["single", "foreach"])
def test_a_tensor_whose_gradients_are_all_zero_is_held(path):
    """It has no gradient scale, so it takes no step (weight decay included) until its first
    non-zero gradient; the rest of the model trains meanwhile."""
    torch.manual_seed(0)
    frozen = nn.Parameter(torch.randn(4, 3))
    live = nn.Parameter(torch.randn(3))
    # A large r keeps the Kalman gain small, so h stays near its start after one update.
    opt = Arturo(
        [frozen, live],
        units="relative",
        weight_decay=10.0,
        lr=1e-3,
        filter_measurement_noise=100.0,
        **PATHS[path],
    )
    before = frozen.detach().clone()
    live_before = live.detach().clone()
    for _ in range(3):
        frozen.grad = torch.zeros_like(frozen)
        live.grad = torch.randn_like(live)
        opt.step()
    assert torch.equal(frozen, before)
    assert opt.state[frozen]["step"] == 0 and opt.state[frozen]["grad_sq_avg"] == 0
    assert all(torch.isfinite(v).all() for v in opt.state[frozen].values())
    assert not torch.equal(live, live_before)
    assert opt.state[live]["step"] == 3
    # Its first non-zero gradient starts it, with h₀ scaled by that gradient's RMS.
    frozen.grad = torch.full_like(frozen, 0.5)
    live.grad = torch.randn_like(live)
    h0 = PRESETS["relative"]["init_curvature"]
    opt.step()
    assert not torch.equal(frozen, before)
    assert opt.state[frozen]["step"] == 1
    assert opt.state[frozen]["grad_sq_avg"] == 0.25
    assert torch.isfinite(frozen).all()
    # The filter moved h from h₀·0.5 by one small Kalman update; without the scaling it
    # would be near h₀ itself.
    assert (opt.state[frozen]["curvature"] - h0 * 0.5).abs().max() < 0.1 * h0 * 0.5


def test_relative_and_absolute_groups_in_one_optimizer():
    """Each group follows its own units; a group in other units than the optimizer's takes
    that mode's defaults for what it leaves out."""
    torch.manual_seed(0)
    a, b = nn.Parameter(torch.randn(5)), nn.Parameter(torch.randn(5))
    opt = Arturo([{"params": [a]}, {"params": [b], "units": "absolute"}], units="relative")
    rel, ab = opt.param_groups
    assert rel["units"] == "relative" and rel["lr"] == PRESETS["relative"]["lr"]
    assert ab["units"] == "absolute" and ab["lr"] == PRESETS["absolute"]["lr"]
    assert ab["reg_weight"] == PRESETS["absolute"]["reg_weight"]
    a.grad, b.grad = torch.randn(5), torch.randn(5)
    opt.step()
    assert "grad_sq_avg" in opt.state[a] and "grad_sq_avg" not in opt.state[b]
    assert opt.stats()[0]["kl_bound"] == pytest.approx(PRESETS["relative"]["lr"] * 5)
    assert opt.stats()[1]["kl_bound"] == pytest.approx(PRESETS["absolute"]["lr"])


def test_presets_are_the_defaults_of_each_mode():
    p = [nn.Parameter(torch.zeros(2))]
    for units, preset in PRESETS.items():
        defaults = Arturo(p, units=units).defaults
        assert {k: defaults[k] for k in preset} == preset
        assert defaults["units"] == units
    # An argument given explicitly wins over the preset.
    assert Arturo(p, units="relative", reg_weight=3.0).defaults["reg_weight"] == 3.0


@pytest.mark.parametrize("units", ["Relative", "", None, "si"])
def test_invalid_units_are_refused(units):
    p = [nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match="units"):
        Arturo(p, units=units)
    opt = Arturo(p)
    opt.param_groups[0]["units"] = units  # a user editing the group later
    p[0].grad = torch.ones(2)
    with pytest.raises(ValueError, match="units"):
        opt.step()


def test_state_dict_round_trip_in_relative_units():
    model, opt = train(1.0)
    saved = opt.state_dict()
    assert all(g["units"] == "relative" for g in saved["param_groups"])
    fresh_model = make_model()
    fresh_model.load_state_dict(model.state_dict())
    fresh = Arturo(fresh_model.parameters(), units="relative")
    fresh.load_state_dict(saved)
    for p, q in zip(fresh_model.parameters(), model.parameters(), strict=True):
        for key, value in opt.state[q].items():
            assert torch.equal(fresh.state[p][key], value), key
    # A relative state without its running mean square is not a state of that mode.
    broken = opt.state_dict()
    del broken["state"][0]["grad_sq_avg"]
    with pytest.raises(ValueError, match="relative"):
        Arturo(make_model().parameters(), units="relative").load_state_dict(broken)


def test_checkpoints_of_older_formats_load_in_absolute_units():
    """Everything before format 3 was written in the published (absolute) semantics; it loads
    into that mode whatever the new optimizer was built with."""
    model, opt = train(1.0, units="absolute")
    old = opt.state_dict()
    old[STATE_FORMAT_KEY] = 2
    for group in old["param_groups"]:
        del group["units"]
    fresh = Arturo(model.parameters(), units="relative")
    fresh.load_state_dict(old)
    assert all(g["units"] == "absolute" for g in fresh.param_groups)
    assert fresh.param_groups[0]["lr"] == PRESETS["absolute"]["lr"]
    x, y = batches(torch.float32)[0]
    fresh.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    fresh.step()  # steps in absolute units: no grad_sq_avg needed
    assert all(torch.isfinite(p.detach()).all() for p in model.parameters())
