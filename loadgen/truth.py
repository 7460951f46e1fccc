"""The expected aggregates of a run, computed from the generated events independently of the worker.

Mirrors the worker's rules: per (topic, partition) in production order, malformed records are dead
letters and leave the watermark alone; a valid event is late when the partition has seen a valid
event before and ``event_time < max_event_time_seen - allowed_lateness_ms``; every other event is
counted in each window instance that contains it. Statistics are plain numpy arithmetic over the
exact values (no sketches): quantiles are ``numpy.quantile(values, q, method="lower")``.

The truth also holds the expected leaderboards (``schemas.keys.BOARDS``) the worker keeps per
partition and ``1m`` window instance, for the boards whose scores follow from the events alone
(not the anomaly boards): ``boards[kind][partition][start][board] = {member: score}``. Counts
are whole numbers, maxima the exact readings, p99 ``numpy.quantile(..., method="lower")`` over
the partition's own events (what its sketch estimates); an errors board lists every member
with requests (0 when it had no errors). Older truth files have no ``boards``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
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
from schemas import truth as truth_contract
from schemas.events import EventKind
from schemas.keys import (
    BOARD_WINDOW,
    DIMS,
    FLEET_ENTITY,
    HOPPING_WINDOWS,
    TUMBLING_WINDOWS,
    Board,
    Dim,
    Stat,
    entity,
)

FORMAT: Final = truth_contract.FORMAT
QUANTILES: Final = (("p50", 0.5), ("p90", 0.9), ("p95", 0.95), ("p99", 0.99))
BOARD_P99: Final = 0.99

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
        summary = {
            k: v for k, v in sections[EventKind.SENSOR].items() if k not in ("windows", "boards")
        }
        doc: dict[str, Any] = {
            "format": FORMAT,
            "seed": cfg.seed,
            "start_ms": cfg.start_ms,
            "end_ms": cfg.end_ms,
            "rate": cfg.rate,
            "duration_s": cfg.duration_s,
            "devices": cfg.devices,
            "services": cfg.services,
            "anomaly_after_s": cfg.anomaly_after_s,
            "partitions": {"sensor": cfg.sensor_partitions, "applog": cfg.applog_partitions},
            "allowed_lateness_ms": self.allowed_lateness_ms,
            "topics": {"sensor": cfg.sensor_topic, "applog": cfg.applog_topic},
        }
        for name in summary:
            doc[name] = {k.value: sections[k][name] for k in kinds}
        doc["windows"] = {k.value: sections[k]["windows"] for k in kinds}
        doc["boards"] = {k.value: sections[k]["boards"] for k in kinds}
        touched = self._episode_events()
        doc["anomalies"] = [
            {**e.as_truth(), "events": n} for e, n in zip(self.episodes, touched, strict=True)
        ]
        return orjson.dumps(doc)

    def _episode_events(self) -> list[int]:
        """How many on-time valid events each episode changed: an episode whose target sent
        nothing within it (a 2-second spike of a series read every few seconds) is in no event,
        and no detector can see it."""
        f = self.fleet
        sensor, applog = self._sensor, self._applog
        by_kind = {
            EventKind.SENSOR: (
                _cat([c.partition for c in sensor], np.int64),
                _cat([c.event_time for c in sensor], np.int64),
                _cat([c.series for c in sensor], np.int64),
            ),
            EventKind.APPLOG: (
                _cat([c.partition for c in applog], np.int64),
                _cat([c.event_time for c in applog], np.int64),
                f.route_service[_cat([c.route for c in applog], np.int64)],
            ),
        }
        sorted_by: dict[EventKind, tuple[IntArray, IntArray]] = {}
        for kind, (part, t, target) in by_kind.items():
            ok = ~late_mask(part, t, self.allowed_lateness_ms)
            order = np.lexsort((t[ok], target[ok]))
            sorted_by[kind] = (target[ok][order], t[ok][order])
        out: list[int] = []
        for e in self.episodes:
            target, t = sorted_by[e.type]
            lo, hi = np.searchsorted(target, [e.target, e.target + 1])
            within = np.searchsorted(t[lo:hi], [e.start_ms, e.end_ms])
            out.append(int(within[1] - within[0]))
        return out

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
        ok_part = part[ok][order]
        if kind is EventKind.SENSOR:
            boards = sensor_boards(self.fleet, ok_part, t_ok, codes_ok[Dim.DEVICE], v_ok)
        else:
            assert er_ok is not None
            boards = applog_boards(self.fleet, ok_part, t_ok, codes_ok[Dim.ROUTE], v_ok, er_ok)
        return {
            "produced": int(valid_pp.sum() + dead.sum()),
            "events": int(events_pp.sum()),
            "late": int(late_pp.sum()),
            "dead": int(dead.sum()),
            "per_partition": per_partition,
            "windows": windows,
            "boards": {
                str(q): orjson.Fragment(orjson.dumps(by_start, option=orjson.OPT_NON_STR_KEYS))
                for q, by_start in sorted(boards.items())
            },
        }


# partition -> 1m window start -> board name -> member -> score
Boards = dict[int, dict[int, dict[str, dict[str, float | int]]]]


@dataclass(frozen=True, slots=True)
class Groups:
    """On-time events grouped by (partition, 1m window start, member), values sorted within.

    ``order`` sorts the events; group ``g`` is ``order[lo[g]:hi[g]]``.
    """

    part: list[int]
    start: list[int]
    member: list[int]
    order: IntArray
    lo: IntArray
    hi: IntArray

    @property
    def n(self) -> IntArray:
        """Events per group."""
        return self.hi - self.lo

    def rows(self) -> Iterator[tuple[int, int, int, int]]:
        """(group, partition, start, member) of every group."""
        for g, (p, s, m) in enumerate(zip(self.part, self.start, self.member, strict=True)):
            yield g, p, s, m


def board_groups(
    partition: IntArray, event_time: IntArray, member: IntArray, values: FloatArray
) -> Groups:
    """Group events by partition, ``1m`` window instance and member (a code), values sorted."""
    start = event_time - event_time % BOARD_WINDOW.size_ms
    order = np.lexsort((values, member, start, partition))
    p, s, m = partition[order], start[order], member[order]
    change = np.r_[True, (p[1:] != p[:-1]) | (s[1:] != s[:-1]) | (m[1:] != m[:-1])]
    lo = np.flatnonzero(change) if len(order) else np.zeros(0, dtype=np.int64)
    hi = np.r_[lo[1:], len(order)].astype(np.int64)
    return Groups(p[lo].tolist(), s[lo].tolist(), m[lo].tolist(), order, lo, hi)


def _put(
    out: Boards,
    groups: Groups,
    board: str | Callable[[int], str],
    name: Callable[[int], str],
    scores: list[Any],
) -> None:
    for g, p, s, m in groups.rows():
        b = board if isinstance(board, str) else board(m)
        out.setdefault(p, {}).setdefault(s, {}).setdefault(b, {})[name(m)] = scores[g]


def _p99(groups: Groups, values: FloatArray) -> list[float]:
    pos = groups.lo + np.floor((groups.n - 1) * BOARD_P99).astype(np.int64)
    result: list[float] = values[groups.order[pos]].tolist()
    return result


def sensor_boards(
    fleet: Fleet, partition: IntArray, event_time: IntArray, series: IntArray, values: FloatArray
) -> Boards:
    """The value boards of on-time sensor events: ``site.events``, ``device.max.<metric>``."""
    out: Boards = {}
    site = fleet.device_site[fleet.series_device[series]]
    g = board_groups(partition, event_time, site, values)
    _put(out, g, Board.SITE_EVENTS, lambda c: fleet.sites[c], g.n.tolist())
    # one member per (metric, device): code metric * devices + device
    devices = len(fleet.device_ids)
    code = fleet.series_metric[series] * devices + fleet.series_device[series]
    g = board_groups(partition, event_time, code, values)
    _put(
        out,
        g,
        lambda c: f"{Board.DEVICE_MAX}.{METRICS[c // devices].name}",
        lambda c: fleet.device_ids[c % devices],
        values[g.order[g.hi - 1]].tolist(),
    )
    return _sorted(out)


def applog_boards(
    fleet: Fleet,
    partition: IntArray,
    event_time: IntArray,
    route: IntArray,
    latency: FloatArray,
    error: npt.NDArray[np.bool_],
) -> Boards:
    """The value boards of on-time application-log events: requests, errors (ERROR-level
    events) and latency p99 per service and per route (``service|route``)."""
    out: Boards = {}
    errors = error.astype(np.int64)
    for member, names, requests, errs, p99 in (
        (
            fleet.route_service[route],
            lambda c: fleet.services[c],
            Board.SERVICE_REQUESTS,
            Board.SERVICE_ERRORS,
            Board.SERVICE_P99,
        ),
        (route, fleet.route_entity, Board.ROUTE_REQUESTS, Board.ROUTE_ERRORS, Board.ROUTE_P99),
    ):
        g = board_groups(partition, event_time, member, latency)
        _put(out, g, requests, names, g.n.tolist())
        sums = np.add.reduceat(errors[g.order], g.lo) if len(g.lo) else g.lo
        _put(out, g, errs, names, sums.tolist())
        _put(out, g, p99, names, _p99(g, latency))
    return _sorted(out)


def _sorted(out: Boards) -> Boards:
    """The same boards with partitions, starts, boards and members in sorted order."""
    return {
        p: {
            s: {b: dict(sorted(members.items())) for b, members in sorted(by_board.items())}
            for s, by_board in sorted(by_start.items())
        }
        for p, by_start in sorted(out.items())
    }


def _cat(parts: list[Any], dtype: type) -> Any:
    return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype=dtype)
