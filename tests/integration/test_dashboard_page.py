"""The BI page (``dashboard/app.py``) run by Streamlit's ``AppTest`` against a real Valkey.

The page's clock is pinned (``dashboard.panels.wall_clock_ms``), windows are written through
the worker's own state code (``test_dashboard_queries.populate``), plus device positions and
anomaly records as the worker's apply leaves them. Kafka is absent here on purpose: the page
must say so and still show every store panel.
"""

from __future__ import annotations

import gc
import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
import streamlit as st
from streamlit.testing.v1 import AppTest

from dashboard import panels
from schemas import anomaly, keys
from schemas.events import EventKind
from tests.integration.test_dashboard_queries import MIN, NOW, T0, populate

pytestmark = pytest.mark.integration

APP = Path(__file__).resolve().parents[2] / "dashboard" / "app.py"
SENSOR, APPLOG = EventKind.SENSOR, EventKind.APPLOG


@pytest.fixture
def dead_port() -> Iterator[int]:
    """A port nothing accepts on (bound, never listening), held for the test."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield int(s.getsockname()[1])


def _record(kind: EventKind, part: int, start: int, entity: str, signal: str, value: float,
            seed: int) -> anomaly.AnomalyRecord:  # fmt: skip
    rng = np.random.default_rng(seed)
    return anomaly.AnomalyRecord(
        id=anomaly.anomaly_id(kind.value, part, start, entity, signal),
        kind=kind.value,
        partition=part,
        entity=entity,
        signal=signal,
        cause="spike",
        window_start_ms=start,
        window_ms=keys.WINDOW_10S.size_ms,
        score=0.9,
        value=value,
        expected=value / 2,
        vector=rng.normal(size=anomaly.VECTOR_DIM).astype(np.float32),
    )


def add_devices_and_anomalies(r: redis.Redis) -> list[anomaly.AnomalyRecord]:
    """Positions of three devices and four anomalies, as the worker's apply writes them."""
    r.geoadd(keys.geo_key(0), (13.40, 52.52, "d1", 2.35, 48.85, "d2"))
    r.zadd(keys.seen_key(0), {"d1": NOW - 5_000, "d2": NOW - 20 * MIN})  # d2 is stale
    r.geoadd(keys.geo_key(2), (-0.12, 51.50, "d3"))
    r.zadd(keys.seen_key(2), {"d3": NOW - 2_000})
    recs = [
        _record(SENSOR, 0, T0 - MIN, "d1|temp", anomaly.Signal.MEAN, 30.0, 1),
        _record(SENSOR, 0, T0 - 2 * MIN, "d1|temp", anomaly.Signal.MAX, 40.0, 2),
        _record(SENSOR, 2, T0 - MIN, "d3|hum", anomaly.Signal.MEAN, 3.0, 3),
        _record(APPLOG, 1, T0 - MIN, "api", anomaly.Signal.LATENCY, 500.0, 4),
    ]
    for rec in recs:
        part = (EventKind(rec.kind), rec.partition)
        r.hset(keys.anomalies_key(*part), rec.id, anomaly.encode_record(rec))
        r.zadd(keys.anomaly_index_key(*part), {rec.id: rec.window_start_ms})
        r.xadd(
            keys.feed_key(*part),
            {"id": rec.id, "entity": rec.entity, "signal": rec.signal, "cause": rec.cause,
             "score": rec.score, "t": rec.window_start_ms, "value": rec.value},
        )  # fmt: skip
    return recs


def _app(monkeypatch: pytest.MonkeyPatch, port: int, tmp_path: Path, **params: str) -> AppTest:
    """Run the page once against ``port`` with its clock pinned to NOW and no cached reads."""
    monkeypatch.setenv("PULSE_STORE_HOST", "127.0.0.1")
    monkeypatch.setenv("PULSE_STORE_PORT", str(port))
    monkeypatch.delenv("PULSE_STORE_PASSWORD", raising=False)
    monkeypatch.setenv("PULSE_HOME", str(tmp_path))
    monkeypatch.setenv("PULSE_KAFKA_PARTITIONS", "3")
    # no broker listens here: the health section must say so, quickly
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        monkeypatch.setenv("PULSE_KAFKA_BOOTSTRAP", f"127.0.0.1:{s.getsockname()[1]}")
    monkeypatch.setenv("PULSE_DASHBOARD_KAFKA_TIMEOUT_S", "1")
    monkeypatch.setenv("PULSE_DASHBOARD_REFRESH_S", "5")
    monkeypatch.setattr(panels, "wall_clock_ms", lambda: NOW)
    st.cache_data.clear()
    st.cache_resource.clear()
    at = AppTest.from_file(str(APP), default_timeout=120)
    for name, value in params.items():
        at.query_params[name] = value
    return at.run()


def _text(at: AppTest) -> str:
    """Every text element of the page, joined (markdown, captions, infos, errors, warnings)."""
    parts = [m.value for m in at.markdown]
    parts += [c.value for c in at.caption]
    parts += [e.value for e in (*at.info, *at.error, *at.warning)]
    return "\n".join(str(p) for p in parts)


