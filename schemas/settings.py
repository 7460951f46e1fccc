"""Settings every Pulse component shares, and the one store-client factory.

The worker, the dashboard, the load generator, ``pulse verify`` and the benchmarks all reach
Kafka and the store through these (``PULSE_KAFKA_*``, ``PULSE_STORE_*``, from the environment
or ``$PULSE_HOME/secrets.env``, which ``pulse up --acl``/``--tls`` write). Secrets are
``SecretStr``: they never show up in reprs or logs. :class:`EventTimeSettings` are the worker's
event-time bounds (``PULSE_WORKER_*``), which the load generator reads too, without importing
the worker.
"""

from __future__ import annotations

import functools
import os
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Final, Literal, TypedDict, cast, overload

from pydantic import Field, FilePath, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    DotEnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from schemas.argtypes import check_servers

if TYPE_CHECKING:
    import ssl

    import redis
    import redis.asyncio as aioredis
    from redis.typing import EncodableT


SECRETS_FILE = "secrets.env"


def secrets_file() -> Path:
    """``$PULSE_HOME/secrets.env``: the settings and passwords ``pulse up`` leaves for the rest."""
    return Path(os.environ.get("PULSE_HOME") or ".pulse") / SECRETS_FILE


class _HomeEnvFile(BaseSettings):
    """Settings that also read ``$PULSE_HOME/secrets.env`` (environment variables win).

    ``Model(_env_file=path)`` reads another file (``pulse up --home DIR``).
    """

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        if isinstance(dotenv_settings, DotEnvSettingsSource) and dotenv_settings.env_file is None:
            dotenv_settings = DotEnvSettingsSource(settings_cls, env_file=secrets_file())
        return init_settings, env_settings, dotenv_settings, file_secret_settings


def comma_list(value: object) -> object:
    """A list setting given as ``a,b,c`` (or ``[a,b,c]``) in the environment, as a list of its
    non-empty items; any other value as it is (pydantic checks it)."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("[") and text.endswith("]"):
            text = text[1:-1]
        return [item.strip() for item in text.split(",") if item.strip()]
    return value


# Kafka's rule for topic names (249 characters at most of these)
TOPIC_PATTERN: Final = r"^[A-Za-z0-9._-]{1,249}$"


class KafkaSettings(_HomeEnvFile):
    """Where the broker is, which topics Pulse uses, and how to reach it (``PLAINTEXT``/``SSL``).

    Every Kafka client (aiokafka's consumers, producers and admin clients, Faust's broker) takes
    its security settings from :meth:`client_kwargs` / :meth:`ssl_context`.
    """

    model_config = SettingsConfigDict(
        env_prefix="PULSE_KAFKA_", extra="ignore", allow_inf_nan=False
    )

    bootstrap: str = "127.0.0.1:9092"
    partitions: int = Field(default=6, ge=1, le=256)
    sensor_topic: str = Field(default="pulse.sensor", pattern=TOPIC_PATTERN)
    applog_topic: str = Field(default="pulse.applog", pattern=TOPIC_PATTERN)
    deadletter_topic: str = Field(default="pulse.deadletter", pattern=TOPIC_PATTERN)
    late_topic: str = Field(default="pulse.late", pattern=TOPIC_PATTERN)
    security_protocol: Literal["PLAINTEXT", "SSL"] = "PLAINTEXT"
    ssl_ca_file: FilePath | None = None  # the CA that signed the broker's certificate
    ssl_cert_file: FilePath | None = None  # this client's certificate (the broker may require one)
    ssl_key_file: FilePath | None = None

    @field_validator("bootstrap")
    @classmethod
    def _servers(cls, value: str) -> str:
        return check_servers(value)

    @model_validator(mode="after")
    def _usable(self) -> KafkaSettings:
        if len(set(self.topics)) < len(self.topics):
            raise ValueError(
                "PULSE_KAFKA_{SENSOR,APPLOG,DEADLETTER,LATE}_TOPIC must name four topics, got "
                + ", ".join(self.topics)
            )
        try:  # a CA or key this process cannot use is said now, not waited on as an outage
            self.ssl_context()
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise ValueError(f"PULSE_KAFKA_SSL_*_FILE cannot be used: {exc}") from None
        return self

    @property
    def topics(self) -> list[str]:
        """Every topic Pulse creates, in a stable order."""
        return [self.sensor_topic, self.applog_topic, self.deadletter_topic, self.late_topic]

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context of every Kafka client, or None on a PLAINTEXT listener."""
        if self.security_protocol != "SSL":
            return None
        import ssl

        context = ssl.create_default_context(
            cafile=str(self.ssl_ca_file) if self.ssl_ca_file else None
        )
        if self.ssl_cert_file is not None:
            context.load_cert_chain(
                str(self.ssl_cert_file), str(self.ssl_key_file) if self.ssl_key_file else None
            )
        return context

    def client_kwargs(self) -> dict[str, Any]:
        """What every aiokafka client takes besides ``bootstrap_servers``: {} for PLAINTEXT."""
        context = self.ssl_context()
        if context is None:
            return {}
        return {"security_protocol": "SSL", "ssl_context": context}


