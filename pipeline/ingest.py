"""Reading the input topics in polls, and committing a poll's offsets only once it is durable.

The worker's Kafka side: one aiokafka consumer in the worker's consumer group reads whole polls
(``getmany``) of raw records, groups them by event kind and partition, and hands each poll to
the worker's checkpoint, which commits a poll's offsets once the store confirmed it durable
(with the next poll, or on :data:`Flush` when no poll follows: an idle stream, a rebalance).
A rebalance waits for the poll in flight and flushes, so a partition changes owner only between
polls, acknowledged.

Why not Faust's own topic streams: they handle every record as an event of its own (tasks,
futures and acknowledgement bookkeeping per record). Measured on this project's 2-core machine,
that machinery held a worker to ≈5.6k events/s; fed by polls, the same worker drained ≈14k
(docs/performance.md). Faust still hosts the agents, the producer for diverted records, timers
and the worker's lifecycle.

The store owns the offsets. On every assignment the reader asks the store where each partition
stands and seeks there (Kafka's committed offset is only a hint, as for Kafka Connect sinks that
keep offsets in the sink); a partition whose stored position Kafka cannot serve is refused:
paused, reported once with the reason, and counted, never guessed at (:func:`resume_position`).

A record the client cannot parse (the broker accepts a header key that is not UTF-8; aiokafka
refuses it) fails the whole poll, and aiokafka would then skip the records of its partition read
before it. The reader rewinds every partition to the record after the last one it handed on,
narrows the failure down to one record of one partition, and hands that on as
:class:`~pipeline.batch.Unreadable`: a dead letter with the client's reason.

Records written by transactional producers are read once their transaction commits, and those
of aborted transactions are skipped (``read_committed``, as Kafka Streams and Flink read in
exactly-once mode): the store, the archive and a replay hold the same records.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pipeline.batch import PartitionState, RawRecord, Unreadable
from schemas.errors import first_line
from schemas.events import EventKind
from schemas.kafka_probe import client_log_muted, tls_mismatch

if TYPE_CHECKING:
    from aiokafka import AIOKafkaConsumer

    from schemas.settings import KafkaSettings

log = logging.getLogger("pulse.ingest")
MIN_POLL = 100  # records a poll is never capped below (see KafkaBatchReader._fit)
# Every reader of the input topics (worker, archive, replay) sees committed records only: a
# transactional producer's aborted records never happened, and one still open is read once it
# commits (Kafka serves a read_committed consumer up to the last stable offset).
READ_COMMITTED = "read_committed"

# kind -> {partition: records in offset order}; resolves once applied
PollHandler = Callable[[dict[EventKind, dict[int, list[RawRecord]]]], Awaitable[None]]
# acknowledges (durable, offsets committed) everything handled so far
Flush = Callable[[], Awaitable[None]]
# kind, partitions -> what the store says about them (retries store outages itself)
ProgressLoader = Callable[[EventKind, list[int]], Awaitable[dict[int, PartitionState]]]


class IngestError(Exception):
    """The input topics cannot be read."""


@dataclass(frozen=True, slots=True)
class ReaderConfig:
    """How the reader polls and how fast the group notices a dead member."""

    bootstrap: str
    group_id: str
    topics: dict[str, EventKind]  # topic name -> event kind
    max_records: int
    poll_timeout_s: float
    session_timeout_ms: int
    heartbeat_interval_ms: int
    security: dict[str, Any] = field(default_factory=dict)  # KafkaSettings.client_kwargs()
    fetch_min_bytes: int = 1  # the broker holds a fetch until this many bytes are there ...
    fetch_max_wait_ms: int = 500  # ... or this long has passed (Kafka's defaults)


def bare(key: bytes | None) -> bytes | None:
    """The key deserializer of the worker's consumer (the key as it is): it marks the consumer
    whose records :func:`bare_records` hands on as aiokafka parsed them."""
    return key


def bare_records() -> bool:
    """Let a consumer whose key deserializer is :func:`bare` return aiokafka's parsed records
    (``offset``, ``key``, ``value``: all the worker reads) instead of a ``ConsumerRecord``
    built for each; any other consumer in the process is served as before. Returns whether it
    is in place.

    Building a ``ConsumerRecord`` (eleven fields, two sizes, the headers as a tuple) was 0.57 of
    the 0.83 µs aiokafka spends per record, and 9-12 % of the worker's samples in a drain. The
    hook is aiokafka's private ``PartitionRecords._consumer_record`` (the dependency is pinned
    below 0.15, and a unit test checks the hook): without it records come as before.
    """
    try:
        from aiokafka.consumer import fetcher
    except ImportError:  # pragma: no cover - aiokafka is a dependency
        return False
    cls = getattr(fetcher, "PartitionRecords", None)
    build = getattr(cls, "_consumer_record", None)
    if build is None:
        return False
    if getattr(build, "pulse_bare", False):
        return True

    def consumer_record(self: Any, tp: Any, record: Any) -> Any:
        if self._key_deserializer is bare:
            return record
        return build(self, tp, record)

    consumer_record.pulse_bare = True  # type: ignore[attr-defined]
    cls._consumer_record = consumer_record  # type: ignore[union-attr]
    return True


def split_poll(
    polled: dict[Any, list[Any]], topics: dict[str, EventKind]
) -> dict[EventKind, dict[int, list[RawRecord]]]:
    """Group a ``getmany`` result by event kind and partition (the records as they are)."""
    out: dict[EventKind, dict[int, list[RawRecord]]] = defaultdict(dict)
    for tp, msgs in polled.items():
        out[topics[tp.topic]][tp.partition] = msgs
    return out


@dataclass(frozen=True, slots=True)
class Resume:
    """Read the partition from this offset."""

    offset: int


@dataclass(frozen=True, slots=True)
class Refuse:
    """Do not read the partition: the store's position cannot be served without a gap."""

    reason: str


