"""Every implementation of a step against an independent transcription of docs/algorithm.md.

The other tests compare the implementations with each other or with a recorded trajectory;
this one checks them against the specification itself. ``SpecReference`` transcribes
"Per-coordinate state" and "One step" 1-7 (with "Departures" 2 and 5: the curvature clamp
and one trust region per group), in both units of "Units: absolute and relative", in float64
numpy, sharing no code with ``arturo``. It finds η by bisection to 1e-12 relative, not by the
optimizer's Newton iteration, so the dual solve is checked too: with ``newton_steps=30`` the
optimizer reaches the root, and its final feasibility scale is then 1 up to rounding.

The reference and the optimizer each follow their own trajectory; the gradients come from
the same loss at their own parameters, and the two are compared after every step. The
mutants at the end alter the transcription one formula at a time; each must make the
comparison fail, so that the comparison is known to see that formula.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from arturo import Arturo

# Steps of each run. Relative units run past a tensor's 100th applied step, where the running
# mean square's weight 1/(n + 1) meets its floor 0.01.
STEPS = {"absolute": 7, "relative": 104}

# Rounding of reordered formulas (e.g. the optimizer divides by λ before the solve),
# compounded over a few steps; any change of the math moves results far more. The same in
# both units (m's weight is computed in the state's dtype).
TOLS = {"absolute": dict(rtol=1e-9, atol=1e-12), "relative": dict(rtol=1e-9, atol=1e-12)}
# The optimizer keeps each group's η and KL as float32 tensors.
ETA_TOLS = {"absolute": dict(rtol=3e-7, atol=1e-30), "relative": dict(rtol=3e-7, atol=1e-30)}
# A KL near 0 is a sum of squared differences of nearly equal numbers (ĝ at the model's
# minimum): its rounding is judged against the bound.
KL_ATOL_PER_BOUND = 1e-12


# ---------------------------------------------------------------------------------------------
# The specification, transcribed
# ---------------------------------------------------------------------------------------------


@dataclass
class CoordState:
    b: np.ndarray
    h: np.ndarray
    p00: np.ndarray
    p01: np.ndarray
    p11: np.ndarray
    lam: np.ndarray


@dataclass
class SpecGroup:
    params: list[np.ndarray]
    hp: dict[str, float]
    state: list[CoordState | None] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)  # each tensor's count of applied steps
    mean_square: list[float] = field(default_factory=list)  # relative units: m of each tensor
    bound: float = 0.0  # the KL bound of the last step
    eta: float = 0.0
    kl: float = 0.0
    # Coverage of the test itself: did the clamp bite, was η ever 0 / ever > 0? (relative
    # units) was a tensor held, did one start after being held, did m's weight reach 0.01?
    saw_negative_h: bool = False
    saw_eta_zero: bool = False
    saw_eta_positive: bool = False
    held: set[int] = field(default_factory=set)  # the tensors that were held at some step
    saw_start_after_hold: bool = False
    saw_weight_floor: bool = False

    @property
    def size(self) -> int:
        """d: the group's number of coordinates, every parameter counted."""
        return sum(p.size for p in self.params)


def kl_of(eta: float, ghat: np.ndarray, a: np.ndarray, lam: np.ndarray) -> float:
    delta = ghat / (a + eta * lam)
    return 0.5 * float(np.sum(lam * delta * delta))


def bisect_eta(ghat: np.ndarray, a: np.ndarray, lam: np.ndarray, eps: float) -> float:
    """η = 0 if KL(0) ≤ ε, else the root of KL(η) = ε (KL is decreasing), 1e-12 relative."""
    if kl_of(0.0, ghat, a, lam) <= eps:
        return 0.0
    lo, hi = 0.0, 1.0
    while kl_of(hi, ghat, a, lam) > eps:
        lo, hi = hi, 2.0 * hi
    while hi - lo > 1e-12 * hi:
        mid = 0.5 * (lo + hi)
        if kl_of(mid, ghat, a, lam) > eps:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


