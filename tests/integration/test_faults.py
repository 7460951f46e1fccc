"""Fault drills on real processes: every event counted exactly once, nothing acknowledged lost.

Each drill runs the load generator, the worker and the stack as real processes, breaks one of them
(SIGKILL, stop/restart, replica promotion, hostile input) and then proves with ``pulse verify``
that the store equals the truth file exactly.
"""

from __future__ import annotations

import random
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from pipeline.stack.testing import RunningStack
from tests.integration.harness import Pipeline, WorkerProcess

pytestmark = [pytest.mark.integration, pytest.mark.fault]

FAST_GROUP = {"PULSE_WORKER_SESSION_TIMEOUT_S": "6", "PULSE_WORKER_HEARTBEAT_INTERVAL_S": "1"}


def assert_verified(pl: Pipeline, truth: Path) -> str:
    res = pl.verify(truth)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    return res.stdout.strip().splitlines()[-1]


def assert_acked_present(pl: Pipeline, client: redis.Redis) -> dict[str, int]:
    """Every offset the worker group committed (acknowledged) is applied in ``client``'s store."""
    committed = pl.committed()
    applied = pl.applied_offsets(client)
    missing = {tp: (applied[tp], c) for tp, c in committed.items() if c > 0 and applied[tp] < c - 1}
    assert not missing, f"acknowledged but not in the store (applied, committed): {missing}"
    return {"acknowledged": sum(max(c, 0) for c in committed.values())}


@pytest.mark.parametrize("seed", [101, 202])
def test_worker_sigkill_at_random_points(
    stack: RunningStack, store: redis.Redis, tmp_path: Path, seed: int
) -> None:
    rng = random.Random(seed)
    pl = Pipeline.create(stack, tmp_path, **FAST_GROUP)
    truth = tmp_path / "truth.json"
    producer = pl.start_loadgen(
        "--rate=2500", "--duration=16", "--devices=60", "--services=4", f"--seed={seed}",
        "--bad-rate=0.005", "--late-rate=0.01", truth=truth,
    )  # fmt: skip
    kills = 0
    worker = pl.worker(name=f"w{kills}")
    try:
        for _ in range(4):
            time.sleep(rng.uniform(1.0, 4.0))
            assert worker.alive(), worker.tail()
            worker.kill()
            kills += 1
            worker = pl.worker(name=f"w{kills}")
        assert producer.wait(120) == 0, producer.stderr.read() if producer.stderr else ""
        pl.wait_applied(store, timeout_s=240, alive=worker.alive)
    finally:
        worker.stop()
        if producer.poll() is None:
            producer.kill()
    assert kills == 4
    summary = assert_verified(pl, truth)
    print(f"seed {seed}: {kills} worker SIGKILLs; {summary}")


def test_store_primary_sigkill_and_restart_from_aof(
    fresh_stack: Callable[..., RunningStack], tmp_path: Path
) -> None:
    running = fresh_stack()
    pl = Pipeline.create(running, tmp_path, **FAST_GROUP)
    truth = tmp_path / "truth.json"
    producer = pl.start_loadgen(
        "--rate=3000", "--duration=10", "--devices=50", "--services=4", "--seed=7", truth=truth,
    )  # fmt: skip
    worker = pl.worker()
    try:
        time.sleep(4)
        running.stack.primary.kill(signal.SIGKILL)
        time.sleep(3)  # the worker retries; nothing can be acknowledged meanwhile
        worker.proc.send_signal(signal.SIGSTOP)  # freeze it so the check below sees the restart
        try:
            running.stack.primary.start()
            acked = assert_acked_present(pl, running.redis())
        finally:
            worker.proc.send_signal(signal.SIGCONT)
        assert producer.wait(120) == 0
        client = running.redis()
        pl.wait_applied(client, timeout_s=240, alive=worker.alive)
    finally:
        worker.stop()
        if producer.poll() is None:
            producer.kill()
    summary = assert_verified(pl, truth)
    print(f"primary SIGKILL + AOF restart: {acked}; {summary}")


