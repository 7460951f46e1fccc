"""Delivery of generated records: to Kafka (the one Kafka I/O point) or to a JSONL file, paced.

Pacing releases records in slices of about 50 ms of traffic, sleeping until each slice is due on
a monotonic clock, so the achieved rate tracks the target without a sleep per record. Record
content never depends on pacing; only the moment a record is sent does.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

import orjson

from loadgen.generator import Chunk, Record

SLICE_S = 0.05


class Sink(Protocol):
    """Where records go."""

    async def send(self, records: Sequence[Record]) -> None:
        """Queue records for delivery, in order."""

    async def close(self) -> None:
        """Wait until everything queued is delivered, then release resources."""


@dataclass(slots=True)
class Progress:
    """Counters of a run, updated as records are sent."""

    total: int
    sent: int = 0
    sensor: int = 0
    applog: int = 0
    bad: int = 0
    late: int = 0
    started: float = 0.0
    elapsed: float = 0.0
    fault_kinds: dict[str, int] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        """Achieved records per second so far."""
        return self.sent / self.elapsed if self.elapsed > 0 else 0.0


async def run_load(
    chunks: Iterable[Chunk],
    sink: Sink,
    *,
    rate: int,
    total: int,
    sensor_topic: str,
    on_chunk: Callable[[Chunk], None] | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    progress_interval_s: float = 1.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
) -> Progress:
    """Send every chunk's records to ``sink``, paced at ``rate`` records/s (0 = unpaced)."""
    progress = Progress(total=total, started=clock())
    step = max(1, int(rate * SLICE_S)) if rate else None
    next_report = progress.started + progress_interval_s
    for chunk in chunks:
        if on_chunk is not None:
            on_chunk(chunk)
        for lo, hi in _slices(len(chunk.records), step):
            if rate:
                delay = progress.started + (chunk.first + lo) / rate - clock()
                if delay > 0:
                    await sleep(delay)
            part = chunk.records[lo:hi]
            await sink.send(part)
            progress.sent += len(part)
            now = clock()
            progress.elapsed = now - progress.started
            if on_progress is not None and now >= next_report:
                on_progress(progress)
                next_report = now + progress_interval_s
        n_sensor = sum(1 for r in chunk.records if r.topic == sensor_topic)
        progress.sensor += n_sensor
        progress.applog += len(chunk.records) - n_sensor
        progress.bad += chunk.bad
        progress.late += chunk.late_injected
        for k in chunk.fault_kinds:
            progress.fault_kinds[k] = progress.fault_kinds.get(k, 0) + 1
    await sink.close()
    progress.elapsed = clock() - progress.started
    return progress


def _slices(n: int, step: int | None) -> Iterator[tuple[int, int]]:
    if step is None:
        yield 0, n
        return
    for lo in range(0, n, step):
        yield lo, min(n, lo + step)


class KafkaSink:
    """Sends records with aiokafka to their pre-chosen partitions, in per-partition batches.

    Records are appended to one aiokafka batch per partition and each full batch is submitted
    with ``send_batch`` (aiokafka queues a partition's batches in order); acknowledgements are
    awaited in groups, never one by one, with at most ``max_pending`` records unacknowledged.
    """

    def __init__(self, producer: Any, max_pending: int) -> None:
        self._producer = producer
        self._max_pending = max_pending
        self._pending: deque[tuple[int, asyncio.Future[Any]]] = deque()
        self._pending_n = 0

    async def send(self, records: Sequence[Record]) -> None:
        """Queue records for their partitions, in order (handed to aiokafka, not yet acked)."""
        builders: dict[tuple[str, int], tuple[Any, int]] = {}
        for r in records:
            tp = (r.topic, r.partition)
            builder, n = builders.get(tp) or (self._producer.create_batch(), 0)
            if builder.append(key=r.key, value=r.value, timestamp=None) is None:
                await self._submit(tp, builder, n)
                builder, n = self._producer.create_batch(), 0
                if builder.append(key=r.key, value=r.value, timestamp=None) is None:
                    raise RuntimeError(f"a record of {len(r.value)} bytes does not fit a batch")
            builders[tp] = (builder, n + 1)
        for tp, (builder, n) in builders.items():
            await self._submit(tp, builder, n)
        while self._pending_n > self._max_pending:
            await self._drain_one()

    async def _submit(self, tp: tuple[str, int], builder: Any, n: int) -> None:
        # closed, the batch is sent at once: aiokafka holds an open one for its linger time in
        # case more records join it, and none will (measured: 20 ms on every record's way)
        builder.close()
        future = await self._producer.send_batch(builder, tp[0], partition=tp[1])
        self._pending.append((n, future))
        self._pending_n += n

    async def _drain_one(self) -> None:
        n, future = self._pending.popleft()
        self._pending_n -= n
        await future

    async def close(self) -> None:
        """Wait for every acknowledgement (a failed send raises here), then stop the producer."""
        try:
            while self._pending:
                await self._drain_one()
        finally:
            await self._producer.stop()


