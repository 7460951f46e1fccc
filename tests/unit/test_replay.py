"""``pulse replay``'s pure part: the range, the refusals, the rebuild (it must classify and
aggregate exactly as the worker does) and the ``pulse_replace`` call it builds."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import numpy as np
import orjson
import pytest

from pipeline import batch as worker_batch
from pipeline.batch import BatchRules, PartitionState, Record
from pipeline.replay import (
    MINUTE_MS,
    Rebuild,
    ReplayRange,
    ReplayRefused,
    anomaly_board,
    check_closed,
    range_key,
    replace_call,
    replay_bounds,
)
from pipeline.replay_command import _runs
from pipeline.state import WindowState
from pipeline.validation import TimeBounds
from schemas import keys, packed
from schemas.argtypes import parse_time
from schemas.events import EventKind

SENSOR, APPLOG = EventKind.SENSOR, EventKind.APPLOG
LATENESS = 30_000
T0 = 1_800_000_000_000 - 1_800_000_000_000 % MINUTE_MS
NOW = T0 + 3_600_000
BOUNDS = TimeBounds(6 * 3_600_000, 300_000)
RULES = BatchRules(BOUNDS, LATENESS)


def test_the_range_is_whole_minutes() -> None:
    r = ReplayRange.aligned(T0 + 1_500, T0 + 2 * MINUTE_MS + 1)
    assert (r.start, r.end) == (T0, T0 + 3 * MINUTE_MS)
    assert ReplayRange.aligned(T0, T0 + MINUTE_MS) == ReplayRange(T0, T0 + MINUTE_MS)
    assert r.holds(T0) and r.holds(T0 + 2 * MINUTE_MS + 50_000) and not r.holds(r.end)
    for t1, t2 in ((T0, T0), (T0 + 1, T0)):
        with pytest.raises(ValueError, match="must be after --from"):
            ReplayRange.aligned(t1, t2)


def test_times_parse_like_pulse_top() -> None:
    assert parse_time("2027-01-15T08:00") == parse_time("2027-01-15T08:00:00+00:00")
    assert parse_time("1800000000") == 1_800_000_000_000
    assert parse_time("1800000000123") == 1_800_000_000_123
    with pytest.raises(ValueError, match="expected a time"):
        parse_time("yesterday")


def test_a_range_that_is_not_closed_is_refused() -> None:
    r = ReplayRange(T0, T0 + MINUTE_MS)
    check_closed(SENSOR, 3, r, r.end)  # closed exactly at its end
    with pytest.raises(ReplayRefused, match="sensor partition 3 is not closed") as err:
        check_closed(SENSOR, 3, r, r.end - 1)
    assert str(err.value).count(".") >= 1 and "\n" not in str(err.value)
    with pytest.raises(ReplayRefused, match="no watermark"):
        check_closed(APPLOG, 0, r, None)


def test_the_age_bound_reaches_the_range() -> None:
    r = ReplayRange(T0, T0 + MINUTE_MS)
    assert replay_bounds(r, BOUNDS, LATENESS, T0 + 60_000) == BOUNDS
    wide = replay_bounds(r, BOUNDS, LATENESS, T0 + 2 * 86_400_000)
    assert wide.max_skew_ms == BOUNDS.max_skew_ms
    assert wide.max_age_ms > 2 * 86_400_000


def sensor_record(offset: int, t: int, device: str, value: float) -> Record:
    ev = {
        "device_id": device, "site": f"s{hash(device) % 2}", "event_time": t,
        "metric": ("temp", "hum")[offset % 2], "value": value, "unit": "C",
        "lat": 1.0, "lon": 2.0, "firmware": "1",
    }  # fmt: skip
    return Record(offset, None, orjson.dumps(ev))


def stream(n: int, seed: int) -> list[Record]:
    """A partition's records: mostly in order, some out of order within the lateness, some
    late, some invalid."""
    rng = random.Random(seed)
    out = []
    t = T0 - 5 * MINUTE_MS
    for i in range(n):
        t += rng.randrange(0, 900)
        jitter = rng.choice([0, 0, 0, -rng.randrange(0, 25_000), -rng.randrange(30_000, 200_000)])
        if rng.random() < 0.02:
            out.append(Record(i, None, b'{"not": "an event"}'))
            continue
        out.append(sensor_record(i, t + jitter, f"d{rng.randrange(6)}", rng.uniform(-50, 50)))
    return out


def worker_values(records: list[Record]) -> dict[tuple[str, str, int], dict[str, bytes]]:
    """What the worker's path (process -> absorb, in polls) holds for every window instance."""
    state = PartitionState(windows=WindowState(SENSOR, 0, RULES.plan))
    for lo in range(0, len(records), 137):
        b = worker_batch.process(SENSOR, 0, records[lo : lo + 137], state, RULES, NOW)
        worker_batch.absorb(state, b, RULES)
        worker_batch.commit(state, b, evict=False)
    assert state.windows is not None
    return state.windows.values()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_rebuild_equals_the_worker_from_a_later_start(seed: int) -> None:
    records = stream(1500, seed)
    rng = ReplayRange(T0, T0 + 4 * MINUTE_MS)
    want = worker_values(records)
    # start where no earlier event lies above T1 + lateness (what offsets_for_times finds)
    times = [orjson.loads(r.value)["event_time"] if r.value and b"device_id" in r.value else 0
             for r in records]  # fmt: skip
    start = max(i for i in range(len(records)) if max(times[:i], default=0) < rng.start)
    assert start > 100
    rb = Rebuild(SENSOR, rng, RULES.plan, LATENESS, BOUNDS)
    for lo in range(start, len(records), 211):
        part = records[lo : lo + 211]
        rb.feed(0, [r.offset for r in part], [r.value for r in part], NOW)
    prog = rb.progress(0)
    assert prog.closed and prog.late > 0 and prog.invalid > 0
    got = {(d.window.name, d.dim, d.start_ms): d for d in rb.instances(0)}
    expected = {ik: v for ik, v in want.items() if rng.holds(ik[2])}
    assert set(got) == set(expected)
    for ik, d in got.items():
        assert sorted(d.names) == sorted(expected[ik])
        mine = packed.decode(packed.encode(d.table), rb.nf)
        theirs = packed.decode([expected[ik][n] for n in d.names], rb.nf)
        np.testing.assert_array_equal(mine.stats[:, 0], theirs.stats[:, 0])  # counts
        np.testing.assert_allclose(mine.stats, theirs.stats, rtol=1e-9)
        np.testing.assert_array_equal(mine.code, theirs.code)
        np.testing.assert_array_equal(mine.count, theirs.count)


