"""The ``pulse`` command: one entry point with a subcommand per task.

Each subcommand lives in the module of its domain, which exposes a function that adds its
arguments and one that runs it (``run(args) -> int``). Those modules import heavy libraries (Faust,
Streamlit, aiokafka) inside ``run`` only, so building the parser stays cheap.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from pydantic import ValidationError

# subcommand -> (module, add-arguments function, run function, one-line help)
COMMANDS: dict[str, tuple[str, str, str, str]] = {
    "up": (
        "pipeline.stack.commands",
        "up_arguments",
        "up",
        "start the local stack: Kafka (KRaft) and Valkey primary + replica",
    ),
    "down": (
        "pipeline.stack.commands",
        "down_arguments",
        "down",
        "stop everything `pulse up` started",
    ),
    "status": (
        "pipeline.stack.commands",
        "status_arguments",
        "status",
        "show what runs, on which ports, with pids and data dirs",
    ),
    "worker": (
        "pipeline.worker",
        "add_arguments",
        "run",
        "run the stream worker (Faust agents) that aggregates into the store",
    ),
    "loadgen": (
        "loadgen.cli",
        "add_arguments",
        "run",
        "produce realistic sensor and application-log events",
    ),
    "dashboard": ("dashboard.cli", "add_arguments", "run", "serve the live Streamlit dashboard"),
    "demo": (
        "pipeline.demo",
        "add_arguments",
        "run",
        "run stack, worker, load generator and dashboard together",
    ),
    "verify": (
        "pipeline.verify",
        "add_arguments",
        "run",
        "compare the store's aggregates with a load generator truth file",
    ),
    "bench": ("pipeline.bench.cli", "add_arguments", "run", "benchmark the pipeline side by side"),
}


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one sentence on stderr and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: {message[0].upper()}{message[1:].rstrip('.')}.\n")
        sys.stderr.write(f"Run '{self.prog} --help' for usage.\n")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    """The full ``pulse`` argument parser."""
    parser = _Parser(prog="pulse", description="Pulse: real-time analytics on a durable store.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name, (module, add_fn, run_fn, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module, _run=run_fn)
        getattr(importlib.import_module(module), add_fn)(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pulse`` console script."""
    args = build_parser().parse_args(argv)
    module = importlib.import_module(args._module)
    try:
        return int(getattr(module, args._run)(args) or 0)
    except KeyboardInterrupt:
        return 130
    except ValidationError as exc:
        if not exc.title.endswith("Settings"):
            raise
        print(f"pulse {args.command}: {settings_error(exc)}", file=sys.stderr)
        return 2


def settings_error(exc: ValidationError) -> str:
    """One sentence naming the first bad ``PULSE_*`` setting and what is wrong with it."""
    err = exc.errors(include_url=False)[0]
    msg = str(err["msg"]).removeprefix("Value error, ")
    model = getattr(importlib.import_module("pipeline.settings"), exc.title, None)
    if err["loc"] and model is not None:
        name = f"{model.model_config.get('env_prefix', '')}{err['loc'][0]}".upper()
        if name not in msg:
            msg = f"{name}: {msg}"
    return msg.rstrip(".") + "."


if __name__ == "__main__":
    raise SystemExit(main())
