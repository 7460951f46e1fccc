"""Settings of the dashboard, read from ``PULSE_DASHBOARD_*`` environment variables."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class DashboardSettings(BaseSettings):
    """Where the dashboard listens and how much it reads per refresh."""

    model_config = SettingsConfigDict(
        env_prefix="PULSE_DASHBOARD_", extra="ignore", allow_inf_nan=False
    )

    address: str = "127.0.0.1"
    port: int = Field(default=8501, ge=1, le=65535)
    refresh_s: float = Field(default=2.0, gt=0)
    lookback_min: int = Field(default=60, ge=1, le=24 * 60)
    top_routes: int = Field(default=10, ge=1, le=1000)
    # site x metric rows the site table shows (the top ones by the chosen column)
    top_sites: int = Field(default=20, ge=1, le=1000)
    # 10 s windows averaged for the events/s figure
    rate_windows: int = Field(default=3, ge=1, le=60)
    # how often partitions and workers are rediscovered (each discovery SCANs the keyspace)
    discover_every_s: float = Field(default=30.0, gt=0)
    # the time range shown first: a preset of dashboard.timerange.PRESETS
    default_range: str = "last 1h"
    # KPI tile thresholds (warn, then crit)
    error_rate_warn: float = Field(default=0.02, ge=0, le=1)
    error_rate_crit: float = Field(default=0.05, ge=0, le=1)
    p99_warn_ms: float = Field(default=500.0, ge=0)
    p99_crit_ms: float = Field(default=1000.0, ge=0)
    anomalies_warn: int = Field(default=1, ge=0)
    anomalies_crit: int = Field(default=25, ge=0)
    # "data as of": seconds since the newest apply of any partition
    stale_warn_s: float = Field(default=15.0, gt=0)
    stale_crit_s: float = Field(default=60.0, gt=0)
    # how long a read of Kafka's offsets and diverted records may take (the page goes on without)
    kafka_timeout_s: float = Field(default=2.0, gt=0, le=30)
    # rows and points per refresh, at most
    feed_rows: int = Field(default=20, ge=1, le=1000)
    board_rows: int = Field(default=5, ge=1, le=100)
    map_devices: int = Field(default=2000, ge=1, le=100_000)
    metric_charts: int = Field(default=6, ge=1, le=50)
    diverted_samples: int = Field(default=5, ge=1, le=100)
