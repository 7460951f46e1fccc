"""The writer on a cluster, with fake nodes: each partition's apply and wait on its own node."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis.exceptions import BusyLoadingError, MovedError, RedisClusterException, ResponseError
from redis.exceptions import ConnectionError as StoreConnectionError

from pipeline.batch import PartitionBatch
from pipeline.settings import Durability
from pipeline.state import Retention
from pipeline.store_router import Node, SlotMovedError, StoreRouter
from pipeline.store_writer import StoreWriteError, StoreWriter
from schemas import keys
from schemas.events import EventKind


class FakePipe:
    def __init__(self, node: FakeNode) -> None:
        self.node = node
        self.commands: list[tuple[Any, ...]] = []

    def execute_command(self, *args: Any) -> None:
        self.commands.append(args)

    def incr(self, key: str) -> None:
        self.commands.append(("INCRBY", key, 1))

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        self.node.sent.append(self.commands)
        if self.node.fail is not None:
            raise self.node.fail
        out: list[Any] = []
        for c in self.commands:
            if c[0] == "FCALL" and c[3] in self.node.replies:  # c[3]: the progress key
                out.append(self.node.replies[c[3]])
            elif c[0] == "FCALL":
                out.append([1, 10])
            elif c[0] == "WAITAOF":
                out.append([1, 0])  # fsynced here, the replica not yet
            else:
                out.append(1)
        return out


class FakeNode:
    def __init__(self) -> None:
        self.sent: list[list[tuple[Any, ...]]] = []
        self.waits = 0
        self.fail: Exception | None = None
        self.replies: dict[str, Any] = {}  # progress key -> its FCALL's reply (an error)

    def pipeline(self, transaction: bool = False) -> FakePipe:
        return FakePipe(self)

    async def execute_command(self, *args: Any) -> Any:
        if args[0] == "WAITAOF":
            self.waits += 1
            return [1, 1]
        return b"pulse"


class FakeCluster:
    """The cluster client of the writer's reads: no node answers."""

    def pipeline(self, transaction: bool = False) -> FakeReads:
        return FakeReads()


class FakeReads:
    def hmget(self, *args: Any) -> None:
        pass

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        raise RedisClusterException("Redis Cluster cannot be connected.")


class FakeRouter(StoreRouter):
    """Partitions 0 and 1 on node a, the rest on node b."""

    def __init__(self) -> None:
        self.nodes = {name: FakeNode() for name in ("a", "b")}
        self.cluster = FakeCluster()  # type: ignore[assignment]
        self.stales = 0
        self.lost_nodes: list[str] = []

    async def refresh(self) -> None:
        pass

    def _get(self, name: str) -> Node:
        return Node(name, self.nodes[name])  # type: ignore[arg-type]

    async def node_for(self, key: str) -> Node:
        _, partition = keys.parse_tag(key)
        return self._get("a" if partition < 2 else "b")

    async def primaries(self) -> list[Node]:
        return [self._get("a"), self._get("b")]

    async def fence_key(self, node: Node) -> str:
        return keys.fence_key(0 if node.name == "a" else 1)

    def stale(self) -> None:
        self.stales += 1

    async def lost(self, node: Node) -> None:
        self.lost_nodes.append(node.name)


def _batch(partition: int) -> PartitionBatch:
    return PartitionBatch(
        kind=EventKind.SENSOR,
        partition=partition,
        expect_offset=-1,
        last_offset=9,
        max_event_time=1000,
        watermark=0,
        deltas=[],
        new_entities={},
        events=10,
        dead=[],
        late=[],
    )


def _writer(router: FakeRouter) -> StoreWriter:
    return StoreWriter(router, Durability.REPLICA, Retention({"10s": 3600, "1m": 7200}))


def test_each_partition_goes_to_its_node_and_durable_waits_on_each() -> None:
    router = FakeRouter()
    writer = _writer(router)

    async def run() -> None:
        outcomes = await writer.send([_batch(0), _batch(2), _batch(1)], 1)
        assert [(o.partition, o.applied) for o in outcomes] == [(0, True), (2, True), (1, True)]
        a, b = router.nodes["a"], router.nodes["b"]
        # the library first, then one pipeline per node: its partitions' FCALLs and a WAITAOF
        fcalls_a = [c[3] for c in a.sent[-1] if c[0] == "FCALL"]
        assert fcalls_a == [keys.progress_key("sensor", 0), keys.progress_key("sensor", 1)]
        assert [c[3] for c in b.sent[-1] if c[0] == "FCALL"] == [keys.progress_key("sensor", 2)]
        assert a.sent[-1][-1][0] == b.sent[-1][-1][0] == "WAITAOF"
        await writer.durable()
        assert a.waits == 1 and b.waits == 1  # the replica of each node, asked on its own
        assert await writer.durable() == 0.0  # nothing more to wait for
        await writer.send([_batch(3)], 2)
        await writer.durable()
        assert (a.waits, b.waits) == (1, 2)  # only the node written since

    asyncio.run(run())