def resume_position(
    stored: PartitionState, topic: str, log_start: int, log_end: int
) -> Resume | Refuse:
    """Where to read a newly assigned partition, given the store's progress and Kafka's log.

    The store's applied offset decides, not Kafka's committed offset. A store with no progress
    for the partition starts at the log start. Anything Kafka cannot serve exactly (records
    deleted before they were applied, a log shorter than what was applied, offsets recorded for
    another topic) is refused with the reason: an operator decides, the worker never guesses.
    """
    if stored.refuse is not None:
        return Refuse(stored.refuse)
    if stored.topic is not None and stored.topic != topic:
        return Refuse(
            f"the store's progress belongs to topic {stored.topic!r}, not {topic!r}: "
            "the partition's offsets and windows would mix two topics"
        )
    if stored.offset < 0:
        return Resume(log_start)
    nxt = stored.offset + 1
    if nxt < log_start:
        return Refuse(
            f"the store applied up to offset {stored.offset} but the log now starts at "
            f"{log_start}: offsets {nxt}..{log_start - 1} were deleted before they were applied"
        )
    if nxt > log_end:
        return Refuse(
            f"the store applied up to offset {stored.offset} but the log ends at {log_end}: "
            "the topic was recreated or truncated since"
        )
    return Resume(nxt)


def _rebalance_listener(
    lock: asyncio.Lock,
    flush: Flush,
    on_assigned: Callable[[Any], Awaitable[None]],
    stopping: Callable[[], bool] = lambda: False,
) -> Any:
    """An aiokafka rebalance listener that hands partitions over only between polls."""
    from aiokafka import ConsumerRebalanceListener

    # aiokafka ships no types, so its base class is Any to mypy; subscribe() insists on an
    # instance of it (isinstance check), so the subclass cannot be replaced by a Protocol.
    class Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
        async def on_partitions_revoked(self, revoked: Any) -> None:
            if stopping():
                # leaving the group as the worker stops: its agent may be gone, so nothing more
                # is acknowledged; the next owner reads on from the store's offsets and fences
                return
            async with lock:  # the poll in flight finishes first, then it is acknowledged
                await flush()

        async def on_partitions_assigned(self, assigned: Any) -> None:
            await on_assigned(assigned)

    return Rebalance()


