"""Nothing is acknowledged before it is durable: the writer against a stalled replica.

Real Valkey primary + replica. The replica is frozen with SIGSTOP, so it receives nothing and
fsyncs nothing; ``replica`` durability must then block, through a dropped connection too
(``CLIENT KILL``), and resolve only once the replica is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator

import orjson
import pytest
import redis
import redis.asyncio as aioredis

from pipeline.batch import (
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
from pipeline.store_writer import StoreWriter, connect
from pipeline.validation import TimeBounds
from schemas import keys
from schemas.events import EventKind

pytestmark = [pytest.mark.integration, pytest.mark.fault]

RULES = BatchRules(TimeBounds(6 * 3600 * 1000, 300_000), 30_000)
WAIT_MS = 200  # each WAITAOF gives up after this and the writer asks again


@pytest.fixture
def store_pair(fresh_stack: Callable[..., RunningStack]) -> Iterator[RunningStack]:
    """A Valkey primary and its replica (no Kafka); the replica is resumed after the test."""
    running = fresh_stack(start=False)
    running.stack.primary.start()
    assert running.stack.replica is not None
    running.stack.replica.start()
    try:
        yield running
    finally:
        pid = running.stack.replica.pid
        if pid is not None:
            os.kill(pid, signal.SIGCONT)


def freeze(running: RunningStack, sig: signal.Signals) -> None:
    assert running.stack.replica is not None
    pid = running.stack.replica.pid
    assert pid is not None
    os.kill(pid, sig)


@contextlib.asynccontextmanager
async def writer(running: RunningStack) -> AsyncIterator[StoreWriter]:
    """A writer on one connection, closed with it (``StoreWriter.close`` leaves it open)."""
    client = connect(running.store_settings, socket_timeout_s=30.0)
    try:
        yield StoreWriter(
            client,
            Durability.REPLICA,
            RULES.retention,
            WAIT_MS,
            topic_names={EventKind.SENSOR: "t.sensor", EventKind.APPLOG: "t.applog"},
            owner="durability-test",
        )
    finally:
        await client.aclose(close_connection_pool=True)


def sensor_value(i: int, t: int) -> bytes:
    ev = {"device_id": f"d{i}", "site": "s", "event_time": t, "metric": "m", "value": float(i)}
    return orjson.dumps({**ev, "unit": "u", "lat": 0.0, "lon": 0.0, "firmware": "f"})


def a_batch(partition: int, first: int, n: int, state: PartitionState) -> PartitionBatch:
    """The next batch, folded into the partition's open windows: its window values to write."""
    if state.windows is None:  # a partition the store knows nothing of yet
        state.windows = WindowState(EventKind.SENSOR, partition, RULES.plan)
    now = time.time_ns() // 1_000_000
    recs = [Record(first + i, None, sensor_value(i, now - 1000)) for i in range(n)]
    batch = process(EventKind.SENSOR, partition, recs, state, RULES, now)
    absorb(state, batch, RULES)
    assert batch.writes
    return batch


async def wait_for(
    cond: Callable[[], bool], what: str, timeout_s: float = 30.0, interval_s: float = 0.02
) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(interval_s)


def waitaof_clients(client: redis.Redis) -> list[dict[str, str]]:
    return [c for c in client.client_list() if c.get("cmd") == "waitaof"]


class Warnings(logging.Handler):
    """Counts the writer's 'still waiting' warnings."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "still waiting" in record.getMessage():
            self.count += 1


@pytest.fixture
def warnings() -> Iterator[Warnings]:
    h = Warnings()
    log = logging.getLogger("pulse.store_writer")
    log.addHandler(h)
    try:
        yield h
    finally:
        log.removeHandler(h)


def test_apply_waits_for_a_stalled_replica(store_pair: RunningStack, warnings: Warnings) -> None:
    primary = store_pair.redis()
    replica = store_pair.redis(replica=True)
    progress = keys.progress_key(EventKind.SENSOR, 0)

    async def scenario() -> PartitionBatch:
        async with writer(store_pair) as w:
            b = a_batch(0, 0, 50, PartitionState())
            freeze(store_pair, signal.SIGSTOP)
            task = asyncio.create_task(w.apply([b], time.time_ns() // 1_000_000))
            # applied on the primary, then held: several WAITAOF rounds pass unconfirmed
            await wait_for(lambda: primary.hget(progress, "offset") == "49", "the apply")
            await wait_for(lambda: warnings.count >= 3, "three unconfirmed WAITAOF rounds")
            assert not task.done(), "apply returned while the replica was frozen"
            freeze(store_pair, signal.SIGCONT)
            outcomes, waited = await asyncio.wait_for(task, 60)
            assert [o.applied for o in outcomes] == [True]
            assert waited >= 3 * WAIT_MS / 1000
        return b

    b = asyncio.run(scenario())
    assert replica.hget(progress, "offset") == "49"
    # the window values went with the offset
    for hw in b.writes:
        assert replica.hlen(hw.key) == len(hw.fields)


def test_a_killed_connection_is_never_taken_for_durable(
    store_pair: RunningStack, warnings: Warnings
) -> None:
    primary = store_pair.redis()

    async def scenario() -> None:
        async with writer(store_pair) as w:
            b = a_batch(1, 0, 20, PartitionState())
            freeze(store_pair, signal.SIGSTOP)
            task = asyncio.create_task(w.apply([b], time.time_ns() // 1_000_000))
            await wait_for(lambda: bool(waitaof_clients(primary)), "the writer to wait in WAITAOF")
            (blocked,) = waitaof_clients(primary)
            primary.client_kill_filter(_id=blocked["id"])
            # redis-py's default retry would re-send WAITAOF on a fresh connection, which wrote
            # nothing, and report the batch durable; the writer must say it does not know.
            with pytest.raises(redis.exceptions.ConnectionError):
                await asyncio.wait_for(task, 30)

            # Control: a default client on a fresh connection does get the false "durable" answer.
            naive = aioredis.Redis(port=store_pair.store_settings.port)
            # redis-py leaves execute_command unannotated
            local, replicas = await naive.execute_command("WAITAOF", 1, 1, WAIT_MS)  # type: ignore[no-untyped-call]
            assert (local, replicas) == (1, 1)
            await naive.aclose()

            # The unsure writes are resolved by a fence: a write of ours after them, then WAITAOF.
            before = warnings.count
            fence = asyncio.create_task(w.fence())
            await wait_for(lambda: warnings.count >= before + 2, "two unconfirmed fence rounds")
            assert not fence.done(), "the fence returned while the replica was frozen"
            freeze(store_pair, signal.SIGCONT)
            await asyncio.wait_for(fence, 60)

    asyncio.run(scenario())


def test_pipeline_and_wait_share_one_connection(store_pair: RunningStack) -> None:
    """WAITAOF vouches only for its own connection's writes: the writer has exactly one."""
    primary = store_pair.redis()

    async def scenario() -> None:
        async with writer(store_pair) as w:
            before = {c["id"] for c in primary.client_list()}
            state = PartitionState()
            for i in range(3):
                b = a_batch(2, i * 10, 10, state)
                outcomes, _ = await w.apply([b], time.time_ns() // 1_000_000)
                assert outcomes[0].applied
                commit(state, b)
            await w.fence()
            mine = [c for c in primary.client_list() if c["id"] not in before]
            assert len(mine) == 1, mine

    asyncio.run(scenario())
