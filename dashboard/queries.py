"""The dashboard's one I/O point: read-only queries over the store, one panel per function.

Every query takes a sync ``redis.Redis`` that returns bytes (window values are binary, see
``schemas.packed``; build it with :func:`reader_client`, which speaks RESP2: a hash arrives as a
flat list, parsed 2-3 times faster than RESP3's map), the :class:`Topology` (partitions and
workers, from :func:`discover`) and ``now_ms`` (no hidden clock). Keys are computed from the
clock with ``schemas.keys`` (window starts are deterministic). A panel reads its window hashes
with HGETALL in one raw pipeline (:func:`execute_raw`: no per-command packing or callbacks; the
KPIs read the progress hashes first), decodes all values of one event kind with one
``packed.decode`` call and merges them into panes (window instances merged over partitions,
what :class:`PaneCache` keeps) with one ``packed.merge`` call, after factorizing entity names to
group ids; a hopping window merges its panes with one more. The site table reads statistics
only for every site x metric (each reply's values cut to their statistics and its names
numbered as it arrives, all checked as ``packed.decode_stats`` checks them), into a
:class:`Rollup` of the final panes that the cache keeps, picks its top rows, and merges
sketches for those rows alone. The
merge rule itself lives only in ``schemas.packed``. Quantiles come from ``packed.quantiles``,
for every row at once; top-N and per-pane roll-ups are numpy too. No loop here runs per bucket,
or per field of a window except to pick out the few values of the rows a table shows.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from collections.abc import Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from typing import TYPE_CHECKING, Any, Final, TypeAlias, TypeVar, cast

import numpy as np
import numpy.typing as npt
import pandas as pd
import redis
from redis.client import Pipeline

from schemas import keys, packed
from schemas import sketch as sketches
from schemas.events import EventKind
from schemas.keys import Dim, HoppingWindow, Progress, Stat, TumblingWindow
from schemas.settings import StoreSettings

if TYPE_CHECKING:
    from redis.cluster import RedisCluster

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

_K = TypeVar("_K")
_V = TypeVar("_V")
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


HashReply: TypeAlias = RawHash | Sequence[bytes]  # HGETALL: a map (RESP3) or a flat list (RESP2)


def panes_of_hashes(
    hashes: Sequence[HashReply], parts: int, nf: int, sketch: bool = True
) -> list[Pane]:
    """Window hashes ``(pane 0: partitions..., pane 1: ...)`` merged into one pane per start.

    ``hashes`` are HGETALL replies (``entity -> packed value``, bytes; a map, or RESP2's flat
    list ``[name, value, ...]``), ``parts`` per pane. All values are decoded in one call and
    merged in one call; without ``sketch`` the panes keep only the statistics (no buckets to
    decode or merge).
    """
    if parts <= 0:
        return []
    n_panes = len(hashes) // parts
    names: list[bytes] = []
    values: list[bytes] = []
    sizes = np.zeros(len(hashes), dtype=np.int64)
    for i, h in enumerate(hashes):
        n, v = _names_values(h)
        names += n
        values += v
        sizes[i] = len(n)
    if not values:
        return [Pane.empty(nf) for _ in range(n_panes)]
    table = packed.decode(values, nf) if sketch else packed.decode_stats(values, nf)
    pane = np.repeat(np.arange(len(hashes), dtype=np.int64) // parts, sizes)
    codes, uniques = factorize(names)
    text = np.asarray([keys.text(u) for u in uniques], dtype=object)  # distinct names only
    row_pane, row_name, merged = merge_codes(table, codes, text, pane)
    lo = np.searchsorted(row_pane, np.arange(n_panes + 1))
    b_lo = np.searchsorted(merged.row, lo)
    return [
        Pane(row_name[a:b], _freeze(_slice(merged, a, b, ba, bb), row_name))
        for a, b, ba, bb in zip(
            lo[:-1].tolist(), lo[1:].tolist(), b_lo[:-1].tolist(), b_lo[1:].tolist(), strict=True
        )
    ]


def _names_values(h: HashReply) -> tuple[list[bytes], list[bytes]]:
    """The names and values of an HGETALL reply."""
    if isinstance(h, Mapping):
        return list(h), list(h.values())
    flat = h if isinstance(h, list) else list(h)
    return flat[0::2], flat[1::2]


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

    def __init__(self, max_entries: int = 2048, max_rollups: int = 16, max_names: int = 4) -> None:
        self._panes: OrderedDict[PaneCache.Key, Pane] = OrderedDict()
        # merges of several final panes (see :class:`Rollup`), by (kind, dim, starts, parts)
        self._rollups: OrderedDict[tuple[object, ...], Rollup] = OrderedDict()
        self._max_rollups = max_rollups
        # the names of the open panes' last read, by the same keys (see :class:`NameMemo`):
        # a few, as each holds every name read (about 2 MB for 28 000 site x metric values)
        self._names: OrderedDict[tuple[object, ...], NameMemo] = OrderedDict()
        self._max_names = max_names
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
            _put_newest(self._panes, key, pane, self._max)

    def rollup(self, key: tuple[object, ...]) -> Rollup | None:
        """The roll-up of final panes under ``key``, if known."""
        with self._lock:
            found = self._rollups.get(key)
            if found is not None:
                self._rollups.move_to_end(key)
            return found

    def put_rollup(self, key: tuple[object, ...], rollup: Rollup) -> None:
        """Remember a roll-up of final panes."""
        with self._lock:
            _put_newest(self._rollups, key, rollup, self._max_rollups)

    def names(self, key: tuple[object, ...]) -> NameMemo | None:
        """The names read last time from the open panes under ``key``, if known."""
        with self._lock:
            return self._names.get(key)

    def put_names(self, key: tuple[object, ...], memo: NameMemo) -> None:
        """Remember the names of a read of open panes."""
        with self._lock:
            _put_newest(self._names, key, memo, self._max_names)

    def clear(self) -> None:
        """Forget every pane, roll-up, name memo and watermark."""
        with self._lock:
            self._forget()

    def _forget(self) -> None:
        self._panes.clear()
        self._rollups.clear()
        self._names.clear()
        self._watermarks.clear()

    def observe(self, kind: str, watermark: int) -> bool:
        """Note a kind's (minimum) watermark; a decrease empties the cache (returns True)."""
        with self._lock:
            reset = watermark < self._watermarks.get(kind, watermark)
            if reset:
                self._forget()
            self._watermarks[kind] = watermark
            return reset


