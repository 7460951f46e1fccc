"""Diverting rejected and late records never loses one and never stops the worker."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import pytest
from aiokafka.errors import KafkaConnectionError, MessageSizeTooLargeError, ProducerClosed

from pipeline.batch import Diverted, PartitionBatch, Record
from pipeline.divert import TRUNCATED_BYTES, Divert
from pipeline.metrics import Metrics
from schemas import diverted
from schemas.events import EventKind

if TYPE_CHECKING:
    from faust.types import TopicT


@dataclass
class FakeTopic:
    """A Faust topic whose sends fail as scripted: by record offset, a list of errors to raise."""

    name: str
    limit: int = 1_000_000
    failures: dict[int, list[BaseException]] = field(default_factory=dict)
    written: list[tuple[bytes | None, bytes, dict[str, bytes]]] = field(default_factory=list)
    headers: list[list[tuple[str, bytes]]] = field(default_factory=list)  # as sent, in order

    async def send(self, *, key: Any, value: bytes, headers: Any, force: bool) -> Any:
        hdrs = dict(headers)
        offset = int(hdrs["pulse.source.offset"])
        errors = self.failures.get(offset)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if errors:
            fut.set_exception(errors.pop(0))
        elif len(value) > self.limit:
            fut.set_exception(MessageSizeTooLargeError())
        else:
            self.written.append((key, value, hdrs))
            self.headers.append(list(headers))
            fut.set_result(None)
        return fut


def divert(dead: FakeTopic, late: FakeTopic | None = None) -> tuple[Divert, Metrics]:
    d = Divert.__new__(Divert)
    metrics = Metrics()
    # the fakes stand in for Faust topics: Divert only calls their send
    d._dead = cast("TopicT", dead)
    d._late = cast("TopicT", late or FakeTopic("late"))
    d._metrics, d._retry_delay_s = metrics, 0.0
    return d, metrics


def batch(dead: list[Record], late: list[Record] = ()) -> PartitionBatch:  # type: ignore[assignment]
    return PartitionBatch(
        kind=EventKind.SENSOR,
        partition=3,
        expect_offset=-1,
        last_offset=10,
        max_event_time=0,
        watermark=None,
        deltas=[],
        new_entities={},
        events=0,
        dead=[Diverted(r, "bad") for r in dead],
        late=[Diverted(r, "late") for r in late],
    )


def test_writes_dead_and_late_records_with_their_source() -> None:
    dead, late = FakeTopic("dead"), FakeTopic("late")
    d, _ = divert(dead, late)
    asyncio.run(d.send("pulse.sensor", [batch([Record(1, b"k", b"x")], [Record(2, None, b"y")])]))
    ((key, value, hdrs),) = dead.written
    assert (key, value) == (b"k", b"x")
    assert hdrs["pulse.source.topic"] == b"pulse.sensor"
    assert hdrs["pulse.source.partition"] == b"3" and hdrs["pulse.source.offset"] == b"1"
    assert hdrs["pulse.reason"] == b"bad"
    assert [v for _, v, _ in late.written] == [b"y"]


@dataclass(frozen=True)
class WithHeaders:
    """A consumed record with headers of its own (aiokafka's carry a tuple of them)."""

    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes | None], ...]


def test_a_dead_letter_keeps_the_records_headers_but_those_named_like_the_workers() -> None:
    dead = FakeTopic("dead", limit=70_000)
    d, _ = divert(dead)
    own = (("traceparent", b"00-ab-01"), ("pulse.reason", b"spoofed"), ("empty", None))
    small = WithHeaders(4, b"k", b"x", own)
    big = WithHeaders(5, b"k", b"x" * 100_000, own)  # refused whole: its copy keeps only ours
    asyncio.run(d.send("t", [batch([cast(Record, small), cast(Record, big)])]))
    whole, cut = dead.headers
    assert whole[:2] == [("traceparent", b"00-ab-01"), ("empty", b"")]
    assert [k for k, _ in whole[2:]] == list(diverted.HEADERS)
    assert dict(whole)["pulse.reason"] == b"bad"
    assert all(k.startswith(diverted.PREFIX) for k, _ in cut)
    assert dict(cut)["pulse.truncated"] == b"100000"


def test_a_tombstone_is_written_as_an_empty_value() -> None:
    dead = FakeTopic("dead")
    d, _ = divert(dead)
    asyncio.run(d.send("t", [batch([Record(1, b"k", None)])]))
    assert dead.written[0][1] == b""


def test_a_record_the_broker_refuses_whole_is_written_truncated_and_counted() -> None:
    dead = FakeTopic("dead", limit=1_000_000)
    d, m = divert(dead)
    big = b"{" + b"x" * 1_040_000
    asyncio.run(d.send("t", [batch([Record(7, None, big), Record(8, None, b"ok")])]))
    by_offset = {h["pulse.source.offset"]: (v, h) for _, v, h in dead.written}
    value, hdrs = by_offset[b"7"]
    assert value == big[:TRUNCATED_BYTES]
    assert hdrs["pulse.truncated"] == str(len(big)).encode()
    assert b"MessageSizeTooLargeError" in hdrs["pulse.truncated.reason"]
    assert by_offset[b"8"][0] == b"ok"
    assert m.dead_truncated == 1 and m.dead_unwritable == 0


def test_transient_broker_errors_are_retried_until_written() -> None:
    dead = FakeTopic("dead", failures={1: [KafkaConnectionError(), KafkaConnectionError()]})
    d, m = divert(dead)
    asyncio.run(d.send("t", [batch([Record(1, None, b"x")])]))
    assert [v for _, v, _ in dead.written] == [b"x"]
    assert m.dead_truncated == 0


def test_a_record_unwritable_even_truncated_is_counted_not_fatal() -> None:
    dead = FakeTopic("dead", failures={1: [ValueError("nope"), ValueError("still no")]})
    d, m = divert(dead)
    asyncio.run(d.send("t", [batch([Record(1, None, b"x"), Record(2, None, b"y")])]))
    assert [v for _, v, _ in dead.written] == [b"y"]
    assert m.dead_unwritable == 1


def test_a_closing_producer_stops_the_send_instead_of_dropping() -> None:
    dead = FakeTopic("dead", failures={1: [ProducerClosed()]})
    d, _ = divert(dead)
    with pytest.raises(ProducerClosed):
        asyncio.run(d.send("t", [batch([Record(1, None, b"x")])]))
