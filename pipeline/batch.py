"""One Kafka partition's batch, from raw records to what the store writer applies (pure).

Steps: drop records at or below the partition's applied offset (already in the store), validate
(rejects become dead letters), classify on-time/late against the partition's watermark, and
aggregate the on-time events into window deltas. The clock is passed in. :func:`absorb` then
folds the deltas into the partition's open windows, and :func:`commit` advances the state once
the store applied the batch.

Entity registries: a batch carries the entities the store's registries (``ent:<dim>``, sorted sets
scored by last-seen ``1m`` window start) should hear about, and the partition state caches what
was sent. An entity is sent when it is not in the cache or appears in a newer minute than the one
cached, so each entity costs the store at most one registration per minute. The cache is bounded
like the registries (``BatchRules.entity_cap`` per dim): past the cap it keeps the newest half.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from operator import itemgetter
from typing import NamedTuple, Protocol

import numpy as np

from pipeline import aggregation, windows
from pipeline.detection import Detected
from pipeline.leaderboards import ZsetWrite
from pipeline.state import HashWrite, Retention, WindowState
from pipeline.validation import Rejected, TimeBounds, decode_applog, decode_sensor
from schemas import keys
from schemas.events import EventKind

_NEVER = np.iinfo(np.int64).min


class RawRecord(Protocol):
    """A raw Kafka record of a partition: aiokafka's records are handed on as they are."""

    @property
    def offset(self) -> int: ...

    @property
    def key(self) -> bytes | None: ...

    @property
    def value(self) -> bytes | None: ...


@dataclass(frozen=True, slots=True)
class Record:
    """A raw Kafka record of a partition (a :class:`RawRecord` built by hand)."""

    offset: int
    key: bytes | None
    value: bytes | None


@dataclass(frozen=True, slots=True)
class Unreadable:
    """A record the Kafka client could not parse (say, a header key that is not UTF-8): it
    becomes a dead letter with ``reason``, without its bytes, which stay in the input topic at
    ``offset``."""

    offset: int
    reason: str
    key: bytes | None = None
    value: bytes | None = None


@dataclass(slots=True)
class PartitionState:
    """What the store says about a partition: last applied offset and max event time."""

    offset: int = -1
    max_event_time: int = windows.NO_EVENT_YET
    topic: str | None = None  # the topic the store's offsets belong to (None: not recorded)
    refuse: str | None = None  # why the partition must not be read (its progress is unreadable)
    # the open windows at ``offset`` (None: not restored from the store yet)
    windows: WindowState | None = None
    # per dim: entity -> the last-seen 1m window start already sent to the store's registry
    # (a cache: losing it only re-sends names; bounded by BatchRules.entity_cap per dim)
    known_entities: dict[str, dict[str, int]] = field(default_factory=dict)
    # device -> (lat, lon, minute) of the position last sent to the store's geo set (a cache
    # like known_entities: losing it only re-sends positions)
    known_positions: dict[str, tuple[float, float, int]] = field(default_factory=dict)


class Position(NamedTuple):
    """A device's latest position as of an event time."""

    device: str
    event_time: int
    lat: float
    lon: float


@dataclass(frozen=True, slots=True)
class Diverted:
    """A record sent to the dead-letter or late topic, with the reason."""

    record: RawRecord
    reason: str


@dataclass(slots=True)
class PartitionBatch:
    """Everything one atomic apply needs, plus the records to divert before it."""

    kind: EventKind
    partition: int
    expect_offset: int
    last_offset: int
    max_event_time: int
    watermark: int | None
    deltas: list[aggregation.WindowDelta]
    # per dim: entities to (re-)register, and their last-seen 1m window start in the same order
    new_entities: dict[str, list[str]]
    events: int
    dead: list[Diverted]
    late: list[Diverted]
    entity_minutes: dict[str, list[int]] = field(default_factory=dict)
    # devices whose latest position the store should hear about: (device, event time, lat, lon)
    positions: list[Position] = field(default_factory=list)
    entity_cap: int = keys.ENTITY_REGISTRY_CAP  # members a registry (and the cache) keeps per dim
    # absolute values to write with the offset (the open windows' touched entities)
    writes: list[HashWrite] = field(default_factory=list)
    # leaderboard writes of the 1m instances this batch touched (pipeline.leaderboards)
    boards: list[ZsetWrite] = field(default_factory=list)
    # detector states stepped by the windows this batch closed, and the anomalies they raised
    detected: Detected | None = None
    # on-time events not aggregated yet (see aggregate_batches)
    columns: aggregation.Columns | None = None

    @property
    def empty(self) -> bool:
        """No record of this batch is new to the store."""
        return self.last_offset <= self.expect_offset


