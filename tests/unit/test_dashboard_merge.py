"""Pure merging and windowing logic of the dashboard queries."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dashboard import queries
from pipeline import sketches
from schemas import keys
from schemas.events import EventKind

T0 = 1_700_000_040_000  # a minute boundary


def test_merge_aggs_adds_counts_and_takes_min_max() -> None:
    a = {"s1|temp": "2 3.5 6.25 1.0 2.5", "api|/x": "1 10 100 10 10 0 0 0 0 1 2"}
    b = {"s1|temp": "3 -1.5 2.0 -4 0.5", "api|/x": "4 8 16 2 2 0 0 0 0 4 0", "s2|hum": "1 1 1 1 1"}
    merged = queries.merge_aggs([a, b, {}])
    assert merged == {
        "s1|temp": {"n": 5.0, "sum": 2.0, "sq": 8.25, "min": -4.0, "max": 2.5},
        "api|/x": {
            "n": 5.0, "sum": 18.0, "sq": 116.0, "min": 2.0, "max": 10.0,
            "1xx": 0.0, "2xx": 0.0, "3xx": 0.0, "4xx": 0.0, "5xx": 5.0, "err": 2.0,
        },
        "s2|hum": {"n": 1.0, "sum": 1.0, "sq": 1.0, "min": 1.0, "max": 1.0},
    }  # fmt: skip
    assert a == {"s1|temp": "2 3.5 6.25 1.0 2.5", "api|/x": "1 10 100 10 10 0 0 0 0 1 2"}


def test_merge_aggs_of_parts_equals_aggregate_of_all_values() -> None:
    rng = np.random.default_rng(7)
    values = rng.normal(20, 5, 300)
    parts = np.array_split(values, 4)
    hashes = [
        {"e": keys.pack_stats([len(p), p.sum(), (p * p).sum(), p.min(), p.max()])} for p in parts
    ]
    stats = queries.merge_aggs(hashes)["e"]
    assert stats["n"] == 300
    assert stats["min"] == values.min() and stats["max"] == values.max()
    assert queries.mean_of(stats) == pytest.approx(values.mean(), rel=1e-12)
    assert queries.stddev_of(stats) == pytest.approx(values.std(), rel=1e-9)
    assert queries.mean_of({}) is None and queries.stddev_of({"n": 0.0}) is None


def test_merge_sketches_adds_buckets_and_keeps_quantiles_exact() -> None:
    rng = np.random.default_rng(3)
    values = rng.lognormal(3, 1, 2000)
    hashes = [
        {keys.field("all", str(c)): str(n) for c, n in sketches.sketch_of(p).items()}
        for p in np.array_split(values, 3)
    ]
    merged = queries.merge_sketches(hashes)
    assert merged == {"all": sketches.sketch_of(values)}
    assert sketches.quantiles(merged["all"]) == sketches.quantiles(sketches.sketch_of(values))


def test_merge_sketches_keeps_entities_apart() -> None:
    merged = queries.merge_sketches(
        [{"a|/r#5": "2", "b|/r#5": "1"}, {"a|/r#5": "3", "a|/r#9": "1"}]
    )
    assert merged == {"a|/r": {5: 5, 9: 1}, "b|/r": {5: 1}}


def test_count_of_sums_only_counts() -> None:
    h = {"temp": "4 80 1600 20 20", "hum": "6 1 1 0.1 9"}
    assert queries.count_of(h) == 10
    assert queries.count_of({}) == 0


def test_complete_window_starts() -> None:
    w = keys.WINDOW_10S
    assert queries.complete_window_starts(T0, w, 3) == [T0 - 30_000, T0 - 20_000, T0 - 10_000]
    # a window that ends after the cutoff is not complete
    assert queries.complete_window_starts(T0 + 9_999, w, 2) == [T0 - 20_000, T0 - 10_000]
    assert queries.complete_window_starts(T0 + 10_000, w, 2) == [T0 - 10_000, T0]


def test_hopping_panes_are_the_five_minutes_up_to_now() -> None:
    hop = keys.HOPPING_5M
    m = keys.WINDOW_1M.size_ms
    now = T0 + 12_345
    assert queries.hopping_pane_starts(hop, now) == [T0 - 4 * m, T0 - 3 * m, T0 - 2 * m, T0 - m, T0]
    assert queries.hopping_pane_starts(hop, T0) == queries.hopping_pane_starts(hop, now)
    assert queries.hopping_pane_starts(hop, T0 - 1)[-1] == T0 - m


def test_hopping_merge_of_panes_equals_tumbling_aggregate() -> None:
    # five 1-minute panes of one entity merge into the 5-minute window's statistics
    panes = [[1.0, 2.0], [], [10.0], [-3.0, 4.0, 5.0], [7.0]]
    hashes = [
        {"e": keys.pack_stats([len(p), sum(p), sum(x * x for x in p), min(p), max(p)])}
        for p in panes
        if p
    ]
    everything = [x for p in panes for x in p]
    stats = queries.merge_aggs(hashes)["e"]
    assert stats == {
        "n": 7.0,
        "sum": sum(everything),
        "sq": sum(x * x for x in everything),
        "min": -3.0,
        "max": 10.0,
    }


def test_events_per_second_counts_missing_windows_as_zero() -> None:
    w = keys.WINDOW_10S
    counts = {T0 - 30_000: 100, T0 - 20_000: 250, T0 - 10_000: 0, T0: 999}
    # the window starting at T0 ends after the cutoff: excluded
    assert queries.events_per_second(counts, w, T0 + 5_000, 3) == pytest.approx(350 / 30)
    assert queries.events_per_second(counts, w, T0 + 5_000, 1) == 0.0
    assert queries.events_per_second({}, w, T0, 3) == 0.0
    assert queries.events_per_second(counts, w, T0 + 10_000, 2) == pytest.approx(999 / 20)


def test_summarize_progress() -> None:
    p0 = {"offset": "9", "watermark": "1000", "max_event_time": "31000", "events": "7"}
    p0 |= {"late": "1", "dead": "2", "batches": "3", "updated_ms": "50"}
    p1 = {"offset": "4", "watermark": "4000", "max_event_time": "34000", "events": "5"}
    p1 |= {"late": "0", "dead": "1", "batches": "1", "updated_ms": "60"}
    s = queries.summarize_progress([p0, {}, p1])
    assert s == queries.KindProgress(
        partitions=2,
        events=12,
        late=1,
        dead=3,
        batches=4,
        max_event_time_ms=34000,
        watermark_ms=1000,
        frontier_ms=4000,
        updated_ms=60,
    )
    assert queries.summarize_progress([{}, {}]) == queries.KindProgress()


def test_kpis_combine_kinds_and_workers() -> None:
    sensor = queries.KindProgress(2, 10, 1, 2, 3, 50_000, 20_000, 21_000, 1)
    applog = queries.KindProgress(1, 5, 0, 1, 1, 60_000, 25_000, 25_000, 1)
    k = queries.Kpis(
        now_ms=100_000,
        progress={EventKind.SENSOR: sensor, EventKind.APPLOG: applog},
        events_per_s={EventKind.SENSOR: 2.5, EventKind.APPLOG: None},
        workers={
            "w1": {"durability_wait_p50_ms": 3.0, "durability_wait_p99_ms": 9.0},
            "w2": {"durability_wait_p50_ms": 4.0, "batches": 2.0},
        },
    )
    assert (k.events, k.late, k.dead) == (15, 1, 3)
    assert k.total_events_per_s == 2.5
    assert k.newest_event_ms == 60_000
    assert k.watermark_ms == 20_000 and k.watermark_lag_ms == 80_000
    assert (k.durability_p50_ms, k.durability_p99_ms) == (4.0, 9.0)
    assert not k.empty
    empty = queries.Kpis(0, {kind: queries.KindProgress() for kind in EventKind}, {})
    assert empty.empty and empty.watermark_lag_ms is None and empty.total_events_per_s is None
    assert empty.durability_p99_ms is None


def test_numeric_fields_skip_text() -> None:
    assert queries.numeric_fields({"a": "1.5", "host": "box-1", "n": "3"}) == {"a": 1.5, "n": 3.0}
    assert math.isnan(queries.numeric_fields({"x": "nan"})["x"])
