"""Fault drills on real processes: every event counted exactly once, nothing acknowledged lost.

Each drill runs the load generator, the workers and the stack as real processes, breaks one of
them while the load generator is producing (SIGKILL, stop/restart, replica promotion) and then
proves with ``pulse verify`` that the store equals the truth file exactly. Every fault is preceded
by a wait on a condition that shows it will hit something live (the victim owns partitions and has
applied a batch, the store has advanced since the last fault), never by a fixed sleep.

Random choices (victims, kill points, outage lengths, load seeds) come from one seed per drill:
``PULSE_DRILL_SEED`` if set, else a fresh one. It is printed when the drill starts and attached to
any failure, so ``PULSE_DRILL_SEED=<seed> pytest tests/integration/test_faults.py`` replays it.
"""

from __future__ import annotations

import itertools
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from pipeline.stack.testing import RunningStack
from schemas import keys
from tests.integration.harness import (
    POLL_S,
    LoadgenProcess,
    Pipeline,
    Timeline,
    WorkerProcess,
    drill_seed,
    replayable,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.fault]

FAST_GROUP = {"PULSE_WORKER_SESSION_TIMEOUT_S": "6", "PULSE_WORKER_HEARTBEAT_INTERVAL_S": "1"}
#: What a worker logs each time it finds the store unreachable and retries.
STORE_RETRY_LOG = "store unavailable"


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


def acknowledged(pl: Pipeline, more_than: int = 0) -> Callable[[], int]:
    """A condition: the worker group committed more than ``more_than`` offsets in all (the sum)."""

    def check() -> int:
        total = sum(max(c, 0) for c in pl.committed().values())
        return total if total > more_than else 0

    return check


def all_alive(*groups: list[WorkerProcess]) -> Callable[[], bool]:
    """A liveness check of every worker in ``groups`` (lists may change), naming the dead one."""

    def check() -> bool:
        for w in itertools.chain(*groups):
            assert w.alive(), f"worker {w.name} died (exit {w.proc.returncode}):\n{w.tail()}"
        return True

    return check


def stop_all(workers: list[WorkerProcess], producer: LoadgenProcess) -> None:
    for w in workers:
        w.stop()
    producer.stop()


# --- worker SIGKILL --------------------------------------------------------------------------

KILL_MIN = 10  # SIGKILLs per drill, at least
KILL_MAX = 24  # more when the machine is quick: killing goes on while the load generator runs
KILL_RATE, KILL_DURATION_S = 1000, 100  # the load generator runs through every kill
KILL_CYCLE_S = 12.0  # no new kill when the load generator has less left than this


@dataclass
class Kill:
    n: int
    slot: int  # which of the two running workers
    victim: str
    owned: list[str]  # partitions whose progress hash named the victim when it was killed
    waited_s: float  # until the victim owned a partition and had applied a batch
    delay_s: float  # random extra delay before the kill
    producer_left_s: float  # how long the load generator still had to run


