from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from benchdata import make_cifar, make_fmnist, write_idx

from arturo_bench import data as D
from arturo_bench.cli import main


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_roundtrip(tmp_path: Path, suffix: str) -> None:
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = write_idx(tmp_path / f"x-idx3-ubyte{suffix}", arr)
    np.testing.assert_array_equal(D.read_idx(path), arr)


def test_read_idx_rejects_bad_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(ValueError, match="not an IDX file"):
        D.read_idx(bad)
    short = write_idx(tmp_path / "short", np.zeros((4, 2), np.uint8))
    short.write_bytes(short.read_bytes()[:-1])
    with pytest.raises(ValueError, match="IDX header says"):
        D.read_idx(short)


@pytest.mark.parametrize("gz", [True, False])
def test_load_fashion_mnist(tmp_path: Path, gz: bool) -> None:
    root = make_fmnist(tmp_path / "f", n_train=20, n_test=10, gz=gz)
    ds = D.load_fashion_mnist(root)
    assert ds.train_x.shape == (20, 1, 28, 28) and ds.train_x.dtype == torch.uint8
    assert ds.test_y.tolist() == list(range(10))
    assert ds.num_classes == 10 and ds.source == str(root)


def test_data_dir_lookup_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env_dir = make_fmnist(tmp_path / "env" / "fashion-mnist", n_train=12, n_test=10)
    monkeypatch.setenv("ARTURO_DATA", str(tmp_path / "env"))  # sub-folder is found too
    assert D.load_fashion_mnist(None).source == str(env_dir)
    flag_dir = make_fmnist(tmp_path / "flag", n_train=14, n_test=10)
    assert len(D.load_fashion_mnist(flag_dir).train_y) == 14  # --data-dir wins over the env


