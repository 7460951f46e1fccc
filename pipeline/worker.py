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
    fences: int = 0
    isolated: int = 0  # records that made batch processing fail and were dead-lettered alone
    dead_truncated: int = 0  # dead letters written as a truncated copy
    dead_unwritable: int = 0  # dead letters that could not be written even truncated
    refused: dict[str, str] = field(default_factory=dict)  # partition -> why it is not read
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
            "fences": self.fences,
            "isolated": self.isolated,
            "dead_truncated": self.dead_truncated,
            "dead_unwritable": self.dead_unwritable,
            "refused": len(self.refused),
            "refused_reasons": "; ".join(f"{tp}: {why}" for tp, why in self.refused.items()),
            "events_per_s": round(self.events / elapsed, 1),
            "apply_p50_ms": pct(self.apply_s, 50),
            "apply_p99_ms": pct(self.apply_s, 99),
            "durability_wait_p50_ms": pct(self.durability_wait_s, 50),
            "durability_wait_p99_ms": pct(self.durability_wait_s, 99),
            "updated_ms": wall_clock_ms(),
            "pid": os.getpid(),
        }


# A dead letter the broker refuses whole is written as its first TRUNCATED_BYTES, marked.
TRUNCATED_BYTES = 64 * 1024
# Large enough that the producer never refuses what the broker accepted on an input topic
# (Faust's default, 1,000,000 bytes, is below Kafka's default message.max.bytes, 1,048,588).
PRODUCER_MAX_REQUEST_BYTES = 16 * 1024 * 1024


# (Faust topic, record, headers) of one diverted record
_Outgoing = tuple[Any, Record, list[tuple[str, bytes]]]


class Divert:
    """Sends rejected and late records to their topics and waits for the broker's acks.

    A record is never lost here and never stops the worker: transient broker errors are retried
    in place; a record the broker refuses as it is (too large, say) is written as a truncated
    copy with a ``pulse.truncated`` header giving its original size; one that cannot be written
    even so is logged and counted.
    """

    def __init__(
        self,
        app: faust.App,
        deadletter_topic: str,
        late_topic: str,
        metrics: Metrics,
        retry_delay_s: float = 0.5,
    ) -> None:
        self._dead = app.topic(deadletter_topic, key_serializer="raw", value_serializer="raw")
        self._late = app.topic(late_topic, key_serializer="raw", value_serializer="raw")
        self._metrics = metrics
        self._retry_delay_s = retry_delay_s

    async def send(self, source_topic: str, batches: Sequence[PartitionBatch]) -> None:
        """Send every diverted record of ``batches``; return once all are acknowledged."""
        todo: list[tuple[Any, Record, list[tuple[str, bytes]]]] = []
        for b in batches:
            for topic, items in ((self._dead, b.dead), (self._late, b.late)):
                todo.extend(
                    (topic, d.record, _headers(source_topic, b.partition, d)) for d in items
                )
        while todo:
            failed = await self._send_all(todo)
            retry = []
            for item, exc in failed:
                if _stopping(exc):
                    raise exc
                if _transient(exc):
                    retry.append(item)
                    continue
                topic, record, headers = item
                await self._send_truncated(topic, record, headers, exc)
            if retry:
                log.warning(
                    "%d diverted records not acknowledged (%s); retrying in %.1fs",
                    len(retry),
                    failed[0][1],
                    self._retry_delay_s,
                )
                await asyncio.sleep(self._retry_delay_s)
            todo = retry

    async def _send_all(self, items: list[_Outgoing]) -> list[tuple[_Outgoing, BaseException]]:
        """Send ``items`` together; the ones that failed, with their errors."""
        futures: list[Any] = []
        failed: list[tuple[_Outgoing, BaseException]] = []
        for item in items:
            topic, record, headers = item
            try:
                futures.append(
                    await topic.send(
                        key=record.key,
                        value=record.value or b"",
                        headers=headers,
                        force=True,  # send now, not when the current event is acked
                    )
                )
            except Exception as exc:  # e.g. refused by the client before it was queued
                futures.append(None)
                failed.append((item, exc))
        sent = [(item, f) for item, f in zip(items, futures, strict=True) if f is not None]
        results = await asyncio.gather(*(f for _, f in sent), return_exceptions=True)
        for (item, _), result in zip(sent, results, strict=True):
            if isinstance(result, asyncio.CancelledError):
                raise result
            if isinstance(result, BaseException):
                failed.append((item, result))
        return failed

    async def _send_truncated(
        self, topic: Any, record: Record, headers: list[tuple[str, bytes]], exc: BaseException
    ) -> None:
        value = record.value or b""
        key = record.key
        marks = [("pulse.truncated", str(len(value)).encode())]
        if key is not None and len(key) > TRUNCATED_BYTES:
            marks.append(("pulse.truncated.key", str(len(key)).encode()))
            key = key[:TRUNCATED_BYTES]
        reason = f"not writable whole ({type(exc).__name__}: {exc})"[:200]
        marks.append(("pulse.truncated.reason", reason.encode()))
        try:
            fut = await topic.send(
                key=key, value=value[:TRUNCATED_BYTES], headers=headers + marks, force=True
            )
            await fut
        except asyncio.CancelledError:
            raise
        except Exception as exc2:
            self._metrics.dead_unwritable += 1
            log.error(
                "could not write a diverted record from %s even truncated (%s); dropped it",
                dict(headers).get("pulse.source.offset", b"?").decode(),
                exc2,
            )
            return
        self._metrics.dead_truncated += 1
        log.warning("wrote a truncated copy of a diverted record: %s", reason)