def _put_newest(entries: OrderedDict[_K, _V], key: _K, value: _V, limit: int) -> None:
    """``entries[key] = value`` as the newest entry, the oldest dropped past ``limit``."""
    entries[key] = value
    entries.move_to_end(key)
    while len(entries) > limit:
        entries.popitem(last=False)


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


def reader_client(
    store: StoreSettings, *, db: int | None = None, timeout_s: float | None = 2.0
) -> redis.Redis:
    """The queries' client: ``store_client``'s settings (binary replies), speaking RESP2.

    A hash comes back as a flat list in RESP2 and as a map in RESP3 (redis-py's default):
    the parser builds a map of tens of thousands of fields 2-3 times slower.
    """
    from schemas.settings import StoreRole, store_client

    return store_client(store, db=db, timeout_s=timeout_s, role=StoreRole.READER, protocol=2)


def _binary(r: redis.Redis) -> redis.Redis:
    if r.get_connection_kwargs().get("decode_responses"):
        raise TypeError(
            "the dashboard queries read binary values: use a client without decode_responses "
            "(schemas.settings.store_client(store, decode=False))"
        )
    return r


def _pipe(r: redis.Redis) -> Pipeline:
    return _binary(r).pipeline(transaction=False)


def _resp(*args: bytes | str) -> bytes:
    """One command in the store's wire protocol (RESP)."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a.encode() if isinstance(a, str) else a
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


def execute_raw(r: redis.Redis, commands: Sequence[bytes]) -> list[object]:
    """The replies of ``commands`` (from :func:`_resp`), sent in one pipeline on one connection.

    The replies are as the parser gives them (a hash as a map, or a flat list of names and
    values in RESP2): no per-command packing or reply callback, which cost more than the store
    for the dashboard's hundreds of small reads.
    """
    return list(stream_raw(r, commands))


STREAM_CHUNK = 8  # commands a stream sends first (see stream_raw)


def stream_raw(
    r: redis.Redis, commands: Sequence[bytes], ahead: int | None = None
) -> Generator[object, None, None]:
    """:func:`execute_raw`, each reply yielded as it arrives: the caller can work on the first
    replies while the store still produces the others.

    The commands go out in chunks, the next as soon as the first reply of the one before
    arrives: the store writes a client's replies only once it has run every command it read in
    one go, so one big pipeline would keep the first reply back until the store had produced
    the last (a first refresh's 60 large hashes: about 20 ms idle). The first chunk holds
    :data:`STREAM_CHUNK` commands and each next one as many as were sent before it, so many
    small commands still go out in a few writes. With ``ahead``, the store is kept that many
    commands ahead of the replies read instead (topped up at each reply): for large replies,
    where the store produces the next while the caller works on this one, and neither waits.

    A failed command raises; the connection is then dropped (its remaining replies unread),
    as it is when the caller stops early, so it is never reused mid-stream.
    """
    if not commands:
        return
    from redis.cluster import RedisCluster

    if isinstance(r, RedisCluster):
        yield from _stream_cluster(r, commands)
        return
    pool = _binary(r).connection_pool
    conn = pool.get_connection()
    done = False
    n = len(commands)
    sent = newest = 0  # commands sent; where the newest chunk starts

    def send_to(end: int) -> None:
        nonlocal sent, newest
        conn.send_packed_command([b"".join(commands[sent:end])])  # type: ignore[no-untyped-call]
        newest, sent = sent, end

    try:
        send_to(min(n, ahead or STREAM_CHUNK))
        for i in range(n):
            reply = conn.read_response()
            if sent < n:
                if ahead is not None:
                    send_to(min(n, i + 1 + ahead))  # one more, as this one is read
                elif i == newest:
                    send_to(min(n, sent + max(STREAM_CHUNK, sent)))  # chunks double
            yield reply
        done = True
    finally:
        if not done:
            conn.disconnect()  # type: ignore[no-untyped-call]
        pool.release(conn)


def _key_of(command: bytes) -> bytes:
    """The key of a command packed by :func:`_resp` (its first argument)."""
    return command.split(b"\r\n", 5)[4]


def _stream_cluster(rc: RedisCluster, commands: Sequence[bytes]) -> Generator[object, None, None]:
    """:func:`stream_raw` on a cluster: each node's commands (by their key's slot) sent on one
    connection of that node, the replies read back in the order of ``commands``.

    A ``MOVED`` reply (a slot changed hands) reloads the slot map before it is raised: the
    next refresh reads from the right nodes.
    """
    _binary(rc)  # type: ignore[arg-type]  # RedisCluster answers the same
    nodes = [rc.get_node_from_key(_key_of(c)) for c in commands]  # type: ignore[no-untyped-call]
    batches: dict[str, list[bytes]] = {}
    for node, command in zip(nodes, commands, strict=True):
        batches.setdefault(node.name, []).append(command)
    conns: dict[str, tuple[Any, Any]] = {}
    done = False
    try:
        for node in {n.name: n for n in nodes}.values():
            pool = node.redis_connection.connection_pool
            conn = pool.get_connection()
            conns[node.name] = (pool, conn)
            conn.send_packed_command([b"".join(batches[node.name])])
        for node in nodes:
            yield conns[node.name][1].read_response()
        done = True
    except redis.ResponseError as exc:
        if str(exc).startswith(("MOVED", "ASK")):
            rc.nodes_manager.initialize()
        raise
    finally:
        for pool, conn in conns.values():
            if not done:
                conn.disconnect()
            pool.release(conn)


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
        key = keys.text(raw)
        tag = key[key.index("{") + 1 : key.index("}")]
        kind, _, part = tag.partition(".")
        if kind in _KIND_VALUES and part.isdigit():
            found[EventKind(kind)].add(int(part))
    prefix = keys.worker_key("")
    workers = {
        keys.text(raw).removeprefix(prefix)
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
    r: redis.Redis,
    requests: Sequence[PaneRequest],
    cache: PaneCache | None = None,
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
    commands = [
        _resp(b"HGET", keys.progress_key(kind, p), Progress.WATERMARK)
        for kind, parts in watched
        for p in parts
    ]
    for req, starts in zip(requests, todo, strict=True):
        commands += [
            _resp(b"HGETALL", keys.window_key(req.kind, p, req.window, req.dim, s))
            for s in starts
            for p in req.parts
        ]
    replies = execute_raw(r, commands)
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
        chunk = cast(list[HashReply], replies[at : at + n])
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
SITE_ORDER: Final = ("readings", "mean", "p95", "min", "max")  # columns the table sorts by
_SITE_QS: Final = (0.95,)


@dataclass(frozen=True, slots=True)
class SiteView:
    """Which site x metric rows the site table shows: filters, order and how many."""

    limit: int = 20
    order_by: str = "readings"  # one of SITE_ORDER
    ascending: bool = False  # False: the largest first
    site: str | None = None  # only this site
    metric: str | None = None  # only this metric

    def __post_init__(self) -> None:
        if self.order_by not in SITE_ORDER:
            raise ValueError(f"order_by must be one of {', '.join(SITE_ORDER)}: {self.order_by!r}")
        if self.limit < 1:
            raise ValueError(f"limit must be at least 1: {self.limit}")


@dataclass(frozen=True, slots=True)
class SiteMetrics:
    """The site table: its first ``limit`` rows, and how many rows there are in all."""

    rows: pd.DataFrame  # SITE_COLUMNS
    matching: int  # site x metric rows with readings that pass the view's filters
    total: int  # site x metric rows with readings in the window
    sites: tuple[str, ...]  # sites with readings, sorted (a filter's choices)
    metrics: tuple[str, ...]

    @property
    def empty(self) -> bool:
        """True when the window has no readings at all."""
        return self.total == 0


def first_rows(key: F64, limit: int) -> I64:
    """Rows that can be among the ``limit`` smallest of ``key`` (NaN largest), ties kept.

    Every row tied with the ``limit``-th is kept, so a final sort with tie-breakers picks the
    same rows as sorting everything.
    """
    if key.size <= limit:
        return np.arange(key.size, dtype=np.int64)
    k = np.where(np.isnan(key), np.inf, key)
    cut = np.partition(k, limit - 1)[limit - 1]
    return np.flatnonzero(k <= cut)


@dataclass(frozen=True, slots=True)
class Rollup:
    """Panes of one dimension merged over partitions and panes, statistics only (no sketch).

    Row ``i`` is entity ``names[i]`` (bytes, as stored), split at ``keys.ENTITY_SEP`` into
    ``first`` and ``second`` (text). Cached in a :class:`PaneCache` for the final panes of a
    hopping window, so a refresh merges only the open panes into it. Its row of each name
    (:meth:`ids`) and its distinct firsts and seconds (:meth:`choices`) are worked out when
    first asked for, and kept with it.
    """

    starts: tuple[int, ...]
    names: Names
    stats: F64
    first: Names
    second: Names
    _ids: dict[bytes, int] | None = field(default=None, compare=False, repr=False)
    _choices: tuple[tuple[str, ...], tuple[str, ...]] | None = field(
        default=None, compare=False, repr=False
    )

    @staticmethod
    def empty(nf: int) -> Rollup:
        """No panes, no entities (one instance per ``nf``: a :class:`NameMemo` over it holds)."""
        if (found := _EMPTY_ROLLUPS.get(nf)) is None:
            stats = np.zeros((0, nf))
            stats.flags.writeable = False
            found = Rollup((), _NO_NAMES, stats, _NO_NAMES, _NO_NAMES, {}, ((), ()))
            found = _EMPTY_ROLLUPS.setdefault(nf, found)
        return found

    @property
    def rows(self) -> int:
        """Number of entities."""
        return int(self.names.size)

    def ids(self) -> dict[bytes, int]:
        """The row of each name (do not change it: the roll-up keeps it)."""
        if self._ids is None:
            ids = dict(zip(self.names.tolist(), range(self.rows), strict=True))
            object.__setattr__(self, "_ids", ids)  # the same value, whoever sets it first
            return ids
        return self._ids

    def choices(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The distinct values of ``first`` and of ``second``, sorted."""
        if self._choices is None:
            found = (
                tuple(sorted(set(self.first.tolist()))),
                tuple(sorted(set(self.second.tolist()))),
            )
            object.__setattr__(self, "_choices", found)
            return found
        return self._choices

    def rows_of(self, names: Names) -> I64:
        """The row of each of ``names`` (-1 for a name without one)."""
        get = self.ids().get
        return np.fromiter(map(get, names.tolist(), repeat(-1)), np.int64, count=names.size)

    def extended(
        self,
        names: Names,
        split: tuple[Names, Names] | None = None,
        ids: dict[bytes, int] | None = None,
    ) -> Rollup:
        """The same with rows for ``names`` (new entities, no statistics yet) appended.

        ``split``: the names' two parts, when known; ``ids``: the row of every name after, when
        known (the roll-up keeps it).
        """
        if names.size == 0:
            return self
        first, second = split if split is not None else split_names(names)
        nf = self.stats.shape[1]
        added = np.zeros((names.size, nf))
        added[:, packed.MIN], added[:, packed.MAX] = np.inf, -np.inf
        firsts, seconds = self.choices()  # kept with this roll-up (a cached one: once)
        choices = (
            tuple(sorted(set(firsts).union(first.tolist()))),
            tuple(sorted(set(seconds).union(second.tolist()))),
        )
        return Rollup(
            self.starts,
            np.concatenate([self.names, names]),
            np.concatenate([self.stats, added]),
            np.concatenate([self.first, first]),
            np.concatenate([self.second, second]),
            ids,
            choices,
        )

    def merged(self, other: Rollup) -> Rollup:
        """The same with ``other`` (a roll-up of other panes) merged in."""
        if self.rows == 0:
            return dataclasses.replace(other, starts=(*self.starts, *other.starts))
        rows = self.rows_of(other.names)
        new = np.flatnonzero(rows < 0)
        base = self.extended(other.names[new], (other.first[new], other.second[new]))
        rows[new] = self.rows + np.arange(new.size)
        return base.plus(other.starts, other.stats, rows)

    def one_pane(self, start: int, stats: F64, rows: I64) -> Rollup:
        """A roll-up of one pane: its values (``stats[i]`` of entity ``rows[i]`` of this one)."""
        present = np.zeros(self.rows, dtype=np.bool_)
        present[rows] = True
        mine = np.flatnonzero(present)  # this roll-up's rows the pane has, in order
        at = np.full(self.rows, -1, dtype=np.int64)
        at[mine] = np.arange(mine.size)
        table = packed.Table(stats, _NO_ROWS, _NO_ROWS, _NO_ROWS)
        merged = packed.merge(table, at[rows], int(mine.size)).stats
        merged.flags.writeable = False
        return Rollup((start,), self.names[mine], merged, self.first[mine], self.second[mine])

    def plus(self, starts: Sequence[int], stats: F64, rows: I64) -> Rollup:
        """The same with the values of panes ``starts`` merged in (``stats[i]`` of ``rows[i]``)."""
        n = self.rows
        table = packed.Table(np.concatenate([self.stats, stats]), _NO_ROWS, _NO_ROWS, _NO_ROWS)
        groups = np.concatenate([np.arange(n, dtype=np.int64), rows])
        merged = packed.merge(table, groups, n).stats
        merged.flags.writeable = False
        return Rollup(
            (*self.starts, *starts),
            self.names,
            merged,
            self.first,
            self.second,
            self._ids,
            self._choices,
        )


