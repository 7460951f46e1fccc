"""The Streamlit page of ``pulse dashboard``: a BI view of the store over a chosen time range.

Run with ``streamlit run dashboard/app.py`` (``pulse dashboard`` does that). The sidebar picks
the time range (relative presets or an absolute from/to, also taken from the URL's ``range``,
``from``, ``to`` and ``refresh`` query parameters) and the auto-refresh (or off). The live part
is one ``st.fragment(run_every=...)``: each run reads the store once for the range
(``dashboard.page.read_page``, shared by the sessions of one server per refresh tick) and
draws it (``dashboard.render``). Kafka is read apart with a short deadline, so the page works
without it.
"""

from __future__ import annotations

import gc
import threading
import time
from dataclasses import dataclass, field

import pandas as pd
import redis
import streamlit as st

from dashboard import anomalies, health, queries, render, timerange
from dashboard import panels as panels_module
from dashboard.page import DeviceView, PageData, default_device, metric_names, read_device
from dashboard.page import read_page as read_page_data
from dashboard.settings import DashboardSettings
from dashboard.similar import SimilarIndex, UnknownAnomalyError
from dashboard.timerange import RangeError, TimeRange
from schemas import packed
from schemas.events import EventKind
from schemas.kafka_probe import tls_mismatch
from schemas.settings import KafkaSettings, StoreSettings

_TOPOLOGY = "pulse_topology"
_TOPOLOGY_AT = "pulse_topology_at_ms"
_RANGE, _FROM, _TO, _REFRESH = "pulse_range", "pulse_from", "pulse_to", "pulse_refresh"
_DEVICE = "pulse_device"
_OFFSETS = "pulse_offsets"  # the stored offsets of the last refresh (their topics)
_FROM_URL = "pulse_from_url"
_RUNS, _FIRST_MS = "pulse_refreshes", "pulse_first_refresh_ms"
# how often the similar-anomaly index is reconciled with the store, at most
SIMILAR_EVERY_S = 300.0
PANE_CACHE_ENTRIES = 8192


@st.cache_resource(show_spinner=False)
def freeze_startup_heap() -> bool:
    """Exempt what the server allocated before its first page (Streamlit, pandas, numpy and
    the page's modules, about 110k objects) from the cycle collector, once per process.

    A full collection walks every tracked object: ~0.1 s on the project's 2-core machines,
    landing on whichever panel read was running (a panel's p99 of its own). Frozen, the
    collector walks only what the refreshes allocate. The worker does the same.
    """
    gc.collect()
    gc.freeze()
    return True


@st.cache_resource
def _client(host: str, port: int, db: int, password: str | None) -> redis.Redis:
    # binary replies: window values are packed bytes (the queries decode names themselves)
    store = StoreSettings(host=host, port=port, db=db, password=password)
    return queries.reader_client(store, timeout_s=2.0)


@st.cache_resource
def pane_cache(url: str) -> queries.PaneCache:
    """Final panes of the store at ``url``, shared by every session of this server.

    Room for a day of the ``1m`` panes a range reads (fleet, service and route panes of both
    kinds: about 6k), so a "last 24h" refresh reads only the panes still open.
    """
    return queries.PaneCache(max_entries=PANE_CACHE_ENTRIES)


@st.cache_resource
def write_sampler(url: str) -> health.WriteSampler:
    """The write counters of the store at ``url`` over the last hour (one per server)."""
    return health.WriteSampler()


@dataclass
class SimilarHolder:
    """This server's similar-anomaly index of one store, reconciled at most every 5 min."""

    index: SimilarIndex | None = None
    at: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def similar(
        self, r: redis.Redis, topo: queries.Topology, anomaly_id: str, k: int = 5
    ) -> pd.DataFrame:
        """The ``k`` stored anomalies most similar to ``anomaly_id`` (cosine of vectors)."""
        parts = [(kind, p) for kind in EventKind for p in topo.partitions.get(kind, ())]
        with self.lock:
            source = anomalies.StoreVectors(r, parts)
            if self.index is None:
                self.index = SimilarIndex.build(source)
                self.at = time.monotonic()
            elif time.monotonic() - self.at >= SIMILAR_EVERY_S or anomaly_id not in self.index:
                self.index.reconcile(source)
                self.at = time.monotonic()
            index = self.index
        rows = index.similar(anomaly_id, k)
        found = {rec.id: rec for rec in anomalies.get_many(r, [i for i, _ in rows]).records}
        return pd.DataFrame(
            [
                {
                    "time": pd.Timestamp(found[i].window_start_ms, unit="ms", tz="UTC"),
                    "anomaly": i,
                    "entity": found[i].entity,
                    "signal": found[i].signal,
                    "cause": found[i].cause,
                    "score": found[i].score,
                    "similarity": 1.0 - dist,
                }
                for i, dist in rows
                if i in found
            ]
        )


