"""The writer's view of a Valkey cluster: which primary serves each partition, one connection each.

A partition's keys share a hash tag (``schemas.keys``), so its whole apply runs on the primary
that serves that slot. ``WAITAOF`` vouches only for the writes of its own connection (see
``schemas.settings.store_client``), so the router keeps one never-retried connection per primary
(:meth:`StoreRouter.node_for`) and the writer sends each partition's apply, and the wait for it,
on its node's connection. The slot map comes from redis-py's ``RedisCluster`` (``CLUSTER
SLOTS``), which also serves the writer's reads (a restore's progress and window hashes), and is
refreshed after a redirect (``MOVED``/``ASK``/``TRYAGAIN``/``CLUSTERDOWN``) or a lost node: the
writer then raises :class:`SlotMovedError`, a connection error to its caller, which sends the
poll again (the store skips what it holds) and fences every primary before acknowledging.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import redis.asyncio as aioredis
from redis.crc import key_slot
from redis.exceptions import (
    AskError,
    ClusterDownError,
    ReadOnlyError,
    RedisClusterException,
    TryAgainError,
)
from redis.exceptions import ConnectionError as StoreConnectionError

from schemas import keys
from schemas.settings import StoreRole, StoreSettings, store_client

if TYPE_CHECKING:
    from redis.asyncio.cluster import ClusterNode, RedisCluster

log = logging.getLogger("pulse.store_router")

#: replies that mean "this slot is (being) served elsewhere": refresh the map and retry
REDIRECTS: tuple[type[Exception], ...] = (AskError, TryAgainError, ClusterDownError, ReadOnlyError)


class SlotMovedError(StoreConnectionError):
    """A partition's slot is served by another node now (or is moving): the slot map was
    refreshed, and what was sent must be treated as unsure, as after a lost connection."""


@dataclass(frozen=True, slots=True)
class Node:
    """A primary and the writer's one connection to it."""

    name: str  # host:port
    client: aioredis.Redis


class StoreRouter:
    """Maps keys to the primaries that serve their slots; one writer connection per primary."""

    def __init__(self, store: StoreSettings, socket_timeout_s: float) -> None:
        self._store = store
        self._timeout_s = socket_timeout_s
        # the slot map, and the client of the writer's reads (it follows redirects itself)
        self.cluster = cast(
            "RedisCluster",
            store_client(store, asyncio=True, role=StoreRole.WORKER, timeout_s=socket_timeout_s),
        )
        self._nodes: dict[str, Node] = {}
        self._fence_keys: dict[str, str] = {}
        self._stale = False  # the first refresh reads the map anyway

    def _node(self, found: ClusterNode) -> Node:
        name = f"{found.host}:{found.port}"
        node = self._nodes.get(name)
        if node is None:
            direct = self._store.model_copy(update={"host": found.host, "cluster": False})
            client = store_client(
                direct,
                port=int(found.port),
                asyncio=True,
                one_connection=True,
                role=StoreRole.WORKER,
                timeout_s=self._timeout_s,
            )
            node = self._nodes[name] = Node(name, client)
        return node

    async def refresh(self) -> None:
        """Read the slot map again if it may be out of date (after a redirect or a lost node).

        No node answering is a lost connection to the caller, which retries.
        """
        try:
            await self.cluster.initialize()
            if self._stale:
                await self.cluster.nodes_manager.initialize()
                self._fence_keys.clear()
                self._stale = False
        except RedisClusterException as exc:
            self._stale = True
            raise SlotMovedError(f"no cluster node gave the slot map: {exc}") from exc

    def stale(self) -> None:
        """The slot map may be out of date: read it again before the next routing."""
        self._stale = True

    async def node_for(self, key: str) -> Node:
        """The primary that serves ``key``'s slot, as far as the map knows."""
        await self.refresh()
        found = self.cluster.get_node_from_key(key)
        if found is None:
            self.stale()
            raise SlotMovedError(f"no node serves the slot of {key}")
        return self._node(found)

    async def primaries(self) -> list[Node]:
        """Every primary of the cluster."""
        await self.refresh()
        return [self._node(n) for n in self.cluster.get_primaries()]

    async def fence_key(self, node: Node) -> str:
        """A fence key (``schemas.keys.fence_key(n)``) whose slot ``node`` serves."""
        await self.refresh()
        if node.name not in self._fence_keys:
            for n in range(1 << 20):
                key = keys.fence_key(n)
                owner = self.cluster.get_node_from_key(key)
                if owner is not None and f"{owner.host}:{owner.port}" == node.name:
                    self._fence_keys[node.name] = key
                    break
            else:
                raise SlotMovedError(f"the cluster map gives {node.name} no slot")
        return self._fence_keys[node.name]

    async def lost(self, node: Node) -> None:
        """``node``'s connection failed: drop it (the next use reconnects) and re-map."""
        self.stale()
        if self._nodes.pop(node.name, None) is not None:
            try:
                await node.client.aclose(close_connection_pool=True)
            except (StoreConnectionError, OSError) as exc:
                log.debug("closing the connection to %s: %s", node.name, exc)

    async def close(self) -> None:
        """Close every connection."""
        for node in list(self._nodes.values()):
            await node.client.aclose(close_connection_pool=True)
        self._nodes.clear()
        await self.cluster.aclose()


def slot_of(key: str) -> int:
    """The cluster slot of a key (its hash tag's, if it has one)."""
    return int(key_slot(key.encode()))
