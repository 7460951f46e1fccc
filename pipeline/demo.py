"""``pulse demo``: the whole pipeline live on one machine, stopped cleanly with Ctrl-C.

Starts the local stack (if it is not running yet), a worker, the dashboard and the load generator
as child processes, prints the dashboard URL, and on Ctrl-C (or when the load generator finishes
and ``--exit-when-done`` is given) stops the children and whatever part of the stack it started.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import subprocess
import sys
import time
from pathlib import Path

from loadgen.settings import MAX_DEVICES, MAX_DURATION_S, MAX_RATE, MAX_SERVICES
from schemas.argtypes import fraction, int_within, non_negative_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``pulse demo``."""
    a = parser.add_argument
    # the load generator's own argument types: a bad value is said before anything starts
    a("--rate", type=int_within(0, MAX_RATE), default=300, help="events per second (300)")
    a("--duration", type=int_within(1, MAX_DURATION_S), default=3600, help="seconds of load (3600)")
    a("--devices", type=int_within(1, MAX_DEVICES), default=100, help="simulated devices (100)")
    a("--services", type=int_within(1, MAX_SERVICES), default=5, help="simulated services (5)")
    a("--seed", type=non_negative_int, default=1, help="load generator seed (1)")
    a("--anomaly-rate", type=fraction, default=0.1, help="anomaly rate (0.1)")
    a("--bad-rate", type=fraction, default=0.002, help="malformed share (0.002)")
    a("--late-rate", type=fraction, default=0.005, help="late share (0.005)")
    parser.add_argument(
        "--keep-stack", action="store_true", help="leave Kafka and Valkey running afterwards"
    )
    parser.add_argument(
        "--exit-when-done", action="store_true", help="stop once the load generator finishes"
    )


def _pulse(*argv: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", *argv]


def _spawn(argv: list[str], log: Path | None) -> subprocess.Popen[bytes]:
    out = open(log, "ab") if log else None  # noqa: SIM115 - handed to the child, closed by exit
    return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT if out else None)


def _stop(procs: list[tuple[str, subprocess.Popen[bytes]]], timeout_s: float = 20.0) -> None:
    # SIGTERM, not SIGINT: children started from a non-interactive shell may ignore SIGINT.
    for _, p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for name, p in procs:
        try:
            p.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            print(f"pulse demo: {name} did not stop in time; killing it", file=sys.stderr)
            p.kill()
            p.wait()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    """Run the demo until Ctrl-C (or SIGTERM)."""
    from dashboard.settings import DashboardSettings
    from pipeline.stack.errors import StackError
    from pipeline.stack.stack import Stack

    signal.signal(signal.SIGTERM, _interrupt)  # stop cleanly, as on Ctrl-C
    stack = Stack()
    print("pulse demo: starting Kafka and Valkey (first run downloads Kafka, ~50 MB)...")
    try:
        started = [status.service for status, fresh in stack.up() if fresh]
    except StackError as exc:
        print(f"pulse demo: {exc}", file=sys.stderr)
        return 1
    logs = stack.home / "demo"
    logs.mkdir(parents=True, exist_ok=True)
    procs: list[tuple[str, subprocess.Popen[bytes]]] = []
    try:
        procs.append(
            ("worker", _spawn(_pulse("worker", "--loglevel", "info"), logs / "worker.log"))
        )
        procs.append(("dashboard", _spawn(_pulse("dashboard"), logs / "dashboard.log")))
        loadgen = _spawn(
            _pulse(
                "loadgen",
                f"--rate={args.rate}",
                f"--duration={args.duration}",
                f"--devices={args.devices}",
                f"--services={args.services}",
                f"--seed={args.seed}",
                f"--anomaly-rate={args.anomaly_rate}",
                f"--bad-rate={args.bad_rate}",
                f"--late-rate={args.late_rate}",
            ),
            None,
        )
        procs.append(("loadgen", loadgen))
        port = DashboardSettings().port
        print(f"pulse demo: dashboard at http://127.0.0.1:{port}  (logs in {logs}; Ctrl-C stops)")
        while True:
            for name, p in procs:
                if p.poll() is not None and (name != "loadgen" or args.exit_when_done):
                    if name == "loadgen" and p.returncode == 0:
                        return 0
                    print(f"pulse demo: {name} exited with {p.returncode}; see {logs}")
                    return 1
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("\npulse demo: stopping...")
        return 0
    finally:
        with contextlib.suppress(KeyboardInterrupt):
            _stop(procs)
            if started and not args.keep_stack:
                stack_names = ", ".join(started)
                print(f"pulse demo: stopping {stack_names}")
                for service in stack.services:
                    if service.name in started:
                        service.stop()
