"""The dashboard's one I/O point: read-only queries over the store, one panel per function.

Every query takes a sync ``redis.Redis`` that returns bytes (window values are binary, see
``schemas.packed``; build it with ``schemas.settings.store_client(store, decode=False)``), the
:class:`Topology` (partitions and workers, from :func:`discover`) and ``now_ms`` (no hidden
clock). Keys are computed from the clock with ``schemas.keys`` (window starts are
deterministic). A panel reads its window hashes with HGETALL in one pipeline (the KPIs read
the progress hashes first), decodes all values of one event kind with one ``packed.decode``
call and merges them into panes (window instances merged over partitions, what
:class:`PaneCache` keeps) with one ``packed.merge`` call, after factorizing entity names to
group ids; a hopping window merges its panes with one more. The merge rule itself lives only
in ``schemas.packed``. Quantiles come from ``packed.quantiles``, for every row at once; top-N
and per-pane roll-ups are numpy too. No loop here runs per field or per bucket.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, TypeAlias, cast

import numpy as np
import numpy.typing as npt
import pandas as pd
import redis
from redis.client import Pipeline

from schemas import keys, packed
from schemas.events import EventKind
from schemas.keys import Dim, HoppingWindow, Progress, Stat, TumblingWindow

# Fleet-wide dimension of each kind: summing its entities' counts gives the kind's event count.
FLEET_DIM: Final[dict[EventKind, str]] = {EventKind.SENSOR: Dim.METRIC, EventKind.APPLOG: Dim.FLEET}
NF: Final[dict[EventKind, int]] = {
    EventKind.SENSOR: packed.NF_SENSOR,
    EventKind.APPLOG: packed.NF_APPLOG,
}
DURABILITY_P50: Final = "durability_wait_p50_ms"
DURABILITY_P99: Final = "durability_wait_p99_ms"
LATENCY_QS: Final = (0.5, 0.95, 0.99)

_ERRORS_AT: Final = Stat.PACKED_APPLOG.index(Stat.ERRORS)
_5XX_AT: Final = Stat.PACKED_APPLOG.index("5xx")
_KIND_VALUES: Final = frozenset(k.value for k in EventKind)

Hash: TypeAlias = Mapping[str, str]
RawHash: TypeAlias = Mapping[bytes, bytes]
F64: TypeAlias = npt.NDArray[np.float64]
I64: TypeAlias = npt.NDArray[np.int64]
Names: TypeAlias = npt.NDArray[np.object_]  # entity names (str), one per table row

_NO_NAMES: Final[Names] = np.empty(0, dtype=object)
_NO_ROWS: Final[I64] = np.empty(0, dtype=np.int64)


# --------------------------------------------------------------------------- pure helpers


def concat(tables: Sequence[packed.Table], nf: int) -> packed.Table:
    """The rows of ``tables`` one after the other (row numbers shifted, nothing merged)."""
    if not tables:
        return packed.Table.empty(nf)
    if len(tables) == 1:
        return tables[0]
    sizes = np.fromiter((t.rows for t in tables), dtype=np.int64, count=len(tables))
    offsets = (np.cumsum(sizes) - sizes).tolist()
    return packed.Table(
        np.concatenate([t.stats for t in tables]),
        np.concatenate([t.row + off for t, off in zip(tables, offsets, strict=True)]),
        np.concatenate([t.code for t in tables]),
        np.concatenate([t.count for t in tables]),
    )


def factorize(names: Sequence[object] | npt.NDArray[np.object_]) -> tuple[I64, Names]:
    """Group id of each name and the distinct names (in order of first appearance)."""
    if len(names) == 0:
        return _NO_ROWS, _NO_NAMES
    codes, uniques = pd.factorize(np.asarray(names, dtype=object))
    return np.asarray(codes, dtype=np.int64), np.asarray(uniques, dtype=object)


def merge_by(
    table: packed.Table, names: Sequence[object] | Names, pane: I64 | None = None
) -> tuple[I64, Names, packed.Table]:
    """Rows of ``table`` with the same (pane, name) merged by ``packed.merge``, in one call.

    ``names[i]`` (and ``pane[i]``, default 0) is row ``i``'s entity (and pane). Returns, per
    merged row, its pane and its name, sorted by pane and, within a pane, by first appearance of
    the name; and the merged table.
    """
    codes, uniques = factorize(names)
    return merge_codes(table, codes, uniques, pane)


def merge_codes(
    table: packed.Table, codes: I64, uniques: Names, pane: I64 | None = None
) -> tuple[I64, Names, packed.Table]:
    """:func:`merge_by` of names already factorized (``uniques[codes[i]]`` is row i's name)."""
    if table.rows == 0:
        return _NO_ROWS, _NO_NAMES, packed.Table.empty(table.nf)
    n = len(uniques)
    key = codes if pane is None else np.asarray(pane, dtype=np.int64) * n + codes
    groups, inverse = np.unique(key, return_inverse=True)
    merged = packed.merge(table, inverse.ravel(), int(groups.size))
    return groups // n, uniques[groups % n], merged


def means(table: packed.Table) -> F64:
    """Mean of each row (NaN for a row without values)."""
    n = table.stats[:, packed.COUNT]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, table.stats[:, packed.SUM] / n, np.nan)


