"""Entity registries: what a batch asks the store to (re-)register, the bounded worker cache, and
the ``pulse_apply`` payload fields that carry them (plus the offsets' topic and owner)."""

from __future__ import annotations

import copy
from typing import cast

import orjson

from pipeline.batch import DEFAULT_PLAN, BatchRules, PartitionState, Record, absorb, commit, process
from pipeline.state import Retention, WindowState
from pipeline.store_writer import payload
from pipeline.validation import TimeBounds
from schemas import keys, packed
from schemas.events import EventKind

MIN = keys.WINDOW_1M.size_ms
T0 = 1_790_000_000_000 - 1_790_000_000_000 % MIN  # a minute start
NOW = T0 + 10 * MIN
RETENTION = Retention({"10s": 6 * 3600, "1m": 3 * 86_400})


def rules(cap: int = keys.ENTITY_REGISTRY_CAP) -> BatchRules:
    return BatchRules(TimeBounds(7 * 86_400_000, 300_000), 30_000, entity_cap=cap)


def reading(offset: int, device: str, t: int, metric: str = "temperature") -> Record:
    event = {
        "schema_version": 1,
        "device_id": device,
        "site": "site-oslo-1",
        "event_time": t,
        "metric": metric,
        "value": 1.5,
        "unit": "C",
        "lat": 59.9,
        "lon": 10.7,
        "firmware": "1.0.0",
    }
    return Record(offset, None, orjson.dumps(event))


def run(state: PartitionState, events: list[tuple[str, int]], cap: int = 100) -> dict[str, int]:
    """Process and commit one batch of (device, time) readings; the device dim's registrations."""
    first = state.offset + 1
    records = [reading(first + i, dev, t) for i, (dev, t) in enumerate(events)]
    batch = process(EventKind.SENSOR, 0, records, state, rules(cap), NOW)
    sent = dict(
        zip(
            batch.new_entities.get(keys.Dim.DEVICE, []),
            batch.entity_minutes.get(keys.Dim.DEVICE, []),
            strict=True,
        )
    )
    commit(state, batch)
    return {name.split("|")[0]: minute for name, minute in sent.items()}


def test_each_entity_is_registered_with_its_newest_minute() -> None:
    state = PartitionState()
    sent = run(
        state, [("a", T0 + 59_000), ("b", T0 + 40_000), ("a", T0 + 61_000), ("a", T0 + 65_000)]
    )
    assert sent == {"a": T0 + MIN, "b": T0}
    batch_dims = state.known_entities
    assert batch_dims[keys.Dim.DEVICE] == {"a|temperature": T0 + MIN, "b|temperature": T0}
    assert batch_dims[keys.Dim.SITE] == {"site-oslo-1|temperature": T0 + MIN}
    assert batch_dims[keys.Dim.METRIC] == {"temperature": T0 + MIN}


def test_entities_are_sent_again_only_in_a_newer_minute() -> None:
    state = PartitionState()
    run(state, [("a", T0 + 1_000), ("b", T0 + MIN + 1_000)])
    # same minutes again (and an older one for b, still on time): nothing to send
    assert run(state, [("a", T0 + 50_000), ("b", T0 + MIN + 2_000), ("b", T0 + 55_000)]) == {}
    # a newer minute for a only; c is new
    assert run(state, [("a", T0 + MIN + 3_000), ("c", T0 + MIN + 4_000)]) == {
        "a": T0 + MIN,
        "c": T0 + MIN,
    }
    assert run(state, [("a", T0 + MIN + 9_000)]) == {}


def test_process_leaves_the_cache_alone_until_commit() -> None:
    """A batch the store did not apply (conflict) must not mark its entities as registered."""
    state = PartitionState()
    run(state, [("a", T0)])
    before = copy.deepcopy(state.known_entities)
    batch = process(EventKind.SENSOR, 0, [reading(1, "z", T0 + 1_000)], state, rules(), NOW)
    assert batch.new_entities[keys.Dim.DEVICE] == ["z|temperature"]
    assert state.known_entities == before


