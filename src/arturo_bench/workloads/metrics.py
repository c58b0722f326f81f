"""Losses, metrics and the trivial predictors' scores the workloads share."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import functional as F

from .core import Metric, Split, TokenWindows, WorkloadData
from .datasets import VOCAB_SIZE

__all__ = [
    "cross_entropy",
    "mse",
    "ACCURACY",
    "MSE",
    "RMSE",
    "CROSS_ENTROPY",
    "majority_class_accuracy",
    "mean_predictor_mse",
    "mean_predictor_rmse",
    "unigram_cross_entropy",
]


def cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy over every position ((B, C) or (B, T, C) logits)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def mse(output: Tensor, targets: Tensor) -> Tensor:
    return F.mse_loss(output, targets)


def _correct(logits: Tensor, labels: Tensor) -> Tensor:
    return (logits.argmax(-1) == labels).sum()


def _squared_error(output: Tensor, targets: Tensor) -> Tensor:
    return (output.float() - targets).square().sum()


def _summed_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    flat = logits.reshape(-1, logits.shape[-1]).float()
    return F.cross_entropy(flat, targets.reshape(-1), reduction="sum")


ACCURACY = Metric("test_accuracy", "max", _correct)
MSE = Metric("test_mse", "min", _squared_error)
RMSE = Metric("test_rmse", "min", _squared_error, finish=math.sqrt)
CROSS_ENTROPY = Metric("val_loss", "min", _summed_cross_entropy)


def _all_targets(split: Split) -> Tensor:
    """Every target the split holds, once each (a token stream's, without repeating the
    tokens that overlapping windows share)."""
    if isinstance(split, TokenWindows):
        return split.tokens[1 : 1 + (len(split) - 1) * split.stride + split.context]
    return split.targets


def majority_class_accuracy(data: WorkloadData) -> float:
    """Test accuracy of always predicting the most common training label."""
    train, test = _all_targets(data.train), _all_targets(data.test)
    majority = torch.bincount(train).argmax()
    return (test == majority).double().mean().item()


def mean_predictor_mse(data: WorkloadData) -> float:
    """Test MSE of predicting the training targets' mean (per output: the mean image)."""
    train, test = _all_targets(data.train).double(), _all_targets(data.test).double()
    return (test - train.mean(0)).square().mean().item()


def mean_predictor_rmse(data: WorkloadData) -> float:
    return math.sqrt(mean_predictor_mse(data))


def unigram_cross_entropy(data: WorkloadData) -> float:
    """Validation cross-entropy (nats per token) of the training text's token frequencies,
    add-one smoothed so that an unseen token costs a finite amount."""
    train, test = _all_targets(data.train), _all_targets(data.test)
    counts = torch.bincount(train, minlength=VOCAB_SIZE).double() + 1.0
    log_prob = counts.log() - counts.sum().log()
    return -log_prob[test].mean().item()
