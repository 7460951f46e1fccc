"""(a) The floor: a plain aiokafka consumer that only reads and JSON-decodes the preloaded input."""

from __future__ import annotations

import asyncio
import time

from pulse_bench.harness import BenchContext, BenchError, Metrics, bench_case


@bench_case(
    "floor",
    description="plain aiokafka consumer: read + orjson.loads of the preloaded topics",
    order=10,
)
def run(ctx: BenchContext) -> Metrics:
    """Drain the preloaded topics once; events/s from the first record to the last."""
    pre = ctx.preloaded()
    return asyncio.run(_drain(ctx.kafka.bootstrap, pre.topics.inputs, pre.total))


async def _drain(bootstrap: str, topics: list[str], total: int) -> Metrics:
    import orjson
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(
        *topics,
        bootstrap_servers=bootstrap,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    loads = orjson.loads
    count = bad = at_first = 0
    first = 0.0
    deadline = time.monotonic() + 120
    try:
        while count < total:
            if time.monotonic() > deadline:
                raise BenchError(f"floor read {count:,} of {total:,} records in 120 s")
            batches = await consumer.getmany(timeout_ms=500, max_records=2_000)
            for msgs in batches.values():
                for m in msgs:
                    try:
                        loads(m.value)
                    except orjson.JSONDecodeError:
                        bad += 1
                count += len(msgs)
            if not first and count:
                # the clock starts once the first fetch is decoded, as for the other cases
                first, at_first = time.monotonic(), count
        last = time.monotonic()
    finally:
        await consumer.stop()
    return {
        "events": count,
        "undecodable": bad,
        "events_per_s": (count - at_first) / (last - first),
        "seconds": last - first,
    }
