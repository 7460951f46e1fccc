"""The page's Vega-Lite specs: layers, UTC times, status colours; nothing from the network."""

from __future__ import annotations

import json

import pandas as pd

from dashboard import charts

TIMES = pd.to_datetime([0, 60_000], unit="ms", utc=True)
BAND = pd.DataFrame({"time": TIMES, "p50": [1.0, 2.0], "p95": [2.0, 3.0], "p99": [3.0, 4.0]})


def _no_urls(spec: dict[str, object]) -> None:
    text = json.dumps({k: v for k, v in spec.items() if k != "datasets"})
    assert "http" not in text and '"url"' not in text


def test_band_layers_and_markers() -> None:
    plain = charts.band(BAND, "temp", "reading")
    assert len(plain["layer"]) == 3 and set(plain["datasets"]) == {"q"}
    area = plain["layer"][0]
    assert area["mark"]["type"] == "area" and area["encoding"]["y2"] == {"field": "p99"}
    assert area["encoding"]["x"]["scale"] == {"type": "utc"}
    marks = pd.DataFrame({"time": TIMES[:1], "value": [9.0], "label": ["d1|temp mean spike"]})
    marked = charts.band(BAND, "temp", "reading", marks)
    assert len(marked["layer"]) == 4 and marked["layer"][3]["mark"]["color"] == "#dc2626"
    assert charts.band(BAND, "t", "y", marks.iloc[:0])["layer"].__len__() == 3
    _no_urls(marked)


def test_lines_and_device_facets() -> None:
    frame = pd.DataFrame({"time": TIMES, "service": ["a", "b"], "error_rate": [0.1, 0.2]})
    spec = charts.lines(frame, "error_rate", "service", "Errors", "errors", percent=True)
    assert spec["encoding"]["y"]["axis"] == {"format": "%"}
    assert spec["encoding"]["color"]["field"] == "service"
    dev = pd.DataFrame(
        {"time": TIMES, "metric": ["t", "h"], "count": [1, 1], "mean": [1.0, 2.0],
         "min": [1.0, 2.0], "max": [1.0, 2.0]}
    )  # fmt: skip
    facet = charts.device_lines(dev)
    assert facet["facet"]["row"]["field"] == "metric"
    assert facet["resolve"] == {"scale": {"y": "independent"}}
    _no_urls(facet)


def test_map_is_a_plain_scatter_coloured_by_status() -> None:
    devices = pd.DataFrame(
        {"device": ["d1", "d2"], "lat": [52.5, 48.8], "lon": [13.4, 2.3],
         "status": ["ok", "anomaly"], "anomalies": [0, 2], "seen": TIMES}
    )  # fmt: skip
    spec = charts.device_map(devices)
    assert spec["mark"]["type"] == "circle" and "projection" not in spec
    colour = spec["encoding"]["color"]["scale"]
    assert dict(zip(colour["domain"], colour["range"], strict=True)) == charts.STATUS_COLOURS
    assert spec["encoding"]["x"]["scale"]["domain"] == [2.3 - 0.5, 13.4 + 0.5]
    _no_urls(spec)
