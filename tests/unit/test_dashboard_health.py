"""Pipeline and store health derivations: INFO, replicas, write rates, lag, diverted headers."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from dashboard import health
from dashboard.health import Sample, StoredOffset
from schemas import diverted
from schemas.events import EventKind

PRIMARY: dict[str, Any] = {
    "role": "master",
    "valkey_version": "9.1.2",
    "used_memory": 5_000_000,
    "used_memory_peak": 6_000_000,
    "maxmemory": 0,
    "instantaneous_ops_per_sec": 1234,
    "connected_clients": 7,
    "aof_enabled": 1,
    "aof_last_write_status": "ok",
    "aof_rewrite_in_progress": 0,
    "aof_current_size": 10_000,
    "master_repl_offset": 5_000,
    "connected_slaves": 1,
    "slave0": {"ip": "127.0.0.1", "port": 6380, "state": "online", "offset": 4_900, "lag": 1},
    "total_net_input_bytes": 77,
    "db0": {"keys": 10, "expires": 3},
    "db1": {"keys": 5, "expires": 0},
}


def test_store_health_of_a_primary() -> None:
    h = health.store_health(PRIMARY, "always")
    assert (h.role, h.version, h.keys, h.ops_per_s, h.clients) == ("master", "9.1.2", 15, 1234, 7)
    assert h.aof_enabled and h.aof_last_write_ok and h.fsync_always and h.aof_size == 10_000
    (r,) = h.replicas
    assert (r.name, r.state, r.lag_s, r.lag_bytes) == ("127.0.0.1:6380", "online", 1.0, 100)


def test_store_health_of_a_replica_and_without_aof() -> None:
    info = {
        "role": "slave", "master_host": "10.0.0.1", "master_port": 6379,
        "master_link_status": "down", "master_last_io_seconds_ago": -1, "aof_enabled": 0,
    }  # fmt: skip
    h = health.store_health(info, None)
    assert h.role == "replica" and not h.aof_enabled and h.aof_size is None
    assert not h.fsync_always and h.aof_last_write_ok is None
    (r,) = h.replicas
    assert r.state == "link down" and r.lag_s is None and "10.0.0.1:6379" in r.name


def test_written_per_hour_sums_growth_and_skips_rewrites() -> None:
    now = 10 * 3_600_000
    samples = [
        Sample(now - 120_000, 1_000, 50),
        Sample(now - 60_000, 2_000, 150),
        Sample(now - 30_000, 500, 250),  # a rewrite shrank the AOF: no growth counted
        Sample(now, 1_500, 350),
    ]
    rate, span = health.written_per_hour(samples, "aof_bytes", now)
    assert span == 120_000 and rate == pytest.approx(2_000 * 30)  # 2000 B in 2 min
    assert health.written_per_hour(samples, "repl_offset", now)[0] == pytest.approx(300 * 30)
    assert health.written_per_hour(samples[:1], "aof_bytes", now) == (None, 0)
    old = [Sample(now - 2 * 3_600_000, 0, 0), Sample(now, 100, 100)]
    assert health.written_per_hour(old, "aof_bytes", now) == (None, 0)  # one sample in the hour


def test_write_sampler_keeps_an_hour_at_most_one_sample_a_second() -> None:
    s = health.WriteSampler()
    for t in range(0, 2 * 3_600_000, 500):
        s.add(Sample(t, t, t))
    kept = s.samples()
    assert kept[-1].t_ms == 2 * 3_600_000 - 1_000
    assert kept[0].t_ms >= kept[-1].t_ms - 3_600_000
    assert all(b.t_ms - a.t_ms >= 1_000 for a, b in itertools.pairwise(kept))


def test_consumer_lag_from_store_offsets_and_kafka_ends() -> None:
    stored = [
        StoredOffset(EventKind.SENSOR, 0, "pulse.sensor", 99, 1_000, 2_000),
        StoredOffset(EventKind.SENSOR, 1, None, None, None, None),  # nothing applied yet
        StoredOffset(EventKind.APPLOG, 0, "pulse.applog", 10, None, None),
    ]
    defaults = {EventKind.SENSOR: "pulse.sensor", EventKind.APPLOG: "pulse.applog"}
    ends = {("pulse.sensor", 0): 150, ("pulse.sensor", 1): 7, ("pulse.applog", 0): 11}
    frame = health.consumer_lag(stored, ends, defaults)
    assert frame["lag"].tolist() == [50, 7, 0]
    assert frame["topic"].tolist() == ["pulse.sensor", "pulse.sensor", "pulse.applog"]
    assert health.total_lag(frame) == 57
    unknown = health.consumer_lag(stored, None, defaults)
    assert unknown["lag"].isna().all() and health.total_lag(unknown) is None
    assert unknown["applied offset"].tolist()[0] == 99


def test_kafka_view_counts_records_per_topic() -> None:
    view = health.KafkaView({("dl", 0): (3, 10), ("dl", 1): (0, 5), ("late", 0): (0, 0)})
    assert view.records("dl") == 12 and view.records("late") == 0 and view.records("x") == 0
    assert view.ends()[("dl", 0)] == 10


class _Cluster:
    def partitions_for_topic(self, topic: str) -> set[int] | None:
        return {0, 1} if topic in ("pulse.sensor", "dl", "late") else None


class _Client:
    async def fetch_all_metadata(self) -> _Cluster:
        return _Cluster()


class _Msg:
    def __init__(self, offset: int) -> None:
        self.offset, self.timestamp = offset, 1_700_000_000_000 + offset
        self.headers = [("pulse.reason", b"bad json")]


class _UnreadableDeadLetters:
    """A consumer over topics of two partitions with records 0-2 each; the second fetch of
    the dead-letter topic meets a record the client cannot parse."""

    def __init__(self, **kwargs: Any) -> None:
        self._client = _Client()
        self._pos: dict[Any, int] = {}
        self.fetches = 0

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def beginning_offsets(self, tps: list[Any]) -> dict[Any, int]:
        return {tp: 0 for tp in tps}

    async def end_offsets(self, tps: list[Any]) -> dict[Any, int]:
        return {tp: 3 for tp in tps}

    def assign(self, tps: list[Any]) -> None:
        self._pos = dict.fromkeys(tps, 0)

    def seek(self, tp: Any, offset: int) -> None:
        self._pos[tp] = offset

    async def getmany(self, timeout_ms: int) -> dict[Any, list[_Msg]]:
        self.fetches += 1
        if self.fetches > 1:
            raise ValueError("Cannot decode header key\nmore")
        tp = min(self._pos, key=lambda t: (t.topic, t.partition))
        msgs = [_Msg(o) for o in range(self._pos[tp], 3)]
        self._pos[tp] = 3
        return {tp: msgs}

    async def position(self, tp: Any) -> int:
        return self._pos[tp]


def test_an_unreadable_diverted_record_leaves_the_offsets_and_what_was_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Anyone can write to the dead-letter and late topics: a record there the Kafka client
    cannot parse costs the panel its remaining samples, not the lag and the counts."""
    import aiokafka

    monkeypatch.setattr(aiokafka, "AIOKafkaConsumer", _UnreadableDeadLetters)
    view = health.read_kafka("k:9", ["pulse.sensor"], ["dl", "late"], samples=5, timeout_s=5)
    assert set(view.offsets) == {(t, p) for t in ("pulse.sensor", "dl", "late") for p in (0, 1)}
    assert view.records("dl") == 6
    assert [(d.partition, d.offset) for d in view.diverted["dl"]] == [(0, 2), (0, 1), (0, 0)]
    assert view.diverted["late"] == []
    assert view.samples_problem == (
        "the newest diverted records could not all be read (Cannot decode header key)"
    )


