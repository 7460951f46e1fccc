"""Leaderboards: the top members of a board over a 1m, 5m or 1h window (``pulse top``).

The worker keeps, per partition and ``1m`` window instance, a sorted set per stored board
(``schemas.keys.board_key``, :data:`schemas.keys.BOARDS`). A read here names a user-facing
board (:data:`BOARD_NAMES`), a window (:data:`WINDOWS`) and the minute it ends with (its last
``1m`` instance), and merges exactly:

- within a partition, over the window's ``1m`` instances, in the store: one
  ``ZUNION ... AGGREGATE SUM|MAX WITHSCORES`` per partition (a partition's keys share a hash
  slot, so this is one command even on a cluster);
- over partitions, here: counts add (each partition holds its share), maxima take the largest;
- a p99 board's sets only name the candidates (a partition's p99 is its own view): the fleet's
  p99 comes from the candidates' sketches in the ``1m`` window hashes, merged over partitions
  and instances (``schemas.packed``), exactly as the dashboard merges them;
- an error rate is the merged errors over the merged requests (the request count is shown).

Ties rank by member name. Every function takes a sync client returning bytes
(``dashboard.queries.reader_client`` or ``schemas.settings.store_client(..., decode=False)``)
and the partitions to read (``dashboard.queries.discover``); there is no hidden clock.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Final

import numpy as np

from schemas import keys, packed
from schemas.argtypes import one_line, parse_time
from schemas.events import EventKind
from schemas.keys import Board, Dim

if TYPE_CHECKING:
    import redis

MINUTE: Final = keys.BOARD_WINDOW.size_ms
# window name -> how many 1m instances it spans
WINDOWS: Final[dict[str, int]] = {"1m": 1, "5m": 5, "1h": 60}
# How far back (in 1m instances) the default end minute is searched for one with data.
LOOKBACK: Final = 60
P99: Final = 0.99
_METRIC: Final = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")  # schemas.events.Ident


@dataclass(frozen=True, slots=True)
class TopBoard:
    """A user-facing board: the stored boards it reads and how it ranks their members.

    ``rank`` is ``sum`` or ``max`` (the stored board's merge), ``p99`` (candidates from the
    stored board, values from the merged sketches of ``dim``) or ``rate`` (``stored`` errors
    over ``requests``).
    """

    name: str
    kind: EventKind
    dim: str
    stored: str  # the stored board read (errors for a rate)
    rank: str  # "sum" | "max" | "p99" | "rate"
    score: str  # what the score is, for column headers
    requests: str | None = None  # the stored requests board of a rate

    @property
    def member(self) -> str:
        """What a member is: site, device, service or route (``service|route``)."""
        return self.dim

    @property
    def reads(self) -> tuple[str, ...]:
        """The stored boards read (their sets name the members)."""
        return (self.stored,) if self.requests is None else (self.requests, self.stored)


_FIXED: Final = (
    TopBoard("site.events", EventKind.SENSOR, Dim.SITE, Board.SITE_EVENTS, "sum", "events"),
    TopBoard(
        "device.anomalies", EventKind.SENSOR, Dim.DEVICE, Board.DEVICE_ANOMALIES, "sum", "anomalies"
    ),
    TopBoard(
        "service.requests",
        EventKind.APPLOG,
        Dim.SERVICE,
        Board.SERVICE_REQUESTS,
        "sum",
        "requests",
    ),
    TopBoard(
        "service.error_rate",
        EventKind.APPLOG,
        Dim.SERVICE,
        Board.SERVICE_ERRORS,
        "rate",
        "error rate",
        Board.SERVICE_REQUESTS,
    ),
    TopBoard("service.p99", EventKind.APPLOG, Dim.SERVICE, Board.SERVICE_P99, "p99", "p99 ms"),
    TopBoard(
        "service.anomalies",
        EventKind.APPLOG,
        Dim.SERVICE,
        Board.SERVICE_ANOMALIES,
        "sum",
        "anomalies",
    ),
    TopBoard(
        "route.requests", EventKind.APPLOG, Dim.ROUTE, Board.ROUTE_REQUESTS, "sum", "requests"
    ),
    TopBoard(
        "route.error_rate",
        EventKind.APPLOG,
        Dim.ROUTE,
        Board.ROUTE_ERRORS,
        "rate",
        "error rate",
        Board.ROUTE_REQUESTS,
    ),
    TopBoard("route.p99", EventKind.APPLOG, Dim.ROUTE, Board.ROUTE_P99, "p99", "p99 ms"),
)
_BOARDS: Final[dict[str, TopBoard]] = {b.name: b for b in _FIXED}
DEVICE_MAX: Final = "device.max."
# every board name `pulse top` takes (``device.max.METRIC``: any metric)
BOARD_NAMES: Final = (
    "site.events",
    "device.anomalies",
    f"{DEVICE_MAX}METRIC",
    *(n for n in _BOARDS if n not in {"site.events", "device.anomalies"}),
)


def board(name: str) -> TopBoard:
    """The user-facing board called ``name``; ValueError (one sentence, listing the boards)."""
    found = _BOARDS.get(name)
    if found is not None:
        return found
    if name.startswith(DEVICE_MAX):
        metric = name.removeprefix(DEVICE_MAX)
        if _METRIC.match(metric):
            stored = f"{Board.DEVICE_MAX}.{metric}"
            return TopBoard(name, EventKind.SENSOR, Dim.DEVICE, stored, "max", f"max {metric}")
        raise ValueError(
            f"{name!r} names no metric: write {DEVICE_MAX}METRIC, e.g. {DEVICE_MAX}co2"
        )
    raise ValueError(f"unknown board {name!r}; the boards are {', '.join(BOARD_NAMES)}")


@dataclass(frozen=True, slots=True)
class Row:
    """One member of a board: its score and, for an error rate, the counts behind it."""

    member: str
    score: float  # count, max reading, p99 (ms) or error rate
    requests: int | None = None
    errors: int | None = None


@dataclass(frozen=True, slots=True)
class Top:
    """The top members of a board over a window (the ``1m`` instances ``starts``)."""

    board: TopBoard
    window: str
    starts: tuple[int, ...]  # oldest first
    rows: tuple[Row, ...]
    members: int  # members with data in the window, shown or not

    @property
    def start_ms(self) -> int:
        """Start of the window (epoch ms)."""
        return self.starts[0]

    @property
    def end_ms(self) -> int:
        """End of the window (epoch ms, exclusive)."""
        return self.starts[-1] + MINUTE


# --------------------------------------------------------------------------- pure helpers


def window_starts(window: str, last_start_ms: int) -> list[int]:
    """The ``1m`` instance starts, oldest first, of ``window`` ending with ``last_start_ms``'s."""
    if window not in WINDOWS:
        raise ValueError(f"unknown window {window!r}; the windows are {', '.join(WINDOWS)}")
    last = keys.window_start(last_start_ms, keys.BOARD_WINDOW)
    return [last - i * MINUTE for i in range(WINDOWS[window] - 1, -1, -1)]


