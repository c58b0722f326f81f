"""The math of one arTuRO step, as pure functions of tensors.

Everything here follows docs/algorithm.md (section numbers below refer to its "One step"
list). The optimizer class (``optimizer.py``) does the bookkeeping -- param groups, lazy state,
validation, dispatch -- and calls :func:`arturo_step` once per ``step()``.

**Each formula is written once**, in a small function of tensors, in the section "Formulas"
below. A step has three phases:

1. **Filter** (per parameter, elementwise): Kalman predict/update of the gradient model (b, h).
2. **Dual solve** (per param group, a handful of global sums): Newton's method on
   ψ(η) = KL(η)^(-1/2) = ε^(-1/2). Each Newton iteration needs one pair of sums over the whole
   group, and all groups' sums are stacked into one small tensor so that a distributed
   all-reduce (``reduce_fn``) runs once per iteration, not once per tensor or per group.
3. **Apply** (per parameter, elementwise): θ ← μ − c·Δ(η), λ ← (a + ν·λ)/(ω + ν).

Two implementations of phases 1 and 3 and of the dual's partial sums exist:

- **Per-tensor passes** (:func:`filter_pass`, :func:`dual_pass`, :func:`apply_pass`): plain
  loops over tensors that call the formulas. Run eagerly they are the readable,
  float64-capable reference (``foreach=False``); compiled by Inductor they are the fused step
  (``fused=True``, ``arturo._kernels.compiled``), one loop per tensor and pass. The dual pass
  recomputes ĝ, a and Δ from θ, b, h, λ rather than storing them, so a step needs no
  parameter-sized temporary.
- **Multi-tensor** (``_foreach_*``): the same formulas transcribed into ``torch._foreach_*``
  list operations (few kernel launches for many tensors in eager mode). Lists have no
  arithmetic operators, so this transcription is the one place the formulas are restated;
  tests/test_golden.py and tests/test_spec.py hold it to the reference.

No function here synchronises with the host. η, the KL and the per-group "take this step"
flag ``keep`` stay device tensors; a cancelled group is cancelled arithmetically (every update
is multiplied by keep ∈ {0, 1}, with every operand kept finite so that 0·update is exactly 0).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "GroupHyperparams",
    "GroupTensors",
    "StepResult",
    "apply_pass",
    "arturo_step",
    "decay_factor",
    "dual_pass",
    "filter_pass",
    "filter_step_",
    "gradient_check",
    "kalman_update_",
    "model_gradient",
    "precision_update",
    "solve_dual",
    "stepping_curvature",
]

#: Sums partial reductions over every shard of a param group. Takes and returns a small
#: tensor of partial sums; the identity when parameters are not sharded.
ReduceFn = Callable[[Tensor], Tensor]

#: Weight of the newest observation in the running gradient scale of a group.
GRAD_SCALE_MOMENTUM = 0.1

#: Relative units: weight of the old value in each tensor's running mean square gradient
#: once it has seen more than 1/(1 − this) steps (before that it is the plain mean).
GRAD_SQ_MOMENTUM = 0.99


class GroupHyperparams(NamedTuple):
    """Scalar hyperparameters of one param group (symbols as in docs/algorithm.md)."""

    weight_decay: float  # κ, decoupled, scaled by the current ε
    reg_weight: float  # ω, weight of KL(q ‖ prior)
    prior_precision: float  # λ₀, precision of the zero-mean prior
    precision_inertia: float  # ν, stands in for η in the precision update
    filter_process_noise: float  # q, added to the filter's covariance diagonal each step
    filter_measurement_noise: float  # r, variance of a gradient measurement
    outlier_threshold: float = math.inf  # skip a step whose gradient scale jumps by this
    relative: bool = False  # units="relative": h₀, ω and ν in units of the gradient's scale

    @property
    def prior(self) -> float:
        """ω·λ₀: the prior's share of every coordinate's curvature."""
        return self.reg_weight * self.prior_precision

    @property
    def precision_keep(self) -> float:
        """ν/(ω + ν): the weight of the old λ in λ ← (a + ν·λ)/(ω + ν)."""
        return self.precision_inertia / (self.reg_weight + self.precision_inertia)

    @property
    def precision_gain(self) -> float:
        """1/(ω + ν): the weight of a in the same update."""
        return 1.0 / (self.reg_weight + self.precision_inertia)


class GroupTensors(NamedTuple):
    """Per-parameter tensors of one param group, all lists aligned.

    ``params`` are updated in place and may be lower precision than the state (bf16/fp16
    params keep fp32 state); ``grads`` likewise. All other lists are optimizer state in the
    state dtype, updated in place.
    """

    params: list[Tensor]  # θ = μ, the mean of the search distribution
    grads: list[Tensor]  # g, measured at θ
    intercepts: list[Tensor]  # b, gradient model intercept
    curvatures: list[Tensor]  # h, gradient model slope = Hessian-diagonal estimate
    cov_bb: list[Tensor]  # P00
    cov_bh: list[Tensor]  # P01
    cov_hh: list[Tensor]  # P11
    precisions: list[Tensor]  # λ, precision of the search distribution
    steps: list[Tensor]  # 0-dim count of applied (not skipped) steps of each parameter
    # Relative units only (None otherwise): each tensor's running mean square gradient (0-dim,
    # state dtype), and its number of entries over all shards.
    grad_sq_avgs: list[Tensor] | None = None
    numels: tuple[int, ...] | None = None


class TensorUnits(NamedTuple):
    """A relative-units group's per-tensor gradient scales, as [T] vectors (T tensors)."""

    scale: Tensor  # s = √(running mean square gradient); 1 where ``present`` is False
    present: Tensor  # bool: the tensor has had a non-zero gradient (else it takes no step)


