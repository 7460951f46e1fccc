"""Sentinel mode: the sentinels' config, the nodes following the current primary, the store
clients that discover it, and the checkpoint resuming on a promoted replica (all with fakes)."""

from __future__ import annotations

import asyncio
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import pytest
import redis
import redis.asyncio as aioredis
from pydantic import SecretStr, ValidationError
from redis.asyncio import sentinel as sentinel_async
from redis.exceptions import ConnectionError as StoreConnectionError

from pipeline.checkpoint import StoreBehindError
from pipeline.settings import KafkaSettings, StackSettings, StoreSettings
from pipeline.stack import sentinel
from pipeline.stack.errors import StackError
from pipeline.stack.stack import Stack
from schemas.settings import store_client
from tests.unit.test_checkpoint import FakeWriter, S, applier, records, run, sensors

SENTINELS = ["127.0.0.1:26401", "127.0.0.1:26402", "127.0.0.1:26403"]


def sentinel_store(**kw: object) -> StoreSettings:
    return StoreSettings(port=7000, replica_port=7001, sentinels=SENTINELS, **kw)  # type: ignore[arg-type]


# --- settings ------------------------------------------------------------------------------


def test_sentinels_come_comma_separated_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PULSE_STORE_SENTINELS", " 127.0.0.1:26401, localhost:26402 ,")
    store = StoreSettings()
    assert store.sentinels == ["127.0.0.1:26401", "localhost:26402"]
    assert store.sentinel_addresses == [("127.0.0.1", 26401), ("localhost", 26402)]
    assert store.sentinel_service == "pulse"
    monkeypatch.setenv("PULSE_STORE_SENTINELS", "")
    assert StoreSettings().sentinels == []


@pytest.mark.parametrize("bad", ["26401", "127.0.0.1:", "127.0.0.1:x", "h:70000"])
def test_a_sentinel_address_must_be_host_and_port(bad: str) -> None:
    with pytest.raises(ValidationError, match="is not host:port"):
        StoreSettings(sentinels=bad)


# --- the sentinels' config -----------------------------------------------------------------


def render(
    tmp_path: Path, auth: tuple[str | None, str] | None = None, password: str | None = None
) -> list[str]:
    return sentinel.render_config(
        port=26401,
        data_dir=tmp_path,
        log_file=tmp_path / "s.log",
        service="pulse",
        primary_port=7000,
        quorum=2,
        down_after_ms=1500,
        failover_timeout_ms=9000,
        auth=auth,
        password=password,
    ).splitlines()


def test_sentinel_config_monitors_the_primary_with_its_quorum_and_timings(tmp_path: Path) -> None:
    lines = render(tmp_path)
    for expected in (
        "bind 127.0.0.1",
        "port 26401",
        "set-proc-title no",
        "sentinel monitor pulse 127.0.0.1 7000 2",
        "sentinel down-after-milliseconds pulse 1500",
        "sentinel failover-timeout pulse 9000",
    ):
        assert expected in lines
    assert lines.index("sentinel monitor pulse 127.0.0.1 7000 2") < lines.index(
        "sentinel down-after-milliseconds pulse 1500"
    )  # a service's options must follow its monitor line
    assert not any(line.startswith(("requirepass", "sentinel auth-")) for line in lines)


def test_sentinel_config_with_credentials(tmp_path: Path) -> None:
    lines = render(tmp_path, auth=(None, 'p "w'), password='p "w')
    assert 'sentinel auth-pass pulse "p \\"w"' in lines
    assert 'requirepass "p \\"w"' in lines
    assert not any(line.startswith("sentinel auth-user") for line in lines)
    lines = render(tmp_path, auth=("pulse-admin", "a"))
    assert 'sentinel auth-user pulse "pulse-admin"' in lines
    assert 'sentinel auth-pass pulse "a"' in lines
    assert not any(line.startswith("requirepass") for line in lines)


def test_how_sentinels_authenticate() -> None:
    shared = sentinel_store(password=SecretStr("pw"))
    assert sentinel.node_auth(shared) == (None, "pw")
    assert sentinel.sentinel_password(shared) == "pw"
    users = sentinel_store(admin_password=SecretStr("adm"), reader_password=SecretStr("r"))
    assert sentinel.node_auth(users) == ("pulse-admin", "adm")
    assert sentinel.sentinel_password(users) is None
    assert sentinel.node_auth(sentinel_store()) is None
    assert sentinel.sentinel_password(sentinel_store()) is None


