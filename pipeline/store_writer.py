"""The worker's one I/O point to the store: atomic, exactly-once, durable batch applies.

Each partition batch is one ``pulse_apply`` (see ``store_functions.lua``) that checks the
partition's applied offset and writes the batch's absolute values in the same atomic step. All
the batches of one poll go in one ``FCALL pulse_apply_many``, followed by one ``WAITAOF``, so a
poll costs one round trip and one AOF fsync (the store fsyncs once per event-loop turn, and
separate calls each took a turn), and nothing is acknowledged to Kafka before the store says it
is durable.

``WAITAOF`` vouches only for the writes of the connection it is sent on, so the writer owns
exactly one connection (:func:`connect`): the applies and the wait travel on it together, and it
never retries. A retry would re-send a command on a fresh connection, where ``WAITAOF`` has
nothing to wait for and answers at once; instead a connection error surfaces to the caller,
which treats what it wrote as unsure and calls :meth:`StoreWriter.fence` before acknowledging.

On a cluster (``PULSE_STORE_CLUSTER``) the writer holds a :class:`~pipeline.store_router.
StoreRouter` instead: each partition's apply goes, with its ``WAITAOF``, on the connection of the
primary that serves its slot, the nodes' pipelines at once; :meth:`StoreWriter.durable` waits on
every node written since the last acknowledgement and :meth:`StoreWriter.fence` fences every
primary.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from importlib import resources
from itertools import chain
from typing import Any, cast

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisClusterException

from pipeline import windows
from pipeline.batch import PartitionBatch, PartitionState
from pipeline.settings import Durability
from pipeline.state import Retention
from pipeline.store_router import REDIRECTS, Node, SlotMovedError, StoreRouter
from schemas import anomaly, keys
from schemas.events import EventKind
from schemas.settings import StoreRole, StoreSettings, store_client

FUNCTION_NAME = "pulse_apply"
MANY_FUNCTION_NAME = "pulse_apply_many"  # pulse_apply for several partitions (one node)
# Timeout of the WAITAOF that polls the replica (see StoreWriter._until_durable).
POLL_MS = 1

log = logging.getLogger("pulse.store_writer")
# error replies a node's apply pipeline raises: a slot that moved, a lost node
_RAISED: tuple[type[Exception], ...] = (*REDIRECTS, aioredis.ConnectionError, aioredis.TimeoutError)
# what a cluster read may raise when the slot map changes under it, or no node answers
READ_REDIRECTS: tuple[type[Exception], ...] = (RedisClusterException, *REDIRECTS)


class StoreWriteError(Exception):
    """The store refused or failed a write."""


class StoredTypeError(Exception):
    """Keys read as hashes hold another type (written by something other than a worker):
    ``wrong`` maps each to why."""

    def __init__(self, wrong: dict[str, str]) -> None:
        super().__init__("; ".join(f"{k}: {why}" for k, why in wrong.items()))
        self.wrong = wrong


def _wrong_type(reply: object) -> str | None:
    """Why a reply is a WRONGTYPE error (a key of another type), or None."""
    if isinstance(reply, aioredis.ResponseError) and str(reply).startswith("WRONGTYPE"):
        return "it holds another type than a hash"
    return None


@dataclass(frozen=True, slots=True)
class ApplyOutcome:
    """Result of applying one partition batch."""

    partition: int
    applied: bool
    store_offset: int  # the partition's applied offset in the store after the call
    # why the store refused it, writing nothing: a key it writes holds another type (written
    # by something other than a worker); the partition cannot be applied until that is mended
    refused: str | None = None


def _outcome(b: PartitionBatch, reply: object) -> ApplyOutcome:
    """A batch's outcome from its ``FCALL`` reply; an error reply other than the function's
    refusal of a key of another type is raised, as the pipeline would have raised it."""
    if isinstance(reply, aioredis.ResponseError):
        why = str(reply)
        if why.startswith(f"{FUNCTION_NAME}: ") and " holds a " in why:
            # the function checks every key before writing any: the call wrote nothing
            return ApplyOutcome(
                b.partition, False, -1, refused=why.removeprefix(f"{FUNCTION_NAME}: ")
            )
        raise StoreWriteError(f"store rejected a batch apply: {why}") from reply
    if isinstance(reply, Exception):  # a connection-level error reply (the store loading)
        raise reply
    return ApplyOutcome(b.partition, int(reply[0]) == 1, int(reply[1]))  # type: ignore[index]


def _checked_wait(replies: list[object]) -> None:
    """Raise the error reply of a pipeline's last command (the ``WAITAOF`` sent with it)."""
    last = replies[-1] if replies else None
    if isinstance(last, aioredis.ResponseError):
        raise StoreWriteError(f"store rejected a durability request: {last}") from last
    if isinstance(last, Exception):
        raise last


