"""The Quix Streams baseline: the sensor topic through a Quix Streams 3.x app into the store.

``python -m pulse_bench.quix_app --group G --state-dir DIR [--commit-interval S]``, configured by
``PULSE_KAFKA_*`` and ``PULSE_STORE_*`` like a worker. Per message key (the device), a 1-minute
tumbling window of the reading's count, sum, min and max, on event time with 30 s of grace (Pulse's
allowed lateness), emitted on every update (``.current()``: the store shows open windows, as
Pulse's does) and written by Quix's ``RedisSink`` (one ``SET`` per update, one ``MULTI`` per
partition and checkpoint) to the bench's store db. Processing is at-least-once, Quix's default:
offsets are committed after the sink has flushed. Window state lives in RocksDB under
``--state-dir`` with Quix's changelog topics, as by default. A record that is not a JSON object
with a numeric ``value`` and an integer ``event_time`` is passed over (its offset still counts).
Needs the ``quix`` extra of pulse-bench (``quixstreams``).
"""

from __future__ import annotations

import argparse
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from schemas.settings import KafkaSettings, StoreSettings, store_client

if TYPE_CHECKING:
    from quixstreams import Application

WINDOW = timedelta(minutes=1)
GRACE = timedelta(seconds=30)


def decode(value: bytes) -> Any:
    """The JSON value of a record, or None when it is not JSON (the filter drops it)."""
    try:
        return orjson.loads(value)
    except orjson.JSONDecodeError:
        return None


def valid(value: Any) -> bool:
    """Whether a decoded record is a reading the window can aggregate."""
    if not isinstance(value, dict):
        return False
    reading, at = value.get("value"), value.get("event_time")
    return (
        isinstance(reading, int | float)
        and not isinstance(reading, bool)
        and reading == reading  # not NaN
        and abs(reading) != float("inf")
        and isinstance(at, int)
        and not isinstance(at, bool)
    )


def event_time(value: Any, headers: Any, timestamp: int, timestamp_type: Any) -> int:
    """The window clock: the reading's event time (the broker's timestamp for invalid records)."""
    return int(value["event_time"]) if valid(value) else timestamp


def window_key(key: Any, value: Any) -> bytes:
    """Store key of one window instance: ``quix:1m:<message key>:<window start ms>``."""
    raw = key if isinstance(key, bytes) else str(key).encode()
    return b"quix:1m:" + raw + b":" + str(value["start"]).encode()


def quiet_late(
    value: Any,
    key: Any,
    timestamp_ms: int,
    late_by_ms: int,
    start: int,
    end: int,
    store_name: str,
    topic: str,
    partition: int,
    offset: int,
) -> bool:
    """``on_late`` callback: drop a too-late record without a log line per record."""
    return False


def build_app(
    kafka: KafkaSettings,
    store: StoreSettings,
    group: str,
    state_dir: Path,
    commit_interval_s: float,
) -> Application:
    """The Quix app draining ``kafka.sensor_topic`` into ``store``."""
    from quixstreams import Application
    from quixstreams.dataframe.windows import Count, Max, Min, Sum
    from quixstreams.models import Deserializer
    from quixstreams.sinks.community.redis import RedisSink

    class LenientJSON(Deserializer):
        """JSON values; undecodable ones become None instead of stopping the app."""

        def __init__(self) -> None:  # the base class's takes and keeps nothing
            pass

        def __call__(self, value: bytes, ctx: Any) -> Any:
            return decode(value)

    class StoreSink(RedisSink):
        """Quix's RedisSink, with its client from the project's store-client factory."""

        def __init__(self) -> None:
            super().__init__(
                host=store.host, port=store.port, db=store.db, key_serializer=window_key
            )

        def setup(self) -> None:
            self._client = store_client(store, timeout_s=30.0)
            self._client.info()

    app = Application(
        broker_address=kafka.bootstrap,
        consumer_group=group,
        auto_offset_reset="earliest",
        commit_interval=commit_interval_s,
        state_dir=state_dir,
        loglevel="WARNING",
    )
    topic = app.topic(
        kafka.sensor_topic, value_deserializer=LenientJSON(), timestamp_extractor=event_time
    )
    readings = app.dataframe(topic).filter(valid)
    window = readings.tumbling_window(WINDOW, grace_ms=GRACE, on_late=quiet_late).agg(
        count=Count(), sum=Sum("value"), min=Min("value"), max=Max("value")
    )
    window.current().sink(StoreSink())
    return app


def main(argv: list[str] | None = None) -> int:
    """Run the app until SIGTERM or SIGINT (Quix stops gracefully on either)."""
    parser = argparse.ArgumentParser(prog="python -m pulse_bench.quix_app")
    parser.add_argument("--group", required=True, help="consumer group (fresh per run)")
    parser.add_argument("--state-dir", type=Path, required=True, help="RocksDB state directory")
    parser.add_argument("--commit-interval", type=float, default=5.0, help="seconds (5)")
    args = parser.parse_args(argv)
    app = build_app(
        KafkaSettings(), StoreSettings(), args.group, args.state_dir, args.commit_interval
    )
    app.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
