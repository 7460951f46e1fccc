"""(d) Freshness: time from an event's production to its visibility in the store.

Two input rates: the fixed ``--rate`` (5 000 events/s) and half of what one worker drained in
the same run (``pulse_1w``'s events/s, so the case needs ``pulse_1w`` and runs after it).

A warmed-up worker runs on fresh topics; the load generator's records are sent at a fixed rate
in 50 ms slices, and the send time of every record (monotonic clock) is logged per partition in
offset order. A thread polls the store's applied offsets every ~5 ms; a record is visible from the
first poll whose applied offset of its partition reaches the record's offset. The producer,
broker, worker batching, apply and the durability wait are all inside the measured interval.

The paced load first runs for a *settling* span that is not measured: the worker's allowed
lateness plus one 10 s window (40 s by default). Only then do the paced load's windows close
(a window closes once the watermark, the newest event time less the lateness, passes its end),
and from then on every device's 10 s window closes every 10 s and its detectors step: the
steady state a running pipeline lives in. The measured span (``freshness_s``) follows it.
"""

from __future__ import annotations

import gc
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.settings import WorkerSettings
from pipeline.stack.kafka import run_sync
from pulse_bench import procs
from pulse_bench.harness import (
    BenchContext,
    BenchError,
    Metrics,
    bench_case,
    percentiles,
    target,
)
from pulse_bench.kafka import SendLog, TopicSet, end_offsets, gen_config, send_all
from schemas import keys

if TYPE_CHECKING:
    from loadgen.generator import Record

WARMUP_EVENTS = 2000


def visibility_latencies(
    sends: dict[tuple[str, int], list[float]],
    bases: dict[tuple[str, int], int],
    polls: Sequence[tuple[float, dict[tuple[str, int], int]]],
) -> tuple[np.ndarray, np.ndarray]:
    """Send time and seconds from send to visibility of every record that became visible.

    ``sends[tp][k]`` is the send time of offset ``bases[tp] + k``; ``polls`` are ``(time,
    applied offsets)`` in time order.
    """
    times = np.asarray([t for t, _ in polls], dtype=np.float64)
    sent_l: list[np.ndarray] = []
    lat_l: list[np.ndarray] = []
    for tp, sent in sends.items():
        applied = np.maximum.accumulate(np.asarray([o.get(tp, -1) for _, o in polls]))
        offsets = bases.get(tp, 0) + np.arange(len(sent))
        idx = np.searchsorted(applied, offsets, side="left")
        seen = idx < len(times)
        sent_l.append(np.asarray(sent)[seen])
        lat_l.append(times[idx[seen]] - sent_l[-1])
    if not lat_l:
        return np.empty(0), np.empty(0)
    return np.concatenate(sent_l), np.concatenate(lat_l)


def settle_seconds(params_settle_s: float | None, allowed_lateness_s: float) -> float:
    """Seconds of paced load before the measured span: ``params_settle_s`` when given, else
    the worker's allowed lateness plus one 10 s window (the first paced window has closed)."""
    if params_settle_s is not None:
        return max(0.0, params_settle_s)
    return allowed_lateness_s + keys.WINDOW_10S.size_ms / 1000


def measured_span(
    sent: np.ndarray, latency: np.ndarray, first_sent: float, settle_s: float
) -> tuple[np.ndarray, np.ndarray]:
    """The records handed over ``settle_s`` or more after ``first_sent``: the measured span."""
    keep = sent >= first_sent + settle_s
    return sent[keep], latency[keep]


def p99_by_second(sent: np.ndarray, latency: np.ndarray) -> list[float]:
    """The p99 of ``latency`` per second of ``sent`` (from the first send): whether a run's
    p99 is its steady state or one stall (a stall of a few hundred ms sets a 15 s run's p99)."""
    if not sent.size:
        return []
    second = np.floor(sent - sent.min()).astype(np.int64)
    return [float(np.percentile(latency[second == s], 99)) for s in np.unique(second).tolist()]


