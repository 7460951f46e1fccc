"""``pulse_apply`` (pipeline/store_functions.lua) against the real Valkey.

The function writes a partition's absolute window values (``schemas.packed``), entity registries
and progress in one atomic call, exactly once per expected offset. Two properties run through
this file:

* A malformed call leaves the store exactly as it was. Every case mutates the *last* element of
  an otherwise valid call (whose earlier blocks a check-as-you-go function would already have
  written) and compares a full snapshot of the store (every key's DUMP and absolute expiry)
  before and after; the reply must be an ``ERR pulse_apply: ...`` naming the problem.
* Driven through the real path (``process`` -> ``absorb`` -> ``StoreWriter.apply`` -> ``commit``,
  with a new owner restoring its windows from the store half-way), the store ends up holding
  exactly the values that aggregating every event at once gives.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import math
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import orjson
import pytest
import redis
import redis.asyncio as aioredis

from pipeline import windows
from pipeline.batch import (
    DEFAULT_PLAN,
    DEFAULT_RETENTION,
    BatchRules,
    PartitionBatch,
    PartitionState,
    Record,
    absorb,
    commit,
    process,
)
from pipeline.settings import Durability
from pipeline.stack.testing import RunningStack
from pipeline.state import WindowState
from pipeline.store_writer import (
    FUNCTION_NAME,
    MANY_FUNCTION_NAME,
    ApplyOutcome,
    StoreWriter,
    connect,
    function_source,
    payload,
)
from pipeline.validation import TimeBounds
from schemas import keys, packed, sketch
from schemas.events import EventKind

pytestmark = [pytest.mark.integration]

SENSOR, APPLOG = EventKind.SENSOR, EventKind.APPLOG
LATENESS_MS = 30_000
RULES = BatchRules(TimeBounds(7 * 86_400_000, 300_000), LATENESS_MS)
RETENTION = RULES.retention
assert RULES.plan is DEFAULT_PLAN and RETENTION is DEFAULT_RETENTION
MINUTE = keys.WINDOW_1M.size_ms
WINDOWS = {w.name: w for w in keys.TUMBLING_WINDOWS}
CHUNK = 500  # fields per HSET / members per ZADD in the function
C_STACK = 8000  # LUAI_MAXCSTACK: unpack() of more values than this fails
Snapshot = dict[bytes, tuple[bytes, int]]
Header = dict[str, Any]


def clock() -> int:
    """Wall clock, ms: read when needed, never fixed at import."""
    return time.time_ns() // 1_000_000


def minute_floor(t: int) -> int:
    return t - t % MINUTE


# ----------------------------------------------------------------- records


def sensor_event(device: str, metric: str, value: float, t: int, site: str = "site-oslo-1") -> Any:
    return {
        "schema_version": 1,
        "device_id": device,
        "site": site,
        "event_time": t,
        "metric": metric,
        "value": value,
        "unit": "C",
        "lat": 59.9,
        "lon": 10.7,
        "firmware": "1.0.0",
    }


def applog_event(service: str, route: str, status: int, latency: float, t: int, err: bool) -> Any:
    return {
        "schema_version": 1,
        "service": service,
        "route": route,
        "event_time": t,
        "level": "ERROR" if err else "INFO",
        "status_code": status,
        "latency_ms": latency,
        "trace_id": f"{t:032x}",
        "message": "ok",
    }


def sensor_records(first: int, count: int, t0: int) -> list[Record]:
    """Readings of 3 devices x 2 metrics, one every 4 s."""
    out = []
    for i in range(count):
        ev = sensor_event(
            f"dev-{i % 3}", ("temperature", "humidity")[i % 2], 10.0 + i, t0 + i * 4_000
        )
        out.append(Record(first + i, None, orjson.dumps(ev)))
    return out


def applog_records(first: int, count: int, t0: int) -> list[Record]:
    out = []
    for i in range(count):
        status = (200, 404, 503)[i % 3]
        ev = applog_event(
            f"svc-{i % 2}", "/api/items", status, 5.0 + i, t0 + i * 4_000, status > 499
        )
        out.append(Record(first + i, None, orjson.dumps(ev)))
    return out


@contextlib.asynccontextmanager
async def open_writer(
    stack: RunningStack, durability: Durability = Durability.LOCAL, **kw: Any
) -> AsyncIterator[StoreWriter]:
    """A writer on its own :func:`connect` client, closed with its connection afterwards
    (``StoreWriter.close`` leaves the pool, and so the connection, open)."""
    client = connect(stack.store_settings, socket_timeout_s=30.0)
    try:
        yield StoreWriter(client, durability, RETENTION, **kw)
    finally:
        await client.aclose(close_connection_pool=True)


def fresh_state(kind: EventKind, partition: int) -> PartitionState:
    """A partition with nothing in the store yet (its windows restored: none)."""
    return PartitionState(windows=WindowState(kind, partition, RULES.plan))


def run_batch(
    kind: EventKind, partition: int, records: list[Record], state: PartitionState, now: int
) -> PartitionBatch:
    """``process`` then ``absorb``: a batch ready to apply (the state runs ahead until commit)."""
    batch = process(kind, partition, records, state, RULES, now)
    if not batch.empty:
        absorb(state, batch, RULES)
    return batch


# ----------------------------------------------------------------- store access


@pytest.fixture
def lib(store: redis.Redis) -> redis.Redis:
    """The flushed store (decoded replies) with the ``pulse`` function library loaded."""
    # redis-py leaves execute_command unannotated
    store.execute_command("FUNCTION", "LOAD", "REPLACE", function_source())  # type: ignore[no-untyped-call]
    return store


@pytest.fixture
def raw(stack: RunningStack) -> Iterator[redis.Redis]:
    """A client that returns bytes (DUMP, packed values)."""
    client = redis.Redis(port=stack.store_settings.port, decode_responses=False)
    try:
        yield client
    finally:
        client.close()


def snapshot(raw: redis.Redis) -> Snapshot:
    """Every key's serialized value and absolute expiry (ms, -1 when none)."""
    names = sorted(raw.scan_iter(count=1000))
    pipe = raw.pipeline(transaction=False)
    for k in names:
        pipe.dump(k)
        # redis-py leaves execute_command unannotated
        pipe.execute_command("PEXPIRETIME", k)  # type: ignore[no-untyped-call]
    res = pipe.execute()
    return {k: (res[2 * i], int(res[2 * i + 1])) for i, k in enumerate(names)}


def put_back(raw: redis.Redis, snap: Snapshot) -> None:
    """Make the store hold exactly ``snap`` again (functions survive FLUSHALL)."""
    raw.flushall()
    pipe = raw.pipeline(transaction=False)
    for k, (dump, pexpire_at) in snap.items():
        pipe.restore(k, max(pexpire_at, 0), dump, absttl=pexpire_at > 0)
    pipe.execute()
    assert snapshot(raw) == snap


@dataclass
class Call:
    """One ``FCALL pulse_apply``: KEYS, the JSON header and the field/value arguments after it."""

    keys: list[str]
    header: Header
    args: list[bytes]
    text: bytes | None = None  # the header as sent, when it is not ``header`` (not JSON, say)

    @classmethod
    def of(cls, key_list: list[str], args: Sequence[bytes | str]) -> Call:
        """The call :func:`pipeline.store_writer.payload` builds."""
        rest = [a if isinstance(a, bytes) else a.encode() for a in args[1:]]
        return cls(key_list, orjson.loads(args[0]), rest)

    def send(self, r: redis.Redis) -> Any:
        text = orjson.dumps(self.header) if self.text is None else self.text
        # redis-py leaves execute_command unannotated
        return r.execute_command(  # type: ignore[no-untyped-call]
            "FCALL", FUNCTION_NAME, len(self.keys), *self.keys, text, *self.args
        )

    def key(self, section: str, i: int) -> str:
        """The key of block ``i`` of ``section`` (``h`` or ``e``)."""
        return self.keys[int(self.header[section][i][0]) - 1]


def packed_value(x: float, n: int = 1) -> bytes:
    """A sound packed sensor value: ``n`` readings of ``x``."""
    code = int(sketch.bucket_codes(np.array([x]))[0])
    table = packed.Table(
        np.array([[n, n * x, n * x * x, x, x]], dtype=np.float64),
        np.zeros(1, dtype=np.int64),
        np.array([code], dtype=np.int64),
        np.array([n], dtype=np.int64),
    )
    return packed.encode(table)[0]


