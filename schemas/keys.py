"""The store's key layout: the one contract between the pipeline (writer) and its readers.

The worker, the dashboard, ``pulse verify`` and ``pulse replay`` all build key names here.

Layout (``{tag}`` is a hash tag, ``<kind>.<partition>``, so every key written for one Kafka
partition lands in one cluster slot and a partition's batch applies atomically in one call)::

    pulse:{sensor.3}:progress                    hash   applied offset, watermark, counters,
                                                        topic (the offsets' identity), owner
    pulse:{sensor.3}:agg:<window>:<dim>:<start>  hash   "<entity>" -> packed statistics
    pulse:{sensor.3}:sk:<window>:<dim>:<start>   hash   "<entity>#<bucket>" -> count (sketch)
    pulse:{sensor.3}:ent:<dim>                   zset   entity -> last-seen 1m window start (ms)
    pulse:worker:<name>                          hash   a worker's live metrics
    pulse:fence                                  int    bumped by writers to fence durability

``<window>`` is a tumbling window name (``10s``, ``1m``); ``<start>`` its start in epoch ms.
An entity's statistics are one field, ``"n sum sumsq min max"`` (application logs append the
five status-class counts and the error count), see :func:`pack_stats` / :func:`unpack_stats`.
Hopping windows (5 min advancing by 1 min) are not stored: they are exact merges of five
consecutive ``1m`` windows (every statistic here is mergeable), see ``HOPPING_WINDOWS``.
A view that spans partitions (a site, the fleet) merges the keys of every partition.

An entity registry (``ent:<dim>``) is bounded: each apply raises the score of the entities it
saw to the start of their newest ``1m`` window (``ZADD GT``), drops members whose last ``1m``
window has expired (scored at or below ``now - 1m - 1m retention``) and keeps at most
``ENTITY_REGISTRY_CAP`` newest members; read it newest first (``ZRANGE ... REV``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from schemas.events import EventKind

PREFIX: Final = "pulse"

# Separators: identifiers (schemas.events.Ident/Route) cannot contain them.
ENTITY_SEP: Final = "|"
FIELD_SEP: Final = "#"


@dataclass(frozen=True, slots=True)
class TumblingWindow:
    """A tumbling event-time window that the worker writes."""

    name: str
    size_ms: int


@dataclass(frozen=True, slots=True)
class HoppingWindow:
    """A hopping window, read as the merge of ``size_ms // pane.size_ms`` consecutive panes."""

    name: str
    size_ms: int
    advance_ms: int
    pane: TumblingWindow

    @property
    def panes(self) -> int:
        """How many pane windows one hopping window spans."""
        return self.size_ms // self.pane.size_ms


WINDOW_10S: Final = TumblingWindow("10s", 10_000)
WINDOW_1M: Final = TumblingWindow("1m", 60_000)
TUMBLING_WINDOWS: Final = (WINDOW_10S, WINDOW_1M)
HOPPING_5M: Final = HoppingWindow("5m/1m", 300_000, 60_000, WINDOW_1M)
HOPPING_WINDOWS: Final = (HOPPING_5M,)


class Dim:
    """Aggregation dimensions (what an entity is) per event kind."""

    DEVICE: Final = "device"  # sensor: "<device_id>|<metric>"
    SITE: Final = "site"  # sensor: "<site>|<metric>"
    METRIC: Final = "metric"  # sensor, fleet-wide: "<metric>"
    ROUTE: Final = "route"  # applog: "<service>|<route>"
    SERVICE: Final = "service"  # applog, fleet-wide per service: "<service>"
    FLEET: Final = "fleet"  # applog, fleet-wide: "all"


DIMS: Final[dict[EventKind, tuple[str, ...]]] = {
    EventKind.SENSOR: (Dim.DEVICE, Dim.SITE, Dim.METRIC),
    EventKind.APPLOG: (Dim.ROUTE, Dim.SERVICE, Dim.FLEET),
}
FLEET_ENTITY: Final = "all"
# Members an entity registry (``ent:<dim>``) keeps at most, per partition and dim (newest first).
ENTITY_REGISTRY_CAP: Final = 100_000


class Stat:
    """Names of the statistics packed in an aggregate hash field, in packing order."""

    COUNT: Final = "n"
    SUM: Final = "sum"
    SUMSQ: Final = "sq"
    MIN: Final = "min"
    MAX: Final = "max"
    # applog only: request counts per status class, e.g. "<entity>#5xx"
    STATUS_CLASSES: Final = ("1xx", "2xx", "3xx", "4xx", "5xx")
    # applog only: ERROR-level events
    ERRORS: Final = "err"
    PACKED: Final = ("n", "sum", "sq", "min", "max")
    PACKED_APPLOG: Final = (*PACKED, *STATUS_CLASSES, "err")


