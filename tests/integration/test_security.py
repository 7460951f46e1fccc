"""A secured stack: ACL users on real Valkey nodes, and the whole pipeline over TLS and SSL."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from pipeline.stack import StackError
from pipeline.stack.errors import PrerequisiteError
from pipeline.stack.testing import RunningStack, make_stack
from pipeline.stack.valkey import valkey_binary
from pipeline.store_writer import function_source
from schemas import keys
from schemas.settings import StoreRole, store_client
from tests.integration.harness import Pipeline, wait_for

pytestmark = pytest.mark.integration


def pulse(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess[str]:
    """Run a ``pulse`` command to its end with ``env`` on top of this process's."""
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *argv],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@contextlib.contextmanager
def running(stack: RunningStack, *, kafka: bool) -> Iterator[RunningStack]:
    try:
        if kafka:
            stack.stack.up()
        else:  # the store alone
            stack.stack.primary.start()
            assert stack.stack.replica is not None
            stack.stack.replica.start()
        yield stack
    finally:
        with contextlib.suppress(StackError):
            stack.stack.down()


def test_acl_users_get_only_their_rights(tmp_path: Path) -> None:
    stack = make_stack(tmp_path / "home", acl=True)
    with running(stack, kafka=False):
        store = stack.store_settings
        admin = stack.redis()
        reader = store_client(store, decode=True, role=StoreRole.READER)
        worker = store_client(store, decode=True, role=StoreRole.WORKER)

        # the worker loads Pulse's functions, writes its keys, waits for durability
        # redis-py leaves execute_command unannotated
        worker.execute_command("FUNCTION", "LOAD", "REPLACE", function_source())  # type: ignore[no-untyped-call]
        worker.hset(keys.worker_key("w1"), mapping={"polls": 1})
        worker.incr(keys.fence_key())
        # redis-py leaves execute_command unannotated
        assert worker.execute_command("WAITAOF", 1, 1, 5000) == [1, 1]  # type: ignore[no-untyped-call]
        for command in (("FLUSHALL",), ("CONFIG", "GET", "port"), ("ACL", "LIST")):
            with pytest.raises(redis.exceptions.NoPermissionError):
                # redis-py leaves execute_command unannotated
                worker.execute_command(*command)  # type: ignore[no-untyped-call]
        with pytest.raises(redis.exceptions.NoPermissionError):
            worker.hset("elsewhere", "polls", 1)  # a command it has, on a key outside pulse:*

        # the reader reads, and nothing else
        assert reader.hgetall(keys.worker_key("w1")) == {"polls": "1"}
        assert keys.worker_key("w1") in set(reader.scan_iter(match="pulse:*"))
        with pytest.raises(redis.exceptions.NoPermissionError, match=r"NOPERM|no permissions"):
            reader.hset(keys.worker_key("w1"), "polls", 2)
        with pytest.raises(redis.exceptions.NoPermissionError):
            # redis-py leaves execute_command unannotated
            reader.execute_command("FCALL", "pulse_apply", 0)  # type: ignore[no-untyped-call]
        with pytest.raises(redis.exceptions.NoPermissionError):
            reader.delete(keys.worker_key("w1"))

        # the default user is off, with or without a password
        anonymous = redis.Redis(host="127.0.0.1", port=store.port, socket_timeout=5)
        with pytest.raises(redis.AuthenticationError):
            anonymous.ping()
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=store.port, password="x").ping()

        # the replica follows the primary as the replication user
        replica = stack.redis(replica=True)
        wait_for(
            lambda: replica.hget(keys.worker_key("w1"), "polls") == "1",
            "the replica has the worker's write",
            timeout_s=60,
        )
        assert admin.info("replication")["connected_slaves"] == 1

        # a wrong password is one clear sentence from the CLI, and no secret is printed
        truth = tmp_path / "truth.json"
        truth.write_text('{"format": 1, "start_ms": 0, "end_ms": 1, "windows": {}}')
        env = {**stack.env(), "PULSE_STORE_READER_PASSWORD": "not-the-password"}
        res = pulse(env, "verify", f"--truth={truth}")
        assert res.returncode == 2
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1, res.stderr
        assert "refused the password of user pulse-reader" in lines[0]
        assert "not-the-password" not in res.stderr + res.stdout
        assert "Traceback" not in res.stderr

        # so is the worker's: it does not wait for a store that will never let it in
        env = {**stack.env(), "PULSE_STORE_WORKER_PASSWORD": "not-the-password"}
        res = pulse(env, "worker", "--name=w-bad")
        assert res.returncode == 2
        assert res.stderr.strip().splitlines() == [
            f"pulse worker: the store at {store.url()} refused the password of user "
            "pulse-worker (wrong password, or no such user, or the user is disabled); the "
            "passwords `pulse up --acl` made are in $PULSE_HOME/secrets.env."
        ]


def test_pipeline_over_tls_and_ssl_is_exact(tmp_path: Path) -> None:
    try:
        valkey_binary(tls=True)
    except PrerequisiteError as exc:
        pytest.skip(str(exc))
    stack = make_stack(tmp_path / "home", acl=True, tls=True, partitions=2)
    with running(stack, kafka=True):
        admin = stack.redis(decode=True)
        # TLS only: a plaintext client gets no answer
        with pytest.raises(redis.ConnectionError):
            redis.Redis(host="127.0.0.1", port=stack.store_settings.port, socket_timeout=5).ping()

        pl = Pipeline.create(stack, tmp_path)
        truth_file = tmp_path / "truth.json"
        truth = pl.loadgen(
            "--rate=0", "--duration=10", "--devices=20", "--services=3", "--seed=7",
            "--bad-rate=0.01", "--late-rate=0.02", truth=truth_file,
        )  # fmt: skip
        produced = sum(truth["produced"].values())
        worker = pl.worker()
        try:
            wait_for(
                lambda: pl.applied_total(admin) == produced,
                "the worker applied every record over TLS",
                timeout_s=180,
                alive=worker.alive,
            )
        finally:
            assert worker.stop() == 0, worker.tail()
        res = pl.verify(truth_file)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
        assert "verify: OK" in res.stdout

        # a worker told the listener is plaintext says so at once (aiokafka alone reports a
        # broker that is down, and the worker would wait for it forever)
        res = pulse(
            {**stack.env(), "PULSE_KAFKA_SECURITY_PROTOCOL": "PLAINTEXT"},
            "worker",
            "--name=w-plain",
        )
        assert res.returncode == 2, res.stderr
        bootstrap = stack.kafka_settings.bootstrap
        assert res.stderr.strip().splitlines()[-1] == (
            f"pulse worker: Kafka at {bootstrap} expects TLS: set "
            "PULSE_KAFKA_SECURITY_PROTOCOL=SSL, with PULSE_KAFKA_SSL_CA_FILE naming the CA that "
            "signed its certificate."
        )


def test_securing_a_running_open_stack_is_refused(tmp_path: Path) -> None:
    stack = make_stack(tmp_path / "home", replica=False)
    with contextlib.ExitStack() as cleanup:
        stack.stack.primary.start()
        cleanup.callback(stack.stack.primary.stop)
        res = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "up", "--acl"],
            env={**os.environ, **stack.env()},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert res.returncode == 1
        assert res.stderr.strip().splitlines() == [
            f"pulse up: The stack in {stack.stack.home} runs without the security asked for; "
            "stop it with `pulse down` first (its data stays)."
        ]
        assert not (stack.stack.home / "secrets.env").exists()
        assert stack.redis().ping()  # untouched, still open
