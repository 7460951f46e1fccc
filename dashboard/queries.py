"""The dashboard's one I/O point: read-only queries over the store, one panel per function.

Every query takes a sync ``redis.Redis`` created with ``decode_responses=True``, the
:class:`Topology` (partitions and workers, from :func:`discover`) and ``now_ms`` (no hidden
clock). Keys are computed from the clock with ``schemas.keys`` (window starts are
deterministic), read in one pipeline per panel (two for the KPIs), and merged here: a view that
spans partitions or panes adds counts, sums and sketch buckets and takes the min of mins and the
max of maxes. The pure helpers below do that merging on plain dicts.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import pandas as pd
import redis

from pipeline import sketches
from schemas import keys
from schemas.events import EventKind
from schemas.keys import Dim, HoppingWindow, Progress, Stat, TumblingWindow

# Fleet-wide dimension of each kind: summing its entities' counts gives the kind's event count.
FLEET_DIM: Final[dict[EventKind, str]] = {EventKind.SENSOR: Dim.METRIC, EventKind.APPLOG: Dim.FLEET}
DURABILITY_P50: Final = "durability_wait_p50_ms"
DURABILITY_P99: Final = "durability_wait_p99_ms"
LATENCY_QS: Final = (0.5, 0.95, 0.99)

_MIN_AT: Final = Stat.PACKED.index(Stat.MIN)
_MAX_AT: Final = Stat.PACKED.index(Stat.MAX)
_KIND_VALUES: Final = frozenset(k.value for k in EventKind)

Hash = Mapping[str, str]


# --------------------------------------------------------------------------- pure helpers


def merge_agg_fields(hashes: Iterable[Mapping[str, Any]]) -> dict[str, list[float]]:
    """Merge aggregate hashes (``"<entity>" -> packed statistics``) entity by entity.

    Values are packed strings, or lists already unpacked (merged panes); in ``Stat.PACKED``
    (or ``PACKED_APPLOG``) order. ``min``/``max`` take the min/max, every other statistic (n,
    sum, sq, status classes, err) adds up. Inputs are never modified.
    """
    acc: dict[str, list[float]] = {}
    for h in hashes:
        for ent, raw in h.items():
            x = [float(v) for v in raw.split()] if isinstance(raw, str) else list(raw)
            old = acc.get(ent)
            if old is None:
                acc[ent] = x
                continue
            for i, v in enumerate(x):
                if i == _MIN_AT:
                    old[i] = min(old[i], v)
                elif i == _MAX_AT:
                    old[i] = max(old[i], v)
                else:
                    old[i] += v
    return acc


def merge_sketch_fields(hashes: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """Merge sketch hashes field by field (``"<entity>#<code>" -> count``)."""
    acc: dict[str, int] = {}
    for h in hashes:
        for name, raw in h.items():
            acc[name] = acc.get(name, 0) + int(raw)
    return acc


def split_aggs(fields: Mapping[str, Sequence[float]]) -> dict[str, dict[str, float]]:
    """Merged packed statistics as ``{entity: {stat: x}}``."""
    out: dict[str, dict[str, float]] = {}
    for ent, values in fields.items():
        names = Stat.PACKED_APPLOG if len(values) > len(Stat.PACKED) else Stat.PACKED
        out[ent] = dict(zip(names, values, strict=True))
    return out


def split_sketches(fields: Mapping[str, int]) -> dict[str, dict[int, int]]:
    """``{"<entity>#<code>": n}`` as ``{entity: {code: n}}``."""
    out: dict[str, dict[int, int]] = {}
    for name, n in fields.items():
        ent, code = keys.split_field(name)
        out.setdefault(ent, {})[int(code)] = n
    return out


def merge_aggs(hashes: Iterable[Hash]) -> dict[str, dict[str, float]]:
    """Merge aggregate hashes into ``{entity: {stat: value}}``."""
    return split_aggs(merge_agg_fields(hashes))


def merge_sketches(hashes: Iterable[Hash]) -> dict[str, dict[int, int]]:
    """Merge sketch hashes into ``{entity: {code: count}}``."""
    return split_sketches(merge_sketch_fields(hashes))


@dataclass(frozen=True, slots=True)
class Pane:
    """One window instance of one dimension, merged over partitions."""

    aggs: dict[str, list[float]]  # entity -> statistics in Stat.PACKED[_APPLOG] order
    sketch: dict[str, int]  # "<entity>#<code>" -> count


class PaneCache:
    """Panes that can no longer change, kept so each refresh reads only the open ones.

    A pane is final once every partition's watermark has passed its end: every event it could
    still get is late by then and goes to the late topic, never to a window. Watermarks only
    grow, so one seen to shrink means the store was reset or replayed: the cache then empties.
    Safe to share between Streamlit sessions (threads).
    """

    def __init__(self, max_entries: int = 2048) -> None:
        self._panes: OrderedDict[tuple[str, str, str, int, int], Pane] = OrderedDict()
        self._watermarks: dict[str, int] = {}
        self._max = max_entries
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple[str, str, str, int, int]) -> Pane | None:
        """The final pane under ``key``, if known."""
        with self._lock:
            pane = self._panes.get(key)
            if pane is not None:
                self._panes.move_to_end(key)
                self.hits += 1
            else:
                self.misses += 1
            return pane

    def put(self, key: tuple[str, str, str, int, int], pane: Pane) -> None:
        """Remember a final pane."""
        with self._lock:
            self._panes[key] = pane
            self._panes.move_to_end(key)
            while len(self._panes) > self._max:
                self._panes.popitem(last=False)

    def observe(self, kind: str, watermark: int) -> bool:
        """Note a kind's (minimum) watermark; a decrease empties the cache (returns True)."""
        with self._lock:
            reset = watermark < self._watermarks.get(kind, watermark)
            if reset:
                self._panes.clear()
                self._watermarks.clear()
            self._watermarks[kind] = watermark
            return reset


