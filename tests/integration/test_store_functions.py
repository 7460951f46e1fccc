"""``pulse_apply`` (pipeline/store_functions.lua) against the real Valkey.

A malformed payload must leave the store exactly as it was: the function checks everything
before its first write. Each case sends a payload whose valid blocks come first (they would be
written first by a function that checks as it goes) and whose *last* element is malformed, then
compares a full snapshot of the store (every key's DUMP and expiry) before and after.
"""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import Callable, Iterator
from typing import Any, cast

import orjson
import pytest
import redis
import redis.asyncio as aioredis

from pipeline.batch import BatchRules, PartitionBatch, PartitionState, Record, commit, process
from pipeline.settings import Durability
from pipeline.stack.testing import RunningStack
from pipeline.store_writer import FUNCTION_NAME, Retention, StoreWriter, function_source, payload
from pipeline.validation import TimeBounds
from schemas import keys
from schemas.events import EventKind

pytestmark = [pytest.mark.integration]

SENSOR, APPLOG = EventKind.SENSOR, EventKind.APPLOG
RULES = BatchRules(TimeBounds(7 * 86_400_000, 300_000), 30_000)
RETENTION = Retention({"10s": 6 * 3600, "1m": 3 * 86_400})
MINUTE = keys.WINDOW_1M.size_ms
Body = dict[str, Any]


def now_ms() -> int:
    return int(time.time() * 1000)


def sensor_record(offset: int, device: str, metric: str, value: float, t: int) -> Record:
    event = {
        "schema_version": 1,
        "device_id": device,
        "site": "site-oslo-1",
        "event_time": t,
        "metric": metric,
        "value": value,
        "unit": "C",
        "lat": 59.9,
        "lon": 10.7,
        "firmware": "1.0.0",
    }
    return Record(offset, device.encode(), orjson.dumps(event))


def applog_record(offset: int, service: str, status: int, latency: float, t: int) -> Record:
    event = {
        "schema_version": 1,
        "service": service,
        "route": "/api/items",
        "event_time": t,
        "level": "ERROR" if status >= 500 else "INFO",
        "status_code": status,
        "latency_ms": latency,
        "trace_id": f"{offset:032x}",
        "message": "ok",
    }
    return Record(offset, None, orjson.dumps(event))


def sensor_records(first: int, count: int, t0: int) -> list[Record]:
    """Readings of 3 devices x 2 metrics spread over two minutes."""
    out = []
    for i in range(count):
        dev = f"dev-{i % 3}"
        metric = ("temperature", "humidity")[i % 2]
        out.append(sensor_record(first + i, dev, metric, 10.0 + 0.25 * i, t0 + i * 4_000))
    return out


def applog_records(first: int, count: int, t0: int) -> list[Record]:
    return [
        applog_record(first + i, f"svc-{i % 2}", (200, 404, 503)[i % 3], 5.0 + i, t0 + i * 4_000)
        for i in range(count)
    ]


@pytest.fixture
def lib(store: redis.Redis) -> redis.Redis:
    """The flushed store with the ``pulse`` function library loaded."""
    store.execute_command("FUNCTION", "LOAD", "REPLACE", function_source())
    return store


@pytest.fixture
def raw(stack: RunningStack) -> Iterator[redis.Redis]:
    """A client that returns bytes (for DUMP)."""
    client = redis.Redis(port=stack.store_settings.port, decode_responses=False)
    try:
        yield client
    finally:
        client.close()


def snapshot(raw: redis.Redis) -> dict[bytes, tuple[bytes | None, int]]:
    """Every key's serialized value and absolute expiry (ms, -1 when none)."""
    out = {}
    for k in raw.scan_iter(count=1000):
        out[k] = (raw.dump(k), int(raw.execute_command("PEXPIRETIME", k)))
    return out


def fcall(r: redis.Redis, key_list: list[str], arg: bytes | str) -> Any:
    return r.execute_command("FCALL", FUNCTION_NAME, len(key_list), *key_list, arg)


