"""The whole local stack: the Kafka broker, the Valkey primary and (optionally) its replica."""

from __future__ import annotations

import contextlib
from pathlib import Path

from pipeline.settings import KafkaSettings, StackSettings, StoreSettings
from pipeline.stack import processes
from pipeline.stack.errors import StackError
from pipeline.stack.kafka import KafkaService, kafka_classpath, require_java
from pipeline.stack.service import Service, ServiceStatus
from pipeline.stack.valkey import ValkeyService, valkey_binary


class Stack:
    """Start, stop and inspect the local stack; each service is also reachable on its own.

    ``kafka``, ``primary`` and ``replica`` (None when ``StoreSettings.replica_port`` is None) offer
    ``start()``, ``stop()``, ``kill(signal)`` and ``is_running()``; ``start()`` after ``kill()``
    restarts on the same data (Kafka log dirs, Valkey AOF).
    """

    def __init__(
        self,
        stack_settings: StackSettings | None = None,
        kafka_settings: KafkaSettings | None = None,
        store_settings: StoreSettings | None = None,
    ) -> None:
        self.stack_settings = stack_settings or StackSettings()
        self.kafka_settings = kafka_settings or KafkaSettings()
        self.store_settings = store_settings or StoreSettings()
        self.home = self.stack_settings.home.expanduser().resolve()
        timeout = self.stack_settings.start_timeout_s
        self.kafka = KafkaService(self.stack_settings, self.kafka_settings)
        self.primary = ValkeyService(self.home, timeout, self.store_settings)
        self.replica = (
            ValkeyService(self.home, timeout, self.store_settings, replica=True)
            if self.store_settings.replica_port is not None
            else None
        )

    @property
    def services(self) -> list[Service]:
        """Every configured service, in start-up order of readiness (primary before replica)."""
        replica: list[Service] = [self.replica] if self.replica else []
        return [self.primary, *replica, self.kafka]

    def check_prerequisites(self, services: list[Service] | None = None) -> None:
        """Fail early (before anything starts) if Java, the Kafka jars or valkey-server are missing.

        Fetches the Kafka jars into the cache on first use.
        """
        todo = self.services if services is None else services
        if self.kafka in todo:
            require_java()
            kafka_classpath(self.stack_settings)
        if any(isinstance(s, ValkeyService) for s in todo):
            valkey_binary()

    def up(self) -> list[tuple[ServiceStatus, bool]]:
        """Start whatever is not running and wait until all of it is ready; idempotent.

        Returns each service's status and whether this call started it. If anything fails, the
        services this call started are stopped again before the ``StackError`` propagates.
        """
        missing = [s for s in self.services if not s.is_running()]
        self.check_prerequisites(missing)
        ports: dict[str, int] = {}
        for service in missing:
            ports.update(service.port_descriptions())
        processes.require_free_ports(ports)
        launched: list[Service] = []
        try:
            # Launch the slow JVM first so it boots while the Valkey nodes come up.
            for service in sorted(missing, key=lambda s: s is not self.kafka):
                service.launch()
                launched.append(service)
            for service in missing:
                service.wait_ready()
        except BaseException:
            for service in reversed(launched):
                with contextlib.suppress(StackError):
                    service.stop()
            raise
        return [(s.status(), s in missing) for s in self.services]

    def down(self) -> list[tuple[str, bool]]:
        """Stop everything this home's state files say we started; (service, was running) pairs.

        Processes whose pid now belongs to something else are never signalled.
        """
        results: list[tuple[str, bool]] = []
        known: set[str] = set()
        for service in [self.kafka, *([self.replica] if self.replica else []), self.primary]:
            known.add(service.name)
            results.append((service.name, service.stop()))
        # A service of an earlier configuration (e.g. a replica since disabled) still gets stopped.
        for state_file in sorted(self.home.glob(f"*/{processes.STATE_FILE}")):
            service_dir = state_file.parent
            if service_dir.name in known:
                continue
            state = processes.read_state(service_dir)
            if state is not None:
                results.append((service_dir.name, processes.terminate(state, 30.0)))
                processes.clear_state(service_dir)
        return results

    def status(self) -> list[ServiceStatus]:
        """Each configured service: running or stopped, port, pid, data dir."""
        return [s.status() for s in self.services]

    def is_running(self) -> bool:
        """True if every configured service runs."""
        return all(s.is_running() for s in self.services)

    def promote_replica(self) -> int:
        """REPLICAOF NO ONE on the replica; returns the port of the new primary."""
        if self.replica is None:
            raise StackError("No replica is configured (PULSE_STORE_REPLICA_PORT is unset).")
        return self.replica.promote()

    @property
    def bootstrap(self) -> str:
        """Kafka bootstrap servers for clients."""
        return self.kafka.bootstrap

    def data_dirs(self) -> dict[str, Path]:
        """Each service's data directory."""
        return {s.name: s.data_dir for s in self.services}
