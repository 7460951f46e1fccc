"""``pulse worker``: the Faust app whose agents aggregate both event streams into the store.

The poll reader (``pipeline.ingest``) hands each poll's records, split by event kind and
partition, to that kind's agent. The agent turns each partition's records into one atomic apply
(``pipeline.batch``), sends rejected and late records to their topics, applies everything in one
store round trip and waits until the store says it is durable; only then does the reader commit
the poll's offsets.

Failure policy (crash-only): the store's per-partition offset makes re-reading harmless, while
committing a record that was not applied would lose it. So store outages are retried in place
(state is re-read from the store, the batch re-processed), and anything unexpected ends the
process at once without committing — a restarted worker re-reads from the last committed offset.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.batch import (
    BatchRules,
    Diverted,
    PartitionBatch,
    PartitionState,
    Record,
    commit,
    process,
)
from pipeline.ingest import KafkaBatchReader, ReaderConfig
from pipeline.settings import KafkaSettings, StoreSettings, WorkerSettings
from pipeline.validation import TimeBounds
from schemas.events import EventKind

if TYPE_CHECKING:
    import faust
    import redis.asyncio as aioredis

    from pipeline.store_writer import StoreWriter

log = logging.getLogger("pulse.worker")

Clock = Callable[[], int]


def wall_clock_ms() -> int:
    """Wall-clock time in epoch milliseconds."""
    return time.time_ns() // 1_000_000


@dataclass
class Metrics:
    """Live counters of one worker process, published to the store every few seconds."""

    events: int = 0
    late: int = 0
    dead: int = 0
    batches: int = 0
    conflicts: int = 0
    store_retries: int = 0
    durability_wait_s: deque[float] = field(default_factory=lambda: deque(maxlen=2048))
    apply_s: deque[float] = field(default_factory=lambda: deque(maxlen=2048))
    started: float = field(default_factory=time.monotonic)

    def snapshot(self) -> dict[Any, Any]:
        """Flat fields for the worker's metrics hash."""

        def pct(samples: deque[float], q: float) -> float:
            return round(float(np.percentile(samples, q)) * 1000, 3) if samples else 0.0

        elapsed = max(time.monotonic() - self.started, 1e-9)
        return {
            "events": self.events,
            "late": self.late,
            "dead": self.dead,
            "batches": self.batches,
            "conflicts": self.conflicts,
            "store_retries": self.store_retries,
            "events_per_s": round(self.events / elapsed, 1),
            "apply_p50_ms": pct(self.apply_s, 50),
            "apply_p99_ms": pct(self.apply_s, 99),
            "durability_wait_p50_ms": pct(self.durability_wait_s, 50),
            "durability_wait_p99_ms": pct(self.durability_wait_s, 99),
            "updated_ms": wall_clock_ms(),
            "pid": os.getpid(),
        }


class Divert:
    """Sends rejected and late records to their topics and waits for the broker's acks."""

    def __init__(self, app: faust.App, deadletter_topic: str, late_topic: str) -> None:
        self._dead = app.topic(deadletter_topic, key_serializer="raw", value_serializer="raw")
        self._late = app.topic(late_topic, key_serializer="raw", value_serializer="raw")

    async def send(self, source_topic: str, batches: Sequence[PartitionBatch]) -> None:
        """Send every diverted record of ``batches``; return once all are acknowledged."""
        futures = []
        for b in batches:
            for topic, items in ((self._dead, b.dead), (self._late, b.late)):
                for d in items:
                    futures.append(
                        await topic.send(
                            key=d.record.key,
                            value=d.record.value or b"",
                            headers=_headers(source_topic, b.partition, d),
                            force=True,  # send now, not when the current event is acked
                        )
                    )
        if futures:
            await asyncio.gather(*futures)


def _headers(topic: str, partition: int, d: Diverted) -> list[tuple[str, bytes]]:
    return [
        ("pulse.reason", d.reason.encode()),
        ("pulse.source.topic", topic.encode()),
        ("pulse.source.partition", str(partition).encode()),
        ("pulse.source.offset", str(d.record.offset).encode()),
    ]