def test_the_cache_is_bounded_and_keeps_the_newest() -> None:
    state = PartitionState()
    cap = 4
    for i in range(10):
        run(state, [(f"d{i}", T0 + i * MIN)], cap=cap)
        assert len(state.known_entities[keys.Dim.DEVICE]) <= cap
    known = state.known_entities[keys.Dim.DEVICE]
    assert "d9|temperature" in known and "d0|temperature" not in known
    assert all(minute >= T0 + 6 * MIN for minute in known.values())
    # a forgotten entity is simply registered again
    assert run(state, [("d0", T0 + 9 * MIN + 1_000)], cap=cap) == {"d0": T0 + 9 * MIN}


def test_payload_carries_registrations_topic_owner_and_bounds() -> None:
    state = PartitionState()
    records = [reading(0, "a", T0 + 1_000), reading(1, "b", T0 + MIN + 2_000, metric="power")]
    batch = process(EventKind.SENSOR, 3, records, state, rules(cap=500), NOW)
    state.windows = WindowState(EventKind.SENSOR, 3, DEFAULT_PLAN)
    absorb(state, batch, rules(cap=500))
    key_list, args = payload(batch, RETENTION, NOW, topic="pulse.sensor", owner="w-1")
    body = orjson.loads(args[0])
    assert body["topic"] == "pulse.sensor" and body["owner"] == "w-1"
    assert body["ecap"] == 500
    # a member goes once the last 1m window it was seen in has expired
    assert body["ecut"] == NOW - MIN - 3 * 86_400 * 1000
    assert RETENTION.expire_at_s(keys.WINDOW_1M, body["ecut"]) * 1000 == NOW
    regs = {key_list[i - 1]: flat for i, flat in body["e"]}
    device = regs[keys.entities_key(EventKind.SENSOR, 3, keys.Dim.DEVICE)]
    assert device == [T0, "a|temperature", T0 + MIN, "b|power"]
    metric = regs[keys.entities_key(EventKind.SENSOR, 3, keys.Dim.METRIC)]
    assert sorted(zip(metric[1::2], metric[0::2], strict=True)) == [
        ("power", T0 + MIN),
        ("temperature", T0),
    ]
    assert len(regs) == len(keys.DIMS[EventKind.SENSOR])
    # every block refers to its own key
    indexes = [blk[0] for sec in ("h", "e") for blk in body[sec]] + body["g"][:2]
    assert sorted(indexes) == list(range(2, len(key_list) + 1))
    # the hash blocks account for every field/value argument, in order
    assert len(args) == 1 + 2 * sum(n for _, _, n in body["h"])
    device_1m = keys.window_key(EventKind.SENSOR, 3, keys.WINDOW_1M, keys.Dim.DEVICE, T0)
    at = 1
    for idx, expire, n in body["h"]:
        if key_list[idx - 1] == device_1m:
            assert args[at : at + 2 * n : 2] == ["a|temperature"]
            assert expire == RETENTION.expire_at_s(keys.WINDOW_1M, T0)
            values = cast(list[bytes], args[at + 1 : at + 2 * n : 2])  # the packed values
            table = packed.decode(values, packed.NF_SENSOR)
            assert table.stats[0, packed.COUNT] == 1
        at += 2 * n


def test_applog_payload_writes_applog_values() -> None:
    event = {
        "schema_version": 1,
        "service": "api",
        "route": "/x",
        "event_time": T0,
        "level": "INFO",
        "status_code": 200,
        "latency_ms": 3.0,
        "trace_id": "0" * 32,
        "message": "ok",
    }
    state = PartitionState(windows=WindowState(EventKind.APPLOG, 0, DEFAULT_PLAN))
    batch = process(
        EventKind.APPLOG, 0, [Record(0, None, orjson.dumps(event))], state, rules(), NOW
    )
    absorb(state, batch, rules())
    _keys, args = payload(batch, RETENTION, NOW, topic="", owner="")
    values = [v for v in args[2::2] if isinstance(v, bytes)]
    table = packed.decode(values, packed.NF_APPLOG)
    assert table.rows == len(values) > 0
    assert (table.stats[:, 6] == 1).all()  # one 2xx request in every window and dimension
