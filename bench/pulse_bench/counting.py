"""Run a ``pulse`` subcommand (or the naive baseline) with its store round trips counted.

``python -m pulse_bench.counting COUNTS_FILE ARGV...``: patches redis-py's asyncio connection
so that every ``send_packed_command`` (one write of a command or of a whole pipeline: one round
trip) and every packed command are counted, runs ``pulse ARGV`` (``naive`` runs
:mod:`pulse_bench.naive_app`) and, when the process exits (a normal exit, or a SIGTERM, also
one that arrives before the app installed its own signal handlers), writes
``{"round_trips", "commands", "final": true}`` to ``COUNTS_FILE``. The counters are written only
then, so a reader that waited for the process to exit reads every round trip it made, and a file
without ``"final"`` is never seen. The patch adds one Python call per round trip and per command.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys
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


def dump_final(path: Path) -> None:
    """Write the final counters (atomically: a reader sees the old file or the whole new one)."""
    tmp = path.with_suffix(".tmp")
    with contextlib.suppress(OSError):
        tmp.write_bytes(orjson.dumps({**_counts, "final": True}))
        os.replace(tmp, path)


def _terminate_early(path: Path) -> Any:
    """A SIGTERM handler for the start-up, before the app installs its own (which replace it).

    Writes the final counters, then dies of SIGTERM as it would have without the handler (the
    parent sees the same exit status).
    """

    def handler(signum: int, frame: Any) -> None:
        dump_final(path)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    return handler


def main(argv: list[str]) -> int:
    """Entry point; see the module docstring."""
    path, rest = Path(argv[0]), argv[1:]
    _install()
    atexit.register(dump_final, path)
    signal.signal(signal.SIGTERM, _terminate_early(path))
    if rest and rest[0] == "naive":
        from pulse_bench import naive_app

        return naive_app.main(rest[1:])
    from pipeline.cli import main as pulse_main

    return pulse_main(rest)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
