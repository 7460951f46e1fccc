"""Defaults of ``pulse loadgen``, overridable by ``PULSE_LOADGEN_*`` environment variables."""

from __future__ import annotations

from typing import Final

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

# what one load generator can simulate (beyond these its arrays would not fit in memory, or
# its event times in int64 milliseconds)
MAX_RATE: Final = 10_000_000  # events/s, real or simulated
MAX_DURATION_S: Final = 10 * 365 * 86_400
MAX_DEVICES: Final = 1_000_000
MAX_SERVICES: Final = 10_000


class LoadgenSettings(BaseSettings):
    """Default load shape and producer tuning; command-line options override these."""

    model_config = SettingsConfigDict(
        env_prefix="PULSE_LOADGEN_", extra="ignore", allow_inf_nan=False
    )

    rate: int = Field(default=1000, ge=0, le=MAX_RATE)
    duration_s: int = Field(default=60, ge=1, le=MAX_DURATION_S)
    devices: int = Field(default=100, ge=1, le=MAX_DEVICES)
    services: int = Field(default=5, ge=1, le=MAX_SERVICES)
    seed: int = Field(default=42, ge=0)
    anomaly_rate: float = Field(default=0.05, ge=0.0, le=1.0)
    anomaly_after_s: int = Field(default=0, ge=0, le=MAX_DURATION_S)
    bad_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    late_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    applog_share: float = Field(default=0.3, ge=0.0, le=1.0)
    max_pending: int = Field(default=20_000, ge=1)  # sent but not yet acknowledged records
    progress_interval_s: float = Field(default=1.0, gt=0)