class StepResult(NamedTuple):
    eta: Tensor  # [G] Lagrange multiplier of each group's trust region (unchanged if cancelled)
    kl: Tensor  # [G] KL of the step taken (0 if cancelled)
    skipped: Tensor  # [G] bool: the group's step was cancelled by a fault (counted)
    grad_scale: Tensor  # [G] running gradient scale, for the next step's outlier check


# ---------------------------------------------------------------------------------------------
# Formulas. Each is written here once; the per-tensor passes call them, eagerly or compiled.
# ---------------------------------------------------------------------------------------------


def zero_nonfinite(g: Tensor) -> Tensor:
    """g with NaN and ±inf entries replaced by 0, so that 0·update is exactly 0 when a step
    is cancelled. (|NaN| < ∞ is false; Inductor vectorises this form on CPU.)"""
    return torch.where(g.abs() < math.inf, g, 0.0)


def innovation_limit(dtype: torch.dtype) -> float:
    """Bound on the filter's scaled innovation (g − ĝ)/s: √(largest finite value).

    A single huge but finite gradient (a loss spike) cannot then push b or h past the
    floating-point range; normal innovations are many orders of magnitude smaller.
    """
    return math.sqrt(torch.finfo(dtype).max)


def kalman_update_(
    x: Tensor,
    g: Tensor,
    b: Tensor,
    h: Tensor,
    p00: Tensor,
    p01: Tensor,
    p11: Tensor,
    *,
    process_noise: float,
    measurement_noise: float,
    keep: Tensor | float = 1.0,
) -> None:
    """Per-coordinate Kalman (recursive least squares) update of the gradient model g ≈ b + h·x.

    docs/algorithm.md steps 1-2: predict (P00 += q, P11 += q), then update with regressor x and
    measurement g. All tensors are updated in place; ``keep`` = 0 makes it a no-op (with g
    finite). h converges to the slope of the gradient, i.e. the Hessian diagonal.
    """
    limit = innovation_limit(b.dtype)
    p00.add_(process_noise * keep)
    p11.add_(process_noise * keep)
    k0 = p00 + p01 * x
    k1 = p01 + p11 * x
    inv_s = keep / (k0 + k1 * x + measurement_noise)
    err_s = ((g - (b + h * x)) * inv_s).clamp(-limit, limit)
    b.add_(k0 * err_s)
    h.add_(k1 * err_s)
    p00.sub_(k0 * k0 * inv_s)
    p01.sub_(k0 * k1 * inv_s)
    p11.sub_(k1 * k1 * inv_s)


def filter_step_(
    x: Tensor,
    g: Tensor,
    b: Tensor,
    h: Tensor,
    p00: Tensor,
    p01: Tensor,
    p11: Tensor,
    step: Tensor,
    *,
    hp: GroupHyperparams,
    keep: Tensor,
    scale: Tensor | None = None,
) -> None:
    """One parameter's filter step: first-step initialisation, Kalman update, step count.

    ``g`` must be finite (non-finite entries zeroed), so that ``keep`` = 0 is an exact no-op.
    b starts at 0 and takes the gradient on the parameter's first applied step. In relative
    units (``scale`` = the tensor's gradient scale s), h starts at h₀·s instead of h₀.
    """
    first = (step == 0).to(b.dtype) * keep
    b.add_(first * g)
    if scale is not None:
        h.mul_(initial_curvature_factor(first, scale))
    kalman_update_(
        x,
        g,
        b,
        h,
        p00,
        p01,
        p11,
        process_noise=hp.filter_process_noise,
        measurement_noise=hp.filter_measurement_noise,
        keep=keep,
    )
    step.add_(keep)


def initial_curvature_factor(first: Tensor, scale: Tensor) -> Tensor:
    """Relative units: h₀ is stored unit-free and multiplied by the tensor's gradient scale s
    on its first step (a select, not 1 + first·(s − 1), so that h₀·s is exact)."""
    return torch.where(first > 0, scale, 1.0)


def running_mean_square(avg: Tensor, now: Tensor, steps: Tensor, keep: Tensor) -> Tensor:
    """Relative units: each tensor's running mean of mean(g²), moved where ``keep``.

    The plain mean of the steps so far (weight 1/(n + 1) for the (n + 1)-th), then an
    exponential average with weight 1 − GRAD_SQ_MOMENTUM. Every operation is homogeneous in
    the gradient, so a loss scaled by c scales it by exactly c² when c is a power of two.
    """
    # In avg's dtype: a float32 weight would cap float64 state at float32 accuracy.
    weight = torch.clamp_min(1.0 / (steps.to(avg.dtype) + 1.0), 1.0 - GRAD_SQ_MOMENTUM)
    return torch.where(keep > 0, avg + (now - avg) * weight, avg)


