"""The ``pulse`` command: one entry point with a subcommand per task.

Each subcommand lives in the module of its domain, which exposes a function that adds its
arguments and one that runs it (``run(args) -> int``). Those modules import heavy libraries (Faust,
Streamlit, aiokafka) inside ``run`` only, so building the parser stays cheap.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Sequence
from typing import NoReturn

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
    "archive": (
        "pipeline.archive.command",
        "add_arguments",
        "run",
        "archive every valid event once, as time-partitioned Parquet files",
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
    "replay": (
        "pipeline.replay_command",
        "add_arguments",
        "run",
        "recompute a time range's aggregates, leaderboards and anomalies from the archive or Kafka",
    ),
    "near": (
        "dashboard.geo",
        "add_arguments",
        "run",
        "list the devices near a point, with their latest reading and status",
    ),
    "top": (
        "dashboard.boards",
        "add_arguments",
        "run",
        "show a leaderboard (top sites, devices, services, routes) over 1m, 5m or 1h",
    ),
    "anomalies": (
        "dashboard.anomalies",
        "anomalies_arguments",
        "run_anomalies",
        "list the latest anomalies, newest first",
    ),
    "similar": (
        "dashboard.anomalies",
        "similar_arguments",
        "run_similar",
        "list the past anomalies most similar to one (cosine over anomaly vectors)",
    ),
    "bench": ("pulse_bench.cli", "add_arguments", "run", "benchmark the pipeline side by side"),
    "eval": (
        "pipeline.nab",
        "add_arguments",
        "run",
        "score the anomaly detectors: on a NAB corpus, or the store's against a truth file",
    ),
}
# subcommands from development-only distributions, not part of this wheel, with how to install
# each (pulse_bench: bench/pyproject.toml, installed by `make venv`); imported only when present
OPTIONAL_COMMANDS: dict[str, str] = {
    "bench": "the benchmark suite is not installed; install it from a Pulse checkout with "
    "`pip install -e ./bench` (`make venv` does this).",
}


# where the settings models live, looked up by name to print a failing variable's full name
_SETTINGS_MODULES = ("pipeline.settings", "schemas.settings", "loadgen.settings")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one sentence on stderr and exit status 2, and an unknown
    option is named before a missing one (``--truht F`` is the typo to fix, not a missing
    ``--truth``)."""

    _args: list[str] | None = None

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        self._args = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> NoReturn:
        if message.startswith("the following arguments are required") and self._args:
            unknown = self._unknown_options(self._args)
            if unknown:
                message = f"unrecognized arguments: {' '.join(unknown)}"
        sys.stderr.write(f"{self.prog}: {message[0].upper()}{message[1:].rstrip('.')}.\n")
        sys.stderr.write(f"Run '{self.prog} --help' for usage.\n")
        raise SystemExit(2)

    def _unknown_options(self, args: list[str]) -> list[str]:
        """The options in ``args`` this parser does not know (parsed with nothing required)."""
        required = [a for a in self._actions if a.required]
        for action in required:
            action.required = False
        try:
            _, extra = super().parse_known_args(args, argparse.Namespace())
        finally:
            for action in required:
                action.required = True
        return [a for a in extra if a.startswith("-")]


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The ``pulse`` argument parser: every command's arguments, or with ``only`` just that
    command's (the others listed by name and help).

    Option defaults come from ``PULSE_*`` settings, so building a command's arguments reads
    its settings: a wrong setting of one command must not stop the others.
    """
    parser = _Parser(prog="pulse", description="Pulse: real-time analytics on a durable store.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name, (module, add_fn, run_fn, help_text) in COMMANDS.items():
        add_arguments = None
        if only is None or name == only:
            try:
                add_arguments = getattr(importlib.import_module(module), add_fn)
            except ModuleNotFoundError as exc:
                if name in OPTIONAL_COMMANDS and exc.name == module.partition(".")[0]:
                    continue
                raise
        elif name in OPTIONAL_COMMANDS and not _installed(module):
            continue
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module, _run=run_fn, _parser=p)
        if add_arguments is not None:
            add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pulse`` console script."""
    command = next((a for a in (sys.argv[1:] if argv is None else argv) if a[:1] != "-"), "")
    if command in OPTIONAL_COMMANDS and not _installed(COMMANDS[command][0]):
        print(f"pulse {command}: {OPTIONAL_COMMANDS[command]}", file=sys.stderr)
        return 2
    try:
        # option defaults come from PULSE_* settings: a bad one fails here already
        parser = build_parser(only=command)
        args, extra = parser.parse_known_args(argv)
        if extra:  # said by the command's parser: "pulse worker: ...", its own --help
            getattr(args, "_parser", parser).error(f"unrecognized arguments: {' '.join(extra)}")
    except ValidationError as exc:
        if not exc.title.endswith("Settings"):
            raise
        print(f"pulse {command}: {settings_error(exc)}", file=sys.stderr)
        return 2
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


def _installed(module: str) -> bool:
    """Whether the top-level package of ``module`` can be imported."""
    return importlib.util.find_spec(module.partition(".")[0]) is not None


def settings_error(exc: ValidationError) -> str:
    """One sentence naming the first bad ``PULSE_*`` setting and what is wrong with it."""
    err = exc.errors(include_url=False)[0]
    msg = str(err["msg"]).removeprefix("Value error, ")
    model = next(
        (
            found
            for where in _SETTINGS_MODULES
            if (found := getattr(importlib.import_module(where), exc.title, None)) is not None
        ),
        None,
    )
    if err["loc"] and model is not None:
        name = f"{model.model_config.get('env_prefix', '')}{err['loc'][0]}".upper()
        if name not in msg:
            msg = f"{name}: {msg}"
    return msg.rstrip(".") + "."


if __name__ == "__main__":
    raise SystemExit(main())
