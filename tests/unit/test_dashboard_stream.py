"""``queries.stream_raw``: commands go out a chunk at a time, each chunk once the first reply of
the one before has arrived, so the store works on the next chunk while the caller decodes."""

from __future__ import annotations

from typing import Any

import pytest
import redis

from dashboard import queries


class FakeConnection:
    """Answers each command it was sent with its own bytes; logs sends and reads in order."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.log: list[tuple[str, int]] = []
        self.queue: list[bytes] = []
        self.read = 0
        self.fail_at = fail_at
        self.dropped = False

    def send_packed_command(self, parts: list[bytes]) -> None:
        data = b"".join(parts)
        cmds = [b"*" + c for c in data.split(b"*") if c]
        self.queue += cmds
        self.log.append(("send", len(cmds)))

    def read_response(self) -> bytes:
        if self.read >= len(self.queue):
            raise AssertionError("read before the command was sent")
        i, self.read = self.read, self.read + 1
        self.log.append(("read", i))
        if i == self.fail_at:
            raise redis.ResponseError("WRONGTYPE")
        return self.queue[i]

    def disconnect(self) -> None:
        self.dropped = True


class FakePool:
    def __init__(self, conn: FakeConnection) -> None:
        self.conn = conn
        self.released = 0

    def get_connection(self, *args: Any) -> FakeConnection:
        return self.conn

    def release(self, conn: FakeConnection) -> None:
        self.released += 1


class FakeClient:
    def __init__(self, conn: FakeConnection) -> None:
        self.connection_pool = FakePool(conn)

    def get_connection_kwargs(self) -> dict[str, Any]:
        return {}


def _commands(n: int) -> list[bytes]:
    return [queries._resp(b"ECHO", str(i)) for i in range(n)]


@pytest.mark.parametrize("n", [1, queries.STREAM_CHUNK, queries.STREAM_CHUNK + 1, 30, 100])
def test_replies_come_in_order_and_each_chunk_is_sent_after_the_first_reply_before(
    n: int,
) -> None:
    conn = FakeConnection()
    cmds = _commands(n)
    got = queries.execute_raw(FakeClient(conn), cmds)  # type: ignore[arg-type]
    assert got == cmds
    sizes, starts = [], [0]
    while starts[-1] < n:  # STREAM_CHUNK, then as many as were sent before
        sizes.append(min(max(queries.STREAM_CHUNK, starts[-1]), n - starts[-1]))
        starts.append(starts[-1] + sizes[-1])
    sends = [(i, size) for i, (what, size) in enumerate(conn.log) if what == "send"]
    assert [size for _, size in sends] == sizes
    # every chunk but the first goes out right after the first reply of the one before
    for (at, _), k in zip(sends[1:], starts, strict=False):
        assert conn.log[at - 1] == ("read", k)


@pytest.mark.parametrize(("n", "ahead"), [(1, 2), (2, 2), (12, 2), (12, 1), (30, 5)])
def test_with_ahead_the_store_is_kept_that_many_commands_ahead(n: int, ahead: int) -> None:
    conn = FakeConnection()
    cmds = _commands(n)
    got = list(queries.stream_raw(FakeClient(conn), cmds, ahead=ahead))  # type: ignore[arg-type]
    assert got == cmds
    sent = 0
    for at, (what, k) in enumerate(conn.log):
        if what == "send":
            sent += k
            # the first send, then one right after each reply while commands are left
            assert (at == 0 and k == min(n, ahead)) or (conn.log[at - 1][0] == "read" and k == 1)
        else:
            assert sent - k == min(ahead, n - k)  # this reply and the ones queued behind it
    assert sent == n


def test_a_failed_command_drops_the_connection_mid_stream() -> None:
    conn = FakeConnection(fail_at=10)
    client = FakeClient(conn)
    with pytest.raises(redis.ResponseError):
        queries.execute_raw(client, _commands(30))  # type: ignore[arg-type]
    assert conn.dropped and client.connection_pool.released == 1
