"""Deterministic simulation of the event stream: devices, services, anomalies, late and bad records.

Everything here is pure: the output depends only on a :class:`GenConfig` (seed, sim-clock start,
load shape, partition counts). Events are generated in fixed chunks of :data:`CHUNK` with one
random stream per chunk, so records are byte-identical however fast, or in what slices, they are
consumed. Event ``i`` is scheduled at sim time ``start_ms + floor(i * 1000 / rate)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple

import numpy as np
import numpy.typing as npt
import orjson

from loadgen import faults
from loadgen.partitioning import partition_for, partitions_for
from schemas.events import EventKind
from schemas.keys import entity

CHUNK: Final = 8192
NOMINAL_RATE: Final = 1000  # events/s of the sim clock when producing as fast as possible
DAY_MS: Final = 86_400_000
SLOW_MS: Final = 1000.0  # a 2xx/3xx request slower than this logs at WARN

# random-stream ids, so that each part of the simulation draws from its own stream
_FLEET, _ANOMALIES, _EVENTS = 1, 2, 3

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """A sensor metric: unit, typical level, daily amplitude, noise and physical bounds."""

    name: str
    unit: str
    base: float
    amp: float
    noise: float
    lo: float
    hi: float


METRICS: Final = (
    MetricSpec("temperature", "°C", 21.0, 4.0, 0.3, -40.0, 85.0),
    MetricSpec("humidity", "%", 45.0, 10.0, 1.5, 0.0, 100.0),
    MetricSpec("pressure", "hPa", 1013.0, 3.0, 0.4, 870.0, 1085.0),
    MetricSpec("vibration", "mm/s", 2.0, 0.6, 0.25, 0.0, 1000.0),
    MetricSpec("co2", "ppm", 600.0, 150.0, 20.0, 250.0, 10000.0),
    MetricSpec("power", "W", 250.0, 80.0, 10.0, 0.0, 10000.0),
)

CITIES: Final = (
    ("berlin", 52.5200, 13.4050),
    ("paris", 48.8566, 2.3522),
    ("london", 51.5074, -0.1278),
    ("madrid", 40.4168, -3.7038),
    ("rome", 41.9028, 12.4964),
    ("amsterdam", 52.3676, 4.9041),
    ("warsaw", 52.2297, 21.0122),
    ("vienna", 48.2082, 16.3738),
    ("stockholm", 59.3293, 18.0686),
    ("newyork", 40.7128, -74.0060),
    ("chicago", 41.8781, -87.6298),
    ("toronto", 43.6532, -79.3832),
    ("saopaulo", -23.5505, -46.6333),
    ("tokyo", 35.6762, 139.6503),
    ("singapore", 1.3521, 103.8198),
    ("sydney", -33.8688, 151.2093),
    ("mumbai", 19.0760, 72.8777),
    ("capetown", -33.9249, 18.4241),
)

FIRMWARE: Final = ("1.4.2", "1.5.0", "1.5.1", "2.0.0", "2.1.3")

SERVICES: Final = (
    ("checkout", ("/api/checkout", "/api/orders/{id}", "/api/orders/{id}/items", "/api/orders",
                  "/api/cart/{id}", "/api/checkout/confirm")),
    ("search", ("/api/search", "/api/search/suggest", "/api/search/facets",
                "/api/search/{index}/query", "/api/search/trending", "/api/search/history")),
    ("catalog", ("/api/products", "/api/products/{id}", "/api/products/{id}/variants",
                 "/api/categories", "/api/categories/{id}", "/api/brands")),
    ("auth", ("/api/login", "/api/logout", "/api/token/refresh", "/api/users/{id}/session",
              "/api/oauth/callback", "/api/mfa/verify")),
    ("payments", ("/api/payments", "/api/payments/{id}", "/api/payments/{id}/refund",
                  "/api/payment-methods", "/api/invoices/{id}", "/api/webhooks/psp")),
    ("inventory", ("/api/stock/{sku}", "/api/stock/reserve", "/api/warehouses",
                   "/api/warehouses/{id}/stock", "/api/stock/release", "/api/stock/audit")),
    ("shipping", ("/api/shipments", "/api/shipments/{id}", "/api/shipments/{id}/track",
                  "/api/rates", "/api/labels/{id}", "/api/pickups")),
    ("notifications", ("/api/notify/email", "/api/notify/sms", "/api/notify/push",
                       "/api/templates/{id}", "/api/preferences/{user}", "/api/notify/batch")),
    ("profile", ("/api/users/{id}", "/api/users/{id}/addresses", "/api/users/{id}/avatar",
                 "/api/users/me", "/api/users/{id}/settings", "/api/users/search")),
    ("recommendations", ("/api/recs/home", "/api/recs/product/{id}", "/api/recs/cart",
                         "/api/recs/similar/{id}", "/api/recs/trending", "/api/recs/feedback")),
)  # fmt: skip

STATUS_CODES: Final = {
    2: (200, 200, 200, 200, 200, 200, 200, 200, 201, 204),
    3: (304,),
    4: (400, 401, 403, 404, 404, 429),
    5: (500, 502, 503, 504),
}
P_3XX: Final = 0.01
MESSAGES: Final = {
    200: "ok", 201: "created", 204: "no content", 304: "not modified", 400: "bad request",
    401: "unauthorized", 403: "forbidden", 404: "not found", 429: "rate limited",
    500: "internal error", 502: "bad gateway", 503: "service unavailable", 504: "upstream timeout",
}  # fmt: skip

SENSOR_ANOMALIES: Final = ("spike", "drift", "stuck")
APPLOG_ANOMALIES: Final = ("latency_storm", "error_burst")
STORM_FACTOR: Final = 10.0
BURST_5XX_SHARE: Final = 0.7


@dataclass(frozen=True, slots=True)
class GenConfig:
    """Everything the generated stream depends on."""

    seed: int
    start_ms: int
    rate: int  # events/s; 0 = unpaced, sim clock at NOMINAL_RATE
    duration_s: int
    devices: int
    services: int
    anomaly_rate: float = 0.0
    anomaly_after_s: int = 0  # no episode starts before start + this (detector warm-up)
    sim_rate: int = 0  # events per sim-second of an unpaced run (0: NOMINAL_RATE)
    bad_rate: float = 0.0
    late_rate: float = 0.0
    applog_share: float = 0.3
    sensor_partitions: int = 6
    applog_partitions: int = 6
    sensor_topic: str = "pulse.sensor"
    applog_topic: str = "pulse.applog"

    def __post_init__(self) -> None:
        checks = {
            "seed must be >= 0": self.seed >= 0,
            "start_ms must be >= 0": self.start_ms >= 0,
            "rate must be >= 0": self.rate >= 0,
            "sim_rate must be >= 0": self.sim_rate >= 0,
            "duration_s must be >= 1": self.duration_s >= 1,
            "anomaly_after_s must be >= 0 and shorter than the run": 0
            <= self.anomaly_after_s
            < self.duration_s,
            "devices must be >= 1": self.devices >= 1,
            "services must be >= 1": self.services >= 1,
            "partitions must be >= 1": min(self.sensor_partitions, self.applog_partitions) >= 1,
        }
        for name in ("anomaly_rate", "bad_rate", "late_rate", "applog_share"):
            value = getattr(self, name)
            checks[f"{name} must be within [0, 1]"] = 0.0 <= value <= 1.0
        for message, ok in checks.items():
            if not ok:
                raise ValueError(message)

    @property
    def clock_rate(self) -> int:
        """Events per sim-second."""
        return self.rate or self.sim_rate or NOMINAL_RATE

    @property
    def total(self) -> int:
        """How many records the run produces."""
        return self.clock_rate * self.duration_s

    @property
    def end_ms(self) -> int:
        """End of the sim clock (exclusive)."""
        return self.start_ms + self.duration_s * 1000

    def scheduled_ms(self, index: IntArray) -> IntArray:
        """Sim time at which each event index is scheduled."""
        return self.start_ms + (index * 1000) // self.clock_rate


@dataclass(frozen=True, slots=True)
class Fleet:
    """The simulated devices (with their metric series) and services (with their routes)."""

    device_ids: list[str]
    device_site: IntArray
    device_lat: list[float]
    device_lon: list[float]
    device_firmware: list[str]
    sites: list[str]
    series_device: IntArray  # one series per (device, metric)
    series_metric: IntArray
    series_base: FloatArray
    series_amp: FloatArray
    series_phase: FloatArray
    series_noise: FloatArray
    device_series_offset: IntArray
    device_series_count: IntArray
    services: list[str]
    routes: list[str]
    route_service: IntArray
    route_mu: FloatArray
    route_sigma: FloatArray
    route_p4: FloatArray
    route_p5: FloatArray
    service_route_offset: IntArray
    service_route_count: IntArray

    def series_entity(self, s: int) -> str:
        """Device-dimension entity of a series: ``<device_id>|<metric>``."""
        return entity(self.series_device_id(s), METRICS[self.series_metric[s]].name)

    def series_site_entity(self, s: int) -> str:
        """Site-dimension entity of a series: ``<site>|<metric>``."""
        site = self.sites[self.device_site[self.series_device[s]]]
        return entity(site, METRICS[self.series_metric[s]].name)

    def route_entity(self, r: int) -> str:
        """Route-dimension entity: ``<service>|<route>``."""
        return entity(self.services[self.route_service[r]], self.routes[r])

    def series_device_id(self, s: int) -> str:
        """Device id of a series."""
        return self.device_ids[int(self.series_device[s])]


def build_fleet(seed: int, devices: int, services: int) -> Fleet:
    """The devices, sites, metric series, services and routes for a seed."""
    rng = np.random.default_rng([seed, _FLEET, 0])
    n_sites = max(1, math.ceil(devices / 10))
    sites, site_lat, site_lon = [], [], []
    for j in range(n_sites):
        city, city_lat, city_lon = CITIES[j % len(CITIES)]
        sites.append(f"site-{city}-{j // len(CITIES) + 1}")
        site_lat.append(city_lat + rng.uniform(-0.08, 0.08))
        site_lon.append(city_lon + rng.uniform(-0.08, 0.08))
    width = max(4, len(str(devices)))
    device_ids = [f"dev-{i + 1:0{width}d}" for i in range(devices)]
    device_site = rng.integers(0, n_sites, size=devices)
    lat = np.round(np.asarray(site_lat)[device_site] + rng.uniform(-0.005, 0.005, devices), 5)
    lon = np.round(np.asarray(site_lon)[device_site] + rng.uniform(-0.005, 0.005, devices), 5)
    firmware = [FIRMWARE[i] for i in rng.integers(0, len(FIRMWARE), size=devices)]
    counts = rng.integers(1, 4, size=devices)
    s_dev, s_met = [], []
    for d in range(devices):
        for m in rng.choice(len(METRICS), size=int(counts[d]), replace=False):
            s_dev.append(d)
            s_met.append(int(m))
    series_device = np.asarray(s_dev, dtype=np.int64)
    series_metric = np.asarray(s_met, dtype=np.int64)
    n_series = len(s_dev)
    base = np.array([m.base for m in METRICS])[series_metric]
    amp = np.array([m.amp for m in METRICS])[series_metric]
    noise = np.array([m.noise for m in METRICS])[series_metric]
    # the daily cycle peaks in the local afternoon: shift the phase by the site's longitude
    phase = np.deg2rad(lon[series_device]) - math.pi / 2 - 0.5
    offsets = np.concatenate(([0], np.cumsum(counts)[:-1])).astype(np.int64)

    svc_names: list[str] = []
    routes: list[str] = []
    route_service: list[int] = []
    r_counts = rng.integers(3, 7, size=services)
    for k in range(services):
        name, catalogue = SERVICES[k % len(SERVICES)]
        svc_names.append(name if k < len(SERVICES) else f"{name}-{k // len(SERVICES) + 1}")
        routes.extend(catalogue[: int(r_counts[k])])
        route_service.extend([k] * int(r_counts[k]))
    n_routes = len(routes)
    r_offsets = np.concatenate(([0], np.cumsum(r_counts)[:-1])).astype(np.int64)
    return Fleet(
        device_ids=device_ids,
        device_site=device_site.astype(np.int64),
        device_lat=lat.tolist(),
        device_lon=lon.tolist(),
        device_firmware=firmware,
        sites=sites,
        series_device=series_device,
        series_metric=series_metric,
        series_base=base + rng.normal(0.0, 0.3, n_series) * amp,
        series_amp=amp * rng.uniform(0.6, 1.4, n_series),
        series_phase=phase,
        series_noise=noise,
        device_series_offset=offsets,
        device_series_count=counts.astype(np.int64),
        services=svc_names,
        routes=routes,
        route_service=np.asarray(route_service, dtype=np.int64),
        route_mu=np.log(rng.uniform(8.0, 250.0, n_routes)),
        route_sigma=rng.uniform(0.3, 0.8, n_routes),
        route_p4=rng.uniform(0.01, 0.05, n_routes),
        route_p5=rng.uniform(0.001, 0.01, n_routes),
        service_route_offset=r_offsets,
        service_route_count=r_counts.astype(np.int64),
    )


@dataclass(frozen=True, slots=True)
class Episode:
    """One injected anomaly: a sensor series or a service misbehaving for a sim-time interval."""

    type: EventKind
    kind: str
    target: int  # series index (sensor) or service index (applog)
    entity: str  # device-dim entity (sensor) or service-dim entity (applog)
    start_ms: int
    end_ms: int

    def as_truth(self) -> dict[str, Any]:
        """The truth file's record of this episode."""
        return {
            "type": self.type.value,
            "kind": self.kind,
            "entity": self.entity,
            "start_ms": self.start_ms,
            "end_ms": self.end_ms,
        }


