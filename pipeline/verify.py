"""``pulse verify --truth FILE``: prove the store holds exactly what a load generator run implies.

Reads every window aggregate in the store (merging partitions, and 1-minute panes into hopping
windows) and compares it with the truth file, which the load generator computed from the events
it produced. It shares only the store contract (``schemas.keys``, the packed value codec of
``schemas.packed``) with the pipeline, never the pipeline's aggregation arithmetic. Only the
dimensions the worker keeps per window (``PULSE_WORKER_DIMS_*``) are compared. The series
statistics of sensor values (repeated readings, first and last reading) follow the order the
partitions hold, which the truth does not record: they are checked for soundness only. Exit
status 0 when everything matches, 1 on any mismatch (each one is printed), 2 on bad input.

Besides the truth, the store must agree with itself, per partition:

- every packed value is sound, and its sketch holds as many values as it counts;
- the progress counters account for every record: ``events + late + dead == offset + 1``. This
  assumes the input topics' offsets are dense from 0: they are written by idempotent,
  non-transactional producers (no transaction markers take offsets) and nothing was deleted or
  compacted before the worker read it. A transactional producer or a truncated topic breaks it;
- the ``1m`` windows of the kind's fleet-wide dim count exactly the ``events`` counter: a late
  event never touches a window and an on-time one lands in exactly one ``1m`` window per dim.
  This assumes none of the partition's ``1m`` windows has expired yet (a run younger than the
  ``1m`` retention, as the truth comparison does anyway).

Leaderboards (``schemas.keys.BOARDS``, one sorted set per partition, board and ``1m`` window
instance) are compared per partition with the truth's ``boards`` (truth files without them skip
this): counts and maxima exactly, p99 within the sketch's relative accuracy, missing and extra
members named (a count of 0 equals an absent member). The anomaly boards are checked against
the partition's stored anomaly records (``schemas.anomaly``): each member's score is the number
of records of its device (sensor records are per ``device|metric``) or service whose detection
window starts within the ``1m`` instance. This too assumes nothing has expired yet.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from schemas import keys, packed
from schemas.argtypes import non_negative_int
from schemas.events import EventKind

# Counts and min/max must match exactly; float sums may differ by summation order only.
SUM_REL_TOL = 1e-9
VAR_REL_TOL = 1e-9
STATUS_STATS = (*keys.Stat.STATUS_CLASSES, keys.Stat.ERRORS)
# The fleet-wide dim of each kind: its entities' counts in one window add up to the kind's events.
FLEET_DIM: Final = {EventKind.SENSOR: keys.Dim.METRIC, EventKind.APPLOG: keys.Dim.FLEET}
COUNTERS: Final = (keys.Progress.EVENTS, keys.Progress.LATE, keys.Progress.DEAD)


class VerifyError(Exception):
    """The truth file or the store cannot be read."""


@dataclass
class Merged:
    """A window aggregate merged over partitions (and panes)."""

    n: int = 0
    sum: float = 0.0
    sq: float = 0.0
    min: float = math.inf
    max: float = -math.inf
    counts: dict[str, int] = field(default_factory=dict)
    sketch: dict[int, int] = field(default_factory=dict)

    def add(self, stats: Mapping[str, float]) -> None:
        """Merge unpacked statistics (by name)."""
        for stat, x in stats.items():
            if stat == keys.Stat.COUNT:
                self.n += int(x)
            elif stat == keys.Stat.SUM:
                self.sum += x
            elif stat == keys.Stat.SUMSQ:
                self.sq += x
            elif stat == keys.Stat.MIN:
                self.min = min(self.min, x)
            elif stat == keys.Stat.MAX:
                self.max = max(self.max, x)
            elif stat in keys.Stat.SERIES:
                continue  # the series' order is the partition's, which the truth does not hold
            else:
                self.counts[stat] = self.counts.get(stat, 0) + int(x)

    def merge(self, other: Merged) -> None:
        """Merge another aggregate into this one."""
        self.n += other.n
        self.sum += other.sum
        self.sq += other.sq
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)
        for k, v in other.counts.items():
            self.counts[k] = self.counts.get(k, 0) + v
        for c, v in other.sketch.items():
            self.sketch[c] = self.sketch.get(c, 0) + v


# kind -> window name -> dim -> start_ms -> entity -> Merged
StoreView = dict[str, dict[str, dict[str, dict[int, dict[str, Merged]]]]]


def _tree() -> StoreView:
    return defaultdict(lambda: defaultdict(lambda: defaultdict(lambda: defaultdict(dict))))


@dataclass
class PartitionCounts:
    """What one partition's keys say about its record counts."""

    progress: dict[str, str] | None = None  # the progress hash (None: there is none)
    window_events: int = 0  # sum of n over the 1m windows of the kind's fleet-wide dim
    windows: int = 0  # how many window keys (aggregate or sketch) the partition has