def build_call(
    kind: EventKind = SENSOR,
    partition: int = 0,
    *,
    expect: int,
    offset: int,
    hashes: Sequence[tuple[str, int, Mapping[bytes, bytes]]] = (),
    registries: Sequence[tuple[str, list[Any]]] = (),
    **header: Any,
) -> Call:
    """A call written by hand: ``hashes`` (key, expire-at, fields), ``registries`` (key, pairs)."""
    key_list = [keys.progress_key(kind, partition)]
    args: list[bytes] = []
    h: list[list[int]] = []
    for k, expire_at, fields in hashes:
        key_list.append(k)
        h.append([len(key_list), expire_at, len(fields)])
        for f, v in fields.items():
            args += [f, v]
    e: list[list[Any]] = []
    for k, members in registries:
        key_list.append(k)
        e.append([len(key_list), members])
    body: Header = {
        "expect": expect,
        "offset": offset,
        "ev": 0,
        "late": 0,
        "dead": 0,
        "now": 1,
        "topic": "t",
        "owner": "w",
        "h": h,
        "e": e,
        "ecut": 0,
        "ecap": 100_000,
    }
    body.update(header)
    return Call(key_list, body, args)


def window_key(minute: int, dim: str = keys.Dim.DEVICE, partition: int = 0) -> str:
    return keys.window_key(SENSOR, partition, keys.WINDOW_1M, dim, minute * MINUTE)


def hash_bytes(raw: redis.Redis, key: str) -> dict[bytes, bytes]:
    return cast(dict[bytes, bytes], raw.hgetall(key))


def zmembers(r: redis.Redis, key: str) -> list[tuple[Any, float]]:
    """A sorted set's (member, score) pairs, lowest score first."""
    return cast(list[tuple[Any, float]], r.zrange(key, 0, -1, withscores=True))


def pexpiretime(raw: redis.Redis, key: str) -> int:
    # redis-py leaves execute_command unannotated
    return int(raw.execute_command("PEXPIRETIME", key))  # type: ignore[no-untyped-call]


# ----------------------------------------------------------------- a seeded store


@dataclass
class Seeded:
    """A store holding one applied sensor batch (partition 0), and the next batch's call."""

    r: redis.Redis
    state: PartitionState
    t0: int

    def next_call(self) -> Call:
        """The next batch as a valid call: several hash blocks (one rewriting a stored hash,
        the last holding at least two fields) and several registry blocks."""
        t = self.t0 + 160_000  # still in the last seeded minute, then into a new one
        state = copy.deepcopy(self.state)
        records = sensor_records(state.offset + 1, 20, t)
        batch = run_batch(SENSOR, 0, records, state, clock())
        key_list, args = payload(batch, RETENTION, clock(), topic="t.sensor", owner="w2")
        call = Call.of(key_list, args)
        h, e = call.header["h"], call.header["e"]
        assert len(h) >= 2 and len(e) >= 2 and h[-1][2] >= 2
        assert any(self.r.exists(call.key("h", i)) for i in range(len(h)))
        return call


@pytest.fixture
def seeded(lib: redis.Redis) -> Seeded:
    t0 = minute_floor(clock() - 10 * MINUTE)
    state = fresh_state(SENSOR, 0)
    batch = run_batch(SENSOR, 0, sensor_records(0, 40, t0), state, clock())
    call = Call.of(*payload(batch, RETENTION, clock(), topic="t.sensor", owner="w1"))
    assert call.send(lib) == [1, "39"]
    commit(state, batch)
    return Seeded(lib, state, t0)


def check_refused(r: redis.Redis, raw: redis.Redis, call: Call, expected: str) -> None:
    """The call is refused with ``ERR pulse_apply: ...expected...`` and nothing is written."""
    before = snapshot(raw)
    with pytest.raises(redis.ResponseError) as err:
        call.send(r)
    msg = str(err.value)
    assert msg.startswith("pulse_apply: ") and expected in msg, msg
    assert snapshot(raw) == before


def check_applies(r: redis.Redis, raw: redis.Redis, call: Call) -> None:
    before = snapshot(raw)
    assert call.send(r) == [1, str(call.header["offset"])]
    assert snapshot(raw) != before


# ----------------------------------------------------------------- malformed calls

Mutation = Callable[[Call], object]
DELETE = object()


def hdr(name: str, value: Any) -> Mutation:
    def mutate(c: Call) -> None:
        if value is DELETE:
            del c.header[name]
        else:
            c.header[name] = value

    return mutate


def block(section: str, i: int, value: Any) -> Mutation:
    """Set element ``i`` of the last block of ``section`` (DELETE: drop the block's tail)."""

    def mutate(c: Call) -> None:
        blk = c.header[section][-1]
        if value is DELETE:
            del blk[i:]
        else:
            blk[i] = value

    return mutate


def whole_block(section: str, value: Any) -> Mutation:
    def mutate(c: Call) -> None:
        c.header[section][-1] = value

    return mutate


def reuse_index(section: str, source: str) -> Mutation:
    """The last block of ``section`` names the key of the first block of ``source``."""

    def mutate(c: Call) -> None:
        c.header[section][-1][0] = c.header[source][0][0]

    return mutate


def index_beyond_keys(section: str) -> Mutation:
    def mutate(c: Call) -> None:
        c.header[section][-1][0] = len(c.keys) + 1

    return mutate


def members(fn: Callable[[list[Any]], object]) -> Mutation:
    """Change the (score, entity) pairs of the last registry block."""
    return lambda c: fn(c.header["e"][-1][1])


def n_by(delta: int) -> Mutation:
    def mutate(c: Call) -> None:
        c.header["h"][-1][2] += delta

    return mutate


def arg(i: int, value: bytes | Callable[[bytes], bytes]) -> Mutation:
    def mutate(c: Call) -> None:
        c.args[i] = value(c.args[i]) if callable(value) else value

    return mutate


def args_do(fn: Callable[[list[bytes]], object]) -> Mutation:
    return lambda c: fn(c.args)


def text(fn: Callable[[bytes], bytes]) -> Mutation:
    def mutate(c: Call) -> None:
        c.text = fn(orjson.dumps(c.header))

    return mutate


def number_text(name: str, literal: bytes) -> Mutation:
    """Header field ``name`` written as a JSON number orjson never writes (1e999: infinity)."""

    def mutate(c: Call) -> None:
        c.header[name] = 123456789
        body = orjson.dumps(c.header)
        assert body.count(b"123456789") == 1
        c.text = body.replace(b"123456789", literal)

    return mutate


def score_text(literal: bytes) -> Mutation:
    def mutate(c: Call) -> None:
        c.header["e"][-1][1] += [987654321, "dev-new"]
        body = orjson.dumps(c.header)
        assert body.count(b"987654321") == 1
        c.text = body.replace(b"987654321", literal)

    return mutate


def drop_last_key(c: Call) -> None:
    c.keys.pop()