@st.cache_resource
def similar_holder(url: str) -> SimilarHolder:
    """The similar-anomaly index of the store at ``url`` (one per server)."""
    return SimilarHolder()


def shared_client(store: StoreSettings) -> redis.Redis:
    """The shared store client of this server process (binary replies)."""
    password = store.password.get_secret_value() if store.password else None
    return _client(store.host, store.port, store.db, password)


def topology(r: redis.Redis, settings: DashboardSettings, now_ms: int) -> queries.Topology:
    """Partitions and workers, rediscovered at most every ``discover_every_s`` per session."""
    at = st.session_state.get(_TOPOLOGY_AT)
    topo = st.session_state.get(_TOPOLOGY)
    if topo is None or at is None or now_ms - at >= settings.discover_every_s * 1000:
        topo = queries.discover(r, min_partitions=KafkaSettings().partitions)
        st.session_state[_TOPOLOGY] = topo
        st.session_state[_TOPOLOGY_AT] = now_ms
    return topo


def _url(r: redis.Redis) -> str:
    kw = r.get_connection_kwargs()  # a cluster client answers this too (its startup node)
    return f"redis://{kw.get('host')}:{kw.get('port')}/{kw.get('db', 0)}"


# Keyed by the refresh tick: the sessions open on one server share one read per tick and range.
@st.cache_data(ttl=60, max_entries=16, show_spinner=False)
def load_page(
    _r: redis.Redis,
    url: str,
    topo: queries.Topology,
    rng: TimeRange,
    now_ms: int,
    settings: DashboardSettings,
    site_view: queries.SiteView,
) -> PageData:
    """Every store read of one refresh (``url`` names the store ``_r`` reaches)."""
    return read_page_data(
        _r, topo, rng, now_ms, settings, pane_cache(url), write_sampler(url), site_view
    )


@st.cache_resource
def kafka_watch(bootstrap: str, samples: int, timeout_s: float) -> health.KafkaWatch:
    """Kafka's offsets and diverted samples, read in the background (one watch per server)."""

    def read(topics: tuple[str, ...], diverted: tuple[str, ...]) -> health.KafkaView:
        kafka = KafkaSettings()
        security = kafka.client_kwargs()  # TLS, when the broker speaks it
        try:
            return health.read_kafka(bootstrap, topics, diverted, samples, timeout_s, security)
        except health.KafkaUnavailableError:
            # the client reports a TLS mismatch as a broker that is down: say which it is
            at = kafka.model_copy(update={"bootstrap": bootstrap})
            if (mismatch := tls_mismatch(at, timeout_s)) is not None:
                raise health.KafkaUnavailableError(mismatch[:1].upper() + mismatch[1:]) from None
            raise

    return health.KafkaWatch(read, max_age_s=max(10.0, 2 * timeout_s))


