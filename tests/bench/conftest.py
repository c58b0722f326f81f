"""Fixtures for the harness tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from benchdata import make_fmnist


@pytest.fixture
def fmnist_dir(tmp_path: Path) -> Path:
    return make_fmnist(tmp_path / "fmnist")


@pytest.fixture(autouse=True)
def _no_env_data(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests choose their data explicitly; a developer's $ARTURO_DATA must not leak in."""
    monkeypatch.delenv("ARTURO_DATA", raising=False)