def combine(parts: Iterable[Iterable[tuple[bytes | str, float]]], how: str) -> dict[str, float]:
    """The partitions' ``(member, score)`` pairs as one board: ``sum`` adds, ``max`` the largest."""
    if how not in ("sum", "max"):
        raise ValueError(f"partitions combine by sum or max, not {how!r}")
    out: dict[str, float] = {}
    for pairs in parts:
        for raw, score in pairs:
            m = keys.text(raw)
            have = out.get(m)
            if have is None:
                out[m] = float(score)
            elif how == "sum":
                out[m] = have + float(score)
            else:
                out[m] = max(have, float(score))
    return out


def rank(scores: Mapping[str, float], n: int) -> list[tuple[str, float]]:
    """The ``n`` highest scores, ties by member name (NaN scores are left out)."""
    kept = [(m, s) for m, s in scores.items() if not math.isnan(s)]
    kept.sort(key=lambda ms: (-ms[1], ms[0]))
    return kept[: max(n, 0)]


def error_rates(
    requests: Mapping[str, float], errors: Mapping[str, float]
) -> dict[str, tuple[float, int, int]]:
    """Member -> (errors / requests, requests, errors), for members with requests."""
    return {
        m: (errors.get(m, 0.0) / req, round(req), round(errors.get(m, 0.0)))
        for m, req in requests.items()
        if req > 0
    }


