"""Settings for each Pulse component, read from ``PULSE_*`` environment variables.

Each component builds the settings objects it needs: the stack (``StackSettings``), the broker
connection (``KafkaSettings``), the store connection (``StoreSettings``) and the stream worker
(``WorkerSettings``). Secrets are ``SecretStr`` so they never show up in reprs or logs.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Durability(StrEnum):
    """How durable a batch must be before its Kafka offsets are committed."""

    NONE = "none"  # acknowledged once applied in the primary's memory
    LOCAL = "local"  # fsynced to the primary's AOF (WAITAOF 1 0)
    REPLICA = "replica"  # fsynced locally and on one replica's AOF (WAITAOF 1 1)


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


class StackSettings(BaseSettings):
    """The local stack that ``pulse up`` starts: Kafka (KRaft) and Valkey primary + replica."""

    model_config = SettingsConfigDict(env_prefix="PULSE_", extra="ignore")

    home: Path = Path(".pulse")
    cache_dir: Path = Path.home() / ".cache" / "pulse"  # downloaded Kafka jars, reused across homes
    kafka_version: str = "3.9.1"
    scala_version: str = "2.13"
    kafka_heap: str = "512m"
    kafka_controller_port: int = Field(default=9093, ge=1, le=65535)
    start_timeout_s: float = Field(default=60.0, gt=0)


class WorkerSettings(BaseSettings):
    """The stream worker: batching, event-time windows, durability."""

    model_config = SettingsConfigDict(env_prefix="PULSE_WORKER_", extra="ignore")

    app_id: str = "pulse"
    batch_max: int = Field(default=5000, ge=1)
    batch_within_s: float = Field(default=0.1, gt=0)
    allowed_lateness_s: float = Field(default=30.0, ge=0)
    # No longer than the shortest window retention: an older event would be counted in a
    # window whose keys expire at once (checked below).
    max_event_age_s: float = Field(default=6 * 3600.0, gt=0)
    max_clock_skew_s: float = Field(default=300.0, ge=0)
    durability: Durability = Durability.REPLICA
    durability_timeout_ms: int = Field(default=5000, ge=1)
    retention_10s_s: int = Field(default=6 * 3600, ge=60)
    retention_1m_s: int = Field(default=3 * 24 * 3600, ge=60)
    session_timeout_s: float = Field(default=10.0, ge=6.0, le=300.0)
    heartbeat_interval_s: float = Field(default=2.0, gt=0)

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
