"""Event builders and Hypothesis strategies shared by the aggregation and window-state tests."""

from __future__ import annotations

from hypothesis import HealthCheck
from hypothesis import strategies as st

from schemas.events import AppLogEvent, LogLevel, SensorReading

# Examples are checked, never timed: a loaded machine must not fail a test (no deadline, and
# no health check that times data generation).
NOT_TIMED = [HealthCheck.too_slow]


def sensor_readings(
    devices: int = 3, max_time_ms: int = 300_000, values: st.SearchStrategy[float] | None = None
) -> st.SearchStrategy[SensorReading]:
    """Sensor readings from a few devices, sites and metrics within ``max_time_ms``."""
    return st.builds(
        SensorReading,
        device_id=st.sampled_from([f"d{i + 1}" for i in range(devices)]),
        site=st.sampled_from(["s1", "s2"]),
        event_time=st.integers(min_value=0, max_value=max_time_ms),
        metric=st.sampled_from(["temp", "hum"]),
        value=st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)
        if values is None
        else values,
        unit=st.just("C"),
        lat=st.just(1.0),
        lon=st.just(2.0),
        firmware=st.just("1.0"),
    )


applog_events = st.builds(
    AppLogEvent,
    service=st.sampled_from(["api", "web"]),
    route=st.sampled_from(["/a", "/b/{id}"]),
    event_time=st.integers(min_value=0, max_value=300_000),
    level=st.sampled_from([LogLevel.INFO, LogLevel.ERROR]),
    status_code=st.sampled_from([200, 201, 302, 404, 500, 503]),
    latency_ms=st.floats(min_value=0, max_value=1e5, allow_nan=False),
    trace_id=st.just("t1"),
)


def reading(event_time: int, device: str = "d1", value: float = 1.0) -> SensorReading:
    """One temperature reading of ``device`` at site s1."""
    return SensorReading(
        device_id=device, site="s1", event_time=event_time, metric="temp", value=value,
        unit="C", lat=0.0, lon=0.0, firmware="1",
    )  # fmt: skip
