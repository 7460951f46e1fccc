"""Pipeline and store health: consumer lag, diverted records, store memory, AOF, replicas, and
the bytes written to the store per hour.

The store owns the offsets: each partition's progress hash holds the last offset applied
(``schemas.keys.Progress``), so the lag of a partition is Kafka's end offset minus the next
offset the store expects. Kafka is read with one short-lived consumer under a deadline
(:func:`read_kafka`); when it cannot be reached the page still shows everything the store holds.
Store figures come from ``INFO`` (parsed by redis-py) and ``CONFIG GET appendfsync``. Bytes
written are sampled: each refresh notes the AOF size (and the replication offset, which grows
with every write command propagated), and :func:`written_per_hour` sums the growth between
samples (an AOF rewrite shrinks the file: that step counts as no growth).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

import pandas as pd
import redis

from dashboard import queries
from schemas import diverted, keys
from schemas.diverted import DivertedInfo
from schemas.errors import first_line
from schemas.events import EventKind
from schemas.keys import Progress

if TYPE_CHECKING:
    from aiokafka import AIOKafkaConsumer, TopicPartition

HOUR_MS: Final = 3_600_000
LAG_COLUMNS: Final = (
    "kind", "partition", "topic", "applied offset", "end offset", "lag", "watermark", "updated",
)  # fmt: skip


# --------------------------------------------------------------------------- the store


@dataclass(frozen=True, slots=True)
class ReplicaLag:
    """One replica as its primary sees it (or the node itself, when it is a replica)."""

    name: str
    state: str
    lag_s: float | None  # seconds since the replica's last acknowledgement
    lag_bytes: int | None  # replication offset behind the primary


@dataclass(frozen=True, slots=True)
class StoreHealth:
    """What ``INFO`` says about the store."""

    role: str
    version: str
    used_memory: int
    used_memory_peak: int
    maxmemory: int
    ops_per_s: float
    clients: int
    keys: int
    aof_enabled: bool
    aof_last_write_ok: bool | None
    aof_rewriting: bool
    aof_size: int | None
    appendfsync: str | None
    repl_offset: int | None
    replicas: tuple[ReplicaLag, ...]
    net_input_bytes: int | None

    @property
    def fsync_always(self) -> bool:
        """True when every write is fsynced before it is acknowledged."""
        return self.appendfsync == "always"


def _int(info: Mapping[str, Any], name: str) -> int | None:
    value = info.get(name)
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


def replicas(info: Mapping[str, Any]) -> tuple[ReplicaLag, ...]:
    """The replicas of a primary's ``INFO replication`` (``slaveN``), or the node's own link
    when it is a replica."""
    if info.get("role") == "slave":
        link = str(info.get("master_link_status", "?"))
        io = info.get("master_last_io_seconds_ago")
        return (
            ReplicaLag(
                f"this node, replica of {info.get('master_host')}:{info.get('master_port')}",
                f"link {link}",
                None if io is None or int(io) < 0 else float(io),
                None,
            ),
        )
    master = _int(info, "master_repl_offset")
    out = []
    for i in range(_int(info, "connected_slaves") or 0):
        row = info.get(f"slave{i}")
        if not isinstance(row, Mapping):
            continue
        offset = _int(row, "offset")
        lag = row.get("lag")
        out.append(
            ReplicaLag(
                f"{row.get('ip')}:{row.get('port')}",
                str(row.get("state", "?")),
                None if lag is None else float(lag),
                None if master is None or offset is None else max(master - offset, 0),
            )
        )
    return tuple(out)


def store_health(info: Mapping[str, Any], appendfsync: str | None) -> StoreHealth:
    """The figures of one ``INFO`` reply (all default sections) and the fsync policy."""
    aof = bool(_int(info, "aof_enabled"))
    status = info.get("aof_last_write_status")
    keyspace = sum(
        int(v.get("keys", 0))
        for k, v in info.items()
        if k.startswith("db") and isinstance(v, Mapping)
    )
    return StoreHealth(
        role="replica" if info.get("role") == "slave" else str(info.get("role", "?")),
        version=str(info.get("valkey_version") or info.get("redis_version") or "?"),
        used_memory=_int(info, "used_memory") or 0,
        used_memory_peak=_int(info, "used_memory_peak") or 0,
        maxmemory=_int(info, "maxmemory") or 0,
        ops_per_s=float(info.get("instantaneous_ops_per_sec", 0) or 0),
        clients=_int(info, "connected_clients") or 0,
        keys=keyspace,
        aof_enabled=aof,
        aof_last_write_ok=None if status is None else status == "ok",
        aof_rewriting=bool(_int(info, "aof_rewrite_in_progress")),
        aof_size=_int(info, "aof_current_size") if aof else None,
        appendfsync=appendfsync,
        repl_offset=_int(info, "master_repl_offset"),
        replicas=replicas(info),
        net_input_bytes=_int(info, "total_net_input_bytes"),
    )


def read_store_health(r: redis.Redis) -> StoreHealth | None:
    """``INFO`` and the fsync policy (None where ``CONFIG`` is not allowed), two commands;
    None when the store refuses ``INFO`` to this user (an ACL reader without it)."""
    try:
        info = r.info()
    except redis.ResponseError:
        return None
    policy: str | None = None
    with contextlib.suppress(redis.ResponseError):
        reply = r.config_get("appendfsync")
        raw = reply.get("appendfsync") or reply.get(b"appendfsync")  # type: ignore[call-overload]
        policy = raw.decode() if isinstance(raw, bytes) else raw
    return store_health(info, policy)


@dataclass(frozen=True, slots=True)
class Sample:
    """The store's write counters at one time."""

    t_ms: int
    aof_bytes: int | None
    repl_offset: int | None


