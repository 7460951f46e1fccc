"""The checkpoint of one poll: prepare, divert, apply, durable, commit offsets.

:meth:`Checkpoint.commit` is the whole order, in one place, for every event kind of a poll:

1. **prepare** each partition's records (pure): drop what the store already applied, validate,
   classify late, aggregate, fold into the partition's open windows (``pipeline.state``), derive
   the 1m leaderboard writes (``pipeline.leaderboards``) and step the detectors of the windows
   the poll closes (``pipeline.detection``), while the store applies the previous poll and
   makes it durable (the prepare yields after each event kind, so that apply's task reads its
   reply and asks for durability meanwhile);
2. **settle the previous poll**: read its apply's outcomes; a partition someone else had
   advanced is restored from the store and its records are prepared again with this poll's;
3. **acknowledge the previous poll**: once the store said its writes are fsynced at the
   configured level (the wait ran with its apply; after a conflict or a lost connection it is
   done here), commit its offsets to Kafka (at most once a commit interval while polls
   follow, always when none does: each commit is a round trip on the poll's path);
4. **divert** this poll's rejected and late records to their topics, acknowledged by Kafka;
5. **apply**: send every partition's absolute values with its offset, atomically, in one round
   trip, then wait for its durability, in the background; steps 2 and 3 of the next poll (or
   :meth:`Checkpoint.flush`) finish it.

Why the apply trails by one poll: the store runs a poll's functions (tens of ms for a large
poll) and its fsyncs and replica acknowledgement (tens of ms more) while this process prepares
the next one, instead of the three in series. The states are
advanced as if the apply succeeds; a partition where it did not (rare: a rebalance, a lost
reply) is dropped and restored. At most one poll is in flight and one applied but unconfirmed;
offsets reach Kafka only once the store confirmed them durable, and Kafka's offsets are a hint
anyway (the store owns the offsets).

A store outage is retried in place: the poll in flight is sent again with the current one (the
store skips what it applied); anything that leaves a write unsure (a lost connection, a new
assignment) drops the cached state and fences before the next acknowledgement. The store
writer, the divert and the offset committer are injected, so the unit tests drive every rule
with fakes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from pipeline import leaderboards, windows
from pipeline.aggregation import WindowDelta
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
from pipeline.detection import KindDetectors
from pipeline.metrics import Metrics, wall_clock_ms
from pipeline.state import KindWindows, WindowState
from pipeline.store_writer import ApplyOutcome, StoredTypeError
from schemas import keys, packed
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
# stop reading a partition whose state cannot be restored (kind, partition, why)
Refuser = Callable[[EventKind, int, str], None]
# event kind -> {partition: records in offset order}
Poll = Mapping[EventKind, Mapping[int, Sequence[RawRecord]]]
PartKey = tuple[EventKind, int]


class StoreBehindError(Exception):
    """The store holds less than this worker acknowledged: it must re-read from the store."""


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


def _log_refusal(kind: EventKind, partition: int, why: str) -> None:
    log.error("refusing %s partition %d: %s", kind.value, partition, why)


@dataclass(frozen=True, slots=True)
class _Sent:
    """What became of an apply: its outcomes, whether what it applied is confirmed durable,
    and the store error that interrupted the durability wait, if one did."""

    outcomes: list[ApplyOutcome]
    durable: bool = False
    error: BaseException | None = None


@dataclass(slots=True)
class _Inflight:
    """A poll whose apply was sent: its task, the batches sent, and all its records."""

    task: asyncio.Future[_Sent]
    batches: list[PartitionBatch]
    records: dict[PartKey, Sequence[RawRecord]]


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
        detectors: Mapping[EventKind, KindDetectors] | None = None,
        commit_interval_ms: int = 0,
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
        # Kafka offsets are committed at most this often while polls follow (flush: always)
        self._commit_interval_ms = commit_interval_ms
        self._committed_at: int | None = None
        # each kind's anomaly detectors (partition state like the windows; none: not detecting)
        self._detectors: dict[EventKind, KindDetectors] = dict(detectors or {})
        self._states: dict[PartKey, PartitionState] = {}
        # each kind's open windows, one table for all its partitions (their states view it)
        self._windows: dict[EventKind, KindWindows] = {}
        self._unsure = False
        self._unconfirmed = False  # something was applied and not yet confirmed durable
        # the records whose offsets await durability (_to_commit): sent again after a store
        # error, since a promoted replica may lack them (the store skips what it holds)
        self._unacked: dict[PartKey, Sequence[RawRecord]] = {}
        self._resumed = False  # a store error happened: check the store is not behind us
        self._to_commit: dict[str, dict[int, int]] = {}  # applied offsets awaiting durability
        self._inflight: _Inflight | None = None  # the poll sent and not yet settled
        self._now = 0
        # told of a partition whose stored state cannot be restored: its reader stops reading
        # it (set by the worker once its reader exists)
        self.refuse: Refuser = _log_refusal

    # ------------------------------------------------------------------ the checkpoint

    async def commit(self, poll: Poll) -> None:
        """Checkpoint one poll: prepare it while the store applies the previous one and makes it
        durable, settle and acknowledge that one, then divert and send this one (its outcome is
        read next time)."""
        pending: dict[PartKey, Sequence[RawRecord]] = {
            (kind, p): recs for kind, parts in poll.items() for p, recs in parts.items() if recs
        }
        while True:
            try:
                batches = await self._prepared(pending)  # 1. prepare (pure)
                redo, refused = await self._settle()  # the previous poll's outcomes
                if refused:  # this poll's records of them were prepared on what was refused
                    batches = [b for b in batches if (b.kind, b.partition) not in refused]
                    for pk in refused:
                        pending.pop(pk, None)
                if redo:
                    # Someone else had advanced these partitions: their states are dropped,
                    # and the previous poll's records are prepared again with this poll's.
                    batches = [b for b in batches if (b.kind, b.partition) not in redo]
                    for pk, recs in redo.items():
                        pending[pk] = [*recs, *pending.get(pk, ())]
                    again = {pk: pending[pk] for pk in redo}
                    batches += await self._prepared(again)
                    for pk in redo.keys() - again.keys():  # refused as it was restored
                        del pending[pk]
                # 2. the previous poll: durable, commit offsets (due, or no poll follows)
                await self._acknowledge(force=not pending)
                for kind, topic in self.topics.items():  # 3. divert
                    if kind_batches := [b for b in batches if b.kind is kind]:
                        await self._divert.send(topic, kind_batches)
                await self._launch(batches, pending)  # 4. apply (read by the next call)
                break
            except self._store_errors() as exc:
                # the poll in flight may or may not have been applied: its records go again
                # (the store skips what it holds), with every state restored from the store
                for pk, recs in (await self._abandon()).items():
                    pending[pk] = [*recs, *pending.get(pk, ())]
                for pk, recs in self._unacked.items():  # older still
                    pending[pk] = [*recs, *pending.get(pk, ())]
                self._unacked = {}
                self._resumed = True
                self._store_unavailable(exc)
                await asyncio.sleep(self._retry_delay_s)
        self._publish_state_size()

    async def flush(self) -> None:
        """Acknowledge everything: read the outcome of the poll in flight, apply again what it
        could not, wait until durable, then commit its offsets.

        Called when no poll follows (an idle stream, a rebalance); retries store outages.
        """
        while True:
            await self.commit({})
            if self._inflight is None:
                return

    async def _prepared(self, pending: dict[PartKey, Sequence[RawRecord]]) -> list[PartitionBatch]:
        """States loaded (fenced first if unsure), then the batches of ``pending``.

        A partition whose stored state cannot be restored is refused: its records leave
        ``pending``, neither applied nor acknowledged, and :attr:`refuse` has its reader stop
        reading it until the next assignment (an operator resolves it; nothing is guessed).
        """
        if not pending:
            return []
        await self._fence_if_unsure()
        for pk, why in (await self._load_states(list(pending))).items():
            del pending[pk]
            self.refuse(pk[0], pk[1], why)
        if not pending:
            return []
        if self._resumed:
            self._check_not_behind(pending)
            self._prune_commits()
        self._now = self._clock()
        by_kind: dict[EventKind, list[PartKey]] = defaultdict(list)
        for pk in pending:
            by_kind[pk[0]].append(pk)
        batches: list[PartitionBatch] = []
        spent = 0.0
        for kind, pks in by_kind.items():
            t0 = time.perf_counter()
            batches += self._prepare(kind, {pk: pending[pk] for pk in pks})
            spent += time.perf_counter() - t0
            # the apply in flight reads its reply and asks for durability meanwhile: its
            # answer is then in by the time this poll settles it (not one round trip later)
            await asyncio.sleep(0)
        self._metrics.prepare_s.append(spent)
        return batches

    async def _launch(
        self, batches: list[PartitionBatch], records: Mapping[PartKey, Sequence[RawRecord]]
    ) -> None:
        """Send the batches' apply without waiting for its outcome; advance the states as if it
        succeeds (:meth:`_settle` undoes a partition where it did not)."""
        sent = [b for b in batches if not b.empty]
        passed: dict[EventKind, dict[int, int | None]] = defaultdict(dict)
        for b in sent:
            commit(self._states[(b.kind, b.partition)], b, evict=False)
            passed[b.kind][b.partition] = b.watermark
        for kind, watermarks in passed.items():
            self._kind_windows(kind).evict(watermarks)
        if not sent:  # nothing to apply: acknowledged with what is applied already
            self._add_offsets(records)
            return

        async def send() -> _Sent:
            t0 = time.perf_counter()
            outcomes = await self._writer.send(sent, self._now)
            self._metrics.apply_s.append(time.perf_counter() - t0)
            if not any(o.applied for o in outcomes):
                return _Sent(outcomes)
            # the durability wait runs here too, while the next poll is prepared: it used to
            # sit between that prepare and the next apply, on every poll's critical path
            try:
                self._metrics.durability_wait_s.append(await self._writer.durable())
            except self._store_errors() as exc:  # the outcomes stand; _settle raises it
                return _Sent(outcomes, error=exc)
            return _Sent(outcomes, durable=True)

        self._inflight = _Inflight(asyncio.ensure_future(send()), sent, dict(records))
        await asyncio.sleep(0)  # the send is written before this task prepares the next poll

    async def _settle(self) -> tuple[dict[PartKey, Sequence[RawRecord]], set[PartKey]]:
        """The outcome of the poll in flight: count what was applied; a partition someone else
        had advanced is dropped, and its records are returned to be prepared again; a
        partition the store refused (a key it writes holds another type) is dropped and
        refused, its records neither applied nor acknowledged."""
        if self._inflight is None:
            return {}, set()
        sent = await self._inflight.task  # a store error of the apply propagates: see _abandon
        flight, self._inflight = self._inflight, None
        redo: dict[PartKey, Sequence[RawRecord]] = {}
        refused: set[PartKey] = set()
        for b, outcome in zip(flight.batches, sent.outcomes, strict=True):
            pk = (b.kind, b.partition)
            if outcome.refused is not None:
                self._drop(pk)
                refused.add(pk)
                self.refuse(pk[0], pk[1], f"the store refused its apply: {outcome.refused}")
            elif outcome.applied:
                self._unconfirmed = self._unconfirmed or not sent.durable
                self._metrics.events += b.events
                self._metrics.late += len(b.late)
                self._metrics.dead += len(b.dead)
                self._metrics.batches += 1
                if b.detected is not None:
                    self._metrics.anomalies += len(b.detected.anomalies)
            else:
                # Someone else advanced this partition (a previous owner after a rebalance,
                # or our own apply whose reply was lost): restore and keep what is new.
                self._metrics.conflicts += 1
                self._unsure = True
                self._drop(pk)
                redo[pk] = flight.records[pk]
        self._add_offsets(
            {pk: r for pk, r in flight.records.items() if pk not in redo and pk not in refused}
        )
        if sent.error is not None:
            # the durability wait failed: everything unacknowledged goes again (the store
            # skips what it holds), the redone partitions' records too
            for pk, recs in redo.items():
                self._unacked[pk] = [*self._unacked.get(pk, ()), *recs]
            raise sent.error
        return redo, refused

    async def _abandon(self) -> dict[PartKey, Sequence[RawRecord]]:
        """After a store error: the records of the poll in flight, whatever its outcome."""
        if self._inflight is None:
            return {}
        flight, self._inflight = self._inflight, None
        with contextlib.suppress(Exception):
            await flight.task
        return flight.records

    def _add_offsets(self, records: Mapping[PartKey, Sequence[RawRecord]]) -> None:
        """Note the next offsets to read after ``records``: committed once they are durable."""
        for (kind, p), recs in records.items():
            self._to_commit.setdefault(self.topics[kind], {})[p] = recs[-1].offset + 1
            self._unacked[(kind, p)] = [*self._unacked.get((kind, p), ()), *recs]

    async def _acknowledge(self, force: bool) -> None:
        """Wait until everything applied is durable, then commit the applied offsets to Kafka
        if ``force`` or the commit interval has passed (each commit is a round trip on the
        poll's path; the offsets not yet committed wait for the next)."""
        await self._fence_if_unsure()  # after a lost connection only a fence vouches
        if self._unconfirmed:
            self._metrics.durability_wait_s.append(await self._writer.durable())
            self._unconfirmed = False
        self._unacked = {}
        if not self._to_commit:
            return
        now = self._clock()
        last = self._committed_at
        if force or last is None or now - last >= self._commit_interval_ms or now < last:
            offsets, self._to_commit = self._to_commit, {}
            self._committed_at = now
            await self._commit_offsets(offsets)

    async def _fence_if_unsure(self) -> None:
        """Records we are about to acknowledge may have been applied by a write whose
        durability nobody saw confirmed (ours on a lost connection, or a previous owner's)."""
        if self._unsure:
            await self._writer.fence()  # covers every write the store accepted before it
            self._metrics.fences += 1
            self._unsure = False
            self._unconfirmed = False

    def _check_not_behind(self, pending: Mapping[PartKey, Sequence[RawRecord]]) -> None:
        """After a store error: every partition's records must follow on from the store's
        offset. A gap means the store lost acknowledged batches (a failover at ``local`` or
        ``none`` durability); applying on would skip them for good, while a restarted worker
        seeks to the store's offsets and applies them again."""
        gaps = [
            f"{kind.value} partition {p}: the store is at offset {self._states[(kind, p)].offset}, "
            f"this worker read on from {recs[0].offset}"
            for (kind, p), recs in pending.items()
            if recs and recs[0].offset > self._states[(kind, p)].offset + 1
        ]
        if gaps:
            raise StoreBehindError(
                "the store lost batches this worker had acknowledged (a failover to a replica "
                "that lacked them?); exiting so that a restart re-reads them from Kafka: "
                + "; ".join(gaps)
            )
        self._resumed = False

    def _prune_commits(self) -> None:
        """After a store error: keep only offsets to commit that the store holds (the records
        of the others are pending again and are committed once applied and durable)."""
        for kind, topic in self.topics.items():
            parts = self._to_commit.get(topic, {})
            for p, next_offset in list(parts.items()):
                state = self._states.get((kind, p))
                if state is None or next_offset > state.offset + 1:
                    del parts[p]
            if not parts:
                self._to_commit.pop(topic, None)

    @staticmethod
    def _store_errors() -> tuple[type[BaseException], ...]:
        from redis.exceptions import ConnectionError as StoreConnectionError
        from redis.exceptions import TimeoutError as StoreTimeoutError

        return (StoreConnectionError, StoreTimeoutError, OSError)

    def _prepare(
        self, kind: EventKind, pending: Mapping[PartKey, Sequence[RawRecord]]
    ) -> list[PartitionBatch]:
        """The batches of one kind's partitions: every partition in one pass."""
        try:
            kind_batches = self._process(
                kind,
                {p: recs for (_, p), recs in pending.items()},
                {p: self._states[(kind, p)] for _, p in pending},
                self._rules,
                self._now,
            )
            aggregate_batches(kind_batches, self._rules.plan)
        except Exception:
            log.exception("processing a %s poll failed; isolating the records", kind.value)
            kind_batches = [
                self._process_safely(pk, recs, self._now) for pk, recs in pending.items()
            ]
        # every partition's deltas folded in and encoded in one pass
        todo = [b for b in kind_batches if not b.empty]
        deltas = [d for b in todo for d in b.deltas]
        for b in todo:
            for d in b.deltas:
                d.partition = b.partition
        kind_windows, retention = self._kind_windows(kind), self._rules.retention
        bundle_at = {b.partition: b.last_offset for b in todo}
        writes, table = kind_windows.absorb_values(deltas, retention, bundle_at=bundle_at)
        sealed = kind_windows.seal({b.partition: b.watermark for b in todo}, retention, bundle_at)
        for b in todo:
            b.writes = writes.get(b.partition, [])
            if seals := sealed.get(b.partition):  # they replace this poll's bundles of them
                done = {w.key for w in seals}
                b.writes = [w for w in b.writes if w.key not in done] + seals
        self._analyse(kind, todo, deltas, table)
        return kind_batches

    def _analyse(
        self,
        kind: EventKind,
        todo: Sequence[PartitionBatch],
        deltas: Sequence[WindowDelta],
        table: packed.Table,
    ) -> None:
        """Each batch's leaderboard writes, and the detectors of the windows it closes."""
        retention = self._rules.retention
        bounds = np.cumsum([0, *(len(d.names) for d in deltas)])
        need = [i for i, d in enumerate(deltas) if leaderboards.needs_p99(kind, d)]
        p99 = np.full(table.rows, np.nan)
        if need:
            rows = np.concatenate([np.arange(bounds[i], bounds[i + 1]) for i in need])
            p99[rows] = packed.quantiles(table.take(rows), (0.99,))[:, 0]
        per: dict[int, list[int]] = defaultdict(list)
        for i, d in enumerate(deltas):
            if d.window == keys.BOARD_WINDOW:
                per[d.partition].append(i)
        for b in todo:
            mine = per.get(b.partition, [])
            b.boards = leaderboards.board_writes(
                kind,
                b.partition,
                [deltas[i] for i in mine],
                [table.stats[bounds[i] : bounds[i + 1]] for i in mine],
                [p99[bounds[i] : bounds[i + 1]] for i in mine],
                [retention.expire_at_s(deltas[i].window, deltas[i].start_ms) for i in mine],
            )
        detectors = self._detectors.get(kind)
        if detectors is None:
            return
        closings = self._kind_windows(kind).closing(
            {b.partition: b.watermark for b in todo},
            detectors.window,
            detectors.dim,
            sketches=detectors.needs_sketches,
        )
        if not closings:
            return
        board = (
            keys.Board.DEVICE_ANOMALIES
            if kind is EventKind.SENSOR
            else keys.Board.SERVICE_ANOMALIES
        )
        found = detectors.detect_many(closings)
        for b in todo:
            if (detected := found.get(b.partition)) is None:
                continue
            b.detected = detected
            if detected.anomalies:
                b.boards += leaderboards.count_writes(
                    kind,
                    b.partition,
                    board,
                    [
                        (keys.board_member(detectors.dim, a.entity), a.window_start_ms)
                        for a in detected.anomalies
                    ],
                    lambda start: retention.expire_at_s(keys.BOARD_WINDOW, start),
                )

    def _kind_windows(self, kind: EventKind) -> KindWindows:
        if kind not in self._windows:
            self._windows[kind] = KindWindows(kind, self._rules.plan)
        return self._windows[kind]

    def _drop(self, pk: PartKey) -> None:
        """Forget a partition's cached state: it is restored from the store when next needed."""
        self._states.pop(pk, None)
        if pk[0] in self._windows:
            self._windows[pk[0]].drop(pk[1])
        if pk[0] in self._detectors:
            self._detectors[pk[0]].drop(pk[1])

    # ------------------------------------------------------------------ partition state

    def forget(self) -> None:
        """After a rebalance: drop cached partition state and fence before the next commit.

        A previous owner may have applied records it never saw durable (it died waiting); the
        store skips them as applied, and only a fence of ours vouches that they are durable.
        """
        self._clear_states()
        self._unsure = True

    def _clear_states(self) -> None:
        self._states.clear()
        self._windows.clear()
        for detectors in self._detectors.values():
            detectors.clear()

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
        m.detector_entities = sum(d.watched() for d in self._detectors.values())
        m.detector_evicted = sum(d.evicted for d in self._detectors.values())

    def _store_unavailable(self, exc: BaseException) -> None:
        self._metrics.store_retries += 1
        log.warning("store unavailable (%s); retrying in %.1fs", exc, self._retry_delay_s)
        self._clear_states()
        self._unsure = True

    async def _load_states(self, pks: list[PartKey]) -> dict[PartKey, str]:
        """Each partition's progress and open windows, from the store where not cached; the
        partitions whose windows cannot be restored, with why."""
        missing: dict[EventKind, list[int]] = defaultdict(list)
        for kind, p in pks:
            if (kind, p) not in self._states:
                missing[kind].append(p)
        for kind, parts in missing.items():
            states = await self._writer.read_state(kind, parts)
            self._states.update(((kind, p), st) for p, st in states.items())
        unrestored = [pk for pk in pks if self._states[pk].windows is None]
        return await self._restore_windows(unrestored) if unrestored else {}

    async def _restore_windows(self, pks: list[PartKey]) -> dict[PartKey, str]:
        """Restore the open windows of partitions from the store, at their stored offsets;
        returns the partitions whose stored windows cannot be decoded, with why (their state is
        dropped).

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
        names = [k for _, ks in restoring.values() for k in ks]
        names += [keys.detector_key(*pk) for pk in restoring if pk[0] in self._detectors]
        hashes, wrong = await self._read_hashes(names)
        refused: dict[PartKey, str] = {}
        for key, why in wrong.items():  # a key of another type refuses its partition
            pk = keys.parse_tag(key)
            if restoring.pop(pk, None) is not None:
                refused[pk] = (
                    f"{key} in the store cannot be read ({why}): its state cannot be "
                    "restored, and the store refuses to write to it"
                )
                self._drop(pk)
        replays: dict[PartKey, list[str]] = {}
        for pk, (ws, ks) in restoring.items():
            try:
                ws.restore({k: hashes[k] for k in ks})
            except packed.PackedError as exc:
                refused[pk] = (
                    f"{exc}: its open windows cannot be restored, and applying on would "
                    "replace them without the events they hold"
                )
                self._drop(pk)
                continue
            self._states[pk].windows = ws
            if pk[0] in self._detectors:  # the detectors at the same offset as the windows
                det = self._detectors[pk[0]]
                since = det.restore(pk[1], hashes[keys.detector_key(*pk)])
                st = self._states[pk]
                wm = windows.watermark(st.max_event_time, lateness)
                if since is not None and wm is not None:
                    size = det.window.size_ms
                    replays[pk] = [
                        keys.window_key(pk[0], pk[1], det.window, det.dim, start)
                        for start in range(since, wm - size + 1, size)
                    ]
        if replays:
            await self._replay_detectors(replays)
        return refused

    async def _replay_detectors(self, replays: Mapping[PartKey, list[str]]) -> None:
        """Step restored detectors through the stored windows closed since their snapshots."""
        hashes, wrong = await self._read_hashes([k for ks in replays.values() for k in ks])
        for key, why in wrong.items():  # the detectors miss those windows, no more
            log.warning("window %s not replayed into the detectors: %s", key, why)
        for (kind, p), ks in replays.items():
            ks = [k for k in ks if k in hashes]
            det = self._detectors[kind]
            nf = packed.NF_APPLOG if kind is EventKind.APPLOG else packed.NF_SENSOR
            closed = []
            for k in ks:
                if stored := hashes[k]:
                    try:
                        fields = packed.entity_values(stored)
                        table = packed.decode(list(fields.values()), nf)
                        entities = [f.decode() for f in fields]
                    except ValueError as exc:  # PackedError, or a name that is not UTF-8:
                        # the detectors miss one window, no more
                        log.warning("window %s not replayed into the detectors: %s", k, exc)
                        continue
                    closed.append((keys.parse_window_key(k)[4], entities, table))
            det.replay(p, closed)

    async def _read_hashes(
        self, names: list[str]
    ) -> tuple[dict[str, dict[bytes, bytes]], dict[str, str]]:
        """The hashes ``names`` but those of another type (written by something other than a
        worker), and why each of those cannot be read."""
        wrong: dict[str, str] = {}
        while True:
            try:
                return await self._writer.read_hashes(names), wrong
            except StoredTypeError as exc:
                if not exc.wrong.keys() <= set(names) or not exc.wrong:
                    raise
                wrong.update(exc.wrong)
                names = [k for k in names if k not in exc.wrong]

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