def test_a_redirect_is_a_lost_connection_and_remaps() -> None:
    router = FakeRouter()
    writer = _writer(router)
    router.nodes["b"].fail = MovedError("1234 127.0.0.1:7001")

    async def run() -> None:
        with pytest.raises(SlotMovedError) as caught:
            await writer.send([_batch(0), _batch(3)], 1)
        assert isinstance(caught.value, StoreConnectionError)  # the checkpoint retries it
        assert router.stales == 1 and "MovedError" in str(caught.value)
        router.nodes["b"].fail = StoreConnectionError("gone")
        with pytest.raises(StoreConnectionError):
            await writer.send([_batch(3)], 2)
        assert router.lost_nodes == ["b"]

    asyncio.run(run())


def test_fence_writes_and_waits_on_every_primary() -> None:
    router = FakeRouter()
    writer = _writer(router)

    async def run() -> None:
        await writer.fence()
        for n, node in enumerate(router.nodes.values()):
            assert node.sent[-1][0] == ("INCRBY", keys.fence_key(n), 1)
            assert node.waits == 1

    asyncio.run(run())


def test_a_cluster_that_does_not_answer_a_read_is_a_lost_connection() -> None:
    router = FakeRouter()
    writer = _writer(router)

    async def run() -> None:
        with pytest.raises(SlotMovedError):  # the checkpoint retries its restore
            await writer.read_state(EventKind.SENSOR, [0, 1])
        assert router.stales == 1

    asyncio.run(run())


class _Rows:
    """A client whose pipelines answer every HMGET with the next of ``rows``."""

    def __init__(self, rows: list[list[bytes | None]]) -> None:
        self.rows = rows

    def pipeline(self, transaction: bool = True) -> _Rows:
        return self

    def hmget(self, *args: object) -> None:
        pass

    async def execute(self, raise_on_error: bool = True) -> list[list[bytes | None]]:
        return self.rows


def test_progress_that_cannot_be_read_refuses_its_partition_only() -> None:
    rows: list[list[bytes | None]] = [
        [b"41", b"1000", b"pulse.sensor"],
        [b"abc", b"1000", b"pulse.sensor"],  # written by something else
        [None, None, None],
    ]
    writer = StoreWriter(
        _Rows(rows),  # type: ignore[arg-type]
        Durability.REPLICA,
        Retention({"10s": 3600, "1m": 7200}),
    )
    states = asyncio.run(writer.read_state(EventKind.SENSOR, [0, 1, 2]))
    assert (states[0].offset, states[0].topic, states[0].refuse) == (41, "pulse.sensor", None)
    assert states[1].refuse == (
        f"its progress {keys.progress_key(EventKind.SENSOR, 1)} in the store cannot be read "
        "(invalid literal for int() with base 10: b'abc')"
    )
    assert (states[2].offset, states[2].refuse) == (-1, None)


def test_a_partition_the_function_refuses_is_its_own_outcome_and_other_errors_raise() -> None:
    """The function refuses a call whose key holds another type, writing nothing: that
    partition's outcome says so and the others are applied. Any other error reply is raised as
    the pipeline would have raised it: a store error, or a lost node for a loading one."""
    router = FakeRouter()
    writer = _writer(router)
    holds = "window key pulse:{sensor.1}:w:1m:metric:0 holds a string, not a hash"
    router.nodes["a"].replies[keys.progress_key("sensor", 1)] = ResponseError(
        f"pulse_apply: {holds}"
    )

    async def run() -> None:
        outcomes = await writer.send([_batch(0), _batch(1), _batch(2)], 1)
        assert [(o.partition, o.applied, o.refused) for o in outcomes] == [
            (0, True, None), (1, False, holds), (2, True, None),
        ]  # fmt: skip
        router.nodes["b"].replies[keys.progress_key("sensor", 2)] = ResponseError(
            "pulse_apply: the header is not JSON"
        )
        with pytest.raises(StoreWriteError, match="the header is not JSON"):
            await writer.send([_batch(2)], 2)
        router.nodes["b"].replies[keys.progress_key("sensor", 2)] = BusyLoadingError("loading")
        with pytest.raises(BusyLoadingError):
            await writer.send([_batch(2)], 3)
        assert router.lost_nodes == ["b"]

    asyncio.run(run())
