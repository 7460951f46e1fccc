"""docker-compose.yml stays in step with the local stack's defaults (no Docker engine runs here)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from pipeline.settings import KafkaSettings, StackSettings, StoreSettings, WorkerSettings
from pipeline.stack import valkey

ROOT = Path(__file__).resolve().parents[2]


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def host_ports(service: dict[str, Any]) -> set[int]:
    return {int(p.split(":")[-2]) for p in service.get("ports", [])}


def test_services_and_profiles() -> None:
    services = compose()["services"]
    assert {
        "kafka",
        "topics",
        "valkey",
        "valkey-replica",
        "worker",
        "archive",
        "dashboard",
        "loadgen",
    } <= set(services)
    assert services["loadgen"]["profiles"] == ["loadgen"]
    for name in ("worker", "archive", "dashboard", "loadgen"):
        assert services[name]["build"] == "."
    assert (ROOT / "Dockerfile").exists()


def test_kafka_matches_local_stack() -> None:
    kafka = compose()["services"]["kafka"]
    assert kafka["image"] == f"apache/kafka:{StackSettings().kafka_version}"
    env = kafka["environment"]
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft, one node
    assert int(env["KAFKA_NUM_PARTITIONS"]) == KafkaSettings().partitions
    bootstrap_port = int(KafkaSettings().bootstrap.rsplit(":", 1)[1])
    assert bootstrap_port in host_ports(kafka)
    for p in kafka["ports"]:
        assert p.startswith("127.0.0.1:"), "bind to loopback like the local stack"


def test_brokers_run_the_jvm_pulse_up_runs() -> None:
    from pipeline.stack.kafka import broker_jvm_options

    services = compose()["services"]
    gc = [f for f in broker_jvm_options("1g") if not f.startswith(("-Xms", "-Xmx"))]
    for name in ("kafka", "kafka-secure"):
        flags = services[name]["environment"]["KAFKA_JVM_PERFORMANCE_OPTS"].split()
        assert set(gc) <= set(flags), name


def test_topics_are_created_like_pulse_up() -> None:
    services = compose()["services"]
    script = " ".join(services["topics"]["command"])
    k = KafkaSettings()
    for topic in k.topics:
        assert topic in script
    assert f"--partitions {k.partitions}" in script


def test_valkey_primary_and_replica_are_durable() -> None:
    services = compose()["services"]
    store = StoreSettings()
    primary, replica = services["valkey"], services["valkey-replica"]
    for svc in (primary, replica):
        cmd = svc["command"]
        assert cmd[cmd.index("--appendonly") + 1] == "yes"
        assert cmd[cmd.index("--appendfsync") + 1] == "always"
        assert cmd[cmd.index("--hz") + 1] == "100"  # as pulse up configures it
        assert cmd[cmd.index("--auto-aof-rewrite-min-size") + 1] == valkey.AOF_REWRITE_MIN_SIZE
    rcmd = replica["command"]
    assert rcmd[rcmd.index("--replicaof") + 1 : rcmd.index("--replicaof") + 3] == [
        "valkey",
        "6379",
    ]
    assert store.port in host_ports(primary)
    assert store.replica_port in host_ports(replica)


def test_pulse_services_share_settings() -> None:
    c = compose()
    env = c["x-pulse-env"]
    assert int(env["PULSE_KAFKA_PARTITIONS"]) == KafkaSettings().partitions
    assert env["PULSE_WORKER_DURABILITY"] == WorkerSettings().durability.value
    assert env["PULSE_STORE_HOST"] == "valkey"
    for name in ("worker", "archive", "dashboard", "loadgen"):
        assert c["services"][name]["environment"] == env


def test_archive_runs_like_the_worker_on_a_volume() -> None:
    services = compose()["services"]
    archive, worker = services["archive"], services["worker"]
    assert archive["command"][0] == "archive"
    assert archive["depends_on"]["topics"] == worker["depends_on"]["topics"]
    assert archive["restart"] == worker["restart"]
    url = archive["command"][archive["command"].index("--url") + 1]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in archive["volumes"]}
    assert url in mounts and mounts[url] in compose()["volumes"]


def test_cluster_profile_is_a_durable_three_by_two_cluster() -> None:
    data = compose()
    services = data["services"]
    nodes = {n: s for n, s in services.items() if n.startswith("valkey-c")}
    assert len(nodes) == 6
    subnet = data["networks"]["cluster"]["ipam"]["config"][0]["subnet"]
    prefix = subnet.rsplit(".", 1)[0] + "."
    addresses = []
    for node in nodes.values():
        command = node["command"]
        flags = dict(zip(command[1::2], command[2::2], strict=False))
        assert flags["--cluster-enabled"] == "yes" and flags["--appendfsync"] == "always"
        assert flags["--auto-aof-rewrite-min-size"] == valkey.AOF_REWRITE_MIN_SIZE
        address = node["networks"]["cluster"]["ipv4_address"]
        assert flags["--cluster-announce-ip"] == address and address.startswith(prefix)
        addresses.append(address)
    assert len(set(addresses)) == 6
    init = " ".join(services["cluster-init"]["command"])
    assert "--cluster-replicas 1" in init
    assert all(f"{a}:6379" in init for a in addresses)
    env = services["worker-cluster"]["environment"]
    assert env["PULSE_STORE_CLUSTER"] == "true" and env["PULSE_STORE_HOST"] in addresses
    assert StoreSettings(cluster=True, host=env["PULSE_STORE_HOST"]).cluster  # a valid layout
    assert services["dashboard-cluster"]["environment"] == env
    for name in (*nodes, "cluster-init", "worker-cluster", "dashboard-cluster"):
        assert services[name]["profiles"] == ["cluster"], name