def written_per_hour(samples: Sequence[Sample], attr: str, now_ms: int) -> tuple[float | None, int]:
    """Bytes per hour by which ``attr`` (``aof_bytes`` or ``repl_offset``) grew over the samples
    of the last hour, and the span (ms) they cover; (None, span) with fewer than two samples.

    A step that shrinks the counter (an AOF rewrite, a restart) counts as no growth.
    """
    rows = [
        (s.t_ms, v)
        for s in samples
        if s.t_ms >= now_ms - HOUR_MS and (v := getattr(s, attr)) is not None
    ]
    if len(rows) < 2:
        return None, 0
    grown = sum(max(b[1] - a[1], 0) for a, b in itertools.pairwise(rows))
    span = rows[-1][0] - rows[0][0]
    if span <= 0:
        return None, 0
    return grown * HOUR_MS / span, span


class WriteSampler:
    """The write counters of one store over the last hour; shared by a server's sessions."""

    def __init__(self, min_step_ms: int = 1000, keep_ms: int = HOUR_MS) -> None:
        self._samples: deque[Sample] = deque()
        self._lock = threading.Lock()
        self._min_step = min_step_ms
        self._keep = keep_ms

    def add(self, sample: Sample) -> None:
        """Note a sample (one per ``min_step_ms`` at most; older than the last hour dropped)."""
        with self._lock:
            if self._samples and sample.t_ms - self._samples[-1].t_ms < self._min_step:
                return
            self._samples.append(sample)
            while self._samples and self._samples[0].t_ms < sample.t_ms - self._keep:
                self._samples.popleft()

    def samples(self) -> list[Sample]:
        """The samples kept, oldest first."""
        with self._lock:
            return list(self._samples)


# --------------------------------------------------------------------------- offsets and lag


@dataclass(frozen=True, slots=True)
class StoredOffset:
    """What a partition's progress hash says about its offsets."""

    kind: EventKind
    partition: int
    topic: str | None
    offset: int | None  # last applied offset (-1 or None: none yet)
    watermark_ms: int | None
    updated_ms: int | None


def read_stored_offsets(r: redis.Redis, topo: queries.Topology) -> list[StoredOffset]:
    """Every partition's stored offset, topic, watermark and last apply (one round trip)."""
    parts = [(k, p) for k in EventKind for p in topo.partitions.get(k, ())]
    if not parts:
        return []
    fields = (Progress.TOPIC, Progress.OFFSET, Progress.WATERMARK, Progress.UPDATED_MS)
    pipe = r.pipeline(transaction=False)
    for k, p in parts:
        pipe.hmget(keys.progress_key(k, p), fields)
    out = []
    for (k, p), row in zip(parts, pipe.execute(), strict=True):
        topic, offset, mark, updated = row
        out.append(
            StoredOffset(
                k,
                p,
                topic.decode(errors="replace") if isinstance(topic, bytes) else topic,
                queries._raw_int(offset),
                queries._raw_int(mark),
                queries._raw_int(updated),
            )
        )
    return out


