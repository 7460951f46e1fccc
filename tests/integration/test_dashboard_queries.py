"""The dashboard's queries against a real Valkey, with data written by the worker's code.

Uses the suite's ``store`` fixture (flushed per test). Window values go through the real write
path: ``pipeline.aggregation.aggregate`` deltas folded into a partition's
``pipeline.state.WindowState``, whose absolute packed values are set with HSET (and EXPIREAT),
as ``pulse_apply`` leaves them; over several partitions, panes and windows, including keys
just outside each query's range. The queries read through a binary client, as the page does,
and every number they return is checked against the raw values.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator, Sequence

import numpy as np
import pandas as pd
import pytest
import redis

from dashboard import panels, queries
from dashboard.settings import DashboardSettings
from pipeline.aggregation import Columns, aggregate
from pipeline.stack.testing import RunningStack
from pipeline.state import Retention, WindowState
from schemas import keys
from schemas import sketch as sketches
from schemas.events import EventKind
from schemas.settings import StoreSettings, store_client

pytestmark = pytest.mark.integration

SENSOR, APPLOG = EventKind.SENSOR, EventKind.APPLOG
W10, W1M = keys.WINDOW_10S, keys.WINDOW_1M
MIN = W1M.size_ms
# every window and dimension (the test writes whatever it wants into any of them)
PLAN = tuple(
    (w, tuple(d for dims in keys.DIMS.values() for d in dims)) for w in keys.TUMBLING_WINDOWS
)
# The test's clock is in 2023: keys must outlive it (EXPIREAT in the past deletes them).
RETENTION = Retention({w.name: 200 * 365 * 86_400 for w in keys.TUMBLING_WINDOWS})
STATUS_CLASS = {s: i for i, s in enumerate(keys.Stat.STATUS_CLASSES)}


@pytest.fixture
def dead_port() -> Iterator[int]:
    """A port nothing accepts on, reserved for the test: bound, never listening (refuses).

    Holding the socket keeps other processes (stacks started by parallel runs) off the port.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield int(s.getsockname()[1])


@pytest.fixture
def reader(stack: RunningStack, store: redis.Redis) -> Iterator[redis.Redis]:
    """The queries' client to the (flushed) store: binary replies, as the page builds it."""
    client = store_client(stack.store_settings, decode=False)
    try:
        yield client
    finally:
        client.close()


# --------------------------------------------------------------------------- writing helpers


class Writer:
    """Writes window values as a worker owning the partitions would: absolute packed values."""

    def __init__(self, r: redis.Redis) -> None:
        self.r = r
        self.states: dict[tuple[EventKind, int], WindowState] = {}

    def put(
        self,
        kind: EventKind,
        part: int,
        window: keys.TumblingWindow,
        dim: str,
        start: int,
        ent: str,
        values: Sequence[float],
        extra: dict[str, int] | None = None,
    ) -> None:
        """Add events with ``values`` to one entity of one window instance and dimension.

        ``extra`` (applog): how many of the events are errors (``err``) or of a status class
        (``"5xx"`` ...); the others are 2xx and not errors.
        """
        n = len(values)
        status = errors = None
        if kind is APPLOG:
            status = np.full(n, STATUS_CLASS["2xx"], dtype=np.int64)
            at = 0
            for name, count in (extra or {}).items():
                if name in STATUS_CLASS:
                    status[at : at + count] = STATUS_CLASS[name]
                    at += count
            errors = (np.arange(n) < (extra or {}).get("err", 0)).astype(np.float64)
        cols = Columns(
            start + np.arange(n, dtype=np.int64) % window.size_ms,
            np.asarray(values, dtype=np.float64),
            {dim: (np.zeros(n, dtype=np.int64), [ent])},
            status,
            errors,
        )
        state = self.states.setdefault((kind, part), WindowState(kind, part, PLAN))
        pipe = self.r.pipeline(transaction=False)
        for w in state.absorb(aggregate(cols, [(window, (dim,))]), RETENTION):
            pipe.hset(w.key, mapping=dict(zip(w.fields, w.values, strict=True)))
            pipe.expireat(w.key, w.expire_at_s)
        pipe.execute()

    def count_only(
        self, kind: EventKind, part: int, window: keys.TumblingWindow, start: int, **n: int
    ) -> None:
        """``n`` events (value 1.0) of fleet-wide entities (sensor metrics, or applog ``all``)."""
        for ent, count in n.items():
            self.put(kind, part, window, queries.FLEET_DIM[kind], start, ent, [1.0] * count)


