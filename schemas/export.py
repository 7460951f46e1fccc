"""Export the event models as JSON Schema files beside them: ``python -m schemas.export``.

The files in ``schemas/json/`` are what producers outside Python validate against; a test fails
when they drift from the models.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pydantic import BaseModel

from schemas.events import SCHEMA_VERSION, AppLogEvent, SensorReading

JSON_DIR = Path(__file__).parent / "json"
MODELS: dict[str, type[BaseModel]] = {
    f"sensor_reading.v{SCHEMA_VERSION}.schema.json": SensorReading,
    f"applog_event.v{SCHEMA_VERSION}.schema.json": AppLogEvent,
}


def render() -> dict[str, str]:
    """File name -> JSON Schema text of every event model."""
    out = {}
    for name, model in MODELS.items():
        schema = {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": f"https://pulse.dev/schemas/{name}",
            **model.model_json_schema(mode="validation"),
        }
        out[name] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    return out


def main() -> int:
    """Write the schema files; with ``--check`` only report whether they are current."""
    check = "--check" in sys.argv[1:]
    stale = []
    for name, text in render().items():
        path = JSON_DIR / name
        if not path.exists() or path.read_text() != text:
            stale.append(name)
            if not check:
                JSON_DIR.mkdir(exist_ok=True)
                path.write_text(text)
    if check and stale:
        print(f"stale JSON Schemas: {', '.join(stale)}; run: python -m schemas.export")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