class Poller(threading.Thread):
    """Polls the store's applied offsets until stopped."""

    def __init__(self, ctx: BenchContext, interval_s: float = 0.005) -> None:
        super().__init__(name="bench-freshness-poller", daemon=True)
        self._ctx = ctx
        self._interval = interval_s
        self.samples: list[tuple[float, dict[tuple[str, int], int]]] = []
        self.stop_event = threading.Event()
        self.error: BaseException | None = None

    def saw(self, ends: dict[tuple[str, int], int]) -> bool:
        """Whether the latest sample shows every partition applied up to ``ends``."""
        if not self.samples:
            return False
        _, offsets = self.samples[-1]
        return all(offsets.get(tp, -1) >= end - 1 for tp, end in ends.items())

    def run(self) -> None:
        try:
            with self._ctx.redis() as r:
                while not self.stop_event.is_set():
                    prog = procs.read_progress(r, self._ctx.kafka.partitions)
                    self.samples.append((prog.at, prog.offsets))
                    time.sleep(self._interval)
        except BaseException as exc:  # reported by the case
            self.error = exc


@bench_case(
    "freshness",
    description="production -> visible in the store, at --rate events/s (1 worker)",
    order=50,
)
def run(ctx: BenchContext) -> Metrics:
    """Freshness at the fixed rate (``--rate``, 5 000 events/s)."""
    return measure(ctx, ctx.params.rate, "freshness")


@bench_case(
    "freshness_half",
    description="production -> visible in the store, at half the measured pulse_1w rate",
    requires=("pulse_1w",),
    order=51,
)
def run_half(ctx: BenchContext) -> Metrics:
    """Freshness at half of what one worker drains in this run: the pipeline with headroom."""
    drained = float(ctx.results["pulse_1w"]["events_per_s"])
    rate = max(1, int(drained / 2))
    return {"pulse_1w_events_per_s": drained, **measure(ctx, rate, "freshness_half")}


