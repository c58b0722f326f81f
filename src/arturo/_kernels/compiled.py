"""The fused arTuRO step: the reference math in three grouped passes, compiled by Inductor.

Why ``torch.compile`` and not hand-written kernels
    Inductor turns each pass below into one fused loop per tensor -- C++/OpenMP with AVX
    vectors on CPU, Triton on CUDA -- that reads every input once, keeps all temporaries in
    registers and writes the state in place. On the 2-core CPU this removes the ~30
    parameter-sized round trips of the ``torch._foreach_*`` path (ResNet-34 set, one thread:
    ~260 ms fused against ~750 ms foreach in the first measurement; docs/performance.md has
    the figures). One implementation then serves CPU and CUDA, and it is the same Python as
    the math, so it stays checkable against the reference. A hand-written Triton kernel
    would only run on CUDA, and this project has had no GPU to measure one against Inductor.

The passes (ALGORITHM.md, "Solving the dual fast" and "Cost at the physical limit"):

1. ``_filter_pass``: Kalman predict/update of (b, h, P) in place, then the model at μ and the
   dual's partial sums (Σ λΔ², Σ λΔ²/(r+η)) at the warm start η₀. Reads θ, g, b, h, P, λ;
   writes b, h, P: ≈ 52 B per fp32 parameter.
2. ``_dual_pass``, once per further Newton evaluation: the same sums at a new η, recomputed on
   the fly from θ, b, h, λ (16 B per parameter) instead of materialising w and r, so that the
   step needs no parameter-sized temporary at all.
3. ``_apply_pass``: θ ← μ − c·Δ(η), λ ← (a + ν·λ)/(ω + ν). Reads θ, b, h, λ; writes θ, λ.

Between the passes, :func:`arturo.functional.solve_dual` -- the very function the reference
paths use -- runs the Newton iterations on [G]-sized tensors, so the dual algorithm (warm start,
number of steps, final feasibility scale) is the same by construction, and the distributed
``reduce_fn`` hook sits where it always does. With the default 3 Newton steps a step moves
52 + 3·16 + 24 = 124 B per fp32 parameter, plus the gradient read of the non-finite check.

Each pass is compiled once over the *lists* of tensors of all groups (``dynamic=False``):
Inductor emits one kernel per tensor inside one compiled call, so no Python runs per tensor.
Hyperparameters are Python floats (constants in the graph, as they rarely change); ε, η, the
"keep" flag and the Newton scale are 0-dim/[G] tensors, so an LR scheduler never recompiles.
A different set of parameters with gradients (a new model, a param that starts or stops
getting gradients) compiles once more.

The per-element arithmetic is the reference's with one rewrite: Δ = ĝ/(a + η·λ) and
λΔ²/(r+η) = λΔ²·λ/(a + η·λ) instead of v = ĝ/λ, r = a/λ, Δ = v/(r+η), which is the same
quantity with one division per element and pass instead of four (divisions bound the CPU
loop). It changes results only by rounding; tests/test_fused.py checks agreement to 1e-5.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .. import functional as F

__all__ = ["CUDA_COMPILE_OPTIONS", "fused_arturo_step", "fused_available"]

#: Inductor options for the CUDA passes. Inductor launches one kernel per tensor and pass;
#: ``{"combo_kernels": True}`` packs them into few launches. Not yet measured on a GPU, so
#: the default is Inductor's own; scripts/gpu_check.sh benchmarks both.
CUDA_COMPILE_OPTIONS: dict[str, object] = {}


# ---------------------------------------------------------------------------------------------
# Per-tensor math, traced into the compiled passes.
# ---------------------------------------------------------------------------------------------


def _dual_terms(
    x: Tensor, b: Tensor, h: Tensor, lam: Tensor, *, decay: Tensor, prior: float, eta: Tensor
) -> tuple[Tensor, Tensor]:
    """(Σ λΔ², Σ λΔ²/(r+η)) over one tensor, Δ = ĝ/(a + η·λ), from the post-filter state."""
    mu = x * decay
    g_model = (h + prior) * mu + b
    a = h.clamp_min(0.0) + prior
    inv_d = 1.0 / (a + eta * lam)  # 1/(λ·(r + η))
    delta = g_model * inv_d
    t = lam * delta * delta
    return t.sum(dtype=eta.dtype), (t * lam * inv_d).sum(dtype=eta.dtype)


def _decay(eps: Tensor, hp: F.GroupHyperparams, keep: Tensor) -> Tensor:
    # 3. decoupled weight decay, scaled by ε (as in functional.arturo_step)
    return 1.0 - eps * (hp.weight_decay * keep)


def _filter_pass(
    groups: tuple[F.GroupTensors, ...],
    hparams: tuple[F.GroupHyperparams, ...],
    eps: Tensor,  # [G] KL bounds
    etas: Tensor,  # [G] warm start η₀
    keep: Tensor,  # 0-dim, 1 = apply the step, 0 = cancel it (non-finite gradient)
) -> Tensor:  # [G, 2] partial dual sums at η₀
    sums = []
    for i, (group, hp) in enumerate(zip(groups, hparams, strict=True)):
        decay = _decay(eps[i], hp, keep)
        prior = hp.reg_weight * hp.prior_precision
        s2, s3 = [], []
        for theta, grad, b, h, p00, p01, p11, lam, step in zip(*group, strict=True):
            # Steps 1-2 exactly as functional._single_tensor_filter_and_model.
            x = theta.to(b.dtype)
            g = torch.nan_to_num(grad.to(b.dtype), nan=0.0, posinf=0.0, neginf=0.0)
            first = (step == 0).to(b.dtype) * keep
            b.add_(first * g)
            F.kalman_update_(
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
            t2, t3 = _dual_terms(x, b, h, lam, decay=decay, prior=prior, eta=etas[i])
            s2.append(t2)
            s3.append(t3)
        sums.append(torch.stack([torch.stack(s2).sum(), torch.stack(s3).sum()]))
    return torch.stack(sums)


def _dual_pass(
    groups: tuple[F.GroupTensors, ...],
    hparams: tuple[F.GroupHyperparams, ...],
    eps: Tensor,  # [G]
    etas: Tensor,  # [G] where to evaluate
    keep: Tensor,  # 0-dim
) -> Tensor:  # [G, 2]
    sums = []
    for i, (group, hp) in enumerate(zip(groups, hparams, strict=True)):
        decay = _decay(eps[i], hp, keep)
        prior = hp.reg_weight * hp.prior_precision
        s2, s3 = [], []
        for theta, b, h, lam in zip(
            group.params, group.intercepts, group.curvatures, group.precisions, strict=True
        ):
            t2, t3 = _dual_terms(
                theta.to(b.dtype), b, h, lam, decay=decay, prior=prior, eta=etas[i]
            )
            s2.append(t2)
            s3.append(t3)
        sums.append(torch.stack([torch.stack(s2).sum(), torch.stack(s3).sum()]))
    return torch.stack(sums)


def _apply_pass(
    groups: tuple[F.GroupTensors, ...],
    hparams: tuple[F.GroupHyperparams, ...],
    eps: Tensor,  # [G]
    etas: Tensor,  # [G] final η
    scales: Tensor,  # [G] feasibility scale c ≤ 1
    keep: Tensor,  # 0-dim
) -> None:
    for i, (group, hp) in enumerate(zip(groups, hparams, strict=True)):
        decay = _decay(eps[i], hp, keep)
        prior = hp.reg_weight * hp.prior_precision
        lam_keep = hp.precision_inertia / (hp.reg_weight + hp.precision_inertia)
        lam_gain = 1.0 / (hp.reg_weight + hp.precision_inertia)
        step_scale = scales[i] * keep
        for theta, b, h, lam in zip(
            group.params, group.intercepts, group.curvatures, group.precisions, strict=True
        ):
            # Steps 6-7 as functional._single_tensor_apply.
            mu = theta.to(lam.dtype) * decay
            g_model = (h + prior) * mu + b
            a = h.clamp_min(0.0) + prior
            theta.copy_(mu - step_scale * (g_model / (a + etas[i] * lam)))
            lam.mul_(1.0 - keep * (1.0 - lam_keep)).add_(a * (keep * lam_gain))


# ---------------------------------------------------------------------------------------------
# Compilation and the step.
# ---------------------------------------------------------------------------------------------


#: Compilations allowed per pass and device type: one per distinct set of parameters with
#: gradients (shapes, dtypes, groups, hyperparameters). Past it, the passes run uncompiled.
RECOMPILE_LIMIT = 64


class _Pass:
    """One pass, compiled with ``fullgraph=True`` (a graph break would silently split the
    fused loops) and run uncompiled, with a warning, once the recompile limit is hit."""

    def __init__(self, fn: Callable, options: dict[str, object] | None) -> None:
        self.fn = fn
        self.compiled = torch.compile(
            fn,
            fullgraph=True,
            dynamic=False,
            options=options or None,
            recompile_limit=RECOMPILE_LIMIT,
            isolate_recompiles=True,
        )
        self.eager = False

    def __call__(self, *args: object) -> object:
        if not self.eager:
            try:
                return self.compiled(*args)
            except torch._dynamo.exc.FailOnRecompileLimitHit:
                warnings.warn(
                    f"arturo fused step: {self.fn.__name__} recompiled {RECOMPILE_LIMIT} times "
                    "(the set of parameters with gradients keeps changing); running it "
                    "uncompiled from now on",
                    RuntimeWarning,
                    stacklevel=3,
                )
                self.eager = True
        return self.fn(*args)


class _Passes:
    def __init__(self, options: dict[str, object] | None) -> None:
        self.filter = _Pass(_filter_pass, options)
        self.dual = _Pass(_dual_pass, options)
        self.apply = _Pass(_apply_pass, options)


_PASSES: dict[str, _Passes] = {}


def _passes(device_type: str) -> _Passes:
    if device_type not in _PASSES:
        _PASSES[device_type] = _Passes(CUDA_COMPILE_OPTIONS if device_type == "cuda" else None)
    return _PASSES[device_type]


def fused_available(device: torch.device) -> bool:
    """Whether Inductor can compile the fused step for ``device`` (CPU always; CUDA with
    Triton)."""
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        try:
            from torch.utils._triton import has_triton
        except ImportError:  # pragma: no cover - very old torch
            return False
        return has_triton()
    return False


def fused_arturo_step(
    groups: Sequence[F.GroupTensors],
    hparams: Sequence[F.GroupHyperparams],
    *,
    lrs: Tensor,
    etas: Tensor,
    nonfinite_count: Tensor,
    newton_steps: int,
    reduce_fn: F.ReduceFn | None = None,
) -> F.StepResult:
    """:func:`arturo.functional.arturo_step` with the three fused passes (same arguments)."""
    groups, hparams = tuple(groups), tuple(hparams)
    passes = _passes(etas.device.type)
    dtype = etas.dtype
    keep = (nonfinite_count == 0).to(dtype)
    eps = lrs.clamp_min(torch.finfo(dtype).tiny)

    # solve_dual asks for the sums at the warm start first: the filter pass has them already.
    pending = [passes.filter(groups, hparams, eps, etas, keep)]

    def dual_sums(eta: Tensor) -> Tensor:
        return pending.pop() if pending else passes.dual(groups, hparams, eps, eta, keep)

    eta, scale, kl = F.solve_dual(
        dual_sums, eps, etas, newton_steps=newton_steps, reduce_fn=reduce_fn
    )
    passes.apply(groups, hparams, eps, eta, scale, keep)
    skipped = keep == 0
    return F.StepResult(eta=torch.where(skipped, etas, eta), kl=kl * keep, skipped=skipped)