class KafkaBatchReader:
    """Polls the input topics and commits each poll after its handler says it is durable."""

    def __init__(
        self,
        config: ReaderConfig,
        handle: PollHandler,
        load_progress: ProgressLoader,
        on_assigned: Callable[[], None],
        flush: Flush,
    ) -> None:
        self._config = config
        self._handle = handle
        self._flush = flush
        self._load_progress = load_progress
        self._on_assigned = on_assigned
        self._lock = asyncio.Lock()
        # records a poll asks for now: fewer while handling polls blocks the event loop long
        # enough to starve the group heartbeat (see _fit); the clock is a seam for tests
        self._limit = config.max_records
        self.clock: Callable[[], float] = time.monotonic
        self._stopping = False
        self._drained = False
        self._consumer_: AIOKafkaConsumer | None = None
        self._positioned: set[Any] = set()  # assigned partitions seeked to the store's position
        self._next: dict[Any, int] = {}  # positioned partition -> offset after the last handed on
        self._assignments = 0  # changes with every assignment (a search for a bad record ends)
        self._unparsable: tuple[type[BaseException], ...] = ()  # set when run() imports aiokafka
        self.polls = 0
        # "<topic>/<partition>" -> why it is not read; only partitions currently assigned
        self.refused: dict[str, str] = {}
        # set when positioning an assignment failed (in aiokafka's rebalance listener, which
        # only logs what it raises): the poll loop raises it, rather than poll nothing forever
        self._failed: BaseException | None = None

    def _consumer(self) -> AIOKafkaConsumer:
        from aiokafka import AIOKafkaConsumer

        c = self._config
        bare_records()
        return AIOKafkaConsumer(
            bootstrap_servers=c.bootstrap,
            group_id=c.group_id,
            key_deserializer=bare,  # its records are aiokafka's own: see bare_records
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            # records of aborted transactions never happened: none is applied or archived
            isolation_level=READ_COMMITTED,
            session_timeout_ms=c.session_timeout_ms,
            heartbeat_interval_ms=c.heartbeat_interval_ms,
            max_partition_fetch_bytes=4 * 1024 * 1024,
            fetch_max_bytes=32 * 1024 * 1024,
            fetch_min_bytes=c.fetch_min_bytes,
            fetch_max_wait_ms=c.fetch_max_wait_ms,
            **c.security,
        )

    async def run(self) -> None:
        """Poll, apply, commit, until cancelled."""
        from aiokafka.errors import KafkaError

        self._unparsable = unparsable_errors()
        consumer = self._consumer_ = self._consumer()
        try:
            await consumer.start()
        except KafkaError as exc:
            await consumer.stop()  # it holds a client and sockets even so
            raise IngestError(f"cannot reach Kafka at {self._config.bootstrap}: {exc}") from exc
        consumer.subscribe(
            list(self._config.topics),
            listener=_rebalance_listener(
                self._lock, self._flush, self._position, lambda: self._stopping
            ),
        )
        timeout_ms = round(self._config.poll_timeout_s * 1000)
        try:
            while True:
                if (failed := self._failed) is not None:
                    why = first_line(failed, typed=True)
                    raise IngestError(
                        f"the assigned partitions could not be positioned: {why}"
                    ) from failed
                try:
                    polled = await consumer.getmany(timeout_ms=timeout_ms, max_records=self._limit)
                except self._unparsable as exc:
                    polled = await read_past_unparsable(
                        consumer,
                        {tp: self._next[tp] for tp in self._positioned},
                        exc,
                        max_records=self._limit,
                        timeout_ms=timeout_ms,
                        current=self._unchanged(),
                    )
                # Only records read from where the store stands (see _position) are handled.
                polled = {tp: msgs for tp, msgs in polled.items() if tp in self._positioned}
                for tp, msgs in polled.items():
                    if msgs:
                        self._next[tp] = msgs[-1].offset + 1
                async with self._lock:
                    if self._drained:  # the worker is stopping: nothing more is handed on
                        return
                    if not polled:
                        await self._flush()  # nothing follows for now: acknowledge the last poll
                        continue
                    began = self.clock()
                    await self._handle(split_poll(polled, self._config.topics))
                    self._fit(sum(map(len, polled.values())), self.clock() - began)
                    self.polls += 1
        finally:
            self._stopping = True
            await consumer.stop()

    def _fit(self, records: int, spent: float) -> None:
        """Size the next polls by how long this one took to handle.

        Handling a poll runs on the event loop, which also sends the group's heartbeats: a poll
        whose records are costly (a backlog spread over hours closes a window every few
        records) could hold it past the session timeout, and the group would then take the
        partitions away and hand the same poll to the next member, forever. Past a quarter of
        the timeout the next polls ask for as many records as fit in it, and for twice as many
        again after each poll handled in half of it. Results do not depend on how records are
        grouped into polls.
        """
        budget = self._config.session_timeout_ms / 4000
        if spent > budget and records > MIN_POLL:
            fit = max(MIN_POLL, int(records * budget / spent))
            if fit < self._limit:
                if self._limit == self._config.max_records:
                    log.warning(
                        "a poll of %d records took %.1f s to handle (session timeout %.0f s): "
                        "polls ask for %d records until they are handled faster",
                        records, spent, budget * 4, fit,
                    )  # fmt: skip
                self._limit = fit
        elif spent < budget / 2 and self._limit < self._config.max_records:
            self._limit = min(self._config.max_records, 2 * self._limit)

    def refuse(self, kind: EventKind, partition: int, why: str) -> None:
        """Stop reading an assigned partition (its state in the store cannot be used) until
        the next assignment."""
        topic = next((t for t, k in self._config.topics.items() if k is kind), None)
        tp = next((t for t in self._positioned if (t.topic, t.partition) == (topic, partition)),
                  None)  # fmt: skip
        if tp is None:  # no longer assigned: its next owner decides
            return
        self._positioned.discard(tp)
        if self._consumer_ is not None:
            self._consumer_.pause(tp)
        self._refuse(tp, kind, why)

    def _refuse(self, tp: Any, kind: EventKind, why: str) -> None:
        self.refused[f"{tp.topic}/{tp.partition}"] = why
        log.error(
            "refusing %s partition %d (%s): %s. Nothing is read from it until an operator "
            "resolves this (see README, 'The store owns the offsets').",
            tp.topic,
            tp.partition,
            kind.value,
            why,
        )

    async def drain(self) -> None:
        """As the worker stops: let the poll in hand finish, acknowledge everything handled
        (durable, offsets committed), and hand on nothing more.

        Without it a stop under load left the last polls' offsets uncommitted: harmless to
        the data (the store owns the offsets), but a lag that monitoring shows until the group
        reads again. The caller bounds the wait; a store that is down is not waited out.
        """
        self._stopping = True  # leaving the group later must not flush again
        async with self._lock:
            if not self._drained and self._consumer_ is not None:
                self._drained = True
                await self._flush()

    def _unchanged(self) -> Callable[[], bool]:
        """Whether the partitions are still assigned as they are now."""
        generation = self._assignments
        return lambda: generation == self._assignments

    async def commit_offsets(self, offsets: dict[str, dict[int, int]]) -> None:
        """Commit the next offsets to read (topic -> partition -> offset; a hint only).

        The records are applied and durable already: should the commit fail, the next owner
        re-reads them and the store skips them.
        """
        from aiokafka import TopicPartition
        from aiokafka.errors import CommitFailedError, KafkaError

        if self._consumer_ is None or not offsets:
            return
        try:
            await self._consumer_.commit(
                {TopicPartition(t, p): o for t, parts in offsets.items() for p, o in parts.items()}
            )
        except (CommitFailedError, KafkaError) as exc:
            log.warning("offset commit failed (%s); records will be skipped later", exc)

    async def _position(self, assigned: Any) -> None:
        """Seek every newly assigned partition to the store's position, or refuse it.

        Every partition is paused first and resumed only once it stands where the store says,
        so no record fetched from Kafka's committed offset in the meantime is handed on.
        """
        from aiokafka.errors import KafkaError

        self._on_assigned()
        self._assignments += 1
        self._next.clear()
        consumer = self._consumer_
        assert consumer is not None
        tps = sorted(assigned, key=lambda tp: (tp.topic, tp.partition))
        self._positioned.clear()
        self.refused.clear()
        if not tps:
            return
        consumer.pause(*tps)
        while True:
            try:
                starts = await consumer.beginning_offsets(tps)
                ends = await consumer.end_offsets(tps)
                break
            except KafkaError as exc:
                log.warning(
                    "cannot read the log bounds of %d partitions (%s); retrying", len(tps), exc
                )
                await asyncio.sleep(1.0)
        by_kind: dict[EventKind, list[Any]] = defaultdict(list)
        for tp in tps:
            by_kind[self._config.topics[tp.topic]].append(tp)
        for kind, kind_tps in by_kind.items():
            try:
                stored = await self._load_progress(kind, [tp.partition for tp in kind_tps])
            except Exception as exc:  # the loader retries what it can wait out
                self._failed = exc
                return
            for tp in kind_tps:
                where = resume_position(stored[tp.partition], tp.topic, starts[tp], ends[tp])
                if isinstance(where, Resume):
                    consumer.seek(tp, where.offset)
                    consumer.resume(tp)
                    self._positioned.add(tp)
                    self._next[tp] = where.offset
                    continue
                self._refuse(tp, kind, where.reason)