def gradient_units(avg: Tensor) -> TensorUnits:
    """Relative units: the gradient scale s = √avg of each tensor, and whether it has seen a
    non-zero gradient. A tensor whose gradients were all exactly 0 has no scale: it takes no
    step (its s is set to 1 only to keep every formula finite)."""
    present = avg > 0
    return TensorUnits(torch.where(present, avg.sqrt(), 1.0), present)


def prior_curvature(hp: GroupHyperparams, scale: Tensor | None) -> float | Tensor:
    """ω·λ₀, the prior's share of a coordinate's curvature: in relative units ω is in units
    of the tensor's gradient scale s, so this is ω·λ₀·s."""
    return hp.prior if scale is None else hp.prior * scale


def decay_factor(eps: Tensor, hp: GroupHyperparams, keep: Tensor) -> Tensor:
    """Step 3: μ = θ·(1 − ε·κ), decoupled weight decay scaled by ε so that LR schedules scale
    it too; 1 when the step is cancelled."""
    return 1.0 - eps * (hp.weight_decay * keep)


def model_gradient(mu: Tensor, b: Tensor, h: Tensor, prior: float) -> Tensor:
    """Step 4: ĝ = (h + ω·λ₀)·μ + b, the gradient of E_q[surrogate] + ω·KL(q‖prior) at μ."""
    return (h + prior) * mu + b


def stepping_curvature(h: Tensor, prior: float) -> Tensor:
    """Step 4: a = max(h, 0) + ω·λ₀ (docs/algorithm.md, departure 2: never step uphill)."""
    return h.clamp_min(0.0) + prior


def trust_region_step(g_model: Tensor, a: Tensor, lam: Tensor, eta: Tensor) -> Tensor:
    """Step 5: Δ(η) = ĝ/(a + η·λ)."""
    return g_model / (a + eta * lam)


def precision_update(
    lam: Tensor, a: Tensor, hp: GroupHyperparams, keep: Tensor, scale: Tensor | None = None
) -> Tensor:
    """Step 7: λ ← (a + ν·λ)/(ω + ν), written as λ·m + a·k so that keep = 0 returns λ
    bitwise. In relative units ω and ν are in units of the gradient scale s:
    λ ← (a/s + ν·λ)/(ω + ν)."""
    gain = keep * hp.precision_gain
    if scale is not None:
        gain = gain / scale
    return lam * (1.0 - keep * (1.0 - hp.precision_keep)) + a * gain


