"""``pulse loadgen``: generate sensor and application-log events into Kafka or a JSONL file.

Only the standard library and settings are imported at module level; numpy, orjson and aiokafka
are imported inside :func:`run` so that building the ``pulse`` parser stays cheap. Nothing comes
from ``pipeline``: the worker's event-time bounds are read from the same ``PULSE_WORKER_*``
variables through :class:`schemas.settings.EventTimeSettings`.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import TYPE_CHECKING

from loadgen.settings import (
    MAX_DEVICES,
    MAX_DURATION_S,
    MAX_RATE,
    MAX_SERVICES,
    LoadgenSettings,
)
from schemas.argtypes import (
    LATEST_MS,
    fraction,
    int_within,
    new_file,
    non_negative_int,
    one_line,
    servers,
)
from schemas.settings import EventTimeSettings, KafkaSettings

if TYPE_CHECKING:
    from loadgen.generator import GenConfig
    from loadgen.producer import Progress


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``pulse loadgen`` options (defaults from ``PULSE_LOADGEN_*``)."""
    s = LoadgenSettings()
    a = parser.add_argument
    a(
        "--rate",
        type=int_within(0, MAX_RATE),
        default=s.rate,
        help="events/s; 0 = as fast as possible (see --sim-rate) (default: %(default)s)",
    )
    a(
        "--duration",
        type=int_within(1, MAX_DURATION_S),
        default=s.duration_s,
        metavar="S",
        help="sim-clock seconds; events = rate * duration (default: %(default)s)",
    )
    a(
        "--devices",
        type=int_within(1, MAX_DEVICES),
        default=s.devices,
        help="simulated IoT devices (default: %(default)s)",
    )
    a(
        "--services",
        type=int_within(1, MAX_SERVICES),
        default=s.services,
        help="simulated services (default: %(default)s)",
    )
    a("--seed", type=non_negative_int, default=s.seed, help="random seed (default: %(default)s)")
    a(
        "--anomaly-rate",
        type=fraction,
        default=s.anomaly_rate,
        metavar="P",
        help="probability that a device or service gets one anomaly episode (default: %(default)s)",
    )
    a(
        "--sim-rate",
        type=int_within(0, MAX_RATE),
        default=0,
        metavar="R",
        help="with --rate 0: events per simulated second, e.g. a sparse day produced in "
        "seconds (default: 1000)",
    )
    a(
        "--anomaly-after",
        type=int_within(0, MAX_DURATION_S),
        default=s.anomaly_after_s,
        metavar="S",
        help="no anomaly episode starts in the first S seconds of the run, so that detectors "
        "have learned what is normal (default: %(default)s)",
    )
    a(
        "--bad-rate",
        type=fraction,
        default=s.bad_rate,
        metavar="F",
        help="fraction of malformed records (default: %(default)s)",
    )
    a(
        "--late-rate",
        type=fraction,
        default=s.late_rate,
        metavar="F",
        help="fraction of valid events delivered with an earlier event time (default: %(default)s)",
    )
    a(
        "--applog-share",
        type=fraction,
        default=s.applog_share,
        metavar="F",
        help="fraction of events that are application logs (default: %(default)s)",
    )
    a(
        "--start-ms",
        type=int_within(0, LATEST_MS),
        default=None,
        metavar="MS",
        help="sim-clock start, epoch ms (default: now; with --rate 0: now - duration)",
    )
    a(
        "--truth",
        type=new_file,
        default=None,
        metavar="FILE",
        help="write the expected aggregates here",
    )
    a(
        "--output",
        type=new_file,
        default=None,
        metavar="FILE.jsonl",
        help="write records to this JSONL file instead of Kafka",
    )
    a("--bootstrap", type=servers, default=None, metavar="HOST:PORT",
      help="Kafka bootstrap servers (default: PULSE_KAFKA_BOOTSTRAP)")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """Run ``pulse loadgen``; returns the exit status."""
    import asyncio

    from loadgen.generator import GenConfig

    settings = LoadgenSettings()
    kafka = KafkaSettings()
    worker = EventTimeSettings()  # the worker's bounds, from PULSE_WORKER_*
    if None not in (args.truth, args.output) and args.truth.resolve() == args.output.resolve():
        print("pulse loadgen: --truth and --output name the same file.", file=sys.stderr)
        return 2
    if args.anomaly_after >= args.duration:
        print(
            f"pulse loadgen: --anomaly-after ({args.anomaly_after}) must be shorter than "
            f"--duration ({args.duration}).",
            file=sys.stderr,
        )
        return 2
    if args.bootstrap:
        kafka = kafka.model_copy(update={"bootstrap": args.bootstrap})
    now_ms = int(time.time()) * 1000
    start_ms = args.start_ms
    if start_ms is None:
        # unpaced runs end "now", so that no event is ahead of the worker's clock-skew bound
        start_ms = now_ms - args.duration * 1000 if args.rate == 0 else now_ms
    try:
        config = GenConfig(
            seed=args.seed,
            start_ms=start_ms,
            rate=args.rate,
            duration_s=args.duration,
            devices=args.devices,
            services=args.services,
            anomaly_rate=args.anomaly_rate,
            anomaly_after_s=args.anomaly_after,
            sim_rate=args.sim_rate,
            bad_rate=args.bad_rate,
            late_rate=args.late_rate,
            applog_share=args.applog_share,
            sensor_partitions=kafka.partitions,
            applog_partitions=kafka.partitions,
            sensor_topic=kafka.sensor_topic,
            applog_topic=kafka.applog_topic,
        )
    except ValueError as exc:
        print(f"pulse loadgen: {exc}.", file=sys.stderr)
        return 2
    warning = _bounds_warning(config, now_ms, worker.max_event_age_s, worker.max_clock_skew_s)
    if warning:
        print(f"pulse loadgen: warning: {warning}", file=sys.stderr)
    lateness_ms = round(worker.allowed_lateness_s * 1000)
    try:
        return asyncio.run(_main(args, config, kafka, settings, lateness_ms))
    except (RuntimeError, OSError) as exc:
        print(f"pulse loadgen: {one_line(exc)}.", file=sys.stderr)
        return 1


