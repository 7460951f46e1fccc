"""The truth file contract (``schemas.truth``): what the load generator writes loads; anything
else is one sentence, naming where, and every damage that would otherwise crash ``pulse verify``
or ``pulse eval anomalies`` is refused by ``load``; what it lets through (huge but finite
numbers) the readers handle."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from loadgen.generator import GenConfig, Generator
from loadgen.truth import TruthBuilder
from pipeline import quality, verify
from schemas import truth

T0 = 1_790_000_000_000


def _built(seed: int) -> TruthBuilder:
    """The truth of a short load generator run."""
    cfg = GenConfig(
        seed=seed, start_ms=T0, rate=0, duration_s=20, devices=4, services=2,
        anomaly_rate=1.0, bad_rate=0.02, late_rate=0.02,
    )  # fmt: skip
    gen = Generator(cfg)
    tb = TruthBuilder(cfg, gen.fleet, gen.episodes, 30_000)
    for chunk in gen:
        tb.add(chunk)
    return tb


def _written(tmp_path: Path) -> Path:
    path = tmp_path / "truth.json"
    path.write_bytes(_built(3).to_json())
    return path


def test_what_the_load_generator_writes_loads_as_written(tmp_path: Path) -> None:
    path = _written(tmp_path)
    doc = truth.load(path)
    assert doc == orjson.loads(path.read_bytes())
    assert doc["format"] == truth.FORMAT and doc["anomalies"] and doc["boards"]


@pytest.mark.parametrize(
    ("content", "said"),
    [
        (b'{"format": ', "cannot read truth file {path}: "),
        (b"[1, 2]", '{path} is not a truth file of `pulse loadgen --truth` (no "format" field)'),
        (
            b'{"produced": "x"}',
            '{path} is not a truth file of `pulse loadgen --truth` (no "format"',
        ),
        (
            b'{"format": 2, "start_ms": 0, "end_ms": 1, "windows": {}}',
            "truth file {path}: format: ",
        ),
        (
            b'{"format": 1, "start_ms": 0, "end_ms": 1}',
            "truth file {path}: windows: Field required",
        ),
    ],
)
def test_anything_else_is_one_sentence(tmp_path: Path, content: bytes, said: str) -> None:
    path = tmp_path / "truth.json"
    path.write_bytes(content)
    with pytest.raises(truth.TruthFileError) as exc:
        truth.load(path)
    assert str(exc.value).startswith(said.format(path=path))
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize(
    ("where", "value"),
    [
        (("windows", "sensor", "1m", "device"), {"0": {"d|m": {"n": "x"}}}),
        (("anomalies",), [{"type": "spike"}]),
        (("per_partition", "sensor", "0"), {"events": -1}),
        (("boards", "sensor"), [1]),
        (("partitions", "sensor"), 4611686018427387904),  # a read queued per partition
    ],
)
def test_a_damaged_part_is_named(tmp_path: Path, where: tuple[str, ...], value: object) -> None:
    doc = orjson.loads(_written(tmp_path).read_bytes())
    node = doc
    for key in where[:-1]:
        node = node[key]
    node[where[-1]] = value
    path = tmp_path / "damaged.json"
    path.write_bytes(orjson.dumps(doc))
    with pytest.raises(truth.TruthFileError) as exc:
        truth.load(path)
    assert str(exc.value).startswith(f"truth file {path}: {'.'.join(where)}")


@pytest.fixture(scope="module")
def written() -> dict[str, Any]:
    """A truth document as the load generator writes it."""
    return _built(5).to_dict()


def _first(node: dict[str, Any]) -> str:
    return next(iter(node))


def _window_start(doc: dict[str, Any]) -> str:
    d = doc["windows"]["sensor"]["1m"]["device"]
    d["abc"] = d.pop(_first(d))
    return "windows.sensor.1m.device: key 'abc': expected a window start in ms"


def _huge_window_start(doc: dict[str, Any]) -> str:
    d = doc["windows"]["sensor"]["1m"]["device"]
    d["9" * 5000] = d.pop(_first(d))  # int() refuses more than 4300 digits
    return f"windows.sensor.1m.device: key {'9' * 64!r}"


def _entity_without_n(doc: dict[str, Any]) -> str:
    starts = doc["windows"]["sensor"]["1m"]["device"]
    start = _first(starts)
    entity = _first(starts[start])
    del starts[start][entity]["n"]
    return f"windows.sensor.1m.device.{start}.{entity}: missing statistics: n"


def _text_for_a_number(doc: dict[str, Any]) -> str:
    starts = doc["windows"]["applog"]["10s"]["fleet"]
    start = _first(starts)
    starts[start]["all"]["sum"] = "1e3"  # load hands on the JSON: "1e3" would reach float math
    return f"windows.applog.10s.fleet.{start}.all.sum: Input should be a valid number"


def _board_partition(doc: dict[str, Any]) -> str:
    doc["boards"]["sensor"]["x"] = {}
    return "boards.sensor: key 'x': expected a partition number"


def _board_start(doc: dict[str, Any]) -> str:
    parts = doc["boards"]["sensor"]
    part = _first(parts)
    parts[part]["abc"] = {"site.events": {"a": 1}}
    return f"boards.sensor.{part}: key 'abc': expected a window start in ms"


def _per_partition_key(doc: dict[str, Any]) -> str:
    doc["per_partition"]["sensor"] = {"x": {"events": 1}}
    return "per_partition.sensor: key 'x': expected a partition number"


def _unprintable_key(doc: dict[str, Any]) -> str:
    doc["per_partition"]["sensor"] = {"1\n2": {"events": 1}}
    return "per_partition.sensor: key '1\\n2': expected a partition number"


def _episode_kind(doc: dict[str, Any]) -> str:
    doc["anomalies"][0]["type"] = "spike"  # quality.score looks its kind up
    return "anomalies.0.type: Input should be 'sensor' or 'applog'"


def _huge_anomaly_after(doc: dict[str, Any]) -> str:
    doc["anomaly_after_s"] = 1e308
    return "anomaly_after_s: Input should be less than or equal to 315360000"


@pytest.mark.parametrize(
    "damage",
    [
        _window_start,
        _huge_window_start,
        _entity_without_n,
        _text_for_a_number,
        _board_partition,
        _board_start,
        _per_partition_key,
        _unprintable_key,
        _episode_kind,
        _huge_anomaly_after,
    ],
)
def test_damage_the_readers_would_crash_on_is_one_sentence_naming_where(
    tmp_path: Path, written: dict[str, Any], damage: Callable[[dict[str, Any]], str]
) -> None:
    doc = orjson.loads(orjson.dumps(written))
    said = damage(doc)
    path = tmp_path / "damaged.json"
    path.write_bytes(orjson.dumps(doc))
    with pytest.raises(truth.TruthFileError) as exc:
        truth.load(path)
    assert str(exc.value).startswith(f"truth file {path}: {said}")
    assert "\n" not in str(exc.value) and len(str(exc.value)) < 300


def test_what_the_generator_writes_still_loads(tmp_path: Path, written: dict[str, Any]) -> None:
    path = tmp_path / "truth.json"
    path.write_bytes(orjson.dumps(written))
    assert truth.load(path) == written


def test_a_huge_std_is_a_mismatch_not_an_overflow() -> None:
    stats = {s: 1.0 for s in ("n", "sum", "min", "max", "p50", "p90", "p95", "p99")}
    doc = {"windows": {"sensor": {"1m": {"device": {"0": {"d|m": {**stats, "std": 1e308}}}}}}}
    view: verify.StoreView = {
        "sensor": {"1m": {"device": {0: {"d|m": verify.Merged(1, 1.0, 1.0)}}}}
    }
    lines = verify.compare(doc, view, {})
    assert any(line.startswith("sensor 1m device @0 d|m: std=0.0, truth 1e+308") for line in lines)


@pytest.mark.parametrize(
    ("doc", "after_s", "slack_s", "said"),
    [
        ({}, 1e308, 30.0, "--after must be from 0 to 315360000 seconds (ten years), got 1e+308"),
        ({}, None, 1e308, "--slack must be from 0 to 315360000 seconds (ten years), got 1e+308"),
        (
            {"anomaly_after_s": 1e308},
            None,
            30.0,
            "the truth file's anomaly_after_s must be from 0 to 315360000 seconds",
        ),
    ],
)
def test_seconds_beyond_ten_years_are_one_sentence(
    doc: dict[str, Any], after_s: float | None, slack_s: float, said: str
) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(said)):
        quality.counted_ms({"start_ms": T0, **doc}, after_s, slack_s)


def test_counted_ms_defaults_to_the_truths_warm_up() -> None:
    doc = {"start_ms": T0, "anomaly_after_s": 60}
    assert quality.counted_ms(doc, None, 30.0) == (T0 + 60_000, 30_000)
    assert quality.counted_ms(doc, 1.5, 0.25) == (T0 + 1_500, 250)
    limit = float(truth.MAX_SECONDS)
    assert quality.counted_ms(doc, limit, limit) == (T0 + limit * 1000, limit * 1000)