def stddevs(table: packed.Table) -> F64:
    """Population standard deviation of each row (NaN for a row without values)."""
    s = table.stats
    n = s[:, packed.COUNT]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = s[:, packed.SUM] / n
        var = np.maximum(s[:, packed.SUMSQ] / n - mean * mean, 0.0)
        return np.where(n > 0, np.sqrt(var), np.nan)


def _freeze(table: packed.Table, names: Names | None = None) -> packed.Table:
    for a in (table.stats, table.row, table.code, table.count, names):
        if a is not None:
            a.flags.writeable = False
    return table


def _slice(table: packed.Table, lo: int, hi: int, b_lo: int, b_hi: int) -> packed.Table:
    """Rows ``lo:hi`` (whose buckets are ``b_lo:b_hi``) as their own table (views)."""
    return packed.Table(
        table.stats[lo:hi], table.row[b_lo:b_hi] - lo, table.code[b_lo:b_hi], table.count[b_lo:b_hi]
    )


@dataclass(frozen=True, slots=True)
class Pane:
    """One window instance of one dimension, merged over partitions: row ``i`` is ``names[i]``.

    Shared between sessions through :class:`PaneCache`: its arrays are read-only.
    """

    names: Names
    table: packed.Table

    @staticmethod
    def empty(nf: int) -> Pane:
        """A pane without entities."""
        return Pane(_NO_NAMES, _freeze(packed.Table.empty(nf), _NO_NAMES))