async def read_past_unparsable(
    consumer: AIOKafkaConsumer,
    nxt: Mapping[Any, int],
    exc: BaseException,
    *,
    max_records: int,
    timeout_ms: int,
    current: Callable[[], bool] = lambda: True,
) -> dict[Any, list[RawRecord]]:
    """After a poll failed on a record the client cannot parse: a poll read partition by
    partition, in which the partition that failed ends with that record as
    :class:`~pipeline.batch.Unreadable`.

    ``nxt`` holds, for every partition read, the offset after the last record handed on: each
    is rewound there (aiokafka moves a failed partition past the records it read before the bad
    one, without returning them). Each partition is then read alone, once; where that read
    fails, reads shrink to one record until the bad one is found, at the cost of a few fetches.
    Once ``current()`` is false (a rebalance moved the partitions) the search ends with nothing:
    the next poll starts from the new positions, and fails again if it must.
    """
    tps = sorted(nxt, key=lambda tp: (tp.topic, tp.partition))
    for tp in tps:
        consumer.seek(tp, nxt[tp])
    log.warning("a poll failed on a record the Kafka client cannot parse (%s)", exc)
    out: dict[Any, list[RawRecord]] = {}
    total = 0
    for tp in tps:
        others = [t for t in tps if t != tp]
        consumer.pause(*others)
        try:
            got = await _read_alone(consumer, tp, nxt[tp], max_records, timeout_ms, current)
            _report_dead_letters(tp, got)
        finally:
            if current():
                consumer.resume(*others)
        if not current():
            return {}
        if got:
            out[tp] = got
            total += len(got)
            if total >= max_records:
                break
    return out


