"""``pulse replay`` recomputes anomalies: fresh detectors warmed up on the windows before the
range, then stepped over the rebuilt ones, raise what the worker's raised (same ids, scores,
vectors); the ``pulse_replace`` call carries them whole."""

from __future__ import annotations

import argparse
import random

import numpy as np
import orjson
import pytest

from pipeline import aggregation
from pipeline.batch import DEFAULT_PLAN, BatchRules
from pipeline.detection import KindDetectors, window_params
from pipeline.replay import (
    DETECT_WINDOW,
    MINUTE_MS,
    WARMUP_MS,
    Closing,
    Rebuild,
    Redetect,
    ReplayRange,
    anomaly_board,
    replace_call,
)
from pipeline.replay_command import _duration_arg
from pipeline.validation import TimeBounds, decode_sensor
from schemas import anomaly, keys
from schemas.events import EventKind

SENSOR = EventKind.SENSOR
LATENESS = 30_000
T0 = 1_800_000_000_000 - 1_800_000_000_000 % MINUTE_MS
NOW = T0 + 3_600_000
BOUNDS = TimeBounds(6 * 3_600_000, 300_000)
# the worker's plan while it detects: the 10 s windows keep device and service too
PLAN = ((keys.WINDOW_10S, (keys.Dim.METRIC, keys.Dim.FLEET, keys.Dim.DEVICE)), DEFAULT_PLAN[1])
RULES = BatchRules(BOUNDS, LATENESS, plan=PLAN)
RANGE = ReplayRange(T0, T0 + 6 * MINUTE_MS)
SIZE = DETECT_WINDOW.size_ms


def events(seed: int) -> list[bytes]:
    """Three devices' readings every ~3 s from 40 minutes before the range to its end, in time
    order; d1's temperature jumps and d2's sticks within the range."""
    rng = random.Random(seed)
    out = []
    t = T0 - 40 * MINUTE_MS
    while t < RANGE.end:
        for dev in ("d0", "d1", "d2"):
            value = 20.0 + rng.gauss(0.0, 0.5)
            if dev == "d1" and T0 + 2 * MINUTE_MS <= t < T0 + 3 * MINUTE_MS:
                value += 25.0
            if dev == "d2" and t >= T0 + 3 * MINUTE_MS:
                value = 21.5
            ev = {
                "device_id": dev, "site": "s1", "event_time": t + rng.randrange(1000),
                "metric": "temp", "value": round(value, 2), "unit": "C", "lat": 1.0,
                "lon": 2.0, "firmware": "1",
            }  # fmt: skip
            out.append(orjson.dumps(ev))
        t += 3_000
    return out


def windows_of(values: list[bytes], lo: int, hi: int) -> Closing:
    """The device windows of the events within [lo, hi), oldest first (what the store holds
    for the windows before the range)."""
    evs = [e for e in decode_sensor(values, NOW, BOUNDS).events if lo <= e.event_time < hi]
    deltas = aggregation.aggregate(
        aggregation.sensor_columns(evs), [(DETECT_WINDOW, (keys.Dim.DEVICE,))]
    )
    return sorted((d.start_ms, list(d.names), d.table) for d in deltas)


def live(values: list[bytes]) -> dict[str, anomaly.AnomalyRecord]:
    """What the worker's detectors raise stepping every closed window in turn."""
    det = KindDetectors(SENSOR, DETECT_WINDOW, window_params(SENSOR))
    out = {}
    for w in windows_of(values, 0, RANGE.end):
        for a in det.detect(0, [w]).anomalies:
            out[a.id] = a
    return out


def rebuild(values: list[bytes]) -> Rebuild:
    """The range rebuilt from the records, in polls of 97."""
    rb = Rebuild(SENSOR, RANGE, RULES.plan, LATENESS, BOUNDS)
    for lo in range(0, len(values), 97):
        part = values[lo : lo + 97]
        rb.feed(0, list(range(lo, lo + len(part))), list(part), NOW)
    return rb


def redetect(values: list[bytes], warmup_ms: int, rb: Rebuild) -> Redetect:
    rd = Redetect(SENSOR, RANGE, 0.5, warmup_ms)
    starts = rd.warmup_starts()
    for lo in range(0, len(starts), 50):  # slices, as the command reads the store
        s = starts[lo : lo + 50]
        rd.step({0: windows_of(values, s[0], s[-1] + SIZE)})
    rd.step({0: rd.range_windows(rb.instances(0))})
    return rd


@pytest.mark.parametrize("seed", [1, 2])
def test_a_warm_up_from_the_start_raises_the_workers_anomalies(seed: int) -> None:
    values = events(seed)
    want = {i: a for i, a in live(values).items() if RANGE.holds(a.window_start_ms)}
    assert {a.entity for a in want.values()} >= {"d1|temp", "d2|temp"}
    rd = redetect(values, 45 * MINUTE_MS, rebuild(values))
    assert rd.first_warm == T0 - 40 * MINUTE_MS
    assert rd.warm_windows == 40 * 6
    got = {a.id: a for a in rd.anomalies(0)}
    assert sorted(got) == sorted(want)
    for i, a in got.items():
        w = want[i]
        assert (a.entity, a.signal, a.cause, a.window_start_ms, a.context) == (
            w.entity,
            w.signal,
            w.cause,
            w.window_start_ms,
            w.context,
        )
        assert a.score == pytest.approx(w.score, abs=1e-6)
        assert a.value == pytest.approx(w.value, rel=1e-12)
        assert a.expected == pytest.approx(w.expected, rel=1e-9)
        np.testing.assert_allclose(a.vector, w.vector, atol=1e-5)


