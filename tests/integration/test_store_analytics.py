"""``pulse_apply``'s analytics blocks against the real Valkey: leaderboards (z), detector
states (d) and anomalies (a) go with the offset, exactly once, or not at all."""

# ruff: noqa: F811  (the store fixtures are imported from test_store_functions and used by name)

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import orjson
import pytest
import redis

from pipeline.detection import Detected
from pipeline.store_writer import payload
from schemas import keys
from schemas.events import EventKind
from tests.integration.test_store_functions import (  # noqa: F401  (fixtures)
    RETENTION,
    Call,
    Seeded,
    check_applies,
    check_refused,
    clock,
    lib,
    raw,
    run_batch,
    seeded,
    sensor_records,
    snapshot,
)

pytestmark = [pytest.mark.integration]

S = EventKind.SENSOR
T = 1_700_000_040_000


def with_analytics(
    c: Call,
    *,
    boards: list[tuple[str, str, list[Any]]] | None = None,
    states: dict[bytes, bytes] | None = None,
    deleted: list[bytes] | None = None,
    anomalies: list[tuple[str, int, bytes]] | None = None,
    cut: int = 0,
) -> Call:
    """Add z blocks (key, mode, pairs), a d block (states set, then fields ``deleted``) and an
    a block to a valid call."""
    z = []
    for key, mode, pairs in (
        boards
        if boards is not None
        else [
            (keys.board_key(S, 0, keys.Board.SITE_EVENTS, T), "incr", [3, "s1", 1, "s2"]),
            (keys.board_key(S, 0, "device.max.temp", T), "gt", [21.5, "d1"]),
            (keys.board_key(S, 0, keys.Board.DEVICE_ANOMALIES, T), "set", [1, "d1"]),
        ]
    ):
        c.keys.append(key)
        z.append([len(c.keys), 2_000_000_000, mode, pairs])
    c.header["z"] = z
    states = states if states is not None else {b"d1|temp~mean": b"S1", b"d1|temp~max": b"S2"}
    if states:
        c.keys.append(keys.detector_key(S, 0))
        c.header["d"] = [len(c.keys), len(states)]
        for f, v in states.items():
            c.args += [f, v]
        if deleted is not None:
            c.header["d"].append(len(deleted))
            c.args += deleted
    anomalies = anomalies if anomalies is not None else [("a1", T, b"R1"), ("a2", T + 10, b"R2")]
    if anomalies:
        c.keys += [keys.anomalies_key(S, 0), keys.anomaly_index_key(S, 0), keys.feed_key(S, 0)]
        n = len(c.keys)
        entries: list[Any] = []
        for aid, t, record in anomalies:
            entries += [aid, t, "d1|temp", "mean", "spike", "0.9000", "42"]
            c.args.append(record)
        c.header["a"] = [n - 2, n - 1, n, cut, 100, entries]
    return c


def test_boards_states_and_anomalies_apply_with_the_offset(
    seeded: Seeded, raw: redis.Redis
) -> None:
    r = seeded.r
    call = with_analytics(seeded.next_call())
    check_applies(r, raw, call)
    site = keys.board_key(S, 0, keys.Board.SITE_EVENTS, T)
    assert r.zrange(site, 0, -1, withscores=True) == [("s2", 1.0), ("s1", 3.0)]
    assert r.zscore(keys.board_key(S, 0, "device.max.temp", T), "d1") == 21.5
    # redis-py leaves execute_command unannotated
    assert int(r.execute_command("EXPIRETIME", site)) == 2_000_000_000  # type: ignore[no-untyped-call]
    assert raw.hgetall(keys.detector_key(S, 0)) == {b"d1|temp~mean": b"S1", b"d1|temp~max": b"S2"}
    assert raw.hgetall(keys.anomalies_key(S, 0)) == {b"a1": b"R1", b"a2": b"R2"}
    assert r.zrange(keys.anomaly_index_key(S, 0), 0, -1, withscores=True) == [
        ("a1", float(T)),
        ("a2", float(T + 10)),
    ]
    feed = cast(list[tuple[str, dict[str, str]]], r.xrange(keys.feed_key(S, 0)))
    assert [f["id"] for _, f in feed] == ["a1", "a2"]
    assert feed[0][1] == {
        "id": "a1", "entity": "d1|temp", "signal": "mean", "cause": "spike", "score": "0.9000",
        "t": str(T), "value": "42",
    }  # fmt: skip

    # the same call again (a redelivery) is refused by the offset: nothing counts twice
    before = snapshot(raw)
    assert call.send(r)[0] == 0
    assert snapshot(raw) == before

    # the next batch: counts add, maxima only rise, a set score is replaced
    nxt = seeded.next_call()
    nxt.header["expect"] = call.header["offset"]
    nxt.header["offset"] = call.header["offset"] + 20
    with_analytics(
        nxt,
        boards=[
            (site, "incr", [2, "s1"]),
            (keys.board_key(S, 0, "device.max.temp", T), "gt", [20.0, "d1"]),
            (keys.board_key(S, 0, keys.Board.DEVICE_ANOMALIES, T), "set", [5, "d1"]),
        ],
        states={},
        anomalies=[],
    )
    assert nxt.send(r)[0] == 1
    assert r.zscore(site, "s1") == 5.0
    assert r.zscore(keys.board_key(S, 0, "device.max.temp", T), "d1") == 21.5
    assert r.zscore(keys.board_key(S, 0, keys.Board.DEVICE_ANOMALIES, T), "d1") == 5.0