def test_populated_store(store: redis.Redis, monkeypatch: pytest.MonkeyPatch,
                         tmp_path: Path) -> None:  # fmt: skip
    populate(store)
    add_devices_and_anomalies(store)
    port = int(store.connection_pool.connection_kwargs["port"])
    frozen = gc.get_freeze_count()
    at = _app(monkeypatch, port, tmp_path, range="last 15m")
    # the server's start-up heap is out of the cycle collector's walks (once per process)
    assert gc.get_freeze_count() > frozen
    gc.unfreeze()  # this process is pytest's: give its heap back to the collector
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    text = _text(at)
    # tiles: anomalies in the range, active devices (seen since the start), data age
    assert "Anomalies" in text and "Active devices" in text and "Data as of" in text
    assert '<div style="font-size:1.6rem;font-weight:600">4</div>' in text  # 4 anomalies
    assert "0 s ago" in text  # every partition applied at NOW
    # Kafka is absent: one clear warning, the store panels still there
    assert any("Kafka at 127.0.0.1" in w.value for w in at.warning)
    assert "Consumer lag per partition" in text
    charts = at.get("arrow_vega_lite_chart") or at.get("vega_lite_chart")
    assert len(charts) >= 4  # per-metric bands, latency, services, map, device
    # the drill-down opens on the device with most anomalies
    assert at.selectbox(key="pulse_device").value == "d1"
    assert at.selectbox(key="pulse_similar_to").value is not None
    assert not at.exception


def test_absolute_range_from_the_url(store: redis.Redis, monkeypatch: pytest.MonkeyPatch,
                                     tmp_path: Path) -> None:  # fmt: skip
    populate(store)
    add_devices_and_anomalies(store)
    port = int(store.connection_pool.connection_kwargs["port"])
    at = _app(monkeypatch, port, tmp_path, **{"from": str(T0 - MIN), "to": str(T0)})
    assert not at.exception
    assert at.selectbox(key="pulse_range").value == "absolute"
    text = _text(at)
    assert "Fixed:" in text
    # two anomalies start in [T0 - 1m, T0) (plus the service one): d1 mean, d3 mean, api
    assert '<div style="font-size:1.6rem;font-weight:600">3</div>' in text
    at.text_input(key="pulse_to").set_value("yesterday").run()
    assert not at.exception
    assert any("expected a time" in e.value for e in at.sidebar.error)


def test_empty_store(store: redis.Redis, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    at = _app(monkeypatch, int(store.connection_pool.connection_kwargs["port"]), tmp_path)
    assert not at.exception
    assert any("empty" in i.value for i in at.info)
    assert "Pipeline and store health" in [h.value for h in at.subheader]


def test_empty_range(store: redis.Redis, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    populate(store)
    port = int(store.connection_pool.connection_kwargs["port"])
    # a fixed hour a day before the data
    at = _app(
        monkeypatch, port, tmp_path, **{"from": str(T0 - 1440 * MIN), "to": str(T0 - 1380 * MIN)}
    )
    assert not at.exception
    assert any("No data in this range" in i.value for i in at.info)


def test_unreachable_store(monkeypatch: pytest.MonkeyPatch, dead_port: int, tmp_path: Path) -> None:
    at = _app(monkeypatch, dead_port, tmp_path)
    assert not at.exception
    assert len(at.error) == 1 and "unreachable" in at.error[0].value
    assert "Traceback" not in at.error[0].value


def test_site_table_filters_and_orders(
    store: redis.Redis, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    populate(store)
    monkeypatch.setenv("PULSE_DASHBOARD_TOP_SITES", "1")
    port = int(store.connection_pool.connection_kwargs["port"])
    at = _app(monkeypatch, port, tmp_path, range="last 5m")
    assert not at.exception

    def sites() -> list[list[object]]:
        frame = next(d.value for d in at.dataframe if "site" in d.value.columns)
        return frame[["site", "metric", "readings"]].values.tolist()  # type: ignore[no-any-return]

    assert sites() == [["s1", "temp", 5]]
    assert any("1 of 2 site × metric rows, by readings" in c.value for c in at.caption)
    site = at.selectbox(key="pulse_site_filter")
    assert site.options == ["(all)", "s1", "s2"]
    site.set_value("s2").run()
    assert not at.exception
    assert sites() == [["s2", "hum", 2]]
    assert any("1 of 1 matching (2 in all)" in c.value for c in at.caption)
    at.selectbox(key="pulse_site_filter").set_value("(all)").run()
    at.selectbox(key="pulse_site_order").set_value("max").run()
    assert [row[0] for row in sites()] == ["s2"]  # max 50 beats 25
    at.selectbox(key="pulse_site_first").set_value("smallest first").run()
    assert [row[0] for row in sites()] == ["s1"]


def test_malformed_values_are_reported(
    store: redis.Redis, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    populate(store)
    store.hset(keys.window_key(SENSOR, 0, keys.WINDOW_1M, keys.Dim.SITE, T0), "s9|temp", "junk")
    at = _app(monkeypatch, int(store.connection_pool.connection_kwargs["port"]), tmp_path)
    assert not at.exception
    assert len(at.error) == 1 and "cannot read" in at.error[0].value


def test_refresh_off_and_a_preset_from_the_url(
    store: redis.Redis, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    populate(store)
    port = int(store.connection_pool.connection_kwargs["port"])
    at = _app(monkeypatch, port, tmp_path, range="last 6h", refresh="off")
    assert not at.exception
    assert at.selectbox(key="pulse_range").value == "last 6h"
    assert at.selectbox(key="pulse_refresh").value == "off"
    assert any("auto-refresh off" in c.value for c in at.caption)
    assert any(c.value.startswith("Live: last 6h") for c in at.caption)
    at.selectbox(key="pulse_range").set_value("last 5m").run()
    assert not at.exception
    assert any(c.value.startswith("Live: last 5m") for c in at.caption)
