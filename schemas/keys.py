"""The store's key layout: the one contract between the pipeline (writer) and its readers.

The worker, the dashboard, ``pulse verify`` and ``pulse replay`` all build key names here.

Layout (``{tag}`` is a hash tag, ``<kind>.<partition>``, so every key written for one Kafka
partition lands in one cluster slot and a partition's batch applies atomically in one call)::

    pulse:{sensor.3}:progress                    hash   applied offset, watermark, counters,
                                                        topic (the offsets' identity), owner
    pulse:{sensor.3}:w:<window>:<dim>:<start>    hash   "<entity>" -> packed value (statistics
                                                        and quantile sketch, schemas.packed)
                                                        or "@<offset>" -> a bundle of them
                                                        (the dims ``bundled`` names)
    pulse:{sensor.3}:ent:<dim>                   zset   entity -> last-seen 1m window start (ms)
    pulse:{sensor.3}:top:<board>:<start>         zset   a leaderboard of one 1m window instance
                                                        (this partition's share, see BOARDS)
    pulse:{sensor.3}:det                         hash   "<entity>~<signal>" -> detector state
    pulse:{sensor.3}:anom                        hash   anomaly id -> record (schemas.anomaly)
    pulse:{sensor.3}:anom:t                      zset   anomaly id -> window start (ms)
    pulse:{sensor.3}:feed                        stream the live anomaly feed (capped)
    pulse:worker:<name>                          hash   a worker's live metrics
    pulse:fence                                  int    bumped by writers to fence durability
    pulse:{fence.<n>}                            int    the same, per primary of a cluster

``<window>`` is a tumbling window name (``10s``, ``1m``); ``<start>`` its start in epoch ms.
An entity's value in a window instance is absolute: the worker that owns the partition keeps
the open windows and rewrites the values a batch touched, with the offset, in one atomic call.
The ``10s`` device and service instances, which only the worker (its detectors' input and
restores) and ``pulse verify`` read whole, are written as *bundles*: one field per apply, named
by its last offset, holding the values of the entities it touched (``schemas.packed``; the
newest holding an entity wins); an instance that more than one apply wrote is written once
more whole when it closes, replacing the hash. A store writes one field where it would write
hundreds; no reader asks such an instance for one entity. Read a window hash through
``packed.entity_values``, which resolves either form.
Which dimensions each window keeps is a worker setting (``PULSE_WORKER_DIMS_10S``/``_1M``).
Hopping windows (5 min advancing by 1 min) are not stored: they are exact merges of five
consecutive ``1m`` windows (every statistic here is mergeable), see ``HOPPING_WINDOWS``.
A view that spans partitions (a site, the fleet) merges the keys of every partition.

An entity registry (``ent:<dim>``) is bounded: each apply raises the score of the entities it
saw to the start of their newest ``1m`` window (``ZADD GT``), drops members whose last ``1m``
window has expired (scored at or below ``now - 1m - 1m retention``) and keeps at most
``ENTITY_REGISTRY_CAP`` newest members; read it newest first (``ZRANGE ... REV``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Final

from schemas.events import EventKind

PREFIX: Final = "pulse"

# Separators: identifiers (schemas.events.Ident/Route) cannot contain them.
ENTITY_SEP: Final = "|"


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
    """Names of the statistics of a packed window value (``schemas.packed``), in order."""

    COUNT: Final = "n"
    SUM: Final = "sum"
    SUMSQ: Final = "sq"
    MIN: Final = "min"
    MAX: Final = "max"
    # applog only: request counts per status class, e.g. "<entity>#5xx"
    STATUS_CLASSES: Final = ("1xx", "2xx", "3xx", "4xx", "5xx")
    # applog only: ERROR-level events
    ERRORS: Final = "err"
    # sensor only: the series statistics of one device's readings of one metric, in the order
    # its partition holds them (``schemas.packed``): readings equal to the one before them,
    # and the first and last reading
    REPEATS: Final = "rep"
    FIRST: Final = "first"
    LAST: Final = "last"
    SERIES: Final = ("rep", "first", "last")
    PACKED: Final = ("n", "sum", "sq", "min", "max")  # the statistics of every value
    PACKED_SENSOR: Final = (*PACKED, *SERIES)
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


class WorkerMetric:
    """Fields of a worker's live metrics hash (``worker_key``), published every few seconds."""

    EVENTS: Final = "events"
    LATE: Final = "late"
    DEAD: Final = "dead"
    BATCHES: Final = "batches"
    ANOMALIES: Final = "anomalies"  # anomalies raised and applied
    CONFLICTS: Final = "conflicts"  # applies refused: another writer had advanced the offset
    STORE_RETRIES: Final = "store_retries"
    FENCES: Final = "fences"
    ISOLATED: Final = "isolated"  # records that broke batch processing, dead-lettered alone
    DEAD_TRUNCATED: Final = "dead_truncated"
    DEAD_UNWRITABLE: Final = "dead_unwritable"
    REFUSED: Final = "refused"  # assigned partitions not read (see refused_reasons)
    REFUSED_REASONS: Final = "refused_reasons"
    OPEN_WINDOWS: Final = "open_windows"
    OPEN_ENTITIES: Final = "open_entities"
    DETECTOR_ENTITIES: Final = "detector_entities"  # entities the anomaly detectors watch
    # entities forgotten because a partition's detectors watched PULSE_WORKER_DETECT_MAX_ENTITIES
    DETECTOR_EVICTED: Final = "detector_evicted"
    EVENTS_PER_S: Final = "events_per_s"
    PREPARE_P50_MS: Final = "prepare_p50_ms"
    PREPARE_P99_MS: Final = "prepare_p99_ms"
    APPLY_P50_MS: Final = "apply_p50_ms"
    APPLY_P99_MS: Final = "apply_p99_ms"
    DURABILITY_P50_MS: Final = "durability_wait_p50_ms"
    DURABILITY_P99_MS: Final = "durability_wait_p99_ms"
    UPDATED_MS: Final = "updated_ms"
    PID: Final = "pid"


