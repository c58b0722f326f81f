"""The posterior: Arturo.posterior_variance, Arturo.sampled_params, arturo.predict,
arturo.predict_regression and arturo.fit_sampling_temperature (docs/uncertainty.md)."""

from __future__ import annotations

import math

import pytest
import torch

from arturo import Arturo, fit_sampling_temperature, predict, predict_regression
from arturo.posterior import mean_nll, minimize_log_scalar

DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float64, id="fp64"),
    pytest.param(torch.bfloat16, id="bf16"),
    pytest.param(torch.complex64, id="complex64"),
]
UNITS = ["absolute", "relative"]


def make_problem(dtype=torch.float32, units="absolute", steps=5, seed=0):
    """A least-squares problem trained a few steps. Returns (params, opt, idle, outside):
    ``params`` have state; ``idle`` is in the optimizer but never gets a gradient (no state);
    ``outside`` is not in the optimizer."""
    gen = torch.Generator().manual_seed(seed)
    real_dtype = torch.float32 if dtype == torch.complex64 else dtype
    weight = torch.nn.Parameter((0.3 * torch.randn(6, 4, generator=gen)).to(dtype))
    bias = torch.nn.Parameter((0.1 * torch.randn(4, generator=gen)).to(dtype))
    idle = torch.nn.Parameter(torch.randn(3, generator=gen).to(dtype))
    outside = torch.nn.Parameter(torch.randn(2, generator=gen).to(dtype))
    opt = Arturo([weight, bias, idle], units=units)
    for _ in range(steps):
        x = torch.randn(16, 6, generator=gen).to(real_dtype).to(dtype)
        y = torch.randn(16, 4, generator=gen).to(real_dtype).to(dtype)
        opt.zero_grad()
        residual = x @ weight + bias - y
        (
            residual.abs().square() if dtype == torch.complex64 else residual.square()
        ).mean().float().backward()
        opt.step()
    assert weight in opt.state and bias in opt.state and not opt.state.get(idle)
    return [weight, bias], opt, idle, outside


def clone_state(opt):
    """Every tensor of the optimizer's state dict, cloned, by a key that names it."""
    sd = opt.state_dict()
    out = {}
    for pid, entry in sd["state"].items():
        for key, value in entry.items():
            out[f"state/{pid}/{key}"] = value.clone()
    for gi, group in enumerate(sd["param_groups"]):
        for key, value in group.items():
            if isinstance(value, torch.Tensor):
                out[f"group/{gi}/{key}"] = value.clone()
    return out


def assert_bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    if a.is_complex():
        a, b = torch.view_as_real(a), torch.view_as_real(b)
    # Compare the bits, so that -0.0 vs +0.0 (and NaN payloads) count as differences.
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    assert torch.equal(a.contiguous().view(bits), b.contiguous().view(bits))


# ----------------------------------------------------------------------------------------------
# Restoring the means; no state change
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_means_restored_bitwise_on_exit_and_after_an_exception(dtype):
    params, opt, idle, outside = make_problem(dtype)
    with torch.no_grad():  # a negative zero, which an arithmetic round trip would lose
        bias = torch.view_as_real(params[1]) if params[1].is_complex() else params[1]
        bias[0].fill_(-0.0)
    means = [p.detach().clone() for p in (*params, idle, outside)]
    state = clone_state(opt)
    gen = torch.Generator().manual_seed(1)

    with opt.sampled_params(generator=gen):
        for p, mean in zip(params, means, strict=False):
            assert p.dtype == mean.dtype
            assert not torch.equal(p, mean)  # a sample, not the mean
        assert_bitwise_equal(idle.detach(), means[2])  # no state: left alone
        assert_bitwise_equal(outside.detach(), means[3])
    for p, mean in zip((*params, idle, outside), means, strict=True):
        assert_bitwise_equal(p.detach(), mean)

    with pytest.raises(ZeroDivisionError), opt.sampled_params(generator=gen):
        assert not torch.equal(params[0], means[0])
        raise ZeroDivisionError
    for p, mean in zip((*params, idle, outside), means, strict=True):
        assert_bitwise_equal(p.detach(), mean)

    after = clone_state(opt)
    assert after.keys() == state.keys()
    for key in state:
        assert_bitwise_equal(after[key], state[key])


