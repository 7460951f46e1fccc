"""``pulse replay --from T1 --to T2``: the I/O of a replay (sources, store), and the command.

The pure part (range, refusals, rebuild, the ``pulse_replace`` call) is :mod:`pipeline.replay`;
read its docstring for what a replay guarantees. Here: read each kind's partitions from the
archive (``read_range``, rows in offset order) or Kafka (``offsets_for_times``, then each
partition up to where the range closed), fold them into a :class:`~pipeline.replay.Rebuild`
under a progress bar, raise the range's anomalies again (:class:`~pipeline.replay.Redetect`:
fresh detectors warmed up on the store's closed ``10s`` windows before the range, then stepped
over the rebuilt ones), and replace each partition's range with one atomic ``FCALL
pulse_replace``. Every refusal is checked before the first write.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pipeline.ingest import READ_COMMITTED, read_past_unparsable, unparsable_errors
from pipeline.replay import (
    DETECT_WINDOW,
    FUNCTION_NAME,
    MINUTE_MS,
    WARMUP_MS,
    Closing,
    Rebuild,
    Redetect,
    ReplayRange,
    ReplayRefused,
    anomaly_board,
    check_closed,
    fmt_time,
    range_key,
    replace_call,
    replay_bounds,
)
from pipeline.state import Retention
from pipeline.validation import TimeBounds
from schemas import keys, packed
from schemas.argtypes import parse_time
from schemas.events import EventKind

if TYPE_CHECKING:
    import redis

    from pipeline.archive.storage import ArchiveStore
    from pipeline.settings import WorkerSettings

log = logging.getLogger("pulse.replay")

# Records per Kafka fetch and rows per archive slice fed at once.
CHUNK = 5_000
KAFKA_TIMEOUT_S = 60.0
WARMUP_SLICE = 90  # warm-up windows read from the store (and stepped) at once per partition

EPILOG = """\
The range is widened to whole minutes. It must be closed in every partition (the partition's
stored watermark at or past its end) and held by the source (the archive's markers and files,
Kafka's retained log), else nothing is written and one sentence says why (exit status 1).

Per partition, one atomic call (FCALL pulse_replace) replaces every window and leaderboard key
of the range as a whole (and deletes the range's keys with nothing left), after checking the
watermark again: the live worker never writes a closed range, so a replay never double-counts,
and replaying twice leaves the same store.

Anomalies (while PULSE_WORKER_DETECT is on): fresh detectors, the worker's, step over the
closed 10 s windows the store holds from --warmup before T1 (default 6h), then over the
range's rebuilt windows; the range's anomaly records, their index entries and the anomaly
boards become what they raise, in the same atomic call. A warm-up that reaches the start of
the data raises the worker's anomalies exactly (same ids); a shorter one starts the detectors
younger. The live feed, detector states, progress hashes, entity registries and positions are
never touched. With detection off, anomalies are left as they are.

Kafka: each partition is read from offsets_for_times(T1 - clock skew - lateness) (record
timestamps are the producers' clocks: an event may be at most max_clock_skew_s ahead of its
record's timestamp) until the range closes. Archive: the rows at or after T1, in offset order.
"""


def _time_arg(text: str) -> int:
    try:
        return parse_time(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


_UNITS = {"s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def _duration_arg(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(
            f"expected a duration such as 0, 30m, 6h or 1d, got {text!r}"
        )
    ms = float(match.group(1)) * _UNITS[match.group(2) or "s"]
    if ms > 366 * _UNITS["d"]:
        raise argparse.ArgumentTypeError(f"must be at most 366d, got {text!r}")
    return int(ms)


def _rate_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected events per second, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``pulse replay``."""
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "--from", dest="t1", required=True, type=_time_arg, metavar="T1",
        help="start of the range (ISO 8601, UTC unless it names a zone, or epoch s/ms)",
    )  # fmt: skip
    parser.add_argument(
        "--to", dest="t2", required=True, type=_time_arg, metavar="T2",
        help="end of the range, exclusive (rounded up to the minute)",
    )  # fmt: skip
    parser.add_argument(
        "--source", choices=("archive", "kafka"), default="archive",
        help="where to read the events: the raw-event archive (PULSE_ARCHIVE_URL) or Kafka",
    )  # fmt: skip
    parser.add_argument("--url", default=None, help="the archive (default: PULSE_ARCHIVE_URL)")
    parser.add_argument(
        "--rate", type=_rate_arg, default=0.0, metavar="R",
        help="read at most R events (records) per second; 0: as fast as possible",
    )  # fmt: skip
    parser.add_argument(
        "--warmup", type=_duration_arg, default=WARMUP_MS, metavar="DURATION",
        help="how far before T1 the detectors warm up on the stored 10 s windows, e.g. 30m, "
        "6h, 1d, 0 for none (default: 6h; at most what the store holds)",
    )  # fmt: skip
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


# --------------------------------------------------------------------------- store side


@dataclass(slots=True)
class StoredPartition:
    """A partition's progress, as the store has it."""

    offset: int
    watermark: int | None
    topic: str | None


def stored_partitions(client: redis.Redis, kind: EventKind) -> dict[int, StoredPartition]:
    """Every partition of ``kind`` with a progress hash: applied offset, watermark, topic."""
    names = sorted(
        k for k in map(_name, client.scan_iter(match=keys.progress_pattern(kind), count=1000)) if k
    )
    out: dict[int, StoredPartition] = {}
    pipe = client.pipeline(transaction=False)
    parts = []
    for name in names:
        k, p = keys.parse_tag(name)
        if name != keys.progress_key(k, p):
            continue
        parts.append(p)
        pipe.hmget(name, keys.Progress.OFFSET, keys.Progress.WATERMARK, keys.Progress.TOPIC)
    for p, reply in zip(parts, pipe.execute(raise_on_error=False), strict=True):
        if isinstance(reply, Exception):  # a key of another type: no worker applies it either
            log.warning("%s partition %d left out: its progress key %s", kind.value, p, reply)
            continue
        off, wm, topic = reply
        out[p] = StoredPartition(
            int(off) if off is not None else -1,
            int(wm) if wm is not None else None,
            keys.text(topic) if topic is not None else None,
        )
    return out


def existing_keys(
    client: redis.Redis, kind: EventKind, rng: ReplayRange, plan: Any
) -> dict[int, list[str]]:
    """Per partition, the window and board keys of the range the store holds now."""
    out: dict[int, list[str]] = {}
    for pattern in (
        f"{keys.PREFIX}:{{{kind.value}.*}}:w:*",
        f"{keys.PREFIX}:{{{kind.value}.*}}:top:*",
    ):
        for raw in client.scan_iter(match=pattern, count=1000):
            key = _name(raw)
            try:
                k, p = keys.parse_tag(key)
            except ValueError:  # not a key of the worker's (an empty name: not UTF-8)
                continue
            if range_key(k, p, key, rng, plan):
                out.setdefault(p, []).append(key)
    return out


def warmup_windows(
    client: redis.Redis, kind: EventKind, partitions: Sequence[int], dim: str, starts: range
) -> dict[int, Closing]:
    """Per partition, the detected windows the store holds among ``starts`` (oldest first);
    one that does not decode is left out (logged), as a worker's restore does."""
    if not starts:
        return {}
    per = {
        p: [keys.window_key(kind, p, DETECT_WINDOW, dim, start) for start in starts]
        for p in partitions
    }
    pipe = client.pipeline(transaction=False)
    for ks in per.values():
        pipe.exists(*ks)
    held = [p for p, n in zip(per, pipe.execute(), strict=True) if n]  # most spans hold none
    names = [(p, start, k) for p in held for start, k in zip(starts, per[p], strict=True)]
    pipe = client.pipeline(transaction=False)
    for _, _, k in names:
        pipe.hgetall(k)
    nf = packed.NF_APPLOG if kind is EventKind.APPLOG else packed.NF_SENSOR
    out: dict[int, Closing] = {}
    for (p, start, k), stored in zip(names, pipe.execute(raise_on_error=False), strict=True):
        if isinstance(stored, Exception):  # a key of another type
            log.warning("window %s left out of the detectors' warm-up: %s", k, stored)
            continue
        if not stored:
            continue
        try:
            fields = packed.entity_values(stored)
            table = packed.decode(list(fields.values()), nf)
            entities = [f.decode() for f in fields]
        except ValueError as exc:  # PackedError, or a name that is not UTF-8
            log.warning("window %s left out of the detectors' warm-up: %s", k, exc)
            continue
        out.setdefault(p, []).append((start, entities, table))
    return out


def redetect(
    client: redis.Redis,
    cfg: ReplayConfig,
    rebuilds: dict[EventKind, Rebuild],
    partitions: dict[EventKind, list[int]],
) -> dict[EventKind, Redetect]:
    """Each kind's anomalies of the range: the detectors warmed up on the store's windows,
    a slice of starts at a time, then stepped over the rebuilt windows."""
    out: dict[EventKind, Redetect] = {}
    for kind, rb in rebuilds.items():
        rd = Redetect(kind, cfg.rng, cfg.threshold, cfg.warmup_ms)
        parts = partitions[kind]
        starts = rd.warmup_starts()
        for lo in range(0, len(starts), WARMUP_SLICE):
            rd.step(warmup_windows(client, kind, parts, rd.dim, starts[lo : lo + WARMUP_SLICE]))
        rd.step({p: rd.range_windows(rb.instances(p)) for p in parts})
        out[kind] = rd
    return out


def stored_anomalies(
    client: redis.Redis, kind: EventKind, partition: int, rng: ReplayRange
) -> list[tuple[str, int]]:
    """(entity, detection window start) of the partition's anomaly records in the range."""
    from redis.exceptions import ResponseError

    from schemas.anomaly import decode_record

    try:
        ids = client.zrangebyscore(
            keys.anomaly_index_key(kind, partition), rng.start, f"({rng.end}"
        )
        if not ids:
            return []
        blobs = client.hmget(keys.anomalies_key(kind, partition), list(ids))  # type: ignore[arg-type]
    except ResponseError as exc:  # a key of another type: no record to count
        log.warning("%s partition %d: stored anomalies left out: %s", kind.value, partition, exc)
        return []
    out = []
    for blob in blobs:
        if not isinstance(blob, bytes):
            continue
        try:
            rec = decode_record(blob)
        except ValueError:
            continue
        if rng.holds(rec.window_start_ms):
            out.append((rec.entity, rec.window_start_ms))
    return out


# --------------------------------------------------------------------------- progress display


class Meter:
    """Counts what was read; draws the progress bar (rate, ETA) and throttles to ``rate``."""

    def __init__(self, total: int, rate: float, quiet: bool, label: str) -> None:
        self.rate = rate
        self.read = 0
        self.t0 = time.monotonic()
        self._progress: Any = None
        self._task: Any = None
        if not quiet:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TaskProgressColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                TaskProgressColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]} events/s"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=False,
            )
            self._progress.start()
            self._task = self._progress.add_task(label, total=max(total, 1), rate="-")

    def grow(self, total: int) -> None:
        """A new estimate of the records to read."""
        if self._progress is not None:
            self._progress.update(self._task, total=max(total, 1))

    async def advance(self, n: int) -> None:
        """``n`` more records read; sleeps as long as the read runs ahead of ``rate``."""
        self.read += n
        if self.rate > 0:
            ahead = self.read / self.rate - (time.monotonic() - self.t0)
            if ahead > 0:
                await asyncio.sleep(ahead)
        if self._progress is not None:
            self._progress.update(self._task, advance=n, rate=f"{self.events_per_s:,.0f}")

    @property
    def seconds(self) -> float:
        """Seconds since the meter started."""
        return time.monotonic() - self.t0

    @property
    def events_per_s(self) -> float:
        """Records read per second so far."""
        return self.read / max(self.seconds, 1e-9)

    def close(self) -> None:
        """Stop drawing."""
        if self._progress is not None:
            self._progress.stop()


