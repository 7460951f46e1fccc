"""The archive's layout and its exactly-once rules (pure: names, progress markers, flush plans).

Files, relative to the archive's root (a local path or any fsspec URL)::

    <kind>/date=YYYY-MM-DD/hour=HH/p<partition>-<first>-<last>.parquet   the events
    _progress/<kind>/p<partition>.json                                    the partition's marker

A file holds the valid events of one Kafka partition whose event time falls in one UTC hour,
read from the **segment** of offsets ``first..last`` (zero-padded to 12 digits). A segment is
what one flush of the partition took: every offset after the previous segment up to ``last``,
invalid records included (they are simply not archived). A flush writes one file per event-time
hour its rows touch, all named by the same segment, so names never collide: segments of a
partition are disjoint and a segment has at most one file per hour directory.

The archive owns its offsets; Kafka's committed offsets are only a hint. The marker
(``Progress``) is the commit point of a flush:

1. the marker is rewritten with the flush's file paths as ``pending`` (the intent);
2. each file is written under a temporary name (``.<name>.tmp``, beside it) and renamed;
3. the marker is rewritten with ``last_offset`` = the segment's last offset and no pending.

Markers are written the same way (temporary name, then rename), so each step is atomic. On
assignment the archive deletes what a crashed flush left (the pending files, whole or not, and
the temporaries) and reads the partition from ``last_offset + 1``. A file is part of the archive
iff its ``last`` is at most its partition's ``last_offset``: a reader never sees the files of an
unfinished flush, a restart never writes an offset twice, and every read record at or below
``last_offset`` is skipped (a re-read range). Recovery reads one marker per partition (no
listing, which grows with the archive's history and is slow on object stores).
"""

from __future__ import annotations

import calendar
import itertools
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any, Final

import numpy as np
import orjson
import pyarrow as pa

from schemas.events import EventKind

HOUR_MS: Final = 3_600_000
DAY_MS: Final = 24 * HOUR_MS
OFFSET_DIGITS: Final = 12
PROGRESS_DIR: Final = "_progress"
TMP_SUFFIX: Final = ".tmp"

_FILE = re.compile(
    r"^(?P<kind>[a-z]+)/date=(?P<date>\d{4}-\d\d-\d\d)/hour=(?P<hour>\d\d)/"
    r"p(?P<partition>\d+)-(?P<first>\d+)-(?P<last>\d+)\.parquet$"
)

_DICT = pa.dictionary(pa.int32(), pa.string())
# Columns after partition, offset and event_time, per kind: low-cardinality strings are
# dictionary-encoded (in Arrow, and so in Parquet); trace ids are unique, so plain.
_FIELDS: Final[dict[EventKind, tuple[tuple[str, pa.DataType], ...]]] = {
    EventKind.SENSOR: (
        ("device_id", _DICT),
        ("site", _DICT),
        ("metric", _DICT),
        ("value", pa.float64()),
        ("unit", _DICT),
        ("lat", pa.float64()),
        ("lon", pa.float64()),
        ("firmware", _DICT),
    ),
    EventKind.APPLOG: (
        ("service", _DICT),
        ("route", _DICT),
        ("level", _DICT),
        ("status_code", pa.int16()),
        ("latency_ms", pa.float64()),
        ("trace_id", pa.string()),
        ("message", _DICT),
    ),
}
_KEYS: Final = (("partition", pa.int32()), ("offset", pa.int64()), ("event_time", pa.int64()))


def schema(kind: EventKind) -> pa.Schema:
    """The Arrow schema of a kind's archived rows (as files hold them and readers get them)."""
    return pa.schema([*_KEYS, *_FIELDS[kind]])


def _plain_schema(kind: EventKind) -> pa.Schema:
    """:func:`schema` with plain strings (rows are buffered so, and encoded per file)."""
    return pa.schema([(f.name, pa.string() if f.type == _DICT else f.type) for f in schema(kind)])


# ---------------------------------------------------------------------------------------------
# names


@dataclass(frozen=True, slots=True, order=True)
class FileRef:
    """An archive file: the partition, the UTC hour its events fall in, its segment."""

    kind: EventKind
    partition: int
    hour_ms: int
    first: int
    last: int

    @property
    def path(self) -> str:
        """Its path relative to the archive's root."""
        name = f"p{self.partition}-{self.first:0{OFFSET_DIGITS}d}-{self.last:0{OFFSET_DIGITS}d}"
        return f"{hour_dir(self.kind, self.hour_ms)}/{name}.parquet"


