"""Anomalies read back from a real Valkey (``dashboard.anomalies``), and ``pulse similar`` /
``pulse anomalies`` run as a user would: records written with the contract's codec and keys
(``schemas.anomaly``, ``schemas.keys``) into several partitions of both kinds."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import redis

from dashboard import anomalies as an
from dashboard.queries import reader_client
from pipeline.stack.testing import RunningStack
from schemas import keys
from schemas.anomaly import (
    FEED_FIELDS,
    VECTOR_DIM,
    AnomalyRecord,
    anomaly_id,
    encode_record,
    parse_anomaly_id,
)
from schemas.events import EventKind

pytestmark = pytest.mark.integration

SENSOR, APPLOG = EventKind.SENSOR, EventKind.APPLOG
PARTS: list[an.Part] = [(SENSOR, 0), (SENSOR, 2), (SENSOR, 5), (APPLOG, 1), (APPLOG, 3)]


@pytest.fixture
def valkey(fresh_stack: Callable[..., RunningStack]) -> Iterator[RunningStack]:
    """A private Valkey primary on a free port (no replica, no Kafka)."""
    running = fresh_stack(start=False, replica=False)
    running.stack.primary.start()
    yield running


@pytest.fixture
def raw(valkey: RunningStack) -> Iterator[redis.Redis]:
    client = reader_client(valkey.store_settings)
    try:
        yield client
    finally:
        client.close()


def put(r: redis.Redis, rec: AnomalyRecord) -> None:
    """Write one anomaly as the worker does: record, time index, feed entry."""
    pipe = r.pipeline(transaction=True)
    pipe.hset(keys.anomalies_key(rec.kind, rec.partition), rec.id, encode_record(rec))
    pipe.zadd(keys.anomaly_index_key(rec.kind, rec.partition), {rec.id: rec.window_start_ms})
    values = (rec.id, rec.entity, rec.signal, rec.cause, rec.score, rec.window_start_ms, rec.value)
    pipe.xadd(
        keys.feed_key(rec.kind, rec.partition),
        dict(zip(FEED_FIELDS, values, strict=True)),
        maxlen=keys.FEED_CAP,
        approximate=True,
    )
    pipe.execute()


def make(
    kind: EventKind, partition: int, start: int, entity: str, vector: np.ndarray
) -> AnomalyRecord:
    signal = "mean" if kind is SENSOR else "error_rate"
    return AnomalyRecord(
        id=anomaly_id(kind.value, partition, start, entity, signal),
        kind=kind.value, partition=partition, entity=entity, signal=signal, cause="shift",
        window_start_ms=start, window_ms=10_000, score=0.97, value=3.5, expected=1.0,
        context={"rank": 1}, vector=np.asarray(vector, dtype=np.float32),
    )  # fmt: skip


def pulse(valkey: RunningStack, home: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **valkey.env(), "PULSE_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *argv],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def test_similar_and_anomalies_read_the_store(
    valkey: RunningStack, raw: redis.Redis, tmp_path: Path
) -> None:
    now = time.time_ns() // 1_000_000
    latest = now - now % 10_000 - 60_000  # recent windows, well inside `--since 1h`
    rng = np.random.default_rng(20251128)
    recs: list[AnomalyRecord] = []
    for i in range(60):
        kind, part = PARTS[i % len(PARTS)]
        entity = f"dev-{i:02d}|temp" if kind is SENSOR else f"svc-{i:02d}"
        recs.append(make(kind, part, latest - i * 10_000, entity, rng.standard_normal(VECTOR_DIM)))
    base = rng.standard_normal(VECTOR_DIM)
    query = make(SENSOR, 2, latest - 5_000_000, "dev-query|temp", base)  # 83 min ago
    twin = make(APPLOG, 3, latest - 6_000_000, "svc-twin", base + 0.02 * rng.standard_normal(32))
    for rec in [*recs, query, twin]:
        put(raw, rec)
    # a hostile record in a partition of its own: skipped and counted, never fatal
    raw.hset(keys.anomalies_key(SENSOR, 7), query.id.replace(".2:", ".7:"), b"PA\x01junk")

    res = pulse(valkey, tmp_path, "similar", query.id, "-k", "5")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].startswith(f"anomaly {query.id}: dev-query|temp mean shift")
    first = lines[2].split()
    assert first[:3] == ["1", twin.id, "svc-twin"] and float(first[-1]) > 0.99
    assert len(lines) == 2 + 5 + 1
    assert "62 anomalies, built from the store; skipped 1 unreadable record" in lines[-1]
    assert (tmp_path / "similar" / "similar.hnsw").is_file()  # under PULSE_HOME

    # the twin expires from the store: the saved index, reconciled, no longer returns it
    raw.hdel(keys.anomalies_key(APPLOG, 3), twin.id)
    raw.zrem(keys.anomaly_index_key(APPLOG, 3), twin.id)
    res = pulse(valkey, tmp_path, "similar", query.id, "-k", "5")
    assert res.returncode == 0, res.stderr
    assert twin.id not in res.stdout and "61 anomalies, +0 -1 from the store" in res.stdout
    assert res.stdout.splitlines()[2].split()[0] == "1"

    res = pulse(valkey, tmp_path, "similar", twin.id)
    assert res.returncode == 1 and res.stdout == ""
    assert (
        res.stderr == f"pulse similar: no anomaly {twin.id} in the store (unknown, or expired).\n"
    )

    res = pulse(valkey, tmp_path, "anomalies", "--since", "1h", "-n", "7")
    assert res.returncode == 0, res.stderr
    listed = [line.split()[2] for line in res.stdout.splitlines()[1:]]
    assert listed == [r.id for r in recs[:7]]  # newest first, across partitions of both kinds
    assert {parse_anomaly_id(i)[0] for i in listed} == {"sensor", "applog"}
    res = pulse(valkey, tmp_path, "anomalies", "--since", "2h", "-n", "100")
    assert query.id in res.stdout and twin.id not in res.stdout
    assert len(res.stdout.splitlines()) == 1 + 61


def test_the_reader_library_on_a_real_store(raw: redis.Redis) -> None:
    t0 = 1_764_321_000_000
    rng = np.random.default_rng(3)
    recs = [
        make(*PARTS[i % len(PARTS)], t0 + i * 10_000, f"e{i}", rng.standard_normal(VECTOR_DIM))
        for i in range(25)
    ]
    for rec in recs:
        put(raw, rec)
    parts = an.discover_partitions(raw)
    assert set(parts) == set(PARTS)
    newest = sorted(recs, key=lambda r: r.window_start_ms, reverse=True)
    got = an.recent(raw, parts, since_ms=t0 + 30_000, until_ms=t0 + 200_000, limit=4)
    assert [r.id for r in got.records] == [
        r.id for r in newest if r.window_start_ms <= t0 + 200_000
    ][:4]
    fed = an.feed(raw, parts, n=9)
    assert [e.id for e in fed.entries] == [r.id for r in newest[:9]] and fed.skipped == 0
    one = an.get(raw, recs[11].id)
    assert one is not None and one.context == {"rank": 1}
    np.testing.assert_array_equal(one.vector, recs[11].vector)
    src = an.StoreVectors(raw, parts)
    assert src.ids() == {r.id for r in recs}
    vectors = src.vectors([r.id for r in recs])
    assert all(np.array_equal(vectors[r.id], r.vector) for r in recs) and src.skipped == 0
