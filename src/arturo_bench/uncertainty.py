"""The calibration protocol of ``arturo-bench run --eval-samples K`` (docs/uncertainty.md,
"Harness"): which predictions are evaluated, on which data, and when.

A run with ``val_split = V > 0`` trains on its training images but the last V, which it holds
out as the validation split (never the test set). Then:

- every epoch, the mean model: test accuracy, NLL, Brier score and ECE (``test_*``; the NLL
  is ``test_loss``);
- at every 10th epoch and the last ("full" evaluations), also:
  - the mean model's OOD AUROC (``test_ood_auroc``): Fashion-MNIST's test images flipped
    upside down against the test set, scored by predictive entropy;
  - temperature scaling (``ts_*``): one T fitted on the validation split's logits, the test
    metrics of softmax(logits / T), and its OOD AUROC;
  - for an optimizer with a posterior (arturo, IVON) and K > 0, the K-sample Bayesian model
    average (``bma_*``). arturo samples its posterior for the training images trained on
    (``dataset_size``), IVON through its own ``sampled_params``;
  - for arturo, at the last epoch, the sampling temperature that minimises the validation
    NLL of the K-sample average, and the test metrics at it (``bma_temperature``,
    ``bma_t_*``): how far 1/(N·ω·λ) is from a calibrated posterior;
  - reliability bins of each kind (``reliability``), for the report's diagrams.

The K weight samples are K models: each is drawn once and scored on every set (validation,
test, OOD), from a generator seeded by (seed, epoch), so a full evaluation is reproducible and
a resumed run never needs to recompute one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from arturo.posterior import minimize_log_scalar

from .calibration import (
    classification_metrics,
    fit_temperature,
    ood_auroc,
    reliability_bins,
)
from .data import Dataset, prepare_batch

__all__ = ["Posterior", "posterior_of", "model_average", "mean_model_metrics", "full_evaluation"]

# The range searched for the posterior's sampling temperature (it multiplies σ²), and the
# golden-section iterations: enough to pin T to a few percent, each costing K passes over the
# validation split. A plain search over the whole range (no grid scan, unlike
# arturo.fit_sampling_temperature's default) so that the committed results reproduce; the
# harness keeps its own loop because its K samples also score the test and OOD sets.
TEMPERATURE_RANGE = (1e-4, 1e2)
TEMPERATURE_ITERATIONS = 12


def upside_down(x: Tensor) -> Tensor:
    """The OOD set: images (N, C, H, W) flipped vertically. Same pixels, same statistics,
    but shapes a Fashion-MNIST model never saw (and no download needed)."""
    return x.flip(-2)


@torch.no_grad()
def logits_on(model: nn.Module, name: str, x: Tensor, batch_size: int) -> Tensor:
    """The model's logits (float32) on uint8 images ``x``, in eval mode, batch by batch."""
    model.eval()
    out = [
        model(prepare_batch(name, x[s : s + batch_size])).float()
        for s in range(0, len(x), batch_size)
    ]
    return torch.cat(out)


class Posterior:
    """Weight samples from an optimizer's posterior: ``sample(temperature)`` is a context in
    which the model holds one sample. ``seed(s)`` restarts the draws, so that the same seed
    gives the same K samples (at another temperature, the same noise scaled)."""

    def __init__(
        self,
        sample: Callable[[float], contextlib.AbstractContextManager[None]],
        seed: Callable[[int], None],
        *,
        has_temperature: bool,
    ) -> None:
        self.sample = sample
        self.seed = seed
        self.has_temperature = has_temperature


def posterior_of(
    optimizer: torch.optim.Optimizer, dataset_size: int, device: torch.device
) -> Posterior | None:
    """arturo's or IVON's posterior, or None for an optimizer without one (AdamW, SGD)."""
    from arturo import Arturo

    if isinstance(optimizer, Arturo):
        gen = torch.Generator(device)

        def arturo_sample(temperature: float) -> contextlib.AbstractContextManager[None]:
            return optimizer.sampled_params(
                generator=gen, temperature=temperature, dataset_size=dataset_size
            )

        return Posterior(arturo_sample, lambda s: gen.manual_seed(s), has_temperature=True)
    if type(optimizer).__module__.split(".")[0] == "ivon":
        # IVON draws from torch's global generators; training re-seeds them every epoch, so
        # seeding them here changes nothing that training sees.
        def ivon_sample(temperature: float) -> contextlib.AbstractContextManager[None]:
            assert temperature == 1.0, "IVON's sampled_params has no temperature"
            return optimizer.sampled_params(train=False)  # type: ignore[attr-defined]

        return Posterior(ivon_sample, lambda s: torch.manual_seed(s), has_temperature=False)
    return None


