"""The truth computation: lateness per partition, dead letters, windows and statistics."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest

from loadgen.generator import (
    METRICS,
    AppLogColumns,
    Chunk,
    GenConfig,
    Generator,
    SensorColumns,
    build_fleet,
)
from loadgen.truth import TruthBuilder, group_stats, late_mask
from schemas.events import EventKind

S = 1_700_000_040_000  # a minute boundary
CFG = GenConfig(
    seed=0, start_ms=S, rate=1000, duration_s=60, devices=12, services=2,
    sensor_partitions=2, applog_partitions=2,
)  # fmt: skip


def i64(*v: int) -> np.ndarray:
    return np.array(v, dtype=np.int64)


def f64(*v: float) -> np.ndarray:
    return np.array(v, dtype=np.float64)


def hand_truth() -> tuple[dict[str, Any], list[str], str]:
    fleet = build_fleet(CFG.seed, CFG.devices, CFG.services)
    # two series on different devices with different metrics
    a = 0
    b = next(
        s
        for s in range(len(fleet.series_device))
        if fleet.series_device[s] != fleet.series_device[a]
        and fleet.series_metric[s] != fleet.series_metric[a]
    )
    sensor = SensorColumns(
        partition=i64(0, 0, 1, 0, 0, 0),
        event_time=i64(S + 1000, S + 5000, S + 500, S + 65_000, S + 20_000, S + 40_000),
        series=i64(a, a, b, a, a, a),
        value=f64(1, 2, 7, 3, 10, 4),
    )  # S+20s on partition 0 comes after S+65s: 20 s < 65 s - 30 s, late
    r0 = int(fleet.service_route_offset[0])
    applog = AppLogColumns(
        partition=i64(1, 1, 1),
        event_time=i64(S + 100, S + 200, S + 9_999),
        route=i64(r0, r0, r0 + 1),
        latency=f64(10, 20, 30),
        status=i64(200, 404, 503),
        error=np.array([False, False, True]),
    )
    dead = {EventKind.SENSOR: i64(0, 2), EventKind.APPLOG: i64(1, 0)}
    tb = TruthBuilder(CFG, fleet, [], 30_000)
    tb.add(Chunk(first=0, records=[], sensor=sensor, applog=applog, dead=dead))
    names = [fleet.series_entity(a), fleet.series_entity(b)]
    return tb.to_dict(), names, fleet.route_entity(r0)


def test_counts_per_partition_with_late_and_dead() -> None:
    truth, _, _ = hand_truth()
    assert truth["per_partition"]["sensor"] == {
        "0": {"produced": 5, "events": 4, "late": 1, "dead": 0},
        "1": {"produced": 3, "events": 1, "late": 0, "dead": 2},
    }
    assert truth["produced"] == {"sensor": 8, "applog": 4}
    assert truth["events"] == {"sensor": 5, "applog": 3}
    assert truth["late"] == {"sensor": 1, "applog": 0}
    assert truth["dead"] == {"sensor": 2, "applog": 1}
    assert truth["allowed_lateness_ms"] == 30_000
    assert truth["partitions"] == {"sensor": 2, "applog": 2}


def test_tumbling_windows_and_stats() -> None:
    truth, (ea, eb), _ = hand_truth()
    dev10 = truth["windows"]["sensor"]["10s"]["device"]
    assert sorted(dev10) == [str(S), str(S + 40_000), str(S + 60_000)]
    st = dev10[str(S)][ea]
    assert st == {
        "n": 2, "sum": 3.0, "min": 1.0, "max": 2.0, "mean": 1.5, "std": 0.5,
        "p50": 1.0, "p90": 1.0, "p95": 1.0, "p99": 1.0,
    }  # fmt: skip
    assert dev10[str(S)][eb]["n"] == 1
    m1 = truth["windows"]["sensor"]["1m"]["device"][str(S)][ea]
    assert (m1["n"], m1["sum"], m1["p50"], m1["p99"]) == (3, 7.0, 2.0, 2.0)
    assert m1["std"] == pytest.approx(np.std([1, 2, 4]))
    # the late value (10) is in no window
    for dims in truth["windows"]["sensor"].values():
        for instances in dims.values():
            for stats in instances.values():
                assert all(s["max"] != 10.0 for s in stats.values())


def test_hopping_windows_contain_each_event_five_times() -> None:
    truth, (ea, _), _ = hand_truth()
    hop = truth["windows"]["sensor"]["5m/1m"]["device"]
    starts = [S + k * 60_000 for k in range(-4, 2)]
    assert sorted(hop, key=int) == [str(s) for s in starts]
    assert [hop[str(s)][ea]["n"] for s in starts] == [3, 4, 4, 4, 4, 1]
    # S+65 s falls in the instances starting S-3 min .. S+1 min
    assert hop[str(S + 60_000)][ea]["sum"] == 3.0


def test_applog_stats_carry_status_classes_and_errors() -> None:
    truth, _, route = hand_truth()
    fleet10 = truth["windows"]["applog"]["10s"]["fleet"][str(S)]["all"]
    assert fleet10["n"] == 3
    assert [fleet10[c] for c in ("1xx", "2xx", "3xx", "4xx", "5xx", "err")] == [0, 1, 0, 1, 1, 1]
    assert fleet10["p50"] == 20.0
    per_route = truth["windows"]["applog"]["10s"]["route"][str(S)]
    assert per_route[route]["n"] == 2 and per_route[route]["5xx"] == 0
    assert set(truth["windows"]["applog"]["1m"]) == {"route", "service", "fleet"}


def test_late_mask_is_per_partition() -> None:
    late = late_mask(i64(0, 1, 0, 1, 0), i64(100_000, 0, 50_000, 80_000, 69_999), 30_000)
    assert late.tolist() == [False, False, True, False, True]


def test_group_stats_match_numpy() -> None:
    rng = np.random.default_rng(5)
    ent = rng.integers(0, 30, 2000)
    vals = np.round(rng.lognormal(3, 1, 2000), 1)  # rounding makes ties
    stats = group_stats(ent, vals)
    for e, s in stats.items():
        v = vals[ent == e]
        assert s["n"] == len(v)
        assert s["sum"] == pytest.approx(v.sum())
        assert s["std"] == pytest.approx(v.std())
        assert (s["min"], s["max"]) == (v.min(), v.max())
        for name, q in (("p50", 0.5), ("p90", 0.9), ("p95", 0.95), ("p99", 0.99)):
            assert s[name] == np.quantile(v, q, method="lower")


def test_generated_run_is_self_consistent() -> None:
    cfg = dataclasses.replace(
        CFG, rate=2000, duration_s=150, bad_rate=0.02, late_rate=0.05, anomaly_rate=0.5
    )
    gen = Generator(cfg)
    tb = TruthBuilder(cfg, gen.fleet, gen.episodes, 30_000)
    produced: dict[tuple[str, int], int] = {}
    for chunk in gen:
        tb.add(chunk)
        for r in chunk.records:
            produced[(r.topic, r.partition)] = produced.get((r.topic, r.partition), 0) + 1
    truth = tb.to_dict()
    for kind, topic in (("sensor", cfg.sensor_topic), ("applog", cfg.applog_topic)):
        for p, row in truth["per_partition"][kind].items():
            assert row["produced"] == produced[(topic, int(p))]
            assert row["produced"] == row["events"] + row["late"] + row["dead"]
        assert truth["late"][kind] > 0 and truth["dead"][kind] > 0
        windows = truth["windows"][kind]
        for dims in windows.values():
            for instances in dims.values():
                total = sum(s["n"] for stats in instances.values() for s in stats.values())
                if dims is windows["5m/1m"]:
                    assert total == 5 * truth["events"][kind]
                else:
                    assert total == truth["events"][kind]
        # a hopping instance is the merge of its five 1m panes
        dim = "metric" if kind == "sensor" else "service"
        panes = windows["1m"][dim]
        for start, stats in windows["5m/1m"][dim].items():
            for ent, s in stats.items():
                parts = [
                    panes[str(int(start) + k * 60_000)][ent]
                    for k in range(5)
                    if ent in panes.get(str(int(start) + k * 60_000), {})
                ]
                assert s["n"] == sum(p["n"] for p in parts)
                assert s["sum"] == pytest.approx(sum(p["sum"] for p in parts))
                assert s["max"] == max(p["max"] for p in parts)
                assert s["min"] == min(p["min"] for p in parts)
    assert truth["anomalies"] and set(truth["anomalies"][0]) == {
        "type", "kind", "entity", "start_ms", "end_ms", "events",
    }  # fmt: skip
    assert {m.name for m in METRICS} >= set(truth["windows"]["sensor"]["1m"]["metric"][str(S)])


def test_each_episode_counts_the_on_time_events_it_changed() -> None:
    """An episode's ``events`` are its target's valid, on-time events within it (a short spike
    of a series read every few seconds may change none: no detector can see it)."""
    cfg = dataclasses.replace(
        CFG,
        rate=40,
        duration_s=1200,
        devices=40,
        bad_rate=0.02,
        late_rate=0.05,
        anomaly_rate=1.0,
    )
    gen = Generator(cfg)
    tb = TruthBuilder(cfg, gen.fleet, gen.episodes, 30_000)
    chunks = list(gen)
    for chunk in chunks:
        tb.add(chunk)
    truth = tb.to_dict()
    s_part = np.concatenate([c.sensor.partition for c in chunks])
    s_t = np.concatenate([c.sensor.event_time for c in chunks])
    s_target = np.concatenate([c.sensor.series for c in chunks])
    a_part = np.concatenate([c.applog.partition for c in chunks])
    a_t = np.concatenate([c.applog.event_time for c in chunks])
    a_target = gen.fleet.route_service[np.concatenate([c.applog.route for c in chunks])]
    cols = {"sensor": (s_part, s_t, s_target), "applog": (a_part, a_t, a_target)}
    counts = [e["events"] for e in truth["anomalies"]]
    for ep, n in zip(gen.episodes, counts, strict=True):
        part, t, target = cols[ep.type.value]
        on_time = ~late_mask(part, t, 30_000)
        brute = on_time & (target == ep.target) & (t >= ep.start_ms) & (t < ep.end_ms)
        assert n == int(brute.sum())
    assert any(n > 0 for n in counts) and any(n == 0 for n in counts)
