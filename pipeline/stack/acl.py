"""Pulse's Valkey ACL users: who may run which commands on which keys.

``pulse up --acl`` writes these ``user`` lines into every node's valkey.conf (mode 0600; the
passwords as SHA-256 hashes) and turns the ``default`` user off:

- ``pulse-admin``: everything (``pulse up``'s readiness probes, tests, operators);
- ``pulse-worker``: the worker and ``pulse replay``: Pulse's functions (``FCALL``, ``FUNCTION
  LOAD``), every command those functions run, ``WAITAOF``, the fence's ``INCR``, its metrics
  hash and the reads of a restore, on ``pulse:*`` keys only;
- ``pulse-reader``: the dashboard, ``pulse verify``/``top``/``anomalies``/``similar``/``near``:
  read commands on ``pulse:*`` keys and ``INFO``, nothing else;
- ``pulse-replication``: the replica's link to the primary (``PSYNC``, ``REPLCONF``, ``PING``).

ACL rules apply to the commands a function runs as well, so the worker's list is read from
``store_functions.lua`` itself: a command added there is granted here.
"""

from __future__ import annotations

import hashlib
import re
from importlib import resources

from schemas import keys
from schemas.settings import REPLICATION_USER, USERNAMES, StoreRole, StoreSettings

# what any client's connection set-up sends (redis-py: HELLO/AUTH, CLIENT SETINFO, SELECT;
# its cluster client: CLUSTER SLOTS, the slot map, and COMMAND, where each command's keys are)
CONNECTION = (
    *("hello", "auth", "ping", "select", "client|setinfo", "client|setname"),
    *("cluster|slots", "command"),
)
# what the worker sends itself, besides reads (store_writer, worker metrics, replay_command)
WORKER_DIRECT = (
    "fcall",
    "fcall_ro",
    "function|load",
    "waitaof",
    "incrby",  # the durability fence (redis-py sends INCR as INCRBY)
    "hset",  # worker metrics
    "expire",
)
REPLICATION = ("psync", "replconf", "ping")
_CALL = re.compile(r"""(?:redis|server)\.p?call\(\s*['"]([A-Za-z]+)['"]""")


def function_commands() -> list[str]:
    """The commands Pulse's store functions run, lower-case and sorted."""
    source = resources.files("pipeline").joinpath("store_functions.lua").read_text()
    return sorted({name.lower() for name in _CALL.findall(source)})


def password_hash(password: str) -> str:
    """How valkey.conf names a password without holding it: ``#`` + SHA-256 hex."""
    return "#" + hashlib.sha256(password.encode()).hexdigest()


def role_rules(role: StoreRole) -> str:
    """The permissions of a role's user (without its password)."""
    pattern = f"~{keys.PREFIX}:*"
    if role is StoreRole.ADMIN:
        return "~* &* +@all"
    allowed = [*CONNECTION, "@read"]
    if role is StoreRole.READER:
        # the dashboard's store health (memory, ops/s, AOF, replication); CONFIG stays refused:
        # CONFIG GET would show the passwords
        allowed.append("info")
    if role is StoreRole.WORKER:
        allowed += [*WORKER_DIRECT, *function_commands()]
    return " ".join([pattern, "resetchannels", "-@all", *(f"+{c}" for c in allowed)])


def user_lines(store: StoreSettings) -> list[str]:
    """valkey.conf ``user`` directives: the default user off, each role with its password.

    A role without a password is not created (its user stays unknown to the store).
    """
    lines = ["user default reset"]  # off, no password, no commands, no keys
    for role in StoreRole:
        password = store.role_password(role)
        if password is not None:
            secret = password_hash(password.get_secret_value())
            lines.append(f"user {USERNAMES[role]} reset on {secret} {role_rules(role)}")
    if store.replication_password is not None:
        secret = store.replication_password.get_secret_value()
        rules = " ".join(f"+{c}" for c in REPLICATION)
        lines.append(f"user {REPLICATION_USER} reset on {password_hash(secret)} -@all {rules}")
    return lines