def test_forgotten_detector_states_are_deleted_with_the_offset(
    seeded: Seeded, raw: redis.Redis
) -> None:
    r = seeded.r
    first = with_analytics(seeded.next_call(), deleted=[])
    assert first.send(r)[0] == 1
    det = keys.detector_key(S, 0)
    assert raw.hgetall(det) == {b"d1|temp~mean": b"S1", b"d1|temp~max": b"S2"}
    nxt = seeded.next_call()
    nxt.header["expect"] = first.header["offset"]
    nxt.header["offset"] = first.header["offset"] + 20
    gone = [b"d1|temp~max", b"never~saved"]  # deleting a field the hash lacks is no error
    with_analytics(nxt, boards=[], states={b"d2|co2~mean": b"S3"}, deleted=gone, anomalies=[])
    before = snapshot(raw)
    check_applies(r, raw, nxt)
    assert raw.hgetall(det) == {b"d1|temp~mean": b"S1", b"d2|co2~mean": b"S3"}
    # a redelivery deletes nothing more and sets nothing again
    after = snapshot(raw)
    assert nxt.send(r)[0] == 0
    assert snapshot(raw) == after != before


def test_the_writer_sends_the_states_to_delete_in_its_d_block(
    seeded: Seeded, raw: redis.Redis
) -> None:
    det = keys.detector_key(S, 0)
    raw.hset(det, mapping={b"gone~mean": b"S0", b"kept~mean": b"S1"})
    t = seeded.t0 + 160_000
    batch = run_batch(S, 0, sensor_records(seeded.state.offset + 1, 20, t), seeded.state, clock())
    batch.detected = Detected(["new~mean", "@from"], [b"S2", b"-1"], [], ["gone~mean"])
    call = Call.of(*payload(batch, RETENTION, clock(), topic="t.sensor", owner="w2"))
    assert call.header["d"][1:] == [2, 1]
    check_applies(seeded.r, raw, call)
    assert raw.hgetall(det) == {b"kept~mean": b"S1", b"new~mean": b"S2", b"@from": b"-1"}


def test_expired_anomalies_leave_the_index_and_the_records(
    seeded: Seeded, raw: redis.Redis
) -> None:
    r = seeded.r
    call = with_analytics(seeded.next_call(), anomalies=[("old", T, b"R0"), ("new", T + 99, b"R1")])
    assert call.send(r)[0] == 1
    nxt = seeded.next_call()
    nxt.header["expect"] = call.header["offset"]
    nxt.header["offset"] = call.header["offset"] + 20
    assert with_analytics(nxt, anomalies=[("x", T + 200, b"R2")], cut=T + 50).send(r)[0] == 1
    assert sorted(raw.hkeys(keys.anomalies_key(S, 0))) == [b"new", b"x"]
    assert r.zrange(keys.anomaly_index_key(S, 0), 0, -1) == ["new", "x"]


Mutation = Callable[[Call], object]


