"""(c) Pulse itself: real ``pulse worker`` processes draining the preloaded topics.

Each run gets a fresh consumer group, fresh dead-letter/late topics and an empty store db. The
drain is timed by polling the store's per-partition applied offsets against the topics' end
offsets, from the first applied batch on (start-up and the group join are not counted). The
workers' round trips are read after they stopped (each writes its counters as it exits). With
``--profile-dir``, the one-worker run is sampled by ``py-spy`` (which slows it slightly).
"""

from __future__ import annotations

import signal
import statistics
import uuid
from collections.abc import Sequence
from pathlib import Path

from pulse_bench import procs
from pulse_bench.harness import (
    BenchContext,
    BenchError,
    Metrics,
    bench_case,
    drain_cpu,
    drain_rate,
    ratio,
    target,
)
from schemas import keys


def drain_with_workers(ctx: BenchContext, workers: int, label: str, **extra_env: str) -> Metrics:
    """Run ``workers`` worker processes over the preloaded topics until everything is applied
    (``extra_env``: worker settings of this run)."""
    pre = ctx.preloaded()
    ctx.flush()
    out = ctx.topics(f"{label}-out")
    topics = type(out)(pre.topics.sensor, pre.topics.applog, out.deadletter, out.late)
    env = ctx.env(topics, app_id=f"bench-{label}-{uuid.uuid4().hex[:8]}", **extra_env)
    before = procs.StoreCounters.read(ctx)
    children = [procs.spawn_worker(ctx, env, f"{label}-w{i + 1}") for i in range(workers)]
    profiler: procs.Profiler | None = None
    statuses: dict[str, int] = {}
    try:
        if ctx.params.profile_dir and workers == 1:
            output = Path(ctx.params.profile_dir) / f"{label}.pyspy.txt"
            profiler = procs.Profiler.attach(children[0].proc.pid, output)
        drain = procs.wait_drained(ctx, pre.end_offsets, children)
        after = procs.StoreCounters.read(ctx)
        cpu = sum(procs.cpu_seconds(c.proc.pid) for c in children)
        worker_metrics, metrics_complete = _published_metrics(ctx, children, pre.total)
    finally:
        if profiler is not None:
            profiler.stop()
        statuses = procs.stop_all(children)
    # -SIGTERM: our SIGTERM arrived before the worker had installed its handlers (a worker that
    # got no partitions in a short smoke run may still be starting); it had nothing to lose.
    bad = {name: rc for name, rc in statuses.items() if rc not in (0, -signal.SIGTERM)}
    if bad:
        first_bad = next(c for c in children if c.name in bad)
        raise BenchError(f"workers exited with {bad}: {first_bad.tail()}")
    counts = [c.final_counts() for c in children]  # written by each worker as it exited
    final = drain.final
    assert final is not None
    for kind, produced in pre.records.items():
        t = final.totals[kind]
        if t["events"] + t["late"] + t["dead"] != produced:
            raise BenchError(f"{kind}: store counted {t} for {produced} records")
    metrics: Metrics = {
        "workers": workers,
        **drain_rate(drain.samples),
        **drain_cpu(drain.samples, drain.cpu),
        "records": pre.total,
        "applied": {k: dict(v) for k, v in final.totals.items()},
        "worker_cpu_s": round(cpu, 2),
        "worker_cpu_us_per_event": cpu / pre.total * 1e6,
        "store_cpu_us_per_event": after.delta(before)["cpu_s"] / pre.total * 1e6,
        "worker_apply_ms": {
            k: max(float(m.get(k, 0)) for m in worker_metrics)
            for k in (
                "apply_p50_ms",
                "apply_p99_ms",
                "durability_wait_p50_ms",
                "durability_wait_p99_ms",
            )
        },
        "worker_batches": sum(int(m.get("batches", 0)) for m in worker_metrics),
        "worker_metrics_complete": metrics_complete,
        "round_trips": sum(c["round_trips"] for c in counts),
        "client_commands": sum(c["commands"] for c in counts),
        "store": after.delta(before),
        "bench_polls": drain.polls,
    }
    if profiler is not None:
        metrics["profile"] = str(profiler.output)
    return metrics


def _published_metrics(
    ctx: BenchContext, children: list[procs.Child], records: int, timeout_s: float = 30.0
) -> tuple[list[dict[str, str]], bool]:
    """The workers' metrics hashes once they cover every applied record; whether they do.

    Workers publish their metrics on a timer (best-effort), so this waits, with a deadline, for
    hashes whose events + late + dead add up to ``records``; past the deadline it returns what
    is there (the report says so) rather than failing the case.
    """
    found: list[dict[str, str]] = []

    def covered() -> bool:
        nonlocal found
        with ctx.redis() as r:
            found = [r.hgetall(keys.worker_key(c.name)) for c in children]
        counted = sum(int(m.get(k, 0)) for m in found for k in ("events", "late", "dead"))
        return counted >= records

    complete = procs.until(covered, timeout_s, interval_s=0.2)
    return found, complete


