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


class GroupHyperparams(NamedTuple):
    """Scalar hyperparameters of one param group (symbols as in docs/algorithm.md)."""

    weight_decay: float  # κ, decoupled, scaled by the current ε
    reg_weight: float  # ω, weight of KL(q ‖ prior)
    prior_precision: float  # λ₀, precision of the zero-mean prior
    precision_inertia: float  # ν, stands in for η in the precision update
    filter_process_noise: float  # q, added to the filter's covariance diagonal each step
    filter_measurement_noise: float  # r, variance of a gradient measurement
    outlier_threshold: float = math.inf  # skip a step whose gradient scale jumps by this

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
) -> None:
    """One parameter's filter step: first-step initialisation, Kalman update, step count.

    ``g`` must be finite (non-finite entries zeroed), so that ``keep`` = 0 is an exact no-op.
    b starts at 0 and takes the gradient on the parameter's first applied step.
    """
    first = (step == 0).to(b.dtype) * keep
    b.add_(first * g)
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


def precision_update(lam: Tensor, a: Tensor, hp: GroupHyperparams, keep: Tensor) -> Tensor:
    """Step 7: λ ← (a + ν·λ)/(ω + ν), written as λ·m + a·k so that keep = 0 returns λ
    bitwise."""
    return lam * (1.0 - keep * (1.0 - hp.precision_keep)) + a * (keep * hp.precision_gain)


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
# compiled (arturo._kernels.compiled). ``keep``, ``eps``, ``etas`` and ``scales`` are [G].
# ---------------------------------------------------------------------------------------------


def filter_pass(
    groups: Sequence[GroupTensors], hparams: Sequence[GroupHyperparams], keep: Tensor
) -> None:
    """Steps 1-2 for every parameter, in place."""
    for i, (group, hp) in enumerate(zip(groups, hparams, strict=True)):
        for theta, grad, b, h, p00, p01, p11, _lam, step in zip(*group, strict=True):
            x = theta.to(b.dtype)
            g = zero_nonfinite(grad.to(b.dtype))
            filter_step_(x, g, b, h, p00, p01, p11, step, hp=hp, keep=keep[i])


def _dual_terms(
    mu: Tensor, b: Tensor, h: Tensor, lam: Tensor, *, prior: float, eta: Tensor
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
) -> Tensor:
    """[G, 2] local partial sums of the dual at η = ``etas``, from the post-filter state."""
    sums = []
    for i, (group, hp) in enumerate(zip(groups, hparams, strict=True)):
        decay = decay_factor(eps[i], hp, keep[i])
        s2 = etas.new_zeros(())
        s3 = etas.new_zeros(())
        for theta, b, h, lam in zip(
            group.params, group.intercepts, group.curvatures, group.precisions, strict=True
        ):
            t2, t3 = _dual_terms(theta.to(b.dtype) * decay, b, h, lam, prior=hp.prior, eta=etas[i])
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
) -> None:
    """Steps 6-7: θ ← μ − c·Δ(η), λ ← (a + ν·λ)/(ω + ν), in place. Where keep is 0, θ and λ
    stay bitwise (the select also guards against a Δ that overflowed)."""
    for i, (group, hp) in enumerate(zip(groups, hparams, strict=True)):
        decay = decay_factor(eps[i], hp, keep[i])
        for theta, b, h, lam in zip(
            group.params, group.intercepts, group.curvatures, group.precisions, strict=True
        ):
            old = theta.to(lam.dtype)
            mu = old * decay
            a = stepping_curvature(h, hp.prior)
            delta = trust_region_step(model_gradient(mu, b, h, hp.prior), a, lam, etas[i])
            theta.copy_(torch.where(keep[i] > 0, mu - scales[i] * delta, old))
            lam.copy_(precision_update(lam, a, hp, keep[i]))


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


