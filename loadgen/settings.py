"""Defaults of ``pulse loadgen``, overridable by ``PULSE_LOADGEN_*`` environment variables."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class LoadgenSettings(BaseSettings):
    """Default load shape and producer tuning; command-line options override these."""

    model_config = SettingsConfigDict(env_prefix="PULSE_LOADGEN_", extra="ignore")

    rate: int = Field(default=1000, ge=0)
    duration_s: int = Field(default=60, ge=1)
    devices: int = Field(default=100, ge=1)
    services: int = Field(default=5, ge=1)
    seed: int = Field(default=42, ge=0)
    anomaly_rate: float = Field(default=0.05, ge=0.0, le=1.0)
    anomaly_after_s: int = Field(default=0, ge=0)
    bad_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    late_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    applog_share: float = Field(default=0.3, ge=0.0, le=1.0)
    linger_ms: int = Field(default=20, ge=0)
    max_pending: int = Field(default=20_000, ge=1)  # sent but not yet acknowledged records
    progress_interval_s: float = Field(default=1.0, gt=0)
