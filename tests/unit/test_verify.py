"""``pulse verify``'s checks on an in-memory store: the truth comparison and the store's own sums.

The fake client holds hashes in a dict and answers the calls ``read_store`` makes (SCAN with a
glob pattern, HGETALL, pipelines of HGETALL). Each test starts from a consistent store built
from a few events, then breaks one thing and expects one clear mismatch line naming it.
"""

from __future__ import annotations

import argparse
import fnmatch
import io
from collections.abc import Iterator
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from pipeline import verify
from schemas import keys, packed
from schemas.events import EventKind
from schemas.sketch import bucket_codes, bucket_values

SENSOR, APPLOG = EventKind.SENSOR, EventKind.APPLOG
MIN = keys.WINDOW_1M.size_ms
T0 = 1_790_000_000_000 - 1_790_000_000_000 % MIN


class FakePipeline:
    def __init__(self, store: FakeRedis) -> None:
        self.store = store
        self.queued: list[str] = []

    def hgetall(self, key: str) -> None:
        self.queued.append(key)

    def execute(self) -> list[dict[bytes, bytes]]:
        return [self.store.hgetall(k) for k in self.queued]


class FakeRedis:
    """Hashes only, as a client without ``decode_responses`` returns them (bytes)."""

    def __init__(self) -> None:
        self.hashes: dict[str, dict[str, Any]] = {}

    def scan_iter(self, match: str = "*", count: int = 0) -> Iterator[bytes]:
        return iter([k.encode() for k in self.hashes if fnmatch.fnmatchcase(k, match)])

    def hgetall(self, key: str | bytes) -> dict[bytes, bytes]:
        k = key.decode() if isinstance(key, bytes) else key
        return {
            f.encode(): v if isinstance(v, bytes) else str(v).encode()
            for f, v in self.hashes.get(k, {}).items()
        }

    def pipeline(self, transaction: bool = False) -> FakePipeline:
        return FakePipeline(self)


# one partition of each kind; (event time, entity per dim, value, status, error)
SENSOR_EVENTS = [
    (T0 + 1_000, {"device": "d1|temp", "site": "s1|temp", "metric": "temp"}, 20.5),
    (T0 + 2_000, {"device": "d2|temp", "site": "s1|temp", "metric": "temp"}, 21.25),
    (T0 + 61_000, {"device": "d1|hum", "site": "s1|hum", "metric": "hum"}, 40.0),
]
APPLOG_EVENTS = [
    (T0 + 5_000, {"route": "a|/x", "service": "a", "fleet": "all"}, 3.0, 200, 0),
    (T0 + 6_000, {"route": "a|/y", "service": "a", "fleet": "all"}, 9.0, 503, 1),
]


