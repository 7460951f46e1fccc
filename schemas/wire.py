"""Fast decoders for the hot path: msgspec mirrors of the event models in ``schemas.events``.

The pydantic models stay the definition of a valid event (they export the JSON Schemas and give
the readable rejection reasons). Decoding with pydantic costs ≈8 µs per event and was the largest
share of a worker's CPU; these structs decode the same JSON in ≈1 µs. The contract, checked by
``tests/unit/test_wire.py`` with generated and hostile inputs: **whatever these structs accept,
the models accept with the same values**. The converse need not hold (pydantic's lax mode takes,
say, ``"42"`` for an int), so a record these structs reject is validated again by its model,
which decides, and names the reason when it rejects.
"""

from __future__ import annotations

from typing import Annotated, Final, Literal

import msgspec

from schemas.events import AppLogEvent, SensorReading

# Python's re.search lets "$" match before a trailing newline; "\Z" does not, as pydantic's "$".
_IDENT = msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+\Z")
_ROUTE = msgspec.Meta(min_length=1, max_length=128, pattern=r"^/[A-Za-z0-9_./{}\-]*\Z")
_TRACE = msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9\-]+\Z")

Ident = Annotated[str, _IDENT]
EpochMillis = Annotated[int, msgspec.Meta(ge=0, le=253_402_300_799_999)]


class SensorWire(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Mirror of :class:`schemas.events.SensorReading`."""

    device_id: Ident
    site: Ident
    event_time: EpochMillis
    metric: Ident
    value: Annotated[float, msgspec.Meta(ge=-1e15, le=1e15)]
    unit: Annotated[str, msgspec.Meta(min_length=1, max_length=16)]
    lat: Annotated[float, msgspec.Meta(ge=-90.0, le=90.0)]
    lon: Annotated[float, msgspec.Meta(ge=-180.0, le=180.0)]
    firmware: Annotated[str, msgspec.Meta(min_length=1, max_length=32)]
    schema_version: Literal[1] = 1


class AppLogWire(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Mirror of :class:`schemas.events.AppLogEvent`."""

    service: Ident
    route: Annotated[str, _ROUTE]
    event_time: EpochMillis
    level: Literal["DEBUG", "INFO", "WARN", "ERROR"]
    status_code: Annotated[int, msgspec.Meta(ge=100, le=599)]
    latency_ms: Annotated[float, msgspec.Meta(ge=0.0, le=3_600_000.0)]
    trace_id: Annotated[str, _TRACE]
    message: Annotated[str, msgspec.Meta(max_length=2048)] = ""
    schema_version: Literal[1] = 1


SENSOR_DECODER: Final = msgspec.json.Decoder(SensorWire)
APPLOG_DECODER: Final = msgspec.json.Decoder(AppLogWire)

# A decoded event: a wire struct (fast path) or a model instance (records the model accepted).
SensorEvent = SensorReading | SensorWire
AppLogRecord = AppLogEvent | AppLogWire
