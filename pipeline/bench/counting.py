"""Run a ``pulse`` subcommand (or the naive baseline) with its store round trips counted.

``python -m pipeline.bench.counting COUNTS_FILE ARGV...``: patches redis-py's asyncio connection
so that every ``send_packed_command`` (one write of a command or of a whole pipeline: one round
trip) and every packed command are counted, writes ``{"round_trips", "commands"}`` to
``COUNTS_FILE`` every second and at exit, then runs ``pulse ARGV`` (``naive`` runs
:mod:`pipeline.bench.naive_app`). The patch adds one Python call per round trip and per command.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
from pathlib import Path
from typing import Any

import orjson

_counts = {"round_trips": 0, "commands": 0}


def _install() -> None:
    from redis.asyncio.connection import AbstractConnection

    send, pack = AbstractConnection.send_packed_command, AbstractConnection.pack_command

    async def counted_send(self: Any, command: Any, check_health: bool = True) -> None:
        _counts["round_trips"] += 1
        await send(self, command, check_health)

    def counted_pack(self: Any, *args: Any) -> Any:
        _counts["commands"] += 1
        return pack(self, *args)

    AbstractConnection.send_packed_command = counted_send  # type: ignore[method-assign]
    AbstractConnection.pack_command = counted_pack  # type: ignore[method-assign]


def _writer(path: Path, stop: threading.Event) -> None:
    while not stop.wait(1.0):
        _dump(path)


def _dump(path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    with contextlib.suppress(OSError):
        tmp.write_bytes(orjson.dumps(dict(_counts)))
        os.replace(tmp, path)


def main(argv: list[str]) -> int:
    """Entry point; see the module docstring."""
    path, rest = Path(argv[0]), argv[1:]
    _install()
    stop = threading.Event()
    threading.Thread(target=_writer, args=(path, stop), daemon=True, name="bench-counts").start()
    atexit.register(_dump, path)
    if rest and rest[0] == "naive":
        from pipeline.bench import naive_app

        return naive_app.main(rest[1:])
    from pipeline.cli import main as pulse_main

    return pulse_main(rest)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
