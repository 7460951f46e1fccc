"""Anomaly detection in the worker: detectors stepped on closed window instances.

Each kind watches one dimension (sensor: ``device|metric``; applog: the service) in one window
(10 s by default). When a partition's watermark closes an instance, every entity in it steps
its detectors once per signal (``schemas.anomaly.SIGNALS``) with the instance's final
statistics: the mean and maximum reading and whether its readings mostly repeat the one before
them (a stuck sensor); a service's median latency and error rate.
Detector state is partition state checkpointed with the offset. A row's state is written every
``SNAPSHOT_EVERY`` of its steps (rows are staggered): its stepped columns whole (the head,
0.5-1.3 KB) and, of its profile, the chunks its steps changed since (192 bytes each). Not every
step: the inputs of the steps since are the closed windows' final values, which the store holds
anyway (written with the offsets that closed them). Each apply that steps detectors also writes
the partition's *replay point* (``@from``): the oldest window a row stepped since its snapshot.
A restore loads the snapshots and steps each row again through the stored windows from the
replay point on (raising nothing: those anomalies are stored). A row that steps rarely (an
entity seen in few windows) is saved once its oldest unsaved step is ``REPLAY_WINDOWS`` windows
old, so a restore never reads more closed windows than that. A window closes at a fixed point
of the partition's record sequence (when its watermark passes the window's end), so a crash, a
rebalance or a replay steps the same detectors with the same values, and raises the same
anomalies under the same ids, once.
"""

from __future__ import annotations

import logging
import math
import struct
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from itertools import repeat
from typing import Any

import numpy as np
import numpy.typing as npt

from pipeline.detectors import (
    CHUNKS,
    DEFAULT_PARAMS,
    DetectorBank,
    DetectorParams,
    SnapshotError,
    StepResult,
    decode,
    holds_profile,
    rows_bytes,
)
from schemas import anomaly, keys, packed
from schemas.events import EventKind

log = logging.getLogger("pulse.detection")

# the dimension each kind's detectors watch
DETECT_DIMS: dict[EventKind, str] = {
    EventKind.SENSOR: keys.Dim.DEVICE,
    EventKind.APPLOG: keys.Dim.SERVICE,
}
_FIELD_SEP = "~"  # detector state field: "<entity>~<signal>" (identifiers cannot hold it)
REPLAY_FIELD = "@from"  # the partition's replay point (decimal window start; -1: none)
SNAPSHOT_EVERY = 30  # a row's state is written every this many of its steps (5 min at 10 s)
REPLAY_WINDOWS = 2 * SNAPSHOT_EVERY  # ... and at the latest when a restore would otherwise
# replay more closed windows than this (a row that steps rarely: a sparse or silent entity)
MAX_ENTITIES = 20_000  # entities a partition's detectors watch at most (see _evict)
IDLE_MS = 7 * 86_400_000  # an entity not stepped for this long (event time) is forgotten
FLAT_MIN_READINGS = 3  # "flat" is judged on windows of at least this many readings
FLAT_SHARE = 0.6  # ... and holds when a window's readings mostly repeat the one before them
RANGE_SCALES = 5.0  # the range test of window signals: beyond the seen range by 5 scales
# the signals stepped with the contextual (kNN) test, the most costly part of a step: those
# whose shape over time is the point; a window's maximum and its `flat` flag are watched for
# spikes, shifts, runs and range only (at about half the cost of a step)
CONTEXT_SIGNALS = frozenset(
    {anomaly.Signal.MEAN, anomaly.Signal.LATENCY, anomaly.Signal.ERROR_RATE}
)
_ROW_HEAD = struct.Struct("<qq")  # the row's last window start stepped, its steps so far
_ERRORS_AT = keys.Stat.PACKED_APPLOG.index(keys.Stat.ERRORS)


@dataclass(slots=True)
class Detected:
    """What a partition's closed windows raised: the detector states to write and anomalies."""

    fields: list[str] = field(default_factory=list)
    states: list[bytes] = field(default_factory=list)
    anomalies: list[anomaly.AnomalyRecord] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)  # state fields of forgotten entities


MEAN_DIGITS = 10  # significant digits of a window mean the detectors see