def test_missing_fmnist_says_how_to_get_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(D, "DEBIAN_FMNIST", tmp_path / "no-debian")
    monkeypatch.setattr(D, "CACHE_FMNIST", tmp_path / "no-cache")
    with pytest.raises(D.DataNotFoundError) as err:
        D.load_fashion_mnist(None)
    msg = str(err.value)
    assert "apt-get install dataset-fashion-mnist" in msg
    assert "arturo-bench data fetch fashion-mnist" in msg
    assert str(tmp_path / "no-debian") in msg
    # One missing file is enough to refuse: no partial or synthetic data.
    root = make_fmnist(tmp_path / "partial")
    (root / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(D.DataNotFoundError, match=str(root)):
        D.load_fashion_mnist(root)


@pytest.mark.parametrize("name,classes", [("cifar10", 10), ("cifar100", 100)])
def test_load_cifar(tmp_path: Path, name: str, classes: int) -> None:
    d = make_cifar(tmp_path, name)
    ds = D.load_dataset(name, tmp_path)  # found in the standard sub-folder
    n_files = 5 if name == "cifar10" else 1
    assert ds.train_x.shape == (8 * n_files, 3, 32, 32) and ds.test_x.shape == (8, 3, 32, 32)
    assert ds.num_classes == classes and ds.source == str(d)
    # Rows are stored as R, G, B planes: the first 1024 bytes are the red plane.
    with open(d / ("test_batch" if name == "cifar10" else "test"), "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    np.testing.assert_array_equal(ds.test_x[0, 0].numpy().ravel(), raw[b"data"][0, :1024])


def test_missing_cifar_says_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(D.DataNotFoundError, match="cs.toronto.edu"):
        D.load_dataset("cifar10", tmp_path)
    with pytest.raises(D.DataNotFoundError, match="pass --data-dir"):
        D.load_dataset("cifar100", None)


def test_prepare_batch() -> None:
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    plain = D.prepare_batch("cifar10", x)
    # Offset (4, 4) is the centre crop of the padded image; no flip: plain normalisation.
    centre = torch.full((4, 2), 4)
    torch.testing.assert_close(D.prepare_batch("cifar10", x, crop=centre), plain)
    plain100 = D.prepare_batch("cifar100", x)
    flipped = D.prepare_batch("cifar100", x, crop=centre, flip=torch.tensor([True, False] * 2))
    torch.testing.assert_close(flipped[0], plain100[0].flip(2))
    torch.testing.assert_close(flipped[1], plain100[1])
    # A shift by 4 with zero padding: the first 4 columns are padding (0 before normalising).
    shifted = D.prepare_batch("cifar10", x, crop=torch.tensor([[4, 0]] * 4))
    mean, std = D.CIFAR_STATS["cifar10"]
    pad_value = (0 - torch.tensor(mean)) / torch.tensor(std)
    torch.testing.assert_close(shifted[:, :, :, 0], pad_value.view(1, 3, 1).expand(4, 3, 32))
    assert D.prepare_batch("fmnist", x[:, :1]).max() <= 1.0  # pixels/255 only


def test_fetch_verifies_checksums(tmp_path: Path) -> None:
    src = make_fmnist(tmp_path / "mirror")
    names = [p.name for p in sorted(src.iterdir())]
    good = {n: hashlib.md5((src / n).read_bytes()).hexdigest() for n in names}
    out = D.fetch_fashion_mnist(
        tmp_path / "dest", base_urls=[src.as_uri() + "/"], checksums=good, log=lambda s: None
    )
    assert D.load_fashion_mnist(out).train_x.shape[0] == 64
    bad = dict(good, **{names[0]: "0" * 32})
    with pytest.raises(D.DataNotFoundError, match="MD5") as err:
        D.fetch_fashion_mnist(
            tmp_path / "dest2", base_urls=[src.as_uri() + "/"], checksums=bad, log=lambda s: None
        )
    assert "apt-get install dataset-fashion-mnist" in str(err.value)
    assert not list((tmp_path / "dest2").glob("*.part"))  # nothing half-written is left


@pytest.mark.skipif(
    not D.DEBIAN_FMNIST.is_dir(), reason="needs Debian's dataset-fashion-mnist package"
)
def test_real_fashion_mnist_from_debian() -> None:
    ds = D.load_fashion_mnist(D.DEBIAN_FMNIST)
    assert ds.train_x.shape == (60000, 1, 28, 28) and ds.test_x.shape == (10000, 1, 28, 28)
    assert ds.train_y.bincount().tolist() == [6000] * 10
    assert ds.test_y.bincount().tolist() == [1000] * 10


# ----------------------------------------------------------------------------- damaged files
def test_damaged_idx_files_are_named(tmp_path: Path) -> None:
    good = write_idx(tmp_path / "good-idx1-ubyte.gz", np.arange(10, dtype=np.uint8))
    truncated = tmp_path / "truncated-idx1-ubyte.gz"
    truncated.write_bytes(good.read_bytes()[:-12])
    not_gzip = tmp_path / "plain-idx1-ubyte.gz"
    not_gzip.write_bytes(b"this is not gzip data at all")
    short_header = tmp_path / "short-idx3-ubyte"
    short_header.write_bytes(bytes([0, 0, 0x08, 3]) + b"\x00\x00\x00\x02")  # 3 dims, 1 given
    for path, problem in [
        (truncated, "not a complete gzip file"),
        (not_gzip, "not a complete gzip file"),
        (short_header, "IDX header cut short"),
    ]:
        with pytest.raises(D.DataFormatError, match=problem) as err:
            D.read_idx(path)
        assert str(path) in str(err.value)


def rewrite_labels(root: Path, split: str, labels: np.ndarray) -> Path:
    return write_idx(root / f"{split}-labels-idx1-ubyte.gz", labels)


def test_fmnist_labels_are_checked(
    tmp_path: Path, fmnist_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    labels = D.read_idx(fmnist_dir / "train-labels-idx1-ubyte.gz").copy()
    labels[5] = 12
    bad = rewrite_labels(fmnist_dir, "train", labels)
    with pytest.raises(D.DataFormatError, match=r"label 12 at index 5 is outside 0\.\.9") as err:
        D.load_fashion_mnist(fmnist_dir)
    assert str(bad) in str(err.value)
    assert main(["data", "info", "fmnist", "--data-dir", str(fmnist_dir)]) == 2  # not "ok"
    assert str(bad) in capsys.readouterr().err

    labels[5] = 9
    rewrite_labels(fmnist_dir, "train", labels)
    bad = rewrite_labels(fmnist_dir, "t10k", np.zeros(31, np.uint8))  # 32 test images
    with pytest.raises(D.DataFormatError, match="31 labels for the 32 images") as err:
        D.load_fashion_mnist(fmnist_dir)
    assert str(bad) in str(err.value)


def test_fmnist_image_shape_is_checked(tmp_path: Path) -> None:
    root = make_fmnist(tmp_path / "f", n_train=10, n_test=10)
    bad = write_idx(root / "train-images-idx3-ubyte.gz", np.zeros((10, 32, 32), np.uint8))
    with pytest.raises(D.DataFormatError, match="images of 28x28") as err:
        D.load_fashion_mnist(root)
    assert str(bad) in str(err.value)


def write_pickle(path: Path, obj: object) -> Path:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)
    return path


@pytest.mark.parametrize(
    "batch,problem",
    [
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, "label 10 at index 1"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, "1 labels for 2 images"),
        ({b"data": np.zeros((2, 1024), np.uint8), b"labels": [0, 1]}, "not 3072"),
        ({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, "uint8"),
        ({b"labels": [0, 1]}, "needs 'data'"),
        ([1, 2, 3], "not a CIFAR batch"),
    ],
)
def test_cifar_batches_are_checked(tmp_path: Path, batch: object, problem: str) -> None:
    d = make_cifar(tmp_path, "cifar10")
    bad = write_pickle(d / "data_batch_3", batch)
    with pytest.raises(D.DataFormatError, match=problem) as err:
        D.load_dataset("cifar10", tmp_path)
    assert str(bad) in str(err.value)


def test_truncated_cifar_batch_is_named(tmp_path: Path) -> None:
    d = make_cifar(tmp_path, "cifar100")
    (d / "test").write_bytes((d / "test").read_bytes()[:100])
    with pytest.raises(D.DataFormatError, match="not a readable pickle") as err:
        D.load_dataset("cifar100", tmp_path)
    assert str(d / "test") in str(err.value)


class _Payload:
    """Unpickling this opens (so creates) a file: code of the pickle's choosing runs."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (str(self.marker), "w"))


def test_planted_cifar_pickle_cannot_run_code(tmp_path: Path) -> None:
    d = make_cifar(tmp_path, "cifar10")
    marker = tmp_path / "payload-ran"
    planted = write_pickle(d / "data_batch_2", {b"data": _Payload(marker), b"labels": []})
    with open(planted, "rb") as f:  # the payload is real: plain pickle runs it
        pickle.load(f, encoding="bytes")
    assert marker.exists()
    marker.unlink()

    with pytest.raises(D.DataFormatError, match="refusing to load it") as err:
        D.load_dataset("cifar10", tmp_path)
    assert str(planted) in str(err.value) and "io.open" in str(err.value)
    assert not marker.exists()


def test_cifar_pickles_of_python3_protocols_still_load(tmp_path: Path) -> None:
    """The restricted unpickler admits what numpy arrays need under protocols 2 to 4."""
    d = make_cifar(tmp_path, "cifar10")
    images = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    for protocol in (2, 3, 4):
        with open(d / "test_batch", "wb") as f:
            pickle.dump({b"data": images, b"labels": [3, 4]}, f, protocol=protocol)
        ds = D.load_dataset("cifar10", tmp_path)
        np.testing.assert_array_equal(ds.test_x.reshape(2, 3072).numpy(), images)
        assert ds.test_y.tolist() == [3, 4]
