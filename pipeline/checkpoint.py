"""The checkpoint of one poll: prepare, divert, apply, durable, commit offsets.

:meth:`Checkpoint.commit` is the whole order, in one place, for every event kind of a poll:

1. **prepare** each partition's records (pure): drop what the store already applied, validate,
   classify late, aggregate, and fold into the partition's open windows (``pipeline.state``);
2. **acknowledge the previous poll**: wait until the store says its writes are fsynced at the
   configured level (4.), then commit its offsets to Kafka (5.);
3. **divert** rejected and late records to their topics, acknowledged by Kafka;
4. **apply** every partition's absolute values with its offset, atomically, in one round trip
   (the primary has fsynced them when it answers);
5. and the acknowledgement of this poll — durable, then commit offsets — is step 2 of the next
   poll, or :meth:`Checkpoint.flush` when no poll follows.

Why the acknowledgement trails by one poll: the replica fsyncs a poll's writes while the next
poll is prepared (CPU in this process), so asking for its confirmation after preparing answers
at once instead of polling a replica still busy. At most one poll is applied and unconfirmed;
its offsets reach Kafka only once the store confirmed it durable, and Kafka's offsets are a hint
anyway (the store owns the offsets).

A store outage is retried in place; anything that leaves a write unsure (a lost connection, a
new assignment) drops the cached state and fences before the next acknowledgement. The store
writer, the divert and the offset committer are injected, so the unit tests drive every rule
with fakes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Protocol

from pipeline import windows
from pipeline.batch import (
    BatchRules,
    Diverted,
    PartitionBatch,
    PartitionState,
    RawRecord,
    aggregate_batches,
    commit,
    process_partitions,
)
from pipeline.metrics import Metrics, wall_clock_ms
from pipeline.state import KindWindows, WindowState
from pipeline.store_writer import ApplyOutcome
from schemas.events import EventKind

log = logging.getLogger("pulse.checkpoint")

Clock = Callable[[], int]
# kind, {partition: records}, {partition: state}, rules, now -> a batch per partition
ProcessPartitions = Callable[
    [
        EventKind,
        Mapping[int, Sequence[RawRecord]],
        Mapping[int, PartitionState],
        BatchRules,
        int,
    ],
    list[PartitionBatch],
]
# topic -> {partition: next offset to read}
OffsetCommitter = Callable[[dict[str, dict[int, int]]], Awaitable[None]]
# event kind -> {partition: records in offset order}
Poll = Mapping[EventKind, Mapping[int, Sequence[RawRecord]]]
PartKey = tuple[EventKind, int]


class Writer(Protocol):
    """The store side of a checkpoint (``pipeline.store_writer.StoreWriter``)."""

    async def read_state(
        self, kind: EventKind, partitions: list[int]
    ) -> dict[int, PartitionState]: ...

    async def read_hashes(self, names: list[str]) -> dict[str, dict[bytes, bytes]]: ...

    async def send(self, batches: list[PartitionBatch], now_ms: int) -> list[ApplyOutcome]: ...

    async def durable(self) -> float: ...

    async def fence(self) -> float: ...

    async def close(self) -> None: ...


class Diverter(Protocol):
    """The dead-letter side of a checkpoint (``pipeline.divert.Divert``)."""

    async def send(self, source_topic: str, batches: list[PartitionBatch]) -> None: ...


async def _no_offsets(offsets: dict[str, dict[int, int]]) -> None:
    return None


class Checkpoint:
    """The partitions of every event kind: their cached state and the checkpoint of each poll."""

    def __init__(
        self,
        topics: Mapping[EventKind, str],
        writer: Writer,
        divert: Diverter,
        rules: BatchRules,
        metrics: Metrics,
        clock: Clock = wall_clock_ms,
        retry_delay_s: float = 0.5,
        process: ProcessPartitions = process_partitions,
        commit_offsets: OffsetCommitter = _no_offsets,
    ) -> None:
        self.topics = dict(topics)
        self._writer = writer
        self._divert = divert
        self._rules = rules
        self._metrics = metrics
        self._clock = clock
        self._retry_delay_s = retry_delay_s
        self._process = process
        self._commit_offsets = commit_offsets
        self._states: dict[PartKey, PartitionState] = {}
        # each kind's open windows, one table for all its partitions (their states view it)
        self._windows: dict[EventKind, KindWindows] = {}
        self._unsure = False
        self._unconfirmed = False  # something was applied and not yet confirmed durable
        self._to_commit: dict[str, dict[int, int]] = {}  # applied offsets awaiting durability
        self._now = 0

    # ------------------------------------------------------------------ the checkpoint

    async def commit(self, poll: Poll) -> None:
        """Checkpoint one poll; the previous poll is acknowledged once this one is prepared."""
        pending: dict[PartKey, Sequence[RawRecord]] = {
            (kind, p): recs for kind, parts in poll.items() for p, recs in parts.items() if recs
        }
        while pending:
            try:
                await self._fence_if_unsure()
                await self._load_states(list(pending))
                t0 = time.perf_counter()
                batches = self._prepare(pending)  # 1. prepare (pure)
                self._metrics.prepare_s.append(time.perf_counter() - t0)
                await self._acknowledge()  # 2. the previous poll: durable, commit offsets
                for kind, topic in self.topics.items():  # 3. divert
                    await self._divert.send(topic, [b for b in batches if b.kind is kind])
                t0 = time.perf_counter()
                outcomes = await self._writer.send(batches, self._now)  # 4. apply
                self._metrics.apply_s.append(time.perf_counter() - t0)
                pending = self._advance(batches, outcomes, pending)
            except self._store_errors() as exc:
                self._store_unavailable(exc)
                await asyncio.sleep(self._retry_delay_s)
        self._publish_state_size()
        for kind, parts in poll.items():  # 5. acknowledged with the next poll, or by flush()
            offsets = self._to_commit.setdefault(self.topics[kind], {})
            offsets.update({p: recs[-1].offset + 1 for p, recs in parts.items() if recs})

    async def flush(self) -> None:
        """Acknowledge what was applied: wait until it is durable, then commit its offsets.

        Called when no poll follows (an idle stream, a rebalance); retries store outages.
        """
        while True:
            try:
                await self._fence_if_unsure()
                await self._acknowledge()
                return
            except self._store_errors() as exc:
                self._store_unavailable(exc)
                await asyncio.sleep(self._retry_delay_s)

    async def _acknowledge(self) -> None:
        """Wait until everything applied is durable, then commit the applied offsets."""
        if self._unconfirmed:
            self._metrics.durability_wait_s.append(await self._writer.durable())
            self._unconfirmed = False
        if self._to_commit:
            offsets, self._to_commit = self._to_commit, {}
            await self._commit_offsets(offsets)

    async def _fence_if_unsure(self) -> None:
        """Records we are about to acknowledge may have been applied by a write whose
        durability nobody saw confirmed (ours on a lost connection, or a previous owner's)."""
        if self._unsure:
            await self._writer.fence()  # covers every write the store accepted before it
            self._metrics.fences += 1
            self._unsure = False
            self._unconfirmed = False

    @staticmethod
    def _store_errors() -> tuple[type[BaseException], ...]:
        from redis.exceptions import ConnectionError as StoreConnectionError
        from redis.exceptions import TimeoutError as StoreTimeoutError

        return (StoreConnectionError, StoreTimeoutError, OSError)

    def _prepare(self, pending: dict[PartKey, Sequence[RawRecord]]) -> list[PartitionBatch]:
        self._now = self._clock()
        by_kind: dict[EventKind, list[PartKey]] = defaultdict(list)
        for pk in pending:
            by_kind[pk[0]].append(pk)
        batches: list[PartitionBatch] = []
        for kind, pks in by_kind.items():
            try:  # every partition of the kind in one pass
                kind_batches = self._process(
                    kind,
                    {p: pending[(kind, p)] for _, p in pks},
                    {p: self._states[(kind, p)] for _, p in pks},
                    self._rules,
                    self._now,
                )
                aggregate_batches(kind_batches, self._rules.plan)
            except Exception:
                log.exception("processing a %s poll failed; isolating the records", kind.value)
                kind_batches = [self._process_safely(pk, pending[pk], self._now) for pk in pks]
            # every partition's deltas folded in and encoded in one pass
            todo = [b for b in kind_batches if not b.empty]
            deltas = [d for b in todo for d in b.deltas]
            for b in todo:
                for d in b.deltas:
                    d.partition = b.partition
            writes = self._kind_windows(kind).absorb(deltas, self._rules.retention)
            for b in todo:
                b.writes = writes.get(b.partition, [])
            batches.extend(kind_batches)
        return batches

    def _kind_windows(self, kind: EventKind) -> KindWindows:
        if kind not in self._windows:
            self._windows[kind] = KindWindows(kind, self._rules.plan)
        return self._windows[kind]

    def _advance(
        self,
        batches: list[PartitionBatch],
        outcomes: list[ApplyOutcome],
        pending: dict[PartKey, Sequence[RawRecord]],
    ) -> dict[PartKey, Sequence[RawRecord]]:
        """Advance what was applied; what someone else had advanced is re-read and retried.

        ``outcomes`` are those of the non-empty batches, in order.
        """
        sent = [b for b in batches if not b.empty]
        retry: dict[PartKey, Sequence[RawRecord]] = {}
        passed: dict[EventKind, dict[int, int | None]] = defaultdict(dict)
        for b, outcome in zip(sent, outcomes, strict=True):
            pk = (b.kind, b.partition)
            if outcome.applied:
                self._unconfirmed = True
                commit(self._states[pk], b, evict=False)
                passed[b.kind][b.partition] = b.watermark
                self._metrics.events += b.events
                self._metrics.late += len(b.late)
                self._metrics.dead += len(b.dead)
                self._metrics.batches += 1
            else:
                # Someone else advanced this partition (a previous owner after a rebalance,
                # or our own apply whose reply was lost): restore and keep what is new.
                self._metrics.conflicts += 1
                self._unsure = True
                self._drop(pk)
                retry[pk] = pending[pk]
        for kind, watermarks in passed.items():
            self._kind_windows(kind).evict(watermarks)
        return retry

    def _drop(self, pk: PartKey) -> None:
        """Forget a partition's cached state: it is restored from the store when next needed."""
        del self._states[pk]
        if pk[0] in self._windows:
            self._windows[pk[0]].drop(pk[1])

    # ------------------------------------------------------------------ partition state

    def forget(self) -> None:
        """After a rebalance: drop cached partition state and fence before the next commit.

        A previous owner may have applied records it never saw durable (it died waiting); the
        store skips them as applied, and only a fence of ours vouches that they are durable.
        """
        self._states.clear()
        self._windows.clear()
        self._unsure = True

    async def load_progress(
        self, kind: EventKind, partitions: list[int]
    ) -> dict[int, PartitionState]:
        """What the store says about ``partitions`` (cached for processing); retries outages."""
        while True:
            try:
                states = await self._writer.read_state(kind, partitions)
            except self._store_errors() as exc:
                self._store_unavailable(exc)
                await asyncio.sleep(self._retry_delay_s)
                continue
            self._states.update(((kind, p), st) for p, st in states.items())
            return states

    async def close(self) -> None:
        """Close the store connection."""
        await self._writer.close()

    def open_windows(self, kind: EventKind) -> tuple[int, int]:
        """(window instances, entity values) held for ``kind``'s partitions."""
        held = [
            s.windows for (k, _), s in self._states.items() if k is kind and s.windows is not None
        ]
        return sum(len(w.open) for w in held), sum(w.entities for w in held)

    def _publish_state_size(self) -> None:
        m = self._metrics
        m.state_size = {kind.value: self.open_windows(kind) for kind in self.topics}
        m.open_windows = sum(w for w, _ in m.state_size.values())
        m.open_entities = sum(e for _, e in m.state_size.values())

    def _store_unavailable(self, exc: BaseException) -> None:
        self._metrics.store_retries += 1
        log.warning("store unavailable (%s); retrying in %.1fs", exc, self._retry_delay_s)
        self._states.clear()
        self._windows.clear()
        self._unsure = True

    async def _load_states(self, pks: list[PartKey]) -> None:
        missing: dict[EventKind, list[int]] = defaultdict(list)
        for kind, p in pks:
            if (kind, p) not in self._states:
                missing[kind].append(p)
        for kind, parts in missing.items():
            states = await self._writer.read_state(kind, parts)
            self._states.update(((kind, p), st) for p, st in states.items())
        unrestored = [pk for pk in pks if self._states[pk].windows is None]
        if unrestored:
            await self._restore_windows(unrestored)

    async def _restore_windows(self, pks: list[PartKey]) -> None:
        """Restore the open windows of partitions from the store, at their stored offsets.

        Read after the offsets: should another writer apply in between, the windows are newer
        than the offset we expect, and our apply is refused as a conflict (and restored again).
        """
        lateness = self._rules.allowed_lateness_ms
        restoring: dict[PartKey, tuple[WindowState, list[str]]] = {}
        for kind, p in pks:
            st = self._states[(kind, p)]
            ws = WindowState(kind, p, self._rules.plan, shared=self._kind_windows(kind))
            wm = windows.watermark(st.max_event_time, lateness)
            restoring[(kind, p)] = (ws, ws.restore_keys(st.max_event_time, wm))
        hashes = await self._writer.read_hashes([k for _, ks in restoring.values() for k in ks])
        for pk, (ws, ks) in restoring.items():
            ws.restore({k: hashes[k] for k in ks})
            self._states[pk].windows = ws

    def _run(
        self, pk: PartKey, records: Sequence[RawRecord], state: PartitionState, now: int
    ) -> PartitionBatch:
        """Process and aggregate one partition's records alone."""
        kind, partition = pk
        (batch,) = self._process(kind, {partition: records}, {partition: state}, self._rules, now)
        aggregate_batches([batch], self._rules.plan)
        return batch

    def _process_safely(
        self, pk: PartKey, records: Sequence[RawRecord], now: int
    ) -> PartitionBatch:
        """Process a partition's records; a record that makes processing fail is dead-lettered.

        Processing is pure and rejects bad input itself, so this is the net under it, used when
        processing the poll raised anyway: the partition is tried alone, and if it fails, each
        record is tried alone to find the ones that fail, and the batch is processed without
        them, so one record can never stop the partition.
        """
        kind, partition = pk
        state = self._states[pk]
        try:
            return self._run(pk, records, state, now)
        except Exception:
            log.exception("processing %s partition %d failed", kind.value, partition)
        culprits: dict[int, str] = {}
        for r in records:
            probe = PartitionState(state.offset, state.max_event_time, state.topic)
            try:
                self._run(pk, [r], probe, now)
            except Exception as exc:
                culprits[r.offset] = f"could not be processed: {type(exc).__name__}: {exc}"[:300]
        # With no culprit found alone, the failure needs the records together: divert them all.
        if not culprits:
            culprits = {r.offset: "could not be processed with its batch" for r in records}
        self._metrics.isolated += len(culprits)
        rest = [r for r in records if r.offset not in culprits]
        batch = self._run(pk, rest, state, now)
        batch.dead.extend(Diverted(r, culprits[r.offset]) for r in records if r.offset in culprits)
        batch.last_offset = max(batch.last_offset, records[-1].offset)
        return batch
