"""(e) Write cost per event: store round trips, store commands and AOF bytes.

Derived from the drains of ``naive`` and ``pulse_1w``: round trips are counted in the child
processes (one per write of a command or pipeline), commands and AOF growth are server-side
deltas over the drain (``total_commands_processed`` includes the commands a function runs; the
benchmark's own progress polls are subtracted). The replica's AOF growth is measured too; its
command count is not (Valkey does not count the commands a replica applies from its primary).
"""

from __future__ import annotations

from typing import Any

from pulse_bench.harness import BenchContext, Metrics, bench_case, ratio, target


def per_event(result: Metrics, events: int, poll_commands: int = 0) -> Metrics:
    """Per-event write cost of one drain result."""
    store: dict[str, Any] = result["store"]
    out: Metrics = {
        "events": events,
        "round_trips_per_event": result["round_trips"] / events,
        "client_commands_per_event": result["client_commands"] / events,
        "store_commands_per_event": max(store["commands"] - poll_commands, 0) / events,
    }
    if "aof_bytes" in store:  # absent when the AOF was rewritten during the drain
        out["aof_bytes_per_event"] = store["aof_bytes"] / events
    if "replica_aof_bytes" in store:
        out["replica_aof_bytes_per_event"] = store["replica_aof_bytes"] / events
    if store.get("aof_rewritten"):
        out["aof_rewritten_during_run"] = True
    if "cpu_s" in store:
        out["store_cpu_us_per_event"] = store["cpu_s"] / events * 1e6
    by_command: dict[str, dict[str, int]] = store.get("by_command", {})
    out["store_us_per_event_by_command"] = {
        name: round(v["usec"] / events, 3) for name, v in by_command.items()
    }
    out["store_calls_per_event_by_command"] = {
        name: round(v["calls"] / events, 3) for name, v in by_command.items()
    }
    return out


@bench_case(
    "write_cost",
    description="store round trips, commands and AOF bytes per event (naive vs Pulse)",
    requires=("naive", "pulse_1w"),
    order=40,
)
def run(ctx: BenchContext) -> Metrics:
    """Per-event write cost of the naive baseline and of Pulse with one worker."""
    naive, pulse = ctx.results["naive"], ctx.results["pulse_1w"]
    # each progress poll is one pipeline of one HMGET per input partition
    poll_commands = pulse["bench_polls"] * 2 * ctx.kafka.partitions
    return {
        "naive": per_event(naive, naive["events"]),
        "pulse_1w": per_event(pulse, pulse["records"], poll_commands),
    }


ratio(
    "naive_vs_pulse_round_trips",
    "cases.write_cost.naive.round_trips_per_event",
    "cases.write_cost.pulse_1w.round_trips_per_event",
)
ratio(
    "naive_vs_pulse_aof_bytes",
    "cases.write_cost.naive.aof_bytes_per_event",
    "cases.write_cost.pulse_1w.aof_bytes_per_event",
)
target(
    "write_cost_store_commands",
    "cases.write_cost.pulse_1w.store_commands_per_event",
    "<=",
    0.5,
    "store commands per event, 1 worker",
)
target(
    "write_cost_aof_bytes",
    "cases.write_cost.pulse_1w.aof_bytes_per_event",
    "<=",
    150.0,
    "AOF bytes per event on the primary",
)
target(
    "write_cost_replica_aof_bytes",
    "cases.write_cost.pulse_1w.replica_aof_bytes_per_event",
    "<=",
    150.0,
    "AOF bytes per event on the replica",
)