def progress(r: redis.Redis, kind: EventKind, part: int, **fields: int) -> None:
    r.hset(keys.progress_key(kind, part), mapping={k: str(v) for k, v in fields.items()})


# A fixed minute boundary: the queries take ``now_ms``, and the page tests pin the page's clock
# (``dashboard.panels.wall_clock_ms``) to NOW, so no result depends on when the tests run.
T0 = keys.window_start(1_700_000_000_000, W1M)
NOW = T0 + 25_000

ORDERS = [float(x) for x in range(200, 900, 7)]  # api|/orders, high latency
HEALTH = [1.0, 1.5, 2.0, 2.5, 3.0] * 2
WEB = [50.0, 60.0, 70.0, 80.0, 100.0]
LAT_A, LAT_B, LAT_C = [5.0, 7.0, 9.0, 11.0], [100.0, 3.0, 40.0], [12.0, 13.0]
S1_A, S1_B, S2 = [20.0, 21.0, 22.0], [25.0, 19.0], [40.0, 50.0]


def populate(r: redis.Redis) -> None:
    """Progress, workers and windows over sensor partitions 0, 2 and applog partitions 0, 1."""
    progress(r, SENSOR, 0, offset=99, watermark=NOW - 40_000, max_event_time=NOW - 10_000)
    progress(r, SENSOR, 2, offset=49, watermark=NOW - 35_000, max_event_time=NOW - 5_000)
    progress(r, APPLOG, 0, offset=19, watermark=NOW - 42_000, max_event_time=NOW - 20_000)
    progress(r, APPLOG, 1, offset=29, watermark=NOW - 45_000, max_event_time=NOW - 15_000)
    for kind, part, events, late, dead in (
        (SENSOR, 0, 100, 3, 1),
        (SENSOR, 2, 50, 0, 2),
        (APPLOG, 0, 20, 0, 0),
        (APPLOG, 1, 30, 1, 0),
    ):
        progress(r, kind, part, events=events, late=late, dead=dead, batches=2, updated_ms=NOW)
    r.hset(
        keys.worker_key("w1"),
        mapping={
            "durability_wait_p50_ms": "2.5",
            "durability_wait_p99_ms": "7.0",
            "batches": "10",
            "host": "box-1",
        },
    )
    r.hset(
        keys.worker_key("w2"),
        mapping={"durability_wait_p50_ms": "3", "durability_wait_p99_ms": "6"},
    )
    w = Writer(r)

    # 10 s fleet windows. Sensor frontier NOW-35 s = T0-10 s: complete windows T0-40..T0-20 s.
    w.count_only(SENSOR, 0, W10, T0 - 20_000, temp=10, hum=5)
    w.count_only(SENSOR, 2, W10, T0 - 30_000, temp=6)
    w.count_only(SENSOR, 2, W10, T0 - 10_000, temp=1000)  # ends after the frontier
    w.count_only(SENSOR, 0, W10, T0 - 50_000, temp=77)  # older than the rate windows
    # Applog frontier NOW-42 s = T0-17 s: complete windows T0-50..T0-30 s.
    w.count_only(APPLOG, 1, W10, T0 - 50_000, all=9)
    w.count_only(APPLOG, 0, W10, T0 - 40_000, all=6)
    w.count_only(APPLOG, 1, W10, T0 - 30_000, all=3)
    w.count_only(APPLOG, 0, W10, T0 - 20_000, all=500)

    # 1 m fleet windows: the complete minutes before NOW are T0-3m, T0-2m, T0-1m.
    w.put(SENSOR, 0, W1M, "metric", T0 - MIN, "temp", [1.0] * 20)
    w.put(SENSOR, 0, W1M, "metric", T0 - MIN, "hum", [2.0] * 4)
    w.put(SENSOR, 2, W1M, "metric", T0 - MIN, "temp", [3.0] * 7)
    w.put(SENSOR, 2, W1M, "metric", T0 - 3 * MIN, "hum", [4.0] * 2)
    w.put(SENSOR, 0, W1M, "metric", T0, "temp", [1.0] * 99)  # current minute
    w.put(SENSOR, 0, W1M, "metric", T0 - 4 * MIN, "temp", [1.0] * 55)  # before lookback
    w.put(APPLOG, 1, W1M, "fleet", T0 - 2 * MIN, "all", LAT_C + [1.0] * 6)
    w.put(APPLOG, 1, W1M, "fleet", T0 - MIN, "all", [*LAT_A, 20.0])
    w.put(APPLOG, 0, W1M, "fleet", T0 - MIN, "all", LAT_B[:1])
    w.put(APPLOG, 0, W1M, "fleet", T0 - MIN, "all", LAT_B[1:])  # same key again: adds up
    w.put(APPLOG, 0, W1M, "fleet", T0, "all", [5000.0] * 3)  # current minute

    # Routes per 1 m pane; the hopping window at NOW spans panes T0-4m .. T0.
    w.put(APPLOG, 0, W1M, "route", T0, "api|/orders", ORDERS[:40], {"err": 1, "5xx": 1})
    w.put(APPLOG, 1, W1M, "route", T0 - 2 * MIN, "api|/orders", ORDERS[40:], {"5xx": 2})
    w.put(APPLOG, 1, W1M, "route", T0 - 5 * MIN, "api|/orders", [9e4] * 50, {"5xx": 50})
    w.put(APPLOG, 0, W1M, "route", T0 - MIN, "api|/health", HEALTH, {"2xx": 10})
    w.put(APPLOG, 1, W1M, "route", T0 - 4 * MIN, "web|/", WEB, {"err": 5})

    # Sites per 1 m pane.
    w.put(SENSOR, 0, W1M, "site", T0 - MIN, "s1|temp", S1_A)
    w.put(SENSOR, 2, W1M, "site", T0, "s1|temp", S1_B)
    w.put(SENSOR, 2, W1M, "site", T0 - 2 * MIN, "s2|hum", S2)
    w.put(SENSOR, 0, W1M, "site", T0 - 5 * MIN, "s1|temp", [1000.0])  # outside the window