def count_of(h: Hash) -> int:
    """Sum of every entity's ``n`` in one aggregate hash."""
    return sum(int(float(v.split(" ", 1)[0])) for v in h.values())


def mean_of(stats: Mapping[str, float]) -> float | None:
    """Mean of merged statistics; ``None`` without values."""
    n = stats.get(Stat.COUNT, 0.0)
    return stats.get(Stat.SUM, 0.0) / n if n > 0 else None


def stddev_of(stats: Mapping[str, float]) -> float | None:
    """Population standard deviation of merged statistics; ``None`` without values."""
    n = stats.get(Stat.COUNT, 0.0)
    if n <= 0:
        return None
    mean = stats.get(Stat.SUM, 0.0) / n
    return math.sqrt(max(stats.get(Stat.SUMSQ, 0.0) / n - mean * mean, 0.0))


def complete_window_starts(cutoff_ms: int, window: TumblingWindow, count: int) -> list[int]:
    """Starts, oldest first, of the ``count`` latest windows that end at or before ``cutoff_ms``."""
    last = keys.window_start(cutoff_ms, window) - window.size_ms
    return [last - i * window.size_ms for i in range(count - 1, -1, -1)]


def hopping_pane_starts(hop: HoppingWindow, now_ms: int) -> list[int]:
    """Pane starts, oldest first, of the latest hopping window that contains ``now_ms``.

    Its last pane is the pane of ``now_ms`` (still filling): the view covers the last
    ``hop.size_ms`` up to now, which suits rates and quantiles.
    """
    end = now_ms - now_ms % hop.advance_ms + hop.advance_ms
    start = end - hop.size_ms
    return [start + i * hop.pane.size_ms for i in range(hop.panes)]


def events_per_second(
    counts: Mapping[int, int], window: TumblingWindow, cutoff_ms: int, windows: int
) -> float:
    """Mean events/s over the ``windows`` latest windows ending at or before ``cutoff_ms``.

    ``counts`` maps window start to event count; a window absent from it had no events.
    """
    starts = complete_window_starts(cutoff_ms, window, windows)
    return sum(counts.get(s, 0) for s in starts) * 1000.0 / (windows * window.size_ms)


@dataclass(frozen=True, slots=True)
class KindProgress:
    """Progress of one event kind, over the partitions that have a progress hash."""

    partitions: int = 0
    events: int = 0
    late: int = 0
    dead: int = 0
    batches: int = 0
    max_event_time_ms: int | None = None
    # min over partitions: the kind's watermark, as a stream processor defines it
    watermark_ms: int | None = None
    # max over partitions: the event-time frontier (an idle partition does not hold it back)
    frontier_ms: int | None = None
    updated_ms: int | None = None


