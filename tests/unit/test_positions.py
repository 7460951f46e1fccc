"""Device positions: each partition batch carries each device's latest position, only when the
device moved or was last sent in an older minute; positions the geo index cannot hold are left
out (the reading is still aggregated)."""

from __future__ import annotations

import orjson

from pipeline.batch import BatchRules, PartitionState, Record, commit, process
from pipeline.state import Retention
from pipeline.store_writer import payload
from pipeline.validation import TimeBounds
from schemas import keys
from schemas.events import EventKind

MIN = keys.WINDOW_1M.size_ms
T0 = 1_790_000_000_000 - 1_790_000_000_000 % MIN
NOW = T0 + 10 * MIN
RULES = BatchRules(TimeBounds(7 * 86_400_000, 300_000), 30_000)


def reading(offset: int, device: str, t: int, lat: float, lon: float) -> Record:
    event = {
        "device_id": device, "site": "s1", "event_time": t, "metric": "temp", "value": 1.0,
        "unit": "C", "lat": lat, "lon": lon, "firmware": "1.0",
    }  # fmt: skip
    return Record(offset, None, orjson.dumps(event))


def sent(
    state: PartitionState, rows: list[tuple[str, int, float, float]]
) -> list[tuple[str, int, float, float]]:
    first = state.offset + 1
    records = [reading(first + i, *row) for i, row in enumerate(rows)]
    batch = process(EventKind.SENSOR, 0, records, state, RULES, NOW)
    commit(state, batch)
    return [(p.device, p.event_time, p.lat, p.lon) for p in batch.positions]


def test_the_latest_position_of_each_device_is_sent_once_a_minute_while_it_stands_still() -> None:
    state = PartitionState()
    got = sent(state, [("a", T0 + 5, 1.0, 2.0), ("b", T0 + 1, 3.0, 4.0), ("a", T0 + 9, 1.5, 2.5),
                       ("a", T0 + 7, 9.0, 9.0)])  # fmt: skip
    # a's latest by event time (not by offset), b's only one
    assert sorted(got) == [("a", T0 + 9, 1.5, 2.5), ("b", T0 + 1, 3.0, 4.0)]
    # same minute, same place: nothing to send; b moved: sent
    assert sent(state, [("a", T0 + 20, 1.5, 2.5), ("b", T0 + 21, 3.5, 4.0)]) == [
        ("b", T0 + 21, 3.5, 4.0)
    ]
    # a newer minute refreshes a device standing still (its last-seen time)
    assert sent(state, [("a", T0 + MIN + 1, 1.5, 2.5)]) == [("a", T0 + MIN + 1, 1.5, 2.5)]


def test_positions_beyond_the_geo_index_are_left_out_but_the_reading_counts() -> None:
    state = PartitionState()
    records = [reading(0, "polar", T0 + 1, 89.0, 0.0), reading(1, "ok", T0 + 2, -85.0, 179.9)]
    batch = process(EventKind.SENSOR, 0, records, state, RULES, NOW)
    assert batch.events == 2 and not batch.dead
    assert [p.device for p in batch.positions] == ["ok"]


def test_ties_on_event_time_go_to_the_later_offset() -> None:
    state = PartitionState()
    assert sent(state, [("a", T0, 1.0, 1.0), ("a", T0, 2.0, 2.0)]) == [("a", T0, 2.0, 2.0)]


def test_the_apply_payload_carries_the_positions_block() -> None:
    state = PartitionState()
    batch = process(EventKind.SENSOR, 3, [reading(0, "a", T0 + 5, 1.0, 2.0)], state, RULES, NOW)
    key_list, args = payload(batch, Retention({"10s": 60, "1m": 60}), NOW, topic="t", owner="w")
    header = orjson.loads(args[0])
    geo, seen, members = header["g"]
    assert key_list[geo - 1] == keys.geo_key(3) and key_list[seen - 1] == keys.seen_key(3)
    assert members == [T0 + 5, 1.0, 2.0, "a"]


def test_an_applog_batch_has_no_positions() -> None:
    event = {
        "service": "api", "route": "/a", "event_time": T0, "latency_ms": 3.0, "status_code": 200,
        "level": "INFO", "message": "ok", "trace_id": "t1",
    }  # fmt: skip
    batch = process(
        EventKind.APPLOG, 0, [Record(0, None, orjson.dumps(event))], PartitionState(), RULES, NOW
    )
    assert batch.events == 1 and batch.positions == []
    _, args = payload(batch, Retention({"10s": 60, "1m": 60}), NOW, topic="t", owner="w")
    assert "g" not in orjson.loads(args[0])
