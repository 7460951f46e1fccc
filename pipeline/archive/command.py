"""``pulse archive``: archive every valid event once, as time-partitioned Parquet files.

Its own consumer group on both input topics, read in whole polls by the worker's reader
(:class:`pipeline.ingest.KafkaBatchReader`). Each poll is validated by ``pipeline.validation``
(invalid records are not archived: the worker dead-letters them) and buffered per partition; a
partition is flushed (one file per event-time hour, see :mod:`pipeline.archive.layout`) once it
holds ``PULSE_ARCHIVE_MAX_ROWS`` rows or its oldest unflushed record was read
``PULSE_ARCHIVE_MAX_SECONDS`` ago. The archive owns its offsets: on assignment each partition
is recovered from its marker and read from one past its last archived offset, and Kafka's
committed offset (written after each flush) is only a hint.

Failure policy (crash-only): a flush that fails ends the process; the next start deletes what
the flush left and re-reads the partition from its marker. SIGTERM/SIGINT flush everything
buffered and exit 0, printing the run's counters as one JSON line (with the partitions it
refused and why).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from pipeline.settings import MAX_FLUSH_ROWS as MAX_ROWS
from pipeline.settings import MAX_FLUSH_SECONDS as MAX_SECONDS
from pipeline.settings import ArchiveSettings
from schemas.argtypes import int_within
from schemas.events import EventKind

if TYPE_CHECKING:
    from pipeline.archive.layout import PartitionBuffer, Progress, Segment
    from pipeline.archive.storage import ArchiveStore
    from pipeline.batch import PartitionState, RawRecord
    from pipeline.ingest import KafkaBatchReader
    from pipeline.validation import TimeBounds

log = logging.getLogger("pulse.archive")


@dataclass(slots=True)
class Counters:
    """What one run of the archive did."""

    records: int = 0  # records read and not skipped
    archived: int = 0  # valid events written to committed files
    invalid: int = 0  # records not archived (rejected by validation)
    skipped: int = 0  # records read again at or below what was read (a re-read range)
    files: int = 0
    segments: int = 0
    polls: int = 0
    recovered: int = 0  # partitions whose unfinished flush was undone on assignment
    # partitions not read (their marker cannot be read) -> why: the reader's, as they stand
    refused: dict[str, str] = field(default_factory=dict)
    first_poll_s: float | None = None  # monotonic time of the first poll with records
    last_flush_s: float | None = None  # monotonic time of the last flush

    def rate(self) -> float:
        """Archived events per second, from the first poll to the last flush."""
        if self.first_poll_s is None or self.last_flush_s is None:
            return 0.0
        return self.archived / max(self.last_flush_s - self.first_poll_s, 1e-9)


class Archiver:
    """Buffers each owned partition's valid events and flushes them as committed segments."""

    def __init__(
        self,
        store: ArchiveStore,
        topics: dict[EventKind, str],
        bounds: TimeBounds,
        max_rows: int,
        max_seconds: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
    ) -> None:
        self.store = store
        self.topics = topics
        self.bounds = bounds
        self.max_rows = max_rows
        self.max_seconds = max_seconds
        self.clock = clock
        self.wall_ms = wall_ms
        self.buffers: dict[tuple[EventKind, int], PartitionBuffer] = {}
        self.progress: dict[tuple[EventKind, int], Progress] = {}
        self.counters = Counters()
        self.commit_hint: Callable[[dict[str, dict[int, int]]], Any] | None = None
        self._flushing: asyncio.Task[None] | None = None

    # -- the reader's callbacks ------------------------------------------------------------

    def forget(self) -> None:
        """A new assignment: every partition is re-read from its marker, so nothing buffered
        is kept (it would be read again)."""
        self.buffers.clear()
        self.progress.clear()

    async def load_progress(self, kind: EventKind, partitions: list[int]) -> dict[int, Any]:
        """Recover each partition from its marker; where to read it, as the reader expects."""
        return await asyncio.to_thread(self._recover, kind, partitions)

    def _recover(self, kind: EventKind, partitions: list[int]) -> dict[int, PartitionState]:
        from pipeline.archive.layout import PartitionBuffer
        from pipeline.archive.storage import MarkerError
        from pipeline.batch import PartitionState

        out = {}
        for p in partitions:
            try:
                had_pending = bool(self.store.load(kind, p).pending)
                progress = self.store.recover(kind, p)
            except MarkerError as exc:  # the others are archived; this one waits for an operator
                out[p] = PartitionState(refuse=str(exc))
                continue
            if had_pending:
                self.counters.recovered += 1
                log.info("%s partition %d: undid an unfinished flush", kind.value, p)
            out[p] = PartitionState(offset=progress.last_offset, topic=progress.topic)
            if progress.topic is None:
                progress.topic = self.topics[kind]
            self.progress[(kind, p)] = progress
            self.buffers[(kind, p)] = PartitionBuffer(kind, p, progress.resume_at())
        return out

    async def handle(self, poll: dict[EventKind, dict[int, list[RawRecord]]]) -> None:
        """Validate and buffer a poll; flush the partitions that are due."""
        now = self.clock()
        c = self.counters
        c.polls += 1
        if c.first_poll_s is None:
            c.first_poll_s = now
        now_ms = self.wall_ms()
        for kind, parts in poll.items():
            for p, records in parts.items():
                buf = self.buffers.get((kind, p))
                if buf is None or not records:
                    continue
                skip = buf.fresh_from([r.offset for r in records])
                c.skipped += skip
                fresh = records[skip:]
                if not fresh:
                    continue
                table, invalid = self._rows(kind, p, fresh, now_ms)
                c.records += len(fresh)
                c.invalid += invalid
                buf.add(fresh[-1].offset, table, now)
        await self.flush(due_only=True)

    def _rows(
        self, kind: EventKind, partition: int, records: list[RawRecord], now_ms: int
    ) -> tuple[Any, int]:
        from pipeline.archive.layout import event_table
        from pipeline.validation import decode_applog, decode_sensor

        raws = [r.value for r in records]
        decode = decode_sensor if kind is EventKind.SENSOR else decode_applog
        decoded = decode(raws, now_ms, self.bounds)
        offsets = [records[i].offset for i in decoded.positions]
        return event_table(kind, partition, offsets, decoded.events), len(decoded.rejected)

    async def flush(self, *, due_only: bool) -> None:
        """Flush the partitions that are due (or all), one segment after another."""
        now = self.clock()
        for key, buf in list(self.buffers.items()):
            while buf.due(self.max_rows, self.max_seconds, now) or (
                not due_only and buf.read_to >= buf.next_offset
            ):
                segment = buf.take(self.max_rows)
                if segment is None:
                    break
                # The write runs to its end even if this task is cancelled (stopping): the
                # marker then matches the buffer, and stop() waits for it.
                self._flushing = asyncio.ensure_future(self._write(key, segment))
                await asyncio.shield(self._flushing)
                if self.buffers.get(key) is not buf:
                    break  # reassigned meanwhile

    async def _write(self, key: tuple[EventKind, int], segment: Segment) -> None:
        progress = self.progress[key]
        done = await asyncio.to_thread(self.store.write_segment, segment, progress)
        self.progress[key] = done
        c = self.counters
        c.archived += segment.rows
        c.files += len(segment.files)
        c.segments += 1
        c.last_flush_s = self.clock()
        if self.commit_hint is not None:
            await self.commit_hint({self.topics[key[0]]: {key[1]: segment.last + 1}})

    async def idle(self) -> None:
        """No records for now: flush what is due (the reader calls this on an empty poll)."""
        await self.flush(due_only=True)

    async def stop(self) -> None:
        """Finish the flush in flight, then flush everything buffered."""
        if self._flushing is not None:
            await self._flushing
        self.commit_hint = None  # the consumer is closed
        await self.flush(due_only=False)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``pulse archive`` (defaults from ``PULSE_ARCHIVE_*``)."""
    s = ArchiveSettings()
    a = parser.add_argument
    a(
        "--url",
        type=_url,
        default=s.resolved_url(),
        help="where to archive: a local path or any fsspec URL (default: %(default)s)",
    )
    a(
        "--max-rows",
        type=int_within(1, MAX_ROWS),
        default=s.max_rows,
        metavar="N",
        help="flush a partition once it holds N rows; no file holds more (default: %(default)s)",
    )
    a(
        "--max-seconds",
        type=_positive_seconds,
        default=s.max_seconds,
        metavar="S",
        help="flush a partition S seconds after its oldest unflushed record was read "
        "(default: %(default)s)",
    )
    a("--loglevel", default="warning", choices=["debug", "info", "warning", "error"])


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 < value <= MAX_SECONDS:
        raise argparse.ArgumentTypeError(f"must be within (0, {MAX_SECONDS:g}] seconds, got {text}")
    return value


def _url(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a path or an fsspec URL, got ''")
    return text


def run(args: argparse.Namespace) -> int:
    """Archive until SIGTERM or SIGINT; print the run's counters as one JSON line."""
    logging.basicConfig(
        level=args.loglevel.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from pipeline.archive.storage import ArchiveError, ArchiveStore
    from pipeline.ingest import IngestError, StopRequested, wait_for_kafka
    from pipeline.settings import KafkaSettings, WorkerSettings

    # what only this process can get wrong is said before any waiting: the worker's event-time
    # bounds (read here too), and an archive it cannot write (an unknown protocol, a filesystem
    # package not installed, a directory it cannot make)
    WorkerSettings()
    try:
        store = ArchiveStore(args.url)
        store.fs.makedirs(store.root, exist_ok=True)
    except ArchiveError as exc:
        print(f"pulse archive: {exc}.", file=sys.stderr)
        return 2
    except OSError as exc:
        why = str(exc).rstrip(".")
        print(f"pulse archive: cannot use the archive at {args.url}: {why}.", file=sys.stderr)
        return 2
    # a stack still starting (or started after the archive) is waited for, as the worker does
    try:
        problem = wait_for_kafka(
            KafkaSettings(), lambda msg: print(f"pulse archive: {msg}", file=sys.stderr)
        )
    except StopRequested:
        return 0  # stopped before it started: nothing buffered
    if problem is not None:
        print(f"pulse archive: {problem}.", file=sys.stderr)
        return 2
    from schemas.kafka_probe import client_repeats_summarised

    client_repeats_summarised()  # an outage: a line a minute per kind, not one per attempt
    try:
        counters = asyncio.run(_archive(args, store))
    except IngestError as exc:
        print(f"pulse archive: {exc}.", file=sys.stderr)
        return 1
    import orjson

    print(
        orjson.dumps({**asdict(counters), "rate": round(counters.rate(), 1)}).decode(), flush=True
    )
    return 0


async def _archive(args: argparse.Namespace, store: ArchiveStore) -> Counters:
    from pipeline.ingest import KafkaBatchReader, ReaderConfig
    from pipeline.settings import KafkaSettings, WorkerSettings
    from pipeline.validation import TimeBounds

    settings = ArchiveSettings()
    kafka = KafkaSettings()
    worker = WorkerSettings()  # the event-time bounds the worker validates with
    topics = {EventKind.SENSOR: kafka.sensor_topic, EventKind.APPLOG: kafka.applog_topic}
    archiver = Archiver(
        store,
        topics,
        TimeBounds(int(worker.max_event_age_s * 1000), int(worker.max_clock_skew_s * 1000)),
        args.max_rows,
        args.max_seconds,
    )
    reader: KafkaBatchReader = KafkaBatchReader(
        ReaderConfig(
            bootstrap=kafka.bootstrap,
            group_id=settings.group_id,
            topics={name: kind for kind, name in topics.items()},
            max_records=settings.batch_max,
            poll_timeout_s=settings.poll_timeout_s,
            session_timeout_ms=round(settings.session_timeout_s * 1000),
            heartbeat_interval_ms=round(settings.heartbeat_interval_s * 1000),
            security=kafka.client_kwargs(),
        ),
        archiver.handle,
        archiver.load_progress,
        archiver.forget,
        archiver.idle,
    )
    archiver.commit_hint = reader.commit_offsets
    archiver.counters.refused = reader.refused
    log.info("archiving %s to %s", ", ".join(topics.values()), args.url)

    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    reading = asyncio.create_task(reader.run())
    stop_wait = asyncio.create_task(stopping.wait())
    await asyncio.wait({reading, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
    stop_wait.cancel()
    if reading.done():
        reading.result()  # the reader failed: raise its error, nothing more is flushed
    reading.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await reading
    await archiver.stop()
    log.info("stopped: %s", archiver.counters)
    return archiver.counters
