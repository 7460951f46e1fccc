"""Everything one refresh of the page shows, read in one go (no Streamlit: testable, cacheable).

:func:`read_page` runs every store read of a refresh for a time range; :func:`tiles` turns its
KPIs into coloured tiles; :func:`read_device` reads one device's drill-down. Kafka is read
apart (``dashboard.health.read_kafka``), so a slow or absent broker never holds the store's
panels back.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Final

import numpy as np
import pandas as pd
import redis

from dashboard import anomalies, boards, geo, health, queries, series
from dashboard.settings import DashboardSettings
from dashboard.thresholds import Level, Threshold, Tile, age, number, percent, size
from dashboard.timerange import TimeRange
from schemas import keys
from schemas.anomaly import AnomalyRecord
from schemas.events import EventKind

# A board merges one sorted set per partition and minute: a longer range shows its last 6 hours.
BOARD_MAX_MINUTES: Final = 360
# the leaderboards the page shows, in order (``device.max.<metric>`` is added per metric)
BOARDS: Final = (
    "site.events",
    "device.anomalies",
    "service.requests",
    "service.error_rate",
    "service.p99",
    "route.p99",
)


@dataclass(frozen=True, slots=True)
class PageData:
    """One refresh: the range, its KPIs, series, tables and the store's health."""

    range: TimeRange
    now_ms: int
    kpis: queries.Kpis  # progress, workers, current events/s
    range_kpis: series.RangeKpis
    metrics: pd.DataFrame  # series.METRIC_COLUMNS
    latency: pd.DataFrame  # series.LATENCY_COLUMNS
    services: series.Services
    anomalies: pd.DataFrame  # series.anomaly_frame, newest first
    anomalies_skipped: int
    feed: list[anomalies.FeedEntry]
    devices: pd.DataFrame  # device, partition, lat, lon, seen, status
    boards: list[boards.Top]
    offsets: list[health.StoredOffset]
    store: health.StoreHealth | None  # None: the store refuses INFO to this user
    sites: queries.SiteMetrics  # site x metric over the 5 minutes up to the range's end
    read_ms: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        """True when no partition has reported progress yet."""
        return self.kpis.empty


def _timed(timings: dict[str, float], name: str, started: float) -> float:
    now = time.perf_counter()
    timings[name] = (now - started) * 1000
    return now


def read_page(
    r: redis.Redis,
    topo: queries.Topology,
    rng: TimeRange,
    now_ms: int,
    settings: DashboardSettings,
    cache: queries.PaneCache | None = None,
    sampler: health.WriteSampler | None = None,
    site_view: queries.SiteView | None = None,
) -> PageData:
    """Every store read of one refresh of ``rng`` (``r``: ``queries.reader_client``).

    The site table shows ``site_view`` (default: the top ``settings.top_sites`` rows by
    readings) over the hopping window (5 min) that ends with the range.

    Raises ``redis.RedisError`` when the store cannot be read and ``packed.PackedError`` for a
    malformed window value.
    """
    t: dict[str, float] = {}
    t0 = at = time.perf_counter()
    kpis = queries.read_kpis(r, topo, now_ms, settings.rate_windows)
    at = _timed(t, "kpis", at)
    fleet = series.read_fleet(r, topo, rng, cache)
    rk = series.range_kpis(r, topo, fleet, kpis.progress, now_ms)
    metrics = series.metric_series(fleet)
    latency = series.latency_series(fleet)
    at = _timed(t, "fleet", at)
    services = series.read_services(r, topo, rng, settings.top_routes, cache)
    at = _timed(t, "services", at)
    listing = series.range_anomalies(r, topo, rng)
    frame = series.anomaly_frame(listing.records)
    parts = [(k, p) for k in EventKind for p in topo.partitions.get(k, ())]
    feed = anomalies.feed(r, parts, settings.feed_rows)
    at = _timed(t, "anomalies", at)
    devices = device_frame(
        geo.positions(r, topo.partitions.get(EventKind.SENSOR, ()), settings.map_devices),
        listing.records,
        now_ms,
    )
    at = _timed(t, "devices", at)
    starts = boards.range_starts(rng.start_ms, rng.end_ms)[-BOARD_MAX_MINUTES:]
    names = [*BOARDS, *(f"{boards.DEVICE_MAX}{m}" for m in sorted(set(metrics["metric"]))[:1])]
    tops = [
        boards.read_top_over(
            r, b, topo.partitions.get(b.kind, ()), rng.label, starts, settings.board_rows
        )
        for b in map(boards.board, names)
    ]
    at = _timed(t, "boards", at)
    view = site_view or queries.SiteView(limit=settings.top_sites)
    sites = queries.read_site_metrics(r, topo, rng.end_ms - 1, view, cache=cache)
    at = _timed(t, "sites", at)
    offsets = health.read_stored_offsets(r, topo)
    store = health.read_store_health(r)
    if sampler is not None and store is not None:
        sampler.add(health.Sample(now_ms, store.aof_size, store.repl_offset))
    _timed(t, "health", at)
    return PageData(
        range=rng,
        now_ms=now_ms,
        kpis=kpis,
        range_kpis=rk,
        metrics=metrics,
        latency=latency,
        services=services,
        anomalies=frame,
        anomalies_skipped=listing.skipped,
        feed=feed.entries,
        devices=devices,
        boards=tops,
        offsets=offsets,
        store=store,
        sites=sites,
        read_ms=(time.perf_counter() - t0) * 1000,
        timings=t,
    )