def measure(ctx: BenchContext, rate: int, label: str) -> Metrics:
    """Paced load at ``rate`` through a warm worker; p50/p99 production-to-visibility.

    With ``--profile-dir``, the worker is sampled by py-spy over the paced run (not its
    warm-up) into ``<label>.pyspy.txt``.
    """
    p = ctx.params
    ctx.flush()
    topics = ctx.topics("fresh")
    env = ctx.env(topics, app_id=f"bench-fresh-{uuid.uuid4().hex[:8]}")
    worker = procs.spawn_worker(ctx, env, "freshness-w1")
    poller = Poller(ctx)
    profiler: procs.Profiler | None = None
    switch = sys.getswitchinterval()
    # the poller thread must not wait 5 ms for the GIL while the producer runs
    sys.setswitchinterval(0.0005)
    try:
        # warm-up: the worker joins its group and applies a first batch before the clock runs
        warm = _records(ctx, topics, WARMUP_EVENTS, rate=0, seed_offset=1)
        run_sync(lambda: send_all(ctx.kafka.bootstrap, warm))
        procs.wait_drained(
            ctx, end_offsets(ctx.kafka.bootstrap, topics, ctx.kafka.partitions), [worker]
        )
        bases = end_offsets(ctx.kafka.bootstrap, topics, ctx.kafka.partitions)
        settle_s = settle_seconds(p.freshness_settle_s, WorkerSettings().allowed_lateness_s)
        settling = int(rate * settle_s)
        records = _records(ctx, topics, settling + rate * p.freshness_s, rate=rate, seed_offset=0)
        log = SendLog({topics.sensor: "sensor", topics.applog: "applog"})
        # the records and the harness are long-lived: a full collection walking them would
        # stall the producer and the poller mid-run (about 0.1 s each on these machines)
        gc.collect()
        gc.freeze()
        before = procs.StoreCounters.read(ctx)
        cpu_before = procs.cpu_seconds(worker.proc.pid)
        if p.profile_dir:
            output = Path(p.profile_dir) / f"{label}.pyspy.txt"
            profiler = procs.Profiler.attach(worker.proc.pid, output)
        poller.start()
        slice_size = max(1, rate // 20)  # 50 ms of traffic, as the load generator paces
        run_sync(
            lambda: send_all(
                ctx.kafka.bootstrap, records, slice_size, log.recorder(records), rate=rate
            )
        )
        # the paced span: first to last hand-over to the producer (not its start-up)
        sent = [t for ts in log.times.values() for t in (ts[0], ts[-1])]
        send_s = max(max(sent) - min(sent), 1e-9)
        ends = end_offsets(ctx.kafka.bootstrap, topics, ctx.kafka.partitions)
        procs.wait_drained(ctx, ends, [worker], timeout_s=120)
        # every record is applied; the poller's samples must show it too (it polls on its own
        # thread, which a loaded machine may not have run since)
        if not procs.until(lambda: poller.saw(ends) or not poller.is_alive(), 60.0):
            raise BenchError("the store poller never saw the drained offsets within 60 s")
        worker_cpu_s = procs.cpu_seconds(worker.proc.pid) - cpu_before
        store = procs.StoreCounters.read(ctx).delta(before)
    finally:
        if profiler is not None:
            profiler.stop()
        gc.unfreeze()
        sys.setswitchinterval(switch)
        poller.stop_event.set()
        if poller.is_alive():
            poller.join(10)
        status = worker.stop()
    if poller.error is not None:
        raise BenchError(f"store poller failed: {poller.error}")
    if status != 0:
        raise BenchError(f"worker exited with {status}: {worker.tail()}")
    sent_at, lat = visibility_latencies(log.times, bases, poller.samples)
    if lat.size != len(records):
        raise BenchError(f"{lat.size} of {len(records)} records seen applied")
    first_sent = min(ts[0] for ts in log.times.values())
    sent_at, lat = measured_span(sent_at, lat, first_sent, settle_s)
    if not lat.size:
        raise BenchError(f"no record was sent after the {settle_s:g} s settling span")
    ms = lat * 1000
    poll_gaps = np.diff([t for t, _ in poller.samples])
    return {
        "rate_target": rate,
        "rate_achieved": len(records) / send_s,
        "send_s": send_s,
        "settle_s": settle_s,
        "events": int(lat.size),
        "settle_events": len(records) - int(lat.size),
        **{f"{k}_ms": v for k, v in percentiles(ms, (0.5, 0.9, 0.99)).items()},
        "max_ms": float(ms.max()),
        "p99_ms_by_second": [round(v * 1000, 1) for v in p99_by_second(sent_at, lat)],
        "poll_interval_ms": float(np.mean(poll_gaps) * 1000) if poll_gaps.size else 0.0,
        **paced_cost(len(records), worker_cpu_s, store),
        **({"profile": str(profiler.output)} if profiler is not None else {}),
    }


def paced_cost(events: int, worker_cpu_s: float, store: Metrics) -> Metrics:
    """What the paced load cost per event: the worker's CPU and the store's (its CPU counts
    the poller's reads too), and the AOF bytes on the primary and the replica (over the whole
    paced load, its settling span included).

    Beside the drain's figures (``pulse_1w``, ``write_cost``) they show what the pipeline pays
    for small polls: every poll writes the whole packed value of each (entity, window) it
    touches, so the store hears of a busy entity once per poll, not once per drain batch.
    """
    out: Metrics = {
        "worker_cpu_us_per_event": worker_cpu_s / events * 1e6,
        "store_cpu_us_per_event": float(store["cpu_s"]) / events * 1e6,
    }
    for key in ("aof_bytes", "replica_aof_bytes"):
        if key in store:  # absent when the AOF was rewritten meanwhile
            out[f"{key}_per_event"] = int(store[key]) / events
    return out


def _records(
    ctx: BenchContext, topics: TopicSet, n: int, rate: int, seed_offset: int
) -> list[Record]:
    from loadgen.generator import Generator

    clock_rate = rate or 1000
    duration = max(1, -(-n // clock_rate))
    now = int(time.time() * 1000)
    start = now - duration * 1000 if rate == 0 else now
    config = gen_config(
        ctx.params, ctx.kafka, topics, seed=ctx.params.seed + seed_offset, rate=rate,
        start_ms=start, duration_s=duration, bad_rate=0.0, late_rate=0.0,
    )  # fmt: skip
    return [r for chunk in Generator(config) for r in chunk.records][:n]


target("freshness_p99_ms", "cases.freshness.p99_ms", "<=", 250.0, "at --rate (5 000 events/s)")
target(
    "freshness_half_p99_ms",
    "cases.freshness_half.p99_ms",
    "<=",
    250.0,
    "at half the 1-worker drain rate measured in the same run",
)