def test_quorum_defaults_to_a_majority() -> None:
    assert sentinel.SentinelSettings().quorum_of(3) == 2
    assert sentinel.SentinelSettings().quorum_of(1) == 1
    assert sentinel.SentinelSettings(quorum=3).quorum_of(3) == 3


REWRITTEN = """\
port 26401
sentinel myid 0123456789abcdef0123456789abcdef01234567
sentinel monitor pulse 127.0.0.1 7001 2
sentinel down-after-milliseconds pulse 1500
sentinel config-epoch pulse 3
sentinel leader-epoch pulse 3
sentinel known-replica pulse 127.0.0.1 7000
sentinel current-epoch 3
"""


def test_the_primary_a_sentinel_recorded_after_a_failover() -> None:
    assert sentinel.recorded_primary(REWRITTEN, "pulse") == (3, 7001)
    assert sentinel.recorded_primary(REWRITTEN, "other") is None
    first = "sentinel monitor pulse 127.0.0.1 7000 2\n"
    assert sentinel.recorded_primary(first, "pulse") == (0, 7000)


def sentinel_stack(tmp_path: Path, **store: object) -> Stack:
    return Stack(
        StackSettings(home=tmp_path),
        KafkaSettings(bootstrap="127.0.0.1:19600"),
        sentinel_store(**store),
    )


def test_a_sentinel_config_is_written_once_then_sentinel_owns_it(tmp_path: Path) -> None:
    stack = sentinel_stack(tmp_path, password=SecretStr("s3cret"))
    assert [s.name for s in stack.sentinels] == ["sentinel-1", "sentinel-2", "sentinel-3"]
    first = stack.sentinels[0]
    argv, marker, _log = first._prepare()
    assert argv[1:] == [str(first.config_file), "--sentinel"] and marker in argv
    assert not any("s3cret" in arg for arg in argv)
    assert stat.S_IMODE(first.config_file.stat().st_mode) == 0o600
    assert "sentinel monitor pulse 127.0.0.1 7000 2" in first.config_file.read_text()
    first.config_file.write_text(REWRITTEN)  # Sentinel rewrote it after a failover
    first._prepare()
    assert first.config_file.read_text() == REWRITTEN
    # a config that monitors none of this stack's nodes (the ports changed) is written anew
    first.config_file.write_text(REWRITTEN.replace("7001", "9999"))
    first._prepare()
    assert "sentinel monitor pulse 127.0.0.1 7000 2" in first.config_file.read_text()


def test_nodes_follow_the_primary_the_sentinels_recorded(tmp_path: Path) -> None:
    stack = sentinel_stack(tmp_path)
    assert stack.known_primary() is None  # never started: the configured primary
    stack.primary._prepare()
    assert "replicaof" not in stack.primary.config_file.read_text()
    assert stack.replica is not None
    stack.replica._prepare()
    assert "replicaof 127.0.0.1 7000" in stack.replica.config_file.read_text()
    # after a failover: the old primary comes back as a replica of the promoted node
    for s in stack.sentinels:
        s.dir.mkdir(parents=True, exist_ok=True)
    stack.sentinels[0].config_file.write_text(REWRITTEN)
    stack.sentinels[1].config_file.write_text(REWRITTEN.replace("epoch pulse 3", "epoch pulse 1"))
    assert stack.known_primary() == 7001
    stack.primary._prepare()
    assert "replicaof 127.0.0.1 7001" in stack.primary.config_file.read_text()
    assert stack.primary.replica_of == 7001
    stack.replica._prepare()
    assert "replicaof" not in stack.replica.config_file.read_text()
    assert stack.replica.replica_of is None


def test_the_highest_config_epoch_wins() -> None:
    @dataclass
    class Recorded:
        at: tuple[int, int] | None

        def is_running(self) -> bool:
            return False

        def recorded(self) -> tuple[int, int] | None:
            return self.at

        def node_ports(self) -> set[int]:
            return {7000, 7001}

    found = sentinel.known_primary(
        cast(
            "list[sentinel.SentinelService]",
            [Recorded((1, 7000)), Recorded(None), Recorded((2, 7001)), Recorded((9, 9999))],
        )
    )
    assert found == 7001