def steady(x: npt.NDArray[np.float64], digits: int = MEAN_DIGITS) -> npt.NDArray[np.float64]:
    """``x`` rounded to ``digits`` significant digits.

    A window's sum is a float sum whose last bits depend on how its events were grouped into
    polls (a crash or a restart groups them differently); the detectors, whose kNN and rank
    tests can turn a last-bit difference into another score, see the same value either way.
    """
    with np.errstate(all="ignore"):
        exp = np.floor(np.log10(np.abs(x)))
        scale = np.where(np.isfinite(exp), 10.0 ** (digits - 1 - exp), 1.0)
        rounded = np.round(x * scale) / scale
        return np.where(np.isfinite(rounded) & (x != 0), rounded, x)


def signal_values(kind: EventKind, table: packed.Table) -> dict[str, npt.NDArray[np.float64]]:
    """Each signal's value per row of a window table (NaN where the row has no events)."""
    st = table.stats
    n = st[:, packed.COUNT]
    with np.errstate(all="ignore"):
        if kind is EventKind.SENSOR:
            return {
                anomaly.Signal.MEAN: steady(np.where(n > 0, st[:, packed.SUM] / n, np.nan)),
                anomaly.Signal.MAX: np.where(n > 0, st[:, packed.MAX], np.nan),
                # a stuck sensor repeats one value: equal readings are surprising only
                # against the entity's own history of them (the detector learns that)
                anomaly.Signal.FLAT: np.where(
                    n >= FLAT_MIN_READINGS, flat_windows(n, st[:, packed.REPEATS]), np.nan
                ),
            }
        return {
            # latency is multiplicative (log-normal): detected as log(1 + ms), reported in ms
            anomaly.Signal.LATENCY: np.log1p(packed.quantiles(table, (0.5,))[:, 0]),
            anomaly.Signal.ERROR_RATE: np.where(
                n > 0, error_evidence(st[:, _ERRORS_AT], n), np.nan
            ),
        }


def flat_windows(
    n: npt.NDArray[np.float64], repeats: npt.NDArray[np.float64]
) -> npt.NDArray[np.float64]:
    """The ``flat`` signal of windows of ``n`` readings, ``repeats`` of which equal the reading
    before them (in the series' order): 1 when the repeats and the reading they start from make
    up ``FLAT_SHARE`` of the readings (and at least ``FLAT_MIN_READINGS``), else 0.

    A stuck sensor shorter than two windows need not fill one: a 12-second freeze at 1.5
    readings a second can put 6 equal readings in a window beside 3 ordinary ones. Counting
    repeats sees it, where min = max cannot; and a quiet series whose rounded readings are
    often equal in pairs seldom repeats most of a window's readings.
    """
    need = np.maximum(FLAT_MIN_READINGS, FLAT_SHARE * n)
    return (repeats + 1 >= need).astype(np.float64)


ERROR_Z = 3.0  # the error-rate signal: the Wilson lower bound at this many standard errors
ERROR_FLOOR = 0.1  # ... and a bound below this share counts as no evidence (0)


def error_evidence(
    errors: npt.NDArray[np.float64], n: npt.NDArray[np.float64]
) -> npt.NDArray[np.float64]:
    """The error-rate signal of a window: the share of errors it *shows*.

    A window of a partition may see a handful of a service's requests: one error among eight is
    a share of 12.5 % but evidence of almost nothing, while a burst (most requests failing)
    keeps a high bound. The detectors watch the Wilson lower bound (``ERROR_Z``), and a bound
    below ``ERROR_FLOOR`` counts as 0: a service whose windows mostly show no error would
    otherwise alarm on the first that shows one.
    """
    bound = wilson_lower(errors, n, ERROR_Z)
    out: npt.NDArray[np.float64] = np.where(bound < ERROR_FLOOR, 0.0, bound)
    return out


def wilson_lower(
    k: npt.NDArray[np.float64], n: npt.NDArray[np.float64], z: float
) -> npt.NDArray[np.float64]:
    """The lower bound of the Wilson score interval of ``k`` successes in ``n`` trials."""
    with np.errstate(all="ignore"):
        nn = np.maximum(n, 1.0)
        p = k / nn
        z2 = z * z / nn
        bound = (p + z2 / 2 - z * np.sqrt(p * (1 - p) / nn + z2 / (4 * nn))) / (1 + z2)
    out: npt.NDArray[np.float64] = np.clip(bound, 0.0, 1.0)
    return out


