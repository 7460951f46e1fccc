"""Reads over a time range: KPIs, per-metric and per-service series, routes, a device's series.

Every function takes the binary reader client (``queries.reader_client``), the partitions
(``queries.Topology``) and a :class:`~dashboard.timerange.TimeRange`; none reads the clock.
Window instances (panes) overlapping the range are read with ``queries.read_pane_sets`` (one
round trip per call; final panes from a ``queries.PaneCache`` when given), merged over
partitions, then over the panes of each chart bucket with one ``packed.merge`` call, and
quantiles come from the merged sketches. A refresh reads at most the panes of the range
(bounded by ``timerange.MAX_SPAN_MS``) and a bounded number of anomaly records.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
import pandas as pd
import redis

from dashboard import anomalies, queries
from dashboard.timerange import TimeRange, bucket_ms, pane_starts, pane_window
from schemas import anomaly, keys, packed
from schemas.anomaly import AnomalyRecord
from schemas.events import EventKind
from schemas.keys import Dim, Stat, TumblingWindow

SENSOR, APPLOG = EventKind.SENSOR, EventKind.APPLOG
QS: Final = (0.5, 0.95, 0.99)
ERRORS_AT: Final = Stat.PACKED_APPLOG.index(Stat.ERRORS)
# anomaly records read per refresh for markers and lists, at most
MAX_ANOMALIES: Final = 500
# a device's anomalies listed in its drill-down, at most
MAX_DEVICE_ANOMALIES: Final = 200

METRIC_COLUMNS: Final = ("time", "metric", "count", "mean", "p50", "p95", "p99")
LATENCY_COLUMNS: Final = ("time", "requests", "errors", "error_rate", "p50", "p95", "p99")
SERVICE_COLUMNS: Final = ("service", "requests", "errors", "error_rate", "p50_ms", "p99_ms")
SERVICE_SERIES_COLUMNS: Final = ("time", "service", "requests", "error_rate", "p99")
ROUTE_COLUMNS: Final = ("service", "route", "requests", "error_rate", "p50_ms", "p99_ms")
DEVICE_COLUMNS: Final = ("time", "metric", "count", "mean", "min", "max")


@dataclass(frozen=True, slots=True)
class Grouped:
    """Rows merged per (bucket, entity): bucket start, entity name, the merged table."""

    time: queries.I64
    names: queries.Names
    table: packed.Table

    @property
    def empty(self) -> bool:
        """True without rows with events."""
        return not bool((self.table.stats[:, packed.COUNT] > 0).any()) if self.table.rows else True


def group_panes(
    panes: Sequence[queries.Pane], starts: Sequence[int], size_ms: int, nf: int
) -> Grouped:
    """Panes (one per start) merged per (bucket of ``size_ms``, entity), in one merge call.

    Rows without events are dropped; rows come sorted by bucket, then by name.
    """
    pane, names, table = queries.stack_panes(panes, nf)
    if table.rows == 0:
        return Grouped(np.empty(0, dtype=np.int64), queries._NO_NAMES, table)
    starts_arr = np.asarray(starts, dtype=np.int64)
    buckets = starts_arr - starts_arr % size_ms
    ub, bucket_idx = np.unique(buckets, return_inverse=True)
    row_bucket, row_name, merged = queries.merge_by(table, names, bucket_idx[pane])
    seen = merged.stats[:, packed.COUNT] > 0
    order = np.lexsort((row_name.astype(str), row_bucket))
    order = order[seen[order]]
    return Grouped(ub[row_bucket[order]], row_name[order], merged.take(order))


def _times(ms: queries.I64) -> pd.DatetimeIndex:
    return pd.DatetimeIndex(pd.to_datetime(ms, unit="ms", utc=True))


# --------------------------------------------------------------------------- fleet panes


@dataclass(frozen=True, slots=True)
class Fleet:
    """The fleet-wide panes of a range (sensor metrics, applog ``all``), per kind."""

    range: TimeRange
    window: TumblingWindow
    starts: tuple[int, ...]
    panes: dict[EventKind, list[queries.Pane]]

    def events(self, kind: EventKind) -> int:
        """Events of ``kind`` in the panes."""
        return int(queries.pane_counts(self.panes[kind]).sum()) if self.panes[kind] else 0

    def merged(self, kind: EventKind) -> queries.Pane:
        """Every pane of ``kind`` merged into one (entity by entity)."""
        return queries.merge_panes(self.panes[kind], queries.NF[kind])


def read_fleet(
    r: redis.Redis,
    topo: queries.Topology,
    rng: TimeRange,
    cache: queries.PaneCache | None = None,
) -> Fleet:
    """The fleet-wide panes overlapping ``rng`` (``10s`` or ``1m``, see ``pane_window``)."""
    window = pane_window(rng)
    starts = tuple(pane_starts(rng, window))
    requests = [
        queries.PaneRequest(kind, topo.partitions.get(kind, ()), window, queries.FLEET_DIM[kind],
                            starts)
        for kind in EventKind
    ]  # fmt: skip
    sets = queries.read_pane_sets(r, requests, cache)
    return Fleet(rng, window, starts, dict(zip(EventKind, sets, strict=True)))


# --------------------------------------------------------------------------- KPIs


@dataclass(frozen=True, slots=True)
class RangeKpis:
    """The KPI tiles' figures over a range."""

    events: int
    span_s: float
    active_devices: int
    requests: int
    errors: int
    p99_ms: float | None
    anomalies: int
    updated_ms: int | None  # wall clock of the newest apply of any partition
    now_ms: int

    @property
    def events_per_s(self) -> float:
        """Mean events/s over the range."""
        return self.events / self.span_s if self.span_s > 0 else 0.0

    @property
    def error_rate(self) -> float | None:
        """ERROR-level events over requests (None without requests)."""
        return self.errors / self.requests if self.requests else None

    @property
    def age_ms(self) -> int | None:
        """How old the store's data is: now minus the newest apply (None: never applied)."""
        return None if self.updated_ms is None else max(self.now_ms - self.updated_ms, 0)


