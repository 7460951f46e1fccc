"""The real local stack: start-up, Kafka and Valkey round trips, idempotence, crashes, the CLI."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from pipeline.stack import processes
from pipeline.stack.testing import RunningStack, make_stack
from schemas.kafka_probe import tls_mismatch

pytestmark = pytest.mark.integration

PULSE_SCRIPT = Path(sys.executable).with_name("pulse")


def run_pulse(
    *args: str, env: dict[str, str], timeout: float = 180.0
) -> subprocess.CompletedProcess[str]:
    """Run the installed ``pulse`` console script with ``env`` added to ours."""
    return subprocess.run(
        [str(PULSE_SCRIPT), *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def listening(port: int) -> bool:
    """True if something accepts connections on 127.0.0.1:port."""
    return processes.port_accepts(port)


def wait_replicated(client: redis.Redis, timeout_s: float = 120.0) -> None:
    """Until one replica acknowledged everything written so far (a deadline, not a speed check)."""
    deadline = time.monotonic() + timeout_s
    while client.wait(1, 1000) < 1:
        assert time.monotonic() < deadline, f"no replica acknowledged within {timeout_s:.0f} s"


def wait_aof_everywhere(client: redis.Redis, timeout_s: float = 120.0) -> None:
    """Until the writes so far are fsynced to the primary's and one replica's AOF."""
    deadline = time.monotonic() + timeout_s
    # redis-py leaves execute_command unannotated
    while (got := client.execute_command("WAITAOF", 1, 1, 1000)) != [1, 1]:  # type: ignore[no-untyped-call]
        assert time.monotonic() < deadline, f"WAITAOF 1 1 answered {got} after {timeout_s:.0f} s"


async def produce_and_consume(bootstrap: str, topic: str, payload: bytes) -> bytes:
    """Send one message with acks=all and read it back from the beginning."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(topic, payload, partition=0)
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None
    )
    await consumer.start()
    try:
        message = await asyncio.wait_for(consumer.getone(), timeout=30)
    finally:
        await consumer.stop()
    value: bytes | None = message.value  # aiokafka ships no types
    assert value is not None
    return value


# --- the session stack ----------------------------------------------------------------------


def test_status_reports_every_service_running(stack: RunningStack) -> None:
    rows = {row.service: row for row in stack.stack.status()}
    assert set(rows) == {"kafka", "valkey-primary", "valkey-replica"}
    assert all(row.running and row.pid for row in rows.values())
    assert rows["kafka"].port == int(stack.bootstrap.rsplit(":", 1)[1])
    assert rows["valkey-primary"].port == stack.store_settings.port
    assert rows["valkey-replica"].port == stack.store_settings.replica_port
    assert rows["kafka"].data_dir.joinpath("meta.properties").is_file()


def test_the_broker_runs_with_its_jvm_flags(stack: RunningStack) -> None:
    """The JVM took them (it refuses to start on a flag it does not know)."""
    from pipeline.stack.kafka import broker_jvm_options

    (row,) = [row for row in stack.stack.status() if row.service == "kafka"]
    assert row.pid is not None
    argv = Path(f"/proc/{row.pid}/cmdline").read_bytes().decode().split("\0")
    heap = stack.stack.stack_settings.kafka_heap
    assert set(broker_jvm_options(heap)) <= set(argv)
    assert not [a for a in argv if a.startswith(("-Xmx", "-Xms")) and not a.endswith(heap)]


def test_pulse_topics_exist_with_configured_partitions(stack: RunningStack) -> None:
    from aiokafka.admin import AIOKafkaAdminClient

    async def describe() -> list[dict[str, object]]:
        admin = AIOKafkaAdminClient(bootstrap_servers=stack.bootstrap)
        await admin.start()
        try:
            described: list[dict[str, object]] = await admin.describe_topics(
                stack.kafka_settings.topics
            )  # aiokafka ships no types
            return described
        finally:
            await admin.close()

    topics = {t["topic"]: t for t in asyncio.run(describe())}
    for name in stack.kafka_settings.topics:
        assert topics[name]["error_code"] == 0
        assert len(topics[name]["partitions"]) == stack.kafka_settings.partitions  # type: ignore[arg-type]


def test_kafka_round_trip(stack: RunningStack, new_topic: Callable[..., str]) -> None:
    topic = new_topic()
    assert asyncio.run(produce_and_consume(stack.bootstrap, topic, b"hello")) == b"hello"


def test_the_tls_probe_reads_a_real_plaintext_listener(stack: RunningStack) -> None:
    assert tls_mismatch(stack.kafka_settings) is None
    tls = stack.kafka_settings.model_copy(update={"security_protocol": "SSL"})
    assert tls_mismatch(tls) == (
        f"Kafka at {stack.kafka_settings.bootstrap.split(',')[0]} does not speak TLS: set "
        "PULSE_KAFKA_SECURITY_PROTOCOL=PLAINTEXT, or point PULSE_KAFKA_BOOTSTRAP at its SSL "
        "listener"
    )


def test_write_on_primary_is_visible_on_replica(stack: RunningStack, store: redis.Redis) -> None:
    store.set("pulse:test:key", "value")
    wait_replicated(store)
    with stack.redis(replica=True) as replica:
        assert replica.get("pulse:test:key") == "value"


def test_waitaof_confirms_local_and_replica_fsync(store: redis.Redis) -> None:
    store.hincrby("pulse:test:h", "n", 1)
    wait_aof_everywhere(store)


