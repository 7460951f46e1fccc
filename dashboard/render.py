"""Drawing one refresh with Streamlit: each section of the page from ``dashboard.page`` data.

Thin on purpose: every figure is computed in ``dashboard.page``/``series``/``health``; these
functions only lay them out and say so clearly when a range has no data.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Final

import pandas as pd
import streamlit as st

from dashboard import charts, health, queries
from dashboard.page import (
    DeviceView,
    PageData,
    board_frame,
    health_tiles,
    markers,
    metric_names,
    tiles,
)
from dashboard.settings import DashboardSettings
from dashboard.thresholds import number, tiles_html
from schemas.anomaly import Signal

NO_DATA: Final = "No data in this range."
DIVERTED_ROWS: Final = 10  # newest diverted records shown per topic
_PERCENT: Final = st.column_config.NumberColumn(format="percent")
_MS: Final = st.column_config.NumberColumn(format="%.1f")


def clock(ms: int | None) -> str:
    """``HH:MM:SS`` UTC ("–" for none)."""
    if ms is None:
        return "–"
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%H:%M:%S")


def kpi_tiles(data: PageData, settings: DashboardSettings) -> None:
    """The KPI row."""
    st.markdown(tiles_html(tiles(data, settings)), unsafe_allow_html=True)


def sensor_charts(data: PageData, settings: DashboardSettings) -> None:
    """One quantile band per sensor metric (most readings first), anomalies marked."""
    st.subheader("Sensor metrics (p50–p99 band, p95 line, ▲ anomalies)")
    names = metric_names(data.metrics)[: settings.metric_charts]
    if not names:
        st.info(f"{NO_DATA} No sensor readings between {data.range.label}.")
        return
    cols = st.columns(2)
    for i, metric in enumerate(names):
        frame = data.metrics[data.metrics["metric"] == metric]
        # a flat window's value is 0/1, not a reading: it is listed, not plotted
        marks = markers(data.anomalies, "sensor", metric, (Signal.MEAN, Signal.MAX))
        with cols[i % 2]:
            st.vega_lite_chart(spec=charts.band(frame, metric, "reading", marks), width="stretch")


def service_views(data: PageData) -> None:
    """App latency band and error rate, per-service tables and lines, the slowest routes."""
    st.subheader("Services: latency and errors")
    if data.latency.empty:
        st.info(f"{NO_DATA} No application requests between {data.range.label}.")
        return
    left, right = st.columns(2)
    with left:
        marks = markers(data.anomalies, "applog", signals=(Signal.LATENCY,))
        st.vega_lite_chart(
            spec=charts.band(data.latency, "Fleet latency (ms)", "ms", marks), width="stretch"
        )
    with right:
        err = data.latency.assign(series="all services")
        st.vega_lite_chart(
            spec=charts.lines(err, "error_rate", "series", "Error rate", "errors", percent=True),
            width="stretch",
        )
    svc = data.services
    left, right = st.columns(2)
    with left:
        if not svc.series.empty:
            st.vega_lite_chart(
                spec=charts.lines(svc.series, "p99", "service", "p99 latency by service", "ms"),
                width="stretch",
            )
    with right:
        if not svc.series.empty:
            st.vega_lite_chart(spec=
                charts.lines(
                    svc.series, "error_rate", "service", "Error rate by service", "errors",
                    percent=True,
                ),
                width="stretch",
            )  # fmt: skip
    left, right = st.columns(2)
    with left:
        st.caption("Services over the range")
        st.dataframe(
            svc.table,
            hide_index=True,
            column_config={"error_rate": _PERCENT, "p50_ms": _MS, "p99_ms": _MS},
        )
    with right:
        st.caption("Slowest routes over the range (by p99)")
        st.dataframe(
            svc.routes,
            hide_index=True,
            column_config={"error_rate": _PERCENT, "p50_ms": _MS, "p99_ms": _MS},
        )


# the site table's widgets (session state keys)
SITE, METRIC, ORDER, FIRST = (
    "pulse_site_filter", "pulse_metric_filter", "pulse_site_order", "pulse_site_first",
)  # fmt: skip
ALL = "(all)"
LARGEST, SMALLEST = "largest first", "smallest first"


def site_view(settings: DashboardSettings) -> queries.SiteView:
    """The site table's rows as its widgets (their session state) choose them."""
    state = st.session_state
    site, metric = state.get(SITE, ALL), state.get(METRIC, ALL)
    order = state.get(ORDER, queries.SITE_ORDER[0])
    return queries.SiteView(
        limit=settings.top_sites,
        order_by=order if order in queries.SITE_ORDER else queries.SITE_ORDER[0],
        ascending=state.get(FIRST) == SMALLEST,
        site=None if site == ALL else site,
        metric=None if metric == ALL else metric,
    )


