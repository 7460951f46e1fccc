"""Leaderboards: the sorted sets of each ``1m`` window instance, from a poll's window rows.

Pure: given what a poll folded into the ``1m`` window instances (each delta, and the entities'
absolute values after it), the sorted-set writes that go with the partition's offset
(``schemas.keys.BOARDS`` is the contract). Counts are written as increments of the poll's
deltas: the apply runs exactly once per offset, so an increment is as exact as an absolute
value, and a site's count spans entities (its metrics) a poll need not all touch. A device's
maximum and a p99 are absolute: each member is one row of the window. A maximum is only
raised (``ZADD GT``), so it is written only when the poll reached the row's maximum: any other
write would change nothing, and a device's maximum settles within a few of a window's polls.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from operator import methodcaller

import numpy as np
import numpy.typing as npt

from pipeline.aggregation import WindowDelta
from schemas import keys, packed
from schemas.events import EventKind

_ERRORS_AT = keys.Stat.PACKED_APPLOG.index(keys.Stat.ERRORS)


@dataclass(frozen=True, slots=True)
class ZsetWrite:
    """Members and scores for one sorted set: ``set`` them, raise them (``gt``) or add them
    (``incr``); and the set's absolute expiry (Unix seconds)."""

    key: str
    expire_at_s: int
    mode: str  # "set" | "gt" | "incr"
    members: list[str]
    scores: list[float]


def board_writes(
    kind: EventKind,
    partition: int,
    deltas: Sequence[WindowDelta],
    absolute: Sequence[npt.NDArray[np.float64]],
    p99: Sequence[npt.NDArray[np.float64]],
    expire_at_s: Sequence[int],
) -> list[ZsetWrite]:
    """The board writes of one partition's ``1m`` deltas: ``absolute[i]`` holds the statistics
    of ``deltas[i]``'s entities after the poll (same rows), ``p99[i]`` their p99 (NaN where
    not needed: only service and route rows are read), ``expire_at_s[i]`` the instance's expiry.
    """
    out: list[ZsetWrite] = []
    for d, stats, q, expire in zip(deltas, absolute, p99, expire_at_s, strict=True):
        if d.window != keys.BOARD_WINDOW or not d.names:
            continue

        def key(board: str, start: int = d.start_ms) -> str:
            return keys.board_key(kind, partition, board, start)

        if kind is EventKind.SENSOR and d.dim == keys.Dim.SITE:
            out.extend(_sums(key(keys.Board.SITE_EVENTS), expire, d, d.table.stats[:, 0]))
        elif kind is EventKind.SENSOR and d.dim == keys.Dim.DEVICE:
            # the rows whose maximum this poll reached (the others' is on the board already)
            raised = np.flatnonzero(d.table.stats[:, packed.MAX] >= stats[:, packed.MAX])
            names = [d.names[i] for i in raised.tolist()]
            # one pass over the rows (a device's entity is "<device>|<metric>")
            by_metric: dict[str, tuple[list[str], list[float]]] = {}
            split = methodcaller("split", keys.ENTITY_SEP, 1)
            for (device, metric), top in zip(
                map(split, names), stats[raised, packed.MAX].tolist(), strict=True
            ):
                if (board := by_metric.get(metric)) is None:
                    board = by_metric[metric] = ([], [])
                board[0].append(device)
                board[1].append(top)
            for metric, (devices, tops) in sorted(by_metric.items()):
                out.append(
                    ZsetWrite(key(f"{keys.Board.DEVICE_MAX}.{metric}"), expire, "gt", devices, tops)
                )
        elif kind is EventKind.APPLOG and d.dim in (keys.Dim.SERVICE, keys.Dim.ROUTE):
            service = d.dim == keys.Dim.SERVICE
            requests = keys.Board.SERVICE_REQUESTS if service else keys.Board.ROUTE_REQUESTS
            errors = keys.Board.SERVICE_ERRORS if service else keys.Board.ROUTE_ERRORS
            p99_board = keys.Board.SERVICE_P99 if service else keys.Board.ROUTE_P99
            out.extend(_sums(key(requests), expire, d, d.table.stats[:, 0]))
            out.extend(_sums(key(errors), expire, d, d.table.stats[:, _ERRORS_AT]))
            ok = np.isfinite(q)
            if ok.any():
                out.append(
                    ZsetWrite(
                        key(p99_board),
                        expire,
                        "set",
                        [n for n, good in zip(d.names, ok.tolist(), strict=True) if good],
                        q[ok].tolist(),
                    )
                )
    return out


def count_writes(
    kind: EventKind,
    partition: int,
    board: str,
    members: Iterable[tuple[str, int]],
    expire_at_s: Callable[[int], int],
) -> list[ZsetWrite]:
    """Increments of a count board, one per (member, event time) occurrence, each in the
    ``1m`` instance of its time; ``expire_at_s(start)`` is an instance's expiry."""
    counts: dict[int, dict[str, int]] = {}
    for member, t in members:
        per = counts.setdefault(keys.window_start(t, keys.BOARD_WINDOW), {})
        per[member] = per.get(member, 0) + 1
    return [
        ZsetWrite(
            keys.board_key(kind, partition, board, start),
            expire_at_s(start),
            "incr",
            sorted(per),
            [float(per[m]) for m in sorted(per)],
        )
        for start, per in sorted(counts.items())
    ]


def needs_p99(kind: EventKind, delta: WindowDelta) -> bool:
    """Whether :func:`board_writes` reads the p99 of ``delta``'s rows."""
    return (
        kind is EventKind.APPLOG
        and delta.window == keys.BOARD_WINDOW
        and delta.dim in (keys.Dim.SERVICE, keys.Dim.ROUTE)
    )


def _sums(
    key: str, expire: int, d: WindowDelta, counts: npt.NDArray[np.float64]
) -> list[ZsetWrite]:
    """Increments by member (entities of one member, e.g. a site's metrics, are added up)."""
    members = [keys.board_member(d.dim, n) for n in d.names]
    total: dict[str, float] = {}
    for m, c in zip(members, counts.tolist(), strict=True):
        if c:
            total[m] = total.get(m, 0.0) + c
    if not total:
        return []
    names = sorted(total)
    return [ZsetWrite(key, expire, "incr", names, [total[m] for m in names])]
