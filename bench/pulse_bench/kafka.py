"""Kafka helpers of the benchmarks: topics, preloading, end offsets, paced production.

Below the harness in the import graph: these take the run's sizes and the Kafka settings, never
the run context (:mod:`pulse_bench.harness` imports this module, not the other way round).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pipeline.stack.kafka import run_sync

if TYPE_CHECKING:
    from loadgen.generator import GenConfig, Record
    from pulse_bench.params import BenchParams
    from schemas.settings import KafkaSettings


@dataclass(frozen=True, slots=True)
class TopicSet:
    """The four topics one pipeline run uses."""

    sensor: str
    applog: str
    deadletter: str
    late: str

    @property
    def all(self) -> list[str]:
        """Every topic of the set."""
        return [self.sensor, self.applog, self.deadletter, self.late]

    @property
    def inputs(self) -> list[str]:
        """The two input topics."""
        return [self.sensor, self.applog]


@dataclass
class Preloaded:
    """Input topics filled once per run; the drain cases all read the same records."""

    topics: TopicSet
    records: dict[str, int]  # per kind
    end_offsets: dict[tuple[str, int], int]  # (kind, partition) -> end offset
    produce_s: float
    produce_per_s: float

    @property
    def total(self) -> int:
        """Records in both input topics."""
        return sum(self.records.values())


def create_topics(bootstrap: str, names: list[str], partitions: int) -> None:
    """Create topics and wait until every partition has a leader."""
    run_sync(lambda: _create(bootstrap, names, partitions))


async def _create(bootstrap: str, names: list[str], partitions: int) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=15000)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(n, partitions, 1) for n in names])
        deadline = time.monotonic() + 60  # a loaded broker can take a while: not a speed check
        while True:
            described = await admin.describe_topics(names)
            if all(
                t["error_code"] == 0
                and len(t["partitions"]) == partitions
                and all(p["leader"] >= 0 for p in t["partitions"])
                for t in described
            ):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"topics {names} got no leaders in 60 s")
            await asyncio.sleep(0.1)
    finally:
        await admin.close()


def delete_topics(bootstrap: str, names: list[str], timeout_s: float = 60.0) -> None:
    """Delete topics (missing ones are fine) and wait until the broker no longer lists them."""
    run_sync(lambda: _delete(bootstrap, names, timeout_s))


async def _delete(bootstrap: str, names: list[str], timeout_s: float) -> None:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=15000)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        todo = [n for n in names if n in existing]
        if todo:
            await admin.delete_topics(todo)
        deadline = time.monotonic() + timeout_s
        while todo:
            listed = set(await admin.list_topics())
            todo = [n for n in todo if n in listed]
            if not todo:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"topics {todo} still listed {timeout_s:.0f} s after deletion")
            await asyncio.sleep(0.1)
    finally:
        await admin.close()


def end_offsets(bootstrap: str, topics: TopicSet, partitions: int) -> dict[tuple[str, int], int]:
    """End offset of every input partition, keyed by (kind, partition)."""
    return run_sync(lambda: _end_offsets(bootstrap, topics, partitions))


async def _end_offsets(
    bootstrap: str, topics: TopicSet, partitions: int
) -> dict[tuple[str, int], int]:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    kind_of = {topics.sensor: "sensor", topics.applog: "applog"}
    c = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await c.start()
    try:
        tps = [TopicPartition(t, p) for t in topics.inputs for p in range(partitions)]
        ends = await c.end_offsets(tps)
        return {(kind_of[tp.topic], tp.partition): off for tp, off in ends.items()}
    finally:
        await c.stop()


def gen_config(
    params: BenchParams, kafka: KafkaSettings, topics: TopicSet, **over: Any
) -> GenConfig:
    """A load generator config for ``topics`` with the run's fleet and fault rates."""
    from loadgen.generator import GenConfig

    p = params
    values: dict[str, Any] = {
        "seed": p.seed,
        "start_ms": int(time.time() * 1000),
        "rate": 0,
        "duration_s": 1,
        "devices": p.devices,
        "services": p.services,
        "anomaly_rate": 0.05,
        "bad_rate": p.bad_rate,
        "late_rate": p.late_rate,
        "sensor_partitions": kafka.partitions,
        "applog_partitions": kafka.partitions,
        "sensor_topic": topics.sensor,
        "applog_topic": topics.applog,
        **over,
    }
    return GenConfig(**values)


