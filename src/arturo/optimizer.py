"""The :class:`Arturo` optimizer: validation, param groups, state and dispatch around
``functional``."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import functional as F
from .distributed import local_shard, partial_sum_reducer
from .posterior import (
    check_dataset_size,
    check_temperature,
    draw_sample_,
    posterior_variance_from_state,
)

__all__ = ["Arturo", "NonFiniteGradientError", "SparseGradientError", "choose_implementation"]

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
# Relative units only: 0-dim running mean of the gradient's mean square (the tensor's scale²).
STATE_GRAD_SQ_AVG = "grad_sq_avg"
RELATIVE_STATE_KEYS = (*PARAM_STATE_KEYS, STATE_GRAD_SQ_AVG)

# Per-group state, kept as 0-dim tensors in the param group itself so that state_dict()
# carries it next to the group's hyperparameters (and DCP saves it once, not per rank).
GROUP_ETA = "eta"  # η of the last step: Lagrange multiplier of the trust region
GROUP_KL = "kl"  # KL of the last step
GROUP_SKIPPED = "skipped_steps"  # steps cancelled by a fault (non-finite, invalid ε, outlier)
GROUP_GRAD_SCALE = "grad_scale"  # running gradient scale, for the outlier check
GROUP_STATE_DTYPES = {
    GROUP_ETA: torch.float32,
    GROUP_KL: torch.float32,
    GROUP_SKIPPED: torch.int64,
    GROUP_GRAD_SCALE: torch.float32,
}

# Each param group's hyperparameters (the keys of ``Arturo.defaults``).
HYPERPARAMETERS = (
    "units",
    "lr",
    "weight_decay",
    "reg_weight",
    "prior_precision",
    "init_variance",
    "precision_inertia",
    "filter_init_cov",
    "filter_process_noise",
    "filter_measurement_noise",
    "init_curvature",
    "outlier_threshold",
)

# Options of the whole optimizer, not of a param group: one implementation runs all groups,
# and one dual solve with a fixed iteration count serves them all at once.
OPTIMIZER_OPTIONS = ("foreach", "fused", "newton_steps", "nonfinite")

#: Version of the layout of ``state_dict()``; :func:`upgrade_state_dict` brings older ones
#: up to date. 1: before the version key existed. 2: adds the group's ``grad_scale`` and
#: ``outlier_threshold``; implementation options are no longer stored in param groups.
#: 3: adds the group's ``units``; everything older was written in absolute units.
STATE_FORMAT_KEY = "arturo_state_format"
STATE_FORMAT = 3

UNITS = ("relative", "absolute")

#: The default hyperparameters of each mode of units (docs/defaults.md). ``"absolute"``: the
#: published Fashion-MNIST CNN values (docs/published.md), at the full precision of the paper's
#: code. ``"relative"``: ε per coordinate, and ω, ν, h₀ in units of each tensor's gradient scale.
PRESETS: dict[str, dict[str, Any]] = {
    "absolute": {
        "lr": 0.08567456308209788,
        "weight_decay": 1.5403963328610538e-06,
        "reg_weight": 0.05865661620286048,
        "prior_precision": 0.0015,
        "init_variance": 0.01,
        "precision_inertia": 1.3,
        "filter_init_cov": 5e-05,
        "filter_process_noise": 0.017392958232048346,
        "filter_measurement_noise": 2.8167911612651997,
        "init_curvature": 0.1,
        "outlier_threshold": 100.0,
    },
    # ε, ω, r and q: trial 25 of the tune-across search, the best of its top five re-ranked at
    # the full budget (docs/defaults.md); the others are the published values converted at
    # the Fashion-MNIST CNN's gradient scale.
    "relative": {
        "lr": 7.909e-07,
        "weight_decay": 0.6,
        "reg_weight": 12.37,
        "prior_precision": 0.0015,
        "init_variance": 0.01,
        "precision_inertia": 260.0,
        "filter_init_cov": 5e-05,
        "filter_process_noise": 0.001252,
        "filter_measurement_noise": 0.02606,
        "init_curvature": 20.0,
        "outlier_threshold": 100.0,
    },
}
DEFAULT_UNITS = "relative"  # the unit-free mode; "absolute" is the paper's (docs/defaults.md)
DEFAULT_LR = PRESETS[DEFAULT_UNITS]["lr"]


class SparseGradientError(RuntimeError):
    """Raised when a parameter has a sparse gradient, which arTuRO does not support."""


class NonFiniteGradientError(FloatingPointError):
    """Raised by ``step()`` when ``nonfinite="raise"`` and a gradient holds NaN or ±inf."""


def _check(name: str, value: Any, ok: bool, requirement: str) -> None:
    if not ok:
        raise ValueError(f"Invalid {name}: {value!r} ({requirement})")


_FLAT_SHARDING_ADVICE = (
    "each rank's trust region would cover only its own partition, with no all-reduce, so the "
    "KL bound would be silently wrong. Use FSDP2 (torch.distributed.fsdp.fully_shard), whose "
    "sharded DTensor parameters Arturo all-reduces, or plain DDP"
)


def _is_flat_parameter(p: Tensor) -> bool:
    """Whether ``p`` belongs to FSDP1's flat-parameter sharding: a ``FlatParameter``, or an
    original parameter viewing into one (``use_orig_params=True``).

    ``isinstance(p, FlatParameter)`` is itself this attribute check, so no FSDP1 import (slow,
    and private) is needed. FSDP2 sets neither attribute.
    """
    return bool(getattr(p, "_is_flat_param", False) or getattr(p, "_fsdp_flattened", False))


def _is_real(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _validate_hyperparams(group: dict[str, Any]) -> None:
    """Raise ValueError naming the first invalid hyperparameter of ``group``.

    Runs when a group is added and at every ``step()``, since schedulers and users may change
    a group's values at any time. A tensor ``lr`` is checked on the device by the step itself.
    """
    _check("units", group["units"], group["units"] in UNITS, f"one of {UNITS}")
    lr = group["lr"]
    if isinstance(lr, Tensor):
        _check("lr", lr, lr.numel() == 1 and not lr.requires_grad, "a 1-element tensor")
    else:
        _check("lr", lr, _is_real(lr) and lr >= 0, "the KL bound must be finite and >= 0")
    for name in ("weight_decay", "reg_weight", "prior_precision", "precision_inertia"):
        _check(name, group[name], _is_real(group[name]) and group[name] >= 0, "finite and >= 0")
    _check(
        "filter_process_noise",
        group["filter_process_noise"],
        _is_real(group["filter_process_noise"]) and group["filter_process_noise"] >= 0,
        "finite and >= 0",
    )
    for name in ("init_variance", "filter_init_cov", "filter_measurement_noise"):
        _check(name, group[name], _is_real(group[name]) and group[name] > 0, "finite and > 0")
    _check("init_curvature", group["init_curvature"], _is_real(group["init_curvature"]), "finite")
    threshold = group["outlier_threshold"]
    _check(
        "outlier_threshold",
        threshold,
        isinstance(threshold, int | float) and not isinstance(threshold, bool) and threshold > 1,
        "a number > 1, or math.inf to never skip a step for its gradient's scale",
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


def choose_implementation(device: torch.device, foreach: bool | None, fused: bool | None) -> str:
    """The implementation a step runs, following the flags exactly (as torch.optim does):

    - ``fused=True``: the compiled per-tensor passes (CPU, or CUDA with Triton);
    - ``foreach=True``: the multi-tensor path;
    - ``foreach=False``: the single-tensor reference, on every device;
    - otherwise (``None``, or ``fused=False`` with ``foreach=None``): fused on CUDA when
      Triton can compile it, else foreach on CPU and CUDA, else single-tensor.

    The CPU default is foreach, not fused, although fused is several times faster per step
    (docs/performance.md): its first step compiles for 10 s to over a minute and needs a C++
    toolchain, which short CPU runs and test suites never win back.
    """
    if fused:
        from ._kernels.compiled import fused_available

        if not fused_available(device):
            raise RuntimeError(
                f"fused=True needs a CPU, or a CUDA device with Triton; got {device}. Pass "
                "fused=None to let arturo choose."
            )
        return "fused"
    if foreach is not None:
        return "foreach" if foreach else "single"
    if fused is None and device.type == "cuda":
        from ._kernels.compiled import fused_available

        if fused_available(device):
            return "fused"
    return "foreach" if device.type in ("cpu", "cuda") else "single"


def upgrade_state_dict(state_dict: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``state_dict`` in the current format (:data:`STATE_FORMAT`).

    The one place where checkpoints of older versions are brought up to date. Checkpoints
    that went through ``torch.distributed.checkpoint`` lose the top-level version key, so every
    upgrade step is written to be harmless on a dict that is already current.
    """
    version = state_dict.get(STATE_FORMAT_KEY, 1)
    if not isinstance(version, int) or version > STATE_FORMAT:
        raise ValueError(
            f"this optimizer state has format {version!r}; this version of arturo reads "
            f"formats up to {STATE_FORMAT}: upgrade arturo"
        )
    groups = []
    for saved in state_dict["param_groups"]:
        group = dict(saved)
        # 1 -> 2: implementation options became optimizer-level; the outlier check is new.
        for key in ("foreach", "fused", "newton_steps"):
            group.pop(key, None)
        group.setdefault("outlier_threshold", defaults["outlier_threshold"])
        # 2 -> 3: relative units are new; every older checkpoint was written in absolute ones.
        group.setdefault("units", "absolute")
        for key, dtype in GROUP_STATE_DTYPES.items():
            group.setdefault(key, torch.zeros((), dtype=dtype))
        groups.append(group)
    return {**state_dict, "param_groups": groups, STATE_FORMAT_KEY: STATE_FORMAT}


