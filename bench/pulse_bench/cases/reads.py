"""(f) Reads: latency of each dashboard panel's query over a realistic store.

The store db is seeded with the worker's own aggregation (``aggregation.aggregate`` on synthetic
columns), written per ``schemas.keys`` as ``pulse_apply`` leaves it in an empty store:
``read_day_minutes`` of windows (10 s windows only within their 6 h retention), the most recent
``read_hot_minutes`` at ``read_hot_rate`` events/s and the earlier ones at
``read_background_per_min``; the device dimension (``read_devices`` devices, ~2 metric series
each) only in the last ``read_device_minutes``, since a day of it does not fit in memory. Each
panel query of ``dashboard.queries`` then runs ``read_repeats`` times (fewer, at least 5, once
a panel has taken 10 s), and once more with the dashboard's pane cache where the query takes
one; panels over the target get a cProfile of a few calls in the report. A first refresh (every
panel once, with a new empty pane cache) is timed as a whole.
"""

from __future__ import annotations

import cProfile
import functools
import gc
import inspect
import io
import pstats
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from pulse_bench.harness import (
    BenchContext,
    BenchError,
    Metrics,
    bench_case,
    percentiles,
    target,
)

MINUTE_MS = 60_000
SEED_LATENESS_MS = 30_000  # the seeded watermarks trail the newest event by this (the default)
READ_PHASE_MS = 15_000  # how far into a minute the panels read (see reading_time)
READ_TARGET_MS = 50.0
FIRST_REFRESH_TARGET_MS = 150.0


@dataclass(frozen=True)
class Segment:
    """Consecutive minutes written with the same shape."""

    start_ms: int
    minutes: int
    per_minute: int  # events per minute, both kinds
    device_dim: bool
    ten_second: bool


def reading_time(now_ms: int) -> int:
    """The latest instant up to ``now_ms`` that lies :data:`READ_PHASE_MS` into a minute.

    The panels read the store as of that instant. Within the first half minute the minute
    before is still open (the watermark trails by the allowed lateness), so a hopping window
    has two open panes to read instead of one: every run measures that, the heavier case of
    the two a live dashboard meets each minute, whatever second the case starts at.
    """
    at = now_ms - now_ms % MINUTE_MS + READ_PHASE_MS
    return at if at <= now_ms else at - MINUTE_MS


def plan_segments(
    end_ms: int,
    day_minutes: int,
    hot_minutes: int,
    hot_per_minute: int,
    background_per_minute: int,
    device_minutes: int,
    ten_second_retention_ms: int,
    max_minutes: int = 60,
) -> list[Segment]:
    """Split the seeded range (ending at the minute of ``end_ms``) into uniform segments."""
    last = end_ms - end_ms % MINUTE_MS  # the current, still filling, minute
    first = last - (day_minutes - 1) * MINUTE_MS
    segments: list[Segment] = []
    start = first
    while start <= last:
        age_min = (last - start) // MINUTE_MS

        def shape(m: int) -> tuple[int, bool, bool]:
            age = (last - m) // MINUTE_MS
            return (
                hot_per_minute if age < hot_minutes else background_per_minute,
                age < device_minutes,
                m + MINUTE_MS > end_ms - ten_second_retention_ms,
            )

        current = shape(start)
        n = 1
        while n < max_minutes and n <= age_min and shape(start + n * MINUTE_MS) == current:
            n += 1
        segments.append(Segment(start, n, *current))
        start += n * MINUTE_MS
    return segments


