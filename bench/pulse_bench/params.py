"""Sizes of a benchmark run (a leaf module: every other bench module may import it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class BenchParams:
    """Sizes of a run; ``smoke`` sizes check the harness in seconds, not speed."""

    smoke: bool
    events: int  # records preloaded for the drain cases (floor, naive, pulse, quix)
    naive_events: int  # records the naive baseline handles (it is slow)
    rate: int  # input rate of the fixed-rate freshness case, events/s
    freshness_s: int  # the measured span of the freshness cases
    devices: int
    services: int
    seed: int = 7
    bad_rate: float = 0.001
    late_rate: float = 0.002
    read_devices: int = 10_000
    read_day_minutes: int = 1440  # windows written for the reads case
    read_hot_minutes: int = 10  # the most recent minutes (the 5-min panels read), at read_hot_rate
    read_hot_rate: int = 1000  # events/s in the hot minutes
    read_background_per_min: int = 300  # events/min before the hot minutes
    read_device_minutes: int = 10  # minutes that also get the device dimension
    read_repeats: int = 100
    # rounds of (detection off, detection on) drains after pulse_1w's (pulse_1w_nodetect)
    detection_rounds: int = 3
    store_db: int = 15
    drain_timeout_s: float = 240.0
    quix_commit_interval_s: float = 1.0  # how often the Quix app flushes its sink and commits
    hnsw_vectors: int = 100_000  # vectors in the similar-anomaly index of the hnsw case
    hnsw_queries: int = 1_000  # queries the hnsw case times (and checks recall on)
    profile_dir: str | None = None
    # paced load before the freshness cases' measured span (None: the worker's allowed
    # lateness plus one 10 s window, so that windows close and detectors step while measured)
    freshness_settle_s: float | None = None

    @classmethod
    def create(
        cls,
        smoke: bool,
        events: int | None = None,
        rate: int | None = None,
        **overrides: Any,
    ) -> BenchParams:
        """Defaults of a full or smoke run, with explicit overrides."""
        if smoke:
            base = cls(
                smoke=True, events=20_000, naive_events=1_000, rate=2_000, freshness_s=3,
                devices=200, services=5, read_devices=500, read_day_minutes=120,
                read_hot_minutes=5, read_hot_rate=100, read_background_per_min=100,
                read_device_minutes=2, read_repeats=10, drain_timeout_s=90.0,
                hnsw_vectors=5_000, hnsw_queries=200, detection_rounds=1,
                freshness_settle_s=0.0,
            )  # fmt: skip
        else:
            base = cls(
                smoke=False, events=300_000, naive_events=20_000, rate=5_000, freshness_s=15,
                devices=1000, services=10,
            )  # fmt: skip
        if events is not None:
            base.events = events
            base.naive_events = min(base.naive_events, events)
        if rate is not None:
            base.rate = rate
        for name, value in overrides.items():
            setattr(base, name, value)
        return base
