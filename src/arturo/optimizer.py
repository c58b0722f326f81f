"""The :class:`Arturo` optimizer: validation, param groups and state around ``functional``."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import functional as F
from .distributed import local_shard, partial_sum_reducer

__all__ = ["Arturo", "NonFiniteGradientError", "SparseGradientError"]

# Per-parameter state keys. All are checkpointed; none is derived.
STATE_STEP = "step"  # 0-dim float32: applied (not skipped) steps of this parameter
STATE_INTERCEPT = "grad_intercept"  # b
STATE_CURVATURE = "curvature"  # h, the Hessian-diagonal estimate
STATE_COV_BB = "filter_cov_bb"  # P00
STATE_COV_BH = "filter_cov_bh"  # P01
STATE_COV_HH = "filter_cov_hh"  # P11
STATE_PRECISION = "precision"  # λ, precision of the search distribution
PARAM_STATE_KEYS = (
    STATE_STEP,
    STATE_INTERCEPT,
    STATE_CURVATURE,
    STATE_COV_BB,
    STATE_COV_BH,
    STATE_COV_HH,
    STATE_PRECISION,
)

# Per-group state, kept as 0-dim tensors in the param group itself so that state_dict()
# carries it next to the group's hyperparameters.
GROUP_ETA = "eta"  # η of the last step: Lagrange multiplier of the trust region
GROUP_KL = "kl"  # KL of the last step
GROUP_SKIPPED = "skipped_steps"  # steps cancelled by a non-finite gradient
GROUP_STATE_KEYS = (GROUP_ETA, GROUP_KL, GROUP_SKIPPED)

# The published Fashion-MNIST hyperparameters (ALGORITHM.md, full precision from the paper's
# code); see BENCHMARKS.md for the other experiments.
DEFAULT_LR = 0.08567456308209788


class SparseGradientError(RuntimeError):
    """Raised when a parameter has a sparse gradient, which arTuRO does not support."""


class NonFiniteGradientError(FloatingPointError):
    """Raised by ``step()`` when ``nonfinite="raise"`` and a gradient holds NaN or ±inf."""


def _check(name: str, value: Any, ok: bool, requirement: str) -> None:
    if not ok:
        raise ValueError(f"Invalid {name}: {value!r} ({requirement})")


def _is_real(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


class Arturo(Optimizer):
    r"""arTuRO: a KL trust-region step on a diagonal Gaussian, with curvature from gradients.

    Dahlinger, Becker, Hüttenrauch, Neumann, *Information-Theoretic Trust Regions for
    Stochastic Gradient-Based Optimization*, OPT@NeurIPS 2023, arXiv:2310.20574. The weights θ
    are the mean of a search distribution q = N(θ, diag(1/λ)). A per-coordinate Kalman filter
    fits the gradient model ĝ(θ) = b + h·θ to the stochastic gradients, so h estimates the
    Hessian diagonal. Each step minimises the model plus a prior term inside KL ≤ ε, with
    ε = ``lr``. The project's ALGORITHM.md is the full specification.

    .. math::
        \begin{aligned}
        &P_{00} \mathrel{+}= q,\; P_{11} \mathrel{+}= q;\quad
          k = P\,[1, \theta]^\top,\; s = [1, \theta]\,k + r_{\text{meas}} \\
        &[b, h] \mathrel{+}= \tfrac{k}{s}\,\big(g - b - h\theta\big),\quad
          P \mathrel{-}= k k^\top / s \\
        &\mu = \theta\,(1 - \epsilon\kappa),\quad
          \hat g = (h + \omega\lambda_0)\,\mu + b,\quad a = \max(h, 0) + \omega\lambda_0 \\
        &\eta \ge 0:\; \tfrac12 \textstyle\sum_i \lambda_i \Delta_i(\eta)^2 = \epsilon
          \text{ (or } \eta = 0 \text{ if already} \le \epsilon),\quad
          \Delta(\eta) = \hat g / (a + \eta\lambda) \\
        &\theta \leftarrow \mu - \Delta(\eta),\quad
          \lambda \leftarrow (a + \nu\lambda) / (\omega + \nu)
        \end{aligned}

    ===========  ==============================  ============================  ==============
    symbol       argument                        state key                     default
    ===========  ==============================  ============================  ==============
    ε            ``lr`` (KL bound)               --                            0.0857
    κ            ``weight_decay``                --                            1.54e-6
    ω            ``reg_weight``                  --                            0.0587
    λ₀           ``prior_precision``             --                            0.0015
    σ₀²          ``init_variance`` (λ = 1/σ₀²)   ``precision`` (λ)             0.01
    ν            ``precision_inertia``           --                            1.3
    p₀           ``filter_init_cov``             ``filter_cov_{bb,bh,hh}``     5e-5
    q            ``filter_process_noise``        --                            0.0174
    r            ``filter_measurement_noise``    --                            2.82
    h₀           ``init_curvature``              ``curvature`` (h)             0.1
    b            --                              ``grad_intercept``            first gradient
    η            --                              group ``eta``                 0
    ===========  ==============================  ============================  ==============

    Args:
        params: parameters or param groups. Each group is its own trust region with its own ε
            and η; to reproduce the published code exactly, use a single group.
        lr: the KL bound ε of each step. LR schedulers drive it like any learning rate.
        weight_decay: decoupled weight decay κ; the mean shrinks by a factor (1 − ε·κ).
        reg_weight: weight ω of the KL to the zero-mean prior N(0, 1/λ₀).
        prior_precision: precision λ₀ of that prior. ω·λ₀ > 0 keeps every coordinate's
            stepping curvature positive.
        init_variance: initial variance σ₀² of the search distribution.
        precision_inertia: ν in the precision update λ ← (a + ν·λ)/(ω + ν).
        filter_init_cov: initial variance p₀ of the filter's (b, h) estimate.
        filter_process_noise: q, how fast the filter forgets.
        filter_measurement_noise: r, the assumed variance of one gradient measurement.
        init_curvature: initial Hessian-diagonal estimate h₀.
        newton_steps: Newton iterations of the dual solve per step (each is one fused global
            reduction). The step is scaled to satisfy KL ≤ ε exactly whatever this is.
        nonfinite: ``"skip"`` (default) cancels a step whose gradients hold NaN or ±inf,
            leaving params and state bitwise unchanged, without a host sync; the number of
            skipped steps is in :meth:`stats`. ``"raise"`` raises
            :class:`NonFiniteGradientError` instead (this syncs with the device every step).
        foreach: use the multi-tensor implementation (default: yes on CPU and CUDA).
        fused: use the compiled implementation (``torch.compile``: three fused passes per
            step, the same math). Default: yes on CUDA when Triton is available, no on CPU,
            where it is 4-5x faster per step than foreach but compiles for 10 s to over a
            minute first (docs/performance.md). Cannot be combined with ``foreach=True``.

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = Arturo(model.parameters(), lr=0.05)
        >>> loss = model(torch.randn(8, 4)).square().mean()
        >>> loss.backward()
        >>> opt.step()
        >>> sorted(opt.stats()[0])
        ['eta', 'kl', 'kl_bound', 'skipped_steps']
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = DEFAULT_LR,
        *,
        weight_decay: float = 1.5403963328610538e-06,
        reg_weight: float = 0.05865661620286048,
        prior_precision: float = 0.0015,
        init_variance: float = 0.01,
        precision_inertia: float = 1.3,
        filter_init_cov: float = 5e-05,
        filter_process_noise: float = 0.017392958232048346,
        filter_measurement_noise: float = 2.8167911612651997,
        init_curvature: float = 0.1,
        newton_steps: int = 3,
        nonfinite: Literal["skip", "raise"] = "skip",
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            reg_weight=reg_weight,
            prior_precision=prior_precision,
            init_variance=init_variance,
            precision_inertia=precision_inertia,
            filter_init_cov=filter_init_cov,
            filter_process_noise=filter_process_noise,
            filter_measurement_noise=filter_measurement_noise,
            init_curvature=init_curvature,
            newton_steps=newton_steps,
            foreach=foreach,
            fused=fused,
        )
        _check("nonfinite", nonfinite, nonfinite in ("skip", "raise"), 'use "skip" or "raise"')
        self.nonfinite = nonfinite
        super().__init__(params, defaults)

    # ----------------------------------------------------------------------------------------
    # Param groups and validation
    # ----------------------------------------------------------------------------------------

    @staticmethod
    def _validate_group(group: dict[str, Any]) -> None:
        lr = group["lr"]
        if isinstance(lr, Tensor):
            _check("lr", lr, lr.numel() == 1 and not lr.requires_grad, "a 1-element tensor")
            lr = float(lr)
        _check("lr", lr, _is_real(lr) and lr > 0, "the KL bound must be finite and > 0")
        nonneg = ("weight_decay", "reg_weight", "prior_precision", "precision_inertia")
        for name in (*nonneg, "filter_process_noise"):
            value = group[name]
            _check(name, value, _is_real(value) and value >= 0, "must be finite and >= 0")
        for name in ("init_variance", "filter_init_cov", "filter_measurement_noise"):
            value = group[name]
            _check(name, value, _is_real(value) and value > 0, "must be finite and > 0")
        _check(
            "init_curvature",
            group["init_curvature"],
            _is_real(group["init_curvature"]),
            "must be finite",
        )
        omega, nu, lam0 = group["reg_weight"], group["precision_inertia"], group["prior_precision"]
        _check(
            "reg_weight + precision_inertia",
            omega + nu,
            omega + nu > 0,
            "the precision update divides by it",
        )
        _check(
            "reg_weight * prior_precision",
            omega * lam0,
            omega * lam0 > 0,
            "the prior keeps every coordinate's curvature positive; both must be > 0",
        )
        steps = group["newton_steps"]
        _check(
            "newton_steps",
            steps,
            isinstance(steps, int) and not isinstance(steps, bool) and steps >= 2,
            "an int >= 2: from a warm start past the root, one Newton step may only get back "
            "to η = 0, and one more is needed to leave it",
        )
        _check("foreach", group["foreach"], group["foreach"] in (None, True, False), "bool|None")
        group.setdefault("fused", None)  # groups saved before the fused path existed
        _check("fused", group["fused"], group["fused"] in (None, True, False), "bool|None")
        _check(
            "fused",
            group["fused"],
            not (group["fused"] and group["foreach"]),
            "fused=True and foreach=True are exclusive; pick one",
        )
        if group["fused"]:
            for p in group["params"]:
                _check(
                    "fused",
                    True,
                    p.device.type in ("cpu", "cuda"),
                    f"the fused step runs on CPU and CUDA tensors, not on {p.device.type}",
                )
        for p in group["params"]:
            if p.is_sparse:
                raise SparseGradientError("Arturo does not support sparse parameters")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._validate_group(group)
        except Exception:
            self.param_groups.pop()  # a rejected group must not linger in the optimizer
            raise
        group.setdefault(GROUP_ETA, torch.zeros((), dtype=torch.float32))
        group.setdefault(GROUP_KL, torch.zeros((), dtype=torch.float32))
        group.setdefault(GROUP_SKIPPED, torch.zeros((), dtype=torch.int64))

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("nonfinite", "skip")

    # ----------------------------------------------------------------------------------------
    # State
    # ----------------------------------------------------------------------------------------

    @staticmethod
    def _state_dtype(p: Tensor) -> torch.dtype:
        """fp32 state for bf16/fp16 params (their precision is too low for the filter)."""
        return p.dtype if p.dtype in (torch.float32, torch.float64) else torch.float32

    def _init_state(self, p: Tensor, group: dict[str, Any]) -> dict[str, Tensor]:
        real = torch.view_as_real(p) if p.is_complex() else p
        dtype = self._state_dtype(real)
        p0 = group["filter_init_cov"]
        # *_like keeps the layout of the parameter (and its placements if it is a DTensor).
        state = self.state[p]
        state[STATE_STEP] = torch.zeros((), dtype=torch.float32, device=p.device)
        state[STATE_INTERCEPT] = torch.zeros_like(real, dtype=dtype)  # takes g on first step
        state[STATE_CURVATURE] = torch.full_like(real, group["init_curvature"], dtype=dtype)
        state[STATE_COV_BB] = torch.full_like(real, p0, dtype=dtype)
        state[STATE_COV_BH] = torch.zeros_like(real, dtype=dtype)
        state[STATE_COV_HH] = torch.full_like(real, p0, dtype=dtype)
        state[STATE_PRECISION] = torch.full_like(real, 1.0 / group["init_variance"], dtype=dtype)
        return state

    def _collect_group(self, group: dict[str, Any]) -> F.GroupTensors | None:
        """The group's parameters that have a gradient, with their (lazily created) state."""
        lists: tuple[list[Tensor], ...] = tuple([] for _ in F.GroupTensors._fields)
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise SparseGradientError(
                    "Arturo does not support sparse gradients "
                    f"(parameter of shape {tuple(p.shape)}); use a dense embedding or "
                    "another optimizer for sparse parameters"
                )
            state = self.state[p] if self.state.get(p) else self._init_state(p, group)
            # The math runs on this rank's shard of DTensor (FSDP2) params, grads and state.
            real, grad = local_shard(p), local_shard(p.grad)
            if p.is_complex():
                real, grad = torch.view_as_real(real), torch.view_as_real(grad)
            for lst, t in zip(
                lists,
                (
                    real,
                    grad,
                    *(local_shard(state[k]) for k in PARAM_STATE_KEYS[1:]),
                    state[STATE_STEP],
                ),
                strict=True,
            ):
                lst.append(t)
        if not lists[0]:
            return None
        return F.GroupTensors(*lists)

    @staticmethod
    def _hyperparams(group: dict[str, Any]) -> F.GroupHyperparams:
        return F.GroupHyperparams(
            weight_decay=group["weight_decay"],
            reg_weight=group["reg_weight"],
            prior_precision=group["prior_precision"],
            precision_inertia=group["precision_inertia"],
            filter_process_noise=group["filter_process_noise"],
            filter_measurement_noise=group["filter_measurement_noise"],
        )

    # ----------------------------------------------------------------------------------------
    # The step
    # ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Take one step. ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        active, tensors = [], []
        for group in self.param_groups:
            collected = self._collect_group(group)  # creates missing state
            # A KL bound of exactly 0 allows no step at all. torch.distributed.checkpoint
            # creates state by stepping once with lr=0 and zero gradients: that step must leave
            # the filter untouched too, or b would start from a zero "first gradient".
            zero_bound = not isinstance(group["lr"], Tensor) and group["lr"] == 0
            if collected is not None and not zero_bound:
                active.append(group)
                tensors.append(collected)
        if not active:
            return loss

        device = tensors[0].params[0].device
        for t in tensors:
            if t.params[0].device != device or any(p.device != device for p in t.params):
                raise ValueError(
                    "Arturo needs all parameters with gradients on one device; found "
                    f"{device} and {next(p.device for p in t.params if p.device != device)}"
                )
        solve_dtype = (
            torch.float64
            if any(b.dtype == torch.float64 for t in tensors for b in t.intercepts)
            else torch.float32
        )
        reduce_fn = partial_sum_reducer(
            [p for g in active for p in g["params"] if p.grad is not None]
        )
        # An empty shard (FSDP2, fewer rows than ranks) has no ∞-norm; a 0 keeps the list whole.
        all_grads = [g for t in tensors for g in t.grads if g.numel()] or [
            torch.zeros(1, device=device)
        ]
        fused = active[0].get("fused")
        if fused is None:
            # CUDA: fused when Triton can compile it (~140 B/param in 7 fused passes against
            # the foreach path's ~30 parameter-sized round trips; GPU figures still to be
            # measured, docs/performance.md). CPU: not by default, although measured 4-5x
            # faster per step than foreach (ResNet-34 set, one thread): the first step
            # compiles for 10 s to over a minute, needs a C++ toolchain, and compiles again
            # whenever the set of parameters with gradients changes, which short CPU runs
            # and test suites never win back. Pass fused=True to opt in.
            fused = device.type == "cuda" and active[0]["foreach"] is not True
            if fused:
                from ._kernels.compiled import fused_available

                fused = fused_available(device)
        count_nonfinite = F.count_nonfinite_grads
        if fused:
            from ._kernels.compiled import count_nonfinite_grads as count_nonfinite
        nonfinite = count_nonfinite(all_grads, solve_dtype, reduce_fn)
        if self.nonfinite == "raise" and bool(nonfinite):  # syncs, by the user's choice
            raise NonFiniteGradientError(
                "a gradient holds NaN or inf; nothing was changed. Pass nonfinite='skip' to "
                "skip such steps instead"
            )

        lrs = torch.stack([torch.as_tensor(g["lr"], dtype=solve_dtype) for g in active])
        lrs = lrs.to(device, non_blocking=True)
        etas = torch.stack([g[GROUP_ETA].to(device=device, dtype=solve_dtype) for g in active])
        foreach = active[0]["foreach"]
        if foreach is None:
            foreach = device.type in ("cpu", "cuda")
        result = F.arturo_step(
            tensors,
            [self._hyperparams(g) for g in active],
            lrs=lrs,
            etas=etas,
            nonfinite_count=nonfinite,
            newton_steps=max(g["newton_steps"] for g in active),
            foreach=foreach,
            reduce_fn=reduce_fn,
            fused=fused,
        )

        skipped = result.skipped.to(torch.int64)
        # With ε = 0 the dual's root is η = ∞, a warm start that would freeze every later step.
        # torch.distributed.checkpoint creates state by stepping with lr=0, and warm-ups may
        # start at 0, so such a step keeps the previous η.
        new_etas = torch.where(lrs > 0, result.eta, etas)
        for group, eta, kl in zip(active, new_etas.unbind(), result.kl.unbind(), strict=True):
            group[GROUP_ETA] = eta.to(torch.float32)
            group[GROUP_KL] = kl.to(torch.float32)
            group[GROUP_SKIPPED] = group[GROUP_SKIPPED].to(device) + skipped
        return loss

    # ----------------------------------------------------------------------------------------
    # Checkpoints
    # ----------------------------------------------------------------------------------------

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load like any optimizer, but keep fp32 state fp32 for bf16/fp16 params.

        torch.optim casts floating-point state to each parameter's dtype on load, which would
        round the filter's fp32 state of a bf16 parameter to bf16.
        """
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, params, strict=True):
            saved = state_dict["state"].get(saved_id)
            if saved is None:
                continue
            state = self.state[p]
            for key, value in saved.items():
                if isinstance(value, Tensor):
                    state[key] = value.to(device=p.device, copy=True)
        for group in self.param_groups:
            group.setdefault(GROUP_ETA, torch.zeros((), dtype=torch.float32))
            group.setdefault(GROUP_KL, torch.zeros((), dtype=torch.float32))
            group.setdefault(GROUP_SKIPPED, torch.zeros((), dtype=torch.int64))
            for key in GROUP_STATE_KEYS:
                group[key] = torch.as_tensor(group[key]).clone()

    # ----------------------------------------------------------------------------------------
    # Diagnostics
    # ----------------------------------------------------------------------------------------

    def stats(self) -> list[dict[str, float]]:
        """Per param group: ``eta``, ``kl`` (of the last step), ``kl_bound`` (ε) and
        ``skipped_steps``, as Python numbers. Reads device values, so it may sync."""
        return [
            {
                "eta": float(group[GROUP_ETA]),
                "kl": float(group[GROUP_KL]),
                "kl_bound": float(group["lr"]),
                "skipped_steps": int(group[GROUP_SKIPPED]),
            }
            for group in self.param_groups
        ]

    def _param_state(self, p: Tensor) -> dict[str, Tensor]:
        state = self.state.get(p)
        if not state:
            raise KeyError("this parameter has no arTuRO state yet (no step with a gradient)")
        return state

    def curvature(self, p: Tensor) -> Tensor:
        """The filter's Hessian-diagonal estimate h for ``p`` (same shape; a copy)."""
        return self._param_state(p)[STATE_CURVATURE].clone()

    def variance(self, p: Tensor) -> Tensor:
        """The search distribution's variance 1/λ for ``p`` (same shape)."""
        return self._param_state(p)[STATE_PRECISION].reciprocal()
