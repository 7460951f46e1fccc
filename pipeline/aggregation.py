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
    ``cols`` when ``plan`` is None; else only the planned dimensions each window keeps)."""
    if len(cols) == 0:
        return []
    if plan is None:
        plan = [(w, tuple(cols.entities)) for w in keys.TUMBLING_WINDOWS]
    v = cols.values
    vsq = v * v
    codes = sketches.bucket_codes(v)
    out: list[WindowDelta] = []
    for window, dims in plan:
        kept = [d for d in dims if d in cols.entities]
        if not kept:
            continue
        starts = windows.window_starts(cols.event_times, window.size_ms)
        # a slot is a (partition, window start): the unit of a delta
        first = int(starts.min())
        span = (int(starts.max()) - first) // window.size_ms + 1
        part = cols.partition if cols.partition is not None else np.zeros_like(starts)
        uniq_slots, slot_idx = np.unique(
            part * span + (starts - first) // window.size_ms, return_inverse=True
        )
        slot_part = uniq_slots // span if cols.partition is not None else -np.ones_like(uniq_slots)
        slot_start = (uniq_slots % span) * window.size_ms + first
        for dim in kept:
            ent_codes, names = cols.entities[dim]
            out.extend(
                _aggregate_dim(
                    window, dim, (slot_part, slot_start), slot_idx.ravel(), ent_codes, names,
                    codes, cols, vsq,
                )
            )  # fmt: skip
    return out


def _aggregate_dim(
    window: keys.TumblingWindow,
    dim: str,
    slots: tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]],
    start_idx: npt.NDArray[np.int64],
    ent_codes: npt.NDArray[np.int64],
    names: list[str],
    codes: npt.NDArray[np.int64],
    cols: Columns,
    vsq: npt.NDArray[np.float64],
) -> list[WindowDelta]:
    v = cols.values
    n_names = len(names)
    # one stable sort gives the groups (as np.unique would) and each group's events in order
    flat_keys = start_idx * n_names + ent_codes
    order = np.argsort(flat_keys, kind="stable")
    sorted_keys = flat_keys[order]
    new_group = np.ones(order.size, dtype=np.bool_)
    np.not_equal(sorted_keys[1:], sorted_keys[:-1], out=new_group[1:])
    group_keys = sorted_keys[new_group]
    g = np.empty(order.size, dtype=np.int64)
    g[order] = np.cumsum(new_group) - 1
    n_groups = group_keys.size
    count = np.bincount(g, minlength=n_groups)
    first = np.concatenate(([0], np.cumsum(count)[:-1]))
    v_sorted = v[order]
    columns = [
        count.astype(np.float64),
        np.bincount(g, weights=v, minlength=n_groups),
        np.bincount(g, weights=vsq, minlength=n_groups),
        np.minimum.reduceat(v_sorted, first),
        np.maximum.reduceat(v_sorted, first),
    ]
    if cols.status_class is not None and cols.errors is not None:
        by_class = np.bincount(g * 5 + cols.status_class, minlength=n_groups * 5)
        columns.extend(by_class.reshape(n_groups, 5).T.astype(np.float64))
        columns.append(np.bincount(g, weights=cols.errors, minlength=n_groups))
    else:
        # the series statistics: each group's readings in batch order (the sort is stable)
        g_sorted = g[order]
        repeats = (g_sorted[1:] == g_sorted[:-1]) & (v_sorted[1:] == v_sorted[:-1])
        columns.append(np.bincount(g_sorted[1:], weights=repeats, minlength=n_groups))
        columns.append(v_sorted[first])
        columns.append(v_sorted[first + count - 1])
    stats = np.column_stack(columns)
    group_start = group_keys // n_names
    group_name = group_keys % n_names

    # Sketch buckets per group: unique (group, code) pairs, sorted by group then code.
    bucket_row, bucket_code, bucket_count = packed.merge_buckets(
        g.astype(np.int64), codes, np.ones(g.size, dtype=np.int64)
    )
    # Groups are sorted by window start: each start's groups (and buckets) are one slice.
    bounds = np.flatnonzero(np.diff(group_start)) + 1
    lo = np.concatenate(([0], bounds))
    hi = np.concatenate((bounds, [n_groups]))
    b_lo = np.searchsorted(bucket_row, lo)
    b_hi = np.searchsorted(bucket_row, hi)
    out: list[WindowDelta] = []
    for a, b, ba, bb in zip(lo.tolist(), hi.tolist(), b_lo.tolist(), b_hi.tolist(), strict=True):
        table = packed.Table(
            stats[a:b], bucket_row[ba:bb] - a, bucket_code[ba:bb], bucket_count[ba:bb]
        )
        ents = [names[i] for i in group_name[a:b].tolist()]
        slot = group_start[a]
        out.append(
            WindowDelta(
                window, dim, int(slots[1][slot]), ents, table, partition=int(slots[0][slot])
            )
        )
    return out