def counts_in_range(r: redis.Redis, topo: queries.Topology, rng: TimeRange) -> tuple[int, int]:
    """(devices seen at or after the range's start, anomalies whose window starts in it).

    A device counts by its latest position's event time (``seen_key``), so for a range in the
    past this is the devices seen since its start. One round trip.
    """
    pipe = r.pipeline(transaction=False)
    sensor = topo.partitions.get(SENSOR, ())
    for p in sensor:
        pipe.zcount(keys.seen_key(p), rng.start_ms, "+inf")
    parts = [(k, p) for k in EventKind for p in topo.partitions.get(k, ())]
    for k, p in parts:
        pipe.zcount(keys.anomaly_index_key(k, p), rng.start_ms, f"({rng.end_ms}")
    replies = [int(x) for x in pipe.execute()] if len(pipe) else []
    return sum(replies[: len(sensor)]), sum(replies[len(sensor) :])


def range_kpis(
    r: redis.Redis,
    topo: queries.Topology,
    fleet: Fleet,
    progress: dict[EventKind, queries.KindProgress],
    now_ms: int,
) -> RangeKpis:
    """The tiles' figures: events and requests from the fleet panes, p99 from their merged
    sketch, devices and anomalies counted in the store, the data's age from the progress."""
    app = fleet.merged(APPLOG)
    at = np.flatnonzero(app.names == keys.FLEET_ENTITY)
    requests = errors = 0
    p99: float | None = None
    if at.size:
        row = app.table.take(at[:1])
        requests = round(float(row.stats[0, packed.COUNT]))
        errors = round(float(row.stats[0, ERRORS_AT]))
        q = float(packed.quantiles(row, (0.99,))[0, 0])
        p99 = None if np.isnan(q) else q
    devices, anomaly_count = counts_in_range(r, topo, fleet.range)
    updated = [p.updated_ms for p in progress.values() if p.updated_ms is not None]
    return RangeKpis(
        events=fleet.events(SENSOR) + fleet.events(APPLOG),
        span_s=fleet.range.span_s,
        active_devices=devices,
        requests=requests,
        errors=errors,
        p99_ms=p99,
        anomalies=anomaly_count,
        updated_ms=max(updated, default=None),
        now_ms=now_ms,
    )


# --------------------------------------------------------------------------- series


def metric_series(fleet: Fleet) -> pd.DataFrame:
    """Per sensor metric and chart bucket: readings, mean, p50, p95, p99 (METRIC_COLUMNS)."""
    size = bucket_ms(fleet.range, fleet.window)
    g = group_panes(fleet.panes[SENSOR], fleet.starts, size, packed.NF_SENSOR)
    q = packed.quantiles(g.table, QS)
    return pd.DataFrame(
        {
            "time": _times(g.time),
            "metric": g.names.astype(str),
            "count": np.rint(g.table.stats[:, packed.COUNT]).astype(np.int64),
            "mean": queries.means(g.table),
            "p50": q[:, 0],
            "p95": q[:, 1],
            "p99": q[:, 2],
        },
        columns=list(METRIC_COLUMNS),
    )