def _stopping(exc: BaseException) -> bool:
    """Whether a send failed because the worker is shutting down (nothing was decided)."""
    from aiokafka.errors import ProducerClosed

    return isinstance(exc, ProducerClosed | asyncio.CancelledError)


def _transient(exc: BaseException) -> bool:
    """Whether a send error is the broker being unavailable (retry), not the record's fault."""
    from aiokafka.errors import KafkaConnectionError, KafkaError, KafkaTimeoutError

    if isinstance(exc, KafkaTimeoutError | KafkaConnectionError | asyncio.TimeoutError):
        return True
    return isinstance(exc, KafkaError) and bool(getattr(exc, "retriable", False))


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
        process_batch: Callable[..., PartitionBatch] = process,
    ) -> None:
        self.kind = kind
        self.topic = topic
        self._writer = writer
        self._divert = divert
        self._rules = rules
        self._metrics = metrics
        self._clock = clock
        self._retry_delay_s = retry_delay_s
        self._process = process_batch
        self._states: dict[int, PartitionState] = {}
        self._unsure = False

    async def close(self) -> None:
        """Close the store connection."""
        await self._writer.close()

    def forget(self) -> None:
        """After a rebalance: drop cached partition state and fence before the next commit.

        A previous owner may have applied records it never saw durable (it died waiting); the
        store skips them as applied, and only a fence of ours vouches that they are durable.
        """
        self._states.clear()
        self._unsure = True

    async def load_progress(self, partitions: list[int]) -> dict[int, PartitionState]:
        """What the store says about ``partitions`` (cached for processing); retries outages."""
        from redis.exceptions import ConnectionError as StoreConnectionError
        from redis.exceptions import TimeoutError as StoreTimeoutError

        while True:
            try:
                states = await self._writer.read_state(self.kind, partitions)
            except (StoreConnectionError, StoreTimeoutError, OSError) as exc:
                self._store_unavailable(exc)
                await asyncio.sleep(self._retry_delay_s)
                continue
            self._states.update(states)
            return states

    def _store_unavailable(self, exc: BaseException) -> None:
        self._metrics.store_retries += 1
        log.warning("store unavailable (%s); retrying in %.1fs", exc, self._retry_delay_s)
        self._states.clear()
        self._unsure = True

    async def handle(self, by_partition: dict[int, list[Record]]) -> None:
        """Apply one poll's records exactly once and durably; retries store outages."""
        from redis.exceptions import ConnectionError as StoreConnectionError
        from redis.exceptions import TimeoutError as StoreTimeoutError

        pending = dict(by_partition)
        while pending:
            try:
                if self._unsure:
                    # Records we are about to acknowledge may have been applied by a write
                    # whose durability we never saw confirmed (ours on a lost connection, or a
                    # previous owner's).
                    await self._writer.fence()
                    self._metrics.fences += 1
                    self._unsure = False
                await self._load_states(list(pending))
                pending = await self._apply_once(pending)
            except (StoreConnectionError, StoreTimeoutError, OSError) as exc:
                self._store_unavailable(exc)
                await asyncio.sleep(self._retry_delay_s)

    async def _load_states(self, partitions: list[int]) -> None:
        missing = [p for p in partitions if p not in self._states]
        if missing:
            self._states.update(await self._writer.read_state(self.kind, missing))

    async def _apply_once(self, pending: dict[int, list[Record]]) -> dict[int, list[Record]]:
        now = self._clock()
        batches = [self._process_safely(p, recs, now) for p, recs in pending.items()]
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

    def _process_safely(self, partition: int, records: list[Record], now: int) -> PartitionBatch:
        """Process a partition's records; a record that makes processing fail is dead-lettered.

        Processing is pure and rejects bad input itself, so this is the net under it: if it
        raises anyway, each record is tried alone to find the ones that fail, and the batch is
        processed without them, so one record can never stop the partition.
        """
        state = self._states[partition]
        try:
            return self._process(self.kind, partition, records, state, self._rules, now)
        except Exception:
            log.exception("processing a %s batch failed; isolating the records", self.kind.value)
        culprits: dict[int, str] = {}
        for r in records:
            probe = PartitionState(state.offset, state.max_event_time, state.topic)
            try:
                self._process(self.kind, partition, [r], probe, self._rules, now)
            except Exception as exc:
                culprits[r.offset] = f"could not be processed: {type(exc).__name__}: {exc}"[:300]
        # With no culprit found alone, the failure needs the records together: divert them all.
        if not culprits:
            culprits = {r.offset: "could not be processed with its batch" for r in records}
        self._metrics.isolated += len(culprits)
        rest = [r for r in records if r.offset not in culprits]
        batch = self._process(self.kind, partition, rest, state, self._rules, now)
        batch.dead.extend(Diverted(r, culprits[r.offset]) for r in records if r.offset in culprits)
        batch.last_offset = max(batch.last_offset, records[-1].offset)
        return batch