def test_diverted_headers_are_the_workers() -> None:
    from pipeline.batch import Diverted, Record
    from pipeline.divert import _headers

    headers = _headers("pulse.sensor", 3, Diverted(Record(41, None, b"{"), "bad json"))
    info = diverted.parse_headers(headers)
    assert info == diverted.DivertedInfo("bad json", "pulse.sensor", 3, 41)
    assert {name for name, _ in headers} == set(diverted.HEADERS)


def test_diverted_headers_read_leniently() -> None:
    info = diverted.parse_headers(
        [("pulse.reason", b"\xff oops"), ("pulse.source.offset", b"x"), ("other", None),
         ("pulse.truncated", b"2000000")]
    )  # fmt: skip
    assert info.reason is not None and info.reason.endswith("oops")
    assert info.source_offset is None and info.source_topic is None
    assert info.truncated_from == 2_000_000


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_kafka_watch_reads_in_the_background_and_keeps_the_last_view() -> None:
    import threading

    clock = FakeClock()
    gate = threading.Event()
    calls: list[tuple[tuple[str, ...], tuple[str, ...]]] = []

    def read(topics: tuple[str, ...], diverted: tuple[str, ...]) -> health.KafkaView:
        calls.append((topics, diverted))
        gate.wait(10)
        if len(calls) > 1:
            raise health.KafkaUnavailableError("Kafka at x cannot be read: gone")
        return health.KafkaView({("t", 0): (0, 5)})

    watch = health.KafkaWatch(read, max_age_s=10, clock=clock)
    assert watch.start(["t"], ["dl"]) and not watch.start(["t"], ["dl"])  # one read at a time
    assert watch.result(0.01) == (None, "Kafka has not answered yet", None)
    gate.set()
    view, problem, age = watch.result(10)
    assert view is not None and view.records("t") == 5 and problem is None and age == 0
    clock.t += 5
    assert not watch.start(["t"], ["dl"])  # fresh enough
    clock.t += 6
    assert watch.start(["t"], ["dl"])  # stale: read again, this time Kafka is gone
    for _ in range(1000):
        if watch.result(0)[1] is not None:
            break
        threading.Event().wait(0.01)
    view, problem, _ = watch.result(0)
    assert view is None and problem is not None and "gone" in problem
    assert watch.start(["t", "u"], ["dl"])  # other topics: read at once
    assert len(calls) == 3


