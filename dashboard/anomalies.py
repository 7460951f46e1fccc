"""Reading anomalies back from the store: one record, a time range, the live feed, the vectors.

The worker writes each anomaly with its partition's offset (``schemas.keys``): the record in
``anomalies_key`` (anomaly id -> ``schemas.anomaly.encode_record`` bytes), the id in
``anomaly_index_key`` scored by its window start (ms), and an entry on the capped stream
``feed_key`` (fields ``schemas.anomaly.FEED_FIELDS``). The partition is in the id, so one
record is one ``HGET``; a range or the feed reads every partition (both kinds) in one pipelined
round trip and merges newest first. :class:`StoreVectors` is the store as the
:class:`~dashboard.similar.VectorSource` of the similar-anomaly index.

The store may hold anything: a record that does not decode, or does not match the id it is
filed under, is skipped and counted (``skipped``), never raised. Every function takes a sync
``redis.Redis`` that returns bytes (``dashboard.queries.reader_client``) and, where it spans
partitions, the ``(kind, partition)`` pairs to read (:func:`discover_partitions`, or the
dashboard's ``Topology.partitions``); none reads the clock (``now_ms`` is the caller's).

``pulse similar`` and ``pulse anomalies`` live here too (``run_similar``, ``run_anomalies``).
"""

from __future__ import annotations

import argparse
import heapq
import math
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final, TypeAlias

import numpy as np
import numpy.typing as npt
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas import anomaly, keys
from schemas.anomaly import AnomalyRecord
from schemas.argtypes import one_line
from schemas.events import EventKind

if TYPE_CHECKING:
    import redis

__all__ = [
    "BadRecordError",
    "FeedEntry",
    "Listing",
    "Part",
    "StoreVectors",
    "decode_feed_entry",
    "decode_stored",
    "default_index_dir",
    "discover_partitions",
    "feed",
    "get",
    "get_many",
    "merge_newest",
    "parse_duration",
    "recent",
]

F32: TypeAlias = npt.NDArray[np.float32]
Part: TypeAlias = tuple[EventKind, int]  # (kind, partition)

# Fields per HMGET, and ids per pipelined round trip of StoreVectors.vectors.
HMGET_CHUNK: Final = 512
VECTOR_BATCH: Final = 2048
# Fields per HSCAN call while listing ids.
SCAN_COUNT: Final = 1000
# At most this many anomalies per listing, whatever the caller asks.
MAX_LIMIT: Final = 10_000
INDEX_DIR: Final = "similar"  # under the Pulse home: the similar-anomaly index files
# Columns of ``pulse anomalies`` and ``pulse similar``.
LIST_HEADER: Final = ("time (UTC)", "anomaly", "entity", "signal", "cause", "score", "value",
                      "expected")  # fmt: skip
SIMILAR_HEADER: Final = ("#", "anomaly", "entity", "signal", "cause", "time (UTC)", "score",
                         "similarity")  # fmt: skip


class BadRecordError(ValueError):
    """The bytes stored under an anomaly id are not that anomaly's record."""


# --------------------------------------------------------------------------- decoding


def decode_stored(anomaly_id: str, blob: bytes, part: Part | None = None) -> AnomalyRecord:
    """The record stored under ``anomaly_id`` (in ``part``'s hash, if given).

    Raises :class:`BadRecordError` for bytes that are not a record, or a record of another id
    or partition (whatever the store holds, nothing else is raised).
    """
    try:
        rec = anomaly.decode_record(blob)
    except Exception as exc:  # hostile bytes: the codec's ValueError, or anything it missed
        raise BadRecordError(f"anomaly {anomaly_id!r}: {exc}") from exc
    try:
        filed = anomaly.parse_anomaly_id(anomaly_id)
    except ValueError as exc:
        raise BadRecordError(str(exc)) from exc
    own = (rec.kind, rec.partition, rec.window_start_ms, rec.entity, rec.signal)
    if rec.id != anomaly_id or own != filed:
        raise BadRecordError(f"the record filed under {anomaly_id!r} is {rec.id!r}")
    if part is not None and (part[0].value, part[1]) != filed[:2]:
        raise BadRecordError(f"anomaly {anomaly_id!r} is filed in partition {part}")
    if rec.vector.shape != (anomaly.VECTOR_DIM,):
        raise BadRecordError(f"anomaly {anomaly_id!r} has a vector of shape {rec.vector.shape}")
    return rec


