"""Pure merging, roll-up and windowing logic of the dashboard queries, against naive computation.

Window values are built here from raw values (statistics and ``sketch_of`` buckets per row), so
every merged statistic and quantile can be compared with the same numbers computed over the
union of the raw values.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt
import pytest

from dashboard import queries
from schemas import keys, packed
from schemas import sketch as sketches
from schemas.events import EventKind

T0 = 1_700_000_040_000  # a minute boundary
F64 = npt.NDArray[np.float64]


def table_of(
    rows: Sequence[Sequence[float]], extra: Sequence[Sequence[float]] = ()
) -> packed.Table:
    """One packed row per value list: statistics and sketch, plus applog counters ``extra``."""
    stats: list[list[float]] = []
    b_row: list[int] = []
    b_code: list[int] = []
    b_count: list[int] = []
    for i, values in enumerate(rows):
        v = np.asarray(values, dtype=np.float64)
        # sensor values hold their series statistics, applog values their counters
        more = extra[i] if extra else (float(np.count_nonzero(v[1:] == v[:-1])), v[0], v[-1])
        stats.append([v.size, v.sum(), (v * v).sum(), v.min(), v.max(), *more])
        for code, n in sketches.sketch_of(v).items():
            b_row.append(i)
            b_code.append(code)
            b_count.append(n)
    nf = packed.NF_APPLOG if extra else packed.NF_SENSOR
    return packed.from_values(
        np.asarray(stats, dtype=np.float64).reshape(len(rows), nf),
        np.asarray(b_row, dtype=np.int64),
        np.asarray(b_code, dtype=np.int64),
        np.asarray(b_count, dtype=np.int64),
    )


def naive_stats(values: Sequence[float]) -> list[float]:
    v = np.asarray(values, dtype=np.float64)
    return [float(v.size), float(v.sum()), float((v * v).sum()), float(v.min()), float(v.max())]


def sketch_dict(table: packed.Table, row: int) -> dict[int, int]:
    sel = table.row == row
    return dict(zip(table.code[sel].tolist(), table.count[sel].tolist(), strict=True))


def test_merge_by_equals_aggregate_of_all_values() -> None:
    """Entities over partitions and panes merge into the statistics of all their values."""
    rng = np.random.default_rng(7)
    ents = ["s1|temp", "s2|temp", "s1|hum", "s3|co2"]
    raw: dict[tuple[int, str], list[float]] = {}
    rows: list[list[float]] = []
    names: list[str] = []
    panes: list[int] = []
    for pane in range(3):
        for _part in range(4):
            for ent in rng.permutation(ents)[: rng.integers(1, len(ents) + 1)].tolist():
                values = rng.lognormal(3, 1, int(rng.integers(1, 40))).round(2).tolist()
                raw.setdefault((pane, ent), []).extend(values)
                rows.append(values)
                names.append(ent)
                panes.append(pane)
    table = table_of(rows)
    pane_of, name_of, merged = queries.merge_by(table, names, np.asarray(panes))
    assert merged.rows == len(raw) == len(pane_of) == len(name_of)
    assert pane_of.tolist() == sorted(pane_of.tolist())
    qs = (0.5, 0.9, 0.99)
    got_q = packed.quantiles(merged, qs)
    for i, (pane, ent) in enumerate(zip(pane_of.tolist(), name_of.tolist(), strict=True)):
        values = raw[(pane, ent)]
        want = naive_stats(values)
        assert merged.stats[i, [0, 3, 4]].tolist() == [want[0], want[3], want[4]]
        assert merged.stats[i, 1:3].tolist() == pytest.approx(want[1:3], rel=1e-12)
        assert sketch_dict(merged, i) == sketches.sketch_of(values)
        assert got_q[i].tolist() == pytest.approx(
            sketches.quantiles(sketches.sketch_of(values), qs)
        )
        assert queries.means(merged)[i] == pytest.approx(np.mean(values), rel=1e-12)
        assert queries.stddevs(merged)[i] == pytest.approx(np.std(values), rel=1e-9)
    # without panes: one row per entity, in order of first appearance
    _, by_name, all_panes = queries.merge_by(table, names)
    assert by_name.tolist() == list(dict.fromkeys(names))
    for i, ent in enumerate(by_name.tolist()):
        values = [x for (_, e), v in raw.items() if e == ent for x in v]
        assert all_panes.stats[i, 0] == len(values)
        assert sketch_dict(all_panes, i) == sketches.sketch_of(values)


def test_merge_by_adds_applog_counters_and_keeps_entities_apart() -> None:
    extra_a = [0, 1, 0, 0, 1, 2]  # 1xx..5xx, err
    extra_b = [0, 3, 0, 1, 0, 0]
    table = table_of([[10.0], [20.0, 30.0, 40.0], [5.0, 5.0]], [extra_a, extra_b, extra_b])
    _, names, merged = queries.merge_by(table, ["api|/x", "api|/x", "web|/"])
    assert names.tolist() == ["api|/x", "web|/"]
    assert merged.stats[0].tolist() == [4, 100, 3000, 10, 40, 0, 4, 0, 1, 1, 2]
    assert merged.stats[1].tolist() == [2, 10, 50, 5, 5, *extra_b]
    assert sketch_dict(merged, 1) == sketches.sketch_of([5.0, 5.0])


def test_merge_by_of_nothing() -> None:
    pane, names, merged = queries.merge_by(packed.Table.empty(packed.NF_APPLOG), [])
    assert pane.size == 0 and names.size == 0
    assert (merged.rows, merged.nf) == (0, packed.NF_APPLOG)
    assert queries.means(merged).size == 0


def test_means_and_stddevs_of_empty_rows_are_nan() -> None:
    t = packed.Table(
        np.array([[0, 0, 0, np.inf, -np.inf], [2, 4, 10, 1, 3]], dtype=np.float64),
        *(np.zeros(0, dtype=np.int64) for _ in range(3)),
    )
    assert math.isnan(queries.means(t)[0]) and queries.means(t)[1] == 2.0
    assert math.isnan(queries.stddevs(t)[0]) and queries.stddevs(t)[1] == 1.0


def test_concat_keeps_rows_and_buckets() -> None:
    a, b = table_of([[1.0, 2.0], [3.0]]), table_of([[100.0]])
    both = queries.concat([a, b], packed.NF_SENSOR)
    assert both.rows == 3
    assert both.stats[2, : packed.NF_BASE].tolist() == [1, 100, 10_000, 100, 100]
    assert sketch_dict(both, 2) == sketches.sketch_of([100.0])
    assert sketch_dict(both, 0) == sketches.sketch_of([1.0, 2.0])
    assert queries.concat([], packed.NF_APPLOG).nf == packed.NF_APPLOG


def _hashes(
    parts: Sequence[Mapping[str, Sequence[float]]], nf: int = packed.NF_SENSOR
) -> list[dict[bytes, bytes]]:
    """HGETALL replies of window hashes holding ``{entity: values}``, encoded as the worker does."""
    out: list[dict[bytes, bytes]] = []
    for h in parts:
        extra = [[0.0] * (nf - packed.NF_BASE) for _ in h] if nf == packed.NF_APPLOG else ()
        values = packed.encode(table_of(list(h.values()), extra)) if h else []
        out.append({k.encode(): v for k, v in zip(h, values, strict=True)})
    return out


def test_panes_of_hashes_merges_partitions_per_pane() -> None:
    # two panes x three partitions; partition 1 is missing in pane 0, pane 1 is all empty
    hashes = _hashes(
        [
            {"temp": [1.0, 2.0], "hum": [50.0]},
            {},
            {"temp": [3.0]},
            {},
            {},
            {},
            {"hum": [40.0, 60.0]},
            {"hum": [45.0]},
            {"temp": [-1.0], "co2": [400.0]},
        ]
    )
    panes = queries.panes_of_hashes(hashes, 3, packed.NF_SENSOR)
    assert len(panes) == 3
    p0, p1, p2 = panes
    assert p0.names.tolist() == ["temp", "hum"]
    assert p0.table.stats[:, : packed.NF_BASE].tolist() == [
        naive_stats([1.0, 2.0, 3.0]),
        naive_stats([50.0]),
    ]
    assert sketch_dict(p0.table, 0) == sketches.sketch_of([1.0, 2.0, 3.0])
    assert p1.table.rows == 0 and p1.names.size == 0
    assert sorted(p2.names.tolist()) == ["co2", "hum", "temp"]
    hum = p2.names.tolist().index("hum")
    assert p2.table.stats[hum, : packed.NF_BASE].tolist() == naive_stats([40.0, 60.0, 45.0])
    assert sketch_dict(p2.table, hum) == sketches.sketch_of([40.0, 60.0, 45.0])
    # cached panes are shared between sessions: read-only
    with pytest.raises(ValueError):
        p0.table.stats[0, 0] = 1.0
    assert queries.panes_of_hashes([{}, {}], 2, packed.NF_APPLOG)[0].table.nf == packed.NF_APPLOG
    assert queries.panes_of_hashes([], 0, packed.NF_SENSOR) == []


def test_panes_of_hashes_without_sketches_keep_the_statistics() -> None:
    parts = [{"all": [5.0, 700.0, 3.5]}, {"all": [9.0]}, {}, {"all": [1.0, 1.0]}]
    hashes = _hashes(parts, packed.NF_APPLOG)
    whole = queries.panes_of_hashes(hashes, 2, packed.NF_APPLOG)
    bare = queries.panes_of_hashes(hashes, 2, packed.NF_APPLOG, sketch=False)
    for w, b in zip(whole, bare, strict=True):
        assert b.names.tolist() == w.names.tolist() == ["all"]
        np.testing.assert_array_equal(b.table.stats, w.table.stats)
        assert b.table.code.size == 0 and w.table.code.size > 0
    assert queries.pane_counts(bare).tolist() == [4, 2]


def test_malformed_value_raises() -> None:
    with pytest.raises(packed.PackedError):
        queries.panes_of_hashes([{b"all": b"12 0 0 0 0"}], 1, packed.NF_APPLOG)


def test_hopping_merge_of_panes_equals_tumbling_aggregate() -> None:
    # five 1-minute panes of one entity (and another) merge into the 5-minute window
    panes_values = [[1.0, 2.0], [], [10.0], [-3.0, 4.0, 5.0], [7.0]]
    nf = packed.NF_SENSOR
    panes = [
        queries.panes_of_hashes(_hashes([{"e": v, "f": [0.5]} if v else {}]), 1, nf)[0]
        for v in panes_values
    ]
    merged = queries.merge_panes(panes, packed.NF_SENSOR)
    everything = [x for p in panes_values for x in p]
    assert merged.names.tolist() == ["e", "f"]
    assert merged.table.stats[0, : packed.NF_BASE].tolist() == naive_stats(everything)
    assert merged.table.stats[1, : packed.NF_BASE].tolist() == naive_stats([0.5] * 4)
    assert sketch_dict(merged.table, 0) == sketches.sketch_of(everything)
    assert queries.pane_counts(panes).tolist() == [3, 0, 2, 4, 2]
    assert queries.pane_counts([]).size == 0
    empty = queries.merge_panes([], packed.NF_APPLOG)
    assert empty.table.rows == 0 and empty.table.nf == packed.NF_APPLOG


def test_stack_panes_numbers_rows_by_pane() -> None:
    panes = queries.panes_of_hashes(
        _hashes([{"a": [1.0]}, {}, {"b": [2.0], "a": [3.0]}]), 1, packed.NF_SENSOR
    )
    pane, names, table = queries.stack_panes(panes, packed.NF_SENSOR)
    assert pane.tolist() == [0, 2, 2]
    # within a pane, entities come in order of their first appearance in any pane
    assert names.tolist() == ["a", "a", "b"]
    assert table.stats[:, 1].tolist() == [1.0, 3.0, 2.0]
    assert sketch_dict(table, 1) == sketches.sketch_of([3.0])


def _naive_top(first: F64, second: F64, tie: Sequence[str], limit: int) -> list[int]:
    def key(i: int) -> tuple[float, float, str]:
        a = -math.inf if math.isnan(first[i]) else first[i]
        b = -math.inf if math.isnan(second[i]) else second[i]
        return (-a, -b, tie[i])

    return sorted(range(first.size), key=key)[:limit]


@pytest.mark.parametrize("limit", [1, 3, 10, 50])
def test_top_rows_keeps_every_candidate_of_the_full_sort(limit: int) -> None:
    rng = np.random.default_rng(limit)
    first = rng.choice([1.0, 2.0, 3.0, np.nan], 40)
    second = rng.choice([0.0, 0.5, 1.0], 40)
    tie = [f"r{i:02d}" for i in rng.permutation(40)]
    top = queries.top_rows(first, second, limit)
    naive = _naive_top(first, second, tie, limit)
    assert set(naive) <= set(top.tolist())
    # sorting just the candidates gives the same top rows
    cand = top.tolist()
    assert _naive_top(first[cand], second[cand], [tie[i] for i in cand], limit) == [
        cand.index(i) for i in naive
    ]


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


def test_events_per_second_counts_missing_windows_as_zero() -> None:
    w = keys.WINDOW_10S
    counts = {T0 - 30_000: 100, T0 - 20_000: 250, T0 - 10_000: 0, T0: 999}
    # the window starting at T0 ends after the cutoff: excluded
    assert queries.events_per_second(counts, w, T0 + 5_000, 3) == pytest.approx(350 / 30)
    assert queries.events_per_second(counts, w, T0 + 5_000, 1) == 0.0
    assert queries.events_per_second({}, w, T0, 3) == 0.0
    assert queries.events_per_second(counts, w, T0 + 10_000, 2) == pytest.approx(999 / 20)


def test_pane_cache_keeps_the_newest_and_empties_when_a_watermark_goes_back() -> None:
    cache = queries.PaneCache(max_entries=2)
    pane = queries.Pane.empty(packed.NF_SENSOR)
    key = ("sensor", "1m", "site", 0, (0, 1), True)
    assert cache.get(key) is None and cache.misses == 1
    for start in (0, 60_000, 120_000):
        cache.put(("sensor", "1m", "site", start, (0, 1), True), pane)
    assert len(cache) == 2 and cache.get(key) is None  # the oldest went
    assert cache.get(("sensor", "1m", "site", 120_000, (0, 1), True)) is pane and cache.hits == 1
    assert not cache.observe("sensor", 1_000) and not cache.observe("sensor", 2_000)
    assert not cache.observe("applog", 500)
    assert cache.observe("sensor", 1_999) and len(cache) == 0


def test_pane_cache_is_safe_across_threads() -> None:
    cache = queries.PaneCache(max_entries=50)
    pane = queries.Pane.empty(packed.NF_SENSOR)

    def work(t: int) -> None:
        for i in range(500):
            cache.put(("applog", "1m", "fleet", t * 1000 + i, (0,), True), pane)
            cache.get(("applog", "1m", "fleet", t * 1000 + i // 2, (0,), True))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(cache) == 50 and cache.hits + cache.misses == 2000


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


def test_numeric_and_text_fields() -> None:
    assert queries.numeric_fields({"a": "1.5", "host": "box-1", "n": "3"}) == {"a": 1.5, "n": 3.0}
    assert math.isnan(queries.numeric_fields({"x": "nan"})["x"])
    assert queries.text_hash({b"host": b"box-1", b"n": b"\xff3"}) == {
        "host": "box-1",
        "n": "\ufffd3",
    }
