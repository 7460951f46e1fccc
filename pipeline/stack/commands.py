"""``pulse up``, ``pulse down`` and ``pulse status``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from pydantic import ValidationError

from pipeline.stack.errors import StackError
from pipeline.stack.stack import Stack
from schemas.settings import SECRETS_FILE


def _home_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--home",
        type=Path,
        metavar="DIR",
        help="state directory of the stack (default: $PULSE_HOME or .pulse)",
    )


def _brokers(text: str) -> int:
    try:
        count = int(text)
    except ValueError:
        count = 0
    if not 1 <= count <= 9:
        raise argparse.ArgumentTypeError(f"must be a whole number from 1 to 9, not {text!r}")
    return count


def up_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``pulse up``."""
    _home_argument(parser)
    parser.add_argument(
        "--brokers",
        type=_brokers,
        metavar="N",
        help="Kafka brokers to run (default: $PULSE_KAFKA_BROKERS or 1); with 3 or more, "
        "topics are replicated 3 times with min.insync.replicas=2",
    )
    parser.add_argument(
        "--acl",
        action="store_true",
        help="run the store with ACL users (admin, worker, reader, replication; default user "
        "off), passwords generated into DIR/secrets.env unless set",
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        help="TLS to the store and an SSL listener on Kafka, with a throw-away CA in DIR/tls/",
    )
    parser.add_argument(
        "--sentinel",
        action="store_true",
        help="three Valkey sentinels (127.0.0.1:26379-26381 unless PULSE_STORE_SENTINELS is "
        "set) fail the primary over to the replica; noted in DIR/secrets.env for every client",
    )
    parser.add_argument(
        "--cluster",
        action="store_true",
        help="a Valkey cluster of 3 primaries, each with a replica, instead of the primary and "
        "replica (ports PULSE_STORE_PORT + 0..5 unless PULSE_STORE_CLUSTER_PORTS is set); "
        "noted in DIR/secrets.env for every client",
    )


def down_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``pulse down``."""
    _home_argument(parser)


def status_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``pulse status``."""
    _home_argument(parser)


def _stack(args: argparse.Namespace) -> Stack:
    from pipeline.settings import StackSettings
    from pipeline.stack import envfile

    given = {
        name: value
        for name, value in (
            ("home", getattr(args, "home", None)),
            ("kafka_brokers", getattr(args, "brokers", None)),
        )
        if value is not None
    }
    settings = StackSettings(**given)
    if settings.home.exists() and not settings.home.is_dir():
        raise StackError(f"The stack's home {settings.home} is not a directory.")
    if getattr(args, "cluster", False) and getattr(args, "sentinel", False):
        raise StackError(
            "--cluster and --sentinel exclude each other: a cluster fails over by itself."
        )
    acl, tls = getattr(args, "acl", False), getattr(args, "tls", False)
    if acl or tls:
        before = Stack(settings, *envfile.load(settings.home))
        store = before.store_settings
        if ((acl and not store.acl) or (tls and not store.tls)) and any(
            s.is_running() for s in before.services
        ):
            raise StackError(
                f"The stack in {before.home} runs without the security asked for; stop it "
                "with `pulse down` first (its data stays)."
            )
        envfile.prepare(settings.home, acl=acl, tls=tls)
    if getattr(args, "sentinel", False):
        from pipeline.stack.sentinel import remember_sentinels

        remember_sentinels(settings.home)
    if getattr(args, "cluster", False):
        from pipeline.stack.cluster import remember_cluster

        before = Stack(settings, *envfile.load(settings.home))
        if not before.store_settings.cluster and any(s.is_running() for s in before.services):
            raise StackError(
                f"The stack in {before.home} runs a single Valkey primary; stop it with "
                "`pulse down` first (its data stays, but the cluster starts empty)."
            )
        remember_cluster(settings.home)
    # with --home, that home's secrets file (the other commands read $PULSE_HOME's)
    kafka, store = envfile.load(settings.home)
    return Stack(settings, kafka, store)


