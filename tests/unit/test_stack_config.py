"""Rendering of the generated configuration files and small parsers of the local stack."""

from __future__ import annotations

import re
import stat
from pathlib import Path

import pytest
from pydantic import SecretStr

from pipeline.settings import KafkaSettings, StackSettings, StoreSettings
from pipeline.stack import kafka, valkey
from pipeline.stack.errors import PrerequisiteError, StackError
from pipeline.stack.stack import Stack


def props(text: str) -> dict[str, str]:
    return dict(
        line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#")
    )


def test_server_properties_single_kraft_node(tmp_path: Path) -> None:
    p = props(
        kafka.render_server_properties(
            port=19500, controller_port=19501, log_dir=tmp_path / "data", partitions=3
        )
    )
    assert p["process.roles"] == "broker,controller"
    assert p["controller.quorum.voters"] == "1@127.0.0.1:19501"
    assert p["listeners"] == "PLAINTEXT://127.0.0.1:19500,CONTROLLER://127.0.0.1:19501"
    assert p["advertised.listeners"] == "PLAINTEXT://127.0.0.1:19500"
    assert p["log.dirs"] == str(tmp_path / "data")
    assert p["num.partitions"] == "3"
    assert p["auto.create.topics.enable"] == "false"
    assert p["offsets.topic.replication.factor"] == "1"
    assert p["transaction.state.log.min.isr"] == "1"
    assert p["group.initial.rebalance.delay.ms"] == "0"


def test_pom_depends_on_kafka_and_the_slf4j_binding() -> None:
    pom = kafka.render_pom("3.9.1", "2.13")
    assert "<artifactId>kafka_2.13</artifactId>" in pom
    assert "<version>3.9.1</version>" in pom
    assert "<artifactId>slf4j-reload4j</artifactId>" in pom


def test_log4j_writes_to_the_given_file(tmp_path: Path) -> None:
    assert f"log4j.appender.file.File={tmp_path / 'server.log'}" in kafka.render_log4j(
        tmp_path / "server.log"
    )


@pytest.mark.parametrize(
    ("output", "major"),
    [
        ('openjdk version "17.0.15" 2025-04-15', 17),
        ('java version "1.8.0_392"', 8),
        ('openjdk version "21" 2023-09-19', 21),
        ("command not found", None),
    ],
)
def test_parse_java_major(output: str, major: int | None) -> None:
    assert kafka.parse_java_major(output) == major


def test_require_java_without_java_names_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(PrerequisiteError, match=r"install OpenJDK 17 .*KAFKA_HOME"):
        kafka.require_java()


def test_cluster_id_looks_like_a_kafka_uuid() -> None:
    ids = {kafka.random_cluster_id() for _ in range(200)}
    assert len(ids) == 200
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{22}", i) and not i.startswith("-") for i in ids)


@pytest.mark.parametrize(
    ("bootstrap", "expected"),
    [("127.0.0.1:9092", ("127.0.0.1", 9092)), ("localhost:1,other:2", ("localhost", 1))],
)
def test_parse_bootstrap(bootstrap: str, expected: tuple[str, int]) -> None:
    assert kafka.parse_bootstrap(bootstrap) == expected


def test_parse_bootstrap_rejects_missing_port() -> None:
    with pytest.raises(StackError, match="host:port"):
        kafka.parse_bootstrap("127.0.0.1")


def test_valkey_primary_config_is_durable_and_loopback_only(tmp_path: Path) -> None:
    text = valkey.render_config(port=7000, data_dir=tmp_path, log_file=tmp_path / "v.log")
    lines = text.splitlines()
    for expected in (
        "bind 127.0.0.1",
        "port 7000",
        "protected-mode yes",
        "daemonize no",
        "appendonly yes",
        "appendfsync always",
        'save ""',
        "set-proc-title no",
        "hz 100",  # the writer's short WAITAOF polls time out on this tick
        "auto-aof-rewrite-min-size 1gb",  # not every few seconds of writes
    ):
        assert expected in lines
    assert not any(line.startswith(("replicaof", "requirepass")) for line in lines)


def test_valkey_replica_config_follows_the_primary(tmp_path: Path) -> None:
    text = valkey.render_config(
        port=7001, data_dir=tmp_path, log_file=tmp_path / "v.log", replica_of=7000
    )
    assert "replicaof 127.0.0.1 7000" in text.splitlines()
    assert "appendfsync always" in text.splitlines()


def test_valkey_password_is_quoted() -> None:
    assert valkey.quote('a "b" \\c\nd') == '"a \\"b\\" \\\\c\\nd"'


def test_password_goes_to_a_0600_config_file_not_argv(tmp_path: Path) -> None:
    store = StoreSettings(port=7000, replica_port=7001, password=SecretStr("s3cret pass"))
    node = valkey.ValkeyService(tmp_path, 5.0, store, replica=True)
    argv, marker, _log = node._prepare()
    assert not any("s3cret" in arg for arg in argv)
    assert marker in argv
    config = node.config_file.read_text()
    assert 'requirepass "s3cret pass"' in config and 'masterauth "s3cret pass"' in config
    assert stat.S_IMODE(node.config_file.stat().st_mode) == 0o600


def test_no_replica_when_replica_port_is_none(tmp_path: Path) -> None:
    stack = Stack(
        StackSettings(home=tmp_path),
        KafkaSettings(bootstrap="127.0.0.1:19600"),
        StoreSettings(port=19601, replica_port=None),
    )
    assert stack.replica is None
    assert [s.name for s in stack.services] == ["valkey-primary", "kafka"]
    with pytest.raises(StackError, match="No replica"):
        stack.promote_replica()


@pytest.mark.parametrize("command", ["up", "status", "down"])
def test_a_home_that_is_a_file_is_one_sentence(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    from pipeline.cli import main

    home = tmp_path / "a-file"
    home.write_text("")
    assert main([command, "--home", str(home)]) == 1
    assert capsys.readouterr().err == (
        f"pulse {command}: The stack's home {home} is not a directory.\n"
    )


def test_a_home_that_cannot_be_made_is_one_sentence(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pipeline.cli import main

    (tmp_path / "a-file").write_text("")
    home = tmp_path / "a-file" / "home"  # under a file: no directory can be made there
    assert main(["up", "--home", str(home)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("pulse up: Cannot prepare the stack's files: Not a directory (")
    assert err.count("\n") == 1


def _bytes(jvm_size: str) -> int:
    power: int = 1024 ** ("kmg".index(jvm_size[-1].lower()) + 1)
    return int(jvm_size[:-1]) * power


def test_the_broker_runs_with_a_fixed_heap_and_regions_a_producer_batch_does_not_fill() -> None:
    from loadgen.producer import MAX_REQUEST_BYTES

    flags = kafka.broker_jvm_options("768m")
    assert flags[:2] == ["-Xms768m", "-Xmx768m"]  # Kafka's own: no heap resizing under load
    assert "-XX:+UseG1GC" in flags and "-XX:MaxGCPauseMillis=20" in flags
    (region,) = [f.split("=")[1] for f in flags if f.startswith("-XX:G1HeapRegionSize=")]
    # G1 allocates an object of half a region or more as "humongous" (past the occupancy
    # threshold, a concurrent mark cycle each): the load generator's requests stay below it
    assert _bytes(region) // 2 > MAX_REQUEST_BYTES


@pytest.mark.parametrize("heap", ["lots", "512", "0m", "-1g", "1.5g"])
def test_a_kafka_heap_the_jvm_cannot_read_is_refused(heap: str) -> None:
    with pytest.raises(ValueError, match="kafka_heap"):
        StackSettings(kafka_heap=heap)