def _q(values: Sequence[float], qs: Sequence[float]) -> list[float | None]:
    return sketches.quantiles(sketches.sketch_of(values), qs)


def approx(values: Sequence[float | None]) -> object:
    """Sketch estimates as the one-at-a-time reference computes them (to the last bits)."""
    return pytest.approx(values, rel=1e-12)


# --------------------------------------------------------------------------- queries


def test_discover_finds_partitions_and_workers(store: redis.Redis, reader: redis.Redis) -> None:
    populate(store)
    topo = queries.discover(reader, scan_count=10)
    assert topo.partitions == {SENSOR: (0, 2), APPLOG: (0, 1)}
    assert topo.workers == ("w1", "w2")
    assert queries.discover(reader, min_partitions=3).partitions == {
        SENSOR: (0, 1, 2),
        APPLOG: (0, 1, 2),
    }


def test_window_values_are_the_worker_layout(store: redis.Redis) -> None:
    populate(store)
    key = keys.window_key(APPLOG, 0, W1M, keys.Dim.ROUTE, T0)
    assert store.hkeys(key) == ["api|/orders"]
    assert store.ttl(key) > 0


def test_queries_refuse_a_decoding_client(store: redis.Redis) -> None:
    with pytest.raises(TypeError, match="decode"):
        queries.read_kpis(store, queries.Topology.of(1), NOW)


def test_kpis(store: redis.Redis, reader: redis.Redis) -> None:
    populate(store)
    k = queries.read_kpis(reader, queries.Topology.of(3, ["w1", "w2", "gone"]), NOW, rate_windows=3)
    assert not k.empty
    assert (k.events, k.late, k.dead) == (200, 4, 3)
    assert k.progress[SENSOR].partitions == 2 and k.progress[SENSOR].batches == 4
    assert k.events_per_s[SENSOR] == pytest.approx((10 + 5 + 6) / 30)
    assert k.events_per_s[APPLOG] == pytest.approx((9 + 6 + 3) / 30)
    assert k.newest_event_ms == NOW - 5_000
    assert k.watermark_ms == NOW - 45_000 and k.watermark_lag_ms == 45_000
    assert (k.durability_p50_ms, k.durability_p99_ms) == (3.0, 7.0)
    assert k.workers["w1"] == {
        "durability_wait_p50_ms": 2.5,
        "durability_wait_p99_ms": 7.0,
        "batches": 10.0,
    }
    assert k.workers["gone"] == {}
    # one 10 s window only: the latest complete one
    k1 = queries.read_kpis(reader, queries.Topology.of(3), NOW, rate_windows=1)
    assert k1.events_per_s == {SENSOR: pytest.approx(15 / 10), APPLOG: pytest.approx(3 / 10)}