def _foreach_filter_and_model(
    group: GroupTensors, hp: GroupHyperparams, *, decay: Tensor, keep: Tensor
) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
    """:func:`filter_step_` for a list, then v = ĝ/λ and r = a/λ at μ (steps 1-4).

    Fresh parameter-sized allocations are what makes eager multi-tensor code slow on CPU
    (each one page-faults), so this allocates four lists and reuses them for everything: two
    come back as v and r, two as scratch for the dual's evaluations.
    """
    prior = hp.prior
    b, h = group.intercepts, group.curvatures
    p00, p01, p11 = group.cov_bb, group.cov_bh, group.cov_hh
    x = _as_state_dtype(group.params, b)
    limit = innovation_limit(b[0].dtype)
    # The gradient with non-finite entries zeroed; this buffer becomes the scaled innovation.
    err = [zero_nonfinite(t) for t in _as_state_dtype(group.grads, b)]
    # b takes the gradient on a parameter's first applied step (one stacked comparison
    # instead of one small op per parameter).
    first = ((torch.stack(group.steps) == 0).to(keep.dtype) * keep).unbind()
    torch._foreach_addcmul_(b, err, first)
    # 1. predict
    q = _broadcast(keep * hp.filter_process_noise, p00)
    torch._foreach_add_(p00, q)
    torch._foreach_add_(p11, q)
    # 2. update: k = P·[1, x], s = [1, x]·k + r, [b, h] += k·(g − b − h·x)/s, P −= k·kᵀ/s
    k0 = torch._foreach_addcmul(p00, p01, x)
    k1 = torch._foreach_addcmul(p01, p11, x)
    inv_s = torch._foreach_addcmul(k0, k1, x)
    torch._foreach_add_(inv_s, hp.filter_measurement_noise)
    torch._foreach_reciprocal_(inv_s)
    torch._foreach_mul_(inv_s, keep)
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
    torch._foreach_add_(group.steps, _broadcast(keep, group.steps))

    # 3-4. model at μ = θ·decay, written into k0 (v = ĝ/λ) and k1 (r = a/λ)
    v = k0
    torch._foreach_copy_(v, h)
    torch._foreach_add_(v, prior)
    torch._foreach_mul_(v, x)
    torch._foreach_mul_(v, decay)  # (h + ω·λ₀)·μ
    torch._foreach_add_(v, b)
    torch._foreach_div_(v, group.precisions)
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
) -> None:
    """:func:`apply_pass` for one group's lists."""
    lam = group.precisions
    mu = _as_state_dtype(group.params, lam)  # the params themselves unless low precision
    # Δ = v/(r+η), written into v; then θ ← θ·decay − c·Δ. Clamping Δ to the finite range
    # keeps 0·Δ exactly 0 in a group cancelled because its Δ overflowed.
    big = torch.finfo(lam[0].dtype).max
    torch._foreach_add_(r_list, _broadcast(eta, r_list))
    torch._foreach_div_(v_list, r_list)
    torch._foreach_clamp_min_(v_list, -big)
    torch._foreach_clamp_max_(v_list, big)
    torch._foreach_mul_(v_list, step_scale)
    torch._foreach_mul_(mu, decay)
    torch._foreach_sub_(mu, v_list)
    # λ ← λ·m + a·k, with a = max(h, 0) + ω·λ₀ rebuilt in r's buffer.
    a = r_list
    torch._foreach_copy_(a, group.curvatures)
    torch._foreach_clamp_min_(a, 0.0)
    torch._foreach_add_(a, hp.prior)
    torch._foreach_mul_(a, keep * hp.precision_gain)
    torch._foreach_mul_(lam, 1.0 - keep * (1.0 - hp.precision_keep))
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
) -> Tensor:
    """[G, 2]: each group's (count of non-finite gradient tensors, gradient scale), summed
    over shards in one reduction."""
    device = groups[0].params[0].device
    if impl == "fused":
        from ._kernels.compiled import gradient_checks

        checks = gradient_checks(groups, dtype)
    else:
        one = _foreach_gradient_check if impl == "foreach" else gradient_check
        checks = torch.stack([one(g.grads, dtype).to(device) for g in groups])
    return reduce_fn(checks) if reduce_fn is not None else checks


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

    Every group is cancelled -- params and state bitwise unchanged, counted in ``skipped`` --
    when any gradient holds NaN or ±inf, or when any group's gradient scale jumps past its
    ``outlier_threshold`` times its running average: the batch itself is bad. One group is
    cancelled, and counted, when its ε is invalid, or (after the filter, which then has taken
    the measurement) when its dual sums overflow.
    """
    dtype = etas.dtype
    checks = check_gradients(groups, dtype, impl=impl, reduce_fn=reduce_fn)
    nonfinite, scale_now = checks[:, 0], checks[:, 1]
    threshold = torch.tensor([hp.outlier_threshold for hp in hparams], dtype=dtype)
    threshold = threshold.to(etas.device, non_blocking=True)
    lr_valid = torch.isfinite(lrs) & (lrs >= 0)
    finite = nonfinite.sum() == 0
    # A non-finite or outlying gradient in any group means a bad batch: every group skips it.
    bad_batch = (
        ~finite | (lr_valid & (lrs > 0) & gradient_outlier(scale_now, grad_scales, threshold)).any()
    )
    active = ~bad_batch & lr_valid & (lrs > 0)
    new_scales = update_gradient_scale(
        scale_now, grad_scales, threshold, finite & lr_valid & (lrs > 0)
    )
    keep = active.to(dtype)
    eps = torch.where(active, lrs, 1.0)  # finite and > 0 in every group, active or not

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
            duals.append(_foreach_filter_and_model(group, hp, decay=decay, keep=keep[i]))

        def dual_sums(eta: Tensor) -> Tensor:
            return torch.stack(
                [
                    _foreach_dual_sums(v, r, g.precisions, eta[i], *scratch).to(dtype)
                    for i, ((v, r, *scratch), g) in enumerate(zip(duals, groups, strict=True))
                ]
            )
    else:
        filter_fn(groups, hparams, keep)

        def dual_sums(eta: Tensor) -> Tensor:
            return dual_fn(groups, hparams, eps, eta, keep)

    eta, scale, kl = solve_dual(
        dual_sums, eps, etas, newton_steps=newton_steps, reduce_fn=reduce_fn
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
            )
    else:
        apply_fn(groups, hparams, eps, eta_safe, step_scale, step_keep)

    applied = step_keep > 0
    return StepResult(
        eta=torch.where(applied, eta, etas),
        kl=torch.where(applied, kl, 0.0),
        skipped=bad_batch | ~lr_valid | overflow,
        grad_scale=new_scales,
    )
