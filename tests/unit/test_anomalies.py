"""Reading anomalies back (``dashboard.anomalies``) over an in-memory fake of the store:
decoding hostile records, merging partitions newest first, the vector source, and the
one-sentence errors of ``pulse similar`` / ``pulse anomalies``."""

from __future__ import annotations

import contextlib
import fnmatch
import json
import random
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dashboard import anomalies as an
from dashboard import queries
from dashboard.similar import SimilarIndex
from pipeline.cli import build_parser, main
from pipeline.settings import StackSettings
from schemas import keys
from schemas.anomaly import (
    VECTOR_DIM,
    AnomalyRecord,
    anomaly_id,
    encode_record,
    parse_anomaly_id,
)
from schemas.events import EventKind

SENSOR, APPLOG = EventKind.SENSOR, EventKind.APPLOG
T0 = 1_764_321_000_000  # a 10 s window boundary


# --------------------------------------------------------------------------- a fake store


class FakePipe:
    """Queues calls to a :class:`FakeStore` and runs them on ``execute``."""

    def __init__(self, store: FakeStore) -> None:
        self._store = store
        self._calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def __getattr__(self, name: str) -> Any:
        def queue(*args: Any, **kwargs: Any) -> FakePipe:
            self._calls.append((name, args, kwargs))
            return self

        return queue

    def execute(self) -> list[Any]:
        self._store.round_trips += 1
        calls, self._calls = self._calls, []
        return [getattr(self._store, name)(*args, **kwargs) for name, args, kwargs in calls]


class FakeStore:
    """The few store commands the reader uses, with redis-py's reply shapes (bytes)."""

    def __init__(self) -> None:
        self.hashes: dict[str, dict[bytes, bytes]] = {}
        self.zsets: dict[str, dict[bytes, float]] = {}
        self.streams: dict[str, list[tuple[bytes, dict[bytes, bytes]]]] = {}
        self.round_trips = 0

    @staticmethod
    def _b(x: str | bytes) -> bytes:
        return x.encode() if isinstance(x, str) else x

    def pipeline(self, transaction: bool = True) -> FakePipe:
        return FakePipe(self)

    def close(self) -> None:
        pass

    def hget(self, key: str, field: str) -> bytes | None:
        self.round_trips += 1
        return self.hashes.get(key, {}).get(self._b(field))

    def hmget(self, key: str, fields: Sequence[str]) -> list[bytes | None]:
        h = self.hashes.get(key, {})
        return [h.get(self._b(f)) for f in fields]

    def hscan(
        self, key: str, cursor: int = 0, count: int = 10, no_values: bool = False
    ) -> tuple[int, list[bytes]]:
        names = sorted(self.hashes.get(key, {}))
        page = names[cursor : cursor + count]
        nxt = cursor + count
        return (0 if nxt >= len(names) else nxt), page

    def zrevrangebyscore(
        self, key: str, top: float | str, low: float, start: int, num: int, withscores: bool
    ) -> list[tuple[bytes, float]]:
        hi = float(top)
        rows = [(m, s) for m, s in self.zsets.get(key, {}).items() if low <= s <= hi]
        rows.sort(key=lambda row: (row[1], row[0]), reverse=True)
        return rows[start : start + num]

    def xrevrange(self, key: str, count: int) -> list[tuple[bytes, dict[bytes, bytes]]]:
        return list(reversed(self.streams.get(key, [])))[:count]

    def scan_iter(self, match: str, count: int, _type: str) -> Iterator[bytes]:
        pools: dict[str, Mapping[str, object]] = {
            "hash": self.hashes,
            "stream": self.streams,
            "zset": self.zsets,
        }
        pool = pools[_type]
        escaped = match.replace("[", "[[]")
        return iter([k.encode() for k in pool if fnmatch.fnmatchcase(k, escaped)])

    # writing, as the worker does
    def put(self, rec: AnomalyRecord, feed: bool = True) -> None:
        self.hashes.setdefault(keys.anomalies_key(rec.kind, rec.partition), {})[rec.id.encode()] = (
            encode_record(rec)
        )
        self.zsets.setdefault(keys.anomaly_index_key(rec.kind, rec.partition), {})[
            rec.id.encode()
        ] = float(rec.window_start_ms)
        if feed:
            stream = self.streams.setdefault(keys.feed_key(rec.kind, rec.partition), [])
            entry = f"{rec.window_start_ms + 10_500}-{len(stream)}".encode()
            fields = {
                "id": rec.id, "entity": rec.entity, "signal": rec.signal, "cause": rec.cause,
                "score": repr(rec.score), "t": str(rec.window_start_ms), "value": repr(rec.value),
            }  # fmt: skip
            stream.append((entry, {k.encode(): v.encode() for k, v in fields.items()}))

    def remove(self, anomaly: str) -> None:
        kind, part, *_ = parse_anomaly_id(anomaly)
        self.hashes[keys.anomalies_key(kind, part)].pop(anomaly.encode())
        self.zsets[keys.anomaly_index_key(kind, part)].pop(anomaly.encode())


