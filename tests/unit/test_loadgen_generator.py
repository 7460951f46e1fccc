"""The event simulation: determinism, realism constraints and injection rates."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import orjson
import pytest
from pydantic import ValidationError

from loadgen.generator import CHUNK, GenConfig, Generator, build_fleet, plan_anomalies
from loadgen.partitioning import partition_for
from schemas.events import AppLogEvent, SensorReading

START = 1_700_000_000_000
BASE = GenConfig(
    seed=3, start_ms=START, rate=1000, duration_s=20, devices=40, services=4, anomaly_rate=0.3
)


def records(config: GenConfig) -> list[tuple[str, int, bytes, bytes]]:
    return [tuple(r) for c in Generator(config) for r in c.records]  # type: ignore[misc]


def test_same_seed_and_start_give_identical_records_and_other_seeds_differ() -> None:
    cfg = dataclasses.replace(BASE, bad_rate=0.05, late_rate=0.05)
    first = records(cfg)
    assert first == records(cfg)
    assert len(first) == 20_000
    other = records(dataclasses.replace(cfg, seed=4))
    assert sum(a != b for a, b in zip(first, other, strict=True)) > 19_000
    shifted = records(dataclasses.replace(cfg, start_ms=START + 1000))
    assert first != shifted


def test_chunks_do_not_depend_on_what_was_generated_before() -> None:
    gen = Generator(dataclasses.replace(BASE, rate=10_000, duration_s=2))
    assert gen.chunks_total == 3
    late = gen.chunk(2).records
    assert late == Generator(gen.config).chunk(2).records
    assert len(late) == 20_000 - 2 * CHUNK


def test_event_times_follow_the_sim_clock_and_records_are_valid() -> None:
    cfg = dataclasses.replace(BASE, rate=400, duration_s=10)
    rows = [r for c in Generator(cfg) for r in c.records]
    times = []
    route = re.compile(r"^/[A-Za-z0-9_.\-/{}]*$")
    for i, rec in enumerate(rows):
        if rec.topic == cfg.sensor_topic:
            ev: SensorReading | AppLogEvent = SensorReading.model_validate_json(rec.value)
            assert isinstance(ev, SensorReading)
            assert rec.key == ev.device_id.encode()
            assert re.fullmatch(r"dev-\d{4}", ev.device_id)
            assert re.fullmatch(r"site-[a-z]+-\d+", ev.site)
            assert rec.partition == partition_for(rec.key, cfg.sensor_partitions)
        else:
            ev = AppLogEvent.model_validate_json(rec.value)
            assert isinstance(ev, AppLogEvent)
            assert rec.key == ev.trace_id.encode()
            assert route.match(ev.route)
            assert rec.partition == partition_for(rec.key, cfg.applog_partitions)
            expected = "ERROR" if ev.status_code >= 500 else None
            if expected:
                assert ev.level == expected
            elif ev.status_code >= 400:
                assert ev.level == "WARN"
        times.append(ev.event_time)
        assert ev.event_time == START + (i * 1000) // 400
    assert times[-1] == START + 9_997


def test_sensor_values_are_plausible_and_follow_a_daily_cycle() -> None:
    cfg = dataclasses.replace(BASE, anomaly_rate=0.0, rate=50, duration_s=86_400 // 4 * 4)
    gen = Generator(cfg)
    # sample every 24th chunk over the day (one chunk ~ 164 s of sim time)
    temps: dict[int, list[float]] = {}
    for n in range(0, gen.chunks_total, 24):
        for rec in gen.chunk(n).records:
            if rec.topic == cfg.sensor_topic:
                ev = orjson.loads(rec.value)
                if ev["metric"] == "temperature":
                    assert -40 <= ev["value"] <= 85
                    hour = (ev["event_time"] // 3_600_000) % 24
                    temps.setdefault(ev["device_id"], []).append(ev["value"])
                    assert ev["unit"] == "°C" and hour >= 0
    spreads = [max(v) - min(v) for v in temps.values() if len(v) > 20]
    assert spreads and np.median(spreads) > 3.0  # a daily swing, not just noise (sd 0.3)


def test_injection_rates_roughly_as_asked() -> None:
    cfg = dataclasses.replace(
        BASE, rate=5000, duration_s=10, bad_rate=0.1, late_rate=0.2, applog_share=0.4
    )
    chunks = list(Generator(cfg))
    total = sum(len(c.records) for c in chunks)
    bad = sum(c.bad for c in chunks)
    late = sum(c.late_injected for c in chunks)
    applog = sum(1 for c in chunks for r in c.records if r.topic == cfg.applog_topic)
    assert total == 50_000
    assert bad / total == pytest.approx(0.1, abs=0.01)
    assert late / (total - bad) == pytest.approx(0.2, abs=0.01)
    assert applog / total == pytest.approx(0.4, abs=0.01)
    invalid = 0
    for c in chunks:
        for r in c.records:
            model = SensorReading if r.topic == cfg.sensor_topic else AppLogEvent
            try:
                model.model_validate_json(r.value)
            except ValidationError:
                invalid += 1
    # all but the two time-bound kinds are schema violations
    assert 0.7 * bad < invalid < bad


def test_anomaly_episodes_per_entity_and_visible_in_the_data() -> None:
    cfg = dataclasses.replace(BASE, devices=400, services=40, anomaly_rate=0.25, duration_s=120)
    fleet = build_fleet(cfg.seed, cfg.devices, cfg.services)
    eps = plan_anomalies(cfg, fleet)
    sensor = [e for e in eps if e.type == "sensor"]
    applog = [e for e in eps if e.type == "applog"]
    assert 60 < len(sensor) < 140 and 3 <= len(applog) <= 20
    assert len({e.entity.split("|")[0] for e in sensor}) == len(sensor)  # one per device
    for e in eps:
        assert cfg.start_ms <= e.start_ms < e.end_ms <= cfg.end_ms
        assert 2_000 <= e.end_ms - e.start_ms <= 60_000
    assert {e.kind for e in sensor} == {"spike", "drift", "stuck"}
    assert {e.kind for e in applog} <= {"latency_storm", "error_burst"}

    # stuck sensors repeat one value; error bursts are mostly 5xx
    stuck = next(e for e in sensor if e.kind == "stuck")
    seen: list[float] = []
    bursts = {e.entity: e for e in applog if e.kind == "error_burst"}
    in_burst = errors = 0
    for c in Generator(cfg):
        for r in c.records:
            ev = orjson.loads(r.value)
            t = ev["event_time"]
            if "device_id" in ev and f"{ev['device_id']}|{ev['metric']}" == stuck.entity:
                if stuck.start_ms <= t < stuck.end_ms:
                    seen.append(ev["value"])
            elif ev.get("service") in bursts:
                b = bursts[ev["service"]]
                if b.start_ms <= t < b.end_ms:
                    in_burst += 1
                    errors += ev["level"] == "ERROR"
    assert len(seen) >= 2 and len(set(seen)) == 1
    if bursts:
        assert errors / in_burst > 0.5


def test_invalid_config_is_rejected() -> None:
    with pytest.raises(ValueError, match="bad_rate"):
        dataclasses.replace(BASE, bad_rate=1.5)
    with pytest.raises(ValueError, match="rate"):
        dataclasses.replace(BASE, rate=-1)


def test_unpaced_runs_use_the_nominal_clock() -> None:
    cfg = dataclasses.replace(BASE, rate=0, duration_s=3)
    assert cfg.total == 3000
    last = orjson.loads(next(iter(Generator(cfg))).records[-1].value)
    assert last["event_time"] == START + 2999
