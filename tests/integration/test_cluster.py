"""The pipeline on a Valkey cluster (``pulse up --cluster``): three primaries, a replica each.

Each partition's apply runs on the primary that serves its hash tag's slot, with ``WAITAOF`` on
that node's connection; ``pulse verify`` reads across every node. The drills move one
partition's slot to another primary while the worker applies it, and SIGKILL the primary of
another partition mid-run; nothing is lost.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.cluster import RedisCluster

from dashboard import queries, timerange
from dashboard.page import read_page
from dashboard.queries import reader_client
from dashboard.settings import DashboardSettings
from pipeline.stack import StackError
from pipeline.stack.cluster import ClusterNodeService, move_slot, shards
from pipeline.stack.testing import RunningStack, make_stack
from pipeline.store_router import slot_of
from schemas import keys
from schemas.events import EventKind
from schemas.settings import StoreRole, store_client
from tests.integration.harness import Pipeline, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    """Kafka and a six-node Valkey cluster with ACL users (as ``pulse up --cluster --acl``),
    up for this module's tests."""
    running = make_stack(tmp_path_factory.mktemp("pulse-cluster"), cluster=True, acl=True)
    try:
        running.stack.up()
        yield running
    finally:
        with contextlib.suppress(StackError):
            running.stack.down()


@pytest.fixture
def store(cluster: RunningStack) -> Iterator[redis.Redis]:
    """A cluster client (slot-routed, typed as the readers take it), every primary emptied."""
    client = store_client(cluster.store_settings, decode=True, timeout_s=10.0, role=StoreRole.ADMIN)
    assert isinstance(client, RedisCluster)
    client.flushall()
    try:
        yield client
    finally:
        client.close()


def _replication(node: ClusterNodeService) -> dict[str, Any]:
    """A node's INFO replication ({} while it does not answer)."""
    try:
        with node.client() as client:
            return dict(client.info("replication"))
    except redis.RedisError:
        return {}


def _node_of(client: redis.Redis, key: str) -> int:
    assert isinstance(client, RedisCluster)
    node = client.get_node_from_key(key)
    assert node is not None
    return int(node.port)


