"""Pure parts of the benchmark cases: freshness latencies, reads segments, write cost."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from pulse_bench.cases.freshness import (
    measured_span,
    p99_by_second,
    paced_cost,
    settle_seconds,
    visibility_latencies,
)
from pulse_bench.cases.pipeline_case import detection_cpu_ratio, detection_ratio
from pulse_bench.cases.reads import (
    MINUTE_MS,
    READ_PHASE_MS,
    SEED_LATENESS_MS,
    plan_segments,
    reading_time,
)
from pulse_bench.cases.write_cost import per_event
from pulse_bench.procs import Progress


def test_visibility_is_the_first_poll_reaching_the_offset() -> None:
    tp = ("sensor", 0)
    sends = {tp: [10.0, 10.0, 10.5]}  # offsets 5, 6, 7 (base 5)
    polls = [(10.1, {tp: 4}), (10.2, {tp: 6}), (10.4, {tp: 6}), (10.9, {tp: 7})]
    sent, lat = visibility_latencies(sends, {tp: 5}, polls)
    assert lat.tolist() == pytest.approx([0.2, 0.2, 0.4])
    assert sent.tolist() == [10.0, 10.0, 10.5]


def test_paced_cost_is_per_event_and_skips_a_rewritten_aof() -> None:
    store = {"cpu_s": 0.5, "aof_bytes": 40_000, "replica_aof_bytes": 39_000}
    cost = paced_cost(1_000, 2.0, store)
    assert cost == {
        "worker_cpu_us_per_event": 2_000.0,
        "store_cpu_us_per_event": 500.0,
        "aof_bytes_per_event": 40.0,
        "replica_aof_bytes_per_event": 39.0,
    }
    rewritten = paced_cost(1_000, 2.0, {"cpu_s": 0.5, "aof_rewritten": True})
    assert "aof_bytes_per_event" not in rewritten and "replica_aof_bytes_per_event" not in rewritten


def test_visibility_skips_records_never_seen() -> None:
    tp = ("applog", 3)
    sent, lat = visibility_latencies({tp: [1.0, 2.0]}, {}, [(1.5, {tp: 0})])
    assert lat.tolist() == pytest.approx([0.5]) and sent.tolist() == [1.0]


def test_the_p99_per_second_shows_a_stall() -> None:
    sent = np.repeat([100.0, 101.0, 102.0], 100) + np.tile(np.linspace(0, 0.99, 100), 3)
    lat = np.full(300, 0.1)
    lat[100:110] = 0.9  # a stall in the second second
    assert p99_by_second(sent, lat) == pytest.approx([0.1, 0.9, 0.1])
    assert p99_by_second(np.empty(0), np.empty(0)) == []


def test_the_measured_span_starts_after_the_settling_span() -> None:
    # the default settling: the worker's lateness and one 10 s window (the first paced
    # window has closed before anything is measured); an explicit one wins, never negative
    assert settle_seconds(None, 30.0) == 40.0 and settle_seconds(None, 0.0) == 10.0
    assert settle_seconds(5.0, 30.0) == 5.0 and settle_seconds(-1.0, 30.0) == 0.0
    sent = np.array([100.0, 120.0, 139.9, 140.0, 141.5, 150.0])
    lat = np.array([0.9, 0.8, 0.7, 0.1, 0.2, 0.3])
    s, la = measured_span(sent, lat, 100.0, 40.0)
    assert s.tolist() == [140.0, 141.5, 150.0] and la.tolist() == [0.1, 0.2, 0.3]
    s, la = measured_span(sent, lat, 100.0, 0.0)
    assert s.tolist() == sent.tolist() and la.tolist() == lat.tolist()


def test_detection_ratio_ignores_one_stray_drain_on_either_side() -> None:
    on, off = [80.0, 82.0, 78.0, 81.0], [100.0, 101.0, 99.0]
    assert detection_ratio(on, off) == pytest.approx(80.5 / 100.0)
    # one drain slowed by a neighbour moves neither median
    assert detection_ratio([80.0, 82.0, 40.0, 81.0], off) == detection_ratio(on, off)
    assert detection_ratio(on, [100.0, 60.0, 99.0]) == pytest.approx(80.5 / 99.0)
    assert detection_ratio([90.0], [100.0]) == pytest.approx(0.9)


def test_detection_cpu_ratio_is_events_per_cpu_second() -> None:
    # 10 µs per event with detection, 8 without: 0.8 of the events per CPU second
    assert detection_cpu_ratio([10.0, 10.0, 30.0, 10.0], [8.0, 8.0, 4.0]) == pytest.approx(0.8)
    assert detection_cpu_ratio([10.0, None], [8.0]) is None
    assert detection_cpu_ratio([10.0], [0.0]) is None


def test_progress_counts_applied_records() -> None:
    prog = Progress(0.0, {("sensor", 0): 9, ("sensor", 1): -1}, {})
    ends = {("sensor", 0): 10, ("sensor", 1): 5, ("applog", 0): 0}
    assert prog.applied_records(ends) == 10
    assert not prog.caught_up(ends)
    prog.offsets[("sensor", 1)] = 4
    assert prog.caught_up(ends) and prog.applied_records(ends) == 15


def test_segments_cover_the_day_once_with_the_right_shapes() -> None:
    end = 1_700_000_000_000 + 30_000
    segs = plan_segments(end, 1440, 60, 6000, 100, 10, 6 * 3600 * 1000)
    minutes = [s.start_ms + i * MINUTE_MS for s in segs for i in range(s.minutes)]
    assert len(minutes) == 1440 == len(set(minutes))
    assert minutes == sorted(minutes) and minutes[-1] == end - end % MINUTE_MS
    assert all(s.minutes <= 60 for s in segs)
    hot = [m for s in segs if s.per_minute == 6000 for m in range(s.minutes)]
    assert len(hot) == 60
    assert sum(s.minutes for s in segs if s.device_dim) == 10
    # 10 s windows only in the minutes overlapping the last 6 h (the oldest one partly)
    assert sum(s.minutes for s in segs if s.ten_second) == 361
    assert all(s.per_minute == 6000 for s in segs if s.device_dim)


@pytest.mark.parametrize("second", [0, 14, 15, 16, 30, 59])
def test_panels_read_at_a_fixed_phase_with_the_minute_before_still_open(second: int) -> None:
    now = 1_700_000_040_000 + second * 1000 + 123
    at = reading_time(now)
    assert at <= now and now - at < MINUTE_MS and at % MINUTE_MS == READ_PHASE_MS
    assert at - SEED_LATENESS_MS < at - at % MINUTE_MS  # the watermark is in the minute before


def test_write_cost_per_event_subtracts_polls() -> None:
    store: dict[str, Any] = {
        "commands": 1300,
        "cpu_s": 0.002,
        "aof_bytes": 5000,
        "replica_aof_bytes": 4000,
        "by_command": {"fcall": {"calls": 2, "usec": 900}, "hincrby": {"calls": 800, "usec": 400}},
    }
    result: dict[str, Any] = {"round_trips": 30, "client_commands": 60, "store": store}
    got = per_event(result, 100, poll_commands=300)
    assert got.pop("store_us_per_event_by_command") == {"fcall": 9.0, "hincrby": 4.0}
    assert got.pop("store_calls_per_event_by_command") == {"fcall": 0.02, "hincrby": 8.0}
    assert got == pytest.approx(
        {
            "events": 100,
            "round_trips_per_event": 0.3,
            "client_commands_per_event": 0.6,
            "store_commands_per_event": 10.0,
            "aof_bytes_per_event": 50.0,
            "replica_aof_bytes_per_event": 40.0,
            "store_cpu_us_per_event": 20.0,
        }
    )


def test_write_cost_leaves_out_aof_bytes_after_a_rewrite() -> None:
    store = {"commands": 10, "aof_rewritten": True}
    got = per_event({"round_trips": 1, "client_commands": 1, "store": store}, 10)
    assert got["aof_rewritten_during_run"] is True
    assert "aof_bytes_per_event" not in got
