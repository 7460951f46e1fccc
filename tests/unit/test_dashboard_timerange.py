"""The page's time ranges, refresh choices and chart buckets (pure functions)."""

from __future__ import annotations

import pytest

from dashboard import timerange
from dashboard.timerange import RangeError, TimeRange
from schemas import keys

T = 1_700_000_000_000 - 1_700_000_000_000 % 3_600_000  # an hour boundary


def test_relative_presets_end_now() -> None:
    r = timerange.relative("last 15m", T + 1234)
    assert (r.start_ms, r.end_ms, r.live) == (T + 1234 - 900_000, T + 1234, True)
    assert [timerange.relative(p, T).span_ms for p in timerange.PRESETS] == [
        300_000, 900_000, 3_600_000, 21_600_000, 86_400_000,
    ]  # fmt: skip
    with pytest.raises(RangeError, match="unknown range 'last 2y'"):
        timerange.relative("last 2y", T)


def test_absolute_ranges_parse_iso_and_epoch() -> None:
    r = timerange.absolute("2023-11-14T22:00", "2023-11-14T23:00:00+00:00")
    assert r.span_ms == 3_600_000 and not r.live
    assert timerange.absolute(str(T // 1000), str(T + 60_000)).span_ms == 60_000
    assert "2023-11-14 22:00:00" in r.label


@pytest.mark.parametrize(
    ("start", "end", "message"),
    [
        ("2023-11-14T23:00", "2023-11-14T22:00", "must end after it starts"),
        ("2023-11-14T22:00", "2023-11-14T22:00", "must end after it starts"),
        ("2023-11-01", "2023-11-14", "at most 3 days"),
        ("yesterday", "2023-11-14", "expected a time"),
    ],
)
def test_bad_absolute_ranges_are_one_sentence(start: str, end: str, message: str) -> None:
    with pytest.raises(RangeError, match=message) as err:
        timerange.absolute(start, end)
    assert "\n" not in str(err.value)


def test_refresh_choices_include_off() -> None:
    assert timerange.refresh_seconds("off") is None
    assert timerange.refresh_seconds("5s") == 5.0
    with pytest.raises(RangeError):
        timerange.refresh_seconds("7s")
    assert timerange.tick(T + 7_300, 5.0) == T + 5_000
    assert timerange.tick(T + 7_300, None) == T + 7_000


def test_short_ranges_read_10s_windows_and_long_ones_1m() -> None:
    short = timerange.relative("last 15m", T)
    long = timerange.relative("last 6h", T)
    assert timerange.pane_window(short) is keys.WINDOW_10S
    assert timerange.pane_window(long) is keys.WINDOW_1M


def test_pane_starts_cover_the_range() -> None:
    r = TimeRange(T + 5_000, T + 125_000, "x", False)
    assert timerange.pane_starts(r, keys.WINDOW_1M) == [T, T + 60_000, T + 120_000]
    exact = TimeRange(T, T + 120_000, "x", False)
    assert timerange.pane_starts(exact, keys.WINDOW_1M) == [T, T + 60_000]


@pytest.mark.parametrize("preset", list(timerange.PRESETS))
def test_buckets_bound_the_points(preset: str) -> None:
    r = timerange.relative(preset, T)
    window = timerange.pane_window(r)
    size = timerange.bucket_ms(r, window)
    assert size % window.size_ms == 0
    assert r.span_ms / size <= timerange.MAX_POINTS
    assert len(set(timerange.bucket_of(timerange.pane_starts(r, window), size))) <= (
        timerange.MAX_POINTS + 1
    )


def test_three_days_of_minutes_stay_bounded() -> None:
    r = timerange.checked(T, T + timerange.MAX_SPAN_MS)
    assert r.span_ms / timerange.bucket_ms(r, keys.WINDOW_1M) <= timerange.MAX_POINTS
