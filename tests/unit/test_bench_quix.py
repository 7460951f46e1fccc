"""The Quix Streams case's pure parts, and its skip when quixstreams is not installed."""

from __future__ import annotations

import sys
from pathlib import Path

import orjson
import pytest
from pulse_bench import quix_app
from pulse_bench.cases import quix
from pulse_bench.harness import REGISTRY, BenchContext, BenchParams, run_cases

from schemas.settings import KafkaSettings, StoreSettings


def test_only_readings_with_a_number_and_an_event_time_are_windowed() -> None:
    good = {"device_id": "d1", "event_time": 1_700_000_000_123, "value": 21.5}
    assert quix_app.valid(good) and quix_app.valid({**good, "value": 3})
    for bad in (
        None,
        [1, 2],
        "text",
        {**good, "value": "21.5"},
        {**good, "value": True},
        {**good, "value": float("nan")},
        {**good, "value": float("inf")},
        {**good, "event_time": 1.5},
        {k: v for k, v in good.items() if k != "value"},
    ):
        assert not quix_app.valid(bad), bad


def test_decode_passes_over_what_is_not_json() -> None:
    assert quix_app.decode(b'{"value": 1}') == {"value": 1}
    assert quix_app.decode(b"\xff{not json") is None
    assert quix_app.decode(orjson.dumps([1])) == [1]  # decodes; the filter drops it


def test_window_clock_and_key() -> None:
    reading = {"event_time": 1_700_000_000_123, "value": 1.0}
    assert quix_app.event_time(reading, [], 5, None) == 1_700_000_000_123
    assert quix_app.event_time(None, [], 5, None) == 5  # invalid: the broker's time
    window = {"start": 1_699_999_980_000, "end": 1_700_000_040_000, "count": 1}
    assert quix_app.window_key(b"dev-7", window) == b"quix:1m:dev-7:1699999980000"
    assert quix_app.quiet_late(None, b"k", 0, 1, 0, 60_000, "w", "t", 0, 1) is False


def test_without_quixstreams_the_case_is_skipped_with_a_note(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "quixstreams", None)  # find_spec: not importable
    ctx = BenchContext(BenchParams.create(True), KafkaSettings(), StoreSettings(), tmp_path)
    case = REGISTRY.cases["quix"]
    assert case.run is quix.run
    results, errors = run_cases(ctx, [case])
    assert results == {} and errors == {}
    assert "quixstreams is not installed" in ctx.skipped["quix"]
    assert "bench[quix]" in ctx.skipped["quix"]