def _opt_int(h: Hash, name: str) -> int | None:
    raw = h.get(name)
    return None if raw is None or raw == "" else int(float(raw))


def summarize_progress(hashes: Iterable[Hash]) -> KindProgress:
    """Combine the progress hashes of a kind's partitions (empty ones skipped)."""
    present = [h for h in hashes if h]
    if not present:
        return KindProgress()

    def total(name: str) -> int:
        return sum(_opt_int(h, name) or 0 for h in present)

    def times(name: str) -> list[int]:
        return [t for h in present if (t := _opt_int(h, name)) is not None]

    marks, latest, updated = (
        times(Progress.WATERMARK),
        times(Progress.MAX_EVENT_TIME),
        times(Progress.UPDATED_MS),
    )
    return KindProgress(
        partitions=len(present),
        events=total(Progress.EVENTS),
        late=total(Progress.LATE),
        dead=total(Progress.DEAD),
        batches=total(Progress.BATCHES),
        max_event_time_ms=max(latest, default=None),
        watermark_ms=min(marks, default=None),
        frontier_ms=max(marks, default=None),
        updated_ms=max(updated, default=None),
    )


def numeric_fields(h: Hash) -> dict[str, float]:
    """The fields of a hash whose values are numbers, as floats."""
    out: dict[str, float] = {}
    for k, v in h.items():
        try:
            out[k] = float(v)
        except ValueError:
            continue
    return out


# --------------------------------------------------------------------------- discovery


@dataclass(frozen=True, slots=True)
class Topology:
    """Which partitions of each kind and which workers the queries read."""

    partitions: dict[EventKind, tuple[int, ...]]
    workers: tuple[str, ...] = ()

    @classmethod
    def of(cls, partitions: int, workers: Sequence[str] = ()) -> Topology:
        """Partitions ``0..partitions-1`` of every kind."""
        return cls({k: tuple(range(partitions)) for k in EventKind}, tuple(workers))


def discover(r: redis.Redis, min_partitions: int = 0, scan_count: int = 10_000) -> Topology:
    """Find partitions (progress hashes) and workers (``pulse:worker:*``) by SCAN.

    Partitions ``0..min_partitions-1`` are always included (a configured topic size). SCAN
    walks the whole keyspace: call this every few tens of seconds, not per refresh.
    """
    found: dict[EventKind, set[int]] = {k: set(range(min_partitions)) for k in EventKind}
    pattern = f"{keys.PREFIX}:{{*}}:progress"
    for key in r.scan_iter(match=pattern, count=scan_count):
        tag = key[key.index("{") + 1 : key.index("}")]
        kind, _, part = tag.partition(".")
        if kind in _KIND_VALUES and part.isdigit():
            found[EventKind(kind)].add(int(part))
    prefix = keys.worker_key("")
    workers = {
        key.removeprefix(prefix)
        for key in r.scan_iter(match=keys.worker_key("*"), count=scan_count, _type="hash")
    }
    return Topology({k: tuple(sorted(v)) for k, v in found.items()}, tuple(sorted(workers)))


# --------------------------------------------------------------------------- panels


