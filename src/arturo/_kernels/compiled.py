"""The fused arTuRO step: the reference math in grouped passes, compiled by Inductor.

Why ``torch.compile`` and not hand-written kernels
    Inductor turns each pass below into one fused loop per tensor -- C++ with AVX vectors (and
    OpenMP) on CPU, Triton on CUDA -- that reads every input once, keeps the temporaries in
    registers and writes the state in place. On the 2-core CPU that is ~3x faster per step
    than the ``torch._foreach_*`` path, which makes ~30 parameter-sized round trips
    (docs/performance.md has the figures). One implementation serves CPU and CUDA, and it is
    the same Python as the math, so it stays checkable against the reference. Hand-written
    Triton would only run on CUDA, and this project has had no GPU to measure it on.

The passes (ALGORITHM.md, "Solving the dual fast" and "Cost at the physical limit"), per fp32
parameter:

1. ``_filter_pass``: Kalman predict/update of (b, h, P) in place (steps 1-2). Reads θ, g, b,
   h, P; writes b, h, P: 48 B.
2. ``_dual_pass``, once per evaluation of the dual (``newton_steps`` + 1 times): the partial
   sums (Σ λΔ², Σ λΔ²/(r+η)) at one η per group, with ĝ, a and Δ recomputed on the fly from
   θ, b, h, λ (16 B) rather than stored, so the step needs no parameter-sized temporary.
3. ``_apply_pass``: θ ← μ − c·Δ(η), λ ← (a + ν·λ)/(ω + ν) (steps 6-7). Reads θ, b, h, λ;
   writes θ, λ: 24 B.

With the default 3 Newton steps that is 48 + 4·16 + 24 = 136 B, plus 4 B for the non-finite
check of the gradients (:func:`count_nonfinite_grads`). ALGORITHM.md's 124 B would fold the
first evaluation into the filter pass; written that way, Inductor materialised Δ and split
the loop, and the fused filter-and-sums pass measured slower (ResNet-34 set, last 30 tensors,
one thread: 49 ms) than the filter pass plus one dual pass (23 + 9 ms).

Between the passes, :func:`arturo.functional.solve_dual` -- the very function the reference
paths use -- runs the Newton iterations on [G]-sized tensors, so the dual algorithm (warm
start, number of steps, final feasibility scale at the final η) is the same by construction,
and the distributed ``reduce_fn`` hook sits where it always does. Nothing syncs with the host.

Each pass is compiled once over the *lists* of tensors of all groups (``dynamic=False``):
Inductor emits one loop per tensor inside one compiled call, so no Python runs per tensor.
Hyperparameters are Python floats (constants in the graph; they rarely change); ε, η, the
"keep" flag and the feasibility scale are tensors, so an LR scheduler never recompiles. A
different set of parameters with gradients (a new model, a parameter that starts or stops
getting gradients) compiles once more, up to :data:`RECOMPILE_LIMIT`.

The per-element arithmetic is the reference's with one rewrite: Δ = ĝ/(a + η·λ) and
λΔ²/(r+η) = λΔ²·λ/(a + η·λ) instead of v = ĝ/λ, r = a/λ, Δ = v/(r+η): the same quantity with
one division per element and pass instead of four. It changes results only by rounding;
tests/test_fused.py checks agreement with the reference to 1e-5 (fp32) and 1e-12 (fp64).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .. import functional as F

__all__ = [
    "CPU_COMPILE_OPTIONS",
    "CUDA_COMPILE_OPTIONS",
    "count_nonfinite_grads",
    "fused_arturo_step",
    "fused_available",
]

#: Inductor options for the reduction passes. Inductor materialises ("realizes") a pointwise
#: value read more than 4 times; in a graph of 100+ tensors it did so for Δ, which cost a
#: parameter-sized buffer and a second loop per tensor (ResNet-34 set, last 30 tensors, one
#: CPU thread: 38.9 ms per dual pass, 8.4 ms with the threshold raised). The expressions are
#: shallow, so recomputing them inline is the cheaper choice. (Not for the filter pass: there
#: it made the loop split further and run 2x slower.)
REDUCTION_OPTIONS: dict[str, object] = {"realize_reads_threshold": 1000}

#: Extra Inductor options for the CPU passes. Inductor's C++ backend merges up to 16 loops of
#: equal length into one ("horizontal fusion"); for ResNet's many same-shape tensors that
#: interleaves 4 streams per tensor from several tensors in one loop, which measured slower
#: (ResNet-34 set, dual pass, one thread: 42 ms merged, 25 ms unmerged, 27 ms with size 2,
#: which pairs each tensor's two sums in one loop: the pass is bound by their arithmetic,
#: each sum recomputing Δ, not by the re-read).
CPU_COMPILE_OPTIONS: dict[str, object] = {"cpp.max_horizontal_fusion_size": 1}

#: Extra Inductor options for the CUDA passes. Inductor launches one kernel per tensor and
#: pass; ``{"combo_kernels": True}`` packs them into few launches. Not yet measured on a GPU,
#: so the default adds nothing; scripts/gpu_check.sh benchmarks both.
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


def _zero_nonfinite(g: Tensor) -> Tensor:
    """``torch.nan_to_num(g, nan=0, posinf=0, neginf=0)``, in a form Inductor vectorises on
    CPU (its ``isnan`` there is a scalar loop; |NaN| < ∞ is simply false)."""
    return torch.where(g.abs() < float("inf"), g, 0.0)


def _decay(eps: Tensor, hp: F.GroupHyperparams, keep: Tensor) -> Tensor:
    # 3. decoupled weight decay, scaled by ε (as in functional.arturo_step)
    return 1.0 - eps * (hp.weight_decay * keep)


def _filter_pass(
    groups: tuple[F.GroupTensors, ...],
    hparams: tuple[F.GroupHyperparams, ...],
    keep: Tensor,  # 0-dim, 1 = apply the step, 0 = cancel it (non-finite gradient)
) -> None:
    for group, hp in zip(groups, hparams, strict=True):
        for theta, grad, b, h, p00, p01, p11, _lam, step in zip(*group, strict=True):
            # Steps 1-2 exactly as functional._single_tensor_filter_and_model.
            x = theta.to(b.dtype)
            g = _zero_nonfinite(grad.to(b.dtype))
            F.filter_step_(x, g, b, h, p00, p01, p11, step, hp=hp, keep=keep)


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
        prior = hp.prior
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
        prior, lam_keep, lam_gain = hp.prior, hp.precision_keep, hp.precision_gain
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
    def __init__(self, extra: dict[str, object]) -> None:
        self.filter = _Pass(_filter_pass, extra)
        self.dual = _Pass(_dual_pass, {**REDUCTION_OPTIONS, **extra})
        self.apply = _Pass(_apply_pass, extra)


_PASSES: dict[str, _Passes] = {}


def _passes(device_type: str) -> _Passes:
    if device_type not in _PASSES:
        extra = CUDA_COMPILE_OPTIONS if device_type == "cuda" else CPU_COMPILE_OPTIONS
        _PASSES[device_type] = _Passes(extra)
    return _PASSES[device_type]


def _count_nonfinite(grads: list[Tensor], dtype: torch.dtype) -> Tensor:
    # max |g| is non-finite exactly when an entry is (amax propagates NaN), like the ∞-norm
    # of functional.count_nonfinite_grads.
    peaks = torch.stack([g.abs().amax() for g in grads if g.numel()])
    return (~torch.isfinite(peaks)).sum().to(dtype)


_COUNT_NONFINITE = _Pass(_count_nonfinite, {**REDUCTION_OPTIONS, **CPU_COMPILE_OPTIONS})


def count_nonfinite_grads(
    grads: Sequence[Tensor], dtype: torch.dtype, reduce_fn: F.ReduceFn | None = None
) -> Tensor:
    """:func:`arturo.functional.count_nonfinite_grads`, compiled on CPU, where the eager
    ``_foreach_norm`` costs more than a whole fused pass (one multi-tensor kernel on CUDA)."""
    grads = list(grads)
    if not grads or grads[0].device.type != "cpu" or not any(g.numel() for g in grads):
        return F.count_nonfinite_grads(grads, dtype, reduce_fn)
    count = _COUNT_NONFINITE(grads, dtype)
    return reduce_fn(count) if reduce_fn is not None else count


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

    passes.filter(groups, hparams, keep)

    def dual_sums(eta: Tensor) -> Tensor:
        return passes.dual(groups, hparams, eps, eta, keep)

    eta, scale, kl = F.solve_dual(
        dual_sums, eps, etas, newton_steps=newton_steps, reduce_fn=reduce_fn
    )
    passes.apply(groups, hparams, eps, eta, scale, keep)
    skipped = keep == 0
    return F.StepResult(eta=torch.where(skipped, etas, eta), kl=kl * keep, skipped=skipped)