class PartitionApplier:
    """Per event kind: partition state cache, batch processing and the store round trip."""

    def __init__(
        self,
        kind: EventKind,
        topic: str,
        writer: StoreWriter,
        divert: Divert,
        rules: BatchRules,
        metrics: Metrics,
        clock: Clock = wall_clock_ms,
        retry_delay_s: float = 0.5,
    ) -> None:
        self.kind = kind
        self.topic = topic
        self._writer = writer
        self._divert = divert
        self._rules = rules
        self._metrics = metrics
        self._clock = clock
        self._retry_delay_s = retry_delay_s
        self._states: dict[int, PartitionState] = {}
        self._unsure = False

    async def close(self) -> None:
        """Close the store connection."""
        await self._writer.close()

    def forget(self) -> None:
        """Drop cached partition state (after a rebalance); it is re-read from the store."""
        self._states.clear()

    async def handle(self, by_partition: dict[int, list[Record]]) -> None:
        """Apply one poll's records exactly once and durably; retries store outages."""
        from redis.exceptions import ConnectionError as StoreConnectionError
        from redis.exceptions import TimeoutError as StoreTimeoutError

        pending = dict(by_partition)
        while pending:
            try:
                if self._unsure:
                    # Records we are about to acknowledge may have been applied by a write
                    # whose durability we never saw confirmed.
                    await self._writer.fence()
                    self._unsure = False
                await self._load_states(list(pending))
                pending = await self._apply_once(pending)
            except (StoreConnectionError, StoreTimeoutError, OSError) as exc:
                self._metrics.store_retries += 1
                log.warning("store unavailable (%s); retrying in %.1fs", exc, self._retry_delay_s)
                self._states.clear()
                self._unsure = True
                await asyncio.sleep(self._retry_delay_s)

    async def _load_states(self, partitions: list[int]) -> None:
        missing = [p for p in partitions if p not in self._states]
        if missing:
            self._states.update(await self._writer.read_state(self.kind, missing))

    async def _apply_once(self, pending: dict[int, list[Record]]) -> dict[int, list[Record]]:
        now = self._clock()
        batches = [
            process(self.kind, p, recs, self._states[p], self._rules, now)
            for p, recs in pending.items()
        ]
        await self._divert.send(self.topic, batches)
        t0 = time.perf_counter()
        outcomes, waited = await self._writer.apply(batches, now)
        self._metrics.apply_s.append(time.perf_counter() - t0)
        if outcomes:
            self._metrics.durability_wait_s.append(waited)
        by_part = {b.partition: b for b in batches}
        retry: dict[int, list[Record]] = {}
        for outcome in outcomes:
            b = by_part[outcome.partition]
            if outcome.applied:
                commit(self._states[b.partition], b)
                self._metrics.events += b.events
                self._metrics.late += len(b.late)
                self._metrics.dead += len(b.dead)
                self._metrics.batches += 1
            else:
                # Someone else advanced this partition (a previous owner after a rebalance,
                # or our own apply whose reply was lost): re-read and keep what is new.
                self._metrics.conflicts += 1
                self._unsure = True
                del self._states[b.partition]
                retry[b.partition] = pending[b.partition]
        return retry