def panes_of_hashes(
    hashes: Sequence[RawHash], parts: int, nf: int, sketch: bool = True
) -> list[Pane]:
    """Window hashes ``(pane 0: partitions..., pane 1: ...)`` merged into one pane per start.

    ``hashes`` are HGETALL replies (``entity -> packed value``, bytes), ``parts`` per pane.
    All values are decoded in one call and merged in one call; without ``sketch`` the panes
    keep only the statistics (no buckets to merge).
    """
    if parts <= 0:
        return []
    n_panes = len(hashes) // parts
    sizes = np.fromiter(map(len, hashes), dtype=np.int64, count=len(hashes))
    names: list[bytes] = []
    values: list[bytes] = []
    for h in hashes:
        names.extend(h)
        values.extend(h.values())
    if not values:
        return [Pane.empty(nf) for _ in range(n_panes)]
    if not sketch:
        # A packed value is its header and statistics, then its sketch: cut to the first part,
        # it is a valid value without buckets (decoding and merging them would be wasted).
        head = packed.HEADER_BYTES + 8 * nf
        values = [v[:head] for v in values]
    table = packed.decode(values, nf)
    pane = np.repeat(np.arange(len(hashes), dtype=np.int64) // parts, sizes)
    codes, uniques = factorize(names)
    text = np.asarray([u.decode() for u in uniques], dtype=object)  # distinct names only
    row_pane, row_name, merged = merge_codes(table, codes, text, pane)
    lo = np.searchsorted(row_pane, np.arange(n_panes + 1))
    b_lo = np.searchsorted(merged.row, lo)
    return [
        Pane(row_name[a:b], _freeze(_slice(merged, a, b, ba, bb), row_name))
        for a, b, ba, bb in zip(
            lo[:-1].tolist(), lo[1:].tolist(), b_lo[:-1].tolist(), b_lo[1:].tolist(), strict=True
        )
    ]


def stack_panes(panes: Sequence[Pane], nf: int) -> tuple[I64, Names, packed.Table]:
    """Every row of ``panes`` in one table: each row's pane index, its name, the table."""
    if not panes:
        return _NO_ROWS, _NO_NAMES, packed.Table.empty(nf)
    sizes = np.fromiter((p.table.rows for p in panes), dtype=np.int64, count=len(panes))
    pane = np.repeat(np.arange(len(panes), dtype=np.int64), sizes)
    names = np.concatenate([p.names for p in panes]) if sizes.sum() else _NO_NAMES
    return pane, names, concat([p.table for p in panes], nf)


def merge_panes(panes: Sequence[Pane], nf: int) -> Pane:
    """Several panes merged into one (a hopping window from its panes), entity by entity."""
    _, names, table = stack_panes(panes, nf)
    _, merged_names, merged = merge_by(table, names)
    return Pane(merged_names, merged)


def pane_counts(panes: Sequence[Pane]) -> I64:
    """Events per pane: the sum of every entity's count."""
    if not panes:
        return _NO_ROWS
    sizes = np.fromiter((p.table.rows for p in panes), dtype=np.int64, count=len(panes))
    pane = np.repeat(np.arange(len(panes), dtype=np.int64), sizes)
    n = np.concatenate([p.table.stats[:, packed.COUNT] for p in panes])
    return np.rint(np.bincount(pane, weights=n, minlength=len(panes))).astype(np.int64)


class PaneCache:
    """Panes that can no longer change, kept so each refresh reads only the open ones.

    A pane is final once every partition's watermark has passed its end: every event it could
    still get is late by then and goes to the late topic, never to a window. Watermarks only
    grow, so one seen to shrink (or a partition's progress gone) means the store was reset or
    replayed: the cache then empties.
    Panes are merged over partitions (their arrays read-only). Safe to share between Streamlit
    sessions (threads).
    """

    Key: TypeAlias = tuple[str, str, str, int, tuple[int, ...], bool]

    def __init__(self, max_entries: int = 2048) -> None:
        self._panes: OrderedDict[PaneCache.Key, Pane] = OrderedDict()
        self._watermarks: dict[str, int] = {}
        self._max = max_entries
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._panes)

    def get(self, key: PaneCache.Key) -> Pane | None:
        """The final pane under ``key``, if known."""
        with self._lock:
            pane = self._panes.get(key)
            if pane is not None:
                self._panes.move_to_end(key)
                self.hits += 1
            else:
                self.misses += 1
            return pane

    def put(self, key: PaneCache.Key, pane: Pane) -> None:
        """Remember a final pane."""
        with self._lock:
            self._panes[key] = pane
            self._panes.move_to_end(key)
            while len(self._panes) > self._max:
                self._panes.popitem(last=False)

    def clear(self) -> None:
        """Forget every pane and watermark."""
        with self._lock:
            self._panes.clear()
            self._watermarks.clear()

    def observe(self, kind: str, watermark: int) -> bool:
        """Note a kind's (minimum) watermark; a decrease empties the cache (returns True)."""
        with self._lock:
            reset = watermark < self._watermarks.get(kind, watermark)
            if reset:
                self._panes.clear()
                self._watermarks.clear()
            self._watermarks[kind] = watermark
            return reset


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


def text_hash(h: RawHash) -> dict[str, str]:
    """A hash read as bytes, as text (progress and worker hashes hold text)."""
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in h.items()}


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


def _binary(r: redis.Redis) -> redis.Redis:
    if r.get_connection_kwargs().get("decode_responses"):
        raise TypeError(
            "the dashboard queries read binary values: use a client without decode_responses "
            "(schemas.settings.store_client(store, decode=False))"
        )
    return r


def _pipe(r: redis.Redis) -> Pipeline:
    return _binary(r).pipeline(transaction=False)