def test_worker_sigkill_drill(stack: RunningStack, store: redis.Redis, tmp_path: Path) -> None:
    """>= 10 SIGKILLs on two always-running workers, each on a worker owning applied partitions."""
    seed = drill_seed()
    with replayable("worker SIGKILL drill", seed):
        rng = random.Random(seed)
        pl = Pipeline.create(stack, tmp_path, **FAST_GROUP)
        truth = tmp_path / "truth.json"
        producer = pl.start_loadgen(
            f"--rate={KILL_RATE}", f"--duration={KILL_DURATION_S}", "--devices=60",
            "--services=4", f"--seed={seed}", "--bad-rate=0.005", "--late-rate=0.01", truth=truth,
        )  # fmt: skip
        producer_end = time.monotonic() + KILL_DURATION_S
        names = (f"k{i}" for i in itertools.count())
        workers = [pl.worker(name=next(names)), pl.worker(name=next(names))]
        alive = all_alive(workers)
        kills: list[Kill] = []
        try:
            while len(kills) < KILL_MAX:
                left = producer_end - time.monotonic()
                if len(kills) >= KILL_MIN and left < KILL_CYCLE_S:
                    break
                # At random, but never the same slot three times running: both workers get hit.
                slot = rng.randrange(2)
                if len(kills) >= 2 and kills[-1].slot == kills[-2].slot == slot:
                    slot = 1 - slot
                victim = workers[slot]
                t0 = time.monotonic()
                delay = rng.uniform(0.0, 2.5)
                owned: list[str] = []
                while not owned:  # a rebalance during the delay may hand everything on: again
                    wait_for(
                        lambda v=victim: pl.owned_by(store, v.name),  # type: ignore[misc]
                        f"worker {victim.name} owns a partition and has applied a batch of it",
                        timeout_s=120,
                        alive=alive,
                    )
                    waited = time.monotonic() - t0
                    time.sleep(delay)
                    owned = pl.owned_by(store, victim.name)
                alive()
                if not producer.alive() and len(kills) >= KILL_MIN:
                    break  # it ended while this kill was being prepared: enough kills anyway
                assert producer.alive(), (
                    f"the load generator ended before kill #{len(kills) + 1}: "
                    f"the run is too short for this machine\n{producer.tail()}"
                )
                victim.kill()
                kills.append(
                    Kill(len(kills) + 1, slot, victim.name, owned, waited, delay,
                         producer_end - time.monotonic())
                )  # fmt: skip
                workers[slot] = pl.worker(name=next(names))
            producer.wait(KILL_DURATION_S + 120)
            pl.wait_applied(store, timeout_s=240, alive=alive)
        finally:
            stop_all(workers, producer)
            print_kills(kills)  # also when the drill failed: how far it got
        assert len(kills) >= KILL_MIN
        assert {k.slot for k in kills} == {0, 1}
        summary = assert_verified(pl, truth)
        print(f"seed {seed}: {len(kills)} worker SIGKILLs; {summary}")


def print_kills(kills: list[Kill]) -> None:
    print(f"{'kill':>4}  {'victim':<6}  {'waited':>6}  {'delay':>5}  {'loadgen left':>12}  owned")
    for k in kills:
        print(
            f"{k.n:>4}  {k.victim:<6}  {k.waited_s:>5.1f}s  {k.delay_s:>4.1f}s  "
            f"{k.producer_left_s:>11.0f}s  {','.join(k.owned)}"
        )


# --- store primary SIGKILL -----------------------------------------------------------------

STORE_KILLS = 4


def test_store_primary_sigkill_and_restart_from_aof(
    fresh_stack: Callable[..., RunningStack], tmp_path: Path
) -> None:
    """SIGKILL the primary several times mid-run; after each AOF restart every ack is there."""
    seed = drill_seed()
    with replayable("store primary SIGKILL drill", seed):
        rng = random.Random(seed)
        running = fresh_stack()
        pl = Pipeline.create(running, tmp_path, **FAST_GROUP)
        truth = tmp_path / "truth.json"
        producer = pl.start_loadgen(
            "--rate=2000", "--duration=28", "--devices=50", "--services=4", f"--seed={seed}",
            "--late-rate=0.01", truth=truth,
        )  # fmt: skip
        worker = pl.worker(name="w")
        alive = all_alive([worker])
        rows = []
        at_restart = acked_total = 0
        try:
            for n in range(1, STORE_KILLS + 1):
                client = running.redis()
                since = at_restart
                wait_for(
                    lambda c=client, s=since: pl.applied_total(c) > s,  # type: ignore[misc]
                    "the worker applied batches since the last restart",
                    alive=alive,
                )
                wait_for(
                    acknowledged(pl, acked_total),
                    "the worker acknowledged batches since the last restart",
                    alive=alive,
                )
                applied = pl.applied_total(client)
                client.close()
                time.sleep(rng.uniform(0.0, 2.0))
                assert producer.alive(), f"the load generator ended before kill #{n}"
                retries = worker.log_count(STORE_RETRY_LOG)
                running.stack.primary.kill(signal.SIGKILL)
                wait_for(
                    lambda r=retries: worker.log_count(STORE_RETRY_LOG) > r,  # type: ignore[misc]
                    "the worker ran into the dead primary",
                    timeout_s=60,
                    alive=alive,
                )
                # Freeze the worker so that the check sees exactly what the AOF brought back.
                worker.proc.send_signal(signal.SIGSTOP)
                try:
                    running.stack.primary.start()
                    restarted = running.redis()
                    acked = assert_acked_present(pl, restarted)
                    at_restart = pl.applied_total(restarted)
                    restarted.close()
                finally:
                    worker.proc.send_signal(signal.SIGCONT)
                assert at_restart >= applied, "the restarted primary lost applied records"
                acked_total = acked["acknowledged"]
                rows.append((n, applied, at_restart, acked))
            producer.wait(180)
            pl.wait_applied(running.redis(), timeout_s=240, alive=alive)
        finally:
            stop_all([worker], producer)
        for n, before, back, acks in rows:
            print(
                f"primary kill #{n}: applied {before} before it, {back} after the AOF restart, "
                f"{acks['acknowledged']} acknowledged, all present"
            )
        assert len(rows) == STORE_KILLS
        summary = assert_verified(pl, truth)
        print(f"seed {seed}: {STORE_KILLS} primary SIGKILLs + AOF restarts; {summary}")


