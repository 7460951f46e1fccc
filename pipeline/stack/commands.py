"""``pulse up``, ``pulse down`` and ``pulse status``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from pydantic import ValidationError

from pipeline.stack.errors import StackError
from pipeline.stack.stack import Stack


def _home_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--home",
        type=Path,
        metavar="DIR",
        help="state directory of the stack (default: $PULSE_HOME or .pulse)",
    )


def up_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``pulse up``."""
    _home_argument(parser)


def down_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``pulse down``."""
    _home_argument(parser)


def status_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``pulse status``."""
    _home_argument(parser)


def _stack(args: argparse.Namespace) -> Stack:
    from pipeline.settings import StackSettings

    home: Path | None = getattr(args, "home", None)
    return Stack(StackSettings(home=home) if home is not None else None)


def _fail(command: str, message: str) -> int:
    sys.stderr.write(f"pulse {command}: {message}\n")
    return 1


def _settings_error(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    return f"Invalid setting {where} ({exc.title}): {first['msg']}."


def up(args: argparse.Namespace) -> int:
    """Start the stack (only what is not running yet) and wait until it is ready."""
    started_at = time.monotonic()
    try:
        stack = _stack(args)
        results = stack.up()
    except StackError as exc:
        return _fail("up", str(exc))
    except ValidationError as exc:
        return _fail("up", _settings_error(exc))
    for status, started in results:
        verb = "started" if started else "already running"
        print(f"{status.service}: {verb} on 127.0.0.1:{status.port} (pid {status.pid})")
    if any(started for _, started in results):
        print(f"Stack ready in {time.monotonic() - started_at:.1f} s (state in {stack.home}).")
    else:
        print(f"Stack already running (state in {stack.home}).")
    return 0


def down(args: argparse.Namespace) -> int:
    """Stop every process ``pulse up`` started from this home."""
    try:
        results = _stack(args).down()
    except StackError as exc:
        return _fail("down", str(exc))
    except ValidationError as exc:
        return _fail("down", _settings_error(exc))
    for service, was_running in results:
        print(f"{service}: {'stopped' if was_running else 'not running'}")
    return 0


def status(args: argparse.Namespace) -> int:
    """Print a table: service, state, port, pid, data dir."""
    from rich.console import Console
    from rich.table import Table

    try:
        rows = _stack(args).status()
    except StackError as exc:
        return _fail("status", str(exc))
    except ValidationError as exc:
        return _fail("status", _settings_error(exc))
    table = Table("service", "state", "port", "pid", "data dir")
    for row in rows:
        state = "[green]running[/]" if row.running else "[red]stopped[/]"
        table.add_row(row.service, state, str(row.port), str(row.pid or "-"), str(row.data_dir))
    Console(width=200).print(table)
    return 0
