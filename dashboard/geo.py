"""Devices near a point: their latest position, latest reading and status (``pulse near``).

The worker keeps, per sensor partition, each device's latest position in a geo set and the
event time of that position in a sorted set (``schemas.keys.geo_key`` / ``seen_key``). A query
runs ``GEOSEARCH`` on every partition's set in one round trip, merges by distance, and reads the
devices' latest 1-minute readings (mean per metric, from the ``1m`` device windows) in a second.
The dashboard and ``pulse near`` call :func:`near`.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from schemas import keys, packed
from schemas.events import EventKind

if TYPE_CHECKING:
    import redis

log = logging.getLogger("pulse.geo")

# A device whose latest position is older than this is reported as stale.
STALE_AFTER_MS = 5 * 60_000
# How many of the latest 1-minute windows are searched for a device's latest reading.
READING_MINUTES = 3


@dataclass(frozen=True, slots=True)
class NearDevice:
    """A device within the radius: where, how far, when last seen, and its latest reading."""

    device: str
    km: float
    lat: float
    lon: float
    seen_ms: int  # event time of its latest position
    status: str  # "ok" or "stale"
    # metric -> (mean of its latest 1-minute window, that window's start ms)
    reading: dict[str, tuple[float, int]] = field(default_factory=dict)


def near(
    r: redis.Redis,
    partitions: Sequence[int],
    lat: float,
    lon: float,
    km: float,
    now_ms: int,
    limit: int = 100,
) -> list[NearDevice]:
    """The devices within ``km`` of (``lat``, ``lon``), nearest first (at most ``limit``).

    ``r`` returns bytes (``schemas.settings.store_client(store, decode=False)``).
    """
    check_point(lat, lon, km)
    pipe = r.pipeline(transaction=False)
    for p in partitions:
        pipe.geosearch(
            keys.geo_key(p), longitude=lon, latitude=lat, radius=km, unit="km",
            sort="ASC", count=limit, withdist=True, withcoord=True,
        )  # fmt: skip
    found: list[tuple[float, str, float, float, int]] = []  # (km, device, lat, lon, partition)
    for p, hits in zip(partitions, pipe.execute(raise_on_error=False), strict=True):
        if isinstance(hits, Exception):  # a key of another type: the other partitions answer
            log.warning("sensor partition %d left out of the search: %s", p, hits)
            continue
        for name, dist, (g_lon, g_lat) in hits:
            found.append((float(dist), keys.text(name), float(g_lat), float(g_lon), p))
    found.sort()
    found = found[:limit]
    if not found:
        return []
    minute = keys.WINDOW_1M.size_ms
    latest = now_ms - now_ms % minute
    starts = [latest - i * minute for i in range(READING_MINUTES)]
    pipe = r.pipeline(transaction=False)
    for _, device, _, _, p in found:
        pipe.zscore(keys.seen_key(p), device)
    parts = sorted({p for *_, p in found})
    for p in parts:
        for s in starts:
            pipe.hkeys(keys.window_key(EventKind.SENSOR, p, keys.WINDOW_1M, keys.Dim.METRIC, s))
    replies = pipe.execute(raise_on_error=False)
    seen = [int(x) if isinstance(x, int | float) else 0 for x in replies[: len(found)]]
    metrics = sorted(
        {keys.text(m) for hkeys in replies[len(found) :] if isinstance(hkeys, list) for m in hkeys}
    )
    readings = _readings(r, found, metrics, starts)
    return [
        NearDevice(
            device,
            round(dist, 3),
            g_lat,
            g_lon,
            t,
            "ok" if now_ms - t <= STALE_AFTER_MS else "stale",
            readings.get(device, {}),
        )
        for (dist, device, g_lat, g_lon, _), t in zip(found, seen, strict=True)
    ]


def _readings(
    r: redis.Redis,
    found: Sequence[tuple[float, str, float, float, int]],
    metrics: Sequence[str],
    starts: Sequence[int],
) -> dict[str, dict[str, tuple[float, int]]]:
    """Each device's latest 1-minute mean per metric, newest window first."""
    if not metrics:
        return {}
    pipe = r.pipeline(transaction=False)
    asked: list[tuple[str, int]] = []
    for _, device, _, _, p in found:
        fields = [keys.entity(device, m) for m in metrics]
        for s in starts:
            key = keys.window_key(EventKind.SENSOR, p, keys.WINDOW_1M, keys.Dim.DEVICE, s)
            pipe.hmget(key, fields)
            asked.append((device, s))
    values: list[bytes] = []
    where: list[tuple[str, str, int]] = []
    for (device, s), row in zip(asked, pipe.execute(raise_on_error=False), strict=True):
        if isinstance(row, Exception):  # a window key of another type: no reading there
            continue
        for m, v in zip(metrics, row, strict=True):
            if v is not None:
                values.append(v)
                where.append((device, m, s))
    if not values:
        return {}
    try:
        table = packed.decode_stats(values, packed.NF_SENSOR)
    except packed.PackedError:
        return {}  # a malformed stored value: show positions without readings
    mean = table.stats[:, packed.SUM] / np.maximum(table.stats[:, packed.COUNT], 1)
    out: dict[str, dict[str, tuple[float, int]]] = {}
    for (device, m, s), x in zip(where, mean.tolist(), strict=True):
        have = out.setdefault(device, {})
        if m not in have or have[m][1] < s:
            have[m] = (round(x, 4), s)
    return out