def _text(key: bytes | str) -> str:
    return key.decode(errors="replace") if isinstance(key, bytes) else key


def _raw_int(raw: object) -> int | None:
    """An integer field read as bytes (None when absent or empty)."""
    return int(float(raw)) if isinstance(raw, bytes | str) and raw else None


def discover(r: redis.Redis, min_partitions: int = 0, scan_count: int = 10_000) -> Topology:
    """Find partitions (progress hashes) and workers (``pulse:worker:*``) by SCAN.

    Partitions ``0..min_partitions-1`` are always included (a configured topic size). SCAN
    walks the whole keyspace: call this every few tens of seconds, not per refresh.
    """
    _binary(r)
    found: dict[EventKind, set[int]] = {k: set(range(min_partitions)) for k in EventKind}
    pattern = f"{keys.PREFIX}:{{*}}:progress"
    for raw in r.scan_iter(match=pattern, count=scan_count):
        key = _text(raw)
        tag = key[key.index("{") + 1 : key.index("}")]
        kind, _, part = tag.partition(".")
        if kind in _KIND_VALUES and part.isdigit():
            found[EventKind(kind)].add(int(part))
    prefix = keys.worker_key("")
    workers = {
        _text(raw).removeprefix(prefix)
        for raw in r.scan_iter(match=keys.worker_key("*"), count=scan_count, _type="hash")
    }
    return Topology({k: tuple(sorted(v)) for k, v in found.items()}, tuple(sorted(workers)))


# --------------------------------------------------------------------------- reading panes


@dataclass(frozen=True, slots=True)
class PaneRequest:
    """Window instances of one dimension to read, each merged over ``parts``."""

    kind: EventKind
    parts: tuple[int, ...]
    window: TumblingWindow
    dim: str
    starts: tuple[int, ...]
    sketch: bool = True  # False: statistics only (counts), no sketch buckets

    def cache_key(self, start: int) -> PaneCache.Key:
        """The key of one of its panes in a :class:`PaneCache`."""
        return (self.kind.value, self.window.name, self.dim, start, self.parts, self.sketch)


def read_pane_sets(
    r: redis.Redis, requests: Sequence[PaneRequest], cache: PaneCache | None = None
) -> list[list[Pane]]:
    """The panes of each request (in its ``starts`` order), all read in one round trip.

    With a ``cache``, final panes come from it, and panes found final are added to it: the
    partitions' watermarks are read first in the same pipeline, so a pane read after them
    cannot have changed since it became final.
    """
    found: list[dict[int, Pane]] = []
    todo: list[list[int]] = []
    for req in requests:
        hits: dict[int, Pane] = {}
        if cache is not None and req.parts:
            for s in req.starts:
                if (hit := cache.get(req.cache_key(s))) is not None:
                    hits[s] = hit
        found.append(hits)
        todo.append([s for s in dict.fromkeys(req.starts) if s not in hits])
    watched = (
        list(dict.fromkeys((req.kind, req.parts) for req in requests if req.parts))
        if cache is not None
        else []
    )
    pipe = _pipe(r)
    for kind, parts in watched:
        for p in parts:
            pipe.hget(keys.progress_key(kind, p), Progress.WATERMARK)
    for req, starts in zip(requests, todo, strict=True):
        for s in starts:
            for p in req.parts:
                pipe.hgetall(keys.window_key(req.kind, p, req.window, req.dim, s))
    replies: list[object] = pipe.execute() if len(pipe) else []
    at = 0
    final_before: dict[tuple[EventKind, tuple[int, ...]], int] = {}
    stale = False
    for kind, parts in watched:
        marks = [_raw_int(m) for m in replies[at : at + len(parts)]]
        at += len(parts)
        if cache is None:
            continue
        if all(m is not None for m in marks):
            lowest = min(m for m in marks if m is not None)
            final_before[(kind, parts)] = lowest
            stale |= cache.observe(kind.value, lowest)
        elif any(hits for req, hits in zip(requests, found, strict=True) if req.kind is kind):
            # panes were cached when every partition had a watermark: a progress hash that
            # is gone now means the store was emptied
            cache.clear()
            stale = True
    if stale and any(found):
        return read_pane_sets(r, requests, cache)  # served from a cache that was stale
    out: list[list[Pane]] = []
    for req, starts, hits in zip(requests, todo, found, strict=True):
        nf = NF[req.kind]
        if not req.parts:
            out.append([Pane.empty(nf) for _ in req.starts])
            continue
        n = len(starts) * len(req.parts)
        chunk = cast(list[RawHash], replies[at : at + n])
        at += n
        mark = final_before.get((req.kind, req.parts))
        merged = panes_of_hashes(chunk, len(req.parts), nf, req.sketch)
        for s, pane in zip(starts, merged, strict=True):
            hits[s] = pane
            if cache is not None and mark is not None and s + req.window.size_ms <= mark:
                cache.put(req.cache_key(s), pane)
        out.append([hits[s] for s in req.starts])
    return out