def _fail(command: str, message: str, status: int = 1) -> int:
    sys.stderr.write(f"pulse {command}: {message}\n")
    return status


def _bad_setting(command: str, exc: ValidationError) -> int:
    """A bad ``PULSE_*`` setting: one sentence naming it, exit status 2 (as every command)."""
    from pipeline.cli import settings_error

    return _fail(command, settings_error(exc), 2)


def up(args: argparse.Namespace) -> int:
    """Start the stack (only what is not running yet) and wait until it is ready."""
    started_at = time.monotonic()
    try:
        stack = _stack(args)
        results = stack.up()
    except StackError as exc:
        return _fail("up", str(exc))
    except OSError as exc:  # the home cannot be written: what started stays up for `pulse down`
        where = f" ({exc.filename})" if exc.filename else ""
        return _fail("up", f"Cannot prepare the stack's files: {exc.strerror or exc}{where}.")
    except ValidationError as exc:
        return _bad_setting("up", exc)
    for status, started in results:
        verb = "started" if started else "already running"
        print(f"{status.service}: {verb} on 127.0.0.1:{status.port} (pid {status.pid})")
    if any(started for _, started in results):
        print(f"Stack ready in {time.monotonic() - started_at:.1f} s (state in {stack.home}).")
    else:
        print(f"Stack already running (state in {stack.home}).")
    secured = [
        *(["ACL users"] if stack.store_settings.acl else []),
        *(["TLS to the store"] if stack.store_settings.tls else []),
        *(["SSL to Kafka"] if stack.kafka_settings.security_protocol == "SSL" else []),
    ]
    if secured:
        print(
            f"Secured ({', '.join(secured)}): settings and passwords in "
            f"{stack.home / SECRETS_FILE}, which every pulse command reads with PULSE_HOME "
            f"set to {stack.home}."
        )
    return 0


def down(args: argparse.Namespace) -> int:
    """Stop every process ``pulse up`` started from this home."""
    try:
        results = _stack(args).down()
    except StackError as exc:
        return _fail("down", str(exc))
    except ValidationError as exc:
        return _bad_setting("down", exc)
    for service, was_running in results:
        print(f"{service}: {'stopped' if was_running else 'not running'}")
    return 0


def status(args: argparse.Namespace) -> int:
    """Print a table: service, state, port, pid, data dir."""
    from rich.console import Console
    from rich.table import Table

    try:
        stack = _stack(args)
        rows = stack.status()
    except StackError as exc:
        return _fail("status", str(exc))
    except ValidationError as exc:
        return _bad_setting("status", exc)
    table = Table("service", "state", "port", "pid", "data dir")
    for row in rows:
        state = "[green]running[/]" if row.running else "[red]stopped[/]"
        table.add_row(row.service, state, str(row.port), str(row.pid or "-"), str(row.data_dir))
    Console(width=200).print(table)
    if stack.nodes:
        _print_cluster(stack)
    if stack.sentinels:  # after a failover the primary is whichever node Sentinel promoted
        primary = stack.known_primary() or stack.store_settings.port
        print(
            f"Primary ({stack.store_settings.sentinel_service}, per Sentinel): 127.0.0.1:{primary}"
        )
    return 0


def _print_cluster(stack: Stack) -> None:
    """Each shard of the cluster: its slots, its primary and replicas, as a node sees them."""
    import redis

    from pipeline.stack.cluster import shards

    for node in stack.nodes:
        if not node.is_running():
            continue
        try:
            with node.client() as client:
                found = shards(client)
        except redis.RedisError as exc:
            print(f"Cluster: {node.label} did not say ({exc}).")
            continue
        for shard in found:
            ranges = ", ".join(f"{a}-{b}" for a, b in shard.slots) or "none"
            members = ", ".join(
                f"127.0.0.1:{p} {role} ({health})" for p, role, health in shard.nodes
            )
            print(f"Cluster shard, slots {ranges}: {members}")
        return
    print("Cluster: no node is running.")