def _report_dead_letters(tp: Any, got: list[RawRecord]) -> None:
    """One log line for the dead letters of one read (a batch the client cannot decompress
    is hundreds of them)."""
    bad = [r for r in got if isinstance(r, Unreadable)]
    if len(bad) == 1:
        log.error("%s/%d@%d is a dead letter: %s", tp.topic, tp.partition, bad[0].offset,
                  bad[0].reason)  # fmt: skip
    elif bad:
        log.error(
            "%s/%d: %d records from offset %d to %d are dead letters, the first: %s",
            tp.topic, tp.partition, len(bad), bad[0].offset, bad[-1].offset, bad[0].reason,
        )  # fmt: skip


READ_PATIENCE_S = 10.0  # how long a partition read alone waits for records Kafka holds


async def _read_alone(
    consumer: AIOKafkaConsumer,
    tp: Any,
    at: int,
    max_records: int,
    timeout_ms: int,
    current: Callable[[], bool],
) -> list[RawRecord]:
    """One read of ``tp`` from ``at``; if it fails, the records before the first one that
    cannot be parsed, then that one as :class:`~pipeline.batch.Unreadable`.

    A seek drops what the client had fetched for the partition, and fetching it again takes a
    round trip that can outlast a poll's timeout. A read that returns nothing while Kafka holds
    records past ``at`` is therefore tried again (for at most :data:`READ_PATIENCE_S`); giving
    up at once let every search end before it reached the bad record, and the next poll fail
    on it again, for good.
    """
    unparsable = unparsable_errors()
    out: list[RawRecord] = []
    size = max_records
    past_bad = False
    deadline = asyncio.get_running_loop().time() + READ_PATIENCE_S
    while True:
        try:
            got = await consumer.getmany(tp, timeout_ms=timeout_ms, max_records=size)
        except unparsable as exc:
            if not current():
                return []
            consumer.seek(tp, at)  # the failed read may have moved it
            if size > 1:
                size = max(1, size // 8)
                continue
            reason = f"unreadable: the Kafka client cannot parse it ({_describe(exc)})"
            out.append(Unreadable(at, reason))
            at += 1
            consumer.seek(tp, at)
            if len(out) >= max_records:
                return out
            # the next record may be unreadable too (all of a batch the client cannot
            # decompress): it is read alone as well, not after another failed poll
            past_bad = True
            deadline = asyncio.get_running_loop().time() + READ_PATIENCE_S
            continue
        if not current():
            return []
        msgs = got.get(tp, [])
        if not msgs:
            held = readable_end(consumer, tp)
            if held is not None and held > at and asyncio.get_running_loop().time() < deadline:
                continue  # the records are there: the fetch after the seek is on its way
            return out  # nothing to read (or it does not come: the next poll retries)
        out.extend(msgs)
        if size == max_records or past_bad:  # read fine (or fine again after the bad ones)
            return out
        at = msgs[-1].offset + 1


def readable_end(consumer: AIOKafkaConsumer, tp: Any) -> int | None:
    """The offset after the last record ``consumer`` may read from ``tp`` as last fetched: the
    last stable offset when it reads committed records only (records of a transaction still
    open come later), else the high watermark."""
    lso = consumer.last_stable_offset(tp)
    if lso is not None and lso >= 0:
        return int(lso)
    held = consumer.highwater(tp)
    return None if held is None else int(held)


def unparsable_errors() -> tuple[type[BaseException], ...]:
    """What aiokafka raises from a poll for a record it cannot parse."""
    from aiokafka.errors import CorruptRecordException, UnsupportedCodecError

    # aiokafka's C parser raises UnicodeDecodeError for a header key that is not UTF-8, its
    # Python parser CorruptRecordException; a batch compressed with a codec the client cannot
    # decompress (all of Kafka's are installed: a future one) is unreadable record by record
    return (CorruptRecordException, UnicodeError, UnsupportedCodecError)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:300]