def create_app(
    worker: WorkerSettings, kafka: KafkaSettings, store: StoreSettings, name: str | None = None
) -> faust.App:
    """Build the Faust app: a poll reader feeding one agent per event kind."""
    import faust

    from pipeline.store_writer import Retention, StoreWriter, connect

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
        producer_max_request_size=PRODUCER_MAX_REQUEST_BYTES,
    )
    # The poll reader is this app's Kafka consumer; Faust's own would only stand beside it.
    app.boot_strategy = app.BootStrategy(app, enable_kafka_consumer=False)
    rules = BatchRules(
        TimeBounds(int(worker.max_event_age_s * 1000), int(worker.max_clock_skew_s * 1000)),
        int(worker.allowed_lateness_s * 1000),
    )
    retention = Retention({"10s": worker.retention_10s_s, "1m": worker.retention_1m_s})
    metrics = Metrics()
    divert = Divert(app, kafka.deadletter_topic, kafka.late_topic, metrics)
    appliers: dict[EventKind, PartitionApplier] = {}
    socket_timeout_s = max(30.0, worker.durability_timeout_ms / 1000 * 3)
    topic_names = {EventKind.SENSOR: kafka.sensor_topic, EventKind.APPLOG: kafka.applog_topic}

    channels: dict[EventKind, Any] = {}
    for kind, topic_name in topic_names.items():
        writer = StoreWriter(
            connect(store, socket_timeout_s),
            worker.durability,
            retention,
            worker.durability_timeout_ms,
            topic_names=topic_names,
            owner=worker_name,
        )
        applier = PartitionApplier(kind, topic_name, writer, divert, rules, metrics)
        appliers[kind] = applier
        channels[kind] = app.channel()
        app.agent(channels[kind], name=f"pulse.{kind.value}", concurrency=1)(_make_agent(applier))

    async def handle(kind: EventKind, by_partition: dict[int, list[Record]]) -> None:
        poll = Poll(by_partition, asyncio.get_running_loop().create_future())
        await channels[kind].send(value=poll)
        await poll.done

    def on_assigned() -> None:
        for a in appliers.values():
            a.forget()

    async def load_progress(kind: EventKind, partitions: list[int]) -> dict[int, PartitionState]:
        return await appliers[kind].load_progress(partitions)

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
        load_progress,
        on_assigned,
    )
    metrics.refused = reader.refused

    metrics_client = connect(store, socket_timeout_s)

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
            for a in appliers.values():
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
