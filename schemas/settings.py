"""Settings every Pulse component shares, and the one store-client factory.

The worker, the dashboard, the load generator, ``pulse verify`` and the benchmarks all reach
Kafka and the store through these (``PULSE_KAFKA_*``, ``PULSE_STORE_*``). Secrets are
``SecretStr``: they never show up in reprs or logs. :class:`EventTimeSettings` are the worker's
event-time bounds (``PULSE_WORKER_*``), which the load generator reads too, without importing
the worker.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, TypedDict, overload

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:
    import redis
    import redis.asyncio as aioredis
    from redis.typing import EncodableT


class KafkaSettings(BaseSettings):
    """Where the broker is and which topics Pulse uses."""

    model_config = SettingsConfigDict(env_prefix="PULSE_KAFKA_", extra="ignore")

    bootstrap: str = "127.0.0.1:9092"
    partitions: int = Field(default=6, ge=1, le=256)
    sensor_topic: str = "pulse.sensor"
    applog_topic: str = "pulse.applog"
    deadletter_topic: str = "pulse.deadletter"
    late_topic: str = "pulse.late"

    @property
    def topics(self) -> list[str]:
        """Every topic Pulse creates, in a stable order."""
        return [self.sensor_topic, self.applog_topic, self.deadletter_topic, self.late_topic]


class StoreSettings(BaseSettings):
    """How to reach the durable store (the Valkey primary, and its replica if any)."""

    model_config = SettingsConfigDict(env_prefix="PULSE_STORE_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(default=6379, ge=1, le=65535)
    replica_port: int | None = Field(default=6380, ge=1, le=65535)
    password: SecretStr | None = None
    db: int = 0

    def url(self, port: int | None = None) -> str:
        """A redis:// URL without the password (safe to print)."""
        return f"redis://{self.host}:{port or self.port}/{self.db}"


class EventTimeSettings(BaseSettings):
    """Which event times the worker accepts, and how late an event may still be counted.

    Read from the worker's own variables (``PULSE_WORKER_*``): the load generator reads them
    to warn about runs the worker would drop and to write the lateness into its truth file.
    ``pipeline.settings.WorkerSettings`` extends it.
    """

    model_config = SettingsConfigDict(env_prefix="PULSE_WORKER_", extra="ignore")

    allowed_lateness_s: float = Field(default=30.0, ge=0)
    max_event_age_s: float = Field(default=6 * 3600.0, gt=0)
    max_clock_skew_s: float = Field(default=300.0, ge=0)


class _ConnectionKwargs(TypedDict):
    """What every store client gets, whichever redis-py client or pool class builds it."""

    host: str
    port: int
    db: int
    password: str | None
    decode_responses: bool
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
) -> redis.Redis | aioredis.Redis:
    """A client for the store (``port``: another node, e.g. the replica; ``db``: another db).

    ``one_connection`` is the writer's client: a pool of exactly one connection, shared by
    pipelines and plain commands, and no retries. ``WAITAOF`` vouches only for the writes of
    its own connection; redis-py's pipelines borrow another pooled connection, and its retries
    re-send a command on a fresh connection, where ``WAITAOF`` has nothing to wait for.
    """
    import redis as redis_sync
    import redis.asyncio as redis_async
    from redis.backoff import NoBackoff

    kwargs: _ConnectionKwargs = {
        "host": store.host,
        "port": port or store.port,
        "db": store.db if db is None else db,
        "password": store.password.get_secret_value() if store.password else None,
        "decode_responses": decode,
        "socket_timeout": timeout_s,
        "socket_connect_timeout": 5.0 if timeout_s is None else min(timeout_s, 5.0),
    }
    if asyncio:
        packing = _hiredis_packing()
        if not one_connection:
            pooled = redis_async.ConnectionPool(connection_class=packing, **kwargs)
            return redis_async.Redis(connection_pool=pooled)
        no_retry = redis_async.retry.Retry(NoBackoff(), 0)
        pool = redis_async.BlockingConnectionPool(
            max_connections=1, timeout=None, retry=no_retry, connection_class=packing, **kwargs
        )
        return redis_async.Redis(connection_pool=pool, retry=no_retry)
    if not one_connection:
        return redis_sync.Redis(**kwargs)
    no_retry_sync = redis_sync.retry.Retry(NoBackoff(), 0)
    # redis-py leaves the sync BlockingConnectionPool.__init__ unannotated (the asyncio one is not)
    sync_pool = redis_sync.BlockingConnectionPool(  # type: ignore[no-untyped-call]
        max_connections=1, timeout=None, retry=no_retry_sync, **kwargs
    )
    return redis_sync.Redis(connection_pool=sync_pool, retry=no_retry_sync)


def _hiredis_packing() -> type[aioredis.Connection]:
    """redis-py's asyncio connection, packing commands with hiredis' C packer when present.

    redis-py's asyncio connection packs in Python, re-joining its buffer for every argument; a
    worker's apply carries thousands of field/value arguments, and packing them was most of
    its client time (hiredis packs the same bytes about 6x faster).
    """
    import redis.asyncio as redis_async

    try:
        import hiredis
    except ImportError:  # pragma: no cover - hiredis is a declared dependency
        return redis_async.Connection
    pack = hiredis.pack_command

    class HiredisPacking(redis_async.Connection):
        def pack_command(self, *args: EncodableT) -> list[bytes]:
            # as redis-py does: a first argument with spaces is several ("CONFIG GET")
            first = args[0]
            if isinstance(first, str):
                args = (*first.encode().split(), *args[1:])
            elif isinstance(first, bytes) and b" " in first:
                args = (*first.split(), *args[1:])
            return [pack(args)]  # type: ignore[arg-type]  # its stub declares a 1-tuple

    return HiredisPacking