_EMPTY_ROLLUPS: dict[int, Rollup] = {}


def split_names(names: Names) -> tuple[Names, Names]:
    """Entity names (bytes, ``"<a>|<b>"``) as text, split at their first ``keys.ENTITY_SEP``.

    All names are decoded in one call and split by a few calls on the joined text (no call per
    name), when every name holds exactly one separator and no line break; else name by name.
    """
    n = names.size
    if n == 0:
        return _NO_NAMES, _NO_NAMES
    joined = b"\n".join(names.tolist())
    buf = np.frombuffer(joined, dtype=np.uint8)
    sep = keys.ENTITY_SEP.encode()
    if joined.count(b"\n") == n - 1 and len(sep) == 1:
        line_of = np.cumsum(buf == ord("\n"))  # each byte's name
        per_name = np.bincount(line_of[buf == sep[0]], minlength=n)
        if (per_name == 1).all():
            tokens = joined.decode(errors="replace").replace(keys.ENTITY_SEP, "\n").split("\n")
            first = np.empty(n, dtype=object)
            second = np.empty(n, dtype=object)
            first[:] = tokens[0::2]
            second[:] = tokens[1::2]
            return first, second
    return _split(np.asarray([b.decode(errors="replace") for b in names.tolist()], dtype=object))


@dataclass(frozen=True, slots=True)
class _HopStats:
    """Every entity of a dimension over a hopping window's panes, and how to find its values."""

    rollup: Rollup  # all panes
    cached: tuple[int, ...]  # panes that came from a cached roll-up (not read this time)
    raw_rows: I64  # entity of each value read this time
    raw_values: list[bytes]