class SpecReference:
    """One arTuRO step per call, for several param groups, in float64.

    ``units`` as in docs/algorithm.md. In relative units each tensor that takes a step has a
    gradient scale s = √m; in absolute units s is None. The rows of the units table are the
    methods :meth:`kl_bound`, :meth:`initial_curvature`, :meth:`prior_curvature` and
    :meth:`precision_update`, so that a mutant can alter one of them.
    """

    def __init__(
        self,
        groups: list[tuple[list[np.ndarray], dict[str, float]]],
        units: str = "absolute",
    ) -> None:
        assert units in ("absolute", "relative")
        self.relative = units == "relative"
        self.groups = [
            SpecGroup(
                [p.astype(np.float64).copy() for p in ps],
                dict(hp),
                [None] * len(ps),
                [0] * len(ps),
                [0.0] * len(ps),
            )
            for ps, hp in groups
        ]

    def step(self, grads: list[list[np.ndarray | None]]) -> None:
        for group, group_grads in zip(self.groups, grads, strict=True):
            self._group_step(group, group_grads)

    # -- The units table --------------------------------------------------------------------

    def kl_bound(self, group: SpecGroup, with_grad: list[int]) -> float:
        """ε, or ε·d with d the group's number of coordinates."""
        eps = group.hp["lr"]
        return eps * group.size if self.relative else eps

    def initial_curvature(self, hp: dict[str, float], s: float | None) -> float:
        """h on a tensor's first step: h₀, or h₀·s."""
        return hp["init_curvature"] if s is None else hp["init_curvature"] * s

    def prior_curvature(self, hp: dict[str, float], s: float | None) -> float:
        """The prior's curvature in steps 4 and 7: ω·λ₀, or ω·λ₀·s."""
        prior = hp["reg_weight"] * hp["prior_precision"]
        return prior if s is None else prior * s

    def precision_update(
        self, lam: np.ndarray, a: np.ndarray, hp: dict[str, float], s: float | None
    ) -> np.ndarray:
        """Step 7: λ ← (a + ν·λ)/(ω + ν), or λ ← (a/s + ν·λ)/(ω + ν)."""
        omega, nu = hp["reg_weight"], hp["precision_inertia"]
        if s is None:
            return (a + nu * lam) / (omega + nu)
        return (a / s + nu * lam) / (omega + nu)

    # -- Relative units: the gradient scale and the held tensor ------------------------------

    def mean_square_weight(self, n: int) -> float:
        """w = max(1/(n + 1), 0.01) for a tensor's (n + 1)-th applied step."""
        return max(1.0 / (n + 1), 0.01)

    def update_mean_square(self, group: SpecGroup, i: int, g: np.ndarray) -> None:
        """m ← m + (mean(g²) − m)·w."""
        w = self.mean_square_weight(group.steps[i])
        group.saw_weight_floor |= w == 0.01 and 1.0 / (group.steps[i] + 1) < 0.01
        m = group.mean_square[i]
        group.mean_square[i] = m + (float(np.mean(g * g)) - m) * w

    def is_held(self, group: SpecGroup, i: int) -> bool:
        """A tensor whose gradients have all been exactly 0 (m = 0) takes no step at all."""
        return group.mean_square[i] == 0.0

    def hold(self, group: SpecGroup, i: int) -> None:
        """θ, λ, the filter and the step count unchanged, weight decay included."""

    # -- Steps 1-7 ---------------------------------------------------------------------------

    def decayed_mean(self, theta: np.ndarray, hp: dict[str, float]) -> np.ndarray:
        """Step 3: μ = θ·(1 − ε·κ), with the group's ε = lr in either units."""
        return theta * (1.0 - hp["lr"] * hp["weight_decay"])

    def stepping_curvature(self, h: np.ndarray, prior: float) -> np.ndarray:
        """Step 4 with Departure 2: a = max(h, 0) + ω·λ₀."""
        return np.maximum(h, 0.0) + prior

    def first_state(
        self, theta: np.ndarray, g: np.ndarray, hp: dict[str, float], s: float | None
    ) -> CoordState:
        """The table "Per-coordinate state", on the tensor's first step."""
        p0 = hp["filter_init_cov"]
        return CoordState(
            b=g.copy(),
            h=np.full_like(theta, self.initial_curvature(hp, s)),
            p00=np.full_like(theta, p0),
            p01=np.zeros_like(theta),
            p11=np.full_like(theta, p0),
            lam=np.full_like(theta, 1.0 / hp["init_variance"]),
        )

    def _group_step(self, group: SpecGroup, grads: list[np.ndarray | None]) -> None:
        hp = group.hp
        q, r = hp["filter_process_noise"], hp["filter_measurement_noise"]
        with_grad = [i for i, g in enumerate(grads) if g is not None]
        if not with_grad:
            return
        scales: dict[int, float | None] = {}
        active = []
        for i in with_grad:
            if self.relative:
                self.update_mean_square(group, i, grads[i])
                if self.is_held(group, i):
                    group.held.add(i)
                    self.hold(group, i)
                    continue
                scales[i] = math.sqrt(group.mean_square[i])
            else:
                scales[i] = None
            active.append(i)
        if not active:
            return
        mus, ghats, as_ = {}, {}, {}
        for i in active:
            theta, g, s = group.params[i], grads[i], scales[i]
            st = group.state[i]
            if st is None:  # first step: b = g₀, h = h₀ (·s), then steps 1-2 as usual
                st = group.state[i] = self.first_state(theta, g, hp, s)
                group.saw_start_after_hold |= i in group.held
            # 1. predict
            p00, p01, p11 = st.p00 + q, st.p01, st.p11 + q
            # 2. update, regressor x = θ, measurement g
            x = theta
            k0 = p00 + p01 * x
            k1 = p01 + p11 * x
            sf = k0 + k1 * x + r  # the spec's s of step 2, not a gradient scale
            e = g - (st.b + st.h * x)
            st.b = st.b + (k0 / sf) * e
            st.h = st.h + (k1 / sf) * e
            st.p00 = p00 - k0 * k0 / sf
            st.p01 = p01 - k0 * k1 / sf
            st.p11 = p11 - k1 * k1 / sf
            # 3. decoupled weight decay, scaled by ε
            mus[i] = self.decayed_mean(theta, hp)
            # 4. model gradient at μ; stepping curvature with the clamp (Departure 2)
            prior = self.prior_curvature(hp, s)
            ghats[i] = (st.h + prior) * mus[i] + st.b
            as_[i] = self.stepping_curvature(st.h, prior)
            group.saw_negative_h |= bool(np.any(st.h < 0))
        # 5. one dual over every coordinate of the group's parameters that take a step
        cat = np.concatenate
        ghat = cat([ghats[i].ravel() for i in active])
        a = cat([as_[i].ravel() for i in active])
        lam = cat([group.state[i].lam.ravel() for i in active])
        group.bound = self.kl_bound(group, with_grad)
        eta = bisect_eta(ghat, a, lam, group.bound)
        group.eta, group.kl = eta, kl_of(eta, ghat, a, lam)
        group.saw_eta_zero |= eta == 0.0
        group.saw_eta_positive |= eta > 0.0
        for i in active:
            st = group.state[i]
            # 6. mean update, 7. precision update with the old λ and the new a
            group.params[i] = mus[i] - ghats[i] / (as_[i] + eta * st.lam)
            st.lam = self.precision_update(st.lam, as_[i], hp, scales[i])
            group.steps[i] += 1