def _part_of(anomaly_id: str) -> Part:
    """The (kind, partition) an id belongs to; ValueError if it is not an anomaly id."""
    kind, partition, *_ = anomaly.parse_anomaly_id(anomaly_id)
    return EventKind(kind), partition


def _text(raw: bytes | str) -> str:
    """Store bytes as text; UnicodeDecodeError (a ValueError) for bytes that are not UTF-8."""
    return raw.decode() if isinstance(raw, bytes) else raw


@dataclass(frozen=True, slots=True)
class FeedEntry:
    """One entry of the live anomaly feed (``schemas.anomaly.FEED_FIELDS``)."""

    id: str
    kind: EventKind
    partition: int
    entity: str
    signal: str
    cause: str
    score: float
    t_ms: int  # the anomaly's window start (ms)
    value: float
    entry: str  # the stream entry id, "<ms>-<seq>"


def decode_feed_entry(entry_id: bytes | str, fields: Mapping[bytes, bytes]) -> FeedEntry:
    """A feed entry as the worker writes it; ValueError for one that is not."""
    try:
        f = {_text(k): _text(v) for k, v in fields.items()}
        missing = [name for name in anomaly.FEED_FIELDS if name not in f]
        if missing:
            raise ValueError(f"feed entry lacks {', '.join(missing)}")
        kind, partition, *_ = anomaly.parse_anomaly_id(f["id"])
        score, value = float(f["score"]), float(f["value"])
        t_ms = int(f["t"])
        entry = _text(entry_id)
    except (ValueError, TypeError, AttributeError) as exc:
        raise ValueError(f"malformed feed entry {entry_id!r}: {exc}") from exc
    if not math.isfinite(score):
        raise ValueError(f"malformed feed entry {entry_id!r}: score {score}")
    return FeedEntry(
        f["id"], EventKind(kind), partition, f["entity"], f["signal"], f["cause"],
        score, t_ms, value, entry,
    )  # fmt: skip


# --------------------------------------------------------------------------- merging


def merge_newest(
    per_partition: Iterable[Sequence[tuple[float, str]]], limit: int
) -> list[tuple[float, str]]:
    """The ``limit`` newest ``(time, id)`` of several newest-first lists, newest first.

    Equal times are ordered by id (descending), so the result does not depend on the order of
    the partitions. Each input must be newest first (as ``ZREVRANGEBYSCORE`` returns them).
    """
    if limit <= 0:
        return []

    def ordered(rows: Sequence[tuple[float, str]]) -> list[tuple[float, str]]:
        # a partition's ties come back in the store's (descending member) order: make sure
        return sorted(rows, key=lambda row: (row[0], row[1]), reverse=True)

    merged = heapq.merge(
        *(ordered(rows) for rows in per_partition), key=lambda row: (row[0], row[1]), reverse=True
    )
    out: list[tuple[float, str]] = []
    seen: set[str] = set()
    for row in merged:
        if row[1] in seen:
            continue
        seen.add(row[1])
        out.append(row)
        if len(out) == limit:
            break
    return out


# --------------------------------------------------------------------------- reads


