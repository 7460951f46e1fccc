"""``pulse worker``: the Faust app whose agent aggregates both event streams into the store.

What Faust does here: it is the worker's application framework. Its agent (concurrency 1,
supervised) processes the polls; its producer writes dead letters and late
events; its timer publishes the worker's metrics; its lifecycle starts and stops everything and
handles signals. What it does not do: read the input topics. Its per-record streams cost three
quarters of the CPU in per-record tasks and acknowledgements, so a plain aiokafka consumer
(``pipeline.ingest``) reads whole polls, seeks where the store stands, and hands each poll,
split by event kind and partition, to the agent through a channel. The agent runs the
checkpoint (``pipeline.checkpoint``): prepare, divert, apply, durable, commit offsets.

Failure policy (crash-only): the store's per-partition offset makes re-reading harmless, while
committing a record that was not applied would lose it. So store outages are retried in place
(state is re-read from the store, the batch re-processed), and anything unexpected ends the
process at once without committing — a restarted worker re-reads from the last committed offset.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import socket
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.batch import BatchRules, RawRecord
from pipeline.checkpoint import Checkpoint
from pipeline.detection import KindDetectors, window_params
from pipeline.divert import PRODUCER_MAX_REQUEST_BYTES, Divert
from pipeline.ingest import KafkaBatchReader, ReaderConfig, StopRequested, wait_for_kafka
from pipeline.metrics import Metrics
from pipeline.settings import KafkaSettings, StackSettings, StoreSettings, WorkerSettings
from pipeline.state import Retention
from pipeline.validation import TimeBounds
from schemas import argtypes, keys
from schemas.events import EventKind

if TYPE_CHECKING:
    import faust

log = logging.getLogger("pulse.worker")

STOP_ACK_TIMEOUT_S = 15.0  # how long a stopping worker waits to acknowledge its last polls


def create_app(
    worker: WorkerSettings, kafka: KafkaSettings, store: StoreSettings, name: str | None = None
) -> faust.App:
    """Build the Faust app: a poll reader feeding the checkpoint agent."""
    import faust

    from pipeline.store_writer import StoreWriter, connect_writer
    from schemas.settings import StoreRole, store_client

    worker_name = name or f"{socket.gethostname()}-{os.getpid()}"
    datadir = StackSettings().home / "faust"  # Faust's own files, not in the working directory
    datadir.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        worker.app_id,
        datadir=str(datadir),
        broker=f"kafka://{kafka.bootstrap}",
        store="memory://",
        key_serializer="raw",
        value_serializer="raw",
        topic_partitions=kafka.partitions,
        topic_disable_leader=True,
        web_enabled=False,
        producer_acks=-1,
        producer_max_request_size=PRODUCER_MAX_REQUEST_BYTES,
        broker_credentials=kafka.ssl_context(),  # Faust's producer and admin: SSL or not
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
    socket_timeout_s = max(30.0, worker.durability_timeout_ms / 1000 * 3)
    topic_names = {EventKind.SENSOR: kafka.sensor_topic, EventKind.APPLOG: kafka.applog_topic}

    async def commit_offsets(offsets: dict[str, dict[int, int]]) -> None:
        await reader.commit_offsets(offsets)

    writer = StoreWriter(
        connect_writer(store, socket_timeout_s),
        worker.durability,
        retention,
        worker.durability_timeout_ms,
        topic_names=topic_names,
        owner=worker_name,
    )
    detectors = {}
    if worker.detect:
        detectors = {
            kind: KindDetectors(
                kind,
                keys.WINDOW_10S,
                window_params(kind, worker.detect_threshold),
                max_entities=worker.detect_max_entities,
                idle_ms=worker.detect_idle_s * 1000,
            )
            for kind in EventKind
        }
    checkpoint = Checkpoint(
        topic_names,
        writer,
        divert,
        rules,
        metrics,
        commit_offsets=commit_offsets,
        detectors=detectors,
        commit_interval_ms=round(worker.commit_interval_s * 1000),
    )
    polls = app.channel()
    agent_gone = asyncio.Event()
    app.agent(polls, name="pulse.checkpoint", concurrency=1)(_make_agent(checkpoint, agent_gone))

    async def handle(poll: dict[EventKind, dict[int, list[RawRecord]]]) -> None:
        task = Task(poll, asyncio.get_running_loop().create_future())
        await polls.send(value=task)
        # the agent resolves the task, unless it stops first (the worker is shutting down):
        # then nothing more is acknowledged, and the next owner reads on from the store
        gone = asyncio.ensure_future(agent_gone.wait())
        waiters: set[asyncio.Future[Any]] = {task.done, gone}
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not task.done.done():
            raise asyncio.CancelledError("the checkpoint agent stopped")
        task.done.result()

    async def flush() -> None:
        await handle({})  # through the agent: it alone touches the checkpoint

    reader = KafkaBatchReader(
        ReaderConfig(
            bootstrap=kafka.bootstrap,
            group_id=worker.app_id,
            topics={kafka.sensor_topic: EventKind.SENSOR, kafka.applog_topic: EventKind.APPLOG},
            max_records=worker.batch_max,
            poll_timeout_s=worker.batch_within_s,
            session_timeout_ms=round(worker.session_timeout_s * 1000),
            heartbeat_interval_ms=round(worker.heartbeat_interval_s * 1000),
            security=kafka.client_kwargs(),
            fetch_min_bytes=worker.fetch_min_bytes,
            fetch_max_wait_ms=worker.fetch_max_wait_ms,
        ),
        handle,
        checkpoint.load_progress,
        checkpoint.forget,
        flush,
    )
    metrics.refused = reader.refused
    checkpoint.refuse = reader.refuse

    # mode types a signal handler as a union of callables no ``async def`` matches
    @app.on_before_shutdown.connect  # type: ignore[arg-type]
    async def _acknowledge_on_stop(_app: Any, **_: Any) -> None:
        # Sent as the app stops, before its agent and tasks do: the last polls' offsets are
        # committed (at most STOP_ACK_TIMEOUT_S; the store owns the offsets either way).
        try:
            await asyncio.wait_for(reader.drain(), STOP_ACK_TIMEOUT_S)
        except TimeoutError:
            log.warning(
                "stopping without committing the last offsets: not acknowledged within %.0f s",
                STOP_ACK_TIMEOUT_S,
            )
        except Exception as exc:  # stopping anyway; the next owner reads on from the store
            log.warning("stopping without committing the last offsets: %s", exc)

    metrics_client = store_client(
        store, timeout_s=socket_timeout_s, asyncio=True, role=StoreRole.WORKER
    )

    @app.task  # type: ignore[untyped-decorator]  # faust's decorators are not annotated
    async def _ingest() -> None:
        # Faust opens its flow control after its own consumer's first rebalance; with the poll
        # reader as the consumer, the agent's channel must be opened here.
        app.flow_control.resume()
        freeze_startup_heap()
        try:
            await reader.run()
        except asyncio.CancelledError:
            raise  # stopping: the poll in flight was not committed and will be re-read
        except BaseException:
            log.exception("ingest failed; exiting without committing the poll in flight")
            _die()
        finally:
            await checkpoint.close()
            await metrics_client.aclose()

    @app.timer(interval=2.0)  # type: ignore[untyped-decorator]
    async def _publish_metrics() -> None:
        from redis.exceptions import RedisError

        try:
            key = keys.worker_key(worker_name)
            await metrics_client.hset(key, mapping=metrics.snapshot())
            await metrics_client.expire(key, 30)
        except (RedisError, OSError) as exc:
            log.debug("could not publish metrics: %s", exc)

    return app


@dataclass(slots=True)
class Task:
    """One poll's records (empty: acknowledge what was applied), and the future the agent
    resolves once it is checkpointed."""

    poll: dict[EventKind, dict[int, list[RawRecord]]]
    done: asyncio.Future[None]


def _make_agent(checkpoint: Checkpoint, gone: asyncio.Event) -> Any:
    async def agent(stream: Any) -> None:
        try:
            async for task in stream:
                try:
                    if task.poll:
                        await checkpoint.commit(task.poll)
                    else:
                        await checkpoint.flush()
                except BaseException as exc:
                    if not task.done.done():
                        task.done.set_exception(exc)
                    raise
                task.done.set_result(None)
        finally:
            gone.set()  # whoever waits on a task stops waiting

    return agent


def freeze_startup_heap() -> None:
    """Exempt what start-up allocated (modules, the Faust app, the clients) from the
    cycle collector: they live as long as the worker does.

    A full collection walks every tracked object: about 100k after start-up, 0.1 s on the
    project's 2-core machines, every few seconds under load, each one stalling the poll in
    hand (a freshness p99 of its own). Frozen, a full collection walks a few thousand.
    """
    gc.collect()
    gc.freeze()


def _die() -> None:
    sys.stderr.flush()
    os._exit(70)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``pulse worker``."""
    parser.add_argument(
        "--name", type=argtypes.name, help="worker name in metrics (default: host-pid)"
    )
    parser.add_argument(
        "--loglevel", default="warning", choices=["debug", "info", "warning", "error"]
    )


def run(args: argparse.Namespace) -> int:
    """Run the worker until interrupted."""
    from schemas.settings import StoreRole
    from schemas.store_errors import check

    settings = WorkerSettings()  # a setting that is wrong is said before any waiting
    store = StoreSettings()
    problem = check(store, StoreRole.WORKER)  # a wrong password is no outage to wait out
    if problem is not None:
        print(f"pulse worker: {problem}.", file=sys.stderr)
        return 2
    kafka = KafkaSettings()
    try:
        problem = wait_for_kafka(kafka, lambda msg: print(f"pulse worker: {msg}", file=sys.stderr))
    except StopRequested:
        return 0  # stopped before it started: nothing to flush
    if problem is not None:
        print(f"pulse worker: {problem}.", file=sys.stderr)
        return 2
    import faust

    from schemas.kafka_probe import client_repeats_summarised

    app = create_app(settings, kafka, store, name=args.name)
    client_repeats_summarised()  # an outage: a line a minute per kind, not one per attempt
    worker = faust.Worker(app, loglevel=args.loglevel.upper(), quiet=True)
    worker.execute_from_commandline()
    return 0
