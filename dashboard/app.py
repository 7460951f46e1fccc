"""The Streamlit page of ``pulse dashboard``: live KPIs, charts and tables read from the store.

Run with ``streamlit run dashboard/app.py`` (``pulse dashboard`` does that). The live part is one
``st.fragment(run_every=...)`` that reruns :func:`render_live` every few seconds; all data comes
from ``dashboard.queries``, so the data logic is testable without Streamlit.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pandas as pd
import redis
import streamlit as st

from dashboard import panels as panels_module
from dashboard import queries
from dashboard.panels import Panels, read_panels
from dashboard.settings import DashboardSettings
from schemas import keys, packed
from schemas.events import EventKind
from schemas.settings import KafkaSettings, StoreSettings

_TOPOLOGY = "pulse_topology"
_TOPOLOGY_AT = "pulse_topology_at_ms"
# the site table's widgets (session state keys)
_SITE = "pulse_site_filter"
_METRIC = "pulse_metric_filter"
_ORDER = "pulse_site_order"
_FIRST = "pulse_site_first"
ALL = "(all)"
_LARGEST, _SMALLEST = "largest first", "smallest first"


@st.cache_resource
def _client(host: str, port: int, db: int, password: str | None) -> redis.Redis:
    # binary replies: window values are packed bytes (the queries decode names themselves)
    store = StoreSettings(host=host, port=port, db=db, password=password)
    return queries.reader_client(store, timeout_s=2.0)


@st.cache_resource
def pane_cache(url: str) -> queries.PaneCache:
    """Final panes of the store at ``url``, shared by every session of this server."""
    return queries.PaneCache()


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


def _clock(ms: int | None, utc_suffix: bool = True) -> str:
    if ms is None:
        return "–"
    text = datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%H:%M:%S")
    return f"{text} UTC" if utc_suffix else text


def _seconds(ms: float | None) -> str:
    return "–" if ms is None else f"{ms / 1000:,.1f} s"


def _num(x: float | None, fmt: str = "{:,.0f}") -> str:
    return "–" if x is None else fmt.format(x)


def render_kpis(k: queries.Kpis) -> None:
    """The headline metrics row."""
    cols = st.columns(7)
    cols[0].metric("Events", _num(k.events))
    rate = k.events_per_s
    cols[1].metric(
        "Events/s",
        _num(k.total_events_per_s, "{:,.1f}"),
        help=(
            f"sensor {_num(rate.get(EventKind.SENSOR), '{:,.1f}')}, "
            f"applog {_num(rate.get(EventKind.APPLOG), '{:,.1f}')}; "
            "over the last complete 10 s windows"
        ),
    )
    cols[2].metric("Late", _num(k.late))
    cols[3].metric("Dead-letter", _num(k.dead))
    cols[4].metric("Newest event (UTC)", _clock(k.newest_event_ms, utc_suffix=False))
    cols[5].metric(
        "Watermark lag",
        _seconds(k.watermark_lag_ms),
        help=f"watermark {_clock(k.watermark_ms)} (min over partitions)",
    )
    cols[6].metric(
        "Durable ack p50/p99 ms",
        f"{_num(k.durability_p50_ms, '{:,.1f}')}/{_num(k.durability_p99_ms, '{:,.0f}')}",
        help="time the worker waits for WAITAOF (worst over workers)",
    )


def _progress_table(k: queries.Kpis) -> pd.DataFrame:
    rows = [
        {
            "kind": kind.value,
            "partitions": p.partitions,
            "events": p.events,
            "late": p.late,
            "dead": p.dead,
            "batches": p.batches,
            "newest event": _clock(p.max_event_time_ms),
            "watermark": _clock(p.watermark_ms),
        }
        for kind, p in k.progress.items()
    ]
    return pd.DataFrame(rows)


# Keyed by the refresh tick (``now_ms`` rounded down to ``refresh_s``): the sessions open on
# one server share one set of reads per tick instead of each reading the store.
@st.cache_data(ttl=60, max_entries=16, show_spinner=False)
def load_panels(
    _r: redis.Redis,
    url: str,
    topo: queries.Topology,
    now_ms: int,
    settings: DashboardSettings,
    site_view: queries.SiteView,
) -> Panels:
    """Every panel at ``now_ms`` (``url`` names the store ``_r`` reaches, for the cache key)."""
    return read_panels(_r, topo, now_ms, settings, pane_cache(url), site_view)


def site_view(settings: DashboardSettings) -> queries.SiteView:
    """The site table's rows as its widgets (their session state) choose them."""
    state = st.session_state
    site, metric = state.get(_SITE, ALL), state.get(_METRIC, ALL)
    order = state.get(_ORDER, queries.SITE_ORDER[0])
    return queries.SiteView(
        limit=settings.top_sites,
        order_by=order if order in queries.SITE_ORDER else queries.SITE_ORDER[0],
        ascending=state.get(_FIRST) == _SMALLEST,
        site=None if site == ALL else site,
        metric=None if metric == ALL else metric,
    )