@pytest.mark.parametrize("dtype", DTYPES)
def test_temperature_zero_holds_the_means_bitwise(dtype):
    params, opt, _, _ = make_problem(dtype)
    with torch.no_grad():
        params[0].view(-1)[0] = -0.0
    means = [p.detach().clone() for p in params]
    with opt.sampled_params(temperature=0):
        for p, mean in zip(params, means, strict=True):
            assert_bitwise_equal(p.detach(), mean)


def test_bf16_sample_is_the_fp32_draw_rounded_once():
    params, opt, _, _ = make_problem(torch.bfloat16)
    means = [p.detach().clone() for p in params]
    with opt.sampled_params(generator=torch.Generator().manual_seed(3), temperature=2.0):
        samples = [p.detach().clone() for p in params]
    gen = torch.Generator().manual_seed(3)
    for p, mean, sample in zip(params, means, samples, strict=True):
        variance = opt.posterior_variance(p)
        assert variance.dtype == torch.float32
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        expected = (mean.float() + (2.0 * variance).sqrt() * noise).to(torch.bfloat16)
        assert_bitwise_equal(sample, expected)


# ----------------------------------------------------------------------------------------------
# The distribution of the samples
# ----------------------------------------------------------------------------------------------


def sample_moments(params, opt, draws, **kwargs):
    """Empirical mean and variance of each parameter over ``draws`` samples (float64)."""
    total = [torch.zeros(p.shape, dtype=torch.float64) for p in params]
    total_sq = [torch.zeros(p.shape, dtype=torch.float64) for p in params]
    for _ in range(draws):
        with opt.sampled_params(**kwargs):
            for t, t2, p in zip(total, total_sq, params, strict=True):
                value = p.detach().double()
                t += value
                t2 += value.square()
    means = [t / draws for t in total]
    variances = [t2 / draws - m.square() for t2, m in zip(total_sq, means, strict=True)]
    return means, variances


def moments_match(means, variances, expected_means, expected_variances, draws) -> bool:
    """Whether the empirical moments match within 5 standard errors, coordinate by
    coordinate: the mean's error has std σ/√n, the variance's (Gaussian) σ²·√(2/n)."""
    for m, v, mu, var in zip(means, variances, expected_means, expected_variances, strict=True):
        if not ((m - mu).abs() <= 5 * (var / draws).sqrt()).all():
            return False
        if not ((v - var).abs() <= 5 * var * math.sqrt(2 / draws)).all():
            return False
    return True


@pytest.mark.parametrize("units", UNITS)
@pytest.mark.parametrize("dataset_size", [None, 40])
def test_samples_have_the_posterior_mean_and_tempered_variance(units, dataset_size):
    params, opt, _, _ = make_problem(torch.float64, units=units, steps=8)
    temperature, draws = 2.5, 4000
    means, variances = sample_moments(
        params,
        opt,
        draws,
        generator=torch.Generator().manual_seed(7),
        temperature=temperature,
        dataset_size=dataset_size,
    )
    mus = [p.detach().double() for p in params]
    sigma2 = [opt.posterior_variance(p, dataset_size).double() for p in params]
    assert len({round(v, 12) for s in sigma2 for v in s.flatten().tolist()}) > 1  # not uniform
    assert moments_match(means, variances, mus, [temperature * s for s in sigma2], draws)
    # The test can fail: the variance without the temperature, or of the other dataset size,
    # is rejected.
    assert not moments_match(means, variances, mus, sigma2, draws)
    other = [opt.posterior_variance(p, 10 if dataset_size is None else None) for p in params]
    assert not moments_match(means, variances, mus, [temperature * s for s in other], draws)


def test_one_draw_of_a_large_tensor_is_standard_normal_after_standardising():
    gen = torch.Generator().manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(400, 250, generator=gen))
    opt = Arturo([weight], units="relative")
    for _ in range(3):
        opt.zero_grad()
        (weight.square() * torch.rand(400, 250, generator=gen)).sum().backward()
        opt.step()
    mean = weight.detach().clone()
    variance = opt.posterior_variance(weight, dataset_size=1000)
    with opt.sampled_params(generator=gen, temperature=0.5, dataset_size=1000):
        z = ((weight.detach() - mean) / (0.5 * variance).sqrt()).double().flatten()
    n = z.numel()
    assert abs(float(z.mean())) < 5 / math.sqrt(n)
    assert abs(float(z.var()) - 1) < 5 * math.sqrt(2 / n)