def sketch_p99(
    values: Sequence[bytes | None], member_of: Sequence[int], members: int, nf: int
) -> list[float]:
    """Each member's p99 from its packed values merged (NaN for a member without values).

    ``values[i]`` (None: absent) belongs to member ``member_of[i]`` in ``0..members-1``.
    """
    present = [i for i, v in enumerate(values) if v is not None]
    if members == 0:
        return []
    if not present:
        return [math.nan] * members
    table = packed.decode([v for v in values if v is not None], nf)
    groups = np.asarray([member_of[i] for i in present], dtype=np.int64)
    merged = packed.merge(table, groups, members)
    return [float(x) for x in packed.quantiles(merged, (P99,))[:, 0].tolist()]


# --------------------------------------------------------------------------- store reads


def newest_start(
    r: redis.Redis, b: TopBoard, partitions: Sequence[int], lookback: int = LOOKBACK
) -> int | None:
    """The newest ``1m`` instance with data: the minute of the kind's newest event, or the
    newest of the ``lookback`` minutes up to it where a partition holds the board (a board
    such as anomalies can trail the events). None when no partition has seen an event."""
    if not partitions:
        return None
    pipe = r.pipeline(transaction=False)
    for p in partitions:
        pipe.hget(keys.progress_key(b.kind, p), keys.Progress.MAX_EVENT_TIME)
    times = [int(float(t)) for t in pipe.execute() if t not in (None, b"", "")]
    if not times:
        return None
    newest = keys.window_start(max(times), keys.BOARD_WINDOW)
    starts = [newest - i * MINUTE for i in range(lookback)]
    pipe = r.pipeline(transaction=False)
    for s in starts:
        for p in partitions:
            pipe.exists(keys.board_key(b.kind, p, b.reads[0], s))
    found = pipe.execute()
    per = len(partitions)
    for i, s in enumerate(starts):
        if any(found[i * per : (i + 1) * per]):
            return s
    return newest


def _union(
    r: redis.Redis, b: TopBoard, stored: str, partitions: Sequence[int], starts: Sequence[int]
) -> list[list[tuple[bytes, float]]]:
    """Per partition: its sets of ``stored`` over ``starts`` merged by one ZUNION."""
    aggregate = "MAX" if b.rank == "max" else "SUM"
    pipe = r.pipeline(transaction=False)
    for p in partitions:
        pipe.zunion(
            [keys.board_key(b.kind, p, stored, s) for s in starts],
            aggregate=aggregate,
            withscores=True,
        )
    replies: list[list[tuple[bytes, float]]] = pipe.execute()
    return replies


def _p99s(
    r: redis.Redis, b: TopBoard, partitions: Sequence[int], starts: Sequence[int], names: list[str]
) -> dict[str, float]:
    """The candidates' p99 from their sketches merged over partitions and instances."""
    if not names:
        return {}
    pipe = r.pipeline(transaction=False)
    for p in partitions:
        for s in starts:
            pipe.hmget(keys.window_key(b.kind, p, keys.BOARD_WINDOW, b.dim, s), names)
    values: list[bytes | None] = []
    member_of: list[int] = []
    for row in pipe.execute():
        values += row
        member_of += range(len(names))
    nf = packed.NF_APPLOG if b.kind is EventKind.APPLOG else packed.NF_SENSOR
    p99 = sketch_p99(values, member_of, len(names), nf)
    return dict(zip(names, p99, strict=True))


def read_top(
    r: redis.Redis,
    b: TopBoard,
    partitions: Sequence[int],
    window: str,
    last_start_ms: int,
    n: int = 10,
) -> Top:
    """The ``n`` top members of ``b`` over ``window`` ending with the ``1m`` instance of
    ``last_start_ms``, merged over ``partitions`` (of ``b.kind``) and the window's instances.

    Raises ``redis.RedisError`` when the store cannot be read and ``packed.PackedError`` for a
    malformed window value (p99 boards).
    """
    return read_top_over(r, b, partitions, window, window_starts(window, last_start_ms), n)


def range_starts(start_ms: int, end_ms: int) -> list[int]:
    """The ``1m`` instance starts, oldest first, overlapping ``[start_ms, end_ms)``."""
    first = keys.window_start(start_ms, keys.BOARD_WINDOW)
    last = keys.window_start(end_ms - 1, keys.BOARD_WINDOW)
    return list(range(first, last + 1, MINUTE))