def discover_partitions(r: redis.Redis, scan_count: int = 10_000) -> tuple[Part, ...]:
    """Every (kind, partition) with an anomaly hash or a feed in the store, by SCAN.

    SCAN walks the whole keyspace: call it once per command, or every few tens of seconds.
    """
    found: set[Part] = set()
    for pattern, type_ in (
        (f"{keys.PREFIX}:{{*}}:anom", "hash"),
        (f"{keys.PREFIX}:{{*}}:feed", "stream"),
    ):
        for raw in r.scan_iter(match=pattern, count=scan_count, _type=type_):
            try:
                key = _text(raw)
                found.add(keys.parse_tag(key))
            except ValueError:
                continue  # a key that only looks like one
    return tuple(sorted(found, key=lambda p: (p[0].value, p[1])))


def get(r: redis.Redis, anomaly_id: str) -> AnomalyRecord | None:
    """The record of ``anomaly_id`` (None when the store has none).

    ValueError when ``anomaly_id`` is not an anomaly id; :class:`BadRecordError` when the
    stored bytes are not its record.
    """
    part = _part_of(anomaly_id)
    blob = r.hget(keys.anomalies_key(*part), anomaly_id)
    if blob is None:
        return None
    return decode_stored(anomaly_id, bytes(blob), part)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class Listing:
    """Anomaly records, newest first, and what was left out."""

    records: list[AnomalyRecord]
    skipped: int = 0  # stored records that did not decode or did not match their id
    missing: int = 0  # ids whose record was gone (trimmed while reading)


def get_many(r: redis.Redis, ids: Sequence[str]) -> Listing:
    """The records of ``ids`` in their order (one pipelined round trip per batch).

    Ids that are not anomaly ids, and records that do not decode, count as ``skipped``; ids
    with no record as ``missing``.
    """
    by_part: dict[Part, list[str]] = {}
    skipped = 0
    for anomaly_id in dict.fromkeys(ids):
        try:
            by_part.setdefault(_part_of(anomaly_id), []).append(anomaly_id)
        except ValueError:
            skipped += 1
    found, bad, missing = _fetch(r, by_part)
    records = [found[i] for i in dict.fromkeys(ids) if i in found]
    return Listing(records, skipped + bad, missing)


def _fetch(
    r: redis.Redis, by_part: Mapping[Part, Sequence[str]]
) -> tuple[dict[str, AnomalyRecord], int, int]:
    """Records of ids grouped by partition, ``VECTOR_BATCH`` ids per round trip:
    (records by id, undecodable, missing)."""
    asked = [(part, anomaly_id) for part, ids in by_part.items() for anomaly_id in ids]
    out: dict[str, AnomalyRecord] = {}
    bad = missing = 0
    for start in range(0, len(asked), VECTOR_BATCH):
        batch = asked[start : start + VECTOR_BATCH]
        commands: list[tuple[Part, list[str]]] = []
        for part, anomaly_id in batch:
            if not commands or commands[-1][0] != part or len(commands[-1][1]) >= HMGET_CHUNK:
                commands.append((part, []))
            commands[-1][1].append(anomaly_id)
        pipe = r.pipeline(transaction=False)
        for part, fields in commands:
            pipe.hmget(keys.anomalies_key(*part), fields)
        for (part, fields), values in zip(commands, pipe.execute(), strict=True):
            for anomaly_id, blob in zip(fields, values, strict=True):
                if blob is None:
                    missing += 1
                    continue
                try:
                    out[anomaly_id] = decode_stored(anomaly_id, bytes(blob), part)
                except BadRecordError:
                    bad += 1
    return out, bad, missing


