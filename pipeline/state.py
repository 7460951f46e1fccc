"""Partition state checkpointed with its offset: the open windows a worker owns.

A worker owns the open window instances of the partitions it is assigned. Each batch is folded
into them in numpy, and the apply writes the touched entities' *absolute* packed values
(``schemas.packed``) together with the partition's offset, in one atomic call. The store's work
then grows with the distinct (entity, window) pairs a poll touches, not with its events.

The state is a pure function of the store at the partition's applied offset: on assignment (or
after any doubt: a conflict, a lost connection) it is dropped and restored from the store, from
the window instances that may still change (those ending after the stored watermark). Once the
watermark passes a window's end no on-time event can reach it, so it is evicted.

Other per-partition state (the anomaly detectors) follows the same shape: ``restore_keys`` →
``restore`` → ``absorb`` (returns :class:`HashWrite` s) → ``evict``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np
import numpy.typing as npt

from pipeline import windows
from pipeline.aggregation import WindowDelta, WindowPlan
from schemas import keys, packed
from schemas.events import EventKind

_SPAN = 1 << 24  # bucket key = row * _SPAN + code + _SPAN // 2 (codes lie within +-2**18)
_HALF = _SPAN // 2


@dataclass(frozen=True, slots=True)
class HashWrite:
    """Fields to set in one store hash, and the hash's absolute expiry (Unix seconds)."""

    key: str
    expire_at_s: int
    fields: list[str]
    values: list[bytes]
    replace: bool = False  # the hash becomes exactly these fields (else they are set in it)


# (partition, window name, dim, start ms): one window instance of a partition
Instance = tuple[int, str, str, int]