def window_params(
    kind: EventKind,
    threshold: float = DEFAULT_PARAMS.threshold,
    base: DetectorParams = DEFAULT_PARAMS,
) -> DetectorParams:
    """The detectors' tuning for window signals of ``kind`` at alarm level ``threshold``.

    Each entity is watched through several signals, so each signal's alarm level is raised to
    keep the entity's false-alarm rate (Bonferroni: the tail probability times the number of
    signals; the score is ``L / (L + half_score)`` of ``L = -log10 p``). A window's statistics
    trend with the daily cycle while a young entity's seen range is still narrow: the range
    test asks for :data:`RANGE_SCALES` robust scales beyond it (a spike or a drift of a few
    readings moves a window's maximum by far more).
    """
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be within (0, 1), got {threshold}")
    level = threshold * base.half_score / (1.0 - threshold) + math.log10(len(anomaly.SIGNALS[kind]))
    return replace(base, threshold=level / (level + base.half_score), range_scales=RANGE_SCALES)


class KindDetectors:
    """The detectors of one event kind's partitions: a block of bank rows per (partition,
    entity), one row per signal, with each row's last window start, step count and first
    unsaved step.

    Rows are found by entity (one lookup per entity and closed window, whatever the number of
    signals); a row's field name in the store (``<entity>~<signal>``) is built only when its
    state is written.
    """

    def __init__(
        self,
        kind: EventKind,
        window: keys.TumblingWindow,
        params: DetectorParams | None = None,
        snapshot_every: int = SNAPSHOT_EVERY,
        replay_windows: int = REPLAY_WINDOWS,
        max_entities: int = MAX_ENTITIES,
        idle_ms: int = IDLE_MS,
    ) -> None:
        self.kind = kind
        self.window = window
        self.dim = DETECT_DIMS[kind]
        self.signals = anomaly.SIGNALS[kind.value]
        self._signal_at = {s: j for j, s in enumerate(self.signals)}
        self._context = np.array([s in CONTEXT_SIGNALS for s in self.signals])
        # an entity's rows are a block of one row per signal, and a step takes one signal of
        # many entities at a time: the bank keeps each signal's rows together
        self.bank = DetectorBank(0, params or window_params(kind), group=len(self.signals))
        # whether its signals read the windows' sketches (a sensor's read statistics only)
        self.needs_sketches = kind is EventKind.APPLOG
        self.snapshot_every = snapshot_every
        self.replay_windows = max(replay_windows, 1)
        self.max_entities = max(max_entities, 1)
        # an idle entity is forgotten only once a restore can no longer replay any of its
        # steps (twice the replay span): forgetting it then is the same in every run
        self.idle_ms = max(idle_ms, 2 * self.replay_windows * window.size_ms)
        self.evicted = 0  # entities forgotten because a partition watched max_entities
        self._capped: set[int] = set()  # partitions whose cap was said (once while held)
        self._rows: dict[int, dict[str, int]] = {}  # partition -> entity -> first row of block
        self._entity: list[str] = []  # per block (row // len(signals)): its entity
        self._free: list[int] = []  # first rows of free blocks
        self._last = np.zeros(0, np.int64)  # per row: window start of its last step
        self._steps = np.zeros(0, np.int64)  # per row: steps so far
        self._unsaved = np.zeros(0, np.int64)  # per row: first step's start since saved, or -1
        self._phase = np.zeros(0, np.int64)  # per row: which step count % every saves it
        self._held = np.zeros(0, np.int64)  # per row: the profile chunks the store holds
        self.refused = 0  # stored states that could not be decoded (started afresh)

    def watched(self) -> int:
        """Entities watched, over every partition held."""
        return sum(len(mine) for mine in self._rows.values())

    def restored(self, partition: int) -> bool:
        """Whether the partition's detectors are loaded."""
        return partition in self._rows

    def restore(self, partition: int, stored: Mapping[bytes, bytes]) -> int | None:
        """Load a partition's stored detector states (``field -> snapshot``), replacing any;
        returns the replay point: the first window start to step again from the store's
        closed windows (:meth:`replay`), or None.

        A state that does not decode (another version, damaged, an unknown signal) is logged
        and started afresh: one entity's history is lost, never the worker.
        """
        self.drop(partition)
        mine: dict[str, int] = {}
        self._rows[partition] = mine
        replay_from: int | None = None
        heads: list[int] = []  # rows restored from a head (their profile is in chunks)
        chunks: list[tuple[int, int, bytes]] = []  # row, chunk, bytes
        loaded: list[int] = []  # rows whose state decoded, and their states
        decoded: list[npt.NDArray[np.float64]] = []
        plain: list[int] = []  # of those, the rows stepped without context
        for raw_name, blob in stored.items():
            name = raw_name.decode("utf-8", "replace")
            if name == REPLAY_FIELD:
                try:
                    at = int(blob)
                except ValueError:
                    self.refused += 1
                    continue
                replay_from = at if at >= 0 else None
                continue
            entity, _, signal = name.rpartition(_FIELD_SEP)
            chunk = -1
            if _FIELD_SEP in entity:  # a profile chunk: <entity>~<signal>~<chunk>
                digits = signal.isascii() and signal.isdigit() and len(signal) <= 2
                chunk = int(signal) if digits else CHUNKS
                entity, _, signal = entity.rpartition(_FIELD_SEP)
            j = self._signal_at.get(signal)
            if not entity or j is None or chunk >= CHUNKS:
                self.refused += 1
                log.warning(
                    "detector state %s of partition %d refused: no such signal or chunk",
                    name, partition,
                )  # fmt: skip
                continue
            block = mine.get(entity)
            row = (int(self._blocks(mine, [entity])[0]) if block is None else block) + j
            if chunk >= 0:
                chunks.append((row, chunk, bytes(blob)))
                self._held[row] |= 1 << chunk
                continue
            try:
                last, steps = _ROW_HEAD.unpack_from(blob)
                state = bytes(blob[_ROW_HEAD.size :])
                decoded.append(decode(state))
            except (SnapshotError, struct.error) as exc:  # the row stays fresh
                self.refused += 1
                log.warning("detector state %s of partition %d refused: %s", name, partition, exc)
                continue
            loaded.append(row)
            self._last[row], self._steps[row] = last, steps
            if not holds_profile(state):
                heads.append(row)
            if not self._context[j]:  # saved by a release that stepped it with context
                plain.append(row)
        if loaded:  # one bank call for the partition's rows (one per row was most of a restore)
            self.bank.set_rows(loaded, np.stack(decoded))
        self._restore_chunks(partition, heads, chunks)
        # last: what a release that stepped these with context stored for them (chunks too)
        # is zeroed, and counted as changed
        self.bank.drop_context(plain)
        return replay_from

    def _restore_chunks(
        self, partition: int, heads: list[int], chunks: list[tuple[int, int, bytes]]
    ) -> None:
        """Complete the rows restored from heads with their stored profile chunks.

        A chunk the store holds that is not loaded (of a row whose state was refused or
        written whole by an earlier release) is counted as changed, so the row's next
        snapshot writes or deletes it: stored chunks always complete the stored head.
        """
        rows = np.fromiter((c[0] for c in chunks), np.int64, len(chunks))
        which = np.fromiter((c[1] for c in chunks), np.int64, len(chunks))
        on_head = np.isin(rows, heads)
        ok = self.bank.restore_chunks(
            rows[on_head], which[on_head], [c[2] for c, h in zip(chunks, on_head, strict=True) if h]
        )
        self.bank.take_dirty(np.asarray(heads, dtype=np.int64))  # loaded as stored
        if not ok.all():
            bad = np.unique(rows[on_head][~ok])
            self.refused += int(bad.size)
            log.warning(
                "detector states of %d entity signals of partition %d refused: a damaged "
                "profile chunk", bad.size, partition,
            )  # fmt: skip
            self._reset(bad)  # the row starts afresh, as if its state had not decoded
        applied = np.zeros(len(self._held), np.int64)
        np.bitwise_or.at(applied, rows[on_head][ok], np.left_shift(1, which[on_head][ok]))
        touched = np.unique(rows)
        self.bank.mark_dirty(touched, self._held[touched] & ~applied[touched])

    def drop(self, partition: int) -> None:
        """Forget a partition's detectors (restored from the store when next needed)."""
        blocks = list(self._rows.pop(partition, {}).values())
        self._capped.discard(partition)
        if blocks:
            rows = self._block_rows(np.asarray(blocks, dtype=np.int64))
            self._reset(rows)
            self._held[rows] = 0
            self._free.extend(blocks)

    def _reset(self, rows: npt.NDArray[np.int64]) -> None:
        """Forget what ``rows`` have seen."""
        self.bank.clear(rows)
        self._last[rows] = 0
        self._steps[rows] = 0
        self._unsaved[rows] = -1

    def clear(self) -> None:
        """Forget every partition."""
        for p in list(self._rows):
            self.drop(p)

    def replay(
        self, partition: int, closing: Sequence[tuple[int, list[str], packed.Table]]
    ) -> None:
        """Step the rows again through stored closed windows (oldest first), each only past
        its snapshot; raises nothing (those anomalies are stored) and saves nothing."""
        steps = self._plan({partition: closing})
        if steps is None:
            return
        # a row's steps come in window order, so those past its snapshot are those after the
        # last window it holds now
        behind = np.flatnonzero(steps.t > self._last[steps.rows])
        for take in _rounds(steps.rows[behind]):
            at = behind[take]
            self._step(steps.rows[at], steps.t[at], steps.values[at])

    def detect(
        self, partition: int, closing: Sequence[tuple[int, list[str], packed.Table]]
    ) -> Detected:
        """:meth:`detect_many` for one partition."""
        return self.detect_many({partition: closing}).get(partition, Detected())

    def detect_many(
        self, closings: Mapping[int, Sequence[tuple[int, list[str], packed.Table]]]
    ) -> dict[int, Detected]:
        """Step the detectors of each partition's closed instances (oldest first): per
        partition, the states to write (the rows due a snapshot, and the replay point) and the
        anomalies raised, in the order of their instances.

        A step depends on its row's own history only, so rows are stepped in rounds by their
        own count of steps: the first step of every row that steps, then the second, and so
        on. One bank call per round costs per call more than per row, and a poll that closes
        many instances of few entities each (a sparse backlog) needs as many rounds as an
        entity has steps, not as many as there are instances.
        """
        out = {p: Detected() for p, c in closings.items() if c}
        steps = self._plan({p: closings[p] for p in out})
        if steps is None:
            return out
        # per alarm: its position in step order, cause, score, expected value and vector
        alarms: list[tuple[int, int, float, float, npt.NDArray[np.float32]]] = []
        rows = steps.rows
        for take in _rounds(rows):
            res = self._step(rows[take], steps.t[take], steps.values[take])
            if res.alarm.any():
                hit = np.flatnonzero(res.alarm)
                vectors = self.bank.anomaly_vector(rows[take[hit]], res.score[hit])
                alarms += zip(
                    take[hit].tolist(),
                    res.cause[hit].tolist(),
                    res.score[hit].tolist(),
                    res.expected[hit].tolist(),
                    vectors,
                    strict=True,
                )
        for h, cause, score, expected, vector in sorted(alarms, key=lambda a: a[0]):
            i, c = int(steps.at[h]), int(steps.instance[h])
            out[steps.parts[c]].anomalies.append(
                self._record(
                    steps.parts[c],
                    steps.starts[c],
                    steps.names[i],
                    self.signals[int(steps.sig[h])],
                    cause,
                    score,
                    float(steps.values[h]),
                    expected,
                    int(steps.table.stats[i, packed.COUNT]),
                    vector,
                )
            )
        part_of = np.asarray(steps.parts, dtype=np.int64)[steps.instance]
        for p, detected in out.items():
            self._save(p, rows[part_of == p], detected)
        return out

    def _plan(
        self, closings: Mapping[int, Sequence[tuple[int, list[str], packed.Table]]]
    ) -> _Steps | None:
        """Every step of the partitions' closed instances (new entities get rows), in
        instance order per partition, then signal, then entity; None if they hold none."""
        parts: list[int] = []
        starts: list[int] = []
        names: list[str] = []
        tables: list[packed.Table] = []
        blocks_l: list[npt.NDArray[np.int64]] = []
        for p, closing in closings.items():
            mine = self._rows.setdefault(p, {})
            for start, entities, table in closing:
                parts.append(p)
                starts.append(start)
                names += entities
                tables.append(table)
                blocks_l.append(self._blocks(mine, entities))
        if not tables:
            return None
        # every instance's rows in one table: the signals are computed row by row, once
        table = packed.concat(tables)
        instance = np.repeat(np.arange(len(tables)), [len(b) for b in blocks_l])
        blocks = np.concatenate(blocks_l)
        at_l, sig_l, vals_l = [], [], []
        for signal, values in signal_values(self.kind, table).items():
            at = np.flatnonzero(np.isfinite(values))
            at_l.append(at)
            sig_l.append(np.full(at.size, self._signal_at[signal], dtype=np.int64))
            vals_l.append(values[at])
        at, sig = np.concatenate(at_l), np.concatenate(sig_l)
        order = np.argsort(instance[at] * len(self.signals) + sig, kind="stable")
        at, sig = at[order], sig[order]
        return _Steps(
            rows=blocks[at] + sig,
            t=np.asarray(starts, dtype=np.int64)[instance[at]],
            values=np.concatenate(vals_l)[order],
            at=at,
            sig=sig,
            instance=instance[at],
            table=table,
            names=names,
            parts=parts,
            starts=starts,
        )

    def _save(self, partition: int, every: npt.NDArray[np.int64], out: Detected) -> None:
        """The states of the rows due a snapshot (``every``: the rows the poll stepped, in
        order), the fields of the entities forgotten and the partition's replay point."""
        _, first = np.unique(every, return_index=True)
        rows = every[np.sort(first)]  # each row once, in the order it first stepped
        if rows.size:
            out.deleted, freed = self._evict(partition, int(self._last[rows].max()))
            if freed.size:
                rows = rows[~np.isin(rows, freed)]
        # a row is saved every `snapshot_every` of its steps (staggered by name), not on its
        # first: until then the replay point covers its whole history
        due = self._steps[rows] % self.snapshot_every == self._phase[rows]
        save = rows[due]
        mine = self._rows[partition]
        owned = self._block_rows(np.fromiter(mine.values(), np.int64, len(mine)))
        if rows.size:
            # rows whose oldest unsaved step is about to leave the replay span are saved now,
            # stepped or not: a restore then reads at most REPLAY_WINDOWS closed windows
            newest = int(self._last[rows].max())
            horizon = newest - (self.replay_windows - 1) * self.window.size_ms
            unsaved = self._unsaved[owned]
            late = owned[(unsaved >= 0) & (unsaved <= horizon)]
            saved = np.zeros(len(self._last), dtype=bool)
            saved[save] = True
            save = np.concatenate([save, late[~saved[late]]])
        self._unsaved[save] = -1
        width = len(self.signals)
        out.fields = [
            f"{self._entity[r // width]}{_FIELD_SEP}{self.signals[r % width]}"
            for r in save.tolist()
        ]
        heads = np.empty((save.size, 2), dtype="<i8")  # _ROW_HEAD: last start, steps
        heads[:, 0], heads[:, 1] = self._last[save], self._steps[save]
        out.states = [
            h + b
            for h, b in zip(
                rows_bytes(heads.view(np.uint8)), self.bank.snapshot_heads(save), strict=True
            )
        ]
        self._save_chunks(save, out)
        unsaved = self._unsaved[owned]
        unsaved = unsaved[unsaved >= 0]
        out.fields.append(REPLAY_FIELD)
        out.states.append(str(int(unsaved.min()) if unsaved.size else -1).encode())

    def _save_chunks(self, save: npt.NDArray[np.int64], out: Detected) -> None:
        """The profile chunks of the rows saved that changed since their last snapshot (after
        ``out.fields``, whose first ``len(save)`` are the rows' own): each written, or deleted
        if it is zero again (a row started afresh) and the store holds it; a chunk that is zero
        and not stored stays so."""
        changed = self.bank.take_dirty(save)
        at, which = np.nonzero(changed[:, None] >> np.arange(CHUNKS) & 1)
        if not at.size:
            return
        rows = save[at]
        blobs, zero = self.bank.chunks(rows, which)
        bit = np.left_shift(1, which)
        stored = self._held[rows] & bit != 0
        heads = out.fields[: save.size]

        def named(pick: npt.NDArray[np.int64]) -> list[str]:
            pairs = zip(at[pick].tolist(), which[pick].tolist(), strict=True)
            return [f"{heads[i]}{_FIELD_SEP}{c}" for i, c in pairs]

        write = np.flatnonzero(~zero)
        gone = np.flatnonzero(zero & stored)
        out.fields += named(write)
        out.states += [blobs[k] for k in write.tolist()]
        out.deleted += named(gone)
        np.bitwise_or.at(self._held, rows[write], bit[write])
        np.bitwise_and.at(self._held, rows[gone], ~bit[gone])

    def _evict(self, partition: int, newest: int) -> tuple[list[str], npt.NDArray[np.int64]]:
        """Forget the partition's entities not stepped for ``idle_ms`` before ``newest`` (the
        newest window stepped), and past ``max_entities`` the least recently stepped (ties by
        name) down to nine tenths of it; their state fields to delete and their freed rows.

        Without this every entity ever seen (a fleet's retired devices, or identifiers that
        change with every reading) would keep its rows in memory and its state in the store.
        An idle entity has no step a restore replays, and a row idle that long starts afresh
        when it next steps (:meth:`_step`), whether or not this has run by then: forgetting it
        is the same in every run. Which entities the cap forgets depends on how many are
        watched, and a restore replays steps without the entities forgotten since: past the cap
        (an overload, counted in ``evicted``) the entities watched after a restore may differ.
        """
        mine = self._rows[partition]
        blocks = np.fromiter(mine.values(), np.int64, len(mine))
        width = len(self.signals)
        last = self._last[self._block_rows(blocks)].reshape(-1, width).max(axis=1)
        gone = last <= newest - self.idle_ms
        over = len(mine) - int(gone.sum()) - self.max_entities
        names = list(mine) if over > 0 else []
        if over > 0:
            keep = self.max_entities - self.max_entities // 10
            count = len(mine) - int(gone.sum()) - keep
            live = np.flatnonzero(~gone).tolist()
            live.sort(key=lambda i: (int(last[i]), names[i]))
            gone[live[:count]] = True
            self.evicted += count
            if partition not in self._capped:  # then counted in the metrics hash only
                self._capped.add(partition)
                log.warning(
                    "%s partition %d: its detectors watch more than %d entities; the least "
                    "recently seen are forgotten (PULSE_WORKER_DETECT_MAX_ENTITIES)",
                    self.kind.value, partition, self.max_entities,
                )  # fmt: skip
        if not gone.any():
            return [], np.zeros(0, np.int64)
        at = np.flatnonzero(gone)
        names = names or list(mine)
        forgotten = [names[i] for i in at.tolist()]
        fields = [f"{e}{_FIELD_SEP}{s}" for e in forgotten for s in self.signals]
        freed = self._block_rows(blocks[at])
        fields += [
            f"{fields[i]}{_FIELD_SEP}{c}"
            for i, held in enumerate(self._held[freed].tolist())
            for c in range(CHUNKS)
            if held >> c & 1
        ]
        self._held[freed] = 0
        self._reset(freed)
        self._free.extend(blocks[at].tolist())
        for e in forgotten:
            del mine[e]
        return fields, freed

    def _step(
        self, rows: npt.NDArray[np.int64], t: npt.NDArray[np.int64], values: npt.NDArray[np.float64]
    ) -> StepResult:
        # a row idle for idle_ms starts afresh, whenever its entity is forgotten (_evict runs
        # once per poll, so when depends on how records were grouped into polls)
        stale = (self._steps[rows] > 0) & (self._last[rows] <= t - self.idle_ms)
        if stale.any():
            self._reset(rows[stale])
        context = self._context[rows % len(self.signals)]
        if context.all() or not context.any():
            res = self.bank.step(rows, t, values, context=bool(context.all()))
        else:
            with_, without = np.flatnonzero(context), np.flatnonzero(~context)
            a = self.bank.step(rows[with_], t[with_], values[with_])
            b = self.bank.step(rows[without], t[without], values[without], context=False)
            res = StepResult(*(_merge(x, y, with_, without) for x, y in zip(a, b, strict=True)))
        self._last[rows] = t
        self._steps[rows] += 1
        self._unsaved[rows] = np.where(self._unsaved[rows] < 0, t, self._unsaved[rows])
        return res

    def _block_rows(self, blocks: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """Every row of ``blocks`` (first rows)."""
        out: npt.NDArray[np.int64] = (blocks[:, None] + np.arange(len(self.signals))).ravel()
        return out

    def _blocks(self, mine: dict[str, int], entities: Sequence[str]) -> npt.NDArray[np.int64]:
        """The first row of each entity's block (a new entity gets a free block)."""
        at = np.fromiter(map(mine.get, entities, repeat(-1)), np.int64, len(entities))
        miss = np.flatnonzero(at < 0)
        if miss.size:
            new = list(dict.fromkeys(entities[i] for i in miss.tolist()))
            width = len(self.signals)
            for e, b in zip(new, self._alloc(len(new)).tolist(), strict=True):
                mine[e] = b
                self._entity[b // width] = e
                # a row's snapshot phase is a function of its name: the same after a restore
                for j, s in enumerate(self.signals):
                    name = f"{e}{_FIELD_SEP}{s}"
                    self._phase[b + j] = zlib.crc32(name.encode()) % self.snapshot_every
            at[miss] = np.fromiter((mine[entities[i]] for i in miss.tolist()), np.int64, miss.size)
        return at

    def _alloc(self, count: int) -> npt.NDArray[np.int64]:
        """``count`` free blocks (their first rows); the bank grows by doubling (adding rows
        copies the whole state, and new entities arrive a few at a time)."""
        short = count - len(self._free)
        if short > 0:
            width = len(self.signals)
            blocks = max(short, len(self._entity), 64)
            fresh = self.bank.add(blocks * width)
            grow = np.zeros(fresh.size, np.int64)
            self._last = np.concatenate([self._last, grow])
            self._steps = np.concatenate([self._steps, grow])
            self._unsaved = np.concatenate([self._unsaved, grow - 1])
            self._phase = np.concatenate([self._phase, grow])
            self._held = np.concatenate([self._held, grow])
            self._entity += [""] * blocks
            self._free.extend(reversed(fresh[::width].tolist()))
        return np.asarray([self._free.pop() for _ in range(count)], dtype=np.int64)

    def _record(
        self,
        partition: int,
        start: int,
        entity: str,
        signal: str,
        cause: int,
        score: float,
        value: float,
        expected: float,
        n: int,
        vector: npt.NDArray[np.float32],
    ) -> anomaly.AnomalyRecord:
        context: dict[str, str | int | float] = {"n": n}
        if self.kind is EventKind.SENSOR:
            device, _, metric = entity.partition(keys.ENTITY_SEP)
            context.update(device=device, metric=metric)
        else:
            context["service"] = entity
        if signal == anomaly.Signal.LATENCY:  # back from the log scale it is detected on
            value, expected = math.expm1(value), math.expm1(min(expected, 700.0))
        return anomaly.AnomalyRecord(
            id=anomaly.anomaly_id(self.kind.value, partition, start, entity, signal),
            kind=self.kind.value,
            partition=partition,
            entity=entity,
            signal=signal,
            cause=(
                "stuck"
                if signal == anomaly.Signal.FLAT
                else anomaly.CAUSES[cause]
                if 0 <= cause < len(anomaly.CAUSES)
                else "range"
            ),
            window_start_ms=start,
            window_ms=self.window.size_ms,
            score=round(score, 6),
            value=value,
            expected=expected if np.isfinite(expected) else value,
            context=context,
            vector=vector,
        )


def _merge(
    a: npt.NDArray[Any],
    b: npt.NDArray[Any],
    at_a: npt.NDArray[np.int64],
    at_b: npt.NDArray[np.int64],
) -> npt.NDArray[Any]:
    """One array of ``a`` at positions ``at_a`` and ``b`` at ``at_b``."""
    out = np.empty(len(at_a) + len(at_b), dtype=a.dtype)
    out[at_a], out[at_b] = a, b
    return out


@dataclass(slots=True)
class _Steps:
    """Detector steps of closed instances: per step its row, window start and value; the row
    of ``table`` it reads, its signal (index) and its instance (into ``parts`` and
    ``starts``); ``names`` are ``table``'s entities."""

    rows: npt.NDArray[np.int64]
    t: npt.NDArray[np.int64]
    values: npt.NDArray[np.float64]
    at: npt.NDArray[np.int64]
    sig: npt.NDArray[np.int64]
    instance: npt.NDArray[np.int64]
    table: packed.Table
    names: list[str]
    parts: list[int]
    starts: list[int]


def _rounds(rows: npt.NDArray[np.int64]) -> list[npt.NDArray[np.int64]]:
    """The positions of ``rows`` in rounds of distinct rows: round k holds each row's k-th
    position (in order), so a row's steps are taken in their order."""
    if not rows.size:
        return []
    by_row = np.argsort(rows, kind="stable")
    first = np.r_[0, np.flatnonzero(np.diff(rows[by_row])) + 1]
    rank = np.empty(rows.size, dtype=np.int64)
    rank[by_row] = np.arange(rows.size) - np.repeat(first, np.diff(np.r_[first, rows.size]))
    by_round = np.argsort(rank, kind="stable")
    return np.split(by_round, np.cumsum(np.bincount(rank))[:-1])
