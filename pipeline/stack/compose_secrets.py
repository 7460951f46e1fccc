"""The secured compose profile's set-up: ``python -m pipeline.stack.compose_secrets DIR``.

Run as root in the ``secure-init`` container on the shared ``secrets`` volume, it makes (once;
a later run keeps the passwords and the certificates while they are valid):

- ``secrets.env``, ``tls/``: the passwords and the throw-away CA and certificates, as ``pulse up
  --acl --tls`` makes them; Pulse's containers read them with ``PULSE_HOME=DIR``;
- ``valkey/``: each node's valkey.conf (TLS only, ACL users, the replica's ``masteruser``) and
  its certificate and key, owned by the Valkey image's user;
- ``kafka/``: the broker's PEM keystore and the admin tools' client configuration, owned by the
  Kafka image's user.

No password is ever on a command line: the nodes and tools read these files.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from pipeline.stack import acl, envfile, processes
from pipeline.stack.tls import TlsFiles, tls_files
from pipeline.stack.valkey import AOF_REWRITE_MIN_SIZE, quote
from schemas.settings import REPLICATION_USER, StoreSettings

VALKEY_UID = 999  # the valkey/valkey image's user
KAFKA_UID = 1000  # the apache/kafka image's user
PRIMARY_HOST = "valkey-secure"
VALKEY_PORT = 6379


def valkey_conf(dir: Path, store: StoreSettings, *, replica: bool) -> str:
    """valkey.conf of a compose node: TLS only, AOF fsync always, Pulse's ACL users."""
    tls = dir / "valkey"
    lines = [
        "# Written by pipeline.stack.compose_secrets.",
        "port 0",
        f"tls-port {VALKEY_PORT}",
        f"tls-cert-file {tls / 'server.pem'}",
        f"tls-key-file {tls / 'server-key.pem'}",
        f"tls-ca-cert-file {tls / 'ca.pem'}",
        "tls-auth-clients yes",
        "tls-replication yes",
        "dir /data",
        "appendonly yes",
        "appendfsync always",
        f"auto-aof-rewrite-min-size {AOF_REWRITE_MIN_SIZE}",
        'save ""',
        "hz 100",
        "repl-diskless-sync-delay 0",
        *acl.user_lines(store),
    ]
    if store.replication_password is not None:
        secret = store.replication_password.get_secret_value()
        lines += [f"masteruser {REPLICATION_USER}", f"masterauth {quote(secret)}"]
    if replica:
        lines += [f"replicaof {PRIMARY_HOST} {VALKEY_PORT}", "replica-read-only yes"]
    return "\n".join(lines) + "\n"


def kafka_client_properties(dir: Path) -> str:
    """What Kafka's admin tools (health check, topic creation) connect with."""
    return f"""security.protocol=SSL
ssl.truststore.type=PEM
ssl.truststore.location={dir / "kafka" / "ca.pem"}
ssl.keystore.type=PEM
ssl.keystore.location={dir / "kafka" / "client-keystore.pem"}
"""


def _owned(path: Path, text: str, uid: int, mode: int = 0o600) -> None:
    processes.atomic_write(path, text, mode=mode)
    if os.geteuid() == 0:
        os.chown(path, uid, uid)


def prepare(dir: Path) -> None:
    """Write everything the secured compose services read into ``dir``."""
    envfile.prepare(dir, acl=True, tls=True)
    store = StoreSettings(_env_file=envfile.env_file(dir))
    files: TlsFiles = tls_files(dir)
    for sub, uid in (("valkey", VALKEY_UID), ("kafka", KAFKA_UID)):
        (dir / sub).mkdir(exist_ok=True)
        if os.geteuid() == 0:
            os.chown(dir / sub, uid, uid)
    dir.chmod(0o755)  # each image's user reaches its own subdirectory
    files.dir.chmod(0o700)  # the CA key and the clients' key: Pulse's containers (root) only
    valkey, kafka = dir / "valkey", dir / "kafka"
    for name, source in (
        ("server.pem", files.server_cert),
        ("server-key.pem", files.server_key),
        ("ca.pem", files.ca_cert),
    ):
        _owned(valkey / name, source.read_text(), VALKEY_UID)
    for replica, name in ((False, "primary.conf"), (True, "replica.conf")):
        _owned(valkey / name, valkey_conf(dir, store, replica=replica), VALKEY_UID)
    client_keystore = files.client_key.read_text() + files.client_cert.read_text()
    for name, text in (
        ("server-keystore.pem", files.server_keystore.read_text()),
        ("client-keystore.pem", client_keystore + files.ca_cert.read_text()),
        ("ca.pem", files.ca_cert.read_text()),
        ("client.properties", kafka_client_properties(dir)),
    ):
        _owned(kafka / name, text, KAFKA_UID)


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.stack.compose_secrets DIR``."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m pipeline.stack.compose_secrets DIR", file=sys.stderr)
        return 2
    target = Path(args[0])
    if not target.is_dir():
        print(f"compose_secrets: {target} is not a directory.", file=sys.stderr)
        return 2
    prepare(target)
    print(f"compose_secrets: secured settings, passwords and certificates in {target}.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