def _rollup_key(req: PaneRequest, starts: Sequence[int]) -> tuple[object, ...]:
    return (req.kind.value, req.window.name, req.dim, tuple(starts), req.parts)


def _cached_rollup(req: PaneRequest, cache: PaneCache | None) -> Rollup:
    """The longest run of leading panes of ``req`` that a cache holds as final, merged.

    From a roll-up of the run, or of a shorter one extended by roll-ups of single panes (each
    pane found final is also kept alone: the next hopping window starts a minute later).
    """
    base = Rollup.empty(NF[req.kind])
    if cache is None or not req.parts:
        return base
    starts = req.starts
    for k in range(len(starts), 0, -1):
        if (found := cache.rollup(_rollup_key(req, starts[:k]))) is not None:
            base = found
            break
    k = len(base.starts)
    while k < len(starts) and (one := cache.rollup(_rollup_key(req, starts[k : k + 1]))):
        base = base.merged(one)
        k += 1
    if k > 1 and cache.rollup(_rollup_key(req, starts[:k])) is None:
        cache.put_rollup(_rollup_key(req, starts[:k]), base)
    return base


_HOP_AHEAD: Final = 2  # commands the store is kept ahead of a hopping read (see stream_raw)
_WIDTHS: Final = (1, 2, 4)  # packed bytes per sketch code offset or bucket count
_WIDTH_OK: Final = np.isin(np.arange(256), _WIDTHS)  # by byte value: one lookup per value