# ---------------------------------------------------------------------------------------------
# The problem
# ---------------------------------------------------------------------------------------------

# Three groups: a regression whose trust region binds (η > 0), a periodic term with negative
# curvature −9·cos(3v) in places (group 1 also starts from h₀ < 0, so the clamp bites from
# the first step) next to a parameter that never gets a gradient, and a nearly flat,
# near-zero parameter whose Newton step lies inside a wide region (η = 0). Group 0 also holds
# a late tensor: its gradient is exactly 0 for the first LATE steps (in relative units it is
# held, then starts), and a second regression after.
SHAPES = [[(5, 4), (5,)], [(9,), (3,)], [(6,)]]
NO_GRAD = (1, 1)
LATE_SHAPE, LATE_AT, LATE = (4,), (0, 2), 3

PUBLISHED = dict(
    lr=0.0857,
    weight_decay=1.54e-6,
    reg_weight=0.0587,
    prior_precision=0.0015,
    init_variance=0.01,
    precision_inertia=1.3,
    filter_init_cov=5e-5,
    filter_process_noise=0.0174,
    filter_measurement_noise=2.82,
    init_curvature=0.1,
)
# Every hyperparameter away from the published value, so that a swapped or ignored one shows.
ALTERED = dict(
    lr=0.03,
    weight_decay=0.7,
    reg_weight=0.25,
    prior_precision=0.02,
    init_variance=0.05,
    precision_inertia=0.6,
    filter_init_cov=2e-3,
    filter_process_noise=0.05,
    filter_measurement_noise=0.8,
    init_curvature=0.4,
)
# Relative units: ε per coordinate, and ω, ν, h₀ in units of the gradient scale, so other
# magnitudes (those of the optimizer's relative preset, then every one altered).
RELATIVE = dict(
    lr=2.2e-7,
    weight_decay=0.6,
    reg_weight=11.7,
    prior_precision=0.0015,
    init_variance=0.01,
    precision_inertia=260.0,
    filter_init_cov=5e-5,
    filter_process_noise=0.0174,
    filter_measurement_noise=2.82,
    init_curvature=20.0,
)
RELATIVE_ALTERED = dict(
    lr=3e-5,
    weight_decay=0.2,
    reg_weight=4.0,
    prior_precision=0.05,
    init_variance=0.03,
    precision_inertia=40.0,
    filter_init_cov=1e-3,
    filter_process_noise=0.03,
    filter_measurement_noise=1.2,
    init_curvature=3.0,
)
CONFIGS = {
    ("absolute", "published"): PUBLISHED,
    ("absolute", "altered"): ALTERED,
    ("relative", "published"): RELATIVE,
    ("relative", "altered"): RELATIVE_ALTERED,
}
GROUP_OVERRIDES = {
    ("absolute", "published"): [
        dict(lr=0.05, weight_decay=0.3),
        dict(lr=0.02, weight_decay=0.0, init_curvature=-0.05),
        dict(lr=0.5, weight_decay=0.0),
    ],
    ("absolute", "altered"): [
        dict(),
        dict(lr=0.01, weight_decay=0.1, init_curvature=-0.2, filter_measurement_noise=1.5),
        dict(lr=2.0, weight_decay=0.0, reg_weight=0.1, precision_inertia=2.0),
    ],
    ("relative", "published"): [
        dict(lr=1e-4, weight_decay=0.3),
        dict(lr=1e-5, weight_decay=0.0, init_curvature=-2.0),
        dict(lr=1.0, weight_decay=0.0),
    ],
    ("relative", "altered"): [
        dict(),
        dict(lr=1e-6, weight_decay=0.1, init_curvature=-1.0, filter_measurement_noise=1.5),
        dict(
            lr=2.0, weight_decay=0.0, reg_weight=1.0, precision_inertia=80.0, init_curvature=100.0
        ),
    ],
}