@functools.lru_cache(maxsize=4096)
def partition_tag(kind: EventKind | str, partition: int) -> str:
    """The hash tag content shared by every key of one topic partition (cached: every key a
    poll writes or reads starts with one)."""
    return f"{EventKind(kind).value}.{partition}"


def progress_key(kind: EventKind | str, partition: int) -> str:
    """Key of a partition's progress hash (applied offset, watermark, counters)."""
    return f"{PREFIX}:{{{partition_tag(kind, partition)}}}:progress"


def bundled(window: TumblingWindow, dim: str) -> bool:
    """Whether the worker writes ``window``/``dim`` instances as bundles (see above)."""
    return window.name == WINDOW_10S.name and dim in (Dim.DEVICE, Dim.SERVICE)


def bundle_field(offset: int) -> str:
    """The window-hash field of the bundle an apply up to ``offset`` wrote."""
    return f"@{offset}"


def window_key(
    kind: EventKind | str, partition: int, window: TumblingWindow, dim: str, start_ms: int
) -> str:
    """Key of the window hash of one partition, window instance and dimension."""
    return f"{PREFIX}:{{{partition_tag(kind, partition)}}}:w:{window.name}:{dim}:{start_ms}"


def entities_key(kind: EventKind | str, partition: int, dim: str) -> str:
    """Key of one dimension's entity registry in one partition (a sorted set, see above)."""
    return f"{PREFIX}:{{{partition_tag(kind, partition)}}}:ent:{dim}"


# The geo sets take latitudes within +-GEO_MAX_LAT (Web Mercator): the worker indexes no position
# beyond it (the reading still counts) and readers refuse to search beyond it.
GEO_MAX_LAT: Final = 85.05112878


def geo_key(partition: int) -> str:
    """Key of a sensor partition's geo set: each device's latest position (GEOADD)."""
    return f"{PREFIX}:{{{partition_tag(EventKind.SENSOR, partition)}}}:geo"