# Which dimensions each window keeps by default: everything the dashboard and verify read.
# The per-device series are kept per minute only (10 s device windows were the largest share
# of the store's writes, and nothing reads them).
DEFAULT_PLAN: aggregation.WindowPlan = (
    (keys.WINDOW_10S, (keys.Dim.METRIC, keys.Dim.FLEET)),
    (
        keys.WINDOW_1M,
        (
            keys.Dim.DEVICE,
            keys.Dim.SITE,
            keys.Dim.METRIC,
            keys.Dim.ROUTE,
            keys.Dim.SERVICE,
            keys.Dim.FLEET,
        ),
    ),
)
DEFAULT_RETENTION = Retention({keys.WINDOW_10S.name: 6 * 3600, keys.WINDOW_1M.name: 3 * 86400})


@dataclass(frozen=True, slots=True)
class BatchRules:
    """Validation bounds, lateness, the windows kept and their retention."""

    bounds: TimeBounds
    allowed_lateness_ms: int
    entity_cap: int = keys.ENTITY_REGISTRY_CAP
    plan: aggregation.WindowPlan = DEFAULT_PLAN
    retention: Retention = DEFAULT_RETENTION


def process(
    kind: EventKind,
    partition: int,
    records: Sequence[RawRecord],
    state: PartitionState,
    rules: BatchRules,
    now_ms: int,
) -> PartitionBatch:
    """Turn a partition's records (in offset order) into a :class:`PartitionBatch`."""
    (batch,) = process_partitions(kind, {partition: records}, {partition: state}, rules, now_ms)
    aggregate_batches([batch], rules.plan)
    return batch


def aggregate_batches(batches: Sequence[PartitionBatch], plan: aggregation.WindowPlan) -> None:
    """Aggregate the on-time events of several partitions' batches in one pass (their deltas).

    Batches processed together share one :class:`aggregation.Columns` (tagged with each event's
    partition); each distinct one is aggregated once.
    """
    todo = [b for b in batches if b.columns is not None and len(b.columns)]
    distinct = list({id(b.columns): b.columns for b in todo if b.columns is not None}.values())
    if distinct:
        cols = distinct[0] if len(distinct) == 1 else aggregation.concat_columns(distinct)
        by_part: dict[int, list[aggregation.WindowDelta]] = {b.partition: [] for b in todo}
        for d in aggregation.aggregate(cols, plan):
            by_part[d.partition].append(d)
        for b in todo:
            b.deltas = by_part[b.partition]
    for b in batches:
        b.columns = None


