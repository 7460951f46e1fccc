"""The open windows a worker owns: folding batches in equals aggregating everything at once,
restoring from the written values gives the same state, and eviction follows the watermark."""

from __future__ import annotations

import itertools

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import aggregation
from pipeline.batch import DEFAULT_PLAN
from pipeline.state import HashWrite, OpenRows, Retention, WindowState
from schemas import keys, packed
from schemas.events import EventKind, SensorReading
from tests.unit.events import NOT_TIMED, reading, sensor_readings

RETENTION = Retention({"10s": 3600, "1m": 86_400})
real = st.floats(min_value=-1e6, max_value=1e6)
PLAN = ((keys.WINDOW_10S, ("device", "metric")), (keys.WINDOW_1M, ("device", "site", "metric")))


def stored(writes: list[HashWrite], into: dict[str, dict[bytes, bytes]]) -> None:
    for w in writes:
        if w.replace:
            into.pop(w.key, None)
        into.setdefault(w.key, {}).update(
            zip((f.encode() for f in w.fields), w.values, strict=True)
        )


Content = tuple[list[float], list[int], list[int]]  # statistics, sketch codes, their counts


def contents(store: dict[str, dict[bytes, bytes]]) -> dict[tuple[str, str], Content]:
    out: dict[tuple[str, str], Content] = {}
    for key, stored_fields in store.items():
        fields = packed.entity_values(stored_fields)
        t = packed.decode(list(fields.values()))
        for i, name in enumerate(fields):
            sel = t.row == i
            out[(key, name.decode())] = (
                t.stats[i].tolist(),
                t.code[sel].tolist(),
                t.count[sel].tolist(),
            )
    return out


# repeated readings: a run across a cut or a restore still counts once per repeat
READINGS = st.lists(
    sensor_readings(devices=4, max_time_ms=150_000, values=st.sampled_from([1.0, 2.5]) | real),
    min_size=1,
    max_size=60,
)
CUTS = st.lists(st.integers(min_value=1, max_value=59), max_size=5)  # where batches end


@given(READINGS, CUTS, st.integers(min_value=0, max_value=4), st.booleans())
@settings(max_examples=120, deadline=None, suppress_health_check=NOT_TIMED)
def test_batches_folded_in_equal_everything_at_once(
    events: list[SensorReading], cuts: list[int], restore_after: int, bundles: bool
) -> None:
    """... whether the 10 s device instances are written as bundles (one per batch, named by
    its last offset, and once more whole when they close, as the worker writes them) or entity
    by entity."""
    bounds = sorted({0, len(events), *(c for c in cuts if c < len(events))})
    store: dict[str, dict[bytes, bytes]] = {}
    state = WindowState(EventKind.SENSOR, 0, PLAN)
    for i, (a, b) in enumerate(itertools.pairwise(bounds)):
        if i == restore_after:  # a new owner: everything it knows comes from the store
            state = WindowState(EventKind.SENSOR, 0, PLAN)
            state.restore(store)
        deltas = aggregation.aggregate(aggregation.sensor_columns(events[a:b]), PLAN)
        if not bundles:
            stored(state.absorb(deltas, RETENTION), store)
            continue
        at = {0: b - 1}
        writes = state.table.absorb_values(deltas, RETENTION, 0, bundle_at=at)[0][0]
        # a watermark no later event is behind: the instances it closes are complete
        wm = min((e.event_time for e in events[b:]), default=10**12)
        seals = state.table.seal({0: wm}, RETENTION, at).get(0, [])
        sealed = {w.key for w in seals}
        assert all(w.replace and len(w.fields) == 1 and ":w:10s:device:" in w.key for w in seals)
        stored([w for w in writes if w.key not in sealed] + seals, store)
        state.evict(wm)
    bundled = {k for k, fields in store.items() if any(f.startswith(b"@") for f in fields)}
    assert bundled == ({k for k in store if ":w:10s:device:" in k} if bundles else set())
    if bundles:  # every instance is closed by the end: one bundle each
        assert all(len(store[k]) == 1 for k in bundled)
    assert_as_aggregated_at_once(store, events)


def assert_as_aggregated_at_once(
    store: dict[str, dict[bytes, bytes]], events: list[SensorReading]
) -> None:
    """``store`` holds what aggregating ``events`` at once writes: counts, extremes and the
    series statistics exactly, sums to rounding."""
    whole: dict[str, dict[bytes, bytes]] = {}
    fresh = WindowState(EventKind.SENSOR, 0, PLAN)
    stored(
        fresh.absorb(aggregation.aggregate(aggregation.sensor_columns(events), PLAN), RETENTION),
        whole,
    )
    got, want = contents(store), contents(whole)
    assert got.keys() == want.keys()
    exact = (packed.COUNT, packed.MIN, packed.MAX, packed.REPEATS, packed.FIRST, packed.LAST)
    for k, (stats, codes, counts) in want.items():
        g_stats, g_codes, g_counts = got[k]
        assert (g_codes, g_counts) == (codes, counts)
        for j, (x, y) in enumerate(zip(g_stats, stats, strict=True)):
            if j in exact:
                assert x == y
            else:
                assert np.isclose(x, y, rtol=1e-9, atol=1e-3)