def consumer_lag(
    stored: Sequence[StoredOffset],
    ends: Mapping[tuple[str, int], int] | None,
    default_topics: Mapping[EventKind, str],
) -> pd.DataFrame:
    """Per partition: the store's applied offset, Kafka's end offset and the lag (records the
    store has not applied). Without ``ends`` (Kafka unreachable) the end and lag are empty."""
    rows = []
    for s in stored:
        topic = s.topic or default_topics.get(s.kind)
        end = None if ends is None or topic is None else ends.get((topic, s.partition))
        applied = s.offset if s.offset is not None and s.offset >= 0 else None
        nxt = (applied + 1) if applied is not None else 0
        rows.append(
            {
                "kind": s.kind.value,
                "partition": s.partition,
                "topic": topic,
                "applied offset": applied,
                "end offset": end,
                "lag": None if end is None else max(end - nxt, 0),
                "watermark": _clock(s.watermark_ms),
                "updated": _clock(s.updated_ms),
            }
        )
    frame = pd.DataFrame(rows, columns=list(LAG_COLUMNS))
    for col in ("applied offset", "end offset", "lag"):
        frame[col] = frame[col].astype("Int64")
    return frame


def _clock(ms: int | None) -> str:
    if ms is None:
        return "–"
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%H:%M:%S")


def total_lag(frame: pd.DataFrame) -> int | None:
    """The sum of the lag column (None when no end offset is known)."""
    known = frame["lag"].dropna()
    return None if known.empty else int(known.sum())


# --------------------------------------------------------------------------- Kafka


class KafkaUnavailableError(Exception):
    """Kafka could not be read within the deadline (the message says why, in one sentence)."""


