"""``$PULSE_HOME/secrets.env``: what ``pulse up --acl``/``--tls`` leave for the other commands.

The file (mode 0600) holds ``PULSE_*`` settings in dotenv syntax; ``KafkaSettings`` and
``StoreSettings`` read it (variables in the environment win), so ``pulse worker``, ``pulse
loadgen``, ``pulse verify`` and ``pulse dashboard`` reach a secured stack with no flags.
Passwords ``pulse up`` generates go there, never to a command line or a log; passwords given in
the environment are not copied into it.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from pipeline.stack import processes
from pipeline.stack.tls import TlsFiles, ensure_tls
from schemas.settings import SECRETS_FILE, KafkaSettings, StoreRole, StoreSettings

# the role passwords `pulse up --acl` generates when none is set
PASSWORD_VARIABLES = (
    *(f"PULSE_STORE_{role.value.upper()}_PASSWORD" for role in StoreRole),
    "PULSE_STORE_REPLICATION_PASSWORD",
)


def env_file(home: Path) -> Path:
    """The secrets file of the stack in ``home``."""
    return home.expanduser().resolve() / SECRETS_FILE


def read(path: Path) -> dict[str, str]:
    """The file's variables ({} if it does not exist)."""
    from dotenv import dotenv_values

    if not path.is_file():
        return {}
    return {k: v for k, v in dotenv_values(path).items() if v is not None}


def _quote(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def write(path: Path, values: dict[str, str]) -> None:
    """Replace the file with ``values`` (sorted, double-quoted), mode 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["# Written by `pulse up`: settings of the secured stack, read by every pulse command."]
    lines += [f"{name}={_quote(value)}" for name, value in sorted(values.items())]
    processes.atomic_write(path, "\n".join(lines) + "\n", mode=0o600)


def tls_values(files: TlsFiles) -> dict[str, str]:
    """The settings that point the store's and Kafka's clients at the stack's certificates."""
    return {
        "PULSE_STORE_TLS": "true",
        "PULSE_STORE_TLS_CA_FILE": str(files.ca_cert),
        "PULSE_STORE_TLS_CERT_FILE": str(files.client_cert),
        "PULSE_STORE_TLS_KEY_FILE": str(files.client_key),
        "PULSE_KAFKA_SECURITY_PROTOCOL": "SSL",
        "PULSE_KAFKA_SSL_CA_FILE": str(files.ca_cert),
        "PULSE_KAFKA_SSL_CERT_FILE": str(files.client_cert),
        "PULSE_KAFKA_SSL_KEY_FILE": str(files.client_key),
    }


def prepare(home: Path, *, acl: bool, tls: bool) -> Path:
    """Make the stack in ``home`` secured as asked; returns the secrets file.

    ``acl``: every role password that is neither in the environment nor in the file is
    generated into the file. ``tls``: the throw-away CA and certificates are made (or kept) and
    the clients' TLS settings written. What the file held before stays (a later ``pulse up``
    without flags keeps the stack secured).
    """
    path = env_file(home)
    values = read(path)
    before = dict(values)
    if acl:
        for variable in PASSWORD_VARIABLES:
            if not os.environ.get(variable) and not values.get(variable):
                values[variable] = secrets.token_urlsafe(24)
    if tls:
        values.update(tls_values(ensure_tls(home)))
    if values != before or (values and not path.exists()):
        write(path, values)
    return path


def load(home: Path) -> tuple[KafkaSettings, StoreSettings]:
    """The Kafka and store settings of the stack in ``home`` (environment, then its file)."""
    path = env_file(home)
    return KafkaSettings(_env_file=path), StoreSettings(_env_file=path)