def seen_key(partition: int) -> str:
    """Key of a sensor partition's sorted set of devices by the event time of their latest
    position (epoch ms)."""
    return f"{PREFIX}:{{{partition_tag(EventKind.SENSOR, partition)}}}:seen"


# --- leaderboards -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StoredBoard:
    """A sorted set the worker writes per partition and ``1m`` window instance.

    ``merge`` says how readers combine the partitions' sets into the fleet's board: ``sum``
    (a count, each partition holds its share), ``max`` (each member lives in one partition, or
    the fleet's value is the largest), or ``sketch`` (a partition's p99 is only its own: the
    fleet's exact value is read from the merged sketches of the window hashes, see
    :data:`BOARD_SOURCES`; the set names the candidates and ranks within the partition).
    """

    name: str
    kind: EventKind
    dim: str  # the window dimension the scores come from (members: its entities, see member)
    merge: str  # "sum" | "max" | "sketch"


class Board:
    """Names of the stored boards (``top:<name>:<start>``); members are ``member`` of the
    dim's entity: the device, site, service, or ``service|route``."""

    SITE_EVENTS: Final = "site.events"  # site -> valid on-time events
    DEVICE_ANOMALIES: Final = "device.anomalies"  # device -> anomalies raised in the window
    DEVICE_MAX: Final = "device.max"  # one set per metric: "device.max.<metric>", device -> max
    SERVICE_REQUESTS: Final = "service.requests"
    SERVICE_ERRORS: Final = "service.errors"  # ERROR-level events
    SERVICE_P99: Final = "service.p99"  # latency p99 (ms) within the partition
    ROUTE_REQUESTS: Final = "route.requests"  # members "service|route"
    ROUTE_ERRORS: Final = "route.errors"
    ROUTE_P99: Final = "route.p99"
    SERVICE_ANOMALIES: Final = "service.anomalies"


BOARDS: Final[dict[str, StoredBoard]] = {
    b.name: b
    for b in (
        StoredBoard(Board.SITE_EVENTS, EventKind.SENSOR, Dim.SITE, "sum"),
        StoredBoard(Board.DEVICE_ANOMALIES, EventKind.SENSOR, Dim.DEVICE, "sum"),
        StoredBoard(Board.DEVICE_MAX, EventKind.SENSOR, Dim.DEVICE, "max"),
        StoredBoard(Board.SERVICE_REQUESTS, EventKind.APPLOG, Dim.SERVICE, "sum"),
        StoredBoard(Board.SERVICE_ERRORS, EventKind.APPLOG, Dim.SERVICE, "sum"),
        StoredBoard(Board.SERVICE_P99, EventKind.APPLOG, Dim.SERVICE, "sketch"),
        StoredBoard(Board.ROUTE_REQUESTS, EventKind.APPLOG, Dim.ROUTE, "sum"),
        StoredBoard(Board.ROUTE_ERRORS, EventKind.APPLOG, Dim.ROUTE, "sum"),
        StoredBoard(Board.ROUTE_P99, EventKind.APPLOG, Dim.ROUTE, "sketch"),
        StoredBoard(Board.SERVICE_ANOMALIES, EventKind.APPLOG, Dim.SERVICE, "sum"),
    )
}
BOARD_WINDOW: Final = WINDOW_1M  # boards are kept per 1m window instance, with its retention


def board_key(kind: EventKind | str, partition: int, board: str, start_ms: int) -> str:
    """Key of a partition's share of a leaderboard in one ``1m`` window instance.

    ``board`` is a :class:`Board` name; ``device.max`` takes its metric: ``device.max.<metric>``.
    """
    return f"{PREFIX}:{{{partition_tag(kind, partition)}}}:top:{board}:{start_ms}"


def board_member(dim: str, entity_name: str) -> str:
    """The board member of a window entity: the device of ``device|metric``, else the entity."""
    if dim == Dim.DEVICE:
        return entity_name.split(ENTITY_SEP, 1)[0]
    if dim == Dim.SITE:
        return entity_name.split(ENTITY_SEP, 1)[0]
    return entity_name