@dataclass(frozen=True, slots=True)
class DivertedSample:
    """One recent record of a dead-letter or late topic."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    info: DivertedInfo


@dataclass(frozen=True, slots=True)
class KafkaView:
    """Offsets of every partition read, and the newest diverted records of each topic."""

    offsets: dict[tuple[str, int], tuple[int, int]]  # (topic, partition) -> (begin, end)
    diverted: dict[str, list[DivertedSample]] = field(default_factory=dict)
    read_ms: float = 0.0
    # why the diverted records were not all read (the offsets were), in one sentence
    samples_problem: str | None = None

    def ends(self) -> dict[tuple[str, int], int]:
        """End offset of each partition."""
        return {tp: end for tp, (_, end) in self.offsets.items()}

    def records(self, topic: str) -> int:
        """Records a topic holds now (end minus beginning, over its partitions)."""
        return sum(end - begin for (t, _), (begin, end) in self.offsets.items() if t == topic)


def read_kafka(
    bootstrap: str,
    topics: Sequence[str],
    diverted_topics: Sequence[str],
    samples: int,
    timeout_s: float,
    client_kwargs: Mapping[str, Any] | None = None,
) -> KafkaView:
    """Offsets of ``topics`` and ``diverted_topics``, and the newest ``samples`` records of each
    partition of the diverted topics, within ``timeout_s``; :class:`KafkaUnavailableError`.

    ``client_kwargs``: the consumer's security settings (``KafkaSettings.client_kwargs()``).
    """
    started = time.perf_counter()
    try:
        view = asyncio.run(
            asyncio.wait_for(
                _read_kafka(bootstrap, [*topics, *diverted_topics], diverted_topics, samples,
                            timeout_s, client_kwargs or {}),
                timeout_s,
            )
        )  # fmt: skip
    except TimeoutError:
        raise KafkaUnavailableError(
            f"Kafka at {bootstrap} did not answer within {timeout_s:g} s"
        ) from None
    except Exception as exc:  # aiokafka's errors have no common base worth naming
        raise KafkaUnavailableError(
            f"Kafka at {bootstrap} cannot be read: {first_line(exc)}"
        ) from None
    return KafkaView(
        view.offsets, view.diverted, (time.perf_counter() - started) * 1000, view.samples_problem
    )


async def _read_kafka(
    bootstrap: str,
    topics: Sequence[str],
    diverted_topics: Sequence[str],
    samples: int,
    timeout_s: float,
    client_kwargs: Mapping[str, Any],
) -> KafkaView:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    ms = max(int(timeout_s * 1000), 100)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        client_id="pulse-dashboard",
        request_timeout_ms=ms,
        connections_max_idle_ms=max(ms * 5, 10_000),
        retry_backoff_ms=50,
        **client_kwargs,
    )
    try:
        await consumer.start()
        # one metadata request for every topic (``consumer.topics()`` makes the same request
        # but keeps the partitions to itself)
        cluster = await consumer._client.fetch_all_metadata()
        tps = [
            TopicPartition(t, p)
            for t in dict.fromkeys(topics)
            for p in sorted(cluster.partitions_for_topic(t) or ())
        ]
        if not tps:
            return KafkaView({})
        begins = await consumer.beginning_offsets(tps)
        ends = await consumer.end_offsets(tps)
        offsets = {(tp.topic, tp.partition): (begins[tp], ends[tp]) for tp in tps}
        wanted = {
            tp: max(begins[tp], ends[tp] - samples)
            for tp in tps
            if tp.topic in diverted_topics and ends[tp] > begins[tp]
        }
        got: dict[str, list[DivertedSample]] = {t: [] for t in diverted_topics}
        problem = None
        if wanted and samples > 0:
            try:
                await _sample(consumer, wanted, ends, min(ms, 500), got)
            except Exception as exc:  # a record the client cannot parse, say (anyone can
                # write to these topics): the offsets stand, the samples read so far too
                problem = f"the newest diverted records could not all be read ({first_line(exc)})"
        for rows in got.values():
            rows.sort(key=lambda d: (d.timestamp_ms, d.partition, d.offset), reverse=True)
        return KafkaView(offsets, got, samples_problem=problem)
    finally:
        await consumer.stop()


async def _sample(
    consumer: AIOKafkaConsumer,
    wanted: Mapping[TopicPartition, int],
    ends: Mapping[TopicPartition, int],
    poll_ms: int,
    got: dict[str, list[DivertedSample]],
) -> None:
    """Read each partition of ``wanted`` from its offset to its end into ``got``."""
    consumer.assign(list(wanted))
    for tp, start in wanted.items():
        consumer.seek(tp, start)
    todo = set(wanted)
    while todo:
        batch = await consumer.getmany(timeout_ms=poll_ms)
        for tp, msgs in batch.items():
            for m in msgs:
                if m.offset < ends[tp]:
                    got[tp.topic].append(
                        DivertedSample(
                            tp.topic, tp.partition, m.offset, m.timestamp,
                            diverted.parse_headers(m.headers or ()),
                        )
                    )  # fmt: skip
        for tp in list(todo):
            if await consumer.position(tp) >= ends[tp]:
                todo.discard(tp)


class KafkaWatch:
    """The latest :class:`KafkaView` of one broker, refreshed in the background.

    :meth:`start` begins a read (in a thread) when the last one is older than ``max_age_s`` or
    asked for other topics, and none is running; :meth:`result` returns the newest view (or
    why it failed) at once, waiting up to ``wait_s`` only while there is none yet. The page
    starts a read before it reads the store and takes the result when it draws the health
    panel, so Kafka costs a refresh nothing once the first read is done. Thread-safe.
    """

    def __init__(
        self,
        read: Callable[[tuple[str, ...], tuple[str, ...]], KafkaView],
        max_age_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._read = read
        self._max_age = max_age_s
        self._clock = clock
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._running = False
        self._asked: tuple[tuple[str, ...], tuple[str, ...]] | None = None
        self._at: float | None = None  # when the newest result was read
        self._view: KafkaView | None = None
        self._problem: str | None = None

    def start(self, topics: Sequence[str], diverted_topics: Sequence[str]) -> bool:
        """Begin a read unless a fresh enough one exists or one is running; True if begun."""
        asked = (tuple(topics), tuple(diverted_topics))
        with self._lock:
            fresh = (
                self._at is not None
                and self._clock() - self._at < self._max_age
                and asked == self._asked
            )
            if self._running or fresh:
                return False
            self._running = True
            self._asked = asked
            self._done.clear()
        threading.Thread(target=self._run, args=asked, daemon=True, name="pulse-kafka").start()
        return True

    def _run(self, topics: tuple[str, ...], diverted_topics: tuple[str, ...]) -> None:
        view: KafkaView | None = None
        problem: str | None = None
        try:
            view = self._read(topics, diverted_topics)
        except KafkaUnavailableError as exc:
            problem = str(exc)
        except Exception as exc:  # a reader bug must not leave the watch running forever
            problem = f"Kafka could not be read: {type(exc).__name__}: {exc}"
        with self._lock:
            self._view, self._problem = view, problem
            self._at = self._clock()
            self._running = False
            self._done.set()

    def result(self, wait_s: float) -> tuple[KafkaView | None, str | None, float | None]:
        """(view, problem, age in s) of the newest read; waits up to ``wait_s`` for a first."""
        with self._lock:
            first = self._at is None and self._running
        if first:
            self._done.wait(wait_s)
        with self._lock:
            if self._at is None:
                return None, "Kafka has not answered yet", None
            return self._view, self._problem, self._clock() - self._at
