"""One Kafka partition's batch, from raw records to what the store writer applies (pure).

Steps: drop records at or below the partition's applied offset (already in the store), validate
(rejects become dead letters), classify on-time/late against the partition's watermark, and
aggregate the on-time events into window deltas. The clock is passed in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from pipeline import aggregation, windows
from pipeline.validation import Rejected, TimeBounds, decode_applog, decode_sensor
from schemas.events import EventKind


@dataclass(frozen=True, slots=True)
class Record:
    """A raw Kafka record of a partition."""

    offset: int
    key: bytes | None
    value: bytes | None


@dataclass(slots=True)
class PartitionState:
    """What the store says about a partition: last applied offset and max event time."""

    offset: int = -1
    max_event_time: int = windows.NO_EVENT_YET
    # entity names already registered in the store, per dim (a cache: losing it is harmless)
    known_entities: dict[str, set[str]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Diverted:
    """A record sent to the dead-letter or late topic, with the reason."""

    record: Record
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
    new_entities: dict[str, list[str]]
    events: int
    dead: list[Diverted]
    late: list[Diverted]

    @property
    def empty(self) -> bool:
        """No record of this batch is new to the store."""
        return self.last_offset <= self.expect_offset


@dataclass(frozen=True, slots=True)
class BatchRules:
    """Validation bounds and lateness for batch processing."""

    bounds: TimeBounds
    allowed_lateness_ms: int


def process(
    kind: EventKind,
    partition: int,
    records: Sequence[Record],
    state: PartitionState,
    rules: BatchRules,
    now_ms: int,
) -> PartitionBatch:
    """Turn a partition's records (in offset order) into a :class:`PartitionBatch`."""
    fresh = [r for r in records if r.offset > state.offset]
    batch = PartitionBatch(
        kind=kind,
        partition=partition,
        expect_offset=state.offset,
        last_offset=fresh[-1].offset if fresh else state.offset,
        max_event_time=state.max_event_time,
        watermark=windows.watermark(state.max_event_time, rules.allowed_lateness_ms),
        deltas=[],
        new_entities={},
        events=0,
        dead=[],
        late=[],
    )
    if not fresh:
        return batch
    cols, positions, rejected = _decode(kind, [r.value for r in fresh], now_ms, rules.bounds)
    batch.dead = [Diverted(fresh[rej.index], rej.reason) for rej in rejected]
    if len(cols) == 0:
        return batch
    lateness = windows.classify(cols.event_times, state.max_event_time, rules.allowed_lateness_ms)
    batch.max_event_time = lateness.max_event_time
    batch.watermark = windows.watermark(lateness.max_event_time, rules.allowed_lateness_ms)
    on_time = lateness.on_time
    if not on_time.all():
        for i in np.flatnonzero(~on_time).tolist():
            wm = int(lateness.seen_before[i]) - rules.allowed_lateness_ms
            t = int(cols.event_times[i])
            batch.late.append(
                Diverted(fresh[positions[i]], f"late: event_time {t} < watermark {wm}")
            )
        cols = cols.select(on_time)
    batch.events = len(cols)
    batch.deltas = aggregation.aggregate(cols)
    for dim, (codes, names) in cols.entities.items():
        known = state.known_entities.setdefault(dim, set())
        present = [names[c] for c in np.unique(codes).tolist()]
        new = [n for n in present if n not in known]
        if new:
            batch.new_entities[dim] = new
    return batch


def _decode(
    kind: EventKind, raws: list[bytes | None], now_ms: int, bounds: TimeBounds
) -> tuple[aggregation.Columns, list[int], list[Rejected]]:
    if kind is EventKind.SENSOR:
        sensor = decode_sensor(raws, now_ms, bounds)
        return aggregation.sensor_columns(sensor.events), sensor.positions, sensor.rejected
    applog = decode_applog(raws, now_ms, bounds)
    return aggregation.applog_columns(applog.events), applog.positions, applog.rejected


def commit(state: PartitionState, batch: PartitionBatch) -> None:
    """Advance the cached partition state after the store applied ``batch``."""
    state.offset = batch.last_offset
    state.max_event_time = batch.max_event_time
    for dim, names in batch.new_entities.items():
        state.known_entities.setdefault(dim, set()).update(names)