@torch.no_grad()
def model_average(
    model: nn.Module,
    posterior: Posterior,
    name: str,
    inputs: list[Tensor],
    *,
    samples: int,
    seed: int,
    batch_size: int,
    temperature: float = 1.0,
) -> list[Tensor]:
    """The K-sample average of the softmax probabilities on each of ``inputs``: each weight
    sample is drawn once and scores every input set."""
    posterior.seed(seed)
    totals: list[Tensor | None] = [None] * len(inputs)
    for _ in range(samples):
        with posterior.sample(temperature):
            for i, x in enumerate(inputs):
                probs = logits_on(model, name, x, batch_size).softmax(1)
                totals[i] = probs if totals[i] is None else totals[i].add_(probs)  # type: ignore[union-attr]
    return [t.div_(samples) for t in totals if t is not None]


def _kind(prefix: str, probs: Tensor, labels: Tensor, ood: Tensor | None) -> dict[str, Any]:
    row = {f"{prefix}_{k}": v for k, v in classification_metrics(probs, labels).items()}
    if ood is not None:
        row[f"{prefix}_ood_auroc"] = ood_auroc(probs, ood)
    return row


def mean_model_metrics(logits: Tensor, labels: Tensor) -> dict[str, float]:
    """The per-epoch calibration metrics of the mean model (its accuracy and NLL are
    ``test_acc`` and ``test_loss`` already)."""
    m = classification_metrics(logits.softmax(1), labels)
    return {"test_brier": m["brier"], "test_ece": m["ece"]}


def full_evaluation(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: Dataset,
    *,
    samples: int,
    seed: int,
    batch_size: int,
    fit_posterior_temperature: bool,
) -> dict[str, Any]:
    """The metrics of a full evaluation (module docstring): keys ``test_ood_auroc``,
    ``ts_*``, ``bma_*``, ``bma_t_*`` and ``reliability``."""
    if data.val_x is None or data.val_y is None:
        raise ValueError("a full evaluation needs a validation split (val_split > 0)")
    name, y_test, y_val = data.name, data.test_y, data.val_y
    ood_x = upside_down(data.test_x)
    sets = [data.val_x, data.test_x, ood_x]
    val_logits, test_logits, ood_logits = (logits_on(model, name, x, batch_size) for x in sets)

    mean_probs = test_logits.softmax(1)
    row: dict[str, Any] = {"test_ood_auroc": ood_auroc(mean_probs, ood_logits.softmax(1))}
    reliability = {"mean": reliability_bins(mean_probs, y_test)}

    t = fit_temperature(val_logits, y_val)
    ts_probs = (test_logits / t).softmax(1)
    row |= {"ts_temperature": t} | _kind("ts", ts_probs, y_test, (ood_logits / t).softmax(1))
    reliability["ts"] = reliability_bins(ts_probs, y_test)

    posterior = posterior_of(optimizer, len(data.train_y), data.test_x.device)
    if posterior is not None and samples > 0:

        def average(inputs: list[Tensor], temperature: float = 1.0) -> list[Tensor]:
            return model_average(
                model,
                posterior,
                name,
                inputs,
                samples=samples,
                seed=seed,
                batch_size=batch_size,
                temperature=temperature,
            )

        test_p, ood_p = average([data.test_x, ood_x])
        row |= _kind("bma", test_p, y_test, ood_p)
        reliability["bma"] = reliability_bins(test_p, y_test)
        if fit_posterior_temperature and posterior.has_temperature:

            def val_nll(temperature: float) -> float:
                (val_p,) = average([data.val_x], temperature)  # type: ignore[list-item]
                return classification_metrics(val_p, y_val)["nll"]

            best = minimize_log_scalar(
                val_nll, *TEMPERATURE_RANGE, iterations=TEMPERATURE_ITERATIONS
            )
            test_p, ood_p = average([data.test_x, ood_x], best)
            row |= {"bma_temperature": best} | _kind("bma_t", test_p, y_test, ood_p)
            reliability["bma_t"] = reliability_bins(test_p, y_test)
    row["reliability"] = reliability
    return row
