"""Leaderboard writes and window detectors as partition state (pure, no services)."""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import aggregation, detectors, leaderboards
from pipeline.batch import BatchRules, PartitionBatch, Record
from pipeline.checkpoint import Checkpoint
from pipeline.detection import (
    CONTEXT_SIGNALS,
    REPLAY_FIELD,
    SNAPSHOT_EVERY,
    Detected,
    KindDetectors,
    error_evidence,
    signal_values,
    steady,
    window_params,
)
from pipeline.detectors import DetectorBank, StepResult
from pipeline.metrics import Metrics
from pipeline.validation import TimeBounds
from schemas import anomaly, keys, packed
from schemas.events import AppLogEvent, EventKind, LogLevel, SensorReading
from tests.unit.test_checkpoint import TOPICS, FakeDivert, FakeWriter

S, A = EventKind.SENSOR, EventKind.APPLOG
T0 = 1_700_000_040_000  # a 1m boundary


def reading(t: int, device: str, metric: str, value: float, site: str = "s1") -> SensorReading:
    return SensorReading(
        device_id=device, site=site, event_time=t, metric=metric, value=value, unit="u",
        lat=1.0, lon=2.0, firmware="1",
    )  # fmt: skip


def request(t: int, service: str, route: str, latency: float, status: int) -> AppLogEvent:
    return AppLogEvent(
        service=service, route=route, event_time=t, latency_ms=latency, status_code=status,
        level=LogLevel.ERROR if status >= 500 else LogLevel.INFO, trace_id="t",
    )  # fmt: skip


def one_minute(cols: aggregation.Columns, dims: tuple[str, ...]) -> list[aggregation.WindowDelta]:
    return aggregation.aggregate(cols, [(keys.WINDOW_1M, dims)])


def test_site_counts_add_up_over_metrics_and_device_maxima_are_raised_per_metric() -> None:
    evs = [
        reading(T0 + 1, "d1", "temp", 5.0, "s1"),
        reading(T0 + 2, "d1", "hum", 50.0, "s1"),
        reading(T0 + 3, "d2", "temp", 7.0, "s2"),
        reading(T0 + 4, "d1", "temp", 9.0, "s1"),
    ]
    deltas = one_minute(aggregation.sensor_columns(evs), (keys.Dim.SITE, keys.Dim.DEVICE))
    stats = [d.table.stats for d in deltas]
    nan = [np.full(len(d.names), np.nan) for d in deltas]
    writes = leaderboards.board_writes(S, 3, deltas, stats, nan, [99] * len(deltas))
    by_key = {w.key: w for w in writes}
    site = by_key[keys.board_key(S, 3, keys.Board.SITE_EVENTS, T0)]
    assert (site.mode, dict(zip(site.members, site.scores, strict=True))) == (
        "incr",
        {"s1": 3.0, "s2": 1.0},
    )
    temp = by_key[keys.board_key(S, 3, "device.max.temp", T0)]
    assert temp.mode == "gt" and dict(zip(temp.members, temp.scores, strict=True)) == {
        "d1": 9.0,
        "d2": 7.0,
    }
    hum = by_key[keys.board_key(S, 3, "device.max.hum", T0)]
    assert dict(zip(hum.members, hum.scores, strict=True)) == {"d1": 50.0}
    assert {w.expire_at_s for w in writes} == {99}


def test_a_device_maximum_is_written_only_by_a_poll_that_reached_it() -> None:
    first = [reading(T0 + 1, "d1", "temp", 9.0), reading(T0 + 2, "d2", "temp", 4.0)]
    second = [
        reading(T0 + 3, "d1", "temp", 5.0),  # below d1's maximum: the board has it already
        reading(T0 + 4, "d2", "temp", 6.0),  # raises d2's
        reading(T0 + 5, "d3", "temp", -1.0),  # new in the window
    ]
    (before,) = one_minute(aggregation.sensor_columns(first), (keys.Dim.DEVICE,))
    (delta,) = one_minute(aggregation.sensor_columns(second), (keys.Dim.DEVICE,))
    (after,) = one_minute(aggregation.sensor_columns(first + second), (keys.Dim.DEVICE,))
    absolute = after.table.stats[[after.names.index(n) for n in delta.names]]
    nan = np.full(len(delta.names), np.nan)
    (write,) = leaderboards.board_writes(S, 0, [delta], [absolute], [nan], [99])
    assert dict(zip(write.members, write.scores, strict=True)) == {"d2": 6.0, "d3": -1.0}
    # the maxima on the board after both polls are every device's maximum of the window
    board = dict(zip(before.names, before.table.stats[:, packed.MAX].tolist(), strict=True))
    for member, score in zip(write.members, write.scores, strict=True):
        board[f"{member}|temp"] = max(board.get(f"{member}|temp", -np.inf), score)
    assert board == dict(zip(after.names, after.table.stats[:, packed.MAX].tolist(), strict=True))
    # a poll that only ties a maximum writes it again (a no-op for ZADD GT); a lower one not
    d1 = after.table.stats[[after.names.index("d1|temp")]]
    nan1 = [np.full(1, np.nan)]
    for value, written in ((9.0, ["d1"]), (1.0, [])):
        poll = one_minute(
            aggregation.sensor_columns([reading(T0 + 6, "d1", "temp", value)]), (keys.Dim.DEVICE,)
        )
        writes = leaderboards.board_writes(S, 0, poll, [d1], nan1, [99])
        assert [m for w in writes for m in w.members] == written


