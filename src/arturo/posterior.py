"""arTuRO's Gaussian as a posterior: the variance that sampling uses, weight samples, and
predictions averaged over them (docs/uncertainty.md; the formulas: docs/algorithm.md, "The
posterior").

The optimizer keeps q = N(θ, diag(1/λ)). Its precision update has the fixed point λ* = a/ω
(absolute units) or a/(ω·s) (relative units), where a is the curvature of the mean minibatch
loss plus the prior's. Variational Bayes for N examples of a mean loss weighs the KL to the
prior by 1/N, so ω plays the role of 1/N: 1/λ is a posterior tempered to 1/ω effective
examples, and 1/(N·ω·λ) is the posterior for N.

The methods :meth:`Arturo.posterior_variance` and :meth:`Arturo.sampled_params` live on the
optimizer and call the helpers here; :func:`predict` and :func:`predict_regression` average a
model's outputs over samples.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .optimizer import Arturo

__all__ = [
    "fit_sampling_temperature",
    "mean_nll",
    "minimize_log_scalar",
    "posterior_variance_from_state",
    "predict",
    "predict_regression",
]

# NLL of a probability that underflowed to 0 would be inf and swamp the mean; the smallest
# normal float32 caps one example's NLL at about 87.3 nats instead.
_TINY = torch.finfo(torch.float32).tiny


def posterior_variance_from_state(
    precision: Tensor,
    reg_weight: float,
    grad_sq_avg: Tensor | None = None,
    dataset_size: int | None = None,
) -> Tensor:
    """σ² of the posterior, from a parameter's state: the one place this formula lives.

    ``dataset_size=None``: 1/λ, the state's own distribution. Otherwise 1/(N·ω_eff·λ) with
    N = ``dataset_size`` and ω_eff = ω (absolute units, ``grad_sq_avg=None``) or ω·√m
    (relative units, m = the tensor's ``grad_sq_avg``): the fixed point of the precision
    update is a/ω_eff, so N·ω_eff·λ = N·a, the precision of a posterior for N examples.
    Returns a new tensor shaped and typed like ``precision``.
    """
    if dataset_size is None:
        return precision.reciprocal()
    omega_eff: float | Tensor = reg_weight
    if grad_sq_avg is not None:
        omega_eff = grad_sq_avg.sqrt() * reg_weight
    return (precision * (omega_eff * dataset_size)).reciprocal()


def check_temperature(temperature: Any) -> float:
    """``temperature`` as a float, or ValueError: it must be a finite number ≥ 0."""
    ok = (
        isinstance(temperature, int | float)
        and not isinstance(temperature, bool)
        and math.isfinite(temperature)
        and temperature >= 0
    )
    if not ok:
        raise ValueError(
            f"Invalid temperature: {temperature!r} (a finite number >= 0; 1 samples the "
            "posterior itself, 0 the mean)"
        )
    return float(temperature)


def check_dataset_size(dataset_size: Any) -> int | None:
    """``dataset_size`` unchanged, or ValueError: it must be an int ≥ 1 or None."""
    ok = dataset_size is None or (
        isinstance(dataset_size, int) and not isinstance(dataset_size, bool) and dataset_size >= 1
    )
    if not ok:
        raise ValueError(
            f"Invalid dataset_size: {dataset_size!r} (the number of training examples, an int "
            ">= 1, or None for the state's own variance 1/λ)"
        )
    return dataset_size


def _check_samples(samples: Any) -> int:
    ok = isinstance(samples, int) and not isinstance(samples, bool) and samples >= 0
    if not ok:
        raise ValueError(
            f"Invalid samples: {samples!r} (an int >= 0; 0 predicts with the mean weights)"
        )
    return samples


def draw_sample_(
    mean: Tensor, variance: Tensor, temperature: float, generator: torch.Generator | None
) -> None:
    """Overwrite ``mean`` (a real local shard, in place) with one draw of
    N(mean, temperature·variance).

    The draw is made in ``variance``'s dtype (the state's: fp32 for bf16/fp16 params) and
    rounded to the parameter's dtype once, at the end.
    """
    noise = torch.randn(mean.shape, dtype=variance.dtype, device=mean.device, generator=generator)
    # variance is a fresh tensor: reuse it. A multiply, then an add, each rounded once, so
    # that the sample is exactly mean + std·noise wherever it is recomputed.
    sample = variance.mul_(temperature).sqrt_().mul_(noise).add_(mean.to(variance.dtype))
    mean.copy_(sample)


def _probabilities(logits: Tensor) -> Tensor:
    # At least fp32: averaging bf16 probabilities would lose most of their digits.
    return logits.to(torch.promote_types(logits.dtype, torch.float32)).softmax(dim=-1)


def _validated(samples: Any, temperature: Any, dataset_size: Any) -> tuple[int, float, int | None]:
    # Every argument is checked up front, also where samples=0 would not use it: a typo must
    # not wait for the first sampled evaluation to be found.
    return (
        _check_samples(samples),
        check_temperature(temperature),
        check_dataset_size(dataset_size),
    )


@torch.no_grad()
def predict(
    model: Callable[[Any], Tensor],
    optimizer: Arturo,
    inputs: Any,
    *,
    samples: int,
    generator: torch.Generator | None = None,
    dataset_size: int | None = None,
    temperature: float = 1.0,
) -> Tensor:
    """The Bayesian model average of the softmax probabilities of ``model(inputs)``.

    Each of ``samples`` evaluations runs inside ``optimizer.sampled_params(generator=...,
    temperature=..., dataset_size=...)``, and the probabilities (softmax over the last dim,
    in at least fp32) are averaged. ``samples=0`` returns the mean model's probabilities.
    Runs under ``torch.no_grad()``, in whatever train/eval mode the caller set on the model.
    """
    samples, temperature, dataset_size = _validated(samples, temperature, dataset_size)
    if samples == 0:
        return _probabilities(model(inputs))
    total: Tensor | None = None
    for _ in range(samples):
        with optimizer.sampled_params(
            generator=generator, temperature=temperature, dataset_size=dataset_size
        ):
            probs = _probabilities(model(inputs))
        total = probs if total is None else total.add_(probs)
    assert total is not None
    return total.div_(samples)


@torch.no_grad()
def predict_regression(
    model: Callable[[Any], Tensor],
    optimizer: Arturo,
    inputs: Any,
    *,
    samples: int,
    generator: torch.Generator | None = None,
    dataset_size: int | None = None,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Mean and variance of ``model(inputs)`` over ``samples`` weight samples.

    The variance is that of the ``samples`` outputs as a set (divided by ``samples``, so one
    sample gives 0): the spread the posterior puts on the model's output, without the
    observation noise, which the caller adds. Both in at least fp32. ``samples=0`` returns
    the mean model's outputs and zeros. Sampling as in :func:`predict`.
    """
    samples, temperature, dataset_size = _validated(samples, temperature, dataset_size)
    if samples == 0:
        out = model(inputs)
        out = out.to(torch.promote_types(out.dtype, torch.float32))
        return out, torch.zeros_like(out)
    mean: Tensor | None = None
    sum_sq_dev: Tensor | None = None
    for k in range(1, samples + 1):
        with optimizer.sampled_params(
            generator=generator, temperature=temperature, dataset_size=dataset_size
        ):
            out = model(inputs)
        out = out.to(torch.promote_types(out.dtype, torch.float32))
        if mean is None or sum_sq_dev is None:
            mean, sum_sq_dev = out.clone(), torch.zeros_like(out)
            continue
        # Welford's update: no cancellation when the spread is small against the mean.
        delta = out - mean
        mean.add_(delta / k)
        sum_sq_dev.add_(delta * (out - mean))
    assert mean is not None and sum_sq_dev is not None
    return mean, sum_sq_dev.div_(samples)


