"""``pulse replay`` on a real stack: delete a range of windows, boards and anomalies, replay it
from the archive and from Kafka, and ``pulse verify`` is exact each time and the anomalies are
the worker's again; replaying twice leaves the same store; a range that is not closed or that
the archive does not hold is refused.

The run has late and bad records (``--late-rate``, ``--bad-rate``): the replay must classify
every event of the range as the worker did; and injected anomalies after the detectors' warm-up
(``--anomaly-after``), in the range.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import orjson
import pytest
import redis

from pipeline.archive.storage import ArchiveStore
from pipeline.replay import MINUTE_MS, ReplayRange
from pipeline.stack.testing import RunningStack, free_ports, stop_child
from schemas import anomaly, keys, packed
from schemas.events import EventKind
from tests.integration.harness import Pipeline, wait_for
from tests.integration.test_archive import start_archive
from tests.integration.test_hostile import send_unparsable

pytestmark = pytest.mark.integration


def range_keys(client: redis.Redis, t1: int, t2: int) -> list[bytes]:
    """Every window and board key whose instance starts within [t1, t2)."""
    out = []
    for pattern in (f"{keys.PREFIX}:{{*}}:w:*", f"{keys.PREFIX}:{{*}}:top:*"):
        for k in client.scan_iter(match=pattern, count=1000):
            start = int(k.rsplit(b":", 1)[1])
            if t1 <= start < t2:
                out.append(k)
    return sorted(out)


def contents(client: redis.Redis, names: list[bytes]) -> dict[bytes, tuple[object, int]]:
    """Each key's content and absolute expiry, compared by content: a DUMP of a hash in the
    store's hashtable encoding (values over 64 bytes) lists its fields in table order, which
    incremental rehashing changes over time, so equal hashes can DUMP differently."""
    pipe = client.pipeline(transaction=False)
    for k in names:
        pipe.type(k)
        # redis-py annotates PEXPIRETIME's key as str only (bytes keys work, as elsewhere)
        pipe.pexpiretime(k)  # type: ignore[arg-type]
    meta = pipe.execute()
    read: dict[bytes, Callable[[bytes], object]] = {
        b"hash": lambda k: client.hgetall(k),
        b"zset": lambda k: client.zrange(k, 0, -1, withscores=True),
        b"stream": lambda k: client.xrange(k),
        b"string": lambda k: client.get(k),
        b"list": lambda k: client.lrange(k, 0, -1),
        b"set": lambda k: client.smembers(k),
    }
    out: dict[bytes, tuple[object, int]] = {}
    for i, k in enumerate(names):
        kind, expiry = meta[2 * i], meta[2 * i + 1]
        out[k] = ((kind, read[kind](k) if kind in read else None), expiry)
    return out


def text(x: object) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def range_anomalies(raw: redis.Redis, parts: int, t1: int, t2: int) -> dict[str, bytes]:
    """The stored anomaly records indexed within [t1, t2), by id."""
    out: dict[str, bytes] = {}
    for kind in EventKind:
        for p in range(parts):
            ids = [
                text(i) for i in raw.zrangebyscore(keys.anomaly_index_key(kind, p), t1, f"({t2}")
            ]
            if ids:
                blobs = raw.hmget(keys.anomalies_key(kind, p), ids)
                out.update((i, b) for i, b in zip(ids, blobs, strict=True) if isinstance(b, bytes))
    return out


def delete_anomalies(raw: redis.Redis, ids: list[str]) -> None:
    """Delete anomaly records and their index entries."""
    for aid in ids:
        kind, p, *_ = anomaly.parse_anomaly_id(aid)
        raw.hdel(keys.anomalies_key(kind, p), aid)
        raw.zrem(keys.anomaly_index_key(kind, p), aid)


def same_anomalies(got: dict[str, bytes], want: dict[str, bytes]) -> int:
    """Assert two sets of anomaly records are the same anomalies (floats may differ in the last
    bits: a window's sums can add up in another order); how many are byte-identical."""
    assert sorted(got) == sorted(want)
    for aid, blob in got.items():
        a, w = anomaly.decode_record(blob), anomaly.decode_record(want[aid])
        assert (a.entity, a.signal, a.cause, a.window_start_ms, a.context) == (
            w.entity, w.signal, w.cause, w.window_start_ms, w.context,
        ), aid  # fmt: skip
        assert a.score == pytest.approx(w.score, abs=1e-6), aid
        assert a.value == pytest.approx(w.value, rel=1e-9), aid
        assert a.expected == pytest.approx(w.expected, rel=1e-9, abs=1e-12), aid
        assert a.vector.tolist() == pytest.approx(w.vector.tolist(), abs=1e-5), aid
    return sum(got[i] == want[i] for i in got)


def live_keys(raw: redis.Redis) -> dict[bytes, tuple[object, int]]:
    """The keys a replay never writes: progress, detector states and live feeds."""
    names = [
        k
        for pattern in ("*:progress", "*:det", "*:feed")
        for k in raw.scan_iter(match=f"{keys.PREFIX}:{{*}}{pattern}", count=1000)
    ]
    return contents(raw, sorted(names))


def test_replay_rebuilds_a_deleted_range_exactly(stack: RunningStack, tmp_path: Path) -> None:
    pl = Pipeline.create(stack, tmp_path, PULSE_ARCHIVE_GROUP_ID=f"archive-{uuid.uuid4().hex[:8]}")
    client = stack.redis()
    client.flushall()
    url = str(tmp_path / "archive")
    truth_path = tmp_path / "truth.json"
    pl.loadgen(
        "--rate=0", "--sim-rate=12", "--duration=1800", "--devices=16", "--services=3",
        "--seed=11", "--bad-rate=0.01", "--late-rate=0.03", "--anomaly-rate=1",
        "--anomaly-after=1260", truth=truth_path,
    )  # fmt: skip
    worker = pl.worker()
    archive = start_archive(pl, url, tmp_path / "archive.log")
    store = ArchiveStore(url)
    try:
        pl.wait_applied(client, alive=worker.alive)
        ends = pl.end_offsets()

        def archived() -> bool:
            ext = store.extent()
            return all(
                ext[k].last_offsets.get(p, -1) >= ends[(pl.topics[k.value], p)] - 1
                for k, p in pl.input_partitions()
            )

        wait_for(archived, "the archive reached the end of every partition", 180,
                 alive=lambda: archive.poll() is None)  # fmt: skip
    finally:
        assert stop_child(archive) == 0
        worker.stop()
    res = pl.verify(truth_path)
    assert res.returncode == 0, res.stdout[-3000:]

    ext = store.extent()
    lo = min(e.min_event_time for e in ext.values() if e.min_event_time is not None)
    progress = pl.progress(client)
    # the last eight minutes closed in every partition: after the detectors' warm-up (100
    # windows), where the injected anomalies are
    closed = min(int(r[keys.Progress.WATERMARK]) for r in progress.values() if r)
    t2 = closed - closed % MINUTE_MS
    t1 = t2 - 8 * MINUTE_MS
    assert t1 >= lo + 17 * MINUTE_MS
    raw = redis.Redis(host="127.0.0.1", port=stack.store_settings.port)
    parts = stack.kafka_settings.partitions
    doomed = range_keys(raw, t1, t2)
    assert len(doomed) > 100
    assert any(b":top:" in k for k in doomed) and any(b":w:10s:" in k for k in doomed)
    before = {k: (raw.type(k), raw.hgetall(k) if raw.type(k) == b"hash" else
                  raw.zrange(k, 0, -1, withscores=True)) for k in doomed}  # fmt: skip
    want = range_anomalies(raw, parts, t1, t2)
    kinds = sorted({anomaly.parse_anomaly_id(i)[0] for i in want})
    print(f"\n{len(want)} anomalies in the range, of {kinds}")
    assert len(want) >= 5 and "sensor" in kinds, sorted(want)
    others = {k: raw.hgetall(k) for k in raw.scan_iter(match=f"{keys.PREFIX}:{{*}}:anom")}
    others = {k: {i: b for i, b in h.items() if text(i) not in want} for k, h in others.items()}
    untouched = live_keys(raw)

    def replay(*argv: str) -> None:
        res = pl.pulse("replay", f"--from={t1}", f"--to={t2}", *argv)
        assert res.returncode == 0, res.stderr[-3000:]
        print(f"\n{' '.join(argv)}: {res.stdout.strip()}")

    def delete_range() -> None:
        raw.delete(*doomed)
        delete_anomalies(raw, list(want))
        assert range_anomalies(raw, parts, t1, t2) == {}

    # detectors without a warm-up are too young (100 observations) to raise anything in eight
    # minutes
    delete_range()
    res = pl.verify(truth_path)
    assert res.returncode == 1, f"verify passed with the range deleted: {res.stdout[-500:]}"
    replay("--source=kafka", "--warmup=0", "--quiet")
    assert range_anomalies(raw, parts, t1, t2) == {}

    for source in ("archive", "kafka"):
        delete_range()
        replay(f"--source={source}", f"--url={url}")
        assert range_keys(raw, t1, t2) == doomed, f"{source}: other keys than the worker's"
        res = pl.verify(truth_path)
        assert res.returncode == 0, f"{source}: {res.stdout[-3000:]}"
        # counts and maxima equal the worker's exactly (floats may differ in the last bits)
        for k in doomed:
            if b":top:" in k and b".p99:" not in k:
                assert raw.zrange(k, 0, -1, withscores=True) == before[k][1], k
        # the worker's anomalies, under the same ids; the others, the feeds, the detector
        # states and the progress hashes untouched
        identical = same_anomalies(range_anomalies(raw, parts, t1, t2), want)
        print(f"{source}: {len(want)} anomalies again, {identical} byte-identical")
        for k, h in others.items():
            assert {i: b for i, b in raw.hgetall(k).items() if text(i) not in want} == h
        assert live_keys(raw) == untouched

    # replaying twice leaves the same store; progress hashes are never touched
    anomaly_keys = sorted(raw.scan_iter(match=f"{keys.PREFIX}:{{*}}:anom*"))
    first = contents(raw, doomed + anomaly_keys)
    replay("--source=kafka", "--quiet")
    assert contents(raw, doomed + anomaly_keys) == first
    assert pl.progress(client) == progress
    assert live_keys(raw) == untouched

    # refusals: one sentence, exit 1, nothing written
    newest = max(int(r[keys.Progress.WATERMARK]) for r in progress.values() if r)
    # past the newest watermark, and by less than a minute (the event times end at the wall
    # clock, so the range does not end in the future, which would be refused before this)
    res = pl.pulse("replay", f"--from={newest - MINUTE_MS}", f"--to={newest + 1}",
                   f"--url={url}")  # fmt: skip
    assert res.returncode == 1 and "is not closed for the range" in res.stderr, res.stderr
    assert res.stderr.count("\n") == 1
    res = pl.pulse("replay", f"--from={lo - 3 * MINUTE_MS}", f"--to={t2}", f"--url={url}")
    assert res.returncode == 1 and "after the range" in res.stderr, res.stderr
    # a file of the archive damaged since it was written
    victim = ArchiveStore(url).files(EventKind.SENSOR, t1, t2)[0]
    (Path(url) / victim.path).write_bytes(b"not parquet")
    res = pl.pulse("replay", f"--from={t1}", f"--to={t2}", f"--url={url}")
    assert res.returncode == 1, res.stderr
    assert res.stderr.startswith(f"pulse replay: the archive at {url} cannot be read: "), res.stderr
    assert res.stderr.count("\n") == 1
    # an archive URL that is a file, and a Kafka that does not answer
    (not_a_dir := tmp_path / "a-file").write_bytes(b"")
    res = pl.pulse("replay", f"--from={t1}", f"--to={t2}", f"--url={not_a_dir}")
    assert res.returncode == 1, res.stderr
    assert res.stderr.startswith(f"pulse replay: cannot read the archive at {not_a_dir}: ")
    assert res.stderr.count("\n") == 1, res.stderr
    (closed,) = free_ports(1)
    down = replace(pl, env={**pl.env, "PULSE_KAFKA_BOOTSTRAP": f"127.0.0.1:{closed}"})
    res = down.pulse("replay", f"--from={t1}", f"--to={t2}", "--source=kafka")
    assert res.returncode == 1, res.stderr
    assert res.stderr.startswith("pulse replay: cannot read Kafka at 127.0.0.1:"), res.stderr
    assert res.stderr.count("\n") == 1, res.stderr
    assert contents(raw, doomed + anomaly_keys) == first
    client.close()
    raw.close()


def test_replay_refuses_an_empty_store(stack: RunningStack, tmp_path: Path) -> None:
    pl = Pipeline.create(stack, tmp_path)
    client = stack.redis()
    client.flushall()
    res = pl.pulse("replay", "--from=2025-01-01T00:00", "--to=2025-01-01T00:05", "--source=kafka")
    assert res.returncode == 1
    assert "no worker has applied anything" in res.stderr
    client.close()


def test_replay_from_kafka_reads_past_records_the_client_cannot_parse(
    stack: RunningStack, tmp_path: Path
) -> None:
    """Records whose header key is not UTF-8 (aiokafka cannot parse them) first in their
    partitions: the worker dead-letters them, and a replay from Kafka reads past them, counts
    them as invalid and rebuilds the range so that ``pulse verify`` is exact again."""
    pl = Pipeline.create(stack, tmp_path)
    client = stack.redis()
    client.flushall()
    # Kafka stamps records when they are produced: any range's search by time finds these
    # first, so the replay reads each of them
    unreadable = send_unparsable(pl, random.Random(5), 0, int(time.time() * 1000))
    truth_path = tmp_path / "truth.json"
    truth = pl.loadgen("--rate=0", "--sim-rate=12", "--duration=900", "--devices=8",
                       "--services=2", "--seed=13", truth=truth_path)  # fmt: skip
    for topic, p, _ in unreadable:  # the truth of what was produced: these are dead letters
        kind = next(k for k, t in pl.topics.items() if t == topic)
        truth["dead"][kind] = truth["dead"].get(kind, 0) + 1
        row = truth["per_partition"][kind].setdefault(str(p), {})
        for name in ("dead", "produced"):
            row[name] = row.get(name, 0) + 1
    truth_path.write_bytes(orjson.dumps(truth))
    worker = pl.worker()
    try:
        pl.wait_applied(client, alive=worker.alive)
    finally:
        worker.stop()
    res = pl.verify(truth_path)
    assert res.returncode == 0, res.stdout[-3000:]
    assert set(pl.diverted()) >= set(unreadable)  # the worker dead-lettered each of them

    progress = pl.progress(client)
    closed = min(int(r[keys.Progress.WATERMARK]) for r in progress.values() if r)
    t2 = closed - closed % MINUTE_MS
    t1 = t2 - 4 * MINUTE_MS
    raw = redis.Redis(host="127.0.0.1", port=stack.store_settings.port)
    doomed = range_keys(raw, t1, t2)
    assert len(doomed) > 20
    raw.delete(*doomed)
    assert pl.verify(truth_path).returncode == 1
    res = pl.pulse("replay", f"--from={t1}", f"--to={t2}", "--source=kafka", "--quiet")
    assert res.returncode == 0, res.stderr[-3000:]
    # the load generator made no bad records: every invalid one is a record it could not parse
    assert f"{len(unreadable)} invalid)" in res.stdout, res.stdout
    assert range_keys(raw, t1, t2) == doomed
    res = pl.verify(truth_path)
    assert res.returncode == 0, res.stdout[-3000:]
    client.close()
    raw.close()


def test_names_that_are_not_utf8_in_the_store_are_passed_over(
    stack: RunningStack, store: redis.Redis
) -> None:
    """Keys and fields someone else wrote with bytes that are not UTF-8 do not stop a replay's
    reads: such a key is no key of the worker's, and a window holding such a field is left out
    of the detectors' warm-up like a window that does not decode (it was a traceback)."""
    from pipeline.replay_command import existing_keys, stored_partitions, warmup_windows
    from pipeline.settings import WorkerSettings

    store = stack.redis(decode=False)  # the replay's client reads bytes (``store`` emptied it)
    s, t0 = EventKind.SENSOR, 1_700_000_040_000
    good = keys.window_key(s, 0, keys.WINDOW_10S, keys.Dim.DEVICE, t0)
    bad = keys.window_key(s, 0, keys.WINDOW_10S, keys.Dim.DEVICE, t0 + 10_000)
    stats = np.zeros((1, packed.NF_SENSOR))
    stats[0, [packed.COUNT, packed.SUM, packed.SUMSQ]] = 3.0, 60.0, 1200.0
    stats[0, [packed.MIN, packed.MAX, packed.FIRST, packed.LAST, packed.REPEATS]] = (
        20,
        20,
        20,
        20,
        2,
    )
    no_buckets = np.zeros(0, dtype=np.int64)
    (value,) = packed.encode(packed.Table(stats, no_buckets, no_buckets, no_buckets))
    store.hset(good, "d1|temp", value)
    store.hset(bad, mapping={b"d1|temp": value, b"\xff\xfe|temp": value})
    store.hset(
        keys.progress_key(s, 0), mapping={keys.Progress.OFFSET: 9, keys.Progress.TOPIC: b"\xff"}
    )
    store.hset(f"{keys.PREFIX}:{{sensor.0}}:w:\xff".encode("latin-1"), "x", "y")
    store.hset(keys.progress_key(s, 1).encode() + b"\xff", "offset", 1)

    parts = stored_partitions(store, s)
    assert list(parts) == [0] and parts[0].offset == 9 and parts[0].topic == "\ufffd"
    plan = WorkerSettings().window_plan()
    rng = ReplayRange(t0, t0 + 60_000)
    assert {p: sorted(ks) for p, ks in existing_keys(store, s, rng, plan).items()} == {
        0: sorted([good, bad])
    }
    got = warmup_windows(store, s, [0], keys.Dim.DEVICE, range(t0, t0 + 20_000, 10_000))
    assert [(start, names) for start, names, _ in got[0]] == [(t0, ["d1|temp"])]


def test_keys_of_another_type_are_left_out_of_a_replay_s_reads(
    stack: RunningStack, store: redis.Redis
) -> None:
    """A key the replay reads that holds another type (written by something other than a
    worker) leaves out that one thing, logged, as a worker's restore does: a partition whose
    progress it is, a window of the detectors' warm-up, a partition's stored anomalies."""
    from pipeline.replay_command import stored_anomalies, stored_partitions, warmup_windows

    store = stack.redis(decode=False)
    s, t0 = EventKind.SENSOR, 1_700_000_040_000
    store.hset(keys.progress_key(s, 0), mapping={keys.Progress.OFFSET: 9})
    store.set(keys.progress_key(s, 1), "not a hash")
    assert list(stored_partitions(store, s)) == [0]
    good = keys.window_key(s, 0, keys.WINDOW_10S, keys.Dim.DEVICE, t0)
    bad = keys.window_key(s, 0, keys.WINDOW_10S, keys.Dim.DEVICE, t0 + 10_000)
    stats = np.zeros((1, packed.NF_SENSOR))
    stats[0, [packed.COUNT, packed.SUM, packed.SUMSQ, packed.MIN, packed.MAX]] = 1, 2, 4, 2, 2
    no_buckets = np.zeros(0, dtype=np.int64)
    (value,) = packed.encode(packed.Table(stats, no_buckets, no_buckets, no_buckets))
    store.hset(good, "d1|temp", value)
    store.rpush(bad, "a list")
    got = warmup_windows(store, s, [0], keys.Dim.DEVICE, range(t0, t0 + 20_000, 10_000))
    assert [(start, names) for start, names, _ in got[0]] == [(t0, ["d1|temp"])]
    store.set(keys.anomaly_index_key(s, 0), "not a sorted set")
    assert stored_anomalies(store, s, 0, ReplayRange(t0, t0 + 60_000)) == []