def plan_anomalies(config: GenConfig, fleet: Fleet) -> list[Episode]:
    """Each device and service gets one episode with probability ``anomaly_rate``."""
    rng = np.random.default_rng([config.seed, _ANOMALIES, 0])
    run_ms = config.duration_s * 1000
    out: list[Episode] = []

    after_ms = config.anomaly_after_s * 1000

    def window(kind: str) -> tuple[int, int]:
        lo, hi = (2_000, 10_000) if kind == "spike" else (10_000, 60_000)
        length = min(int(rng.integers(lo, hi + 1)), run_ms - after_ms)
        start = config.start_ms + after_ms + int(rng.integers(0, run_ms - after_ms - length + 1))
        return start, start + length

    for d in range(len(fleet.device_ids)):
        if rng.random() < config.anomaly_rate:
            s = int(fleet.device_series_offset[d] + rng.integers(fleet.device_series_count[d]))
            kind = SENSOR_ANOMALIES[int(rng.integers(len(SENSOR_ANOMALIES)))]
            start, end = window(kind)
            out.append(Episode(EventKind.SENSOR, kind, s, fleet.series_entity(s), start, end))
    for k, name in enumerate(fleet.services):
        if rng.random() < config.anomaly_rate:
            kind = APPLOG_ANOMALIES[int(rng.integers(len(APPLOG_ANOMALIES)))]
            start, end = window(kind)
            out.append(Episode(EventKind.APPLOG, kind, k, name, start, end))
    return out


