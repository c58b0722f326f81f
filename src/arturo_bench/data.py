"""Datasets held whole as tensors on the training device.

Fashion-MNIST is read from the original IDX files (``.gz`` or uncompressed); CIFAR-10/100 from
the standard "python version" pickle batches. There is no synthetic fallback: missing data is an
error that says how to get it.

Where data is looked for, first match wins:

1. ``--data-dir`` (only there, when given);
2. ``$ARTURO_DATA`` (only there, when set);
3. the defaults: Debian's ``/usr/share/datasets/fashion-mnist`` (package
   ``dataset-fashion-mnist``), then ``~/.cache/arturo-bench/fashion-mnist`` (where
   ``arturo-bench data fetch`` writes). CIFAR has no default.

In each directory the files may also sit in the usual sub-folder (``fashion-mnist/``,
``FashionMNIST/raw/``, ``cifar-10-batches-py/``, ``cifar-100-python/``).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import struct
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DataNotFoundError",
    "Dataset",
    "read_idx",
    "load_dataset",
    "load_fashion_mnist",
    "load_cifar",
    "fetch_fashion_mnist",
    "prepare_batch",
    "DATASETS",
]

DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist")
CACHE_FMNIST = Path("~/.cache/arturo-bench/fashion-mnist")

FMNIST_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
# MD5 of the official .gz files, as published by Zalando Research (and used by torchvision).
FMNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
FMNIST_URLS = (
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
)

# Normalisation published for each CIFAR variant (applied after augmentation).
CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.5074, 0.4867, 0.4411), (0.2011, 0.1987, 0.2025)),
}

_HOW_TO = {
    "fmnist": (
        "Get Fashion-MNIST with one of:\n"
        "  apt-get install dataset-fashion-mnist      (Debian/Ubuntu; files land in "
        "/usr/share/datasets/fashion-mnist)\n"
        "  arturo-bench data fetch fashion-mnist      (downloads the official files, checks MD5)\n"
        "  or download the four *-ubyte.gz files from "
        "https://github.com/zalandoresearch/fashion-mnist into a directory and pass "
        "--data-dir DIR (or set ARTURO_DATA=DIR)."
    ),
    "cifar10": (
        "Download the CIFAR-10 python version (cifar-10-python.tar.gz) from "
        "https://www.cs.toronto.edu/~kriz/cifar.html, extract it, and pass --data-dir DIR "
        "(or set ARTURO_DATA=DIR), where DIR holds cifar-10-batches-py/ or its files."
    ),
    "cifar100": (
        "Download the CIFAR-100 python version (cifar-100-python.tar.gz) from "
        "https://www.cs.toronto.edu/~kriz/cifar.html, extract it, and pass --data-dir DIR "
        "(or set ARTURO_DATA=DIR), where DIR holds cifar-100-python/ or its files."
    ),
}


class DataNotFoundError(FileNotFoundError):
    """A dataset is not where we looked; the message says where we looked and how to get it."""


@dataclass
class Dataset:
    """A whole dataset as uint8 image tensors (N, C, H, W) and int64 labels, on one device.

    Images stay uint8 until a batch is sliced: 4x less memory than float, and the conversion is
    fused with augmentation and normalisation in ``prepare_batch``."""

    name: str  # fmnist | cifar10 | cifar100
    train_x: Tensor  # uint8 (N, C, H, W)
    train_y: Tensor  # int64 (N,)
    test_x: Tensor  # uint8 (M, C, H, W)
    test_y: Tensor  # int64 (M,)
    num_classes: int  # number of labels
    source: str = ""  # directory the files were read from

    @property
    def in_channels(self) -> int:
        return int(self.train_x.shape[1])

    def to(self, device: torch.device | str) -> Dataset:
        return Dataset(
            self.name,
            self.train_x.to(device),
            self.train_y.to(device),
            self.test_x.to(device),
            self.test_y.to(device),
            self.num_classes,
            self.source,
        )

    def subset(self, train: int = 0, test: int = 0) -> Dataset:
        """A fixed random subset (same for every seed and optimizer): quick mode."""
        gen = torch.Generator().manual_seed(0)

        def pick(x: Tensor, y: Tensor, n: int) -> tuple[Tensor, Tensor]:
            if n <= 0 or n >= len(y):
                return x, y
            idx = torch.randperm(len(y), generator=gen)[:n].sort().values.to(y.device)
            return x[idx], y[idx]

        train_x, train_y = pick(self.train_x, self.train_y, train)
        test_x, test_y = pick(self.test_x, self.test_y, test)
        return Dataset(self.name, train_x, train_y, test_x, test_y, self.num_classes, self.source)


# ----------------------------------------------------------------------------- IDX
_IDX_DTYPES = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read one IDX file (``.gz`` is decompressed on the fly)."""
    path = Path(path)
    if path.suffix == ".gz":
        with gzip.open(path, "rb") as f:
            raw = f.read()
    else:
        raw = path.read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic number {raw[:4]!r})")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    body = raw[4 + 4 * ndim :]
    if len(body) != expected:
        raise ValueError(f"{path}: IDX header says {dims} ({expected} bytes), found {len(body)}")
    return np.frombuffer(body, dtype=dtype).reshape(dims)


