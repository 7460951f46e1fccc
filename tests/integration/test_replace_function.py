"""``pulse_replace`` (pipeline/store_functions.lua) against the real Valkey.

The function replaces whole keys of one partition (window hashes, board sorted sets) and
deletes others, and makes the range's anomaly records and index entries exactly the ones given,
in one atomic call, only once the partition's stored watermark has closed the range. As for
``pulse_apply``: a malformed call leaves the store exactly as it was (a full snapshot of every
key's DUMP and expiry, before and after), the reply naming the problem.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator
from typing import Any, cast

import numpy as np
import orjson
import pytest
import redis

from pipeline.leaderboards import ZsetWrite
from pipeline.replay import FUNCTION_NAME, ReplaceCall
from pipeline.stack.testing import RunningStack
from pipeline.state import HashWrite
from pipeline.store_writer import function_source
from schemas import anomaly, keys, packed, sketch
from schemas.events import EventKind
from tests.integration.test_store_functions import snapshot

pytestmark = [pytest.mark.integration]

SENSOR = EventKind.SENSOR
START = 1_700_000_040_000  # a minute
END = START + 60_000


@pytest.fixture
def raw(stack: RunningStack) -> Iterator[redis.Redis]:
    """A flushed store with the ``pulse`` library, returning bytes."""
    client = redis.Redis(port=stack.store_settings.port, decode_responses=False)
    client.flushall()
    # redis-py leaves execute_command unannotated
    client.execute_command("FUNCTION", "LOAD", "REPLACE", function_source())  # type: ignore[no-untyped-call]
    try:
        yield client
    finally:
        client.close()


def value(x: float, n: int = 1) -> bytes:
    code = int(sketch.bucket_codes(np.array([x]))[0])
    table = packed.Table(
        np.array([[n, n * x, n * x * x, x, x]], dtype=np.float64),
        np.zeros(1, dtype=np.int64),
        np.array([code], dtype=np.int64),
        np.array([n], dtype=np.int64),
    )
    return packed.encode(table)[0]


def far() -> int:
    return int(time.time()) + 3600


def wkey(dim: str = keys.Dim.METRIC, start: int = START, partition: int = 0) -> str:
    return keys.window_key(SENSOR, partition, keys.WINDOW_1M, dim, start)


def bkey(board: str = keys.Board.SITE_EVENTS, start: int = START, partition: int = 0) -> str:
    return keys.board_key(SENSOR, partition, board, start)


def seed(raw: redis.Redis, watermark: int = END + 5_000) -> None:
    """A closed partition 0 holding old values in the range."""
    raw.hset(keys.progress_key(SENSOR, 0), mapping={"offset": 99, "watermark": watermark})
    raw.hset(wkey(), mapping={"temp": value(1.0, 7), "stale": value(2.0)})
    raw.expireat(wkey(), far())
    raw.hset(wkey(keys.Dim.DEVICE), mapping={"d1|temp": value(5.0)})
    raw.zadd(bkey(), {"site-a": 7.0, "site-gone": 3.0})
    raw.zadd(bkey("device.max.temp"), {"d1": 5.0})


def good_call() -> ReplaceCall:
    call = ReplaceCall(SENSOR, 0, END)
    call.hashes = [HashWrite(wkey(), far(), ["temp"], [value(1.5, 3)])]
    call.zsets = [ZsetWrite(bkey(), far(), "set", ["site-a"], [3.0])]
    call.delete = [wkey(keys.Dim.DEVICE), bkey("device.max.temp")]
    return call


def send(raw: redis.Redis, key_list: list[str], args: list[Any]) -> Any:
    # redis-py leaves execute_command unannotated
    return raw.execute_command("FCALL", FUNCTION_NAME, len(key_list), *key_list, *args)  # type: ignore[no-untyped-call]


def test_keys_are_replaced_whole_and_deleted(raw: redis.Redis) -> None:
    seed(raw)
    call = good_call()
    assert send(raw, *call.payload()) == [1, 2, 2, 0, 0]
    assert raw.hgetall(wkey()) == {b"temp": value(1.5, 3)}  # "stale" is gone
    assert raw.zrange(bkey(), 0, -1, withscores=True) == [(b"site-a", 3.0)]
    assert not raw.exists(wkey(keys.Dim.DEVICE), bkey("device.max.temp"))
    assert raw.expiretime(wkey()) == call.hashes[0].expire_at_s
    assert raw.expiretime(bkey()) == call.zsets[0].expire_at_s
    # the progress hash is only read
    assert raw.hgetall(keys.progress_key(SENSOR, 0)) == {
        b"offset": b"99",
        b"watermark": str(END + 5_000).encode(),
    }
    # the same call again leaves the same store
    before = snapshot(raw)
    assert send(raw, *call.payload()) == [1, 2, 2, 0, 0]
    assert snapshot(raw) == before


@pytest.mark.parametrize("watermark", [None, END - 1])
def test_an_open_range_writes_nothing(raw: redis.Redis, watermark: int | None) -> None:
    seed(raw, watermark if watermark is not None else 0)
    if watermark is None:
        raw.hdel(keys.progress_key(SENSOR, 0), "watermark")
    before = snapshot(raw)
    reply = send(raw, *good_call().payload())
    assert reply[0] == 0
    assert reply[1] == (b"" if watermark is None else str(watermark).encode())
    assert snapshot(raw) == before


Mutate = Callable[[list[str], list[Any], dict[str, Any]], str]


def _other_tag(k: list[str], a: list[Any], h: dict[str, Any]) -> str:
    k[-1] = keys.window_key(SENSOR, 1, keys.WINDOW_1M, keys.Dim.METRIC, START)
    return "is not of partition"


def _no_tag(k: list[str], a: list[Any], h: dict[str, Any]) -> str:
    k[-1] = "pulse:nohashtag"
    return "is not of partition"


def _not_packed(k: list[str], a: list[Any], h: dict[str, Any]) -> str:
    a[-1] = b"x"
    return "not a packed value"


def _bad_score(k: list[str], a: list[Any], h: dict[str, Any]) -> str:
    h["z"][-1][2][0] = "NaN"
    return "not a finite number"


def _empty_member(k: list[str], a: list[Any], h: dict[str, Any]) -> str:
    h["z"][-1][2][1] = ""
    return "is not a name"


def _index_twice(k: list[str], a: list[Any], h: dict[str, Any]) -> str:
    h["x"][-1] = h["x"][0]
    return "used twice"


def _unreferenced_key(k: list[str], a: list[Any], h: dict[str, Any]) -> str:
    k.append(wkey(keys.Dim.SITE))
    return "refers to"


def _missing_pairs(k: list[str], a: list[Any], h: dict[str, Any]) -> str:
    h["h"][-1][2] = 2
    return "field/value pairs"


def _extra_argument(k: list[str], a: list[Any], h: dict[str, Any]) -> str:
    a.append(b"more")
    return "accounts for"


def _no_closed(k: list[str], a: list[Any], h: dict[str, Any]) -> str:
    del h["closed"]
    return "closed must be an integer"


def _wrong_type(k: list[str], a: list[Any], h: dict[str, Any]) -> str:
    h["x"].append(h["z"][0][0])  # the board key is deleted instead
    h["z"], h["h"] = [[h["h"][0][0], far(), [1.0, "m"]]], []  # the window hash as a zset
    del a[:]
    return "holds a hash, not a zset"


@pytest.mark.parametrize(
    "mutate",
    [_other_tag, _no_tag, _not_packed, _bad_score, _empty_member, _index_twice,
     _unreferenced_key, _missing_pairs, _extra_argument, _no_closed, _wrong_type],
)  # fmt: skip
def test_a_malformed_call_writes_nothing(raw: redis.Redis, mutate: Mutate) -> None:
    seed(raw)
    assert_refused_whole(raw, good_call(), mutate)


def assert_refused_whole(raw: redis.Redis, call: ReplaceCall, mutate: Mutate) -> None:
    """``call`` broken by ``mutate`` is refused with its reason, and the store is unchanged."""
    key_list, args = call.payload()
    header = orjson.loads(args[0])
    rest = list(args[1:])
    key_list = list(key_list)
    want = mutate(key_list, rest, header)
    before = snapshot(raw)
    with pytest.raises(redis.ResponseError) as err:
        send(raw, key_list, [orjson.dumps(header), *rest])
    assert "pulse_replace:" in str(err.value) and want in str(err.value), str(err.value)
    assert snapshot(raw) == before


def test_header_must_be_json_and_keys_given(raw: redis.Redis) -> None:
    seed(raw)
    before = snapshot(raw)
    for key_list, args in (([keys.progress_key(SENSOR, 0)], [b"{nope"]), ([], [b"{}"])):
        with pytest.raises(redis.ResponseError, match="pulse_replace"):
            send(raw, key_list, args)
    assert snapshot(raw) == before


def test_large_keys_are_written_in_chunks(raw: redis.Redis) -> None:
    seed(raw)
    call = ReplaceCall(SENSOR, 0, END)
    n = 5_000  # more than the C stack's unpack() limit in one call
    names = [f"e{i}" for i in range(n)]
    call.hashes = [HashWrite(wkey(), far(), names, [value(float(i)) for i in range(n)])]
    call.zsets = [ZsetWrite(bkey(), far(), "set", [f"s{i}" for i in range(n)],
                            [float(i) for i in range(n)])]  # fmt: skip
    assert send(raw, *copy.deepcopy(call.payload())) == [1, 2, 0, 0, 0]
    assert raw.hlen(wkey()) == n and raw.zcard(bkey()) == n


ANOM = keys.anomalies_key(SENSOR, 0)
INDEX = keys.anomaly_index_key(SENSOR, 0)
FEED = keys.feed_key(SENSOR, 0)


def record(start: int, entity: str, score: float = 0.9) -> anomaly.AnomalyRecord:
    signal = anomaly.Signal.MEAN
    return anomaly.AnomalyRecord(
        id=anomaly.anomaly_id("sensor", 0, start, entity, signal), kind="sensor", partition=0,
        entity=entity, signal=signal, cause="spike", window_start_ms=start, window_ms=10_000,
        score=score, value=1.0, expected=0.0,
    )  # fmt: skip


def seed_anomalies(raw: redis.Redis) -> dict[str, anomaly.AnomalyRecord]:
    """Stored anomalies before, in and after the range, indexed, and a feed entry."""
    recs = {
        r.id: r
        for r in (
            record(START - 10_000, "d1|temp"),
            record(START, "d1|temp"),
            record(START + 20_000, "d2|temp"),
            record(END, "d1|temp"),
        )
    }
    for r in recs.values():
        raw.hset(ANOM, r.id, anomaly.encode_record(r))
        raw.zadd(INDEX, {r.id: r.window_start_ms})
    raw.xadd(FEED, {"id": next(iter(recs))})
    return recs


def anomaly_call(found: list[anomaly.AnomalyRecord]) -> ReplaceCall:
    call = good_call()
    call.anomalies = found
    call.anomaly_span = (START, END)
    return call


def test_the_ranges_anomalies_become_the_ones_given(raw: redis.Redis) -> None:
    seed(raw)
    old = seed_anomalies(raw)
    feed = raw.dump(FEED)
    again = record(START, "d1|temp", score=0.7)  # raised again, with other values
    new = record(START + 30_000, "d3|temp")
    # one call, sent twice below: its expiries are read from the clock once (built twice, a
    # second's turn in between gave the keys other expiries)
    call = anomaly_call([again, new])
    assert send(raw, *call.payload()) == [1, 2, 2, 2, 1]
    stored = {k.decode(): anomaly.decode_record(v) for k, v in raw.hgetall(ANOM).items()}  # type: ignore[union-attr, arg-type]
    assert sorted(stored) == sorted([*(i for i in old if ":1700000060000:" not in i), new.id])
    assert stored[again.id].score == 0.7
    outside = [i for i, r in old.items() if not START <= r.window_start_ms < END]
    assert len(outside) == 2
    assert all(raw.hget(ANOM, i) == anomaly.encode_record(old[i]) for i in outside)
    scored = cast(list[tuple[bytes, float]], raw.zrange(INDEX, 0, -1, withscores=True))
    index = {k.decode(): int(s) for k, s in scored}
    assert index == {i: r.window_start_ms for i, r in stored.items()}
    assert raw.dump(FEED) == feed  # the live feed is left as it is
    before = snapshot(raw)
    assert send(raw, *call.payload()) == [1, 2, 2, 2, 0]
    assert snapshot(raw) == before
    # none raised: the range holds none
    assert send(raw, *anomaly_call([]).payload()) == [1, 2, 2, 0, 2]
    assert sorted(k.decode() for k in cast(list[bytes], raw.hkeys(ANOM))) == sorted(outside)
    assert raw.zcard(INDEX) == 2


def _outside_span(k: list[str], a: list[Any], h: dict[str, Any]) -> str:
    h["a"][4][1] = END
    return "is not within [from, to)"


def _after_closed(k: list[str], a: list[Any], h: dict[str, Any]) -> str:
    h["a"][3] = END + 1
    return "is after closed"


def _id_twice(k: list[str], a: list[Any], h: dict[str, Any]) -> str:
    h["a"][4] += h["a"][4][:2]
    a.append(a[-1])
    return "given twice"


def _missing_record(k: list[str], a: list[Any], h: dict[str, Any]) -> str:
    a.pop()
    return "records"


def _empty_record(k: list[str], a: list[Any], h: dict[str, Any]) -> str:
    a[-1] = b""
    return "is empty"


def _index_not_zset(k: list[str], a: list[Any], h: dict[str, Any]) -> str:
    k[h["a"][1] - 1] = FEED
    return "holds a stream, not a zset"


@pytest.mark.parametrize(
    "mutate",
    [_outside_span, _after_closed, _id_twice, _missing_record, _empty_record, _index_not_zset],
)
def test_a_malformed_anomalies_block_writes_nothing(raw: redis.Redis, mutate: Mutate) -> None:
    seed(raw)
    seed_anomalies(raw)
    assert_refused_whole(raw, anomaly_call([record(START + 30_000, "d3|temp")]), mutate)