def make_batch(
    kind: EventKind, part: int, records: list[Record], state: PartitionState
) -> PartitionBatch:
    return process(kind, part, records, state, RULES, now_ms())


def apply(r: redis.Redis, batch: PartitionBatch, state: PartitionState) -> None:
    key_list, arg = payload(batch, RETENTION, now_ms(), topic="t.sensor", owner="w1")
    assert fcall(r, key_list, arg) == [1, str(batch.last_offset)]
    commit(state, batch)


@pytest.fixture
def seeded(lib: redis.Redis) -> tuple[redis.Redis, PartitionState, PartitionState, int]:
    """One applied batch per kind, so later batches merge into existing fields."""
    t0 = now_ms() - 10 * MINUTE
    t0 -= t0 % MINUTE
    s_state, a_state = PartitionState(), PartitionState()
    apply(lib, make_batch(SENSOR, 0, sensor_records(0, 40, t0), s_state), s_state)
    apply(lib, make_batch(APPLOG, 1, applog_records(0, 30, t0), a_state), a_state)
    return lib, s_state, a_state, t0


def next_payload(
    kind: EventKind, state: PartitionState, t0: int, *, new_minute: bool = True
) -> tuple[list[str], Body]:
    """A valid payload for the next batch, with an ``e`` block too.

    ``new_minute``: in minutes after the seeded ones; else in the last seeded minutes (merging
    with stored fields), the entities forgotten by the cache so they are registered again.
    """
    t = t0 + 3 * MINUTE if new_minute else t0 + 2 * MINUTE
    fresh = state.offset + 1
    records = sensor_records(fresh, 20, t) if kind is SENSOR else applog_records(fresh, 20, t)
    state = copy.deepcopy(state)
    if not new_minute:
        state.known_entities.clear()
    batch = process(kind, 0 if kind is SENSOR else 1, records, state, RULES, now_ms())
    key_list, arg = payload(batch, RETENTION, now_ms(), topic=f"t.{kind.value}", owner="w2")
    body: Body = orjson.loads(arg)
    assert body["a"] and body["s"] and body["e"]
    return key_list, body


# ----------------------------------------------------------------- malformations

Mutation = Callable[[list[str], Body], None]


def last_agg_row(body: Body) -> list[Any]:
    row: list[Any] = copy.deepcopy(body["a"][-1][2][-1])
    row[0] = "dev-new|temperature"
    body["a"][-1][2].append(row)
    return row


def set_at(i: int, value: Any) -> Mutation:
    def mutate(_keys: list[str], body: Body) -> None:
        last_agg_row(body)[i] = value

    return mutate


def last_sketch_row(body: Body) -> list[Any]:
    row: list[Any] = ["dev-new|temperature", 12, 1, 16, 2]
    body["s"][-1][2].append(row)
    return row


def sketch(fn: Callable[[list[Any]], None]) -> Mutation:
    return lambda _k, body: fn(last_sketch_row(body))


def entities(fn: Callable[[list[Any]], None]) -> Mutation:
    return lambda _k, body: fn(body["e"][-1][1])


def top(field: str, value: Any) -> Mutation:
    def mutate(_keys: list[str], body: Body) -> None:
        if value is DELETE:
            del body[field]
        else:
            body[field] = value

    return mutate


def block(section: str, i: int, value: Any) -> Mutation:
    def mutate(_keys: list[str], body: Body) -> None:
        body[section][-1][i] = value

    return mutate


DELETE = object()