def test_broker_stop_and_restart_mid_run(
    fresh_stack: Callable[..., RunningStack], tmp_path: Path
) -> None:
    running = fresh_stack(replica=False)
    pl = Pipeline.create(running, tmp_path, PULSE_WORKER_DURABILITY="local", **FAST_GROUP)
    truth = tmp_path / "truth.json"
    pl.loadgen("--rate=0", "--duration=40", "--devices=80", "--services=4", "--seed=9",
               "--late-rate=0.01", truth=truth)  # fmt: skip
    worker = pl.worker()
    try:
        time.sleep(5)
        running.stack.kafka.stop()
        time.sleep(3)
        running.stack.kafka.start()
        client = running.redis()
        pl.wait_applied(client, timeout_s=300, alive=worker.alive)
    finally:
        worker.stop()
    summary = assert_verified(pl, truth)
    print(f"broker stop/restart: {summary}")


def test_primary_lost_replica_promoted_keeps_every_acknowledged_batch(
    fresh_stack: Callable[..., RunningStack], tmp_path: Path
) -> None:
    running = fresh_stack()
    pl = Pipeline.create(running, tmp_path, PULSE_WORKER_DURABILITY="replica", **FAST_GROUP)
    truth = tmp_path / "truth.json"
    producer = pl.start_loadgen(
        "--rate=3000", "--duration=10", "--devices=50", "--services=4", "--seed=13", truth=truth,
    )  # fmt: skip
    worker = pl.worker()
    try:
        time.sleep(4)
        running.stack.primary.kill(signal.SIGKILL)
        time.sleep(3)  # commits of already-acknowledged offsets may still land; then none can
        worker.kill()  # it points at the dead primary
        new_port = running.stack.promote_replica()
        acked = assert_acked_present(pl, running.redis(replica=True))
        assert producer.wait(120) == 0
        pl.env["PULSE_STORE_PORT"] = str(new_port)
        worker = WorkerProcess.start(
            {**pl.env, "PULSE_WORKER_DURABILITY": "local"}, "after-failover",
            tmp_path / "worker-after.log",
        )  # fmt: skip
        pl.wait_applied(running.redis(replica=True), timeout_s=240, alive=worker.alive)
    finally:
        worker.stop()
        if producer.poll() is None:
            producer.kill()
    summary = assert_verified(pl, truth)
    print(f"failover to replica: {acked}; {summary}")


def test_hostile_input_goes_to_dead_letters_and_the_worker_survives(
    stack: RunningStack, store: redis.Redis, tmp_path: Path
) -> None:
    pl = Pipeline.create(stack, tmp_path)
    truth_file = tmp_path / "truth.json"
    truth = pl.loadgen("--rate=0", "--duration=8", "--devices=30", "--services=3", "--seed=5",
                       "--bad-rate=0.3", truth=truth_file)  # fmt: skip
    worker = pl.worker()
    try:
        pl.wait_applied(store, alive=worker.alive)
        assert worker.alive(), worker.tail()
    finally:
        assert worker.stop() == 0
    assert_verified(pl, truth_file)
    dead = pl.read_topic("deadletter")
    assert len(dead) == sum(truth["dead"].values()) > 2000
    reasons = " ".join(dict(m.headers)["pulse.reason"].decode() for m in dead).lower()
    for needle in ("json", "finite", "field required", "extra", "older", "future", "should be"):
        assert needle in reasons, f"no dead letter mentions {needle!r}"
    # the original bytes are kept: a dead letter's value is exactly what was produced
    assert all(m.value is not None for m in dead)


def test_two_workers_rebalancing_under_load(
    stack: RunningStack, store: redis.Redis, tmp_path: Path
) -> None:
    pl = Pipeline.create(stack, tmp_path, **FAST_GROUP)
    truth = tmp_path / "truth.json"
    producer = pl.start_loadgen(
        "--rate=3000", "--duration=12", "--devices=60", "--services=4", "--seed=17",
        "--late-rate=0.01", truth=truth,
    )  # fmt: skip
    a, b = pl.worker(name="a"), pl.worker(name="b")
    c: WorkerProcess | None = None
    try:
        time.sleep(4)
        a.kill()  # b takes over a's partitions after the session timeout
        time.sleep(3)
        c = pl.worker(name="c")  # joins: partitions move again
        time.sleep(3)
        assert b.stop() == 0  # leaves cleanly: c gets everything
        assert producer.wait(120) == 0
        pl.wait_applied(store, timeout_s=240, alive=c.alive)
    finally:
        for w in (a, b, c):
            if w is not None:
                w.stop()
        if producer.poll() is None:
            producer.kill()
    applied = int(store.hget("pulse:worker:c", "batches") or 0)
    assert applied > 0, "the last worker standing applied nothing"
    summary = assert_verified(pl, truth)
    print(f"two workers, one killed, one joined, one left: {summary}")
