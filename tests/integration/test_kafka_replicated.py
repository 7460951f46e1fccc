"""Three Kafka brokers (replication factor 3, ``min.insync.replicas=2``): a broker lost mid-run
loses nothing.

The drill SIGKILLs a broker that leads partitions of Pulse's input topics while the load
generator produces (``acks=all``) and a worker applies; the leaders move, both carry on, the
broker comes back and catches up, and ``pulse verify`` finds the store equal to the truth file.
"""

from __future__ import annotations

import asyncio
import random
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline.stack.testing import RunningStack
from tests.integration.harness import Pipeline, Timeline, drill_seed, replayable, wait_for
from tests.integration.test_faults import FAST_GROUP, all_alive, assert_verified, stop_all

pytestmark = [pytest.mark.integration, pytest.mark.fault]

Described = dict[tuple[str, int], dict[str, object]]


async def _describe(bootstrap: str, topics: list[str]) -> Described:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10000)
    await admin.start()
    try:
        described = await admin.describe_topics(topics)
    finally:
        await admin.close()
    return {(t["topic"], p["partition"]): p for t in described for p in t["partitions"]}


def partitions(
    running: RunningStack, topics: list[str]
) -> dict[tuple[str, int], dict[str, object]]:
    """Leader, replicas and in-sync replicas of every partition of ``topics`` (asked again
    while the admin client picks a broker that is down)."""
    from aiokafka.errors import KafkaError

    found: list[Described] = []

    def described() -> bool:
        try:
            found.append(asyncio.run(_describe(running.bootstrap, topics)))
        except KafkaError:
            return False
        return True

    wait_for(described, "a live broker described the topics", timeout_s=60)
    return found[-1]


def led_by(running: RunningStack, topics: list[str], node_id: int) -> list[tuple[str, int]]:
    return sorted(tp for tp, p in partitions(running, topics).items() if p["leader"] == node_id)


def test_a_broker_lost_mid_run_loses_nothing(
    fresh_stack: Callable[..., RunningStack], tmp_path: Path
) -> None:
    seed = drill_seed()
    with replayable("replicated Kafka drill", seed):
        rng = random.Random(seed)
        running = fresh_stack(brokers=3)
        pl = Pipeline.create(running, tmp_path, **FAST_GROUP)
        inputs = [pl.topics["sensor"], pl.topics["applog"]]
        described = partitions(running, [*pl.topics.values(), *running.kafka_settings.topics])
        assert all(len(p["replicas"]) == 3 for p in described.values()), described  # type: ignore[arg-type]
        truth_file = tmp_path / "truth.json"
        producer = pl.start_loadgen(
            "--rate=1000", "--duration=25", "--devices=60", "--services=4", f"--seed={seed}",
            "--late-rate=0.01", "--bad-rate=0.005", truth=truth_file,
        )  # fmt: skip
        worker = pl.worker(name="w")
        alive = all_alive([worker])
        client = running.redis()
        timeline = Timeline()
        mark = timeline.mark
        try:
            wait_for(lambda: pl.applied_total(client), "the worker applied batches", alive=alive)
            node = rng.choice([n for n in (1, 2, 3) if led_by(running, inputs, n)])
            victim = running.stack.kafkas[node - 1]
            led = led_by(running, inputs, node)
            assert led, f"broker {node} leads no input partition: the fault would miss"
            assert producer.alive(), "the load generator ended before the broker was lost"
            applied_at_kill = pl.applied_total(client)
            victim.kill(signal.SIGKILL)
            mark("killed")
            wait_for(
                lambda: not led_by(running, inputs, node),
                f"the partitions broker {node} led have new leaders",
                alive=alive,
            )
            mark("new leaders")
            ends_after_kill = sum(pl.end_offsets().values())
            wait_for(
                lambda: sum(pl.end_offsets().values()) > ends_after_kill,
                "the load generator produced with a broker down",
                alive=alive,
            )
            mark("produced")
            wait_for(
                lambda: pl.applied_total(client) > applied_at_kill,
                "the worker applied with a broker down",
                alive=alive,
            )
            mark("applied")
            victim.launch()  # it boots and catches up while the run goes on
            producer.wait(180)
            mark("loadgen done")
            pl.wait_applied(client, timeout_s=240, alive=alive)
            mark("caught up")
            victim.wait_ready()
            mark("restarted")
            wait_for(
                lambda: all(
                    len(p["isr"]) == 3  # type: ignore[arg-type]
                    for p in partitions(running, inputs).values()
                ),
                "the restarted broker is back in sync",
                timeout_s=120,
                alive=alive,
            )
            mark("in sync")
        finally:
            stop_all([worker], producer)
        pl.assert_kafka_holds_truth(truth_file)
        summary = assert_verified(pl, truth_file)
        print(
            f"seed {seed}: broker {node} (leader of {len(led)} input partitions) killed; {summary}"
        )
        print(timeline)
