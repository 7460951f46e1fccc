"""``pulse replay`` from Kafka: the rate a closed range is rebuilt at.

A replay needs closed minutes (every partition's watermark past them), and the shared preloaded
topics span too little event time for that in a smoke run; so this case produces a run of the
preloaded size (same fleet, faults and late events) over four minutes of event time into topics
of its own, drains it with one worker, and replays every closed minute in-process with
``pipeline.replay_command.replay``: read from Kafka, validate, the lateness rule, aggregate,
the anomalies raised again (detectors warmed up on the store's windows before the range), and
one ``FCALL pulse_replace`` per partition.
"""

from __future__ import annotations

import time
import uuid

from pipeline.stack.kafka import run_sync
from pulse_bench import procs
from pulse_bench.harness import BenchContext, BenchError, Metrics, bench_case
from pulse_bench.kafka import TopicSet, end_offsets, gen_config, send_all
from schemas import keys
from schemas.events import EventKind

SPAN_S = 240


def _produce(ctx: BenchContext) -> tuple[TopicSet, dict[tuple[str, int], int]]:
    """The run's records in fresh topics, event times over the last SPAN_S seconds."""
    from loadgen.generator import Generator

    topics = ctx.topics("replay")
    now = int(time.time() * 1000)
    config = gen_config(
        ctx.params, ctx.kafka, topics, start_ms=now - SPAN_S * 1000, duration_s=SPAN_S,
        sim_rate=max(1, -(-ctx.params.events // SPAN_S)),
    )  # fmt: skip
    records = [r for chunk in Generator(config) for r in chunk.records][: ctx.params.events]
    run_sync(lambda: send_all(ctx.kafka.bootstrap, records))
    return topics, end_offsets(ctx.kafka.bootstrap, topics, ctx.kafka.partitions)


@bench_case(
    "replay",
    description="pulse replay from Kafka of a drained run's closed minutes (in-process)",
    order=33,
)
def run(ctx: BenchContext) -> Metrics:
    """Replay the closed minutes of a drained run from Kafka; records read per second."""
    from pipeline.replay import MINUTE_MS, ReplayRange
    from pipeline.replay_command import ReplayConfig, replay
    from pipeline.settings import WorkerSettings

    topics, ends = _produce(ctx)
    ctx.flush()
    env = ctx.env(topics, app_id=f"bench-replay-{uuid.uuid4().hex[:8]}")
    child = procs.spawn_worker(ctx, env, "replay-w1")
    try:
        procs.wait_drained(ctx, ends, [child])
    finally:
        procs.stop_all([child])
    with ctx.redis() as r:
        marks = [
            int(wm)
            for kind in EventKind
            for k in r.scan_iter(match=keys.progress_pattern(kind), count=1000)
            if (wm := r.hget(k, keys.Progress.WATERMARK)) is not None
        ]
        starts = [
            int(k.rsplit(":", 1)[1])
            for k in r.scan_iter(match=f"{keys.PREFIX}:{{*}}:w:1m:*", count=1000)
        ]
    if not marks or not starts:
        raise BenchError("the store holds no applied run to replay")
    t2 = min(marks) - min(marks) % MINUTE_MS
    t1 = min(starts)
    if t2 <= t1:
        raise BenchError("no whole minute is closed in every partition")
    rng = ReplayRange.aligned(t1, t2)
    cfg = ReplayConfig.from_settings(rng, WorkerSettings(), quiet=True)
    cfg.topics = {EventKind.SENSOR: topics.sensor, EventKind.APPLOG: topics.applog}
    cfg.bootstrap = ctx.kafka.bootstrap
    client = ctx.redis(timeout_s=120.0, decode=False)
    t0 = time.monotonic()
    try:
        report = replay(client, cfg, "kafka")
    finally:
        client.close()
    total_s = time.monotonic() - t0
    return {
        "events_per_s": report.events_per_s,
        "records_read": report.records,
        "events_rebuilt": report.events,
        "minutes": (rng.end - rng.start) // MINUTE_MS,
        "partitions": report.partitions,
        "keys_replaced": report.written,
        "anomalies": report.anomalies if report.anomalies is not None else -1,
        "warmup_windows": report.warmup_windows,
        "read_s": round(report.read_s, 3),
        "seconds": round(total_s, 3),
        "events_per_s_with_writes": report.records / max(total_s, 1e-9),
    }