class Seeder:
    """Synthetic events of a fleet, aggregated and written like the worker does."""

    def __init__(self, ctx: BenchContext) -> None:
        from loadgen.generator import build_fleet
        from loadgen.partitioning import partitions_for
        from pipeline.aggregation import _factorize

        p = ctx.params
        self.ctx = ctx
        self.rng = np.random.default_rng(p.seed)
        self.parts = ctx.kafka.partitions
        f = self.fleet = build_fleet(p.seed, p.read_devices, 10)
        n_series = len(f.series_device)
        self.series_names = [f.series_entity(s) for s in range(n_series)]
        self.site_codes, self.site_names = _factorize(
            [f.series_site_entity(s) for s in range(n_series)]
        )
        from loadgen.generator import METRICS

        self.metric_names = [m.name for m in METRICS]
        dev_part = partitions_for([d.encode() for d in f.device_ids], self.parts)
        self.series_part = dev_part[f.series_device]
        self.route_names = [f.route_entity(r) for r in range(len(f.routes))]
        self.service_names = list(f.services)
        self.offsets: dict[tuple[str, int], int] = {}
        self.known: dict[tuple[str, int, str], set[str]] = {}
        self.per_minute: dict[int, dict[str, int]] = {}

    def batches(self, seg: Segment, now_ms: int) -> list[Any]:
        """The partition batches of one segment."""
        from pipeline import aggregation
        from pipeline.batch import PartitionBatch
        from schemas import keys
        from schemas.events import EventKind

        f, rng = self.fleet, self.rng
        n = seg.per_minute * seg.minutes
        minute = np.repeat(np.arange(seg.minutes), seg.per_minute)
        times = seg.start_ms + minute * MINUTE_MS + rng.integers(0, MINUTE_MS, n)
        times = np.minimum(times, now_ms - 1)
        is_app = rng.random(n) < 0.3
        windows = keys.TUMBLING_WINDOWS if seg.ten_second else (keys.WINDOW_1M,)
        out: list[Any] = []
        for kind in EventKind:
            sel = is_app if kind is EventKind.APPLOG else ~is_app
            t = times[sel]
            m = len(t)
            starts = t - t % MINUTE_MS
            for s, c in zip(*np.unique(starts, return_counts=True), strict=True):
                row = self.per_minute.setdefault(int(s), {"sensor": 0, "applog": 0})
                row[kind.value] += int(c)
            if kind is EventKind.SENSOR:
                series = rng.integers(0, len(self.series_names), m)
                phase = 2 * np.pi * (t % 86_400_000) / 86_400_000 + f.series_phase[series]
                values = (
                    f.series_base[series]
                    + f.series_amp[series] * np.sin(phase)
                    + rng.standard_normal(m) * f.series_noise[series]
                ).round(2)
                part = self.series_part[series]
                ents: dict[str, tuple[np.ndarray, list[str]]] = {}
                if seg.device_dim:
                    ents[keys.Dim.DEVICE] = (series, self.series_names)
                ents[keys.Dim.SITE] = (self.site_codes[series], self.site_names)
                ents[keys.Dim.METRIC] = (f.series_metric[series], self.metric_names)
                status = errors = None
            else:
                route = rng.integers(0, len(self.route_names), m)
                values = np.exp(f.route_mu[route] + f.route_sigma[route] * rng.standard_normal(m))
                values = np.minimum(values, 3_600_000.0).round(2)
                u = rng.random(m)
                p5, p4 = f.route_p5[route], f.route_p4[route]
                status = np.where(u < p5, 4, np.where(u < p5 + p4, 3, 1)).astype(np.int64)
                errors = (status == 4).astype(np.float64)
                part = rng.integers(0, self.parts, m)
                ents = {
                    keys.Dim.ROUTE: (route, self.route_names),
                    keys.Dim.SERVICE: (f.route_service[route], self.service_names),
                    keys.Dim.FLEET: (np.zeros(m, dtype=np.int64), [keys.FLEET_ENTITY]),
                }
            for p in range(self.parts):
                mask = part == p
                if not mask.any():
                    continue
                cols = aggregation.Columns(
                    t[mask],
                    values[mask].astype(np.float64),
                    {d: (c[mask], names) for d, (c, names) in ents.items()},
                    None if status is None else status[mask],
                    None if errors is None else errors[mask],
                )
                count = int(mask.sum())
                offset = self.offsets.get((kind.value, p), -1)
                self.offsets[(kind.value, p)] = offset + count
                new: dict[str, list[str]] = {}
                for d, (codes, names) in cols.entities.items():
                    known = self.known.setdefault((kind.value, p, d), set())
                    fresh = [names[i] for i in np.unique(codes).tolist() if names[i] not in known]
                    if fresh:
                        known.update(fresh)
                        new[d] = fresh
                max_t = int(cols.event_times.max())
                out.append(
                    PartitionBatch(
                        kind=kind,
                        partition=p,
                        expect_offset=offset,
                        last_offset=offset + count,
                        max_event_time=max_t,
                        watermark=max_t - SEED_LATENESS_MS,
                        deltas=aggregation.aggregate(
                            cols, [(w, tuple(cols.entities)) for w in windows]
                        ),
                        new_entities=new,
                        events=count,
                        dead=[],
                        late=[],
                    )
                )
        return out


