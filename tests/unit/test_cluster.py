"""The sharded store's configuration: cluster settings, node configs, slots, clients."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster

from pipeline.stack.acl import role_rules
from pipeline.stack.cluster import SLOTS, ClusterNodeService, cluster_lines, slot_ranges
from pipeline.stack.stack import Stack
from pipeline.store_router import slot_of
from schemas import keys
from schemas.events import EventKind
from schemas.settings import CLUSTER_NODES, StoreRole, StoreSettings, store_client


def _store(tmp_path: Path, **values: Any) -> StoreSettings:
    return StoreSettings(_env_file=tmp_path / "none.env", **values)


def test_slots_are_spread_evenly_and_cover_everything() -> None:
    ranges = slot_ranges(3)
    assert ranges == [(0, 5460), (5461, 10922), (10923, 16383)]
    covered = [s for first, last in ranges for s in range(first, last + 1)]
    assert covered == list(range(SLOTS))


def test_cluster_ports_default_to_the_primary_port_plus_i(tmp_path: Path) -> None:
    store = _store(tmp_path, port=7000, cluster=True)
    assert store.node_ports == [7000, 7001, 7002, 7003, 7004, 7005]
    assert store.bus_ports == [17000, 17001, 17002, 17003, 17004, 17005]


def test_cluster_ports_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PULSE_STORE_CLUSTER", "true")
    monkeypatch.setenv("PULSE_STORE_CLUSTER_PORTS", "7100,7101,7102,7103,7104,7105")
    monkeypatch.setenv("PULSE_STORE_CLUSTER_BUS_PORTS", "[8100, 8101, 8102, 8103, 8104, 8105]")
    store = _store(tmp_path)
    assert store.cluster and store.node_ports[0] == 7100 and store.bus_ports[-1] == 8105


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"cluster_ports": [7000, 7001]}, "6 distinct ports"),
        ({"cluster_bus_ports": [7000] * CLUSTER_NODES}, "6 distinct ports"),
        ({"sentinels": ["127.0.0.1:26379"]}, "PULSE_STORE_SENTINELS must be unset"),
        ({"db": 2}, "only database 0"),
    ],
)
def test_bad_cluster_settings_are_one_sentence(
    tmp_path: Path, values: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        _store(tmp_path, cluster=True, **values)


def test_a_node_config_is_a_cluster_node_and_never_a_replicaof(tmp_path: Path) -> None:
    store = _store(tmp_path, port=7000, cluster=True)
    for index in (0, 4):
        node = ClusterNodeService(tmp_path, 10.0, store, index)
        node._prepare()
        config = node.config_file.read_text()
        assert "cluster-enabled yes" in config
        assert f"cluster-port {17000 + index}" in config and f"port {7000 + index}" in config
        assert "replicaof" not in config and "appendfsync always" in config
        assert node.ports == {"port": 7000 + index, "cluster_bus": 17000 + index}
    assert "tls-cluster yes" in cluster_lines(17000, tls=True)


def test_the_stack_runs_six_nodes_instead_of_the_pair(tmp_path: Path) -> None:
    from pipeline.settings import KafkaSettings, StackSettings

    store = _store(tmp_path, port=7000, cluster=True)
    stack = Stack(StackSettings(home=tmp_path), KafkaSettings(_env_file=tmp_path / "x"), store)
    names = [s.name for s in stack.services]
    assert names[:6] == [f"valkey-node-{i}" for i in range(6)] and "valkey-replica" not in names
    assert stack.replica is None and stack.primary is stack.nodes[0]
    assert [n.is_primary for n in stack.nodes] == [True] * 3 + [False] * 3


def test_readers_get_a_cluster_client_and_the_writer_none(tmp_path: Path) -> None:
    store = _store(tmp_path, port=7000, cluster=True)
    client = store_client(store, asyncio=True)
    assert isinstance(client, AsyncRedisCluster)
    with pytest.raises(ValueError, match="one per primary"):
        store_client(store, asyncio=True, one_connection=True)
    direct = store_client(store, port=7003)  # another port: that node itself
    assert direct.connection_pool.connection_kwargs["port"] == 7003


def test_one_partition_is_one_slot_and_fence_keys_differ() -> None:
    for kind in EventKind:
        for p in range(6):
            tagged = [
                keys.progress_key(kind, p),
                keys.window_key(kind, p, keys.WINDOW_1M, "fleet", 0),
                keys.entities_key(kind, p, "fleet"),
                keys.board_key(kind, p, keys.Board.SITE_EVENTS, 0),
                keys.detector_key(kind, p),
                keys.anomalies_key(kind, p),
                keys.anomaly_index_key(kind, p),
                keys.feed_key(kind, p),
            ]
            if kind is EventKind.SENSOR:
                tagged += [keys.geo_key(p), keys.seen_key(p)]
            assert len({slot_of(k) for k in tagged}) == 1, tagged
    assert len({slot_of(keys.fence_key(n)) for n in range(20)}) == 20
    assert keys.fence_key() == "pulse:fence"


def test_cluster_clients_may_read_the_slot_map_under_acl() -> None:
    for role in (StoreRole.READER, StoreRole.WORKER):
        rules = role_rules(role)
        assert "+cluster|slots" in rules and "+command" in rules
        assert "+cluster|setslot" not in rules


def test_up_refuses_cluster_with_sentinel_before_writing_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import argparse

    from pipeline.stack import commands

    parser = argparse.ArgumentParser()
    commands.up_arguments(parser)
    args = parser.parse_args(["--home", str(tmp_path / "home"), "--cluster", "--sentinel"])
    assert commands.up(args) == 1
    assert "--cluster and --sentinel exclude each other" in capsys.readouterr().err
    assert not (tmp_path / "home").exists()
