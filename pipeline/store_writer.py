"""The worker's one I/O point to the store: atomic, exactly-once, durable batch applies.

Each partition batch becomes one ``FCALL pulse_apply`` (see ``store_functions.lua``) that checks
the partition's applied offset and applies every increment in the same atomic step. All the
batches of one poll go in one pipeline together with one ``WAITAOF``, so a poll costs one round
trip, and nothing is acknowledged to Kafka before the store says it is durable.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from importlib import resources

import orjson
import redis.asyncio as aioredis

from pipeline import windows
from pipeline.batch import PartitionBatch, PartitionState
from pipeline.settings import Durability
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


def payload(batch: PartitionBatch, retention: Retention, now_ms: int) -> tuple[list[str], bytes]:
    """The keys and JSON argument of one ``pulse_apply`` call."""
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
        ents.append([len(key_list), names])
    body: dict[str, object] = {
        "expect": batch.expect_offset,
        "offset": batch.last_offset,
        "ev": batch.events,
        "late": len(batch.late),
        "dead": len(batch.dead),
        "now": now_ms,
        "a": aggs,
        "s": sks,
        "e": ents,
    }
    if batch.max_event_time != windows.NO_EVENT_YET:
        body["mx"] = batch.max_event_time
        body["wm"] = batch.watermark
    return key_list, orjson.dumps(body)


class StoreWriter:
    """Applies partition batches to the store and waits for the configured durability.

    The client must be a single-connection client (``single_connection_client=True``): WAITAOF
    vouches only for the writes made on its own connection.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        durability: Durability,
        retention: Retention,
        durability_timeout_ms: int = 5000,
    ) -> None:
        self._client = client
        self._durability = durability
        self._retention = retention
        self._timeout_ms = durability_timeout_ms
        self._functions_loaded = False

    async def load_functions(self) -> None:
        """Install (or replace) the ``pulse`` function library in the store."""
        await self._client.execute_command("FUNCTION", "LOAD", "REPLACE", function_source())
        self._functions_loaded = True

    async def close(self) -> None:
        """Close the store connection."""
        await self._client.aclose()

    async def read_state(self, kind: EventKind, partitions: list[int]) -> dict[int, PartitionState]:
        """The applied offset and max event time of each partition, as the store has them."""
        pipe = self._client.pipeline(transaction=False)
        for p in partitions:
            pipe.hmget(
                keys.progress_key(kind, p), keys.Progress.OFFSET, keys.Progress.MAX_EVENT_TIME
            )
        rows = await pipe.execute()
        out: dict[int, PartitionState] = {}
        for p, (offset, max_et) in zip(partitions, rows, strict=True):
            out[p] = PartitionState(
                offset=int(offset) if offset is not None else -1,
                max_event_time=int(max_et) if max_et is not None else windows.NO_EVENT_YET,
            )
        return out

    async def apply(
        self, batches: list[PartitionBatch], now_ms: int
    ) -> tuple[list[ApplyOutcome], float]:
        """Apply batches in one round trip, then wait until they are durable.

        Returns the outcome per batch and the seconds spent waiting for durability.
        """
        todo = [b for b in batches if not b.empty]
        if not todo:
            return [], 0.0
        if not self._functions_loaded:
            await self.load_functions()
        pipe = self._client.pipeline(transaction=False)
        for b in todo:
            key_list, arg = payload(b, self._retention, now_ms)
            pipe.execute_command("FCALL", FUNCTION_NAME, len(key_list), *key_list, arg)
        try:
            results = await pipe.execute(raise_on_error=True)
        except aioredis.ResponseError as exc:
            raise StoreWriteError(f"store rejected a batch apply: {exc}") from exc
        outcomes = [
            ApplyOutcome(b.partition, int(r[0]) == 1, int(r[1]))
            for b, r in zip(todo, results, strict=True)
        ]
        waited = await self.wait_durable() if any(o.applied for o in outcomes) else 0.0
        return outcomes, waited

    async def fence(self) -> float:
        """Make every write the store has accepted so far durable at our level.

        WAITAOF only covers the writes of its own connection; after a reconnect (or a batch
        someone else applied) one small write of ours, ordered after theirs in the AOF and the
        replication stream, lets WAITAOF vouch for all of them.
        """
        await self._client.incr(keys.fence_key())
        return await self.wait_durable()

    async def wait_durable(self) -> float:
        """Block until this connection's writes meet the durability level; seconds waited.

        While the store cannot confirm (a replica is down, a disk is stuck) this keeps waiting:
        acknowledging to Kafka before that would break the durability promise.
        """
        if self._durability is Durability.NONE:
            return 0.0
        need_replicas = 1 if self._durability is Durability.REPLICA else 0
        t0 = time.perf_counter()
        while True:
            local, replicas = await self._client.execute_command(
                "WAITAOF", 1, need_replicas, self._timeout_ms
            )
            if int(local) >= 1 and int(replicas) >= need_replicas:
                return time.perf_counter() - t0
            log.warning(
                "store confirmed local=%s replicas=%s AOF fsyncs after %d ms; %s durability "
                "needs local=1 replicas=%d: still waiting",
                local,
                replicas,
                self._timeout_ms,
                self._durability.value,
                need_replicas,
            )
