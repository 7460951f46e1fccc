"""The whole local stack: the Kafka broker(s), the Valkey primary and (optionally) its replica,
or a Valkey cluster (``PULSE_STORE_CLUSTER``, see ``cluster.py``)."""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pipeline.settings import KafkaSettings, StackSettings, StoreSettings
from pipeline.stack import processes
from pipeline.stack.cluster import ClusterNodeService, form_cluster
from pipeline.stack.errors import StackError
from pipeline.stack.kafka import KafkaService, formatted_brokers, kafka_classpath, require_java
from pipeline.stack.sentinel import SentinelService, SentinelSettings, known_primary
from pipeline.stack.service import Service, ServiceStatus
from pipeline.stack.valkey import ValkeyService, valkey_binary


class Stack:
    """Start, stop and inspect the local stack; each service is also reachable on its own.

    ``kafka``, ``primary`` and ``replica`` (None when ``StoreSettings.replica_port`` is None) offer
    ``start()``, ``stop()``, ``kill(signal)`` and ``is_running()``; ``start()`` after ``kill()``
    restarts on the same data (Kafka log dirs, Valkey AOF). On a cluster, ``nodes`` are its six
    nodes, ``primary`` is the first of them and ``replica`` is None.
    """

    def __init__(
        self,
        stack_settings: StackSettings | None = None,
        kafka_settings: KafkaSettings | None = None,
        store_settings: StoreSettings | None = None,
        sentinel_settings: SentinelSettings | None = None,
    ) -> None:
        settings = stack_settings or StackSettings()
        self.home = settings.home.expanduser().resolve()
        formatted = formatted_brokers(self.home)
        if formatted is not None and "kafka_brokers" not in settings.model_fields_set:
            # as many brokers as this home was made with
            settings = settings.model_copy(update={"kafka_brokers": formatted})
        self.stack_settings = settings
        self.kafka_settings = kafka_settings or KafkaSettings()
        self.store_settings = store_settings or StoreSettings()
        timeout = self.stack_settings.start_timeout_s
        self.kafkas = [
            KafkaService(self.stack_settings, self.kafka_settings, node=i)
            for i in range(self.stack_settings.kafka_brokers)
        ]
        self.kafka = self.kafkas[0]
        store = self.store_settings
        # with PULSE_STORE_SENTINELS: the sentinels, which the nodes follow (see sentinel.py)
        self.sentinels: list[SentinelService] = []
        follow = self.known_primary if store.sentinels else None
        if store.sentinels:
            tuning = sentinel_settings or SentinelSettings()
            self.sentinels = [
                SentinelService(
                    self.home,
                    timeout,
                    store,
                    tuning,
                    i,
                    self._monitor_port,
                    server=settings.valkey_server,
                )
                for i in range(len(store.sentinels))
            ]
        server = settings.valkey_server
        # with PULSE_STORE_CLUSTER: six cluster nodes (see cluster.py) instead of the pair
        self.nodes = [
            ClusterNodeService(self.home, timeout, store, i, server=server)
            for i in range(len(store.node_ports) if store.cluster else 0)
        ]
        self.primary: ValkeyService = (
            self.nodes[0]
            if self.nodes
            else ValkeyService(self.home, timeout, store, follow=follow, server=server)
        )
        self.replica = (
            ValkeyService(self.home, timeout, store, replica=True, follow=follow, server=server)
            if store.replica_port is not None and not self.nodes
            else None
        )

    def known_primary(self) -> int | None:
        """Under Sentinel, the port of the current primary (None: the configured one)."""
        return known_primary(self.sentinels)

    def _monitor_port(self) -> int:
        return self.known_primary() or self.store_settings.port

    @property
    def services(self) -> list[Service]:
        """Every configured service, in start-up order of readiness (primary before replica,
        sentinels last: they watch the nodes)."""
        if self.nodes:
            return [*self.nodes, *self.kafkas]
        replica: list[Service] = [self.replica] if self.replica else []
        return [self.primary, *replica, *self.kafkas, *self.sentinels]

    def check_prerequisites(self, services: list[Service] | None = None) -> None:
        """Fail early (before anything starts) if Java, the Kafka jars or valkey-server are missing.

        Fetches the Kafka jars into the cache on first use.
        """
        todo = self.services if services is None else services
        if any(k in todo for k in self.kafkas):
            require_java()
            kafka_classpath(self.stack_settings)
        if any(isinstance(s, ValkeyService | SentinelService) for s in todo):
            valkey_binary(self.stack_settings.valkey_server, tls=self.store_settings.tls)

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
        sentinels = [s for s in missing if s in self.sentinels]
        nodes = [s for s in missing if s not in sentinels]
        try:
            # Launch the slow JVM first so it boots while the Valkey nodes come up.
            for service in sorted(nodes, key=lambda s: s not in self.kafkas):
                service.launch()
                launched.append(service)
            for service in nodes:
                service.wait_ready()
            # the sentinels once the nodes run: they watch the primary from their start
            for service in sentinels:
                service.launch()
                launched.append(service)
            for service in sentinels:
                service.wait_ready()
            if self.nodes:
                form_cluster(self.nodes, self.stack_settings.start_timeout_s)
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
        # The brokers at once: one stopped after the others would lose its controller quorum
        # and wait out its controlled shutdown.
        with ThreadPoolExecutor(len(self.kafkas)) as pool:
            stopped = list(pool.map(Service.stop, self.kafkas))
        results = [(k.name, was) for k, was in zip(self.kafkas, stopped, strict=True)]
        known = {k.name for k in self.kafkas}
        # the sentinels before the nodes: stopping the primary under them would fail it over
        # replicas before their primaries (a replica left alone would try to take over)
        store_nodes = (
            list(reversed(self.nodes))
            if self.nodes
            else [*([self.replica] if self.replica else []), self.primary]
        )
        for service in [*self.sentinels, *store_nodes]:
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
        """Kafka bootstrap servers for clients (every broker)."""
        return ",".join(k.bootstrap for k in self.kafkas)

    def data_dirs(self) -> dict[str, Path]:
        """Each service's data directory."""
        return {s.name: s.data_dir for s in self.services}
