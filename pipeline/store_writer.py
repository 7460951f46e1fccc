"""The worker's one I/O point to the store: atomic, exactly-once, durable batch applies.

Each partition batch becomes one ``FCALL pulse_apply`` (see ``store_functions.lua``) that checks
the partition's applied offset and applies every increment in the same atomic step. All the
batches of one poll go in one pipeline together with one ``WAITAOF``, so a poll costs one round
trip, and nothing is acknowledged to Kafka before the store says it is durable.

``WAITAOF`` vouches only for the writes of the connection it is sent on, so the writer owns
exactly one connection (:func:`connect`): the applies and the wait travel on it together, and it
never retries. A retry would re-send a command on a fresh connection, where ``WAITAOF`` has
nothing to wait for and answers at once; instead a connection error surfaces to the caller,
which treats what it wrote as unsure and calls :meth:`StoreWriter.fence` before acknowledging.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from importlib import resources

import orjson
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from pipeline import windows
from pipeline.batch import PartitionBatch, PartitionState
from pipeline.settings import Durability, StoreSettings
from schemas import keys
from schemas.events import EventKind

FUNCTION_NAME = "pulse_apply"

log = logging.getLogger("pulse.store_writer")


class StoreWriteError(Exception):
    """The store refused or failed a write."""


@dataclass(frozen=True, slots=True)
class ApplyOutcome:
    """Result of applying one partition batch."""

    partition: int
    applied: bool
    store_offset: int  # the partition's applied offset in the store after the call


@dataclass(frozen=True, slots=True)
class Retention:
    """How long window keys live after their window ends, per tumbling window."""

    seconds: dict[str, int]

    def expire_at_s(self, window: keys.TumblingWindow, start_ms: int) -> int:
        """Absolute expiry (Unix seconds) of a window instance's keys."""
        return (start_ms + window.size_ms) // 1000 + self.seconds[window.name]


def function_source() -> str:
    """The Lua source of the ``pulse`` function library."""
    return resources.files("pipeline").joinpath("store_functions.lua").read_text()


def payload(
    batch: PartitionBatch, retention: Retention, now_ms: int, *, topic: str, owner: str
) -> tuple[list[str], bytes]:
    """The keys and JSON argument of one ``pulse_apply`` call (fields: ``store_functions.lua``).

    ``topic`` is the Kafka topic the batch's offsets belong to and ``owner`` the applying worker;
    both are stored in the partition's progress hash by the same atomic call.
    """
    kind, part = batch.kind, batch.partition
    key_list = [keys.progress_key(kind, part)]
    aggs: list[list[object]] = []
    sks: list[list[object]] = []
    for d in batch.deltas:
        expire = retention.expire_at_s(d.window, d.start_ms)
        key_list.append(keys.agg_key(kind, part, d.window, d.dim, d.start_ms))
        aggs.append([len(key_list), expire, d.stats])
        key_list.append(keys.sketch_key(kind, part, d.window, d.dim, d.start_ms))
        sks.append([len(key_list), expire, d.sketch])
    ents: list[list[object]] = []
    for dim, names in batch.new_entities.items():
        key_list.append(keys.entities_key(kind, part, dim))
        flat: list[object] = []
        for name, minute in zip(names, batch.entity_minutes[dim], strict=True):
            flat.append(minute)
            flat.append(name)
        ents.append([len(key_list), flat])
    packed = keys.Stat.PACKED_APPLOG if kind is EventKind.APPLOG else keys.Stat.PACKED
    one_minute = keys.WINDOW_1M
    body: dict[str, object] = {
        "expect": batch.expect_offset,
        "offset": batch.last_offset,
        "ev": batch.events,
        "late": len(batch.late),
        "dead": len(batch.dead),
        "now": now_ms,
        "topic": topic,
        "owner": owner,
        "nf": len(packed),
        "a": aggs,
        "s": sks,
        "e": ents,
        # a registry member whose last 1m window has expired (by the 1m retention) goes
        "ecut": now_ms - one_minute.size_ms - retention.seconds[one_minute.name] * 1000,
        "ecap": batch.entity_cap,
    }
    if batch.max_event_time != windows.NO_EVENT_YET:
        body["mx"] = batch.max_event_time
        body["wm"] = batch.watermark
    return key_list, orjson.dumps(body)


def connect(store: StoreSettings, socket_timeout_s: float) -> aioredis.Redis:
    """A writer's client: one connection, shared by pipelines and commands, never retried.

    ``single_connection_client`` is not enough: redis-py's pipelines borrow another connection
    from the pool, and a ``WAITAOF`` sent on the client's own connection would then vouch for
    none of the pipeline's writes. A pool of exactly one connection carries both.
    """
    pool = aioredis.BlockingConnectionPool(
        max_connections=1,
        timeout=None,
        host=store.host,
        port=store.port,
        db=store.db,
        password=store.password.get_secret_value() if store.password else None,
        socket_timeout=socket_timeout_s,
        socket_connect_timeout=5.0,
        retry=Retry(NoBackoff(), 0),
    )
    return aioredis.Redis(connection_pool=pool, retry=Retry(NoBackoff(), 0))