def test_up_again_is_idempotent(stack: RunningStack) -> None:
    before = {row.service: row.pid for row in stack.stack.status()}
    results = stack.stack.up()
    assert [started for _, started in results] == [False, False, False]
    assert {status.service: status.pid for status, _ in results} == before


# --- destructive tests on private stacks -----------------------------------------------------


def test_valkey_crash_restart_from_aof_and_promotion(
    fresh_stack: Callable[..., RunningStack],
) -> None:
    running = fresh_stack(start=False)
    primary, replica = running.stack.primary, running.stack.replica
    assert replica is not None
    assert primary.start() and replica.start()
    with running.redis() as client:
        client.set("survives", "crash")
        wait_aof_everywhere(client)  # the replica may still be syncing: wait, with a deadline

    old_pid = primary.pid
    assert primary.kill(signal.SIGKILL)
    assert not primary.is_running() and not listening(primary.port)
    assert primary.start()
    assert primary.pid != old_pid
    with running.redis() as client:
        assert client.get("survives") == "crash"  # replayed from the AOF

    assert replica.role() == "slave"
    assert running.stack.promote_replica() == replica.port
    assert replica.role() == "master"
    with running.redis(replica=True) as client:
        client.set("written-after-promotion", "1")  # would fail on a read-only replica

    running.stack.down()
    assert not listening(primary.port) and not listening(replica.port)
    assert [row.running for row in running.stack.status()] == [False, False, False]


def test_kafka_restart_after_sigkill_keeps_messages(
    fresh_stack: Callable[..., RunningStack],
) -> None:
    running = fresh_stack(partitions=1)
    topic = running.kafka_settings.sensor_topic
    assert asyncio.run(produce_and_consume(running.bootstrap, topic, b"before")) == b"before"
    kafka = running.stack.kafka
    assert kafka.kill(signal.SIGKILL)
    assert not kafka.is_running()
    started = time.monotonic()
    assert kafka.start()
    print(f"kafka restart after SIGKILL: {time.monotonic() - started:.1f} s")
    # Reading from the beginning returns the message written before the crash.
    assert asyncio.run(produce_and_consume(running.bootstrap, topic, b"after")) == b"before"


# --- the CLI ---------------------------------------------------------------------------------


def test_cli_up_status_down(tmp_path: Path) -> None:
    running = make_stack(tmp_path / "home")
    env = running.env()
    ports = [
        running.stack.kafka.port,
        running.stack_settings.kafka_controller_port,
        running.store_settings.port,
        running.store_settings.replica_port,
    ]
    try:
        started = time.monotonic()
        up = run_pulse("up", env=env)
        print(f"pulse up (jars cached, first start): {time.monotonic() - started:.1f} s")
        assert up.returncode == 0, up.stderr
        assert up.stdout.count(": started on") == 3

        status = run_pulse("status", env=env)
        assert status.returncode == 0
        for service in ("kafka", "valkey-primary", "valkey-replica"):
            line = next(ln for ln in status.stdout.splitlines() if service in ln)
            assert "running" in line

        again = run_pulse("up", env=env)
        assert again.returncode == 0
        assert again.stdout.count(": already running on") == 3

        pids = [row.pid for row in running.stack.status()]
        down = run_pulse("down", env=env)
        assert down.returncode == 0, down.stderr
        assert down.stdout.count(": stopped") == 3
        assert not any(listening(port) for port in ports if port is not None)
        assert all(pid is not None and processes.proc_start_ticks(pid) is None for pid in pids)
        status = run_pulse("status", env=env)
        assert status.stdout.count("stopped") == 3

        started = time.monotonic()
        warm = run_pulse("up", env=env)
        print(f"pulse up (warm restart on existing data): {time.monotonic() - started:.1f} s")
        assert warm.returncode == 0, warm.stderr
    finally:
        run_pulse("down", env=env)


def test_cli_bad_flag_is_one_sentence_and_exit_2() -> None:
    result = run_pulse("up", "--no-such-flag", env={})
    assert result.returncode == 2
    first = result.stderr.splitlines()[0]
    assert first == "pulse up: Unrecognized arguments: --no-such-flag.", first
    assert "Traceback" not in result.stderr


def test_cli_port_taken_by_someone_else(tmp_path: Path) -> None:
    running = make_stack(tmp_path / "home")
    with socket.socket() as someone_else:
        # a port the kernel hands to us (not the stack's released one, which a stack started by
        # a parallel run could have taken meanwhile); the stack's primary is configured on it
        someone_else.bind(("127.0.0.1", 0))
        someone_else.listen()
        taken = someone_else.getsockname()[1]
        result = run_pulse("up", env={**running.env(), "PULSE_STORE_PORT": str(taken)})
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert f"Port {taken}" in result.stderr
    assert "Valkey primary" in result.stderr
    assert not listening(running.stack.kafka.port)
    assert not any(running.stack.home.glob(f"*/{processes.STATE_FILE}"))


def test_cli_without_java_starts_nothing(tmp_path: Path) -> None:
    running = make_stack(tmp_path / "home")
    empty = tmp_path / "empty-path"
    empty.mkdir()
    env = {**running.env(), "PATH": str(empty), "KAFKA_HOME": ""}
    result = run_pulse("up", env=env)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert "Java" in result.stderr and "install OpenJDK" in result.stderr
    assert not listening(running.store_settings.port)
    assert not any(running.stack.home.glob(f"*/{processes.STATE_FILE}"))
