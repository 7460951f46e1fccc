"""Analytics end to end on real Kafka and Valkey: anomalies and leaderboards, exactly once.

An hour of simulated traffic with injected anomalies goes through a worker that is SIGKILLed
part-way and replaced. The anomalies in the store must then be exactly the ones the pure
detectors raise on the same windows (same ids, each once in the records and the live feed),
precision and recall against the injected episodes are measured per kind, and the boards
match the truth.
"""

from __future__ import annotations

import types
from collections import defaultdict
from pathlib import Path
from typing import Any, TypedDict, cast

import orjson
import pytest
import redis

from loadgen.generator import GenConfig, Generator
from pipeline import aggregation, quality, windows
from pipeline.detection import DETECT_DIMS, KindDetectors
from pipeline.stack.testing import RunningStack
from schemas import anomaly, keys
from schemas.events import EventKind
from tests.integration.harness import Pipeline, wait_for

pytestmark = pytest.mark.integration


class Run(TypedDict):
    seed: int
    duration: int
    sim_rate: int
    devices: int
    services: int
    anomaly_rate: float
    anomaly_after: int


RUN: Run = {
    "seed": 5,
    "duration": 3600,
    "sim_rate": 100,
    "devices": 30,
    "services": 4,
    "anomaly_rate": 0.5,
    "anomaly_after": 1800,
}


def expected_anomalies(truth: dict[str, Any], lateness_ms: int) -> dict[str, anomaly.AnomalyRecord]:
    """The anomalies the pure detectors raise on each partition's closed 10 s windows."""
    cfg = GenConfig(
        seed=RUN["seed"],
        start_ms=truth["start_ms"],
        rate=0,
        duration_s=RUN["duration"],
        devices=RUN["devices"],
        services=RUN["services"],
        anomaly_rate=RUN["anomaly_rate"],
        anomaly_after_s=RUN["anomaly_after"],
        sim_rate=RUN["sim_rate"],
        sensor_partitions=truth["partitions"]["sensor"],
        applog_partitions=truth["partitions"]["applog"],
        sensor_topic=truth["topics"]["sensor"],
        applog_topic=truth["topics"]["applog"],
    )
    events: dict[tuple[EventKind, int], list[Any]] = defaultdict(list)
    for chunk in Generator(cfg):
        for r in chunk.records:
            kind = EventKind.SENSOR if r.topic == cfg.sensor_topic else EventKind.APPLOG
            events[(kind, r.partition)].append(types.SimpleNamespace(**orjson.loads(r.value)))
    out: dict[str, anomaly.AnomalyRecord] = {}
    for kind in EventKind:
        det = KindDetectors(kind, keys.WINDOW_10S)
        for (k, p), evs in sorted(events.items()):
            if k is not kind:
                continue
            cols = (
                aggregation.sensor_columns(evs)
                if kind is EventKind.SENSOR
                else aggregation.applog_columns(evs)
            )
            # never None: the partition has events
            wm = cast(int, windows.watermark(max(e.event_time for e in evs), lateness_ms))
            plan = [(keys.WINDOW_10S, (DETECT_DIMS[kind],))]
            for d in sorted(aggregation.aggregate(cols, plan), key=lambda d: d.start_ms):
                if d.start_ms + keys.WINDOW_10S.size_ms <= wm:
                    for a in det.detect(p, [(d.start_ms, list(d.names), d.table)]).anomalies:
                        out[a.id] = a
    return out


def stored_anomalies(raw: redis.Redis, partitions: int) -> dict[str, anomaly.AnomalyRecord]:
    records, bad = quality.read_anomalies(raw, partitions)
    assert bad == 0
    return {r.id: r for r in records}