def make_params() -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(3)
    groups = [[torch.randn(s, generator=gen, dtype=torch.float64) for s in g] for g in SHAPES]
    groups[2][0].mul_(1e-3)
    late = torch.randn(LATE_SHAPE, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    groups[LATE_AT[0]].insert(LATE_AT[1], late)
    return groups


def loss_fn(params: list[list[torch.Tensor]], step: int) -> torch.Tensor:
    (w, c, z), (v, _unused), (u,) = params
    gen = torch.Generator().manual_seed(500 + step)
    x = torch.randn(16, 4, generator=gen, dtype=torch.float64)
    y = torch.randn(16, 5, generator=gen, dtype=torch.float64)
    fit = ((x @ w.T + c - y) ** 2).mean()
    periodic = torch.cos(3.0 * v).sum() + 0.05 * (v**2).sum()
    flat = 1e-6 * ((u - 0.01) ** 2).sum()
    # Exactly 0 before LATE: a gradient that exists and is all zeros.
    late = ((x @ z + 0.5 - y[:, 0]) ** 2).mean() if step >= LATE else 0.0 * z.sum()
    return fit + periodic + flat + late


def gradients(params: list[list[torch.Tensor]], step: int) -> list[list[torch.Tensor | None]]:
    leaves = [[p.detach().clone().requires_grad_() for p in g] for g in params]
    loss_fn(leaves, step).backward()
    grads = [[p.grad for p in g] for g in leaves]
    grads[NO_GRAD[0]][NO_GRAD[1]] = None
    return grads


def group_hypers(units: str, config: str) -> list[dict[str, float]]:
    base = CONFIGS[units, config]
    return [{**base, **o} for o in GROUP_OVERRIDES[units, config]]


def close(got, want, tol: dict[str, float], what: str) -> None:
    torch.testing.assert_close(
        torch.as_tensor(got, dtype=torch.float64),
        torch.as_tensor(want, dtype=torch.float64),
        **tol,
        msg=lambda m: f"{what}: {m}",
    )


def run_and_compare(
    units: str, config: str, reference: type[SpecReference] = SpecReference, **impl
) -> SpecReference:
    hypers = group_hypers(units, config)
    base = CONFIGS[units, config]
    params = make_params()
    ref = reference(
        [([p.numpy() for p in g], hp) for g, hp in zip(params, hypers, strict=True)], units
    )
    for g in params:
        for p in g:
            p.requires_grad_()
    untouched = params[NO_GRAD[0]][NO_GRAD[1]].detach().clone()
    # Hyperparameters explicitly at both levels, so no default of the optimizer is assumed;
    # the units, the implementation choice and newton_steps only at optimizer level.
    opt = Arturo(
        [
            {"params": g, **{k: v for k, v in hp.items() if v != base[k]}}
            for g, hp in zip(params, hypers, strict=True)
        ],
        **base,
        units=units,
        newton_steps=30,
        **impl,
    )
    tol, eta_tol = TOLS[units], ETA_TOLS[units]
    for step in range(STEPS[units]):
        ref_grads = gradients([[torch.from_numpy(p) for p in g.params] for g in ref.groups], step)
        ref.step([[None if t is None else t.numpy() for t in g] for g in ref_grads])
        for g, grads in zip(params, gradients(params, step), strict=True):
            for p, grad in zip(g, grads, strict=True):
                p.grad = grad
        opt.step()

        stats = opt.stats()
        for gi, (group, spec) in enumerate(zip(opt.param_groups, ref.groups, strict=True)):
            where = f"step {step}, group {gi}"
            close(group["eta"], spec.eta, eta_tol, f"{where}, η")
            kl_tol = {**eta_tol, "atol": KL_ATOL_PER_BOUND * spec.bound}
            close(stats[gi]["kl"], spec.kl, kl_tol, f"{where}, KL")
            close(stats[gi]["kl_bound"], spec.bound, tol, f"{where}, KL bound")
            assert stats[gi]["skipped_steps"] == 0, where
            for i, p in enumerate(group["params"]):
                here = f"{where}, param {i}"
                close(p.detach(), spec.params[i], tol, f"{here}, θ")
                st, state = spec.state[i], opt.state.get(p)
                if state:
                    close(state["step"], spec.steps[i], tol, f"{here}, step count")
                    if ref.relative:
                        close(state["grad_sq_avg"], spec.mean_square[i], tol, f"{here}, m")
                if st is None:
                    # No gradient yet, or (relative units) held: nothing has started.
                    assert not state or ref.relative, here
                    if state:
                        sigma2 = np.full(tuple(p.shape), hypers[gi]["init_variance"])
                        close(opt.variance(p), sigma2, tol, f"{here}, 1/λ")
                    continue
                for name, got, want in (
                    ("b", state["grad_intercept"], st.b),
                    ("h", opt.curvature(p), st.h),
                    ("λ", state["precision"], st.lam),
                    ("1/λ", opt.variance(p), 1.0 / st.lam),
                ):
                    close(got, want, tol, f"{here}, {name}")
    assert torch.equal(params[NO_GRAD[0]][NO_GRAD[1]].detach(), untouched)
    return ref


def assert_covered(ref: SpecReference) -> None:
    """The problem exercises what it claims to: the clamp, an active and an inactive region,
    and in relative units a held tensor that starts later, and m's weight at its floor."""
    g0, g1, g2 = ref.groups
    assert g0.saw_eta_positive and g1.saw_eta_positive
    assert g1.saw_negative_h
    assert g2.saw_eta_zero and not g2.saw_eta_positive
    if ref.relative:
        assert g0.held == {LATE_AT[1]} and g0.saw_start_after_hold
        assert not (g1.held or g2.held)
        assert g0.saw_weight_floor and g1.saw_weight_floor and g2.saw_weight_floor


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------

UNITS = ["absolute", "relative"]


@pytest.mark.parametrize("units", UNITS)
@pytest.mark.parametrize("config", ["published", "altered"])
@pytest.mark.parametrize("foreach", [False, True], ids=["single", "foreach"])
def test_eager_step_matches_the_specification(units, config, foreach):
    ref = run_and_compare(units, config, foreach=foreach, fused=False)
    assert_covered(ref)


@pytest.mark.slow
@pytest.mark.parametrize("units", UNITS)
def test_fused_step_matches_the_specification(units):
    # One configuration per units: hyperparameters are constants of the compiled graph, so
    # each new set compiles again (tens of seconds on CPU).
    ref = run_and_compare(units, "published", fused=True)
    assert_covered(ref)


def test_bisection_finds_the_root():
    gen = np.random.default_rng(0)
    ghat, a, lam = gen.normal(size=50), gen.uniform(0.01, 1, 50), gen.uniform(1, 100, 50)
    eps = 0.5 * kl_of(0.0, ghat, a, lam) / 7.0
    eta = bisect_eta(ghat, a, lam, eps)
    assert eta > 0 and math.isclose(kl_of(eta, ghat, a, lam), eps, rel_tol=1e-10)
    assert bisect_eta(ghat, a, lam, 2.0 * kl_of(0.0, ghat, a, lam)) == 0.0


# ---------------------------------------------------------------------------------------------
# Mutants: the transcription altered one formula at a time. Each must fail the comparison,
# or the comparison would not see that formula.
# ---------------------------------------------------------------------------------------------


class NoClamp(SpecReference):
    """a = h + ω·λ₀: Departure 2 left out."""

    def stepping_curvature(self, h, prior):
        return h + prior


class DecayNotScaledByEps(SpecReference):
    """μ = θ·(1 − κ)."""

    def decayed_mean(self, theta, hp):
        return theta * (1.0 - hp["weight_decay"])


class PrecisionWithoutOmega(SpecReference):
    """λ ← (a + ν·λ)/ν."""

    def precision_update(self, lam, a, hp, s):
        nu = hp["precision_inertia"]
        return (a + nu * lam) / nu if s is None else (a / s + nu * lam) / nu


class FirstInterceptZero(SpecReference):
    """b starts at 0 instead of the first gradient."""

    def first_state(self, theta, g, hp, s):
        st = super().first_state(theta, g, hp, s)
        st.b = np.zeros_like(theta)
        return st


class InitialCurvatureUnscaled(SpecReference):
    """h₀ instead of h₀·s on a tensor's first step."""

    def initial_curvature(self, hp, s):
        return hp["init_curvature"]


class BoundNotTimesSize(SpecReference):
    """ε instead of ε·d."""

    def kl_bound(self, group, with_grad):
        return group.hp["lr"]


class SizeOfParamsWithGradient(SpecReference):
    """d counts only the coordinates of the params that have a gradient this step."""

    def kl_bound(self, group, with_grad):
        return group.hp["lr"] * sum(group.params[i].size for i in with_grad)


class PriorUnscaled(SpecReference):
    """ω·λ₀ instead of ω·λ₀·s in steps 4 and 7."""

    def prior_curvature(self, hp, s):
        return super().prior_curvature(hp, None)


class PrecisionAOverOmega(SpecReference):
    """λ ← (a/ω + ν·λ)/(ω + ν) instead of a/s."""

    def precision_update(self, lam, a, hp, s):
        return super().precision_update(lam, a, hp, hp["reg_weight"])


class PrecisionAbsolute(SpecReference):
    """λ ← (a + ν·λ)/(ω + ν) in relative units (a not divided by s)."""

    def precision_update(self, lam, a, hp, s):
        return super().precision_update(lam, a, hp, None)


class MeanSquareEmaFromZero(SpecReference):
    """m as a plain exponential average from 0: w = 0.01 from the first step."""

    def mean_square_weight(self, n):
        return 0.01


class MeanSquareWithoutFloor(SpecReference):
    """w = 1/(n + 1) for ever: the plain mean, never an exponential average."""

    def mean_square_weight(self, n):
        return 1.0 / (n + 1)


class MeanSquareOfThisStep(SpecReference):
    """m = mean(g²) of this step alone (w = 1)."""

    def mean_square_weight(self, n):
        return 1.0


class NoHold(SpecReference):
    """A tensor with only zero gradients steps like any other."""

    def is_held(self, group, i):
        return False


class HeldTensorDecays(SpecReference):
    """A held tensor still takes its weight decay."""

    def hold(self, group, i):
        group.params[i] = self.decayed_mean(group.params[i], group.hp)


class HeldStepsCounted(SpecReference):
    """A held tensor's steps count as applied (so its first real step's w < 1)."""

    def hold(self, group, i):
        group.steps[i] += 1


MUTANTS = {
    "absolute": [NoClamp, DecayNotScaledByEps, PrecisionWithoutOmega, FirstInterceptZero],
    "relative": [
        InitialCurvatureUnscaled,
        BoundNotTimesSize,
        SizeOfParamsWithGradient,
        PriorUnscaled,
        PrecisionAOverOmega,
        PrecisionAbsolute,
        MeanSquareEmaFromZero,
        MeanSquareWithoutFloor,
        MeanSquareOfThisStep,
        NoHold,
        HeldTensorDecays,
        HeldStepsCounted,
        NoClamp,
        DecayNotScaledByEps,
        PrecisionWithoutOmega,
        FirstInterceptZero,
    ],
}


@pytest.mark.parametrize(
    "units, mutant",
    [(u, m) for u in UNITS for m in MUTANTS[u]],
    ids=lambda x: getattr(x, "__name__", x),
)
def test_a_mutated_transcription_fails(units, mutant):
    with np.errstate(all="ignore"), pytest.raises(AssertionError):
        run_and_compare(units, "published", mutant, foreach=True, fused=False)
