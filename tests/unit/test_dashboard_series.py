"""The page's data derivations over fake panes and records: buckets, series, tiles, markers."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import pytest

from dashboard import geo, page, queries, series
from dashboard.settings import DashboardSettings
from dashboard.thresholds import Level
from dashboard.timerange import TimeRange
from schemas import anomaly, keys
from schemas import sketch as sketches
from schemas.events import EventKind
from tests.unit.test_dashboard_merge import table_of

T0 = 1_700_000_040_000  # a minute boundary
MIN = 60_000


def pane(
    entities: dict[str, Sequence[float]], extra: Sequence[Sequence[float]] = ()
) -> queries.Pane:
    names = np.asarray(list(entities), dtype=object)
    return queries.Pane(names, table_of(list(entities.values()), extra))


def fleet(sensor: list[queries.Pane], app: list[queries.Pane], starts: list[int]) -> series.Fleet:
    rng = TimeRange(starts[0], starts[-1] + MIN, "test", False)
    return series.Fleet(rng, keys.WINDOW_1M, tuple(starts), {
        EventKind.SENSOR: sensor, EventKind.APPLOG: app,
    })  # fmt: skip


def q(values: Sequence[float], x: float) -> float:
    (v,) = sketches.quantiles(sketches.sketch_of(values), (x,))
    assert v is not None
    return v


def test_metric_series_merges_panes_per_bucket_and_metric() -> None:
    starts = [T0 + i * MIN for i in range(3)]
    panes = [
        pane({"temp": [1.0, 2.0], "hum": [50.0]}),
        pane({"temp": [3.0]}),
        pane({"hum": [40.0, 60.0]}),
    ]
    out = series.metric_series(fleet(panes, [queries.Pane.empty(11)] * 3, starts))
    # a 3-minute range: one point per minute
    assert out[["metric", "count"]].values.tolist() == [
        ["hum", 1], ["temp", 2], ["temp", 1], ["hum", 2],
    ]  # fmt: skip
    assert out["time"].iloc[0] == pd.Timestamp(T0, unit="ms", tz="UTC")
    assert out["p99"].iloc[3] == pytest.approx(q([40.0, 60.0], 0.99))
    assert out["mean"].iloc[1] == 1.5


def test_group_panes_merges_several_panes_into_one_bucket() -> None:
    starts = [T0 + i * MIN for i in range(4)]
    panes = [pane({"temp": [float(i)]}) for i in range(4)]
    g = series.group_panes(panes, starts, 2 * MIN, 5)
    assert T0 % (2 * MIN) == 0
    assert g.time.tolist() == [T0, T0 + 2 * MIN] and g.names.tolist() == ["temp", "temp"]
    assert g.table.stats[:, 0].tolist() == [2.0, 2.0]
    assert g.table.stats[:, 4].tolist() == [1.0, 3.0]  # max of each bucket
    assert int(g.table.stats[:, 0].sum()) == 4


def test_latency_series_and_kpis_from_the_fleet_row() -> None:
    starts = [T0, T0 + MIN]
    # applog: n, sum, sq, min, max, 1xx..5xx, err
    lat_a, lat_b = [10.0, 20.0, 30.0], [100.0, 900.0]
    app = [
        pane({"all": lat_a}, [[0, 3, 0, 0, 0, 1]]),
        pane({"all": lat_b}, [[0, 1, 0, 0, 1, 1]]),
    ]
    f = fleet([queries.Pane.empty(5)] * 2, app, starts)
    lat = series.latency_series(f)
    assert lat["requests"].tolist() == [3, 2] and lat["errors"].tolist() == [1, 1]
    assert lat["error_rate"].tolist() == pytest.approx([1 / 3, 1 / 2])
    assert lat["p99"].tolist() == pytest.approx([q(lat_a, 0.99), q(lat_b, 0.99)])
    merged = f.merged(EventKind.APPLOG)
    assert merged.table.stats[0, 0] == 5


def test_empty_fleet_gives_empty_series() -> None:
    f = fleet([queries.Pane.empty(5)], [queries.Pane.empty(11)], [T0])
    assert series.metric_series(f).empty and series.latency_series(f).empty
    assert page.metric_names(series.metric_series(f)) == []


def rec(
    kind: str, part: int, start: int, entity: str, signal: str, value: float
) -> anomaly.AnomalyRecord:
    return anomaly.AnomalyRecord(
        anomaly.anomaly_id(kind, part, start, entity, signal), kind, part, entity, signal,
        "spike", start, 10_000, 0.9, value, value / 2,
    )  # fmt: skip


RECORDS = [
    rec("sensor", 0, T0, "d1|temp", anomaly.Signal.MEAN, 30.0),
    rec("sensor", 0, T0 + MIN, "d1|hum", anomaly.Signal.MAX, 90.0),
    rec("sensor", 1, T0, "d2|temp", anomaly.Signal.MEAN, 31.0),
    rec("applog", 0, T0, "api", anomaly.Signal.LATENCY, 500.0),
]


def test_anomaly_rows_and_chart_markers() -> None:
    frame = series.anomaly_frame(RECORDS)
    assert frame["metric"].tolist() == ["temp", "hum", "temp", "api"]
    assert frame["subject"].tolist() == ["d1", "d1", "d2", "api"]
    temp = page.markers(frame, "sensor", "temp")
    assert temp["value"].tolist() == [30.0, 31.0]
    assert temp["label"].iloc[0] == "d1|temp mean spike"
    latency = page.markers(frame, "applog", signals=(anomaly.Signal.LATENCY,))
    assert latency["value"].tolist() == [500.0]
    assert page.markers(frame, "sensor", "hum", (anomaly.Signal.MEAN,)).empty
    assert page.markers(series.anomaly_frame([]), "sensor").empty


def test_device_frame_status_and_default_device() -> None:
    now = T0 + 10 * MIN
    positions = [
        geo.Position("d1", 0, 52.5, 13.4, now - 1_000),
        geo.Position("d2", 1, 48.8, 2.3, now - 2_000),
        geo.Position("d3", 1, 51.5, -0.1, now - geo.STALE_AFTER_MS - 1),
    ]
    frame = page.device_frame(positions, RECORDS, now)
    assert frame["status"].tolist() == ["anomaly", "anomaly", "stale"]
    assert frame["anomalies"].tolist() == [2, 1, 0]
    assert page.default_device(frame) == "d1"
    assert page.default_device(page.device_frame([], [], now)) is None
    assert geo.status(now, now) == "ok"


def kpis(**kw: object) -> series.RangeKpis:
    base: dict[str, object] = dict(
        events=600, span_s=60.0, active_devices=3, requests=100, errors=1, p99_ms=120.0,
        anomalies=0, updated_ms=T0, now_ms=T0 + 2_000,
    )  # fmt: skip
    base.update(kw)
    return series.RangeKpis(**base)  # type: ignore[arg-type]


def tile_levels(k: series.RangeKpis) -> dict[str, Level]:
    data = page.PageData.__new__(page.PageData)
    object.__setattr__(data, "range_kpis", k)
    object.__setattr__(data, "kpis", queries.Kpis(now_ms=k.now_ms, progress={}, events_per_s={}))
    return {t.label: t.level for t in page.tiles(data, DashboardSettings())}


def test_tiles_turn_colours_at_their_thresholds() -> None:
    ok = tile_levels(kpis())
    assert ok["Error rate"] is Level.OK and ok["p99 latency"] is Level.OK
    assert ok["Anomalies"] is Level.OK and ok["Data as of"] is Level.OK
    bad = tile_levels(kpis(errors=10, p99_ms=1500.0, anomalies=30, updated_ms=T0 - 120_000))
    assert bad["Error rate"] is Level.CRIT and bad["p99 latency"] is Level.CRIT
    assert bad["Anomalies"] is Level.CRIT and bad["Data as of"] is Level.CRIT
    never = tile_levels(kpis(updated_ms=None, requests=0, errors=0, p99_ms=None, events=0))
    assert never["Data as of"] is Level.CRIT  # no partition ever applied: stalled or not started
    assert never["Error rate"] is Level.NONE and never["Events/s"] is Level.WARN


def test_range_kpis_derived_figures() -> None:
    k = kpis()
    assert k.events_per_s == 10.0 and k.error_rate == 0.01 and k.age_ms == 2_000
    assert kpis(requests=0).error_rate is None and kpis(updated_ms=None).age_ms is None
