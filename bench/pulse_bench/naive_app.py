"""The naive baseline: a Faust app written the way most tutorials write one.

Each event is decoded with ``json.loads`` on its own and its 1-minute window statistics (count,
sum, min, max of the device's reading or the route's latency) are updated with one awaited store
command after another — no batching, no pipelining, no scripts, no offset bookkeeping. Malformed
events (and values the store refuses, such as NaN) are skipped. It runs as a child process of the
benchmark: ``python -m pulse_bench.counting FILE naive --target N --result FILE``; it handles
exactly ``--target`` events (each agent claims an event before its first await, so the two
agents never overshoot), then stops writing, and records when the first and the N-th event were
handled. The result file is written at the N-th event and again when the process exits.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import time
from pathlib import Path
from typing import Any

WINDOW_MS = 60_000


class Progress:
    """Events handled so far and when; written to the result file as it goes."""

    def __init__(self, target: int, result: Path) -> None:
        self.target = target
        self.result = result
        self.claimed = 0
        self.count = 0
        self.first = 0.0
        self.last = 0.0
        self.errors = 0

    def claim(self) -> bool:
        """Reserve one of the ``target`` events; False once all are taken.

        Called before the first await of an event, so it is atomic between the agents.
        """
        if self.claimed >= self.target:
            return False
        self.claimed += 1
        return True

    def tick(self) -> None:
        now = time.monotonic()
        self.count += 1
        if self.count == 1:
            self.first = now
        self.last = now
        if self.count == self.target or self.count % 500 == 0:
            self.write()

    def write(self) -> None:
        tmp = self.result.with_suffix(".tmp")
        tmp.write_text(
            json.dumps(
                {"count": self.count, "first": self.first, "last": self.last, "errors": self.errors}
            )
        )
        os.replace(tmp, self.result)


def create_app(app_id: str, progress: Progress) -> Any:
    """The tutorial-style app: one agent per topic, one store command per statistic."""
    import faust
    from redis.exceptions import ResponseError

    from schemas.settings import KafkaSettings, StoreSettings, store_client

    kafka, store = KafkaSettings(), StoreSettings()
    app = faust.App(
        app_id,
        broker=f"kafka://{kafka.bootstrap}",
        store="memory://",
        value_serializer="raw",
        topic_partitions=kafka.partitions,
        topic_disable_leader=True,
        consumer_auto_offset_reset="earliest",
        web_enabled=False,
    )
    r = store_client(store, asyncio=True)

    async def record(key: str, name: str, value: float) -> None:
        await r.hincrby(key, f"{name}#n", 1)
        await r.hincrbyfloat(key, f"{name}#sum", value)
        low = await r.hget(key, f"{name}#min")
        if low is None or value < float(low):
            await r.hset(key, f"{name}#min", value)
        high = await r.hget(key, f"{name}#max")
        if high is None or value > float(high):
            await r.hset(key, f"{name}#max", value)

    def window(event: dict[str, Any]) -> int:
        t = int(event["event_time"])
        return t - t % WINDOW_MS

    @app.agent(app.topic(kafka.sensor_topic, value_serializer="raw"))
    async def sensors(stream: Any) -> None:
        async for raw in stream:
            if not progress.claim():
                continue
            try:
                e = json.loads(raw)
                key = f"naive:sensor:1m:device:{window(e)}"
                await record(key, f"{e['device_id']}|{e['metric']}", float(e["value"]))
            except (ValueError, KeyError, TypeError, ResponseError):
                progress.errors += 1
            progress.tick()

    @app.agent(app.topic(kafka.applog_topic, value_serializer="raw"))
    async def requests(stream: Any) -> None:
        async for raw in stream:
            if not progress.claim():
                continue
            try:
                e = json.loads(raw)
                key = f"naive:applog:1m:route:{window(e)}"
                await record(key, f"{e['service']}|{e['route']}", float(e["latency_ms"]))
            except (ValueError, KeyError, TypeError, ResponseError):
                progress.errors += 1
            progress.tick()

    return app


def main(argv: list[str]) -> int:
    """Run the naive app until terminated."""
    import faust

    parser = argparse.ArgumentParser(prog="naive")
    parser.add_argument("--target", type=int, required=True)
    parser.add_argument("--result", type=Path, required=True)
    parser.add_argument("--app-id", required=True)
    args = parser.parse_args(argv)
    progress = Progress(args.target, args.result)
    atexit.register(progress.write)
    app = create_app(args.app_id, progress)
    faust.Worker(app, loglevel="WARNING", quiet=True).execute_from_commandline()
    return 0