def test_service_and_route_boards_count_requests_errors_and_set_p99() -> None:
    evs = [request(T0 + i, "api", "/a", float(i), 500 if i % 4 == 0 else 200) for i in range(8)]
    evs.append(request(T0 + 9, "web", "/b", 3.0, 200))
    deltas = one_minute(aggregation.applog_columns(evs), (keys.Dim.SERVICE, keys.Dim.ROUTE))
    assert all(leaderboards.needs_p99(A, d) for d in deltas)
    p99 = [packed.quantiles(d.table, (0.99,))[:, 0] for d in deltas]
    writes = leaderboards.board_writes(
        A, 0, deltas, [d.table.stats for d in deltas], p99, [1] * len(deltas)
    )
    got = {(w.key, w.mode): dict(zip(w.members, w.scores, strict=True)) for w in writes}
    assert got[(keys.board_key(A, 0, keys.Board.SERVICE_REQUESTS, T0), "incr")] == {
        "api": 8.0,
        "web": 1.0,
    }
    assert got[(keys.board_key(A, 0, keys.Board.SERVICE_ERRORS, T0), "incr")] == {"api": 2.0}
    assert got[(keys.board_key(A, 0, keys.Board.ROUTE_ERRORS, T0), "incr")] == {"api|/a": 2.0}
    p99_api = got[(keys.board_key(A, 0, keys.Board.SERVICE_P99, T0), "set")]["api"]
    assert p99_api == pytest.approx(6.0, rel=0.02)  # rank floor(0.99 * 7) of 0..7


