"""Real data that every machine has offline, as ``WorkloadData`` on the training device.

- Fashion-MNIST from its IDX files (``arturo_bench.data`` finds and checks them);
- scikit-learn's bundled ``load_diabetes`` and ``load_digits`` (shipped inside the wheel);
- the Python reference manual's topics in ``pydoc_data.topics`` (standard library).

Subsets and train/test splits are fixed by a constant seed, so every optimizer and every
training seed sees the same examples."""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import Tensor

from ..data import load_fashion_mnist
from .core import TensorSplit, TokenWindows, WorkloadData

__all__ = [
    "SPLIT_SEED",
    "CHAR_VOCAB",
    "VOCAB_SIZE",
    "load_fmnist_images",
    "load_diabetes_raw",
    "load_digits_rows",
    "load_python_docs_text",
    "encode_chars",
    "python_docs_text",
]

SPLIT_SEED = 0  # fixes every subset and split; never a training seed

DataDir = str | os.PathLike[str] | None


def _fixed_permutation(n: int) -> np.ndarray:
    return np.random.default_rng(SPLIT_SEED).permutation(n)


def _first_of_permutation(n_total: int, n_keep: int) -> Tensor:
    """The first ``n_keep`` of a fixed permutation (all of them when fewer exist)."""
    return torch.from_numpy(_fixed_permutation(n_total)[: min(n_keep, n_total)])


def _split_off_test(n: int, test_fraction: float) -> tuple[Tensor, Tensor]:
    """(train, test) indices of a fixed random split."""
    perm = torch.from_numpy(_fixed_permutation(n))
    n_test = max(1, round(test_fraction * n))
    return perm[n_test:], perm[:n_test]


# ----------------------------------------------------------------------------- Fashion-MNIST
def load_fmnist_images(
    data_dir: DataDir,
    device: torch.device | str,
    *,
    train: int,
    test: int,
    flatten: bool = False,
    reconstruct: bool = False,
) -> WorkloadData:
    """A fixed subset of Fashion-MNIST, pixels in [0, 1], as (N, 1, 28, 28) or (N, 784).

    Targets are the labels, or the (flattened) images themselves when ``reconstruct``."""
    ds = load_fashion_mnist(data_dir)

    def split(x: Tensor, y: Tensor, n: int) -> TensorSplit:
        idx = _first_of_permutation(len(y), n)
        images = x[idx].to(device=device, dtype=torch.float32).div_(255.0)
        if flatten or reconstruct:
            images = images.flatten(1)
        targets = images if reconstruct else y[idx].to(device)
        return TensorSplit(images, targets)

    return WorkloadData(
        split(ds.train_x, ds.train_y, train), split(ds.test_x, ds.test_y, test), ds.source
    )


# ----------------------------------------------------------------------------- scikit-learn
def load_diabetes_raw(data_dir: DataDir, device: torch.device | str) -> WorkloadData:
    """scikit-learn's diabetes data: 10 scaled features, the raw disease-progression target
    (25-346) as (N, 1); 80/20 fixed split. ``data_dir`` is unused (the data ships with
    scikit-learn)."""
    from sklearn.datasets import load_diabetes

    x, y = load_diabetes(return_X_y=True, scaled=True)
    inputs = torch.as_tensor(x, dtype=torch.float32)
    targets = torch.as_tensor(y, dtype=torch.float32).unsqueeze(1)
    return _split_tensors(inputs, targets, device, "sklearn.datasets.load_diabetes")


def load_digits_rows(data_dir: DataDir, device: torch.device | str) -> WorkloadData:
    """scikit-learn's 8x8 digits as sequences of 8 rows of 8 pixels in [0, 1]; 80/20 fixed
    split. ``data_dir`` is unused (the data ships with scikit-learn)."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    inputs = torch.as_tensor(x, dtype=torch.float32).div_(16.0).view(-1, 8, 8)
    targets = torch.as_tensor(y, dtype=torch.int64)
    return _split_tensors(inputs, targets, device, "sklearn.datasets.load_digits")


def _split_tensors(
    inputs: Tensor, targets: Tensor, device: torch.device | str, source: str
) -> WorkloadData:
    train, test = _split_off_test(len(targets), 0.2)
    return WorkloadData(
        TensorSplit(inputs[train].to(device), targets[train].to(device)),
        TensorSplit(inputs[test].to(device), targets[test].to(device)),
        source,
    )


# ----------------------------------------------------------------------------- text
# A fixed vocabulary, so that the model's shape does not depend on the corpus: newline,
# printable ASCII, and one token for any other character (a few dashes and quotes).
CHAR_VOCAB = "\n" + "".join(chr(c) for c in range(32, 127))
OTHER_CHAR = len(CHAR_VOCAB)  # token id of every character outside CHAR_VOCAB
VOCAB_SIZE = len(CHAR_VOCAB) + 1
_CHAR_IDS = {c: i for i, c in enumerate(CHAR_VOCAB)}


def python_docs_text() -> str:
    """The Python reference manual's topics (standard library ``pydoc_data``), values in
    sorted-key order. The text differs a little between Python versions."""
    from pydoc_data.topics import topics

    return "".join(topics[key] for key in sorted(topics))


def encode_chars(text: str) -> Tensor:
    """Token ids (int64) of ``text`` in ``CHAR_VOCAB`` (``OTHER_CHAR`` for the rest)."""
    return torch.tensor([_CHAR_IDS.get(c, OTHER_CHAR) for c in text], dtype=torch.int64)


def load_python_docs_text(
    data_dir: DataDir, device: torch.device | str, *, context: int, chars: int | None = None
) -> WorkloadData:
    """First 90% of the characters to train on (every window), last 10% to validate on
    (non-overlapping windows). ``chars`` keeps only the first characters (for tests).
    ``data_dir`` is unused (the text ships with Python)."""
    text = python_docs_text()
    tokens = encode_chars(text if chars is None else text[:chars]).to(device)
    cut = int(0.9 * len(tokens))
    return WorkloadData(
        TokenWindows(tokens[:cut], context),
        TokenWindows(tokens[cut:], context, stride=context),
        "pydoc_data.topics",
    )