SENSOR_CASES: dict[str, tuple[Mutation, str]] = {
    "agg row too short": (
        lambda _k, b: last_agg_row(b).pop(),
        "must be an entity and 5 statistics",
    ),
    "agg row too long": (lambda _k, b: last_agg_row(b).append(1), "must be an entity and 5"),
    "agg entity not a string": (set_at(0, 7), "entity is not a name"),
    "agg entity empty": (set_at(0, ""), "entity is not a name"),
    "agg sum not a number": (set_at(2, "12"), "statistic 2 is not a finite number"),
    "agg sum null": (set_at(2, None), "statistic 2 is not a finite number"),
    "agg count negative": (set_at(1, -1), "count 1 is not an integer >= 0"),
    "agg count fractional": (set_at(1, 1.5), "count 1 is not an integer >= 0"),
    "agg min above max": (set_at(4, 1e9), "min 1000000000 > max"),
    "agg row not an array": (
        lambda _k, b: b["a"][-1][2].append({"n": 1}),
        "must be an entity and 5 statistics",
    ),
    "agg expire-at fractional": (block("a", 1, 1.5), "expire-at must be an integer"),
    "agg rows not an array": (block("a", 2, 5), "rows must be an array"),
    "agg key index beyond KEYS": (
        lambda k, b: b["a"][-1].__setitem__(0, len(k) + 1),
        "is not within 2..",
    ),
    "agg key index of the progress hash": (block("a", 0, 1), "key index 1 is not within 2.."),
    "agg key index used twice": (
        lambda _k, b: b["a"].append(copy.deepcopy(b["a"][0])),
        "is used twice",
    ),
    "agg block too short": (lambda _k, b: b["a"][-1].pop(), "a block must be an array of 3"),
    "sketch count zero": (sketch(lambda r: r.__setitem__(4, 0)), "count 0 is not an integer > 0"),
    "sketch count fractional": (sketch(lambda r: r.__setitem__(2, 0.5)), "count 0.5 is not"),
    "sketch code fractional": (sketch(lambda r: r.__setitem__(3, 1.5)), "code 1.5 is not"),
    "sketch code a string": (sketch(lambda r: r.__setitem__(1, "12")), "code 12 is not"),
    "sketch pair incomplete": (sketch(lambda r: r.pop()), "needs (code, count) pairs"),
    "sketch entity missing": (sketch(lambda r: r.__setitem__(0, 3)), "must start with an entity"),
    "sketch key index beyond KEYS": (
        lambda k, b: b["s"][-1].__setitem__(0, len(k) + 5),
        "is not within 2..",
    ),
    "entity score fractional": (entities(lambda m: m.extend([1.5, "x"])), "score 1.5 is not"),
    "entity name not a string": (entities(lambda m: m.extend([60_000, 4])), "is not a name"),
    "entity pair incomplete": (entities(lambda m: m.append(60_000)), "(score, entity) pairs"),
    "entity key index used twice": (
        lambda _k, b: b["e"].append(copy.deepcopy(b["e"][0])),
        "is used twice",
    ),
    "expect not an integer": (top("expect", "3"), "expect must be an integer"),
    "offset not above expect": (
        lambda _k, b: b.__setitem__("offset", b["expect"]),
        "must be greater than expect",
    ),
    "events negative": (top("ev", -1), "ev must be an integer >= 0"),
    "dead fractional": (top("dead", 0.5), "dead must be an integer >= 0"),
    "now missing": (top("now", DELETE), "now must be an integer"),
    "topic missing": (top("topic", DELETE), "topic must be a string"),
    "owner a number": (top("owner", 3), "owner must be a string"),
    "nf wrong": (top("nf", 6), "nf must be 5 or 11"),
    "mx without wm": (top("wm", DELETE), "mx and wm must be given together"),
    "watermark fractional": (top("wm", 0.5), "wm must be an integer"),
    "aggregates not an array": (top("a", "x"), "a must be an array"),
    "ecap zero": (top("ecap", 0), "ecap must be an integer >= 1"),
    "ecut missing": (top("ecut", DELETE), "ecut must be an integer"),
}

APPLOG_CASES: dict[str, tuple[Mutation, str]] = {
    "applog row with sensor width": (
        lambda _k, b: b["a"][-1][2].append(["svc-9", 1, 2.0, 4.0, 2.0, 2.0]),
        "must be an entity and 11 statistics",
    ),
    "applog status count fractional": (set_at(7, 0.5), "count 7 is not an integer >= 0"),
    "applog error count negative": (set_at(11, -2), "count 11 is not an integer >= 0"),
}