def test_events_per_minute(store: redis.Redis, reader: redis.Redis) -> None:
    populate(store)
    df = queries.read_events_per_minute(reader, queries.Topology.of(3), NOW, lookback_min=3)
    expected_index = pd.to_datetime([T0 - 3 * MIN, T0 - 2 * MIN, T0 - MIN], unit="ms", utc=True)
    assert list(df.index) == list(expected_index)
    assert df["sensor"].tolist() == [2, 0, 31]
    assert df["applog"].tolist() == [0, 8, 8]
    assert list(df.columns) == ["sensor", "applog"]
    assert (df.dtypes == "int64").all()


def test_latency_per_minute(store: redis.Redis, reader: redis.Redis) -> None:
    populate(store)
    df = queries.read_latency_per_minute(reader, queries.Topology.of(3), NOW, lookback_min=3)
    assert list(df.columns) == ["p50", "p95", "p99"]
    qs = (0.5, 0.95, 0.99)
    assert df.iloc[0].isna().all()
    assert df.iloc[1].tolist() == approx(_q(LAT_C + [1.0] * 6, qs))
    assert df.iloc[2].tolist() == approx(_q([*LAT_A, 20.0, *LAT_B], qs))


def test_top_routes(store: redis.Redis, reader: redis.Redis) -> None:
    populate(store)
    df = queries.read_top_routes(reader, queries.Topology.of(3), NOW, limit=10)
    assert list(df.columns) == list(queries.ROUTE_COLUMNS)
    assert df[["service", "route", "requests"]].values.tolist() == [
        ["api", "/orders", len(ORDERS)],
        ["web", "/", 5],
        ["api", "/health", 10],
    ]
    p50, p99 = zip(*(_q(v, (0.5, 0.99)) for v in (ORDERS, WEB, HEALTH)), strict=True)
    assert df["p50_ms"].tolist() == approx(p50)
    assert df["p99_ms"].tolist() == approx(p99)
    assert df["error_rate"].tolist() == [1 / len(ORDERS), 1.0, 0.0]
    assert df["rate_5xx"].tolist() == [3 / len(ORDERS), 0.0, 0.0]
    top = queries.read_top_routes(reader, queries.Topology.of(3), NOW, limit=1)
    assert top["route"].tolist() == ["/orders"]


def test_top_routes_breaks_ties_by_errors_then_name(
    store: redis.Redis, reader: redis.Redis
) -> None:
    w = Writer(store)
    for i, (service, route, errors) in enumerate(
        [("b", "/y", 0), ("a", "/z", 0), ("a", "/y", 0), ("c", "/x", 1), ("d", "/slow", 0)]
    ):
        latency = [900.0] * 3 if route == "/slow" else [10.0] * 3
        w.put(
            APPLOG,
            i % 2,
            W1M,
            keys.Dim.ROUTE,
            T0 - MIN,
            f"{service}|{route}",
            latency,
            {"err": errors},
        )
    df = queries.read_top_routes(reader, queries.Topology.of(2), NOW, limit=3)
    assert df[["service", "route"]].values.tolist() == [["d", "/slow"], ["c", "/x"], ["a", "/y"]]


def test_site_metrics(store: redis.Redis, reader: redis.Redis) -> None:
    populate(store)
    got = queries.read_site_metrics(reader, queries.Topology.of(3), NOW)
    df = got.rows
    assert list(df.columns) == list(queries.SITE_COLUMNS)
    s1, s2 = S1_A + S1_B, S2
    assert df[["site", "metric", "readings", "min", "max"]].values.tolist() == [
        ["s1", "temp", 5, 19.0, 25.0],
        ["s2", "hum", 2, 40.0, 50.0],
    ]
    assert df["mean"].tolist() == pytest.approx([np.mean(s1), np.mean(s2)], rel=1e-12)
    assert df["p95"].tolist() == approx([_q(s1, (0.95,))[0], _q(s2, (0.95,))[0]])
    assert (got.matching, got.total) == (2, 2)
    assert (got.sites, got.metrics) == (("s1", "s2"), ("hum", "temp"))
    assert not got.empty