class _StatsReader:
    """The statistics of many packed values, taken reply by reply and decoded at once.

    :meth:`add` copies a reply's values' leading bytes (header and statistics) into one array
    and notes their lengths, in two calls, while the values are fresh in the CPU's caches;
    :meth:`stats` reads them all at once and checks each value as ``packed.decode_stats`` does.
    When a value fails a check, ``packed.decode_stats`` raises its exact
    :class:`packed.PackedError`, or reads the values when some are of an earlier layout.
    """

    def __init__(self, nf: int) -> None:
        self.nf = nf
        self.values: list[bytes] = []
        self._dtype = packed.header_dtype(nf)
        self._head = np.dtype(f"S{self._dtype.itemsize}")
        self._lens: list[I64] = []
        self._heads: list[npt.NDArray[np.bytes_]] = []

    def add(self, values: list[bytes]) -> None:
        """Values to decode after the ones added so far."""
        self.values += values
        self._lens.append(np.fromiter(map(len, values), dtype=np.int64, count=len(values)))
        # each value's leading bytes, in one call (a shorter value is padded: caught by length)
        self._heads.append(np.array(values, dtype=self._head))

    def stats(self) -> F64:
        """``packed.decode_stats(values, nf).stats`` of every value added, in order."""
        nf, n = self.nf, len(self.values)
        if n == 0:
            return np.zeros((0, nf))
        hsize = self._dtype.itemsize
        lens = np.concatenate(self._lens)
        if (lens < hsize).any():
            return packed.decode_stats(self.values, nf).stats  # raises, or reads older values
        head = np.concatenate(self._heads).view(self._dtype)
        cw, nw = head["cw"].astype(np.int64), head["nw"].astype(np.int64)
        pair = cw + nw
        bad = (head["v"] != packed.VERSION) | (head["nf"] != nf)
        bad |= ~(_WIDTH_OK[head["cw"]] & _WIDTH_OK[head["nw"]])
        bad |= np.where(bad, True, (lens - hsize) % np.where(pair > 0, pair, 1) != 0)
        if bad.any():
            return packed.decode_stats(self.values, nf).stats  # raises, or reads older values
        return np.asarray(head["stats"], dtype=np.float64)


