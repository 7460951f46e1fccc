"""The anomaly contract between the worker (writer) and its readers (CLI, dashboard):
the anomaly vector's layout, the signals detected, anomaly ids and the record codec.

An anomaly carries a fixed-length **anomaly vector**: the entity's recent window, normalised,
followed by context features. Readers search similar anomalies by cosine distance over it.

Layout (float32, ``VECTOR_DIM`` = 32)::

    index   feature
    0..23   the last WINDOW_LEN observed values, oldest first, ending with the anomalous one,
            as robust z-scores against the entity's slow level and scale, clipped to +-CLIP and
            divided by CLIP; left-padded with 0 while the entity has fewer observations
    24      anomaly score in [0, 1]
    25, 26  sin, cos of the hour of day (UTC) of the observation
    27      level shift: (fast level - slow level) / slow scale, clipped, / CLIP
    28      variance ratio: ln(recent residual variance / long-run one), clipped to +-CLIP, / CLIP
    29      one-step surprise: signed z of the observation against its prediction, / CLIP
    30      stuck: ln(1 + repeats of the same value in a row) / ln(1 + 64), at most 1
    31      sampling interval: log10(seconds between observations) / 6, clipped to [-1, 1]
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Final

import numpy as np
import numpy.typing as npt
import orjson

VECTOR_DIM: Final = 32  # length of every anomaly vector (float32)
WINDOW_LEN: Final = 24  # leading positions: the recent window of values
CLIP: Final = 10.0  # z-scores are clipped to +-CLIP and divided by it
F_SCORE: Final = 24
F_HOUR_SIN: Final = 25
F_HOUR_COS: Final = 26
F_LEVEL_SHIFT: Final = 27
F_VARIANCE_RATIO: Final = 28
F_SURPRISE: Final = 29
F_STUCK: Final = 30
F_INTERVAL: Final = 31
FEATURES: Final = (
    "score",
    "hour_sin",
    "hour_cos",
    "level_shift",
    "variance_ratio",
    "surprise",
    "stuck",
    "interval",
)
assert WINDOW_LEN + len(FEATURES) == VECTOR_DIM


# --- anomaly records ------------------------------------------------------------------------
# The worker raises anomalies on closed window instances (``DETECT_WINDOW`` of each kind's
# detected dim): a detector per (entity, signal) steps once per window with the signal's value.


class Signal:
    """What a detector watches, per closed window of its entity."""

    MEAN: Final = "mean"  # sensor: mean reading of device|metric
    MAX: Final = "max"  # sensor: highest reading
    FLAT: Final = "flat"  # sensor: 1 when a window's readings mostly repeat the one before them
    LATENCY: Final = "latency_p50"  # applog: a service's median latency (ms)
    ERROR_RATE: Final = "error_rate"  # applog: a service's share of ERROR-level events


SIGNALS: Final[dict[str, tuple[str, ...]]] = {
    "sensor": (Signal.MEAN, Signal.MAX, Signal.FLAT),
    "applog": (Signal.LATENCY, Signal.ERROR_RATE),
}
# What raised the alarm (the detector test with the smallest tail probability).
CAUSES: Final = ("spike", "shift", "stuck", "range")
FEED_FIELDS: Final = ("id", "entity", "signal", "cause", "score", "t", "value")

_REC_MAGIC: Final = b"PA"
_REC_VERSION: Final = 1
_REC_HEAD: Final = struct.Struct("<2sBI")  # magic, version, JSON length
_VEC_BYTES: Final = 4 * VECTOR_DIM


@dataclass(frozen=True, slots=True)
class AnomalyRecord:
    """One anomaly: an entity's signal in one closed window instance was surprising."""

    id: str
    kind: str  # "sensor" | "applog"
    partition: int
    entity: str  # window entity: "<device>|<metric>" or "<service>"
    signal: str  # a Signal
    cause: str  # one of CAUSES
    window_start_ms: int
    window_ms: int
    score: float  # in [0, 1]; the alarm threshold is the worker's
    value: float  # the signal's value in the window
    expected: float  # the detector's level before the window
    context: dict[str, str | int | float] = field(default_factory=dict)
    vector: npt.NDArray[np.float32] = field(
        default_factory=lambda: np.zeros(VECTOR_DIM, np.float32)
    )