def preload(params: BenchParams, kafka: KafkaSettings, topics: TopicSet) -> Preloaded:
    """Produce ``params.events`` records as fast as possible (event times end now)."""
    from loadgen.generator import NOMINAL_RATE, Generator

    duration = max(1, -(-params.events // NOMINAL_RATE))
    now = int(time.time() * 1000)
    config = gen_config(params, kafka, topics, start_ms=now - duration * 1000, duration_s=duration)
    gen = Generator(config)
    records = [r for chunk in gen for r in chunk.records][: params.events]
    t0 = time.monotonic()
    run_sync(lambda: send_all(kafka.bootstrap, records))
    elapsed = time.monotonic() - t0
    ends = end_offsets(kafka.bootstrap, topics, kafka.partitions)
    counts = {"sensor": 0, "applog": 0}
    for (kind, _), end in ends.items():
        counts[kind] += end
    if sum(counts.values()) != len(records):
        raise RuntimeError(f"preloaded {len(records)} records but the topics hold {counts}")
    return Preloaded(topics, counts, ends, elapsed, len(records) / elapsed)


async def send_all(
    bootstrap: str,
    records: Sequence[Record],
    slice_size: int = 8192,
    on_slice: Callable[[int, int], None] | None = None,
    rate: float = 0.0,
) -> None:
    """Send ``records`` with the load generator's sink; paced at ``rate``/s when > 0.

    ``on_slice(lo, hi)`` is called right before ``records[lo:hi]`` are handed to the producer.
    """
    from loadgen.producer import KafkaSink, make_producer
    from loadgen.settings import LoadgenSettings

    settings = LoadgenSettings()
    producer = make_producer(bootstrap)
    await producer.start()
    sink = KafkaSink(producer, settings.max_pending)
    started = time.monotonic()
    for lo in range(0, len(records), slice_size):
        hi = min(lo + slice_size, len(records))
        if rate > 0:
            delay = started + lo / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        if on_slice is not None:
            on_slice(lo, hi)
        await sink.send(records[lo:hi])
    await sink.close()


@dataclass
class SendLog:
    """Send time (monotonic clock) of every record, per (kind, partition), in offset order."""

    kinds: dict[str, str]  # topic -> kind
    times: dict[tuple[str, int], list[float]] = field(default_factory=dict)

    def recorder(self, records: Sequence[Record]) -> Callable[[int, int], None]:
        """An ``on_slice`` callback logging the slice's records at the current time."""

        def on_slice(lo: int, hi: int) -> None:
            now = time.monotonic()
            for r in records[lo:hi]:
                self.times.setdefault((self.kinds[r.topic], r.partition), []).append(now)

        return on_slice


async def watch_committed(
    bootstrap: str,
    group: str,
    topic: str,
    ends: dict[int, int],
    alive: Callable[[], bool],
    timeout_s: float,
    interval_s: float = 0.02,
) -> list[tuple[float, int]]:
    """``(time, records committed)`` samples of ``group`` on ``topic`` until it reached ``ends``.

    ``ends``: end offset per partition. Raises RuntimeError when ``alive()`` turns false or the
    timeout passes first. Retriable broker errors (no group coordinator yet, on a broker whose
    offsets topic is still being created) are retried until then.
    """
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.errors import KafkaError

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=15000)
    await admin.start()
    samples: list[tuple[float, int]] = []
    total = sum(ends.values())
    deadline = time.monotonic() + timeout_s
    done = 0
    try:
        while True:
            try:
                committed = await admin.list_consumer_group_offsets(group)
            except KafkaError as exc:
                if not exc.retriable:
                    raise
            else:
                by_partition = {
                    tp.partition: om.offset for tp, om in committed.items() if tp.topic == topic
                }
                done = sum(min(max(by_partition.get(p, 0), 0), end) for p, end in ends.items())
                samples.append((time.monotonic(), done))
                if done >= total:
                    return samples
            now = time.monotonic()
            if not alive():
                raise RuntimeError(f"the consumer exited after {done:,} of {total:,} records")
            if now > deadline:
                raise RuntimeError(f"{done:,} of {total:,} records committed in {timeout_s:.0f} s")
            await asyncio.sleep(interval_s)
    finally:
        await admin.close()


def topics_containing(bootstrap: str, part: str) -> list[str]:
    """Topics whose name contains ``part`` (those an app created for its consumer group)."""

    async def listing() -> list[str]:
        from aiokafka.admin import AIOKafkaAdminClient

        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=15000)
        await admin.start()
        try:
            return sorted(t for t in await admin.list_topics() if part in t)
        finally:
            await admin.close()

    return run_sync(listing)
