"""Calibration metrics, temperature scaling and the OOD score: pure functions of predictions.

Everything here takes tensors already computed (probabilities or logits, labels) and returns
numbers; nothing trains or reads files. The expected calibration error and the AUROC come from
torchmetrics, so that they are the standard definitions and not a local variant:

- ECE: 15 equal-width confidence bins, the L1 gap between accuracy and confidence weighted by
  the bins' shares of the examples (torchmetrics' ``multiclass_calibration_error``);
- AUROC: torchmetrics' ``binary_auroc``, OOD examples the positive class, scored by predictive
  entropy (higher entropy, more likely OOD).

Temperature scaling (Guo et al., 2017) fits one scalar T > 0 that minimises the validation NLL
of softmax(logits / T); it changes confidence, never the predicted class.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.functional.classification import binary_auroc, multiclass_calibration_error

from arturo.posterior import mean_nll

__all__ = [
    "ECE_BINS",
    "classification_metrics",
    "reliability_bins",
    "fit_temperature",
    "predictive_entropy",
    "ood_auroc",
]

ECE_BINS = 15

# log of a probability that underflowed to 0 would be -inf; 0·log 0 must count as 0.
_TINY = torch.finfo(torch.float32).tiny


def _checked(probs: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    if probs.ndim != 2 or labels.shape != probs.shape[:1]:
        raise ValueError(
            f"expected probabilities (N, C) and labels (N,), got {tuple(probs.shape)} and "
            f"{tuple(labels.shape)}"
        )
    return probs.float(), labels.long()


def classification_metrics(
    probs: Tensor, labels: Tensor, n_bins: int = ECE_BINS
) -> dict[str, float]:
    """Accuracy, NLL (nats, mean over examples), Brier score (the squared distance between the
    probability vector and the one-hot label, summed over classes, mean over examples) and
    ECE with ``n_bins`` equal-width bins, of predicted probabilities (N, C)."""
    probs, labels = _checked(probs, labels)
    onehot = F.one_hot(labels, probs.shape[1]).to(probs.dtype)
    ece = multiclass_calibration_error(
        probs, labels, num_classes=probs.shape[1], n_bins=n_bins, norm="l1"
    )
    return {
        "acc": (probs.argmax(1) == labels).double().mean().item(),
        "nll": mean_nll(probs, labels),
        "brier": (probs - onehot).double().pow(2).sum(1).mean().item(),
        "ece": float(ece),
    }


def reliability_bins(
    probs: Tensor, labels: Tensor, n_bins: int = ECE_BINS
) -> dict[str, list[float]]:
    """Per equal-width confidence bin: the number of examples, their mean confidence and their
    accuracy (0 where a bin is empty), for reliability diagrams. Bin i holds confidences in
    [i/n, (i+1)/n); a confidence of exactly 1 counts in the last bin."""
    probs, labels = _checked(probs, labels)
    confidence, predicted = probs.max(1)
    correct = (predicted == labels).double()
    index = (confidence.double() * n_bins).floor().long().clamp_(0, n_bins - 1)
    count = torch.zeros(n_bins, dtype=torch.float64, device=probs.device)
    count.index_add_(0, index, torch.ones_like(correct))
    conf_sum = torch.zeros_like(count).index_add_(0, index, confidence.double())
    acc_sum = torch.zeros_like(count).index_add_(0, index, correct)
    safe = count.clamp_min(1)
    return {
        "count": count.tolist(),
        "confidence": (conf_sum / safe).tolist(),
        "accuracy": (acc_sum / safe).tolist(),
    }


def fit_temperature(logits: Tensor, labels: Tensor, max_iter: int = 100) -> float:
    """The T > 0 that minimises the mean NLL of softmax(logits / T): LBFGS on log T (so T stays
    positive without a constraint), from T = 1, in float64."""
    logits, labels = logits.detach().double(), labels.long()
    log_t = torch.zeros((), dtype=torch.float64, device=logits.device, requires_grad=True)
    opt = torch.optim.LBFGS(
        [log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe", tolerance_grad=1e-10
    )

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp())


def predictive_entropy(probs: Tensor) -> Tensor:
    """Entropy (nats) of each row of probabilities (N, C); 0·log 0 counts as 0."""
    probs = probs.double()
    return -(probs * probs.clamp_min(_TINY).log()).sum(1)


def ood_auroc(in_probs: Tensor, ood_probs: Tensor) -> float:
    """AUROC of predictive entropy separating OOD inputs (positive) from in-distribution ones:
    1 means every OOD input has a higher entropy than every in-distribution input, 0.5 chance."""
    scores = torch.cat([predictive_entropy(in_probs), predictive_entropy(ood_probs)])
    targets = torch.cat(
        [
            torch.zeros(len(in_probs), dtype=torch.long, device=scores.device),
            torch.ones(len(ood_probs), dtype=torch.long, device=scores.device),
        ]
    )
    return float(binary_auroc(scores, targets))