KAFKA_WAIT_SAY_S = 15.0  # how often a process waiting for Kafka says so


class StopRequested(Exception):
    """SIGTERM arrived while the process waited for Kafka: it has done nothing to undo."""


def wait_for_kafka(
    kafka: KafkaSettings, say: Callable[[str], None], retry_s: float = 1.0
) -> str | None:
    """Return once Kafka answers at the bootstrap address, saying now and then that it waits
    (a stack still starting, or started after the process); one sentence instead for any other
    error of the client, which waiting will not fix.

    aiokafka reports a TLS mismatch as it reports a broker that is down ("Unable to
    bootstrap"): the listener is asked (``schemas.kafka_probe``), and a mismatch is the one
    sentence, not a wait.

    The worker's (Faust's producer) and the archive's start would otherwise fail. A SIGTERM
    meanwhile raises :class:`StopRequested` (the caller exits 0: nothing was started).
    """
    from aiokafka.client import AIOKafkaClient

    async def probe() -> None:
        # the bare client (a consumer's group coordinator can raise CancelledError when it is
        # stopped right after its start)
        client = AIOKafkaClient(
            bootstrap_servers=kafka.bootstrap, request_timeout_ms=10_000, **kafka.client_kwargs()
        )
        try:
            await client.bootstrap()
        finally:
            await client.close()

    # the handler only notes the signal: an exception raised from it could land inside the
    # event loop of an attempt, which would take it for the attempt's own error
    stop = threading.Event()
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set()) if main else None
    try:
        return _wait(kafka, say, retry_s, probe, stop)
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)


def _wait(
    kafka: KafkaSettings,
    say: Callable[[str], None],
    retry_s: float,
    probe: Callable[[], Awaitable[None]],
    stop: threading.Event,
) -> str | None:
    from aiokafka.errors import KafkaConnectionError

    said_at: float | None = None
    with client_log_muted():  # one line of ours, not one of its per attempt
        while True:
            if stop.is_set():
                raise StopRequested
            try:
                asyncio.run(asyncio.wait_for(probe(), 15.0))
                return None
            except (KafkaConnectionError, TimeoutError, OSError) as exc:
                if (mismatch := tls_mismatch(kafka)) is not None:
                    return mismatch
                now = time.monotonic()
                if said_at is None or now - said_at >= KAFKA_WAIT_SAY_S:
                    say(f"waiting for Kafka at {kafka.bootstrap} ({first_line(exc, typed=True)})")
                    said_at = now
                stop.wait(retry_s)
            except Exception as exc:  # aiokafka's errors have no common base worth naming
                return f"cannot use Kafka at {kafka.bootstrap}: {first_line(exc, typed=True)}"