def record(
    kind: EventKind,
    partition: int,
    start: int,
    entity: str = "dev-1|temp",
    signal: str | None = None,
    vector: npt.ArrayLike | None = None,
    score: float = 0.9,
) -> AnomalyRecord:
    signal = signal or ("mean" if kind is SENSOR else "latency_p50")
    vec = np.asarray(
        vector if vector is not None else np.random.default_rng(start).standard_normal(VECTOR_DIM),
        dtype=np.float32,
    )
    return AnomalyRecord(
        id=anomaly_id(kind.value, partition, start, entity, signal),
        kind=kind.value, partition=partition, entity=entity, signal=signal, cause="spike",
        window_start_ms=start, window_ms=10_000, score=score, value=42.0, expected=20.0,
        context={"n": 3}, vector=vec,
    )  # fmt: skip


def filled(n_per_part: int = 5) -> tuple[FakeStore, list[AnomalyRecord], list[an.Part]]:
    """Records in five partitions of both kinds, window starts interleaved across them."""
    store = FakeStore()
    parts: list[an.Part] = [(SENSOR, 0), (SENSOR, 1), (SENSOR, 4), (APPLOG, 0), (APPLOG, 2)]
    recs = []
    for i in range(n_per_part):
        for j, (kind, p) in enumerate(parts):
            entity = f"dev-{j}|temp" if kind is SENSOR else f"svc-{j}"
            rec = record(kind, p, T0 + (i * len(parts) + j) * 10_000, entity)
            store.put(rec)
            recs.append(rec)
    return store, recs, parts


def fake(store: FakeStore) -> Any:
    return store  # the reader's functions take a redis.Redis: the fake quacks like one


# --------------------------------------------------------------------------- decoding


def test_a_stored_record_decodes_under_its_own_id() -> None:
    rec = record(SENSOR, 3, T0)
    got = an.decode_stored(rec.id, encode_record(rec), (SENSOR, 3))
    assert got.id == rec.id and got.entity == rec.entity and got.context == {"n": 3}
    np.testing.assert_array_equal(got.vector, rec.vector)


def test_a_record_filed_under_another_id_or_partition_is_bad() -> None:
    rec = record(SENSOR, 3, T0)
    other = record(SENSOR, 3, T0 + 10_000)
    with pytest.raises(an.BadRecordError, match="filed under"):
        an.decode_stored(other.id, encode_record(rec))
    with pytest.raises(an.BadRecordError, match="partition"):
        an.decode_stored(rec.id, encode_record(rec), (SENSOR, 4))
    with pytest.raises(an.BadRecordError):
        an.decode_stored("not-an-id", encode_record(rec))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_any_bytes_are_a_record_or_a_bad_record(blob: bytes) -> None:
    rec = record(SENSOR, 0, T0)
    with contextlib.suppress(an.BadRecordError):
        an.decode_stored(rec.id, blob)


@settings(max_examples=300, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
        max_leaves=12,
    ),
    st.sampled_from(["id", "partition", "window_start_ms", "score", "context", "kind"]),
)
def test_a_record_with_hostile_json_is_a_bad_record(value: object, name: str) -> None:
    rec = record(SENSOR, 0, T0)
    blob = encode_record(rec)
    head = 7  # magic, version, JSON length
    body = json.loads(blob[head : -4 * VECTOR_DIM])
    body[name] = value
    raw = json.dumps(body).encode()  # big integers, NaN: what orjson would not write
    hostile = b"PA\x01" + len(raw).to_bytes(4, "little") + raw + blob[-4 * VECTOR_DIM :]
    try:
        got = an.decode_stored(rec.id, hostile)
    except an.BadRecordError:
        return
    assert got.id == rec.id