def gradient_sum_squares(grads: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
    """[T]: Σ g² of each gradient tensor (this rank's shard), for relative units."""
    return torch.stack([g.to(dtype).square().sum() for g in grads])


def gradient_check(grads: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
    """[2]: (number of gradient tensors holding NaN or ±inf, Σ over tensors of max |g|).

    The second entry is the group's gradient scale for the outlier check; max |g| is
    non-finite exactly when an entry is, so one reduction per tensor serves both.
    """
    peaks = [g.abs().amax().to(dtype) for g in grads if g.numel()]
    if not peaks:
        return torch.zeros(2, dtype=dtype, device=grads[0].device if grads else None)
    stacked = torch.stack(peaks)
    return torch.stack([(~torch.isfinite(stacked)).sum().to(dtype), stacked.sum()])


def gradient_outlier(scale_now: Tensor, scale_avg: Tensor, threshold: Tensor) -> Tensor:
    """True where this step's gradient scale exceeds ``threshold`` times its running average
    (never before there is an average: ``scale_avg`` 0)."""
    return (scale_avg > 0) & (scale_now > threshold * scale_avg)


def update_gradient_scale(
    scale_now: Tensor, scale_avg: Tensor, threshold: Tensor, observed: Tensor
) -> Tensor:
    """Running average of the gradient scale, moved where ``observed``.

    An outlier enters capped at ``threshold``·average, so a single spike barely moves it, but
    a lasting change of scale (a user rescaling the loss) is accepted after a few skipped
    steps, as each one multiplies the average by up to 1 + 0.1·(threshold − 1).
    """
    capped = torch.minimum(scale_now, threshold * scale_avg)
    moved = torch.where(
        scale_avg > 0, torch.lerp(scale_avg, capped, GRAD_SCALE_MOMENTUM), scale_now
    )
    return torch.where(observed, moved, scale_avg)


# ---------------------------------------------------------------------------------------------
# Phase 2: the dual solve, shared by all implementations.
# ---------------------------------------------------------------------------------------------


def _newton_on_psi(eta: Tensor, kl: Tensor, kl_slope: Tensor, eps: Tensor) -> Tensor:
    """One Newton step on ψ(η) = KL(η)^(-1/2) towards ψ = ε^(-1/2), clamped to η ≥ 0.

    ψ is increasing and concave (a power mean of the rᵢ + η), so from the left of the root a
    step never overshoots, and from the right it lands on the left. ``kl_slope`` is
    −dKL/dη = Σ wᵢ/(rᵢ+η)³ ≥ 0; when it is 0 the step is 0 (KL ≡ 0: nothing to constrain).
    """
    tiny = torch.finfo(kl.dtype).tiny
    step = 2.0 * kl * (torch.sqrt(kl / eps) - 1.0) / kl_slope.clamp_min(tiny)
    return (eta + step).clamp_min(0.0)


def solve_dual(
    dual_sums: Callable[[Tensor], Tensor],
    eps: Tensor,
    eta_start: Tensor,
    *,
    newton_steps: int,
    reduce_fn: ReduceFn | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Solve KL(η) = ε for every param group at once (docs/algorithm.md, "Solving the dual
    fast").

    Args:
        dual_sums: maps η [G] to the local partial sums [G, 2] of
            (Σ wᵢ/(rᵢ+η)², Σ wᵢ/(rᵢ+η)³) over each group's coordinates.
        eps: [G] KL bounds ε (finite, > 0).
        eta_start: [G] warm start, the previous step's η.
        newton_steps: fixed number of Newton iterations (no data-dependent loop: no sync).
        reduce_fn: sums the partial sums over shards; called once per evaluation.

    Returns:
        ``(eta, scale, kl)``: η after ``newton_steps`` iterations, the factor c ≤ 1 that makes
        the step exactly feasible (Δ ← c·Δ when KL(η) > ε), and the KL of the scaled step.
        Non-finite sums (overflow) make all three non-finite; the caller cancels such groups.
    """
    eta = eta_start
    for i in range(newton_steps + 1):
        sums = dual_sums(eta)
        if reduce_fn is not None:
            sums = reduce_fn(sums)
        kl, kl_slope = 0.5 * sums[:, 0], sums[:, 1]
        if i < newton_steps:
            eta = _newton_on_psi(eta, kl, kl_slope, eps)
    # Newton from the left stops just short of the root, where KL(η) ≥ ε; scaling Δ by
    # sqrt(ε/KL) makes the constraint hold exactly (and tightly) whatever the iteration count.
    scale = torch.rsqrt((kl / eps).clamp_min(1.0))
    return eta, scale, kl * scale * scale


# ---------------------------------------------------------------------------------------------
# Phases 1 and 3 as per-tensor passes: the reference when run eagerly, the fused step when
# compiled (arturo._kernels.compiled). ``keep``, ``eps``, ``etas`` and ``scales`` are [G];
# ``units`` holds each group's per-tensor gradient scales (relative units) or None.
# ---------------------------------------------------------------------------------------------

#: Per group: its tensors' gradient scales in relative units, None in absolute units.
GroupUnits = Sequence[TensorUnits | None]


def _tensor_units(units: TensorUnits | None, j: int, keep: Tensor) -> tuple[Tensor | None, Tensor]:
    """(s, keep) of a group's j-th tensor: in relative units a tensor that has seen only zero
    gradients is held, whatever its group does."""
    if units is None:
        return None, keep
    return units.scale[j], keep * units.present[j].to(keep.dtype)


def filter_pass(
    groups: Sequence[GroupTensors],
    hparams: Sequence[GroupHyperparams],
    keep: Tensor,
    units: GroupUnits,
) -> None:
    """Steps 1-2 for every parameter, in place."""
    for i, (group, hp) in enumerate(zip(groups, hparams, strict=True)):
        tensors = zip(
            group.params,
            group.grads,
            group.intercepts,
            group.curvatures,
            group.cov_bb,
            group.cov_bh,
            group.cov_hh,
            group.steps,
            strict=True,
        )
        for j, (theta, grad, b, h, p00, p01, p11, step) in enumerate(tensors):
            scale, keep_j = _tensor_units(units[i], j, keep[i])
            x = theta.to(b.dtype)
            g = zero_nonfinite(grad.to(b.dtype))
            filter_step_(x, g, b, h, p00, p01, p11, step, hp=hp, keep=keep_j, scale=scale)


def _dual_terms(
    mu: Tensor, b: Tensor, h: Tensor, lam: Tensor, *, prior: float | Tensor, eta: Tensor
) -> tuple[Tensor, Tensor]:
    """(Σ λΔ², Σ λΔ²/(r+η)) over one tensor, with r + η = (a + η·λ)/λ."""
    a = stepping_curvature(h, prior)
    delta = trust_region_step(model_gradient(mu, b, h, prior), a, lam, eta)
    t = lam * delta * delta
    return t.sum(dtype=eta.dtype), (t * lam / (a + eta * lam)).sum(dtype=eta.dtype)


def dual_pass(
    groups: Sequence[GroupTensors],
    hparams: Sequence[GroupHyperparams],
    eps: Tensor,
    etas: Tensor,
    keep: Tensor,
    units: GroupUnits,
) -> Tensor:
    """[G, 2] local partial sums of the dual at η = ``etas``, from the post-filter state."""
    sums = []
    for i, (group, hp) in enumerate(zip(groups, hparams, strict=True)):
        decay = decay_factor(eps[i], hp, keep[i])
        s2 = etas.new_zeros(())
        s3 = etas.new_zeros(())
        tensors = zip(
            group.params, group.intercepts, group.curvatures, group.precisions, strict=True
        )
        for j, (theta, b, h, lam) in enumerate(tensors):
            scale, keep_j = _tensor_units(units[i], j, keep[i])
            prior = prior_curvature(hp, scale)
            t2, t3 = _dual_terms(theta.to(b.dtype) * decay, b, h, lam, prior=prior, eta=etas[i])
            if scale is not None:  # a held tensor takes no step, so adds nothing to the KL
                t2, t3 = t2 * keep_j, t3 * keep_j
            s2 = s2 + t2
            s3 = s3 + t3
        sums.append(torch.stack([s2, s3]))
    return torch.stack(sums)


def apply_pass(
    groups: Sequence[GroupTensors],
    hparams: Sequence[GroupHyperparams],
    eps: Tensor,
    etas: Tensor,
    scales: Tensor,
    keep: Tensor,
    units: GroupUnits,
) -> None:
    """Steps 6-7: θ ← μ − c·Δ(η), λ ← (a + ν·λ)/(ω + ν), in place. Where keep is 0, θ and λ
    stay bitwise (the select also guards against a Δ that overflowed)."""
    for i, (group, hp) in enumerate(zip(groups, hparams, strict=True)):
        decay = decay_factor(eps[i], hp, keep[i])
        tensors = zip(
            group.params, group.intercepts, group.curvatures, group.precisions, strict=True
        )
        for j, (theta, b, h, lam) in enumerate(tensors):
            scale, keep_j = _tensor_units(units[i], j, keep[i])
            prior = prior_curvature(hp, scale)
            old = theta.to(lam.dtype)
            mu = old * decay
            a = stepping_curvature(h, prior)
            delta = trust_region_step(model_gradient(mu, b, h, prior), a, lam, etas[i])
            theta.copy_(torch.where(keep_j > 0, mu - scales[i] * delta, old))
            lam.copy_(precision_update(lam, a, hp, keep_j, scale))


# ---------------------------------------------------------------------------------------------
# Phases 1 and 3, multi-tensor (torch._foreach_*) transcription of the formulas above, with
# temporaries reused in place to keep the number of parameter-sized allocations small.
# ---------------------------------------------------------------------------------------------


def _broadcast(scalar: Tensor, like: list[Tensor]) -> list[Tensor]:
    """A 0-dim tensor as a list for the TensorList overloads of ``_foreach_add``/``_sub``.

    Their single-Tensor overloads read the scalar on the host on some backends (the meta
    backend calls ``.item()``); the list overloads broadcast it on the device.
    """
    return [scalar] * len(like)


def _as_state_dtype(tensors: list[Tensor], like: list[Tensor]) -> list[Tensor]:
    return [t if t.dtype == s.dtype else t.to(s.dtype) for t, s in zip(tensors, like, strict=True)]


def _foreach_keeps(keep: Tensor, units: TensorUnits | None, n: int) -> Tensor:
    """[n]: each tensor's keep (in relative units a tensor that has seen only zero gradients
    is held)."""
    if units is None:
        return keep.expand(n)
    return keep * units.present.to(keep.dtype)


def _foreach_filter_and_model(
    group: GroupTensors,
    hp: GroupHyperparams,
    *,
    decay: Tensor,
    keep: Tensor,
    units: TensorUnits | None,
) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
    """:func:`filter_step_` for a list, then v = ĝ/λ and r = a/λ at μ (steps 1-4).

    Fresh parameter-sized allocations are what makes eager multi-tensor code slow on CPU
    (each one page-faults), so this allocates four lists and reuses them for everything: two
    come back as v and r, two as scratch for the dual's evaluations.
    """
    b, h = group.intercepts, group.curvatures
    p00, p01, p11 = group.cov_bb, group.cov_bh, group.cov_hh
    keeps = _foreach_keeps(keep, units, len(b))
    prior: float | list[Tensor] = hp.prior
    if units is not None:
        prior = list((hp.prior * units.scale).unbind())
    x = _as_state_dtype(group.params, b)
    limit = innovation_limit(b[0].dtype)
    # The gradient with non-finite entries zeroed; this buffer becomes the scaled innovation.
    err = [zero_nonfinite(t) for t in _as_state_dtype(group.grads, b)]
    # b takes the gradient on a parameter's first applied step (one stacked comparison
    # instead of one small op per parameter).
    first = (torch.stack(group.steps) == 0).to(keep.dtype) * keeps
    torch._foreach_addcmul_(b, err, first.unbind())
    if units is not None:
        torch._foreach_mul_(h, initial_curvature_factor(first, units.scale).unbind())
    # 1. predict
    if units is None:
        q = _broadcast(keep * hp.filter_process_noise, p00)
    else:
        q = list((keeps * hp.filter_process_noise).unbind())
    torch._foreach_add_(p00, q)
    torch._foreach_add_(p11, q)
    # 2. update: k = P·[1, x], s = [1, x]·k + r, [b, h] += k·(g − b − h·x)/s, P −= k·kᵀ/s
    k0 = torch._foreach_addcmul(p00, p01, x)
    k1 = torch._foreach_addcmul(p01, p11, x)
    inv_s = torch._foreach_addcmul(k0, k1, x)
    torch._foreach_add_(inv_s, hp.filter_measurement_noise)
    torch._foreach_reciprocal_(inv_s)
    torch._foreach_mul_(inv_s, keep if units is None else keeps.unbind())
    torch._foreach_sub_(err, b)
    torch._foreach_addcmul_(err, h, x, value=-1.0)
    torch._foreach_mul_(err, inv_s)
    torch._foreach_clamp_min_(err, -limit)
    torch._foreach_clamp_max_(err, limit)
    torch._foreach_addcmul_(b, k0, err)
    torch._foreach_addcmul_(h, k1, err)
    gain_h = err  # k1/s
    torch._foreach_copy_(gain_h, inv_s)
    torch._foreach_mul_(gain_h, k1)
    torch._foreach_addcmul_(p11, k1, gain_h, value=-1.0)
    torch._foreach_addcmul_(p01, k0, gain_h, value=-1.0)
    gain_b = inv_s  # k0/s
    torch._foreach_mul_(gain_b, k0)
    torch._foreach_addcmul_(p00, k0, gain_b, value=-1.0)
    torch._foreach_add_(group.steps, keeps.unbind())

    # 3-4. model at μ = θ·decay, written into k0 (v = ĝ/λ) and k1 (r = a/λ)
    v = k0
    torch._foreach_copy_(v, h)
    torch._foreach_add_(v, prior)
    torch._foreach_mul_(v, x)
    torch._foreach_mul_(v, decay)  # (h + ω·λ₀)·μ
    torch._foreach_add_(v, b)
    torch._foreach_div_(v, group.precisions)
    if units is not None:  # a held tensor takes no step, so adds nothing to the KL
        torch._foreach_mul_(v, keeps.unbind())
    r = k1
    torch._foreach_copy_(r, h)
    torch._foreach_clamp_min_(r, 0.0)
    torch._foreach_add_(r, prior)
    torch._foreach_div_(r, group.precisions)
    return v, r, gain_h, gain_b


def _foreach_dual_sums(
    v_list: list[Tensor],
    r_list: list[Tensor],
    lam_list: list[Tensor],
    eta: Tensor,
    scratch_d: list[Tensor],
    scratch_t: list[Tensor],
) -> Tensor:
    """(Σ λ·Δ², Σ λ·Δ²/(r+η)) with Δ = v/(r+η), written into the scratch lists."""
    d, t = scratch_d, scratch_t
    torch._foreach_copy_(d, r_list)
    torch._foreach_add_(d, _broadcast(eta, d))
    torch._foreach_copy_(t, v_list)
    torch._foreach_div_(t, d)  # Δ
    torch._foreach_mul_(t, t)
    torch._foreach_mul_(t, lam_list)  # λ·Δ² ≥ 0, so its L1 norm is its sum
    s2 = torch.stack(torch._foreach_norm(t, 1)).sum(dtype=eta.dtype)
    torch._foreach_div_(t, d)
    s3 = torch.stack(torch._foreach_norm(t, 1)).sum(dtype=eta.dtype)
    return torch.stack([s2, s3])


def _foreach_apply(
    group: GroupTensors,
    hp: GroupHyperparams,
    v_list: list[Tensor],
    r_list: list[Tensor],
    *,
    eta: Tensor,
    step_scale: Tensor,
    decay: Tensor,
    keep: Tensor,
    units: TensorUnits | None,
) -> None:
    """:func:`apply_pass` for one group's lists."""
    lam = group.precisions
    keeps = _foreach_keeps(keep, units, len(lam))
    mu = _as_state_dtype(group.params, lam)  # the params themselves unless low precision
    # Δ = v/(r+η), written into v; then θ ← θ·decay − c·Δ. Clamping Δ to the finite range
    # keeps 0·Δ exactly 0 in a group cancelled because its Δ overflowed.
    big = torch.finfo(lam[0].dtype).max
    torch._foreach_add_(r_list, _broadcast(eta, r_list))
    torch._foreach_div_(v_list, r_list)
    torch._foreach_clamp_min_(v_list, -big)
    torch._foreach_clamp_max_(v_list, big)
    torch._foreach_mul_(v_list, step_scale)
    if units is None:
        torch._foreach_mul_(mu, decay)
    else:  # a held tensor keeps its value, weight decay included (v is 0 there)
        torch._foreach_mul_(mu, torch.where(keeps > 0, decay, 1.0).unbind())
    torch._foreach_sub_(mu, v_list)
    # λ ← λ·m + a·k, with a = max(h, 0) + ω·λ₀ rebuilt in r's buffer.
    a = r_list
    torch._foreach_copy_(a, group.curvatures)
    torch._foreach_clamp_min_(a, 0.0)
    if units is None:
        torch._foreach_add_(a, hp.prior)
        torch._foreach_mul_(a, keep * hp.precision_gain)
        torch._foreach_mul_(lam, 1.0 - keep * (1.0 - hp.precision_keep))
    else:  # ω·λ₀ and 1/(ω + ν) in units of each tensor's gradient scale s
        torch._foreach_add_(a, (hp.prior * units.scale).unbind())
        torch._foreach_mul_(a, (keeps * hp.precision_gain / units.scale).unbind())
        torch._foreach_mul_(lam, (1.0 - keeps * (1.0 - hp.precision_keep)).unbind())
    torch._foreach_add_(lam, a)
    for p, u in zip(group.params, mu, strict=True):  # low-precision params only
        if u is not p:
            p.copy_(u)


def _foreach_gradient_check(grads: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
    """:func:`gradient_check` with one grouped ∞-norm launch for all tensors."""
    device = grads[0].device if grads else None
    grads = [g for g in grads if g.numel()]
    if not grads:
        return torch.zeros(2, dtype=dtype, device=device)
    peaks = torch.stack(torch._foreach_norm(grads, math.inf)).to(dtype)
    return torch.stack([(~torch.isfinite(peaks)).sum().to(dtype), peaks.sum()])


def _foreach_sum_squares(grads: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
    """:func:`gradient_sum_squares` with one grouped 2-norm launch (‖g‖², squared after the
    root: homogeneous in g all the same)."""
    return torch.stack(torch._foreach_norm(list(grads), 2)).to(dtype).square()


def gradient_statistics(group: GroupTensors, dtype: torch.dtype, relative: bool) -> Tensor:
    """[2], or [2 + T] in relative units: :func:`gradient_check`, then each tensor's Σ g²."""
    check = gradient_check(group.grads, dtype)
    if not relative:
        return check
    return torch.cat([check, gradient_sum_squares(group.grads, dtype)])


# ---------------------------------------------------------------------------------------------
# The step.
# ---------------------------------------------------------------------------------------------

#: The implementations :func:`arturo_step` dispatches to (``Arturo`` chooses one).
IMPLEMENTATIONS = ("single", "foreach", "fused")


def check_gradients(
    groups: Sequence[GroupTensors],
    dtype: torch.dtype,
    *,
    impl: str,
    reduce_fn: ReduceFn | None = None,
    relative: Sequence[bool] | None = None,
) -> tuple[Tensor, list[Tensor | None]]:
    """Each group's gradient statistics, summed over shards in one reduction:

    - [G, 2]: (count of non-finite gradient tensors, gradient scale Σ max|g|);
    - per group, [T] Σ g² of each tensor in relative units (``relative[i]``), else None.
    """
    relative = relative if relative is not None else [False] * len(groups)
    device = groups[0].params[0].device
    if impl == "fused":
        from ._kernels.compiled import gradient_checks

        flat = gradient_checks(groups, dtype, tuple(relative))
    else:
        check, sum_squares = gradient_check, gradient_sum_squares
        if impl == "foreach":
            check, sum_squares = _foreach_gradient_check, _foreach_sum_squares
        parts = []
        for group, rel in zip(groups, relative, strict=True):
            parts.append(check(group.grads, dtype).to(device))
            if rel:
                parts.append(sum_squares(group.grads, dtype).to(device))
        flat = torch.cat(parts)
    if reduce_fn is not None:
        flat = reduce_fn(flat)
    checks, sums, at = [], [], 0
    for group, rel in zip(groups, relative, strict=True):
        checks.append(flat[at : at + 2])
        at += 2
        n = len(group.grads) if rel else 0
        sums.append(flat[at : at + n] if rel else None)
        at += n
    return torch.stack(checks), sums


def advance_units(group: GroupTensors, sum_squares: Tensor, keep: Tensor) -> TensorUnits:
    """Relative units: update each tensor's running mean square gradient (in place) from this
    step's Σ g² (over all shards) and return the scales the step uses."""
    assert group.grad_sq_avgs is not None and group.numels is not None
    avgs = torch.stack(group.grad_sq_avgs)
    sizes = torch.tensor(group.numels, dtype=avgs.dtype).clamp_min(1)
    now = sum_squares.to(avgs.dtype) / sizes.to(avgs.device, non_blocking=True)
    avgs = running_mean_square(avgs, now, torch.stack(group.steps), keep)
    torch._foreach_copy_(group.grad_sq_avgs, list(avgs.unbind()))
    return gradient_units(avgs)


def arturo_step(
    groups: Sequence[GroupTensors],
    hparams: Sequence[GroupHyperparams],
    *,
    lrs: Tensor,
    etas: Tensor,
    grad_scales: Tensor,
    newton_steps: int,
    impl: str = "single",
    reduce_fn: ReduceFn | None = None,
    kl_per_lr: Tensor | None = None,
) -> StepResult:
    """One arTuRO step for several param groups, each with its own trust region.

    Args:
        groups: the tensors of each group; only parameters that have a gradient.
        hparams: the scalar hyperparameters of each group.
        lrs: [G] KL bounds ε (each group's ``lr``), in the dtype of the solve. A group whose ε
            is 0 takes no step (a no-op, not counted as skipped); one whose ε is NaN, ±inf or
            negative is skipped and counted.
        etas: [G] previous η of each group, the Newton warm start.
        grad_scales: [G] running gradient scale of each group (0 before the first step).
        newton_steps: Newton iterations of the dual solve.
        impl: ``"single"`` (per-tensor passes, eager), ``"foreach"`` or ``"fused"``
            (the per-tensor passes compiled by ``torch.compile``).
        reduce_fn: sums partial sums over shards (``None`` when not sharded).
        kl_per_lr: [G] the KL bound of each group per unit of its ε (its number of
            coordinates in relative units, 1 in absolute ones); ``None``: 1 for all.

    Every group is cancelled -- params and state bitwise unchanged, counted in ``skipped`` --
    when any gradient holds NaN or ±inf, or when any group's gradient scale jumps past its
    ``outlier_threshold`` times its running average: the batch itself is bad. One group is
    cancelled, and counted, when its ε is invalid, or (after the filter, which then has taken
    the measurement) when its dual sums overflow, or (relative units, before the filter) when
    a gradient's Σ g² overflows.
    """
    dtype = etas.dtype
    relative = [hp.relative for hp in hparams]
    checks, sum_squares = check_gradients(
        groups, dtype, impl=impl, reduce_fn=reduce_fn, relative=relative
    )
    nonfinite, scale_now = checks[:, 0], checks[:, 1]
    threshold = torch.tensor([hp.outlier_threshold for hp in hparams], dtype=dtype)
    threshold = threshold.to(etas.device, non_blocking=True)
    lr_valid = torch.isfinite(lrs) & (lrs >= 0)
    finite = nonfinite.sum() == 0
    # A non-finite or outlying gradient in any group means a bad batch: every group skips it.
    bad_batch = (
        ~finite | (lr_valid & (lrs > 0) & gradient_outlier(scale_now, grad_scales, threshold)).any()
    )
    # Relative units: a finite gradient so large that its Σ g² overflows (|g| beyond about
    # 1.8e19 in float32) has no usable scale. Its group is cancelled before the running mean
    # square moves, as an overflowing dual cancels its group in either units.
    unscalable = (
        torch.stack(
            [
                torch.zeros((), dtype=torch.bool, device=lrs.device)
                if sq is None
                else ~torch.isfinite(sq).all().to(lrs.device)
                for sq in sum_squares
            ]
        )
        & ~bad_batch
        & lr_valid
        & (lrs > 0)
    )
    active = ~bad_batch & lr_valid & (lrs > 0) & ~unscalable
    new_scales = update_gradient_scale(
        scale_now, grad_scales, threshold, finite & lr_valid & (lrs > 0)
    )
    keep = active.to(dtype)
    eps = torch.where(active, lrs, 1.0)  # finite and > 0 in every group, active or not
    bound = eps if kl_per_lr is None else eps * kl_per_lr
    units = [
        None if sq is None else advance_units(group, sq, keep[i])
        for i, (group, sq) in enumerate(zip(groups, sum_squares, strict=True))
    ]

    if impl == "fused":
        from ._kernels.compiled import fused_passes

        passes = fused_passes(etas.device.type)
        filter_fn, dual_fn, apply_fn = passes.filter, passes.dual, passes.apply
    else:
        filter_fn, dual_fn, apply_fn = filter_pass, dual_pass, apply_pass

    if impl == "foreach":
        duals = []
        for i, (group, hp) in enumerate(zip(groups, hparams, strict=True)):
            decay = decay_factor(eps[i], hp, keep[i])
            duals.append(
                _foreach_filter_and_model(group, hp, decay=decay, keep=keep[i], units=units[i])
            )

        def dual_sums(eta: Tensor) -> Tensor:
            return torch.stack(
                [
                    _foreach_dual_sums(v, r, g.precisions, eta[i], *scratch).to(dtype)
                    for i, ((v, r, *scratch), g) in enumerate(zip(duals, groups, strict=True))
                ]
            )
    else:
        filter_fn(groups, hparams, keep, units)

        def dual_sums(eta: Tensor) -> Tensor:
            return dual_fn(groups, hparams, eps, eta, keep, units)

    eta, scale, kl = solve_dual(
        dual_sums, bound, etas, newton_steps=newton_steps, reduce_fn=reduce_fn
    )
    solved = torch.isfinite(kl) & torch.isfinite(eta) & torch.isfinite(scale)
    overflow = active & ~solved
    step_keep = (active & solved).to(dtype)
    step_scale = torch.where(solved, scale, 0.0) * step_keep
    eta_safe = torch.where(solved, eta, 0.0)

    if impl == "foreach":
        for i, (group, hp, (v, r, *_scratch)) in enumerate(
            zip(groups, hparams, duals, strict=True)
        ):
            _foreach_apply(
                group,
                hp,
                v,
                r,
                eta=eta_safe[i],
                step_scale=step_scale[i],
                decay=decay_factor(eps[i], hp, step_keep[i]),
                keep=step_keep[i],
                units=units[i],
            )
    else:
        apply_fn(groups, hparams, eps, eta_safe, step_scale, step_keep, units)

    applied = step_keep > 0
    return StepResult(
        eta=torch.where(applied, eta, etas),
        kl=torch.where(applied, kl, 0.0),
        skipped=bad_batch | ~lr_valid | overflow | unscalable,
        grad_scale=new_scales,
    )