def test_anomaly_counts_go_to_the_1m_instance_of_their_window() -> None:
    writes = leaderboards.count_writes(
        S,
        1,
        keys.Board.DEVICE_ANOMALIES,
        [("d1", T0 + 10_000), ("d1", T0 + 20_000), ("d2", T0 + 70_000)],
        lambda start: start // 1000 + 5,
    )
    assert [(w.key, w.members, w.scores, w.expire_at_s) for w in writes] == [
        (keys.board_key(S, 1, keys.Board.DEVICE_ANOMALIES, T0), ["d1"], [2.0], T0 // 1000 + 5),
        (
            keys.board_key(S, 1, keys.Board.DEVICE_ANOMALIES, T0 + 60_000),
            ["d2"],
            [1.0],
            (T0 + 60_000) // 1000 + 5,
        ),
    ]


# --------------------------------------------------------------------- window detectors


def windows_of(values: list[float], start: int = T0) -> list[tuple[int, list[str], packed.Table]]:
    """One closed 10 s window per value: entity d1|temp with three readings around it."""
    out = []
    for i, v in enumerate(values):
        t = start + i * 10_000
        evs = [reading(t + j, "d1", "temp", v + j * 0.01) for j in range(3)]
        (d,) = aggregation.aggregate(
            aggregation.sensor_columns(evs), [(keys.WINDOW_10S, (keys.Dim.DEVICE,))]
        )
        out.append((d.start_ms, list(d.names), d.table))
    return out


def series(n: int, spike_at: int) -> list[float]:
    rng = np.random.default_rng(7)
    v: list[float] = (20 + rng.standard_normal(n)).tolist()
    v[spike_at] += 60.0
    return v


def restarted(
    det: KindDetectors,
    stored: dict[bytes, bytes],
    closed: list[tuple[int, list[str], packed.Table]],
) -> KindDetectors:
    """``det`` after a crash: restored from the stored hash, then stepped again through the
    closed windows the store holds from its replay point on."""
    since = det.restore(0, stored)
    det.replay(0, [x for x in closed if since is not None and x[0] >= since])
    return det


def test_signals_of_a_window() -> None:
    (_, _, table), *_ = windows_of([10.0])
    got = signal_values(S, table)
    assert got[anomaly.Signal.MEAN][0] == pytest.approx(10.01)
    assert got[anomaly.Signal.MAX][0] == pytest.approx(10.02)
    assert got[anomaly.Signal.FLAT][0] == 0.0  # 10.0, 10.01, 10.02: not all equal


@pytest.mark.parametrize(
    ("values", "flat"),
    [
        ([4.0, 4.0, 4.0], 1.0),  # all equal
        ([1.0, 2.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 3.0], 1.0),  # a freeze beside ordinary ones
        ([5.0, 5.0, 5.0, 5.0, 5.0, 1.0, 2.0, 3.0, 4.0, 6.0], 0.0),  # half the window
        ([1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 4.0, 4.0, 5.0], 0.0),  # equal in pairs: a quiet series
        ([7.0, 7.0], np.nan),  # too few readings to tell
    ],
)
def test_flat_counts_readings_that_repeat_the_one_before(values: list[float], flat: float) -> None:
    evs = [reading(T0 + j * 100, "d1", "temp", v) for j, v in enumerate(values)]
    (d,) = aggregation.aggregate(
        aggregation.sensor_columns(evs), [(keys.WINDOW_10S, (keys.Dim.DEVICE,))]
    )
    got = signal_values(S, d.table)[anomaly.Signal.FLAT][0]
    assert got == flat or (np.isnan(flat) and np.isnan(got))


def test_a_window_mean_does_not_depend_on_how_its_events_were_grouped() -> None:
    rng = np.random.default_rng(3)
    values = rng.uniform(-50.0, 150.0, size=(500, 40))
    whole = values.sum(axis=1)
    in_two = values[:, :17].sum(axis=1) + values[:, 17:].sum(axis=1)  # another poll split
    assert (whole != in_two).any()  # float sums do differ in their last bits
    assert (steady(whole / 40) == steady(in_two / 40)).mean() > 0.999
    assert steady(np.array([np.nan, 0.0]))[1] == 0.0 and np.isnan(steady(np.array([np.nan]))[0])


def test_a_spike_raises_an_anomaly_with_a_stable_id_and_vector() -> None:
    det = KindDetectors(S, keys.WINDOW_10S)
    wins = windows_of(series(200, 150))
    found = [a for w in wins for a in det.detect(2, [w]).anomalies]
    spike_start = wins[150][0]
    hits = [a for a in found if a.window_start_ms == spike_start]
    assert hits, [(a.window_start_ms, a.signal) for a in found]
    a = hits[0]
    assert a.id == anomaly.anomaly_id("sensor", 2, spike_start, "d1|temp", a.signal)
    assert anomaly.parse_anomaly_id(a.id)[1:3] == (2, spike_start)
    assert a.context["device"] == "d1" and a.context["metric"] == "temp"
    assert a.vector.shape == (anomaly.VECTOR_DIM,) and a.vector.dtype == np.float32
    assert anomaly.decode_record(anomaly.encode_record(a)).id == a.id


@pytest.mark.parametrize("crash_at", [1, 37, 120, 181])
def test_restored_detectors_continue_exactly_like_uninterrupted_ones(crash_at: int) -> None:
    wins = windows_of(series(220, 180))
    whole = KindDetectors(S, keys.WINDOW_10S)
    expected = [a for w in wins for a in whole.detect(0, [w]).anomalies]

    first = KindDetectors(S, keys.WINDOW_10S)
    stored: dict[bytes, bytes] = {}
    got = []
    saved = 0
    for i, w in enumerate(wins):
        if i == crash_at:  # the worker dies; a new one restores the partition from the store
            first = restarted(KindDetectors(S, keys.WINDOW_10S), stored, wins[:i])
        found = first.detect(0, [w])
        saved += sum(f.count("~") == 1 for f in found.fields)  # rows, not their chunks
        stored.update(zip((f.encode() for f in found.fields), found.states, strict=True))
        got += found.anomalies
    assert [(a.id, a.score) for a in got] == [(a.id, a.score) for a in expected]
    # states are written every SNAPSHOT_EVERY steps of a row (staggered), not each
    assert saved <= 3 * (2 + len(wins) // SNAPSHOT_EVERY)


def _two_entities(n: int, sparse_at: set[int]) -> list[tuple[int, list[str], packed.Table]]:
    """Closed 10 s windows: d1|temp in every one, d2|temp only in windows ``sparse_at``."""
    rng = np.random.default_rng(5)
    out = []
    for i in range(n):
        t = T0 + i * 10_000
        v = 20 + rng.standard_normal()
        evs = [reading(t + j, "d1", "temp", v + j * 0.01) for j in range(3)]
        if i in sparse_at:
            evs += [reading(t + 5 + j, "d2", "temp", v + 3 + j * 0.02) for j in range(3)]
        (d,) = aggregation.aggregate(
            aggregation.sensor_columns(evs), [(keys.WINDOW_10S, (keys.Dim.DEVICE,))]
        )
        out.append((d.start_ms, list(d.names), d.table))
    return out


def test_only_the_mean_rows_of_a_sensor_step_with_the_contextual_test() -> None:
    # two entities in one step round: each signal's row ends exactly as a lone row stepped
    # through the same values, the mean with the kNN test and the max and flat without
    wins = _two_entities(150, set(range(0, 150, 2)))
    det = KindDetectors(S, keys.WINDOW_10S)
    for w in wins:
        det.detect(0, [w])
    for entity in ("d1|temp", "d2|temp"):
        block = det._rows[0][entity]
        for j, signal in enumerate(det.signals):
            t, v = [], []
            for start, names, table in wins:
                if entity in names:
                    t.append(start)
                    v.append(signal_values(S, table)[signal][names.index(entity)])
            lone = DetectorBank(1, det.bank.params)
            context = signal == anomaly.Signal.MEAN
            assert (signal in CONTEXT_SIGNALS) == context
            lone.score_batch(np.zeros(len(t), np.int64), np.array(t), np.array(v), context)
            assert np.array_equal(det.bank.state[block + j], lone.state[0]), (entity, signal)


def test_a_max_row_saved_with_context_is_restored_without_it_and_saved_compact() -> None:
    # a state of a release that stepped every signal with the kNN test
    t, v = np.arange(150, dtype=np.int64) * 10_000 + T0, 20 + np.sin(np.arange(150) / 5)
    old = DetectorBank(1, window_params(S))
    old.score_batch(np.zeros(150, np.int64), t, v)
    (full,) = old.snapshot([0])
    assert len(full) == detectors.SNAPSHOT_BYTES
    head = struct.pack("<qq", int(t[-1]), 150)
    det = KindDetectors(S, keys.WINDOW_10S)
    det.restore(0, {b"d1|temp~max": head + full, b"d1|temp~mean": head + full})
    block = det._rows[0]["d1|temp"]
    mean, mx = det.bank.snapshot([block, block + 1])
    assert len(mean) == detectors.SNAPSHOT_BYTES and len(mx) == detectors.COMPACT_BYTES
    # nothing a step without context reads has changed (the time-of-week correction is read
    # only with context)
    end = detectors.HIST + detectors.HIST_LEN
    kept = np.r_[
        0 : detectors.HIST, end - anomaly.WINDOW_LEN : end, detectors.SEAS : detectors.WSEAS
    ]
    # ... nor does the third predictor's (it exists only with context)
    third = [
        c + 2 for c in (detectors.LEV, detectors.SC, detectors.ERR, detectors.LS, detectors.SS)
    ]
    kept = kept[~np.isin(kept, third)]
    assert not det.bank.state[block + 1][third].any()
    assert np.array_equal(det.bank.state[block + 1][kept], old.state[0][kept])


@pytest.mark.parametrize("crash_at", [45, 130])
def test_a_rarely_seen_entity_never_pins_the_replay_point(crash_at: int) -> None:
    """d2 steps in windows 0 and 100 only: it is saved once its unsaved step is REPLAY_WINDOWS
    old, so a restore replays at most that many windows, and continues exactly."""
    wins = _two_entities(150, {0, 1, 100})
    size = keys.WINDOW_10S.size_ms
    whole = KindDetectors(S, keys.WINDOW_10S, replay_windows=20)
    expected = [a for w in wins for a in whole.detect(0, [w]).anomalies]
    det = KindDetectors(S, keys.WINDOW_10S, replay_windows=20)
    stored: dict[bytes, bytes] = {}
    got = []
    for i, w in enumerate(wins):
        if i == crash_at:
            det = KindDetectors(S, keys.WINDOW_10S, replay_windows=20)
            since = det.restore(0, stored)
            assert since is not None and (w[0] - since) // size <= 20
            det.replay(0, [x for x in wins[:i] if x[0] >= since])
        found = det.detect(0, [w])
        stored.update(zip((f.encode() for f in found.fields), found.states, strict=True))
        replay_from = int(found.states[found.fields.index(REPLAY_FIELD)])
        assert replay_from == -1 or (w[0] - replay_from) // size < 20
        got += found.anomalies
    assert [(a.id, a.score) for a in got] == [(a.id, a.score) for a in expected]


def _windows_of_devices(devices: list[list[str]]) -> list[tuple[int, list[str], packed.Table]]:
    """Closed 10 s windows, window i holding three readings of each of ``devices[i]``."""
    rng = np.random.default_rng(7)
    out = []
    for i, devs in enumerate(devices):
        t = T0 + i * 10_000
        evs = [
            reading(t + j, d, "temp", 20 + rng.standard_normal()) for d in devs for j in range(3)
        ]
        (d,) = aggregation.aggregate(
            aggregation.sensor_columns(evs), [(keys.WINDOW_10S, (keys.Dim.DEVICE,))]
        )
        out.append((d.start_ms, list(d.names), d.table))
    return out


def _apply(stored: dict[bytes, bytes], found: Detected) -> None:
    """What ``pulse_apply``'s d block does to the partition's state hash."""
    stored.update(zip((f.encode() for f in found.fields), found.states, strict=True))
    for f in found.deleted:
        stored.pop(f.encode(), None)


@pytest.mark.parametrize("crash_at", [None, 30, 44, 100, 125])
def test_an_idle_entity_is_forgotten_in_memory_and_in_the_store(crash_at: int | None) -> None:
    """d2 is seen in windows 0-3 and 120: forgotten once its last step is ``idle`` old (the
    least allowed: twice the replay span), its stored states deleted with it; back in window
    120 it starts afresh. A restore at any point continues exactly, to the same stored hash."""
    devices = [["d1", "d2"] if i in {0, 1, 2, 3, 120} else ["d1"] for i in range(150)]
    wins = _windows_of_devices(devices)
    size = keys.WINDOW_10S.size_ms

    def make() -> KindDetectors:
        return KindDetectors(S, keys.WINDOW_10S, replay_windows=20, idle_ms=size)

    assert make().idle_ms == 40 * size  # raised to twice the replay span
    det = make()
    stored: dict[bytes, bytes] = {}
    got, deleted_at = [], []
    for i, w in enumerate(wins):
        if i == crash_at:
            det = restarted(make(), stored, wins[:i])
        found = det.detect(0, [w])
        if found.deleted:
            deleted_at.append((i, sorted(found.deleted)))
        _apply(stored, found)
        got += found.anomalies
        assert ("d2|temp" in det._rows[0]) == (i < 43 or i >= 120), i
        if 43 <= i < 120:
            assert not [f for f in stored if f.startswith(b"d2|")], i
    # its rows' states and the profile chunks stored with them
    assert [(i, [f for f in fs if f.count("~") == 1]) for i, fs in deleted_at] == [
        (43, ["d2|temp~flat", "d2|temp~max", "d2|temp~mean"])
    ]
    assert all(f.startswith("d2|") for _, fs in deleted_at for f in fs)
    assert det._steps[det._rows[0]["d2|temp"]] == 1  # back in window 120: a fresh start
    whole = make()
    whole_stored: dict[bytes, bytes] = {}
    expected = []
    for w in wins:
        found = whole.detect(0, [w])
        _apply(whole_stored, found)
        expected += found.anomalies
    assert [(a.id, a.score) for a in got] == [(a.id, a.score) for a in expected]
    assert stored == whole_stored


HOURLY = keys.TumblingWindow("1h", 3_600_000)


def _hourly(n: int, seed: int = 11) -> list[tuple[int, list[str], packed.Table]]:
    """Closed 1 h windows of d1|temp and d2|temp with a daily cycle: 1 h windows visit
    every hour of the week within days, so the profiles fill in a short test."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        t = T0 + i * HOURLY.size_ms
        level = 20 + 3 * np.sin(2 * np.pi * i / 24)
        evs = [
            reading(t + j, d, "temp", level + k + rng.standard_normal())
            for k, d in enumerate(("d1", "d2"))
            for j in range(3)
        ]
        (d,) = aggregation.aggregate(
            aggregation.sensor_columns(evs), [(HOURLY, (keys.Dim.DEVICE,))]
        )
        out.append((d.start_ms, list(d.names), d.table))
    return out


def _state(det: KindDetectors) -> npt.NDArray[np.float64]:
    """The rows of d1|temp and d2|temp, in order."""
    blocks = [det._rows[0][e] for e in ("d1|temp", "d2|temp")]
    return det.bank.rows(np.array([b + j for b in blocks for j in range(len(det.signals))]))


@pytest.mark.parametrize(("every", "crash_at"), [(1, 60), (1, 230), (7, 100), (7, 229)])
def test_a_snapshot_writes_the_profile_chunks_changed_since_and_a_restore_is_exact(
    every: int, crash_at: int
) -> None:
    """Heads are written whole and profile chunks only when a step changed them: a restore
    from what the store holds, at any point, has every row exactly as the uninterrupted
    detectors have it, and both leave the same stored hash."""
    wins = _hourly(240)

    def make() -> KindDetectors:
        return KindDetectors(S, HOURLY, snapshot_every=every, replay_windows=20)

    whole, det = make(), make()
    whole_stored: dict[bytes, bytes] = {}
    stored: dict[bytes, bytes] = {}
    got, expected = [], []
    for i, w in enumerate(wins):
        if i == crash_at:
            det = restarted(make(), stored, wins[:i])
            assert np.array_equal(_state(det), _state(whole))
        found = det.detect(0, [w])
        _apply(stored, found)
        got += found.anomalies
        want = whole.detect(0, [w])
        _apply(whole_stored, want)
        expected += want.anomalies
        assert (found.fields, found.deleted) == (want.fields, want.deleted), i  # no more
        if every == 1:  # each row is saved with the chunks of its one step: a day chunk, and
            # a week chunk for the rows stepped with context (once their bins are non-zero)
            chunks = [f for f in want.fields if f.count("~") == 2]
            assert len(chunks) <= 2 * 2 + 2 * 2  # two entities: mean 2, max 1, flat 1
            assert not [
                f
                for f in chunks
                if not f.startswith(("d1|temp~mean~", "d2|temp~mean~"))
                and int(f.rsplit("~", 1)[1]) >= detectors.DAY_CHUNKS
            ]
    assert [(a.id, a.score) for a in got] == [(a.id, a.score) for a in expected]
    assert stored == whole_stored
    # every chunk of a mature row is stored, each far smaller than the whole row
    assert sum(f.startswith(b"d1|temp~mean~") for f in stored) == detectors.CHUNKS
    heads = [v for f, v in stored.items() if f.count(b"~") == 1]
    assert max(map(len, heads)) < detectors.SNAPSHOT_BYTES / 3


def test_a_state_stored_whole_by_an_earlier_release_is_stored_in_chunks_from_then_on() -> None:
    wins = _hourly(200)
    old = KindDetectors(S, HOURLY)
    for w in wins[:180]:
        old.detect(0, [w])
    # an earlier release's hash: every row whole (head and profile) in one field
    legacy: dict[bytes, bytes] = {REPLAY_FIELD.encode(): b"-1"}
    for e, block in old._rows[0].items():
        for j, signal in enumerate(old.signals):
            row = block + j
            head = struct.pack("<qq", int(old._last[row]), int(old._steps[row]))
            legacy[f"{e}~{signal}".encode()] = head + old.bank.snapshot([row])[0]
    det = KindDetectors(S, HOURLY, snapshot_every=1)
    det.restore(0, legacy)
    assert np.array_equal(_state(det), _state(old))
    stored = dict(legacy)
    for w in wins[180:]:
        _apply(stored, det.detect(0, [w]))
    assert all(not detectors.holds_profile(v[16:]) for f, v in stored.items() if f.count(b"~") == 1)
    again = KindDetectors(S, HOURLY, snapshot_every=1)
    again.restore(0, stored)
    assert np.array_equal(_state(again), _state(det))


def test_chunks_of_a_row_stepped_with_context_are_dropped_for_a_signal_stepped_without() -> None:
    """A release that stepped `max` with context stored week chunks for it: restored, the row
    loses them (a step without context never reads them) and its next snapshot deletes them."""
    wins = _hourly(200)
    det = KindDetectors(S, HOURLY, snapshot_every=1)
    stored: dict[bytes, bytes] = {}
    for w in wins[:190]:
        _apply(stored, det.detect(0, [w]))
    # file the mean row's head and chunks (with context) under d1's max
    for f in [f for f in stored if f.startswith(b"d1|temp~mean")]:
        stored[f.replace(b"~mean", b"~max")] = stored[f]
    week = [f"d1|temp~max~{c}".encode() for c in range(detectors.DAY_CHUNKS, detectors.CHUNKS)]
    assert all(f in stored for f in week)
    again = KindDetectors(S, HOURLY, snapshot_every=1)
    again.restore(0, stored)
    row = again._rows[0]["d1|temp"] + again.signals.index(anomaly.Signal.MAX)
    assert not again.bank.rows([row])[0, detectors.WSEAS :].any()
    found = again.detect(0, [wins[190]])
    assert set(week) <= {f.encode() for f in found.deleted}


def test_a_damaged_profile_chunk_starts_its_row_afresh_and_is_replaced() -> None:
    wins = _hourly(200)
    det = KindDetectors(S, HOURLY, snapshot_every=1)
    stored: dict[bytes, bytes] = {}
    for w in wins[:190]:
        _apply(stored, det.detect(0, [w]))
    bad = b"d1|temp~mean~5"
    assert bad in stored
    stored[bad] = np.full(24, np.nan).tobytes()  # the right length, not finite
    stored[b"d1|temp~mean~11"] = b"no such chunk"
    stored["d1|temp~mean~²".encode()] = b"a digit int() refuses"
    stored[b"d1|temp~mean~-1"] = b"no such chunk either"
    fresh = KindDetectors(S, HOURLY, snapshot_every=1)
    fresh.restore(0, stored)
    assert fresh.refused == 4
    row = fresh._rows[0]["d1|temp"]
    assert fresh._steps[row] == 0 and not fresh.bank.rows([row]).any()
    assert fresh._steps[row + 1] > 0  # the entity's other signals are restored
    found = fresh.detect(0, [wins[190]])
    _apply(stored, found)
    # the row's next snapshot rewrote or deleted every chunk the store held for it
    assert stored.get(bad) != np.full(24, np.nan).tobytes()
    again = KindDetectors(S, HOURLY, snapshot_every=1)
    again.restore(0, stored)
    assert np.array_equal(_state(again), _state(fresh))


def test_past_the_cap_the_least_recently_seen_entities_are_forgotten() -> None:
    """Identifiers that change with every reading (a hostile or broken producer) no longer
    grow a partition's detectors without bound: past the cap the least recently stepped go
    (down to nine tenths of it), and a device seen in every window keeps its history."""
    devices = [["d1", *(f"x{i}-{k}" for k in range(5))] for i in range(40)]
    det = KindDetectors(S, keys.WINDOW_10S, max_entities=10)
    rows_at_10 = 0
    deleted: list[str] = []
    for i, w in enumerate(_windows_of_devices(devices)):
        found = det.detect(0, [w])
        deleted += found.deleted
        assert det.watched() <= 10
        if i == 10:
            rows_at_10 = len(det.bank)
    assert len(det.bank) == rows_at_10  # forgotten rows are reused: memory stays flat
    assert det._steps[det._rows[0]["d1|temp"]] == 40  # never forgotten
    assert det.evicted == sum(f.count("~") == 1 for f in deleted) // 3 > 150
    assert all(f.startswith("x") for f in deleted)
    # the newest churned identifiers are kept, the oldest forgotten
    assert {e for e in det._rows[0] if e.startswith("x39-")} == {f"x39-{k}|temp" for k in range(5)}


def test_a_damaged_stored_state_starts_afresh_and_never_raises() -> None:
    det = KindDetectors(S, keys.WINDOW_10S)
    good = KindDetectors(S, keys.WINDOW_10S, snapshot_every=1).detect(4, windows_of([1.0]))
    (state,) = (v for f, v in zip(good.fields, good.states, strict=True) if f == "d1|temp~mean")
    det.restore(
        4,
        {
            b"d1|temp~mean": b"garbage",
            b"d1|temp~max": b"",
            b"d1|temp~median": state,  # no such signal
            b"~mean": state,  # no entity
        },
    )
    assert det.refused == 4 and det.restored(4)
    det.detect(4, windows_of([1.0, 2.0]))  # the rows work
    det.drop(4)
    assert not det.restored(4)


# ------------------------------------------------------------ through the checkpoint


def sensor_record(offset: int, t: int, value: float) -> Record:
    return Record(
        offset,
        None,
        orjson.dumps({
            "device_id": "d1", "site": "s1", "event_time": t, "metric": "temp", "value": value,
            "unit": "C", "lat": 1.0, "lon": 2.0, "firmware": "1",
        }),
    )  # fmt: skip


def test_the_batch_that_closes_a_window_carries_its_detector_states_and_boards() -> None:
    now = T0 + 3_600_000
    rules = BatchRules(
        TimeBounds(6 * 3600 * 1000, 300_000),
        0,
        plan=((keys.WINDOW_10S, (keys.Dim.DEVICE,)), (keys.WINDOW_1M, (keys.Dim.SITE,))),
    )
    sent: list[PartitionBatch] = []

    class Capture(FakeWriter):
        async def send(self, batches: list[PartitionBatch], now_ms: int) -> list:  # type: ignore[type-arg]
            sent.extend(batches)
            return await super().send(batches, now_ms)

    w = Capture()
    cp = Checkpoint(
        TOPICS, w, FakeDivert(), rules, Metrics(), clock=lambda: now, retry_delay_s=0.0,
        detectors={S: KindDetectors(S, keys.WINDOW_10S)},
    )  # fmt: skip
    asyncio.run(cp.commit({S: {0: [sensor_record(0, T0 + 1000, 1.0)]}}))
    asyncio.run(cp.commit({S: {0: [sensor_record(1, T0 + 12_000, 2.0)]}}))  # closes [T0, +10s)
    asyncio.run(cp.flush())
    first, second = sent
    assert first.detected is None
    assert second.detected is not None
    # a row's first step saves nothing (its state is due every SNAPSHOT_EVERY steps): the
    # replay point, written with every apply that steps detectors, covers its history
    assert second.detected.fields == ["@from"]
    assert second.detected.states == [str(T0).encode()]
    assert [b.key for b in first.boards] == [keys.board_key(S, 0, keys.Board.SITE_EVENTS, T0)]


@pytest.mark.parametrize("damage", ["name", "value", "bundle"])
def test_a_damaged_closed_window_is_left_out_of_a_restore_s_replay(
    damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A restore steps its detectors through the stored windows closed since their snapshot.
    One of them with a field name that is not UTF-8, a value that is no packed value or a
    bundle cut short (someone else wrote it), is logged and left out: the worker goes on."""
    now = T0 + 3_600_000
    rules = BatchRules(
        TimeBounds(6 * 3600 * 1000, 300_000), 0, plan=((keys.WINDOW_10S, (keys.Dim.DEVICE,)),)
    )
    w = FakeWriter()

    def checkpoint() -> Checkpoint:
        return Checkpoint(
            TOPICS, w, FakeDivert(), rules, Metrics(), clock=lambda: now, retry_delay_s=0.0,
            detectors={S: KindDetectors(S, keys.WINDOW_10S)},
        )  # fmt: skip

    cp = checkpoint()
    for i in range(4):  # windows T0, +10 s, +20 s close
        asyncio.run(cp.commit({S: {0: [sensor_record(i, T0 + 1000 + i * 10_000, 1.0 + i)]}}))
    asyncio.run(cp.flush())
    # the snapshot is older than every closed window: a restore replays them all
    w.hashes[keys.detector_key(S, 0)] = {REPLAY_FIELD.encode(): str(T0).encode()}
    damaged = keys.window_key(S, 0, keys.WINDOW_10S, keys.Dim.DEVICE, T0 + 10_000)
    held = w.hashes[damaged]
    (bundle,) = held  # the worker wrote the instance as one bundle (keys.bundled)
    if damage == "name":
        held[b"\xff\xfe|temp"] = packed.decode_bundle(held[bundle])[1][0]
    elif damage == "value":
        held[bundle] = packed.encode_bundle(["d1|temp"], [b"PV\x00not a packed value"], 8)
    else:
        held[bundle] = held[bundle][:-3]  # the bundle itself is cut short
    cp = checkpoint()  # a new owner
    asyncio.run(cp.commit({S: {0: [sensor_record(4, T0 + 41_000, 5.0)]}}))
    asyncio.run(cp.flush())
    assert w.offsets[(S, 0)] == 4
    said = [r.getMessage() for r in caplog.records if "not replayed" in r.getMessage()]
    assert len(said) == 1 and damaged in said[0]


def test_error_evidence_ignores_a_lone_error_among_few_requests_but_not_a_burst() -> None:
    errors = np.array([0.0, 1.0, 2.0, 6.0, 7.0, 70.0])
    n = np.array([8.0, 8.0, 8.0, 8.0, 8.0, 100.0])
    got = error_evidence(errors, n)
    assert got[:3].tolist() == [0.0, 0.0, 0.0]
    assert 0.2 < got[3] < got[4] < 0.75 and 0.4 < got[5] < 0.7


def test_a_window_of_equal_readings_is_flat_when_it_has_three() -> None:
    def flat(values: list[float]) -> float:
        evs = [reading(T0 + j, "d1", "temp", v) for j, v in enumerate(values)]
        (d,) = aggregation.aggregate(
            aggregation.sensor_columns(evs), [(keys.WINDOW_10S, (keys.Dim.DEVICE,))]
        )
        return float(signal_values(S, d.table)[anomaly.Signal.FLAT][0])

    assert flat([5.0, 5.0, 5.0]) == 1.0
    assert flat([5.0, 5.0, 5.01]) == 0.0
    assert np.isnan(flat([5.0, 5.0]))  # two equal readings are too common to judge


def test_window_params_split_the_alarm_level_over_the_signals() -> None:
    one = window_params(A, 0.5)  # two signals per service
    three = window_params(S, 0.5)  # three per device|metric
    assert 0.5 < one.threshold < three.threshold < 0.55
    assert three.range_scales == 5.0
    with pytest.raises(ValueError, match="threshold"):
        window_params(S, 1.0)


def test_an_idle_entity_starts_afresh_however_the_windows_were_grouped_into_polls() -> None:
    """d2 last steps in window 3 and returns in window 45; idle is 40 windows. Stepped one
    window per poll, window 43's poll forgets it; stepped with windows 43-45 in one poll it is
    still held when it returns. Either way it returns fresh: the same state and anomalies."""
    devices = [["d1", "d2"] if i in {0, 1, 2, 3, 45} else ["d1"] for i in range(60)]
    wins = _windows_of_devices(devices)
    size = keys.WINDOW_10S.size_ms

    def run(groups: list[list[int]]) -> tuple[KindDetectors, list[tuple[str, float]]]:
        det = KindDetectors(S, keys.WINDOW_10S, replay_windows=20, idle_ms=40 * size)
        found = []
        for g in groups:
            found += det.detect_many({0: [wins[i] for i in g]})[0].anomalies
        return det, [(a.id, a.score) for a in found]

    one, a1 = run([[i] for i in range(60)])
    many, a2 = run([[i] for i in range(43)] + [[43, 44, 45]] + [[i] for i in range(46, 60)])
    assert a1 == a2
    for det in (one, many):
        assert det._steps[det._rows[0]["d2|temp"]] == 1  # fresh at window 45
    rows = [one._rows[0]["d2|temp"] + j for j in range(3)]
    rows_many = [many._rows[0]["d2|temp"] + j for j in range(3)]
    assert np.array_equal(one.bank.rows(rows), many.bank.rows(rows_many))


def test_a_sparse_poll_steps_in_rounds_per_entity_not_per_window(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Four devices take turns, one per window (a sparse backlog: every window closes with one
    entity in it). One poll of 520 such windows on two partitions steps the bank in as many
    rounds as a device has steps (130), and raises what a poll per window raises."""
    rng = np.random.default_rng(11)
    wins = []
    for i in range(520):
        dev, t = f"d{i % 4}", T0 + i * 10_000
        level = 60.0 if (dev, i // 4) == ("d1", 120) else 20.0  # a spike in d1's 121st window
        evs = [reading(t + j, dev, "temp", level + rng.standard_normal()) for j in range(3)]
        (d,) = aggregation.aggregate(
            aggregation.sensor_columns(evs), [(keys.WINDOW_10S, (keys.Dim.DEVICE,))]
        )
        wins.append((d.start_ms, list(d.names), d.table))

    def seen(det: KindDetectors, found: list[anomaly.AnomalyRecord]) -> list[object]:
        rows = [det._rows[p][f"d{k}|temp"] + j for p in (0, 1) for k in range(4) for j in range(3)]
        return [
            [(a.id, a.score, a.value, a.vector.tobytes()) for a in found],
            det.bank.rows(rows).tobytes(),
        ]

    apart = KindDetectors(S, keys.WINDOW_10S)
    found_apart = []
    for w in wins:
        got = apart.detect_many({0: [w], 1: [w]})
        found_apart += got[0].anomalies + got[1].anomalies
    together = KindDetectors(S, keys.WINDOW_10S)
    calls = []
    step = DetectorBank.step

    def counted(*args: Any, **kwargs: Any) -> StepResult:
        calls.append(1)
        return step(*args, **kwargs)

    monkeypatch.setattr(DetectorBank, "step", counted)
    got = together.detect_many({0: wins, 1: wins})
    found_together = sorted(got[0].anomalies + got[1].anomalies, key=lambda a: a.window_start_ms)
    assert {a.entity for a in found_apart} == {"d1|temp"}  # the spike, in both partitions
    assert seen(apart, found_apart) == seen(together, found_together)
    assert len(calls) <= 2 * 130  # a round per step of a device (sensors: two calls a round)


_NAMES = st.one_of(
    st.binary(max_size=24),
    st.builds(
        lambda e, s, c: f"{e}~{s}{c}".encode(),
        st.sampled_from(["d1|temp", "", "~", "d2|temp~x"]),
        st.sampled_from(["mean", "max", "flat", "median", ""]),
        st.one_of(
            st.just(""),
            # digits of every kind: int() takes some that str.isdigit() calls digits, not all
            st.text(st.characters(categories=("Nd", "No")), max_size=2).map(lambda t: f"~{t}"),
            st.text(max_size=3).map(lambda t: f"~{t}"),
        ),
    ),
)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(_NAMES, st.binary(max_size=300), max_size=12))
def test_any_stored_detector_hash_restores_without_raising(stored: dict[bytes, bytes]) -> None:
    """Whatever the partition's detector hash holds (names and bytes another writer left),
    a restore refuses what it cannot load and the detectors step on."""
    det = KindDetectors(S, keys.WINDOW_10S)
    det.restore(0, stored)
    found = det.detect(0, windows_of([1.0, 2.0]))
    assert REPLAY_FIELD in found.fields