@dataclass(frozen=True, slots=True)
class Kpis:
    """The headline numbers."""

    now_ms: int
    progress: dict[EventKind, KindProgress]
    events_per_s: dict[EventKind, float | None]
    workers: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        """True when no partition has reported progress yet."""
        return all(p.partitions == 0 for p in self.progress.values())

    @property
    def events(self) -> int:
        """On-time events applied, all kinds."""
        return sum(p.events for p in self.progress.values())

    @property
    def late(self) -> int:
        """Events later than the watermark, all kinds."""
        return sum(p.late for p in self.progress.values())

    @property
    def dead(self) -> int:
        """Events sent to the dead-letter topic, all kinds."""
        return sum(p.dead for p in self.progress.values())

    @property
    def total_events_per_s(self) -> float | None:
        """Events/s of all kinds over the last complete 10 s windows."""
        rates = [v for v in self.events_per_s.values() if v is not None]
        return sum(rates) if rates else None

    @property
    def newest_event_ms(self) -> int | None:
        """Newest event time seen in any partition."""
        times = [p.max_event_time_ms for p in self.progress.values() if p.max_event_time_ms]
        return max(times, default=None)

    @property
    def watermark_ms(self) -> int | None:
        """The pipeline's watermark: the min over every partition that has one."""
        marks = [p.watermark_ms for p in self.progress.values() if p.watermark_ms is not None]
        return min(marks, default=None)

    @property
    def watermark_lag_ms(self) -> int | None:
        """How far the watermark trails the wall clock."""
        mark = self.watermark_ms
        return None if mark is None else self.now_ms - mark

    def _worst(self, name: str) -> float | None:
        values = [m[name] for m in self.workers.values() if name in m]
        return max(values, default=None)

    @property
    def durability_p50_ms(self) -> float | None:
        """Durability wait p50, the worst over workers."""
        return self._worst(DURABILITY_P50)

    @property
    def durability_p99_ms(self) -> float | None:
        """Durability wait p99, the worst over workers."""
        return self._worst(DURABILITY_P99)


def _pipe(r: redis.Redis) -> Any:
    return r.pipeline(transaction=False)


def read_kpis(
    r: redis.Redis,
    topo: Topology,
    now_ms: int,
    rate_windows: int = 3,
    rate_window: TumblingWindow = keys.WINDOW_10S,
) -> Kpis:
    """Progress counters, watermarks, worker metrics and events/s.

    Events/s of a kind averages its ``rate_windows`` latest fleet-wide windows that end at or
    before both the wall clock and the kind's event-time frontier (max watermark), so a window
    still receiving on-time events does not count. Two round trips: progress, then windows.
    """
    kinds = list(EventKind)
    pipe = _pipe(r)
    for kind in kinds:
        for p in topo.partitions.get(kind, ()):
            pipe.hgetall(keys.progress_key(kind, p))
    for name in topo.workers:
        pipe.hgetall(keys.worker_key(name))
    replies = iter(pipe.execute())
    progress = {
        kind: summarize_progress([next(replies) for _ in topo.partitions.get(kind, ())])
        for kind in kinds
    }
    workers = {name: numeric_fields(next(replies)) for name in topo.workers}

    plan: list[tuple[EventKind, int]] = []
    pipe = _pipe(r)
    for kind in kinds:
        frontier = progress[kind].frontier_ms
        if frontier is None:
            continue
        for start in complete_window_starts(min(now_ms, frontier), rate_window, rate_windows):
            for p in topo.partitions.get(kind, ()):
                pipe.hgetall(keys.agg_key(kind, p, rate_window, FLEET_DIM[kind], start))
                plan.append((kind, start))
    counts: dict[EventKind, dict[int, int]] = {k: {} for k in kinds}
    if plan:
        for (kind, start), h in zip(plan, pipe.execute(), strict=True):
            counts[kind][start] = counts[kind].get(start, 0) + count_of(h)
    rates: dict[EventKind, float | None] = {}
    for kind in kinds:
        frontier = progress[kind].frontier_ms
        rates[kind] = (
            None
            if frontier is None
            else events_per_second(counts[kind], rate_window, min(now_ms, frontier), rate_windows)
        )
    return Kpis(now_ms=now_ms, progress=progress, events_per_s=rates, workers=workers)


def _minutes(starts: Sequence[int]) -> pd.DatetimeIndex:
    return pd.DatetimeIndex(pd.to_datetime(list(starts), unit="ms", utc=True), name="minute")


def read_events_per_minute(
    r: redis.Redis, topo: Topology, now_ms: int, lookback_min: int
) -> pd.DataFrame:
    """Events per complete minute of each kind over the last ``lookback_min`` minutes.

    Indexed by minute start (UTC); columns ``sensor`` and ``applog`` (ints). From the ``1m``
    windows of the fleet-wide dims (sensor ``metric``, applog ``fleet``).
    """
    starts = complete_window_starts(now_ms, keys.WINDOW_1M, lookback_min)
    pipe = _pipe(r)
    plan: list[tuple[EventKind, int]] = []
    for kind in EventKind:
        for start in starts:
            for p in topo.partitions.get(kind, ()):
                key = keys.agg_key(kind, p, keys.WINDOW_1M, FLEET_DIM[kind], start)
                if kind is EventKind.APPLOG:
                    pipe.hget(key, keys.FLEET_ENTITY)
                else:
                    pipe.hgetall(key)
                plan.append((kind, start))
    totals: dict[EventKind, dict[int, int]] = {k: dict.fromkeys(starts, 0) for k in EventKind}
    replies = pipe.execute() if plan else []
    for (kind, start), reply in zip(plan, replies, strict=True):
        if isinstance(reply, dict):
            totals[kind][start] += count_of(reply)
        elif reply is not None:
            totals[kind][start] += int(float(reply.split(" ", 1)[0]))
    return pd.DataFrame(
        {kind.value: [totals[kind][s] for s in starts] for kind in EventKind},
        index=_minutes(starts),
        dtype="int64",
    )


