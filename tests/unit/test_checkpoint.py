"""The worker's checkpoint of a poll: prepare, divert, apply, durable, commit offsets.

``Checkpoint`` is driven with a fake store writer, a fake divert and a fake offset committer,
so each rule is seen in isolation: the order of the steps, a fence before the first
acknowledgement after an assignment or a lost connection, conflicts restore from the store,
no record can make a partition fail, and a poll is acknowledged (durable, then its offsets
committed) only after the next poll is prepared, or on flush.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

import orjson
import pytest
from redis.exceptions import ConnectionError as StoreConnectionError

from pipeline import windows
from pipeline.batch import BatchRules, PartitionBatch, PartitionState, Record, process_partitions
from pipeline.checkpoint import Checkpoint
from pipeline.metrics import Metrics
from pipeline.store_writer import ApplyOutcome, StoredTypeError
from pipeline.validation import TimeBounds
from schemas import keys, packed
from schemas.events import EventKind

NOW = 1_700_000_000_000
S, A = EventKind.SENSOR, EventKind.APPLOG
TOPICS = {S: "pulse.sensor", A: "pulse.applog"}
RULES = BatchRules(TimeBounds(6 * 3600 * 1000, 300_000), 30_000)


def sensor(t: int, device: str = "d1", value: float = 1.0) -> bytes:
    return orjson.dumps(
        {
            "device_id": device,
            "site": "s1",
            "event_time": t,
            "metric": "temp",
            "value": value,
            "unit": "C",
            "lat": 1.0,
            "lon": 2.0,
            "firmware": "1.0",
        }
    )


def records(start: int, n: int) -> list[Record]:
    return [Record(start + i, None, sensor(NOW - 1000 + i)) for i in range(n)]


@dataclass
class FakeWriter:
    """Keeps per-partition offsets like the store; logs every call in order."""

    offsets: dict[tuple[EventKind, int], int] = field(default_factory=dict)
    max_event_times: dict[tuple[EventKind, int], int] = field(default_factory=dict)
    hashes: dict[str, dict[bytes, bytes]] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)
    fail_next: list[str] = field(default_factory=list)  # call names that raise once

    def _maybe_fail(self, name: str) -> None:
        self.calls.append(name)
        if name in self.fail_next:
            self.fail_next.remove(name)
            raise StoreConnectionError(f"{name}: connection lost")

    async def read_state(self, kind: EventKind, partitions: list[int]) -> dict[int, PartitionState]:
        self._maybe_fail("read")
        return {
            p: PartitionState(
                offset=self.offsets.get((kind, p), -1),
                max_event_time=self.max_event_times.get((kind, p), windows.NO_EVENT_YET),
            )
            for p in partitions
        }

    async def read_hashes(self, names: list[str]) -> dict[str, dict[bytes, bytes]]:
        return {k: dict(self.hashes.get(k, {})) for k in names}

    async def send(self, batches: list[PartitionBatch], now_ms: int) -> list[ApplyOutcome]:
        if all(b.empty for b in batches):
            return []  # like the real writer: nothing to send
        self._maybe_fail("apply")
        out = []
        for b in batches:
            if b.empty:
                continue
            pk = (b.kind, b.partition)
            cur = self.offsets.get(pk, -1)
            ok = cur == b.expect_offset
            if ok:
                self.offsets[pk] = b.last_offset
                self.max_event_times[pk] = b.max_event_time
                for w in b.writes:
                    if w.replace:
                        self.hashes.pop(w.key, None)
                    h = self.hashes.setdefault(w.key, {})
                    h.update(zip((f.encode() for f in w.fields), w.values, strict=True))
            out.append(ApplyOutcome(b.partition, ok, self.offsets.get(pk, -1)))
        return out

    async def durable(self) -> float:
        self._maybe_fail("durable")
        return 0.001

    async def fence(self) -> float:
        self._maybe_fail("fence")
        return 0.001

    async def close(self) -> None:
        self.calls.append("close")


@dataclass
class FakeDivert:
    sent: list[tuple[str, int, str]] = field(default_factory=list)  # (topic kind, offset, reason)
    calls: list[str] | None = None  # a shared call log, to check the order of steps

    async def send(self, source_topic: str, batches: Sequence[PartitionBatch]) -> None:
        if self.calls is not None:
            self.calls.append("divert")
        for b in batches:
            self.sent += [("dead", d.record.offset, d.reason) for d in b.dead]
            self.sent += [("late", d.record.offset, d.reason) for d in b.late]


def applier(
    writer: FakeWriter, divert: FakeDivert | None = None, **kw: object
) -> tuple[Checkpoint, Metrics]:
    metrics = Metrics()
    a = Checkpoint(
        TOPICS,
        writer,
        divert or FakeDivert(),
        RULES,
        metrics,
        clock=lambda: NOW,
        retry_delay_s=0.0,
        **kw,  # type: ignore[arg-type]
    )
    return a, metrics


def run(coro: object) -> None:
    asyncio.run(coro)  # type: ignore[arg-type]


def sensors(parts: dict[int, list[Record]]) -> dict[EventKind, dict[int, list[Record]]]:
    """A poll of sensor records only."""
    return {S: parts}


def test_applies_and_advances_without_fencing_when_nothing_is_unsure() -> None:
    w = FakeWriter()
    a, m = applier(w)
    run(a.commit(sensors({0: records(0, 5), 1: records(0, 3)})))
    assert w.offsets == {(S, 0): 4, (S, 1): 2}
    # durable with its apply (in the background); acknowledged with the next poll, or on flush
    assert w.calls == ["read", "apply", "durable"]
    run(a.flush())
    assert w.calls == ["read", "apply", "durable"]
    assert m.events == 8 and m.fences == 0


def test_both_kinds_of_a_poll_go_in_one_apply_and_one_durability_wait() -> None:
    w = FakeWriter()
    committed: list[dict[str, dict[int, int]]] = []

    async def commit_offsets(offsets: dict[str, dict[int, int]]) -> None:
        committed.append(offsets)

    a, m = applier(w, commit_offsets=commit_offsets)
    applog = Record(0, None, orjson.dumps({
        "service": "api", "route": "/a", "event_time": NOW - 500, "latency_ms": 12.5,
        "status_code": 200, "level": "INFO", "message": "ok", "trace_id": "t1",
    }))  # fmt: skip
    run(a.commit({S: {0: records(0, 3)}, A: {1: [applog]}}))
    run(a.flush())
    assert w.offsets == {(S, 0): 2, (A, 1): 0}
    assert w.calls == ["read", "read", "apply", "durable"]
    assert committed == [{"pulse.sensor": {0: 3}, "pulse.applog": {1: 1}}]
    assert m.events == 4 and m.dead == 0


def test_a_poll_is_acknowledged_after_the_next_poll_is_prepared() -> None:
    w = FakeWriter()
    d = FakeDivert(calls=w.calls)
    committed: list[dict[str, dict[int, int]]] = []

    async def commit_offsets(offsets: dict[str, dict[int, int]]) -> None:
        w.calls.append("commit offsets")
        assert w.calls[-2] == "durable", "offsets committed before the store confirmed"
        committed.append(offsets)

    a, _ = applier(w, d, commit_offsets=commit_offsets)
    run(a.commit(sensors({0: records(0, 3)})))
    run(a.commit(sensors({0: records(3, 2)})))
    assert w.calls == [
        "read", "divert", "apply",
        "durable",  # the first poll's durability wait, with its apply
        # the second poll: prepared, then the first settled and acknowledged, then diverted
        # and sent
        "commit offsets", "divert", "apply", "durable",
    ]  # fmt: skip
    assert committed == [{"pulse.sensor": {0: 3}}]
    run(a.flush())
    assert committed == [{"pulse.sensor": {0: 3}}, {"pulse.sensor": {0: 5}}]
    run(a.flush())  # nothing new: nothing to wait for or commit
    assert w.calls.count("durable") == 2 and len(committed) == 2


def test_the_durability_wait_runs_while_the_next_poll_is_prepared() -> None:
    # the store confirms durability only once the next poll is being prepared: were the wait
    # in series with that prepare (as it once was), this would never finish
    prepared_while_waiting: list[bool] = []

    class SlowDurable(FakeWriter):
        waiting = False
        release: asyncio.Event | None = None

        async def durable(self) -> float:
            self.release = self.release or asyncio.Event()
            self.waiting = True
            await self.release.wait()
            self.waiting = False
            self.release = None
            return await super().durable()

    w = SlowDurable()

    def process(*args: object, **kw: object) -> list[PartitionBatch]:
        prepared_while_waiting.append(w.waiting)
        if w.release is not None:
            w.release.set()
        return process_partitions(*args, **kw)  # type: ignore[arg-type]

    committed: list[dict[str, dict[int, int]]] = []

    async def commit_offsets(offsets: dict[str, dict[int, int]]) -> None:
        committed.append(offsets)

    async def go() -> None:
        a, _ = applier(w, process=process, commit_offsets=commit_offsets)
        await a.commit(sensors({0: records(0, 3)}))
        await asyncio.sleep(0)  # the apply is sent; its durability wait has begun
        assert w.waiting and not committed
        await asyncio.wait_for(a.commit(sensors({0: records(3, 2)})), timeout=10)
        assert committed == [{"pulse.sensor": {0: 3}}]  # acknowledged once durable
        await asyncio.sleep(0)
        assert w.waiting and w.release is not None  # the second poll's wait
        w.release.set()
        await asyncio.wait_for(a.flush(), timeout=10)

    run(go())
    assert prepared_while_waiting == [False, True]
    assert committed == [{"pulse.sensor": {0: 3}}, {"pulse.sensor": {0: 5}}]


def test_after_an_assignment_a_poll_of_already_applied_records_is_fenced_before_ack() -> None:
    # The previous owner applied offsets 0..9 and died before seeing them durable.
    w = FakeWriter(offsets={(S, 0): 9})
    a, m = applier(w)
    a.forget()  # what the reader calls on every assignment
    run(a.commit(sensors({0: records(0, 10)})))
    assert w.calls[0] == "fence", w.calls
    assert "apply" not in w.calls  # nothing new to apply, yet durability was confirmed
    assert m.fences == 1
    run(a.commit(sensors({0: records(10, 2)})))
    run(a.flush())
    assert w.calls.count("fence") == 1  # only the first acknowledgement needs the fence


def test_lost_connection_during_apply_is_unsure_and_fenced_before_ack() -> None:
    w = FakeWriter(fail_next=["apply"])
    a, m = applier(w)
    run(a.commit(sensors({0: records(0, 5)})))
    assert w.calls == ["read", "apply"]  # its outcome is read with the next poll, or on flush
    run(a.flush())
    # apply failed (maybe applied, maybe not): fence, re-read, apply again, then acknowledge
    assert w.calls == ["read", "apply", "fence", "read", "apply", "durable"]
    assert w.offsets == {(S, 0): 4}
    assert m.store_retries == 1 and m.fences == 1 and m.events == 5


def test_lost_connection_while_waiting_for_durability_fences_and_still_commits() -> None:
    w = FakeWriter(fail_next=["durable"])
    committed: list[dict[str, dict[int, int]]] = []

    async def commit_offsets(offsets: dict[str, dict[int, int]]) -> None:
        assert "fence" in w.calls, "committed before a fence vouched for the writes"
        committed.append(offsets)

    a, m = applier(w, commit_offsets=commit_offsets)
    run(a.commit(sensors({0: records(0, 5)})))
    run(a.commit(sensors({0: records(5, 2)})))
    # the first poll's wait failed: unsure, so a fence vouches for it, and the second poll is
    # prepared again from the store before it is applied
    assert w.calls == ["read", "apply", "durable", "fence", "read", "apply", "durable"]
    assert committed == [{"pulse.sensor": {0: 5}}]
    run(a.flush())
    assert w.offsets == {(S, 0): 6} and m.events == 7 and m.fences == 1


def test_lost_connection_during_fence_fences_again() -> None:
    w = FakeWriter(fail_next=["apply", "fence"])
    a, m = applier(w)
    run(a.commit(sensors({0: records(0, 3)})))
    run(a.flush())
    assert w.calls == ["read", "apply", "fence", "fence", "read", "apply", "durable"]
    assert m.fences == 1 and m.store_retries == 2


def test_flush_retries_a_lost_connection_with_a_fence() -> None:
    w = FakeWriter(fail_next=["durable"])
    a, m = applier(w)
    run(a.commit(sensors({0: records(0, 3)})))
    run(a.flush())
    # the unconfirmed poll is pending again: re-read, the store holds it, so nothing to apply
    assert w.calls == ["read", "apply", "durable", "fence", "read"]
    assert m.store_retries == 1 and m.fences == 1


def test_conflict_rereads_the_store_and_applies_only_what_is_new() -> None:
    w = FakeWriter()
    a, m = applier(w)
    run(a.commit(sensors({0: records(0, 5)})))
    w.offsets[(S, 0)] = 7  # someone else (a previous owner) applied 5..7 meanwhile
    run(a.commit(sensors({0: records(5, 5)})))
    run(a.flush())
    assert w.offsets == {(S, 0): 9}
    assert m.conflicts == 1
    assert m.events == 5 + 2  # 8 and 9 only
    assert w.calls.count("fence") == 1  # their writes are fenced before we acknowledge


def test_redelivered_records_are_skipped() -> None:
    w = FakeWriter()
    a, m = applier(w)
    run(a.commit(sensors({0: records(0, 5)})))
    run(a.commit(sensors({0: records(0, 5)})))
    assert m.events == 5 and w.offsets == {(S, 0): 4}


def test_all_rejected_and_all_late_batches_still_advance_the_offset() -> None:
    w = FakeWriter()
    d = FakeDivert()
    a, m = applier(w, d)
    run(a.commit(sensors({0: [Record(i, None, b"not json") for i in range(4)]})))
    run(a.flush())
    assert w.offsets == {(S, 0): 3} and m.dead == 4
    run(a.commit(sensors({0: [Record(4, None, sensor(NOW))]})))
    late = [Record(5 + i, None, sensor(NOW - 3_600_000)) for i in range(3)]
    run(a.commit(sensors({0: late})))
    run(a.flush())
    assert w.offsets == {(S, 0): 7} and m.late == 3
    assert [k for k, _, _ in d.sent] == ["dead"] * 4 + ["late"] * 3


def test_a_record_that_breaks_processing_becomes_a_dead_letter_alone() -> None:
    poison = b'{"poison": true}'

    def fragile(kind, parts, states, rules, now):  # type: ignore[no-untyped-def]
        if any(r.value == poison for recs in parts.values() for r in recs):
            raise RuntimeError("boom")
        return process_partitions(kind, parts, states, rules, now)

    w = FakeWriter()
    d = FakeDivert()
    a, m = applier(w, d, process=fragile)
    recs = records(0, 5)
    recs[2] = Record(2, None, poison)
    recs.append(Record(5, None, poison))  # also the last record: the offset must pass it
    run(a.commit(sensors({0: recs})))
    run(a.flush())
    assert w.offsets == {(S, 0): 5}
    assert m.events == 4 and m.isolated == 2
    assert [(o, r) for _, o, r in d.sent] == [
        (2, "could not be processed: RuntimeError: boom"),
        (5, "could not be processed: RuntimeError: boom"),
    ]


@pytest.mark.parametrize("fail", [["read"], ["read", "read"]])
def test_load_progress_retries_store_outages(fail: list[str]) -> None:
    w = FakeWriter(offsets={(S, 3): 41}, fail_next=list(fail))
    a, m = applier(w)
    got = asyncio.run(a.load_progress(S, [3]))
    assert got[3].offset == 41
    assert m.store_retries == len(fail)


def _window_count(w: FakeWriter, partition: int, dim: str = keys.Dim.METRIC) -> int:
    start = keys.window_start(NOW - 1000, keys.WINDOW_1M)
    key = keys.window_key(EventKind.SENSOR, partition, keys.WINDOW_1M, dim, start)
    table = packed.decode(list(w.hashes[key].values()), packed.NF_SENSOR)
    return int(table.stats[:, packed.COUNT].sum())


def test_values_are_absolute_and_a_new_owner_restores_the_open_windows() -> None:
    w = FakeWriter()
    a, _ = applier(w)
    run(a.commit(sensors({0: records(0, 5)})))
    assert _window_count(w, 0) == 5
    b, _ = applier(w)  # the next owner of partition 0, another process
    b.forget()
    run(b.commit(sensors({0: records(5, 3)})))
    assert _window_count(w, 0) == 8  # 5 restored from the store + 3


def test_a_conflict_restores_the_windows_the_other_writer_left() -> None:
    w = FakeWriter()
    a, _ = applier(w)
    b, _ = applier(w)
    run(a.commit(sensors({0: records(0, 4)})))
    run(b.commit(sensors({0: records(0, 6)})))  # b restored a's 4, applied 4..5
    assert _window_count(w, 0) == 6
    run(a.commit(sensors({0: records(6, 2)})))  # a's cached windows are stale: conflict, restore
    run(a.flush())
    assert _window_count(w, 0) == 8 and w.offsets == {(S, 0): 7}


def test_the_order_is_prepare_divert_apply_then_settle_durable_and_commit_offsets() -> None:
    w = FakeWriter()
    d = FakeDivert(calls=w.calls)
    committed: list[dict[str, dict[int, int]]] = []

    async def commit_offsets(offsets: dict[str, dict[int, int]]) -> None:
        w.calls.append("commit offsets")
        committed.append(offsets)

    a, _ = applier(w, d, commit_offsets=commit_offsets)
    recs = [*records(0, 3), Record(3, None, b"oops")]
    run(a.commit(sensors({0: recs, 2: records(0, 2)})))
    run(a.flush())
    assert w.calls == ["read", "divert", "apply", "durable", "commit offsets"]
    assert committed == [{"pulse.sensor": {0: 4, 2: 2}}]  # the next offsets to read


def test_offsets_are_not_committed_while_the_store_is_unreachable() -> None:
    w = FakeWriter(fail_next=["apply"])
    committed: list[dict[str, dict[int, int]]] = []

    async def commit_offsets(offsets: dict[str, dict[int, int]]) -> None:
        assert w.offsets == {(S, 0): 4}, "committed before the apply succeeded"
        committed.append(offsets)

    a, _ = applier(w, commit_offsets=commit_offsets)
    run(a.commit(sensors({0: records(0, 5)})))
    run(a.flush())
    assert committed == [{"pulse.sensor": {0: 5}}]


def test_a_conflict_found_while_the_next_poll_is_prepared_redoes_only_that_partition() -> None:
    w = FakeWriter()
    a, m = applier(w)
    run(a.commit(sensors({0: records(0, 3), 1: records(0, 3)})))
    w.offsets[(S, 1)] = 4  # someone else applies offsets 3..4 of partition 1
    run(a.commit(sensors({0: records(3, 2), 1: records(3, 4)})))  # sent: p1's is refused
    # the third poll is prepared on top of the second; settling the second finds p1 refused:
    # p1 is restored from the store and prepared again with the second poll's records
    run(a.commit(sensors({0: records(5, 1), 1: records(7, 1)})))
    run(a.flush())
    assert w.offsets == {(S, 0): 5, (S, 1): 7}
    assert m.conflicts == 1 and m.fences == 1
    assert m.events == 3 + 3 + 2 + 1 + 3  # p1: 5, 6 and 7 once; 3 and 4 are someone else's
    assert _window_count(w, 0) == 6
    assert _window_count(w, 1) == 3 + 3  # our first 3, restored, then 5..7


def test_kafka_offsets_are_committed_at_most_once_an_interval_and_always_on_flush() -> None:
    """Each commit is a round trip on a poll's path: while polls follow, the durable offsets
    are committed at most once a ``commit_interval_ms``; a flush (idle, hand-over) commits
    whatever is durable and not committed yet."""
    w = FakeWriter()
    now = [NOW]
    committed: list[dict[str, dict[int, int]]] = []

    async def commit_offsets(offsets: dict[str, dict[int, int]]) -> None:
        committed.append(offsets)

    metrics = Metrics()
    a = Checkpoint(
        TOPICS, w, FakeDivert(), RULES, metrics, clock=lambda: now[0], retry_delay_s=0.0,
        commit_offsets=commit_offsets, commit_interval_ms=1000,
    )  # fmt: skip

    async def scenario() -> None:
        await a.commit(sensors({0: records(0, 3)}))
        await a.commit(sensors({0: records(3, 2)}))  # acknowledges the first: none before
        assert committed == [{"pulse.sensor": {0: 3}}]
        now[0] += 400
        await a.commit(sensors({0: records(5, 2)}))  # within the interval: not yet
        assert committed == [{"pulse.sensor": {0: 3}}]
        now[0] += 700
        await a.commit(sensors({0: records(7, 1), 1: records(0, 2)}))  # due: all durable so far
        assert committed[1:] == [{"pulse.sensor": {0: 7}}]
        now[0] += 10
        await a.flush()  # nothing follows: the rest at once
        assert committed[2:] == [{"pulse.sensor": {0: 8, 1: 2}}]

    run(scenario())
    assert w.offsets == {(S, 0): 7, (S, 1): 1}


@pytest.mark.parametrize("damage", ["not packed", "bad statistics", "field name", "another type"])
def test_a_partition_whose_stored_windows_cannot_be_decoded_is_refused_not_the_worker(
    damage: str,
) -> None:
    """A stored window value the worker cannot decode (written by something else), or a
    window key of another type (the store's WRONGTYPE, as the real writer reports it), would be
    replaced without the events it holds if the partition were applied on: that partition is
    refused (its reader stops reading it) and nothing of it is written or acknowledged; the
    other partitions of the poll are applied as usual."""
    w = FakeWriter()
    a, _ = applier(w)
    run(a.commit(sensors({0: records(0, 5), 1: records(0, 5)})))
    run(a.flush())
    start = keys.window_start(NOW - 1000, keys.WINDOW_1M)
    key = keys.window_key(S, 1, keys.WINDOW_1M, keys.Dim.METRIC, start)
    good = w.hashes[key][b"temp"]
    if damage == "not packed":
        w.hashes[key][b"temp"] = b"\x01junk"
    elif damage == "bad statistics":  # decodes, but its count is negative
        table = packed.decode([good], packed.NF_SENSOR)
        table.stats[0, packed.COUNT] = -3
        w.hashes[key][b"temp"] = packed.encode(table)[0]
    elif damage == "field name":
        w.hashes[key][b"\xff\xfe"] = good
    stored = dict(w.hashes[key])

    class Reader(FakeWriter):
        async def read_hashes(self, names: list[str]) -> dict[str, dict[bytes, bytes]]:
            if damage == "another type" and key in names:
                raise StoredTypeError({key: "it holds another type than a hash"})
            return await super().read_hashes(names)

    committed: list[dict[str, dict[int, int]]] = []

    async def commit_offsets(offsets: dict[str, dict[int, int]]) -> None:
        committed.append(offsets)

    w = Reader(offsets=w.offsets, max_event_times=w.max_event_times, hashes=w.hashes)
    b, _ = applier(w, commit_offsets=commit_offsets)  # the next owner, another process
    refused: list[tuple[EventKind, int, str]] = []
    b.refuse = lambda kind, p, why: refused.append((kind, p, why))
    b.forget()
    run(b.commit(sensors({0: records(5, 3), 1: records(5, 3)})))
    run(b.flush())
    assert w.offsets == {(S, 0): 7, (S, 1): 4}  # partition 1 stays where it was
    assert w.hashes[key] == stored  # and its windows are not replaced
    assert committed == [{"pulse.sensor": {0: 8}}]
    ((kind, part, why),) = refused
    assert (kind, part) == (S, 1)
    if damage == "another type":
        assert why.startswith(f"{key} in the store cannot be read (it holds another type")
    else:
        assert why.startswith(f"stored window {key}: ") and "cannot be restored" in why
    assert "\n" not in why


def test_a_partition_whose_apply_the_store_refuses_is_refused_not_the_worker() -> None:
    """The store's function refuses a partition's apply, writing nothing, when a key it writes
    holds another type (written by something else). That partition is refused (its reader
    stops reading it): neither its records in flight nor those of the poll being prepared are
    applied or acknowledged; the other partitions go on."""
    holds = "window key pulse:{sensor.1}:w:1m:metric:0 holds a string, not a hash"

    class Refusing(FakeWriter):
        async def send(self, batches: list[PartitionBatch], now_ms: int) -> list[ApplyOutcome]:
            mine = [b for b in batches if b.partition == 1 and not b.empty]
            out = await super().send([b for b in batches if b not in mine], now_ms)
            return sorted(
                [*out, *(ApplyOutcome(b.partition, False, -1, refused=holds) for b in mine)],
                key=lambda o: [b.partition for b in batches if not b.empty].index(o.partition),
            )

    w = Refusing()
    committed: list[dict[str, dict[int, int]]] = []

    async def commit_offsets(offsets: dict[str, dict[int, int]]) -> None:
        committed.append(offsets)

    a, metrics = applier(w, commit_offsets=commit_offsets)
    refused: list[tuple[EventKind, int, str]] = []
    a.refuse = lambda kind, p, why: refused.append((kind, p, why))
    run(a.commit(sensors({0: records(0, 5), 1: records(0, 5)})))
    run(a.commit(sensors({0: records(5, 3), 1: records(5, 3)})))  # settles the first
    run(a.flush())
    assert w.offsets == {(S, 0): 7}  # partition 1: nothing applied
    assert all(1 not in c.get("pulse.sensor", {}) for c in committed)
    assert committed[-1]["pulse.sensor"][0] == 8
    assert refused == [(S, 1, f"the store refused its apply: {holds}")]
    assert metrics.events == 8