def test_cluster_pipeline_is_exact(
    cluster: RunningStack, store: redis.Redis, tmp_path: Path
) -> None:
    settings = cluster.store_settings
    # three shards, each a primary and its replica, with a third of the slots each
    with cluster.stack.primary.client() as node:
        found = shards(node)
    assert len(found) == 3
    assert sorted(b - a + 1 for s in found for a, b in s.slots) == [5461, 5461, 5462]
    for shard in found:
        assert sorted(role for _, role, _ in shard.nodes) == ["master", "replica"]
    assert {p for s in found for p, _, _ in s.nodes} == set(settings.node_ports)

    pl = Pipeline.create(cluster, tmp_path)
    truth_file = tmp_path / "truth.json"
    truth = pl.loadgen(
        "--rate=0", "--duration=8", "--devices=30", "--services=4", "--seed=5",
        "--bad-rate=0.01", "--late-rate=0.02", "--anomaly-rate=0.3", truth=truth_file,
    )  # fmt: skip
    assert sum(truth["produced"].values()) == 8_000
    worker = pl.worker()
    try:
        pl.wait_applied(store, alive=worker.alive)
    finally:
        assert worker.stop() == 0, worker.tail()

    # the partitions really are spread: their progress hashes live on more than one primary
    holders = {_node_of(store, keys.progress_key(k, p)) for k, p in pl.input_partitions()}
    assert len(holders) >= 2, holders
    # every key of a partition is where its progress is (one slot per partition)
    nodes = {n.port: n for n in cluster.stack.nodes}
    for k, p in pl.input_partitions():
        tag = keys.partition_tag(k, p)
        with nodes[_node_of(store, keys.progress_key(k, p))].client() as node:
            assert any(True for _ in node.scan_iter(match=f"pulse:{{{tag}}}:w:*", count=1000))

    res = pl.verify(truth_file)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "verify: OK" in res.stdout

    status = pl.pulse("status")
    assert status.returncode == 0, status.stderr
    for i in range(6):
        assert f"valkey-node-{i}" in status.stdout
    assert status.stdout.count("Cluster shard, slots") == 3

    # the dashboard reads the cluster: one refresh over the run's minutes merges every node
    reader = reader_client(settings, timeout_s=10.0)
    # accepted late events reach up to 20 s before the start: open the range a minute earlier
    first = keys.window_start(int(truth["start_ms"]), keys.WINDOW_1M) - keys.WINDOW_1M.size_ms
    rng = timerange.checked(first, first + 3 * keys.WINDOW_1M.size_ms)
    topo = queries.discover(reader, min_partitions=cluster.kafka_settings.partitions)
    data = read_page(reader, topo, rng, time.time_ns() // 1_000_000, DashboardSettings())
    counted = sum(
        row["events"] for kind in EventKind for row in truth["per_partition"][kind.value].values()
    )
    assert data.range_kpis.events == counted > 0
    assert data.store is not None and len(data.offsets) == len(pl.input_partitions())
    reader.close()


def test_slot_migration_during_a_run_loses_nothing(
    cluster: RunningStack, store: redis.Redis, tmp_path: Path
) -> None:
    pl = Pipeline.create(cluster, tmp_path)
    truth_file = tmp_path / "truth.json"
    gen = pl.start_loadgen(
        # long enough to outlive the worker's start and the move on a slow, loaded machine:
        # the drill needs records of the partition arriving while its slot migrates
        "--rate=1500", "--duration=40", "--devices=30", "--services=4", "--seed=9",
        "--bad-rate=0.01", "--late-rate=0.02", truth=truth_file,
    )  # fmt: skip
    worker = pl.worker()
    try:
        # the partition to move: sensor.0, once the worker has applied some of it
        progress = keys.progress_key(EventKind.SENSOR, 0)

        def applied() -> int:
            value = store.hget(progress, keys.Progress.OFFSET)
            return int(value) if value is not None else -1

        wait_for(lambda: applied() >= 200, "sensor.0 has records applied", 120, worker.alive)
        slot = slot_of(progress)
        before = _node_of(store, progress)
        nodes = {n.port: n for n in cluster.stack.nodes if n.is_primary}
        target = next(p for p in nodes if p != before)
        others = [n.client() for p, n in nodes.items() if p not in (before, target)]

        def redirected_midway() -> int:
            return worker.log_count("answered AskError") + worker.log_count(
                "answered TryAgainError"
            )

        def hold_first_batch(moved: int) -> None:
            # with part of the partition moved, the worker's next apply of it is redirected
            if moved <= 5:
                wait_for(redirected_midway, "an apply redirected mid-migration", 60, worker.alive)

        auth = cluster.store_settings.credentials(StoreRole.ADMIN)
        with nodes[before].client() as source, nodes[target].client() as dest:
            try:
                moved = move_slot(
                    source, dest, slot, others=others, auth=auth, batch=5,
                    on_batch=hold_first_batch,
                )  # fmt: skip
            except BaseException:
                # finish the move: the module's next tests need a cluster with no slot
                # left half-migrated (its partition's applies would be refused for good)
                with contextlib.suppress(redis.RedisError):
                    move_slot(source, dest, slot, others=others, auth=auth)
                raise
        for client in others:
            client.close()
        at_move = applied()
        assert moved > 10  # the partition's progress, windows, registries, boards, ...
        assert gen.alive(), "the load generator finished before the move: nothing was in flight"
        # the worker goes on applying sensor.0 on its new primary
        wait_for(lambda: applied() > at_move, "sensor.0 applied on its new node", 120, worker.alive)
        assert _node_of(store, progress) == target
        with nodes[before].client() as old:
            assert not old.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot)
        gen.wait()
        pl.wait_applied(store, alive=worker.alive)
        # the worker was redirected mid-migration, re-mapped and sent its polls again
        redirects = {
            name: worker.log_count(f"answered {name}")
            for name in ("MovedError", "AskError", "TryAgainError")
        }
        print(f"moved {moved} keys of slot {slot}; the worker was redirected: {redirects}")
        assert redirects["AskError"] + redirects["TryAgainError"] >= 1, worker.tail()
    finally:
        gen.stop()
        assert worker.stop() == 0, worker.tail()
    res = pl.verify(truth_file)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "verify: OK" in res.stdout


def test_a_primary_killed_mid_run_fails_over_and_loses_nothing(
    cluster: RunningStack, store: redis.Redis, tmp_path: Path
) -> None:
    pl = Pipeline.create(cluster, tmp_path)
    truth_file = tmp_path / "truth.json"
    gen = pl.start_loadgen(
        "--rate=1500", "--duration=18", "--devices=30", "--services=4", "--seed=13",
        truth=truth_file,
    )  # fmt: skip
    worker = pl.worker()
    try:
        progress = keys.progress_key(EventKind.SENSOR, 1)

        def applied() -> int:
            value = store.hget(progress, keys.Progress.OFFSET)
            return int(value) if value is not None else -1

        wait_for(lambda: applied() >= 200, "sensor.1 has records applied", 120, worker.alive)
        # the primary that serves sensor.1, and its replica
        victim = next(n for n in cluster.stack.nodes if n.port == _node_of(store, progress))
        replica = next(
            n
            for n in cluster.stack.nodes
            if n is not victim and _replication(n).get("master_port") == victim.port
        )
        victim.kill()
        assert gen.alive(), "the load generator finished before the kill"

        wait_for(
            lambda: _replication(replica).get("role") == "master",
            "the replica is promoted",
            60,
            worker.alive,
        )
        # every offset acknowledged to Kafka is in the store (read after the commits)
        committed = pl.committed()
        stored = pl.applied_offsets(store)
        lost = {tp: (c, stored[tp]) for tp, c in committed.items() if stored[tp] < c - 1}
        assert not lost, lost
        victim.start()  # rejoins as the replica of the promoted node
        at_kill = applied()
        wait_for(lambda: applied() > at_kill, "sensor.1 applied after the failover", 120)
        assert _node_of(store, progress) == replica.port
        assert _replication(victim).get("role") == "slave"
        gen.wait()
        pl.wait_applied(store, alive=worker.alive)
        assert worker.log_count("store unavailable") >= 1, worker.tail()
    finally:
        gen.stop()
        assert worker.stop() == 0, worker.tail()
    res = pl.verify(truth_file)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "verify: OK" in res.stdout
