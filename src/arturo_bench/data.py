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

Every file is checked as it is read (gzip stream, IDX header and size, image shape, label
range, image and label counts); a damaged file raises :class:`DataFormatError` naming it. CIFAR
pickles are read with an unpickler that admits numpy arrays and plain containers only, so a
planted pickle cannot run code.
"""

from __future__ import annotations

import codecs
import dataclasses
import gzip
import hashlib
import os
import pickle
import struct
import urllib.request
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DataNotFoundError",
    "DataFormatError",
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


class DataFormatError(ValueError):
    """A data file is damaged, or not what its name promises; the message names the file."""


def _damaged(path: Path, problem: str) -> DataFormatError:
    return DataFormatError(
        f"{path}: {problem}. The file is damaged or not the dataset's: delete it and get it "
        "again (`arturo-bench data info` says where the data is looked for)"
    )


def _check_labels(path: Path, labels: np.ndarray, classes: int) -> None:
    """Labels outside [0, classes) would pass loading and crash (or mislead) training."""
    outside = np.flatnonzero((labels < 0) | (labels >= classes))
    if outside.size:
        i = int(outside[0])
        raise _damaged(
            path,
            f"label {labels[i]} at index {i} is outside 0..{classes - 1} "
            f"({outside.size} such labels)",
        )


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
    val_x: Tensor | None = None  # uint8 (V, C, H, W): held out of training (hold_out)
    val_y: Tensor | None = None  # int64 (V,)

    @property
    def in_channels(self) -> int:
        return int(self.train_x.shape[1])

    def to(self, device: torch.device | str) -> Dataset:
        return dataclasses.replace(
            self,
            train_x=self.train_x.to(device),
            train_y=self.train_y.to(device),
            test_x=self.test_x.to(device),
            test_y=self.test_y.to(device),
            val_x=None if self.val_x is None else self.val_x.to(device),
            val_y=None if self.val_y is None else self.val_y.to(device),
        )

    def hold_out(self, n: int) -> Dataset:
        """The last ``n`` training images as the validation split, the rest to train on
        (``n = 0``: unchanged). The same images for every seed and optimizer; taken before
        any subset, so a subset never draws from them."""
        if n <= 0:
            return self
        if self.val_y is not None:
            raise ValueError("this dataset already holds a validation split")
        if n >= len(self.train_y):
            raise ValueError(
                f"val_split {n} leaves nothing to train on: the training set has "
                f"{len(self.train_y)} images"
            )
        cut = len(self.train_y) - n
        return dataclasses.replace(
            self,
            train_x=self.train_x[:cut],
            train_y=self.train_y[:cut],
            val_x=self.train_x[cut:],
            val_y=self.train_y[cut:],
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
        return dataclasses.replace(
            self, train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y
        )


# ----------------------------------------------------------------------------- IDX
_IDX_DTYPES = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _read_maybe_gzip(path: Path) -> bytes:
    if path.suffix != ".gz":
        return path.read_bytes()
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:  # not gzip, truncated, corrupt
        raise _damaged(path, f"not a complete gzip file ({exc})") from None


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read one IDX file (``.gz`` is decompressed on the fly), checking its header and size."""
    path = Path(path)
    raw = _read_maybe_gzip(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise _damaged(path, f"not an IDX file (bad magic number {raw[:4]!r})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise _damaged(path, f"IDX header cut short ({ndim} dimensions, {len(raw)} bytes)")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    body = raw[header:]
    if len(body) != expected:
        raise _damaged(path, f"IDX header says {dims} ({expected} bytes), found {len(body)}")
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
        _check_fmnist_split(
            files[f"{split}_x"], arrays[f"{split}_x"], files[f"{split}_y"], arrays[f"{split}_y"]
        )
    return Dataset(
        name="fmnist",
        train_x=torch.from_numpy(arrays["train_x"].copy()).unsqueeze(1),
        train_y=torch.from_numpy(arrays["train_y"].astype(np.int64)),
        test_x=torch.from_numpy(arrays["test_x"].copy()).unsqueeze(1),
        test_y=torch.from_numpy(arrays["test_y"].astype(np.int64)),
        num_classes=10,
        source=str(d),
    )


def _check_fmnist_split(x_path: Path, x: np.ndarray, y_path: Path, y: np.ndarray) -> None:
    if x.dtype != np.uint8 or x.ndim != 3 or x.shape[1:] != (28, 28):
        raise _damaged(x_path, f"expected uint8 images of 28x28, found {x.dtype} {x.shape}")
    if y.dtype != np.uint8 or y.ndim != 1:
        raise _damaged(y_path, f"expected a list of uint8 labels, found {y.dtype} {y.shape}")
    if len(x) != len(y):
        raise _damaged(y_path, f"{len(y)} labels for the {len(x)} images of {x_path.name}")
    _check_labels(y_path, y, 10)


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


def _numpy_reconstruct() -> Callable[..., np.ndarray]:
    try:  # numpy >= 2 moved it; the official batches name the old place
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """How Python 3 writes bytes in a protocol-2 pickle (a batch re-saved with Python 3)."""
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"unexpected encoding {encoding!r}")
    return codecs.encode(text, encoding)


# The only globals an official CIFAR batch (a Python 2 pickle of numpy arrays, lists, dicts,
# strings and ints) asks for; containers and scalars need no lookup at all.
_CIFAR_GLOBALS: dict[tuple[str, str], Callable[[], Any]] = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("_codecs", "encode"): lambda: _latin1_encode,
}


