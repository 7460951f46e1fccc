"""A worker's live counters, published to the store (names: ``schemas.keys.WorkerMetric``)."""

from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
from redis.typing import EncodableT, FieldT

from schemas.keys import WorkerMetric as M


def wall_clock_ms() -> int:
    """Wall-clock time in epoch milliseconds."""
    return time.time_ns() // 1_000_000


@dataclass
class Metrics:
    """Live counters of one worker process, published to the store every few seconds."""

    events: int = 0
    late: int = 0
    dead: int = 0
    batches: int = 0
    anomalies: int = 0  # anomalies raised and applied
    conflicts: int = 0
    store_retries: int = 0
    fences: int = 0
    isolated: int = 0  # records that made batch processing fail and were dead-lettered alone
    dead_truncated: int = 0  # dead letters written as a truncated copy
    dead_unwritable: int = 0  # dead letters that could not be written even truncated
    refused: dict[str, str] = field(default_factory=dict)  # partition -> why it is not read
    open_windows: int = 0  # window instances held in memory (all kinds, as of the last poll)
    open_entities: int = 0  # entity values held in them
    state_size: dict[str, tuple[int, int]] = field(default_factory=dict)  # per kind
    detector_entities: int = 0  # entities the detectors watch (as of the last poll)
    detector_evicted: int = 0  # ... forgotten because a partition watched its cap
    durability_wait_s: deque[float] = field(default_factory=lambda: deque(maxlen=2048))
    apply_s: deque[float] = field(default_factory=lambda: deque(maxlen=2048))
    prepare_s: deque[float] = field(default_factory=lambda: deque(maxlen=2048))
    started: float = field(default_factory=time.monotonic)

    def snapshot(self) -> dict[FieldT, EncodableT]:
        """Flat fields for the worker's metrics hash."""

        def pct(samples: deque[float], q: float) -> float:
            return round(float(np.percentile(samples, q)) * 1000, 3) if samples else 0.0

        elapsed = max(time.monotonic() - self.started, 1e-9)
        return {
            M.EVENTS: self.events,
            M.LATE: self.late,
            M.DEAD: self.dead,
            M.BATCHES: self.batches,
            M.ANOMALIES: self.anomalies,
            M.CONFLICTS: self.conflicts,
            M.STORE_RETRIES: self.store_retries,
            M.FENCES: self.fences,
            M.ISOLATED: self.isolated,
            M.DEAD_TRUNCATED: self.dead_truncated,
            M.DEAD_UNWRITABLE: self.dead_unwritable,
            M.REFUSED: len(self.refused),
            M.REFUSED_REASONS: "; ".join(f"{tp}: {why}" for tp, why in self.refused.items()),
            M.OPEN_WINDOWS: self.open_windows,
            M.OPEN_ENTITIES: self.open_entities,
            M.DETECTOR_ENTITIES: self.detector_entities,
            M.DETECTOR_EVICTED: self.detector_evicted,
            M.EVENTS_PER_S: round(self.events / elapsed, 1),
            M.PREPARE_P50_MS: pct(self.prepare_s, 50),
            M.PREPARE_P99_MS: pct(self.prepare_s, 99),
            M.APPLY_P50_MS: pct(self.apply_s, 50),
            M.APPLY_P99_MS: pct(self.apply_s, 99),
            M.DURABILITY_P50_MS: pct(self.durability_wait_s, 50),
            M.DURABILITY_P99_MS: pct(self.durability_wait_s, 99),
            M.UPDATED_MS: wall_clock_ms(),
            M.PID: os.getpid(),
        }