class OpenRows:
    """Open window values as one table: a row per (window instance, entity) with its
    statistics, and every row's sketch buckets in one sorted array.

    One table for all of a partition's open instances, so a batch costs a fixed number of
    numpy calls, whatever the number of windows and dimensions it touches. Released rows are
    reused by new keys (no renumbering: eviction costs what it evicts, not what stays).
    """

    __slots__ = ("_bcount", "_bkey", "_free", "_index", "_size", "_stats", "nf")

    def __init__(self, nf: int) -> None:
        self.nf = nf
        # instance -> entity -> row, in the order the entities were added
        self._index: dict[Instance, dict[str, int]] = {}
        self._size = 0  # rows ever used: free or held
        self._free: list[int] = []
        self._stats = np.zeros((0, nf), dtype=np.float64)
        self._bkey = np.zeros(0, dtype=np.int64)  # row * _SPAN + code + _HALF, sorted
        self._bcount = np.zeros(0, dtype=np.int64)

    def __len__(self) -> int:
        return self._size - len(self._free)

    def instances(self) -> list[Instance]:
        """The instances held."""
        return list(self._index)

    def members(self, ik: Instance) -> tuple[list[str], list[int]]:
        """An instance's entities and their rows, in the order they were added."""
        index = self._index.get(ik, {})
        return list(index), list(index.values())

    def _rows(
        self, groups: Sequence[tuple[Instance, Sequence[str]]]
    ) -> tuple[npt.NDArray[np.int64], list[list[int]]]:
        """The row of each (instance, entity), in order, adding the new ones; each group's new
        rows."""
        rows: list[int] = []
        fresh: list[list[int]] = []
        for ik, names in groups:
            n = len(names)
            index = self._index.get(ik)
            if index is None:
                # a new instance (every window instance begins so): all its names are new,
                # taken in bulk (per-name bookkeeping was most of the cost of short windows)
                new = self._take(n)
                index = dict(zip(names, new, strict=True))
                if len(index) == n:
                    self._index[ik] = index
                    rows += new
                    fresh.append(new)
                    continue
                self._grow(self._size)
                self._release_rows(new)  # a name given twice: one at a time, below
                index = self._index[ik] = {}
            # one dict per instance: names are looked up by their (cached) string hash, with no
            # key tuple built per entity (that was a fifth of a poll's fold); plain lists, as
            # most of a small poll's groups hold a few names (a numpy call each cost more)
            mine: list[int | None] = list(map(index.get, names))
            added: list[int] = []
            if None in mine:
                # the new names in order of first appearance (a name given twice takes one
                # row), their rows taken at once: a small poll brings many
                missing = [i for i, row in enumerate(mine) if row is None]
                first = dict.fromkeys(names[i] for i in missing)
                added = self._take(len(first))
                index.update(zip(first, added, strict=True))
                for i in missing:
                    mine[i] = index[names[i]]
            rows += cast(list[int], mine)  # (no None is left)
            fresh.append(added)
        if any(fresh):
            self._grow(self._size)
        return np.fromiter(rows, dtype=np.int64, count=len(rows)), fresh

    def _take(self, count: int) -> list[int]:
        """``count`` rows: free ones first (last freed first), then new ones."""
        k = min(count, len(self._free))
        taken = self._free[len(self._free) - k :][::-1]
        del self._free[len(self._free) - k :]
        first, self._size = self._size, self._size + count - k
        taken.extend(range(first, self._size))
        return taken

    def _grow(self, rows: int) -> None:
        have = self._stats.shape[0]
        if rows <= have:
            return
        more = np.zeros((max(rows, 2 * have) - have, self.nf), dtype=np.float64)
        more[:, packed.MIN] = np.inf
        more[:, packed.MAX] = -np.inf
        self._stats = np.concatenate((self._stats, more))

    def absorb(
        self, groups: Sequence[tuple[Instance, Sequence[str]]], table: packed.Table
    ) -> tuple[npt.NDArray[np.int64], list[list[int]]]:
        """Fold rows in, after what the rows hold (the rows of ``table`` are each group's
        entities in turn, unique within a group): their rows, each group's new rows."""
        rows, fresh = self._rows(groups)
        s = self._stats
        d = table.stats
        s[rows] = packed.follow(s[rows], d)
        self._add_buckets(rows[table.row] * _SPAN + (table.code + _HALF), table.count)
        return rows, fresh

    def _add_buckets(self, new: npt.NDArray[np.int64], counts: npt.NDArray[np.int64]) -> None:
        order = np.argsort(new, kind="stable")
        new, counts = new[order], counts[order]
        pos = np.searchsorted(self._bkey, new)
        found = pos < self._bkey.size
        found[found] = self._bkey[pos[found]] == new[found]
        self._bcount[pos[found]] += counts[found]
        fresh = ~found
        if fresh.any():
            self._bkey = np.insert(self._bkey, pos[fresh], new[fresh])
            self._bcount = np.insert(self._bcount, pos[fresh], counts[fresh])

    def table(self, rows: npt.NDArray[np.int64], sketches: bool = True) -> packed.Table:
        """The given rows (in that order) as a table; with no sketch buckets unless
        ``sketches``."""
        if not sketches:
            z = np.zeros(0, dtype=np.int64)
            return packed.Table(self._stats[rows].copy(), z, z.copy(), z.copy())
        lo = np.searchsorted(self._bkey, rows * _SPAN)
        hi = np.searchsorted(self._bkey, (rows + 1) * _SPAN)
        k = hi - lo
        idx = np.repeat(lo - (np.cumsum(k) - k), k) + np.arange(int(k.sum()), dtype=np.int64)
        return packed.Table(
            self._stats[rows].copy(),
            np.repeat(np.arange(rows.size, dtype=np.int64), k),
            self._bkey[idx] % _SPAN - _HALF,
            self._bcount[idx].copy(),
        )

    def release(self, instances: Iterable[Instance]) -> None:
        """Free whole ``instances``: their entities are forgotten, their rows cleared for
        reuse."""
        rows: list[int] = []
        for ik in instances:
            rows.extend(self._index.pop(ik, {}).values())
        self._release_rows(rows)

    def _release_rows(self, rows: Sequence[int]) -> None:
        if not rows:
            return
        idx = np.asarray(rows, dtype=np.int64)
        self._free.extend(rows)
        self._stats[idx] = 0.0
        self._stats[idx, packed.MIN] = np.inf
        self._stats[idx, packed.MAX] = -np.inf
        gone = np.zeros(self._size, dtype=np.bool_)
        gone[idx] = True
        kept = ~gone[self._bkey // _SPAN]
        self._bkey = self._bkey[kept]
        self._bcount = self._bcount[kept]


@dataclass(frozen=True, slots=True)
class Retention:
    """How long window keys live after their window ends, per tumbling window name."""

    seconds: Mapping[str, int]

    def expire_at_s(self, window: keys.TumblingWindow, start_ms: int) -> int:
        """Absolute expiry (Unix seconds) of a window instance's key."""
        return (start_ms + window.size_ms) // 1000 + self.seconds[window.name]


InstanceKey = tuple[str, str, int]  # (window name, dim, start ms)


class KindWindows:
    """The open window instances of one event kind's partitions, in one table.

    Every partition's rows live in one :class:`OpenRows` (a row is keyed by its partition,
    instance and entity), so a poll is folded in and encoded with a fixed number of numpy calls
    for all its partitions together: per-partition calls were most of a small poll's cost.
    Each partition is still restored, evicted and dropped on its own.
    """

    def __init__(self, kind: EventKind, plan: WindowPlan) -> None:
        self.kind = kind
        self.plan = [(w, tuple(d for d in dims if d in keys.DIMS[kind])) for w, dims in plan]
        self.nf = packed.NF_APPLOG if kind is EventKind.APPLOG else packed.NF_SENSOR
        self._windows = {w.name: w for w, _ in self.plan}
        self._sizes = {w.name: w.size_ms for w, _ in self.plan}
        self._rows = OpenRows(self.nf)
        # per open instance of a bundled dim: the fields its hash in the store holds (bundles,
        # or entities of an earlier release; one is a whole instance already, not sealed
        # again) and the packed value last written of each entity (what the hash resolves
        # to: a seal joins them, encoding nothing again)
        self._written: dict[Instance, tuple[int, dict[str, bytes]]] = {}
        # partition -> instance -> entities held
        self.open: dict[int, dict[InstanceKey, int]] = {}

    def restore_keys(self, partition: int, max_event_time: int, watermark: int | None) -> list[str]:
        """Keys of a partition's window instances that may still change after its offset."""
        if watermark is None or max_event_time == windows.NO_EVENT_YET:
            return []
        out: list[str] = []
        for window, dims in self.plan:
            for start in _open_starts(window, max_event_time, watermark):
                out.extend(keys.window_key(self.kind, partition, window, d, start) for d in dims)
        return out

    def restore(self, partition: int, hashes: Mapping[str, Mapping[bytes, bytes]]) -> None:
        """Replace a partition's rows with stored values (``key -> {entity: packed value}``).

        Raises :class:`schemas.packed.PackedError` when a stored value is malformed.
        """
        self.drop(partition)
        groups: list[tuple[Instance, list[str]]] = []
        tables: list[packed.Table] = []
        for key, stored in hashes.items():
            if not stored:
                continue
            _, _, wname, dim, start = keys.parse_window_key(key)
            try:
                fields = packed.entity_values(stored)
                names = [f.decode() for f in fields]
                table = packed.decode(list(fields.values()), self.nf)
            except ValueError as exc:  # PackedError, or a field name that is not UTF-8
                raise packed.PackedError(f"stored window {key}: {exc}") from None
            bad = [f"{names[r]} {what}" for what, rs in packed.problems(table) for r in rs]
            if bad:
                raise packed.PackedError(f"stored window {key}: {'; '.join(bad)}")
            groups.append(((partition, wname, dim, start), names))
            tables.append(table)
            window = self._windows.get(wname)
            if window is not None and keys.bundled(window, dim):
                latest = dict(zip(names, fields.values(), strict=True))
                self._written[(partition, wname, dim, start)] = (len(stored), latest)
        if tables:
            self._absorb(groups, packed.concat(tables))

    def _absorb(
        self, groups: Sequence[tuple[Instance, Sequence[str]]], table: packed.Table
    ) -> npt.NDArray[np.int64]:
        rows, fresh = self._rows.absorb(groups, table)
        for (ik, _), new in zip(groups, fresh, strict=True):
            if new:
                held = self.open.setdefault(ik[0], {})
                held[ik[1:]] = held.get(ik[1:], 0) + len(new)
        return rows

    def absorb(
        self, deltas: Sequence[WindowDelta], retention: Retention, partition: int | None = None
    ) -> dict[int, list[HashWrite]]:
        """Fold deltas in (each of ``delta.partition``, or all of ``partition`` when given);
        per partition, the absolute values of every entity they touched."""
        return self.absorb_values(deltas, retention, partition)[0]

    def absorb_values(
        self,
        deltas: Sequence[WindowDelta],
        retention: Retention,
        partition: int | None = None,
        bundle_at: Mapping[int, int] | None = None,
    ) -> tuple[dict[int, list[HashWrite]], packed.Table]:
        """:meth:`absorb`, and the touched entities' absolute values as one table (the
        deltas' rows, in order). With ``bundle_at`` (partition -> the offset its apply ends
        at), the instances of ``keys.bundled`` dims are written as one bundle each."""
        if not deltas:
            return {}, packed.Table.empty(self.nf)
        parts = [partition if partition is not None else d.partition for d in deltas]
        groups = [
            ((p, d.window.name, d.dim, d.start_ms), d.names)
            for p, d in zip(parts, deltas, strict=True)
        ]
        rows = self._absorb(groups, packed.concat([d.table for d in deltas]))
        table = self._rows.table(rows)
        values = packed.encode(table)  # one encode for every partition
        out: dict[int, list[HashWrite]] = {}
        at = 0
        for p, d in zip(parts, deltas, strict=True):
            n = len(d.names)
            names, mine = list(d.names), values[at : at + n]
            if bundle_at is not None and keys.bundled(d.window, d.dim):
                ik = (p, d.window.name, d.dim, d.start_ms)
                count, latest = self._written.get(ik, (0, {}))
                latest.update(zip(names, mine, strict=True))
                self._written[ik] = (count + 1, latest)
                mine = [packed.encode_bundle(names, mine, self.nf)]
                names = [keys.bundle_field(bundle_at[p])]
            out.setdefault(p, []).append(
                HashWrite(
                    keys.window_key(self.kind, p, d.window, d.dim, d.start_ms),
                    retention.expire_at_s(d.window, d.start_ms),
                    names,
                    mine,
                )
            )
            at += n
        return out, table

    def seal(
        self,
        watermarks: Mapping[int, int | None],
        retention: Retention,
        bundle_at: Mapping[int, int],
    ) -> dict[int, list[HashWrite]]:
        """Per partition, the instances of ``keys.bundled`` dims its watermark closes whose
        hash holds more than one field, each written once more as one bundle of all its
        entities that replaces the hash: a closed instance keeps one value per entity, not
        every apply's."""
        out: dict[int, list[HashWrite]] = {}
        for p, wm in watermarks.items():
            if wm is None:
                continue
            for wname, dim, start in self.open.get(p, ()):
                window = self._windows[wname]
                if start + window.size_ms > wm or not keys.bundled(window, dim):
                    continue
                count, latest = self._written.get((p, wname, dim, start), (0, {}))
                if count <= 1:
                    continue  # written whole, by one apply
                names, values = list(latest), list(latest.values())
                out.setdefault(p, []).append(
                    HashWrite(
                        keys.window_key(self.kind, p, window, dim, start),
                        retention.expire_at_s(window, start),
                        [keys.bundle_field(bundle_at[p])],
                        [packed.encode_bundle(names, values, self.nf)],
                        replace=True,
                    )
                )
        return out

    def closing(
        self,
        watermarks: Mapping[int, int | None],
        window: keys.TumblingWindow,
        dim: str,
        sketches: bool = True,
    ) -> dict[int, list[tuple[int, list[str], packed.Table]]]:
        """Per partition, the ``window``/``dim`` instances its watermark closes (the next
        :meth:`evict` drops them), oldest first: (start, entities, their final values; their
        statistics only, with no sketch buckets, unless ``sketches``)."""
        out: dict[int, list[tuple[int, list[str], packed.Table]]] = {}
        for p, wm in sorted(watermarks.items()):
            if wm is None:
                continue
            starts = sorted(
                start
                for wname, d, start in self.open.get(p, ())
                if wname == window.name and d == dim and start + window.size_ms <= wm
            )
            for start in starts:
                names, rows = self._rows.members((p, window.name, dim, start))
                if rows:
                    table = self._rows.table(np.asarray(rows, dtype=np.int64), sketches)
                    out.setdefault(p, []).append((start, names, table))
        return out

    def evict(self, watermarks: Mapping[int, int | None]) -> int:
        """Drop the instances each partition's watermark has passed (no on-time event can
        reach them); the number of instances dropped."""
        done: set[Instance] = set()
        for p, wm in watermarks.items():
            if wm is None:
                continue
            done.update(
                (p, *ik) for ik in self.open.get(p, ()) if ik[2] + self._sizes.get(ik[0], 0) <= wm
            )
        self._discard(done)
        return len(done)

    def drop(self, partition: int) -> None:
        """Forget a partition's rows (before a restore, or when its state is in doubt)."""
        self._discard({(partition, *ik) for ik in self.open.get(partition, ())})
        self.open.pop(partition, None)

    def _discard(self, instances: set[Instance]) -> None:
        if not instances:
            return
        self._rows.release(instances)
        for p, wname, dim, start in instances:
            self.open[p].pop((wname, dim, start), None)
            self._written.pop((p, wname, dim, start), None)

    def entities(self, partition: int) -> int:
        """Entity values held for a partition, over its open instances."""
        return sum(self.open.get(partition, {}).values())

    def values(self, partition: int) -> dict[InstanceKey, dict[str, bytes]]:
        """A partition's open instances' packed values by entity (what the store's hashes
        resolve to, ``packed.entity_values``)."""
        mine = [
            (ik[1:], self._rows.members(ik)) for ik in self._rows.instances() if ik[0] == partition
        ]
        rows = [r for _, (_, rs) in mine for r in rs]
        encoded = iter(packed.encode(self._rows.table(np.asarray(rows, dtype=np.int64))))
        out: dict[InstanceKey, dict[str, bytes]] = {}
        for ik, (names, _) in mine:
            if names:
                out[ik] = {name: next(encoded) for name in names}
        return out


class WindowState:
    """The open window instances of one partition: a view of its kind's :class:`KindWindows`
    (shared with the kind's other partitions, or its own)."""

    def __init__(
        self,
        kind: EventKind,
        partition: int,
        plan: WindowPlan,
        shared: KindWindows | None = None,
    ) -> None:
        self.kind = kind
        self.partition = partition
        self.table = shared if shared is not None else KindWindows(kind, plan)
        self.plan = self.table.plan

    def restore_keys(self, max_event_time: int, watermark: int | None) -> list[str]:
        """Keys of the window instances that may still change after the stored offset."""
        return self.table.restore_keys(self.partition, max_event_time, watermark)

    def restore(self, hashes: Mapping[str, Mapping[bytes, bytes]]) -> None:
        """Load stored window values (``key -> {entity: packed value}``, from restore_keys).

        Raises :class:`schemas.packed.PackedError` when a stored value is malformed.
        """
        self.table.restore(self.partition, hashes)

    def absorb(self, deltas: Sequence[WindowDelta], retention: Retention) -> list[HashWrite]:
        """Fold a batch's deltas in; the absolute values of every entity they touched."""
        return self.table.absorb(deltas, retention, self.partition).get(self.partition, [])

    def evict(self, watermark: int | None) -> int:
        """Drop the instances the watermark has passed (no on-time event can reach them)."""
        return self.table.evict({self.partition: watermark})

    @property
    def open(self) -> dict[InstanceKey, int]:
        """Open instance -> entities held."""
        return self.table.open.get(self.partition, {})

    @property
    def entities(self) -> int:
        """Entity values held, over every open instance."""
        return self.table.entities(self.partition)

    def values(self) -> dict[InstanceKey, dict[str, bytes]]:
        """Every open instance's packed values by entity (what the store holds for them)."""
        return self.table.values(self.partition)


def _open_starts(window: keys.TumblingWindow, max_event_time: int, watermark: int) -> list[int]:
    """Starts of the instances ending after ``watermark`` that hold times <= max_event_time."""
    first = keys.window_start(watermark, window)
    last = keys.window_start(max_event_time, window)
    return [s for s in range(first, last + 1, window.size_ms) if s + window.size_ms > watermark]