def _choices(values: tuple[str, ...], chosen: str | None) -> list[str]:
    # a chosen value the window no longer has stays selectable (its filter then shows no rows)
    extra = [chosen] if chosen is not None and chosen not in values else []
    return [ALL, *extra, *values]


def site_table(data: PageData, view: queries.SiteView) -> None:
    """Site x metric over the 5 minutes up to the range's end: filters, order, top rows."""
    sites = data.sites
    st.subheader(f"Sites and metrics (5 min up to {clock(data.range.end_ms)} UTC)")
    cols = st.columns(4)
    cols[0].selectbox("Site", _choices(sites.sites, view.site), key=SITE)
    cols[1].selectbox("Metric", _choices(sites.metrics, view.metric), key=METRIC)
    cols[2].selectbox("Order by", queries.SITE_ORDER, key=ORDER)
    cols[3].selectbox("Show", (LARGEST, SMALLEST), key=FIRST)
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


def leaderboards(data: PageData) -> None:
    """The boards of the range, three per row."""
    since = data.boards[0].start_ms if data.boards else data.range.start_ms
    capped = since > data.range.start_ms - data.range.start_ms % 60_000
    st.subheader("Leaderboards" + (f" (since {clock(since)} UTC)" if capped else ""))
    cols = st.columns(3)
    for i, top in enumerate(data.boards):
        with cols[i % 3]:
            st.markdown(f"**{top.board.name}** · {top.members:,} with data")
            frame = board_frame(top)
            if frame.empty:
                st.caption(NO_DATA)
            else:
                st.table(frame)


def anomaly_feed(data: PageData) -> None:
    """The live feed (newest anomalies whatever the range) and the range's anomalies."""
    st.subheader("Anomalies")
    left, right = st.columns(2)
    with left:
        st.caption(f"Live feed: the newest {len(data.feed)} anomalies")
        if not data.feed:
            st.caption("No anomalies in the feed yet.")
        else:
            st.dataframe(
                pd.DataFrame(
                    {
                        "time": [pd.Timestamp(e.t_ms, unit="ms", tz="UTC") for e in data.feed],
                        "entity": [e.entity for e in data.feed],
                        "signal": [e.signal for e in data.feed],
                        "cause": [e.cause for e in data.feed],
                        "score": [e.score for e in data.feed],
                        "anomaly": [e.id for e in data.feed],
                    }
                ),
                hide_index=True,
            )
    with right:
        shown = data.anomalies
        st.caption(f"In the range: {data.range_kpis.anomalies:,} (the newest {len(shown):,})")
        if shown.empty:
            st.caption(NO_DATA)
        else:
            cols = ["time", "entity", "signal", "cause", "score", "value", "expected", "anomaly"]
            st.dataframe(shown[cols], hide_index=True)
        if data.anomalies_skipped:
            st.warning(f"{data.anomalies_skipped} stored anomaly records could not be read.")


def device_map(data: PageData) -> None:
    """The devices' latest positions, coloured by status."""
    devices = data.devices
    counts = devices["status"].value_counts().to_dict() if not devices.empty else {}
    st.caption(
        f"{len(devices):,} devices · "
        + " · ".join(f"{counts.get(s, 0):,} {s}" for s in charts.STATUS_COLOURS)
    )
    if devices.empty:
        st.info("No device positions in the store.")
        return
    st.vega_lite_chart(spec=charts.device_map(devices), width="stretch")