def check_refused(
    r: redis.Redis, raw: redis.Redis, key_list: list[str], arg: bytes | str, expected: str
) -> None:
    before = snapshot(raw)
    with pytest.raises(redis.ResponseError) as err:
        fcall(r, key_list, arg)
    assert "pulse_apply" in str(err.value) and expected in str(err.value), str(err.value)
    assert snapshot(raw) == before


@pytest.mark.parametrize("case", list(SENSOR_CASES) + list(APPLOG_CASES))
def test_malformed_payload_writes_nothing(
    seeded: tuple[redis.Redis, PartitionState, PartitionState, int],
    raw: redis.Redis,
    case: str,
) -> None:
    r, s_state, a_state, t0 = seeded
    kind, (mutate, expected) = (
        (SENSOR, SENSOR_CASES[case]) if case in SENSOR_CASES else (APPLOG, APPLOG_CASES[case])
    )
    state = s_state if kind is SENSOR else a_state
    key_list, body = next_payload(kind, state, t0)
    mutate(key_list, body)
    check_refused(r, raw, key_list, orjson.dumps(body), expected)

    # the same batch without the malformation applies
    key_list, body = next_payload(kind, state, t0)
    before = snapshot(raw)
    assert fcall(r, key_list, orjson.dumps(body)) == [1, str(body["offset"])]
    assert snapshot(raw) != before


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"expect": -1, "offset": ', "payload is not JSON"),
        ("[1, 2]", "expect must be an integer"),
        ("7", "payload must be a JSON object"),
    ],
)
def test_undecodable_payload_writes_nothing(
    seeded: tuple[redis.Redis, PartitionState, PartitionState, int],
    raw: redis.Redis,
    text: str,
    expected: str,
) -> None:
    r, s_state, _a, t0 = seeded
    key_list, _body = next_payload(SENSOR, s_state, t0)
    check_refused(r, raw, key_list, text, expected)


def test_non_finite_numbers_are_refused(
    seeded: tuple[redis.Redis, PartitionState, PartitionState, int], raw: redis.Redis
) -> None:
    """JSON from elsewhere may hold numbers orjson never writes: 1e999 decodes to infinity."""
    r, s_state, _a, t0 = seeded
    key_list, body = next_payload(SENSOR, s_state, t0)
    last_agg_row(body)[2] = 123456.5
    text = orjson.dumps(body).decode()
    assert text.count("123456.5") == 1
    check_refused(r, raw, key_list, text.replace("123456.5", "1e999"), "statistic 2 is not")
    check_refused(r, raw, key_list, text.replace("123456.5", "-1e999"), "statistic 2 is not")


def test_no_keys_or_extra_arguments_are_refused(lib: redis.Redis, raw: redis.Redis) -> None:
    check_refused(lib, raw, [], "{}", "no keys")
    before = snapshot(raw)
    with pytest.raises(redis.ResponseError, match="expected one argument"):
        lib.execute_command("FCALL", FUNCTION_NAME, 1, keys.progress_key(SENSOR, 0), "{}", "{}")
    assert snapshot(raw) == before