def function_source() -> str:
    """The Lua source of the ``pulse`` function library."""
    return resources.files("pipeline").joinpath("store_functions.lua").read_text()


def payload(
    batch: PartitionBatch, retention: Retention, now_ms: int, *, topic: str, owner: str
) -> tuple[list[str], list[bytes | str]]:
    """The keys and arguments of one ``pulse_apply`` call (fields: ``store_functions.lua``).

    The first argument is a JSON header, the rest the fields and values of ``batch.writes``.
    ``topic`` is the Kafka topic the batch's offsets belong to and ``owner`` the applying
    worker; both are stored in the partition's progress hash by the same atomic call.
    """
    kind, part = batch.kind, batch.partition
    key_list = [keys.progress_key(kind, part)]
    args: list[bytes | str] = [b""]
    hashes: list[list[object]] = []
    for w in batch.writes:
        if not w.fields:
            continue
        key_list.append(w.key)
        block: list[object] = [len(key_list), w.expire_at_s, len(w.fields)]
        hashes.append([*block, "replace"] if w.replace else block)
        args.extend(chain.from_iterable(zip(w.fields, w.values, strict=True)))
    ents: list[list[object]] = []
    for dim, names in batch.new_entities.items():
        key_list.append(keys.entities_key(kind, part, dim))
        flat: list[object] = []
        for name, minute in zip(names, batch.entity_minutes[dim], strict=True):
            flat.append(minute)
            flat.append(name)
        ents.append([len(key_list), flat])
    one_minute = keys.WINDOW_1M
    geo: list[object] | None = None
    if batch.positions:
        key_list.append(keys.geo_key(part))
        key_list.append(keys.seen_key(part))
        flat_pos: list[object] = []
        for p in batch.positions:
            flat_pos.extend((p.event_time, p.lat, p.lon, p.device))
        geo = [len(key_list) - 1, len(key_list), flat_pos]
    header: dict[str, object] = {
        "expect": batch.expect_offset,
        "offset": batch.last_offset,
        "ev": batch.events,
        "late": len(batch.late),
        "dead": len(batch.dead),
        "now": now_ms,
        "topic": topic,
        "owner": owner,
        "h": hashes,
        "e": ents,
        # a registry member whose last 1m window has expired (by the 1m retention) goes
        "ecut": now_ms - one_minute.size_ms - retention.seconds[one_minute.name] * 1000,
        "ecap": batch.entity_cap,
    }
    if geo is not None:
        header["g"] = geo
    if batch.boards:
        zb: list[list[object]] = []
        for z in batch.boards:
            key_list.append(z.key)
            flat_z: list[object] = []
            for member, score in zip(z.members, z.scores, strict=True):
                flat_z.append(score)
                flat_z.append(member)
            zb.append([len(key_list), z.expire_at_s, z.mode, flat_z])
        header["z"] = zb
    det = batch.detected
    if det is not None and det.fields:
        key_list.append(keys.detector_key(kind, part))
        header["d"] = [len(key_list), len(det.fields), len(det.deleted)]
        args.extend(chain.from_iterable(zip(det.fields, det.states, strict=True)))
        args.extend(det.deleted)
    if det is not None and det.anomalies:
        key_list.append(keys.anomalies_key(kind, part))
        key_list.append(keys.anomaly_index_key(kind, part))
        key_list.append(keys.feed_key(kind, part))
        entries: list[object] = []
        for a in det.anomalies:
            entries.extend(
                (
                    a.id,
                    a.window_start_ms,
                    a.entity,
                    a.signal,
                    a.cause,
                    f"{a.score:.4f}",
                    f"{a.value:.6g}",
                )
            )
            args.append(anomaly.encode_record(a))
        # an anomaly goes with the aggregates of its window (the 1m retention)
        cut = now_ms - one_minute.size_ms - retention.seconds[one_minute.name] * 1000
        n = len(key_list)
        header["a"] = [n - 2, n - 1, n, cut, keys.FEED_CAP, entries]
    if batch.max_event_time != windows.NO_EVENT_YET:
        header["mx"] = batch.max_event_time
        header["wm"] = batch.watermark
    args[0] = orjson.dumps(header)
    return key_list, args