MALFORMED: dict[str, tuple[Mutation, str]] = {
    # the header
    "header truncated": (text(lambda b: b[:-3]), "header is not JSON"),
    "header not JSON": (text(lambda _b: b"expect=3"), "header is not JSON"),
    "header nested too deep": (text(lambda _b: b"[" * 2000), "header is not JSON"),
    "header an array": (text(lambda _b: b"[1, 2]"), "expect must be an integer >= -1, got nil"),
    "header a number": (text(lambda _b: b"7"), "header must be a JSON object"),
    "header a string": (text(lambda _b: b'"x"'), "header must be a JSON object"),
    "header null": (text(lambda _b: b"null"), "header must be a JSON object"),
    "header empty": (text(lambda _b: b""), "header is not JSON"),
    "expect missing": (hdr("expect", DELETE), "expect must be an integer >= -1, got nil"),
    "expect a string": (hdr("expect", "39"), "expect must be an integer >= -1"),
    "expect fractional": (hdr("expect", 38.5), "expect must be an integer >= -1"),
    "expect below -1": (hdr("expect", -2), "expect must be an integer >= -1, got -2"),
    "expect null": (hdr("expect", None), "expect must be an integer >= -1"),
    "expect true": (hdr("expect", True), "expect must be an integer >= -1"),
    "expect beyond 2**53": (hdr("expect", 2**53 + 2), "expect must be an integer >= -1"),
    "expect infinite": (number_text("expect", b"1e999"), "expect must be an integer >= -1"),
    "offset missing": (hdr("offset", DELETE), "offset must be an integer"),
    "offset equal to expect": (hdr("offset", 39), "offset 39 must be greater than expect 39"),
    "offset below expect": (hdr("offset", 3), "offset 3 must be greater than expect 39"),
    "offset a string": (hdr("offset", "59"), "offset must be an integer"),
    "offset infinite": (number_text("offset", b"1e999"), "offset must be an integer"),
    "offset NaN": (number_text("offset", b"NaN"), "offset must be an integer"),
    "ev negative": (hdr("ev", -1), "ev must be an integer >= 0"),
    "ev missing": (hdr("ev", DELETE), "ev must be an integer >= 0"),
    "late fractional": (hdr("late", 0.5), "late must be an integer >= 0"),
    "dead a string": (hdr("dead", "1"), "dead must be an integer >= 0"),
    "now missing": (hdr("now", DELETE), "now must be an integer >= 0"),
    "now negative": (hdr("now", -5), "now must be an integer >= 0"),
    "topic missing": (hdr("topic", DELETE), "topic must be a string"),
    "topic a number": (hdr("topic", 3), "topic must be a string"),
    "owner null": (hdr("owner", None), "owner must be a string"),
    "owner an array": (hdr("owner", ["w"]), "owner must be a string"),
    "mx without wm": (hdr("wm", DELETE), "mx and wm must be given together"),
    "wm without mx": (hdr("mx", DELETE), "mx and wm must be given together"),
    "mx fractional": (hdr("mx", 0.5), "mx must be an integer"),
    "wm a string": (hdr("wm", "0"), "wm must be an integer"),
    "h missing": (hdr("h", DELETE), "h must be an array"),
    "h a string": (hdr("h", "x"), "h must be an array"),
    "h an object": (hdr("h", {"1": [2, 1, 1]}), "h must be an array"),
    "e missing": (hdr("e", DELETE), "e must be an array"),
    "e a number": (hdr("e", 5), "e must be an array"),
    "ecut missing": (hdr("ecut", DELETE), "ecut must be an integer"),
    "ecut fractional": (hdr("ecut", 0.5), "ecut must be an integer"),
    "ecap zero": (hdr("ecap", 0), "ecap must be an integer >= 1"),
    "ecap missing": (hdr("ecap", DELETE), "ecap must be an integer >= 1"),
    # hash blocks (the last one)
    "h block not an array": (whole_block("h", 5), "a block must be an array of 3 elements"),
    "h block an object": (whole_block("h", {"k": 2}), "a block must be an array of 3 elements"),
    "h block too short": (block("h", 2, DELETE), "a block must be an array of 3 elements"),
    "h block too long": (lambda c: c.header["h"][-1].append(1), "an array of 3 elements"),
    "h block flagged other than replace": (
        lambda c: c.header["h"][-1].append("merge"),
        "an array of 3 elements",
    ),
    "h block replace and more": (
        lambda c: c.header["h"][-1].extend(["replace", 1]),
        "an array of 3 elements",
    ),
    "h key index of the progress hash": (block("h", 0, 1), "key index 1 is not within 2.."),
    "h key index 0": (block("h", 0, 0), "key index 0 is not within 2.."),
    "h key index beyond KEYS": (index_beyond_keys("h"), "is not within 2.."),
    "h key index fractional": (block("h", 0, 2.5), "key index 2.5 is not within 2.."),
    "h key index a string": (block("h", 0, "2"), "key index 2 is not within 2.."),
    "h key index null": (block("h", 0, None), "is not within 2.."),
    "h key index used twice": (reuse_index("h", "h"), "is used twice"),
    "h key index used by a registry": (reuse_index("h", "e"), "is used twice"),
    "h expire-at fractional": (block("h", 1, 1.5), "expire-at must be an integer"),
    "h expire-at a string": (block("h", 1, "1900000000"), "expire-at must be an integer"),
    "h expire-at null": (block("h", 1, None), "expire-at must be an integer"),
    "h n zero": (block("h", 2, 0), "n must be an integer >= 1"),
    "h n negative": (block("h", 2, -1), "n must be an integer >= 1"),
    "h n fractional": (block("h", 2, 1.5), "n must be an integer >= 1"),
    "h n a string": (block("h", 2, "2"), "n must be an integer >= 1"),
    "h n one too many": (n_by(1), "field/value pairs, the call has"),
    "h n one too few": (n_by(-1), "the header accounts for"),
    "h n huge": (block("h", 2, 2**52), "field/value pairs, the call has"),
    # the argument count
    "an extra argument": (args_do(lambda a: a.append(b"x")), "the header accounts for"),
    "an extra pair": (
        args_do(lambda a: a.extend([b"dev-9|temperature", packed_value(1.0)])),
        "the header accounts for",
    ),
    "the last value missing": (args_do(lambda a: a.pop()), "field/value pairs, the call has"),
    "no field/value pairs": (args_do(lambda a: a.clear()), "field/value pairs, the call has"),
    # field/value pairs: the last one
    "last field empty": (arg(-2, b""), "is empty"),
    "last value empty": (arg(-1, b""), "is not a packed value"),
    "last value 7 bytes": (arg(-1, lambda v: v[:7]), "is not a packed value"),
    "last value version 0": (arg(-1, lambda v: b"\x00" + v[1:]), "is not a packed value"),
    "last value version 2": (arg(-1, lambda v: b"\x02" + v[1:]), "is not a packed value"),
    "last value the old stats text": (arg(-1, b"1 2.0 4.0 2.0 2.0"), "is not a packed value"),
    "last value JSON": (arg(-1, b'{"n": 1, "sum": 2.0}'), "is not a packed value"),
    # a bundle ("@<offset>" fields only, version 2)
    "last field a bundle's, its value a packed value": (
        arg(-2, b"@7"),
        "is not a bundle of packed values",
    ),
    "last value a bundle in an entity's field": (
        arg(-1, lambda v: packed.encode_bundle(["dev-9|temperature"], [v], 5)),
        "is not a packed value",
    ),
    "last field a bundle's, its value 11 bytes": (
        lambda c: (arg(-2, b"@7")(c), arg(-1, lambda v: b"\x02" + v[1:11])(c)),
        "is not a bundle of packed values",
    ),
    # entity-registry blocks (the last one)
    "e block not an array": (whole_block("e", "x"), "a block must be an array of 2 elements"),
    "e block too short": (block("e", 1, DELETE), "a block must be an array of 2 elements"),
    "e block too long": (lambda c: c.header["e"][-1].append([]), "an array of 2 elements"),
    "e key index of the progress hash": (block("e", 0, 1), "key index 1 is not within 2.."),
    "e key index beyond KEYS": (index_beyond_keys("e"), "is not within 2.."),
    "e key index used twice": (reuse_index("e", "e"), "is used twice"),
    "e key index used by a hash": (reuse_index("e", "h"), "is used twice"),
    "e members not an array": (block("e", 1, "x"), "needs (score, entity) pairs"),
    "e members empty": (block("e", 1, []), "needs (score, entity) pairs"),
    "e members odd": (members(lambda m: m.append(60_000)), "needs (score, entity) pairs"),
    "e score fractional": (members(lambda m: m.extend([1.5, "x"])), "score 1.5 is not"),
    "e score a string": (members(lambda m: m.extend(["60000", "x"])), "score 60000 is not"),
    "e score null": (members(lambda m: m.extend([None, "x"])), "is not an integer"),
    "e score infinite": (score_text(b"1e999"), "score inf is not an integer"),
    "e score -infinite": (score_text(b"-1e999"), "score -inf is not an integer"),
    "e entity a number": (members(lambda m: m.extend([60_000, 4])), "is not a name"),
    "e entity empty": (members(lambda m: m.extend([60_000, ""])), "is not a name"),
    "e entity null": (members(lambda m: m.extend([60_000, None])), "is not a name"),
    # KEYS
    "a key missing": (drop_last_key, "is not within 2.."),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_call_writes_nothing(seeded: Seeded, raw: redis.Redis, case: str) -> None:
    mutate, expected = MALFORMED[case]
    call = seeded.next_call()
    mutate(call)
    check_refused(seeded.r, raw, call, expected)
    # the same call without the malformation applies
    check_applies(seeded.r, raw, seeded.next_call())


def test_a_bundle_is_set_as_given(seeded: Seeded, raw: redis.Redis) -> None:
    """A field "@<offset>" holding a bundle of packed values is set like any other."""
    call = seeded.next_call()
    bundle = packed.encode_bundle(["dev-9|temperature"], [call.args[-1]], 5)
    arg(-2, b"@7")(call)
    arg(-1, bundle)(call)
    check_applies(seeded.r, raw, call)
    assert raw.hget(call.key("h", len(call.header["h"]) - 1), "@7") == bundle


def test_a_replace_block_leaves_the_hash_holding_its_fields_alone(
    seeded: Seeded, raw: redis.Redis
) -> None:
    """A hash block flagged "replace" (a closed instance sealed as one bundle) makes the hash
    exactly its fields; the other blocks still set theirs."""
    call = seeded.next_call()
    h = call.header["h"]
    key = call.key("h", 0)
    raw.hset(key, "dev-zz|old", packed_value(1.0))  # a field the block does not hold
    others = {call.key("h", i): raw.hgetall(call.key("h", i)) for i in range(1, len(h))}
    h[0].append("replace")
    check_applies(seeded.r, raw, call)
    pairs = call.args[: 2 * h[0][2]]
    assert raw.hgetall(key) == dict(zip(pairs[::2], pairs[1::2], strict=True))
    for k, before in others.items():  # set in, not replaced: every field they held stays
        assert set(before) <= set(raw.hgetall(k))


def test_no_keys_or_no_arguments_are_refused(seeded: Seeded, raw: redis.Redis) -> None:
    r = seeded.r
    before = snapshot(raw)
    for argv, expected in (
        ([0, "{}"], "no keys: KEYS[1] must be the progress hash"),
        ([0], "no keys"),
        ([1, keys.progress_key(SENSOR, 0)], "expected a JSON header first"),
    ):
        with pytest.raises(redis.ResponseError) as err:
            # redis-py leaves execute_command unannotated
            r.execute_command("FCALL", FUNCTION_NAME, *argv)  # type: ignore[no-untyped-call]
        assert str(err.value).startswith("pulse_apply: ") and expected in str(err.value)
    assert snapshot(raw) == before


# ----------------------------------------------------------------- what is stored already

StoredSetup = Callable[[redis.Redis, Call], object]


def replace_key(
    target: Callable[[Call], str], make: Callable[[redis.Redis, str], Any]
) -> StoredSetup:
    def setup(r: redis.Redis, c: Call) -> None:
        k = target(c)
        r.delete(k)
        make(r, k)

    return setup


def last_hash(c: Call) -> str:
    return c.key("h", -1)


def last_registry(c: Call) -> str:
    return c.key("e", -1)


def progress(c: Call) -> str:
    return c.keys[0]


STORED: dict[str, tuple[StoredSetup, str]] = {
    "window key holds a string": (
        replace_key(last_hash, lambda r, k: r.set(k, "x")),
        "holds a string, not a hash",
    ),
    "window key holds a list": (
        replace_key(last_hash, lambda r, k: r.rpush(k, "x")),
        "holds a list, not a hash",
    ),
    "window key holds a sorted set": (
        replace_key(last_hash, lambda r, k: r.zadd(k, {"x": 1})),
        "holds a zset, not a hash",
    ),
    "window key holds a set": (
        replace_key(last_hash, lambda r, k: r.sadd(k, "x")),
        "holds a set, not a hash",
    ),
    "registry holds a hash": (
        replace_key(last_registry, lambda r, k: r.hset(k, "x", "1")),
        "holds a hash, not a sorted set",
    ),
    "registry holds a string": (
        replace_key(last_registry, lambda r, k: r.set(k, "x")),
        "holds a string, not a sorted set",
    ),
    "registry holds a list": (
        replace_key(last_registry, lambda r, k: r.rpush(k, "x")),
        "holds a list, not a sorted set",
    ),
    "progress holds a string": (
        replace_key(progress, lambda r, k: r.set(k, "39")),
        "WRONGTYPE",
    ),
    "stored events not an integer": (
        lambda r, c: r.hset(progress(c), "events", "many"),
        "stored progress field events is not an integer",
    ),
    "stored batches fractional": (
        lambda r, c: r.hset(progress(c), "batches", "1.5"),
        "stored progress field batches is not an integer",
    ),
    "stored late beyond 2**53": (
        lambda r, c: r.hset(progress(c), "late", str(2**60)),
        "stored progress field late is not an integer",
    ),
    "events would pass 2**53": (
        lambda r, c: r.hset(progress(c), "batches", str(2**53)),
        "progress field batches would pass 2^53",
    ),
}


@pytest.mark.parametrize("case", list(STORED))
def test_bad_stored_keys_are_refused_before_writing(
    seeded: Seeded, raw: redis.Redis, case: str
) -> None:
    """A key of the wrong type, or a progress counter the call cannot add to: no write either."""
    setup, expected = STORED[case]
    call = seeded.next_call()
    good = snapshot(raw)
    setup(seeded.r, call)
    check_refused(seeded.r, raw, call, expected)
    put_back(raw, good)
    check_applies(seeded.r, raw, call)


def hash_and_registry_on_one_key(s: Seeded) -> Call:
    """The last hash's key (a new window, not stored yet) given again as the last registry's:
    phase 1 sees ``none`` for both, then HSET makes it a hash and the ZADD on it fails
    half-way (a bare WRONGTYPE; the other hashes are written, the offset is not)."""
    c = s.next_call()
    c.keys[c.header["e"][-1][0] - 1] = c.key("h", -1)
    return c


def hash_on_the_progress_key(s: Seeded) -> Call:
    """Accepted: packed values land in the progress hash, and it gets the window's expiry (the
    partition's applied offset would expire with it)."""
    c = s.next_call()
    c.keys[c.header["h"][-1][0] - 1] = c.keys[0]
    return c


def registry_on_a_new_progress_key(_s: Seeded) -> Call:
    """A partition with no progress yet: ZADD makes its progress key a sorted set, the final
    HSET fails, and every later call on the partition fails (WRONGTYPE) for good."""
    c = build_call(partition=7, expect=-1, offset=0, registries=[("x", [60_000, "a"])])
    c.keys[1] = c.keys[0]
    return c


ALIASES: dict[str, Callable[[Seeded], Call]] = {
    "a hash and a registry on one key": hash_and_registry_on_one_key,
    "a hash on the progress key": hash_on_the_progress_key,
    "a registry on a new progress key": registry_on_a_new_progress_key,
}


@pytest.mark.parametrize("case", list(ALIASES))
def test_one_key_named_twice_is_refused(seeded: Seeded, raw: redis.Redis, case: str) -> None:
    call = ALIASES[case](seeded)
    before = snapshot(raw)
    try:
        call.send(seeded.r)
    except redis.ResponseError as err:
        assert str(err).startswith("pulse_apply: "), str(err)
        assert "is named twice" in str(err), str(err)
    else:
        raise AssertionError("a call naming one key for two blocks was accepted")
    finally:
        after = snapshot(raw)
    assert after == before


# ----------------------------------------------------------------- fuzzing

FUZZ_VALUES: list[Any] = [
    None,
    True,
    False,
    0,
    1,
    2,
    3,
    -1,
    -2,
    0.5,
    1.5,
    39,
    40,
    2**53,
    2**53 + 2,
    -(2**53) - 2,
    "",
    "x",
    "2",
    [],
    [2],
    [2, 3, 1],
    [[2, 1, 1]],
    {},
    {"a": 1},
]


def _paths(node: Any, at: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out: list[tuple[Any, ...]] = [at] if at else []
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*at, k))
    elif isinstance(node, list):
        for i, v in enumerate(node[:6]):  # a block's head; members beyond add nothing new
            out += _paths(v, (*at, i))
    return out


