"""``pulse verify`` on leaderboards: the value boards against the truth's, per partition and 1m
instance (counts and maxima exact, p99 within the sketch's accuracy, missing and extra members
named); the anomaly boards against the stored anomaly records."""

from __future__ import annotations

import argparse
import io
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import orjson
import pytest

from pipeline import verify
from schemas import keys
from schemas.anomaly import AnomalyRecord, anomaly_id, encode_record
from schemas.events import EventKind
from tests.unit.test_verify import T0, FakePipeline, FakeRedis, build

MIN = keys.WINDOW_1M.size_ms
SENSOR, APPLOG = EventKind.SENSOR, EventKind.APPLOG


class BoardPipeline(FakePipeline):
    def zrange(self, key: str, start: int, end: int, withscores: bool = False) -> None:
        self.queued.append(key)

    def execute(self) -> list[Any]:
        assert isinstance(self.store, BoardRedis)
        out: list[Any] = []
        for k in self.queued:
            if k in self.store.zsets:
                z = sorted(self.store.zsets[k].items(), key=lambda ms: (ms[1], ms[0]))
                out.append([(m.encode(), s) for m, s in z])
            else:
                out.append(self.store.hgetall(k))
        return out


class BoardRedis(FakeRedis):
    """Hashes and sorted sets."""

    def __init__(self) -> None:
        super().__init__()
        self.zsets: dict[str, dict[str, float]] = {}

    def scan_iter(self, match: str = "*", count: int = 0) -> Any:
        import fnmatch

        names = [*self.hashes, *self.zsets]
        return iter([k.encode() for k in names if fnmatch.fnmatchcase(k, match)])

    def pipeline(self, transaction: bool = False) -> BoardPipeline:
        return BoardPipeline(self)


BOARDS_TRUTH: dict[str, Any] = {
    "sensor": {
        "0": {
            str(T0): {
                "site.events": {"s1": 2},
                "device.max.temp": {"d1": 20.5, "d2": 21.25},
            },
            str(T0 + MIN): {"site.events": {"s1": 1}, "device.max.hum": {"d1": 40.0}},
        }
    },
    "applog": {
        "1": {
            str(T0): {
                "service.requests": {"a": 2},
                "service.errors": {"a": 1},
                "service.p99": {"a": 3.0},
                "route.requests": {"a|/x": 1, "a|/y": 1},
                "route.errors": {"a|/x": 0, "a|/y": 1},
                "route.p99": {"a|/x": 3.0, "a|/y": 9.0},
            }
        }
    },
}


def record(kind: EventKind, part: int, start: int, entity: str, signal: str) -> bytes:
    return encode_record(
        AnomalyRecord(
            id=anomaly_id(kind.value, part, start, entity, signal),
            kind=kind.value,
            partition=part,
            entity=entity,
            signal=signal,
            cause="spike",
            window_start_ms=start,
            window_ms=keys.WINDOW_10S.size_ms,
            score=0.99,
            value=1.0,
            expected=0.0,
        )
    )


def add_record(r: BoardRedis, kind: EventKind, part: int, start: int, ent: str, sig: str) -> None:
    rid = anomaly_id(kind.value, part, start, ent, sig)
    r.hashes.setdefault(keys.anomalies_key(kind, part), {})[rid] = record(
        kind, part, start, ent, sig
    )


def build_boards() -> tuple[BoardRedis, dict[str, Any]]:
    """test_verify's consistent store and truth, with its boards and some anomalies."""
    base, truth = build()
    r = BoardRedis()
    r.hashes = base.hashes
    truth["boards"] = orjson.loads(orjson.dumps(BOARDS_TRUTH))
    for kind_s, parts in BOARDS_TRUTH.items():
        for part, starts in parts.items():
            for start, by_board in starts.items():
                for name, members in by_board.items():
                    key = keys.board_key(kind_s, int(part), name, int(start))
                    # the worker's p99 is a sketch estimate: within 0.8 % of the exact value
                    r.zsets[key] = {
                        m: s * (1.004 if name.endswith(".p99") else 1)
                        for m, s in members.items()
                        if s != 0  # a zero count may be left out
                    }
    # two anomalies of d1 (two metrics) in one 10 s window, one of d2 in another, in T0's
    # minute; one of service a in T0's minute
    add_record(r, SENSOR, 0, T0 + 10_000, "d1|temp", "mean")
    add_record(r, SENSOR, 0, T0 + 10_000, "d1|hum", "max")
    add_record(r, SENSOR, 0, T0 + 50_000, "d2|temp", "mean")
    add_record(r, APPLOG, 1, T0, "a", "latency_p99")
    r.zsets[keys.board_key(SENSOR, 0, "device.anomalies", T0)] = {"d1": 2, "d2": 1}
    r.zsets[keys.board_key(APPLOG, 1, "service.anomalies", T0)] = {"a": 1}
    return r, truth


def problems(r: BoardRedis, truth: dict[str, Any]) -> list[str]:
    return verify.verify(truth, verify.read_store(r, batch=3), None, verify.read_boards(r, 2))


def test_consistent_boards_pass() -> None:
    r, truth = build_boards()
    assert problems(r, truth) == []
    found = verify.read_boards(r)
    assert found.records == 4
    assert found.anomalies[("sensor", 0, T0)] == {"device.anomalies": {"d1": 2, "d2": 1}}