def _quantile_columns(qs: Sequence[float]) -> list[str]:
    return [f"p{round(q * 100)}" for q in qs]


def read_panes(
    r: redis.Redis,
    kind: EventKind,
    parts: Sequence[int],
    window: TumblingWindow,
    dim: str,
    starts: Sequence[int],
    cache: PaneCache | None = None,
) -> list[Pane]:
    """Window instances of one dimension merged over partitions, in ``starts`` order.

    One round trip. With a ``cache``, final panes come from it, and panes found final are added
    to it: the partitions' watermarks are read first in the same pipeline, so a pane read after
    them cannot have changed since it became final.
    """
    if not parts:
        return [Pane({}, {}) for _ in starts]
    ckey = {s: (kind.value, window.name, dim, s, len(parts)) for s in starts}
    found = {s: hit for s in starts if cache and (hit := cache.get(ckey[s])) is not None}
    todo = [s for s in starts if s not in found]
    pipe = _pipe(r)
    if cache is not None:
        for p in parts:
            pipe.hget(keys.progress_key(kind, p), Progress.WATERMARK)
    for start in todo:
        for p in parts:
            pipe.hgetall(keys.agg_key(kind, p, window, dim, start))
            pipe.hgetall(keys.sketch_key(kind, p, window, dim, start))
    replies = pipe.execute() if (todo or cache is not None) else []
    final_before: int | None = None
    if cache is not None:
        marks = replies[: len(parts)]
        replies = replies[len(parts) :]
        if all(m is not None for m in marks):
            final_before = min(int(m) for m in marks)
            if cache.observe(kind.value, final_before) and found:
                return read_panes(r, kind, parts, window, dim, starts, cache)  # served stale
    step = 2 * len(parts)
    for i, start in enumerate(todo):
        chunk = replies[i * step : (i + 1) * step]
        pane = Pane(merge_agg_fields(chunk[0::2]), merge_sketch_fields(chunk[1::2]))
        found[start] = pane
        if (
            cache is not None
            and final_before is not None
            and start + window.size_ms <= final_before
        ):
            cache.put(ckey[start], pane)
    return [found[s] for s in starts]


def read_latency_per_minute(
    r: redis.Redis,
    topo: Topology,
    now_ms: int,
    lookback_min: int,
    qs: Sequence[float] = LATENCY_QS,
    cache: PaneCache | None = None,
) -> pd.DataFrame:
    """Fleet-wide app latency quantiles (ms) per complete minute over the last ``lookback_min``.

    Indexed by minute start (UTC); columns ``p50``, ``p95``, ``p99`` (NaN for an empty minute).
    """
    starts = complete_window_starts(now_ms, keys.WINDOW_1M, lookback_min)
    parts = topo.partitions.get(EventKind.APPLOG, ())
    panes = read_panes(r, EventKind.APPLOG, parts, keys.WINDOW_1M, Dim.FLEET, starts, cache)
    rows = [
        sketches.quantiles(split_sketches(p.sketch).get(keys.FLEET_ENTITY, {}), qs) for p in panes
    ]
    return pd.DataFrame(
        rows, index=_minutes(starts), columns=_quantile_columns(qs), dtype="float64"
    )


