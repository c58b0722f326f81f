"""The math units: the Kalman filter and the dual solve (docs/algorithm.md)."""

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from arturo import functional as F


def test_filter_recovers_known_diagonal_hessian():
    # Separable quadratic f(θ) = Σ ½·Hᵢθᵢ² + cᵢθᵢ, gradients with noise, θ moving around so
    # that the slope is identifiable.
    gen = torch.Generator().manual_seed(0)
    n = 50
    hess = torch.logspace(-1, 1, n, dtype=torch.float64)  # 0.1 … 10
    lin = torch.randn(n, generator=gen, dtype=torch.float64)
    noise_std = 0.05
    b = torch.zeros(n, dtype=torch.float64)
    h = torch.full((n,), 0.1, dtype=torch.float64)
    p00, p01 = torch.ones(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    p11 = torch.ones(n, dtype=torch.float64)
    for _ in range(4000):
        x = torch.randn(n, generator=gen, dtype=torch.float64)
        g = hess * x + lin + noise_std * torch.randn(n, generator=gen, dtype=torch.float64)
        F.kalman_update_(
            x, g, b, h, p00, p01, p11, process_noise=0.0, measurement_noise=noise_std**2
        )
    rel_err = ((h - hess) / hess).abs()
    assert rel_err.max() < 0.03, rel_err.max()
    assert ((b - lin).abs() < 0.03).all()


def test_filter_with_keep_zero_is_a_noop():
    gen = torch.Generator().manual_seed(1)
    state = [torch.rand(7, generator=gen) for _ in range(5)]
    before = [t.clone() for t in state]
    x, g = torch.randn(7, generator=gen), torch.randn(7, generator=gen)
    F.kalman_update_(x, g, *state, process_noise=0.1, measurement_noise=1.0, keep=torch.tensor(0.0))
    for t, t0 in zip(state, before, strict=True):
        assert torch.equal(t, t0)


def _random_dual(seed: int, n: int, decades: float, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    lam = torch.exp(torch.randn(n, generator=gen, dtype=dtype) * 2)
    v = torch.randn(n, generator=gen, dtype=dtype) * torch.exp(torch.randn(n, generator=gen) * 2)
    r = 10 ** (torch.rand(n, generator=gen, dtype=dtype) * decades - decades / 2)
    return v, r, lam


def _dual_sums(v, r, lam, eta):
    """(Σ λΔ², Σ λΔ²/(r+η)), Δ = v/(r+η): the partial sums ``solve_dual`` expects, [1, 2]."""
    d = r + eta
    t = lam * (v / d) ** 2
    return torch.stack([t.sum(), (t / d).sum()])[None]


def _kl(v, r, lam, eta, scale=1.0):
    delta = scale * v / (r + eta)
    return 0.5 * float((lam * delta * delta).sum())


@settings(max_examples=400, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 300),
    decades=st.floats(0.0, 8.0),
    log_eps=st.floats(-8.0, 3.0),
    eta_prev=st.sampled_from([0.0, 1e-3, 1.0, 1e3]),
    newton_steps=st.integers(2, 4),  # Arturo requires >= 2 (see its validation)
)
def test_dual_solve_trust_region_holds(seed, n, decades, log_eps, eta_prev, newton_steps):
    v, r, lam = _random_dual(seed, n, decades)
    eps = torch.tensor([10.0**log_eps], dtype=torch.float64)

    def sums(eta):
        return _dual_sums(v, r, lam, eta[0])

    eta, scale, kl = F.solve_dual(
        sums, eps, torch.tensor([eta_prev], dtype=torch.float64), newton_steps=newton_steps
    )
    eps_f, eta_f = float(eps), float(eta)
    kl_taken = _kl(v, r, lam, eta_f, float(scale))
    assert kl_taken == pytest.approx(float(kl), rel=1e-9, abs=1e-300)
    assert kl_taken <= eps_f * (1 + 1e-5)
    assert eta_f >= 0.0
    kl_newton = _kl(v, r, lam, 0.0)
    if eta_f > 0:
        assert kl_taken >= 0.9 * eps_f
    # η = 0 exactly when the unconstrained (Newton) step is already inside the region.
    assert (eta_f == 0.0) == (kl_newton <= eps_f)


def test_dual_solve_converges_to_the_root():
    v, r, lam = _random_dual(3, 10_000, 8.0)
    eps = torch.tensor([1e-3], dtype=torch.float64)

    def sums(eta):
        return _dual_sums(v, r, lam, eta[0])

    eta, scale, _ = F.solve_dual(sums, eps, torch.zeros(1, dtype=torch.float64), newton_steps=6)
    # Converged: the exact root, so the feasibility scale is (almost) not needed.
    assert _kl(v, r, lam, float(eta)) / 1e-3 == pytest.approx(1.0, abs=1e-6)
    assert float(scale) == pytest.approx(1.0, abs=1e-6)


def test_newton_is_exact_when_all_curvature_ratios_are_equal():
    # ψ(η) is linear then, so one Newton step lands on the root.
    v = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    lam = torch.ones(3, dtype=torch.float64)
    r = torch.full((3,), 0.5, dtype=torch.float64)
    eps = torch.tensor([0.01], dtype=torch.float64)
    eta, _, _ = F.solve_dual(
        lambda e: _dual_sums(v, r, lam, e[0]),
        eps,
        torch.zeros(1, dtype=torch.float64),
        newton_steps=1,
    )
    expected = math.sqrt(float((v * v).sum()) / (2 * 0.01)) - 0.5
    assert float(eta) == pytest.approx(expected, rel=1e-12)


def test_dual_solve_of_a_zero_gradient_takes_no_step():
    v, r, lam = torch.zeros(4), torch.ones(4), torch.ones(4)
    eta, scale, kl = F.solve_dual(
        lambda e: _dual_sums(v, r, lam, e[0]),
        torch.tensor([0.1]),
        torch.tensor([2.0]),
        newton_steps=3,
    )
    assert torch.isfinite(eta).all() and float(kl) == 0.0 and float(scale) == 1.0


def test_every_global_sum_goes_through_reduce_fn_once_per_evaluation(monkeypatch):
    import arturo.optimizer as opt_module
    from arturo import Arturo

    calls = []

    def reduce_fn(t):
        calls.append(t.shape)
        return t

    monkeypatch.setattr(opt_module, "partial_sum_reducer", lambda params: reduce_fn)
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in [(3, 4), (5,), (2, 2, 2)]]
    for p in params:
        p.grad = torch.randn_like(p)
    for foreach, units in itertools.product((False, True), ("absolute", "relative")):
        calls.clear()
        # Fresh group dicts for each optimizer (a reused dict is copied, never shared).
        groups = [{"params": params[:2]}, {"params": params[2:], "lr": 0.01}]
        Arturo(groups, newton_steps=3, foreach=foreach, units=units).step()
        # One flat tensor for the gradient statistics (2 per group; in relative units also
        # one Σ g² per tensor), then one [groups, 2] tensor per dual evaluation.
        first = 4 + (3 if units == "relative" else 0)
        assert calls == [torch.Size([first])] + [torch.Size([2, 2])] * 4
