"""Input written by transactional producers: committed transactions count, aborted ones never.

A Kafka Streams app, Flink or Kafka Connect in exactly-once mode upstream writes the input in
transactions. Records of an aborted transaction stay in the log (and a read_uncommitted consumer
returns them); the worker and the replay tool read committed records only, so the store counts
each committed event once and no aborted one, before and after a replay of the range.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import orjson
import pytest
import redis

from pipeline.stack.testing import RunningStack
from schemas import keys, packed
from schemas.events import EventKind
from tests.integration.harness import Pipeline, wait_for

pytestmark = [pytest.mark.integration]

MINUTE_MS = 60_000
KEPT = 7  # events of the committed transaction
ABORTED = 5  # events of the aborted one


def _sensor(device: str, event_time: int, value: float) -> bytes:
    return orjson.dumps({
        "device_id": device, "site": "site-txn", "event_time": event_time, "metric": "temp",
        "value": value, "unit": "C", "lat": 48.1, "lon": 11.6, "firmware": "1.0.0",
    })  # fmt: skip


def _applog(event_time: int) -> bytes:
    return orjson.dumps({
        "service": "svc-txn", "route": "/x", "event_time": event_time, "level": "INFO",
        "status_code": 200, "latency_ms": 12.5, "trace_id": "t-1", "message": "",
    })  # fmt: skip


async def _produce(pl: Pipeline, then_ms: int, now_ms: int) -> None:
    """A committed transaction (device txn-kept), an aborted one (txn-aborted), both in
    sensor partition 0 at ``then_ms``; then a committed one with an event at ``now_ms`` in every
    input partition, which closes the minute of ``then_ms`` everywhere."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(
        bootstrap_servers=pl.running.bootstrap,
        transactional_id=f"pulse-test-{uuid.uuid4().hex[:8]}",
        enable_idempotence=True,
        **pl.running.kafka_settings.client_kwargs(),
    )
    await producer.start()
    try:
        sensor, applog = pl.topics["sensor"], pl.topics["applog"]
        async with producer.transaction():
            for i in range(KEPT):
                await producer.send(sensor, _sensor("txn-kept", then_ms + i, 20.0 + i), partition=0)
        await producer.begin_transaction()
        for i in range(ABORTED):
            await producer.send(sensor, _sensor("txn-aborted", then_ms + i, 90.0), partition=0)
        await producer.abort_transaction()
        async with producer.transaction():
            for p in range(pl.running.kafka_settings.partitions):
                await producer.send(sensor, _sensor("txn-after", now_ms, 21.0), partition=p)
                await producer.send(applog, _applog(now_ms), partition=p)
    finally:
        await producer.stop()


def _device_counts(stack: RunningStack, minute_ms: int) -> dict[str, int]:
    """Readings per device (all metrics) in sensor partition 0's 1-minute device windows."""
    key = keys.window_key(EventKind.SENSOR, 0, keys.WINDOW_1M, keys.Dim.DEVICE, minute_ms)
    with stack.redis(decode=False) as raw:
        rows: dict[bytes, bytes] = raw.hgetall(key)
    names = [keys.text(f).split(keys.ENTITY_SEP)[0] for f in rows]
    table = packed.decode_stats(list(rows.values()), packed.NF_SENSOR)
    out: dict[str, int] = {}
    for name, n in zip(names, table.stats[:, packed.COUNT], strict=True):
        out[name] = out.get(name, 0) + int(n)
    return out


def test_only_committed_transactions_are_applied_and_replayed(
    stack: RunningStack, store: redis.Redis, tmp_path: Path
) -> None:
    pl = Pipeline.create(stack, tmp_path)
    now_ms = int(time.time() * 1000)
    then_ms = now_ms - 3 * MINUTE_MS
    minute = keys.window_start(then_ms, keys.WINDOW_1M)
    asyncio.run(_produce(pl, then_ms, now_ms))
    ends = pl.end_offsets()
    # the log holds the aborted records and a marker after each transaction
    assert ends[(pl.topics["sensor"], 0)] == KEPT + 1 + ABORTED + 1 + 1 + 1
    worker = pl.worker()
    try:
        # every partition is applied up to its last record (its commit marker is no record)
        wait_for(
            lambda: all(pl.applied_offsets(store)[tp] >= end - 2 for tp, end in ends.items()),
            "the store applied every committed record",
            alive=worker.alive,
        )
    finally:
        assert worker.stop() == 0
    applied = _device_counts(stack, minute)
    assert applied == {"txn-kept": KEPT}, applied
    res = pl.pulse("replay", f"--from={minute}", f"--to={minute + MINUTE_MS}", "--source=kafka")
    assert res.returncode == 0, res.stderr[-3000:]
    assert _device_counts(stack, minute) == applied
    # nothing of the aborted transaction became a dead letter either
    assert all(b"txn-aborted" not in (msg.value or b"") for msg in pl.read_topic("deadletter"))