def test_a_feed_entry_decodes_and_a_malformed_one_is_refused() -> None:
    store = FakeStore()
    rec = record(APPLOG, 2, T0, "checkout")
    store.put(rec)
    ((entry_id, fields),) = store.streams[keys.feed_key(APPLOG, 2)]
    e = an.decode_feed_entry(entry_id, fields)
    assert (e.id, e.kind, e.partition, e.t_ms, e.score) == (rec.id, APPLOG, 2, T0, 0.9)
    for broken in ({**fields, b"t": b"soon"}, {k: v for k, v in fields.items() if k != b"id"},
                   {**fields, b"score": b"nan"}, {**fields, b"id": b"\xff"}):  # fmt: skip
        with pytest.raises(ValueError, match="malformed feed entry"):
            an.decode_feed_entry(entry_id, broken)


# --------------------------------------------------------------------------- merging


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.lists(st.integers(0, 20), max_size=12), max_size=6),
    st.integers(0, 30),
    st.randoms(use_true_random=False),
)
def test_merging_partitions_equals_sorting_them_all(
    times: list[list[int]], limit: int, rnd: random.Random
) -> None:
    per_part = [
        sorted(((float(t), f"p{p}:{i:03d}") for i, t in enumerate(ts)), reverse=True)
        for p, ts in enumerate(times)
    ]
    want = sorted((row for rows in per_part for row in rows), reverse=True)[:limit]
    assert an.merge_newest(per_part, limit) == want
    rnd.shuffle(per_part)  # the partitions' order does not matter, ties included
    assert an.merge_newest(per_part, limit) == want


def test_an_id_listed_twice_is_merged_once() -> None:
    assert an.merge_newest([[(2.0, "a"), (1.0, "b")], [(2.0, "a")]], 10) == [(2.0, "a"), (1.0, "b")]


# --------------------------------------------------------------------------- reads


def test_recent_merges_every_partition_of_both_kinds_newest_first() -> None:
    store, recs, parts = filled()
    got = an.recent(fake(store), parts, since_ms=T0, limit=7)
    want = sorted(recs, key=lambda r: r.window_start_ms, reverse=True)[:7]
    assert [r.id for r in got.records] == [r.id for r in want]
    assert {r.kind for r in got.records} == {"sensor", "applog"}
    assert (got.skipped, got.missing) == (0, 0)
    assert store.round_trips == 2  # the ids of every partition, then the records


def test_recent_keeps_to_the_time_range() -> None:
    store, recs, parts = filled()
    lo, hi = T0 + 50_000, T0 + 120_000
    got = an.recent(fake(store), parts, since_ms=lo, until_ms=hi, limit=100)
    want = sorted(
        (r for r in recs if lo <= r.window_start_ms <= hi),
        key=lambda r: r.window_start_ms,
        reverse=True,
    )
    assert [r.id for r in got.records] == [r.id for r in want] and len(want) == 8
    assert an.recent(fake(store), parts, since_ms=T0, limit=0).records == []
    assert an.recent(fake(store), [], since_ms=T0).records == []


def test_recent_skips_and_counts_hostile_members_and_records() -> None:
    store, recs, parts = filled(2)
    newest = max(recs, key=lambda r: r.window_start_ms)
    kind, part = SENSOR, 1
    store.zsets[keys.anomaly_index_key(kind, part)][b"garbage"] = float(T0 + 10**9)
    store.zsets[keys.anomaly_index_key(kind, part)][b"\xff\xfe"] = float(T0 + 10**9)
    wrong = record(APPLOG, 0, T0 + 10**9, "svc-x")  # indexed in a partition it does not belong to
    store.zsets[keys.anomaly_index_key(kind, part)][wrong.id.encode()] = float(T0 + 10**9)
    bad = record(SENSOR, 4, T0 + 10**9 - 1)
    store.put(bad)
    store.hashes[keys.anomalies_key(SENSOR, 4)][bad.id.encode()] = b"PA\x01garbage"
    gone = record(SENSOR, 0, T0 + 10**9 - 2)
    store.put(gone)
    del store.hashes[keys.anomalies_key(SENSOR, 0)][gone.id.encode()]
    got = an.recent(fake(store), parts, since_ms=0, limit=3)
    assert got.skipped == 4 and got.missing == 1
    assert [r.id for r in got.records] == [newest.id]  # the bounded candidates were bad ones


def test_get_and_get_many() -> None:
    store, recs, _ = filled(2)
    got = an.get(fake(store), recs[3].id)
    assert got is not None and got.id == recs[3].id
    assert an.get(fake(store), record(SENSOR, 5, T0).id) is None
    with pytest.raises(ValueError, match="not an anomaly id"):
        an.get(fake(store), "sensor.0:nope")
    store.hashes[keys.anomalies_key(SENSOR, 0)][recs[0].id.encode()] = b"junk"
    with pytest.raises(an.BadRecordError):
        an.get(fake(store), recs[0].id)
    many = an.get_many(fake(store), [recs[4].id, "junk", recs[0].id, recs[2].id, recs[4].id])
    assert [r.id for r in many.records] == [recs[4].id, recs[2].id]
    assert many.skipped == 2