# --------------------------------------------------------------------------- sources


@dataclass(slots=True)
class ReplayConfig:
    """Everything a replay needs besides the store client."""

    rng: ReplayRange
    plan: Any
    lateness_ms: int
    bounds: TimeBounds
    retention: Retention
    skew_ms: int
    topics: dict[EventKind, str]
    bootstrap: str
    archive_url: str
    rate: float = 0.0
    quiet: bool = False
    detect: bool = False  # recompute the anomalies (the worker detects)
    threshold: float = 0.5  # the worker's alarm level
    warmup_ms: int = WARMUP_MS
    clock: Callable[[], int] = field(default=lambda: time.time_ns() // 1_000_000)
    kafka_security: dict[str, Any] = field(default_factory=dict)  # KafkaSettings.client_kwargs()

    @classmethod
    def from_settings(
        cls, rng: ReplayRange, worker: WorkerSettings, archive_url: str | None = None, **kw: Any
    ) -> ReplayConfig:
        """The worker's rules (window plan, lateness, bounds, retention) for ``rng``."""
        from pipeline.settings import ArchiveSettings, KafkaSettings

        kafka = KafkaSettings()
        lateness = int(worker.allowed_lateness_s * 1000)
        now = time.time_ns() // 1_000_000
        bounds = TimeBounds(int(worker.max_event_age_s * 1000), int(worker.max_clock_skew_s * 1000))
        return cls(
            rng=rng,
            plan=worker.window_plan(),
            lateness_ms=lateness,
            bounds=replay_bounds(rng, bounds, lateness, now),
            retention=Retention({"10s": worker.retention_10s_s, "1m": worker.retention_1m_s}),
            skew_ms=bounds.max_skew_ms,
            topics={EventKind.SENSOR: kafka.sensor_topic, EventKind.APPLOG: kafka.applog_topic},
            bootstrap=kafka.bootstrap,
            archive_url=archive_url or ArchiveSettings().resolved_url(),
            detect=worker.detect,
            threshold=worker.detect_threshold,
            kafka_security=kafka.client_kwargs(),
            **kw,
        )


def _json_values(table: Any, lo: int, hi: int) -> list[bytes]:
    """Rows ``lo:hi`` of an archive table as the JSON events the worker read (same fields,
    same values; ``schema_version`` is the default)."""
    import orjson

    piece = table.slice(lo, hi - lo)
    fields = [n for n in piece.column_names if n not in ("partition", "offset")]
    cols = [piece.column(f).to_pylist() for f in fields]
    return [orjson.dumps(dict(zip(fields, row, strict=True))) for row in zip(*cols, strict=True)]


def _runs(first: Any, second: Any) -> list[tuple[bool, int, int]]:
    """Two ascending offset arrays merged: runs (from ``first``?, lo, hi) in offset order, each
    a slice of its array."""
    import numpy as np

    tags = np.concatenate((np.zeros(first.size, np.bool_), np.ones(second.size, np.bool_)))
    order = np.argsort(np.concatenate((first, second)), kind="stable")
    tags = tags[order]
    out: list[tuple[bool, int, int]] = []
    at = {False: 0, True: 0}
    edges = [0, *(np.flatnonzero(np.diff(tags.astype(np.int8))) + 1).tolist(), tags.size]
    for lo, hi in itertools.pairwise(edges):
        if hi <= lo:
            continue
        tag = bool(tags[lo])
        out.append((not tag, at[tag], at[tag] + hi - lo))
        at[tag] += hi - lo
    return out


async def read_archive(
    cfg: ReplayConfig,
    rebuilds: dict[EventKind, Rebuild],
    stored: dict[EventKind, dict[int, StoredPartition]],
) -> Meter:
    """Fold the archive's rows of the range into the rebuilds, each partition's in offset
    order with the later rows' event times (they only raise its maximum); refuse what the
    archive cannot serve."""
    from pipeline.archive.storage import ArchiveError, ArchiveStore

    try:
        return await _read_archive(ArchiveStore(cfg.archive_url), cfg, rebuilds, stored)
    except ArchiveError as exc:
        raise ReplayRefused(f"{exc}.") from None
    except OSError as exc:  # not a directory, no such file, no permission: nothing written
        why = str(exc).rstrip(".")
        raise ReplayRefused(f"cannot read the archive at {cfg.archive_url}: {why}.") from None


async def _read_archive(
    archive: ArchiveStore,
    cfg: ReplayConfig,
    rebuilds: dict[EventKind, Rebuild],
    stored: dict[EventKind, dict[int, StoredPartition]],
) -> Meter:
    extent = archive.extent()
    rng = cfg.rng
    plans = {}
    for kind in rebuilds:
        ext = extent[kind]
        markers = archive.markers(kind)
        if ext.min_event_time is None:
            raise ReplayRefused(f"the archive at {cfg.archive_url} holds no {kind.value} events.")
        if rng.start < ext.min_event_time - ext.min_event_time % MINUTE_MS:
            raise ReplayRefused(
                f"the archive's {kind.value} events begin at {fmt_time(ext.min_event_time)}, "
                f"after the range {rng} starts."
            )
        for p, sp in stored[kind].items():
            marker = markers.get(p)
            if marker is None:
                raise ReplayRefused(f"the archive holds nothing of {kind.value} partition {p}.")
            if sp.topic and marker.topic and sp.topic != marker.topic:
                raise ReplayRefused(
                    f"the archive's {kind.value} partition {p} holds topic {marker.topic!r}, "
                    f"the store's offsets belong to {sp.topic!r}."
                )
        within = archive.read_range(kind, rng.start, rng.end)
        after = archive.read_range(kind, rng.end, 2**62, ["partition", "offset", "event_time"])
        plans[kind] = (within, after, markers)
    total = sum(w.num_rows + a.num_rows for w, a, _ in plans.values())
    meter = Meter(total, cfg.rate, cfg.quiet, f"replay {rng} from the archive")
    try:
        for kind, (within, after, markers) in plans.items():
            rb = rebuilds[kind]
            for p, sp in sorted(stored[kind].items()):
                rb.progress(p)
                mine = _rows_of(within, p, sp.offset)
                later = _rows_of(after, p, sp.offset)
                offsets = mine.column("offset").to_numpy()
                later_off = later.column("offset").to_numpy()
                later_t = later.column("event_time").to_numpy()
                for from_range, lo, hi in _runs(offsets, later_off):
                    if not from_range:
                        rb.advance(p, later_t[lo:hi])
                        await meter.advance(hi - lo)
                        continue
                    for a in range(lo, hi, CHUNK):
                        b = min(a + CHUNK, hi)
                        rb.feed(p, offsets[a:b].tolist(), _json_values(mine, a, b), cfg.clock())
                        await meter.advance(b - a)
                marker = markers[p]
                if not rb.progress(p).closed and marker.last_offset < sp.offset:
                    raise ReplayRefused(
                        f"the archive holds {kind.value} partition {p} only up to offset "
                        f"{marker.last_offset}, before the range {rng} closes there "
                        f"(the store applied up to {sp.offset})."
                    )
    finally:
        meter.close()
    return meter


def _rows_of(table: Any, partition: int, max_offset: int) -> Any:
    """The rows of one partition at or below ``max_offset`` (the table is ordered)."""
    import pyarrow.compute as pc

    mask = pc.and_(
        pc.equal(table.column("partition"), partition),
        pc.less_equal(table.column("offset"), max_offset),
    )
    return table.filter(mask)


async def read_kafka(
    cfg: ReplayConfig,
    rebuilds: dict[EventKind, Rebuild],
    stored: dict[EventKind, dict[int, StoredPartition]],
) -> Meter:
    """Fold each partition's records from where the range may begin until it closed (or up
    to the store's applied offset); refuse what Kafka no longer holds."""
    from aiokafka import AIOKafkaConsumer, TopicPartition
    from aiokafka.errors import KafkaError

    from schemas.kafka_probe import client_log_muted

    unparsable = unparsable_errors()
    rng = cfg.rng
    consumer = AIOKafkaConsumer(
        bootstrap_servers=cfg.bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="none",
        isolation_level=READ_COMMITTED,  # what the worker read (see pipeline.ingest)
        max_partition_fetch_bytes=4 * 1024 * 1024,
        fetch_max_bytes=32 * 1024 * 1024,
        **cfg.kafka_security,
    )
    try:
        with client_log_muted():  # a Kafka that is down is said once, below
            await consumer.start()
    except KafkaError as exc:
        await consumer.stop()
        raise ReplayRefused(f"cannot read Kafka at {cfg.bootstrap}: {exc}.") from None
    meter: Meter | None = None
    try:
        tps: dict[TopicPartition, tuple[EventKind, int]] = {}
        for kind in rebuilds:
            topic = cfg.topics[kind]
            held = consumer.partitions_for_topic(topic)
            if held is None:
                await consumer._client.force_metadata_update()
                held = consumer.partitions_for_topic(topic)
            for p, sp in stored[kind].items():
                if sp.topic and sp.topic != topic:
                    raise ReplayRefused(
                        f"the store's {kind.value} partition {p} holds offsets of topic "
                        f"{sp.topic!r}, not of {topic!r}."
                    )
                if not held or p not in held:
                    raise ReplayRefused(f"Kafka has no partition {p} of topic {topic!r}.")
                tps[TopicPartition(topic, p)] = (kind, p)
        if not tps:
            return Meter(0, cfg.rate, True, "")
        firsts = await consumer.beginning_offsets(list(tps))
        ends = await consumer.end_offsets(list(tps))
        since = rng.start - cfg.skew_ms - cfg.lateness_ms
        found = await consumer.offsets_for_times({tp: max(since, 0) for tp in tps})
        start: dict[TopicPartition, int] = {}
        stop: dict[TopicPartition, int] = {}  # last offset to read
        for tp, (kind, p) in tps.items():
            sp = stored[kind][p]
            at = found.get(tp)
            s = at.offset if at is not None else ends[tp]
            if firsts[tp] > 0 and s <= firsts[tp]:
                raise ReplayRefused(
                    f"Kafka no longer holds the start of the range {rng} in {kind.value} "
                    f"partition {p}: its log starts at offset {firsts[tp]}."
                )
            last = min(sp.offset, ends[tp] - 1)
            if last < sp.offset:
                raise ReplayRefused(
                    f"Kafka's {kind.value} partition {p} ends at offset {ends[tp]}, before the "
                    f"store's applied offset {sp.offset} (was the topic recreated?)."
                )
            start[tp], stop[tp] = s, last
        total = sum(max(stop[tp] - start[tp] + 1, 0) for tp in tps)
        meter = Meter(total, cfg.rate, cfg.quiet, f"replay {rng} from Kafka")
        todo = {tp for tp in tps if start[tp] <= stop[tp]}
        consumer.assign(list(todo))
        for tp in todo:
            consumer.seek(tp, start[tp])
        estimate = total
        # Records are folded in chunks of CHUNK per partition, whatever the fetches returned:
        # float sums then add up in the same order on every run (a replay twice is identical).
        buffers: dict[TopicPartition, list[Any]] = {tp: [] for tp in todo}
        nxt = {tp: start[tp] for tp in todo}  # the offset after the last record read
        while todo:
            try:
                batches = await consumer.getmany(*todo, timeout_ms=1000, max_records=CHUNK)
            except unparsable as exc:  # read again around it; it counts as invalid
                batches = await read_past_unparsable(
                    consumer, {tp: nxt[tp] for tp in todo}, exc, max_records=CHUNK, timeout_ms=1000
                )
            for tp, msgs in batches.items():
                if tp not in todo:
                    continue
                if msgs:
                    nxt[tp] = msgs[-1].offset + 1
                kind, p = tps[tp]
                rb = rebuilds[kind]
                buf = buffers[tp]
                buf.extend(m for m in msgs if m.offset <= stop[tp])
                ended = not msgs or msgs[-1].offset >= stop[tp]
                while len(buf) >= CHUNK or (ended and buf):
                    part, buf[:] = buf[:CHUNK], buf[CHUNK:]
                    rb.feed(p, [m.offset for m in part], [m.value for m in part], cfg.clock())
                    await meter.advance(len(part))
                    if rb.progress(p).closed:
                        ended = True
                        if buf or part[-1].offset < stop[tp]:
                            estimate -= stop[tp] - part[-1].offset
                            meter.grow(estimate)
                        buf.clear()
                if ended:
                    todo.discard(tp)
                    consumer.pause(tp)
        return meter
    finally:
        if meter is not None:
            meter.close()
        await consumer.stop()


# --------------------------------------------------------------------------- the command


@dataclass(slots=True)
class ReplayReport:
    """What a replay did."""

    records: int = 0
    events: int = 0
    late: int = 0
    invalid: int = 0
    partitions: int = 0
    written: int = 0
    deleted: int = 0
    anomalies: int | None = None  # anomalies the range holds now (None: not recomputed)
    anomalies_removed: int = 0  # stored ones of the range no longer raised
    warmup_windows: int = 0
    warmup_from: int | None = None  # the oldest warm-up window stepped
    read_s: float = 0.0
    seconds: float = 0.0

    @property
    def events_per_s(self) -> float:
        """Records read per second (reading and rebuilding, not the store writes)."""
        return self.records / max(self.read_s, 1e-9)


def replay(
    client: redis.Redis,
    cfg: ReplayConfig,
    source: str,
    kinds: Sequence[EventKind] = tuple(EventKind),
) -> ReplayReport:
    """Replay ``cfg.rng`` from ``source`` ("archive" or "kafka") into the store.

    Raises :class:`ReplayRefused` (nothing written) when the range cannot be replayed.
    """
    from pipeline.store_writer import function_source

    t0 = time.monotonic()
    rng = cfg.rng
    stored = {kind: stored_partitions(client, kind) for kind in kinds}
    if not any(stored.values()):
        raise ReplayRefused(
            "the store holds no partition progress: no worker has applied anything."
        )
    for kind in kinds:
        for p, sp in sorted(stored[kind].items()):
            check_closed(kind, p, rng, sp.watermark)
    rebuilds = {kind: Rebuild(kind, rng, cfg.plan, cfg.lateness_ms, cfg.bounds) for kind in kinds}
    reader = read_archive if source == "archive" else read_kafka
    meter = asyncio.run(reader(cfg, rebuilds, stored))
    report = ReplayReport(records=meter.read, read_s=meter.seconds)
    found: dict[EventKind, Redetect] = {}
    if cfg.detect:
        found = redetect(client, cfg, rebuilds, {k: sorted(stored[k]) for k in kinds})
        report.anomalies = 0
        report.warmup_windows = sum(rd.warm_windows for rd in found.values())
        firsts = [rd.first_warm for rd in found.values() if rd.first_warm is not None]
        report.warmup_from = min(firsts, default=None)
    client.execute_command(  # type: ignore[no-untyped-call]
        "FUNCTION", "LOAD", "REPLACE", function_source()
    )
    now = cfg.clock()
    for kind in kinds:
        rb = rebuilds[kind]
        existing = existing_keys(client, kind, rng, rb.plan)
        for p in sorted(stored[kind]):
            prog = rb.progress(p)
            report.events += prog.events
            report.late += prog.late
            report.invalid += prog.invalid
            raised = found[kind].anomalies(p) if kind in found else None
            at = (
                [(a.entity, a.window_start_ms) for a in raised]
                if raised is not None
                else stored_anomalies(client, kind, p, rng)
            )
            call = replace_call(
                kind,
                p,
                rng,
                rb.instances(p),
                anomaly_board(kind, p, at, cfg.retention),
                existing.get(p, []),
                cfg.retention,
                now,
                raised,
            )
            key_list, args = call.payload()
            reply = client.execute_command(  # type: ignore[no-untyped-call]
                "FCALL", FUNCTION_NAME, len(key_list), *key_list, *args
            )
            if int(reply[0]) != 1:
                raise ReplayRefused(
                    f"{kind.value} partition {p} is not closed for the range {rng} any more "
                    f"(stored watermark {keys.text(reply[1]) or 'none'})."
                )
            report.partitions += 1
            report.written += int(reply[1])
            report.deleted += int(reply[2])
            if report.anomalies is not None:
                report.anomalies += int(reply[3])
                report.anomalies_removed += int(reply[4])
    report.seconds = time.monotonic() - t0
    return report


def run(args: argparse.Namespace) -> int:
    """Run ``pulse replay``; 0 when the range was replaced, 1 when refused, 2 on bad input."""
    import redis as redis_mod

    from pipeline.settings import StoreSettings, WorkerSettings
    from schemas.settings import StoreRole, store_client

    try:
        rng = ReplayRange.aligned(args.t1, args.t2)
    except ValueError as exc:
        print(f"pulse replay: {exc}.", file=sys.stderr)
        return 2
    cfg = ReplayConfig.from_settings(
        rng, WorkerSettings(), args.url, rate=args.rate, quiet=args.quiet, warmup_ms=args.warmup
    )
    if rng.end > cfg.clock() + MINUTE_MS:
        print(f"pulse replay: the range {rng} ends in the future.", file=sys.stderr)
        return 2
    store = StoreSettings()
    client = store_client(store, timeout_s=60.0, role=StoreRole.WORKER)
    try:
        report = replay(client, cfg, args.source)
    except ReplayRefused as exc:
        print(f"pulse replay: {exc}", file=sys.stderr)
        return 1
    except redis_mod.RedisError as exc:
        why = str(exc).rstrip(".")
        print(f"pulse replay: the store at {store.url()} failed: {why}.", file=sys.stderr)
        return 1
    finally:
        client.close()
    if report.anomalies is None:
        found = "anomalies not recomputed (detection is off)"
    else:
        since = (
            f"from {fmt_time(report.warmup_from)}"
            if report.warmup_from is not None
            else "none stored before the range"
        )
        found = (
            f"{report.anomalies:,} anomalies ({report.anomalies_removed:,} stored ones no "
            f"longer raised; detectors warmed up on {report.warmup_windows:,} windows, {since})"
        )
    print(
        f"replayed {rng} from {args.source}: {report.records:,} records read, "
        f"{report.events:,} on-time events in {report.partitions} partitions "
        f"({report.late:,} late, {report.invalid:,} invalid); {report.written:,} keys replaced, "
        f"{report.deleted:,} deleted; {found}; {report.events_per_s:,.0f} events/s read, "
        f"{report.seconds:.1f} s in all"
    )
    return 0


def _name(raw: bytes) -> str:
    """A key name from a scan, or "" if it is not UTF-8 (no key of the worker's)."""
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return ""