class Progress:
    """Fields of a partition's progress hash."""

    OFFSET: Final = "offset"  # last applied Kafka offset (-1: none yet)
    WATERMARK: Final = "watermark"  # max event time seen minus allowed lateness, epoch ms
    MAX_EVENT_TIME: Final = "max_event_time"
    EVENTS: Final = "events"  # valid, on-time events applied to windows
    LATE: Final = "late"  # events later than the watermark (sent to the late topic)
    DEAD: Final = "dead"  # events that failed validation (sent to the dead-letter topic)
    BATCHES: Final = "batches"
    UPDATED_MS: Final = "updated_ms"  # wall clock of the last apply
    TOPIC: Final = "topic"  # the Kafka topic the offsets belong to (the offsets' identity)
    OWNER: Final = "owner"  # name of the worker that applied the last batch


def partition_tag(kind: EventKind | str, partition: int) -> str:
    """The hash tag content shared by every key of one topic partition."""
    return f"{EventKind(kind).value}.{partition}"


def progress_key(kind: EventKind | str, partition: int) -> str:
    """Key of a partition's progress hash (applied offset, watermark, counters)."""
    return f"{PREFIX}:{{{partition_tag(kind, partition)}}}:progress"


def agg_key(
    kind: EventKind | str, partition: int, window: TumblingWindow, dim: str, start_ms: int
) -> str:
    """Key of the aggregate hash of one partition, window instance and dimension."""
    return f"{PREFIX}:{{{partition_tag(kind, partition)}}}:agg:{window.name}:{dim}:{start_ms}"


def sketch_key(
    kind: EventKind | str, partition: int, window: TumblingWindow, dim: str, start_ms: int
) -> str:
    """Key of the quantile-sketch hash of one partition, window instance and dimension."""
    return f"{PREFIX}:{{{partition_tag(kind, partition)}}}:sk:{window.name}:{dim}:{start_ms}"


def entities_key(kind: EventKind | str, partition: int, dim: str) -> str:
    """Key of one dimension's entity registry in one partition (a sorted set, see above)."""
    return f"{PREFIX}:{{{partition_tag(kind, partition)}}}:ent:{dim}"


def progress_pattern(kind: EventKind | str) -> str:
    """A SCAN pattern matching the progress hashes of every partition of ``kind``."""
    return f"{PREFIX}:{{{EventKind(kind).value}.*}}:progress"


def agg_pattern(kind: EventKind | str, window: TumblingWindow | None = None) -> str:
    """A SCAN pattern matching aggregate hashes of every partition of ``kind``."""
    w = window.name if window else "*"
    return f"{PREFIX}:{{{EventKind(kind).value}.*}}:agg:{w}:*"


def sketch_pattern(kind: EventKind | str, window: TumblingWindow | None = None) -> str:
    """A SCAN pattern matching sketch hashes of every partition of ``kind``."""
    w = window.name if window else "*"
    return f"{PREFIX}:{{{EventKind(kind).value}.*}}:sk:{w}:*"


def parse_tag(key: str) -> tuple[EventKind, int]:
    """The (kind, partition) of a key's hash tag, e.g. ``pulse:{sensor.3}:progress``."""
    tag = key[key.index("{") + 1 : key.index("}")]
    kind, partition = tag.split(".", 1)
    return EventKind(kind), int(partition)


def parse_agg_key(key: str) -> tuple[EventKind, int, str, str, int]:
    """Split an aggregate key into (kind, partition, window name, dim, start_ms)."""
    head, tag_rest = key.split("{", 1)
    tag, rest = tag_rest.split("}", 1)
    kind, partition = tag.split(".", 1)
    _, _agg, window, dim, start = rest.split(":")
    if head != f"{PREFIX}:" or _agg != "agg":
        raise ValueError(f"not an aggregate key: {key!r}")
    return EventKind(kind), int(partition), window, dim, int(start)


def worker_key(name: str) -> str:
    """Key of a worker's live metrics hash."""
    return f"{PREFIX}:worker:{name}"


def pack_stats(values: Sequence[float]) -> str:
    """An aggregate field's value: statistics in ``Stat.PACKED[_APPLOG]`` order."""
    return " ".join(repr(float(v)) if not float(v).is_integer() else str(int(v)) for v in values)


def unpack_stats(value: str) -> dict[str, float]:
    """The statistics of a packed aggregate field, by name."""
    parts = value.split()
    names = Stat.PACKED_APPLOG if len(parts) > len(Stat.PACKED) else Stat.PACKED
    return {name: float(x) for name, x in zip(names, parts, strict=True)}


def fence_key() -> str:
    """Key the writer increments to make earlier writes durable after a reconnect."""
    return f"{PREFIX}:fence"


def entity(*parts: str) -> str:
    """Join identifier parts into one entity name."""
    return ENTITY_SEP.join(parts)


def field(entity_name: str, bucket: str) -> str:
    """The sketch-hash field of one bucket of one entity."""
    return f"{entity_name}{FIELD_SEP}{bucket}"


def split_field(name: str) -> tuple[str, str]:
    """Split a sketch-hash field into (entity, bucket)."""
    ent, _, bucket = name.rpartition(FIELD_SEP)
    return ent, bucket


def window_start(event_time_ms: int, window: TumblingWindow) -> int:
    """Start of the tumbling window instance that contains ``event_time_ms``."""
    return event_time_ms - event_time_ms % window.size_ms