def _fuzz_header(rng: random.Random, header: Header) -> None:
    path = rng.choice(_paths(header))
    parent: Any = header
    for step in path[:-1]:
        parent = parent[step]
    last = path[-1]
    if rng.random() < 0.15:
        del parent[last]
    else:
        parent[last] = copy.deepcopy(rng.choice(FUZZ_VALUES))


def _fuzz_args(rng: random.Random, args: list[bytes]) -> None:
    junk = rng.choice(
        [b"", b"x", b"\x01" * 7, b"\x01" * 8, b"\x02" * 12, packed_value(2.0), b"dev-0|humidity"]
    )
    i = rng.randrange(len(args) + 1)
    op = rng.randrange(3)
    if op == 0 and args:
        del args[min(i, len(args) - 1)]
    elif op == 1:
        args.insert(i, junk)
    elif args:
        args[min(i, len(args) - 1)] = junk


def _fuzz_text(rng: random.Random, body: bytes) -> bytes:
    i = rng.randrange(len(body))
    op = rng.randrange(3)
    if op == 0:
        return body[:i]
    if op == 1:
        return body[:i] + bytes([rng.randrange(256)]) + body[i + 1 :]
    return body[:i] + rng.choice([b",", b"]", b"}", b"-", b"9", b'"', b"e9"]) + body[i:]


def fuzzed(rng: random.Random, call: Call) -> Call:
    c = copy.deepcopy(call)
    for _ in range(rng.randint(1, 3)):
        roll = rng.random()
        if roll < 0.55:
            _fuzz_header(rng, c.header)
        elif roll < 0.8:
            _fuzz_args(rng, c.args)
        elif roll < 0.88:
            if rng.random() < 0.5:
                c.keys.pop()
            else:  # an unrelated key no block names: harmless
                c.keys.append(keys.window_key(SENSOR, 0, keys.WINDOW_1M, "spare", 0))
        else:
            c.text = _fuzz_text(rng, orjson.dumps(c.header) if c.text is None else c.text)
    return c


def sent_header(call: Call) -> Header | None:
    """The header as the function reads it, when Python reads it alike (None: unsure)."""
    if call.text is None:
        return call.header
    try:
        body = orjson.loads(call.text)
    except orjson.JSONDecodeError:
        return None
    return body if isinstance(body, dict) else None