def test_a_count_off_by_one_is_named() -> None:
    r, truth = build_boards()
    r.zsets[keys.board_key(SENSOR, 0, "site.events", T0)]["s1"] = 3
    assert problems(r, truth) == [f"sensor partition 0 board site.events @{T0} s1: 3.0, truth 2"]


def test_maxima_are_compared_exactly() -> None:
    r, truth = build_boards()
    r.zsets[keys.board_key(SENSOR, 0, "device.max.temp", T0)]["d2"] = 21.250000000000004
    assert problems(r, truth) == [
        f"sensor partition 0 board device.max.temp @{T0} d2: 21.250000000000004, truth 21.25"
    ]


def test_p99_beyond_the_sketch_accuracy_is_named() -> None:
    r, truth = build_boards()
    r.zsets[keys.board_key(APPLOG, 1, "route.p99", T0)]["a|/y"] = 9.0 * 1.01
    (line,) = problems(r, truth)
    assert line.startswith(f"applog partition 1 board route.p99 @{T0} a|/y: 9.09")
    assert line.endswith(", truth 9.0 (±0.8%)")


def test_missing_and_extra_members_and_boards_are_named() -> None:
    r, truth = build_boards()
    del r.zsets[keys.board_key(APPLOG, 1, "route.requests", T0)]["a|/x"]
    r.zsets[keys.board_key(APPLOG, 1, "route.errors", T0)]["a|/x"] = 2
    del r.zsets[keys.board_key(SENSOR, 0, "device.max.hum", T0 + MIN)]
    r.zsets[keys.board_key(SENSOR, 0, "device.max.co2", T0 + MIN)] = {"d1": 500.0}
    r.zsets[keys.board_key(SENSOR, 3, "site.events", T0)] = {"s9": 1}
    assert problems(r, truth) == [
        f"sensor partition 0 board device.max.hum @{T0 + MIN}: missing (truth has 1 members)",
        f"applog partition 1 board route.errors @{T0} a|/x: in the store (2.0) but not in the "
        "truth",
        f"applog partition 1 board route.requests @{T0} a|/x: missing (truth 1)",
        f"sensor partition 0 board device.max.co2 @{T0 + MIN}: in the store (1 members) but not "
        "in the truth",
        f"sensor partition 3 board site.events @{T0}: in the store (1 members) but not in the "
        "truth",
    ]


def test_anomaly_boards_are_checked_against_the_records() -> None:
    r, truth = build_boards()
    add_record(r, SENSOR, 0, T0 + MIN, "d3|temp", "min")  # no board counts it
    r.zsets[keys.board_key(SENSOR, 0, "device.anomalies", T0)]["d1"] = 3
    r.zsets[keys.board_key(APPLOG, 1, "service.anomalies", T0 + MIN)] = {"b": 1}  # no record
    assert problems(r, truth) == [
        f"applog partition 1 board service.anomalies @{T0 + MIN} b: in the store (1.0) but not "
        "in the anomaly records",
        f"sensor partition 0 board device.anomalies @{T0} d1: 3.0, anomaly records 2",
        f"sensor partition 0 board device.anomalies @{T0 + MIN} d3: missing (anomaly records 1)",
    ]


def test_an_unreadable_anomaly_record_is_named() -> None:
    r, truth = build_boards()
    r.hashes[keys.anomalies_key(SENSOR, 0)]["bad"] = b"PAxx"
    lines = problems(r, truth)
    assert len(lines) == 1 and lines[0].startswith("sensor partition 0 anomaly bad: ")


def test_a_truth_file_without_boards_compares_none() -> None:
    r, truth = build_boards()
    del truth["boards"]
    r.zsets[keys.board_key(SENSOR, 0, "site.events", T0)]["s1"] = 99
    assert problems(r, truth) == []


def test_boards_of_dimensions_the_1m_windows_do_not_keep_are_not_compared() -> None:
    r, truth = build_boards()
    r.zsets[keys.board_key(APPLOG, 1, "route.requests", T0)]["a|/x"] = 5
    kept = verify.kept_dims([(keys.WINDOW_1M, ("device", "site", "metric", "service", "fleet"))])
    assert verify.compare_boards(truth, verify.read_boards(r), kept) == []
    assert len(verify.compare_boards(truth, verify.read_boards(r), None)) == 1


def test_run_reports_boards_in_its_summary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    r, truth = build_boards()
    monkeypatch.setenv("PULSE_WORKER_DIMS_10S", "device,site,metric,route,service,fleet")
    path = tmp_path / "truth.json"
    path.write_bytes(orjson.dumps(truth))
    monkeypatch.setattr("schemas.settings.store_client", lambda *_a, **_kw: r)
    out = io.StringIO()
    with redirect_stdout(out):
        assert verify.run(argparse.Namespace(truth=path, max_report=10)) == 0
    text = out.getvalue()
    assert "14 leaderboard entries match the truth" in text
    assert "anomaly boards agree with 4 anomaly records" in text
    r.zsets[keys.board_key(APPLOG, 1, "service.errors", T0)]["a"] = 2
    out = io.StringIO()
    with redirect_stdout(out):
        assert verify.run(argparse.Namespace(truth=path, max_report=10)) == 1
    assert f"MISMATCH applog partition 1 board service.errors @{T0} a: 2, truth 1" in (
        out.getvalue().replace("2.0", "2")
    )