def _data(store: health.StoreHealth | None) -> Any:
    from dashboard import page, queries

    data = page.PageData.__new__(page.PageData)
    object.__setattr__(data, "store", store)
    object.__setattr__(data, "kpis", queries.Kpis(now_ms=0, progress={}, events_per_s={}))
    return data


def test_health_tiles_levels() -> None:
    from dashboard.page import health_tiles
    from dashboard.thresholds import Level

    good = {t.label: t for t in health_tiles(_data(health.store_health(PRIMARY, "always")), 0,
                                             True, (3600.0, 60_000, "AOF growth"))}  # fmt: skip
    assert good["Consumer lag"].level is Level.OK and good["AOF"].level is Level.OK
    assert good["fsync"].level is Level.OK and good["Replica lag"].value == "1 s"
    assert good["Written to the store"].value == "3.5 KiB/h"
    no_aof = dict(PRIMARY, aof_enabled=0, connected_slaves=0)
    bad = {t.label: t for t in health_tiles(_data(health.store_health(no_aof, "everysec")),
                                            200_000, True, (None, 0, "AOF growth"))}  # fmt: skip
    assert bad["AOF"].level is Level.CRIT and bad["fsync"].level is Level.WARN
    assert bad["Consumer lag"].level is Level.CRIT and bad["Replica lag"].value == "no replica"
    assert bad["Written to the store"].value == "measuring…"
    refused = health_tiles(_data(None), None, False, (None, 0, ""))
    assert [t.label for t in refused] == ["Consumer lag", "Dead letters", "Late events"]
    assert refused[0].note == "Kafka unreachable"