def latency_series(fleet: Fleet) -> pd.DataFrame:
    """Fleet app latency per chart bucket: requests, errors, error rate, p50/p95/p99 (ms)."""
    size = bucket_ms(fleet.range, fleet.window)
    g = group_panes(fleet.panes[APPLOG], fleet.starts, size, packed.NF_APPLOG)
    keep = np.flatnonzero(g.names == keys.FLEET_ENTITY)
    table = g.table.take(keep)
    q = packed.quantiles(table, QS)
    n = table.stats[:, packed.COUNT]
    return pd.DataFrame(
        {
            "time": _times(g.time[keep]),
            "requests": np.rint(n).astype(np.int64),
            "errors": np.rint(table.stats[:, ERRORS_AT]).astype(np.int64),
            "error_rate": table.stats[:, ERRORS_AT] / n,
            "p50": q[:, 0],
            "p95": q[:, 1],
            "p99": q[:, 2],
        },
        columns=list(LATENCY_COLUMNS),
    )


@dataclass(frozen=True, slots=True)
class Services:
    """Services over a range: a table (merged over the range) and series per bucket."""

    table: pd.DataFrame  # SERVICE_COLUMNS, most requests first
    series: pd.DataFrame  # SERVICE_SERIES_COLUMNS
    routes: pd.DataFrame  # ROUTE_COLUMNS, worst p99 first, at most ``limit`` rows


def read_services(
    r: redis.Redis,
    topo: queries.Topology,
    rng: TimeRange,
    route_limit: int = 10,
    cache: queries.PaneCache | None = None,
) -> Services:
    """Per service and per route over ``rng``, from the ``1m`` windows (one round trip)."""
    window = keys.WINDOW_1M
    starts = tuple(pane_starts(rng, window))
    parts = topo.partitions.get(APPLOG, ())
    svc_panes, route_panes = queries.read_pane_sets(
        r,
        [
            queries.PaneRequest(APPLOG, parts, window, Dim.SERVICE, starts),
            queries.PaneRequest(APPLOG, parts, window, Dim.ROUTE, starts),
        ],
        cache,
    )
    nf = packed.NF_APPLOG
    g = group_panes(svc_panes, starts, bucket_ms(rng, window), nf)
    n = g.table.stats[:, packed.COUNT]
    series = pd.DataFrame(
        {
            "time": _times(g.time),
            "service": g.names.astype(str),
            "requests": np.rint(n).astype(np.int64),
            "error_rate": g.table.stats[:, ERRORS_AT] / n,
            "p99": packed.quantiles(g.table, (0.99,))[:, 0],
        },
        columns=list(SERVICE_SERIES_COLUMNS),
    )
    whole = _whole(svc_panes, nf)
    n_all = whole.table.stats[:, packed.COUNT]
    q = packed.quantiles(whole.table, (0.5, 0.99))
    table = pd.DataFrame(
        {
            "service": whole.names.astype(str),
            "requests": np.rint(n_all).astype(np.int64),
            "errors": np.rint(whole.table.stats[:, ERRORS_AT]).astype(np.int64),
            "error_rate": whole.table.stats[:, ERRORS_AT] / n_all,
            "p50_ms": q[:, 0],
            "p99_ms": q[:, 1],
        },
        columns=list(SERVICE_COLUMNS),
    ).sort_values(["requests", "service"], ascending=[False, True], ignore_index=True)
    rw = _whole(route_panes, nf)
    rn = rw.table.stats[:, packed.COUNT]
    rq = packed.quantiles(rw.table, (0.5, 0.99))
    service, route = queries._split(rw.names)
    routes = pd.DataFrame(
        {
            "service": service.astype(str),
            "route": route.astype(str),
            "requests": np.rint(rn).astype(np.int64),
            "error_rate": rw.table.stats[:, ERRORS_AT] / rn,
            "p50_ms": rq[:, 0],
            "p99_ms": rq[:, 1],
        },
        columns=list(ROUTE_COLUMNS),
    )
    routes = routes.sort_values(
        ["p99_ms", "error_rate", "service", "route"],
        ascending=[False, False, True, True],
        na_position="last",
        ignore_index=True,
    ).head(route_limit)
    return Services(table, series, routes)


def _whole(panes: Sequence[queries.Pane], nf: int) -> queries.Pane:
    """Panes merged into one, entities without events dropped, sorted by name."""
    merged = queries.merge_panes(panes, nf)
    seen = np.flatnonzero(merged.table.stats[:, packed.COUNT] > 0)
    order = seen[np.argsort(merged.names[seen].astype(str), kind="stable")]
    return queries.Pane(merged.names[order], merged.table.take(order))


# --------------------------------------------------------------------------- anomalies


def range_anomalies(
    r: redis.Redis, topo: queries.Topology, rng: TimeRange, limit: int = MAX_ANOMALIES
) -> anomalies.Listing:
    """The newest ``limit`` anomalies whose window starts within ``rng``, newest first."""
    parts = [(k, p) for k in EventKind for p in topo.partitions.get(k, ())]
    return anomalies.recent(r, parts, rng.start_ms, rng.end_ms - 1, limit)


