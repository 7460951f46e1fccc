"""KPI tiles: thresholds, levels, colours and the tiles' text (pure functions)."""

from __future__ import annotations

import math

import pytest

from dashboard.thresholds import (
    COLOURS,
    Level,
    Threshold,
    Tile,
    age,
    number,
    percent,
    size,
    tiles_html,
)


def test_levels_of_a_rising_threshold() -> None:
    t = Threshold(warn=0.02, crit=0.05)
    assert [t.level(x) for x in (0.0, 0.019, 0.02, 0.049, 0.05, 1.0)] == [
        Level.OK, Level.OK, Level.WARN, Level.WARN, Level.CRIT, Level.CRIT,
    ]  # fmt: skip
    assert t.level(None) is Level.NONE and t.level(math.nan) is Level.NONE


def test_levels_of_a_falling_threshold() -> None:
    t = Threshold(warn=10, crit=1, below=True)
    assert [t.level(x) for x in (100, 10, 5, 1, 0)] == [
        Level.OK, Level.WARN, Level.WARN, Level.CRIT, Level.CRIT,
    ]  # fmt: skip


def test_thresholds_out_of_order_are_refused() -> None:
    with pytest.raises(ValueError, match="out of order"):
        Threshold(warn=5, crit=1)
    with pytest.raises(ValueError, match="out of order"):
        Threshold(warn=1, crit=5, below=True)


def test_tiles_carry_their_colour_and_escape_text() -> None:
    html = tiles_html([Tile("Error <rate>", "7.00 %", Level.CRIT, "a & b"), Tile("x", "–")])
    assert COLOURS[Level.CRIT] in html and COLOURS[Level.NONE] in html
    assert "Error &lt;rate&gt;" in html and "a &amp; b" in html
    assert html.count('class="pulse-tile') == 2 and "pulse-crit" in html


def test_figures_as_text() -> None:
    assert number(None) == "–" and number(math.nan) == "–" and number(12345.6) == "12,346"
    assert percent(0.0123) == "1.23 %" and percent(None) == "–"
    assert age(None) == "–" and age(4_400) == "4 s ago" and age(-50) == "0 s ago"
    assert age(600_000) == "10 min ago" and age(4 * 3_600_000) == "4.0 h ago"


def test_sizes() -> None:
    assert size(None) == "–" and size(512) == "512 B" and size(2048) == "2.0 KiB"
    assert size(5 * 1024**2) == "5.0 MiB" and size(3 * 1024**3) == "3.0 GiB"