def read_panes(
    r: redis.Redis,
    kind: EventKind,
    parts: Sequence[int],
    window: TumblingWindow,
    dim: str,
    starts: Sequence[int],
    cache: PaneCache | None = None,
) -> list[Pane]:
    """Window instances of one dimension merged over partitions, in ``starts`` order."""
    (panes,) = read_pane_sets(
        r, [PaneRequest(kind, tuple(parts), window, dim, tuple(starts))], cache
    )
    return panes


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
    replies = iter(pipe.execute() if len(pipe) else [])
    progress = {
        kind: summarize_progress([text_hash(next(replies)) for _ in topo.partitions.get(kind, ())])
        for kind in kinds
    }
    workers = {name: numeric_fields(text_hash(next(replies))) for name in topo.workers}

    cutoff = {
        kind: min(now_ms, frontier)
        for kind in kinds
        if (frontier := progress[kind].frontier_ms) is not None
    }
    requests = [
        PaneRequest(
            kind,
            topo.partitions.get(kind, ()),
            rate_window,
            FLEET_DIM[kind],
            tuple(complete_window_starts(cut, rate_window, rate_windows)),
            sketch=False,
        )
        for kind, cut in cutoff.items()
    ]
    rates: dict[EventKind, float | None] = dict.fromkeys(kinds)
    for req, panes in zip(requests, read_pane_sets(r, requests), strict=True):
        counts = pane_counts(panes)
        by_start = dict(zip(req.starts, counts.tolist(), strict=True))
        rates[req.kind] = events_per_second(by_start, rate_window, cutoff[req.kind], rate_windows)
    return Kpis(now_ms=now_ms, progress=progress, events_per_s=rates, workers=workers)


def _minutes(starts: Sequence[int]) -> pd.DatetimeIndex:
    return pd.DatetimeIndex(pd.to_datetime(list(starts), unit="ms", utc=True), name="minute")


def read_events_per_minute(
    r: redis.Redis,
    topo: Topology,
    now_ms: int,
    lookback_min: int,
    cache: PaneCache | None = None,
) -> pd.DataFrame:
    """Events per complete minute of each kind over the last ``lookback_min`` minutes.

    Indexed by minute start (UTC); columns ``sensor`` and ``applog`` (ints). From the ``1m``
    windows of the fleet-wide dims (sensor ``metric``, applog ``fleet``), one round trip.
    """
    starts = tuple(complete_window_starts(now_ms, keys.WINDOW_1M, lookback_min))
    kinds = list(EventKind)
    # Counts need no sketches; but the applog fleet panes are the ones the latency panel reads,
    # so they are read whole and land in the cache for it.
    requests = [
        PaneRequest(
            kind,
            topo.partitions.get(kind, ()),
            keys.WINDOW_1M,
            FLEET_DIM[kind],
            starts,
            sketch=kind is EventKind.APPLOG,
        )
        for kind in kinds
    ]
    sets = read_pane_sets(r, requests, cache)
    return pd.DataFrame(
        {kind.value: pane_counts(panes) for kind, panes in zip(kinds, sets, strict=True)},
        index=_minutes(starts),
        dtype="int64",
    )