# --- Kafka broker stop/start ---------------------------------------------------------------


def test_broker_stop_and_restart_while_producing(
    fresh_stack: Callable[..., RunningStack], tmp_path: Path
) -> None:
    """The broker goes away while the load generator sends; both it and the worker resume."""
    seed = drill_seed()
    with replayable("broker drill", seed):
        rng = random.Random(seed)
        running = fresh_stack(replica=False)
        pl = Pipeline.create(running, tmp_path, PULSE_WORKER_DURABILITY="local", **FAST_GROUP)
        truth_file = tmp_path / "truth.json"
        producer = pl.start_loadgen(
            "--rate=1000", "--duration=40", "--devices=80", "--services=4", f"--seed={seed}",
            "--late-rate=0.01", "--bad-rate=0.005", truth=truth_file,
        )  # fmt: skip
        worker = pl.worker(name="w")
        worker_started = time.monotonic()
        alive = all_alive([worker])
        client = running.redis()
        timeline = Timeline()
        mark = timeline.mark
        try:
            wait_for(lambda: pl.applied_total(client), "the worker applied batches", alive=alive)
            time.sleep(rng.uniform(0.0, 3.0))
            assert producer.alive(), "the load generator ended before the broker stopped"
            applied_at_stop = pl.applied_total(client)
            assert applied_at_stop > 0
            mark("stop")
            running.stack.kafka.stop()
            mark("stopped")
            outage_s = rng.uniform(4.0, 10.0)
            _hold(outage_s, alive, producer)
            mark("start")
            running.stack.kafka.start()
            mark("started")
            assert producer.alive(), "the load generator did not survive the outage"
            ends_at_restart = sum(pl.end_offsets().values())
            applied_at_restart = pl.applied_total(client)
            wait_for(
                lambda: sum(pl.end_offsets().values()) > ends_at_restart,
                "the load generator produced records after the restart",
                alive=alive,
            )
            mark("produced again")
            wait_for(
                lambda: pl.applied_total(client) > applied_at_restart,
                "the worker applied batches after the restart",
                alive=alive,
            )
            mark("applied again")
            producer.wait(180)
            mark("loadgen done")
            pl.wait_applied(client, timeout_s=300, alive=alive)
            mark("caught up")
        finally:
            stop_all([worker], producer)
        # aiokafka logs a line per reconnect attempt (dozens a second); the worker says each
        # kind once, then once a minute with the count held back
        minutes = (time.monotonic() - worker_started) / 60
        for kind in ("Unable connect to node", "Unable to update metadata"):
            said = worker.log_count(kind)
            assert said <= 2 + minutes, f"{said} lines of {kind!r} in {minutes:.1f} min"
        in_kafka = pl.assert_kafka_holds_truth(truth_file)
        summary = assert_verified(pl, truth_file)
        print(
            f"seed {seed}: broker down {outage_s:.1f}s; applied {applied_at_stop} before the stop, "
            f"{applied_at_restart} at the restart; {in_kafka} records in Kafka, "
            f"as produced; {summary}"
        )
        print(timeline)