def create_app(
    worker: WorkerSettings, kafka: KafkaSettings, store: StoreSettings, name: str | None = None
) -> faust.App:
    """Build the Faust app: a poll reader feeding one agent per event kind."""
    import faust
    import redis.asyncio as aioredis

    from pipeline.store_writer import Retention, StoreWriter

    worker_name = name or f"{socket.gethostname()}-{os.getpid()}"
    app = faust.App(
        worker.app_id,
        broker=f"kafka://{kafka.bootstrap}",
        store="memory://",
        key_serializer="raw",
        value_serializer="raw",
        topic_partitions=kafka.partitions,
        topic_disable_leader=True,
        web_enabled=False,
        producer_acks=-1,
    )
    # The poll reader is this app's Kafka consumer; Faust's own would only stand beside it.
    app.boot_strategy = app.BootStrategy(app, enable_kafka_consumer=False)
    rules = BatchRules(
        TimeBounds(int(worker.max_event_age_s * 1000), int(worker.max_clock_skew_s * 1000)),
        int(worker.allowed_lateness_s * 1000),
    )
    retention = Retention({"10s": worker.retention_10s_s, "1m": worker.retention_1m_s})
    metrics = Metrics()
    divert = Divert(app, kafka.deadletter_topic, kafka.late_topic)
    appliers: list[PartitionApplier] = []

    def new_client() -> aioredis.Redis:
        return aioredis.Redis(
            host=store.host,
            port=store.port,
            db=store.db,
            password=store.password.get_secret_value() if store.password else None,
            single_connection_client=True,  # WAITAOF covers the writes of its own connection
            socket_timeout=max(30.0, worker.durability_timeout_ms / 1000 * 3),
            socket_connect_timeout=5.0,
        )

    channels: dict[EventKind, Any] = {}
    for kind, topic_name in (
        (EventKind.SENSOR, kafka.sensor_topic),
        (EventKind.APPLOG, kafka.applog_topic),
    ):
        writer = StoreWriter(
            new_client(), worker.durability, retention, worker.durability_timeout_ms
        )
        applier = PartitionApplier(kind, topic_name, writer, divert, rules, metrics)
        appliers.append(applier)
        channels[kind] = app.channel()
        app.agent(channels[kind], name=f"pulse.{kind.value}", concurrency=1)(_make_agent(applier))

    async def handle(kind: EventKind, by_partition: dict[int, list[Record]]) -> None:
        poll = Poll(by_partition, asyncio.get_running_loop().create_future())
        await channels[kind].send(value=poll)
        await poll.done

    def on_assigned() -> None:
        for a in appliers:
            a.forget()

    reader = KafkaBatchReader(
        ReaderConfig(
            bootstrap=kafka.bootstrap,
            group_id=worker.app_id,
            topics={kafka.sensor_topic: EventKind.SENSOR, kafka.applog_topic: EventKind.APPLOG},
            max_records=worker.batch_max,
            poll_timeout_s=worker.batch_within_s,
            session_timeout_ms=round(worker.session_timeout_s * 1000),
            heartbeat_interval_ms=round(worker.heartbeat_interval_s * 1000),
        ),
        handle,
        on_assigned,
    )

    metrics_client = new_client()

    @app.task
    async def _ingest() -> None:
        # Faust opens its flow control after its own consumer's first rebalance; with the poll
        # reader as the consumer, the agents' channels must be opened here.
        app.flow_control.resume()
        try:
            await reader.run()
        except asyncio.CancelledError:
            raise  # stopping: the poll in flight was not committed and will be re-read
        except BaseException:
            log.exception("ingest failed; exiting without committing the poll in flight")
            _die()
        finally:
            for a in appliers:
                await a.close()
            await metrics_client.aclose()

    @app.timer(interval=2.0)
    async def _publish_metrics() -> None:
        from redis.exceptions import RedisError

        from schemas import keys

        try:
            key = keys.worker_key(worker_name)
            await metrics_client.hset(key, mapping=metrics.snapshot())
            await metrics_client.expire(key, 30)
        except (RedisError, OSError) as exc:
            log.debug("could not publish metrics: %s", exc)

    return app


@dataclass(slots=True)
class Poll:
    """One poll's records of one event kind, and the future its agent resolves when durable."""

    by_partition: dict[int, list[Record]]
    done: asyncio.Future[None]


def _make_agent(applier: PartitionApplier) -> Any:
    async def agent(stream: Any) -> None:
        async for poll in stream:
            try:
                await applier.handle(poll.by_partition)
            except BaseException as exc:
                if not poll.done.done():
                    poll.done.set_exception(exc)
                raise
            poll.done.set_result(None)

    return agent


def _die() -> None:
    sys.stderr.flush()
    os._exit(70)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``pulse worker``."""
    parser.add_argument("--name", help="worker name in metrics (default: host-pid)")
    parser.add_argument(
        "--loglevel", default="warning", choices=["debug", "info", "warning", "error"]
    )


def run(args: argparse.Namespace) -> int:
    """Run the worker until interrupted."""
    import faust

    app = create_app(WorkerSettings(), KafkaSettings(), StoreSettings(), name=args.name)
    worker = faust.Worker(app, loglevel=args.loglevel.upper(), quiet=True)
    worker.execute_from_commandline()
    return 0