def test_events_after_the_close_change_nothing() -> None:
    rng = ReplayRange(T0, T0 + MINUTE_MS)
    rb = Rebuild(SENSOR, rng, RULES.plan, LATENESS, BOUNDS)
    rb.feed(0, [0, 1], [sensor_record(0, T0 + 5, "d1", 1.0).value,
                        sensor_record(1, rng.end + LATENESS, "d1", 2.0).value], NOW)  # fmt: skip
    assert rb.progress(0).closed
    rb.feed(0, [2], [sensor_record(2, rng.end - 1, "d1", 9.0).value], NOW)
    assert rb.progress(0).events == 1 and rb.progress(0).late == 1
    # advance: later rows of the archive only raise the maximum
    rb2 = Rebuild(SENSOR, rng, RULES.plan, LATENESS, BOUNDS)
    rb2.advance(0, np.array([rng.end + LATENESS], dtype=np.int64))
    rb2.feed(0, [5], [sensor_record(5, T0 + 1, "d1", 1.0).value], NOW)
    assert rb2.progress(0).closed and rb2.progress(0).events == 0


def applog_record(offset: int, t: int, service: str, status: int, latency: float) -> bytes:
    return orjson.dumps({
        "service": service, "route": "/r", "event_time": t, "level":
        "ERROR" if status >= 500 else "INFO", "status_code": status, "latency_ms": latency,
        "trace_id": f"t{offset}",
    })  # fmt: skip