# --- anomalies ------------------------------------------------------------------------------

# Newest entries a partition's live feed keeps (XADD MAXLEN ~).
FEED_CAP: Final = 10_000


def detector_key(kind: EventKind | str, partition: int) -> str:
    """Key of a partition's detector states: ``"<entity>~<signal>"`` -> snapshot bytes, and
    ``"<entity>~<signal>~<chunk>"`` -> one chunk (0-10) of that row's profile."""
    return f"{PREFIX}:{{{partition_tag(kind, partition)}}}:det"


def anomalies_key(kind: EventKind | str, partition: int) -> str:
    """Key of a partition's anomaly records: anomaly id -> record (``schemas.anomaly``)."""
    return f"{PREFIX}:{{{partition_tag(kind, partition)}}}:anom"


def anomaly_index_key(kind: EventKind | str, partition: int) -> str:
    """Key of a partition's anomaly ids scored by their window start (ms), for time ranges
    and retention."""
    return f"{PREFIX}:{{{partition_tag(kind, partition)}}}:anom:t"


def feed_key(kind: EventKind | str, partition: int) -> str:
    """Key of a partition's live anomaly feed: a stream capped near :data:`FEED_CAP`."""
    return f"{PREFIX}:{{{partition_tag(kind, partition)}}}:feed"


def progress_pattern(kind: EventKind | str) -> str:
    """A SCAN pattern matching the progress hashes of every partition of ``kind``."""
    return f"{PREFIX}:{{{EventKind(kind).value}.*}}:progress"


def window_pattern(kind: EventKind | str, window: TumblingWindow | None = None) -> str:
    """A SCAN pattern matching the window hashes of every partition of ``kind``."""
    w = window.name if window else "*"
    return f"{PREFIX}:{{{EventKind(kind).value}.*}}:w:{w}:*"


def parse_tag(key: str) -> tuple[EventKind, int]:
    """The (kind, partition) of a key's hash tag, e.g. ``pulse:{sensor.3}:progress``."""
    tag = key[key.index("{") + 1 : key.index("}")]
    kind, partition = tag.split(".", 1)
    return EventKind(kind), int(partition)


def parse_window_key(key: str) -> tuple[EventKind, int, str, str, int]:
    """Split a window key into (kind, partition, window name, dim, start_ms)."""
    head, tag_rest = key.split("{", 1)
    tag, rest = tag_rest.split("}", 1)
    kind, partition = tag.split(".", 1)
    _, w, window, dim, start = rest.split(":")
    if head != f"{PREFIX}:" or w != "w":
        raise ValueError(f"not a window key: {key!r}")
    return EventKind(kind), int(partition), window, dim, int(start)


def worker_key(name: str) -> str:
    """Key of a worker's live metrics hash."""
    return f"{PREFIX}:worker:{name}"


def fence_key(node: int | None = None) -> str:
    """Key the writer increments to make earlier writes durable after a reconnect.

    On a cluster the writer fences every primary, each with a key of a slot it serves:
    ``pulse:{fence.<n>}`` for the first ``n`` that lands there.
    """
    return f"{PREFIX}:fence" if node is None else f"{PREFIX}:{{fence.{node}}}"


def text(raw: bytes | str) -> str:
    """A key, member or field name read from the store, as text. The worker writes only
    identifiers; bytes that are not UTF-8 (written by something else) are shown replaced, so a
    reader lists them rather than fails."""
    return raw.decode(errors="replace") if isinstance(raw, bytes) else raw


def entity(*parts: str) -> str:
    """Join identifier parts into one entity name."""
    return ENTITY_SEP.join(parts)


def window_start(event_time_ms: int, window: TumblingWindow) -> int:
    """Start of the tumbling window instance that contains ``event_time_ms``."""
    return event_time_ms - event_time_ms % window.size_ms