def hour_dir(kind: EventKind, hour_ms: int) -> str:
    """The directory of a kind's files for the UTC hour starting at ``hour_ms``."""
    tm = time.gmtime(hour_ms // 1000)
    return (
        f"{kind.value}/date={tm.tm_year:04d}-{tm.tm_mon:02d}-{tm.tm_mday:02d}/hour={tm.tm_hour:02d}"
    )


def date_dir(kind: EventKind, day_ms: int) -> str:
    """The directory of a kind's files for the UTC day containing ``day_ms``."""
    return hour_dir(kind, day_ms).rsplit("/", 1)[0]


def parse_file(path: str) -> FileRef | None:
    """The file a relative path names, or None (a temporary, a marker, anything else)."""
    m = _FILE.match(path)
    if m is None:
        return None
    try:
        kind = EventKind(m["kind"])
        day = time.strptime(m["date"], "%Y-%m-%d")
    except ValueError:
        return None
    hour = int(m["hour"])
    if hour > 23:
        return None
    day_ms = calendar.timegm(day) * 1000
    return FileRef(
        kind, int(m["partition"]), day_ms + hour * HOUR_MS, int(m["first"]), int(m["last"])
    )


def tmp_path(path: str) -> str:
    """The temporary name a file is written under before it is renamed to ``path``.

    Beside it (a rename within a directory), hidden: dataset readers skip names starting
    with ``.``, so a reader scanning the directories never picks one up.
    """
    head, _, name = path.rpartition("/")
    return f"{head}/.{name}{TMP_SUFFIX}" if head else f".{name}{TMP_SUFFIX}"


def is_tmp(path: str) -> bool:
    """Whether a path is a temporary name."""
    name = path.rpartition("/")[2]
    return name.startswith(".") and name.endswith(TMP_SUFFIX)


def progress_path(kind: EventKind, partition: int) -> str:
    """The partition's progress marker, relative to the archive's root."""
    return f"{PROGRESS_DIR}/{kind.value}/p{partition}.json"


def hours(t1: int, t2: int) -> list[int]:
    """The UTC hour starts whose hours meet ``[t1, t2)``."""
    if t2 <= t1:
        return []
    return list(range(t1 - t1 % HOUR_MS, t2, HOUR_MS))


def days(t1: int, t2: int) -> list[int]:
    """The UTC day starts whose days meet ``[t1, t2)``."""
    if t2 <= t1:
        return []
    return list(range(t1 - t1 % DAY_MS, t2, DAY_MS))


# ---------------------------------------------------------------------------------------------
# the progress marker


@dataclass(slots=True)
class Progress:
    """A partition's progress marker: what the archive holds of it.

    ``last_offset``: every offset up to it is archived (-1: nothing yet); ``pending``: the
    paths of a flush begun but not committed (deleted on recovery). ``topic`` records whose
    offsets these are.
    """

    topic: str | None = None
    last_offset: int = -1
    rows: int = 0
    files: int = 0
    min_event_time: int | None = None
    max_event_time: int | None = None
    pending: list[str] = field(default_factory=list)

    def committed(self, ref: FileRef) -> bool:
        """Whether a file is part of the archive (not left by an unfinished flush)."""
        return ref.last <= self.last_offset

    def resume_at(self) -> int:
        """The next offset to read: one past the highest archived offset."""
        return self.last_offset + 1

    def to_json(self) -> bytes:
        """The marker file's content."""
        return orjson.dumps(
            {
                "topic": self.topic,
                "last_offset": self.last_offset,
                "rows": self.rows,
                "files": self.files,
                "min_event_time": self.min_event_time,
                "max_event_time": self.max_event_time,
                "pending": self.pending,
            },
            option=orjson.OPT_INDENT_2,
        )

    @classmethod
    def from_json(cls, data: bytes) -> Progress:
        """A marker file's content (unknown fields ignored)."""
        d = orjson.loads(data)
        return cls(
            topic=d.get("topic"),
            last_offset=int(d["last_offset"]),
            rows=int(d.get("rows", 0)),
            files=int(d.get("files", 0)),
            min_event_time=d.get("min_event_time"),
            max_event_time=d.get("max_event_time"),
            pending=list(d.get("pending", [])),
        )


def advanced(progress: Progress, segment: Segment) -> Progress:
    """The marker once ``segment`` is committed."""
    lo = [t for t in (progress.min_event_time, segment.min_event_time) if t is not None]
    hi = [t for t in (progress.max_event_time, segment.max_event_time) if t is not None]
    return Progress(
        topic=progress.topic,
        last_offset=segment.last,
        rows=progress.rows + segment.rows,
        files=progress.files + len(segment.files),
        min_event_time=min(lo) if lo else None,
        max_event_time=max(hi) if hi else None,
    )


# ---------------------------------------------------------------------------------------------
# rows, buffers and flushes


def event_table(
    kind: EventKind, partition: int, offsets: Sequence[int], events: Sequence[Any]
) -> pa.Table:
    """The rows of a partition's valid events (decoded by ``pipeline.validation``), in order."""
    sch = _plain_schema(kind)
    n = len(events)
    cols: list[Any] = [
        np.full(n, partition, dtype=np.int32),
        np.asarray(offsets, dtype=np.int64),
        np.fromiter(map(attrgetter("event_time"), events), dtype=np.int64, count=n),
    ]
    for name, _ in _FIELDS[kind]:
        cols.append(list(map(attrgetter(name), events)))
    return pa.Table.from_arrays(
        [pa.array(c, type=f.type) for c, f in zip(cols, sch, strict=True)], schema=sch
    )


@dataclass(frozen=True, slots=True)
class Segment:
    """One flush of a partition: offsets ``first..last``, its rows in one table per hour."""

    kind: EventKind
    partition: int
    first: int
    last: int
    files: list[tuple[FileRef, pa.Table]]

    @property
    def rows(self) -> int:
        """Archived rows."""
        return sum(t.num_rows for _, t in self.files)

    @property
    def min_event_time(self) -> int | None:
        """Earliest event time of its rows."""
        lo = [_bound(t, min) for _, t in self.files if t.num_rows]
        return min(lo) if lo else None

    @property
    def max_event_time(self) -> int | None:
        """Latest event time of its rows."""
        hi = [_bound(t, max) for _, t in self.files if t.num_rows]
        return max(hi) if hi else None


def _bound(table: pa.Table, pick: Any) -> int:
    et = table.column("event_time").to_numpy()
    return int(et.min() if pick is min else et.max())


def split_by_hour(
    kind: EventKind, partition: int, first: int, last: int, rows: pa.Table
) -> Segment:
    """A segment's rows as one table per UTC event-time hour (offset order kept within)."""
    files: list[tuple[FileRef, pa.Table]] = []
    if rows.num_rows:
        final = schema(kind)
        hour = rows.column("event_time").to_numpy() // HOUR_MS
        order = np.argsort(hour, kind="stable")
        sorted_hours = hour[order]
        cuts = [0, *(np.flatnonzero(np.diff(sorted_hours)) + 1).tolist(), len(order)]
        single = len(cuts) == 2
        for lo, hi in itertools.pairwise(cuts):
            part = rows if single else rows.take(pa.array(order[lo:hi]))
            ref = FileRef(kind, partition, int(sorted_hours[lo]) * HOUR_MS, first, last)
            files.append((ref, part.cast(final)))
    return Segment(kind, partition, first, last, files)


@dataclass(slots=True)
class PartitionBuffer:
    """A partition's rows read but not flushed yet, and the offsets they came from.

    ``next_offset`` is the first offset not in a committed segment (the marker's + 1);
    ``read_to`` the last offset read (``next_offset - 1`` when nothing is pending). Records at
    or below ``read_to`` are skipped: a re-read range is never buffered twice.
    """

    kind: EventKind
    partition: int
    next_offset: int
    read_to: int = -2
    # (monotonic time read, rows) per poll, in offset order
    chunks: list[tuple[float, pa.Table]] = field(default_factory=list)
    rows: int = 0
    since: float | None = None  # when the oldest unflushed record was read

    def __post_init__(self) -> None:
        if self.read_to == -2:
            self.read_to = self.next_offset - 1

    def fresh_from(self, offsets: Sequence[int]) -> int:
        """How many leading records (by offset) were read already and are skipped."""
        skip = 0
        for o in offsets:
            if o > self.read_to:
                break
            skip += 1
        return skip

    def add(self, last_offset: int, rows: pa.Table, now: float) -> None:
        """Take a poll's fresh rows, read up to ``last_offset`` (invalid records included)."""
        if last_offset <= self.read_to:
            return
        self.read_to = last_offset
        if self.since is None:
            self.since = now
        if rows.num_rows:
            self.chunks.append((now, rows))
            self.rows += rows.num_rows

    def due(self, max_rows: int, max_seconds: float, now: float) -> bool:
        """Whether a flush is due: enough rows, or the oldest unflushed record waited long."""
        if self.read_to < self.next_offset:
            return False
        return self.rows >= max_rows or (self.since is not None and now - self.since >= max_seconds)

    def take(self, max_rows: int) -> Segment | None:
        """The next segment (at most ``max_rows`` rows), removed from the buffer; None if
        nothing was read since the last one."""
        if self.read_to < self.next_offset:
            return None
        first = self.next_offset
        tables = [t for _, t in self.chunks]
        rows = pa.concat_tables(tables) if tables else _plain_schema(self.kind).empty_table()
        if rows.num_rows > max_rows:
            head, rest = rows.slice(0, max_rows), rows.slice(max_rows)
            last = int(head.column("offset")[-1].as_py())
            # the rest was read with the chunk that holds its first row
            ends = np.cumsum([t.num_rows for t in tables])
            self.since = self.chunks[int(np.searchsorted(ends, max_rows, side="right"))][0]
            self.chunks = [(self.since, rest)]
            self.rows = rest.num_rows
        else:
            head, last = rows, self.read_to
            self.chunks, self.rows, self.since = [], 0, None
        self.next_offset = last + 1
        return split_by_hour(self.kind, self.partition, first, last, head)