class Arturo(Optimizer):
    r"""arTuRO: a KL trust-region step on a diagonal Gaussian, with curvature from gradients.

    Dahlinger, Becker, Hüttenrauch, Neumann, *Information-Theoretic Trust Regions for
    Stochastic Gradient-Based Optimization*, OPT@NeurIPS 2023, arXiv:2310.20574. The weights θ
    are the mean of a search distribution q = N(θ, diag(1/λ)). A per-coordinate Kalman filter
    fits the gradient model ĝ(θ) = b + h·θ to the stochastic gradients, so h estimates the
    Hessian diagonal. Each step minimises the model plus a prior term inside KL ≤ ε, with
    ε = ``lr``. docs/algorithm.md is the full specification.

    Two modes of units. ``units="relative"`` (the default) is unit-free: ε is a KL budget per
    coordinate (a group's bound is ε times its number of coordinates), and ω, ν and h₀ are in
    units of each tensor's running gradient RMS s, so a loss multiplied by any constant gives
    the same trajectory. ``units="absolute"`` is the published algorithm, bitwise, with the
    paper's Fashion-MNIST CNN values as its defaults. The formulas below are the absolute ones;
    the relative mode replaces ωλ₀ by ωλ₀s, a by a/s in the λ update, h₀ by h₀s and ε by ε·d.

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

    Defaults (:data:`PRESETS`), relative units | absolute units:

    ===========  ==============================  ============================  ===================
    symbol       argument                        state key                     default (rel | abs)
    ===========  ==============================  ============================  ===================
    ε            ``lr`` (KL bound)               --                            7.91e-7 | 0.0857
    κ            ``weight_decay``                --                            0.6 | 1.54e-6
    ω            ``reg_weight``                  --                            12.4 | 0.0587
    λ₀           ``prior_precision``             --                            0.0015
    σ₀²          ``init_variance`` (λ = 1/σ₀²)   ``precision`` (λ)             0.01
    ν            ``precision_inertia``           --                            260 | 1.3
    p₀           ``filter_init_cov``             ``filter_cov_{bb,bh,hh}``     5e-5
    q            ``filter_process_noise``        --                            1.25e-3 | 0.0174
    r            ``filter_measurement_noise``    --                            0.0261 | 2.82
    h₀           ``init_curvature``              ``curvature`` (h)             20 | 0.1
    b            --                              ``grad_intercept``            first gradient
    η            --                              group ``eta``                 0
    --           ``outlier_threshold``           group ``grad_scale``          100
    s²           --                              ``grad_sq_avg`` (relative)    first mean(g²)
    ===========  ==============================  ============================  ===================

    Args:
        params: parameters or param groups. Each group is its own trust region with its own ε
            and η; to reproduce the published code exactly, use one group and
            ``units="absolute"``.
        lr: the KL bound ε of each step (relative units: per coordinate). LR schedulers drive
            it like any learning rate. Default: the preset of ``units``.
        units: ``"relative"`` (default, unit-free) or ``"absolute"`` (the published
            semantics). Every hyperparameter left ``None`` takes that mode's preset.
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
        outlier_threshold: a step whose gradient scale (Σ over the group's tensors of
            max |g|) exceeds this multiple of its running average is skipped like a
            non-finite one, so a single loss spike cannot corrupt the filter; a lasting change
            of scale is accepted after a few steps. ``math.inf`` disables the check.
        newton_steps: Newton iterations of the dual solve per step (each is one fused global
            reduction). The step is scaled to satisfy KL ≤ ε exactly whatever this is.
        nonfinite: ``"skip"`` (default) cancels a group's step when one of its gradients holds
            NaN or ±inf, leaving its params and state bitwise unchanged, without a host sync;
            the number of skipped steps is in :meth:`stats`. ``"raise"`` raises
            :class:`NonFiniteGradientError` instead (this syncs with the device every step).
        foreach: ``True``: the multi-tensor implementation; ``False``: the single-tensor
            reference, on every device. Default: chosen (see :func:`choose_implementation`).
        fused: ``True``: the compiled implementation (``torch.compile`` of the reference's
            per-tensor passes; CPU, or CUDA with Triton). Default: fused on CUDA when Triton is
            available; on CPU foreach, because the fused step compiles for 10 s to over a
            minute first (docs/performance.md). Cannot be combined with ``foreach=True``.

        ``foreach``, ``fused``, ``newton_steps`` and ``nonfinite`` apply to the whole
        optimizer; a param group that sets one of them differently is refused.

    A group's step with ``lr`` = 0 changes nothing (it creates missing state, as
    ``torch.distributed.checkpoint`` needs) and is not counted as skipped. A Python-number
    ``lr`` that is negative, NaN or infinite raises ``ValueError`` at ``step()``; such a
    tensor ``lr`` cancels the group's step on the device and counts it as skipped.

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = Arturo(model.parameters())
        >>> loss = model(torch.randn(8, 4)).square().mean()
        >>> loss.backward()
        >>> opt.step()
        >>> sorted(opt.stats()[0])
        ['eta', 'kl', 'kl_bound', 'skipped_steps']
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor | None = None,
        *,
        units: Literal["relative", "absolute"] = DEFAULT_UNITS,
        weight_decay: float | None = None,
        reg_weight: float | None = None,
        prior_precision: float | None = None,
        init_variance: float | None = None,
        precision_inertia: float | None = None,
        filter_init_cov: float | None = None,
        filter_process_noise: float | None = None,
        filter_measurement_noise: float | None = None,
        init_curvature: float | None = None,
        outlier_threshold: float | None = None,
        newton_steps: int = 3,
        nonfinite: Literal["skip", "raise"] = "skip",
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        _check("nonfinite", nonfinite, nonfinite in ("skip", "raise"), 'use "skip" or "raise"')
        _check("units", units, units in UNITS, f"one of {UNITS}")
        _check(
            "newton_steps",
            newton_steps,
            isinstance(newton_steps, int)
            and not isinstance(newton_steps, bool)
            and newton_steps >= 2,
            "an int >= 2: from a warm start past the root, one Newton step may only get back "
            "to η = 0, and one more is needed to leave it",
        )
        _check(
            "foreach", foreach, foreach is None or isinstance(foreach, bool), "True, False or None"
        )
        _check("fused", fused, fused is None or isinstance(fused, bool), "True, False or None")
        _check(
            "fused",
            fused,
            not (fused and foreach),
            "fused=True and foreach=True are exclusive; pick one",
        )
        self.nonfinite = nonfinite
        self.newton_steps = newton_steps
        self.foreach = foreach
        self.fused = fused
        arguments = locals()  # the defaults are exactly the hyperparameter arguments
        defaults = {**PRESETS[units], "units": units}
        defaults.update(
            {k: arguments[k] for k in HYPERPARAMETERS if k != "units" and arguments[k] is not None}
        )
        super().__init__(params, defaults)

    # ----------------------------------------------------------------------------------------
    # Param groups and validation
    # ----------------------------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group, like torch.optim. The caller's dict is copied, not filled in: a group
        dict reused for a second optimizer must not carry this one's η."""
        group = dict(param_group)
        for key in ("foreach", "fused", "newton_steps"):
            if key in group:
                _check(
                    key,
                    group[key],
                    group[key] == getattr(self, key),
                    f"{key} is an option of the whole optimizer ({getattr(self, key)!r} here): "
                    "one implementation and one dual solve serve all groups. Pass it to "
                    "Arturo(...) instead of a param group",
                )
                del group[key]
        for key in GROUP_STATE_DTYPES:
            group.pop(key, None)  # this optimizer's state, never the caller's
        units = group.get("units", self.defaults["units"])
        if units != self.defaults["units"] and units in PRESETS:
            # A group in other units than the optimizer's: its defaults are that mode's.
            group = {**PRESETS[units], **group}
        super().add_param_group(group)
        group = self.param_groups[-1]
        try:
            _validate_hyperparams(group)
            for p in group["params"]:
                if p.is_sparse:
                    raise SparseGradientError("Arturo does not support sparse parameters")
                if _is_flat_parameter(p):
                    raise RuntimeError(
                        "Arturo cannot step on FSDP1's flat-parameter sharding (a FlatParameter, "
                        "or a use_orig_params view into one): " + _FLAT_SHARDING_ADVICE
                    )
                if self.fused:
                    _check(
                        "fused",
                        True,
                        p.device.type in ("cpu", "cuda"),
                        f"the fused step runs on CPU and CUDA tensors, not on {p.device.type}",
                    )
        except Exception:
            self.param_groups.pop()  # a rejected group must not linger in the optimizer
            raise
        for key, dtype in GROUP_STATE_DTYPES.items():
            group[key] = torch.zeros((), dtype=dtype)
        # step() checks that the groups still hold these objects. An unpickled optimizer lacks
        # the record (torch.optim pickles only groups and state), so start from its groups.
        given = self.__dict__.setdefault(
            "_given_params", [tuple(g["params"]) for g in self.param_groups[:-1]]
        )
        given.append(tuple(group["params"]))

    def _check_params_not_replaced(self) -> None:
        """Raise RuntimeError if a wrapper replaced a group's parameters since they were given.

        DeepSpeed ZeRO-1/2 swaps each group's parameters for one flat per-rank partition; a
        wrapper may do the same with FSDP1's flat parameters. Same-shaped, unflattened
        replacements of parameters without state are accepted: that is how Accelerate hands
        over FSDP2's DTensor parameters, or parameters it moved to another device. The common
        case is one identity comparison per parameter, without touching the device.
        """
        given = self.__dict__.setdefault(
            "_given_params", [tuple(g["params"]) for g in self.param_groups]
        )
        if len(given) != len(self.param_groups):
            raise RuntimeError(
                f"Arturo was given {len(given)} param groups and now has "
                f"{len(self.param_groups)}: add groups with add_param_group(), not by editing "
                "param_groups"
            )
        replaced = False
        for gi, (old, group) in enumerate(zip(given, self.param_groups, strict=True)):
            new = group["params"]
            if len(old) == len(new) and all(a is b for a, b in zip(old, new, strict=True)):
                continue
            replaced = True
            if len(old) != len(new) or any(
                a.shape != b.shape or _is_flat_parameter(b) for a, b in zip(old, new, strict=True)
            ):
                raise RuntimeError(
                    f"the parameters of param group {gi} were replaced after Arturo was "
                    f"created by tensors of other shapes ({len(old)} given, {len(new)} now), as "
                    "DeepSpeed ZeRO and FSDP1 do when they hand the optimizer flattened "
                    "per-rank partitions: " + _FLAT_SHARDING_ADVICE
                )
            if any(self.state.get(a) for a, b in zip(old, new, strict=True) if a is not b):
                raise RuntimeError(
                    f"the parameters of param group {gi} were replaced after Arturo took "
                    "steps, so its state belongs to the old tensors: create the optimizer "
                    "after wrapping the model, or load a state_dict into a new one"
                )
        if replaced:
            self._given_params = [tuple(g["params"]) for g in self.param_groups]

    def __getstate__(self) -> dict[str, Any]:
        # torch.optim pickles (and deep-copies) only defaults, state and param groups.
        return {**super().__getstate__(), **{k: getattr(self, k) for k in OPTIMIZER_OPTIONS}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for key, default in zip(OPTIMIZER_OPTIONS, (None, None, 3, "skip"), strict=True):
            self.__dict__.setdefault(key, default)

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
        if group["units"] == "relative":
            state[STATE_GRAD_SQ_AVG] = torch.zeros((), dtype=dtype, device=p.device)
        return state

    def _collect_group(self, group: dict[str, Any]) -> F.GroupTensors | None:
        """The group's parameters that have a gradient, with their (lazily created) state."""
        lists: tuple[list[Tensor], ...] = tuple([] for _ in range(9))
        relative = group["units"] == "relative"
        grad_sq_avgs: list[Tensor] = []
        numels: list[int] = []
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
            if relative:
                grad_sq_avgs.append(state[STATE_GRAD_SQ_AVG])
                numels.append(p.numel() * (2 if p.is_complex() else 1))  # all shards
        if not lists[0]:
            return None
        if not relative:
            return F.GroupTensors(*lists)
        return F.GroupTensors(*lists, grad_sq_avgs=grad_sq_avgs, numels=tuple(numels))

    @staticmethod
    def _hyperparams(group: dict[str, Any]) -> F.GroupHyperparams:
        return F.GroupHyperparams(
            weight_decay=group["weight_decay"],
            reg_weight=group["reg_weight"],
            prior_precision=group["prior_precision"],
            precision_inertia=group["precision_inertia"],
            filter_process_noise=group["filter_process_noise"],
            filter_measurement_noise=group["filter_measurement_noise"],
            outlier_threshold=float(group["outlier_threshold"]),
            relative=group["units"] == "relative",
        )

    @staticmethod
    def _kl_per_lr(group: dict[str, Any]) -> float:
        """The group's KL bound per unit of its ``lr``: in relative units ε is a budget per
        coordinate, so the group's bound is ε times its number of coordinates (over all
        shards; every parameter of the group counts, with a gradient this step or not)."""
        if group["units"] != "relative":
            return 1.0
        return float(sum(p.numel() * (2 if p.is_complex() else 1) for p in group["params"]))

    # ----------------------------------------------------------------------------------------
    # The step
    # ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Take one step. ``closure`` re-evaluates the model and returns the loss."""
        if self.__dict__.get("_sampling", False):
            # The exit of sampled_params() would overwrite this step with the old means.
            raise RuntimeError(
                "step() inside sampled_params(): the parameters hold a sample; step after "
                "the context exits (its gradients can be used then)"
            )
        self._check_params_not_replaced()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        active, tensors = [], []
        for group in self.param_groups:
            _validate_hyperparams(group)  # a scheduler or a user may have changed them
            collected = self._collect_group(group)  # creates missing state
            if collected is not None:
                active.append(group)
                tensors.append(collected)
        if not active:
            return loss

        device = tensors[0].params[0].device
        for t in tensors:
            if any(p.device != device for p in t.params):
                raise ValueError(
                    "Arturo needs all parameters with gradients on one device; found "
                    f"{device} and {next(p.device for p in t.params if p.device != device)}"
                )
        impl = choose_implementation(device, self.foreach, self.fused)
        solve_dtype = (
            torch.float64
            if any(b.dtype == torch.float64 for t in tensors for b in t.intercepts)
            else torch.float32
        )
        reduce_fn = partial_sum_reducer(
            [p for g in active for p in g["params"] if p.grad is not None]
        )

        def group_tensor(key: str) -> Tensor:
            values = [torch.as_tensor(g[key], dtype=solve_dtype) for g in active]
            return torch.stack(values).to(device, non_blocking=True)

        if self.nonfinite == "raise":  # syncs, by the user's choice
            checks, _ = F.check_gradients(tensors, solve_dtype, impl=impl, reduce_fn=reduce_fn)
            if bool((checks[:, 0] > 0).any()):
                raise NonFiniteGradientError(
                    "a gradient holds NaN or inf; nothing was changed. Pass nonfinite='skip' "
                    "to skip such steps instead"
                )
        # Relative units: ε is per coordinate, so a group's KL bound is ε times its size.
        kl_per_lr = torch.tensor([self._kl_per_lr(g) for g in active], dtype=solve_dtype).to(
            device, non_blocking=True
        )
        result = F.arturo_step(
            tensors,
            [self._hyperparams(g) for g in active],
            lrs=group_tensor("lr"),
            kl_per_lr=kl_per_lr,
            etas=group_tensor(GROUP_ETA),
            grad_scales=group_tensor(GROUP_GRAD_SCALE),
            newton_steps=self.newton_steps,
            impl=impl,
            reduce_fn=reduce_fn,
        )
        for i, group in enumerate(active):
            group[GROUP_ETA] = result.eta[i].to(torch.float32)
            group[GROUP_KL] = result.kl[i].to(torch.float32)
            group[GROUP_GRAD_SCALE] = result.grad_scale[i].to(torch.float32)
            group[GROUP_SKIPPED] = group[GROUP_SKIPPED].to(device) + result.skipped[i]
        return loss

    # ----------------------------------------------------------------------------------------
    # Checkpoints
    # ----------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's state dict, plus the version of its layout (:data:`STATE_FORMAT`)."""
        return {**super().state_dict(), STATE_FORMAT_KEY: STATE_FORMAT}

    def _validate_loaded(self, state_dict: dict[str, Any]) -> None:
        """Raise ValueError, naming what is wrong, unless ``state_dict`` (current format) is
        an arTuRO state for exactly these parameters."""
        if not isinstance(state_dict.get("state"), dict) or not isinstance(
            state_dict.get("param_groups"), list
        ):
            raise ValueError("not an optimizer state dict: needs 'state' and 'param_groups'")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"the state has {len(saved_groups)} param groups, this optimizer "
                f"{len(self.param_groups)}"
            )
        for gi, (saved, group) in enumerate(zip(saved_groups, self.param_groups, strict=True)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"param group {gi} of the state has {len(saved['params'])} parameters, "
                    f"this optimizer's {len(group['params'])}"
                )
            missing = [k for k in (*HYPERPARAMETERS, *GROUP_STATE_DTYPES) if k not in saved]
            if missing:
                raise ValueError(
                    f"param group {gi} of the state lacks {missing}: not an arTuRO state"
                )
            try:
                _validate_hyperparams({**saved, "params": group["params"]})
            except ValueError as exc:
                raise ValueError(f"param group {gi} of the state: {exc}") from None
            for key in GROUP_STATE_DTYPES:
                value = saved[key]
                if not isinstance(value, Tensor) or value.numel() != 1:
                    raise ValueError(f"param group {gi}: {key!r} must be a 1-element tensor")
            for saved_id, p in zip(saved["params"], group["params"], strict=True):
                entry = state_dict["state"].get(saved_id)
                if not entry:
                    continue  # a parameter that never had a gradient
                where = f"state of parameter {saved_id} (group {gi}, shape {tuple(p.shape)})"
                keys = RELATIVE_STATE_KEYS if saved["units"] == "relative" else PARAM_STATE_KEYS
                if sorted(entry) != sorted(keys):
                    raise ValueError(
                        f"{where} has keys {sorted(entry)}, arTuRO's in {saved['units']} units "
                        f"are {sorted(keys)}: not an arTuRO state of this mode"
                    )
                shape = tuple(torch.view_as_real(p).shape) if p.is_complex() else tuple(p.shape)
                for key in keys:
                    value = entry[key]
                    if not isinstance(value, Tensor) or not value.is_floating_point():
                        raise ValueError(f"{where}: {key!r} must be a floating-point tensor")
                    expected = () if key in (STATE_STEP, STATE_GRAD_SQ_AVG) else shape
                    if tuple(value.shape) != expected:
                        raise ValueError(
                            f"{where}: {key!r} has shape {tuple(value.shape)}, expected "
                            f"{expected}: the state belongs to other parameters"
                        )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load like any optimizer, after checking that the state is arTuRO's, for these
        parameters (ValueError otherwise, with the optimizer left unchanged), and upgrading
        older formats. fp32 state of bf16/fp16 params stays fp32: torch.optim would cast it
        to the parameter's dtype."""
        if not isinstance(state_dict, dict) or "param_groups" not in state_dict:
            raise ValueError("not an optimizer state dict: needs 'state' and 'param_groups'")
        state_dict = upgrade_state_dict(state_dict, self.defaults)
        self._validate_loaded(state_dict)
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, params, strict=True):
            saved = state_dict["state"].get(saved_id)
            if not saved:
                continue
            state = self.state[p]
            for key, value in saved.items():
                dtype = torch.float32 if key == STATE_STEP else self._state_dtype(p)
                if p.is_complex():
                    dtype = self._state_dtype(torch.view_as_real(p))
                state[key] = value.to(device=p.device, dtype=dtype, copy=True)
        for group in self.param_groups:
            for key, dtype in GROUP_STATE_DTYPES.items():
                group[key] = torch.as_tensor(group[key]).to(dtype).clone()

    # ----------------------------------------------------------------------------------------
    # Diagnostics
    # ----------------------------------------------------------------------------------------

    def stats(self) -> list[dict[str, float]]:
        """Per param group: ``eta``, ``kl`` (of the last step), ``kl_bound`` (ε) and
        ``skipped_steps``, as Python numbers. Reads device values, so it may sync; the same
        values stay on the device as 0-dim tensors under those keys of each param group."""
        return [
            {
                "eta": float(group[GROUP_ETA]),
                "kl": float(group[GROUP_KL]),
                "kl_bound": float(group["lr"]) * self._kl_per_lr(group),
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

    # ----------------------------------------------------------------------------------------
    # The posterior (docs/algorithm.md, "The posterior"; docs/uncertainty.md)
    # ----------------------------------------------------------------------------------------

    def _group_of(self, p: Tensor) -> dict[str, Any]:
        for group in self.param_groups:
            if any(q is p for q in group["params"]):
                return group
        raise KeyError("this parameter is in none of the optimizer's param groups")

    def _check_grad_scales(self, entries: list[tuple[Tensor, dict[str, Any]]]) -> None:
        """ValueError unless every relative-units tensor of ``entries`` (parameter, its group)
        has a gradient scale: without one, the posterior for N examples is improper. One host
        sync for all of them."""
        relative = [p for p, group in entries if group["units"] == "relative"]
        if not relative:
            return
        device = relative[0].device
        scales = torch.stack(
            [
                local_shard(self.state[p][STATE_GRAD_SQ_AVG]).to(device, torch.float64)
                for p in relative
            ]
        ).tolist()
        unscaled = [p for p, m in zip(relative, scales, strict=True) if not m > 0]
        if unscaled:
            raise ValueError(
                f"a parameter of shape {tuple(unscaled[0].shape)} (and {len(unscaled) - 1} "
                "more) has relative-units state but no gradient scale yet (all its gradients "
                "were exactly 0): its posterior for a dataset_size is undefined, since its "
                "curvature and its prior's (ω·λ₀·s) are both 0. Pass dataset_size=None for "
                "the state's own variance 1/λ"
            )

    def _posterior_variance(
        self, p: Tensor, group: dict[str, Any], dataset_size: int | None, *, local: bool
    ) -> Tensor:
        state = self._param_state(p)
        precision = state[STATE_PRECISION]
        grad_sq_avg = state.get(STATE_GRAD_SQ_AVG) if group["units"] == "relative" else None
        return posterior_variance_from_state(
            local_shard(precision) if local else precision,
            group["reg_weight"],
            None if grad_sq_avg is None else local_shard(grad_sq_avg),
            dataset_size,
        )

    def posterior_variance(self, p: Tensor, dataset_size: int | None = None) -> Tensor:
        """The variance σ² that :meth:`sampled_params` samples ``p`` with (a new tensor in
        the state's dtype, shaped like ``p``, or like ``view_as_real(p)`` for a complex
        ``p``; a DTensor for a DTensor ``p``).

        ``dataset_size=None`` (default): 1/λ, the same as :meth:`variance`. The precision
        update's fixed point is λ = a/ω (a: the stepping curvature of the mean loss, prior
        included), so this is a posterior tempered to 1/ω effective examples (relative units:
        1/(ω·s), s the tensor's gradient scale).

        ``dataset_size=N``: 1/(N·ω·λ) (relative units: 1/(N·ω·s·λ)), the posterior for a
        training set of N examples whose mean loss is being minimised, with the prior term
        ω·λ₀ acting per example (prior precision N·ω·λ₀). Measured on Fashion-MNIST it is about
        the right width for the full training set but much too wide for a small subset
        (docs/uncertainty.md, "Scarce data"): for a small training set, fit the sampling
        temperature on held-out data (:func:`arturo.fit_sampling_temperature`).

        ValueError for a relative-units tensor that has no gradient scale yet (all its
        gradients were 0). KeyError for a parameter without state.
        """
        dataset_size = check_dataset_size(dataset_size)
        self._param_state(p)  # KeyError, with its message, before anything else
        group = self._group_of(p)
        if dataset_size is not None:
            self._check_grad_scales([(p, group)])
        return self._posterior_variance(p, group, dataset_size, local=False)

    @contextlib.contextmanager
    def sampled_params(
        self,
        *,
        generator: torch.Generator | None = None,
        temperature: float = 1.0,
        dataset_size: int | None = None,
    ) -> Iterator[None]:
        """Inside this context, every parameter with arTuRO state holds one sample
        θ ~ N(μ, temperature·σ²), σ² = :meth:`posterior_variance` ``(p, dataset_size)``.

        On exit, also on an exception, the means are restored bitwise; parameters without
        state are never touched, and the optimizer's state is not changed. Draws come from
        ``generator`` (on the parameters' device), else from torch's default generator of
        each parameter's device, in the order of the param groups. bf16/fp16 parameters are
        sampled in their fp32 state dtype and rounded once; complex ones through
        ``view_as_real``. Under FSDP2 each rank samples its own shard: seed a generator per
        rank (``torch.Generator(device).manual_seed(seed + rank)``), or the shards' noise is
        correlated across ranks. ``temperature=0`` leaves the means in place.

        Gradients computed inside may be used by a ``step()`` after the context exits, as
        IVON trains: the filter then regresses a gradient measured at the sample on the mean
        θ, i.e. it fits the gradient of the loss smoothed by q (docs/uncertainty.md).
        ``step()`` inside the context, or a nested context, raises RuntimeError.
        """
        temperature = check_temperature(temperature)
        dataset_size = check_dataset_size(dataset_size)
        if self.__dict__.get("_sampling", False):
            raise RuntimeError(
                "sampled_params() is already active on this optimizer: inside it the "
                "parameters hold a sample, not the means"
            )
        entries = [(p, g) for g in self.param_groups for p in g["params"] if self.state.get(p)]
        if dataset_size is not None:
            self._check_grad_scales(entries)  # before any parameter changes
        means: list[tuple[Tensor, Tensor]] = []  # (local shard, its copy): restored on exit
        self._sampling = True
        try:
            with torch.no_grad():
                for p, group in entries:
                    shard = local_shard(p)
                    means.append((shard, shard.clone()))
                    if temperature == 0:
                        continue  # mean + 0·noise would turn a -0.0 into +0.0
                    real = torch.view_as_real(shard) if shard.is_complex() else shard
                    variance = self._posterior_variance(p, group, dataset_size, local=True)
                    draw_sample_(real, variance, temperature, generator)
            yield
        finally:
            with torch.no_grad():
                for shard, mean in means:
                    shard.copy_(mean)
            self._sampling = False