@dataclass(frozen=True, slots=True)
class NameMemo:
    """The names of each reply of one read of open panes, and their rows over ``base``.

    A hash's fields come back in the same order while it holds the same fields (a value
    written over keeps its place), so the next read of the same panes over the same roll-up
    usually gets the same names: comparing two lists costs a tenth of numbering the names
    again (each fresh name hashed, then looked up).
    """

    base: Rollup
    names: tuple[list[bytes], ...]
    rows: tuple[I64, ...]  # read-only
    fresh: tuple[bytes, ...]


class _Numbering:
    """Row numbers of entity names over one read: a roll-up's rows, then new names in order.

    One dict lookup per name read (names are numbered reply by reply, while they are fresh in
    the CPU's caches), in a copy of the roll-up's own: what one read adds is not kept. With a
    ``memo`` of the last read over the same roll-up, a reply whose names equal that read's
    (same names, same order) takes its rows; from the first that differs on, names are
    numbered (the replies before it again, to rebuild the numbering up to there).
    """

    def __init__(self, base: Rollup, memo: NameMemo | None = None) -> None:
        self._base = base
        self._ids: dict[bytes, int] | None = None  # a copy of the roll-up's, once needed
        self.fresh: list[bytes] = []  # names not known before, in order of first appearance
        self._memo = memo if memo is not None and memo.base is base else None
        self._names: list[list[bytes]] = []  # each call's names
        self._rows: list[I64] = []  # and their rows

    def snapshot(self) -> dict[bytes, int]:
        """The row of every name so far."""
        return self._numbered().copy()

    def __len__(self) -> int:
        return len(self._numbered())

    def rows(self, names: list[bytes]) -> I64:
        """The row of each of ``names`` (a name not seen yet gets the next free row)."""
        i = len(self._names)
        self._names.append(names)
        memo = self._memo
        if memo is not None and i < len(memo.names) and memo.names[i] == names:
            at = memo.rows[i]
        else:
            self._memo = None
            at = self._number(names, self._numbered(upto=i))
        self._rows.append(at)
        return at

    def finish(self) -> NameMemo:
        """The read's memo (the one given, when every reply matched it); ``fresh`` is final."""
        memo = self._memo
        if memo is not None and len(self._names) == len(memo.names):
            self.fresh = list(memo.fresh)
            return memo
        self._numbered()
        return NameMemo(self._base, tuple(self._names), tuple(self._rows), tuple(self.fresh))

    def _numbered(self, upto: int | None = None) -> dict[bytes, int]:
        """The numbering of the first ``upto`` replies (all so far), built when the memo ends."""
        if self._ids is None or self._memo is not None:
            self._memo = None
            self._ids, self.fresh = self._base.ids().copy(), []
            for names in self._names[: len(self._names) if upto is None else upto]:
                self._number(names, self._ids)
        return self._ids

    def _number(self, names: list[bytes], ids: dict[bytes, int]) -> I64:
        at = np.fromiter(map(ids.get, names, repeat(-1)), dtype=np.int64, count=len(names))
        miss = np.flatnonzero(at < 0)
        if miss.size:
            missing = [names[i] for i in miss.tolist()]
            fresh = list(dict.fromkeys(missing))
            n = len(ids)
            ids.update(zip(fresh, range(n, n + len(fresh)), strict=True))
            self.fresh += fresh
            at[miss] = np.fromiter(map(ids.__getitem__, missing), np.int64, count=len(missing))
        at.flags.writeable = False  # kept in a memo, shared between sessions
        return at