def anomaly_id(kind: str, partition: int, window_start_ms: int, entity: str, signal: str) -> str:
    """The stable id of the anomaly of (entity, signal) in a window instance of a partition:
    a replay raises the same anomaly under the same id."""
    return f"{kind}.{partition}:{window_start_ms}:{entity}:{signal}"


def parse_anomaly_id(anomaly: str) -> tuple[str, int, int, str, str]:
    """(kind, partition, window start, entity, signal) of an anomaly id; ValueError if not one."""
    parts = anomaly.split(":")
    if len(parts) != 4:
        raise ValueError(f"not an anomaly id: {anomaly!r}")
    tag, start, entity, signal = parts
    kind, _, partition = tag.partition(".")
    if kind not in SIGNALS or not partition.isdigit() or not start.isdigit() or not entity:
        raise ValueError(f"not an anomaly id: {anomaly!r}")
    if signal not in SIGNALS[kind]:
        raise ValueError(f"not an anomaly id: {anomaly!r} (unknown signal {signal!r})")
    return kind, int(partition), int(start), entity, signal


def encode_record(rec: AnomalyRecord) -> bytes:
    """A record as bytes: header, JSON of the scalar fields, then the float32 vector."""
    body = orjson.dumps(
        {
            "id": rec.id,
            "kind": rec.kind,
            "partition": rec.partition,
            "entity": rec.entity,
            "signal": rec.signal,
            "cause": rec.cause,
            "window_start_ms": rec.window_start_ms,
            "window_ms": rec.window_ms,
            "score": rec.score,
            "value": rec.value,
            "expected": rec.expected,
            "context": rec.context,
        }
    )
    vec = np.ascontiguousarray(rec.vector, dtype="<f4")
    if vec.shape != (VECTOR_DIM,):
        raise ValueError(f"anomaly vector must have {VECTOR_DIM} values, got {vec.shape}")
    return _REC_HEAD.pack(_REC_MAGIC, _REC_VERSION, len(body)) + body + vec.tobytes()


def decode_record(blob: bytes) -> AnomalyRecord:
    """The record in ``blob``; ValueError says what is wrong with bytes that are not one."""
    data = bytes(blob)
    if len(data) < _REC_HEAD.size:
        raise ValueError(f"anomaly record too short: {len(data)} bytes")
    magic, version, size = _REC_HEAD.unpack_from(data)
    if magic != _REC_MAGIC:
        raise ValueError("not an anomaly record (bad magic)")
    if version != _REC_VERSION:
        raise ValueError(f"unsupported anomaly record version {version}")
    if len(data) != _REC_HEAD.size + size + _VEC_BYTES:
        raise ValueError(f"anomaly record is {len(data)} bytes, its header says otherwise")
    try:
        d = orjson.loads(data[_REC_HEAD.size : _REC_HEAD.size + size])
        vec = np.frombuffer(data, dtype="<f4", offset=_REC_HEAD.size + size).astype(np.float32)
        return AnomalyRecord(
            id=str(d["id"]),
            kind=str(d["kind"]),
            partition=int(d["partition"]),
            entity=str(d["entity"]),
            signal=str(d["signal"]),
            cause=str(d["cause"]),
            window_start_ms=int(d["window_start_ms"]),
            window_ms=int(d["window_ms"]),
            score=float(d["score"]),
            value=float(d["value"]),
            expected=float(d["expected"]),
            context=dict(d.get("context") or {}),
            vector=vec,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"malformed anomaly record: {exc}") from exc