def test_stack_starts_sentinels_last_and_stops_them_first(tmp_path: Path) -> None:
    stack = sentinel_stack(tmp_path)
    names = [s.name for s in stack.services]
    assert names[-3:] == ["sentinel-1", "sentinel-2", "sentinel-3"]
    assert names.index("valkey-primary") < names.index("sentinel-1")


def test_sentinels_run_on_loopback_only(tmp_path: Path) -> None:
    with pytest.raises(StackError, match=r"127\.0\.0\.1 only"):
        Stack(
            StackSettings(home=tmp_path),
            KafkaSettings(bootstrap="127.0.0.1:19600"),
            StoreSettings(sentinels=["10.0.0.5:26379"]),
        )


def test_a_node_client_talks_to_that_node_not_through_sentinel(tmp_path: Path) -> None:
    stack = sentinel_stack(tmp_path)
    client = stack.primary.client()
    assert not isinstance(client.connection_pool, redis.sentinel.SentinelConnectionPool)
    assert client.connection_pool.connection_kwargs["port"] == 7000


# --- store clients through Sentinel ----------------------------------------------------------


@dataclass
class FakeSentinels:
    """Answers discovery like a sentinel group that promoted ``primary``."""

    primary: tuple[str, int]
    replicas: list[tuple[str, int]]

    def discover_master(self, service: str) -> tuple[str, int]:
        assert service == "pulse"
        return self.primary

    def discover_slaves(self, service: str) -> list[tuple[str, int]]:
        return self.replicas


@dataclass
class AsyncFakeSentinels:
    """:class:`FakeSentinels` for the asyncio pools."""

    primary: tuple[str, int]
    replicas: list[tuple[str, int]]

    async def discover_master(self, service: str) -> tuple[str, int]:
        return self.primary


def test_sync_client_discovers_the_primary_and_a_replica() -> None:
    store = sentinel_store()
    fake = FakeSentinels(("127.0.0.1", 7001), [("127.0.0.1", 7000)])
    primary = store_client(store)
    pool = primary.connection_pool
    assert isinstance(pool, redis.sentinel.SentinelConnectionPool) and pool.is_master
    pool.proxy.sentinel_manager = fake
    assert pool.get_master_address() == ("127.0.0.1", 7001)  # type: ignore[no-untyped-call]
    assert store_client(store, port=7000).connection_pool.is_master  # type: ignore[attr-defined]
    replica = store_client(store, port=7001)
    rpool = replica.connection_pool
    assert isinstance(rpool, redis.sentinel.SentinelConnectionPool) and not rpool.is_master
    rpool.proxy.sentinel_manager = fake
    assert next(iter(rpool.rotate_slaves())) == ("127.0.0.1", 7000)  # type: ignore[no-untyped-call]
    # any other port is that node itself
    other = store_client(store, port=7005)
    assert not isinstance(other.connection_pool, redis.sentinel.SentinelConnectionPool)


def test_sentinel_clients_carry_the_password_and_decoding() -> None:
    store = sentinel_store(password=SecretStr("pw"))
    client = store_client(store, decode=True)
    kwargs = client.connection_pool.connection_kwargs
    assert kwargs["password"] == "pw" and kwargs["decode_responses"] is True
    manager = client.connection_pool.sentinel_manager  # type: ignore[attr-defined]
    assert manager.sentinel_kwargs["password"] == "pw"
    assert [c.connection_pool.connection_kwargs["port"] for c in manager.sentinels] == [
        26401,
        26402,
        26403,
    ]