class StoreWriter:
    """Applies partition batches to the store and waits for the configured durability.

    The client must come from :func:`connect`: one connection, no retries (see the module doc).
    """

    def __init__(
        self,
        client: aioredis.Redis,
        durability: Durability,
        retention: Retention,
        durability_timeout_ms: int = 5000,
        *,
        topic_names: dict[EventKind, str] | None = None,
        owner: str = "",
    ) -> None:
        self._client = client
        self._durability = durability
        self._retention = retention
        self._timeout_ms = durability_timeout_ms
        # stored with every apply: the topic each kind's offsets belong to, and who applied
        self._topic_names = dict(topic_names or {})
        self._owner = owner
        self._functions_loaded = False

    async def load_functions(self) -> None:
        """Install (or replace) the ``pulse`` function library in the store."""
        await self._client.execute_command("FUNCTION", "LOAD", "REPLACE", function_source())
        self._functions_loaded = True

    async def close(self) -> None:
        """Close the store connection."""
        await self._client.aclose()

    async def read_state(self, kind: EventKind, partitions: list[int]) -> dict[int, PartitionState]:
        """Each partition's applied offset, max event time and topic, as the store has them."""
        pipe = self._client.pipeline(transaction=False)
        for p in partitions:
            pipe.hmget(
                keys.progress_key(kind, p),
                keys.Progress.OFFSET,
                keys.Progress.MAX_EVENT_TIME,
                keys.Progress.TOPIC,
            )
        rows = await pipe.execute()
        out: dict[int, PartitionState] = {}
        for p, (offset, max_et, topic) in zip(partitions, rows, strict=True):
            out[p] = PartitionState(
                offset=int(offset) if offset is not None else -1,
                max_event_time=int(max_et) if max_et is not None else windows.NO_EVENT_YET,
                topic=topic.decode() if isinstance(topic, bytes) else topic,
            )
        return out

    async def apply(
        self, batches: list[PartitionBatch], now_ms: int
    ) -> tuple[list[ApplyOutcome], float]:
        """Apply batches and wait until they are durable, in one round trip when all goes well.

        Returns the outcome per batch and the seconds from sending the batches until the store
        confirmed them durable (0 when nothing was applied or durability is ``none``).
        """
        todo = [b for b in batches if not b.empty]
        if not todo:
            return [], 0.0
        if not self._functions_loaded:
            await self.load_functions()
        pipe = self._client.pipeline(transaction=False)
        for b in todo:
            key_list, arg = payload(
                b,
                self._retention,
                now_ms,
                topic=self._topic_names.get(b.kind, ""),
                owner=self._owner,
            )
            pipe.execute_command("FCALL", FUNCTION_NAME, len(key_list), *key_list, arg)
        self._queue_wait(pipe)
        t0 = time.perf_counter()
        try:
            results = await pipe.execute(raise_on_error=True)
        except aioredis.ResponseError as exc:
            raise StoreWriteError(f"store rejected a batch apply: {exc}") from exc
        outcomes = [
            ApplyOutcome(b.partition, int(r[0]) == 1, int(r[1]))
            for b, r in zip(todo, results, strict=False)
        ]
        if not any(o.applied for o in outcomes):
            return outcomes, 0.0
        return outcomes, await self._until_durable(results[-1], t0)

    async def fence(self) -> float:
        """Make every write the store has accepted so far durable at our level.

        WAITAOF only covers the writes of its own connection; after a reconnect (or a batch
        someone else applied) one small write of ours, ordered after theirs in the AOF and the
        replication stream, lets WAITAOF vouch for all of them.
        """
        pipe = self._client.pipeline(transaction=False)
        pipe.incr(keys.fence_key())
        self._queue_wait(pipe)
        t0 = time.perf_counter()
        results = await pipe.execute(raise_on_error=True)
        return await self._until_durable(results[-1], t0)

    def _queue_wait(self, pipe: aioredis.client.Pipeline) -> None:
        if self._durability is not Durability.NONE:
            pipe.execute_command("WAITAOF", 1, self._need_replicas, self._timeout_ms)

    @property
    def _need_replicas(self) -> int:
        return 1 if self._durability is Durability.REPLICA else 0

    async def _until_durable(self, reply: object, t0: float) -> float:
        """Keep asking until this connection's writes meet the durability level.

        ``reply`` is the answer of the ``WAITAOF`` sent with the writes. While the store cannot
        confirm (a replica is down, a disk is stuck) this keeps waiting: acknowledging to Kafka
        before that would break the durability promise.
        """
        if self._durability is Durability.NONE:
            return 0.0
        need = self._need_replicas
        while True:
            local, replicas = reply if isinstance(reply, list | tuple) else (0, 0)
            if int(local) >= 1 and int(replicas) >= need:
                return time.perf_counter() - t0
            log.warning(
                "store confirmed local=%s replicas=%s AOF fsyncs after %d ms; %s durability "
                "needs local=1 replicas=%d: still waiting",
                local,
                replicas,
                self._timeout_ms,
                self._durability.value,
                need,
            )
            reply = await self._client.execute_command("WAITAOF", 1, need, self._timeout_ms)