def mean_nll(probs: Tensor, targets: Tensor) -> float:
    """Mean negative log-likelihood (nats) of integer class ``targets`` (shape ``probs.shape[:-1]``)
    under probabilities ``probs`` (classes in the last dim), in float64; a probability that
    underflowed to 0 counts as the smallest normal float32."""
    p_true = probs.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    return -p_true.clamp_min(_TINY).double().log().mean().item()


def minimize_log_scalar(
    f: Callable[[float], float], lo: float, hi: float, *, iterations: int = 20, grid: int = 0
) -> float:
    """The x in [lo, hi] (0 < lo < hi) that minimises ``f``, by golden-section search on
    log x: for objectives with no cheap gradient (a sampled model average's NLL as a function
    of the sampling temperature). 20 iterations narrow the log-interval by about 15,000×.

    Golden-section search assumes ``f`` unimodal in log x. ``grid >= 2`` first scans ``grid``
    log-spaced points from lo to hi and then searches between the best one's neighbours, for
    objectives that are flat or bumpy over part of the range; ``grid=0`` searches the whole
    interval at once. Costs ``grid + iterations + 2`` calls of ``f``.
    """
    if not (0 < lo < hi and math.isfinite(hi)):
        raise ValueError(f"need 0 < lo < hi < inf, got lo={lo}, hi={hi}")
    if grid == 1 or grid < 0:
        raise ValueError(f"need grid = 0 or grid >= 2, got {grid}")
    a, b = math.log(lo), math.log(hi)
    scanned: list[tuple[float, float]] = []
    if grid:
        points = [a + (b - a) * i / (grid - 1) for i in range(grid)]
        scanned = [(f(math.exp(t)), t) for t in points]
        best = min(range(grid), key=lambda i: scanned[i][0])
        a, b = points[max(best - 1, 0)], points[min(best + 1, grid - 1)]
    inv_phi = (math.sqrt(5) - 1) / 2
    c, d = b - inv_phi * (b - a), a + inv_phi * (b - a)
    fc, fd = f(math.exp(c)), f(math.exp(d))
    for _ in range(iterations):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - inv_phi * (b - a)
            fc = f(math.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + inv_phi * (b - a)
            fd = f(math.exp(d))
    # The grid's best point stays a candidate: at a bound it is never inside the bracket.
    _, t = min([*scanned, (fc, c), (fd, d)])
    return math.exp(t)


@torch.no_grad()
def fit_sampling_temperature(
    model: Callable[[Any], Tensor],
    optimizer: Arturo,
    inputs: Any,
    targets: Tensor,
    *,
    samples: int,
    dataset_size: int | None = None,
    generator: torch.Generator | None = None,
    bounds: tuple[float, float] = (1e-4, 1e2),
    iterations: int = 8,
) -> float:
    """The ``temperature`` for :meth:`Arturo.sampled_params` and :func:`predict` that
    minimises the NLL of ``predict(model, optimizer, inputs, samples=samples,
    dataset_size=dataset_size, temperature=T)`` for the class ``targets``.

    Fit it on held-out data, never on the test set. It matters most for small training
    sets, where the posterior for ``dataset_size`` examples can be far too wide
    (docs/uncertainty.md). The search scans one point per decade of ``bounds``, then runs a
    golden-section search on log T between the best point's neighbours
    (:func:`minimize_log_scalar`): ``(decades + 3 + iterations) · samples`` forward passes,
    17 · ``samples`` at the defaults. Every candidate T scores the same standard-normal
    draws (``generator``'s state is reset before each, and restored at the end), so that the
    search compares temperatures, not sampling noise. ``generator=None``: a new generator on
    the parameters' device, seeded from torch's default generator. A result at a bound means
    the optimum may lie beyond it; at the lower bound, sampling did not help on these data.
    """
    samples, dataset_size = _check_samples(samples), check_dataset_size(dataset_size)
    if samples == 0:
        raise ValueError("Invalid samples: 0 (fitting a sampling temperature needs samples >= 1)")
    lo, hi = bounds
    if not (0 < lo < hi and math.isfinite(hi)):
        raise ValueError(f"Invalid bounds: {bounds!r} (need 0 < low < high < inf)")
    if not (isinstance(iterations, int) and not isinstance(iterations, bool) and iterations >= 1):
        raise ValueError(f"Invalid iterations: {iterations!r} (an int >= 1)")
    if generator is None:
        device = optimizer.param_groups[0]["params"][0].device
        seed = int(torch.randint(2**62, (), dtype=torch.int64))
        generator = torch.Generator(device).manual_seed(seed)
    start = generator.get_state()

    def nll_at(temperature: float) -> float:
        generator.set_state(start)
        probs = predict(
            model,
            optimizer,
            inputs,
            samples=samples,
            generator=generator,
            dataset_size=dataset_size,
            temperature=temperature,
        )
        return mean_nll(probs, targets)

    decades = max(1, math.ceil(math.log10(hi / lo) - 1e-9))
    try:
        return minimize_log_scalar(nll_at, lo, hi, iterations=iterations, grid=decades + 1)
    finally:
        generator.set_state(start)