DEVICE_COLUMNS: Final = ("device", "partition", "lat", "lon", "seen", "status", "anomalies")


def device_frame(
    positions: list[geo.Position], records: list[AnomalyRecord], now_ms: int
) -> pd.DataFrame:
    """The map's rows: each device's position, last seen time, anomalies in the range and
    status (``geo.status``)."""
    per_device: dict[str, int] = {}
    for rec in records:
        if rec.kind == EventKind.SENSOR.value:
            device = rec.entity.partition(keys.ENTITY_SEP)[0]
            per_device[device] = per_device.get(device, 0) + 1
    rows = [
        {
            "device": d.device,
            "partition": d.partition,
            "lat": d.lat,
            "lon": d.lon,
            "seen": pd.Timestamp(d.seen_ms, unit="ms", tz="UTC"),
            "status": geo.status(d.seen_ms, now_ms, per_device.get(d.device, 0) > 0),
            "anomalies": per_device.get(d.device, 0),
        }
        for d in positions
    ]
    return pd.DataFrame(rows, columns=list(DEVICE_COLUMNS))


def tiles(data: PageData, settings: DashboardSettings) -> list[Tile]:
    """The KPI tiles of a refresh, coloured by the settings' thresholds."""
    k = data.range_kpis
    now_rate = data.kpis.total_events_per_s
    events = Tile(
        "Events/s",
        number(k.events_per_s, "{:,.1f}"),
        Level.NONE if k.events else Level.WARN,
        f"{k.events:,} events in range" + ("" if now_rate is None else f" · now {now_rate:,.1f}/s"),
    )
    devices = Tile("Active devices", f"{k.active_devices:,}", note="seen since the range start")
    err = Threshold(settings.error_rate_warn, settings.error_rate_crit)
    errors = Tile(
        "Error rate",
        percent(k.error_rate),
        err.level(k.error_rate),
        f"{k.errors:,} errors of {k.requests:,} requests",
    )
    p99 = Threshold(settings.p99_warn_ms, settings.p99_crit_ms)
    latency = Tile("p99 latency", number(k.p99_ms, "{:,.1f} ms"), p99.level(k.p99_ms))
    anomaly_level = Threshold(settings.anomalies_warn, settings.anomalies_crit).level(k.anomalies)
    found = Tile("Anomalies", f"{k.anomalies:,}", anomaly_level, "in range")
    stale = Threshold(settings.stale_warn_s * 1000, settings.stale_crit_s * 1000)
    age_ms = k.age_ms
    fresh = Tile(
        "Data as of",
        age(age_ms),
        Level.CRIT if age_ms is None else stale.level(age_ms),
        "the newest apply of any partition",
    )
    return [events, devices, errors, latency, found, fresh]