def test_the_feed_is_the_latest_entries_over_partitions_by_time() -> None:
    store, recs, parts = filled(4)
    stream = store.streams[keys.feed_key(SENSOR, 1)]
    stream.append((b"1-0", {b"id": b"nonsense"}))
    other = record(APPLOG, 2, T0 + 10**9, "svc-x")  # an entry in the wrong partition's feed
    store.put(other)
    store.streams[keys.feed_key(SENSOR, 0)].append(store.streams[keys.feed_key(APPLOG, 2)].pop())
    got = an.feed(fake(store), parts, n=6)
    want = sorted(recs, key=lambda r: r.window_start_ms, reverse=True)[:6]
    assert [e.id for e in got.entries] == [r.id for r in want]
    assert got.skipped == 2
    assert an.feed(fake(store), parts, n=0).entries == []


def test_partitions_are_discovered_from_anomaly_hashes_and_feeds() -> None:
    store, _, parts = filled(1)
    store.streams[keys.feed_key(APPLOG, 7)] = []
    store.hashes["pulse:{bogus.1}:anom"] = {}
    assert set(an.discover_partitions(fake(store))) == {*parts, (APPLOG, 7)}


# --------------------------------------------------------------------------- vector source


def test_the_store_vectors_list_every_id_in_bounded_scans(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(an, "SCAN_COUNT", 3)
    store, recs, parts = filled(7)
    src = an.StoreVectors(fake(store), parts)
    assert src.ids() == {r.id for r in recs}
    assert store.round_trips == 3  # 7 ids per partition, 3 per scan, partitions pipelined


def test_the_store_vectors_skip_and_count_hostile_ids_and_records(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(an, "VECTOR_BATCH", 4)
    store, recs, parts = filled(3)
    h = store.hashes[keys.anomalies_key(SENSOR, 1)]
    h[b"not-an-id"] = b"x"
    h[record(SENSOR, 2, T0).id.encode()] = encode_record(record(SENSOR, 2, T0))  # misfiled
    h[recs[1].id.encode()] = b"PA\x01\x00\x00\x00\x00"  # truncated
    src = an.StoreVectors(fake(store), parts)
    ids = src.ids()
    assert src.skipped == 2 and recs[1].id in ids
    vectors = src.vectors([*sorted(ids), "junk"])
    assert set(vectors) == {r.id for r in recs} - {recs[1].id}
    assert src.skipped == 4
    for r in recs[2:]:
        np.testing.assert_array_equal(vectors[r.id], r.vector)
    # an index built from it holds the good ones and answers
    index = SimilarIndex.build(src)
    assert index.ids() == set(vectors)


# --------------------------------------------------------------------------- command line


def test_both_commands_are_in_the_pulse_parser() -> None:
    args = build_parser().parse_args(["similar", "sensor.0:1:d|m:mean", "-k", "3"])
    assert (args.anomaly_id, args.k, args.index) == ("sensor.0:1:d|m:mean", 3, None)
    args = build_parser().parse_args(["anomalies", "--since", "15m", "-n", "4"])
    assert (args.since, args.n) == (15 * 60_000, 4)
    assert build_parser().parse_args(["anomalies"]).since == 3_600_000


@pytest.mark.parametrize(
    ("text", "ms"), [("90s", 90_000), ("15m", 900_000), ("2h", 7_200_000), ("1d", 86_400_000),
                     ("30", 30_000), ("1.5h", 5_400_000)],
)  # fmt: skip
def test_durations(text: str, ms: int) -> None:
    assert an.parse_duration(text) == ms


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["anomalies", "--since", "soon"], "expected a duration such as"),
        (["anomalies", "--since", "0m"], "must be at least 1 ms"),
        (["anomalies", "--since", "0.0000001s"], "must be at least 1 ms"),
        (["anomalies", "--since", "367d"], "at most 366d"),
        (["anomalies", "-n", "0"], "must be >= 1"),
        (["similar", "sensor.0:1:d|m:mean", "-k", "x"], "expected a whole number"),
        (["similar"], "required"),
    ],
)
def test_a_bad_flag_is_one_sentence(
    argv: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"pulse {argv[0]}: ") and says in err and "Traceback" not in err


