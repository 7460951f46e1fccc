"""Every kind of malformed record is rejected by the schema or lies outside the worker's bounds."""

from __future__ import annotations

import dataclasses

import numpy as np
import orjson
import pytest
from pydantic import ValidationError

from loadgen import faults
from loadgen.faults import FaultKind
from loadgen.generator import GenConfig, Generator
from pipeline.settings import WorkerSettings
from schemas.events import AppLogEvent, EventKind, SensorReading

START = 1_700_000_000_000
CFG = GenConfig(seed=11, start_ms=START, rate=1000, duration_s=2, devices=5, services=2)
MODELS: dict[EventKind, type[SensorReading] | type[AppLogEvent]] = {
    EventKind.SENSOR: SensorReading,
    EventKind.APPLOG: AppLogEvent,
}


def valid_events() -> dict[EventKind, dict[str, object]]:
    out: dict[EventKind, dict[str, object]] = {}
    for r in Generator(CFG).chunk(0).records:
        kind = EventKind.SENSOR if r.topic == CFG.sensor_topic else EventKind.APPLOG
        out.setdefault(kind, orjson.loads(r.value))
    return out


def rejection(kind: EventKind, payload: bytes, sim_time_ms: int) -> str | None:
    """Why the worker drops ``payload`` (None: it would be accepted)."""
    try:
        event = MODELS[kind].model_validate_json(payload)
    except ValidationError:
        return "schema"
    w = WorkerSettings()
    # processing happens at about the sim time: rejected at any processing time within an hour
    slack = 3_600_000
    if event.event_time < sim_time_ms - slack - w.max_event_age_s * 1000:
        return "too old"
    if event.event_time > sim_time_ms + slack + w.max_clock_skew_s * 1000:
        return "too far ahead"
    return None


@pytest.mark.parametrize("fault", list(FaultKind))
@pytest.mark.parametrize("kind", [EventKind.SENSOR, EventKind.APPLOG])
def test_each_fault_kind_is_rejected(fault: FaultKind, kind: EventKind) -> None:
    base = valid_events()[kind]
    sim = int(base["event_time"])  # type: ignore[call-overload]
    assert rejection(kind, orjson.dumps(base), sim) is None  # the untouched event is accepted
    rng = np.random.default_rng(1)
    for _ in range(30):
        payload = faults.corrupt(fault, kind, base, sim, rng)
        assert len(payload) < 1_000_000
        reason = rejection(kind, payload, sim)
        assert reason is not None, (fault, payload[:200])
        if fault in (FaultKind.FAR_PAST, FaultKind.FAR_FUTURE):
            assert reason != "schema"


def test_fault_payload_details() -> None:
    base = valid_events()[EventKind.SENSOR]
    rng = np.random.default_rng(2)
    huge = faults.corrupt(FaultKind.HUGE, EventKind.SENSOR, base, START, rng)
    assert 300_000 <= len(huge) < 310_000
    nan = faults.corrupt(FaultKind.NAN, EventKind.SENSOR, base, START, rng)
    assert any(lit in nan for lit in (b":NaN,", b":Infinity,", b":-Infinity,"))
    raw = faults.corrupt(FaultKind.RANDOM_BYTES, EventKind.SENSOR, base, START, rng)
    with pytest.raises(UnicodeDecodeError):
        raw.decode()


def test_bad_records_in_a_run_use_random_keys_and_every_kind_appears() -> None:
    cfg = dataclasses.replace(CFG, rate=5000, duration_s=4, bad_rate=0.2)
    chunks = list(Generator(cfg))
    kinds = {k for c in chunks for k in c.fault_kinds}
    assert kinds == {k.value for k in FaultKind}
    for c in chunks:
        for r in c.records:
            if r.key.startswith(b"bad-"):
                kind = EventKind.SENSOR if r.topic == cfg.sensor_topic else EventKind.APPLOG
                assert rejection(kind, r.value, START) is not None