@dataclass
class StoreContents:
    """What :func:`read_store` found."""

    view: StoreView
    totals: dict[str, dict[str, int]]  # kind -> events/late/dead over its progress hashes
    partitions: dict[tuple[str, int], PartitionCounts]  # by (kind, partition)
    problems: list[str]  # inconsistencies found while reading (sketch vs aggregate counts)


def _int(raw: object) -> int | None:
    try:
        return int(str(raw))
    except ValueError:
        return None


def check_partitions(parts: Mapping[tuple[str, int], PartitionCounts]) -> list[str]:
    """Lines for every partition whose progress counters do not add up (see the module doc)."""
    out: list[str] = []
    for (kind, part), pc in sorted(parts.items()):
        where = f"{kind} partition {part}"
        if pc.progress is None:
            out.append(f"{where}: {pc.windows} window keys but no progress hash")
            continue
        fields = (keys.Progress.OFFSET, *COUNTERS)
        raw = {f: pc.progress.get(f, "-1" if f == keys.Progress.OFFSET else "0") for f in fields}
        values = {f: _int(v) for f, v in raw.items()}
        broken = [f"{f}={raw[f]!r}" for f, v in values.items() if v is None]
        if broken:
            out.append(f"{where}: progress fields are not integers: {', '.join(broken)}")
            continue
        offset, events, late, dead = (int(values[f] or 0) for f in fields)
        if events + late + dead != offset + 1:
            out.append(
                f"{where}: events {events} + late {late} + dead {dead} = "
                f"{events + late + dead}, but applied offset {offset} means {offset + 1} records"
            )
        if pc.window_events != events:
            dim = FLEET_DIM[EventKind(kind)]
            out.append(
                f"{where}: its 1m {dim} windows count {pc.window_events} events, "
                f"its progress hash events={events}"
            )
    return out


def compare_partitions(
    truth: dict[str, Any], parts: Mapping[tuple[str, int], PartitionCounts]
) -> list[str]:
    """Lines for every partition whose events/late/dead counters differ from the truth's."""
    out: list[str] = []
    for kind in EventKind:
        per_partition = truth.get("per_partition", {}).get(kind.value)
        if per_partition is None:  # older truth files: totals only
            continue
        for part_s, want in sorted(per_partition.items(), key=lambda kv: int(kv[0])):
            pc = parts.get((kind.value, int(part_s)))
            row = (pc.progress if pc else None) or {}
            for name in COUNTERS:
                got = _int(row.get(name, "0"))
                if got != int(want.get(name, 0)):
                    out.append(
                        f"{kind.value} partition {part_s}: {name} is {row.get(name, 0)} in the "
                        f"store, truth says {want.get(name, 0)}"
                    )
    return out


