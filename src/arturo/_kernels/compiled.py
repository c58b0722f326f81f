"""The fused arTuRO step: the per-tensor passes of ``arturo.functional``, compiled by Inductor.

Why ``torch.compile`` and not hand-written kernels
    Inductor turns each pass into one fused loop per tensor -- C++ with AVX vectors (and
    OpenMP) on CPU, Triton on CUDA -- that reads every input once, keeps the temporaries in
    registers and writes the state in place, where the ``torch._foreach_*`` path makes one
    parameter-sized round trip per operation. One implementation serves CPU and CUDA, and it is
    the very Python of the reference (``functional.filter_pass``, ``dual_pass``, ``apply_pass``
    run eagerly), so the fused step and the reference cannot drift apart. docs/performance.md
    has the measured figures and the memory-traffic budget.

The passes, per fp32 parameter:

1. ``filter_pass``: Kalman predict/update of (b, h, P) in place (steps 1-2).
2. ``dual_pass``, once per evaluation of the dual (``newton_steps`` + 1 times): the partial
   sums at one η per group, both accumulated in one loop per tensor, with ĝ, a and Δ
   recomputed on the fly from θ, b, h, λ rather than stored, so the step needs no
   parameter-sized temporary.
3. ``apply_pass``: θ ← μ − c·Δ(η), λ ← (a + ν·λ)/(ω + ν) (steps 6-7).

Between the passes, :func:`arturo.functional.solve_dual` runs the Newton iterations on
[G]-sized tensors, exactly as for the other implementations, and the distributed
``reduce_fn`` hook sits where it always does. Nothing syncs with the host.

Each pass is compiled once over the *lists* of tensors of all groups (``dynamic=False``):
Inductor emits one loop per tensor inside one compiled call, so no Python runs per tensor.
Hyperparameters are Python floats (constants in the graph; they rarely change); ε, η, the
"keep" flags and the feasibility scale are tensors, so an LR scheduler never recompiles. A
different set of parameters with gradients (a new model, a parameter that starts or stops
getting gradients) compiles once more, up to :data:`RECOMPILE_LIMIT`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .. import functional as F

__all__ = [
    "CPU_COMPILE_OPTIONS",
    "CPU_DUAL_OPTIONS",
    "CUDA_COMPILE_OPTIONS",
    "PASS_NAMES",
    "fused_available",
    "fused_passes",
    "gradient_checks",
    "pass_options",
]

#: Inductor options for the reduction passes. Inductor materialises ("realizes") a pointwise
#: value read more than 4 times; with earlier forms of the formulas it did so for Δ, at the
#: cost of a parameter-sized buffer and a second loop per tensor. The current formulas no
#: longer trip it (the same time either way, docs/performance.md); the raised threshold keeps
#: a rewrite from bringing the buffer back silently. Not for the filter pass, where it made
#: the loop split further.
REDUCTION_OPTIONS: dict[str, object] = {"realize_reads_threshold": 1000}

#: Extra Inductor options for every CPU pass. Inductor's C++ backend merges up to 16 loops of
#: equal length into one ("horizontal fusion"); for ResNet's many same-shape tensors that
#: interleaves several tensors' streams in one loop, which measured slower than one loop per
#: tensor (docs/performance.md). The generated wrapper also asserts every input's sizes and
#: strides on each call, which Dynamo's guards already ensure (static shapes); with hundreds
#: of tensors per pass those asserts are a sizable share of each call's Python overhead.
CPU_COMPILE_OPTIONS: dict[str, object] = {
    "cpp.max_horizontal_fusion_size": 1,
    "size_asserts": False,
}

#: Extra Inductor options for the CPU dual pass, over the two above: one loop per tensor that
#: accumulates both of the dual's sums, so each evaluation reads θ, b, h, λ once. Inductor's
#: locality reordering moves every tensor's first sum ahead of all second sums, and its
#: scheduler never fuses nodes more than 64 apart, so past ~64 tensors each tensor was read
#: twice; without the reordering the two sums stay adjacent and a fusion size of 2 pairs
#: exactly them (more merges several tensors' loops again; docs/performance.md).
CPU_DUAL_OPTIONS: dict[str, object] = {
    "reorder_for_locality": False,
    "cpp.max_horizontal_fusion_size": 2,
}

#: Extra Inductor options for the CUDA passes. Inductor launches one kernel per tensor and
#: pass; ``{"combo_kernels": True}`` packs them into few launches. Not yet measured on a GPU,
#: so the default adds nothing; scripts/gpu_check.sh benchmarks both.
CUDA_COMPILE_OPTIONS: dict[str, object] = {}

#: The passes of the fused step, by the name of their attribute of :class:`FusedPasses`.
PASS_NAMES = ("filter", "dual", "apply", "gradient_checks")


def pass_options(device_type: str) -> dict[str, dict[str, object]]:
    """The Inductor options of each pass (keyed by :data:`PASS_NAMES`) for ``device_type``."""
    if device_type == "cuda":
        extra, dual = CUDA_COMPILE_OPTIONS, {}
    else:
        extra, dual = CPU_COMPILE_OPTIONS, CPU_DUAL_OPTIONS
    return {
        "filter": dict(extra),
        "dual": {**REDUCTION_OPTIONS, **extra, **dual},
        "apply": dict(extra),
        "gradient_checks": {**REDUCTION_OPTIONS, **extra},
    }


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


def _gradient_checks(
    groups: tuple[F.GroupTensors, ...], dtype: torch.dtype, relative: tuple[bool, ...]
) -> Tensor:
    return torch.cat(
        [
            F.gradient_statistics(group, dtype, rel)
            for group, rel in zip(groups, relative, strict=True)
        ]
    )


class FusedPasses:
    """The three passes and the gradient check, compiled with ``options`` (one dict per name
    in :data:`PASS_NAMES`, as :func:`pass_options` gives them)."""

    def __init__(self, options: dict[str, dict[str, object]]) -> None:
        self.filter = _Pass(F.filter_pass, options["filter"])
        self.dual = _Pass(F.dual_pass, options["dual"])
        self.apply = _Pass(F.apply_pass, options["apply"])
        self.gradient_checks = _Pass(_gradient_checks, options["gradient_checks"])


_PASSES: dict[str, FusedPasses] = {}


def fused_passes(device_type: str) -> FusedPasses:
    """The compiled passes for ``device_type`` (built once per process)."""
    if device_type not in _PASSES:
        _PASSES[device_type] = FusedPasses(pass_options(device_type))
    return _PASSES[device_type]


def gradient_checks(
    groups: Sequence[F.GroupTensors], dtype: torch.dtype, relative: tuple[bool, ...]
) -> Tensor:
    """:func:`arturo.functional.gradient_statistics` of every group, concatenated, compiled:
    on CPU the eager per-tensor reductions cost more than a whole fused pass."""
    groups = tuple(groups)
    device = groups[0].params[0].device
    if not any(g.numel() for group in groups for g in group.grads):
        size = sum(
            2 + (len(group.grads) if rel else 0)
            for group, rel in zip(groups, relative, strict=True)
        )
        return torch.zeros(size, dtype=dtype, device=device)
    return fused_passes(device.type).gradient_checks(groups, dtype, relative)


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
