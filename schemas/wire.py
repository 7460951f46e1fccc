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

import re
from collections.abc import Callable, Sequence
from operator import attrgetter
from typing import Annotated, Final, Generic, Literal, TypeVar

import msgspec

from schemas.events import AppLogEvent, SensorReading
from schemas.idents import IDENT_MAX_LENGTH, IDENT_PATTERN

ROUTE_PATTERN: Final = r"^/[A-Za-z0-9_./{}\-]*\Z"
# Identifiers repeat across events (a few thousand devices send millions of readings): their
# patterns are checked once per distinct value by CheckedDecoder, not per event by the struct,
# which made decoding 3.5x slower. Only their lengths are checked by the struct.
_IDENT = msgspec.Meta(min_length=1, max_length=IDENT_MAX_LENGTH)
_ROUTE = msgspec.Meta(min_length=1, max_length=128)
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


T = TypeVar("T")


class CheckedDecoder(Generic[T]):
    """A struct decoder whose identifier fields are checked against their patterns once per
    distinct value (a bounded cache of the values seen valid).

    :meth:`decode` behaves as a msgspec decoder of a struct with the patterns; the worker's
    batch path uses ``decode_unchecked`` (no pattern checks) and then :meth:`breaking`, for one
    pattern check per distinct identifier of the batch.
    """

    def __init__(self, struct: type[T], patterns: dict[str, str], cache: int = 100_000) -> None:
        self._decoder = msgspec.json.Decoder(struct)
        # the batch path calls this per record: the decoder's own method, no wrapper
        self.decode_unchecked: Callable[[bytes], T] = self._decoder.decode
        self._patterns = {f: re.compile(p) for f, p in patterns.items()}
        self._valid: dict[str, set[str]] = {f: set() for f in patterns}
        self._cache = cache

    def decode(self, raw: bytes) -> T:
        """Decode and check, raising ``msgspec.ValidationError`` as the struct would."""
        event = self._decoder.decode(raw)
        for name in self.breaking([event]).get(0, ()):
            raise msgspec.ValidationError(
                f"Expected `str` matching regex {self._patterns[name].pattern!r} - at `$.{name}`"
            )
        return event

    def breaking(self, events: Sequence[T]) -> dict[int, list[str]]:
        """The events whose identifiers break a pattern: index -> the fields that do."""
        out: dict[int, list[str]] = {}
        for name, pattern in self._patterns.items():
            valid = self._valid[name]
            value_of = attrgetter(name)
            fresh = set(map(value_of, events)) - valid
            if not fresh:
                continue
            bad = {v for v in fresh if pattern.search(v) is None}
            if len(valid) + len(fresh) > self._cache:
                valid.clear()
            valid.update(fresh - bad)
            if bad:
                for i, v in enumerate(map(value_of, events)):
                    if v in bad:
                        out.setdefault(i, []).append(name)
        return out


SENSOR_DECODER: Final = CheckedDecoder(
    SensorWire, {"device_id": IDENT_PATTERN, "site": IDENT_PATTERN, "metric": IDENT_PATTERN}
)
APPLOG_DECODER: Final = CheckedDecoder(
    AppLogWire, {"service": IDENT_PATTERN, "route": ROUTE_PATTERN}
)

# A decoded event: a wire struct (fast path) or a model instance (records the model accepted).
SensorEvent = SensorReading | SensorWire
AppLogRecord = AppLogEvent | AppLogWire
