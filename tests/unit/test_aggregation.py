"""Batch aggregation against a naive per-event computation, and mergeability of batches."""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from typing import Any

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import aggregation
from schemas import keys, packed
from schemas import sketch as sketches
from schemas.events import AppLogEvent, SensorReading
from tests.unit.events import NOT_TIMED, applog_events, reading, sensor_readings

sensor_st = sensor_readings()
# few devices, windows and values: series with runs of equal readings
series_st = sensor_readings(
    devices=2,
    max_time_ms=25_000,
    values=st.sampled_from([0.0, 1.5, -2.0]) | st.floats(min_value=-1e3, max_value=1e3),
)
applog_st = applog_events


def naive_sensor(events: list[SensorReading]) -> dict[tuple[str, str, int, str], list[float]]:
    out: dict[tuple[str, str, int, str], list[float]] = defaultdict(list)
    for e in events:
        for w in keys.TUMBLING_WINDOWS:
            s = e.event_time - e.event_time % w.size_ms
            out[(w.name, keys.Dim.DEVICE, s, keys.entity(e.device_id, e.metric))].append(e.value)
            out[(w.name, keys.Dim.SITE, s, keys.entity(e.site, e.metric))].append(e.value)
            out[(w.name, keys.Dim.METRIC, s, e.metric)].append(e.value)
    return out


def rows(deltas: list[aggregation.WindowDelta]) -> dict[tuple[str, str, int, str], list[Any]]:
    return {
        (d.window.name, d.dim, d.start_ms, name): d.table.stats[i].tolist()
        for d in deltas
        for i, name in enumerate(d.names)
    }


def sketch_rows(
    deltas: list[aggregation.WindowDelta],
) -> dict[tuple[str, str, int, str], dict[int, int]]:
    out: dict[tuple[str, str, int, str], dict[int, int]] = {}
    for d in deltas:
        t = d.table
        for r, c, n in zip(t.row.tolist(), t.code.tolist(), t.count.tolist(), strict=True):
            out.setdefault((d.window.name, d.dim, d.start_ms, d.names[r]), {})[c] = n
    return out


@given(st.lists(sensor_st, min_size=1, max_size=60))
@settings(max_examples=150, deadline=None, suppress_health_check=NOT_TIMED)
def test_sensor_aggregates_match_naive(events: list[SensorReading]) -> None:
    deltas = aggregation.aggregate(aggregation.sensor_columns(events))
    got = rows(deltas)
    want = naive_sensor(events)
    assert got.keys() == want.keys()
    sks = sketch_rows(deltas)
    for k, vals in want.items():
        n, total, sq, lo, hi, repeats, first, last = got[k]
        assert n == len(vals)
        assert repeats == sum(a == b for a, b in itertools.pairwise(vals))
        assert (first, last) == (vals[0], vals[-1])
        assert math.isclose(total, math.fsum(vals), rel_tol=1e-9, abs_tol=1e-6)
        assert math.isclose(sq, math.fsum(v * v for v in vals), rel_tol=1e-9, abs_tol=1e-6)
        assert (lo, hi) == (min(vals), max(vals))
        assert sks[k] == sketches.sketch_of(vals)


