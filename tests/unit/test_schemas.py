"""The exported JSON Schemas are current, and the key layout round-trips."""

from __future__ import annotations

import fnmatch
import json

from schemas import export, keys
from schemas.events import EventKind, SensorReading


def test_json_schemas_are_current() -> None:
    for name, text in export.render().items():
        path = export.JSON_DIR / name
        assert path.exists(), f"missing {path}; run: python -m schemas.export"
        assert path.read_text() == text, f"{path} is stale; run: python -m schemas.export"


def test_json_schema_describes_the_model() -> None:
    schema = json.loads((export.JSON_DIR / "sensor_reading.v1.schema.json").read_text())
    assert set(schema["required"]) == {
        n for n, f in SensorReading.model_fields.items() if f.is_required()
    }
    assert schema["additionalProperties"] is False


def test_keys_share_a_hash_tag_per_partition() -> None:
    k = keys.window_key(EventKind.SENSOR, 3, keys.WINDOW_1M, keys.Dim.SITE, 120_000)
    assert k == "pulse:{sensor.3}:w:1m:site:120000"
    assert keys.parse_window_key(k) == (EventKind.SENSOR, 3, "1m", "site", 120_000)
    tag = "{sensor.3}"
    for other in (
        keys.progress_key("sensor", 3),
        keys.window_key("sensor", 3, keys.WINDOW_10S, "device", 0),
        keys.entities_key("sensor", 3, "device"),
    ):
        assert tag in other
    assert fnmatch.fnmatchcase(k, keys.window_pattern("sensor", keys.WINDOW_1M))
    assert not fnmatch.fnmatchcase(k, keys.window_pattern("applog"))
