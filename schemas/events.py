"""The two event kinds Pulse ingests, as pydantic v2 models (the source of the JSON Schemas).

Identifiers are restricted to a safe alphabet so that they can be joined into store keys and
hash fields without escaping (see ``schemas.keys``). Event time is Unix epoch milliseconds (UTC).
Floats reject NaN and infinity.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Final, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

SCHEMA_VERSION: Final = 1


def _integer_version(value: object) -> object:
    # Literal[1] compares by equality, so even in strict mode it takes true and 1.0
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"schema_version must be the integer {SCHEMA_VERSION}")
    return value


SchemaVersion = Annotated[Literal[1], BeforeValidator(_integer_version)]

Ident = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")]
Route = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^/[A-Za-z0-9_.\-/{}]*$")]
EpochMillis = Annotated[
    int,
    Field(ge=0, le=253_402_300_799_999, description="Event time, Unix epoch milliseconds (UTC)"),
]
# Bounded so that sums of squares of a window stay finite in the store's float arithmetic.
Measurement = Annotated[float, Field(ge=-1e15, le=1e15, allow_inf_nan=False)]


class EventKind(StrEnum):
    """Which stream an event belongs to; each kind has its own topic."""

    SENSOR = "sensor"
    APPLOG = "applog"


class _Event(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class SensorReading(_Event):
    """One measurement from an IoT device."""

    schema_version: SchemaVersion = 1
    device_id: Ident
    site: Ident
    event_time: EpochMillis
    metric: Ident
    value: Measurement
    unit: Annotated[str, Field(min_length=1, max_length=16)]
    lat: Annotated[float, Field(ge=-90.0, le=90.0, allow_inf_nan=False)]
    lon: Annotated[float, Field(ge=-180.0, le=180.0, allow_inf_nan=False)]
    firmware: Annotated[str, Field(min_length=1, max_length=32)]


class LogLevel(StrEnum):
    """Severity of an application log event."""

    DEBUG = "DEBUG"
    INFO = "INFO"
    WARN = "WARN"
    ERROR = "ERROR"


class AppLogEvent(_Event):
    """One request handled by an application service."""

    schema_version: SchemaVersion = 1
    service: Ident
    route: Route
    event_time: EpochMillis
    level: LogLevel
    status_code: Annotated[int, Field(ge=100, le=599)]
    latency_ms: Annotated[float, Field(ge=0.0, le=3_600_000.0, allow_inf_nan=False)]
    trace_id: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9\-]+$")]
    message: Annotated[str, Field(max_length=2048)] = ""


EVENT_MODELS: dict[EventKind, type[SensorReading] | type[AppLogEvent]] = {
    EventKind.SENSOR: SensorReading,
    EventKind.APPLOG: AppLogEvent,
}


def status_class(status_code: int) -> str:
    """The status class of an HTTP status code: ``"2xx"`` for 204 and so on."""
    return f"{status_code // 100}xx"