def read_top_over(
    r: redis.Redis,
    b: TopBoard,
    partitions: Sequence[int],
    window: str,
    starts: Sequence[int],
    n: int = 10,
) -> Top:
    """:func:`read_top` over any ``1m`` instances ``starts`` (oldest first; ``window`` names
    them, e.g. a dashboard's time range), merged exactly the same way."""
    rows: list[Row] = []
    members = 0
    if partitions and starts:
        if b.rank == "rate":
            assert b.requests is not None
            req = combine(_union(r, b, b.requests, partitions, starts), "sum")
            err = combine(_union(r, b, b.stored, partitions, starts), "sum")
            rates = error_rates(req, err)
            members = len(rates)
            rows = [
                Row(m, s, rates[m][1], rates[m][2])
                for m, s in rank({m: v[0] for m, v in rates.items()}, n)
            ]
        elif b.rank == "p99":
            # the candidates: every member of a partition's p99 set (sorted, for stable reads)
            names = sorted(combine(_union(r, b, b.stored, partitions, starts), "max"))
            p99 = _p99s(r, b, partitions, starts, names)
            members = sum(1 for v in p99.values() if not math.isnan(v))
            rows = [Row(m, s) for m, s in rank(p99, n)]
        else:
            scores = combine(_union(r, b, b.stored, partitions, starts), b.rank)
            members = len(scores)
            rows = [Row(m, s) for m, s in rank(scores, n)]
    return Top(b, window, tuple(starts), tuple(rows), members)


# --------------------------------------------------------------------------- pulse top


def _board_arg(text: str) -> TopBoard:
    try:
        return board(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _time_arg(text: str) -> int:
    try:
        return parse_time(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``pulse top``."""
    from schemas.argtypes import positive_int

    parser.add_argument(
        "board", metavar="BOARD", type=_board_arg, help=f"one of {', '.join(BOARD_NAMES)}"
    )
    parser.add_argument("--window", choices=tuple(WINDOWS), default="1m", help="window length (1m)")
    parser.add_argument("-n", type=positive_int, default=10, help="at most N members (10)")
    parser.add_argument(
        "--at",
        type=_time_arg,
        metavar="TIME",
        help="the window ends with the minute of TIME (ISO 8601, UTC unless it names a zone, or "
        "epoch seconds/ms); default: the newest minute with data",
    )


def _minute(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M")


def _score(b: TopBoard, row: Row) -> str:
    if b.rank == "sum":
        return str(round(row.score))
    if b.rank == "rate":
        return f"{row.score:.2%}"
    if b.rank == "p99":
        return f"{row.score:.2f}"
    return f"{row.score:g}"


def run(args: argparse.Namespace) -> int:
    """Print a board's top members over a window."""
    import redis
    from rich.console import Console
    from rich.table import Table

    from dashboard.queries import discover, reader_client
    from schemas.settings import StoreSettings

    b: TopBoard = args.board
    store = StoreSettings()
    r = reader_client(store, timeout_s=10.0)
    try:
        parts = discover(r).partitions.get(b.kind, ())
        last = args.at if args.at is not None else newest_start(r, b, parts)
        top = None if last is None else read_top(r, b, parts, args.window, last, args.n)
    except redis.RedisError as exc:
        print(
            f"pulse top: cannot read the store at {store.host}:{store.port}: {one_line(exc)}.",
            file=sys.stderr,
        )
        return 1
    except packed.PackedError as exc:
        print(
            f"pulse top: the store holds a malformed window value: {one_line(exc)}.",
            file=sys.stderr,
        )
        return 1
    finally:
        r.close()
    console = Console()
    if top is None:
        console.print(f"no {b.kind.value} events in the store yet: {b.name} is empty")
        return 0
    span = f"{_minute(top.start_ms)}-{_minute(top.end_ms)[-5:]} UTC"
    if not top.rows:
        console.print(f"{b.name}: no data in the {top.window} window {span}")
        return 0
    console.print(f"{b.name}, {top.window} window {span}: top {len(top.rows)} of {top.members}")
    table = Table("#", b.member, b.score)
    if b.rank == "rate":
        table.add_column("errors")
        table.add_column("requests")
    for i, row in enumerate(top.rows, start=1):
        cells = [str(i), row.member, _score(b, row)]
        if b.rank == "rate":
            cells += [str(row.errors), str(row.requests)]
        table.add_row(*cells)
    console.print(table)
    return 0
