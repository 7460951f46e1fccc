"""``pulse bench``: run the benchmark cases side by side and print/write the report."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from schemas.argtypes import new_file, out_dir, positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``pulse bench``."""
    a = parser.add_argument
    a("--smoke", action="store_true", help="tiny sizes: checks the harness in seconds, not speed")
    a("--events", type=positive_int, help="records preloaded for the drain cases (300000)")
    a("--cases", help="comma-separated cases to run, with what they need (default: all)")
    a("--rate", type=positive_int, help="fixed freshness input rate, events/s (5000)")
    a("--output", type=new_file, help="JSON report file (default: bench-<timestamp>.json)")
    a("--store-db", type=int, default=15, help="store db the bench uses, must be empty (15)")
    a(
        "--profile-dir",
        type=out_dir,
        help="sample the 1-worker drain and the paced runs' worker with py-spy into this dir",
    )
    a("--list", action="store_true", help="list the cases and exit")


def run(args: argparse.Namespace) -> int:
    """Run ``pulse bench``; the exit status is 1 when a case failed."""
    import orjson

    from pipeline.settings import StackSettings
    from pipeline.stack.errors import StackError
    from pipeline.stack.stack import Stack
    from pulse_bench import cases  # noqa: F401 - registers the cases
    from pulse_bench.harness import (
        REGISTRY,
        BenchContext,
        BenchParams,
        build_report,
        machine_info,
        render,
        run_cases,
    )
    from schemas.settings import KafkaSettings, StoreSettings

    prog = "pulse bench"
    if args.list:
        for case in REGISTRY.cases.values():
            print(f"{case.name:14} {case.description}")
        return 0
    try:
        selected = [c.strip() for c in args.cases.split(",") if c.strip()] if args.cases else None
        todo = REGISTRY.resolve(selected)
    except ValueError as exc:
        print(f"{prog}: {exc}.", file=sys.stderr)
        return 2
    if not 0 <= args.store_db <= 15:
        print(f"{prog}: --store-db must be within 0..15.", file=sys.stderr)
        return 2
    params = BenchParams.create(
        args.smoke,
        events=args.events,
        rate=args.rate,
        store_db=args.store_db,
        profile_dir=str(args.profile_dir) if args.profile_dir else None,
    )
    stack_settings, kafka, store = StackSettings(), KafkaSettings(), StoreSettings()
    stack = Stack(stack_settings, kafka, store)
    try:
        started = [s.service for s, fresh in stack.up() if fresh]
    except StackError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    output = args.output or Path(f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json")
    try:
        with tempfile.TemporaryDirectory(prefix="pulse-bench-") as tmp:
            ctx = BenchContext(params, kafka, store, Path(tmp))
            with ctx.redis() as r:
                if r.dbsize():
                    print(
                        f"{prog}: store db {params.store_db} is not empty; "
                        "pick an empty one with --store-db.",
                        file=sys.stderr,
                    )
                    return 2
                valkey_version = str(r.info("server").get("valkey_version", "?"))
            machine = machine_info(stack_settings.kafka_version, valkey_version)
            try:
                ctx.hold_aof_rewrites()
                results, errors = run_cases(ctx, todo)
            finally:
                try:
                    ctx.cleanup()
                except Exception as exc:  # the report is still worth writing
                    print(f"{prog}: warning: clean-up failed: {exc}", file=sys.stderr)
            machine["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
            report = build_report(machine, vars(params), results, errors, skipped=ctx.skipped)
            output.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
            render(report)
            print(f"{prog}: report written to {output}")
            return 1 if errors else 0
    finally:
        for service in stack.services:
            if service.name in started:
                service.stop()