def _kafka_topics(
    offsets: list[health.StoredOffset] | None,
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The input topics (configured, and those the store's offsets belong to) and the diverted
    ones."""
    k = KafkaSettings()
    stored = [o.topic for o in offsets or () if o.topic]
    inputs = tuple(dict.fromkeys([*stored, k.sensor_topic, k.applog_topic]))
    return inputs, (k.deadletter_topic, k.late_topic)


def _watch(settings: DashboardSettings) -> health.KafkaWatch:
    return kafka_watch(
        KafkaSettings().bootstrap, settings.diverted_samples, settings.kafka_timeout_s
    )


@st.cache_data(ttl=60, max_entries=32, show_spinner=False)
def load_device(
    _r: redis.Redis,
    url: str,
    topo: queries.Topology,
    device: str,
    metrics: tuple[str, ...],
    rng: TimeRange,
    now_ms: int,
) -> DeviceView:
    """One device's drill-down for a refresh tick."""
    return read_device(_r, topo, device, list(metrics), rng)


# --------------------------------------------------------------------------- controls


def _take_url_params() -> None:
    """Once per session: the URL's ``range``, ``from``/``to`` and ``refresh`` preset the
    sidebar's widgets."""
    state = st.session_state
    if state.get(_FROM_URL):
        return
    state[_FROM_URL] = True
    q = st.query_params
    if "from" in q and "to" in q:
        state[_RANGE] = timerange.ABSOLUTE
        state[_FROM], state[_TO] = q["from"], q["to"]
    elif q.get("range") in timerange.PRESETS:
        state[_RANGE] = q["range"]
    if q.get("refresh") in timerange.REFRESH:
        state[_REFRESH] = q["refresh"]


def _refresh_choices(settings: DashboardSettings) -> list[str]:
    own = f"{settings.refresh_s:g}s"
    known = [k for k, v in timerange.REFRESH.items() if v == settings.refresh_s]
    return list(timerange.REFRESH) if known else [*timerange.REFRESH, own]


Choice = str | TimeRange | None  # a preset label, a fixed range, or none (invalid input)


def controls(settings: DashboardSettings, now_ms: int) -> tuple[Choice, float | None]:
    """The sidebar: the range (a preset label, or a fixed range; None when the one typed is
    invalid, with the reason shown) and the seconds between refreshes (None: off)."""
    _take_url_params()
    state = st.session_state
    presets = [*timerange.PRESETS, timerange.ABSOLUTE]
    if state.get(_RANGE) not in presets:
        state[_RANGE] = (
            settings.default_range
            if settings.default_range in presets
            else timerange.DEFAULT_PRESET
        )
    side = st.sidebar
    side.header("Time range")
    label = side.selectbox("Range", presets, key=_RANGE)
    choice: Choice = label
    if label == timerange.ABSOLUTE:
        end = now_ms - now_ms % 60_000
        state.setdefault(_FROM, timerange.utc(end - 3_600_000))
        state.setdefault(_TO, timerange.utc(end))
        start_text = side.text_input("From (UTC, ISO 8601 or epoch)", key=_FROM)
        end_text = side.text_input("To (UTC, ISO 8601 or epoch)", key=_TO)
        try:
            choice = timerange.absolute(start_text, end_text)
        except RangeError as exc:
            side.error(f"{exc}.")
            choice = None
    choices = _refresh_choices(settings)
    if state.get(_REFRESH) not in choices:
        state[_REFRESH] = f"{settings.refresh_s:g}s"
    every = side.selectbox("Auto-refresh", choices, key=_REFRESH)
    refresh_s = timerange.REFRESH.get(every, settings.refresh_s)
    return choice, refresh_s


# --------------------------------------------------------------------------- the live part


def _device_section(
    r: redis.Redis, url: str, topo: queries.Topology, data: PageData, now_ms: int
) -> None:
    st.subheader("Devices")
    left, right = st.columns([3, 2])
    with left:
        render.device_map(data)
    with right:
        devices = data.devices["device"].tolist()
        if not devices:
            st.caption("No device to drill into.")
            return
        if st.session_state.get(_DEVICE) not in devices:
            st.session_state[_DEVICE] = default_device(data.devices)
        device = st.selectbox("Drill into device", devices, key=_DEVICE)
    metrics = tuple(metric_names(data.metrics))
    view = load_device(r, url, topo, str(device), metrics, data.range, now_ms)
    holder = similar_holder(url)

    def similar(anomaly_id: str) -> tuple[pd.DataFrame | None, str | None]:
        try:
            return holder.similar(r, topo, anomaly_id), None
        except UnknownAnomalyError:
            return None, f"Anomaly {anomaly_id} has no usable vector (zero or not finite)."

    render.device_drilldown(view, similar)


def _health_section(data: PageData, settings: DashboardSettings, url: str) -> None:
    k = KafkaSettings()
    defaults = {EventKind.SENSOR: k.sensor_topic, EventKind.APPLOG: k.applog_topic}
    inputs, diverted = _kafka_topics(data.offsets)
    watch = _watch(settings)
    watch.start(inputs, diverted)  # no-op unless the topics changed since the read began
    kafka, problem, _ = watch.result(settings.kafka_timeout_s)
    lag = health.consumer_lag(data.offsets, kafka.ends() if kafka else None, defaults)
    samples = write_sampler(url).samples()
    source = "AOF growth"
    rate, span = health.written_per_hour(samples, "aof_bytes", data.now_ms)
    if rate is None:
        rate, span = health.written_per_hour(samples, "repl_offset", data.now_ms)
        source = "replication stream"
    dead, late = diverted
    render.pipeline_health(data, lag, kafka, problem, dead, late, (rate, span, source))


def draw(
    r: redis.Redis,
    settings: DashboardSettings,
    choice: str | TimeRange,
    now_ms: int,
    spent: dict[str, float],
) -> PageData:
    """Read and draw one refresh of the range ``choice``; ``spent`` gets each part's ms."""
    at = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal at
        now = time.perf_counter()
        spent[name] = spent.get(name, 0.0) + (now - at) * 1000
        at = now

    url = _url(r)
    # Kafka is read in the background while the store is (the topics of the last refresh)
    _watch(settings).start(*_kafka_topics(st.session_state.get(_OFFSETS)))
    rng = choice if isinstance(choice, TimeRange) else timerange.relative(choice, now_ms)
    topo = topology(r, settings, now_ms)
    view = render.site_view(settings)
    data = load_page(r, url, topo, rng, now_ms, settings, view)
    st.session_state[_OFFSETS] = data.offsets
    lap("store")
    st.caption(
        f"{'Live: ' if rng.live else 'Fixed: '}{rng.label} · "
        f"{timerange.utc(rng.start_ms)} – {timerange.utc(rng.end_ms)} UTC"
    )
    if data.empty:
        st.info(
            "The store is empty: no partition has reported progress yet. "
            "Start `pulse worker` and `pulse loadgen`."
        )
        _health_section(data, settings, url)
        lap("health")
        return data
    render.kpi_tiles(data, settings)
    render.sensor_charts(data, settings)
    render.service_views(data)
    lap("charts")
    render.leaderboards(data)
    render.site_table(data, view)
    render.anomaly_feed(data)
    lap("tables")
    _device_section(r, url, topo, data, now_ms)
    lap("devices")
    _health_section(data, settings, url)
    lap("health")
    return data


def render_live(
    r: redis.Redis,
    settings: DashboardSettings,
    choice: str | TimeRange,
    refresh_s: float | None,
    now_ms: int,
) -> None:
    """One refresh: read, draw, and time it (shown in the footer); never a stack trace."""
    started = time.perf_counter()
    now_ms = timerange.tick(now_ms, refresh_s)
    spent: dict[str, float] = {}
    try:
        draw(r, settings, choice, now_ms, spent)
    except redis.RedisError as exc:
        st.error(
            f"The store at {_url(r)} is unreachable or failed: {exc}. "
            "The page tries again on the next refresh."
        )
    except packed.PackedError as exc:
        st.error(f"The store holds a window value the dashboard cannot read: {exc}")
    took_ms = (time.perf_counter() - started) * 1000
    state = st.session_state
    runs = int(state.get(_RUNS, 0)) + 1
    state[_RUNS] = runs
    first = float(state.setdefault(_FIRST_MS, took_ms))
    parts = ", ".join(f"{name} {ms:,.0f}" for name, ms in spent.items())
    every = "off" if refresh_s is None else f"every {refresh_s:g} s"
    st.caption(
        f"Updated {render.clock(now_ms)} UTC · refresh #{runs} took {took_ms:,.0f} ms "
        f"({parts}) · first refresh {first:,.0f} ms · auto-refresh {every}"
    )


def main() -> None:
    """Build the page; the live part reruns on its own every chosen refresh."""
    settings = DashboardSettings()
    store = StoreSettings()
    st.set_page_config(page_title="Pulse", layout="wide")
    freeze_startup_heap()
    st.title("Pulse")
    choice, refresh_s = controls(settings, panels_module.wall_clock_ms())
    st.sidebar.caption(f"Store {store.url()}")
    if choice is None:
        st.error("Pick a valid time range in the sidebar.")
        return
    r = shared_client(store)

    @st.fragment(run_every=refresh_s)
    def live() -> None:
        render_live(r, settings, choice, refresh_s, panels_module.wall_clock_ms())

    live()


if __name__ == "__main__":
    main()