def _choices(values: tuple[str, ...], chosen: str | None) -> list[str]:
    # a chosen value the window no longer has stays selectable (its filter then shows no rows)
    extra = [chosen] if chosen is not None and chosen not in values else []
    return [ALL, *extra, *values]


def render_sites(sites: queries.SiteMetrics, view: queries.SiteView, since: str) -> None:
    """The site table: its filters and order, the top rows, and how many rows there are."""
    st.subheader(f"Sites and metrics ({since})")
    cols = st.columns(4)
    cols[0].selectbox("Site", _choices(sites.sites, view.site), key=_SITE)
    cols[1].selectbox("Metric", _choices(sites.metrics, view.metric), key=_METRIC)
    cols[2].selectbox("Order by", queries.SITE_ORDER, key=_ORDER)
    cols[3].selectbox("Show", (_LARGEST, _SMALLEST), key=_FIRST)
    if sites.empty:
        st.caption("No readings in this window.")
        return
    filtered = view.site is not None or view.metric is not None
    of = f"{sites.matching:,} matching ({sites.total:,} in all)" if filtered else f"{sites.total:,}"
    st.caption(f"{len(sites.rows):,} of {of} site × metric rows, by {view.order_by}")
    if not sites.rows.empty:
        st.dataframe(
            sites.rows,
            hide_index=True,
            column_config={
                c: st.column_config.NumberColumn(c, format="%.2f")
                for c in ("mean", "p95", "min", "max")
            },
        )


def _url(r: redis.Redis) -> str:
    kw = r.connection_pool.connection_kwargs
    return f"redis://{kw.get('host')}:{kw.get('port')}/{kw.get('db', 0)}"


def render_live(r: redis.Redis, settings: DashboardSettings, now_ms: int) -> None:
    """Everything that refreshes: read the store (once per tick) and draw it."""
    tick_ms = round(settings.refresh_s * 1000)
    now_ms -= now_ms % tick_ms
    view = site_view(settings)
    try:
        topo = topology(r, settings, now_ms)
        panels = load_panels(r, _url(r), topo, now_ms, settings, view)
    except redis.RedisError as exc:
        st.error(f"The store is unreachable or failed: {exc}")
        return
    except packed.PackedError as exc:
        st.error(f"The store holds a window value the dashboard cannot read: {exc}")
        return
    kpis, per_minute, latency = panels.kpis, panels.per_minute, panels.latency
    routes, sites = panels.routes, panels.sites
    if kpis.empty:
        st.info(
            "The store is empty: no partition has reported progress yet. "
            "Start `pulse worker` and `pulse loadgen`."
        )
        return

    render_kpis(kpis)
    left, right = st.columns(2)
    with left:
        st.subheader(f"Events per minute (last {settings.lookback_min} min)")
        st.line_chart(per_minute, y_label="events")
    with right:
        st.subheader("App latency per minute, fleet (ms)")
        st.line_chart(latency, y_label="ms")

    panes = queries.hopping_pane_starts(keys.HOPPING_5M, now_ms)
    since = f"since {_clock(panes[0])}"
    left, right = st.columns(2)
    with left:
        st.subheader(f"Top routes by p99 latency ({since})")
        if routes.empty:
            st.caption("No requests in this window.")
        else:
            st.dataframe(
                routes,
                hide_index=True,
                column_config={
                    "p50_ms": st.column_config.NumberColumn("p50 ms", format="%.1f"),
                    "p99_ms": st.column_config.NumberColumn("p99 ms", format="%.1f"),
                    "error_rate": st.column_config.NumberColumn("errors", format="percent"),
                    "rate_5xx": st.column_config.NumberColumn("5xx", format="percent"),
                },
            )
    with right:
        render_sites(sites, view, since)

    with st.expander("Partitions and workers"):
        st.dataframe(_progress_table(kpis), hide_index=True)
        if kpis.workers:
            st.dataframe(pd.DataFrame.from_dict(kpis.workers, orient="index"))
        else:
            st.caption("No worker metrics found.")
    st.caption(f"Updated {_clock(now_ms)} · refresh every {settings.refresh_s:g} s")


def main() -> None:
    """Build the page; the live part reruns on its own every ``refresh_s``."""
    settings = DashboardSettings()
    store = StoreSettings()
    st.set_page_config(page_title="Pulse", layout="wide")
    st.title("Pulse")
    st.caption(f"Store {store.url()}")
    r = shared_client(store)

    @st.fragment(run_every=settings.refresh_s)
    def live() -> None:
        render_live(r, settings, panels_module.wall_clock_ms())

    live()


if __name__ == "__main__":
    main()
