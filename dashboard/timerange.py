"""The page's time range and refresh choices: presets, absolute ranges, buckets (no Streamlit).

A range is ``[start_ms, end_ms)`` in epoch ms. A relative preset ("last 1h") ends at the
refresh tick and moves with it; an absolute range is fixed. Charts read the window instances
(panes) overlapping the range: ``10s`` windows for short ranges, ``1m`` ones otherwise, and
merge consecutive panes into at most :data:`MAX_POINTS` buckets, so one refresh reads a bounded
number of keys whatever the range.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

from schemas import keys
from schemas.argtypes import parse_time
from schemas.keys import TumblingWindow

# label -> span (ms) of the relative presets, shortest first
PRESETS: Final[dict[str, int]] = {
    "last 5m": 5 * 60_000,
    "last 15m": 15 * 60_000,
    "last 1h": 60 * 60_000,
    "last 6h": 6 * 60 * 60_000,
    "last 24h": 24 * 60 * 60_000,
}
ABSOLUTE: Final = "absolute"
DEFAULT_PRESET: Final = "last 1h"
# label -> seconds between refreshes (None: off)
REFRESH: Final[dict[str, float | None]] = {
    "off": None,
    "2s": 2.0,
    "5s": 5.0,
    "10s": 10.0,
    "30s": 30.0,
    "1m": 60.0,
}
MAX_POINTS: Final = 240  # chart points per series, at most
MAX_SPAN_MS: Final = 3 * 24 * 60 * 60_000  # the 1m windows' default retention
SHORT_SPAN_MS: Final = 30 * 60_000  # up to this span the 10s windows are read
# bucket sizes (ms) a chart may use: whole multiples of the pane, "round" on a clock
_NICE_BUCKETS: Final = (
    10_000, 30_000, 60_000, 120_000, 300_000, 600_000, 900_000, 1_800_000, 3_600_000,
)  # fmt: skip


class RangeError(ValueError):
    """A range the page cannot show, in one sentence."""


@dataclass(frozen=True, slots=True)
class TimeRange:
    """``[start_ms, end_ms)``; ``live`` when it follows the clock (a relative preset)."""

    start_ms: int
    end_ms: int
    label: str
    live: bool

    @property
    def span_ms(self) -> int:
        """Length of the range."""
        return self.end_ms - self.start_ms

    @property
    def span_s(self) -> float:
        """Length of the range in seconds."""
        return self.span_ms / 1000.0


def relative(label: str, now_ms: int) -> TimeRange:
    """The preset ``label`` ending at ``now_ms``."""
    span = PRESETS.get(label)
    if span is None:
        raise RangeError(f"unknown range {label!r}; the ranges are {', '.join(PRESETS)}")
    return TimeRange(now_ms - span, now_ms, label, live=True)


def absolute(start_text: str, end_text: str) -> TimeRange:
    """A fixed range from two times (ISO 8601, UTC unless a zone is named, or epoch s/ms)."""
    try:
        start, end = parse_time(start_text), parse_time(end_text)
    except ValueError as exc:
        raise RangeError(str(exc)) from None
    return checked(start, end)


def checked(start_ms: int, end_ms: int) -> TimeRange:
    """A fixed range, refused in one sentence when empty, reversed or too long."""
    if end_ms <= start_ms:
        raise RangeError("the range must end after it starts")
    if end_ms - start_ms > MAX_SPAN_MS:
        raise RangeError(
            f"the range may span at most {MAX_SPAN_MS // 86_400_000} days (the store keeps "
            "1-minute windows that long)"
        )
    return TimeRange(start_ms, end_ms, f"{utc(start_ms)} – {utc(end_ms)}", live=False)


def utc(ms: int) -> str:
    """``YYYY-MM-DD HH:MM:SS`` in UTC."""
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%S")


def refresh_seconds(label: str) -> float | None:
    """Seconds between refreshes of the choice ``label`` (None: off)."""
    if label not in REFRESH:
        raise RangeError(f"unknown refresh {label!r}; the choices are {', '.join(REFRESH)}")
    return REFRESH[label]


def tick(now_ms: int, refresh_s: float | None) -> int:
    """``now_ms`` rounded down to the refresh tick (to the second when refresh is off)."""
    step = round((refresh_s or 1.0) * 1000)
    return now_ms - now_ms % max(step, 1)


def pane_window(r: TimeRange) -> TumblingWindow:
    """The tumbling window a chart of ``r`` reads: ``10s`` for short ranges, else ``1m``."""
    return keys.WINDOW_10S if r.span_ms <= SHORT_SPAN_MS else keys.WINDOW_1M


def pane_starts(r: TimeRange, window: TumblingWindow) -> list[int]:
    """Starts, oldest first, of the window instances overlapping ``r``."""
    first = keys.window_start(r.start_ms, window)
    last = keys.window_start(r.end_ms - 1, window)
    return list(range(first, last + 1, window.size_ms))


def bucket_ms(r: TimeRange, window: TumblingWindow, max_points: int = MAX_POINTS) -> int:
    """Width of a chart point: the smallest round multiple of the pane that keeps the points of
    ``r`` at or under ``max_points``."""
    need = math.ceil(r.span_ms / max_points)
    for size in _NICE_BUCKETS:
        if size >= window.size_ms and size % window.size_ms == 0 and size >= need:
            return size
    return math.ceil(need / window.size_ms) * window.size_ms


def bucket_of(starts: list[int], size_ms: int) -> list[int]:
    """The bucket start of each pane start (buckets aligned to the epoch)."""
    return [s - s % size_ms for s in starts]
