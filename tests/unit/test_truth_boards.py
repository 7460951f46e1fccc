"""The truth's expected leaderboards: per partition and 1m window instance, from on-time events
only; counts, maxima and p99 (numpy.quantile, method="lower") recomputed here by brute force."""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Any

import numpy as np
import pytest

from loadgen.generator import METRICS, Generator
from loadgen.truth import TruthBuilder, late_mask
from schemas import keys
from tests.unit.test_loadgen_truth import CFG, S, hand_truth


def test_hand_made_boards() -> None:
    truth, (ea, eb), route = hand_truth()
    dev_a, metric_a = ea.split("|")
    dev_b, metric_b = eb.split("|")
    sensor = truth["boards"]["sensor"]
    assert sorted(sensor) == ["0", "1"]
    # partition 0: a's values 1, 2, 4 in minute S (10 at S+20s is late), 3 in minute S+1
    assert sensor["0"][str(S)][f"device.max.{metric_a}"] == {dev_a: 4.0}
    assert sensor["0"][str(S + 60_000)][f"device.max.{metric_a}"] == {dev_a: 3.0}
    assert list(sensor["0"][str(S)]["site.events"].values()) == [3]
    assert sensor["1"][str(S)][f"device.max.{metric_b}"] == {dev_b: 7.0}
    applog = truth["boards"]["applog"]
    assert list(applog) == ["1"]  # every application-log event is on partition 1
    b = applog["1"][str(S)]
    service = route.split("|")[0]
    assert b["service.requests"] == {service: 3} and b["service.errors"] == {service: 1}
    assert b["service.p99"] == {service: 20.0}  # lower p99 of 10, 20, 30
    assert b["route.requests"][route] == 2 and b["route.errors"][route] == 0
    assert b["route.p99"][route] == 10.0  # lower p99 of 10, 20
    # only the value boards: the anomaly boards are the worker's (checked against records)
    names = {n for p in truth["boards"].values() for s in p.values() for i in s.values() for n in i}
    assert keys.Board.DEVICE_ANOMALIES not in names and keys.Board.SERVICE_ANOMALIES not in names


@pytest.fixture(scope="module")
def generated() -> tuple[dict[str, Any], Generator, list[Any]]:
    """A generated run (late and bad events included), its truth and its chunks."""
    cfg = dataclasses.replace(CFG, rate=1000, duration_s=150, late_rate=0.05, bad_rate=0.01)
    gen = Generator(cfg)
    tb = TruthBuilder(cfg, gen.fleet, gen.episodes, 30_000)
    chunks = []
    for chunk in gen:
        tb.add(chunk)
        chunks.append(chunk)
    return tb.to_dict(), gen, chunks


def _cols(chunks: list[Any], kind: str, names: tuple[str, ...]) -> list[np.ndarray]:
    return [np.concatenate([getattr(getattr(c, kind), n) for c in chunks]) for n in names]


def test_generated_boards_match_a_brute_force_recount(
    generated: tuple[dict[str, Any], Generator, list[Any]],
) -> None:
    truth, gen, chunks = generated
    f = gen.fleet
    minute = keys.WINDOW_1M.size_ms

    part, t, series, value = _cols(chunks, "sensor", ("partition", "event_time", "series", "value"))
    ok = ~late_mask(part, t, 30_000)
    want: dict[Any, Any] = defaultdict(lambda: defaultdict(dict))
    for p, s in {(int(a), int(b)) for a, b in zip(part[ok], t[ok] - t[ok] % minute, strict=True)}:
        sel = ok & (part == p) & (t - t % minute == s)
        at = want[(str(p), str(s))]
        sites = f.device_site[f.series_device[series[sel]]]
        at["site.events"] = {f.sites[c]: int((sites == c).sum()) for c in np.unique(sites)}
        for m, spec in enumerate(METRICS):
            of_metric = sel & (f.series_metric[series] == m)
            devs = f.series_device[series[of_metric]]
            if devs.size:
                at[f"device.max.{spec.name}"] = {
                    f.device_ids[d]: float(value[of_metric][devs == d].max())
                    for d in np.unique(devs)
                }
    got = {(p, s): b for p, starts in truth["boards"]["sensor"].items() for s, b in starts.items()}
    assert got == {k: dict(v) for k, v in want.items()}

    part, t, route, lat, err = _cols(
        chunks, "applog", ("partition", "event_time", "route", "latency", "error")
    )
    ok = ~late_mask(part, t, 30_000)
    checked = 0
    for p, starts in truth["boards"]["applog"].items():
        for s, b in starts.items():
            sel = ok & (part == int(p)) & (t - t % minute == int(s))
            assert sum(b["service.requests"].values()) == sel.sum() > 0
            for r in np.unique(route[sel]):
                name = f.route_entity(int(r))
                of = sel & (route == r)
                assert b["route.requests"][name] == of.sum()
                assert b["route.errors"][name] == err[of].sum()
                assert b["route.p99"][name] == np.quantile(lat[of], 0.99, method="lower")
                checked += 1
            for c in np.unique(f.route_service[route[sel]]):
                of = sel & (f.route_service[route] == c)
                name = f.services[int(c)]
                assert b["service.requests"][name] == of.sum()
                assert b["service.errors"][name] == err[of].sum()
                assert b["service.p99"][name] == np.quantile(lat[of], 0.99, method="lower")
    assert checked > 10


def test_boards_add_up_to_the_windows(
    generated: tuple[dict[str, Any], Generator, list[Any]],
) -> None:
    truth, _, _ = generated
    windows = truth["windows"]
    for s, sites in windows["sensor"]["1m"]["site"].items():
        per_site: dict[str, int] = defaultdict(int)
        for ent, stats in sites.items():
            per_site[ent.split("|")[0]] += stats["n"]
        summed: dict[str, int] = defaultdict(int)
        for starts in truth["boards"]["sensor"].values():
            for site, n in starts.get(s, {}).get("site.events", {}).items():
                summed[site] += n
        assert summed == per_site
    for s, services in windows["applog"]["1m"]["service"].items():
        for svc, stats in services.items():
            parts = [st[s] for st in truth["boards"]["applog"].values() if s in st]
            assert sum(b["service.requests"].get(svc, 0) for b in parts) == stats["n"]
            assert sum(b["service.errors"].get(svc, 0) for b in parts) == stats["err"]
            # a partition's p99 is one of the service's latencies in the minute
            p99s = [b["service.p99"][svc] for b in parts if svc in b["service.p99"]]
            assert stats["min"] <= min(p99s) <= max(p99s) <= stats["max"]