def _hop_stats(r: redis.Redis, req: PaneRequest, cache: PaneCache | None) -> _HopStats:
    """The statistics of every entity of ``req`` over its panes, merged; one round trip.

    With a ``cache``, the leading panes that were final when last read come from cached
    roll-ups, and only the other panes are read; panes read and found final join a
    new roll-up (the partitions' watermarks are read in the same pipeline). Each reply's names
    are numbered and its values set aside as it arrives, while the store sends the next; then
    every value read is decoded at once, the roll-ups grow once by the new names and merge the
    panes read in one call each. The names of a read of open panes are kept in the cache for
    the next read of them (see :class:`NameMemo`).
    """
    nf = NF[req.kind]
    base = _cached_rollup(req, cache)
    todo = req.starts[len(base.starts) :] if req.parts else ()
    memo_key = ("names", *_rollup_key(req, todo))
    watch = req.parts if cache is not None else ()
    commands = [_resp(b"HGET", keys.progress_key(req.kind, p), Progress.WATERMARK) for p in watch]
    commands += [
        _resp(b"HGETALL", keys.window_key(req.kind, p, req.window, req.dim, s))
        for s in todo
        for p in req.parts
    ]
    numbering = _Numbering(base, cache.names(memo_key) if cache is not None else None)
    reader = _StatsReader(nf)
    rows: list[I64] = []  # entity of each value read
    sizes: list[int] = []  # values per pane read
    n_final = 0  # the leading panes read that are final (no event can still reach them)
    final_ids: dict[bytes, int] | None = None  # entities of the base and those panes
    replies = stream_raw(r, commands, ahead=_HOP_AHEAD)
    try:
        lowest: int | None = None
        if cache is not None and watch:
            marks = [_raw_int(next(replies)) for _ in watch]
            if all(m is not None for m in marks):
                lowest = min(m for m in marks if m is not None)
            reset = lowest is None or cache.observe(req.kind.value, lowest)
            if reset and base.starts:
                # the roll-up came from a cache that is stale now (a watermark went back, or
                # a progress hash is gone: the store was reset)
                cache.clear()
                replies.close()
                return _hop_stats(r, req, cache)
        if cache is not None and lowest is not None:
            while n_final < len(todo) and todo[n_final] + req.window.size_ms <= lowest:
                n_final += 1
        for i in range(len(todo)):
            first = len(reader.values)
            for _ in req.parts:
                names, values = _names_values(cast(HashReply, next(replies)))
                rows.append(numbering.rows(names))
                reader.add(values)
            sizes.append(len(reader.values) - first)
            if i == n_final - 1:
                final_ids = numbering.snapshot()
    finally:
        replies.close()  # unread replies (an error above) drop the connection
    memo = numbering.finish()
    if cache is not None and not n_final and todo:
        cache.put_names(memo_key, memo)  # the next read of the same open panes
    stats = reader.stats()
    at = _stack(rows)
    bounds = np.cumsum([0, *sizes]).tolist()
    fresh = np.asarray(numbering.fresh, dtype=object)
    split = len(final_ids) - base.rows if final_ids is not None else 0
    final = base.extended(fresh[:split], ids=final_ids)
    cut = bounds[n_final]
    if cache is not None and n_final:
        # cached alone (the next hopping window starts a pane later) and merged in a roll-up
        for s, lo, hi in zip(todo, bounds, bounds[1 : n_final + 1], strict=False):
            cache.put_rollup(_rollup_key(req, (s,)), final.one_pane(s, stats[lo:hi], at[lo:hi]))
        final = final.plus(todo[:n_final], stats[:cut], at[:cut])
        cache.put_rollup(_rollup_key(req, final.starts), final)
    total = final.extended(fresh[split:])
    if n_final < len(todo):
        total = total.plus(todo[n_final:], stats[cut:], at[cut:])
    return _HopStats(total, base.starts, at, reader.values)


def _stack(parts: Sequence[I64]) -> I64:
    """``parts`` one after the other."""
    return np.concatenate(parts) if parts else _NO_ROWS


def _sketches(r: redis.Redis, req: PaneRequest, hop: _HopStats, top: I64) -> packed.Table:
    """Row ``i``: entity ``top[i]`` of ``hop`` with its sketch, merged over every pane.

    Values read in this refresh come from those replies: the same state as the statistics
    that ranked the rows. Panes of a cached roll-up are final and cannot change: their values
    of just these entities are read again (HMGET, one round trip).
    """
    if top.size == 0:
        return packed.Table.empty(NF[req.kind])
    at = np.full(hop.rollup.rows, -1, dtype=np.int64)
    at[top] = np.arange(top.size, dtype=np.int64)
    mine = np.flatnonzero(at[hop.raw_rows] >= 0) if hop.raw_rows.size else _NO_ROWS
    rows = [at[hop.raw_rows[mine]]]
    values = [hop.raw_values[i] for i in mine.tolist()]
    fields = hop.rollup.names[top].tolist()
    commands = [
        _resp(b"HMGET", keys.window_key(req.kind, p, req.window, req.dim, s), *fields)
        for s in hop.cached
        for p in req.parts
    ]
    for reply in cast(list[list[bytes | None]], execute_raw(r, commands)):
        got = np.flatnonzero(np.fromiter((v is not None for v in reply), dtype=np.bool_))
        rows.append(got)
        values += [cast(bytes, reply[i]) for i in got.tolist()]
    table = packed.decode(values, NF[req.kind])
    return packed.merge(table, np.concatenate(rows), int(top.size))