def process_partitions(
    kind: EventKind,
    parts: Mapping[int, Sequence[RawRecord]],
    states: Mapping[int, PartitionState],
    rules: BatchRules,
    now_ms: int,
) -> list[PartitionBatch]:
    """:func:`process` up to aggregation, for several partitions of one kind at once.

    One decode and one set of columns for all of them (a fixed cost per call, not per
    partition); lateness and entity registration still follow each partition's own state.
    Every batch's ``columns`` is the shared columns, tagged with each event's partition.
    """
    batches: list[PartitionBatch] = []
    fresh: list[RawRecord] = []
    bounds = [0]  # partition i's fresh records are fresh[bounds[i]:bounds[i + 1]]
    for partition, records in parts.items():
        state = states[partition]
        new = [r for r in records if r.offset > state.offset]
        fresh.extend(new)
        bounds.append(len(fresh))
        batches.append(
            PartitionBatch(
                kind=kind,
                partition=partition,
                expect_offset=state.offset,
                last_offset=new[-1].offset if new else state.offset,
                max_event_time=state.max_event_time,
                watermark=windows.watermark(state.max_event_time, rules.allowed_lateness_ms),
                deltas=[],
                new_entities={},
                events=0,
                dead=[],
                late=[],
                entity_cap=rules.entity_cap,
            )
        )
    if not fresh:
        return batches
    cols, positions, rejected = _decode(kind, [r.value for r in fresh], now_ms, rules.bounds)
    edges = np.asarray(bounds, dtype=np.int64)
    for rej in rejected:  # (an unreadable record has no value: it is always rejected)
        b = batches[int(np.searchsorted(edges, rej.index, side="right")) - 1]
        rec = fresh[rej.index]
        b.dead.append(Diverted(rec, rec.reason if isinstance(rec, Unreadable) else rej.reason))
    if len(cols) == 0:
        return batches
    pos = np.asarray(positions, dtype=np.int64)
    # events keep the records' order, so each partition's events are one slice
    ev_bounds = np.searchsorted(pos, edges).tolist()
    on_time = np.ones(len(cols), dtype=np.bool_)
    part = np.empty(len(cols), dtype=np.int64)
    lateness_ms = rules.allowed_lateness_ms
    for i, b in enumerate(batches):
        lo, hi = ev_bounds[i], ev_bounds[i + 1]
        part[lo:hi] = b.partition
        if lo == hi:
            continue
        late = windows.classify(cols.event_times[lo:hi], b.max_event_time, lateness_ms)
        b.max_event_time = late.max_event_time
        b.watermark = windows.watermark(late.max_event_time, lateness_ms)
        on_time[lo:hi] = late.on_time
        for j in np.flatnonzero(~late.on_time).tolist():
            wm = int(late.seen_before[j]) - lateness_ms
            t = int(cols.event_times[lo + j])
            b.late.append(
                Diverted(fresh[positions[lo + j]], f"late: event_time {t} < watermark {wm}")
            )
    cols.partition = part
    if not on_time.all():
        cols = cols.select(on_time)
        # each partition's on-time events are still one slice
        kept = np.concatenate(([0], np.cumsum(on_time)))
        ev_bounds = kept[ev_bounds].tolist()
    for i, b in enumerate(batches):
        mine = slice(ev_bounds[i], ev_bounds[i + 1])
        b.events = mine.stop - mine.start
        b.columns = cols
        if b.events:
            _positions_to_send(b, cols, states[b.partition], mine)
    _entities_to_register(batches, cols, states, ev_bounds)
    return batches


def _positions_to_send(
    batch: PartitionBatch,
    cols: aggregation.Columns,
    state: PartitionState,
    mine: slice,
) -> None:
    """Fill ``batch.positions``: each device's latest position (of the events in ``mine``),
    when it moved or was last sent in an older minute (so the store hears of each device at
    most about once a minute while it stands still)."""
    pos = cols.positions
    if pos is None:
        return
    sel = mine.start + np.flatnonzero(np.abs(pos.lat[mine]) <= keys.GEO_MAX_LAT)
    if sel.size == 0:
        return
    dev, t = pos.device[sel], cols.event_times[sel]
    # the last of each device's latest events (times tie: the later offset wins)
    order = np.lexsort((sel, t, dev))
    last = order[np.r_[np.flatnonzero(np.diff(dev[order])), order.size - 1]]
    at = sel[last]
    minutes = windows.window_starts(cols.event_times[at], keys.WINDOW_1M.size_ms)
    known = state.known_positions
    for i, m in zip(at.tolist(), minutes.tolist(), strict=True):
        name = pos.names[int(pos.device[i])]
        lat, lon = float(pos.lat[i]), float(pos.lon[i])
        sent = known.get(name)
        if sent is None or sent[0] != lat or sent[1] != lon or sent[2] < m:
            batch.positions.append(Position(name, int(cols.event_times[i]), lat, lon))