def build() -> tuple[FakeRedis, dict[str, Any]]:
    """A consistent store and its truth: sensor partition 0, applog partition 1."""
    r = FakeRedis()
    truth: dict[str, Any] = {
        "format": 1,
        "start_ms": T0,
        "end_ms": T0 + 60_000,
        "windows": {"sensor": {}, "applog": {}},
    }
    stored: dict[str, dict[str, list[Any]]] = {}  # agg key -> entity -> values, statuses
    for kind, part, events in ((SENSOR, 0, SENSOR_EVENTS), (APPLOG, 1, APPLOG_EVENTS)):
        for ev in events:
            t, ents = ev[0], ev[1]
            for window in keys.TUMBLING_WINDOWS:
                start = keys.window_start(t, window)
                for dim, ent in ents.items():
                    k = keys.window_key(kind, part, window, dim, start)
                    stored.setdefault(k, {}).setdefault(ent, []).append(ev[2:])
        for k, by_ent in stored.items():
            if f"{{{kind.value}." not in k:
                continue
            _, _, wname, dim, start = keys.parse_window_key(k)
            tw = truth["windows"][kind.value].setdefault(wname, {}).setdefault(dim, {})
            for ent, rows in by_ent.items():
                values = [row[0] for row in rows]
                stats = [len(values), sum(values), sum(v * v for v in values), min(values)]
                stats.append(max(values))
                want = {"n": len(values), "sum": sum(values), "min": min(values)}
                want |= {"max": max(values), "std": _std(values)}
                want |= {f"p{q}": sorted(values)[int((len(values) - 1) * q / 100)] for q in QS}
                if kind is APPLOG:
                    classes = [sum(1 for row in rows if row[1] // 100 == c) for c in range(1, 6)]
                    errors = sum(row[2] for row in rows)
                    stats += [*classes, errors]
                    want |= dict(zip(keys.Stat.STATUS_CLASSES, classes, strict=True))
                    want[keys.Stat.ERRORS] = errors
                r.hashes.setdefault(k, {})[ent] = value(stats, values)
                tw.setdefault(str(start), {})[ent] = want
        n = len(events)
        r.hashes[keys.progress_key(kind, part)] = {
            "offset": str(n + 2 - 1),  # n events, one late, one dead
            "events": str(n),
            "late": "1",
            "dead": "1",
            "topic": f"t.{kind.value}",
        }
    truth["events"] = {"sensor": len(SENSOR_EVENTS), "applog": len(APPLOG_EVENTS)}
    truth["late"] = {"sensor": 1, "applog": 1}
    truth["dead"] = {"sensor": 1, "applog": 1}
    truth["per_partition"] = {
        "sensor": {"0": {"events": len(SENSOR_EVENTS), "late": 1, "dead": 1}},
        "applog": {"1": {"events": len(APPLOG_EVENTS), "late": 1, "dead": 1}},
    }
    return r, truth


QS = (50, 90, 95, 99)


def value(stats: list[float], values: list[float], extra: dict[int, int] | None = None) -> bytes:
    """The packed value of an entity's statistics and the sketch of its values (+ extra)."""
    codes = bucket_codes(values)
    if extra:
        codes = np.concatenate([codes, np.repeat(list(extra), list(extra.values()))])
    table = packed.from_values(
        np.array([stats], dtype=np.float64),
        np.zeros(codes.size, dtype=np.int64),
        codes.astype(np.int64),
        np.ones(codes.size, dtype=np.int64),
    )
    return packed.encode(table)[0]


def stats_of(r: FakeRedis, key: str, ent: str) -> tuple[list[float], list[float]]:
    """An entity's stored statistics and one value per sketch bucket count (for rewriting)."""
    t = packed.decode([r.hashes[key][ent]])
    vals = np.repeat(
        [float(bucket_values(np.array([c]))[0]) for c in t.code.tolist()],
        t.count,
    )
    return t.stats[0].tolist(), vals.tolist()


def _std(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return float((sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5)


def problems(r: FakeRedis, truth: dict[str, Any]) -> list[str]:
    """Every line verify reports (the truth holds tumbling windows only: hopping ones are not
    compared here, their merge is not under test)."""
    return verify.verify(truth, verify.read_store(r, batch=3))


def test_a_consistent_store_passes() -> None:
    r, truth = build()
    assert problems(r, truth) == []


def w_key(kind: EventKind, part: int, dim: str, start: int) -> str:
    return keys.window_key(kind, part, keys.WINDOW_1M, dim, start)


def test_a_sketch_bucket_off_by_one_is_named() -> None:
    r, truth = build()
    k = w_key(SENSOR, 0, keys.Dim.DEVICE, T0)
    stats, _ = stats_of(r, k, "d2|temp")
    r.hashes[k]["d2|temp"] = value(stats, [21.25, 21.25])  # sketch of 2 values, n = 1
    lines = problems(r, truth)
    want = f"sensor partition 0 1m device @{T0} d2|temp: has a sketch total unequal to its count"
    assert want in lines, lines


def test_an_entity_the_truth_does_not_have_is_named() -> None:
    r, truth = build()
    k = w_key(APPLOG, 1, keys.Dim.ROUTE, T0)
    r.hashes[k]["ghost|/z"] = value([1, 2.0, 4.0, 2.0, 2.0, 0, 1, 0, 0, 0, 0], [2.0])
    lines = problems(r, truth)
    assert lines == [f"applog 1m route @{T0} ghost|/z: in the store (n=1) but not in the truth"]


def test_a_window_the_truth_does_not_have_is_named() -> None:
    r, truth = build()
    r.hashes[w_key(SENSOR, 0, keys.Dim.SITE, T0 + 5 * MIN)] = {
        "s9|temp": value([1, 1.0, 1.0, 1.0, 1.0], [1.0])
    }
    lines = problems(r, truth)
    assert f"sensor 1m site @{T0 + 5 * MIN}: window in the store but not in the truth" in lines


def test_unreadable_values_are_mismatches_not_crashes() -> None:
    r, truth = build()
    where = f"sensor partition 0 1m metric @{T0} temp: value 0"
    r.hashes[w_key(SENSOR, 0, keys.Dim.METRIC, T0)]["temp"] = b"2 0.5 0.25 0.5 0.5"
    lines = problems(r, truth)
    assert any(x.startswith(where) and "not a version-1 packed value" in x for x in lines), lines
    r.hashes[w_key(SENSOR, 0, keys.Dim.METRIC, T0)]["temp"] = b"2 x"
    lines = problems(r, truth)
    assert any(x.startswith(where) and "fewer than the 8-byte header" in x for x in lines), lines


def test_values_that_break_the_codec_rules_are_named() -> None:
    r, truth = build()
    k = w_key(SENSOR, 0, keys.Dim.DEVICE, T0)
    stats, vals = stats_of(r, k, "d1|temp")
    stats[packed.MIN], stats[packed.MAX] = stats[packed.MAX] + 1, stats[packed.MIN]
    r.hashes[k]["d1|temp"] = value(stats, vals)
    lines = problems(r, truth)
    assert f"sensor partition 0 1m device @{T0} d1|temp: has min > max" in lines, lines


def test_only_the_kept_dimensions_are_compared() -> None:
    r, truth = build()
    for k in [k for k in r.hashes if ":w:10s:" in k or ":device:" in k]:
        del r.hashes[k]
    plan = (
        (keys.WINDOW_10S, ()),
        (keys.WINDOW_1M, ("site", "metric", "route", "service", "fleet")),
    )
    found = verify.read_store(r, batch=3)
    assert verify.verify(truth, found, verify.kept_dims(plan)) == []
    assert any("missing" in line for line in verify.verify(truth, found))


def test_counters_that_miss_a_record_are_named() -> None:
    r, truth = build()
    r.hashes[keys.progress_key(SENSOR, 0)]["offset"] = "5"  # one record unaccounted for
    lines = problems(r, truth)
    assert (
        "sensor partition 0: events 3 + late 1 + dead 1 = 5, but applied offset 5 means 6 records"
        in lines
    )


def test_window_counts_must_equal_the_events_counter() -> None:
    r, truth = build()
    progress = r.hashes[keys.progress_key(APPLOG, 1)]
    progress["events"] = "3"
    progress["dead"] = "0"  # still adds up to offset + 1
    truth["events"]["applog"] = 3
    truth["dead"]["applog"] = 0
    truth["per_partition"]["applog"]["1"] |= {"events": 3, "dead": 0}
    lines = problems(r, truth)
    assert lines == [
        "applog partition 1: its 1m fleet windows count 2 events, its progress hash events=3"
    ]


def test_per_partition_counters_are_compared_with_the_truth() -> None:
    r, truth = build()
    truth["per_partition"]["sensor"]["0"]["late"] = 2
    truth["per_partition"]["sensor"]["0"]["dead"] = 0
    lines = problems(r, truth)
    assert lines == [
        "sensor partition 0: late is 1 in the store, truth says 2",
        "sensor partition 0: dead is 1 in the store, truth says 0",
    ]


def test_windows_without_a_progress_hash_are_named() -> None:
    r, truth = build()
    del r.hashes[keys.progress_key(APPLOG, 1)]
    lines = problems(r, truth)
    assert any(
        line.startswith("applog partition 1: ") and "no progress hash" in line for line in lines
    )


def test_non_integer_progress_fields_are_named() -> None:
    r, truth = build()
    r.hashes[keys.progress_key(SENSOR, 0)]["late"] = "1.5"
    lines = problems(r, truth)
    assert "sensor partition 0: progress fields are not integers: late='1.5'" in lines


@pytest.mark.parametrize("stat", ["min", "max"])
def test_min_and_max_are_compared_exactly(stat: str) -> None:
    r, truth = build()
    want = truth["windows"]["sensor"]["1m"]["metric"][str(T0)]["temp"]
    want[stat] = want[stat] * (1 + 1e-15)  # a few ulps: isclose(rel_tol=1e-12) would accept it
    lines = problems(r, truth)
    assert len(lines) == 1
    assert lines[0].startswith(f"sensor 1m metric @{T0} temp: {stat}=")


def test_run_prints_each_mismatch_and_exits_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    r, truth = build()
    found = verify.read_store(r)
    r.hashes[keys.progress_key(SENSOR, 0)]["offset"] = "9"
    monkeypatch.setenv("PULSE_WORKER_DIMS_10S", "device,site,metric,route,service,fleet")
    path = tmp_path / "truth.json"
    path.write_bytes(orjson.dumps(truth))
    monkeypatch.setattr("schemas.settings.store_client", lambda *_a, **_kw: r)
    out = io.StringIO()
    with redirect_stdout(out):
        code = verify.run(argparse.Namespace(truth=path, max_report=10))
    assert code == 1
    text = out.getvalue()
    assert "MISMATCH sensor partition 0: events 3 + late 1 + dead 1 = 5" in text
    assert "verify: FAILED, 1 mismatches" in text
    r.hashes[keys.progress_key(SENSOR, 0)]["offset"] = "4"
    out = io.StringIO()
    with redirect_stdout(out):
        assert verify.run(argparse.Namespace(truth=path, max_report=10)) == 0
    assert f"agree in {len(found.partitions)} partitions" in out.getvalue()


def test_help_states_the_dense_offsets_assumption() -> None:
    parser = argparse.ArgumentParser()
    verify.add_arguments(parser)
    text = parser.format_help()
    assert "events + late + dead == offset + 1" in text
    assert "non-transactional" in text