@dataclass(frozen=True, slots=True)
class Position:
    """A device's latest position and when it was taken (the dashboard's map)."""

    device: str
    partition: int
    lat: float
    lon: float
    seen_ms: int  # event time of its latest position


def positions(r: redis.Redis, partitions: Sequence[int], limit: int = 2000) -> list[Position]:
    """The most recently seen ``limit`` devices of every partition, with their positions.

    Two round trips: each partition's newest ``limit`` devices (``seen_key``), then their
    positions (``GEOPOS``). A device whose position is gone meanwhile is left out.
    """
    if not partitions or limit <= 0:
        return []
    pipe = r.pipeline(transaction=False)
    for p in partitions:
        pipe.zrevrange(keys.seen_key(p), 0, limit - 1, withscores=True)
    seen = pipe.execute()
    pipe = r.pipeline(transaction=False)
    asked: list[tuple[int, list[tuple[str, int]]]] = []
    for p, rows in zip(partitions, seen, strict=True):
        members = [(keys.text(m), int(score)) for m, score in rows]
        if members:
            pipe.geopos(keys.geo_key(p), *[m for m, _ in members])
            asked.append((p, members))
    out: list[Position] = []
    for (p, members), coords in zip(asked, pipe.execute() if asked else [], strict=True):
        for (device, t), xy in zip(members, coords, strict=True):
            if xy is not None:
                out.append(Position(device, p, float(xy[1]), float(xy[0]), t))
    out.sort(key=lambda d: (-d.seen_ms, d.device))
    return out[:limit]


def status(seen_ms: int, now_ms: int, anomalous: bool = False) -> str:
    """A device's status on the map: ``anomaly`` (one in the range), ``stale`` (no position
    for :data:`STALE_AFTER_MS`) or ``ok``."""
    if anomalous:
        return "anomaly"
    return "ok" if now_ms - seen_ms <= STALE_AFTER_MS else "stale"


def check_point(lat: float, lon: float, km: float) -> None:
    """Refuse a point or radius the geo index cannot search, in one sentence."""
    if not (math.isfinite(lat) and -keys.GEO_MAX_LAT <= lat <= keys.GEO_MAX_LAT):
        raise ValueError(f"latitude must be within +-{keys.GEO_MAX_LAT} degrees, got {lat:g}.")
    if not (math.isfinite(lon) and -180.0 <= lon <= 180.0):
        raise ValueError(f"longitude must be within +-180 degrees, got {lon:g}.")
    if not (math.isfinite(km) and km > 0):
        raise ValueError(f"radius must be a positive number of km, got {km:g}.")


# --------------------------------------------------------------------------- pulse near


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``pulse near``."""
    from schemas.argtypes import positive_int

    parser.add_argument("lat", type=float, help="latitude of the point, degrees")
    parser.add_argument("lon", type=float, help="longitude of the point, degrees")
    parser.add_argument("--km", type=float, required=True, help="radius, km")
    parser.add_argument("-n", type=positive_int, default=20, help="at most N devices (20)")


def run(args: argparse.Namespace) -> int:
    """Print the devices near a point with their latest reading and status."""
    import time

    import redis
    from rich.console import Console
    from rich.table import Table

    from dashboard.queries import discover
    from schemas.argtypes import one_line
    from schemas.settings import StoreRole, StoreSettings, store_client

    try:
        check_point(args.lat, args.lon, args.km)
    except ValueError as exc:
        print(f"pulse near: {exc}", file=sys.stderr)
        return 2
    store = StoreSettings()
    r = store_client(store, decode=False, role=StoreRole.READER)
    try:
        topo = discover(r)
        found = near(
            r, topo.partitions.get(EventKind.SENSOR, ()), args.lat, args.lon, args.km,
            time.time_ns() // 1_000_000, args.n,
        )  # fmt: skip
    except redis.RedisError as exc:
        print(
            f"pulse near: cannot read the store at {store.host}:{store.port}: {one_line(exc)}.",
            file=sys.stderr,
        )
        return 1
    finally:
        r.close()
    console = Console()
    if not found:
        console.print(f"no device within {args.km:g} km of ({args.lat:g}, {args.lon:g})")
        return 0
    table = Table("device", "km", "lat", "lon", "last seen (UTC)", "status", "latest reading")
    for d in found:
        seen = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(d.seen_ms / 1000))
        reading = ", ".join(f"{m} {v:g}" for m, (v, _) in sorted(d.reading.items())) or "-"
        table.add_row(
            d.device, f"{d.km:.2f}", f"{d.lat:.5f}", f"{d.lon:.5f}", seen, d.status, reading
        )
    console.print(table)
    return 0