def anomaly_frame(records: Sequence[AnomalyRecord]) -> pd.DataFrame:
    """Anomalies as rows: time, id, kind, entity, metric (or service), signal, cause, score,
    value, expected."""
    rows = []
    for rec in records:
        first, _, second = rec.entity.partition(keys.ENTITY_SEP)
        rows.append(
            {
                "time": pd.Timestamp(rec.window_start_ms, unit="ms", tz="UTC"),
                "anomaly": rec.id,
                "kind": rec.kind,
                "entity": rec.entity,
                "subject": first,
                "metric": second if rec.kind == SENSOR.value else first,
                "signal": rec.signal,
                "cause": rec.cause,
                "score": rec.score,
                "value": rec.value,
                "expected": rec.expected,
            }
        )
    columns = ["time", "anomaly", "kind", "entity", "subject", "metric", "signal", "cause",
               "score", "value", "expected"]  # fmt: skip
    return pd.DataFrame(rows, columns=columns)


# --------------------------------------------------------------------------- a device


def device_partition(r: redis.Redis, topo: queries.Topology, device: str) -> int | None:
    """The sensor partition that holds ``device`` (its latest position), if any."""
    parts = topo.partitions.get(SENSOR, ())
    if not parts:
        return None
    pipe = r.pipeline(transaction=False)
    for p in parts:
        pipe.zscore(keys.seen_key(p), device)
    found = [(score, p) for p, score in zip(parts, pipe.execute(), strict=True) if score]
    return max(found)[1] if found else None


def device_series(
    r: redis.Redis,
    partition: int,
    device: str,
    metrics: Sequence[str],
    rng: TimeRange,
) -> pd.DataFrame:
    """A device's readings per chart bucket and metric (DEVICE_COLUMNS), from its ``1m``
    device windows in its partition (one HMGET per pane, one round trip)."""
    window = keys.WINDOW_1M
    starts = pane_starts(rng, window)
    if not metrics or not starts:
        return pd.DataFrame(columns=list(DEVICE_COLUMNS))
    fields = [keys.entity(device, m) for m in metrics]
    pipe = r.pipeline(transaction=False)
    for s in starts:
        pipe.hmget(keys.window_key(SENSOR, partition, window, Dim.DEVICE, s), fields)
    values: list[bytes] = []
    pane: list[int] = []
    metric_of: list[str] = []
    for i, row in enumerate(pipe.execute()):
        for m, v in zip(metrics, row, strict=True):
            if v is not None:
                values.append(bytes(v))
                pane.append(i)
                metric_of.append(m)
    if not values:
        return pd.DataFrame(columns=list(DEVICE_COLUMNS))
    table = packed.decode_stats(values, packed.NF_SENSOR)
    size = bucket_ms(rng, window)
    bucket = np.asarray([starts[i] - starts[i] % size for i in pane], dtype=np.int64)
    ub, b_idx = np.unique(bucket, return_inverse=True)
    row_b, row_m, merged = queries.merge_by(table, metric_of, b_idx)
    order = np.lexsort((row_m.astype(str), row_b))
    st = merged.stats[order]
    return pd.DataFrame(
        {
            "time": _times(ub[row_b[order]]),
            "metric": row_m[order].astype(str),
            "count": np.rint(st[:, packed.COUNT]).astype(np.int64),
            "mean": st[:, packed.SUM] / st[:, packed.COUNT],
            "min": st[:, packed.MIN],
            "max": st[:, packed.MAX],
        },
        columns=list(DEVICE_COLUMNS),
    )


def device_anomalies(
    r: redis.Redis,
    partition: int,
    device: str,
    rng: TimeRange,
    limit: int = MAX_DEVICE_ANOMALIES,
) -> anomalies.Listing:
    """The newest ``limit`` anomalies of ``device`` whose window starts within ``rng``.

    The ids name the entity (``schemas.anomaly``): only the device's ids are read back.
    """
    ids = r.zrevrangebyscore(
        keys.anomaly_index_key(SENSOR, partition),
        rng.end_ms - 1,
        rng.start_ms,
        start=0,
        num=anomalies.MAX_LIMIT,
    )
    mine: list[str] = []
    for raw in ids:
        try:
            anomaly_id = raw.decode() if isinstance(raw, bytes) else str(raw)
            entity = anomaly.parse_anomaly_id(anomaly_id)[3]
        except ValueError:
            continue
        if entity.partition(keys.ENTITY_SEP)[0] == device:
            mine.append(anomaly_id)
            if len(mine) >= limit:
                break
    return anomalies.get_many(r, mine)
