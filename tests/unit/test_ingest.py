"""The reader's polls with a fake consumer: a record the Kafka client cannot parse becomes an
``Unreadable`` dead letter in its place, and no record before or after it is skipped or read twice.

The fake consumer behaves as aiokafka 0.14 does when a record of a fetch cannot be parsed: the
poll raises, and the next poll of that partition starts *at* the bad record, past the records
read before it in the failed poll, which were never returned.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import pytest
from aiokafka import TopicPartition as TP
from aiokafka.errors import CorruptRecordException, UnsupportedCodecError

from pipeline.batch import PartitionState, RawRecord, Record, Unreadable
from pipeline.ingest import (
    READ_COMMITTED,
    IngestError,
    KafkaBatchReader,
    ReaderConfig,
    read_past_unparsable,
    readable_end,
)
from schemas.events import EventKind

TOPIC = "sensor"


class FakeConsumer:
    """Partitions of ``size`` records; ``bad`` offsets cannot be parsed."""

    def __init__(
        self,
        parts: int,
        size: int,
        bad: dict[int, set[int]],
        refetch: int = 0,
        error: type[Exception] = UnicodeDecodeError,
    ) -> None:
        self.tps = [TP(TOPIC, p) for p in range(parts)]
        self.error = error
        # as aiokafka: a seek drops what was fetched, and the next `refetch` reads of the
        # partition come back empty while it is fetched again
        self.refetch = refetch
        self.cold: dict[TP, int] = {}
        self.size = size
        self.bad = bad
        self.position: dict[TP, int] = {}
        self.paused: set[TP] = set()
        self.lost: dict[TP, int] = {}  # where the next poll starts after a failed one
        self.listener: Any = None
        self.fails = 0

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def subscribe(self, topics: list[str], listener: Any) -> None:
        self.listener = listener

    def pause(self, *tps: TP) -> None:
        self.paused.update(tps)

    def resume(self, *tps: TP) -> None:
        self.paused.difference_update(tps)

    def seek(self, tp: TP, offset: int) -> None:
        self.position[tp] = offset
        self.lost.pop(tp, None)
        self.cold[tp] = self.refetch

    def highwater(self, tp: TP) -> int:
        return self.size

    def last_stable_offset(self, tp: TP) -> int:  # the reader reads committed records only
        return self.size

    async def beginning_offsets(self, tps: Iterable[TP]) -> dict[TP, int]:
        return dict.fromkeys(tps, 0)

    async def end_offsets(self, tps: Iterable[TP]) -> dict[TP, int]:
        return dict.fromkeys(tps, self.size)

    async def getmany(
        self, *tps: TP, timeout_ms: int = 0, max_records: int | None = None
    ) -> dict[TP, list[Record]]:
        await asyncio.sleep(0)
        if self.listener is not None and not self.position:
            await self.listener.on_partitions_assigned(set(self.tps))
        left = max_records or 10**9
        out: dict[TP, list[Record]] = {}
        for tp in tps or self.tps:
            if tp in self.paused or not left:
                continue
            if self.cold.get(tp):
                self.cold[tp] -= 1
                continue
            if tp in self.lost:
                self.position[tp] = self.lost.pop(tp)
            at = self.position[tp]
            got: list[Record] = []
            while at < self.size and len(got) < left:
                if at in self.bad.get(tp.partition, set()):
                    self.lost[tp] = at
                    self.fails += 1
                    if self.error is UnicodeDecodeError:
                        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
                    raise self.error("the batch cannot be read")
                got.append(Record(at, None, b"%d" % at))
                at += 1
            if got:
                self.position[tp] = at
                out[tp] = got
                left -= len(got)
        return out


def fake_reader(
    consumer: FakeConsumer,
    max_records: int,
    handle: Callable[[dict[EventKind, dict[int, list[RawRecord]]]], Awaitable[None]],
    flush: Callable[[], Awaitable[None]],
    load: Callable[[EventKind, list[int]], Awaitable[dict[int, PartitionState]]] | None = None,
) -> KafkaBatchReader:
    """A reader of ``consumer``'s one topic (unless ``load`` says otherwise, every partition
    starts with no stored progress)."""

    async def fresh(kind: EventKind, parts: list[int]) -> dict[int, PartitionState]:
        return {p: PartitionState() for p in parts}

    config = ReaderConfig(
        bootstrap="fake:9092",
        group_id="g",
        topics={TOPIC: EventKind.SENSOR},
        max_records=max_records,
        poll_timeout_s=0.01,
        session_timeout_ms=10_000,
        heartbeat_interval_ms=3_000,
    )
    reader = KafkaBatchReader(config, handle, load or fresh, lambda: None, flush)
    reader._consumer = lambda: consumer  # type: ignore[method-assign]
    return reader


def run_for(reader: KafkaBatchReader, turns: int) -> None:
    """Run the reader for ``turns`` turns of the event loop, then cancel it."""

    async def run() -> None:
        task = asyncio.create_task(reader.run())
        for _ in range(turns):
            await asyncio.sleep(0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(run())


def read_all(consumer: FakeConsumer, max_records: int) -> list[tuple[int, RawRecord]]:
    """Every record the reader hands on, until each partition is read to its end."""
    seen: list[tuple[int, RawRecord]] = []
    total = len(consumer.tps) * consumer.size

    async def handle(poll: dict[EventKind, dict[int, list[RawRecord]]]) -> None:
        for parts in poll.values():
            for part, records in parts.items():
                seen.extend((part, r) for r in records)

    async def flush() -> None:
        pass

    reader = fake_reader(consumer, max_records, handle, flush)

    async def run() -> None:
        task = asyncio.create_task(reader.run())
        for _ in range(10_000):
            if len(seen) >= total or task.done():
                break
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
    return seen


@pytest.mark.parametrize(
    "error", [UnicodeDecodeError, CorruptRecordException, UnsupportedCodecError]
)
@pytest.mark.parametrize("refetch", [0, 3])
@pytest.mark.parametrize("max_records", [1, 7, 25, 1000])
def test_an_unparsable_record_is_handed_on_in_its_place_and_nothing_is_skipped(
    max_records: int, refetch: int, error: type[Exception]
) -> None:
    bad = {1: {40, 41}, 2: {0, 99}}
    consumer = FakeConsumer(parts=3, size=100, bad=bad, refetch=refetch, error=error)
    seen = read_all(consumer, max_records)
    assert consumer.fails >= 4
    for part in range(3):
        mine = [r for p, r in seen if p == part]
        assert [r.offset for r in mine] == list(range(100)), part  # each once, in order
        unreadable = [r for r in mine if isinstance(r, Unreadable)]
        assert {r.offset for r in unreadable} == bad.get(part, set())
        for r in unreadable:
            assert r.value is None and "unreadable" in r.reason
            assert error.__name__ in r.reason


@pytest.mark.parametrize("bad", [{30}, {30, 31, 32}])
def test_read_past_unparsable_rewinds_every_partition_and_reads_past_the_bad_records(
    bad: set[int], caplog: pytest.LogCaptureFixture
) -> None:
    # the replay's use: no consumer group, partitions read from known offsets
    consumer = FakeConsumer(parts=2, size=50, bad={1: bad})
    consumer.position = {consumer.tps[0]: 10, consumer.tps[1]: 20}

    async def go() -> dict[Any, list[RawRecord]]:
        with pytest.raises(UnicodeDecodeError) as failed:
            await consumer.getmany(max_records=100)  # partition 0 is read, then 1 fails
        assert consumer.position[consumer.tps[0]] == 50  # moved on, its records never returned
        return await read_past_unparsable(
            consumer,
            {consumer.tps[0]: 10, consumer.tps[1]: 20},
            failed.value,
            max_records=100,
            timeout_ms=10,
        )

    got = asyncio.run(go())
    assert [r.offset for r in got[consumer.tps[0]]] == list(range(10, 50))
    ones = got[consumer.tps[1]]
    # a run of unreadable records (a batch the client cannot decompress) is found in one
    # search; it ends with the first record that reads fine after them
    after = max(bad) + 1
    assert [r.offset for r in ones] == list(range(20, after + 1))
    assert {r.offset for r in ones if isinstance(r, Unreadable)} == bad
    assert not consumer.paused
    assert consumer.position[consumer.tps[1]] == after + 1  # the next read starts after it
    # one log line for the dead letters of a search, however many
    lines = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    tp = consumer.tps[1]
    if len(bad) == 1:
        assert len(lines) == 1 and lines[0].startswith(f"{tp.topic}/1@30 is a dead letter: ")
    else:
        assert lines == [
            f"{tp.topic}/1: 3 records from offset 30 to 32 are dead letters, the first: "
            + next(r.reason for r in ones if isinstance(r, Unreadable))
        ]


def test_drain_acknowledges_after_the_poll_in_hand_and_hands_on_nothing_more() -> None:
    """A stopping worker's reader: the poll in hand finishes, then one flush (durable, offsets
    committed), and the loop ends without handing on another poll."""
    consumer = FakeConsumer(parts=2, size=10**6, bad={})
    log: list[str] = []
    in_handle = asyncio.Event()
    release = asyncio.Event()

    async def handle(poll: dict[EventKind, dict[int, list[RawRecord]]]) -> None:
        log.append("poll")
        if log.count("poll") == 3:  # drain is asked for while this poll is in hand
            in_handle.set()
            await release.wait()
        log.append("handled")

    async def flush() -> None:
        log.append("flush")

    reader = fake_reader(consumer, 5, handle, flush)

    async def run() -> None:
        task = asyncio.create_task(reader.run())
        await in_handle.wait()
        drain = asyncio.create_task(reader.drain())
        for _ in range(20):
            await asyncio.sleep(0)
        assert "flush" not in log  # the poll in hand is not cut short
        release.set()
        await drain
        await asyncio.wait_for(task, 5)  # the loop ends by itself
        await reader.drain()  # a second drain does nothing

    asyncio.run(run())
    assert log == ["poll", "handled", "poll", "handled", "poll", "handled", "flush"]


def test_a_partition_whose_progress_is_unreadable_is_refused_and_the_others_are_read() -> None:
    consumer = FakeConsumer(parts=3, size=4, bad={})
    seen: set[int] = set()

    async def load(kind: EventKind, parts: list[int]) -> dict[int, PartitionState]:
        return {p: PartitionState(refuse="its marker is damaged") if p == 1 else PartitionState()
                for p in parts}  # fmt: skip

    async def handle(poll: dict[EventKind, dict[int, list[RawRecord]]]) -> None:
        seen.update(poll[EventKind.SENSOR])

    async def flush() -> None:
        pass

    reader = fake_reader(consumer, 100, handle, flush, load)
    run_for(reader, 200)
    assert seen == {0, 2}
    assert reader.refused == {f"{TOPIC}/1": "its marker is damaged"}


def test_a_loader_that_fails_ends_the_reader_instead_of_leaving_it_polling_nothing() -> None:
    """aiokafka only logs what a rebalance listener raises: every partition would stay paused
    and the process would poll nothing, silently, for ever."""
    consumer = FakeConsumer(parts=2, size=4, bad={})

    async def load(kind: EventKind, parts: list[int]) -> dict[int, PartitionState]:
        raise ValueError("progress field 'offset' is not a number\nmore")

    async def nothing(poll: dict[EventKind, dict[int, list[RawRecord]]]) -> None:
        raise AssertionError("nothing may be handed on")

    async def flush() -> None:  # acknowledging what was handed on before: nothing here
        pass

    reader = fake_reader(consumer, 100, nothing, flush, load)
    with pytest.raises(IngestError) as exc:
        asyncio.run(asyncio.wait_for(reader.run(), 5))
    assert str(exc.value) == (
        "the assigned partitions could not be positioned: ValueError: progress field 'offset' "
        "is not a number"
    )


def test_a_partition_the_checkpoint_refuses_is_read_no_more_and_reported() -> None:
    """The checkpoint found the partition's stored state unusable while a poll was handled:
    no record of it is handed on after that poll, the others are read on."""
    consumer = FakeConsumer(parts=3, size=10, bad={})
    polls: list[set[int]] = []

    async def handle(poll: dict[EventKind, dict[int, list[RawRecord]]]) -> None:
        polls.append(set(poll[EventKind.SENSOR]))
        if len(polls) == 1:
            reader.refuse(EventKind.SENSOR, 1, "its open windows cannot be restored")
            reader.refuse(EventKind.SENSOR, 7, "not assigned here: ignored")

    async def flush() -> None:
        pass

    reader = fake_reader(consumer, 15, handle, flush)
    run_for(reader, 500)
    assert polls[0] == {0, 1}  # all of partition 0, the first 5 records of 1
    assert polls[1:] == [{2}]  # partition 1 is not read on
    assert consumer.tps[1] in consumer.paused
    assert reader.refused == {f"{TOPIC}/1": "its open windows cannot be restored"}


def test_polls_shrink_while_handling_them_would_starve_the_heartbeat() -> None:
    """A poll whose handling takes longer than a quarter of the session timeout (10 s here)
    makes the next ones ask for as many records as fit in it; fast polls double it back."""
    consumer = FakeConsumer(1, 200_000, {})
    asked: list[int] = []
    getmany = consumer.getmany

    async def counting(*tps: TP, timeout_ms: int = 0, max_records: int | None = None) -> Any:
        asked.append(max_records or 0)
        return await getmany(*tps, timeout_ms=timeout_ms, max_records=max_records)

    consumer.getmany = counting  # type: ignore[method-assign]
    now = [0.0]
    cost = [1e-3]  # seconds per record while handling

    async def handle(poll: dict[EventKind, dict[int, list[RawRecord]]]) -> None:
        now[0] += cost[0] * sum(len(r) for parts in poll.values() for r in parts.values())
        if len(asked) == 4:
            cost[0] = 1e-5  # the costly records are behind: polls are cheap again

    async def flush() -> None:
        pass

    reader = fake_reader(consumer, 8_000, handle, flush)
    reader.clock = lambda: now[0]
    run_for(reader, 40)
    # 8 000 records took 8 s: 2 500 fit in 2.5 s; once cheap, doubled back to the configured
    assert asked[:7] == [8_000, 2_500, 2_500, 2_500, 2_500, 5_000, 8_000], asked[:8]


def fetched(key_deserializer: Any, count: int = 5) -> list[Any]:
    """Records as aiokafka's fetcher hands them on, from one real record batch."""
    from aiokafka.consumer.fetcher import PartitionRecords
    from aiokafka.record.default_records import DefaultRecordBatchBuilder
    from aiokafka.record.memory_records import MemoryRecords

    builder = DefaultRecordBatchBuilder(
        magic=2, compression_type=0, is_transactional=0, producer_id=-1, producer_epoch=-1,
        base_sequence=-1, batch_size=1 << 20,
    )  # fmt: skip
    for i in range(count):
        key = None if i == 2 else f"dev-{i}".encode()
        builder.append(i, timestamp=None, key=key, value=b'{"i": %d}' % i, headers=[("h", b"x")])
    batch = MemoryRecords(bytes(builder.build()))
    return list(PartitionRecords(TP("t", 0), batch, [], 0, key_deserializer, None, True, 0))


