"""Vectorised per-batch aggregation into mergeable window deltas (pure numpy).

A partition's on-time events become, per tumbling window instance, dimension and entity: count,
sum, sum of squares, min, max, quantile-sketch bucket counts and (application logs) status-class
and error counts. Every one of these merges exactly with what the store already holds (adds, or
min/max), which is what lets a batch be applied as increments.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from pipeline import sketches, windows
from schemas import keys
from schemas.wire import AppLogRecord, SensorEvent

_CODE_SPAN = 1 << 24  # sketch codes of finite doubles fit well within +-2**23


@dataclass(slots=True)
class Columns:
    """A batch of on-time events as columns: the input of :func:`aggregate`."""

    event_times: npt.NDArray[np.int64]
    values: npt.NDArray[np.float64]
    # dim -> (entity code per event, entity names)
    entities: dict[str, tuple[npt.NDArray[np.int64], list[str]]]
    status_class: npt.NDArray[np.int64] | None = None  # 0..4 for 1xx..5xx (application logs)
    errors: npt.NDArray[np.float64] | None = None  # 1.0 where level is ERROR

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
        )


@dataclass(slots=True)
class WindowDelta:
    """Increments for one window instance and dimension.

    ``stats`` rows: ``[entity, n, sum, sumsq, min, max]``, for application logs followed by the
    five status-class counts and the error count. ``sketch`` rows: ``[entity, code, count, ...]``.
    """

    window: keys.TumblingWindow
    dim: str
    start_ms: int
    stats: list[list[object]] = field(default_factory=list)
    sketch: list[list[object]] = field(default_factory=list)


def _factorize(names: Sequence[str]) -> tuple[npt.NDArray[np.int64], list[str]]:
    index: dict[str, int] = {}
    codes = np.fromiter(
        (index.setdefault(n, len(index)) for n in names), dtype=np.int64, count=len(names)
    )
    return codes, list(index)


def sensor_columns(events: Sequence[SensorEvent]) -> Columns:
    """Columns of sensor readings: value statistics per device, site and metric."""
    metrics = [e.metric for e in events]
    sep = keys.ENTITY_SEP
    return Columns(
        np.fromiter((e.event_time for e in events), dtype=np.int64, count=len(events)),
        np.fromiter((e.value for e in events), dtype=np.float64, count=len(events)),
        {
            keys.Dim.DEVICE: _factorize([f"{e.device_id}{sep}{e.metric}" for e in events]),
            keys.Dim.SITE: _factorize([f"{e.site}{sep}{e.metric}" for e in events]),
            keys.Dim.METRIC: _factorize(metrics),
        },
    )


def applog_columns(events: Sequence[AppLogRecord]) -> Columns:
    """Columns of application log events: latency statistics per route, service and fleet."""
    sep = keys.ENTITY_SEP
    n = len(events)
    return Columns(
        np.fromiter((e.event_time for e in events), dtype=np.int64, count=n),
        np.fromiter((e.latency_ms for e in events), dtype=np.float64, count=n),
        {
            keys.Dim.ROUTE: _factorize([f"{e.service}{sep}{e.route}" for e in events]),
            keys.Dim.SERVICE: _factorize([e.service for e in events]),
            keys.Dim.FLEET: (np.zeros(n, dtype=np.int64), [keys.FLEET_ENTITY]),
        },
        status_class=np.fromiter((e.status_code // 100 - 1 for e in events), np.int64, count=n),
        errors=np.fromiter((e.level == "ERROR" for e in events), dtype=np.float64, count=n),
    )


def aggregate(
    cols: Columns, tumbling: Sequence[keys.TumblingWindow] = keys.TUMBLING_WINDOWS
) -> list[WindowDelta]:
    """Group a batch by window instance, dimension and entity, and compute the increments."""
    if len(cols) == 0:
        return []
    v = cols.values
    vsq = v * v
    codes = sketches.bucket_codes(v)
    out: list[WindowDelta] = []
    for window in tumbling:
        starts = windows.window_starts(cols.event_times, window.size_ms)
        uniq_starts, start_idx = np.unique(starts, return_inverse=True)
        for dim, (ent_codes, names) in cols.entities.items():
            out.extend(
                _aggregate_dim(
                    window, dim, uniq_starts, start_idx, ent_codes, names, v, vsq, codes, cols
                )
            )
    return out


def _aggregate_dim(
    window: keys.TumblingWindow,
    dim: str,
    uniq_starts: npt.NDArray[np.int64],
    start_idx: npt.NDArray[np.int64],
    ent_codes: npt.NDArray[np.int64],
    names: list[str],
    v: npt.NDArray[np.float64],
    vsq: npt.NDArray[np.float64],
    codes: npt.NDArray[np.int64],
    cols: Columns,
) -> list[WindowDelta]:
    n_names = len(names)
    group_keys, g = np.unique(start_idx * n_names + ent_codes, return_inverse=True)
    n_groups = group_keys.size
    count = np.bincount(g, minlength=n_groups)
    total = np.bincount(g, weights=v, minlength=n_groups)
    total_sq = np.bincount(g, weights=vsq, minlength=n_groups)
    order = np.argsort(g, kind="stable")
    first = np.concatenate(([0], np.cumsum(count)[:-1]))
    v_sorted = v[order]
    vmin = np.minimum.reduceat(v_sorted, first)
    vmax = np.maximum.reduceat(v_sorted, first)
    columns: list[Any] = [
        count.tolist(),
        total.tolist(),
        total_sq.tolist(),
        vmin.tolist(),
        vmax.tolist(),
    ]
    if cols.status_class is not None and cols.errors is not None:
        by_class = np.bincount(g * 5 + cols.status_class, minlength=n_groups * 5)
        columns.extend(by_class.reshape(n_groups, 5).T.tolist())
        columns.append(
            np.bincount(g, weights=cols.errors, minlength=n_groups).astype(np.int64).tolist()
        )
    group_start = (group_keys // n_names).tolist()
    group_name = [names[i] for i in (group_keys % n_names).tolist()]

    # Sketch buckets per group: unique (group, code) pairs, sorted by group then code.
    pair, pair_count = np.unique(
        g.astype(np.int64) * _CODE_SPAN + (codes + _CODE_SPAN // 2), return_counts=True
    )
    pair_group = (pair // _CODE_SPAN).tolist()
    pair_code = (pair % _CODE_SPAN - _CODE_SPAN // 2).tolist()
    pair_n = pair_count.tolist()

    deltas: dict[int, WindowDelta] = {}
    group_delta: list[WindowDelta] = []
    stat_rows = zip(group_name, *columns, strict=True)
    for s_idx, row in zip(group_start, stat_rows, strict=True):
        delta = deltas.get(s_idx)
        if delta is None:
            delta = deltas[s_idx] = WindowDelta(window, dim, int(uniq_starts[s_idx]))
        delta.stats.append(list(row))
        group_delta.append(delta)
    current = -1
    sk_row: list[object] = []
    for grp, code, n in zip(pair_group, pair_code, pair_n, strict=True):
        if grp != current:
            current = grp
            sk_row = [group_name[grp]]
            group_delta[grp].sketch.append(sk_row)
        sk_row.append(code)
        sk_row.append(n)
    return list(deltas.values())
