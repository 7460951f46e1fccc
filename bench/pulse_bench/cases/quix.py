"""(g) Quix Streams: the preloaded sensor topic drained by a Quix Streams 3.x app.

See :mod:`pulse_bench.quix_app` (the ``quix`` extra: ``pip install -e './bench[quix]'``); without
``quixstreams`` the case is skipped with a note. It reads the sensor topic the other drain cases
read, in a fresh consumer group, into an empty store db. The drain is timed as Pulse's is, from
the first progress on: Quix commits its offsets after each sink flush (every
``quix_commit_interval_s``), so the bench polls the group's committed offsets against the
topic's end offsets, as it polls Pulse's applied offsets in the store.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import signal
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING

import orjson

from pipeline.stack.kafka import run_sync
from pulse_bench import procs
from pulse_bench.harness import (
    BenchContext,
    BenchError,
    BenchSkipped,
    Metrics,
    bench_case,
    drain_rate,
    ratio,
    target,
)
from pulse_bench.kafka import topics_containing, watch_committed

if TYPE_CHECKING:
    import redis

INSTALL = "pip install -e './bench[quix]'"


@bench_case(
    "quix",
    description="Quix Streams 3.x app: 1-min tumbling count/sum/min/max per key -> RedisSink",
    order=32,
)
def run(ctx: BenchContext) -> Metrics:
    """Drain the preloaded sensor topic with the Quix app; skipped without ``quixstreams``."""
    if importlib.util.find_spec("quixstreams") is None:
        raise BenchSkipped(f"quixstreams is not installed ({INSTALL} adds it)")
    pre = ctx.preloaded()
    ends = {p: end for (kind, p), end in pre.end_offsets.items() if kind == "sensor"}
    total = sum(ends.values())
    ctx.flush()
    group = f"bench-quix-{uuid.uuid4().hex[:8]}"
    env = ctx.env(pre.topics, app_id=group)
    argv = [
        "-m",
        "pulse_bench.quix_app",
        f"--group={group}",
        f"--state-dir={ctx.workdir / group}",
        f"--commit-interval={ctx.params.quix_commit_interval_s}",
    ]
    before = procs.StoreCounters.read(ctx)
    child = procs.spawn(ctx, env, "quix", argv, counted=False)
    try:
        try:
            samples = run_sync(
                lambda: watch_committed(
                    ctx.kafka.bootstrap,
                    group,
                    pre.topics.sensor,
                    ends,
                    child.alive,
                    ctx.params.drain_timeout_s,
                )
            )
        except RuntimeError as exc:
            raise BenchError(f"quix: {exc}: {child.tail()}") from exc
        after = procs.StoreCounters.read(ctx)
        cpu = procs.cpu_seconds(child.proc.pid)
    finally:
        status = child.stop()
        # Quix created changelog topics named after the group: the run's clean-up deletes them
        ctx.created_topics.extend(topics_containing(ctx.kafka.bootstrap, group))
    if status not in (0, -signal.SIGTERM):
        raise BenchError(f"quix app exited with {status}: {child.tail()}")
    with ctx.redis() as r:
        windows, counted = _windows(r)
    if not 0 < counted <= total:
        raise BenchError(f"quix windows count {counted:,} readings of {total:,} records")
    store = after.delta(before)
    metrics: Metrics = {
        **drain_rate(samples),
        "records": total,
        "input": "sensor topic",
        "quixstreams": importlib.metadata.version("quixstreams"),
        "commit_interval_s": ctx.params.quix_commit_interval_s,
        "windows": windows,
        "windowed_readings": counted,
        "worker_cpu_s": round(cpu, 2),
        "worker_cpu_us_per_event": cpu / total * 1e6,
        "store_cpu_us_per_event": store["cpu_s"] / total * 1e6,
        "store_commands_per_event": store["commands"] / total,
        "store": store,
    }
    if "aof_bytes" in store:
        metrics["aof_bytes_per_event"] = store["aof_bytes"] / total
    return metrics


def _windows(r: redis.Redis, batch: int = 1000) -> tuple[int, int]:
    """Window instances in the store, and the readings they count (the last SET of each)."""

    def chunks() -> Iterator[list[str]]:
        chunk: list[str] = []
        for key in r.scan_iter(match="quix:1m:*", count=batch):
            chunk.append(key)
            if len(chunk) == batch:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    windows = counted = 0
    for keys in chunks():
        for value in r.mget(keys):
            if value is not None:
                windows += 1
                counted += int(orjson.loads(value)["count"])
    return windows, counted


ratio("pulse_1w_vs_quix", "cases.pulse_1w.events_per_s", "cases.quix.events_per_s")
target("pulse_1w_vs_quix", "ratios.pulse_1w_vs_quix", ">=", 3.0, "one worker vs Quix Streams")