def _site_truth(raw: dict[tuple[str, str], list[float]], view: queries.SiteView) -> pd.DataFrame:
    """The site table recomputed from the raw readings, as ``view`` picks and orders rows."""
    rows = []
    for (site, metric), values in raw.items():
        if view.site not in (None, site) or view.metric not in (None, metric):
            continue
        v = np.asarray(values)
        rows.append([site, metric, v.size, v.mean(), _q(values, (0.95,))[0], v.min(), v.max()])
    frame = pd.DataFrame(rows, columns=list(queries.SITE_COLUMNS))
    key = frame[view.order_by] if view.ascending else -frame[view.order_by]
    order = np.lexsort((frame["metric"], frame["site"], key.to_numpy(dtype=float)))
    return frame.iloc[order[: view.limit]].reset_index(drop=True)


def _check_sites(
    got: queries.SiteMetrics, raw: dict[tuple[str, str], list[float]], view: queries.SiteView
) -> None:
    want = _site_truth(raw, view)
    assert got.rows[["site", "metric", "readings", "min", "max"]].values.tolist() == (
        want[["site", "metric", "readings", "min", "max"]].values.tolist()
    )
    assert got.rows["mean"].tolist() == pytest.approx(want["mean"].tolist(), rel=1e-12)
    assert got.rows["p95"].tolist() == approx(want["p95"].tolist())
    matching = [k for k in raw if view.site in (None, k[0]) and view.metric in (None, k[1])]
    assert (got.matching, got.total) == (len(matching), len(raw))
    assert got.sites == tuple(sorted({k[0] for k in raw}))
    assert got.metrics == tuple(sorted({k[1] for k in raw}))


SITE_VIEWS = [
    queries.SiteView(limit=5),
    queries.SiteView(limit=4, order_by="max"),
    queries.SiteView(limit=6, order_by="mean", ascending=True),
    queries.SiteView(limit=3, order_by="min", ascending=True, metric="hum"),
    queries.SiteView(limit=5, order_by="p95"),
    queries.SiteView(limit=2, order_by="p95", ascending=True, site="s03"),
    queries.SiteView(limit=50, site="s05", metric="temp"),
    queries.SiteView(limit=3, site="nowhere"),
]


def _write_sites(
    w: Writer,
    rng: np.random.Generator,
    starts: Sequence[int],
    raw: dict[tuple[str, str], list[float]],
) -> None:
    """Random readings of 8 sites x 3 metrics over partitions 0-2 and the panes ``starts``."""
    for start in starts:
        for part in range(3):
            for site in range(8):
                for metric in ("temp", "hum", "co2"):
                    if rng.random() < 0.5:
                        continue
                    # few distinct counts: the limit cuts through ties, broken by name
                    values = rng.integers(0, 40, int(rng.integers(1, 4))).astype(float).tolist()
                    raw.setdefault((f"s{site:02d}", metric), []).extend(values)
                    w.put(SENSOR, part, W1M, "site", start, f"s{site:02d}|{metric}", values)


def test_site_metrics_top_rows_equal_truth_cached_or_not(
    store: redis.Redis, reader: redis.Redis
) -> None:
    """Every view (order, direction, filters, limit) over final and open panes, cached or not."""
    rng = np.random.default_rng(11)
    raw: dict[tuple[str, str], list[float]] = {}
    w = Writer(store)
    # a pane before the window and after now: never in the table
    w.put(SENSOR, 0, W1M, "site", T0 - 5 * MIN, "s00|temp", [1e6])
    w.put(SENSOR, 1, W1M, "site", T0 + MIN, "s00|temp", [-1e6])
    _write_sites(w, rng, [T0 - k * MIN for k in range(4, -1, -1)], raw)
    for p in range(3):  # panes up to T0 - 2 min are final, T0 - 1 min and T0 open
        progress(store, SENSOR, p, watermark=T0 - MIN + 5_000 + p)
    topo = queries.discover(reader)
    cache = queries.PaneCache()
    for view in SITE_VIEWS:
        _check_sites(queries.read_site_metrics(reader, topo, NOW, view), raw, view)
        for _ in range(2):  # the second read merges the open panes into the cached roll-up
            _check_sites(queries.read_site_metrics(reader, topo, NOW, view, cache=cache), raw, view)
    # the open panes change: the cached roll-up of the final ones and fresh reads still agree
    _write_sites(w, rng, [T0 - MIN, T0], raw)
    for view in SITE_VIEWS:
        _check_sites(queries.read_site_metrics(reader, topo, NOW, view, cache=cache), raw, view)
    # a pane becomes final: the roll-up grows by it
    for p in range(3):
        progress(store, SENSOR, p, watermark=T0 + 1_000)
    for view in SITE_VIEWS[:3]:
        _check_sites(queries.read_site_metrics(reader, topo, NOW, view, cache=cache), raw, view)
    # the store is emptied: nothing comes from the cache
    store.flushall()
    assert queries.read_site_metrics(reader, topo, NOW, cache=cache).empty


