"""Tiny datasets written in the real on-disk formats (IDX, CIFAR python pickles)."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np


def write_idx(path: Path, array: np.ndarray, *, compress: bool | None = None) -> Path:
    """Write ``array`` (uint8) as an IDX file; ``.gz`` paths are gzip-compressed."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.tobytes()
    compress = path.suffix == ".gz" if compress is None else compress
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return path


def make_fmnist(root: Path, n_train: int = 64, n_test: int = 32, *, gz: bool = True) -> Path:
    """A tiny Fashion-MNIST directory: images whose mean brightness depends on the label, so a
    model can learn something in a couple of steps."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        images = rng.integers(0, 40, size=(n, 28, 28)) + labels[:, None, None] * 20
        write_idx(root / f"{split}-images-idx3-ubyte{suffix}", images.astype(np.uint8))
        write_idx(root / f"{split}-labels-idx1-ubyte{suffix}", labels)
    return root


def make_cifar(root: Path, name: str, n_per_file: int = 8) -> Path:
    """Tiny CIFAR-10/100 "python version" batches (Python 2 style pickles with bytes keys)."""
    rng = np.random.default_rng(1)
    if name == "cifar10":
        d = root / "cifar-10-batches-py"
        files, label_key, classes = (
            [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"],
            b"labels",
            10,
        )
    else:
        d = root / "cifar-100-python"
        files, label_key, classes = ["train", "test"], b"fine_labels", 100
    d.mkdir(parents=True, exist_ok=True)
    for f in files:
        batch = {
            b"data": rng.integers(0, 256, size=(n_per_file, 3072), dtype=np.uint8),
            label_key: [int(x) for x in rng.integers(0, classes, size=n_per_file)],
        }
        with open(d / f, "wb") as fh:
            pickle.dump(batch, fh, protocol=2)
    return d