def write_batch(pipe: Any, batch: Any, retention: Any, now_ms: int) -> None:
    """Queue one partition batch as plain writes, for a store that has none of its keys yet.

    Each window key of the seeded range comes from exactly one batch, so its packed values are
    the batch's own (what the worker would write into an empty store), written with plain
    HSETs: seeding a day through ``pulse_apply`` would take minutes.
    """
    from schemas import keys, packed

    kind, part = batch.kind, batch.partition
    for d in batch.deltas:
        key = keys.window_key(kind, part, d.window, d.dim, d.start_ms)
        values = packed.encode(d.table)
        for i in range(0, len(values), 1000):
            pipe.hset(
                key, mapping=dict(zip(d.names[i : i + 1000], values[i : i + 1000], strict=True))
            )
        pipe.expireat(key, retention.expire_at_s(d.window, d.start_ms))
    minute = keys.window_start(batch.max_event_time, keys.WINDOW_1M)
    for dim, names in batch.new_entities.items():
        for i in range(0, len(names), 1000):
            pipe.zadd(
                keys.entities_key(kind, part, dim),
                dict.fromkeys(names[i : i + 1000], minute),
                gt=True,
            )
    progress = keys.progress_key(kind, part)
    pipe.hset(
        progress,
        mapping={
            keys.Progress.OFFSET: batch.last_offset,
            keys.Progress.UPDATED_MS: now_ms,
            keys.Progress.MAX_EVENT_TIME: batch.max_event_time,
            keys.Progress.WATERMARK: batch.watermark,
        },
    )
    pipe.hincrby(progress, keys.Progress.EVENTS, batch.events)
    pipe.hincrby(progress, keys.Progress.BATCHES, 1)


def _seed(ctx: BenchContext, segments: list[Segment], now_ms: int) -> Seeder:
    from pipeline.settings import WorkerSettings
    from pipeline.state import Retention

    ws = WorkerSettings()
    retention = Retention({"10s": ws.retention_10s_s, "1m": ws.retention_1m_s})
    seeder = Seeder(ctx)
    with ctx.redis(timeout_s=120) as r:
        for seg in segments:
            pipe = r.pipeline(transaction=False)
            for batch in seeder.batches(seg, now_ms):
                write_batch(pipe, batch, retention, now_ms)
            pipe.execute()
            if ctx.store.replica_port is not None:
                # let the replica keep up: a replication backlog past its output buffer limit
                # would drop the link and force a full resync
                r.execute_command("WAIT", 1, 60_000)
    return seeder


def _timed(
    fn: Callable[[], object], repeats: int, budget_s: float = 10.0, at_least: int = 5
) -> list[float]:
    """Milliseconds per call of ``repeats`` calls, fewer (not below ``at_least``) past budget."""
    out: list[float] = []
    deadline = time.monotonic() + budget_s
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
        if len(out) >= at_least and time.monotonic() > deadline:
            break
    return out


def _profile(fn: Callable[[], object], calls: int = 3, top: int = 8) -> list[dict[str, Any]]:
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    stats = pstats.Stats(prof, stream=io.StringIO())
    rows = []
    for (file, line, func), (_, ncalls, tottime, cumtime, _) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append((tottime, cumtime, ncalls, f"{file.rsplit('/', 2)[-1]}:{line}:{func}"))
    rows.sort(reverse=True)
    return [
        {
            "function": name,
            "self_ms_per_call": tt / calls * 1000,
            "cum_ms_per_call": ct / calls * 1000,
        }
        for tt, ct, _, name in rows[:top]
    ]


@bench_case("reads", description="latency of each dashboard panel query, seeded store", order=60)
def run(ctx: BenchContext) -> Metrics:
    """Seed the store db, then time every panel query."""
    from pipeline.settings import WorkerSettings

    p = ctx.params
    ctx.flush()
    now_ms = reading_time(int(time.time() * 1000))
    segments = plan_segments(
        now_ms, p.read_day_minutes, p.read_hot_minutes, p.read_hot_rate * 60,
        p.read_background_per_min, p.read_device_minutes, WorkerSettings().retention_10s_s * 1000,
    )  # fmt: skip
    t0 = time.monotonic()
    seeder = _seed(ctx, segments, now_ms)
    seed_s = time.monotonic() - t0
    # as the dashboard's server does (dashboard.app.freeze_startup_heap): what exists before
    # the panels run is left out of the collector's full walks, here the bench's own records too
    gc.collect()
    gc.freeze()
    try:
        return _time_panels(ctx, seeder, seed_s, now_ms)
    finally:
        gc.unfreeze()