def test_fuzzed_calls_are_refused_whole_or_applied_whole(seeded: Seeded, raw: redis.Redis) -> None:
    """Random damage to the header, its text, the arguments and KEYS: each reply is either an
    ``ERR pulse_apply: ...`` with the store untouched, a refused expectation with the store
    untouched, or an apply of a call that is still sound (then the store is put back)."""
    rng = random.Random(20240808)
    good = seeded.next_call()
    base = snapshot(raw)
    outcomes: Counter[str] = Counter()
    for i in range(400):
        call = fuzzed(rng, good)
        where = f"fuzz case {i}: keys={call.keys} header={call.text or orjson.dumps(call.header)!r}"
        try:
            reply = call.send(seeded.r)
        except redis.ResponseError as err:
            assert str(err).startswith("pulse_apply: "), f"{where}: {err}"
            assert snapshot(raw) == base, where
            outcomes["refused"] += 1
            continue
        assert isinstance(reply, list) and len(reply) == 2, where
        sent = sent_header(call)
        if reply[0] == 0:
            assert reply[1] == "39", where
            assert sent is None or sent.get("expect") != 39, where
            assert snapshot(raw) == base, where
            outcomes["expectation"] += 1
            continue
        assert reply[0] == 1, where
        assert sent is None or (sent.get("expect") == 39 and sent.get("offset") == int(reply[1])), (
            where
        )
        assert seeded.r.hget(call.keys[0], "offset") == reply[1], where
        outcomes["applied"] += 1
        put_back(raw, base)
    assert outcomes["refused"] >= 300, outcomes
    assert outcomes["expectation"] + outcomes["applied"] > 0, outcomes


# ----------------------------------------------------------------- exactly once


def test_an_expectation_mismatch_writes_nothing(seeded: Seeded, raw: redis.Redis) -> None:
    r = seeded.r
    call = seeded.next_call()
    before = snapshot(raw)
    for expect in (-1, 0, 38, 40, 1000):
        stale = copy.deepcopy(call)
        stale.header["expect"] = expect
        stale.header["offset"] = max(expect + 1, call.header["offset"])
        assert stale.send(r) == [0, "39"]
        assert snapshot(raw) == before
    # a partition nothing was applied to yet answers -1
    other = build_call(partition=5, expect=7, offset=9)
    assert other.send(r) == [0, "-1"]
    assert snapshot(raw) == before
    check_applies(r, raw, call)


def test_a_redelivered_call_counts_once(seeded: Seeded, raw: redis.Redis) -> None:
    """A reply lost on the way back: the writer cannot tell, re-sends, and is told it's done."""
    r = seeded.r
    call = seeded.next_call()
    assert call.send(r) == [1, "59"]
    after = snapshot(raw)
    for _ in range(3):
        assert call.send(r) == [0, "59"]
        assert snapshot(raw) == after
    stats = r.hgetall(keys.progress_key(SENSOR, 0))
    assert stats["batches"] == "2" and stats["events"] == "60"


def test_redelivered_records_are_not_sent_again(
    stack: RunningStack, lib: redis.Redis, raw: redis.Redis
) -> None:
    """Kafka redelivers from the committed position: records at or below the applied offset are
    dropped by ``process``, and a batch of nothing new never reaches the store."""
    t0 = minute_floor(clock() - 5 * MINUTE)

    async def run() -> None:
        async with open_writer(stack, Durability.NONE, owner="w") as writer:
            state = fresh_state(SENSOR, 0)
            records = sensor_records(0, 30, t0)
            batch = run_batch(SENSOR, 0, records[:20], state, clock())
            (o,), _ = await writer.apply([batch], clock())
            assert o == ApplyOutcome(0, True, 19)
            commit(state, batch)
            before = snapshot(raw)
            again = run_batch(SENSOR, 0, records[:20], state, clock())
            assert again.empty and await writer.apply([again], clock()) == ([], 0.0)
            assert snapshot(raw) == before
            # overlapping: only offsets 20..29 count
            rest = run_batch(SENSOR, 0, records[10:], state, clock())
            assert (rest.expect_offset, rest.last_offset, rest.events) == (19, 29, 10)
            (o,), _ = await writer.apply([rest], clock())
            assert o.applied
            commit(state, rest)

    asyncio.run(run())
    stats = lib.hgetall(keys.progress_key(SENSOR, 0))
    assert (stats["offset"], stats["events"], stats["batches"]) == ("29", "30", "2")


# ----------------------------------------------------------------- progress


def test_the_applied_offset_and_counters(lib: redis.Redis, raw: redis.Redis) -> None:
    r = lib
    prog = keys.progress_key(SENSOR, 0)
    first = build_call(
        expect=-1,
        offset=9,
        ev=7,
        late=2,
        dead=1,
        now=1_000,
        mx=500_000,
        wm=470_000,
        topic="t.sensor",
        owner="w1",
    )
    assert first.send(r) == [1, "9"]
    assert r.hgetall(prog) == {
        "offset": "9",
        "events": "7",
        "late": "2",
        "dead": "1",
        "batches": "1",
        "updated_ms": "1000",
        "max_event_time": "500000",
        "watermark": "470000",
        "topic": "t.sensor",
        "owner": "w1",
    }
    # a batch of dead letters only: no mx/wm, so the stored ones stay
    second = build_call(expect=9, offset=12, dead=3, now=2_000, topic="t.sensor2", owner="w2")
    assert second.send(r) == [1, "12"]
    # refused and mismatched calls count nothing
    with pytest.raises(redis.ResponseError):
        build_call(expect=12, offset=13, ev=-1).send(r)
    assert build_call(expect=9, offset=20, ev=100).send(r) == [0, "12"]
    third = build_call(expect=12, offset=2**53, ev=5, late=1, now=3_000, mx=600_000, wm=570_000)
    assert third.send(r) == [1, str(2**53)]
    assert r.hgetall(prog) == {
        "offset": str(2**53),
        "events": "12",
        "late": "3",
        "dead": "4",
        "batches": "3",
        "updated_ms": "3000",
        "max_event_time": "600000",
        "watermark": "570000",
        "topic": "t",
        "owner": "w",
    }
    assert pexpiretime(raw, prog) == -1


def test_the_writer_stores_topic_and_owner(stack: RunningStack, lib: redis.Redis) -> None:
    """StoreWriter passes the kind's topic name and its owner; each apply records both."""
    t0 = minute_floor(clock() - 5 * MINUTE)

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
            s_state, a_state = fresh_state(SENSOR, 2), fresh_state(APPLOG, 2)
            batches = [
                run_batch(SENSOR, 2, sensor_records(0, 10, t0), s_state, clock()),
                run_batch(APPLOG, 2, applog_records(0, 10, t0), a_state, clock()),
            ]
            outcomes, _ = await writer.apply(batches, clock())
            assert [o.applied for o in outcomes] == [True, True]
            anonymous = StoreWriter(client, Durability.LOCAL, RETENTION)
            b = run_batch(SENSOR, 3, sensor_records(0, 5, t0), fresh_state(SENSOR, 3), clock())
            (outcome,), _ = await anonymous.apply([b], clock())
            assert outcome.applied
        finally:
            await client.aclose()

    asyncio.run(run())
    for kind, topic in ((SENSOR, "t.sensor"), (APPLOG, "t.applog")):
        stats = lib.hgetall(keys.progress_key(kind, 2))
        assert stats[keys.Progress.TOPIC] == topic
        assert stats[keys.Progress.OWNER] == "worker-7"
        assert stats[keys.Progress.OFFSET] == "9"
    stats = lib.hgetall(keys.progress_key(SENSOR, 3))
    assert stats[keys.Progress.TOPIC] == "" and stats[keys.Progress.OWNER] == ""
    # the registries are sorted sets scored by the entities' last-seen minute
    reg = zmembers(lib, keys.entities_key(SENSOR, 2, keys.Dim.DEVICE))
    assert {name for name, _ in reg} == {
        f"dev-{i}|{m}" for i in range(3) for m in ("temperature", "humidity")
    }
    assert all(score % MINUTE == 0 and t0 <= score <= t0 + 10 * 4_000 for _, score in reg)


# ----------------------------------------------------------------- hashes


def test_values_are_absolute_and_expiry_is_set_on_each_hash(
    lib: redis.Redis, raw: redis.Redis
) -> None:
    """What a call sets is what is stored (no merge), and each hash gets its EXPIREAT; a later
    call sets the later expiry it carries. Progress and registries never expire."""
    r = lib
    a, b = window_key(1), window_key(2)
    far = clock() // 1000 + 86_400
    one = build_call(
        expect=-1,
        offset=0,
        hashes=[
            (a, far, {b"x": packed_value(1.0, 3), b"y": packed_value(2.0)}),
            (b, far + 1, {b"x": packed_value(5.0)}),
        ],
        registries=[(keys.entities_key(SENSOR, 0, keys.Dim.DEVICE), [60_000, "x"])],
    )
    assert one.send(r) == [1, "0"]
    assert hash_bytes(raw, a) == {b"x": packed_value(1.0, 3), b"y": packed_value(2.0)}
    assert hash_bytes(raw, b) == {b"x": packed_value(5.0)}
    assert (pexpiretime(raw, a), pexpiretime(raw, b)) == (far * 1000, (far + 1) * 1000)
    two = build_call(expect=0, offset=1, hashes=[(a, far + 600, {b"x": packed_value(-4.0, 2)})])
    assert two.send(r) == [1, "1"]
    assert hash_bytes(raw, a) == {b"x": packed_value(-4.0, 2), b"y": packed_value(2.0)}
    assert pexpiretime(raw, a) == (far + 600) * 1000
    assert pexpiretime(raw, b) == (far + 1) * 1000
    assert pexpiretime(raw, keys.entities_key(SENSOR, 0, keys.Dim.DEVICE)) == -1
    assert pexpiretime(raw, keys.progress_key(SENSOR, 0)) == -1