# ----------------------------------------------------------------------------------------------
# posterior_variance
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("units", UNITS)
def test_posterior_variance_formula_from_the_state(dtype, units):
    params, opt, idle, _ = make_problem(dtype, units=units)
    omega = opt.param_groups[0]["reg_weight"]
    for p in params:
        state = opt.state[p]
        precision = state["precision"]
        shape = torch.view_as_real(p).shape if p.is_complex() else p.shape
        own = opt.posterior_variance(p)
        assert own.shape == shape and own.dtype == precision.dtype
        assert torch.equal(own, opt.variance(p))
        assert torch.equal(own, 1 / precision)

        omega_eff = omega if units == "absolute" else omega * state["grad_sq_avg"].sqrt()
        expected = 1 / (precision * (1234 * omega_eff))
        torch.testing.assert_close(opt.posterior_variance(p, 1234), expected, rtol=1e-6, atol=0)
        torch.testing.assert_close(
            opt.posterior_variance(p, dataset_size=1234), expected, rtol=1e-6, atol=0
        )
        # A fresh tensor: writing to it changes nothing.
        own.fill_(0.0)
        assert (opt.variance(p) > 0).all()
    with pytest.raises(KeyError, match="no arTuRO state"):
        opt.posterior_variance(idle)


def test_a_relative_tensor_without_gradient_scale_has_no_posterior_for_a_dataset_size():
    weight = torch.nn.Parameter(torch.randn(3, 2))
    dead = torch.nn.Parameter(torch.randn(4))
    opt = Arturo([weight, dead], units="relative")
    weight.grad = torch.randn(3, 2)
    dead.grad = torch.zeros(4)  # state is created, but its scale stays 0
    opt.step()
    assert float(opt.state[dead]["grad_sq_avg"]) == 0
    assert torch.equal(opt.posterior_variance(dead), opt.variance(dead))  # 1/λ exists
    with pytest.raises(ValueError, match="no gradient scale"):
        opt.posterior_variance(dead, dataset_size=10)
    means = [weight.detach().clone(), dead.detach().clone()]
    with pytest.raises(ValueError, match="no gradient scale"), opt.sampled_params(dataset_size=10):
        pass
    assert torch.equal(weight, means[0]) and torch.equal(dead, means[1])  # nothing was sampled
    with opt.sampled_params():  # the state's own distribution is defined
        assert not torch.equal(dead, means[1])


# ----------------------------------------------------------------------------------------------
# Arguments, generators, misuse
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [-1.0, math.nan, math.inf, True, "1", None])
def test_invalid_temperature_raises_naming_it(temperature):
    params, opt, _, _ = make_problem()
    means = [p.detach().clone() for p in params]
    with (
        pytest.raises(ValueError, match="temperature"),
        opt.sampled_params(temperature=temperature),
    ):
        pass
    with pytest.raises(ValueError, match="temperature"):
        predict(lambda x: x @ params[0], opt, torch.ones(1, 6), samples=0, temperature=temperature)
    for p, mean in zip(params, means, strict=True):
        assert torch.equal(p, mean)


@pytest.mark.parametrize("dataset_size", [0, -3, 2.5, True, "10"])
def test_invalid_dataset_size_raises_naming_it(dataset_size):
    params, opt, _, _ = make_problem()
    with (
        pytest.raises(ValueError, match="dataset_size"),
        opt.sampled_params(dataset_size=dataset_size),
    ):
        pass
    with pytest.raises(ValueError, match="dataset_size"):
        opt.posterior_variance(params[0], dataset_size)
    with pytest.raises(ValueError, match="dataset_size"):
        predict_regression(
            lambda x: x @ params[0], opt, torch.ones(1, 6), samples=2, dataset_size=dataset_size
        )


@pytest.mark.parametrize("samples", [-1, 1.5, True, None])
def test_invalid_samples_raises_naming_it(samples):
    params, opt, _, _ = make_problem()
    for fn in (predict, predict_regression):
        with pytest.raises(ValueError, match="samples"):
            fn(lambda x: x @ params[0], opt, torch.ones(1, 6), samples=samples)


def draw(params, opt, **kwargs):
    with opt.sampled_params(**kwargs):
        return [p.detach().clone() for p in params]