def test_bad_stored_values_are_refused_before_writing(
    seeded: tuple[redis.Redis, PartitionState, PartitionState, int], raw: redis.Redis
) -> None:
    """A stored field the batch would merge with, or a key of the wrong type: no write either."""
    r, s_state, _a, t0 = seeded
    key_list, body = next_payload(SENSOR, s_state, t0, new_minute=False)
    arg = orjson.dumps(body)
    agg = key_list[body["a"][-1][0] - 1]
    ent = body["a"][-1][2][-1][0]
    sk = key_list[body["s"][-1][0] - 1]
    field = f"{body['s'][-1][2][-1][0]}#{body['s'][-1][2][-1][1]}"
    progress = key_list[0]
    for key, name, bad, expected in (
        (agg, ent, "1 2 3", "stored field"),
        (agg, ent, "1 2 3 x 5", "stored field"),
        (agg, ent, "1 2 3 9 5", "min 9 > max 5"),
        (sk, field, "1.5", "stored field"),
        (progress, "events", "many", "stored progress field events"),
    ):
        old = r.hget(key, name)
        r.hset(key, name, bad)
        check_refused(r, raw, key_list, arg, expected)
        if old is None:
            r.hdel(key, name)
        else:
            r.hset(key, name, old)
    ent_key = key_list[body["e"][-1][0] - 1]
    for key, wrong, expected in (
        (sk, lambda k: r.set(k, "not a hash"), "WRONGTYPE"),
        (ent_key, lambda k: r.hset(k, "x", "1"), "holds a hash, not a sorted set"),
    ):
        saved = raw.dump(key)
        r.delete(key)
        wrong(key)
        check_refused(r, raw, key_list, arg, expected)
        r.delete(key)
        if saved is not None:
            raw.restore(key, 0, saved)
    assert fcall(r, key_list, arg) == [1, str(body["offset"])]


def test_expectation_failure_writes_nothing(
    seeded: tuple[redis.Redis, PartitionState, PartitionState, int], raw: redis.Redis
) -> None:
    r, s_state, _a, t0 = seeded
    key_list, body = next_payload(SENSOR, s_state, t0)
    body["expect"] -= 1
    before = snapshot(raw)
    assert fcall(r, key_list, orjson.dumps(body)) == [0, str(s_state.offset)]
    assert snapshot(raw) == before


def test_apply_merges_like_increments(
    seeded: tuple[redis.Redis, PartitionState, PartitionState, int],
) -> None:
    """Fields merge with what is stored (counts add, min/max fold); sketch counts add up."""
    r, s_state, _a, t0 = seeded
    agg = keys.agg_key(SENSOR, 0, keys.WINDOW_1M, keys.Dim.METRIC, t0 + 2 * MINUTE)
    sk = keys.sketch_key(SENSOR, 0, keys.WINDOW_1M, keys.Dim.METRIC, t0 + 2 * MINUTE)
    before = keys.unpack_stats(str(r.hget(agg, "temperature")))
    sk_before = sum(int(v) for f, v in r.hgetall(sk).items() if str(f).startswith("temperature#"))
    t = t0 + 2 * MINUTE  # the newest seeded minute: not late
    records = [
        sensor_record(s_state.offset + 1, "dev-0", "temperature", -5.0, t + 30_000),
        sensor_record(s_state.offset + 2, "dev-1", "temperature", 99.0, t + 35_000),
    ]
    apply(r, make_batch(SENSOR, 0, records, s_state), s_state)
    after = keys.unpack_stats(str(r.hget(agg, "temperature")))
    assert after["n"] == before["n"] + 2
    assert after["sum"] == pytest.approx(before["sum"] + 94.0)
    assert after["min"] == -5.0 and after["max"] == 99.0
    sk_after = sum(int(v) for f, v in r.hgetall(sk).items() if str(f).startswith("temperature#"))
    assert sk_after == sk_before + 2
    progress = r.hgetall(keys.progress_key(SENSOR, 0))
    assert progress["offset"] == str(s_state.offset)
    assert progress["batches"] == "2"
    assert int(progress["events"]) == 42