def read_site_metrics(
    r: redis.Redis,
    topo: Topology,
    now_ms: int,
    view: SiteView = SiteView(),
    hop: HoppingWindow = keys.HOPPING_5M,
    cache: PaneCache | None = None,
) -> SiteMetrics:
    """Site x metric over the latest hopping window (5 min up to now): the view's top rows.

    Columns: ``site``, ``metric``, ``readings``, ``mean``, ``p95``, ``min``, ``max``; sorted by
    ``view.order_by`` (then site, then metric), at most ``view.limit`` rows of the ones that
    pass the filters. Every row's statistics are merged over partitions and panes without
    sketches (final panes once, into a cached roll-up); only the rows shown get their sketch
    merged for p95. Ordered by p95, rows get theirs while their bounds can still place them
    in the top rows: a p95 estimate lies between the sketch values of the row's min and max.
    """
    starts = hopping_pane_starts(hop, now_ms)
    parts = topo.partitions.get(EventKind.SENSOR, ())
    req = PaneRequest(EventKind.SENSOR, parts, hop.pane, Dim.SITE, tuple(starts), sketch=False)
    hs = _hop_stats(r, req, cache)
    stats, all_site, all_metric = hs.rollup.stats, hs.rollup.first, hs.rollup.second
    seen = stats[:, packed.COUNT] > 0
    choices = (
        hs.rollup.choices()
        if seen.all()
        else (
            tuple(sorted(set(all_site[seen].tolist()))),
            tuple(sorted(set(all_metric[seen].tolist()))),
        )
    )
    keep = seen.copy()
    if view.site is not None:
        keep &= all_site == view.site
    if view.metric is not None:
        keep &= all_metric == view.metric
    rows = np.flatnonzero(keep)
    s = stats[rows]
    column = {
        "readings": s[:, packed.COUNT],
        "mean": s[:, packed.SUM] / s[:, packed.COUNT],
        "min": s[:, packed.MIN],
        "max": s[:, packed.MAX],
    }
    sign = 1.0 if view.ascending else -1.0
    p95: dict[int, float] = {}  # exact p95 of the rows (positions in ``rows``) merged so far

    def merge_p95(at: I64) -> None:
        q = packed.quantiles(_sketches(r, req, hs, rows[at]), _SITE_QS)[:, 0]
        p95.update(zip(at.tolist(), q.tolist(), strict=True))

    if view.order_by == "p95":
        # The best key a row's p95 can have (bucket values grow with the value): merge the
        # sketches of the rows that can still beat the limit-th exact key, until none can.
        best = sign * sketches.bucket_values(
            sketches.bucket_codes(column["max"] if sign < 0 else column["min"])
        )
        todo = first_rows(best, view.limit)
        while todo.size:
            merge_p95(todo)
            done = np.fromiter(p95, dtype=np.int64, count=len(p95))
            exact = sign * np.fromiter(p95.values(), dtype=np.float64, count=len(p95))
            cut = np.partition(exact, min(view.limit, exact.size) - 1)[
                min(view.limit, exact.size) - 1
            ]
            open_ = np.ones(rows.size, dtype=np.bool_)
            open_[done] = False
            todo = (
                np.flatnonzero(open_ & (best <= cut))
                if exact.size >= view.limit
                else (np.flatnonzero(open_))
            )
        key = np.full(rows.size, np.inf)
        key[np.fromiter(p95, dtype=np.int64, count=len(p95))] = sign * np.fromiter(
            p95.values(), dtype=np.float64, count=len(p95)
        )
    else:
        key = sign * column[view.order_by]
    if view.order_by == "mean":
        # a sum's last bits depend on the order partitions and panes were merged in: equal
        # means must tie (and break by name) however they were summed
        mantissa, exponent = np.frexp(key)
        key = np.ldexp(np.round(mantissa * 2.0**40) / 2.0**40, exponent)
    top = first_rows(key, view.limit)
    site, metric = all_site[rows[top]], all_metric[rows[top]]
    order = np.lexsort((metric, site, np.where(np.isnan(key[top]), np.inf, key[top])))
    shown = top[order][: view.limit]
    missing = np.asarray([i for i in shown.tolist() if i not in p95], dtype=np.int64)
    if missing.size:
        merge_p95(missing)
    frame = pd.DataFrame(
        {
            "site": all_site[rows[shown]],
            "metric": all_metric[rows[shown]],
            "readings": np.rint(column["readings"][shown]).astype(np.int64),
            "mean": column["mean"][shown],
            "p95": np.asarray([p95[i] for i in shown.tolist()], dtype=np.float64),
            "min": column["min"][shown],
            "max": column["max"][shown],
        },
        columns=list(SITE_COLUMNS),
    )
    return SiteMetrics(
        rows=frame,
        matching=int(rows.size),
        total=int(np.count_nonzero(seen)),
        sites=choices[0],
        metrics=choices[1],
    )
