"""``pulse worker``: the Faust app whose agents aggregate both event streams into the store.

What Faust does here: it is the worker's application framework. Its agents (one per event
kind, concurrency 1, supervised) process the polls; its producer writes dead letters and late
events; its timer publishes the worker's metrics; its lifecycle starts and stops everything and
handles signals. What it does not do: read the input topics. Its per-record streams cost three
quarters of the CPU in per-record tasks and acknowledgements, so a plain aiokafka consumer
(``pipeline.ingest``) reads whole polls, seeks where the store stands, and hands each poll,
split by event kind and partition, to that kind's agent through a channel. The agent runs the
checkpoint (``pipeline.checkpoint``): divert, apply, durable, commit offsets.

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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.batch import BatchRules, PartitionState, RawRecord
from pipeline.checkpoint import Checkpoint
from pipeline.divert import PRODUCER_MAX_REQUEST_BYTES, Divert
from pipeline.ingest import KafkaBatchReader, ReaderConfig
from pipeline.metrics import Metrics
from pipeline.settings import KafkaSettings, StoreSettings, WorkerSettings
from pipeline.state import Retention
from pipeline.validation import TimeBounds
from schemas.events import EventKind

if TYPE_CHECKING:
    import faust

log = logging.getLogger("pulse.worker")


def create_app(
    worker: WorkerSettings, kafka: KafkaSettings, store: StoreSettings, name: str | None = None
) -> faust.App:
    """Build the Faust app: a poll reader feeding one agent per event kind."""
    import faust

    from pipeline.store_writer import StoreWriter, connect

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
    retention = Retention({"10s": worker.retention_10s_s, "1m": worker.retention_1m_s})
    rules = BatchRules(
        TimeBounds(int(worker.max_event_age_s * 1000), int(worker.max_clock_skew_s * 1000)),
        int(worker.allowed_lateness_s * 1000),
        plan=worker.window_plan(),
        retention=retention,
    )
    metrics = Metrics()
    divert = Divert(app, kafka.deadletter_topic, kafka.late_topic, metrics)
    checkpoints: dict[EventKind, Checkpoint] = {}
    socket_timeout_s = max(30.0, worker.durability_timeout_ms / 1000 * 3)
    topic_names = {EventKind.SENSOR: kafka.sensor_topic, EventKind.APPLOG: kafka.applog_topic}

    channels: dict[EventKind, Any] = {}

    async def commit_offsets(topic: str, offsets: dict[int, int]) -> None:
        await reader.commit_offsets(topic, offsets)

    for kind, topic_name in topic_names.items():
        writer = StoreWriter(
            connect(store, socket_timeout_s),
            worker.durability,
            retention,
            worker.durability_timeout_ms,
            topic_names=topic_names,
            owner=worker_name,
        )
        checkpoint = Checkpoint(
            kind, topic_name, writer, divert, rules, metrics, commit_offsets=commit_offsets
        )
        checkpoints[kind] = checkpoint
        channels[kind] = app.channel()
        app.agent(channels[kind], name=f"pulse.{kind.value}", concurrency=1)(
            _make_agent(checkpoint)
        )

    async def handle(kind: EventKind, by_partition: dict[int, list[RawRecord]]) -> None:
        poll = Poll(by_partition, asyncio.get_running_loop().create_future())
        await channels[kind].send(value=poll)
        await poll.done

    def on_assigned() -> None:
        for c in checkpoints.values():
            c.forget()

    async def load_progress(kind: EventKind, partitions: list[int]) -> dict[int, PartitionState]:
        return await checkpoints[kind].load_progress(partitions)

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

    @app.task  # type: ignore[untyped-decorator]  # faust's decorators are not annotated
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
            for c in checkpoints.values():
                await c.close()
            await metrics_client.aclose()

    @app.timer(interval=2.0)  # type: ignore[untyped-decorator]
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

    by_partition: dict[int, list[RawRecord]]
    done: asyncio.Future[None]


def _make_agent(checkpoint: Checkpoint) -> Any:
    async def agent(stream: Any) -> None:
        async for poll in stream:
            try:
                await checkpoint.commit(poll.by_partition)
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
