"""Watermarks and late events: the rule is per event, in partition order, batch-independent."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline import windows

# Examples are checked, never timed: a loaded machine must not fail a test (no deadline, and
# no health check that times data generation).
NOT_TIMED = [HealthCheck.too_slow]


L = 30_000


def naive(times: list[int], max_seen: int | None) -> tuple[list[bool], int | None]:
    out = []
    for t in times:
        on_time = max_seen is None or t >= max_seen - L
        out.append(on_time)
        max_seen = t if max_seen is None else max(max_seen, t)
    return out, max_seen


times_st = st.lists(st.integers(min_value=0, max_value=10_000_000), max_size=200)


@given(times_st)
@settings(max_examples=300, deadline=None, suppress_health_check=NOT_TIMED)
def test_classify_matches_sequential_rule(times: list[int]) -> None:
    res = windows.classify(np.array(times, dtype=np.int64), windows.NO_EVENT_YET, L)
    want, max_seen = naive(times, None)
    assert res.on_time.tolist() == want
    assert res.max_event_time == (windows.NO_EVENT_YET if max_seen is None else max_seen)


@given(times_st, st.integers(min_value=0, max_value=200))
@settings(max_examples=300, deadline=None, suppress_health_check=NOT_TIMED)
def test_batch_boundaries_do_not_matter(times: list[int], cut: int) -> None:
    arr = np.array(times, dtype=np.int64)
    whole = windows.classify(arr, windows.NO_EVENT_YET, L)
    first = windows.classify(arr[:cut], windows.NO_EVENT_YET, L)
    second = windows.classify(arr[cut:], first.max_event_time, L)
    assert np.concatenate([first.on_time, second.on_time]).tolist() == whole.on_time.tolist()
    assert second.max_event_time == whole.max_event_time


def test_late_examples() -> None:
    t = np.array([100_000, 80_000, 69_999, 70_000, 200_000, 169_999], dtype=np.int64)
    res = windows.classify(t, windows.NO_EVENT_YET, L)
    assert res.on_time.tolist() == [True, True, False, True, True, False]
    # what each event was judged against: the partition's newest event time before it
    assert res.seen_before.tolist()[1:] == [100_000, 100_000, 100_000, 100_000, 200_000]
    assert windows.watermark(res.max_event_time, L) == 170_000
    assert windows.watermark(windows.NO_EVENT_YET, L) is None


def test_window_starts() -> None:
    assert windows.window_starts(np.array([0, 9_999, 10_000, 61_234]), 10_000).tolist() == [
        0,
        0,
        10_000,
        60_000,
    ]
