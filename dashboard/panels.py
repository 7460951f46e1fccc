"""What one dashboard refresh shows, read in one go (importable, so Streamlit can cache it)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import pandas as pd
import redis

from dashboard import queries
from dashboard.settings import DashboardSettings


@dataclass(frozen=True, slots=True)
class Panels:
    """Everything one refresh shows."""

    kpis: queries.Kpis
    per_minute: pd.DataFrame
    latency: pd.DataFrame
    routes: pd.DataFrame
    sites: queries.SiteMetrics


def wall_clock_ms() -> int:
    """The page's clock: epoch milliseconds (the one place it reads the time; tests pin it)."""
    return time.time_ns() // 1_000_000


def read_panels(
    r: redis.Redis,
    topo: queries.Topology,
    now_ms: int,
    settings: DashboardSettings,
    cache: queries.PaneCache | None = None,
    site_view: queries.SiteView | None = None,
) -> Panels:
    """Run every panel's query at ``now_ms`` (final panes from ``cache`` when given).

    ``r`` returns bytes (``queries.reader_client``). The events per minute are read before the
    latency: both read the applog ``1m`` fleet panes, so the latency finds the final ones in
    ``cache`` even on the first refresh. The site table shows ``site_view`` (default: the top
    ``settings.top_sites`` rows by readings).
    """
    lookback = settings.lookback_min
    view = site_view or queries.SiteView(limit=settings.top_sites)
    return Panels(
        kpis=queries.read_kpis(r, topo, now_ms, settings.rate_windows),
        per_minute=queries.read_events_per_minute(r, topo, now_ms, lookback, cache=cache),
        latency=queries.read_latency_per_minute(r, topo, now_ms, lookback, cache=cache),
        routes=queries.read_top_routes(r, topo, now_ms, settings.top_routes, cache=cache),
        sites=queries.read_site_metrics(r, topo, now_ms, view, cache=cache),
    )
