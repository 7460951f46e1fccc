"""Vectorised per-batch aggregation into mergeable window deltas (pure numpy).

A partition's on-time events become, per tumbling window instance, dimension and entity: count,
sum, sum of squares, min, max, quantile-sketch bucket counts, (sensor readings) repeated readings
and the first and last reading in the batch's order, and (application logs) status-class and
error counts, as ``schemas.packed`` tables. Every one of these merges exactly, in the series'
order (``schemas.packed.follow``): the worker folds each batch into the open windows it owns
(``pipeline.state``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from pipeline import windows
from schemas import keys, packed
from schemas import sketch as sketches
from schemas.wire import AppLogRecord, SensorEvent


@dataclass(slots=True)
class Positions:
    """Where each sensor event was taken: its device (code into ``names``) and coordinates."""

    device: npt.NDArray[np.int64]
    names: list[str]
    lat: npt.NDArray[np.float64]
    lon: npt.NDArray[np.float64]

    def select(self, mask: npt.NDArray[np.bool_]) -> Positions:
        """The rows where ``mask`` is true."""
        return Positions(self.device[mask], self.names, self.lat[mask], self.lon[mask])


@dataclass(slots=True)
class Columns:
    """A batch of on-time events as columns: the input of :func:`aggregate`."""

    event_times: npt.NDArray[np.int64]
    values: npt.NDArray[np.float64]
    # dim -> (entity code per event, entity names)
    entities: dict[str, tuple[npt.NDArray[np.int64], list[str]]]
    status_class: npt.NDArray[np.int64] | None = None  # 0..4 for 1xx..5xx (application logs)
    errors: npt.NDArray[np.float64] | None = None  # 1.0 where level is ERROR
    partition: npt.NDArray[np.int64] | None = None  # per event, when it spans partitions
    positions: Positions | None = None  # sensor events: device and coordinates

    def __len__(self) -> int:
        return int(self.event_times.size)

    def select(self, mask: npt.NDArray[np.bool_]) -> Columns:
        """The rows where ``mask`` is true (entity names are kept as they are)."""
        return Columns(
            self.event_times[mask],
            self.values[mask],
            {d: (c[mask], names) for d, (c, names) in self.entities.items()},
            None if self.status_class is None else self.status_class[mask],
            None if self.errors is None else self.errors[mask],
            None if self.partition is None else self.partition[mask],
            None if self.positions is None else self.positions.select(mask),
        )


@dataclass(slots=True)
class WindowDelta:
    """One batch's contribution to one window instance and dimension.

    Row ``i`` of ``table`` is entity ``names[i]``: its statistics (``keys.Stat.PACKED_SENSOR``,
    for application logs ``PACKED_APPLOG``) and its sketch buckets, in ``schemas.packed`` form.
    """

    window: keys.TumblingWindow
    dim: str
    start_ms: int
    names: list[str]
    table: packed.Table
    partition: int = -1  # the partition, when the columns spanned partitions


# Which dimensions each tumbling window keeps: ((window, dims), ...).
WindowPlan = Sequence[tuple[keys.TumblingWindow, Sequence[str]]]


def _factorize(names: Sequence[str]) -> tuple[npt.NDArray[np.int64], list[str]]:
    index: dict[str, int] = {}
    codes = np.fromiter(
        (index.setdefault(n, len(index)) for n in names), dtype=np.int64, count=len(names)
    )
    return codes, list(index)


def concat_columns(parts: Sequence[Columns]) -> Columns:
    """Several partitions' columns (each tagged with its events' partitions) as one.

    A poll is then aggregated in one pass, not one per partition: the fixed cost per pass
    dominated small polls.
    """
    if len(parts) == 1:
        return parts[0]
    # Each part's entity codes are shifted past the previous parts' names: a name seen in two
    # parts gets two codes, which is right, as groups are per partition too.
    entities: dict[str, tuple[npt.NDArray[np.int64], list[str]]] = {}
    for dim in parts[0].entities:
        names: list[str] = []
        shifted = []
        for c in parts:
            codes, part_names = c.entities[dim]
            shifted.append(codes + len(names))
            names.extend(part_names)
        entities[dim] = (np.concatenate(shifted), names)
    status = [c.status_class for c in parts]
    errors = [c.errors for c in parts]
    tags = [c.partition for c in parts]
    if any(t is None for t in tags):
        raise ValueError("columns to concatenate must be tagged with their partitions")
    return Columns(
        np.concatenate([c.event_times for c in parts]),
        np.concatenate([c.values for c in parts]),
        entities,
        None if any(x is None for x in status) else np.concatenate(status),  # type: ignore[arg-type]
        None if any(x is None for x in errors) else np.concatenate(errors),  # type: ignore[arg-type]
        np.concatenate(tags),  # type: ignore[arg-type]
    )


def _pairs(
    a: tuple[npt.NDArray[np.int64], list[str]], b: tuple[npt.NDArray[np.int64], list[str]]
) -> tuple[npt.NDArray[np.int64], list[str]]:
    """The entity ``"<a>|<b>"`` of each event, from two factorized columns (names built once
    per distinct pair, not per event)."""
    (a_codes, a_names), (b_codes, b_names) = a, b
    nb = len(b_names)
    uniq, inv = np.unique(a_codes * nb + b_codes, return_inverse=True)
    sep = keys.ENTITY_SEP
    names = [f"{a_names[k // nb]}{sep}{b_names[k % nb]}" for k in uniq.tolist()]
    return inv.ravel().astype(np.int64), names


def sensor_columns(events: Sequence[SensorEvent]) -> Columns:
    """Columns of sensor readings: value statistics per device, site and metric."""
    n = len(events)
    metric = _factorize([e.metric for e in events])
    device = _factorize([e.device_id for e in events])
    return Columns(
        np.fromiter((e.event_time for e in events), dtype=np.int64, count=n),
        np.fromiter((e.value for e in events), dtype=np.float64, count=n),
        {
            keys.Dim.DEVICE: _pairs(device, metric),
            keys.Dim.SITE: _pairs(_factorize([e.site for e in events]), metric),
            keys.Dim.METRIC: metric,
        },
        positions=Positions(
            device[0],
            device[1],
            np.fromiter((e.lat for e in events), dtype=np.float64, count=n),
            np.fromiter((e.lon for e in events), dtype=np.float64, count=n),
        ),
    )


def applog_columns(events: Sequence[AppLogRecord]) -> Columns:
    """Columns of application log events: latency statistics per route, service and fleet."""
    n = len(events)
    service = _factorize([e.service for e in events])
    return Columns(
        np.fromiter((e.event_time for e in events), dtype=np.int64, count=n),
        np.fromiter((e.latency_ms for e in events), dtype=np.float64, count=n),
        {
            keys.Dim.ROUTE: _pairs(service, _factorize([e.route for e in events])),
            keys.Dim.SERVICE: service,
            keys.Dim.FLEET: (np.zeros(n, dtype=np.int64), [keys.FLEET_ENTITY]),
        },
        status_class=np.fromiter((e.status_code // 100 - 1 for e in events), np.int64, count=n),
        errors=np.fromiter((e.level == "ERROR" for e in events), dtype=np.float64, count=n),
    )


def aggregate(cols: Columns, plan: WindowPlan | None = None) -> list[WindowDelta]:
    """Group a batch by window instance, dimension and entity (every window and dimension of
    ``cols`` when ``plan`` is None; else only the planned dimensions each window keeps).

    Every (window, dimension) pair is grouped in one pass: each event gets one key per pair,
    the pairs' key ranges follow one another, and the sorted keys give every group with its
    events in batch order. A pass costs a fixed number of numpy calls plus the work per key;
    a pass per pair cost that fixed number once per pair, most of a small poll's
    aggregation.
    """
    if len(cols) == 0:
        return []
    if plan is None:
        plan = [(w, tuple(cols.entities)) for w in keys.TUMBLING_WINDOWS]
    n = len(cols)
    part = cols.partition if cols.partition is not None else np.zeros(n, dtype=np.int64)
    pairs: list[_Pair] = []
    chunks: list[npt.NDArray[np.int64]] = []
    offset = 0
    for window, dims in plan:
        kept = [d for d in dims if d in cols.entities]
        if not kept:
            continue
        starts = windows.window_starts(cols.event_times, window.size_ms)
        # a slot is a (partition, window start): the unit of a delta
        first = int(starts.min())
        span = (int(starts.max()) - first) // window.size_ms + 1
        uniq_slots, slot_idx = np.unique(
            part * span + (starts - first) // window.size_ms, return_inverse=True
        )
        slot_part = uniq_slots // span if cols.partition is not None else -np.ones_like(uniq_slots)
        slot_start = (uniq_slots % span) * window.size_ms + first
        slot_idx = slot_idx.ravel()
        for dim in kept:
            ent_codes, names = cols.entities[dim]
            pairs.append(_Pair(window, dim, slot_part, slot_start, names, offset))
            chunks.append(offset + slot_idx * len(names) + ent_codes)
            offset += uniq_slots.size * len(names)
    if not pairs:
        return []
    return _aggregate_pairs(pairs, np.concatenate(chunks), cols)


_ONE_SORT_MAX = 16_384  # keys up to which a pass merges every pair's buckets in one sort


@dataclass(frozen=True, slots=True)
class _Pair:
    """One (window, dimension) of an aggregation pass: its slots (partition and window start
    of each), its entities and where its keys begin (``offset + slot * len(names) +
    entity``)."""

    window: keys.TumblingWindow
    dim: str
    slot_part: npt.NDArray[np.int64]
    slot_start: npt.NDArray[np.int64]
    names: list[str]
    offset: int


def _aggregate_pairs(
    pairs: Sequence[_Pair], flat_keys: npt.NDArray[np.int64], cols: Columns
) -> list[WindowDelta]:
    """The deltas of every pair: ``flat_keys`` holds each pair's key of every event, one pair
    after the other (so key ``i`` is event ``i % len(cols)``)."""
    reps = len(pairs)
    n = len(cols)
    v = np.tile(cols.values, reps) if reps > 1 else cols.values
    # a stable sort gives the groups (as np.unique would) and each group's events in order;
    # the pairs' key ranges follow one another, so sorting each pair's keys on its own gives
    # the same order (and costs less than one sort of all of them for a large batch)
    order = np.concatenate(
        [np.argsort(flat_keys[i * n : (i + 1) * n], kind="stable") + i * n for i in range(reps)]
    )
    sorted_keys = flat_keys[order]
    new_group = np.ones(order.size, dtype=np.bool_)
    np.not_equal(sorted_keys[1:], sorted_keys[:-1], out=new_group[1:])
    group_keys = sorted_keys[new_group]
    g = np.empty(order.size, dtype=np.int64)
    g[order] = np.cumsum(new_group) - 1
    n_groups = group_keys.size
    count = np.bincount(g, minlength=n_groups)
    first = np.cumsum(count) - count
    v_sorted = v[order]
    status, errors = cols.status_class, cols.errors
    nf = packed.NF_APPLOG if status is not None and errors is not None else packed.NF_SENSOR
    stats = np.empty((n_groups, nf), dtype=np.float64)
    stats[:, packed.COUNT] = count
    stats[:, packed.SUM] = np.bincount(g, weights=v, minlength=n_groups)
    stats[:, packed.SUMSQ] = np.bincount(g, weights=v * v, minlength=n_groups)
    stats[:, packed.MIN] = np.minimum.reduceat(v_sorted, first)
    stats[:, packed.MAX] = np.maximum.reduceat(v_sorted, first)
    if status is not None and errors is not None:
        status, errors = (
            (np.tile(status, reps), np.tile(errors, reps)) if reps > 1 else (status, errors)
        )
        classes = len(keys.Stat.STATUS_CLASSES)
        by_class = np.bincount(g * classes + status, minlength=n_groups * classes)
        stats[:, packed.NF_BASE : packed.NF_BASE + classes] = by_class.reshape(n_groups, classes)
        stats[:, packed.NF_BASE + classes] = np.bincount(g, weights=errors, minlength=n_groups)
    else:
        # the series statistics: each group's readings in batch order (the sort is stable)
        g_sorted = g[order]
        repeats = (g_sorted[1:] == g_sorted[:-1]) & (v_sorted[1:] == v_sorted[:-1])
        stats[:, packed.REPEATS] = np.bincount(g_sorted[1:], weights=repeats, minlength=n_groups)
        stats[:, packed.FIRST] = v_sorted[first]
        stats[:, packed.LAST] = v_sorted[first + count - 1]

    # Sketch buckets per group: unique (group, code) pairs, sorted by group then code.
    # (one call for a small batch; per pair for a large one, where sorting each pair's
    # buckets on its own costs less: a pair's groups follow the previous pair's)
    codes = sketches.bucket_codes(cols.values)
    ones = np.ones(n, dtype=np.int64)
    if reps == 1 or g.size > _ONE_SORT_MAX:
        merged = [packed.merge_buckets(g[i * n : (i + 1) * n], codes, ones) for i in range(reps)]
        bucket_row, bucket_code, bucket_count = (
            np.concatenate(c) for c in zip(*merged, strict=True)
        )
    else:
        bucket_row, bucket_code, bucket_count = packed.merge_buckets(
            g, np.tile(codes, reps), np.tile(ones, reps)
        )
    # Each pair's groups are one slice of the sorted keys, and within it each slot's are
    # one slice: a delta per (pair, slot), in the order of the pairs and their slots.
    out: list[WindowDelta] = []
    pair_at = np.searchsorted(group_keys, [p.offset for p in pairs])
    pair_end = np.append(pair_at[1:], n_groups)
    for p, a0, a1 in zip(pairs, pair_at.tolist(), pair_end.tolist(), strict=True):
        if a0 == a1:
            continue
        n_names = len(p.names)
        local = group_keys[a0:a1] - p.offset
        group_slot = local // n_names
        group_name = local % n_names
        bounds = np.flatnonzero(group_slot[1:] != group_slot[:-1]) + 1 + a0
        lo = np.concatenate(([a0], bounds))
        hi = np.concatenate((bounds, [a1]))
        b_lo = np.searchsorted(bucket_row, lo)
        b_hi = np.searchsorted(bucket_row, hi)
        names = p.names
        for a, b, ba, bb in zip(
            lo.tolist(), hi.tolist(), b_lo.tolist(), b_hi.tolist(), strict=True
        ):
            table = packed.Table(
                stats[a:b], bucket_row[ba:bb] - a, bucket_code[ba:bb], bucket_count[ba:bb]
            )
            ents = [names[i] for i in group_name[a - a0 : b - a0].tolist()]
            slot = int(group_slot[a - a0])
            out.append(
                WindowDelta(
                    p.window, p.dim, int(p.slot_start[slot]), ents, table,
                    partition=int(p.slot_part[slot]),
                )
            )  # fmt: skip
    return out