def z_set(i: int, value: Any) -> Mutation:
    def mutate(c: Call) -> None:
        c.header["z"][-1][i] = value

    return mutate


def a_set(i: int, value: Any) -> Mutation:
    def mutate(c: Call) -> None:
        c.header["a"][i] = value

    return mutate


def empty_field_to_delete(c: Call) -> None:
    c.header["d"].append(1)
    c.args.insert(len(c.args) - 2, b"")  # before the two anomaly records


def inf_score(c: Call) -> None:
    c.header["z"][-1][3] = [123456789, "d9"]
    c.text = orjson.dumps(c.header).replace(b"123456789", b"1e999")


MALFORMED: dict[str, tuple[Mutation, str]] = {
    "z not an array": (lambda c: c.header.update(z=5), "z must be an array"),
    "z mode unknown": (z_set(2, "add"), "mode must be set, gt or incr"),
    "z expire fractional": (z_set(1, 1.5), "expire-at must be an integer"),
    "z pairs odd": (z_set(3, [1, "a", 2]), "needs (score, member) pairs"),
    "z pairs empty": (z_set(3, []), "needs (score, member) pairs"),
    "z score a string": (z_set(3, ["1", "a"]), "is not a finite number"),
    "z score infinite": (inf_score, "is not a finite number"),
    "z member empty": (z_set(3, [1, ""]), "is not a name"),
    "z key index of the progress hash": (z_set(0, 1), "is not within 2.."),
    "d n one too many": (lambda c: c.header["d"].__setitem__(1, c.header["d"][1] + 1), "needs"),
    "d n zero": (lambda c: c.header["d"].__setitem__(1, 0), "d: n must be an integer >= 1"),
    "d not a pair": (lambda c: c.header.update(d=[3]), "d must be {key index, n[, m]}"),
    "d m negative": (lambda c: c.header["d"].append(-1), "d: m must be an integer >= 0"),
    "d m beyond the call": (lambda c: c.header["d"].append(9), "and 9 fields, the call has"),
    "d field to delete empty": (empty_field_to_delete, "d: field to delete 1 is empty"),
    "a too short": (lambda c: c.header["a"].pop(), "a must be {record key"),
    "a cut fractional": (a_set(3, 0.5), "a: cut must be an integer"),
    "a cap zero": (a_set(4, 0), "a: cap must be an integer >= 1"),
    "a entries not by 7": (lambda c: c.header["a"][5].pop(), "7 elements per anomaly"),
    "a id empty": (lambda c: c.header["a"][5].__setitem__(0, ""), "a: id 1 is not a name"),
    "a time fractional": (lambda c: c.header["a"][5].__setitem__(1, 0.5), "a: time 1"),
    "a score a number": (lambda c: c.header["a"][5].__setitem__(5, 0.9), "is not a string"),
    "a record missing": (lambda c: c.args.pop(), "a: needs 2 records"),
    "a record empty": (lambda c: c.args.__setitem__(-1, b""), "a: record 2 is empty"),
    "an extra argument": (lambda c: c.args.append(b"x"), "the header accounts for"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_analytics_block_writes_nothing(
    seeded: Seeded, raw: redis.Redis, case: str
) -> None:
    mutate, expected = MALFORMED[case]
    call = with_analytics(seeded.next_call())
    mutate(call)
    check_refused(seeded.r, raw, call, expected)
    check_applies(seeded.r, raw, with_analytics(seeded.next_call()))


@pytest.mark.parametrize(
    "key, holding",
    [
        (keys.board_key(S, 0, keys.Board.SITE_EVENTS, T), "hash"),
        (keys.detector_key(S, 0), "zset"),
        (keys.anomalies_key(S, 0), "string"),
        (keys.feed_key(S, 0), "hash"),
    ],
)
def test_a_key_of_the_wrong_type_is_refused_before_writing(
    seeded: Seeded, raw: redis.Redis, key: str, holding: str
) -> None:
    r = seeded.r
    if holding == "hash":
        r.hset(key, "x", "1")
    elif holding == "zset":
        r.zadd(key, {"x": 1})
    else:
        r.set(key, "x")
    check_refused(r, raw, with_analytics(seeded.next_call()), "holds a")
