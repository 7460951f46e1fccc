"""``pulse replay`` on a real stack: delete a range of windows and boards, replay it from the
archive and from Kafka, and ``pulse verify`` is exact each time; replaying twice leaves the
same store; a range that is not closed or that the archive does not hold is refused.

The run has late and bad records (``--late-rate``, ``--bad-rate``): the replay must classify
every event of the range as the worker did.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import redis

from pipeline.archive.storage import ArchiveStore
from pipeline.replay import MINUTE_MS
from pipeline.stack.testing import RunningStack, stop_child
from schemas import keys
from tests.integration.harness import Pipeline, wait_for
from tests.integration.test_archive import start_archive

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


def dumps(client: redis.Redis, names: list[bytes]) -> dict[bytes, tuple[bytes, int]]:
    pipe = client.pipeline(transaction=False)
    for k in names:
        pipe.dump(k)
        pipe.pexpiretime(k)
    got = pipe.execute()
    return {k: (got[2 * i], got[2 * i + 1]) for i, k in enumerate(names)}


def test_replay_rebuilds_a_deleted_range_exactly(stack: RunningStack, tmp_path: Path) -> None:
    pl = Pipeline.create(stack, tmp_path, PULSE_ARCHIVE_GROUP_ID=f"archive-{uuid.uuid4().hex[:8]}")
    client = stack.redis()
    client.flushall()
    url = str(tmp_path / "archive")
    truth_path = tmp_path / "truth.json"
    pl.loadgen(
        "--rate=0", "--sim-rate=12", "--duration=1500", "--devices=24", "--services=3",
        "--seed=11", "--bad-rate=0.01", "--late-rate=0.03", "--anomaly-rate=0",
        truth=truth_path,
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
    t1 = lo - lo % MINUTE_MS + 5 * MINUTE_MS
    t2 = t1 + 7 * MINUTE_MS
    raw = redis.Redis(host="127.0.0.1", port=stack.store_settings.port)
    doomed = range_keys(raw, t1, t2)
    assert len(doomed) > 100
    assert any(b":top:" in k for k in doomed) and any(b":w:10s:" in k for k in doomed)
    before = {k: (raw.type(k), raw.hgetall(k) if raw.type(k) == b"hash" else
                  raw.zrange(k, 0, -1, withscores=True)) for k in doomed}  # fmt: skip
    progress = pl.progress(client)

    for source in ("archive", "kafka"):
        raw.delete(*doomed)
        res = pl.verify(truth_path)
        assert res.returncode == 1, f"verify passed with the range deleted: {res.stdout[-500:]}"
        res = pl.pulse("replay", f"--from={t1}", f"--to={t2}", f"--source={source}",
                       f"--url={url}")  # fmt: skip
        assert res.returncode == 0, res.stderr[-3000:]
        print(f"\n{source}: {res.stdout.strip()}")
        assert range_keys(raw, t1, t2) == doomed, f"{source}: other keys than the worker's"
        res = pl.verify(truth_path)
        assert res.returncode == 0, f"{source}: {res.stdout[-3000:]}"
        # counts and maxima equal the worker's exactly (floats may differ in the last bits)
        for k in doomed:
            if b":top:" in k and b".p99:" not in k:
                assert raw.zrange(k, 0, -1, withscores=True) == before[k][1], k

    # replaying twice leaves the same store; progress hashes are never touched
    first = dumps(raw, doomed)
    res = pl.pulse("replay", f"--from={t1}", f"--to={t2}", "--source=kafka", "--quiet")
    assert res.returncode == 0, res.stderr[-3000:]
    assert dumps(raw, doomed) == first
    assert pl.progress(client) == progress

    # refusals: one sentence, exit 1, nothing written
    newest = max(int(r[keys.Progress.WATERMARK]) for r in progress.values() if r)
    res = pl.pulse("replay", f"--from={newest - MINUTE_MS}", f"--to={newest + MINUTE_MS}",
                   f"--url={url}")  # fmt: skip
    assert res.returncode == 1 and "is not closed for the range" in res.stderr, res.stderr
    assert res.stderr.count("\n") == 1
    res = pl.pulse("replay", f"--from={lo - 3 * MINUTE_MS}", f"--to={t2}", f"--url={url}")
    assert res.returncode == 1 and "after the range" in res.stderr, res.stderr
    assert dumps(raw, doomed) == first
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