@given(st.lists(applog_st, min_size=1, max_size=60))
@settings(max_examples=100, deadline=None, suppress_health_check=NOT_TIMED)
def test_applog_status_classes_and_errors(events: list[AppLogEvent]) -> None:
    got = rows(aggregation.aggregate(aggregation.applog_columns(events)))
    for w in keys.TUMBLING_WINDOWS:
        by_start: dict[int, list[AppLogEvent]] = defaultdict(list)
        for e in events:
            by_start[e.event_time - e.event_time % w.size_ms].append(e)
        for s, evs in by_start.items():
            r = got[(w.name, keys.Dim.FLEET, s, keys.FLEET_ENTITY)]
            assert r[0] == len(evs)
            classes = [sum(1 for e in evs if e.status_code // 100 == c) for c in range(1, 6)]
            assert r[5:10] == classes
            assert r[10] == sum(1 for e in evs if e.level == "ERROR")


@given(st.lists(series_st, min_size=2, max_size=60), st.integers(min_value=1, max_value=59))
@settings(max_examples=150, deadline=None, suppress_health_check=NOT_TIMED)
def test_split_batches_follow_to_the_whole(events: list[SensorReading], cut: int) -> None:
    """Two batches folded in order hold what one batch of their readings holds, the series
    statistics included (a run of equal readings across the cut counts once)."""
    cut = min(cut, len(events) - 1)
    whole = rows(aggregation.aggregate(aggregation.sensor_columns(events)))
    parts = [
        rows(aggregation.aggregate(aggregation.sensor_columns(events[:cut]))),
        rows(aggregation.aggregate(aggregation.sensor_columns(events[cut:]))),
    ]
    empty = np.zeros((1, packed.NF_SENSOR))
    empty[0, packed.MIN], empty[0, packed.MAX] = np.inf, -np.inf
    for k, stats in whole.items():
        acc = empty
        for p in parts:
            if k in p:
                acc = packed.follow(acc, np.array([p[k]]))
        got = acc[0].tolist()
        assert got[packed.COUNT] == stats[packed.COUNT]
        assert math.isclose(got[packed.SUM], stats[packed.SUM], rel_tol=1e-9, abs_tol=1e-6)
        exact = [packed.MIN, packed.MAX, packed.REPEATS, packed.FIRST, packed.LAST]
        assert [got[j] for j in exact] == [stats[j] for j in exact]


def test_empty_batch() -> None:
    assert aggregation.aggregate(aggregation.sensor_columns([])) == []


def test_a_plan_keeps_only_its_dimensions() -> None:
    events = [reading(t) for t in (0, 15_000, 70_000)]
    plan = ((keys.WINDOW_10S, (keys.Dim.METRIC,)), (keys.WINDOW_1M, (keys.Dim.DEVICE, "route")))
    got = {
        (d.window.name, d.dim, d.start_ms)
        for d in aggregation.aggregate(aggregation.sensor_columns(events), plan)
    }
    assert got == {
        ("10s", "metric", 0),
        ("10s", "metric", 10_000),
        ("10s", "metric", 70_000),
        ("1m", "device", 0),
        ("1m", "device", 60_000),
    }


@given(
    st.lists(st.tuples(st.integers(min_value=0, max_value=3), sensor_st), min_size=1, max_size=60)
)
@settings(max_examples=100, deadline=None, suppress_health_check=NOT_TIMED)
def test_partitions_aggregated_together_equal_each_alone(
    tagged: list[tuple[int, SensorReading]],
) -> None:
    by_part: dict[int, list[SensorReading]] = defaultdict(list)
    for p, e in tagged:
        by_part[p].append(e)
    parts = []
    for p, evs in sorted(by_part.items()):
        c = aggregation.sensor_columns(evs)
        c.partition = np.full(len(c), p, dtype=np.int64)
        parts.append(c)
    cols = aggregation.concat_columns(parts)
    together: dict[int, list[aggregation.WindowDelta]] = defaultdict(list)
    for d in aggregation.aggregate(cols):
        together[d.partition].append(d)
    for p, evs in by_part.items():
        alone = aggregation.aggregate(aggregation.sensor_columns(evs))
        assert rows(together[p]) == rows(alone)
        assert sketch_rows(together[p]) == sketch_rows(alone)


def _exact(deltas: list[aggregation.WindowDelta]) -> list[tuple[Any, ...]]:
    """Every delta as it is: identity, entities in order, statistics and buckets bit for bit."""
    return [
        (
            d.window.name,
            d.dim,
            d.start_ms,
            d.partition,
            d.names,
            d.table.stats.tobytes(),
            d.table.row.tolist(),
            d.table.code.tolist(),
            d.table.count.tolist(),
        )
        for d in deltas
    ]


@given(
    st.lists(st.tuples(st.integers(min_value=0, max_value=2), series_st), min_size=1, max_size=60),
    st.lists(st.tuples(st.integers(min_value=0, max_value=2), applog_st), min_size=1, max_size=60),
)
@settings(max_examples=100, deadline=None, suppress_health_check=NOT_TIMED)
def test_every_window_and_dimension_in_one_pass_equals_each_alone(
    sensor: list[tuple[int, SensorReading]], applog: list[tuple[int, AppLogEvent]]
) -> None:
    # one sort over every (window, dimension) pair: the same deltas, in the same order, with
    # the same float sums (each group's events are added in batch order either way)
    for cols in (
        aggregation.sensor_columns([e for _, e in sensor]),
        aggregation.applog_columns([e for _, e in applog]),
    ):
        cols.partition = np.array([p for p, _ in (sensor if cols.errors is None else applog)])
        plan = [(w, tuple(cols.entities)) for w in keys.TUMBLING_WINDOWS]
        alone = [
            d
            for w, dims in plan
            for dim in dims
            for d in aggregation.aggregate(cols, [(w, (dim,))])
        ]
        assert _exact(aggregation.aggregate(cols, plan)) == _exact(alone)