def _read_hopping(
    r: redis.Redis,
    kind: EventKind,
    parts: Sequence[int],
    dim: str,
    panes: Sequence[int],
    hop: HoppingWindow,
    cache: PaneCache | None = None,
) -> tuple[dict[str, dict[str, float]], dict[str, dict[int, int]]]:
    """Merged aggregates and sketches of one dim over the panes of a hopping window."""
    read = read_panes(r, kind, parts, hop.pane, dim, panes, cache)
    aggs = merge_agg_fields(p.aggs for p in read)
    sks = merge_sketch_fields(p.sketch for p in read)
    return split_aggs(aggs), split_sketches(sks)


ROUTE_COLUMNS: Final = (
    "service",
    "route",
    "requests",
    "p50_ms",
    "p99_ms",
    "error_rate",
    "rate_5xx",
)


def read_top_routes(
    r: redis.Redis,
    topo: Topology,
    now_ms: int,
    limit: int = 10,
    hop: HoppingWindow = keys.HOPPING_5M,
    cache: PaneCache | None = None,
) -> pd.DataFrame:
    """Routes by p99 latency over the latest hopping window (5 min up to now), worst first.

    Columns: ``service``, ``route``, ``requests``, ``p50_ms``, ``p99_ms``, ``error_rate`` (share
    of ERROR-level events) and ``rate_5xx`` (share of 5xx responses); ties on p99 break by error
    rate. At most ``limit`` rows.
    """
    panes = hopping_pane_starts(hop, now_ms)
    aggs, sks = _read_hopping(
        r, EventKind.APPLOG, topo.partitions.get(EventKind.APPLOG, ()), Dim.ROUTE, panes, hop, cache
    )
    rows: list[tuple[object, ...]] = []
    for ent, stats in aggs.items():
        n = stats.get(Stat.COUNT, 0.0)
        if n <= 0:
            continue
        service, _, route = ent.partition(keys.ENTITY_SEP)
        p50, p99 = sketches.quantiles(sks.get(ent, {}), (0.5, 0.99))
        rows.append(
            (
                service,
                route,
                int(n),
                p50,
                p99,
                stats.get(Stat.ERRORS, 0.0) / n,
                stats.get("5xx", 0.0) / n,
            )
        )
    frame = pd.DataFrame(rows, columns=list(ROUTE_COLUMNS))
    frame = frame.astype({"requests": "int64", "p50_ms": "float64", "p99_ms": "float64"})
    frame = frame.sort_values(
        ["p99_ms", "error_rate", "service", "route"],
        ascending=[False, False, True, True],
        na_position="last",
    )
    return frame.head(limit).reset_index(drop=True)


SITE_COLUMNS: Final = ("site", "metric", "readings", "mean", "p95", "min", "max")


def read_site_metrics(
    r: redis.Redis,
    topo: Topology,
    now_ms: int,
    hop: HoppingWindow = keys.HOPPING_5M,
    cache: PaneCache | None = None,
) -> pd.DataFrame:
    """Per site and metric over the latest hopping window (5 min up to now).

    Columns: ``site``, ``metric``, ``readings``, ``mean``, ``p95``, ``min``, ``max``; sorted by
    site then metric.
    """
    panes = hopping_pane_starts(hop, now_ms)
    aggs, sks = _read_hopping(
        r, EventKind.SENSOR, topo.partitions.get(EventKind.SENSOR, ()), Dim.SITE, panes, hop, cache
    )
    rows: list[tuple[object, ...]] = []
    for ent, stats in aggs.items():
        n = stats.get(Stat.COUNT, 0.0)
        if n <= 0:
            continue
        site, _, metric = ent.partition(keys.ENTITY_SEP)
        (p95,) = sketches.quantiles(sks.get(ent, {}), (0.95,))
        rows.append(
            (
                site,
                metric,
                int(n),
                mean_of(stats),
                p95,
                stats.get(Stat.MIN),
                stats.get(Stat.MAX),
            )
        )
    frame = pd.DataFrame(rows, columns=list(SITE_COLUMNS))
    frame = frame.astype({"readings": "int64", "mean": "float64", "p95": "float64"})
    return frame.sort_values(["site", "metric"]).reset_index(drop=True)


def connect(
    host: str, port: int, db: int = 0, password: str | None = None, timeout_s: float = 2.0
) -> redis.Redis:
    """A client as the queries expect it (``decode_responses=True``, short timeouts)."""
    return redis.Redis(
        host=host,
        port=port,
        db=db,
        password=password,
        decode_responses=True,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
    )