def test_the_writer_client_under_sentinel_is_one_connection_never_retried() -> None:
    store = sentinel_store()
    sync = store_client(store, one_connection=True)
    pool = sync.connection_pool
    assert isinstance(pool, redis.sentinel.SentinelConnectionPool)
    assert isinstance(pool, redis.BlockingConnectionPool) and pool.max_connections == 1
    assert pool.connection_kwargs["retry"].get_retries() == 0

    async def check() -> None:
        client = store_client(store, asyncio=True, one_connection=True)
        apool = client.connection_pool
        assert isinstance(apool, sentinel_async.SentinelConnectionPool)
        assert isinstance(apool, aioredis.BlockingConnectionPool) and apool.max_connections == 1
        assert apool.connection_kwargs["retry"].get_retries() == 0
        assert issubclass(apool.connection_class, sentinel_async.SentinelManagedConnection)
        apool.sentinel_manager = AsyncFakeSentinels(("127.0.0.1", 7001), [])
        assert await apool.get_master_address() == ("127.0.0.1", 7001)  # type: ignore[no-untyped-call]
        await client.aclose()

    asyncio.run(check())


def test_plain_clients_are_unchanged_without_sentinels() -> None:
    client = store_client(StoreSettings(port=7000))
    assert not isinstance(client.connection_pool, redis.sentinel.SentinelConnectionPool)


# --- the checkpoint resumes on a promoted replica -------------------------------------------


@dataclass
class FailoverWriter(FakeWriter):
    """A store whose primary is lost during the next durability wait; the promoted replica
    holds ``promoted`` (the offsets it had received)."""

    promoted: dict[tuple[object, int], int] | None = None

    async def durable(self) -> float:
        if self.promoted is not None:
            self.calls.append("durable")
            self.offsets = dict(self.promoted)  # type: ignore[arg-type]
            self.promoted = None
            raise StoreConnectionError("the primary is gone")
        return await super().durable()


def test_an_unconfirmed_poll_the_promoted_replica_lacks_is_applied_again() -> None:
    w = FailoverWriter(promoted={})  # the replica never got the first poll
    committed: list[dict[str, dict[int, int]]] = []

    async def commit_offsets(offsets: dict[str, dict[int, int]]) -> None:
        for p, next_offset in offsets["pulse.sensor"].items():
            assert next_offset <= w.offsets.get((S, p), -1) + 1, "acknowledged beyond the store"
        committed.append(offsets)

    a, m = applier(w, commit_offsets=commit_offsets)
    run(a.commit(sensors({0: records(0, 5)})))
    run(a.commit(sensors({0: records(5, 2)})))  # the first poll's wait fails: failover
    run(a.flush())
    assert w.offsets == {(S, 0): 6}  # 0..4 applied again on the new primary, then 5..6
    assert committed == [{"pulse.sensor": {0: 7}}]
    assert m.store_retries == 1 and m.fences == 1


def test_a_store_that_lost_acknowledged_batches_stops_the_worker() -> None:
    w = FailoverWriter()
    a, _ = applier(w)
    run(a.commit(sensors({0: records(0, 5)})))  # 0..4 applied and durable
    # the primary is lost during the next durability wait, and the promoted replica lacks
    # 2..4 (durability "local")
    w.promoted = {(S, 0): 1}
    run(a.commit(sensors({0: records(5, 2)})))  # 0..4 acknowledged; 5..6 applied, wait fails
    with pytest.raises(StoreBehindError, match="the store is at offset 1, this worker read on"):
        run(a.flush())


# --- pulse up --sentinel --------------------------------------------------------------------


def test_pulse_up_sentinel_notes_the_sentinels_for_every_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.cli import build_parser
    from pipeline.stack import envfile

    monkeypatch.delenv("PULSE_STORE_SENTINELS", raising=False)
    args = build_parser().parse_args(["up", "--sentinel", "--home", str(tmp_path)])
    assert args.sentinel is True
    sentinel.remember_sentinels(tmp_path)
    path = envfile.env_file(tmp_path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    expected = ["127.0.0.1:26379", "127.0.0.1:26380", "127.0.0.1:26381"]
    assert envfile.load(tmp_path)[1].sentinels == expected
    # sentinels already chosen (file or environment) are kept
    envfile.write(path, {"PULSE_STORE_SENTINELS": "127.0.0.1:27001"})
    sentinel.remember_sentinels(tmp_path)
    assert envfile.read(path) == {"PULSE_STORE_SENTINELS": "127.0.0.1:27001"}
    other = tmp_path / "other"
    monkeypatch.setenv("PULSE_STORE_SENTINELS", "127.0.0.1:27002")
    sentinel.remember_sentinels(other)
    assert not envfile.env_file(other).exists()