def test_anomalies_and_boards_exactly_once_through_a_crash(
    stack: RunningStack, store: redis.Redis, tmp_path: Path
) -> None:
    pl = Pipeline.create(stack, tmp_path)
    truth_file = tmp_path / "truth.json"
    truth = pl.loadgen(
        "--rate=0",
        f"--sim-rate={RUN['sim_rate']}",
        f"--duration={RUN['duration']}",
        f"--devices={RUN['devices']}",
        f"--services={RUN['services']}",
        f"--seed={RUN['seed']}",
        f"--anomaly-rate={RUN['anomaly_rate']}",
        f"--anomaly-after={RUN['anomaly_after']}",
        truth=truth_file,
    )
    total = sum(truth["produced"].values())
    raw = stack.redis(decode=False)
    parts = stack.kafka_settings.partitions

    # a small poll size makes many applies; the first worker dies a third of the way in
    first = pl.worker("w1", PULSE_WORKER_BATCH_MAX="500")
    try:
        wait_for(lambda: pl.applied_total(store) >= total // 3, "a third applied", 180, first.alive)
    finally:
        first.kill()
    assert pl.owned_by(store, "w1"), "the killed worker applied nothing"
    assert pl.applied_total(store) < total, "the kill came after the last apply"
    second = pl.worker("w2")
    try:
        pl.wait_applied(store, alive=second.alive)
    finally:
        assert second.stop() == 0, second.tail()

    lateness_ms = round(float(pl.env.get("PULSE_WORKER_ALLOWED_LATENESS_S", "30")) * 1000)
    want = expected_anomalies(truth, lateness_ms)
    got = stored_anomalies(raw, parts)
    assert want, "the run raised no anomaly at all"
    assert sorted(got) == sorted(want)
    for aid, rec in got.items():
        w = want[aid]
        assert (rec.entity, rec.signal, rec.cause, rec.window_start_ms) == (
            w.entity,
            w.signal,
            w.cause,
            w.window_start_ms,
        )
        assert rec.score == pytest.approx(w.score, abs=1e-6)
        assert rec.vector.tolist() == pytest.approx(w.vector.tolist(), abs=1e-5)

    # each anomaly once on the live feed and once in the time index
    feed_ids: list[bytes] = []
    indexed = 0
    for kind in EventKind:
        for p in range(parts):
            feed = cast(list[tuple[bytes, dict[bytes, bytes]]], raw.xrange(keys.feed_key(kind, p)))
            feed_ids += [f[b"id"] for _, f in feed]
            indexed += raw.zcard(keys.anomaly_index_key(kind, p))
    assert sorted(i.decode() for i in feed_ids) == sorted(got)
    assert indexed == len(got)

    # the anomaly boards count each anomaly once, in its 1m instance
    counted: dict[str, int] = defaultdict(int)
    for kind, board in (
        (EventKind.SENSOR, keys.Board.DEVICE_ANOMALIES),
        (EventKind.APPLOG, keys.Board.SERVICE_ANOMALIES),
    ):
        for p in range(parts):
            for key in raw.scan_iter(match=keys.board_key(kind, p, board, 0)[:-1] + "*"):
                scored = cast(list[tuple[bytes, float]], raw.zrange(key, 0, -1, withscores=True))
                for member, n in scored:
                    counted[f"{kind.value}:{member.decode()}"] += int(n)
    per_member: dict[str, int] = defaultdict(int)
    for rec in got.values():
        dim = DETECT_DIMS[EventKind(rec.kind)]
        per_member[f"{rec.kind}:{keys.board_member(dim, rec.entity)}"] += 1
    assert dict(counted) == dict(per_member)

    # the site board's counts add up to the events the truth counted
    site_events = 0
    for p in range(parts):
        for key in raw.scan_iter(
            match=keys.board_key(EventKind.SENSOR, p, keys.Board.SITE_EVENTS, 0)[:-1] + "*"
        ):
            scored = cast(list[tuple[bytes, float]], raw.zrange(key, 0, -1, withscores=True))
            site_events += sum(int(n) for _, n in scored)
    assert site_events == truth["events"]["sensor"]

    # quality against the injected episodes, after the detectors' learning hour
    start = truth["start_ms"] + RUN["anomaly_after"] * 1000
    q = quality.score(quality.episodes_of(truth), got.values(), from_ms=start)
    print(quality.report(q))
    # measured on this seed: sensor precision 0.87, recall 1.0; applog 0.8 and 1.0 (the offline
    # runs of docs/anomaly-detection.md measure more seeds); bounds leave room for the others
    assert q["sensor"].recall() >= 0.9 and q["sensor"].precision >= 0.8, quality.report(q)
    assert q["applog"].recall() >= 0.9 and q["applog"].precision >= 0.6, quality.report(q)

    res = pl.verify(truth_file)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
