"""Fixtures for the harness tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from benchdata import make_fmnist


@pytest.fixture
def fmnist_dir(tmp_path: Path) -> Path:
    return make_fmnist(tmp_path / "fmnist")


@pytest.fixture(autouse=True)
def _no_env_data(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests choose their data explicitly; a developer's $ARTURO_DATA must not leak in."""
    monkeypatch.delenv("ARTURO_DATA", raising=False)


@pytest.fixture(scope="module")
def one_torch_thread():
    """The workloads' models are tiny: on a busy 2-core machine a second intra-op thread
    mostly waits, and these tests ran many times slower with it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
