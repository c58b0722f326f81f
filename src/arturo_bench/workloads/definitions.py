"""The workloads: seven model families on real data available offline.

``target`` and ``quick_target`` are measured, not chosen: AdamW with torch's defaults
(lr 1e-3, weight_decay 1e-2) on seed 0 at the end of the full and the quick budget, with
``train_workload``; ``trivial`` is ``trivial_of`` on the real data. docs/workloads.md says how
and where they were measured."""

from __future__ import annotations

import functools

from ..models import build_model
from .core import Workload
from .datasets import (
    VOCAB_SIZE,
    load_diabetes_raw,
    load_digits_rows,
    load_fmnist_images,
    load_python_docs_text,
)
from .metrics import (
    ACCURACY,
    CROSS_ENTROPY,
    MSE,
    RMSE,
    cross_entropy,
    majority_class_accuracy,
    mean_predictor_mse,
    mean_predictor_rmse,
    mse,
    unigram_cross_entropy,
)
from .models import CharTransformer, RowGRU, TinyResNet, autoencoder, mlp

__all__ = ["WORKLOADS", "get_workload", "TEXT_CONTEXT"]

TEXT_CONTEXT = 64  # characters the language model sees

FMNIST_MLP = Workload(
    name="fmnist_mlp",
    family="MLP classifier",
    description="784-256-256-10 ReLU MLP on Fashion-MNIST (all 60k train, 10k test)",
    load=functools.partial(load_fmnist_images, train=60_000, test=10_000, flatten=True),
    make_model=lambda: mlp([784, 256, 256, 10]),
    loss=cross_entropy,
    metric=ACCURACY,
    batch_size=128,
    steps=10_000,
    quick_steps=2500,
    eval_every=1000,
    quick_eval_every=500,
    target=0.9024,
    quick_target=0.8839,
    trivial=0.1,
    trivial_of=majority_class_accuracy,
)

FMNIST_CNN_SMALL = Workload(
    name="fmnist_cnn_small",
    family="CNN with dropout",
    description="CNN-F (the paper's Fashion-MNIST CNN) on a 20k/5k Fashion-MNIST subset",
    load=functools.partial(load_fmnist_images, train=20_000, test=5_000),
    make_model=lambda: build_model("cnn_f", num_classes=10, in_channels=1),
    loss=cross_entropy,
    metric=ACCURACY,
    batch_size=64,
    steps=4000,
    quick_steps=1000,
    eval_every=400,
    quick_eval_every=200,
    target=0.8904,
    quick_target=0.8242,
    trivial=0.1076,
    trivial_of=majority_class_accuracy,
)

FMNIST_RESNET_BN = Workload(
    name="fmnist_resnet_bn",
    family="ResNet with BatchNorm",
    description="3-stage ResNet (one BasicBlock per stage, 16/32/64 channels, BatchNorm) on a "
    "20k/5k Fashion-MNIST subset",
    load=functools.partial(load_fmnist_images, train=20_000, test=5_000),
    make_model=TinyResNet,
    loss=cross_entropy,
    metric=ACCURACY,
    batch_size=64,
    steps=3000,
    quick_steps=750,
    eval_every=300,
    quick_eval_every=150,
    target=0.8914,
    quick_target=0.8418,
    trivial=0.1076,
    trivial_of=majority_class_accuracy,
)

TEXT_TRANSFORMER = Workload(
    name="text_transformer",
    family="Transformer language model",
    description="2-layer decoder-only character transformer (d_model 64, 4 heads, context 64) "
    "on the Python reference manual's topics (pydoc_data)",
    load=functools.partial(load_python_docs_text, context=TEXT_CONTEXT),
    make_model=lambda: CharTransformer(VOCAB_SIZE, context=TEXT_CONTEXT),
    loss=cross_entropy,
    metric=CROSS_ENTROPY,
    batch_size=32,
    steps=5000,
    quick_steps=1250,
    eval_every=500,
    quick_eval_every=250,
    target=1.401395,
    quick_target=1.922458,
    trivial=3.236061,
    trivial_of=unigram_cross_entropy,
    eval_batch_size=256,
)

DIABETES_REGRESSION = Workload(
    name="diabetes_regression",
    family="MLP regressor, unnormalised targets",
    description="10-64-64-1 ReLU MLP on scikit-learn's diabetes data, raw targets (25-346), "
    "MSE loss",
    load=load_diabetes_raw,
    make_model=lambda: mlp([10, 64, 64, 1]),
    loss=mse,
    metric=RMSE,
    batch_size=32,
    steps=4000,
    quick_steps=1000,
    eval_every=200,
    quick_eval_every=100,
    target=53.10456,
    quick_target=59.75905,
    trivial=77.16337078123314,
    trivial_of=mean_predictor_rmse,
)

DIGITS_GRU = Workload(
    name="digits_gru",
    family="Recurrent (GRU) classifier",
    description="GRU (hidden 64) reading scikit-learn's 8x8 digits one row per step",
    load=load_digits_rows,
    make_model=lambda: RowGRU(row_size=8, hidden=64, num_classes=10),
    loss=cross_entropy,
    metric=ACCURACY,
    batch_size=64,
    steps=3000,
    quick_steps=1000,
    eval_every=250,
    quick_eval_every=200,
    target=0.97493,
    quick_target=0.938718,
    trivial=28 / 359,
    trivial_of=majority_class_accuracy,
)

FMNIST_AUTOENCODER = Workload(
    name="fmnist_autoencoder",
    family="Autoencoder (reconstruction)",
    description="784-128-32-128-784 ReLU MLP autoencoder, sigmoid output, MSE loss, on "
    "Fashion-MNIST (all 60k train, 10k test)",
    load=functools.partial(load_fmnist_images, train=60_000, test=10_000, reconstruct=True),
    make_model=autoencoder,
    loss=mse,
    metric=MSE,
    batch_size=128,
    steps=10_000,
    quick_steps=2500,
    eval_every=1000,
    quick_eval_every=500,
    target=0.01200097,
    quick_target=0.01656679,
    trivial=0.08664123159756011,
    trivial_of=mean_predictor_mse,
)

WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        FMNIST_MLP,
        FMNIST_CNN_SMALL,
        FMNIST_RESNET_BN,
        TEXT_TRANSFORMER,
        DIABETES_REGRESSION,
        DIGITS_GRU,
        FMNIST_AUTOENCODER,
    )
}


def get_workload(name: str) -> Workload:
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; choose one of {sorted(WORKLOADS)}")
    return WORKLOADS[name]