#: The largest produce request (aiokafka's default; the broker's G1 regions are sized above it).
MAX_REQUEST_BYTES = 1024 * 1024
#: How long a record may wait for the broker (an outage, a leader election) before the run fails.
DELIVERY_TIMEOUT_MS = 120_000
#: Pause between attempts to reach a broker that is down or has no leader for a partition yet.
RETRY_BACKOFF_MS = 250


def make_producer(
    bootstrap: str,
    security: Mapping[str, Any] | None = None,
    delivery_timeout_ms: int = DELIVERY_TIMEOUT_MS,
) -> Any:
    """An idempotent aiokafka producer waiting for all in-sync replicas; rides out outages.

    Idempotence (with ``acks=all``) makes retries safe: the broker drops a batch it already
    has by its producer id and sequence number, so a record is written once however often it is
    re-sent. aiokafka has no separate delivery timeout: ``request_timeout_ms`` bounds how long
    ``send_batch`` waits for room in a partition's queue and how long a batch may wait for a
    partition leader. Set well above a broker restart, a run keeps queueing (up to
    ``max_pending`` records, then it waits) while the broker is away and resumes where it was;
    only an outage longer than ``delivery_timeout_ms`` fails the run, loudly. ``security``:
    ``KafkaSettings.client_kwargs()``.
    """
    from aiokafka import AIOKafkaProducer

    return AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        enable_idempotence=True,
        acks="all",
        max_batch_size=256 * 1024,
        max_request_size=MAX_REQUEST_BYTES,
        request_timeout_ms=delivery_timeout_ms,
        retry_backoff_ms=RETRY_BACKOFF_MS,
        **(security or {}),
    )


async def topic_partitions(producer: Any, topics: Sequence[str]) -> dict[str, int]:
    """Partition count of each topic, from the broker's metadata (the topics must exist)."""
    from aiokafka.errors import KafkaError

    out: dict[str, int] = {}
    for topic in topics:
        try:
            parts = await producer.partitions_for(topic)
        except KafkaError as exc:
            raise RuntimeError(f"no metadata for topic {topic!r} (does it exist?): {exc}") from exc
        if not parts:
            raise RuntimeError(f"topic {topic!r} does not exist on the broker")
        out[topic] = len(parts)
    return out


class JsonlSink:
    """Writes records as JSON lines: ``{"topic","partition","key","value"}``.

    ``value`` is the payload as text; a payload that is not UTF-8 goes in ``value_b64`` instead.
    """

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream

    async def send(self, records: Sequence[Record]) -> None:
        """Append records to the file."""
        self._stream.write(b"".join(encode_jsonl(r) for r in records))

    async def close(self) -> None:
        """Flush the file (the caller owns and closes it)."""
        self._stream.flush()


def encode_jsonl(record: Record) -> bytes:
    """One JSONL line for a record."""
    line: dict[str, Any] = {
        "topic": record.topic,
        "partition": record.partition,
        "key": record.key.decode(),
    }
    try:
        line["value"] = record.value.decode()
    except UnicodeDecodeError:
        line["value_b64"] = base64.b64encode(record.value).decode()
    return orjson.dumps(line) + b"\n"


def read_jsonl(path: Path) -> Iterator[Record]:
    """The records of a JSONL file written by :class:`JsonlSink`, in order."""
    with path.open("rb") as f:
        for raw in f:
            d = orjson.loads(raw)
            value = d["value"].encode() if "value" in d else base64.b64decode(d["value_b64"])
            yield Record(d["topic"], int(d["partition"]), d["key"].encode(), value)