def recent(
    r: redis.Redis,
    parts: Iterable[Part],
    since_ms: int,
    until_ms: int | None = None,
    limit: int = 100,
) -> Listing:
    """The newest ``limit`` anomalies whose window starts within [``since_ms``, ``until_ms``]
    (no upper bound when None), over every partition in ``parts``, newest first.

    Two round trips: each partition's newest ``limit`` ids in the range (``anomaly_index_key``),
    merged; then the records of the ones kept. ``limit`` is capped at :data:`MAX_LIMIT`.
    """
    limit = max(0, min(limit, MAX_LIMIT))
    parts = list(dict.fromkeys(parts))
    if limit == 0 or not parts:
        return Listing([])
    top: float | str = "+inf" if until_ms is None else until_ms
    pipe = r.pipeline(transaction=False)
    for part in parts:
        pipe.zrevrangebyscore(
            keys.anomaly_index_key(*part), top, since_ms, start=0, num=limit, withscores=True
        )
    per_part: list[list[tuple[float, str]]] = []
    skipped = 0
    for part, rows in zip(parts, pipe.execute(), strict=True):
        good: list[tuple[float, str]] = []
        for member, score in rows:
            try:
                anomaly_id = _text(member)
                if _part_of(anomaly_id) != part:
                    raise ValueError(f"{anomaly_id!r} is indexed in partition {part}")
            except ValueError:
                skipped += 1
                continue
            good.append((float(score), anomaly_id))
        per_part.append(good)
    chosen = [anomaly_id for _, anomaly_id in merge_newest(per_part, limit)]
    got = get_many(r, chosen)
    return Listing(got.records, skipped + got.skipped, got.missing)


@dataclass(frozen=True, slots=True)
class Feed:
    """The latest feed entries over the partitions, newest first, and the entries skipped."""

    entries: list[FeedEntry]
    skipped: int = 0


def feed(r: redis.Redis, parts: Iterable[Part], n: int = 50) -> Feed:
    """The ``n`` latest entries of the live feeds of ``parts``, newest first (by the anomaly's
    time, then by stream entry), read in one pipelined round trip of ``XREVRANGE ... COUNT n``.
    ``n`` is capped at :data:`MAX_LIMIT`."""
    n = max(0, min(n, MAX_LIMIT))
    parts = list(dict.fromkeys(parts))
    if n == 0 or not parts:
        return Feed([])
    pipe = r.pipeline(transaction=False)
    for part in parts:
        pipe.xrevrange(keys.feed_key(*part), count=n)
    entries: list[FeedEntry] = []
    skipped = 0
    for part, rows in zip(parts, pipe.execute(), strict=True):
        for entry_id, fields in rows:
            try:
                e = decode_feed_entry(entry_id, fields)
            except ValueError:
                skipped += 1
                continue
            if (e.kind, e.partition) != part:
                skipped += 1
                continue
            entries.append(e)
    entries.sort(key=lambda e: (e.t_ms, _entry_order(e.entry), e.id), reverse=True)
    return Feed(entries[:n], skipped)


def _entry_order(entry: str) -> tuple[int, int]:
    ms, _, seq = entry.partition("-")
    try:
        return int(ms), int(seq or 0)
    except ValueError:
        return (0, 0)


# --------------------------------------------------------------------------- vector source