def test_site_metrics_next_minute_reads_only_the_panes_not_final(
    store: redis.Redis, reader: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A minute later the hopping window moves: its final panes come from the cache."""
    rng = np.random.default_rng(5)
    panes: dict[int, dict[tuple[str, str], list[float]]] = {}
    w = Writer(store)
    for k in range(4, -2, -1):
        _write_sites(w, rng, [T0 - k * MIN], panes.setdefault(T0 - k * MIN, {}))
    for p in range(3):
        progress(store, SENSOR, p, watermark=T0 + 1_000)  # panes before T0 are final
    topo = queries.discover(reader)
    cache = queries.PaneCache()
    view = queries.SiteView(limit=6, order_by="max")
    queries.read_site_metrics(reader, topo, NOW, view, cache=cache)

    for p in range(3):  # a minute later T0 is final too
        progress(store, SENSOR, p, watermark=T0 + MIN + 1_000)
    read: list[bytes] = []
    stream = queries.stream_raw

    def spy(r: redis.Redis, commands: Sequence[bytes], ahead: int | None = None) -> object:
        read.extend(c for c in commands if c.startswith(b"*2\r\n$7\r\nHGETALL"))
        return stream(r, commands, ahead)

    monkeypatch.setattr(queries, "stream_raw", spy)
    got = queries.read_site_metrics(reader, topo, NOW + MIN, view, cache=cache)
    raw: dict[tuple[str, str], list[float]] = {}
    for k in range(3, -2, -1):
        for key, values in panes[T0 - k * MIN].items():
            raw.setdefault(key, []).extend(values)
    _check_sites(got, raw, view)
    # T0 (open when first read) and T0 + 1 min, from 3 partitions; T0 - 3 .. T0 - 1 min cached
    assert len(read) == 2 * 3
    assert all(str(T0 - MIN).encode() not in c for c in read)
    assert sum(str(T0).encode() in c for c in read) == 3


def test_empty_store(reader: redis.Redis) -> None:
    topo = queries.discover(reader, min_partitions=2)
    k = queries.read_kpis(reader, topo, NOW)
    assert k.empty and k.events == 0 and k.events_per_s == {SENSOR: None, APPLOG: None}
    per_minute = queries.read_events_per_minute(reader, topo, NOW, 5)
    assert per_minute.shape == (5, 2) and int(per_minute.to_numpy().sum()) == 0
    assert queries.read_latency_per_minute(reader, topo, NOW, 5).isna().all().all()
    assert queries.read_top_routes(reader, topo, NOW).empty
    assert queries.read_site_metrics(reader, topo, NOW).empty
    # no partitions at all
    none = queries.Topology({SENSOR: (), APPLOG: ()})
    assert queries.read_events_per_minute(reader, none, NOW, 2).to_numpy().tolist() == [[0, 0]] * 2
    assert queries.read_site_metrics(reader, none, NOW, cache=queries.PaneCache()).empty


def test_cached_panels_equal_uncached_ones(store: redis.Redis, reader: redis.Redis) -> None:
    populate(store)
    topo = queries.discover(reader)  # every partition read has a watermark: panes can be final
    settings = DashboardSettings(lookback_min=10, top_routes=10)
    plain = panels.read_panels(reader, topo, NOW, settings)
    cache = queries.PaneCache()
    first = panels.read_panels(reader, topo, NOW, settings, cache)
    assert len(cache) > 0
    hits = cache.hits
    second = panels.read_panels(reader, topo, NOW, settings, cache)
    assert cache.hits > hits
    for got in (first, second):
        assert got.kpis == plain.kpis
        for name in ("per_minute", "latency", "routes"):
            pd.testing.assert_frame_equal(getattr(got, name), getattr(plain, name))
        pd.testing.assert_frame_equal(got.sites.rows, plain.sites.rows)
        assert got.sites.total == plain.sites.total == 2
    # an emptied store (progress hashes gone) is not served from the cache
    store.flushall()
    after = panels.read_panels(reader, topo, NOW, settings, cache)
    assert int(after.per_minute.to_numpy().sum()) == 0 and after.latency.isna().all().all()
    assert after.routes.empty and after.sites.empty


def test_resp2_reader_reads_the_same_panels(store: redis.Redis, stack: RunningStack) -> None:
    """The page's client speaks RESP2 (hashes as flat lists): the panels are the same."""
    populate(store)
    settings = DashboardSettings(lookback_min=10)
    resp3 = store_client(stack.store_settings, decode=False)
    resp2 = queries.reader_client(stack.store_settings)
    try:
        assert resp2.connection_pool.connection_kwargs["protocol"] == 2
        topo = queries.discover(resp2)
        for cache in (None, queries.PaneCache()):
            a = panels.read_panels(resp3, topo, NOW, settings, cache)
            b = panels.read_panels(resp2, topo, NOW, settings, cache)
            assert a.kpis == b.kpis
            for name in ("per_minute", "latency", "routes"):
                pd.testing.assert_frame_equal(getattr(a, name), getattr(b, name))
            pd.testing.assert_frame_equal(a.sites.rows, b.sites.rows)
    finally:
        resp2.close()
        resp3.close()


def test_malformed_value_raises_packed_error(store: redis.Redis, reader: redis.Redis) -> None:
    from schemas import packed

    store.hset(keys.window_key(SENSOR, 0, W1M, keys.Dim.SITE, T0), "s1|temp", "not packed")
    with pytest.raises(packed.PackedError):
        queries.read_site_metrics(reader, queries.Topology.of(1), NOW)


def test_unreachable_store_raises_redis_error(dead_port: int) -> None:
    r = store_client(StoreSettings(host="127.0.0.1", port=dead_port), timeout_s=0.5)
    with pytest.raises(redis.ConnectionError):
        queries.read_kpis(r, queries.Topology.of(2), NOW)


# The page itself (dashboard/app.py) is tested in test_dashboard_page.py.


def test_pane_cache_serves_final_panes_and_rereads_open_ones(
    store: redis.Redis, reader: redis.Redis
) -> None:
    from dashboard.queries import PaneCache, read_panes

    kind, window, dim = EventKind.APPLOG, keys.WINDOW_1M, keys.Dim.FLEET
    closed, open_ = 600_000, 660_000
    w = Writer(store)
    for p in (0, 1):
        # watermark 660_000: the pane [600_000, 660_000) is final, [660_000, 720_000) is not
        store.hset(keys.progress_key(kind, p), keys.Progress.WATERMARK, 660_000)
        for start in (closed, open_):
            w.put(kind, p, window, dim, start, "all", [40.0] * 5)
    cache = PaneCache()
    first = read_panes(reader, kind, [0, 1], window, dim, [closed, open_], cache)
    assert [p.table.stats[0, 0] for p in first] == [10.0, 10.0]
    assert [p.names.tolist() for p in first] == [["all"], ["all"]]
    assert cache.misses == 2 and cache.hits == 0 and len(cache) == 1

    for p in (0, 1):
        w.put(kind, p, window, dim, open_, "all", [41.0])
    second = read_panes(reader, kind, [0, 1], window, dim, [closed, open_], cache)
    assert cache.hits == 1  # the final pane was not read again
    assert [p.table.stats[0, 0] for p in second] == [10.0, 12.0]  # the open one was

    # a watermark that goes back (store reset, replay) empties the cache
    store.hset(keys.progress_key(kind, 0), keys.Progress.WATERMARK, 100)
    store.delete(*(keys.window_key(kind, p, window, dim, closed) for p in (0, 1)))
    Writer(store).put(kind, 0, window, dim, closed, "all", [1.0, 2.0])
    third = read_panes(reader, kind, [0, 1], window, dim, [closed, open_], cache)
    assert third[0].table.stats[0, 0] == 2.0
    assert len(cache) == 0  # partition 0's watermark (100) makes no pane final
