"""The expected aggregates of a run, computed from the generated events independently of the worker.

Mirrors the worker's rules: per (topic, partition) in production order, malformed records are dead
letters and leave the watermark alone; a valid event is late when the partition has seen a valid
event before and ``event_time < max_event_time_seen - allowed_lateness_ms``; every other event is
counted in each window instance that contains it. Statistics are plain numpy arithmetic over the
exact values (no sketches): quantiles are ``numpy.quantile(values, q, method="lower")``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import orjson

from loadgen.generator import (
    METRICS,
    AppLogColumns,
    Chunk,
    Episode,
    Fleet,
    GenConfig,
    SensorColumns,
)
from schemas.events import EventKind
from schemas.keys import (
    DIMS,
    FLEET_ENTITY,
    HOPPING_WINDOWS,
    TUMBLING_WINDOWS,
    Dim,
    Stat,
    entity,
)

FORMAT: Final = 1
QUANTILES: Final = (("p50", 0.5), ("p90", 0.9), ("p95", 0.95), ("p99", 0.99))

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]


def late_mask(
    partition: IntArray, event_time: IntArray, allowed_lateness_ms: int
) -> npt.NDArray[np.bool_]:
    """Which valid events (in production order) the worker treats as late."""
    late = np.zeros(len(event_time), dtype=bool)
    for q in np.unique(partition).tolist():
        idx = np.flatnonzero(partition == q)
        t = event_time[idx]
        # a late event never raises the max, so the max seen before i is the running max of t[:i]
        seen = np.maximum.accumulate(t)
        late_q = np.zeros(len(t), dtype=bool)
        late_q[1:] = t[1:] < seen[:-1] - allowed_lateness_ms
        late[idx] = late_q
    return late


def window_instances(
    event_time_sorted: IntArray, size_ms: int, advance_ms: int
) -> Iterator[tuple[int, int, int]]:
    """``(start, lo, hi)`` per window instance with events; ``lo:hi`` slices the sorted times."""
    if len(event_time_sorted) == 0:
        return
    first = int(event_time_sorted[0])
    last = int(event_time_sorted[-1])
    # earliest instance containing `first`: the advance boundary at or before first - size + 1
    s = first - size_ms + 1
    s += (-s) % advance_ms
    while s <= last:
        lo, hi = np.searchsorted(event_time_sorted, [s, s + size_ms], side="left").tolist()
        if hi > lo:
            yield s, lo, hi
        s += advance_ms


def group_stats(
    entities: IntArray,
    values: FloatArray,
    status: IntArray | None = None,
    error: npt.NDArray[np.bool_] | None = None,
) -> dict[int, dict[str, float | int]]:
    """STATS per entity code: n, sum, min, max, mean, std (ddof=0), quantiles (+ applog counts)."""
    order = np.lexsort((values, entities))
    ent = entities[order]
    v = values[order]
    starts = np.flatnonzero(np.r_[True, ent[1:] != ent[:-1]])
    ends = np.r_[starts[1:], len(ent)]
    n = ends - starts
    total = np.add.reduceat(v, starts)
    mean = total / n
    std = np.sqrt(np.add.reduceat((v - np.repeat(mean, n)) ** 2, starts) / n)
    cols: dict[str, list[Any]] = {
        Stat.COUNT: n.tolist(),
        Stat.SUM: total.tolist(),
        Stat.MIN: v[starts].tolist(),
        Stat.MAX: v[ends - 1].tolist(),
        "mean": mean.tolist(),
        "std": std.tolist(),
    }
    for name, q in QUANTILES:
        cols[name] = v[starts + np.floor((n - 1) * q).astype(np.int64)].tolist()
    if status is not None and error is not None:
        cls = status[order] // 100
        for c, label in enumerate(Stat.STATUS_CLASSES, start=1):
            cols[label] = np.add.reduceat((cls == c).astype(np.int64), starts).tolist()
        cols[Stat.ERRORS] = np.add.reduceat(error[order].astype(np.int64), starts).tolist()
    names = list(cols)
    rows = zip(*(cols[k] for k in names), strict=True)
    return {
        int(e): dict(zip(names, row, strict=True))
        for e, row in zip(ent[starts].tolist(), rows, strict=True)
    }


class TruthBuilder:
    """Accumulates the chunks of a run and computes its truth file."""

    def __init__(
        self, config: GenConfig, fleet: Fleet, episodes: Sequence[Episode], allowed_lateness_ms: int
    ) -> None:
        self.config = config
        self.fleet = fleet
        self.episodes = list(episodes)
        self.allowed_lateness_ms = allowed_lateness_ms
        self._sensor: list[SensorColumns] = []
        self._applog: list[AppLogColumns] = []
        self._dead = {
            EventKind.SENSOR: np.zeros(config.sensor_partitions, dtype=np.int64),
            EventKind.APPLOG: np.zeros(config.applog_partitions, dtype=np.int64),
        }

    def add(self, chunk: Chunk) -> None:
        """Take the valid events and dead-letter counts of the next chunk (in stream order)."""
        self._sensor.append(chunk.sensor)
        self._applog.append(chunk.applog)
        for kind, counts in chunk.dead.items():
            self._dead[kind] += counts

    def to_json(self) -> bytes:
        """The truth file's content."""
        cfg = self.config
        kinds = (EventKind.SENSOR, EventKind.APPLOG)
        sections = {kind: self._section(kind) for kind in kinds}
        summary = {k: v for k, v in sections[EventKind.SENSOR].items() if k != "windows"}
        doc: dict[str, Any] = {
            "format": FORMAT,
            "seed": cfg.seed,
            "start_ms": cfg.start_ms,
            "end_ms": cfg.end_ms,
            "rate": cfg.rate,
            "duration_s": cfg.duration_s,
            "devices": cfg.devices,
            "services": cfg.services,
            "partitions": {"sensor": cfg.sensor_partitions, "applog": cfg.applog_partitions},
            "allowed_lateness_ms": self.allowed_lateness_ms,
            "topics": {"sensor": cfg.sensor_topic, "applog": cfg.applog_topic},
        }
        for name in summary:
            doc[name] = {k.value: sections[k][name] for k in kinds}
        doc["windows"] = {k.value: sections[k]["windows"] for k in kinds}
        doc["anomalies"] = [e.as_truth() for e in self.episodes]
        return orjson.dumps(doc)

    def to_dict(self) -> dict[str, Any]:
        """The truth as plain Python objects."""
        result: dict[str, Any] = orjson.loads(self.to_json())
        return result

    def write(self, path: Path) -> None:
        """Write the truth file (atomically: a reader never sees half a file)."""
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(self.to_json())
        tmp.replace(path)

    def _section(self, kind: EventKind) -> dict[str, Any]:
        f = self.fleet
        status: IntArray | None = None
        error: npt.NDArray[np.bool_] | None = None
        if kind is EventKind.SENSOR:
            part, t, series, values = (
                _cat([getattr(c, name) for c in self._sensor], dt)
                for name, dt in (
                    ("partition", np.int64),
                    ("event_time", np.int64),
                    ("series", np.int64),
                    ("value", np.float64),
                )
            )
            metric = f.series_metric[series]
            site_metric = f.device_site[f.series_device[series]] * len(METRICS) + metric
            dims: dict[str, tuple[IntArray, Callable[[int], str]]] = {
                Dim.DEVICE: (series, f.series_entity),
                Dim.SITE: (
                    site_metric,
                    lambda c: entity(f.sites[c // len(METRICS)], METRICS[c % len(METRICS)].name),
                ),
                Dim.METRIC: (metric, lambda c: METRICS[c].name),
            }
            n_parts = self.config.sensor_partitions
        else:
            cols = self._applog
            part = _cat([c.partition for c in cols], np.int64)
            t = _cat([c.event_time for c in cols], np.int64)
            route = _cat([c.route for c in cols], np.int64)
            values = _cat([c.latency for c in cols], np.float64)
            status = _cat([c.status for c in cols], np.int64)
            error = _cat([c.error for c in cols], np.bool_)
            dims = {
                Dim.ROUTE: (route, f.route_entity),
                Dim.SERVICE: (f.route_service[route], lambda c: f.services[c]),
                Dim.FLEET: (np.zeros(len(route), dtype=np.int64), lambda _c: FLEET_ENTITY),
            }
            n_parts = self.config.applog_partitions
        assert tuple(dims) == DIMS[kind]

        late = late_mask(part, t, self.allowed_lateness_ms)
        dead = self._dead[kind]
        valid_pp = np.bincount(part, minlength=n_parts)
        late_pp = np.bincount(part[late], minlength=n_parts)
        events_pp = valid_pp - late_pp
        per_partition = {
            str(q): {
                "produced": int(valid_pp[q] + dead[q]),
                "events": int(events_pp[q]),
                "late": int(late_pp[q]),
                "dead": int(dead[q]),
            }
            for q in range(n_parts)
        }

        ok = ~late
        order = np.argsort(t[ok], kind="stable")
        t_ok = t[ok][order]
        v_ok = values[ok][order]
        st_ok = status[ok][order] if status is not None else None
        er_ok = error[ok][order] if error is not None else None
        codes_ok = {d: codes[ok][order] for d, (codes, _) in dims.items()}
        specs = [(w.name, w.size_ms, w.size_ms) for w in TUMBLING_WINDOWS]
        specs += [(w.name, w.size_ms, w.advance_ms) for w in HOPPING_WINDOWS]
        windows: dict[str, Any] = {}
        for name, size, advance in specs:
            per_dim: dict[str, dict[str, orjson.Fragment]] = {d: {} for d in dims}
            for start, lo, hi in window_instances(t_ok, size, advance):
                for d, (_, namer) in dims.items():
                    stats = group_stats(
                        codes_ok[d][lo:hi],
                        v_ok[lo:hi],
                        None if st_ok is None else st_ok[lo:hi],
                        None if er_ok is None else er_ok[lo:hi],
                    )
                    named = {namer(c): s for c, s in stats.items()}
                    # serialise each instance at once: keeps memory at JSON size for long runs
                    per_dim[d][str(start)] = orjson.Fragment(
                        orjson.dumps(dict(sorted(named.items())))
                    )
            windows[name] = per_dim
        return {
            "produced": int(valid_pp.sum() + dead.sum()),
            "events": int(events_pp.sum()),
            "late": int(late_pp.sum()),
            "dead": int(dead.sum()),
            "per_partition": per_partition,
            "windows": windows,
        }


def _cat(parts: list[Any], dtype: type) -> Any:
    return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype=dtype)
