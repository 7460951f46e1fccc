"""Settings of the dashboard, read from ``PULSE_DASHBOARD_*`` environment variables."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class DashboardSettings(BaseSettings):
    """Where the dashboard listens and how much it reads per refresh."""

    model_config = SettingsConfigDict(env_prefix="PULSE_DASHBOARD_", extra="ignore")

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