class StoreVectors:
    """The store's anomalies as a :class:`~dashboard.similar.VectorSource`.

    :meth:`ids` lists the ids of every partition's record hash with pipelined ``HSCAN ...
    NOVALUES`` (``SCAN_COUNT`` fields per call); :meth:`vectors` reads records with pipelined
    ``HMGET`` per partition, ``VECTOR_BATCH`` ids per round trip. Ids that are not anomaly ids
    of the partition they are filed in, and records that do not decode or do not match their
    id, are left out and counted in :attr:`skipped` (the first few in :attr:`examples`).
    """

    def __init__(self, r: redis.Redis, parts: Iterable[Part]) -> None:
        self._r = r
        self.parts = tuple(dict.fromkeys(parts))
        self.skipped = 0
        self.examples: list[str] = []

    def _skip(self, what: str) -> None:
        self.skipped += 1
        if len(self.examples) < 5:
            self.examples.append(what)

    def ids(self) -> set[str]:
        """Every anomaly id with a record in the store now."""
        out: set[str] = set()
        cursors: dict[Part, int] = dict.fromkeys(self.parts, 0)
        while cursors:
            pipe = self._r.pipeline(transaction=False)
            asked = list(cursors.items())
            for part, cursor in asked:
                pipe.hscan(keys.anomalies_key(*part), cursor, count=SCAN_COUNT, no_values=True)
            for (part, _), (cursor, fields) in zip(asked, pipe.execute(), strict=True):
                for raw in fields:
                    try:
                        anomaly_id = _text(raw)
                        if _part_of(anomaly_id) != part:
                            raise ValueError("filed in another partition")
                    except ValueError:
                        self._skip(f"{keys.anomalies_key(*part)} field {raw!r}")
                        continue
                    out.add(anomaly_id)
                if int(cursor) == 0:
                    del cursors[part]
                else:
                    cursors[part] = int(cursor)
        return out

    def vectors(self, ids: Sequence[str]) -> dict[str, F32]:
        """The vectors of ``ids`` the store still holds (others are left out)."""
        by_part: dict[Part, list[str]] = {}
        for anomaly_id in dict.fromkeys(ids):
            try:
                by_part.setdefault(_part_of(anomaly_id), []).append(anomaly_id)
            except ValueError:
                self._skip(anomaly_id)
        found, bad, _ = _fetch(self._r, by_part)
        for _ in range(bad):
            self._skip("an undecodable record")
        return {i: rec.vector for i, rec in found.items()}


# --------------------------------------------------------------------------- command line


class HomeSettings(BaseSettings):
    """Where the Pulse home is (``PULSE_HOME``; the stack's ``StackSettings.home``)."""

    model_config = SettingsConfigDict(env_prefix="PULSE_", extra="ignore", allow_inf_nan=False)

    home: Path = Path(".pulse")


def default_index_dir() -> Path:
    """Where ``pulse similar`` keeps its index: ``similar/`` under the Pulse home."""
    return HomeSettings().home / INDEX_DIR


_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86_400}