def _bounds_warning(config: GenConfig, now_ms: int, max_age_s: float, skew_s: float) -> str | None:
    """Why the worker would drop this run's events as too old or too far ahead, if it would."""
    last_ms = config.end_ms if config.rate == 0 else config.start_ms
    if config.start_ms < now_ms - max_age_s * 1000:
        return "the sim clock starts more than max_event_age_s ago: the worker will drop the events"
    if last_ms > now_ms + skew_s * 1000:
        return (
            "event times run ahead of now by more than max_clock_skew_s: the worker will drop them"
        )
    return None


async def _main(
    args: argparse.Namespace,
    config: GenConfig,
    kafka: KafkaSettings,
    settings: LoadgenSettings,
    lateness_ms: int,
) -> int:
    import dataclasses

    from loadgen.generator import Generator
    from loadgen.producer import (
        JsonlSink,
        KafkaSink,
        Sink,
        make_producer,
        run_load,
        topic_partitions,
    )
    from loadgen.truth import TruthBuilder
    from schemas.kafka_probe import client_log_muted, tls_mismatch

    sink: Sink
    out = None
    if args.output is not None:
        out = args.output.open("wb")
        sink = JsonlSink(out)
    else:
        producer = make_producer(kafka.bootstrap, kafka.client_kwargs())
        try:
            with client_log_muted():  # its failure is our one sentence, not a log line
                await producer.start()
                topics = [config.sensor_topic, config.applog_topic]
                counts = await topic_partitions(producer, topics)
        except Exception as exc:  # aiokafka's connection and metadata errors
            await producer.stop()
            mismatch = tls_mismatch(kafka)  # reported by aiokafka as a broker that is down
            raise RuntimeError(mismatch or f"cannot use Kafka at {kafka.bootstrap}: {exc}") from exc
        except BaseException:
            await producer.stop()
            raise
        config = dataclasses.replace(
            config,
            sensor_partitions=counts[config.sensor_topic],
            applog_partitions=counts[config.applog_topic],
        )
        sink = KafkaSink(producer, settings.max_pending)
    gen = Generator(config)
    truth = (
        TruthBuilder(config, gen.fleet, gen.episodes, lateness_ms)
        if args.truth is not None
        else None
    )
    tty = sys.stderr.isatty()
    try:
        progress = await run_load(
            gen,
            sink,
            rate=config.rate,
            total=config.total,
            sensor_topic=config.sensor_topic,
            on_chunk=truth.add if truth is not None else None,
            on_progress=lambda p: _status(p, tty),
            progress_interval_s=settings.progress_interval_s,
        )
    finally:
        if out is not None:
            out.close()
    if tty:
        sys.stderr.write("\n")
    if truth is not None:
        truth.write(args.truth)
    where = str(args.output) if args.output is not None else f"Kafka at {kafka.bootstrap}"
    print(
        f"pulse loadgen: sent {progress.sent:,} records to {where} "
        f"(sensor {progress.sensor:,}, applog {progress.applog:,}) in {progress.elapsed:.1f} s, "
        f"{progress.rate:,.0f} rec/s; bad {progress.bad:,}, late {progress.late:,}"
        + (f"; truth in {args.truth}" if args.truth is not None else "")
    )
    return 0


def _status(p: Progress, tty: bool) -> None:
    line = (
        f"pulse loadgen: {p.sent:,}/{p.total:,} records ({100 * p.sent / max(1, p.total):.0f}%), "
        f"{p.rate:,.0f} rec/s, bad {p.bad:,}, late {p.late:,}"
    )
    sys.stderr.write(f"\r{line}\x1b[K" if tty else f"{line}\n")
    sys.stderr.flush()