def _entities_to_register(
    batches: Sequence[PartitionBatch],
    cols: aggregation.Columns,
    states: Mapping[int, PartitionState],
    ev_bounds: Sequence[int],
) -> None:
    """Fill each batch's ``new_entities``: the entities of its events (``cols`` rows
    ``ev_bounds[i]:ev_bounds[i + 1]``) not cached for its partition, or seen in a newer minute
    than cached. One sort per dimension for all the partitions, in entity code order."""
    if len(cols) == 0:
        return
    which = np.repeat(np.arange(len(batches)), np.diff(np.asarray(ev_bounds)))
    minute = windows.window_starts(cols.event_times, keys.WINDOW_1M.size_ms)
    for dim, (codes, names) in cols.entities.items():
        width = max(len(names), 1)
        key = which * width + codes
        order = np.lexsort((minute, key))
        key = key[order]
        last = np.r_[np.flatnonzero(np.diff(key)), key.size - 1]  # each key's latest minute
        batch_of, code_of, minutes = key[last] // width, key[last] % width, minute[order][last]
        cut = np.searchsorted(batch_of, np.arange(len(batches) + 1)).tolist()
        for i, b in enumerate(batches):
            lo, hi = cut[i], cut[i + 1]
            if lo == hi:
                continue
            seen = [names[c] for c in code_of[lo:hi].tolist()]
            known = states[b.partition].known_entities.get(dim, {})
            cached = np.fromiter(map(known.get, seen, repeat(_NEVER)), np.int64, hi - lo)
            newer = np.flatnonzero(cached < minutes[lo:hi])
            if newer.size:
                b.new_entities[dim] = [seen[j] for j in newer.tolist()]
                b.entity_minutes[dim] = minutes[lo:hi][newer].tolist()


def _decode(
    kind: EventKind, raws: list[bytes | None], now_ms: int, bounds: TimeBounds
) -> tuple[aggregation.Columns, list[int], list[Rejected]]:
    if kind is EventKind.SENSOR:
        sensor = decode_sensor(raws, now_ms, bounds)
        return aggregation.sensor_columns(sensor.events), sensor.positions, sensor.rejected
    applog = decode_applog(raws, now_ms, bounds)
    return aggregation.applog_columns(applog.events), applog.positions, applog.rejected


def absorb(state: PartitionState, batch: PartitionBatch, rules: BatchRules) -> None:
    """Fold the batch into the partition's open windows; the values to write go in the batch.

    The state then runs ahead of the store until the apply succeeds; on any other outcome the
    caller drops the state, and it is restored from the store.
    """
    if state.windows is None:
        raise RuntimeError(f"partition {batch.partition}: open windows not restored")
    batch.writes = state.windows.absorb(batch.deltas, rules.retention)


def commit(state: PartitionState, batch: PartitionBatch, *, evict: bool = True) -> None:
    """Advance the cached partition state after the store applied ``batch`` (``evict``: drop
    the windows its watermark has passed; else the caller evicts, for many partitions at once)."""
    state.offset = batch.last_offset
    state.max_event_time = batch.max_event_time
    if evict and state.windows is not None:
        state.windows.evict(batch.watermark)
    if batch.positions:
        minute = keys.WINDOW_1M.size_ms
        for p in batch.positions:
            state.known_positions[p.device] = (p.lat, p.lon, p.event_time - p.event_time % minute)
        if len(state.known_positions) > batch.entity_cap:
            latest = heapq.nlargest(
                max(batch.entity_cap // 2, 1),
                state.known_positions.items(),
                key=lambda kv: kv[1][2],
            )
            state.known_positions = dict(latest)
    for dim, names in batch.new_entities.items():
        known = state.known_entities.setdefault(dim, {})
        known.update(zip(names, batch.entity_minutes[dim], strict=True))
        if len(known) > batch.entity_cap:
            newest = heapq.nlargest(max(batch.entity_cap // 2, 1), known.items(), itemgetter(1))
            state.known_entities[dim] = dict(newest)