def test_restore_keys_cover_the_windows_ending_after_the_watermark() -> None:
    ws = WindowState(EventKind.SENSOR, 2, DEFAULT_PLAN)
    assert ws.restore_keys(-(2**63), None) == []
    mx, wm = 125_000, 95_000
    got = set(ws.restore_keys(mx, wm))
    ten = [90_000, 100_000, 110_000, 120_000]
    want = {keys.window_key("sensor", 2, keys.WINDOW_10S, "metric", s) for s in ten}
    want |= {
        keys.window_key("sensor", 2, keys.WINDOW_1M, d, s)
        for d in ("device", "site", "metric")
        for s in (60_000, 120_000)
    }
    assert got == want  # applog dims of the plan are not this kind's


def test_eviction_follows_the_watermark() -> None:
    ws = WindowState(EventKind.SENSOR, 0, PLAN)
    events = [reading(t) for t in (5_000, 65_000)]
    ws.absorb(aggregation.aggregate(aggregation.sensor_columns(events), PLAN), RETENTION)
    assert {(w, s) for w, _, s in ws.open} == {
        ("10s", 0),
        ("10s", 60_000),
        ("1m", 0),
        ("1m", 60_000),
    }
    assert ws.evict(None) == 0
    before = ws.values()
    assert ws.evict(60_000) == 5  # ends at or before 60 s are final (5 instances)
    assert ws.values() == {ik: v for ik, v in before.items() if ik[2] == 60_000}
    assert ws.entities == sum(ws.open.values()) == 5
    assert {(w, s) for w, _, s in ws.open} == {("10s", 60_000), ("1m", 60_000)}


def test_expiry_is_the_window_end_plus_its_retention() -> None:
    ws = WindowState(EventKind.SENSOR, 0, ((keys.WINDOW_1M, ("metric",)),))
    ev = reading(61_000)
    (w,) = ws.absorb(aggregation.aggregate(aggregation.sensor_columns([ev]), ws.plan), RETENTION)
    assert w.expire_at_s == 120 + 86_400 and w.fields == ["temp"]


def test_a_window_stored_by_an_earlier_release_restores_and_carries_on() -> None:
    """A value written before the series statistics (5 statistics) restores with the repeats it
    proves; readings folded in after it count their own repeats, and the value stays sound."""
    plan = ((keys.WINDOW_1M, ("metric",)),)
    ws = WindowState(EventKind.SENSOR, 0, plan)
    (w,) = ws.absorb(
        aggregation.aggregate(aggregation.sensor_columns([reading(1_000)] * 3), plan), RETENTION
    )
    t = packed.decode(w.values)
    legacy = packed.encode(packed.Table(t.stats[:, : packed.NF_BASE], t.row, t.code, t.count))
    store: dict[str, dict[bytes, bytes]] = {w.key: {b"temp": legacy[0]}}
    again = WindowState(EventKind.SENSOR, 0, plan)
    again.restore(store)
    more = [reading(2_000, value=1.0), reading(3_000, value=2.0), reading(4_000, value=2.0)]
    (w2,) = again.absorb(aggregation.aggregate(aggregation.sensor_columns(more), plan), RETENTION)
    (s,) = packed.decode(w2.values).stats
    # 3 equal (2 proven repeats), then 1.0 (the seam is unknown), 2.0, 2.0 (1 repeat)
    assert (s[packed.COUNT], s[packed.REPEATS], s[packed.LAST]) == (6, 3, 2.0)
    assert np.isnan(s[packed.FIRST])
    assert packed.problems(packed.decode(w2.values)) == []


@given(READINGS, CUTS)
@settings(max_examples=80, deadline=None, suppress_health_check=NOT_TIMED)
def test_rows_freed_by_eviction_are_reused_cleanly(
    events: list[SensorReading], cuts: list[int]
) -> None:
    """Instances evicted between batches free their rows; new instances take them (last freed
    first) and start from nothing: every value written equals aggregating its window at once."""
    events = sorted(events, key=lambda e: e.event_time)
    bounds = sorted({0, len(events), *(c for c in cuts if c < len(events))})
    store: dict[str, dict[bytes, bytes]] = {}
    state = WindowState(EventKind.SENSOR, 0, PLAN)
    for a, b in itertools.pairwise(bounds):
        deltas = aggregation.aggregate(aggregation.sensor_columns(events[a:b]), PLAN)
        stored(state.absorb(deltas, RETENTION), store)
        if b < len(events):  # no later event reaches an instance ending by the next one
            state.evict(events[b].event_time)
    assert state.entities == sum(state.open.values())
    assert_as_aggregated_at_once(store, events)


