"""KPI tiles: thresholds, the level (and colour) a value reaches, and the tiles' HTML.

Pure functions: the page computes the figures (``dashboard.series.RangeKpis``), this module
decides how each one looks. A tile without a figure shows "–" in the neutral colour.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from enum import Enum
from typing import Final


class Level(Enum):
    """How a figure compares with its thresholds."""

    NONE = "none"  # no figure, or a figure without thresholds
    OK = "ok"
    WARN = "warn"
    CRIT = "crit"


COLOURS: Final[dict[Level, str]] = {
    Level.NONE: "#6b7280",  # grey
    Level.OK: "#16a34a",  # green
    Level.WARN: "#d97706",  # amber
    Level.CRIT: "#dc2626",  # red
}


@dataclass(frozen=True, slots=True)
class Threshold:
    """``warn`` and ``crit`` bounds; with ``below``, low values are the bad ones."""

    warn: float
    crit: float
    below: bool = False

    def __post_init__(self) -> None:
        ok = self.crit <= self.warn if self.below else self.warn <= self.crit
        if not ok:
            raise ValueError(f"a threshold's warn and crit are out of order: {self}")

    def level(self, value: float | None) -> Level:
        """The level ``value`` reaches (NONE for no value or NaN)."""
        if value is None or math.isnan(value):
            return Level.NONE
        if self.below:
            if value <= self.crit:
                return Level.CRIT
            return Level.WARN if value <= self.warn else Level.OK
        if value >= self.crit:
            return Level.CRIT
        return Level.WARN if value >= self.warn else Level.OK


@dataclass(frozen=True, slots=True)
class Tile:
    """One KPI tile: what it shows and how it looks."""

    label: str
    value: str
    level: Level = Level.NONE
    note: str = ""  # a small line under the value

    @property
    def colour(self) -> str:
        """The tile's colour."""
        return COLOURS[self.level]


def tiles_html(tiles: list[Tile]) -> str:
    """A row of coloured tiles (one ``<div>`` each), text escaped."""
    cells = []
    for t in tiles:
        note = f'<div style="font-size:0.75rem;opacity:0.85">{html.escape(t.note)}</div>'
        cells.append(
            f'<div class="pulse-tile pulse-{t.level.value}" style="flex:1;min-width:9rem;'
            f'background:{t.colour};color:white;border-radius:0.5rem;padding:0.5rem 0.75rem">'
            f'<div style="font-size:0.8rem">{html.escape(t.label)}</div>'
            f'<div style="font-size:1.6rem;font-weight:600">{html.escape(t.value)}</div>'
            f"{note if t.note else ''}</div>"
        )
    return f'<div style="display:flex;gap:0.5rem;flex-wrap:wrap">{"".join(cells)}</div>'


def number(x: float | None, fmt: str = "{:,.0f}") -> str:
    """A figure as text ("–" for none or NaN)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return fmt.format(x)


def percent(x: float | None) -> str:
    """A share as a percentage with two decimals ("–" for none)."""
    return "–" if x is None or math.isnan(x) else f"{x * 100:.2f} %"


def age(ms: int | None) -> str:
    """How long ago, as "N s ago", "N min ago" or "N h ago" ("–" for never)."""
    if ms is None:
        return "–"
    s = max(ms, 0) / 1000
    if s < 120:
        return f"{s:.0f} s ago"
    if s < 7200:
        return f"{s / 60:.0f} min ago"
    return f"{s / 3600:.1f} h ago"


def size(n: float | None) -> str:
    """Bytes as B, KiB, MiB or GiB ("–" for none)."""
    if n is None:
        return "–"
    if abs(n) < 1024:
        return f"{n:,.0f} B"
    for unit in ("KiB", "MiB"):
        n /= 1024
        if abs(n) < 1024:
            return f"{n:,.1f} {unit}"
    return f"{n / 1024:,.1f} GiB"
