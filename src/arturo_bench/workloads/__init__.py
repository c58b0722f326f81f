"""Workloads of the transfer suite: does an optimizer work beyond the task it was tuned on?

Seven model families on real data that every machine has offline, each with fixed data
subsets, a step budget (full and quick), one warmup-cosine schedule for every optimizer, a
metric with its direction, and two reference scores (the trivial predictor's and AdamW's
defaults'). ``train_workload`` trains any of them with any optimizer. See docs/workloads.md."""

from .core import Metric, TensorSplit, TokenWindows, Workload, WorkloadData, warmup_cosine
from .definitions import WORKLOADS, get_workload
from .training import (
    BatchOrder,
    evaluate,
    normalized_score,
    steps_to_target,
    train_workload,
)

__all__ = [
    "WORKLOADS",
    "get_workload",
    "Workload",
    "WorkloadData",
    "Metric",
    "TensorSplit",
    "TokenWindows",
    "warmup_cosine",
    "BatchOrder",
    "evaluate",
    "train_workload",
    "steps_to_target",
    "normalized_score",
]