def test_no_warm_up_starts_the_detectors_young() -> None:
    values = events(1)
    rd = redetect(values, 0, rebuild(values))
    assert rd.warm_windows == 0 and rd.first_warm is None
    # 36 windows of the range are fewer than the detectors' 100 observations of warm-up
    assert rd.anomalies(0) == []


def test_windows_must_come_oldest_first_and_once() -> None:
    values = events(1)
    rd = Redetect(SENSOR, RANGE, 0.5, MINUTE_MS)
    assert rd.warmup_starts() == range(T0 - MINUTE_MS, T0, SIZE)
    ws = windows_of(values, T0 - MINUTE_MS, T0)
    rd.step({0: ws[3:]})
    with pytest.raises(ValueError, match="oldest first"):
        rd.step({0: ws[:3]})
    with pytest.raises(ValueError, match="oldest first"):
        rd.step({1: [ws[1], ws[0]]})


def test_the_call_replaces_the_ranges_anomalies() -> None:
    values = events(1)
    rb = rebuild(values)
    rd = redetect(values, 45 * MINUTE_MS, rb)
    found = rd.anomalies(0)
    assert found
    outside = anomaly.AnomalyRecord(
        id=anomaly.anomaly_id("sensor", 0, RANGE.end, "d0|temp", anomaly.Signal.MEAN),
        kind="sensor", partition=0, entity="d0|temp", signal=anomaly.Signal.MEAN,
        cause="spike", window_start_ms=RANGE.end, window_ms=SIZE, score=0.9, value=1.0,
        expected=0.0,
    )  # fmt: skip
    board = anomaly_board(
        SENSOR, 0, [(a.entity, a.window_start_ms) for a in found], RULES.retention
    )
    call = replace_call(
        SENSOR, 0, RANGE, rb.instances(0), board, [], RULES.retention, NOW, [*found, outside]
    )
    assert call.anomalies == sorted(found, key=lambda a: a.id)  # the one outside is dropped
    key_list, args = call.payload()
    header = orjson.loads(args[0])
    rec, idx, lo, hi, entries = header["a"]
    assert key_list[rec - 1] == keys.anomalies_key(SENSOR, 0)
    assert key_list[idx - 1] == keys.anomaly_index_key(SENSOR, 0)
    assert (lo, hi) == (RANGE.start, RANGE.end) and hi <= header["closed"]
    assert entries[0::2] == [a.id for a in call.anomalies]
    assert entries[1::2] == [a.window_start_ms for a in call.anomalies]
    pairs = 2 * sum(n for _, _, n in header["h"])
    blobs = args[1 + pairs :]
    assert [anomaly.decode_record(b).id for b in blobs] == entries[0::2]  # type: ignore[arg-type]
    assert len(key_list) == 1 + len(header["h"]) + len(header["z"]) + len(header["x"]) + 2
    counts: dict[str, float] = {}
    for z in call.zsets:
        if f":top:{keys.Board.DEVICE_ANOMALIES}:" in z.key:
            for m, n in zip(z.members, z.scores, strict=True):
                counts[m] = counts.get(m, 0.0) + n
    want: dict[str, float] = {}
    for a in found:
        m = keys.board_member(keys.Dim.DEVICE, a.entity)
        want[m] = want.get(m, 0.0) + 1.0
    assert counts == want
    # no anomaly found: the block is there, empty (the range's stored ones go)
    empty = replace_call(SENSOR, 0, RANGE, rb.instances(0), [], [], RULES.retention, NOW, [])
    assert orjson.loads(empty.payload()[1][0])["a"][4] == []
    # detection off: no block, the anomalies are left alone
    off = replace_call(SENSOR, 0, RANGE, rb.instances(0), [], [], RULES.retention, NOW)
    assert "a" not in orjson.loads(off.payload()[1][0])
    # anomalies past the worker's cut (the 1m retention) are not written
    later = NOW + (RULES.retention.seconds["1m"] + 3600) * 1000
    old = replace_call(SENSOR, 0, RANGE, rb.instances(0), [], [], RULES.retention, later, found)
    assert old.anomalies == []


def test_the_warm_up_is_a_duration() -> None:
    assert _duration_arg("0") == 0
    assert _duration_arg("90") == 90_000
    assert _duration_arg("30m") == 1_800_000
    assert _duration_arg("6h") == WARMUP_MS
    assert _duration_arg("1.5d") == 129_600_000
    for bad in ("soon", "-1h", "400d"):
        with pytest.raises(argparse.ArgumentTypeError):
            _duration_arg(bad)