def _quantile_columns(qs: Sequence[float]) -> list[str]:
    return [f"p{round(q * 100)}" for q in qs]


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
    pane, names, table = stack_panes(panes, packed.NF_APPLOG)
    fleet = np.flatnonzero(names == keys.FLEET_ENTITY)  # at most one row per pane
    out = np.full((len(starts), len(qs)), np.nan)
    out[pane[fleet]] = packed.quantiles(table.take(fleet), qs)
    return pd.DataFrame(out, index=_minutes(starts), columns=_quantile_columns(qs), dtype="float64")


def _split(names: Names) -> tuple[Names, Names]:
    """``"<a>|<b>"`` entity names as two arrays ``a`` and ``b`` (one pass over the names)."""
    parts = [str(n).partition(keys.ENTITY_SEP) for n in names.tolist()]
    first = np.empty(len(parts), dtype=object)
    second = np.empty(len(parts), dtype=object)
    first[:] = [p[0] for p in parts]
    second[:] = [p[2] for p in parts]
    return first, second


def _hopping(
    r: redis.Redis,
    kind: EventKind,
    topo: Topology,
    dim: str,
    hop: HoppingWindow,
    now_ms: int,
    cache: PaneCache | None,
) -> tuple[Names, packed.Table]:
    """One dim over the latest hopping window: entities with events, merged over panes."""
    starts = hopping_pane_starts(hop, now_ms)
    parts = topo.partitions.get(kind, ())
    panes = read_panes(r, kind, parts, hop.pane, dim, starts, cache)
    merged = merge_panes(panes, NF[kind])
    seen = np.flatnonzero(merged.table.stats[:, packed.COUNT] > 0)
    return merged.names[seen], merged.table.take(seen)


ROUTE_COLUMNS: Final = (
    "service",
    "route",
    "requests",
    "p50_ms",
    "p99_ms",
    "error_rate",
    "rate_5xx",
)


def top_rows(first: F64, second: F64, limit: int) -> I64:
    """Rows that can be among the ``limit`` largest by (``first``, ``second``), NaN smallest.

    Every row tied with the ``limit``-th is kept, so a final sort with more tie-breakers
    picks the same rows as sorting everything.
    """
    if first.size <= limit:
        return np.arange(first.size, dtype=np.int64)
    a = np.where(np.isnan(first), -np.inf, first)
    b = np.where(np.isnan(second), -np.inf, second)
    order = np.lexsort((-b, -a))
    cut = order[limit - 1]
    return np.flatnonzero((a > a[cut]) | ((a == a[cut]) & (b >= b[cut])))


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
    names, table = _hopping(r, EventKind.APPLOG, topo, Dim.ROUTE, hop, now_ms, cache)
    s = table.stats
    n = s[:, packed.COUNT]
    q = packed.quantiles(table, (0.5, 0.99))
    error_rate = s[:, _ERRORS_AT] / n  # every row has requests
    top = top_rows(q[:, 1], error_rate, limit)
    service, route = _split(names[top])
    p99 = q[top, 1]
    # worst p99 first (an empty sketch last), then most errors, then by name
    worst = np.where(np.isnan(p99), np.inf, -p99)
    at = np.lexsort((route, service, -error_rate[top], worst))[:limit]
    order = top[at]
    return pd.DataFrame(
        {
            "service": service[at],
            "route": route[at],
            "requests": np.rint(n[order]).astype(np.int64),
            "p50_ms": q[order, 0],
            "p99_ms": q[order, 1],
            "error_rate": error_rate[order],
            "rate_5xx": s[order, _5XX_AT] / n[order],
        },
        columns=list(ROUTE_COLUMNS),
    )


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
    names, table = _hopping(r, EventKind.SENSOR, topo, Dim.SITE, hop, now_ms, cache)
    site, metric = _split(names)
    order = np.lexsort((metric, site))
    s = table.stats[order]
    return pd.DataFrame(
        {
            "site": site[order],
            "metric": metric[order],
            "readings": np.rint(s[:, packed.COUNT]).astype(np.int64),
            "mean": means(table)[order],
            "p95": packed.quantiles(table, (0.95,))[order, 0],
            "min": s[:, packed.MIN],
            "max": s[:, packed.MAX],
        },
        columns=list(SITE_COLUMNS),
    )
