"""Decode and validate a batch of raw Kafka values; what fails becomes a dead letter with a reason.

Each record is decoded by the fast msgspec mirror of its model (``schemas.wire``); only a record
that it rejects is validated by the pydantic model, which has the last word and names the reason.
Pure: the processing clock (``now_ms``) is passed in. Nothing here raises on bad input — every
record comes out either as a valid event or as a :class:`Rejected` entry naming why. Reasons are
ASCII, at most ``_MAX_REASON`` characters, and echo input only escaped and truncated (they become
Kafka header values).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

import msgspec
import pydantic_core
from pydantic import ValidationError

from schemas.events import AppLogEvent, SensorReading
from schemas.wire import (
    APPLOG_DECODER,
    SENSOR_DECODER,
    AppLogRecord,
    CheckedDecoder,
    SensorEvent,
)


class _Timed(Protocol):
    """A decoded event, as far as the time bounds care."""

    @property
    def event_time(self) -> int: ...


E = TypeVar("E")
W = TypeVar("W", bound=_Timed)  # a fast-path wire struct
M = TypeVar("M", bound=_Timed)  # a model instance (the slow path)

_MAX_REASON = 300
_MAX_ECHO = 40  # characters of an input key quoted in a reason
# Above this size a value the fast decoder rejected is not handed to pydantic: a hostile
# megabyte object (say 90k distinct keys) costs pydantic up to a second, and no valid event
# comes near this size unless padded. The fast decoder's own message is the reason then.
SLOW_PATH_MAX_BYTES = 64 * 1024
# records decoded per list comprehension on the fast path; a chunk with a bad record is
# decoded again record by record (at 0.1 % bad records, one chunk in five)
_CHUNK = 256

_JSON_WS = b" \t\r\n"
# Checks JSON syntax (depth-limited) without building Python objects.
_SYNTAX = msgspec.json.Decoder(msgspec.Raw)
_KIND_BY_HEAD = {
    b"[": "array",
    b'"': "string",
    b"t": "true/false",
    b"f": "true/false",
    b"n": "null",
}
_SENSOR_FIELDS = frozenset(SensorReading.model_fields)
_APPLOG_FIELDS = frozenset(AppLogEvent.model_fields)
_FIELD_NAMES = _SENSOR_FIELDS | _APPLOG_FIELDS
# unknown keys of a value that its compact copy keeps (see _compact); the model names at most
# three errors in a reason anyway, and it reports unknown keys first
_KEEP_UNKNOWN = 3


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


def decode_sensor(
    raws: Sequence[bytes | None], now_ms: int, bounds: TimeBounds
) -> DecodedBatch[SensorEvent]:
    """Validate raw sensor readings and their event-time bounds."""
    return _decode(
        SENSOR_DECODER, SensorReading.model_validate_json, _SENSOR_FIELDS, raws, now_ms, bounds
    )


def decode_applog(
    raws: Sequence[bytes | None], now_ms: int, bounds: TimeBounds
) -> DecodedBatch[AppLogRecord]:
    """Validate raw application log events and their event-time bounds."""
    return _decode(
        APPLOG_DECODER, AppLogEvent.model_validate_json, _APPLOG_FIELDS, raws, now_ms, bounds
    )


def _decode(
    decoder: CheckedDecoder[W],
    validate: Callable[[bytes], M],
    fields: frozenset[str],
    raws: Sequence[bytes | None],
    now_ms: int,
    bounds: TimeBounds,
) -> DecodedBatch[W | M]:
    out: DecodedBatch[W | M] = DecodedBatch()
    fast = decoder.decode_unchecked
    decoded: list[W | M] = []
    at: list[int] = []
    fast_at: list[int] = []  # positions in ``decoded`` of fast-path events
    fast_events: list[W] = []
    for lo in range(0, len(raws), _CHUNK):
        chunk = raws[lo : lo + _CHUNK]
        try:  # most chunks hold no bad record: one comprehension, no per-record bookkeeping
            wires = [fast(raw) for raw in chunk]  # type: ignore[arg-type]
        except Exception:
            pass
        else:
            fast_at.extend(range(len(decoded), len(decoded) + len(wires)))
            fast_events.extend(wires)
            decoded.extend(wires)
            at.extend(range(lo, lo + len(wires)))
            continue
        for i, raw in enumerate(chunk, lo):
            event: W | M | str
            try:
                wire = fast(raw)  # type: ignore[arg-type]  # None (a tombstone) raises TypeError
                fast_at.append(len(decoded))
                fast_events.append(wire)
                event = wire
            except Exception as exc:
                # Whatever the fast decoder raised (DecodeError, ValidationError,
                # UnicodeDecodeError, ...), the record's fate is decided on the slow path.
                event = _slow_path(validate, fields, raw, exc)
                if isinstance(event, str):
                    out.rejected.append(Rejected(i, event))
                    continue
            decoded.append(event)
            at.append(i)
    # Identifier patterns, once per distinct value; a record that breaks one is decided by the
    # model, as if the struct had rejected it.
    breaking = decoder.breaking(fast_events)
    dropped: set[int] = set()
    for k, names in breaking.items():
        j = fast_at[k]
        i = at[j]
        reason = f"schema violation: {names[0]} does not match its pattern"
        event = _slow_path(validate, fields, raws[i], msgspec.ValidationError(reason))
        if isinstance(event, str):
            out.rejected.append(Rejected(i, event))
            dropped.add(j)
        else:
            decoded[j] = event
    oldest = now_ms - bounds.max_age_ms
    newest = now_ms + bounds.max_skew_ms
    if not dropped and all([oldest <= e.event_time <= newest for e in decoded]):
        out.events, out.positions = decoded, at  # the usual poll: every event within bounds
    else:
        _check_bounds(out, at, decoded, dropped, bounds, oldest, newest)
    if breaking or out.rejected:
        out.rejected.sort(key=lambda r: r.index)
    return out


def _check_bounds(
    out: DecodedBatch[W | M],
    at: list[int],
    decoded: list[W | M],
    dropped: set[int],
    bounds: TimeBounds,
    oldest: int,
    newest: int,
) -> None:
    """Each decoded event (not ``dropped``) into ``out``: kept, or rejected for its time."""
    for j, (i, event) in enumerate(zip(at, decoded, strict=True)):
        if j in dropped:
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


def _slow_path(
    validate: Callable[[bytes], M], fields: frozenset[str], raw: bytes | None, fast_error: Exception
) -> M | str:
    """The model's event for a record the fast decoder rejected, or the reason to reject it.

    ``validate`` is the model's ``model_validate_json``: it raises ``ValidationError``; ``fields``
    are the model's field names. The model judges a compact copy of the value first (see
    :func:`_compact`): what it rejects, the value itself would be rejected for; only a copy it
    accepts has the value itself validated.
    """
    if raw is None:
        return "null value (tombstone)"
    if not raw:
        return "empty value"
    try:
        if raw.lstrip(_JSON_WS)[:1] != b"{":
            return _not_an_object(raw)  # the model rejects it whatever follows
        if len(raw) > SLOW_PATH_MAX_BYTES:
            return _bounded(f"{_fast_reason(fast_error)} (in a value of {len(raw)} bytes)")
        if (compact := _compact(raw, fields)) is not None:
            doc, dropped = compact
            try:
                validate(doc)
            except ValidationError as exc:
                return _describe(exc, dropped)
        try:
            return validate(raw)
        except ValidationError as exc:
            return _describe(exc)
    except Exception as exc:  # not expected, but no record may stop the worker
        return _bounded(f"undecodable value ({type(exc).__name__})")


def _compact(raw: bytes, fields: frozenset[str]) -> tuple[bytes, int] | None:
    """A JSON object the model judges as it would ``raw`` when it rejects it, at a bounded cost,
    and how many of ``raw``'s errors the copy leaves out (None: ``raw`` is not a JSON object to
    the model's parser, which rejects it at once).

    The model's cost grows with the errors it collects, each holding its input: 64 KiB of unknown
    keys with nested arrays took it 200 ms, so a poll of such values stalled a worker for minutes.
    The copy keeps each key once (its last value, as the model reads duplicates), at most
    ``_KEEP_UNKNOWN`` unknown keys, and an array or object value as an empty one (no field takes
    either, and the error does not depend on what they hold). A copy the model rejects means
    ``raw`` is rejected too; the reason names the same first errors, and counts the left-out ones.
    """
    try:
        doc = pydantic_core.from_json(raw)  # the model's own parser: the same verdict on syntax
    except ValueError:
        return None
    if not isinstance(doc, dict):
        return None
    out: dict[str, object] = {}
    unknown = 0
    for key, value in doc.items():
        if key not in fields:
            unknown += 1
            if unknown > _KEEP_UNKNOWN:
                continue
        out[key] = [] if isinstance(value, list) else {} if isinstance(value, dict) else value
    # json, not orjson: it writes NaN and infinity as the literals the model's parser read
    return json.dumps(out).encode(), max(unknown - _KEEP_UNKNOWN, 0)


def _fast_reason(exc: Exception) -> str:
    if isinstance(exc, msgspec.ValidationError):
        return f"schema violation: {exc}"
    if isinstance(exc, UnicodeDecodeError):
        return "invalid JSON: invalid UTF-8"
    if isinstance(exc, msgspec.DecodeError):
        return f"invalid JSON: {exc}"
    return f"undecodable value ({type(exc).__name__})"


def _not_an_object(raw: bytes) -> str:
    try:
        _SYNTAX.decode(raw)
    except RecursionError:
        return "invalid JSON: nested too deeply"
    except Exception as exc:  # msgspec.DecodeError; UnicodeDecodeError is a ValueError
        return _bounded(f"invalid JSON: {exc}")
    head = raw.lstrip(_JSON_WS)[:1]
    return "not a JSON object: " + _KIND_BY_HEAD.get(head, "number")


def _describe(exc: ValidationError, dropped: int = 0) -> str:
    """The reason naming ``exc``'s first errors (``dropped``: errors beyond ``exc``'s own)."""
    errors = exc.errors(include_url=False, include_input=False, include_context=False)
    first = errors[0]
    if first["type"].startswith("json_"):
        return _bounded("invalid JSON: " + str(first["msg"]).removeprefix("Invalid JSON: "))
    parts = []
    for err in errors[:3]:
        loc = ".".join(_echo(p) for p in err["loc"]) or "<root>"
        parts.append(f"{loc}: {err['msg']}")
    total = len(errors) + dropped
    more = f" (+{total - 3} more)" if total > 3 else ""
    return _bounded("schema violation: " + "; ".join(parts) + more)


def _echo(part: str | int) -> str:
    """A location part (a field name, or a key from the input) safe to quote in a reason."""
    if part in _FIELD_NAMES or isinstance(part, int):
        return str(part)
    return ascii(part[:_MAX_ECHO]) + ("..." if len(part) > _MAX_ECHO else "")


def _bounded(text: str) -> str:
    """``text`` as printable ASCII (others backslash-escaped), at most ``_MAX_REASON`` long."""
    head = text[:_MAX_REASON]
    if not (head.isascii() and head.isprintable()):
        head = head.encode("unicode_escape").decode("ascii")
    return head[:_MAX_REASON]