def parse_duration(text: str) -> int:
    """A duration such as ``90s``, ``15m``, ``2h``, ``1d`` (a bare number: seconds), in ms."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(
            f"expected a duration such as 30s, 15m, 2h or 1d, got {text!r}"
        )
    ms = int(float(match.group(1)) * _UNITS[match.group(2) or "s"] * 1000)
    if ms < 1 or ms > 366 * 86_400_000:
        raise argparse.ArgumentTypeError(f"must be at least 1 ms and at most 366d, got {text!r}")
    return ms


def _utc(ms: float) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ms / 1000))


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Plain aligned columns (ids stay on one line, whatever the terminal width)."""
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    lines += [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    return "\n".join(lines)


def similar_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``pulse similar``."""
    from schemas.argtypes import positive_int

    parser.add_argument("anomaly_id", metavar="ANOMALY_ID", help="an anomaly id, as listed")
    parser.add_argument("-k", type=positive_int, default=10, help="how many similar anomalies (10)")
    parser.add_argument(
        "--index",
        type=Path,
        default=None,
        help="directory of the similarity index (default: similar/ under $PULSE_HOME or .pulse)",
    )


def anomalies_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``pulse anomalies``."""
    from schemas.argtypes import positive_int

    parser.add_argument(
        "--since",
        type=parse_duration,
        default=3_600_000,
        metavar="DURATION",
        help="how far back, e.g. 30m, 6h, 1d (1h)",
    )
    parser.add_argument("-n", type=positive_int, default=20, help="at most N anomalies (20)")


def run_similar(args: argparse.Namespace) -> int:
    """Print the anomalies most similar to one, by cosine similarity of their vectors."""
    import redis as redis_lib

    from dashboard.queries import reader_client
    from dashboard.similar import UnknownAnomalyError, load_or_build
    from schemas.settings import StoreSettings

    name = "pulse similar"
    anomaly_id: str = args.anomaly_id
    try:
        anomaly.parse_anomaly_id(anomaly_id)
    except ValueError as exc:
        print(f"{name}: {one_line(exc)}.", file=sys.stderr)
        return 2
    folder: Path = args.index if args.index is not None else default_index_dir()
    store = StoreSettings()
    r = reader_client(store, timeout_s=30.0)
    try:
        try:
            target = get(r, anomaly_id)
        except BadRecordError as exc:
            print(f"{name}: the store's record is unreadable: {one_line(exc)}.", file=sys.stderr)
            return 1
        if target is None:
            print(
                f"{name}: no anomaly {anomaly_id} in the store (unknown, or expired).",
                file=sys.stderr,
            )
            return 1
        source = StoreVectors(r, discover_partitions(r))
        try:
            index, changes = load_or_build(folder, source)
        except OSError as exc:
            print(f"{name}: cannot keep the index in {folder}: {one_line(exc)}.", file=sys.stderr)
            return 1
        try:
            rows = index.similar(anomaly_id, args.k)
        except UnknownAnomalyError:
            print(
                f"{name}: anomaly {anomaly_id} has no usable vector (zero or not finite).",
                file=sys.stderr,
            )
            return 1
        found = {rec.id: rec for rec in get_many(r, [i for i, _ in rows]).records}
    except redis_lib.RedisError as exc:
        print(
            f"{name}: cannot read the store at {store.host}:{store.port}: {one_line(exc)}.",
            file=sys.stderr,
        )
        return 1
    finally:
        r.close()
    print(
        f"anomaly {target.id}: {target.entity} {target.signal} {target.cause} at "
        f"{_utc(target.window_start_ms)} UTC, score {target.score:.3f}"
    )
    table = [
        [str(n), rec.id, rec.entity, rec.signal, rec.cause, _utc(rec.window_start_ms),
         f"{rec.score:.3f}", f"{1.0 - dist:.4f}"]
        for n, (rec, dist) in enumerate(
            ((found[i], d) for i, d in rows if i in found), 1
        )
    ]  # fmt: skip
    if table:
        print(format_table(SIMILAR_HEADER, table))
    else:
        print("no similar anomalies")
    note = f"index {folder}: {len(index)} anomalies"
    if changes.rebuilt:
        note += ", built from the store"
    elif changes.added or changes.deleted:
        note += f", +{changes.added} -{changes.deleted} from the store"
    if source.skipped:
        note += f"; skipped {_plural(source.skipped, 'unreadable record')}"
    print(note)
    return 0


def run_anomalies(args: argparse.Namespace) -> int:
    """Print the latest anomalies, newest first."""
    import time

    import redis as redis_lib

    from dashboard.queries import reader_client
    from schemas.settings import StoreSettings

    store = StoreSettings()
    r = reader_client(store, timeout_s=10.0)
    now_ms = time.time_ns() // 1_000_000
    try:
        listing = recent(r, discover_partitions(r), now_ms - args.since, None, args.n)
    except redis_lib.RedisError as exc:
        print(
            f"pulse anomalies: cannot read the store at {store.host}:{store.port}: "
            f"{one_line(exc)}.",
            file=sys.stderr,
        )
        return 1
    finally:
        r.close()
    if not listing.records:
        print(f"no anomalies in the last {_human(args.since)}")
    else:
        print(
            format_table(
                LIST_HEADER,
                [
                    [_utc(rec.window_start_ms), rec.id, rec.entity, rec.signal, rec.cause,
                     f"{rec.score:.3f}", f"{rec.value:.6g}", f"{rec.expected:.6g}"]
                    for rec in listing.records
                ],
            )
        )  # fmt: skip
    if listing.skipped:
        print(f"skipped {_plural(listing.skipped, 'unreadable record')}")
    return 0


def _plural(n: int, what: str) -> str:
    return f"{n} {what}" if n == 1 else f"{n} {what}s"


def _human(ms: int) -> str:
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000)):
        if ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms / 1000:g}s"