def health_tiles(
    data: PageData,
    lag: int | None,
    kafka_answered: bool,
    written: tuple[float | None, int, str],
) -> list[Tile]:
    """The health tiles: consumer lag, diverted counts, and the store's memory, load, AOF,
    fsync, replicas and bytes written per hour (``written``: rate, span ms, its source)."""
    progress = data.kpis
    rate, span_ms, source = written
    tiles_ = [
        Tile(
            "Consumer lag",
            number(lag) if lag is not None else "unknown",
            Level.NONE if lag is None else Threshold(1000, 100_000).level(lag),
            "records in Kafka the store has not applied"
            if lag is not None
            else ("no offsets from Kafka" if kafka_answered else "Kafka unreachable"),
        ),
        Tile("Dead letters", f"{progress.dead:,}", note="counted by the store"),
        Tile("Late events", f"{progress.late:,}", note="counted by the store"),
    ]
    store = data.store
    if store is None:
        return tiles_
    replica_lag = max((r.lag_s for r in store.replicas if r.lag_s is not None), default=None)
    aof_bad = not store.aof_enabled or store.aof_last_write_ok is False
    return [
        *tiles_,
        Tile(
            "Store memory",
            size(store.used_memory),
            note=f"peak {size(store.used_memory_peak)} · {store.keys:,} keys",
        ),
        Tile("Store ops/s", f"{store.ops_per_s:,.0f}", note=f"{store.clients} clients"),
        Tile(
            "AOF",
            "on" if store.aof_enabled else "off",
            Level.CRIT if aof_bad else Level.OK,
            f"fsync {store.appendfsync or 'unknown'}"
            + (" · rewriting" if store.aof_rewriting else "")
            + (" · last write FAILED" if store.aof_last_write_ok is False else ""),
        ),
        Tile(
            "fsync",
            store.appendfsync or "unknown",
            Level.OK if store.fsync_always else Level.WARN,
            "appendfsync",
        ),
        Tile(
            "Replica lag",
            "no replica" if not store.replicas else number(replica_lag, "{:,.0f} s"),
            Level.WARN if not store.replicas else Threshold(2, 10).level(replica_lag),
            ", ".join(f"{r.name} {r.state}" for r in store.replicas)[:80],
        ),
        Tile(
            "Written to the store",
            "measuring…" if rate is None else f"{size(rate)}/h",
            note=(
                f"{source}, over {span_ms / 60_000:,.1f} min of samples"
                if rate is not None
                else "needs two samples"
            ),
        ),
    ]


# --------------------------------------------------------------------------- a device


@dataclass(frozen=True, slots=True)
class DeviceView:
    """One device's drill-down: its series and its anomalies in the range."""

    device: str
    partition: int | None
    series: pd.DataFrame  # series.DEVICE_COLUMNS
    anomalies: pd.DataFrame  # series.anomaly_frame


def read_device(
    r: redis.Redis, topo: queries.Topology, device: str, metrics: list[str], rng: TimeRange
) -> DeviceView:
    """A device's readings per metric and its anomalies within ``rng``."""
    part = series.device_partition(r, topo, device)
    if part is None:
        empty = series.anomaly_frame([])
        return DeviceView(device, None, pd.DataFrame(columns=list(series.DEVICE_COLUMNS)), empty)
    frame = series.device_series(r, part, device, metrics, rng)
    listing = series.device_anomalies(r, part, device, rng)
    return DeviceView(device, part, frame, series.anomaly_frame(listing.records))


def default_device(devices: pd.DataFrame) -> str | None:
    """The device the drill-down opens with: the one with most anomalies, else the newest."""
    if devices.empty:
        return None
    order = devices.sort_values(["anomalies", "seen", "device"], ascending=[False, False, True])
    return str(order["device"].iloc[0])


def score_text(top: boards.Top, score: float) -> str:
    """A board score as the page shows it: a count, a share, or a reading/latency."""
    if top.board.rank == "sum":
        return f"{score:,.0f}"
    if top.board.rank == "rate":
        return f"{score * 100:.2f} %"
    return f"{score:,.2f}"


def board_frame(top: boards.Top) -> pd.DataFrame:
    """A board's rows as text (member, score; requests and errors for a rate), best first."""
    rows = [
        {
            top.board.member: row.member,
            top.board.score: score_text(top, row.score),
            **(
                {"requests": f"{row.requests:,}", "errors": f"{row.errors:,}"}
                if row.requests is not None and row.errors is not None
                else {}
            ),
        }
        for row in top.rows
    ]
    frame = pd.DataFrame(rows)
    frame.index = pd.RangeIndex(1, len(rows) + 1)
    return frame


def metric_names(metrics: pd.DataFrame) -> list[str]:
    """The sensor metrics of the range, most readings first."""
    if metrics.empty:
        return []
    totals = metrics.groupby("metric")["count"].sum()
    return [str(m) for m in sorted(totals.index, key=lambda m: (-int(totals[m]), str(m)))]


def markers(
    frame: pd.DataFrame, kind: str, metric: str | None = None, signals: tuple[str, ...] = ()
) -> pd.DataFrame:
    """The anomalies of ``kind`` (and ``metric``; of ``signals``, when given) to mark on a
    chart: time, value, label."""
    if frame.empty:
        return pd.DataFrame(columns=["time", "value", "label"])
    keep = frame["kind"] == kind
    if metric is not None:
        keep &= frame["metric"] == metric
    if signals:
        keep &= frame["signal"].isin(signals)
    rows = frame[keep]
    return pd.DataFrame(
        {
            "time": rows["time"],
            "value": rows["value"].astype(np.float64),
            "label": rows["entity"] + " " + rows["signal"] + " " + rows["cause"],
        }
    )
