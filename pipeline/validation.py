"""Decode and validate a batch of raw Kafka values; what fails becomes a dead letter with a reason.

Each record is decoded by the fast msgspec mirror of its model (``schemas.wire``); only a record
that it rejects is validated by the pydantic model, which has the last word and names the reason.
Pure: the processing clock (``now_ms``) is passed in. Nothing here raises on bad input — every
record comes out either as a valid event or as a :class:`Rejected` entry naming why.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import msgspec
from pydantic import BaseModel, ValidationError

from schemas.events import AppLogEvent, SensorReading
from schemas.wire import APPLOG_DECODER, SENSOR_DECODER, AppLogRecord, SensorEvent

E = TypeVar("E")

_MAX_REASON = 300


@dataclass(frozen=True, slots=True)
class TimeBounds:
    """Event times accepted relative to the processing clock."""

    max_age_ms: int
    max_skew_ms: int


@dataclass(frozen=True, slots=True)
class Rejected:
    """A record that is not a valid event: its position in the batch and why."""

    index: int
    reason: str


@dataclass(slots=True)
class DecodedBatch(Generic[E]):
    """Valid events of a batch (with their positions in it) and the rejected records."""

    events: list[E] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)


def _describe(exc: ValidationError) -> str:
    errors = exc.errors(include_url=False, include_input=False)
    first = errors[0]
    if first["type"].startswith("json_"):
        return str(first["msg"])[:_MAX_REASON]
    parts = []
    for err in errors[:3]:
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        parts.append(f"{loc}: {err['msg']}")
    more = f" (+{len(errors) - 3} more)" if len(errors) > 3 else ""
    return ("schema violation: " + "; ".join(parts) + more)[:_MAX_REASON]


def decode_sensor(
    raws: Sequence[bytes | None], now_ms: int, bounds: TimeBounds
) -> DecodedBatch[SensorEvent]:
    """Validate raw sensor readings and their event-time bounds."""
    return _decode(SENSOR_DECODER, SensorReading, raws, now_ms, bounds)


def decode_applog(
    raws: Sequence[bytes | None], now_ms: int, bounds: TimeBounds
) -> DecodedBatch[AppLogRecord]:
    """Validate raw application log events and their event-time bounds."""
    return _decode(APPLOG_DECODER, AppLogEvent, raws, now_ms, bounds)


def _decode(
    decoder: msgspec.json.Decoder[Any],
    model: type[BaseModel],
    raws: Sequence[bytes | None],
    now_ms: int,
    bounds: TimeBounds,
) -> DecodedBatch[Any]:
    out: DecodedBatch[Any] = DecodedBatch()
    fast = decoder.decode
    validate = model.model_validate_json
    oldest = now_ms - bounds.max_age_ms
    newest = now_ms + bounds.max_skew_ms
    for i, raw in enumerate(raws):
        if not raw:
            out.rejected.append(Rejected(i, "empty value"))
            continue
        try:
            event = fast(raw)
        except (msgspec.ValidationError, msgspec.DecodeError):
            try:
                event = validate(raw)
            except ValidationError as exc:
                out.rejected.append(Rejected(i, _describe(exc)))
                continue
            except (ValueError, UnicodeDecodeError) as exc:  # defensive: any decoder error
                out.rejected.append(Rejected(i, f"invalid JSON: {exc}"[:_MAX_REASON]))
                continue
        t = event.event_time
        if t < oldest:
            out.rejected.append(
                Rejected(i, f"event_time {t} is older than the {bounds.max_age_ms} ms bound")
            )
        elif t > newest:
            out.rejected.append(
                Rejected(i, f"event_time {t} is more than {bounds.max_skew_ms} ms in the future")
            )
        else:
            out.events.append(event)
            out.positions.append(i)
    return out
