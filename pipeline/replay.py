"""``pulse replay``, the pure part: the range, the refusals, and the rebuild of one partition.

A replay recomputes the window aggregates and leaderboards of ``[T1, T2)`` from the events a
source still holds (the raw-event archive or Kafka) and replaces them in the store, per
partition, in one atomic call (``FCALL pulse_replace``, ``store_functions.lua``). The I/O lives
in :mod:`pipeline.replay_command`.

Exactness: the worker counts an event in a window iff it is valid and on time (``windows``: not
below the partition's running maximum event time minus the allowed lateness, in offset order).
A replay applies the same rule to the same records in the same order, so it rebuilds what the
worker computed:

* The range is whole ``1m`` window instances (so whole ``10s`` ones too): ``T1`` is rounded
  down and ``T2`` up to the minute.
* It must be **closed** in every partition: the partition's stored watermark is at or past
  ``T2``, so no on-time event can reach the range any more and the worker will never write its
  keys again (``pulse_replace`` checks the watermark again, atomically with its writes).
* Reading a partition from any offset ``s`` before which no valid event lies above ``T1 +
  lateness`` classifies every event of the range as the worker did: earlier events could only
  raise the running maximum to a value that makes no event of the range late. Once the running
  maximum reaches ``T2 + lateness``, every later event of the range is late: reading stops.
* The archive holds late events too (they are valid); its rows are replayed in offset order per
  partition through the same rule, from the events at or after ``T1`` (earlier times cannot make
  an event of the range late) up to the first one that closes the range.

Validation is :mod:`pipeline.validation`, with the worker's clock-skew bound at the replay's
clock; the age bound is widened to reach the range (the worker applied it at its own clock,
which a replay does not know: an event the worker dropped as too old, because it ran more than
``max_event_age_s`` behind, would be counted by a replay).

Anomalies are recomputed too (:class:`Redetect`) while the worker detects
(``PULSE_WORKER_DETECT``). The detectors' states at ``T1`` are not stored, so fresh detectors
(the worker's :class:`~pipeline.detection.KindDetectors`, ``detect_many``) are stepped over the
closed ``10s`` windows the store holds in a warm-up span before ``T1`` (``--warmup``, at most
what the store still holds), then over the range's rebuilt windows, oldest first: a window's
detectors see the same values in the same order as the worker's did once the warm-up reaches
the start of the data, so the range raises the same anomalies under the same ids (a shorter
warm-up starts the detectors younger: they may raise fewer, or others). Per partition the
range's anomaly records and index entries become exactly these, and the anomaly boards count
them, in the same ``pulse_replace`` call as the windows. The live feed is the live tail and is
left as it is, like the detector states (the live detectors go on from their own), the
progress hashes, entity registries and device positions (they only ever grow). With detection
off, anomalies are not touched and the anomaly boards are rebuilt from the stored records.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
import numpy.typing as npt
import orjson

from pipeline import aggregation, leaderboards, windows
from pipeline.aggregation import WindowDelta, WindowPlan
from pipeline.detection import DETECT_DIMS, KindDetectors, window_params
from pipeline.leaderboards import ZsetWrite
from pipeline.state import HashWrite, OpenRows, Retention
from pipeline.validation import TimeBounds, decode_applog, decode_sensor
from schemas import anomaly, keys, packed
from schemas.events import EventKind

MINUTE_MS = keys.WINDOW_1M.size_ms
FUNCTION_NAME = "pulse_replace"
DETECT_WINDOW = keys.WINDOW_10S  # the window the worker's detectors step on
# Default warm-up: the 10 s windows' default retention (all the store holds of them), about two
# time constants of the detectors' slowest statistics (1000 steps: 2.8 h of 10 s windows).
WARMUP_MS = 6 * 3_600_000
# The anomaly board of each kind, and the dim its anomaly records' entities belong to.
ANOMALY_BOARD = {
    EventKind.SENSOR: (keys.Board.DEVICE_ANOMALIES, keys.Dim.DEVICE),
    EventKind.APPLOG: (keys.Board.SERVICE_ANOMALIES, keys.Dim.SERVICE),
}


class ReplayRefused(Exception):
    """The range cannot be replayed (one sentence: which partition, and why)."""


# --------------------------------------------------------------------------- times and the range


def fmt_time(ms: int) -> str:
    """An epoch-ms time as ISO 8601 UTC (seconds, or ms when it has them)."""
    dt = datetime.fromtimestamp(ms / 1000, UTC)
    if ms % 1000:
        return dt.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True, slots=True)
class ReplayRange:
    """Whole ``1m`` window instances ``[start, end)`` (epoch ms)."""

    start: int
    end: int

    @classmethod
    def aligned(cls, t1: int, t2: int) -> ReplayRange:
        """``[t1, t2)`` widened to whole minutes (raises ``ValueError`` unless t1 < t2)."""
        if t2 <= t1:
            raise ValueError(f"--to ({fmt_time(t2)}) must be after --from ({fmt_time(t1)})")
        start = t1 - t1 % MINUTE_MS
        end = -(-t2 // MINUTE_MS) * MINUTE_MS
        return cls(start, end)

    def holds(self, start_ms: int) -> bool:
        """Whether a window instance starting at ``start_ms`` lies in the range (a window of
        the range starts within it: every tumbling size divides a minute)."""
        return self.start <= start_ms < self.end

    def __str__(self) -> str:
        return f"[{fmt_time(self.start)}, {fmt_time(self.end)})"


def check_closed(kind: EventKind, partition: int, rng: ReplayRange, watermark: int | None) -> None:
    """Refuse a partition whose windows in the range may still change."""
    if watermark is None:
        raise ReplayRefused(
            f"{kind.value} partition {partition} has no watermark in the store yet (no worker "
            f"applied it), so the range {rng} is not closed there."
        )
    if watermark < rng.end:
        raise ReplayRefused(
            f"{kind.value} partition {partition} is not closed for the range {rng}: its "
            f"watermark is {fmt_time(watermark)}, so windows before {fmt_time(rng.end)} "
            "may still change."
        )


def replay_bounds(
    rng: ReplayRange, worker: TimeBounds, lateness_ms: int, now_ms: int
) -> TimeBounds:
    """The validation bounds of a replay at ``now_ms``: the worker's clock skew, and an age
    bound that reaches back to the range (and never shorter than the worker's)."""
    reach = now_ms - rng.start + lateness_ms + MINUTE_MS
    return TimeBounds(max(worker.max_age_ms, reach), worker.max_skew_ms)


# --------------------------------------------------------------------------- the rebuild


@dataclass(slots=True)
class PartitionProgress:
    """What a replay read of one partition so far."""

    max_event_time: int = windows.NO_EVENT_YET
    records: int = 0  # records read
    invalid: int = 0
    late: int = 0  # late events of the range
    events: int = 0  # on-time events of the range (counted in its windows)
    closed: bool = False  # an event closed the range: later ones of it are late
    last_offset: int = -1


class Rebuild:
    """The window instances of one event kind's partitions over a range, folded from their
    records in offset order (each partition's own lateness rule), and the calls that replace
    them in the store."""

    def __init__(
        self,
        kind: EventKind,
        rng: ReplayRange,
        plan: WindowPlan,
        lateness_ms: int,
        bounds: TimeBounds,
    ) -> None:
        self.kind = kind
        self.rng = rng
        self.plan = [(w, tuple(d for d in dims if d in keys.DIMS[kind])) for w, dims in plan]
        self.lateness_ms = lateness_ms
        self.bounds = bounds
        self.nf = packed.NF_APPLOG if kind is EventKind.APPLOG else packed.NF_SENSOR
        self.rows = OpenRows(self.nf)
        self.parts: dict[int, PartitionProgress] = {}

    def progress(self, partition: int) -> PartitionProgress:
        """A partition's read progress (created on first use)."""
        return self.parts.setdefault(partition, PartitionProgress())

    def feed(
        self,
        partition: int,
        offsets: Sequence[int],
        values: Sequence[bytes | None],
        now_ms: int,
    ) -> int:
        """Fold a partition's next records (in offset order) in; the on-time events of the
        range among them. Records after the one that closed the range change nothing."""
        prog = self.progress(partition)
        if not values:
            return 0
        prog.records += len(values)
        prog.last_offset = offsets[-1]
        if self.kind is EventKind.SENSOR:
            sensor = decode_sensor(values, now_ms, self.bounds)
            cols, rejected = aggregation.sensor_columns(sensor.events), len(sensor.rejected)
        else:
            applog = decode_applog(values, now_ms, self.bounds)
            cols, rejected = aggregation.applog_columns(applog.events), len(applog.rejected)
        prog.invalid += rejected
        if len(cols) == 0:
            return 0
        t = cols.event_times
        late = windows.classify(t, prog.max_event_time, self.lateness_ms)
        prog.max_event_time = late.max_event_time
        if prog.max_event_time >= self.rng.end + self.lateness_ms:
            prog.closed = True
        in_range = (t >= self.rng.start) & (t < self.rng.end)
        keep = late.on_time & in_range
        prog.late += int(np.count_nonzero(in_range & ~late.on_time))
        n = int(np.count_nonzero(keep))
        prog.events += n
        if n:
            self.absorb(partition, cols.select(keep) if n < len(cols) else cols)
        return n

    def advance(self, partition: int, event_times: npt.NDArray[np.int64]) -> None:
        """Valid events of a partition outside the range, next in offset order: they only
        raise its running maximum (a late one never does, so taking the maximum of all of
        them is the rule)."""
        prog = self.progress(partition)
        prog.records += int(event_times.size)
        if event_times.size:
            prog.max_event_time = max(prog.max_event_time, int(event_times.max()))
            if prog.max_event_time >= self.rng.end + self.lateness_ms:
                prog.closed = True

    def absorb(self, partition: int, cols: aggregation.Columns) -> None:
        """Fold on-time events of the range (of one partition) into its window instances."""
        deltas = aggregation.aggregate(cols, self.plan)
        if not deltas:
            return
        groups = [((partition, d.window.name, d.dim, d.start_ms), d.names) for d in deltas]
        self.rows.absorb(groups, packed.concat([d.table for d in deltas]))

    def instances(self, partition: int) -> list[WindowDelta]:
        """A partition's rebuilt window instances with their final values, by window, dim and
        start (each a :class:`WindowDelta` whose table holds the absolute values)."""
        rows: dict[tuple[str, str, int], tuple[list[int], list[str]]] = {}
        for ik in self.rows.instances():
            if ik[0] == partition:
                names, idx = self.rows.members(ik)
                if names:
                    rows[ik[1:]] = (idx, names)
        by_name = {w.name: w for w, _ in self.plan}
        out = []
        for (wname, dim, start), (idx, names) in sorted(rows.items()):
            # entities by name: the same hash whatever the order the records came in
            order = sorted(range(len(names)), key=names.__getitem__)
            names = [names[i] for i in order]
            table = self.rows.table(np.asarray([idx[i] for i in order], dtype=np.int64))
            out.append(WindowDelta(by_name[wname], dim, start, names, table, partition))
        return out


# --------------------------------------------------------------------------- anomalies

Closing = list[tuple[int, list[str], packed.Table]]  # closed windows: (start, entities, values)


class Redetect:
    """The anomalies of one event kind's partitions over a range, raised again by the worker's
    detectors: fresh ones stepped over the warm-up windows, then the range's (each partition's
    oldest first, the warm-up's before the range's)."""

    def __init__(self, kind: EventKind, rng: ReplayRange, threshold: float, warmup_ms: int) -> None:
        self.kind = kind
        self.rng = rng
        self.dim = DETECT_DIMS[kind]
        self.detectors = KindDetectors(kind, DETECT_WINDOW, window_params(kind, threshold))
        size = DETECT_WINDOW.size_ms
        self.warm_from = max(rng.start - max(warmup_ms, 0), 0) // size * size
        self.found: dict[int, list[anomaly.AnomalyRecord]] = {}
        self.warm_windows = 0  # warm-up windows stepped (over partitions)
        self.first_warm: int | None = None  # the oldest of them
        self._last: dict[int, int] = {}  # per partition: the newest window start stepped

    def warmup_starts(self) -> range:
        """Starts of the detected windows of the warm-up span, oldest first."""
        return range(self.warm_from, self.rng.start, DETECT_WINDOW.size_ms)

    def step(self, closings: Mapping[int, Closing]) -> None:
        """Step each partition's next closed windows (oldest first, after those stepped
        before); keep the anomalies raised in the range."""
        for p, closing in closings.items():
            starts = [start for start, _, _ in closing]
            if starts != sorted(set(starts)) or (starts and starts[0] <= self._last.get(p, -1)):
                raise ValueError(f"windows of partition {p} must come once each, oldest first")
            if starts:
                self._last[p] = starts[-1]
                warm = [t for t in starts if t < self.rng.start]
                self.warm_windows += len(warm)
                if warm and (self.first_warm is None or warm[0] < self.first_warm):
                    self.first_warm = warm[0]
        for p, found in self.detectors.detect_many(closings).items():
            self.found.setdefault(p, []).extend(
                a for a in found.anomalies if self.rng.holds(a.window_start_ms)
            )

    def range_windows(self, instances: Sequence[WindowDelta]) -> Closing:
        """The detected windows among a partition's rebuilt instances, oldest first."""
        return sorted(
            (
                (d.start_ms, list(d.names), d.table)
                for d in instances
                if d.window == DETECT_WINDOW and d.dim == self.dim and d.names
            ),
            key=lambda w: w[0],
        )

    def anomalies(self, partition: int) -> list[anomaly.AnomalyRecord]:
        """The partition's anomalies of the range, by id."""
        return sorted(self.found.get(partition, []), key=lambda a: a.id)


@dataclass(slots=True)
class ReplaceCall:
    """One partition's ``pulse_replace`` call: the hashes and sorted sets of the range it
    writes whole, the keys of the range it deletes and, when recomputed, the anomalies the
    range holds (``None``: anomalies untouched)."""

    kind: EventKind
    partition: int
    closed: int  # the range's end: the stored watermark must be at or past it
    hashes: list[HashWrite] = field(default_factory=list)
    zsets: list[ZsetWrite] = field(default_factory=list)
    delete: list[str] = field(default_factory=list)
    anomalies: list[anomaly.AnomalyRecord] | None = None
    anomaly_span: tuple[int, int] = (0, 0)  # [from, to): the window starts they replace

    def payload(self) -> tuple[list[str], list[bytes | str]]:
        """KEYS and ARGV of the call (see ``store_functions.lua``)."""
        key_list = [keys.progress_key(self.kind, self.partition)]
        args: list[bytes | str] = [b""]
        h: list[list[int]] = []
        for w in self.hashes:
            key_list.append(w.key)
            h.append([len(key_list), w.expire_at_s, len(w.fields)])
            for f, v in zip(w.fields, w.values, strict=True):
                args.append(f)
                args.append(v)
        z: list[list[object]] = []
        for zs in self.zsets:
            key_list.append(zs.key)
            flat: list[object] = []
            for member, score in zip(zs.members, zs.scores, strict=True):
                flat.append(score)
                flat.append(member)
            z.append([len(key_list), zs.expire_at_s, flat])
        x: list[int] = []
        for k in self.delete:
            key_list.append(k)
            x.append(len(key_list))
        header: dict[str, object] = {"closed": self.closed, "h": h, "z": z, "x": x}
        if self.anomalies is not None:
            key_list.append(keys.anomalies_key(self.kind, self.partition))
            key_list.append(keys.anomaly_index_key(self.kind, self.partition))
            entries: list[object] = []
            for a in self.anomalies:
                entries.append(a.id)
                entries.append(a.window_start_ms)
                args.append(anomaly.encode_record(a))
            n = len(key_list)
            header["a"] = [n - 1, n, *self.anomaly_span, entries]
        args[0] = orjson.dumps(header)
        return key_list, args


def anomaly_board(
    kind: EventKind,
    partition: int,
    anomalies: Iterable[tuple[str, int]],
    retention: Retention,
) -> list[ZsetWrite]:
    """The anomaly board of each ``1m`` instance from the partition's anomaly records of the
    range: (entity, detection window start) each."""
    board, dim = ANOMALY_BOARD[kind]
    return leaderboards.count_writes(
        kind,
        partition,
        board,
        ((keys.board_member(dim, entity), t) for entity, t in anomalies),
        lambda start: retention.expire_at_s(keys.BOARD_WINDOW, start),
    )


def replace_call(
    kind: EventKind,
    partition: int,
    rng: ReplayRange,
    instances: Sequence[WindowDelta],
    anomaly_boards: Sequence[ZsetWrite],
    existing: Iterable[str],
    retention: Retention,
    now_ms: int,
    anomalies: Sequence[anomaly.AnomalyRecord] | None = None,
) -> ReplaceCall:
    """The call that makes a partition's range hold exactly ``instances`` (absolute values,
    from :meth:`Rebuild.instances`) and their leaderboards, with the anomaly boards given,
    and, unless ``anomalies`` is None, exactly these anomalies of the range.

    ``existing``: the partition's window and board keys of the range the store holds now;
    those the rebuild does not write are deleted. Boards are written whole (a count board's
    scores are the instance's totals, not a poll's increments). Keys whose expiry has passed
    are not written (the worker's would have expired too), nor anomalies past the worker's
    cut (they go with the ``1m`` windows).
    """
    call = ReplaceCall(kind, partition, rng.end)
    if anomalies is not None:
        cut = now_ms - keys.WINDOW_1M.size_ms - retention.seconds[keys.WINDOW_1M.name] * 1000
        call.anomalies = sorted(
            (a for a in anomalies if a.window_start_ms > cut and rng.holds(a.window_start_ms)),
            key=lambda a: a.id,
        )
        call.anomaly_span = (rng.start, rng.end)
    now_s = now_ms // 1000
    writes: list[HashWrite] = []
    for d in instances:
        if not d.names:
            continue
        values = packed.encode(d.table)
        writes.append(
            HashWrite(
                keys.window_key(kind, partition, d.window, d.dim, d.start_ms),
                retention.expire_at_s(d.window, d.start_ms),
                list(d.names),
                values,
            )
        )
    boards = [d for d in instances if d.window == keys.BOARD_WINDOW and d.names]
    p99: list[npt.NDArray[np.float64]] = []
    for d in boards:
        if leaderboards.needs_p99(kind, d):
            p99.append(packed.quantiles(d.table, (0.99,))[:, 0])
        else:
            p99.append(np.full(len(d.names), np.nan))
    zsets = leaderboards.board_writes(
        kind,
        partition,
        boards,
        [d.table.stats for d in boards],
        p99,
        [retention.expire_at_s(d.window, d.start_ms) for d in boards],
    )
    zsets = _merged([*zsets, *anomaly_boards])
    call.hashes = [w for w in writes if w.expire_at_s > now_s]
    call.zsets = [z for z in zsets if z.expire_at_s > now_s and z.members]
    written = {w.key for w in call.hashes} | {z.key for z in call.zsets}
    call.delete = sorted(set(existing) - written)
    return call


def _merged(writes: Sequence[ZsetWrite]) -> list[ZsetWrite]:
    """One write per key: members of writes to the same key are added up (counts) or take the
    largest score (``gt``); a board's members are whole after this."""
    by_key: dict[str, tuple[ZsetWrite, dict[str, float]]] = {}
    for z in writes:
        first, scores = by_key.setdefault(z.key, (z, {}))
        for m, s in zip(z.members, z.scores, strict=True):
            if z.mode == "incr":
                scores[m] = scores.get(m, 0.0) + s
            elif z.mode == "gt":
                scores[m] = max(scores.get(m, -math.inf), s)
            else:
                scores[m] = s
    out = []
    for key, (first, scores) in by_key.items():
        names = sorted(scores)
        out.append(
            ZsetWrite(key, first.expire_at_s, "set", names, [float(scores[m]) for m in names])
        )
    return out


def range_key(
    kind: EventKind, partition: int, key: str, rng: ReplayRange, plan: WindowPlan
) -> bool:
    """Whether ``key`` is a window key of a planned dim, or a board key, of this partition
    whose instance lies in the range (what a replay of the range owns)."""
    prefix = f"{keys.PREFIX}:{{{keys.partition_tag(kind, partition)}}}:"
    if not key.startswith(prefix):
        return False
    rest = key[len(prefix) :].split(":")
    try:
        start = int(rest[-1])
    except ValueError:
        return False
    if not rng.holds(start):
        return False
    if rest[0] == "w" and len(rest) == 4:
        return any(w.name == rest[1] and rest[2] in dims for w, dims in plan)
    if rest[0] == "top" and len(rest) == 3:
        name = rest[1]
        return name in keys.BOARDS or name.startswith(f"{keys.Board.DEVICE_MAX}.")
    return False


def counts_by_instance(progress: Mapping[int, PartitionProgress]) -> tuple[int, int, int]:
    """Totals over partitions: (records read, on-time events of the range, late ones)."""
    return (
        sum(p.records for p in progress.values()),
        sum(p.events for p in progress.values()),
        sum(p.late for p in progress.values()),
    )