class _UnsafePickleError(pickle.UnpicklingError):
    """The pickle asks for something a CIFAR batch never holds."""


class _CifarUnpickler(pickle.Unpickler):
    """Admits only ``_CIFAR_GLOBALS``. Plain ``pickle.load`` would call whatever a planted file
    names (``os.system``, say); here any other global is refused before it can be called."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = _CIFAR_GLOBALS.get((module, name))
        if allowed is None:
            raise _UnsafePickleError(f"{module}.{name}")
        return allowed()


def _unpickle(path: Path) -> dict[str, object]:
    try:
        with open(path, "rb") as f:
            # The official batches are Python 2 pickles with bytes keys.
            raw = _CifarUnpickler(f, encoding="bytes").load()
    except _UnsafePickleError as exc:
        raise DataFormatError(
            f"{path}: refusing to load it: the pickle asks for {exc}, which a CIFAR batch never "
            "holds (only numpy arrays, lists and dicts). The file may be malicious: do not "
            "load it with pickle elsewhere either; delete it and download CIFAR again"
        ) from None
    except Exception as exc:  # any other failure to parse it means the same: unusable
        raise _damaged(path, f"not a readable pickle ({type(exc).__name__}: {exc})") from None
    if not isinstance(raw, dict):
        raise _damaged(path, f"holds a {type(raw).__name__}, not a CIFAR batch (a dict)")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in raw.items()}


def _read_cifar_batch(path: Path, label_key: str, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 3, 32, 32) uint8 and labels (N,) int64 of one batch file, checked."""
    batch = _unpickle(path)
    if "data" not in batch or label_key not in batch:
        raise _damaged(path, f"a CIFAR batch needs 'data' and {label_key!r}, found {sorted(batch)}")
    data = batch["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise _damaged(path, "'data' is not a 2-d uint8 array")
    if data.shape[1] != 3 * 32 * 32:
        raise _damaged(path, f"'data' rows hold {data.shape[1]} bytes, not 3072 (3x32x32)")
    try:
        labels = np.asarray(batch[label_key])
    except ValueError:
        labels = np.asarray([])
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise _damaged(path, f"{label_key!r} is not a list of integers")
    if len(labels) != len(data):
        raise _damaged(path, f"{len(labels)} labels for {len(data)} images")
    _check_labels(path, labels, classes)
    # Rows are the R, G, B planes of 32x32 images.
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


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
        batches = [_read_cifar_batch(d / f, label_key, classes) for f in files]
        xs, ys = zip(*batches, strict=True)
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
