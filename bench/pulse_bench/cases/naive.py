"""(b) The naive baseline: a tutorial-style Faust agent, one store command per statistic.

See :mod:`pulse_bench.naive_app`. It handles the first ``naive_events`` records of the
preloaded topics (it is slow); events/s from the first handled event to the last. Its round
trips are read after it stopped: the child writes its counters when it exits.
"""

from __future__ import annotations

import contextlib
import json
import uuid

from pulse_bench import procs
from pulse_bench.harness import BenchContext, BenchError, Metrics, bench_case


@bench_case(
    "naive",
    description="tutorial Faust agent: per event json.loads + awaited HINCRBY/HSET commands",
    order=20,
)
def run(ctx: BenchContext) -> Metrics:
    """Run the naive app until it handled ``naive_events`` records."""
    pre = ctx.preloaded()
    target_n = min(ctx.params.naive_events, pre.total)
    ctx.flush()
    result = ctx.workdir / "naive.result.json"
    result.unlink(missing_ok=True)
    env = ctx.env(pre.topics, app_id=f"bench-naive-{uuid.uuid4().hex[:8]}")
    before = procs.StoreCounters.read(ctx)
    argv = [
        "naive",
        f"--target={target_n}",
        f"--result={result}",
        f"--app-id={env['PULSE_WORKER_APP_ID']}",
    ]
    child = procs.spawn(ctx, env, "naive", argv)
    state: dict[str, float] = {}

    def done() -> bool:
        if not child.alive():
            raise BenchError(f"naive app exited with {child.proc.returncode}: {child.tail()}")
        try:
            state.update(json.loads(result.read_text()))
        except (OSError, ValueError):
            return False
        return state.get("count", 0) >= target_n

    try:
        finished = procs.until(done, ctx.params.drain_timeout_s, interval_s=0.1)
        # the target reached, the app sends nothing more: the store's counters are complete
        after = procs.StoreCounters.read(ctx)
    finally:
        child.stop()
    counts = child.final_counts()  # written by the child as it exited; BenchError if not
    with contextlib.suppress(OSError, ValueError):
        state.update(json.loads(result.read_text()))  # rewritten at exit too
    count = int(state.get("count", 0))
    if count < 2:
        raise BenchError(f"naive app handled {count} events: {child.tail()}")
    seconds = state["last"] - state["first"]
    return {
        "events": count,
        "complete": finished,
        "skipped_malformed": int(state.get("errors", 0)),
        "events_per_s": (count - 1) / seconds,
        "seconds": seconds,
        "round_trips": counts["round_trips"],
        "client_commands": counts["commands"],
        "store": after.delta(before),
    }