def test_closing_instances_without_sketches_carry_the_same_statistics() -> None:
    ws = WindowState(EventKind.SENSOR, 3, PLAN)
    events = [reading(t, value=v) for t, v in ((1_000, 1.0), (2_000, 4.0), (12_000, 2.0))]
    ws.absorb(aggregation.aggregate(aggregation.sensor_columns(events), PLAN), RETENTION)
    full = ws.table.closing({3: 10_000}, keys.WINDOW_10S, "device")
    bare = ws.table.closing({3: 10_000}, keys.WINDOW_10S, "device", sketches=False)
    ((start, names, table),) = full[3]
    ((b_start, b_names, b_table),) = bare[3]
    assert (b_start, b_names) == (start, names) == (0, [events[0].device_id + "|temp"])
    assert table.count.sum() == 2 and b_table.count.size == 0
    np.testing.assert_array_equal(b_table.stats, table.stats)


def test_a_name_given_twice_in_a_new_instance_gets_one_row() -> None:
    rows = OpenRows(packed.NF_SENSOR)
    ik = (0, "10s", "device", 0)
    got, fresh = rows._rows([(ik, ["a", "b", "a"])])
    assert got.tolist()[0] == got.tolist()[2] != got.tolist()[1]
    assert len(rows) == 2 and sorted(fresh[0]) == sorted(set(got.tolist()))
    rows.release([ik])
    assert len(rows) == 0
    again, _ = rows._rows([(ik, ["c"])])
    assert again.tolist()[0] in got.tolist()  # a freed row is reused


def test_new_names_of_a_held_instance_take_rows_in_order_of_first_appearance() -> None:
    rows = OpenRows(packed.NF_SENSOR)
    ik = (0, "10s", "device", 0)
    other = (0, "10s", "device", 10_000)
    rows._rows([(ik, ["a"]), (other, ["x", "y", "z"])])
    freed = rows._rows([(other, ["x", "y", "z"])])[0].tolist()
    rows.release([other])  # three free rows; the last freed is taken first
    got, fresh = rows._rows([(ik, ["b", "a", "c", "b", "d"])])
    g = got.tolist()
    assert g[0] == g[3] and len({g[0], g[1], g[2], g[4]}) == 4
    # the one row-at-a-time order: b, c, d take the free rows last-freed first, then new ones
    assert [g[0], g[2], g[4]] == freed[::-1][:3] and fresh == [[g[0], g[2], g[4]]]
    assert g[1] == rows._rows([(ik, ["a"])])[0].tolist()[0] and len(rows) == 4


def test_a_closing_instance_is_sealed_only_when_its_hash_holds_more_than_one_field() -> None:
    """Sealing rewrites a closing bundled instance whole only when more than one apply wrote
    it (or a restore found more than one field): an instance one apply wrote is whole."""
    t0 = 1_800_000_000_000
    ten = keys.WINDOW_10S.size_ms
    once = [reading(t0 + 100 * i, f"d{i}", 1.0) for i in range(3)]
    twice = [reading(t0 + ten + 100, "d9", 1.0), reading(t0 + ten + 200, "d8", 2.0)]
    later = [reading(t0 + ten + 300, "d9", 3.0)]
    store: dict[str, dict[bytes, bytes]] = {}
    ws = WindowState(EventKind.SENSOR, 0, PLAN)
    for offset, batch in enumerate([once + twice, later]):
        deltas = aggregation.aggregate(aggregation.sensor_columns(batch), PLAN)
        stored(ws.table.absorb_values(deltas, RETENTION, 0, bundle_at={0: offset})[0][0], store)
    first = keys.window_key(EventKind.SENSOR, 0, keys.WINDOW_10S, "device", t0)
    second = keys.window_key(EventKind.SENSOR, 0, keys.WINDOW_10S, "device", t0 + ten)
    assert (len(store[first]), len(store[second])) == (1, 2)
    for owner in ("the same", "a new"):
        if owner == "a new":  # a restore counts the fields it finds
            ws = WindowState(EventKind.SENSOR, 0, PLAN)
            ws.restore(store)
        seals = ws.table.seal({0: t0 + 2 * ten}, RETENTION, {0: 7}).get(0, [])
        assert [(w.key, w.fields, w.replace) for w in seals] == [(second, ["@7"], True)]
        names, values = packed.decode_bundle(seals[0].values[0])
        resolved = packed.entity_values(store[second])
        assert dict(zip(names, values, strict=True)) == resolved
        assert sorted(resolved) == [b"d8|temp", b"d9|temp"]
