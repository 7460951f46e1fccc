"""The checkpoint of one event kind's poll: divert, apply, durable, commit offsets.

:meth:`Checkpoint.commit` is the whole order, in one place:

1. **prepare** each partition's records (pure): drop what the store already applied, validate,
   classify late, aggregate, and fold into the partition's open windows (``pipeline.state``);
2. **divert** rejected and late records to their topics, acknowledged by Kafka;
3. **apply** every partition's absolute values with its offset, atomically, and
4. **durable**: wait until the store says the writes are fsynced at the configured level (the
   apply and the wait travel in one round trip);
5. **commit offsets** to Kafka (a hint only: the store owns the offsets).

A store outage is retried in place; anything that leaves a write unsure (a lost connection, a
new assignment) drops the cached state and fences before the next acknowledgement. The store
writer, the divert and the offset committer are injected, so the unit tests drive every rule
with fakes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from pipeline import windows
from pipeline.batch import (
    BatchRules,
    Diverted,
    PartitionBatch,
    PartitionState,
    RawRecord,
    absorb,
    aggregate_batches,
    commit,
    process_columns,
)
from pipeline.metrics import Metrics, wall_clock_ms
from pipeline.state import WindowState
from pipeline.store_writer import ApplyOutcome
from schemas.events import EventKind

log = logging.getLogger("pulse.checkpoint")

Clock = Callable[[], int]
ProcessBatch = Callable[
    [EventKind, int, list[RawRecord], PartitionState, BatchRules, int], PartitionBatch
]
# topic, {partition: next offset to read}
OffsetCommitter = Callable[[str, dict[int, int]], Awaitable[None]]


class Writer(Protocol):
    """The store side of a checkpoint (``pipeline.store_writer.StoreWriter``)."""

    async def read_state(
        self, kind: EventKind, partitions: list[int]
    ) -> dict[int, PartitionState]: ...

    async def read_hashes(self, names: list[str]) -> dict[str, dict[bytes, bytes]]: ...

    async def apply(
        self, batches: list[PartitionBatch], now_ms: int
    ) -> tuple[list[ApplyOutcome], float]: ...

    async def fence(self) -> float: ...

    async def close(self) -> None: ...


class Diverter(Protocol):
    """The dead-letter side of a checkpoint (``pipeline.divert.Divert``)."""

    async def send(self, source_topic: str, batches: list[PartitionBatch]) -> None: ...


async def _no_offsets(topic: str, offsets: dict[int, int]) -> None:
    return None


class Checkpoint:
    """One event kind's partitions: their cached state and the checkpoint of each poll."""

    def __init__(
        self,
        kind: EventKind,
        topic: str,
        writer: Writer,
        divert: Diverter,
        rules: BatchRules,
        metrics: Metrics,
        clock: Clock = wall_clock_ms,
        retry_delay_s: float = 0.5,
        process_batch: ProcessBatch = process_columns,
        commit_offsets: OffsetCommitter = _no_offsets,
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
        self._commit_offsets = commit_offsets
        self._states: dict[int, PartitionState] = {}
        self._unsure = False
        self._now = 0

    # ------------------------------------------------------------------ the checkpoint

    async def commit(self, by_partition: dict[int, list[RawRecord]]) -> None:
        """Checkpoint one poll: divert, apply, durable, then commit its offsets to Kafka."""
        from redis.exceptions import ConnectionError as StoreConnectionError
        from redis.exceptions import TimeoutError as StoreTimeoutError

        pending = dict(by_partition)
        while pending:
            try:
                await self._fence_if_unsure()
                await self._load_states(list(pending))
                batches = self._prepare(pending)  # 1. prepare (pure)
                await self._divert.send(self.topic, batches)  # 2. divert
                t0 = time.perf_counter()
                outcomes, waited = await self._writer.apply(batches, self._now)  # 3.+4.
                self._metrics.apply_s.append(time.perf_counter() - t0)
                if outcomes:
                    self._metrics.durability_wait_s.append(waited)
                pending = self._advance(batches, outcomes, pending)
            except (StoreConnectionError, StoreTimeoutError, OSError) as exc:
                self._store_unavailable(exc)
                await asyncio.sleep(self._retry_delay_s)
        self._publish_state_size()
        await self._commit_offsets(  # 5. commit offsets
            self.topic, {p: recs[-1].offset + 1 for p, recs in by_partition.items() if recs}
        )

    async def _fence_if_unsure(self) -> None:
        """Records we are about to acknowledge may have been applied by a write whose
        durability nobody saw confirmed (ours on a lost connection, or a previous owner's)."""
        if self._unsure:
            await self._writer.fence()
            self._metrics.fences += 1
            self._unsure = False

    def _prepare(self, pending: dict[int, list[RawRecord]]) -> list[PartitionBatch]:
        self._now = self._clock()
        batches = [self._process_safely(p, recs, self._now) for p, recs in pending.items()]
        try:
            aggregate_batches(batches, self._rules.plan)  # every partition in one pass
        except Exception:
            log.exception("aggregating a %s poll failed; isolating the records", self.kind.value)
            batches = [
                self._process_safely(p, recs, self._now, isolate=True)
                for p, recs in pending.items()
            ]
        for b in batches:
            if not b.empty:
                absorb(self._states[b.partition], b, self._rules)
        return batches

    def _advance(
        self,
        batches: list[PartitionBatch],
        outcomes: list[ApplyOutcome],
        pending: dict[int, list[RawRecord]],
    ) -> dict[int, list[RawRecord]]:
        """Advance what was applied; what someone else had advanced is re-read and retried."""
        by_part = {b.partition: b for b in batches}
        retry: dict[int, list[RawRecord]] = {}
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
                # or our own apply whose reply was lost): restore and keep what is new.
                self._metrics.conflicts += 1
                self._unsure = True
                del self._states[b.partition]
                retry[b.partition] = pending[b.partition]
        return retry

    # ------------------------------------------------------------------ partition state

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

    async def close(self) -> None:
        """Close the store connection."""
        await self._writer.close()

    @property
    def open_windows(self) -> tuple[int, int]:
        """(window instances, entity values) held for this kind's partitions."""
        held = [s.windows for s in self._states.values() if s.windows is not None]
        return len([ik for w in held for ik in w.open]), sum(w.entities for w in held)

    def _publish_state_size(self) -> None:
        self._metrics.state_size[self.kind.value] = self.open_windows
        self._metrics.open_windows = sum(w for w, _ in self._metrics.state_size.values())
        self._metrics.open_entities = sum(e for _, e in self._metrics.state_size.values())

    def _store_unavailable(self, exc: BaseException) -> None:
        self._metrics.store_retries += 1
        log.warning("store unavailable (%s); retrying in %.1fs", exc, self._retry_delay_s)
        self._states.clear()
        self._unsure = True

    async def _load_states(self, partitions: list[int]) -> None:
        missing = [p for p in partitions if p not in self._states]
        if missing:
            self._states.update(await self._writer.read_state(self.kind, missing))
        unrestored = [p for p in partitions if self._states[p].windows is None]
        if unrestored:
            await self._restore_windows(unrestored)

    async def _restore_windows(self, partitions: list[int]) -> None:
        """Restore the open windows of ``partitions`` from the store, at their stored offsets.

        Read after the offsets: should another writer apply in between, the windows are newer
        than the offset we expect, and our apply is refused as a conflict (and restored again).
        """
        lateness = self._rules.allowed_lateness_ms
        restoring: dict[int, tuple[WindowState, list[str]]] = {}
        for p in partitions:
            st = self._states[p]
            ws = WindowState(self.kind, p, self._rules.plan)
            wm = windows.watermark(st.max_event_time, lateness)
            restoring[p] = (ws, ws.restore_keys(st.max_event_time, wm))
        hashes = await self._writer.read_hashes([k for _, ks in restoring.values() for k in ks])
        for p, (ws, ks) in restoring.items():
            ws.restore({k: hashes[k] for k in ks})
            self._states[p].windows = ws

    def _run(
        self, partition: int, records: list[RawRecord], state: PartitionState, now: int
    ) -> PartitionBatch:
        """Process and aggregate one partition's records alone."""
        batch = self._process(self.kind, partition, records, state, self._rules, now)
        aggregate_batches([batch], self._rules.plan)
        return batch

    def _process_safely(
        self, partition: int, records: list[RawRecord], now: int, *, isolate: bool = False
    ) -> PartitionBatch:
        """Process a partition's records; a record that makes processing fail is dead-lettered.

        Processing is pure and rejects bad input itself, so this is the net under it: if it
        raises anyway (or ``isolate``: the poll's aggregation raised), each record is tried
        alone to find the ones that fail, and the batch is processed without them, so one
        record can never stop the partition.
        """
        state = self._states[partition]
        if not isolate:
            try:
                return self._process(self.kind, partition, records, state, self._rules, now)
            except Exception:
                log.exception(
                    "processing a %s batch failed; isolating the records", self.kind.value
                )
        else:
            try:
                return self._run(partition, records, state, now)
            except Exception:
                log.exception("aggregating %s partition %d failed", self.kind.value, partition)
        culprits: dict[int, str] = {}
        for r in records:
            probe = PartitionState(state.offset, state.max_event_time, state.topic)
            try:
                self._run(partition, [r], probe, now)
            except Exception as exc:
                culprits[r.offset] = f"could not be processed: {type(exc).__name__}: {exc}"[:300]
        # With no culprit found alone, the failure needs the records together: divert them all.
        if not culprits:
            culprits = {r.offset: "could not be processed with its batch" for r in records}
        self._metrics.isolated += len(culprits)
        rest = [r for r in records if r.offset not in culprits]
        batch = self._run(partition, rest, state, now)
        batch.dead.extend(Diverted(r, culprits[r.offset]) for r in records if r.offset in culprits)
        batch.last_offset = max(batch.last_offset, records[-1].offset)
        return batch