class Record(NamedTuple):
    """One Kafka record, with its partition chosen by the default key rule."""

    topic: str
    partition: int
    key: bytes
    value: bytes


@dataclass(slots=True)
class SensorColumns:
    """Valid sensor events of a chunk in production order (what the truth needs)."""

    partition: IntArray
    event_time: IntArray
    series: IntArray
    value: FloatArray


@dataclass(slots=True)
class AppLogColumns:
    """Valid application-log events of a chunk in production order."""

    partition: IntArray
    event_time: IntArray
    route: IntArray
    latency: FloatArray
    status: IntArray
    error: npt.NDArray[np.bool_]


@dataclass(slots=True)
class Chunk:
    """A slice of the stream: its records, plus columns and counts for the truth and progress."""

    first: int  # index of the first record in the run
    records: list[Record]
    sensor: SensorColumns
    applog: AppLogColumns
    dead: dict[EventKind, IntArray]  # malformed records per partition
    late_injected: int = 0
    bad: int = 0
    fault_kinds: list[str] = field(default_factory=list)


class Generator:
    """Produces the chunks of one run."""

    def __init__(self, config: GenConfig) -> None:
        self.config = config
        self.fleet = build_fleet(config.seed, config.devices, config.services)
        self.episodes = plan_anomalies(config, self.fleet)
        f = self.fleet
        device_keys = [d.encode() for d in f.device_ids]
        self._device_partition = partitions_for(device_keys, config.sensor_partitions)
        self._metric_names = [m.name for m in METRICS]
        self._metric_units = [m.unit for m in METRICS]
        self._metric_lo = np.array([m.lo for m in METRICS])[f.series_metric]
        self._metric_hi = np.array([m.hi for m in METRICS])[f.series_metric]
        self._series_sites = [f.sites[f.device_site[d]] for d in f.series_device]

    @property
    def chunks_total(self) -> int:
        """How many chunks the run has."""
        return -(-self.config.total // CHUNK)

    def __iter__(self) -> Iterator[Chunk]:
        for n in range(self.chunks_total):
            yield self.chunk(n)

    def chunk(self, number: int) -> Chunk:
        """Chunk ``number`` of the run (pure: the same for the same config and number)."""
        cfg = self.config
        first = number * CHUNK
        n = min(CHUNK, cfg.total - first)
        rng = np.random.default_rng([cfg.seed, _EVENTS, number])
        scheduled = cfg.scheduled_ms(np.arange(first, first + n, dtype=np.int64))
        is_app = rng.random(n) < cfg.applog_share
        is_bad = rng.random(n) < cfg.bad_rate
        is_late = (rng.random(n) < cfg.late_rate) & ~is_bad
        near = rng.random(n) < 0.5
        shift = np.where(near, rng.integers(1_000, 20_001, n), rng.integers(120_000, 600_001, n))
        event_time = np.maximum(scheduled - np.where(is_late, shift, 0), 0)

        s_idx = np.flatnonzero(~is_app)
        a_idx = np.flatnonzero(is_app)
        s_dicts, series, values = self._sensor(rng, event_time[s_idx])
        a_dicts, routes, latency, status, error, trace_ids = self._applog(rng, event_time[a_idx])
        s_part = self._device_partition[self.fleet.series_device[series]]
        a_part = partitions_for([t.encode() for t in trace_ids], cfg.applog_partitions)

        # assemble records in stream order
        kinds: list[EventKind] = [EventKind.SENSOR] * n
        dicts: list[dict[str, Any]] = [{}] * n
        keys: list[bytes] = [b""] * n
        parts: list[int] = [0] * n
        for j, i in enumerate(s_idx.tolist()):
            dicts[i] = s_dicts[j]
        for j, i in enumerate(a_idx.tolist()):
            kinds[i] = EventKind.APPLOG
            dicts[i] = a_dicts[j]
        s_keys = [self.fleet.device_ids[d].encode() for d in self.fleet.series_device[series]]
        for i, k, p in zip(s_idx.tolist(), s_keys, s_part.tolist(), strict=True):
            keys[i], parts[i] = k, p
        for i, t, p in zip(a_idx.tolist(), trace_ids, a_part.tolist(), strict=True):
            keys[i], parts[i] = t.encode(), p

        topic = {EventKind.SENSOR: cfg.sensor_topic, EventKind.APPLOG: cfg.applog_topic}
        n_parts = {
            EventKind.SENSOR: cfg.sensor_partitions,
            EventKind.APPLOG: cfg.applog_partitions,
        }
        dead = {k: np.zeros(n_parts[k], dtype=np.int64) for k in EventKind}
        bad_set = set(np.flatnonzero(is_bad).tolist())
        fault_rng = np.random.default_rng([cfg.seed, _EVENTS, number, 1])
        fault_kinds: list[str] = []
        dumps = orjson.dumps
        records: list[Record] = []
        for i in range(n):
            kind = kinds[i]
            if i in bad_set:
                fk = faults.pick(fault_rng)
                value = faults.corrupt(fk, kind, dicts[i], int(scheduled[i]), fault_rng)
                key = b"bad-" + fault_rng.bytes(6).hex().encode()
                part = partition_for(key, n_parts[kind])
                dead[kind][part] += 1
                fault_kinds.append(fk.value)
                records.append(Record(topic[kind], part, key, value))
            else:
                records.append(Record(topic[kind], parts[i], keys[i], dumps(dicts[i])))

        s_ok = ~is_bad[s_idx]
        a_ok = ~is_bad[a_idx]
        return Chunk(
            first=first,
            records=records,
            sensor=SensorColumns(s_part[s_ok], event_time[s_idx][s_ok], series[s_ok], values[s_ok]),
            applog=AppLogColumns(
                a_part[a_ok],
                event_time[a_idx][a_ok],
                routes[a_ok],
                latency[a_ok],
                status[a_ok],
                error[a_ok],
            ),
            dead=dead,
            late_injected=int(is_late.sum()),
            bad=len(bad_set),
            fault_kinds=fault_kinds,
        )

    def _episodes_within(self, kind: EventKind, t: IntArray) -> list[Episode]:
        if len(t) == 0:
            return []
        lo, hi = int(t.min()), int(t.max())
        return [e for e in self.episodes if e.type is kind and e.start_ms <= hi and e.end_ms > lo]

    def _sensor(
        self, rng: np.random.Generator, t: IntArray
    ) -> tuple[list[dict[str, Any]], IntArray, FloatArray]:
        f = self.fleet
        n = len(t)
        dev = rng.integers(0, len(f.device_ids), n)
        series = f.device_series_offset[dev] + (rng.random(n) * f.device_series_count[dev]).astype(
            np.int64
        )
        cycle = np.sin(2 * np.pi * (t % DAY_MS) / DAY_MS + f.series_phase[series])
        noise = rng.standard_normal(n) * f.series_noise[series]
        value = f.series_base[series] + f.series_amp[series] * cycle + noise
        scale = 4.0 * (f.series_amp[series] + f.series_noise[series])
        for ep in self._episodes_within(EventKind.SENSOR, t):
            hit = (series == ep.target) & (t >= ep.start_ms) & (t < ep.end_ms)
            if not hit.any():
                continue
            if ep.kind == "spike":
                value[hit] += scale[hit] * rng.uniform(2.0, 4.0, int(hit.sum()))
            elif ep.kind == "drift":
                value[hit] += scale[hit] * (t[hit] - ep.start_ms) / (ep.end_ms - ep.start_ms)
            else:  # stuck: the noiseless reading at the episode start, repeated
                s = ep.target
                phase = 2 * np.pi * (ep.start_ms % DAY_MS) / DAY_MS + f.series_phase[s]
                value[hit] = f.series_base[s] + f.series_amp[s] * np.sin(phase)
        value = np.round(
            np.clip(value, self._metric_lo[series], self._metric_hi[series]), 2
        ).astype(np.float64)

        ids, sites, lat, lon, fw = (
            f.device_ids,
            self._series_sites,
            f.device_lat,
            f.device_lon,
            f.device_firmware,
        )
        names, units = self._metric_names, self._metric_units
        dicts = [
            {
                "schema_version": 1,
                "device_id": ids[d],
                "site": sites[s],
                "event_time": ti,
                "metric": names[m],
                "value": v,
                "unit": units[m],
                "lat": lat[d],
                "lon": lon[d],
                "firmware": fw[d],
            }
            for d, s, m, ti, v in zip(
                f.series_device[series].tolist(),
                series.tolist(),
                f.series_metric[series].tolist(),
                t.tolist(),
                value.tolist(),
                strict=True,
            )
        ]
        return dicts, series, value

    def _applog(
        self, rng: np.random.Generator, t: IntArray
    ) -> tuple[
        list[dict[str, Any]], IntArray, FloatArray, IntArray, npt.NDArray[np.bool_], list[str]
    ]:
        f = self.fleet
        n = len(t)
        svc = rng.integers(0, len(f.services), n)
        route = f.service_route_offset[svc] + (rng.random(n) * f.service_route_count[svc]).astype(
            np.int64
        )
        latency = np.exp(f.route_mu[route] + f.route_sigma[route] * rng.standard_normal(n))
        u = rng.random(n)
        p5, p4 = f.route_p5[route], f.route_p4[route]
        cls = np.where(u < p5, 5, np.where(u < p5 + p4, 4, np.where(u < p5 + p4 + P_3XX, 3, 2)))
        burst_draw = rng.random(n)
        for ep in self._episodes_within(EventKind.APPLOG, t):
            hit = (svc == ep.target) & (t >= ep.start_ms) & (t < ep.end_ms)
            if ep.kind == "latency_storm":
                latency[hit] *= STORM_FACTOR
            else:
                cls[hit & (burst_draw < BURST_5XX_SHARE)] = 5
        latency = np.round(np.minimum(latency, 3_600_000.0), 2).astype(np.float64)
        pick = rng.integers(0, 1 << 30, n)
        status = np.empty(n, dtype=np.int64)
        for c, codes in STATUS_CODES.items():
            sel = cls == c
            status[sel] = np.asarray(codes)[pick[sel] % len(codes)]
        error: npt.NDArray[np.bool_] = cls == 5
        warn = (cls == 4) | (latency > SLOW_MS)
        hexes = rng.bytes(16 * n).hex()
        trace_ids = [hexes[32 * i : 32 * i + 32] for i in range(n)]
        level_names = np.where(error, "ERROR", np.where(warn, "WARN", "INFO")).tolist()
        services, routes = f.services, f.routes
        dicts = [
            {
                "schema_version": 1,
                "service": services[k],
                "route": routes[r],
                "event_time": ti,
                "level": lv,
                "status_code": sc,
                "latency_ms": lat,
                "trace_id": tr,
                "message": "slow request" if lv == "WARN" and sc < 400 else MESSAGES[sc],
            }
            for k, r, ti, lv, sc, lat, tr in zip(
                svc.tolist(),
                route.tolist(),
                t.tolist(),
                level_names,
                status.tolist(),
                latency.tolist(),
                trace_ids,
                strict=True,
            )
        ]
        return dicts, route, latency, status, error, trace_ids
