"""Malformed records: payloads the worker must reject (schema) or drop (event-time bounds).

Each kind is built from a would-be valid event so that it looks like real traffic gone wrong.
The schema rejects all of them except ``far_past``/``far_future``, which are well-formed but lie
far outside the worker's bounds (``max_event_age_s`` = 6 h, ``max_clock_skew_s`` = 300 s).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Final

import numpy as np
import orjson

from schemas.events import EventKind

DAY_MS: Final = 86_400_000
YEAR_MS: Final = 365 * DAY_MS
HUGE_BYTES: Final = 300_000  # well under Kafka's default 1 MB message limit


class FaultKind(StrEnum):
    """The kinds of malformed records."""

    RANDOM_BYTES = "random_bytes"
    TRUNCATED = "truncated"
    WRONG_TYPE = "wrong_type"
    MISSING_FIELD = "missing_field"
    EXTRA_FIELD = "extra_field"
    HUGE = "huge"
    NAN = "nan"
    FAR_PAST = "far_past"
    FAR_FUTURE = "far_future"


# Huge records are rare so that a high bad rate does not turn a run into a bulk upload.
_WEIGHTS: Final = {k: (1.0 if k is FaultKind.HUGE else 6.0) for k in FaultKind}
_KINDS: Final = tuple(_WEIGHTS)
_P: Final = np.array([_WEIGHTS[k] for k in _KINDS]) / sum(_WEIGHTS.values())

_WRONG_TYPES: Final[dict[EventKind, tuple[tuple[str, Any], ...]]] = {
    EventKind.SENSOR: (
        ("value", "n/a"),
        ("value", [21.5, 21.7]),
        ("event_time", "yesterday"),
        ("lat", "north"),
        ("device_id", 1234),
        ("site", None),
    ),
    EventKind.APPLOG: (
        ("status_code", "OK"),
        ("status_code", 200.5),
        ("latency_ms", "fast"),
        ("event_time", {"ms": 1}),
        ("service", 42),
        ("level", 3),
    ),
}
_REQUIRED: Final[dict[EventKind, tuple[str, ...]]] = {
    EventKind.SENSOR: ("device_id", "site", "event_time", "metric", "value", "unit", "lat", "lon",
                       "firmware"),
    EventKind.APPLOG: ("service", "route", "event_time", "level", "status_code", "latency_ms",
                       "trace_id"),
}  # fmt: skip
_NUMBER_FIELD: Final = {EventKind.SENSOR: "value", EventKind.APPLOG: "latency_ms"}
_LONG_FIELD: Final = {EventKind.SENSOR: "firmware", EventKind.APPLOG: "message"}
_NAN_LITERALS: Final = (b"NaN", b"Infinity", b"-Infinity")
_PLACEHOLDER: Final = "__pulse_nan__"


def pick(rng: np.random.Generator) -> FaultKind:
    """Draw a fault kind."""
    return _KINDS[int(rng.choice(len(_KINDS), p=_P))]


def corrupt(
    kind: FaultKind,
    event_kind: EventKind,
    event: dict[str, Any],
    sim_time_ms: int,
    rng: np.random.Generator,
) -> bytes:
    """A malformed payload derived from a valid ``event`` scheduled at ``sim_time_ms``."""
    d = dict(event)
    if kind is FaultKind.RANDOM_BYTES:
        # a leading byte >= 0x80 is never valid UTF-8 at the start, so never valid JSON
        return bytes([0x80 + int(rng.integers(0, 0x80))]) + rng.bytes(int(rng.integers(0, 200)))
    if kind is FaultKind.TRUNCATED:
        text = orjson.dumps(d)
        return text[: int(rng.integers(1, len(text) - 1))]  # always loses the closing brace
    if kind is FaultKind.WRONG_TYPE:
        wrong = _WRONG_TYPES[event_kind]
        name, bad = wrong[int(rng.integers(len(wrong)))]
        d[name] = bad
    elif kind is FaultKind.MISSING_FIELD:
        required = _REQUIRED[event_kind]
        del d[required[int(rng.integers(len(required)))]]
    elif kind is FaultKind.EXTRA_FIELD:
        d["debug_info"] = "sampled=true"
    elif kind is FaultKind.HUGE:
        d[_LONG_FIELD[event_kind]] = "x" * HUGE_BYTES
    elif kind is FaultKind.NAN:
        d[_NUMBER_FIELD[event_kind]] = _PLACEHOLDER  # orjson cannot write NaN: splice it in
        literal = _NAN_LITERALS[int(rng.integers(len(_NAN_LITERALS)))]
        return orjson.dumps(d).replace(f'"{_PLACEHOLDER}"'.encode(), literal)
    elif kind is FaultKind.FAR_PAST:
        d["event_time"] = max(0, sim_time_ms - int(rng.integers(YEAR_MS, 5 * YEAR_MS)))
    elif kind is FaultKind.FAR_FUTURE:
        d["event_time"] = sim_time_ms + int(rng.integers(DAY_MS, 30 * DAY_MS))
    return orjson.dumps(d)