@pytest.mark.parametrize("bad", ["nope", "sensor.x:1:d:mean", "sensor.0:1:d|m:latency_p50"])
def test_a_malformed_id_is_one_sentence(bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["similar", bad]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pulse similar: not an anomaly id") and err.count("\n") == 1


@pytest.mark.parametrize("argv", [["similar", "sensor.0:1:d|m:mean"], ["anomalies"]])
def test_an_unreachable_store_is_one_sentence(
    argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PULSE_STORE_PORT", "1")  # nothing listens there
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"pulse {argv[0]}: cannot read the store at 127.0.0.1:1")
    assert err.count("\n") == 1


@pytest.fixture
def on_fake(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> FakeStore:
    """``pulse similar``/``anomalies`` reading the fake store, with the home in ``tmp_path``."""
    store, _, _ = filled(4)
    monkeypatch.setattr(queries, "reader_client", lambda *a, **k: store)
    monkeypatch.setenv("PULSE_HOME", str(tmp_path))
    return store


def test_an_unknown_id_is_one_sentence(
    on_fake: FakeStore, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["similar", record(SENSOR, 3, T0).id]) == 1
    err = capsys.readouterr().err
    assert err.startswith("pulse similar: no anomaly sensor.3:") and err.count("\n") == 1


def test_an_unreadable_or_vectorless_anomaly_is_one_sentence(
    on_fake: FakeStore, capsys: pytest.CaptureFixture[str]
) -> None:
    flat = record(SENSOR, 0, T0 - 10_000, vector=[0.0] * VECTOR_DIM)
    on_fake.put(flat)
    assert main(["similar", flat.id]) == 1
    assert "has no usable vector" in capsys.readouterr().err
    key = keys.anomalies_key(SENSOR, 0)
    on_fake.hashes[key][flat.id.encode()] = b"junk"
    assert main(["similar", flat.id]) == 1
    err = capsys.readouterr().err
    assert (
        err.startswith("pulse similar: the store's record is unreadable") and err.count("\n") == 1
    )


def test_an_index_path_that_cannot_be_written_is_one_sentence(
    on_fake: FakeStore, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    some = next(iter(on_fake.hashes[keys.anomalies_key(SENSOR, 0)])).decode()
    assert main(["similar", some, "--index", str(blocker / "idx")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("pulse similar: cannot keep the index in") and err.count("\n") == 1


def test_similar_prints_the_nearest_and_keeps_its_index_under_the_home(
    on_fake: FakeStore, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = np.random.default_rng(7).standard_normal(VECTOR_DIM).astype(np.float32)
    query = record(SENSOR, 0, T0 - 20_000, "dev-q|temp", vector=base)
    twin = record(APPLOG, 2, T0 - 30_000, "svc-twin", vector=base + 0.01)
    on_fake.put(query)
    on_fake.put(twin)
    assert main(["similar", query.id, "-k", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"anomaly {query.id}: dev-q|temp mean spike")
    assert out[1].split()[:2] == ["#", "anomaly"]
    assert out[2].split()[:3] == ["1", twin.id, "svc-twin"] and float(out[2].split()[-1]) > 0.99
    assert len(out) == 2 + 3 + 1 and "built from the store" in out[-1]
    assert (tmp_path / an.INDEX_DIR / "similar.hnsw").is_file()
    on_fake.remove(twin.id)  # gone from the store: the saved index is reconciled
    assert main(["similar", query.id, "-k", "3"]) == 0
    text = capsys.readouterr().out
    assert twin.id not in text and "-1 from the store" in text


def test_anomalies_lists_the_latest_newest_first(
    on_fake: FakeStore, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import time

    monkeypatch.setattr(time, "time_ns", lambda: (T0 + 200_000) * 1_000_000)
    assert main(["anomalies", "--since", "1m", "-n", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["time", "(UTC)", "anomaly"]
    starts = [int(line.split()[2].split(":")[1]) for line in out[1:]]
    assert starts == [T0 + 190_000, T0 + 180_000, T0 + 170_000]
    monkeypatch.setattr(time, "time_ns", lambda: (T0 + 10**9) * 1_000_000)
    assert main(["anomalies", "--since", "1m"]) == 0
    assert capsys.readouterr().out == "no anomalies in the last 1m\n"


def test_the_default_index_lives_under_the_stack_home(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PULSE_HOME", raising=False)
    assert an.default_index_dir() == StackSettings().home / "similar"
    monkeypatch.setenv("PULSE_HOME", "/srv/pulse")
    assert an.default_index_dir() == Path("/srv/pulse/similar")