def test_the_same_generator_seed_gives_the_same_samples():
    params, opt, _, _ = make_problem()
    first = draw(params, opt, generator=torch.Generator().manual_seed(11))
    again = draw(params, opt, generator=torch.Generator().manual_seed(11))
    other = draw(params, opt, generator=torch.Generator().manual_seed(12))
    for a, b, c in zip(first, again, other, strict=True):
        assert torch.equal(a, b)
        assert not torch.equal(a, c)
    # generator=None draws from torch's default generator.
    torch.manual_seed(5)
    default = draw(params, opt)
    torch.manual_seed(5)
    for a, b in zip(default, draw(params, opt), strict=True):
        assert torch.equal(a, b)


def test_step_or_nesting_inside_the_context_raises_and_the_means_come_back():
    params, opt, _, _ = make_problem()
    means = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError, match="inside sampled_params"), opt.sampled_params():
        opt.step()
    with pytest.raises(RuntimeError, match="already active"), opt.sampled_params():  # noqa: SIM117
        with opt.sampled_params():
            pass
    for p, mean in zip(params, means, strict=True):
        assert torch.equal(p, mean)
    opt.step()  # usable again once the context is gone


@pytest.mark.parametrize("units", UNITS)
def test_a_step_with_gradients_taken_at_a_sample(units):
    params, opt, _, _ = make_problem(units=units)
    gen = torch.Generator().manual_seed(4)
    x, y = torch.randn(16, 6, generator=gen), torch.randn(16, 4, generator=gen)
    means = [p.detach().clone() for p in params]
    opt.zero_grad()
    with opt.sampled_params(generator=gen):
        (x @ params[0] + params[1] - y).square().mean().backward()
    for p, mean in zip(params, means, strict=True):
        assert torch.equal(p, mean)  # restored before the step
    opt.step()
    assert opt.stats()[0]["skipped_steps"] == 0
    for p, mean in zip(params, means, strict=True):
        assert torch.isfinite(p).all() and not torch.equal(p, mean)


# ----------------------------------------------------------------------------------------------
# predict and predict_regression
# ----------------------------------------------------------------------------------------------


def make_classifier(units="absolute"):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    opt = Arturo(model.parameters(), units=units)
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        x, y = torch.randn(32, 5, generator=gen), torch.randint(0, 3, (32,), generator=gen)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model, opt, torch.randn(10, 5, generator=gen)


def test_predict_with_no_samples_is_the_mean_models_softmax():
    model, opt, x = make_classifier()
    probs = predict(model, opt, x, samples=0)
    assert probs.shape == (10, 3) and not probs.requires_grad
    torch.testing.assert_close(probs, model(x).softmax(-1), rtol=0, atol=0)


