"""A kind's partitions processed together (one decode, one aggregation pass) give each partition
exactly what processing it alone gives: the same dead letters, late events, watermarks,
registrations and window deltas."""

from __future__ import annotations

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import windows
from pipeline.batch import (
    BatchRules,
    PartitionBatch,
    PartitionState,
    Record,
    aggregate_batches,
    process,
    process_partitions,
)
from pipeline.validation import TimeBounds
from schemas.events import EventKind
from tests.unit.events import NOT_TIMED

NOW = 1_790_000_000_000
RULES = BatchRules(TimeBounds(7 * 86_400_000, 300_000), 30_000)


def raw(device: int, t: int, value: float) -> bytes:
    return orjson.dumps(
        {
            "device_id": f"d{device}",
            "site": f"s{device % 2}",
            "event_time": t,
            "metric": "temp" if device % 3 else "rpm",
            "value": value,
            "unit": "C",
            "lat": 1.0,
            "lon": 2.0,
            "firmware": "1.0",
        }
    )


record_st = st.one_of(
    st.tuples(
        st.integers(0, 5),
        st.integers(NOW - 300_000, NOW),  # within 5 min: some are late against 30 s lateness
        st.floats(-1e3, 1e3, allow_nan=False),
    ).map(lambda x: raw(*x)),
    st.binary(max_size=20),  # dead letters
)


def summary(b: PartitionBatch) -> tuple[object, ...]:
    deltas = sorted(
        (d.window.name, d.dim, d.start_ms, n, tuple(d.table.stats[i].round(6).tolist()))
        for d in b.deltas
        for i, n in enumerate(d.names)
    )
    return (
        b.expect_offset,
        b.last_offset,
        b.max_event_time,
        b.watermark,
        b.events,
        [(d.record.offset, d.reason) for d in b.dead],
        [(d.record.offset, d.reason) for d in b.late],
        {k: sorted(zip(v, b.entity_minutes[k], strict=True)) for k, v in b.new_entities.items()},
        deltas,
    )


@given(
    st.dictionaries(
        st.integers(0, 5),
        st.tuples(
            st.lists(record_st, max_size=25),
            st.integers(-1, 3),  # already applied up to this offset
            st.one_of(st.just(windows.NO_EVENT_YET), st.integers(NOW - 200_000, NOW)),
        ),
        max_size=4,
    )
)
@settings(max_examples=150, deadline=None, suppress_health_check=NOT_TIMED)
def test_partitions_processed_together_equal_each_alone(
    parts: dict[int, tuple[list[bytes], int, int]],
) -> None:
    records = {p: [Record(i, None, v) for i, v in enumerate(vs)] for p, (vs, _, _) in parts.items()}

    def state(p: int) -> PartitionState:
        _, offset, max_et = parts[p]
        # a cached registration: events of an older minute register it again, not newer ones
        minute = NOW - NOW % 60_000 - 60_000 * (p % 3)
        known = {"device": {"d1|temp": minute}, "metric": {"temp": minute}}
        return PartitionState(offset=offset, max_event_time=max_et, known_entities=known)

    together = process_partitions(
        EventKind.SENSOR, records, {p: state(p) for p in parts}, RULES, NOW
    )
    aggregate_batches(together, RULES.plan)
    for b in together:
        alone = process(
            EventKind.SENSOR, b.partition, records[b.partition], state(b.partition), RULES, NOW
        )
        assert summary(b) == summary(alone)
