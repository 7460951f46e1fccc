"""Vega-Lite specs of the page's charts: quantile bands with anomaly markers, lines, the map.

Plain spec dicts, their data as named datasets (DataFrames that Streamlit sends as Arrow), drawn
with ``st.vega_lite_chart``: building them costs microseconds, where an Altair chart's
``to_dict`` cost tens of milliseconds per chart and per refresh. Vega-Lite renders from the
page's own bundle: nothing here loads from the network (the map is a plain longitude/latitude
scatter, no basemap tiles). Times are shown in UTC, whatever the browser's zone.
"""

from __future__ import annotations

from typing import Any, Final

import pandas as pd

Spec = dict[str, Any]

STATUS_COLOURS: Final = {"ok": "#16a34a", "stale": "#9ca3af", "anomaly": "#dc2626"}
_UTC_FORMAT: Final = "%Y-%m-%d %H:%M:%S"
X_TIME: Final[Spec] = {
    "field": "time",
    "type": "temporal",
    "title": None,
    "axis": {"format": "%H:%M"},
    "scale": {"type": "utc"},
}
WHEN: Final[Spec] = {
    "field": "time",
    "type": "temporal",
    "title": "UTC",
    "format": _UTC_FORMAT,
    "formatType": "utc",
}


def _q(field: str, title: str | None = None, fmt: str | None = None) -> Spec:
    out: Spec = {"field": field, "type": "quantitative"}
    if title is not None:
        out["title"] = title
    if fmt is not None:
        out["format"] = fmt
    return out


def band(
    frame: pd.DataFrame,
    title: str,
    y_title: str,
    marks: pd.DataFrame | None = None,
    height: int = 220,
) -> Spec:
    """p50–p99 as a band, p95 (solid) and p50 (dashed) as lines, anomalies (``time``,
    ``value``, ``label``) as red triangles."""
    tooltip = [WHEN, _q("p50", fmt=",.2f"), _q("p95", fmt=",.2f"), _q("p99", fmt=",.2f")]
    layers: list[Spec] = [
        {
            "data": {"name": "q"},
            "mark": {"type": "area", "opacity": 0.25, "color": "#3b82f6"},
            "encoding": {
                "x": X_TIME,
                "y": _q("p50", y_title),
                "y2": {"field": "p99"},
                "tooltip": tooltip,
            },
        },
        {
            "data": {"name": "q"},
            "mark": {"type": "line", "color": "#1d4ed8"},
            "encoding": {"x": X_TIME, "y": _q("p95"), "tooltip": tooltip},
        },
        {
            "data": {"name": "q"},
            "mark": {"type": "line", "color": "#60a5fa", "strokeDash": [4, 3]},
            "encoding": {"x": X_TIME, "y": _q("p50")},
        },
    ]
    datasets: dict[str, pd.DataFrame] = {"q": frame}
    if marks is not None and not marks.empty:
        datasets["m"] = marks
        layers.append(
            {
                "data": {"name": "m"},
                "mark": {
                    "type": "point",
                    "shape": "triangle-up",
                    "filled": True,
                    "size": 70,
                    "color": "#dc2626",
                },
                "encoding": {
                    "x": X_TIME,
                    "y": _q("value"),
                    "tooltip": [WHEN, {"field": "label", "type": "nominal"},
                                _q("value", fmt=",.3f")],
                },
            }
        )  # fmt: skip
    return {"title": title, "height": height, "datasets": datasets, "layer": layers}


def lines(
    frame: pd.DataFrame,
    y: str,
    colour: str,
    title: str,
    y_title: str,
    percent: bool = False,
    height: int = 220,
) -> Spec:
    """One line per ``colour`` value over time."""
    axis: Spec = {"format": "%"} if percent else {}
    return {
        "title": title,
        "height": height,
        "datasets": {"d": frame},
        "data": {"name": "d"},
        "mark": {"type": "line", "point": len(frame) < 40},
        "encoding": {
            "x": X_TIME,
            "y": {**_q(y, y_title), "axis": axis},
            "color": {"field": colour, "type": "nominal", "title": None},
            "tooltip": [
                WHEN,
                {"field": colour, "type": "nominal"},
                _q(y, fmt=".2%" if percent else ",.3f"),
            ],
        },
    }


def device_lines(frame: pd.DataFrame, width: int = 520) -> Spec:
    """A device's mean per metric with its min–max band, one row per metric (own y scale)."""
    tooltip = [WHEN, {"field": "metric", "type": "nominal"}, _q("mean", fmt=",.3f"),
               _q("min", fmt=",.3f"), _q("max", fmt=",.3f"), _q("count")]  # fmt: skip
    return {
        "datasets": {"d": frame},
        "data": {"name": "d"},
        "facet": {"row": {"field": "metric", "type": "nominal", "title": None}},
        "spec": {
            "width": width,
            "height": 110,
            "layer": [
                {
                    "mark": {"type": "area", "opacity": 0.2},
                    "encoding": {"x": X_TIME, "y": _q("min", ""), "y2": {"field": "max"}},
                },
                {
                    "mark": {"type": "line", "point": len(frame) < 60},
                    "encoding": {"x": X_TIME, "y": _q("mean"), "tooltip": tooltip},
                },
            ],
        },
        "resolve": {"scale": {"y": "independent"}},
    }


def device_map(devices: pd.DataFrame, height: int = 360) -> Spec:
    """Devices by longitude/latitude, coloured by status (no basemap: works offline)."""
    domain = list(STATUS_COLOURS)
    pad = 0.5
    lon = [float(devices["lon"].min()) - pad, float(devices["lon"].max()) + pad]
    lat = [float(devices["lat"].min()) - pad, float(devices["lat"].max()) + pad]
    return {
        "height": height,
        "datasets": {"d": devices},
        "data": {"name": "d"},
        "mark": {"type": "circle", "size": 60, "opacity": 0.85},
        "encoding": {
            "x": {**_q("lon", "longitude"), "scale": {"domain": lon}},
            "y": {**_q("lat", "latitude"), "scale": {"domain": lat}},
            "color": {
                "field": "status",
                "type": "nominal",
                "scale": {"domain": domain, "range": [STATUS_COLOURS[s] for s in domain]},
                "legend": {"title": "status", "orient": "bottom"},
            },
            "tooltip": [
                {"field": "device", "type": "nominal"},
                {"field": "status", "type": "nominal"},
                _q("anomalies"),
                {"field": "seen", "type": "temporal", "format": _UTC_FORMAT, "formatType": "utc"},
                _q("lat", fmt=".4f"),
                _q("lon", fmt=".4f"),
            ],
        },
    }