def _time_panels(ctx: BenchContext, seeder: Seeder, seed_s: float, now_ms: int) -> Metrics:
    """Every panel query timed as the dashboard runs it, against the seeded store."""
    from dashboard import queries
    from dashboard.settings import DashboardSettings
    from pipeline.metrics import Metrics as WorkerMetrics
    from schemas import keys

    p = ctx.params
    ds = DashboardSettings()
    # the dashboard's client (binary replies, RESP2)
    with queries.reader_client(ctx.store, db=p.store_db, timeout_s=30) as r:
        r.hset(keys.worker_key("bench"), mapping=WorkerMetrics().snapshot())
        info = r.info("memory")
        key_count = int(r.dbsize())
        topo = queries.discover(r, min_partitions=ctx.kafka.partitions)
        view = queries.SiteView(limit=ds.top_sites)  # the page's default site table
        panel_calls: dict[str, Callable[..., object]] = {
            "kpis": lambda **kw: queries.read_kpis(r, topo, now_ms, ds.rate_windows, **kw),
            "events_per_minute": lambda **kw: queries.read_events_per_minute(
                r, topo, now_ms, ds.lookback_min, **kw
            ),
            "latency_per_minute": lambda **kw: queries.read_latency_per_minute(
                r, topo, now_ms, ds.lookback_min, **kw
            ),
            "top_routes": lambda **kw: queries.read_top_routes(
                r, topo, now_ms, ds.top_routes, **kw
            ),
            "site_metrics": lambda **kw: queries.read_site_metrics(r, topo, now_ms, view, **kw),
        }
        # the dashboard hands panels that take one a cache of final panes: time both ways
        cache = queries.PaneCache() if hasattr(queries, "PaneCache") else None
        panels: dict[str, tuple[Callable[[], object], bool]] = {}
        cached: set[str] = set()  # panels that take the pane cache
        for name, call in panel_calls.items():
            func = getattr(queries, f"read_{name}")
            takes_cache = cache is not None and "cache" in inspect.signature(func).parameters
            panels[name] = (functools.partial(call), not takes_cache)
            if takes_cache:
                cached.add(name)
            if takes_cache:
                panels[f"{name}+cache"] = (functools.partial(call, cache=cache), True)
        _check(queries.read_events_per_minute(r, topo, now_ms, ds.lookback_min), seeder)
        results: dict[str, Any] = {}
        for name, (fn, as_dashboard) in panels.items():
            fn()  # warm the connection (and the cache)
            samples = _timed(fn, p.read_repeats)
            entry: dict[str, Any] = {
                f"{k}_ms": v for k, v in percentiles(samples, (0.5, 0.99)).items()
            }
            entry["calls"] = len(samples)
            entry["as_dashboard_runs_it"] = as_dashboard
            if entry["p99_ms"] > READ_TARGET_MS:
                entry["profile"] = _profile(fn)
            results[name] = entry
        dashboard = [fn for fn, as_dashboard in panels.values() if as_dashboard]
        refresh = _timed(lambda: [fn() for fn in dashboard], max(3, p.read_repeats // 10))

        def first_refresh() -> None:
            """Every panel once with a new, empty pane cache: a dashboard's first refresh."""
            empty = queries.PaneCache() if cached else None
            for name, call in panel_calls.items():
                if name in cached:
                    call(cache=empty)
                else:
                    call()

        first = _timed(first_refresh, max(3, p.read_repeats // 10))
        discover = _timed(
            lambda: queries.discover(r, min_partitions=ctx.kafka.partitions),
            max(2, p.read_repeats // 20),
        )
        site_rows = queries.read_site_metrics(r, topo, now_ms, view).total
    return {
        "panels": results,
        "worst_panel_p99_ms": max(
            e["p99_ms"] for e in results.values() if e["as_dashboard_runs_it"]
        ),
        "worst_uncached_p99_ms": max(
            e["p99_ms"] for n, e in results.items() if not n.endswith("+cache")
        ),
        "refresh_all_panels": {f"{k}_ms": v for k, v in percentiles(refresh, (0.5, 0.99)).items()},
        "first_refresh": {f"{k}_ms": v for k, v in percentiles(first, (0.5, 0.99)).items()},
        "discover_scan": {f"{k}_ms": v for k, v in percentiles(discover, (0.5, 0.99)).items()},
        "store": {
            "keys": key_count,
            "used_memory_mb": round(int(info["used_memory"]) / 2**20, 1),
            "seeded_events": sum(sum(v.values()) for v in seeder.per_minute.values()),
            "site_metric_rows": site_rows,
            "seed_s": round(seed_s, 1),
        },
        "repeats": p.read_repeats,
    }


def _check(frame: Any, seeder: Seeder) -> None:
    """The events-per-minute panel must show exactly the seeded counts."""
    for ts, row in frame.iterrows():
        start = int(ts.value // 1_000_000)
        want = seeder.per_minute.get(start, {"sensor": 0, "applog": 0})
        got = {"sensor": int(row["sensor"]), "applog": int(row["applog"])}
        if got != want:
            raise BenchError(f"events per minute at {start}: store {got}, seeded {want}")


target(
    "reads_p99_ms",
    "cases.reads.worst_panel_p99_ms",
    "<=",
    READ_TARGET_MS,
    "worst panel, as the dashboard runs it (with its pane cache where it has one)",
)
target(
    "reads_first_refresh_ms",
    "cases.reads.first_refresh.p99_ms",
    "<=",
    FIRST_REFRESH_TARGET_MS,
    "every panel once with an empty pane cache, p99",
)
