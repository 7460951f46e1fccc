"""The store owns the offsets: a worker reads each partition from where the store stands.

Kafka's committed offsets are only a hint. A store that lost its data is refilled from what
Kafka retains; a position Kafka cannot serve (offsets of another topic, a log shorter than
what was applied) is refused with one clear error, and nothing is read from that partition.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from pipeline.stack.testing import RunningStack
from schemas import keys
from schemas.events import EventKind
from tests.integration.harness import Pipeline, WorkerProcess, wait_for

pytestmark = [pytest.mark.integration]


def verified(pl: Pipeline, truth: Path) -> None:
    res = pl.verify(truth)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]


def wait_log(worker: WorkerProcess, needle: str, count: int, timeout_s: float = 240.0) -> str:
    def logged() -> str:
        text = worker.log.read_text(errors="replace")
        return text if text.count(needle) >= count else ""

    return wait_for(logged, f"{needle!r} is logged {count} times", timeout_s, worker.alive)


def wait_others_applied(
    pl: Pipeline,
    store: redis.Redis,
    worker: WorkerProcess,
    ends: dict[tuple[str, int], int],
    refused: set[tuple[str, int]],
) -> None:
    """Wait until every partition but the ``refused`` ones is applied to its end, the worker
    alive all along."""
    others = {tp: end for tp, end in ends.items() if tp not in refused}
    wait_for(
        lambda: all(pl.applied_offsets(store)[tp] >= end - 1 for tp, end in others.items()),
        "every other partition is applied",
        240,
        worker.alive,
    )
    assert worker.alive(), worker.tail()


def test_a_lost_store_is_refilled_from_kafka_whatever_kafka_committed(
    stack: RunningStack, store: redis.Redis, tmp_path: Path
) -> None:
    pl = Pipeline.create(stack, tmp_path)
    truth = tmp_path / "truth.json"
    pl.loadgen("--rate=0", "--duration=6", "--devices=20", "--services=3", "--seed=31",
               "--bad-rate=0.01", "--late-rate=0.01", truth=truth)  # fmt: skip
    ends = pl.end_offsets()
    worker = pl.worker(name="first")
    try:
        pl.wait_applied(store, alive=worker.alive)
        # the worker commits the durable offsets to Kafka once its stream goes idle (a poll
        # may hold the whole input, so this can come after the store shows everything applied)
        wait_for(
            lambda: all(max(pl.committed().get(tp, -1), 0) >= end for tp, end in ends.items()),
            "Kafka's committed offsets reach the end of every input partition",
            alive=worker.alive,
        )
    finally:
        assert worker.stop() == 0
    verified(pl, truth)

    store.flushall()  # the store is lost; Kafka still says everything was consumed
    worker = pl.worker(name="second")
    try:
        pl.wait_applied(store, alive=worker.alive)
    finally:
        assert worker.stop() == 0
    verified(pl, truth)


def test_a_position_kafka_cannot_serve_is_refused_not_guessed(
    stack: RunningStack, store: redis.Redis, tmp_path: Path
) -> None:
    pl = Pipeline.create(stack, tmp_path)
    truth = tmp_path / "truth.json"
    pl.loadgen("--rate=0", "--duration=4", "--devices=20", "--services=3", "--seed=37",
               truth=truth)  # fmt: skip
    ends = pl.end_offsets()
    sensor0 = keys.progress_key(EventKind.SENSOR, 0)
    applog1 = keys.progress_key(EventKind.APPLOG, 1)
    ahead = ends[(pl.topics["sensor"], 0)] + 1000
    # the store applied past the log's end (the topic was recreated since) ...
    store.hset(
        sensor0, mapping={keys.Progress.OFFSET: ahead, keys.Progress.TOPIC: pl.topics["sensor"]}
    )
    # ... and holds another topic's offsets for this partition
    store.hset(applog1, mapping={keys.Progress.OFFSET: 3, keys.Progress.TOPIC: "another.applog"})
    worker = pl.worker(name="refuser")
    try:
        text = wait_log(worker, "refusing", 2)
        # every other partition is applied in full meanwhile
        wait_others_applied(pl, store, worker, ends,
                            {(pl.topics["sensor"], 0), (pl.topics["applog"], 1)})  # fmt: skip
    finally:
        assert worker.stop() == 0
    assert "the topic was recreated or truncated since" in text
    assert "belongs to topic 'another.applog'" in text
    # nothing was read from the refused partitions
    assert int(store.hget(sensor0, keys.Progress.OFFSET) or -1) == ahead
    assert int(store.hget(applog1, keys.Progress.OFFSET) or -1) == 3
    assert store.hget(applog1, keys.Progress.TOPIC) == "another.applog"


def test_a_worker_stopped_under_load_commits_the_offsets_it_made_durable(
    stack: RunningStack, store: redis.Redis, tmp_path: Path
) -> None:
    # commits at most once a minute while polls follow: what is applied after the first commit
    # is left for the stop to commit
    pl = Pipeline.create(stack, tmp_path, PULSE_WORKER_COMMIT_INTERVAL_S="60")
    loadgen = pl.start_loadgen("--rate=500", "--duration=300", "--devices=20", "--services=3",
                               "--seed=43", truth=tmp_path / "truth.json")  # fmt: skip
    worker = pl.worker(name="stopping")
    try:

        def uncommitted() -> int:
            committed = sum(max(c, 0) for c in pl.committed().values())
            return pl.applied_total(store) - committed

        wait_for(lambda: uncommitted() >= 2000, "2 000 applied records wait for a commit",
                 alive=worker.alive)  # fmt: skip
        assert loadgen.alive(), "the stream must still be active when the worker stops"
        assert worker.stop() == 0
    finally:
        loadgen.stop()
        if worker.alive():
            worker.kill()
    applied = pl.applied_offsets(store)
    committed = pl.committed()
    lagging = {
        tp: (off + 1, committed[tp])
        for tp, off in applied.items()
        if off >= 0 and committed[tp] != off + 1
    }
    assert not lagging, f"applied but not committed at the stop (applied + 1, committed): {lagging}"


def _applied_once(pl: Pipeline, store: redis.Redis) -> tuple[str, int, int]:
    """A load applied by a worker that then stops: sensor partition 2's progress key, its
    applied offset and the start of its newest minute (open when it is next restored)."""
    pl.loadgen("--rate=0", "--duration=4", "--devices=20", "--services=3", "--seed=41")
    worker = pl.worker(name="before")
    try:
        pl.wait_applied(store, alive=worker.alive)
    finally:
        assert worker.stop() == 0
    progress = keys.progress_key(EventKind.SENSOR, 2)
    offset = int(store.hget(progress, keys.Progress.OFFSET) or -1)
    newest = int(store.hget(progress, keys.Progress.MAX_EVENT_TIME) or -1)
    assert offset >= 0 and newest > 0, "sensor partition 2 holds no events"
    return progress, offset, keys.window_start(newest, keys.WINDOW_1M)


def _refused_after_another_load(pl: Pipeline, store: redis.Redis, offset: int) -> str:
    """Another load, then a new worker that refuses sensor partition 2 (applied up to
    ``offset``) and applies every other partition to its end, alive all along; its log."""
    sensor = pl.topics["sensor"]
    pl.loadgen("--rate=0", "--duration=4", "--devices=20", "--services=3", "--seed=43")
    ends = pl.end_offsets()
    assert ends[(sensor, 2)] > offset + 1, "the second load wrote nothing to sensor partition 2"
    worker = pl.worker(name="after")
    try:
        text = wait_log(worker, "refusing", 1)
        wait_others_applied(pl, store, worker, ends, {(sensor, 2)})
    finally:
        assert worker.stop() == 0
    return text


def test_a_partition_whose_stored_windows_cannot_be_decoded_is_refused_not_the_worker(
    stack: RunningStack, store: redis.Redis, tmp_path: Path
) -> None:
    """An open window value that is not a packed value (written by something else) stops
    neither the worker nor the other partitions: applying on would replace that window without
    the events it holds, so its partition is refused and left as it is."""
    pl = Pipeline.create(stack, tmp_path)
    progress, offset, start = _applied_once(pl, store)
    window = keys.window_key(EventKind.SENSOR, 2, keys.WINDOW_1M, keys.Dim.METRIC, start)
    raw = stack.redis(decode=False)  # packed values are bytes
    entity = sorted(raw.hkeys(window))[0]
    raw.hset(window, entity, b"\x01 not a packed value")
    damaged = raw.hgetall(window)

    text = _refused_after_another_load(pl, store, offset)
    sensor = pl.topics["sensor"]
    assert f"refusing {sensor} partition 2 (sensor): stored window {window}: " in text
    assert "cannot be restored" in text
    assert int(store.hget(progress, keys.Progress.OFFSET) or -1) == offset
    assert raw.hgetall(window) == damaged
    raw.close()


@pytest.mark.parametrize("where", ["open window", "positions"])
def test_a_partition_whose_store_key_holds_another_type_is_refused_not_the_worker(
    stack: RunningStack, store: redis.Redis, tmp_path: Path, where: str
) -> None:
    """A key the worker reads or writes that holds another type (a string someone SET there)
    stops neither the worker nor the other partitions. An open window's key is found as the
    partition is restored; the positions' key only when the store's function refuses the apply
    (it checks every key before writing any). Either way the partition is refused as it is."""
    pl = Pipeline.create(stack, tmp_path)
    progress, offset, start = _applied_once(pl, store)
    key = (
        keys.window_key(EventKind.SENSOR, 2, keys.WINDOW_1M, keys.Dim.METRIC, start)
        if where == "open window"
        else keys.geo_key(2)
    )
    assert store.exists(key), f"{key} was not written by the first load"
    store.delete(key)
    store.set(key, "someone else's")

    text = _refused_after_another_load(pl, store, offset)
    sensor = pl.topics["sensor"]
    said = [line for line in text.splitlines() if "refusing" in line]
    assert len(said) == 1 and f"refusing {sensor} partition 2 (sensor): " in said[0]
    assert key in said[0]
    assert int(store.hget(progress, keys.Progress.OFFSET) or -1) == offset
    assert store.get(key) == "someone else's"
