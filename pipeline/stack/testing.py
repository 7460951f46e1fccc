"""Helpers to run throw-away stacks on free ports (tests, benchmarks, fault drills)."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.settings import KafkaSettings, StackSettings, StoreSettings
from pipeline.stack import envfile
from pipeline.stack.sentinel import SentinelSettings
from pipeline.stack.stack import Stack

if TYPE_CHECKING:
    import redis


@dataclass
class RunningStack:
    """A stack started for tests, with the settings that reach it."""

    stack: Stack
    stack_settings: StackSettings
    kafka_settings: KafkaSettings
    store_settings: StoreSettings

    @property
    def bootstrap(self) -> str:
        """Kafka bootstrap servers."""
        return self.kafka_settings.bootstrap

    def redis(self, replica: bool = False, decode: bool = True) -> redis.Redis:
        """A sync client to the primary, or to the replica (``decode``: decode_responses)."""
        node = self.stack.replica if replica else self.stack.primary
        assert node is not None, "this stack has no replica"
        return node.client(timeout_s=10.0, decode=decode)

    def env(self) -> dict[str, str]:
        """``PULSE_*`` variables that point a subprocess (``pulse ...``, a worker) at this stack."""
        env = {
            "PULSE_HOME": str(self.stack_settings.home),
            "PULSE_CACHE_DIR": str(self.stack_settings.cache_dir),
            "PULSE_KAFKA_CONTROLLER_PORT": str(self.stack_settings.kafka_controller_port),
            "PULSE_KAFKA_BOOTSTRAP": self.kafka_settings.bootstrap,
            "PULSE_KAFKA_PARTITIONS": str(self.kafka_settings.partitions),
            "PULSE_STORE_PORT": str(self.store_settings.port),
        }
        if self.stack_settings.kafka_brokers > 1:
            env["PULSE_KAFKA_BROKERS"] = str(self.stack_settings.kafka_brokers)
            env["PULSE_KAFKA_CONTROLLER_PORTS"] = str(self.stack_settings.kafka_controller_ports)
        if self.store_settings.replica_port is not None:
            env["PULSE_STORE_REPLICA_PORT"] = str(self.store_settings.replica_port)
        if self.store_settings.sentinels:
            env["PULSE_STORE_SENTINELS"] = ",".join(self.store_settings.sentinels)
        if self.store_settings.cluster:
            env["PULSE_STORE_CLUSTER"] = "true"
            env["PULSE_STORE_CLUSTER_PORTS"] = ",".join(map(str, self.store_settings.node_ports))
            env["PULSE_STORE_CLUSTER_BUS_PORTS"] = ",".join(map(str, self.store_settings.bus_ports))
        return env


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports that are free right now (all bound at once, then released)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]


def make_stack(
    home: Path,
    *,
    replica: bool = True,
    partitions: int = 6,
    brokers: int = 1,
    sentinels: int = 0,
    sentinel_settings: SentinelSettings | None = None,
    acl: bool = False,
    tls: bool = False,
    cluster: bool = False,
) -> RunningStack:
    """A (not yet started) stack in ``home`` on fresh free ports, using the shared jar cache.

    ``sentinels``: that many Valkey sentinels watch the primary (``sentinel_settings``: their
    timings), and the settings' clients find the primary through them. ``acl``/``tls``: as
    ``pulse up --acl``/``--tls``, with ``home/secrets.env`` (which ``env()``'s PULSE_HOME
    points subprocesses at); the settings read only that home's file, never the caller's.
    ``cluster``: a Valkey cluster of six nodes (as ``pulse up --cluster``) instead of the pair.
    """
    if acl or tls:
        envfile.prepare(home, acl=acl, tls=tls)
    secrets = envfile.env_file(home)
    # every port in one call: ports released by one call may come back from the next (a
    # sentinel once got the primary's port)
    ports = free_ports(2 + 2 * brokers + (12 if cluster else 0) + sentinels)
    primary_port, replica_port = ports[:2]
    kafka_ports, ports = ports[2 : 2 + 2 * brokers], ports[2 + 2 * brokers :]
    clients, controllers = kafka_ports[:brokers], kafka_ports[brokers:]
    nodes, sentinel_ports = (ports[:12], ports[12:]) if cluster else ([], ports)
    stack_settings = StackSettings(
        home=home,
        kafka_controller_port=controllers[0],
        kafka_controller_ports=controllers if brokers > 1 else [],
        kafka_brokers=brokers,
        start_timeout_s=120.0,
    )
    bootstrap = ",".join(f"127.0.0.1:{port}" for port in clients)
    kafka_settings = KafkaSettings(_env_file=secrets, bootstrap=bootstrap, partitions=partitions)
    store_settings = StoreSettings(
        _env_file=secrets,
        host="127.0.0.1",
        port=nodes[0] if cluster else primary_port,
        replica_port=replica_port if replica and not cluster else None,
        sentinels=[f"127.0.0.1:{port}" for port in sentinel_ports],
        cluster=cluster,
        cluster_ports=nodes[:6],
        cluster_bus_ports=nodes[6:],
    )
    stack = Stack(stack_settings, kafka_settings, store_settings, sentinel_settings)
    return RunningStack(stack, stack_settings, kafka_settings, store_settings)


def stop_child(proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> int:
    """SIGTERM a child process, wait, SIGKILL it if it does not stop; its exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(10)