def _hold(seconds: float, alive: Callable[[], bool], producer: LoadgenProcess) -> None:
    """Keep the fault in place for ``seconds``; the worker and load generator must live on."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        alive()
        assert producer.alive(), f"the load generator died during the outage:\n{producer.tail()}"
        time.sleep(POLL_S)


# --- replica promotion ---------------------------------------------------------------------


def test_primary_lost_replica_promoted_keeps_every_acknowledged_batch(
    fresh_stack: Callable[..., RunningStack], tmp_path: Path
) -> None:
    seed = drill_seed()
    with replayable("failover drill", seed):
        rng = random.Random(seed)
        running = fresh_stack()
        pl = Pipeline.create(running, tmp_path, PULSE_WORKER_DURABILITY="replica", **FAST_GROUP)
        truth = tmp_path / "truth.json"
        producer = pl.start_loadgen(
            "--rate=2000", "--duration=20", "--devices=50", "--services=4", f"--seed={seed}",
            truth=truth,
        )  # fmt: skip
        workers = [pl.worker(name="before")]
        alive = all_alive(workers)
        try:
            wait_for(acknowledged(pl), "the worker acknowledged batches", alive=alive)
            time.sleep(rng.uniform(0.0, 2.0))
            assert producer.alive(), "the load generator ended before the primary was lost"
            retries = workers[0].log_count(STORE_RETRY_LOG)
            running.stack.primary.kill(signal.SIGKILL)
            wait_for(
                lambda: workers[0].log_count(STORE_RETRY_LOG) > retries,
                "the worker ran into the lost primary",
                timeout_s=60,
                alive=alive,
            )
            # It points at the dead primary. Whatever it committed was durable on the replica.
            workers[0].kill()
            new_port = running.stack.promote_replica()
            acked = assert_acked_present(pl, running.redis(replica=True))
            assert acked["acknowledged"] > 0, "nothing was acknowledged before the primary was lost"
            producer.wait(120)
            pl.env["PULSE_STORE_PORT"] = str(new_port)
            workers[0] = WorkerProcess.start(
                {**pl.env, "PULSE_WORKER_DURABILITY": "local"}, "after-failover",
                tmp_path / "worker-after.log",
            )  # fmt: skip
            pl.wait_applied(running.redis(replica=True), timeout_s=240, alive=alive)
        finally:
            stop_all(workers, producer)
        summary = assert_verified(pl, truth)
        print(f"seed {seed}: failover to replica: {acked}; {summary}")


# --- rebalancing ---------------------------------------------------------------------------


def test_three_workers_rebalancing_under_load(
    stack: RunningStack, store: redis.Redis, tmp_path: Path
) -> None:
    """Three workers share the partitions; one is killed, one joins, one leaves cleanly; each
    hand-over is seen in the store, and the store equals the truth exactly."""
    seed = drill_seed()
    with replayable("rebalancing drill", seed):
        pl = Pipeline.create(stack, tmp_path, **FAST_GROUP)
        truth = tmp_path / "truth.json"
        producer = pl.start_loadgen(
            "--rate=2000", "--duration=40", "--devices=60", "--services=4", f"--seed={seed}",
            "--late-rate=0.01", truth=truth,
        )  # fmt: skip
        workers = [pl.worker(name="a"), pl.worker(name="b"), pl.worker(name="c")]
        a, b, c = workers
        alive = all_alive(workers)
        try:
            for w in (a, b, c):
                wait_for(
                    lambda w=w: pl.owned_by(store, w.name),  # type: ignore[misc]
                    f"{w.name} owns a partition and applied a batch",
                    alive=alive,
                )
            a_owned = set(pl.owned_by(store, "a"))
            a.kill()
            workers.remove(a)
            wait_for(
                lambda: a_owned & (set(pl.owned_by(store, "b")) | set(pl.owned_by(store, "c"))),
                "b or c took over a partition of the killed a",
                alive=alive,
            )
            d = pl.worker(name="d")
            workers.append(d)
            wait_for(lambda: pl.owned_by(store, "d"), "d joined and applied a batch", alive=alive)
            b_owned = set(pl.owned_by(store, "b"))
            assert b_owned, "b owned nothing when it left"
            assert producer.alive(), "the load generator ended before b left: nothing under load"
            at_b_stop = pl.progress(store)
            assert b.stop() == 0, b.tail()
            workers.remove(b)
            wait_for(
                lambda: b_owned & (set(pl.owned_by(store, "c")) | set(pl.owned_by(store, "d"))),
                "c or d took over a partition b left",
                alive=alive,
            )
            producer.wait(180)
            pl.wait_applied(store, timeout_s=240, alive=alive)
        finally:
            stop_all([a, b, *workers], producer)
        off = keys.Progress.OFFSET
        after = {
            tag: row.get(keys.Progress.OWNER)
            for tag, row in pl.progress(store).items()
            if int(row.get(off, -1)) > int(at_b_stop[tag].get(off, -1))
        }
        assert after and set(after.values()) <= {"c", "d"}, f"applied after b left: {after}"
        summary = assert_verified(pl, truth)
        print(
            f"seed {seed}: a killed, d joined, b left; {len(after)} partitions moved on; {summary}"
        )