def _candidate_dirs(
    data_dir: str | os.PathLike[str] | None, defaults: Sequence[Path]
) -> list[Path]:
    if data_dir is not None and str(data_dir) != "":
        return [Path(data_dir).expanduser()]
    env = os.environ.get("ARTURO_DATA")
    if env:
        return [Path(env).expanduser()]
    return [p.expanduser() for p in defaults]


def _find_fmnist_dir(data_dir: str | os.PathLike[str] | None) -> tuple[Path, dict[str, Path]]:
    roots = _candidate_dirs(data_dir, [DEBIAN_FMNIST, CACHE_FMNIST])
    looked: list[Path] = []
    for root in roots:
        for d in (root, root / "fashion-mnist", root / "FashionMNIST" / "raw"):
            looked.append(d)
            found: dict[str, Path] = {}
            for key, stem in FMNIST_FILES.items():
                for name in (stem + ".gz", stem):
                    if (d / name).is_file():
                        found[key] = d / name
                        break
            if len(found) == len(FMNIST_FILES):
                return d, found
    raise DataNotFoundError(_missing_message("fmnist", "Fashion-MNIST", looked))


def _missing_message(key: str, pretty: str, looked: Sequence[Path]) -> str:
    where = "\n".join(f"  {p}" for p in looked)
    return (
        f"{pretty} not found. Looked in (--data-dir, else $ARTURO_DATA, else the defaults):\n"
        f"{where}\n{_HOW_TO[key]}"
    )


def load_fashion_mnist(data_dir: str | os.PathLike[str] | None = None) -> Dataset:
    """Fashion-MNIST (60k train, 10k test, 1x28x28, 10 classes) from IDX files."""
    d, files = _find_fmnist_dir(data_dir)
    arrays = {key: read_idx(path) for key, path in files.items()}
    for split in ("train", "test"):
        x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise ValueError(f"{d}: {split} images {x.shape} do not match labels {y.shape}")
    return Dataset(
        name="fmnist",
        train_x=torch.from_numpy(arrays["train_x"].copy()).unsqueeze(1),
        train_y=torch.from_numpy(arrays["train_y"].astype(np.int64)),
        test_x=torch.from_numpy(arrays["test_x"].copy()).unsqueeze(1),
        test_y=torch.from_numpy(arrays["test_y"].astype(np.int64)),
        num_classes=10,
        source=str(d),
    )


# ----------------------------------------------------------------------------- CIFAR
_CIFAR_LAYOUT = {
    # name: (sub-folder, train files, test file, label key, classes)
    "cifar10": (
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        "test_batch",
        "labels",
        10,
    ),
    "cifar100": ("cifar-100-python", ["train"], "test", "fine_labels", 100),
}


def _unpickle(path: Path) -> dict[str, object]:
    with open(path, "rb") as f:
        # The official batches are Python 2 pickles with bytes keys.
        raw = pickle.load(f, encoding="bytes")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in raw.items()}


def load_cifar(name: str, data_dir: str | os.PathLike[str] | None = None) -> Dataset:
    """CIFAR-10 or CIFAR-100 (fine labels) from the python pickle batches."""
    sub, train_files, test_file, label_key, classes = _CIFAR_LAYOUT[name]
    looked: list[Path] = []
    for root in _candidate_dirs(data_dir, []):
        for d in (root, root / sub):
            looked.append(d)
            if all((d / f).is_file() for f in [*train_files, test_file]):
                return _read_cifar(name, d, train_files, test_file, label_key, classes)
    pretty = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}[name]
    if not looked:
        looked_msg = "  (no directory: CIFAR has no default location; pass --data-dir)"
        raise DataNotFoundError(
            f"{pretty} not found. Looked in (--data-dir, else $ARTURO_DATA):\n{looked_msg}\n"
            f"{_HOW_TO[name]}"
        )
    raise DataNotFoundError(_missing_message(name, pretty, looked))


def _read_cifar(
    name: str, d: Path, train_files: list[str], test_file: str, label_key: str, classes: int
) -> Dataset:
    def read(files: list[str]) -> tuple[Tensor, Tensor]:
        xs, ys = [], []
        for f in files:
            batch = _unpickle(d / f)
            data = np.asarray(batch["data"], dtype=np.uint8)
            xs.append(data.reshape(-1, 3, 32, 32))  # rows are R, G, B planes of 32x32
            ys.append(np.asarray(batch[label_key], dtype=np.int64))
        return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))

    train_x, train_y = read(train_files)
    test_x, test_y = read([test_file])
    return Dataset(name, train_x, train_y, test_x, test_y, classes, str(d))