def read_store(client: Any, batch: int = 500) -> StoreContents:
    """Every tumbling-window value, merged over partitions; totals; per-partition counts.

    ``client`` must return bytes (values are binary packed values).
    """
    view = _tree()
    parts: dict[tuple[str, int], PartitionCounts] = {}
    problems: list[str] = []
    for kind in EventKind:
        fleet = FLEET_DIM[kind]
        nf = packed.NF_APPLOG if kind is EventKind.APPLOG else packed.NF_SENSOR
        names = sorted(
            _text(k) for k in client.scan_iter(match=keys.window_pattern(kind), count=1000)
        )
        for chunk in _chunks(names, batch):
            pipe = client.pipeline(transaction=False)
            for k in chunk:
                pipe.hgetall(k)
            for k, stored in zip(chunk, pipe.execute(), strict=True):
                _, part, window, dim, start = keys.parse_window_key(k)
                where = f"{kind.value} partition {part} {window} {dim} @{start}"
                pc = parts.setdefault((kind.value, part), PartitionCounts())
                pc.windows += 1
                try:
                    fields = packed.entity_values(stored)
                except packed.PackedError as exc:
                    problems.append(f"{where}: {exc}")
                    continue
                ents = [_text(f) for f in fields]
                try:
                    table = packed.decode(list(fields.values()), nf)
                except packed.PackedError as exc:
                    ent = "" if exc.index is None else f" {ents[exc.index]}"
                    problems.append(f"{where}{ent}: {exc}")
                    continue
                problems.extend(
                    f"{where} {ents[r]}: {what}" for what, rs in packed.problems(table) for r in rs
                )
                bucket = view[kind.value][window][dim][start]
                stat_names = (
                    keys.Stat.PACKED_APPLOG if nf == packed.NF_APPLOG else keys.Stat.PACKED_SENSOR
                )
                for ent, row in zip(ents, table.stats.tolist(), strict=True):
                    bucket.setdefault(ent, Merged()).add(dict(zip(stat_names, row, strict=True)))
                for r, c, n in zip(
                    table.row.tolist(), table.code.tolist(), table.count.tolist(), strict=True
                ):
                    sk = bucket[ents[r]].sketch
                    sk[c] = sk.get(c, 0) + n
                if window == keys.WINDOW_1M.name and dim == fleet:
                    pc.window_events += int(table.stats[:, packed.COUNT].sum())
    totals: dict[str, dict[str, int]] = {}
    for kind in EventKind:
        t = dict.fromkeys(COUNTERS, 0)
        for k in client.scan_iter(match=keys.progress_pattern(kind)):
            row = {_text(f): _text(v) for f, v in client.hgetall(k).items()}
            part = int(keys.parse_tag(_text(k))[1])
            parts.setdefault((kind.value, part), PartitionCounts()).progress = row
            for name in t:
                t[name] += _int(row.get(name, 0)) or 0
        totals[kind.value] = t
    for kind_view in view.values():
        _add_hopping(kind_view)
    return StoreContents(view, totals, parts, problems)


def _text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


def _add_hopping(kind_view: dict[str, dict[str, dict[int, dict[str, Merged]]]]) -> None:
    for hop in keys.HOPPING_WINDOWS:
        panes = kind_view.get(hop.pane.name, {})
        for dim, by_start in panes.items():
            out: dict[int, dict[str, Merged]] = {}
            for pane_start, ents in by_start.items():
                # a pane belongs to every hopping window whose span covers it
                for i in range(hop.panes):
                    start = pane_start - i * hop.advance_ms
                    target = out.setdefault(start, {})
                    for ent, m in ents.items():
                        target.setdefault(ent, Merged()).merge(m)
            kind_view[hop.name][dim] = out