def test_the_workers_consumer_gets_aiokafkas_own_records_and_others_consumer_records() -> None:
    from aiokafka.structs import ConsumerRecord

    from pipeline.ingest import bare, bare_records

    assert bare_records()  # the private hook exists in the pinned aiokafka
    assert bare_records()  # and installs once
    mine, theirs = fetched(bare), fetched(None)
    assert all(isinstance(r, ConsumerRecord) for r in theirs)
    assert not any(isinstance(r, ConsumerRecord) for r in mine)
    as_read = [(r.offset, r.key, r.value, list(r.headers)) for r in mine]
    assert as_read == [(r.offset, r.key, r.value, list(r.headers)) for r in theirs]
    assert [r.key for r in mine][:3] == [b"dev-0", b"dev-1", None]


def test_the_workers_consumer_asks_for_the_configured_fetch_and_committed_records_only() -> None:
    from pipeline.settings import WorkerSettings

    async def fetch_of(config: ReaderConfig) -> tuple[int, int, str]:
        async def unused(*args: Any) -> Any:
            raise AssertionError("not called")

        consumer = KafkaBatchReader(config, unused, unused, lambda: None, unused)._consumer()
        await consumer.stop()  # never started: this only closes its client
        return consumer._fetch_min_bytes, consumer._fetch_max_wait_ms, consumer._isolation_level

    config = ReaderConfig("fake:9092", "g", {TOPIC: EventKind.SENSOR}, 10, 0.01, 10_000, 3_000)
    defaults = WorkerSettings()
    # Kafka's own defaults: a fetch is answered as soon as anything is there
    assert (defaults.fetch_min_bytes, defaults.fetch_max_wait_ms) == (1, 500)
    # aborted transactions' records are never read (see test_transactions.py)
    assert asyncio.run(fetch_of(config)) == (1, 500, READ_COMMITTED) == (1, 500, "read_committed")
    lingering = dataclasses.replace(config, fetch_min_bytes=1_000_000, fetch_max_wait_ms=50)
    assert asyncio.run(fetch_of(lingering)) == (1_000_000, 50, READ_COMMITTED)


class _Bounds:
    """A consumer's last known bounds of one partition (aiokafka's: None until fetched; its
    last stable offset -1 when it reads uncommitted records)."""

    def __init__(self, highwater: int | None, lso: int | None) -> None:
        self._hw, self._lso = highwater, lso

    def highwater(self, tp: TP) -> int | None:
        return self._hw

    def last_stable_offset(self, tp: TP) -> int | None:
        return self._lso


@pytest.mark.parametrize(
    ("highwater", "lso", "end"),
    [
        (120, 100, 100),  # a transaction open from offset 100: nothing past it is readable yet
        (120, 120, 120),
        (120, -1, 120),  # a consumer reading uncommitted records
        (120, None, 120),  # a broker too old to say
        (None, None, None),  # nothing fetched yet
    ],
)
def test_the_readable_end_is_the_last_stable_offset_when_there_is_one(
    highwater: int | None, lso: int | None, end: int | None
) -> None:
    consumer: Any = _Bounds(highwater, lso)
    assert readable_end(consumer, TP(TOPIC, 0)) == end
