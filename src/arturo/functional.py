"""The math of one arTuRO step, as pure functions of tensors.

Everything here follows ALGORITHM.md (section numbers below refer to its "One step" list).
The optimizer class (``optimizer.py``) does the bookkeeping -- param groups, lazy state,
validation -- and calls :func:`arturo_step` once per ``step()``.

A step has three phases, shared by every implementation:

1. **Filter and model** (per parameter, elementwise): Kalman predict/update of the gradient
   model (b, h), decoupled weight decay, model gradient ĝ and stepping curvature a. It leaves
   two temporaries per parameter: ``v = ĝ/λ`` and ``r = a/λ``.
2. **Dual solve** (per param group, a handful of global sums): Newton's method on
   ψ(η) = KL(η)^(-1/2) = ε^(-1/2). Each Newton iteration needs one pair of sums over the whole
   group, and all groups' sums are stacked into one small tensor so that a distributed
   all-reduce (``reduce_fn``) runs once per iteration, not once per tensor or per group.
3. **Apply** (per parameter, elementwise): θ ← μ − c·Δ(η), λ ← (a + ν·λ)/(ω + ν).

Two implementations of phases 1 and 3 and of the dual's partial sums exist with identical
signatures: a plain single-tensor reference (``_single_tensor_*``, readable, float64-capable)
and a multi-tensor one built on ``torch._foreach_*`` (``_multi_tensor_*``). Tests check that
they agree.

No function here synchronises with the host: η, the KL and the "skip this step" flag stay
device tensors, and a step with a non-finite gradient is cancelled arithmetically (every
update is multiplied by ``keep`` ∈ {0, 1}, with the gradient's non-finite entries zeroed so
that 0·update is exactly 0).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "GroupHyperparams",
    "GroupTensors",
    "StepResult",
    "arturo_step",
    "count_nonfinite_grads",
    "filter_step_",
    "kalman_update_",
    "solve_dual",
]

#: Sums partial reductions over every shard of a param group. Takes and returns a small
#: tensor of partial sums; the identity when parameters are not sharded.
ReduceFn = Callable[[Tensor], Tensor]


class GroupHyperparams(NamedTuple):
    """Scalar hyperparameters of one param group (symbols as in ALGORITHM.md)."""

    weight_decay: float  # κ, decoupled, scaled by the current ε
    reg_weight: float  # ω, weight of KL(q ‖ prior)
    prior_precision: float  # λ₀, precision of the zero-mean prior
    precision_inertia: float  # ν, stands in for η in the precision update
    filter_process_noise: float  # q, added to the filter's covariance diagonal each step
    filter_measurement_noise: float  # r, variance of a gradient measurement

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
    eta: Tensor  # [G] Lagrange multiplier of each group's trust region (unchanged if skipped)
    kl: Tensor  # [G] KL of the step taken (0 if skipped)
    skipped: Tensor  # 0-dim bool, True when a non-finite gradient cancelled the whole step


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
    """Solve KL(η) = ε for every param group at once (ALGORITHM.md, "Solving the dual fast").

    Args:
        dual_sums: maps η [G] to the local partial sums [G, 2] of
            (Σ wᵢ/(rᵢ+η)², Σ wᵢ/(rᵢ+η)³) over each group's coordinates.
        eps: [G] KL bounds ε (> 0).
        eta_start: [G] warm start, the previous step's η.
        newton_steps: fixed number of Newton iterations (no data-dependent loop: no sync).
        reduce_fn: sums the partial sums over shards; called once per evaluation.

    Returns:
        ``(eta, scale, kl)``: η after ``newton_steps`` iterations, the factor c ≤ 1 that makes
        the step exactly feasible (Δ ← c·Δ when KL(η) > ε), and the KL of the scaled step.
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
# Phases 1 and 3, single-tensor reference implementation.
# ---------------------------------------------------------------------------------------------


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

    ALGORITHM.md steps 1-2: predict (P00 += q, P11 += q), then update with regressor x and
    measurement g. All tensors are updated in place; ``keep`` = 0 makes it a no-op (with g
    finite). h converges to the slope of the gradient, i.e. the Hessian diagonal.
    """
    p00.add_(process_noise * keep)
    p11.add_(process_noise * keep)
    k0 = p00 + p01 * x
    k1 = p01 + p11 * x
    inv_s = keep / (k0 + k1 * x + measurement_noise)
    err_s = (g - (b + h * x)) * inv_s
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


def _single_tensor_filter_and_model(
    group: GroupTensors,
    hp: GroupHyperparams,
    *,
    decay: Tensor,
    keep: Tensor,
) -> tuple[list[Tensor], list[Tensor]]:
    """Filter predict/update (ALGORITHM.md steps 1-2), then the model at μ (steps 3-4).

    Updates b, h, P in place and returns ``v = ĝ/λ`` and ``r = a/λ`` for each parameter.
    """
    prior = hp.prior  # ω·λ₀
    v_list, r_list = [], []
    for theta, grad, b, h, p00, p01, p11, lam, step in zip(*group, strict=True):
        x = theta.to(b.dtype)
        # Zeroing non-finite entries matters only when keep == 0, where it makes 0·update == 0.
        g = torch.nan_to_num(grad.to(b.dtype), nan=0.0, posinf=0.0, neginf=0.0)
        filter_step_(x, g, b, h, p00, p01, p11, step, hp=hp, keep=keep)
        # 3-4. decoupled weight decay, then the model gradient and stepping curvature at μ
        mu = x * decay
        g_model = (h + prior) * mu + b
        a = h.clamp_min(0.0) + prior
        v_list.append(g_model / lam)
        r_list.append(a / lam)
    return v_list, r_list


def _single_tensor_dual_sums(
    v_list: list[Tensor], r_list: list[Tensor], lam_list: list[Tensor], eta: Tensor
) -> Tensor:
    """(Σ λ·Δ², Σ λ·Δ²/(r+η)) with Δ = v/(r+η); equal to (Σ w/(r+η)², Σ w/(r+η)³)."""
    s2 = eta.new_zeros(())
    s3 = eta.new_zeros(())
    for v, r, lam in zip(v_list, r_list, lam_list, strict=True):
        d = r + eta
        t = lam * (v / d) ** 2
        s2 = s2 + t.sum(dtype=eta.dtype)
        s3 = s3 + (t / d).sum(dtype=eta.dtype)
    return torch.stack([s2, s3])


def _single_tensor_apply(
    group: GroupTensors,
    hp: GroupHyperparams,
    v_list: list[Tensor],
    r_list: list[Tensor],
    *scratch: list[Tensor],
    eta: Tensor,
    step_scale: Tensor,
    decay: Tensor,
    keep: Tensor,
) -> None:
    """θ ← μ − c·Δ(η) (step 6) and λ ← (a + ν·λ)/(ω + ν) (step 7), in place."""
    prior, lam_keep, lam_gain = hp.prior, hp.precision_keep, hp.precision_gain
    for theta, h, lam, v, r in zip(
        group.params, group.curvatures, group.precisions, v_list, r_list, strict=True
    ):
        mu = theta.to(lam.dtype) * decay
        delta = v / (r + eta)  # = ĝ / (a + η·λ)
        theta.copy_(mu - step_scale * delta)
        a = h.clamp_min(0.0) + prior
        # Written as λ·m + a·k so that keep == 0 leaves λ bitwise unchanged.
        lam.mul_(1.0 - keep * (1.0 - lam_keep)).add_(a * (keep * lam_gain))


# ---------------------------------------------------------------------------------------------
# Phases 1 and 3, multi-tensor (torch._foreach_*) implementation. Same math, same order of
# floating-point operations where it matters; temporaries are reused in place to keep the
# number of parameter-sized allocations small.
# ---------------------------------------------------------------------------------------------


def _broadcast(scalar: Tensor, like: list[Tensor]) -> list[Tensor]:
    """A 0-dim tensor as a list for the TensorList overloads of ``_foreach_add``/``_sub``.

    Their single-Tensor overloads read the scalar on the host on some backends (the meta
    backend calls ``.item()``); the list overloads broadcast it on the device.
    """
    return [scalar] * len(like)


def _as_state_dtype(tensors: list[Tensor], like: list[Tensor]) -> list[Tensor]:
    return [t if t.dtype == s.dtype else t.to(s.dtype) for t, s in zip(tensors, like, strict=True)]


def _multi_tensor_filter_and_model(
    group: GroupTensors,
    hp: GroupHyperparams,
    *,
    decay: Tensor,
    keep: Tensor,
) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
    """As ``_single_tensor_filter_and_model``, also returning two free scratch lists.

    Fresh parameter-sized allocations are what makes eager multi-tensor code slow on CPU
    (each one page-faults), so this allocates four lists and reuses them for everything: two
    come back as v and r, two as scratch for the dual's evaluations.
    """
    prior = hp.prior
    b, h = group.intercepts, group.curvatures
    p00, p01, p11 = group.cov_bb, group.cov_bh, group.cov_hh
    x = _as_state_dtype(group.params, b)
    # The gradient with non-finite entries zeroed (they matter only when keep == 0, where
    # 0·update must be exactly 0); this buffer becomes the filter's scaled innovation.
    err = [
        torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0)
        for t in _as_state_dtype(group.grads, b)
    ]
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


def _multi_tensor_dual_sums(
    v_list: list[Tensor],
    r_list: list[Tensor],
    lam_list: list[Tensor],
    eta: Tensor,
    scratch_d: list[Tensor] | None = None,
    scratch_t: list[Tensor] | None = None,
) -> Tensor:
    """As ``_single_tensor_dual_sums``; writes into the scratch lists when given."""
    if scratch_d is None or scratch_t is None:
        scratch_d = [torch.empty_like(r) for r in r_list]
        scratch_t = [torch.empty_like(v) for v in v_list]
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


def _multi_tensor_apply(
    group: GroupTensors,
    hp: GroupHyperparams,
    v_list: list[Tensor],
    r_list: list[Tensor],
    *scratch: list[Tensor],
    eta: Tensor,
    step_scale: Tensor,
    decay: Tensor,
    keep: Tensor,
) -> None:
    prior, lam_keep, lam_gain = hp.prior, hp.precision_keep, hp.precision_gain
    lam = group.precisions
    mu = _as_state_dtype(group.params, lam)  # the params themselves unless low precision
    # Δ = v/(r+η), written into v; then θ ← θ·decay − c·Δ.
    torch._foreach_add_(r_list, _broadcast(eta, r_list))
    torch._foreach_div_(v_list, r_list)
    torch._foreach_mul_(v_list, step_scale)
    torch._foreach_mul_(mu, decay)
    torch._foreach_sub_(mu, v_list)
    # λ ← λ·m + a·k, with a = max(h, 0) + ω·λ₀ rebuilt in r's buffer.
    a = r_list
    torch._foreach_copy_(a, group.curvatures)
    torch._foreach_clamp_min_(a, 0.0)
    torch._foreach_add_(a, prior)
    torch._foreach_mul_(a, keep * lam_gain)
    torch._foreach_mul_(lam, 1.0 - keep * (1.0 - lam_keep))
    torch._foreach_add_(lam, a)
    _write_back(group.params, mu)


def _write_back(params: list[Tensor], updated: list[Tensor]) -> None:
    """Copy updated means into lower-precision params (a no-op for params updated in place)."""
    for p, u in zip(params, updated, strict=True):
        if u is not p:
            p.copy_(u)


# ---------------------------------------------------------------------------------------------
# The step.
# ---------------------------------------------------------------------------------------------


class _Impl(NamedTuple):
    """One implementation of the per-coordinate phases.

    ``filter_and_model(group, hp, decay=, keep=)`` returns ``(v, r, *scratch)``;
    ``dual_sums(v, r, λ, η, *scratch)`` and ``apply(group, hp, v, r, *scratch, ...)`` take
    them back. Scratch lists are buffers an implementation may reuse (none for the reference).
    """

    filter_and_model: Callable[..., tuple[list[Tensor], ...]]
    dual_sums: Callable[..., Tensor]
    apply: Callable[..., None]


_SINGLE_TENSOR = _Impl(
    _single_tensor_filter_and_model, _single_tensor_dual_sums, _single_tensor_apply
)
_MULTI_TENSOR = _Impl(_multi_tensor_filter_and_model, _multi_tensor_dual_sums, _multi_tensor_apply)


def count_nonfinite_grads(
    grads: Sequence[Tensor], dtype: torch.dtype, reduce_fn: ReduceFn | None = None
) -> Tensor:
    """Number of gradient tensors (over all shards) holding a NaN or ±inf, as a 0-dim tensor.

    The ∞-norm of a tensor is non-finite exactly when one of its entries is, and
    ``_foreach_norm`` computes all of them in one grouped launch.
    """
    norms = torch.stack(torch._foreach_norm(list(grads), float("inf")))
    count = (~torch.isfinite(norms)).sum().to(dtype)
    return reduce_fn(count) if reduce_fn is not None else count


def arturo_step(
    groups: Sequence[GroupTensors],
    hparams: Sequence[GroupHyperparams],
    *,
    lrs: Tensor,
    etas: Tensor,
    nonfinite_count: Tensor,
    newton_steps: int,
    foreach: bool,
    reduce_fn: ReduceFn | None = None,
    fused: bool = False,
) -> StepResult:
    """One arTuRO step for several param groups, each with its own trust region.

    Args:
        groups: the tensors of each group; only parameters that have a gradient.
        hparams: the scalar hyperparameters of each group.
        lrs: [G] KL bounds ε (each group's ``lr``), in the dtype of the solve.
        etas: [G] previous η of each group, the Newton warm start.
        nonfinite_count: 0-dim, from :func:`count_nonfinite_grads`; the step is cancelled
            (params and state bitwise unchanged) unless it is 0.
        newton_steps: Newton iterations of the dual solve.
        foreach: use the multi-tensor implementation.
        reduce_fn: sums partial sums over shards (``None`` when not sharded).
        fused: use the compiled implementation (``arturo._kernels.compiled``), which does
            the same math in three fused passes; ``foreach`` is then ignored.

    Returns:
        :class:`StepResult` with the new η and KL of each group.
    """
    if fused:
        from ._kernels.compiled import fused_arturo_step  # lazily: it imports the compiler

        return fused_arturo_step(
            groups,
            hparams,
            lrs=lrs,
            etas=etas,
            nonfinite_count=nonfinite_count,
            newton_steps=newton_steps,
            reduce_fn=reduce_fn,
        )
    impl = _MULTI_TENSOR if foreach else _SINGLE_TENSOR
    dtype = etas.dtype
    keep = (nonfinite_count == 0).to(dtype)
    eps = lrs.clamp_min(torch.finfo(dtype).tiny)

    decays, duals = [], []
    for i, (group, hp) in enumerate(zip(groups, hparams, strict=True)):
        # 3. decoupled weight decay, scaled by ε so that LR schedules scale it too
        decay = 1.0 - eps[i] * (hp.weight_decay * keep)
        decays.append(decay)
        duals.append(impl.filter_and_model(group, hp, decay=decay, keep=keep))

    def dual_sums(eta: Tensor) -> Tensor:
        return torch.stack(
            [
                impl.dual_sums(v, r, group.precisions, eta[i], *scratch).to(dtype)
                for i, ((v, r, *scratch), group) in enumerate(zip(duals, groups, strict=True))
            ]
        )

    eta, scale, kl = solve_dual(
        dual_sums, eps, etas, newton_steps=newton_steps, reduce_fn=reduce_fn
    )
    for i, (group, hp, (v, r, *scratch)) in enumerate(zip(groups, hparams, duals, strict=True)):
        impl.apply(
            group,
            hp,
            v,
            r,
            *scratch,
            eta=eta[i],
            step_scale=scale[i] * keep,
            decay=decays[i],
            keep=keep,
        )
    skipped = keep == 0
    return StepResult(eta=torch.where(skipped, etas, eta), kl=kl * keep, skipped=skipped)