def connect(store: StoreSettings, socket_timeout_s: float) -> aioredis.Redis:
    """A writer's client: one connection for pipelines and commands, never retried.

    See :func:`schemas.settings.store_client` (``one_connection``) for why.
    """
    return store_client(
        store,
        timeout_s=socket_timeout_s,
        asyncio=True,
        one_connection=True,
        role=StoreRole.WORKER,
    )


def connect_writer(store: StoreSettings, socket_timeout_s: float) -> aioredis.Redis | StoreRouter:
    """What a :class:`StoreWriter` writes through: :func:`connect`, or on a cluster a router
    with one such connection per primary."""
    if store.cluster:
        return StoreRouter(store, socket_timeout_s)
    return connect(store, socket_timeout_s)


class StoreWriter:
    """Applies partition batches to the store and waits for the configured durability.

    The client must come from :func:`connect`: one connection, no retries (see the module doc),
    or be a :class:`StoreRouter` (a cluster: :func:`connect_writer`).
    """

    def __init__(
        self,
        client: aioredis.Redis | StoreRouter,
        durability: Durability,
        retention: Retention,
        durability_timeout_ms: int = 5000,
        *,
        topic_names: dict[EventKind, str] | None = None,
        owner: str = "",
    ) -> None:
        self._router = client if isinstance(client, StoreRouter) else None
        # on a cluster, the client of the writer's reads (it follows the slot map itself)
        self._client: aioredis.Redis = (
            cast("aioredis.Redis", client.cluster) if isinstance(client, StoreRouter) else client
        )
        self._durability = durability
        self._retention = retention
        self._timeout_ms = durability_timeout_ms
        # stored with every apply: the topic each kind's offsets belong to, and who applied
        self._topic_names = dict(topic_names or {})
        self._owner = owner
        self._functions_loaded = False
        # the local WAITAOF reply and send time of the oldest send not yet confirmed durable
        self._unconfirmed: tuple[object, float] | None = None
        # on a cluster: the same per node written since the last acknowledgement
        self._node_unconfirmed: dict[str, tuple[Node, object, float]] = {}
        self._loaded_on: set[str] = set()  # primaries holding the function library

    async def load_functions(self) -> None:
        """Install (or replace) the ``pulse`` function library in the store (every primary)."""
        if self._router is not None:
            for node in await self._router.primaries():
                await self._load_on(node)
            self._functions_loaded = True
            return
        # redis-py's asyncio execute_command has no annotations
        await self._client.execute_command(  # type: ignore[no-untyped-call]
            "FUNCTION", "LOAD", "REPLACE", function_source()
        )
        self._functions_loaded = True

    async def close(self) -> None:
        """Close the store connection(s)."""
        if self._router is not None:
            await self._router.close()
            return
        await self._client.aclose(close_connection_pool=True)

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
        rows = await self._read(pipe)
        out: dict[int, PartitionState] = {}
        for p, row in zip(partitions, rows, strict=True):
            if (why := _wrong_type(row)) is not None:
                out[p] = PartitionState(
                    refuse=f"its progress {keys.progress_key(kind, p)} in the store cannot be "
                    f"read ({why})"
                )
                continue
            offset, max_et, topic = row
            try:
                out[p] = PartitionState(
                    offset=int(offset) if offset is not None else -1,
                    max_event_time=int(max_et) if max_et is not None else windows.NO_EVENT_YET,
                    topic=topic.decode() if isinstance(topic, bytes) else topic,
                )
            except ValueError as exc:  # written by something else: where it stands is unknown
                out[p] = PartitionState(
                    refuse=f"its progress {keys.progress_key(kind, p)} in the store cannot be "
                    f"read ({exc})"
                )
        return out

    async def read_hashes(self, names: list[str]) -> dict[str, dict[bytes, bytes]]:
        """Every field of each hash (empty for a missing one), in one round trip.

        Raises :class:`StoredTypeError` naming the keys that hold another type.
        """
        if not names:
            return {}
        pipe = self._client.pipeline(transaction=False)
        for k in names:
            pipe.hgetall(k)
        rows = await self._read(pipe)
        wrong = {k: why for k, r in zip(names, rows, strict=True) if (why := _wrong_type(r))}
        if wrong:
            raise StoredTypeError(wrong)
        return dict(zip(names, rows, strict=True))

    async def _read(self, pipe: aioredis.client.Pipeline) -> list[Any]:
        """The replies of a pipeline of reads, a key of another type's as its error (the
        caller says what that means); any other error reply is raised."""
        if self._router is not None:
            rows = await self._read_routed(pipe)
        else:
            rows = list(await pipe.execute(raise_on_error=False))
        for r in rows:
            if isinstance(r, Exception) and _wrong_type(r) is None:
                raise r
        return rows

    async def apply(
        self, batches: list[PartitionBatch], now_ms: int
    ) -> tuple[list[ApplyOutcome], float]:
        """Apply batches and wait until they are durable (:meth:`send`, then :meth:`durable`).

        Returns the outcome per non-empty batch and the seconds from sending the batches until
        the store confirmed them durable (0 when nothing was applied or durability is ``none``).
        """
        outcomes = await self.send(batches, now_ms)
        return outcomes, await self.durable()

    async def send(self, batches: list[PartitionBatch], now_ms: int) -> list[ApplyOutcome]:
        """Apply batches in one round trip; the outcomes of the non-empty ones, in order.

        The primary has fsynced them (at ``local`` or ``replica`` durability) when this
        returns; :meth:`durable` waits for the rest of the configured level.
        """
        todo = [b for b in batches if not b.empty]
        if not todo:
            return []
        if self._router is not None:
            return await self._send_routed(self._router, todo, now_ms)
        if not self._functions_loaded:
            await self.load_functions()
        pipe = self._client.pipeline(transaction=False)
        pipe.execute_command("FCALL", MANY_FUNCTION_NAME, *self._many_call(todo, now_ms))
        self._queue_wait(pipe)
        t0 = time.perf_counter()
        # a partition the function refuses must not fail the others' applies
        results = await pipe.execute(raise_on_error=False)
        replies = results[0]
        if isinstance(replies, Exception):  # the whole call failed: so did every apply
            replies = [replies] * len(todo)
        outcomes = [_outcome(b, r) for b, r in zip(todo, replies, strict=True)]
        if self._durability is not Durability.NONE:
            _checked_wait(results)
        if any(o.applied for o in outcomes):
            # the newest local reply covers every earlier write; the wait counts from the oldest
            first = t0 if self._unconfirmed is None else self._unconfirmed[1]
            self._unconfirmed = (results[-1], first)
        return outcomes

    def _many_call(self, todo: list[PartitionBatch], now_ms: int) -> list[Any]:
        """The arguments of ``FCALL pulse_apply_many`` after its name: the number of keys,
        every batch's keys, the count pairs, every batch's arguments."""
        key_lists: list[list[str]] = []
        arg_lists: list[list[bytes | str]] = []
        for b in todo:
            key_list, args = payload(
                b,
                self._retention,
                now_ms,
                topic=self._topic_names.get(b.kind, ""),
                owner=self._owner,
            )
            key_lists.append(key_list)
            arg_lists.append(args)
        counts = orjson.dumps([[len(k), len(a)] for k, a in zip(key_lists, arg_lists, strict=True)])
        return [
            sum(map(len, key_lists)),
            *chain.from_iterable(key_lists),
            counts,
            *chain.from_iterable(arg_lists),
        ]

    async def durable(self) -> float:
        """Wait until every write sent on this connection meets the durability level.

        Returns the seconds since the oldest unconfirmed :meth:`send` (0 when none).
        """
        if self._router is not None:
            return await self._durable_routed(self._router)
        if self._unconfirmed is None:
            return 0.0
        reply, t0 = self._unconfirmed
        waited = await self._until_durable(reply, t0)
        self._unconfirmed = None
        return waited

    async def fence(self) -> float:
        """Make every write the store has accepted so far durable at our level.

        WAITAOF only covers the writes of its own connection; after a reconnect (or a batch
        someone else applied) one small write of ours, ordered after theirs in the AOF and the
        replication stream, lets WAITAOF vouch for all of them. On a cluster: on every primary.
        """
        if self._router is not None:
            return await self._fence_routed(self._router)
        pipe = self._client.pipeline(transaction=False)
        pipe.incr(keys.fence_key())
        self._queue_wait(pipe)
        t0 = time.perf_counter()
        results = await pipe.execute(raise_on_error=True)
        waited = await self._until_durable(results[-1], t0)
        self._unconfirmed = None
        return waited

    def _queue_wait(self, pipe: aioredis.client.Pipeline) -> None:
        # The local fsync first: the primary fsyncs before it answers, so this returns at once.
        if self._durability is not Durability.NONE:
            pipe.execute_command("WAITAOF", 1, 0, self._timeout_ms)

    @property
    def _need_replicas(self) -> int:
        return 1 if self._durability is Durability.REPLICA else 0

    async def _until_durable(
        self, reply: object, t0: float, client: aioredis.Redis | None = None
    ) -> float:
        """Keep asking until this connection's writes meet the durability level.

        ``reply`` is the answer of the local ``WAITAOF`` sent with the writes. A replica
        answers the primary's ack request before it has fsynced the writes that came with it,
        and otherwise acks only once a second; every ``WAITAOF`` that blocks makes the primary
        ask again, so the replica is polled with short ones (their timeout fires on the
        server's ``hz`` tick, 10 ms at the ``hz 100`` that ``pulse up`` configures). While the
        store cannot confirm (a replica is down, a disk is stuck) this keeps waiting, with a
        warning every ``durability_timeout_ms``: acknowledging to Kafka before that would break
        the durability promise.
        """
        if self._durability is Durability.NONE:
            return 0.0
        need = self._need_replicas
        warned_at = t0
        while True:
            local, replicas = reply if isinstance(reply, list | tuple) else (0, 0)
            if int(local) >= 1 and int(replicas) >= need:
                return time.perf_counter() - t0
            now = time.perf_counter()
            if (now - warned_at) * 1000 >= self._timeout_ms:
                warned_at = now
                log.warning(
                    "store confirmed local=%s replicas=%s AOF fsyncs after %d ms; %s durability "
                    "needs local=1 replicas=%d: still waiting%s",
                    local,
                    replicas,
                    round((now - t0) * 1000),
                    self._durability.value,
                    need,
                    " (the replica is down or stuck, or not back yet after a failover)"
                    if int(local) >= 1 and int(replicas) < need
                    else "",
                )
            reply = await (client or self._client).execute_command(  # type: ignore[no-untyped-call]
                "WAITAOF", 1, need, POLL_MS if int(local) >= 1 else self._timeout_ms
            )

    # ------------------------------------------------------------------ on a cluster

    async def _read_routed(self, pipe: aioredis.client.Pipeline) -> list[Any]:
        """Run a read pipeline through the cluster client; no node answering, or a redirect it
        could not follow, is a lost connection to the caller (which retries)."""
        assert self._router is not None
        try:
            await self._router.refresh()
            rows = list(await pipe.execute(raise_on_error=False))
        except READ_REDIRECTS as exc:
            self._router.stale()
            raise SlotMovedError(f"reading the cluster: {exc}") from exc
        for r in rows:
            if isinstance(r, READ_REDIRECTS):
                self._router.stale()
                raise SlotMovedError(f"reading the cluster: {r}")
        return rows

    async def _load_on(self, node: Node) -> None:
        await node.client.execute_command(  # type: ignore[no-untyped-call]
            "FUNCTION", "LOAD", "REPLACE", function_source()
        )
        self._loaded_on.add(node.name)

    async def _on_node(
        self, router: StoreRouter, node: Node, pipe: aioredis.client.Pipeline
    ) -> list[object]:
        """Run ``pipe`` on ``node``; a redirect or a lost connection re-maps the cluster and
        surfaces as a connection error (what was sent is unsure)."""
        try:
            # a partition the function refuses must not fail the others' applies
            replies = list(await pipe.execute(raise_on_error=False))
            for r in replies:  # as the pipeline would have raised them, for the handlers below
                if isinstance(r, Exception) and isinstance(r, _RAISED):
                    raise r
        except REDIRECTS as exc:
            router.stale()
            raise SlotMovedError(f"{node.name} answered {type(exc).__name__} ({exc})") from exc
        except (aioredis.ConnectionError, aioredis.TimeoutError, OSError):
            await router.lost(node)
            raise
        if self._durability is not Durability.NONE:
            _checked_wait(replies)
        return replies

    async def _send_routed(
        self, router: StoreRouter, todo: list[PartitionBatch], now_ms: int
    ) -> list[ApplyOutcome]:
        """:meth:`send` on a cluster: each node's partitions in one pipeline, all at once."""
        groups: dict[str, tuple[Node, list[int]]] = {}
        calls = []
        for i, b in enumerate(todo):
            key_list, args = payload(
                b,
                self._retention,
                now_ms,
                topic=self._topic_names.get(b.kind, ""),
                owner=self._owner,
            )
            calls.append((key_list, args))
            node = await router.node_for(key_list[0])
            groups.setdefault(node.name, (node, []))[1].append(i)
        for node, _ in groups.values():
            if node.name not in self._loaded_on:
                await self._load_on(node)

        async def one(node: Node, members: list[int]) -> tuple[Node, list[object], float]:
            pipe = node.client.pipeline(transaction=False)
            for i in members:
                key_list, args = calls[i]
                pipe.execute_command("FCALL", FUNCTION_NAME, len(key_list), *key_list, *args)
            self._queue_wait(pipe)
            t0 = time.perf_counter()
            return node, await self._on_node(router, node, pipe), t0

        done = await asyncio.gather(*(one(n, m) for n, m in groups.values()))
        outcomes: list[ApplyOutcome | None] = [None] * len(todo)
        for (node, members), (_, replies, t0) in zip(groups.values(), done, strict=True):
            applied = False
            for i, r in zip(members, replies, strict=False):
                outcomes[i] = _outcome(todo[i], r)
                applied |= outcomes[i].applied  # type: ignore[union-attr]
            if applied:
                before = self._node_unconfirmed.get(node.name)
                first = t0 if before is None else before[2]
                self._node_unconfirmed[node.name] = (node, replies[-1], first)
        return [o for o in outcomes if o is not None]

    async def _durable_routed(self, router: StoreRouter) -> float:
        """:meth:`durable` on a cluster: every node written since the last acknowledgement."""
        if not self._node_unconfirmed:
            return 0.0
        todo = list(self._node_unconfirmed.values())

        async def one(node: Node, reply: object, t0: float) -> float:
            try:
                return await self._until_durable(reply, t0, node.client)
            except (aioredis.ConnectionError, aioredis.TimeoutError, OSError):
                await router.lost(node)
                raise

        waited = await asyncio.gather(*(one(*entry) for entry in todo))
        self._node_unconfirmed.clear()
        return max(waited)

    async def _fence_routed(self, router: StoreRouter) -> float:
        """:meth:`fence` on a cluster: a write of ours on every primary, and its wait."""
        nodes = await router.primaries()
        fence_keys = [await router.fence_key(n) for n in nodes]

        async def one(node: Node, key: str) -> float:
            pipe = node.client.pipeline(transaction=False)
            pipe.incr(key)
            self._queue_wait(pipe)
            t0 = time.perf_counter()
            replies = await self._on_node(router, node, pipe)
            try:
                return await self._until_durable(replies[-1], t0, node.client)
            except (aioredis.ConnectionError, aioredis.TimeoutError, OSError):
                await router.lost(node)
                raise

        waited = await asyncio.gather(*(one(n, k) for n, k in zip(nodes, fence_keys, strict=True)))
        self._node_unconfirmed.clear()
        return max(waited, default=0.0)