def test_the_call_writes_boards_whole_and_deletes_the_rest() -> None:
    rng = ReplayRange(T0, T0 + 2 * MINUTE_MS)
    rb = Rebuild(APPLOG, rng, RULES.plan, LATENESS, BOUNDS)
    vals = [applog_record(i, T0 + i * 1000, f"svc{i % 2}", (200, 503)[i % 3 == 0], 10.0 + i)
            for i in range(90)]  # fmt: skip
    for lo in range(0, 90, 7):  # many polls: a board's counts are still the totals
        rb.feed(3, list(range(lo, min(lo + 7, 90))), vals[lo : lo + 7], NOW)
    stale = keys.board_key(APPLOG, 3, keys.Board.SERVICE_ERRORS, T0 + MINUTE_MS + 0)
    gone = keys.window_key(APPLOG, 3, keys.WINDOW_1M, keys.Dim.SERVICE, T0 - MINUTE_MS)
    anomalies = anomaly_board(APPLOG, 3, [("svc0", T0 + 10_000), ("svc0", T0 + 20_000)],
                              RULES.retention)  # fmt: skip
    call = replace_call(APPLOG, 3, rng, rb.instances(3), anomalies, [stale, "x:extra"],
                        RULES.retention, NOW)  # fmt: skip
    z = {w.key: dict(zip(w.members, w.scores, strict=True)) for w in call.zsets}
    assert all(w.mode == "set" for w in call.zsets)
    req = z[keys.board_key(APPLOG, 3, keys.Board.SERVICE_REQUESTS, T0)]
    assert req == {"svc0": 30.0, "svc1": 30.0}
    errors = z[keys.board_key(APPLOG, 3, keys.Board.SERVICE_ERRORS, T0)]
    assert errors == {"svc0": 10.0, "svc1": 10.0}
    assert z[keys.board_key(APPLOG, 3, keys.Board.SERVICE_ANOMALIES, T0)] == {"svc0": 2.0}
    assert stale in z  # written, not deleted: minute 2 has errors too
    assert call.delete == ["x:extra"] and gone not in call.delete
    written = {w.key for w in call.hashes}
    assert keys.window_key(APPLOG, 3, keys.WINDOW_10S, keys.Dim.FLEET, T0) in written
    key_list, args = call.payload()
    assert key_list[0] == keys.progress_key(APPLOG, 3)
    header = orjson.loads(args[0])
    assert header["closed"] == rng.end
    assert len(key_list) == 1 + len(header["h"]) + len(header["z"]) + len(header["x"])
    assert len(args) == 1 + 2 * sum(n for _, _, n in header["h"])
    # an expired instance is not written (the worker's would be gone too)
    late = replace_call(APPLOG, 3, rng, rb.instances(3), [], [], RULES.retention,
                        NOW + 7 * 3_600_000 * 1000)  # fmt: skip
    assert late.hashes == [] and late.zsets == []


def test_range_keys_are_the_partitions_windows_and_boards_in_the_range() -> None:
    rng = ReplayRange(T0, T0 + MINUTE_MS)
    plan = RULES.plan
    assert range_key(SENSOR, 2, keys.window_key(SENSOR, 2, keys.WINDOW_10S, "metric", T0 + 50_000),
                     rng, plan)  # fmt: skip
    assert range_key(SENSOR, 2, keys.board_key(SENSOR, 2, "device.max.co2", T0), rng, plan)
    assert not range_key(SENSOR, 2, keys.board_key(SENSOR, 3, "site.events", T0), rng, plan)
    assert not range_key(SENSOR, 2, keys.board_key(SENSOR, 2, "site.events", rng.end), rng, plan)
    assert not range_key(SENSOR, 2, keys.window_key(SENSOR, 2, keys.WINDOW_10S, "site", T0),
                         rng, plan)  # fmt: skip  # 10 s site windows are not kept
    assert not range_key(SENSOR, 2, keys.progress_key(SENSOR, 2), rng, plan)
    assert not range_key(SENSOR, 2, keys.detector_key(SENSOR, 2), rng, plan)


def test_runs_merge_two_offset_lists_in_order() -> None:
    a = np.array([1, 2, 5, 9], dtype=np.int64)
    b = np.array([3, 4, 10], dtype=np.int64)
    assert _runs(a, b) == [(True, 0, 2), (False, 0, 2), (True, 2, 4), (False, 2, 3)]
    assert _runs(a, np.zeros(0, np.int64)) == [(True, 0, 4)]
    assert _runs(np.zeros(0, np.int64), b) == [(False, 0, 3)]


@pytest.mark.parametrize(
    ("url", "said"),
    [
        ("nosuchproto://x", "cannot use the archive at nosuchproto://x: Protocol not known"),
        ("{tmp}/arch", "cannot be read"),
    ],
)
def test_an_archive_that_cannot_be_read_refuses_the_replay(
    tmp_path: Path, url: str, said: str
) -> None:
    from pipeline.archive.layout import progress_path
    from pipeline.replay import ReplayRange, ReplayRefused
    from pipeline.replay_command import ReplayConfig, read_archive
    from pipeline.settings import WorkerSettings

    marker = tmp_path / "arch" / progress_path(EventKind.SENSOR, 0)
    marker.parent.mkdir(parents=True)
    marker.write_bytes(b"{damaged")
    rng = ReplayRange.aligned(1_790_000_000_000, 1_790_000_060_000)
    cfg = ReplayConfig.from_settings(rng, WorkerSettings(), url.format(tmp=tmp_path))
    with pytest.raises(ReplayRefused) as exc:
        asyncio.run(read_archive(cfg, {}, {}))
    assert said in str(exc.value) and str(exc.value).endswith(".")
