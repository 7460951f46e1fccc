"""Several Kafka brokers in one local stack: ports, quorum, replication, the shared cluster id."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.settings import KafkaSettings, StackSettings
from pipeline.stack import kafka
from pipeline.stack.errors import StackError
from pipeline.stack.stack import Stack
from tests.unit.test_stack_config import props


def test_replication_grows_to_three_with_two_in_sync() -> None:
    assert [kafka.replication(n) for n in (1, 2, 3, 5)] == [(1, 1), (2, 1), (3, 2), (3, 2)]


def test_broker_ports_default_to_an_interleaved_run() -> None:
    ports = kafka.broker_ports(KafkaSettings(), StackSettings(kafka_brokers=3))
    assert ports == [(9092, 9093), (9094, 9095), (9096, 9097)]


def test_broker_ports_follow_the_bootstrap_list_and_controller_ports() -> None:
    settings = KafkaSettings(bootstrap="127.0.0.1:1000,127.0.0.1:2000,127.0.0.1:3000")
    stack = StackSettings(kafka_brokers=3, kafka_controller_ports=[1001, 2001, 3001])
    assert kafka.broker_ports(settings, stack) == [(1000, 1001), (2000, 2001), (3000, 3001)]
    with pytest.raises(StackError, match="lists 2 ports for 3 brokers"):
        kafka.broker_ports(settings, stack.model_copy(update={"kafka_controller_ports": [1, 2]}))


def test_three_nodes_share_one_quorum_and_replicate_three_times(tmp_path: Path) -> None:
    p = props(
        kafka.render_server_properties(
            port=9094, controller_port=9095, log_dir=tmp_path, partitions=6, node_id=2,
            voters="1@127.0.0.1:9093,2@127.0.0.1:9095,3@127.0.0.1:9097", brokers=3,
        )
    )  # fmt: skip
    assert p["node.id"] == "2"
    assert p["controller.quorum.voters"] == "1@127.0.0.1:9093,2@127.0.0.1:9095,3@127.0.0.1:9097"
    assert p["default.replication.factor"] == "3" and p["min.insync.replicas"] == "2"
    assert p["offsets.topic.replication.factor"] == "3"
    assert p["transaction.state.log.min.isr"] == "2"


def test_a_stack_of_three_brokers(tmp_path: Path) -> None:
    stack = Stack(StackSettings(home=tmp_path, kafka_brokers=3))
    assert [k.name for k in stack.kafkas] == ["kafka", "kafka-2", "kafka-3"]
    assert stack.kafka is stack.kafkas[0]
    assert stack.bootstrap == "127.0.0.1:9092,127.0.0.1:9094,127.0.0.1:9096"
    assert stack.kafkas[2].ports == {"port": 9096, "controller_port": 9097}
    assert [s.name for s in stack.services][-3:] == ["kafka", "kafka-2", "kafka-3"]


def test_every_broker_is_formatted_with_one_cluster_id(tmp_path: Path) -> None:
    stack = Stack(StackSettings(home=tmp_path, kafka_brokers=3))
    ids = {k.cluster_id() for k in stack.kafkas}
    assert len(ids) == 1
    assert json.loads((tmp_path / kafka.CLUSTER_FILE).read_text())["brokers"] == 3
    # later commands without --brokers find the home's broker count
    assert len(Stack(StackSettings(home=tmp_path)).kafkas) == 3
    with pytest.raises(StackError, match="formatted for 3 broker"):
        Stack(StackSettings(home=tmp_path, kafka_brokers=2)).kafka.cluster_id()


def test_a_home_formatted_before_the_cluster_file_keeps_its_id(tmp_path: Path) -> None:
    meta = tmp_path / "kafka" / "data" / "meta.properties"
    meta.parent.mkdir(parents=True)
    meta.write_text("version=1\ncluster.id=AbCdEf\nnode.id=1\n")
    assert Stack(StackSettings(home=tmp_path)).kafka.cluster_id() == "AbCdEf"
    with pytest.raises(StackError, match="formatted for 1 broker"):
        Stack(StackSettings(home=tmp_path, kafka_brokers=3)).kafka.cluster_id()
