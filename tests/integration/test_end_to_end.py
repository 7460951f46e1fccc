"""End to end on real Kafka and Valkey: loadgen -> worker -> store equals the truth exactly."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import pytest
import redis

from loadgen.generator import build_fleet
from pipeline.stack.testing import RunningStack
from schemas import keys, packed
from schemas.events import EventKind
from tests.integration.harness import Pipeline

pytestmark = pytest.mark.integration


def store_totals(client: redis.Redis, partitions: int) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for kind in EventKind:
        t = {"events": 0, "late": 0, "dead": 0}
        for p in range(partitions):
            row = client.hgetall(keys.progress_key(kind, p))
            for name in t:
                t[name] += int(row.get(name, 0))
        out[kind.value] = t
    return out


def test_pipeline_counts_every_event_exactly_once(
    stack: RunningStack, store: redis.Redis, tmp_path: Path
) -> None:
    pl = Pipeline.create(stack, tmp_path)
    truth_file = tmp_path / "truth.json"
    truth = pl.loadgen(
        "--rate=0", "--duration=20", "--devices=40", "--services=4", "--seed=11",
        "--bad-rate=0.01", "--late-rate=0.02", "--anomaly-rate=0.3", truth=truth_file,
    )  # fmt: skip
    produced = sum(truth["produced"].values())
    assert produced == 20_000
    assert sum(truth["dead"].values()) > 100 and sum(truth["late"].values()) > 50

    worker = pl.worker()
    try:
        pl.wait_applied(store, alive=worker.alive)
    finally:
        assert worker.stop() == 0, worker.tail()

    totals = store_totals(store, stack.kafka_settings.partitions)
    for kind in ("sensor", "applog"):
        assert totals[kind] == {
            "events": truth["events"][kind],
            "late": truth["late"][kind],
            "dead": truth["dead"][kind],
        }

    res = pl.verify(truth_file)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "verify: OK" in res.stdout

    # every device's latest position is in its partition's geo set, and `pulse near` finds it
    fleet = build_fleet(11, 40, 4)
    where: dict[str, tuple[float, float]] = {}
    for p in range(stack.kafka_settings.partitions):
        members = cast(list[str], store.zrange(keys.geo_key(p), 0, -1))
        for name, pos in zip(members, store.geopos(keys.geo_key(p), *members), strict=True):
            assert name not in where and pos is not None
            where[name] = (pos[1], pos[0])
    assert sorted(where) == sorted(fleet.device_ids)
    for d, lat, lon in zip(fleet.device_ids, fleet.device_lat, fleet.device_lon, strict=True):
        assert abs(where[d][0] - lat) < 1e-4 and abs(where[d][1] - lon) < 1e-4
    d0, lat0, lon0 = fleet.device_ids[0], fleet.device_lat[0], fleet.device_lon[0]
    res = pl.pulse("near", str(lat0), str(lon0), "--km=0.5", "-n=50")
    assert res.returncode == 0, res.stderr
    assert d0 in res.stdout

    # The dead-letter and late topics are at-least-once (a record is sent again after a re-read):
    # compare the distinct source positions with the truth per input partition, not raw counts.
    ends = pl.end_offsets()
    for topic, counted, reason in (("deadletter", "dead", b""), ("late", "late", b"late:")):
        positions = set()
        for msg in pl.read_topic(topic):
            headers = dict(msg.headers)
            assert headers["pulse.reason"] and headers["pulse.reason"].startswith(reason), topic
            source = headers["pulse.source.topic"].decode()
            part = int(headers["pulse.source.partition"])
            offset = int(headers["pulse.source.offset"])
            assert 0 <= offset < ends[(source, part)], (topic, source, part, offset)
            positions.add((source, part, offset))
        want = {
            (pl.topics[kind], int(p)): row[counted]
            for kind in ("sensor", "applog")
            for p, row in truth["per_partition"][kind].items()
        }
        got = dict.fromkeys(want, 0)
        for source, part, _ in positions:
            got[(source, part)] += 1
        assert got == want, topic


def test_verify_catches_a_tampered_store(
    stack: RunningStack, store: redis.Redis, tmp_path: Path
) -> None:
    pl = Pipeline.create(stack, tmp_path)
    truth_file = tmp_path / "truth.json"
    pl.loadgen("--rate=0", "--duration=3", "--devices=5", "--services=2", "--seed=3",
               truth=truth_file)  # fmt: skip
    worker = pl.worker()
    try:
        pl.wait_applied(store, alive=worker.alive)
    finally:
        worker.stop()
    assert pl.verify(truth_file).returncode == 0
    # one event counted twice in one window: verify must notice and say where
    raw = stack.redis(decode=False)
    key = next(store.scan_iter(match=keys.window_pattern(EventKind.SENSOR, keys.WINDOW_1M)))
    entity, value = next(iter(cast(dict[bytes, bytes], raw.hgetall(key)).items()))
    t = packed.decode([value])
    t.stats[0, packed.COUNT] += 1
    t.count[0] += 1
    raw.hset(key, entity, packed.encode(t)[0])
    res = pl.verify(truth_file)
    assert res.returncode == 1
    assert "MISMATCH" in res.stdout and entity.decode() in res.stdout
