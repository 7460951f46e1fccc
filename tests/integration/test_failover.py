"""Automatic failover with Valkey Sentinel, on real processes.

A stack with a replica and three sentinels; the load generator and a worker (``replica``
durability) run while the primary is SIGKILLed. Sentinel promotes the replica, the killed node
is restarted and rejoins as its replica, the worker resumes on the new primary by itself (it
finds it through Sentinel), and ``pulse verify`` (through Sentinel too) is exact. The drill
prints the time from the SIGKILL to the promotion, to the first apply on the new primary and
to the first acknowledgement after it.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from dashboard.queries import reader_client
from pipeline.stack import StackError
from pipeline.stack.sentinel import SentinelSettings
from pipeline.stack.stack import Stack
from pipeline.stack.testing import RunningStack, make_stack
from schemas import keys
from schemas.settings import store_client
from tests.integration.harness import Pipeline, Timeline, drill_seed, replayable, wait_for
from tests.integration.test_faults import (
    FAST_GROUP,
    STORE_RETRY_LOG,
    acknowledged,
    all_alive,
    assert_acked_present,
    assert_verified,
    stop_all,
)

pytestmark = [pytest.mark.integration, pytest.mark.fault]

# short enough for a quick drill, long enough that a busy 2-core machine is not "down"
TIMINGS = SentinelSettings(down_after_ms=1500, failover_timeout_ms=10_000)


@pytest.fixture
def sentinel_stack(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., RunningStack]]:
    """A factory of private stacks with three sentinels; all torn down after the test."""
    made: list[RunningStack] = []

    def make(kafka: bool = True) -> RunningStack:
        running = make_stack(
            tmp_path_factory.mktemp("pulse-sentinel"), sentinels=3, sentinel_settings=TIMINGS
        )
        made.append(running)
        if kafka:
            running.stack.up()
        else:
            start_store(running.stack)
        return running

    try:
        yield make
    finally:
        for running in made:
            with contextlib.suppress(StackError):
                running.stack.down()


def start_store(stack: Stack) -> None:
    """The store's part of ``Stack.up``: both nodes, then the sentinels (no Kafka).

    Each group is launched whole before any is waited for: a node that restarts as a replica
    is ready only once its primary (maybe the other node) serves it.
    """
    assert stack.replica is not None
    for group in ([stack.primary, stack.replica], stack.sentinels):
        for service in group:
            service.launch()
        for service in group:
            service.wait_ready()


def master_port(client: redis.Redis) -> int:
    """The port of the node a Sentinel-discovering client writes to now."""
    host_port = client.connection_pool.get_master_address()  # type: ignore[attr-defined]
    return int(host_port[1])


def promoted(running: RunningStack, port: int) -> Callable[[], bool]:
    """A condition: every sentinel names ``port`` as the primary."""
    return lambda: all(s.primary() == port for s in running.stack.sentinels)


def test_sentinel_failover_drill(
    sentinel_stack: Callable[..., RunningStack], tmp_path: Path
) -> None:
    """SIGKILL the primary mid-run: promoted, resumed on it, nothing acknowledged lost."""
    seed = drill_seed()
    with replayable("Sentinel failover drill", seed):
        rng = random.Random(seed)
        running = sentinel_stack()
        store = running.store_settings
        assert store.replica_port is not None
        old, new = store.port, store.replica_port
        pl = Pipeline.create(running, tmp_path, PULSE_WORKER_DURABILITY="replica", **FAST_GROUP)
        assert pl.env["PULSE_STORE_SENTINELS"] == ",".join(store.sentinels)
        via = store_client(store, decode=True, timeout_s=10.0)  # follows the primary
        truth = tmp_path / "truth.json"
        producer = pl.start_loadgen(
            "--rate=2000", "--duration=20", "--devices=50", "--services=4", f"--seed={seed}",
            "--late-rate=0.01", truth=truth,
        )  # fmt: skip
        worker = pl.worker(name="w")
        alive = all_alive([worker])
        try:
            wait_for(acknowledged(pl), "the worker acknowledged batches", alive=alive)
            time.sleep(rng.uniform(0.0, 2.0))
            assert producer.alive(), "the load generator ended before the primary was lost"
            assert master_port(via) == old
            applied_before = pl.applied_total(via)
            assert pl.owned_by(via, "w"), "the worker applied nothing before the kill"
            retries = worker.log_count(STORE_RETRY_LOG)
            since_kill = Timeline()
            running.stack.primary.kill(signal.SIGKILL)
            wait_for(
                promoted(running, new), "Sentinel promoted the replica", timeout_s=60, alive=alive
            )
            since_kill.mark("promoted")
            wait_for(
                lambda: worker.log_count(STORE_RETRY_LOG) > retries,
                "the worker ran into the lost primary",
                timeout_s=60,
                alive=alive,
            )
            # Until a replica is back, WAITAOF 1 1 cannot be met: the worker acknowledges
            # nothing, so what Kafka holds as committed now is what it acknowledged before.
            at_promotion = pl.applied_total(via)
            acked = assert_acked_present(pl, via)
            assert acked["acknowledged"] > 0
            assert master_port(via) == new
            # the killed node restarts as a replica of the promoted one (start waits until in sync)
            running.stack.primary.start()
            since_kill.mark("rejoined")
            assert running.stack.primary.replica_of == new
            assert running.stack.primary.role() == "slave"
            assert running.stack.replica is not None and running.stack.replica.role() == "master"
            wait_for(
                lambda: pl.applied_total(via) > at_promotion,
                "the worker applied on the new primary",
                timeout_s=60,
                interval_s=0.05,
                alive=alive,
            )
            since_kill.mark("applied")
            wait_for(
                acknowledged(pl, acked["acknowledged"]),
                "the worker acknowledged a batch applied on the new primary",
                timeout_s=60,
                alive=alive,
            )
            since_kill.mark("acknowledged")
            producer.wait(180)
            pl.wait_applied(via, timeout_s=240, alive=alive)
        finally:
            stop_all([worker], producer)
        assert worker.log_count(STORE_RETRY_LOG) > retries
        assert pl.owned_by(via, "w"), "the new primary holds no apply of the worker"
        assert int(via.get(keys.fence_key()) or 0) >= 1, "the worker never fenced on it"
        summary = assert_verified(pl, truth)  # pulse verify finds the new primary itself
        dashboard = reader_client(store)  # the dashboard's client follows it too
        assert master_port(dashboard) == new
        assert pl.applied_offsets(dashboard) == pl.applied_offsets(via)
        dashboard.close()
        via.close()
        print(
            f"seed {seed}: primary SIGKILLed after {applied_before} records applied; "
            f"{acked['acknowledged']} acknowledged, all on the promoted replica; "
            + f"{since_kill} after the kill; {summary}"
        )


def test_a_restarted_stack_keeps_the_promoted_primary(
    sentinel_stack: Callable[..., RunningStack],
) -> None:
    """After a failover, `pulse down` + start: the nodes keep the roles Sentinel gave them."""
    running = sentinel_stack(kafka=False)
    stack, store = running.stack, running.store_settings
    assert store.replica_port is not None
    client = store_client(store, decode=True, timeout_s=5.0)
    client.set("before", "1")
    stack.primary.kill(signal.SIGKILL)
    wait_for(promoted(running, store.replica_port), "Sentinel promoted the replica", 60)
    wait_for(lambda: client.set("after", "1"), "a write on the new primary", 30)
    stack.down()
    start_store(stack)
    assert stack.known_primary() == store.replica_port
    assert stack.replica is not None and stack.replica.role() == "master"
    assert stack.primary.role() == "slave"
    assert client.get("before") == "1" and client.get("after") == "1"
    assert master_port(client) == store.replica_port
    replica_reader = store_client(store, port=store.replica_port, decode=True)
    wait_for(lambda: replica_reader.get("after") == "1", "the replica read", 30)
    status = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "status"],
        env={**os.environ, **running.env()},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert status.returncode == 0, status.stderr
    assert f"per Sentinel): 127.0.0.1:{store.replica_port}" in status.stdout
    assert "sentinel-3" in status.stdout
    client.close()
    replica_reader.close()