def test_a_real_batch_sets_each_hash_and_its_expiry(lib: redis.Redis, raw: redis.Redis) -> None:
    """Through ``payload``: every HashWrite lands whole, with its retention's expiry."""
    t0 = minute_floor(clock() - 20 * MINUTE)
    for kind, records in ((SENSOR, sensor_records(0, 60, t0)), (APPLOG, applog_records(0, 60, t0))):
        state = fresh_state(kind, 4)
        batch = run_batch(kind, 4, records, state, clock())
        windows_used = {keys.parse_window_key(w.key)[2] for w in batch.writes}
        assert windows_used == {"10s", "1m"} and len(batch.writes) > 10
        call = Call.of(*payload(batch, RETENTION, clock(), topic="t", owner="w"))
        assert call.send(lib) == [1, "59"]
        for w in batch.writes:
            assert hash_bytes(raw, w.key) == dict(
                zip([f.encode() for f in w.fields], w.values, strict=True)
            )
            _, _, wname, _, start = keys.parse_window_key(w.key)
            assert w.expire_at_s == RETENTION.expire_at_s(WINDOWS[wname], start)
            assert pexpiretime(raw, w.key) == w.expire_at_s * 1000


@pytest.mark.parametrize("n", [CHUNK - 1, CHUNK, CHUNK + 1, 1200, C_STACK // 2 + 1, 5000])
def test_large_hashes_and_registries_are_written_in_chunks(
    lib: redis.Redis, raw: redis.Redis, n: int
) -> None:
    """One hash of ``n`` fields and one registry of ``n`` members; past 500 the function chunks,
    and past 4000 (8000 values) an unchunked unpack() would overflow Lua's C stack."""
    far = clock() // 1000 + 3600
    fields = {f"dev-{i}|temperature".encode(): packed_value(float(i), 1 + i % 7) for i in range(n)}
    flat: list[Any] = []
    for i in range(n):
        flat += [(1 + i % 11) * MINUTE, f"dev-{i}|temperature"]
    small = {b"x": packed_value(1.0)}
    reg = keys.entities_key(SENSOR, 0, keys.Dim.DEVICE)
    call = build_call(
        expect=-1,
        offset=0,
        hashes=[(window_key(1), far, small), (window_key(2), far + 1, fields)],
        registries=[(reg, flat)],
    )
    assert len(call.args) == 2 * n + 2
    assert call.send(lib) == [1, "0"]
    assert hash_bytes(raw, window_key(1)) == small
    assert hash_bytes(raw, window_key(2)) == fields
    assert pexpiretime(raw, window_key(2)) == (far + 1) * 1000
    stored = dict(zmembers(lib, reg))
    assert stored == {f"dev-{i}|temperature": float((1 + i % 11) * MINUTE) for i in range(n)}


def test_a_batch_of_1200_entities_goes_whole(stack: RunningStack, raw: redis.Redis) -> None:
    """The real path: 1200 devices in one minute (a 1200-field hash, 1200 registrations)."""
    raw.flushall()
    t = minute_floor(clock() - 3 * MINUTE) + 1_000
    records = [
        Record(i, None, orjson.dumps(sensor_event(f"dev-{i}", "temperature", i / 7, t + i)))
        for i in range(1200)
    ]
    state = fresh_state(SENSOR, 0)

    async def run() -> PartitionBatch:
        async with open_writer(stack) as writer:
            batch = run_batch(SENSOR, 0, records, state, clock())
            (o,), _ = await writer.apply([batch], clock())
            assert o.applied
            return batch

    batch = asyncio.run(run())
    big = [w for w in batch.writes if len(w.fields) == 1200]
    assert [keys.parse_window_key(w.key)[3] for w in big] == [keys.Dim.DEVICE]
    for w in batch.writes:
        assert hash_bytes(raw, w.key) == dict(
            zip([f.encode() for f in w.fields], w.values, strict=True)
        )
    assert raw.zcard(keys.entities_key(SENSOR, 0, keys.Dim.DEVICE)) == 1200


# ----------------------------------------------------------------- a poll in one call


def poll_calls(now: int) -> list[Call]:
    """The calls of one poll of three partitions (two sensor, one applog), nothing applied yet."""
    t = minute_floor(clock() - 5 * MINUTE)
    parts = [
        (SENSOR, 0, sensor_records(0, 30, t)),
        (SENSOR, 1, sensor_records(0, 25, t + 1_000)),
        (APPLOG, 0, applog_records(0, 20, t)),
    ]
    calls = []
    for kind, p, records in parts:
        batch = run_batch(kind, p, records, fresh_state(kind, p), now)
        calls.append(Call.of(*payload(batch, RETENTION, now, topic="t", owner="w")))
    return calls


def send_many(r: redis.Redis, calls: Sequence[Call], counts: Any = None) -> Any:
    """One ``FCALL pulse_apply_many`` of ``calls`` (``counts``: the split sent, if not theirs)."""
    key_list = [k for c in calls for k in c.keys]
    args = [a for c in calls for a in (orjson.dumps(c.header), *c.args)]
    split = [[len(c.keys), 1 + len(c.args)] for c in calls] if counts is None else counts
    text = split if isinstance(split, bytes) else orjson.dumps(split)
    # redis-py leaves execute_command unannotated
    return r.execute_command(  # type: ignore[no-untyped-call]
        "FCALL", MANY_FUNCTION_NAME, len(key_list), *key_list, text, *args
    )


def test_one_call_for_a_poll_writes_what_one_call_per_partition_writes(
    lib: redis.Redis, raw: redis.Redis
) -> None:
    calls = poll_calls(clock())
    for c in calls:
        assert c.send(lib) == [1, str(c.header["offset"])]
    apart = snapshot(raw)
    raw.flushdb()
    replies = send_many(lib, calls)
    assert replies == [[1, str(c.header["offset"])] for c in calls]
    assert snapshot(raw) == apart
    # sent again (a lost reply): every partition answers that it holds it, nothing changes
    assert send_many(lib, calls) == [[0, str(c.header["offset"])] for c in calls]
    assert snapshot(raw) == apart


def test_a_refused_or_stale_partition_leaves_the_others_applied(
    lib: redis.Redis, raw: redis.Redis
) -> None:
    stale, refused, fresh = poll_calls(clock())
    assert stale.send(lib) == [1, str(stale.header["offset"])]
    raw.set(refused.key("h", 0), b"not a hash")
    before = snapshot(raw)
    replies = send_many(lib, [stale, refused, fresh])
    assert replies[0] == [0, str(stale.header["offset"])]
    assert isinstance(replies[1], redis.ResponseError)
    assert str(replies[1]).startswith("pulse_apply: ") and "holds a string" in str(replies[1])
    assert replies[2] == [1, str(fresh.header["offset"])]
    changed = {k for k in set(before) | set(snapshot(raw)) if before.get(k) != snapshot(raw).get(k)}
    assert changed and all(
        b"{" + keys.partition_tag(APPLOG, 0).encode() + b"}" in k for k in changed
    )


def test_the_writer_reports_each_partition_of_one_call(
    stack: RunningStack, lib: redis.Redis, raw: redis.Redis
) -> None:
    """Through ``StoreWriter.send``: one outcome per batch, a refused one among applied ones."""
    now = clock()
    t = minute_floor(now - 5 * MINUTE)
    states = {p: fresh_state(SENSOR, p) for p in range(3)}
    batches = [run_batch(SENSOR, p, sensor_records(0, 12, t), states[p], now) for p in range(3)]
    raw.set(batches[1].writes[0].key, b"not a hash")

    async def run() -> list[ApplyOutcome]:
        async with open_writer(stack) as writer:
            outcomes, _ = await writer.apply(batches, now)
            return outcomes

    first, refused, last = asyncio.run(run())
    assert (first.partition, first.applied, first.store_offset) == (0, True, 11)
    assert (last.partition, last.applied, last.store_offset) == (2, True, 11)
    assert refused.partition == 1 and not refused.applied
    assert refused.refused is not None and "holds a string" in refused.refused
    assert not raw.exists(keys.progress_key(SENSOR, 1))


# a split as sent (None: the calls' own, after the function changed them), and the error
MALFORMED_SPLITS: dict[str, tuple[Callable[[list[Call]], Any], str]] = {
    "not JSON": (lambda cs: b"[[", "must be a non-empty JSON array"),
    "an object": (lambda cs: {"a": 1}, "must be a non-empty JSON array"),
    "empty": (lambda cs: [], "must be a non-empty JSON array"),
    "a pair of three": (lambda cs: [[len(cs[0].keys), 1 + len(cs[0].args), 1]], "part 1: counts"),
    "no keys": (lambda cs: [[0, 1 + len(cs[0].args)]], "part 1: counts"),
    "too few counted": (
        lambda cs: [[len(c.keys), 1 + len(c.args)] for c in cs[:-1]],
        "the counts account for",
    ),
    "too many keys": (
        lambda cs: [[len(c.keys) + (i == 2), 1 + len(c.args)] for i, c in enumerate(cs)],
        "part 3: needs",
    ),
    "a key in two parts": (lambda cs: key_in_two_parts(cs), "is in parts 1 and 2"),
}


def key_in_two_parts(calls: list[Call]) -> None:
    """The second call's first window hash is the first call's (written by both: refused whole,
    since each part is checked against the store as it was before any part writes)."""
    calls[1].keys[1] = calls[0].keys[1]


@pytest.mark.parametrize("case", list(MALFORMED_SPLITS))
def test_a_malformed_split_writes_nothing(lib: redis.Redis, raw: redis.Redis, case: str) -> None:
    calls = poll_calls(clock())
    make, expected = MALFORMED_SPLITS[case]
    before = snapshot(raw)
    with pytest.raises(redis.ResponseError) as err:
        send_many(lib, calls, counts=make(calls))
    msg = str(err.value)
    assert msg.startswith(f"{MANY_FUNCTION_NAME}: ") and expected in msg, msg
    assert snapshot(raw) == before
    calls = poll_calls(clock())
    assert send_many(lib, calls) == [[1, str(c.header["offset"])] for c in calls]


def test_a_split_that_shifts_keys_refuses_the_part_it_breaks(
    lib: redis.Redis, raw: redis.Redis
) -> None:
    """Each part is checked as its own call: the second part's progress key counted into the
    first part is a key the first part's header never names (ignored, as ``pulse_apply``
    ignores it), and the second part, without it, is refused and writes nothing."""
    calls = poll_calls(clock())
    counts = [[len(c.keys) + (i == 0) - (i == 1), 1 + len(c.args)] for i, c in enumerate(calls)]
    replies = send_many(lib, calls, counts=counts)
    assert replies[0] == [1, str(calls[0].header["offset"])]
    assert isinstance(replies[1], redis.ResponseError), replies
    assert str(replies[1]).startswith("pulse_apply: "), replies
    assert replies[2] == [1, str(calls[2].header["offset"])]
    assert not any(raw.exists(k) for k in calls[1].keys)


# ----------------------------------------------------------------- entity registries


def test_entity_registries_are_scored_and_trimmed(lib: redis.Redis) -> None:
    """ZADD GT by last-seen minute; members at or below the cutoff or beyond the cap go; a
    registry from before they were scored (a SET) is replaced."""
    r = lib
    ent = keys.entities_key(SENSOR, 0, keys.Dim.DEVICE)
    other = keys.entities_key(SENSOR, 0, keys.Dim.SITE)
    r.sadd(ent, "legacy", "a")
    flat = [5 * MINUTE, "a", 5 * MINUTE, "b", 3 * MINUTE, "c", 1 * MINUTE, "d", 2 * MINUTE, "e"]
    call = build_call(
        expect=-1,
        offset=0,
        registries=[(ent, flat), (other, [4 * MINUTE, "s"])],
        ecut=1 * MINUTE,
        ecap=3,
    )
    assert call.send(r) == [1, "0"]
    # "legacy" went with the set; "d" is at the cutoff (its windows expired); "e" beyond the cap
    assert r.type(ent) == "zset"
    assert r.zrange(ent, 0, -1, withscores=True) == [
        ("c", 3 * MINUTE),
        ("a", 5 * MINUTE),
        ("b", 5 * MINUTE),
    ]
    assert r.zrange(other, 0, -1, withscores=True) == [("s", 4 * MINUTE)]
    # scores only rise; the cap drops the oldest
    call = build_call(
        expect=0, offset=1, registries=[(ent, [2 * MINUTE, "a", 6 * MINUTE, "c"])], ecap=2
    )
    assert call.send(r) == [1, "1"]
    # a stays at 5m (GT) and, tied with b, goes first (ties rank by name)
    assert r.zrange(ent, 0, -1, withscores=True) == [("b", 5 * MINUTE), ("c", 6 * MINUTE)]
    # the cutoff empties a registry: the key goes
    call = build_call(expect=1, offset=2, registries=[(other, [4 * MINUTE, "s"])], ecut=9 * MINUTE)
    assert call.send(r) == [1, "2"]
    assert r.exists(other) == 0
    # the header's cut and cap apply only to the registries the call names
    assert r.zcard(ent) == 2
    # many members in one call (chunked ZADD), an entity named twice keeps its higher score
    flat = []
    for i in range(2_345):
        flat += [7 * MINUTE, f"dev-{i}"]
    flat += [8 * MINUTE, "dev-3", 1 * MINUTE, "dev-3"]
    call = build_call(expect=2, offset=3, registries=[(ent, flat)])
    assert call.send(r) == [1, "3"]
    assert r.zcard(ent) == 2_345 + 2
    assert r.zscore(ent, "dev-3") == 8 * MINUTE
    assert r.zscore(ent, "dev-2344") == 7 * MINUTE


# ----------------------------------------------------------------- the real path, end to end


@dataclass
class Cell:
    """One entity's statistics and sketch in one window instance, summed event by event."""

    stats: list[float]
    buckets: Counter[int] = field(default_factory=Counter)


@dataclass
class Expected:
    """What the store must hold after a partition's records, by a plain reading of the rules."""

    cells: dict[str, dict[str, Cell]] = field(default_factory=dict)  # window key -> entity
    # dim -> entity -> start of the newest 1m window it was seen in
    registries: dict[str, dict[str, int]] = field(default_factory=dict)
    events: int = 0
    late: int = 0
    dead: int = 0
    max_event_time: int | None = None


def entities_of(kind: EventKind, ev: Mapping[str, Any]) -> dict[str, str]:
    sep = keys.ENTITY_SEP
    if kind is SENSOR:
        return {
            keys.Dim.DEVICE: f"{ev['device_id']}{sep}{ev['metric']}",
            keys.Dim.SITE: f"{ev['site']}{sep}{ev['metric']}",
            keys.Dim.METRIC: ev["metric"],
        }
    return {
        keys.Dim.ROUTE: f"{ev['service']}{sep}{ev['route']}",
        keys.Dim.SERVICE: ev["service"],
        keys.Dim.FLEET: keys.FLEET_ENTITY,
    }


def expected_store(
    kind: EventKind, partition: int, events: Sequence[Mapping[str, Any] | None]
) -> Expected:
    """Aggregate every event at once, in offset order (None: a record that must be dead)."""
    out = Expected()
    nf = packed.NF_APPLOG if kind is APPLOG else packed.NF_SENSOR
    for ev in events:
        if ev is None:
            out.dead += 1
            continue
        t = int(ev["event_time"])
        mx = out.max_event_time
        if mx is not None and t < mx - LATENESS_MS:
            out.late += 1
            continue
        out.max_event_time = t if mx is None else max(mx, t)
        out.events += 1
        v = float(ev["value"] if kind is SENSOR else ev["latency_ms"])
        code = int(sketch.bucket_codes(np.array([v]))[0])
        names = entities_of(kind, ev)
        for window, dims in RULES.plan:
            start = keys.window_start(t, window)
            for dim in dims:
                if dim not in names:
                    continue
                key = keys.window_key(kind, partition, window, dim, start)
                cell = out.cells.setdefault(key, {}).get(names[dim])
                if cell is None:
                    cell = Cell([0.0, 0.0, 0.0, math.inf, -math.inf] + [0.0] * (nf - 5))
                    out.cells[key][names[dim]] = cell
                s = cell.stats
                if kind is SENSOR:  # the series statistics, in offset order
                    s[packed.REPEATS] += s[packed.COUNT] > 0 and s[packed.LAST] == v
                    s[packed.FIRST] = v if s[packed.COUNT] == 0 else s[packed.FIRST]
                    s[packed.LAST] = v
                s[packed.COUNT] += 1
                s[packed.SUM] += v
                s[packed.SUMSQ] += v * v
                s[packed.MIN] = min(s[packed.MIN], v)
                s[packed.MAX] = max(s[packed.MAX], v)
                if kind is APPLOG:
                    s[5 + int(ev["status_code"]) // 100 - 1] += 1
                    s[10] += ev["level"] == "ERROR"
                cell.buckets[code] += 1
        minute = keys.window_start(t, keys.WINDOW_1M)
        for dim, name in names.items():
            reg = out.registries.setdefault(dim, {})
            reg[name] = max(reg.get(name, minute), minute)
    return out


def assert_store_holds(
    raw: redis.Redis, kind: EventKind, partition: int, want: Expected, owner: str, batches: int
) -> None:
    nf = packed.NF_APPLOG if kind is APPLOG else packed.NF_SENSOR
    tag = "{" + keys.partition_tag(kind, partition) + "}"
    stored = {k.decode() for k in raw.scan_iter(match=keys.window_pattern(kind), count=1000)}
    assert {k for k in stored if tag in k} == set(want.cells)
    for key, cells in want.cells.items():
        fields = hash_bytes(raw, key)
        names = [f.decode() for f in fields]
        assert set(names) == set(cells), key
        table = packed.decode(list(fields.values()), nf)
        assert packed.problems(table) == [], key
        for i, name in enumerate(names):
            got, exp = table.stats[i], cells[name].stats
            where = f"{key} {name}"
            assert got[packed.COUNT] == exp[packed.COUNT], where
            assert math.isclose(got[packed.SUM], exp[packed.SUM], rel_tol=1e-9, abs_tol=1e-9)
            assert math.isclose(got[packed.SUMSQ], exp[packed.SUMSQ], rel_tol=1e-9, abs_tol=1e-9)
            assert (got[packed.MIN], got[packed.MAX]) == (exp[packed.MIN], exp[packed.MAX]), where
            # status classes and errors, or the series statistics: exact
            assert got[5:].tolist() == exp[5:], where
            sel = table.row == i
            buckets = dict(zip(table.code[sel].tolist(), table.count[sel].tolist(), strict=True))
            assert buckets == dict(cells[name].buckets), where
        _, _, wname, _, start = keys.parse_window_key(key)
        assert pexpiretime(raw, key) == RETENTION.expire_at_s(WINDOWS[wname], start) * 1000
    for dim in keys.DIMS[kind]:
        reg = zmembers(raw, keys.entities_key(kind, partition, dim))
        assert {n.decode(): int(s) for n, s in reg} == want.registries[dim], dim
    stats = {
        k.decode(): v.decode()
        for k, v in hash_bytes(raw, keys.progress_key(kind, partition)).items()
    }
    assert want.max_event_time is not None
    assert stats["events"] == str(want.events)
    assert stats["late"] == str(want.late)
    assert stats["dead"] == str(want.dead)
    assert stats["batches"] == str(batches)
    assert stats["max_event_time"] == str(want.max_event_time)
    assert stats["watermark"] == str(want.max_event_time - LATENESS_MS)
    assert stats["owner"] == owner and stats["topic"] == f"t.{kind.value}"


def stream(kind: EventKind, rng: random.Random, t0: int, n: int) -> tuple[list[Record], list[Any]]:
    """``n`` records over 12 minutes: mostly in order, some a little out of order (on time),
    some far behind (late), some invalid (dead); and what each one is (None: dead)."""
    records: list[Record] = []
    events: list[Any] = []
    future = clock() + 3_600_000  # beyond the 5 min skew the rules allow
    for i in range(n):
        t = t0 + i * 12 * MINUTE // n
        roll = rng.random()
        if roll < 0.06:
            t -= rng.randrange(35_000, 120_000)  # late, unless the stream is still behind it
        elif roll < 0.5:
            t -= rng.randrange(0, 25_000)
        if kind is SENSOR:
            dev = rng.randrange(30)
            value = rng.choice([0.0, -rng.uniform(0, 40), rng.uniform(0, 150), 1e-12])
            ev = sensor_event(
                f"dev-{dev}",
                rng.choice(["temperature", "humidity", "pressure"]),
                round(value, rng.choice([0, 3, 12])),
                t,
                site=f"site-{dev % 4}",
            )
        else:
            status = rng.choice([101, 200, 200, 201, 204, 301, 404, 429, 500, 503])
            ev = applog_event(
                f"svc-{rng.randrange(5)}",
                rng.choice(["/api/items", "/api/items/{id}", "/health"]),
                status,
                round(rng.choice([0.0, rng.uniform(0, 2000), rng.expovariate(0.05)]), 3),
                t,
                status >= 500 or rng.random() < 0.05,
            )
        bad = rng.random()
        if bad < 0.01:
            records.append(Record(i, None, None))  # a tombstone
            events.append(None)
        elif bad < 0.02:
            records.append(Record(i, None, orjson.dumps(ev)[:-5]))  # cut short
            events.append(None)
        elif bad < 0.03:
            records.append(Record(i, None, orjson.dumps({**ev, "event_time": future})))
            events.append(None)
        else:
            records.append(Record(i, None, orjson.dumps(ev)))
            events.append(ev)
    return records, events


E2E_PARTITION = 1


@dataclass
class Owner:
    """A worker's view of one partition: restored from the store, then fed batches."""

    name: str
    kind: EventKind
    partition: int
    writer: StoreWriter
    state: PartitionState
    applied: int = 0

    @classmethod
    async def take_over(
        cls, running: contextlib.AsyncExitStack, stack: RunningStack, name: str, kind: EventKind
    ) -> Owner:
        """What a worker does on assignment: read the progress, restore the open windows."""
        p = E2E_PARTITION
        writer = await running.enter_async_context(
            open_writer(stack, topic_names={kind: f"t.{kind.value}"}, owner=name)
        )
        state = (await writer.read_state(kind, [p]))[p]
        ws = WindowState(kind, p, RULES.plan)
        wanted = ws.restore_keys(
            state.max_event_time, windows.watermark(state.max_event_time, LATENESS_MS)
        )
        ws.restore(await writer.read_hashes(wanted))
        state.windows = ws
        return cls(name, kind, p, writer, state)

    async def feed(self, records: list[Record]) -> tuple[PartitionBatch, ApplyOutcome | None]:
        now = clock()
        batch = run_batch(self.kind, self.partition, records, self.state, now)
        outcomes, _ = await self.writer.apply([batch], now)
        if batch.empty:
            assert outcomes == []
            return batch, None
        (outcome,) = outcomes
        if outcome.applied:
            commit(self.state, batch)
            self.applied += 1
        return batch, outcome


def same_windows(a: WindowState, b: WindowState) -> None:
    """Two owners' open windows hold the same instances, entities and (bit for bit) values."""
    assert a.open == b.open
    assert a.values() == b.values()


@pytest.mark.parametrize("kind", [SENSOR, APPLOG])
def test_batches_and_a_new_owner_leave_what_one_aggregation_gives(
    stack: RunningStack, raw: redis.Redis, kind: EventKind
) -> None:
    """Batches of random sizes through process -> absorb -> StoreWriter.apply -> commit; half-way
    a new owner restores its windows from the store (the old one's next apply is refused and
    writes nothing), is redelivered records it already has, and carries on. The store then
    holds exactly what aggregating every event at once gives."""
    raw.flushall()
    rng = random.Random(7 if kind is SENSOR else 8)
    records, events = stream(kind, rng, minute_floor(clock() - 40 * MINUTE), 2400)
    cuts = sorted(rng.sample(range(1, len(records)), 13))
    batches = [records[a:b] for a, b in zip([0, *cuts], [*cuts, len(records)], strict=True)]
    handover = len(batches) // 2

    async def run() -> int:
        """The sequence; returns the number of batches applied."""
        async with contextlib.AsyncExitStack() as running:
            old = await Owner.take_over(running, stack, "worker-a", kind)
            assert old.state.offset == -1 and old.state.windows is not None
            assert not old.state.windows.open
            for recs in batches[:handover]:
                _, outcome = await old.feed(recs)
                assert outcome is not None and outcome.applied
            new = await Owner.take_over(running, stack, "worker-b", kind)
            assert new.state.offset == old.state.offset
            assert new.state.windows is not None and new.state.windows.open, "none open"
            same_windows(new.state.windows, old.state.windows)
            # redelivered: the tail of the old owner's last batch comes with the new one's first
            tail = batches[handover - 1][-5:]
            batch, outcome = await new.feed(tail + batches[handover])
            assert outcome is not None and outcome.applied
            assert batch.expect_offset == tail[-1].offset
            # the old owner, unaware, applies the same records: refused, nothing written
            before = snapshot(raw)
            _, outcome = await old.feed(batches[handover])
            assert outcome == ApplyOutcome(E2E_PARTITION, False, new.state.offset)
            assert snapshot(raw) == before
            for recs in batches[handover + 1 :]:
                batch, outcome = await new.feed(recs)
                assert outcome is not None and outcome.applied
            # a lost reply: the same batch sent again is refused, nothing written
            before = snapshot(raw)
            outcomes, _ = await new.writer.apply([batch], clock())
            assert outcomes == [ApplyOutcome(E2E_PARTITION, False, batch.last_offset)]
            assert snapshot(raw) == before
            # a third owner restores exactly the windows the last one holds
            third = await Owner.take_over(running, stack, "worker-c", kind)
            assert third.state.windows is not None
            same_windows(third.state.windows, new.state.windows)
            return old.applied + new.applied

    applied = asyncio.run(run())
    assert applied == len(batches)
    want = expected_store(kind, E2E_PARTITION, events)
    assert want.late > 0 and want.dead > 0 and want.events > 2000
    assert_store_holds(raw, kind, E2E_PARTITION, want, "worker-b", applied)