@bench_case("pulse_1w", description="the real pipeline, 1 worker process", order=30)
def run_one(ctx: BenchContext) -> Metrics:
    """Pulse with one worker."""
    return drain_with_workers(ctx, 1, "pulse_1w")


@bench_case("pulse_2w", description="the real pipeline, 2 worker processes", order=32)
def run_two(ctx: BenchContext) -> Metrics:
    """Pulse with two workers (one consumer group)."""
    return drain_with_workers(ctx, 2, "pulse_2w")


@bench_case("pulse_3w", description="the real pipeline, 3 worker processes", order=34)
def run_three(ctx: BenchContext) -> Metrics:
    """Pulse with three workers (one consumer group)."""
    return drain_with_workers(ctx, 3, "pulse_3w")


@bench_case(
    "pulse_1w_nodetect",
    description="the real pipeline, 1 worker, anomaly detection off (its cost, side by side)",
    requires=("pulse_1w",),
    order=31,
)
def run_one_without_detection(ctx: BenchContext) -> Metrics:
    """Pulse with one worker and ``PULSE_WORKER_DETECT=false``, alternated with drains that
    detect: after ``pulse_1w``, ``detection_rounds`` rounds of (off, on). ``detection_on_off``
    is the median "on" rate over the median "off" rate: on this shared machine a single drain's
    rate can move by a fifth, and the median of alternated drains ignores one such drain
    whichever side it falls on, as well as a drift of the machine's speed.
    ``detection_cpu_on_off`` is the same ratio of the worker's CPU per measured event (off over
    on): what detection costs the worker's own core, apart from time waited."""
    one = ctx.results["pulse_1w"]
    on, on_cpu = [float(one["events_per_s"])], [one.get("worker_cpu_us_per_measured_event")]
    off_rates: list[float] = []
    off_cpu: list[float | None] = []
    first: Metrics | None = None
    for i in range(max(1, ctx.params.detection_rounds)):
        suffix = "" if i == 0 else f"_{i + 1}"
        off = drain_with_workers(ctx, 1, f"pulse_1w_nodetect{suffix}", PULSE_WORKER_DETECT="false")
        if first is None:
            first = off
        off_rates.append(float(off["events_per_s"]))
        off_cpu.append(off["worker_cpu_us_per_measured_event"])
        again = drain_with_workers(ctx, 1, f"pulse_1w_again{suffix}")
        on.append(float(again["events_per_s"]))
        on_cpu.append(again["worker_cpu_us_per_measured_event"])
    assert first is not None
    # the first "off" drain's own figures, and every drain's rate and CPU per event
    first["off_events_per_s"] = off_rates
    first["on_events_per_s"] = on
    first["off_cpu_us_per_event"] = off_cpu
    first["on_cpu_us_per_event"] = on_cpu
    first["detection_on_off"] = detection_ratio(on, off_rates)
    first["detection_cpu_on_off"] = detection_cpu_ratio(on_cpu, off_cpu)
    return first


def detection_ratio(on: Sequence[float], off: Sequence[float]) -> float:
    """The median drain rate with detection over the median without."""
    return statistics.median(on) / statistics.median(off)


def detection_cpu_ratio(on: Sequence[float | None], off: Sequence[float | None]) -> float | None:
    """:func:`detection_ratio` of events per worker CPU second, from CPU µs per event (None
    when a drain's could not be measured)."""
    if not all(on) or not all(off):
        return None
    return detection_ratio([1 / x for x in on if x], [1 / x for x in off if x])


ratio("pulse_1w_vs_floor", "cases.pulse_1w.events_per_s", "cases.floor.events_per_s")
ratio("pulse_1w_vs_naive", "cases.pulse_1w.events_per_s", "cases.naive.events_per_s")
ratio("pulse_2w_vs_1w", "cases.pulse_2w.events_per_s", "cases.pulse_1w.events_per_s")
ratio("pulse_2w_vs_floor", "cases.pulse_2w.events_per_s", "cases.floor.events_per_s")
ratio("pulse_3w_vs_1w", "cases.pulse_3w.events_per_s", "cases.pulse_1w.events_per_s")
target("pulse_1w_vs_floor", "ratios.pulse_1w_vs_floor", ">=", 0.25, "one worker vs the floor")
ratio("detection_cost", "cases.pulse_1w.events_per_s", "cases.pulse_1w_nodetect.events_per_s")
target(
    "detection_cost",
    "cases.pulse_1w_nodetect.detection_on_off",
    ">=",
    0.8,
    "detection costs at most 20% of one worker's throughput",
)