def device_drilldown(
    view: DeviceView,
    similar: Callable[[str], tuple[pd.DataFrame | None, str | None]],
) -> None:
    """A device's series, its anomalies, and past anomalies similar to one of them."""
    if view.partition is None:
        st.info(f"Device {view.device} has no position in the store.")
        return
    st.caption(f"Device {view.device} · sensor partition {view.partition}")
    if view.series.empty:
        st.info(f"{NO_DATA} Device {view.device} sent no readings in it.")
    else:
        st.vega_lite_chart(spec=charts.device_lines(view.series), width="content")
    if view.anomalies.empty:
        st.caption(f"No anomalies of {view.device} in this range.")
        return
    cols = ["time", "entity", "signal", "cause", "score", "value", "expected", "anomaly"]
    st.dataframe(view.anomalies[cols], hide_index=True)
    chosen = st.selectbox(
        "Similar past anomalies to", view.anomalies["anomaly"].tolist(), key="pulse_similar_to"
    )
    if chosen is None:
        return
    rows, problem = similar(str(chosen))
    if problem is not None:
        st.warning(problem)
    elif rows is None or rows.empty:
        st.caption("No similar anomalies in the store.")
    else:
        st.dataframe(rows, hide_index=True, column_config={"similarity": _PERCENT})


def pipeline_health(
    data: PageData,
    lag: pd.DataFrame,
    kafka: health.KafkaView | None,
    kafka_problem: str | None,
    dead_topic: str,
    late_topic: str,
    written: tuple[float | None, int, str],
) -> None:
    """Consumer lag, diverted records, workers, and the store's memory, AOF and replicas."""
    st.subheader("Pipeline and store health")
    store = data.store
    progress = data.kpis
    tile_row = health_tiles(data, health.total_lag(lag), kafka is not None, written)
    st.markdown(tiles_html(tile_row), unsafe_allow_html=True)
    ack = (
        f"durable ack p50/p99 {number(progress.durability_p50_ms, '{:,.1f}')}/"
        f"{number(progress.durability_p99_ms, '{:,.0f}')} ms"
    )
    if store is None:
        st.caption(
            f"The store refuses INFO to this user: memory, AOF and replica figures need a user "
            f"allowed INFO (and CONFIG GET) · {ack}"
        )
    else:
        st.caption(f"Store {store.role} · Valkey {store.version} · {ack}")
    if kafka_problem is not None:
        st.warning(
            f"{kafka_problem}. Lag and diverted-record samples are unavailable; the store's "
            "panels are unaffected."
        )
    left, right = st.columns(2)
    with left:
        st.caption("Consumer lag per partition (Kafka end offset − the store's applied offset)")
        if lag.empty:
            st.caption("No partitions yet.")
        else:
            st.dataframe(lag, hide_index=True)
    with right:
        if kafka is not None and kafka.samples_problem is not None:
            st.caption(f"{kafka.samples_problem[0].upper()}{kafka.samples_problem[1:]}.")
        for topic, what in ((dead_topic, "Dead letters"), (late_topic, "Late events")):
            held = kafka.records(topic) if kafka is not None else None
            st.caption(
                f"{what}: {progress.dead if what == 'Dead letters' else progress.late:,} "
                f"counted by the store · topic {topic} holds {number(held)}"
            )
            rows = kafka.diverted.get(topic, [])[:DIVERTED_ROWS] if kafka is not None else []
            if rows:
                st.table(
                    pd.DataFrame(
                        {
                            "time": [clock(d.timestamp_ms) for d in rows],
                            "reason": [d.info.reason for d in rows],
                            "source": [
                                f"{d.info.source_topic}[{d.info.source_partition}]"
                                f"@{d.info.source_offset}"
                                for d in rows
                            ],
                        }
                    ).set_index("time")
                )
            elif kafka is not None:
                st.caption(f"No records in {topic}.")
    if progress.workers:
        st.caption("Workers (their live metrics)")
        st.dataframe(pd.DataFrame.from_dict(progress.workers, orient="index"))
    else:
        st.caption("No worker metrics found.")
    if store is not None and store.replicas:
        st.dataframe(
            pd.DataFrame(
                [
                    {"replica": r.name, "state": r.state, "lag s": r.lag_s,
                     "behind bytes": r.lag_bytes}
                    for r in store.replicas
                ]
            ),
            hide_index=True,
        )  # fmt: skip
