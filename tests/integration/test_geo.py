"""Device positions in the store: ``pulse_apply``'s positions block (newest event time wins,
malformed blocks refused before any write), and ``near`` / ``pulse near`` reading them back with
each device's latest 1-minute reading."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any, cast

import orjson
import pytest
import redis

from dashboard.geo import near
from pipeline.batch import BatchRules, Record
from pipeline.checkpoint import Checkpoint
from pipeline.metrics import Metrics
from pipeline.settings import Durability
from pipeline.stack.testing import RunningStack
from pipeline.state import Retention
from pipeline.store_writer import StoreWriter, connect, function_source
from pipeline.validation import TimeBounds
from schemas import keys
from schemas.events import EventKind
from tests.integration.test_store_functions import build_call

SENSOR = EventKind.SENSOR
MIN = keys.WINDOW_1M.size_ms
RULES = BatchRules(TimeBounds(7 * 86_400_000, 300_000), 30_000)
OSLO = (59.9139, 10.7522)
BERGEN = (60.3913, 5.3221)


@pytest.fixture
def lib(store: redis.Redis) -> redis.Redis:
    # redis-py leaves execute_command unannotated
    store.execute_command("FUNCTION", "LOAD", "REPLACE", function_source())  # type: ignore[no-untyped-call]
    return store


@pytest.fixture
def raw(stack: RunningStack, store: redis.Redis) -> Iterator[redis.Redis]:
    client = stack.redis(decode=False)
    try:
        yield client
    finally:
        client.close()


def positions_call(expect: int, offset: int, members: list[Any], partition: int = 0) -> Any:
    call = build_call(SENSOR, partition, expect=expect, offset=offset)
    call.keys += [keys.geo_key(partition), keys.seen_key(partition)]
    call.header["g"] = [len(call.keys) - 1, len(call.keys), members]
    return call


def test_the_newest_event_time_decides_a_device_position(lib: redis.Redis) -> None:
    r = lib
    call = positions_call(-1, 0, [2000, *OSLO, "a", 1000, *BERGEN, "b"])
    assert call.send(r) == [1, "0"]
    assert r.zscore(keys.seen_key(0), "a") == 2000
    # an older event of a (from Bergen) moves nothing; a newer one of b does
    call = positions_call(0, 1, [1500, *BERGEN, "a", 3000, *OSLO, "b"])
    assert call.send(r) == [1, "1"]
    # both are in the set: neither position is None
    positions = cast(list[tuple[float, float]], r.geopos(keys.geo_key(0), "a", "b"))
    (a_lon, a_lat), (b_lon, b_lat) = positions
    assert abs(a_lat - OSLO[0]) < 1e-4 and abs(a_lon - OSLO[1]) < 1e-4
    assert abs(b_lat - OSLO[0]) < 1e-4 and abs(b_lon - OSLO[1]) < 1e-4
    assert r.zscore(keys.seen_key(0), "a") == 2000 and r.zscore(keys.seen_key(0), "b") == 3000


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ([1000, 86.0, 1.0, "a"], "latitude 1 is not within"),
        ([1000, 1.0, 181.0, "a"], "longitude 1 is not within"),
        ([1.5, 1.0, 1.0, "a"], "time 1 is not an integer"),
        ([1000, 1.0, 1.0, ""], "device 1 is not a name"),
        ([1000, 1.0, 1.0], "quadruples"),
        ([], "quadruples"),
    ],
)
def test_a_malformed_positions_block_is_refused_before_any_write(
    lib: redis.Redis, members: list[Any], message: str
) -> None:
    r = lib
    with pytest.raises(redis.ResponseError, match=message):
        positions_call(-1, 0, members).send(r)
    assert r.exists(keys.progress_key(SENSOR, 0), keys.geo_key(0), keys.seen_key(0)) == 0


def test_a_position_key_of_another_type_is_refused(lib: redis.Redis) -> None:
    lib.set(keys.geo_key(0), "x")
    with pytest.raises(redis.ResponseError, match="holds a string"):
        positions_call(-1, 0, [1000, *OSLO, "a"]).send(lib)
    assert lib.exists(keys.progress_key(SENSOR, 0)) == 0


def reading(offset: int, device: str, t: int, lat: float, lon: float, value: float) -> Record:
    event = {
        "device_id": device, "site": "s1", "event_time": t, "metric": "temp", "value": value,
        "unit": "C", "lat": lat, "lon": lon, "firmware": "1.0",
    }  # fmt: skip
    return Record(offset, None, orjson.dumps(event))


class NoDivert:
    async def send(self, source_topic: str, batches: Any) -> None:
        return None


def test_near_lists_devices_by_distance_with_their_latest_reading(
    stack: RunningStack, raw: redis.Redis
) -> None:
    now = time.time_ns() // 1_000_000
    minute = now - now % MIN
    # three devices in two partitions: two in Oslo (one older minute too), one in Bergen
    polls = {
        0: [reading(0, "oslo-1", minute - MIN + 5, *OSLO, 10.0),
            reading(1, "oslo-1", minute + 1, *OSLO, 20.0),
            reading(2, "oslo-1", minute + 2, *OSLO, 30.0)],
        1: [reading(0, "oslo-2", minute + 3, OSLO[0] + 0.01, OSLO[1], 5.0),
            reading(1, "bergen", minute + 4, *BERGEN, 7.0)],
    }  # fmt: skip

    async def apply() -> None:
        writer = StoreWriter(
            connect(stack.store_settings, 30.0),
            Durability.LOCAL,
            Retention({"10s": 600, "1m": 600}),
        )
        cp = Checkpoint({SENSOR: "s"}, writer, NoDivert(), RULES, Metrics(), clock=lambda: now)
        await cp.commit({SENSOR: polls})
        await cp.flush()
        await cp.close()

    asyncio.run(apply())
    got = near(raw, [0, 1], *OSLO, km=5, now_ms=now)
    assert [d.device for d in got] == ["oslo-1", "oslo-2"]
    assert got[0].km < 0.01 < got[1].km < 2.0
    assert got[0].seen_ms == minute + 2 and got[0].status == "ok"
    assert got[0].reading == {"temp": (25.0, minute)}  # the latest minute's mean
    assert got[1].reading == {"temp": (5.0, minute)}
    far = near(raw, [0, 1], *OSLO, km=400, now_ms=now + 10 * MIN)
    assert [d.device for d in far] == ["oslo-1", "oslo-2", "bergen"]
    assert {d.status for d in far} == {"stale"}  # last seen 10 minutes before this "now"
    assert near(raw, [0, 1], 0.0, 0.0, km=5, now_ms=now) == []
    # a member another writer left, whose name is not UTF-8: listed replaced, not a failure
    raw.geoadd(keys.geo_key(1), (BERGEN[1], BERGEN[0], b"\xffx"))
    raw.zadd(keys.seen_key(1), {b"\xffx": minute})
    far = near(raw, [0, 1], *BERGEN, km=5, now_ms=now)
    assert sorted(d.device for d in far) == ["bergen", "\ufffdx"]
    # a partition's key of another type leaves that partition out, not the search
    raw.delete(keys.geo_key(1))
    raw.set(keys.geo_key(1), "not a geo set")
    raw.set(keys.window_key(SENSOR, 0, keys.WINDOW_1M, keys.Dim.DEVICE, minute), "not a hash")
    got = near(raw, [0, 1], *OSLO, km=5, now_ms=now)
    assert [d.device for d in got] == ["oslo-1"]  # oslo-2's partition is left out
    assert got[0].reading == {"temp": (10.0, minute - MIN)}  # its latest minute is unreadable
