"""``pulse dashboard``: serve the Streamlit page (``dashboard/app.py``) headless on localhost.

Streamlit runs in a child process (``python -m streamlit run``) so it owns its event loop and
signals; options reach the page as ``PULSE_DASHBOARD_*`` environment variables. Streamlit is not
imported here, so building the ``pulse`` parser stays cheap.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from collections.abc import Mapping
from pathlib import Path

APP = Path(__file__).resolve().parent / "app.py"
ROOT = APP.parent.parent


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``pulse dashboard`` (defaults from ``PULSE_DASHBOARD_*``)."""
    parser.add_argument("--address", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to listen on (default 8501)")
    parser.add_argument("--refresh-s", type=float, help="seconds between refreshes (default 2)")
    parser.add_argument("--lookback-min", type=int, help="minutes the charts show (default 60)")


def command(address: str, port: int) -> list[str]:
    """The ``streamlit run`` command line."""
    return [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(APP),
        "--server.headless",
        "true",
        "--server.address",
        address,
        "--server.port",
        str(port),
        "--server.fileWatcherType",
        "none",
        "--browser.gatherUsageStats",
        "false",
    ]


def child_env(args: argparse.Namespace, base: Mapping[str, str]) -> dict[str, str]:
    """The environment of the Streamlit process: ``base`` plus the options given."""
    env = dict(base)
    for name in ("address", "port", "refresh_s", "lookback_min"):
        value = getattr(args, name, None)
        if value is not None:
            env[f"PULSE_DASHBOARD_{name.upper()}"] = str(value)
    # the page imports `dashboard` and `schemas` even when not installed
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def run(args: argparse.Namespace) -> int:
    """Serve the dashboard until interrupted; returns Streamlit's exit status."""
    from pydantic import ValidationError

    from dashboard.settings import DashboardSettings

    env = child_env(args, os.environ)
    overrides = {
        name: value
        for name in ("address", "port", "refresh_s", "lookback_min")
        if (value := getattr(args, name, None)) is not None
    }
    try:
        settings = DashboardSettings(**overrides)  # validates the options before starting
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        name = str(err["loc"][0]) if err["loc"] else ""
        flag = f"--{name.replace('_', '-')}"
        where = flag if name in overrides else f"PULSE_DASHBOARD_{name.upper()}"
        msg = str(err["msg"]).removeprefix("Value error, ").rstrip(".")
        print(f"pulse dashboard: {where}: {msg}.", file=sys.stderr)
        return 2
    if (taken := _unavailable(settings.address, settings.port)) is not None:
        # Streamlit would say so only after the URL below was printed as if it served
        print(f"pulse dashboard: cannot listen on {settings.address}:{settings.port}: {taken}.",
              file=sys.stderr)  # fmt: skip
        return 2
    print(f"Pulse dashboard on http://{settings.address}:{settings.port}", file=sys.stderr)
    sys.stderr.flush()
    # Become Streamlit (no wrapper process), so signals from a terminal or `pulse demo` reach it.
    argv = command(settings.address, settings.port)
    os.execve(argv[0], argv, env)
    return 0  # not reached


def _unavailable(address: str, port: int) -> str | None:
    """Why nothing can listen on ``address:port`` now (in use, not this host's), if so."""
    try:
        infos = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        return str(exc)
    family, kind, proto, _, where = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will
        try:
            sock.bind(where)
        except OSError as exc:
            return exc.strerror or str(exc)
    return None