def _chunks(items: list[str], size: int) -> Iterator[list[str]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


# window name -> the dimensions the store keeps for it (None: compare every dimension)
Kept = Mapping[str, frozenset[str]] | None


def kept_dims(
    plan: Sequence[tuple[keys.TumblingWindow, Sequence[str]]],
) -> dict[str, frozenset[str]]:
    """The dimensions compared per window name: the plan's, hopping windows their pane's."""
    out = {w.name: frozenset(dims) for w, dims in plan}
    for hop in keys.HOPPING_WINDOWS:
        out[hop.name] = out.get(hop.pane.name, frozenset())
    return out


def verify(
    truth: dict[str, Any],
    found: StoreContents,
    kept: Kept = None,
    boards: BoardContents | None = None,
) -> list[str]:
    """Every problem: the store against the truth, and against itself (with ``boards``:
    the leaderboards too)."""
    out = [
        *compare(truth, found.view, found.totals, kept),
        *compare_partitions(truth, found.partitions),
        *found.problems,
        *check_partitions(found.partitions),
    ]
    if boards is not None:
        out += [
            *compare_boards(truth, boards, kept),
            *boards.problems,
            *check_anomaly_boards(boards),
        ]
    return out


# --------------------------------------------------------------------------- leaderboards

# (kind, partition, 1m window start) -> board name -> member -> score
BoardView = dict[tuple[str, int, int], dict[str, dict[str, float]]]
ANOMALY_BOARDS: Final = {
    EventKind.SENSOR.value: keys.Board.DEVICE_ANOMALIES,
    EventKind.APPLOG.value: keys.Board.SERVICE_ANOMALIES,
}


@dataclass
class BoardContents:
    """What :func:`read_boards` found."""

    boards: BoardView  # every stored board
    anomalies: BoardView  # the anomaly boards the stored anomaly records imply
    records: int = 0  # anomaly records read
    problems: list[str] = field(default_factory=list)  # unreadable records, unknown boards


def stored_board(name: str) -> keys.StoredBoard | None:
    """The contract's entry of a stored board name (``device.max.<metric>``: ``device.max``)."""
    found = keys.BOARDS.get(name)
    if found is None and name.startswith(f"{keys.Board.DEVICE_MAX}."):
        return keys.BOARDS[keys.Board.DEVICE_MAX]
    return found


def parse_board_key(key: str) -> tuple[EventKind, int, str, int]:
    """Split a board key into (kind, partition, board name, start_ms)."""
    kind, part = keys.parse_tag(key)
    _, sep, rest = key.partition("}:top:")
    name, _, start = rest.rpartition(":")
    if not sep or not name or not start.isdigit():
        raise ValueError(f"not a board key: {key!r}")
    return kind, part, name, int(start)


def read_boards(client: Any, batch: int = 500) -> BoardContents:
    """Every leaderboard in the store, and the anomaly boards its anomaly records imply.

    ``client`` must return bytes (anomaly records are binary).
    """
    from schemas.anomaly import decode_record

    out = BoardContents({}, {})
    for kind in EventKind:
        pattern = f"{keys.PREFIX}:{{{kind.value}.*}}:top:*"
        names = sorted(_text(k) for k in client.scan_iter(match=pattern, count=1000))
        for chunk in _chunks(names, batch):
            pipe = client.pipeline(transaction=False)
            for k in chunk:
                pipe.zrange(k, 0, -1, withscores=True)
            for k, pairs in zip(chunk, pipe.execute(), strict=True):
                try:
                    _, part, name, start = parse_board_key(k)
                except ValueError as exc:
                    out.problems.append(f"{kind.value}: {exc}")
                    continue
                if stored_board(name) is None:
                    out.problems.append(f"{kind.value} partition {part}: unknown board {k!r}")
                    continue
                board = out.boards.setdefault((kind.value, part, start), {}).setdefault(name, {})
                for member, score in pairs:
                    board[_text(member)] = float(score)
        dim = keys.BOARDS[ANOMALY_BOARDS[kind.value]].dim
        anom_pattern = f"{keys.PREFIX}:{{{kind.value}.*}}:anom"
        for k in sorted(_text(k) for k in client.scan_iter(match=anom_pattern, count=1000)):
            part = keys.parse_tag(k)[1]
            if k != keys.anomalies_key(kind, part):
                continue
            for anomaly_id, blob in sorted(client.hgetall(k).items()):
                try:
                    rec = decode_record(blob)
                except ValueError as exc:
                    out.problems.append(
                        f"{kind.value} partition {part} anomaly {_text(anomaly_id)}: {exc}"
                    )
                    continue
                out.records += 1
                start = keys.window_start(rec.window_start_ms, keys.BOARD_WINDOW)
                member = keys.board_member(dim, rec.entity)
                counts = out.anomalies.setdefault((kind.value, part, start), {}).setdefault(
                    ANOMALY_BOARDS[kind.value], {}
                )
                counts[member] = counts.get(member, 0) + 1
    return out


def _board_lines(
    where: str,
    got: Mapping[str, float],
    want: Mapping[str, float],
    merge: str,
    accuracy: float,
    source: str = "truth",
) -> list[str]:
    """Every difference between a stored board and its expected members and scores (what
    ``source`` says)."""
    if merge == "sum":  # a count of 0 is no entry
        got = {m: s for m, s in got.items() if s != 0}
        want = {m: s for m, s in want.items() if s != 0}
    out: list[str] = []
    for member, w in want.items():
        g = got.get(member)
        if g is None:
            out.append(f"{where} {member}: missing ({source} {w!r})")
        elif merge == "sketch":
            if abs(g - float(w)) > accuracy * abs(float(w)) + 1e-9:
                out.append(f"{where} {member}: {g!r}, {source} {w!r} (±{accuracy:.1%})")
        elif g != float(w):
            out.append(f"{where} {member}: {g!r}, {source} {w!r}")
    for member in sorted(got.keys() - want.keys()):
        out.append(f"{where} {member}: in the store ({got[member]!r}) but not in the {source}")
    return out


def compare_boards(truth: dict[str, Any], found: BoardContents, kept: Kept = None) -> list[str]:
    """The stored value boards (not the anomaly boards) against the truth's, per partition
    and ``1m`` instance; nothing for a truth file without boards. With ``kept``, only the
    boards of dimensions the ``1m`` windows keep."""
    from schemas.sketch import RELATIVE_ACCURACY

    if "boards" not in truth:
        return []
    window = keys.BOARD_WINDOW.name

    def compared(name: str) -> keys.StoredBoard | None:
        b = stored_board(name)
        if b is None or name in ANOMALY_BOARDS.values():
            return None
        if kept is not None and b.dim not in kept.get(window, frozenset()):
            return None
        return b

    out: list[str] = []
    expected: set[tuple[str, int, int, str]] = set()
    for kind_s, parts in truth["boards"].items():
        for part_s, starts in sorted(parts.items(), key=lambda kv: int(kv[0])):
            for start_s, by_board in sorted(starts.items(), key=lambda kv: int(kv[0])):
                at = (kind_s, int(part_s), int(start_s))
                stored = found.boards.get(at, {})
                for name, want in sorted(by_board.items()):
                    b = compared(name)
                    if b is None:
                        continue
                    expected.add((*at, name))
                    where = f"{kind_s} partition {part_s} board {name} @{start_s}"
                    if name not in stored and any(want.values()):
                        out.append(f"{where}: missing (truth has {len(want)} members)")
                        continue
                    out += _board_lines(
                        where, stored.get(name, {}), want, b.merge, RELATIVE_ACCURACY
                    )
    for (kind_s, part, start), by_board in sorted(found.boards.items()):
        for name, got in sorted(by_board.items()):
            b = compared(name)
            if b is None or (kind_s, part, start, name) in expected:
                continue
            if any(got.values()):
                out.append(
                    f"{kind_s} partition {part} board {name} @{start}: in the store "
                    f"({len(got)} members) but not in the truth"
                )
    return out


def check_anomaly_boards(found: BoardContents) -> list[str]:
    """Each partition's anomaly boards against what its stored anomaly records imply."""
    out: list[str] = []
    for at in sorted(found.boards.keys() | found.anomalies.keys()):
        kind_s, part, start = at
        name = ANOMALY_BOARDS[kind_s]
        got = found.boards.get(at, {}).get(name, {})
        want = found.anomalies.get(at, {}).get(name, {})
        where = f"{kind_s} partition {part} board {name} @{start}"
        out += _board_lines(where, got, want, "sum", 0.0, "anomaly records")
    return out


def compare(
    truth: dict[str, Any],
    view: StoreView,
    totals: dict[str, dict[str, int]],
    kept: Kept = None,
) -> list[str]:
    """Every difference between the truth file and the store, as readable lines.

    With ``kept``, only the dimensions the store keeps per window are compared.
    """
    from schemas.sketch import RELATIVE_ACCURACY, quantiles

    problems: list[str] = []
    for kind in EventKind:
        k = kind.value
        for name, truth_key in (("events", "events"), ("late", "late"), ("dead", "dead")):
            want = int(truth.get(truth_key, {}).get(k, 0))
            got = totals.get(k, {}).get(name, 0)
            if want != got:
                problems.append(f"{k}: {name} total is {got} in the store, truth says {want}")
        for window, dims in truth.get("windows", {}).get(k, {}).items():
            for dim, starts in dims.items():
                if kept is not None and dim not in kept.get(window, frozenset()):
                    continue
                stored_dim = view.get(k, {}).get(window, {}).get(dim, {})
                for start_s, ents in starts.items():
                    start = int(start_s)
                    stored = stored_dim.get(start, {})
                    where = f"{k} {window} {dim} @{start}"
                    for ent, want in ents.items():
                        m = stored.get(ent)
                        if m is None or m.n == 0:
                            problems.append(f"{where} {ent}: missing (truth n={want['n']})")
                            continue
                        problems.extend(
                            _compare_entity(f"{where} {ent}", want, m, quantiles, RELATIVE_ACCURACY)
                        )
                    for ent in stored.keys() - ents.keys():
                        if stored[ent].n:
                            problems.append(
                                f"{where} {ent}: in the store (n={stored[ent].n}) "
                                "but not in the truth"
                            )
                for start in stored_dim.keys() - {int(s) for s in starts}:
                    if any(m.n for m in stored_dim[start].values()):
                        problems.append(
                            f"{k} {window} {dim} @{start}: window in the store but not in the truth"
                        )
    return problems


def _compare_entity(
    where: str, want: dict[str, Any], m: Merged, quantiles: Any, accuracy: float
) -> list[str]:
    out: list[str] = []
    n = int(want["n"])
    if m.n != n:
        out.append(f"{where}: n={m.n}, truth {n}")
        return out
    if not math.isclose(m.sum, want["sum"], rel_tol=SUM_REL_TOL, abs_tol=1e-6):
        out.append(f"{where}: sum={m.sum!r}, truth {want['sum']!r}")
    for stat in ("min", "max"):
        # exact: both sides are the same doubles (the store writes them with 17 digits)
        got = getattr(m, stat)
        if got != float(want[stat]):
            out.append(f"{where}: {stat}={got!r}, truth {want[stat]!r}")
    mean_sq = m.sq / m.n
    mean = m.sum / m.n
    var = max(mean_sq - mean * mean, 0.0)
    # Variance from sums of squares loses ~1e-16 of E[x^2] to cancellation: compare it there.
    # (std * std: a huge truth std squares to inf, where ** 2 raises OverflowError.)
    std = float(want["std"])
    if abs(var - std * std) > VAR_REL_TOL * mean_sq + 1e-12:
        out.append(f"{where}: std={math.sqrt(var)!r}, truth {want['std']!r}")
    qs = (0.5, 0.9, 0.95, 0.99)
    for q, est in zip(qs, quantiles(m.sketch, qs), strict=True):
        exact = float(want[f"p{round(q * 100)}"])
        if est is None or abs(est - exact) > accuracy * abs(exact) + 1e-9:
            out.append(f"{where}: p{round(q * 100)}={est!r}, truth {exact!r} (±{accuracy:.1%})")
    for stat in STATUS_STATS:
        if stat in want and int(want[stat]) != m.counts.get(stat, 0):
            out.append(f"{where}: {stat}={m.counts.get(stat, 0)}, truth {want[stat]}")
    return out


EPILOG = """\
Besides comparing with the truth, verify checks that the store agrees with itself per partition:
every packed value is sound and its sketch holds as many values as it counts;
events + late + dead == offset + 1 in every progress hash (this assumes dense offsets from 0:
the input topics are written by idempotent, non-transactional producers and nothing was deleted
before the worker read it); the
1m windows of the fleet-wide dim (sensor: metric, applog: fleet) count exactly the events
counter (this assumes none of those windows has expired yet). Leaderboards are compared with
the truth's per partition and 1m window (truth files without boards skip this), and the anomaly
boards with the stored anomaly records."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``pulse verify``."""
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--truth", required=True, type=Path, help="truth file from pulse loadgen")
    parser.add_argument(
        "--max-report", type=non_negative_int, default=50, help="mismatches to print (50)"
    )


def run(args: argparse.Namespace) -> int:
    """Compare the store with the truth file; 0 if they agree."""
    import redis
    from redis.exceptions import RedisClusterException

    from pipeline.settings import StoreSettings, WorkerSettings
    from schemas import truth as truth_file
    from schemas.settings import StoreRole, store_client
    from schemas.store_errors import describe

    try:
        truth = truth_file.load(args.truth)
    except truth_file.TruthFileError as exc:
        print(f"pulse verify: {exc}.", file=sys.stderr)
        return 2
    s = StoreSettings()
    kept = kept_dims(WorkerSettings().window_plan())
    try:  # on a cluster, the client reads every primary (SCAN) and routes by slot
        client = store_client(s, timeout_s=30.0, role=StoreRole.READER)
        found = read_store(client)
        boards = read_boards(client)
    except (redis.RedisError, RedisClusterException) as exc:
        print(f"pulse verify: {describe(exc, s, StoreRole.READER)}.", file=sys.stderr)
        return 2
    totals = found.totals
    problems = verify(truth, found, kept, boards)
    checked = sum(
        len(ents)
        for k in truth.get("windows", {}).values()
        for window, dims in k.items()
        for dim, starts in dims.items()
        if dim in kept.get(window, frozenset())
        for ents in starts.values()
    )
    board_entries = sum(
        len(members)
        for parts in truth.get("boards", {}).values()
        for starts in parts.values()
        for by_board in starts.values()
        for name, members in by_board.items()
        if (b := stored_board(name)) is not None and b.dim in kept.get(keys.BOARD_WINDOW.name, ())
    )
    for line in problems[: args.max_report]:
        print(f"MISMATCH {line}")
    if len(problems) > args.max_report:
        print(f"... and {len(problems) - args.max_report} more")
    summary = ", ".join(
        f"{k}: events {t['events']} late {t['late']} dead {t['dead']}" for k, t in totals.items()
    )
    if problems:
        print(f"verify: FAILED, {len(problems)} mismatches in {checked} aggregates ({summary})")
        return 1
    leaderboards = (
        f"{board_entries} leaderboard entries match the truth; "
        if "boards" in truth
        else "the truth file has no leaderboards; "
    )
    print(
        f"verify: OK, {checked} window aggregates match the truth exactly; {leaderboards}"
        f"anomaly boards agree with {boards.records} anomaly records; sketches, counters "
        f"and offsets agree in {len(found.partitions)} partitions ({summary})"
    )
    return 0