def test_entity_registries_are_scored_and_trimmed(lib: redis.Redis, raw: redis.Redis) -> None:
    """ZADD GT by last-seen minute; members past the cutoff or beyond the cap are dropped."""
    r = lib
    progress = keys.progress_key(SENSOR, 0)
    ent = keys.entities_key(SENSOR, 0, keys.Dim.DEVICE)
    r.sadd(ent, "legacy")  # a registry from before they were scored
    body: Body = {
        "expect": -1, "offset": 0, "ev": 0, "late": 0, "dead": 0, "now": 1, "topic": "t",
        "owner": "w", "nf": 5, "a": [], "s": [],
        "e": [[2, [5 * MINUTE, "a", 5 * MINUTE, "b", 3 * MINUTE, "c", 1 * MINUTE, "d"]]],
        "ecut": 1 * MINUTE, "ecap": 3,
    }  # fmt: skip
    assert fcall(r, [progress, ent], orjson.dumps(body)) == [1, "0"]
    # "d" is at the cutoff (its windows expired); the cap keeps the 3 newest
    assert r.zrange(ent, 0, -1, withscores=True) == [
        ("c", 3 * MINUTE),
        ("a", 5 * MINUTE),
        ("b", 5 * MINUTE),
    ]
    # scores only rise; the cap drops the oldest
    body.update(expect=0, offset=1, ecap=2)
    body["e"] = [[2, [2 * MINUTE, "a", 6 * MINUTE, "c"]]]
    assert fcall(r, [progress, ent], orjson.dumps(body)) == [1, "1"]
    # a stays at 5m (GT) and, tied with b, goes first (ties rank by name)
    assert r.zrange(ent, 0, -1, withscores=True) == [("b", 5 * MINUTE), ("c", 6 * MINUTE)]
    # many members in one call (chunked ZADD)
    body.update(expect=1, offset=2, ecap=100_000, ecut=0)
    flat: list[Any] = []
    for i in range(2_345):
        flat += [7 * MINUTE, f"dev-{i}"]
    body["e"] = [[2, flat]]
    assert fcall(r, [progress, ent], orjson.dumps(body)) == [1, "2"]
    assert r.zcard(ent) == 2_345 + 2
    assert r.zrange(ent, 0, 1, desc=True, withscores=True)[0][1] == 7 * MINUTE


def test_writer_stores_topic_and_owner(stack: RunningStack, lib: redis.Redis) -> None:
    """StoreWriter passes the kind's topic name and its owner; each apply records both."""
    t0 = now_ms() - 5 * MINUTE

    async def run() -> None:
        client = aioredis.Redis(port=stack.store_settings.port)
        writer = StoreWriter(
            client,
            Durability.LOCAL,
            RETENTION,
            topic_names={SENSOR: "t.sensor", APPLOG: "t.applog"},
            owner="worker-7",
        )
        try:
            states = {SENSOR: PartitionState(), APPLOG: PartitionState()}
            batches = [
                make_batch(SENSOR, 2, sensor_records(0, 10, t0), states[SENSOR]),
                make_batch(APPLOG, 2, applog_records(0, 10, t0), states[APPLOG]),
            ]
            outcomes = []
            for b in batches:
                got, _waited = await writer.apply([b], now_ms())
                outcomes += got
            assert [o.applied for o in outcomes] == [True, True]
            anonymous = StoreWriter(client, Durability.LOCAL, RETENTION)
            b = make_batch(SENSOR, 3, sensor_records(0, 5, t0), PartitionState())
            (outcome,), _ = await anonymous.apply([b], now_ms())
            assert outcome.applied
        finally:
            await client.aclose()

    asyncio.run(run())
    for kind, topic in ((SENSOR, "t.sensor"), (APPLOG, "t.applog")):
        progress = lib.hgetall(keys.progress_key(kind, 2))
        assert progress[keys.Progress.TOPIC] == topic
        assert progress[keys.Progress.OWNER] == "worker-7"
        assert progress[keys.Progress.OFFSET] == "9"
    progress = lib.hgetall(keys.progress_key(SENSOR, 3))
    assert progress[keys.Progress.TOPIC] == "" and progress[keys.Progress.OWNER] == ""
    # the registries are sorted sets scored by the entities' last-seen minute
    reg = cast(
        list[tuple[str, float]],
        lib.zrange(keys.entities_key(SENSOR, 2, keys.Dim.DEVICE), 0, -1, withscores=True),
    )
    assert {name for name, _ in reg} == {
        f"dev-{i}|{m}" for i in range(3) for m in ("temperature", "humidity")
    }
    assert all(score % MINUTE == 0 and score <= t0 + 10 * 4_000 for _, score in reg)