class StoreRole(StrEnum):
    """Who a store client is; with ACL users (``pulse up --acl``) each is its own user."""

    ADMIN = "admin"  # pulse up, tests: everything
    WORKER = "worker"  # pulse worker, pulse replay: Pulse's functions and what they touch
    READER = "reader"  # dashboard, verify, top, anomalies, similar, near: reads only


#: the ACL user of each role, and the replica's replication user
USERNAMES: dict[StoreRole, str] = {
    StoreRole.ADMIN: "pulse-admin",
    StoreRole.WORKER: "pulse-worker",
    StoreRole.READER: "pulse-reader",
}
REPLICATION_USER = "pulse-replication"
#: nodes of the cluster `pulse up --cluster` runs: CLUSTER_PRIMARIES primaries, one replica each
CLUSTER_PRIMARIES = 3
CLUSTER_NODES = 2 * CLUSTER_PRIMARIES


class StoreSettings(_HomeEnvFile):
    """How to reach the durable store (the Valkey primary, and its replica if any, or a cluster).

    With ``sentinels`` (``PULSE_STORE_SENTINELS=127.0.0.1:26379,127.0.0.1:26380,...``) every
    client finds the primary (and replica) of ``sentinel_service`` through Valkey Sentinel
    and follows a failover; ``port``/``replica_port`` then only name the nodes ``pulse up``
    runs.
    """

    model_config = SettingsConfigDict(
        env_prefix="PULSE_STORE_", extra="ignore", allow_inf_nan=False
    )

    host: str = "127.0.0.1"
    port: int = Field(default=6379, ge=1, le=65535)
    replica_port: int | None = Field(default=6380, ge=1, le=65535)
    # explicit credentials, used by every client whatever its role (with a username: that ACL
    # user; without: the default user's requirepass)
    username: str | None = None
    password: SecretStr | None = None
    # ACL users: set (or generated by `pulse up --acl`), each client connects as its role's user
    admin_password: SecretStr | None = None
    worker_password: SecretStr | None = None
    reader_password: SecretStr | None = None
    replication_password: SecretStr | None = None
    db: int = 0
    # TLS (rediss://): the CA that signed the store's certificate, and this client's certificate
    tls: bool = False
    tls_ca_file: FilePath | None = None
    tls_cert_file: FilePath | None = None
    tls_key_file: FilePath | None = None
    sentinels: Annotated[list[str], NoDecode] = Field(default_factory=list)
    sentinel_service: str = Field(default="pulse", pattern=r"^[A-Za-z0-9._-]{1,64}$")
    # a Valkey cluster (`pulse up --cluster`): 3 primaries and 3 replicas on `cluster_ports`
    # (default: port + i), their cluster bus on `cluster_bus_ports` (default: port + 10000);
    # clients start from `host:port` and follow the slot map
    cluster: bool = False
    cluster_ports: Annotated[list[int], NoDecode] = Field(default_factory=list)
    cluster_bus_ports: Annotated[list[int], NoDecode] = Field(default_factory=list)

    @field_validator("replica_port", mode="before")
    @classmethod
    def _no_replica(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("cluster_ports", "cluster_bus_ports", mode="before")
    @classmethod
    def _split_ports(cls, value: object) -> object:
        return comma_list(value)

    @model_validator(mode="after")
    def _cluster_layout(self) -> StoreSettings:
        if not self.cluster:
            return self
        if self.sentinels:
            raise ValueError("a cluster fails over by itself: PULSE_STORE_SENTINELS must be unset")
        if self.db != 0:
            raise ValueError("a cluster has only database 0 (PULSE_STORE_DB)")
        for name in ("cluster_ports", "cluster_bus_ports"):
            ports: list[int] = getattr(self, name)
            if ports and (len(ports) != CLUSTER_NODES or len(set(ports)) != CLUSTER_NODES):
                raise ValueError(f"{name} must name {CLUSTER_NODES} distinct ports")
            if any(not 1 <= p <= 65535 for p in ports):
                raise ValueError(f"{name} must be ports from 1 to 65535")
        return self

    @property
    def node_ports(self) -> list[int]:
        """The client ports of the cluster's nodes: the primaries first, then their replicas."""
        return self.cluster_ports or [self.port + i for i in range(CLUSTER_NODES)]

    @property
    def bus_ports(self) -> list[int]:
        """The cluster bus port of each node of :attr:`node_ports`."""
        return self.cluster_bus_ports or [p + 10000 for p in self.node_ports]

    @field_validator("sentinels", mode="before")
    @classmethod
    def _split_sentinels(cls, value: object) -> object:
        value = comma_list(value)
        if isinstance(value, list | tuple):
            for address in value:
                host, sep, port = str(address).rpartition(":")
                if not (sep and host and port.isdigit() and 1 <= int(port) <= 65535):
                    raise ValueError(f"{address!r} is not host:port")
            return [str(a) for a in value]
        return value

    @property
    def sentinel_addresses(self) -> list[tuple[str, int]]:
        """``sentinels`` as (host, port) pairs."""
        pairs = (a.rpartition(":") for a in self.sentinels)
        return [(host, int(port)) for host, _, port in pairs]

    def url(self, port: int | None = None) -> str:
        """A redis:// (rediss:// with TLS) URL without the password (safe to print)."""
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{self.host}:{port or self.port}/{self.db}"

    @property
    def acl(self) -> bool:
        """True when the store runs Pulse's ACL users (any role password is set)."""
        return any(self.role_password(role) for role in StoreRole)

    def role_password(self, role: StoreRole) -> SecretStr | None:
        """The password of ``role``'s ACL user, if set."""
        passwords = {
            StoreRole.ADMIN: self.admin_password,
            StoreRole.WORKER: self.worker_password,
            StoreRole.READER: self.reader_password,
        }
        return passwords[role]

    def credentials(self, role: StoreRole | None) -> tuple[str | None, str | None]:
        """(username, password) a client of ``role`` authenticates with; explicit ones win."""
        if self.username is not None or self.password is not None:
            secret = self.password.get_secret_value() if self.password else None
            return self.username, secret
        password = self.role_password(role) if role is not None else None
        if role is None or password is None:
            return None, None
        return USERNAMES[role], password.get_secret_value()

    def tls_kwargs(self) -> dict[str, Any]:
        """redis-py's TLS connection arguments: {} without TLS."""
        if not self.tls:
            return {}
        return {
            "ssl_ca_certs": str(self.tls_ca_file) if self.tls_ca_file else None,
            "ssl_certfile": str(self.tls_cert_file) if self.tls_cert_file else None,
            "ssl_keyfile": str(self.tls_key_file) if self.tls_key_file else None,
            "ssl_cert_reqs": "required",
            "ssl_check_hostname": True,
        }


class EventTimeSettings(BaseSettings):
    """Which event times the worker accepts, and how late an event may still be counted.

    Read from the worker's own variables (``PULSE_WORKER_*``): the load generator reads them
    to warn about runs the worker would drop and to write the lateness into its truth file.
    ``pipeline.settings.WorkerSettings`` extends it.
    """

    model_config = SettingsConfigDict(
        env_prefix="PULSE_WORKER_", extra="ignore", allow_inf_nan=False
    )

    allowed_lateness_s: float = Field(default=30.0, ge=0)
    max_event_age_s: float = Field(default=6 * 3600.0, gt=0)
    max_clock_skew_s: float = Field(default=300.0, ge=0)


class _ConnectionKwargs(TypedDict):
    """What every store client gets, whichever redis-py client or pool class builds it."""

    host: str
    port: int
    db: int
    username: str | None
    password: str | None
    decode_responses: bool
    protocol: int | None
    socket_timeout: float | None
    socket_connect_timeout: float


@overload
def store_client(
    store: StoreSettings,
    *,
    port: int | None = ...,
    db: int | None = ...,
    decode: bool = ...,
    timeout_s: float | None = ...,
    asyncio: Literal[False] = ...,
    one_connection: bool = ...,
    role: StoreRole | None = ...,
    protocol: int | None = ...,
) -> redis.Redis: ...


@overload
def store_client(
    store: StoreSettings,
    *,
    port: int | None = ...,
    db: int | None = ...,
    decode: bool = ...,
    timeout_s: float | None = ...,
    asyncio: Literal[True],
    one_connection: bool = ...,
    role: StoreRole | None = ...,
    protocol: int | None = ...,
) -> aioredis.Redis: ...


def store_client(
    store: StoreSettings,
    *,
    port: int | None = None,
    db: int | None = None,
    decode: bool = False,
    timeout_s: float | None = 5.0,
    asyncio: bool = False,
    one_connection: bool = False,
    role: StoreRole | None = None,
    protocol: int | None = None,
) -> redis.Redis | aioredis.Redis:
    """A client for the store (``port``: another node, e.g. the replica; ``db``: another db).

    ``role`` picks the ACL user (:meth:`StoreSettings.credentials`); with ``store.tls`` the
    client speaks TLS (``rediss://``); ``protocol`` is the RESP version (redis-py's default: None).

    With ``store.sentinels`` the client finds its node through Sentinel and follows failovers:
    the primary for ``port`` None or ``store.port``, a replica (else the primary) for
    ``store.replica_port``; any other port is that node, directly.

    With ``store.cluster`` (and ``port`` None or ``store.port``) the client is redis-py's
    ``RedisCluster``, routing each command by its keys' slot; the writer, which needs one
    connection per primary, uses ``pipeline.store_router`` instead.

    ``one_connection`` is the writer's client: a pool of exactly one connection, shared by
    pipelines and plain commands, and no retries. ``WAITAOF`` vouches only for the writes of
    its own connection; redis-py's pipelines borrow another pooled connection, and its retries
    re-send a command on a fresh connection, where ``WAITAOF`` has nothing to wait for.
    """
    import redis as redis_sync
    import redis.asyncio as redis_async
    from redis.backoff import NoBackoff

    username, password = store.credentials(role)
    kwargs: _ConnectionKwargs = {
        "host": store.host,
        "port": port or store.port,
        "db": store.db if db is None else db,
        "username": username,
        "password": password,
        "decode_responses": decode,
        "protocol": protocol,
        "socket_timeout": timeout_s,
        "socket_connect_timeout": 5.0 if timeout_s is None else min(timeout_s, 5.0),
    }
    if store.cluster and port in (None, store.port):
        if one_connection:
            raise ValueError(
                "a cluster has no one connection to write on: the worker's writer keeps one "
                "per primary (pipeline.store_router)"
            )
        return _cluster_client(store, kwargs, asyncio=asyncio)
    if store.sentinels and port in (None, store.port, store.replica_port):
        replica = port is not None and port == store.replica_port and port != store.port
        return _sentinel_client(
            store, kwargs, replica=replica, asyncio=asyncio, one_connection=one_connection
        )
    tls = store.tls_kwargs()
    if asyncio:
        packing = _hiredis_packing(redis_async.SSLConnection if tls else None)
        if not one_connection:
            pooled = redis_async.ConnectionPool(connection_class=packing, **kwargs, **tls)
            return redis_async.Redis(connection_pool=pooled)
        no_retry = redis_async.retry.Retry(NoBackoff(), 0)
        pool = redis_async.BlockingConnectionPool(
            max_connections=1,
            timeout=None,
            retry=no_retry,
            connection_class=packing,
            **kwargs,
            **tls,
        )
        return redis_async.Redis(connection_pool=pool, retry=no_retry)
    if not one_connection:
        return redis_sync.Redis(**kwargs, ssl=bool(tls), **tls)
    no_retry_sync = redis_sync.retry.Retry(NoBackoff(), 0)
    sync_tls: dict[str, Any] = {"connection_class": redis_sync.SSLConnection, **tls} if tls else {}
    # redis-py leaves the sync BlockingConnectionPool.__init__ unannotated (the asyncio one is not)
    sync_pool = redis_sync.BlockingConnectionPool(  # type: ignore[no-untyped-call]
        max_connections=1, timeout=None, retry=no_retry_sync, **kwargs, **sync_tls
    )
    return redis_sync.Redis(connection_pool=sync_pool, retry=no_retry_sync)


def _cluster_client(
    store: StoreSettings, kwargs: _ConnectionKwargs, *, asyncio: bool
) -> redis.Redis | aioredis.Redis:
    """:func:`store_client` on a cluster: redis-py's ``RedisCluster``, started from
    ``host:port``, which routes each command by its keys' slot and follows ``MOVED``/``ASK``.

    Typed as the plain client the readers take: it answers the same commands (a pipeline
    splits by node, ``SCAN`` and ``FUNCTION LOAD`` run on every primary); keys of one command
    must share a slot, which Pulse's keys of one partition do (``schemas.keys``).
    """
    from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
    from redis.cluster import RedisCluster

    node: dict[str, Any] = {k: v for k, v in kwargs.items() if k != "db"}
    tls = store.tls_kwargs()
    if asyncio:
        return cast("aioredis.Redis", AsyncRedisCluster(**node, ssl=bool(tls), **tls))
    return cast("redis.Redis", RedisCluster(**node, ssl=bool(tls), **tls))


def _sentinel_client(
    store: StoreSettings,
    kwargs: _ConnectionKwargs,
    *,
    replica: bool,
    asyncio: bool,
    one_connection: bool,
) -> redis.Redis | aioredis.Redis:
    """:func:`store_client` through Sentinel: the pool asks the sentinels for the current
    primary (or a replica) whenever it connects, and drops a connection to a demoted primary.

    ``one_connection`` keeps its meaning: one connection, never retried, so a failover shows
    up as a connection error and the writer fences on its new connection before acknowledging.
    """
    import redis as redis_sync
    import redis.asyncio as redis_async
    from redis.asyncio import sentinel as sentinel_async
    from redis.backoff import NoBackoff

    node: dict[str, Any] = {k: v for k, v in kwargs.items() if k not in ("host", "port")}
    node["is_master"] = not replica
    tls = store.tls_kwargs()  # to the nodes; the sentinels `pulse up` runs speak plain TCP
    node.update(tls)
    # the sentinels require the store's shared requirepass, if any (not with ACL users)
    shared = store.password is not None and store.username is None and not store.acl
    ask: dict[str, Any] = {
        "password": store.password.get_secret_value() if store.password and shared else None,
        "socket_timeout": kwargs["socket_connect_timeout"],
        "socket_connect_timeout": kwargs["socket_connect_timeout"],
    }
    service = store.sentinel_service
    if asyncio:
        # redis-py leaves the Sentinel classes' __init__ unannotated
        manager = sentinel_async.Sentinel(  # type: ignore[no-untyped-call]
            store.sentinel_addresses, sentinel_kwargs=ask
        )
        node["connection_class"] = _hiredis_packing(
            sentinel_async.SentinelManagedSSLConnection
            if tls
            else sentinel_async.SentinelManagedConnection
        )
        if not one_connection:
            pooled = sentinel_async.SentinelConnectionPool(  # type: ignore[no-untyped-call]
                service, manager, **node
            )
            return redis_async.Redis(connection_pool=pooled)
        no_retry = redis_async.retry.Retry(NoBackoff(), 0)
        pool = _sentinel_blocking_pools()[1](
            service, manager, max_connections=1, timeout=None, retry=no_retry, **node
        )
        return redis_async.Redis(connection_pool=pool, retry=no_retry)
    from redis import sentinel as sentinel_sync

    sync_manager = sentinel_sync.Sentinel(  # type: ignore[no-untyped-call]
        store.sentinel_addresses, sentinel_kwargs=ask
    )
    node["ssl"] = bool(tls)  # the sync pools pick their connection class by it
    if not one_connection:
        sync_pooled = sentinel_sync.SentinelConnectionPool(  # type: ignore[no-untyped-call]
            service, sync_manager, **node
        )
        return redis_sync.Redis(connection_pool=sync_pooled)
    no_retry_sync = redis_sync.retry.Retry(NoBackoff(), 0)
    sync_pool = _sentinel_blocking_pools()[0](
        service, sync_manager, max_connections=1, timeout=None, retry=no_retry_sync, **node
    )
    return redis_sync.Redis(connection_pool=sync_pool, retry=no_retry_sync)


@functools.cache
def _sentinel_blocking_pools() -> tuple[type[Any], type[Any]]:
    """(sync, asyncio) Sentinel pools that block for their connections, like the writer's.

    redis-py's Sentinel pools are plain pools: with one connection, a second user would get
    "Too many connections" instead of waiting its turn.
    """
    import redis
    import redis.asyncio
    from redis import sentinel as sentinel_sync
    from redis.asyncio import sentinel as sentinel_async

    class SyncPool(sentinel_sync.SentinelConnectionPool, redis.BlockingConnectionPool):
        pass

    class AsyncPool(sentinel_async.SentinelConnectionPool, redis.asyncio.BlockingConnectionPool):
        pass

    return SyncPool, AsyncPool


def _hiredis_packing(
    base: type[aioredis.Connection] | None = None,
) -> type[aioredis.Connection]:
    """redis-py's asyncio connection, packing commands with hiredis' C packer when present.

    redis-py's asyncio connection packs in Python, re-joining its buffer for every argument; a
    worker's apply carries thousands of field/value arguments, and packing them was most of
    its client time (hiredis packs the same bytes about 6x faster).
    """
    import redis.asyncio as redis_async

    parent = base or redis_async.Connection
    try:
        import hiredis
    except ImportError:  # pragma: no cover - hiredis is a declared dependency
        return parent
    pack = hiredis.pack_command

    class HiredisPacking(parent):  # type: ignore[valid-type,misc]
        def pack_command(self, *args: EncodableT) -> list[bytes]:
            # as redis-py does: a first argument with spaces is several ("CONFIG GET")
            first = args[0]
            if isinstance(first, str):
                args = (*first.encode().split(), *args[1:])
            elif isinstance(first, bytes) and b" " in first:
                args = (*first.split(), *args[1:])
            return [pack(args)]  # type: ignore[arg-type]  # its stub declares a 1-tuple

    return HiredisPacking