DATASETS: dict[str, Callable[[str | os.PathLike[str] | None], Dataset]] = {
    "fmnist": load_fashion_mnist,
    "cifar10": lambda d: load_cifar("cifar10", d),
    "cifar100": lambda d: load_cifar("cifar100", d),
}


def load_dataset(name: str, data_dir: str | os.PathLike[str] | None = None) -> Dataset:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    return DATASETS[name](data_dir)


# ----------------------------------------------------------------------------- batches
def prepare_batch(
    name: str, x: Tensor, *, crop: Tensor | None = None, flip: Tensor | None = None
) -> Tensor:
    """uint8 images -> float inputs, on whatever device ``x`` is on.

    Fashion-MNIST: pixels/255, nothing else (as published). CIFAR: pixels/255, then, for
    training batches, a random 32x32 crop of the image padded by 4 (zeros for CIFAR-10, reflect
    for CIFAR-100) and a horizontal flip, then the published normalisation.

    ``crop`` (B, 2) holds each image's (row, col) offset in [0, 8]; ``flip`` (B,) is bool. They
    are drawn by the caller from a seeded generator so that augmentation is reproducible."""
    out = x.float().div_(255.0)
    if name not in CIFAR_STATS:
        return out
    if crop is not None:
        mode = "reflect" if name == "cifar100" else "constant"
        padded = torch.nn.functional.pad(out, (4, 4, 4, 4), mode=mode)
        b, c, h, w = out.shape
        rows = crop[:, 0, None] + torch.arange(h, device=x.device)  # (B, H)
        cols = crop[:, 1, None] + torch.arange(w, device=x.device)  # (B, W)
        batch_idx = torch.arange(b, device=x.device)[:, None, None, None]
        chan_idx = torch.arange(c, device=x.device)[None, :, None, None]
        out = padded[batch_idx, chan_idx, rows[:, None, :, None], cols[:, None, None, :]]
    if flip is not None:
        out = torch.where(flip[:, None, None, None], out.flip(3), out)
    mean_t, std_t = _stats_on(name, x.device)
    return out.sub_(mean_t).div_(std_t)


_STATS_CACHE: dict[tuple[str, torch.device], tuple[Tensor, Tensor]] = {}


def _stats_on(name: str, device: torch.device) -> tuple[Tensor, Tensor]:
    """Normalisation constants, copied to the device once (a per-batch copy would sync)."""
    key = (name, device)
    if key not in _STATS_CACHE:
        mean, std = CIFAR_STATS[name]
        _STATS_CACHE[key] = (
            torch.tensor(mean, device=device).view(1, 3, 1, 1),
            torch.tensor(std, device=device).view(1, 3, 1, 1),
        )
    return _STATS_CACHE[key]


# ----------------------------------------------------------------------------- fetch
def _md5(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_fashion_mnist(
    dest: str | os.PathLike[str] | None = None,
    *,
    base_urls: Sequence[str] = FMNIST_URLS,
    checksums: dict[str, str] | None = None,
    log: Callable[[str], None] = print,
    timeout: float = 60.0,
) -> Path:
    """Download the four official Fashion-MNIST files into ``dest`` and check their MD5.

    ``dest`` defaults to ``$ARTURO_DATA`` or ``~/.cache/arturo-bench/fashion-mnist``. Files
    already present with the right checksum are kept. Each download goes to a temporary name
    and is renamed only once verified, so an interrupted fetch leaves no half file behind."""
    checksums = FMNIST_MD5 if checksums is None else checksums
    if dest is None:
        dest = os.environ.get("ARTURO_DATA") or CACHE_FMNIST
    out = Path(dest).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    for name, md5 in checksums.items():
        target = out / name
        if target.is_file() and _md5(target) == md5:
            log(f"ok       {target} (already present, MD5 verified)")
            continue
        errors = []
        for base in base_urls:
            url = base + name
            tmp = target.with_name(target.name + ".part")
            try:
                log(f"download {url}")
                with urllib.request.urlopen(url, timeout=timeout) as resp, open(tmp, "wb") as f:
                    while chunk := resp.read(1 << 20):
                        f.write(chunk)
            except OSError as exc:
                tmp.unlink(missing_ok=True)
                errors.append(f"{url}: {exc}")
                continue
            got = _md5(tmp)
            if got != md5:
                tmp.unlink(missing_ok=True)
                errors.append(f"{url}: MD5 {got} != expected {md5}")
                continue
            os.replace(tmp, target)
            log(f"ok       {target} (MD5 verified)")
            break
        else:
            raise DataNotFoundError(
                f"could not download {name}:\n  "
                + "\n  ".join(errors)
                + "\nOffline? On Debian/Ubuntu: apt-get install dataset-fashion-mnist "
                "(no download needed; arturo-bench finds /usr/share/datasets/fashion-mnist)."
            )
    return out