@pytest.mark.parametrize("units", UNITS)
def test_predict_averages_the_softmax_over_samples(units):
    model, opt, x = make_classifier(units)
    means = [p.detach().clone() for p in model.parameters()]
    probs = predict(
        model, opt, x, samples=6, generator=torch.Generator().manual_seed(9), dataset_size=200
    )
    gen = torch.Generator().manual_seed(9)
    by_hand = []
    for _ in range(6):
        with torch.no_grad(), opt.sampled_params(generator=gen, dataset_size=200):
            by_hand.append(model(x).softmax(-1))
    assert probs.shape == (10, 3)
    torch.testing.assert_close(probs, torch.stack(by_hand).mean(0), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(probs.sum(-1), torch.ones(10))
    assert not torch.allclose(probs, predict(model, opt, x, samples=0))
    for p, mean in zip(model.parameters(), means, strict=True):
        assert torch.equal(p, mean)


def test_more_samples_reduce_the_monte_carlo_spread_of_predict():
    model, opt, x = make_classifier()

    def spread(samples):
        runs = [
            predict(model, opt, x, samples=samples, generator=torch.Generator().manual_seed(s))
            for s in range(12)
        ]
        return float(torch.stack(runs).var(0).mean())

    assert spread(16) < 0.25 * spread(1)


def test_predict_regression_mean_and_variance_over_samples():
    model, opt, x = make_classifier()
    out, var = predict_regression(model, opt, x, samples=0)
    torch.testing.assert_close(out, model(x), rtol=0, atol=0)
    assert torch.equal(var, torch.zeros_like(out))

    mean, var = predict_regression(
        model, opt, x, samples=7, generator=torch.Generator().manual_seed(2), temperature=0.5
    )
    gen = torch.Generator().manual_seed(2)
    outs = []
    for _ in range(7):
        with torch.no_grad(), opt.sampled_params(generator=gen, temperature=0.5):
            outs.append(model(x))
    outs = torch.stack(outs)
    assert mean.shape == var.shape == (10, 3) and not mean.requires_grad
    torch.testing.assert_close(mean, outs.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(var, outs.var(0, unbiased=False), rtol=1e-4, atol=1e-7)
    assert (var > 0).all()

    _, one = predict_regression(model, opt, x, samples=1)
    assert torch.equal(one, torch.zeros_like(one))


# ----------------------------------------------------------------------------------------------
# fit_sampling_temperature, and the pieces it is made of
# ----------------------------------------------------------------------------------------------


def test_mean_nll_against_a_hand_computation():
    probs = torch.tensor([[0.5, 0.5], [0.9, 0.1], [1.0, 0.0]])
    targets = torch.tensor([0, 1, 0])
    expected = -(math.log(0.5) + math.log(0.1) + 0.0) / 3
    assert mean_nll(probs, targets) == pytest.approx(expected, rel=1e-6)
    # A probability that underflowed to 0 costs -log(float32 tiny), not inf.
    capped = mean_nll(torch.tensor([[1.0, 0.0]]), torch.tensor([1]))
    assert capped == pytest.approx(-math.log(torch.finfo(torch.float32).tiny))


def test_minimize_log_scalar_finds_the_minimum():
    found = minimize_log_scalar(lambda t: (math.log(t) - math.log(0.03)) ** 2, 1e-4, 1e2)
    assert found == pytest.approx(0.03, rel=0.01)
    for lo, hi in [(0.0, 1.0), (2.0, 1.0), (1.0, math.inf)]:
        with pytest.raises(ValueError, match="0 < lo < hi"):
            minimize_log_scalar(lambda t: t, lo, hi)
    with pytest.raises(ValueError, match="grid"):
        minimize_log_scalar(lambda t: t, 1e-4, 1e2, grid=1)


def test_minimize_log_scalar_grid_finds_a_minimum_that_a_plain_search_misses():
    # Flat and slightly rising over most of the range, then falling to the upper bound: the
    # shape of a sampled NLL whose best temperature is large. Not unimodal, so a plain
    # golden-section search can stall in the flat part; the grid scan sees the fall.
    def bumpy(t):
        u = math.log10(t)
        return 1e-3 * u if u < 1 else 0.01 - 0.05 * (u - 1)

    plain = minimize_log_scalar(bumpy, 1e-4, 1e2, iterations=8)
    assert math.log10(plain) < 1  # stuck in the flat part
    assert minimize_log_scalar(bumpy, 1e-4, 1e2, iterations=8, grid=7) == pytest.approx(1e2)
    smooth = minimize_log_scalar(lambda t: (math.log(t) - math.log(0.03)) ** 2, 1e-4, 1e2, grid=7)
    assert smooth == pytest.approx(0.03, rel=0.01)


def _held_out(seed=5, n=64):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=gen), torch.randint(0, 3, (n,), generator=gen)


def _nll_at(model, opt, x, y, temperature, seed, dataset_size):
    gen = torch.Generator().manual_seed(seed)
    probs = predict(
        model, opt, x, samples=8, generator=gen, dataset_size=dataset_size, temperature=temperature
    )
    return mean_nll(probs, y)


@pytest.mark.parametrize("units", UNITS)
def test_fitted_temperature_beats_every_grid_point_on_the_same_draws(units):
    model, opt, _ = make_classifier(units)
    x, y = _held_out()
    fitted = fit_sampling_temperature(
        model, opt, x, y, samples=8, dataset_size=20, generator=torch.Generator().manual_seed(3)
    )
    assert 1e-4 <= fitted <= 1e2
    best = _nll_at(model, opt, x, y, fitted, seed=3, dataset_size=20)
    grid = [_nll_at(model, opt, x, y, 10.0**k, seed=3, dataset_size=20) for k in range(-4, 3)]
    assert best <= min(grid) + 1e-6


def test_fit_is_reproducible_and_changes_nothing():
    model, opt, _ = make_classifier("relative")
    x, y = _held_out()
    means = [p.detach().clone() for p in model.parameters()]
    state = clone_state(opt)
    gen = torch.Generator().manual_seed(11)
    before = gen.get_state()
    first = fit_sampling_temperature(model, opt, x, y, samples=4, generator=gen, iterations=6)
    assert torch.equal(gen.get_state(), before)  # restored: the fit consumes no randomness
    again = fit_sampling_temperature(model, opt, x, y, samples=4, generator=gen, iterations=6)
    assert first == again
    other = fit_sampling_temperature(
        model, opt, x, y, samples=4, generator=torch.Generator().manual_seed(12), iterations=6
    )
    assert other != first  # other draws, another optimum: the seed does reach the samples
    for p, mean in zip(model.parameters(), means, strict=True):
        assert_bitwise_equal(p.detach(), mean)
    after = clone_state(opt)
    for key in state:
        assert_bitwise_equal(after[key], state[key])


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"samples": 0}, "samples"),
        ({"samples": -1}, "samples"),
        ({"dataset_size": 0}, "dataset_size"),
        ({"bounds": (0.0, 1.0)}, "bounds"),
        ({"bounds": (1.0, 0.5)}, "bounds"),
        ({"iterations": 0}, "iterations"),
    ],
)
def test_fit_sampling_temperature_rejects_bad_arguments(kwargs, name):
    model, opt, _ = make_classifier()
    x, y = _held_out()
    with pytest.raises(ValueError, match=f"Invalid {name}"):
        fit_sampling_temperature(model, opt, x, y, **({"samples": 2} | kwargs))


