"""The truth file contract (``schemas.truth``): what the load generator writes loads; anything
else is one sentence."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from loadgen.generator import GenConfig, Generator
from loadgen.truth import TruthBuilder
from schemas import truth


def _written(tmp_path: Path) -> Path:
    cfg = GenConfig(
        seed=3, start_ms=1_790_000_000_000, rate=0, duration_s=20, devices=4, services=2,
        anomaly_rate=1.0, bad_rate=0.02, late_rate=0.02,
    )  # fmt: skip
    gen = Generator(cfg)
    tb = TruthBuilder(cfg, gen.fleet, gen.episodes, 30_000)
    for chunk in gen:
        tb.add(chunk)
    path = tmp_path / "truth.json"
    path.write_bytes(tb.to_json())
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
