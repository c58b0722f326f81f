"""The README's hyperparameter table shows the library's defaults of both modes of units."""

import re
from pathlib import Path

import pytest

from arturo.optimizer import DEFAULT_UNITS, PRESETS

README = Path(__file__).resolve().parents[1] / "README.md"
ROW = re.compile(r"^\| [^|]* \| `(\w+)` \| [^|]* \| ([^|]*) \| ([^|]*) \|$")


def table_defaults() -> dict[str, tuple[str, str]]:
    rows = {}
    for line in README.read_text(encoding="utf-8").splitlines():
        match = ROW.match(line)
        if match:
            rows[match[1]] = (match[2].strip(), match[3].strip())
    return rows


def test_the_table_shows_every_preset_value_of_both_units():
    rows = table_defaults()
    for name in PRESETS["relative"]:
        assert name in rows, f"README's table lacks {name}"
        for units, shown in zip(("relative", "absolute"), rows[name], strict=True):
            # Shown to 3-4 significant digits.
            assert float(shown) == pytest.approx(PRESETS[units][name], rel=2e-3), (name, units)


def test_the_table_names_the_default_units():
    assert table_defaults()["units"][0] == f'`"{DEFAULT_UNITS}"`'