# ----------------------------------------------------------------------------------------------
# FSDP2: each rank samples its own shard
# ----------------------------------------------------------------------------------------------

# One rank of the FSDP2 check: rank r's shard of the sample must be what one process computes
# for that shard from a generator seeded seed + r, and the means must come back bitwise.
FSDP_WORKER = """
import os, sys
from datetime import timedelta
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from arturo import Arturo

rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=rank,
                        world_size=world, timeout=timedelta(seconds=60))
mesh = init_device_mesh("cpu", (world,))
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))
for layer in (model[0], model[2]):
    fully_shard(layer, mesh=mesh)
fully_shard(model, mesh=mesh)
opt = Arturo(model.parameters(), units="relative")
gen = torch.Generator().manual_seed(1)
for _ in range(3):
    x, y = torch.randn(8, 6, generator=gen), torch.randn(8, 1, generator=gen)
    opt.zero_grad()
    (model(x) - y).square().mean().backward()
    opt.step()
params = list(model.parameters())
means = [p.to_local().detach().clone() for p in params]
with torch.no_grad():
    out_mean = model(x)
    with opt.sampled_params(generator=torch.Generator().manual_seed(100 + rank), dataset_size=50):
        samples = [p.to_local().detach().clone() for p in params]
        assert not torch.equal(model(x), out_mean), "the forward does not see the sample"
    assert torch.equal(model(x), out_mean)
reference = torch.Generator().manual_seed(100 + rank)
for p, mean, sample in zip(params, means, samples):
    variance = opt.posterior_variance(p, dataset_size=50)
    assert type(variance).__name__ == "DTensor", type(variance)
    std = variance.to_local().sqrt()
    noise = torch.randn(mean.shape, generator=reference)
    assert sample.numel() == 0 or not torch.equal(sample, mean), "no sample drawn"
    assert torch.equal(sample, mean + std * noise), "sample differs from the per-rank draw"
    assert torch.equal(p.to_local(), mean), "mean not restored"
print("ok", rank)
dist.destroy_process_group()
"""


@pytest.mark.distributed
@pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="needs gloo",
)
def test_fsdp2_each_rank_samples_its_shard_from_its_own_generator(tmp_path):
    import os
    import subprocess
    import sys

    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", OMP_NUM_THREADS="1")
        if sys.platform == "linux":  # gloo on loopback: no resolvable hostname needed
            env.setdefault("GLOO_SOCKET_IFNAME", "lo")
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", FSDP_WORKER, str(tmp_path / "store")],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=180)[0])
    finally:
        for proc in procs:  # a rank waiting on a dead peer would hang forever
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for rank, (proc, out) in enumerate(zip(procs, outputs, strict=True)):
        assert proc.returncode == 0 and f"ok {rank}" in out, f"rank {rank}:\n{out[-3000:]}"
