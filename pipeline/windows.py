"""Event-time windows and per-partition watermarks (pure).

The watermark of a partition is the largest event time seen in it minus the allowed lateness.
An event whose time is below the watermark *at the moment it is read* is late: it goes to the
late-events topic and touches no window. Every other event updates every window containing it.

The rule depends only on the order of events within the partition, never on batch boundaries or
wall-clock time, so a batch re-read after a crash classifies exactly as it did the first time
(given the partition's ``max_event_time`` stored with its applied offset).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

NO_EVENT_YET = np.iinfo(np.int64).min


@dataclass(frozen=True, slots=True)
class Lateness:
    """Outcome of classifying a batch of event times."""

    on_time: npt.NDArray[np.bool_]
    max_event_time: int  # after the batch (NO_EVENT_YET if still none)
    seen_before: npt.NDArray[np.int64]  # partition max event time before each event


def classify(
    event_times: npt.NDArray[np.int64], max_event_time: int, allowed_lateness_ms: int
) -> Lateness:
    """Mark each event on time or late, in order, starting from ``max_event_time``.

    Late events are below the running maximum minus the lateness, so they never raise it; the
    running maximum can therefore include them, which makes the rule one vectorised pass.
    """
    t = np.asarray(event_times, dtype=np.int64)
    if t.size == 0:
        return Lateness(np.zeros(0, dtype=np.bool_), max_event_time, np.zeros(0, np.int64))
    running = np.maximum.accumulate(np.maximum(t, max_event_time))
    before = np.empty_like(running)
    before[0] = max_event_time
    before[1:] = running[:-1]
    # The first event of a partition has nothing to be late against (clamping avoids overflow).
    on_time = t >= np.maximum(before, NO_EVENT_YET + allowed_lateness_ms) - allowed_lateness_ms
    return Lateness(on_time, int(running[-1]), before)


def watermark(max_event_time: int, allowed_lateness_ms: int) -> int | None:
    """The watermark for a partition's ``max_event_time`` (``None`` before any event)."""
    if max_event_time == NO_EVENT_YET:
        return None
    return max_event_time - allowed_lateness_ms


def window_starts(event_times: npt.NDArray[np.int64], size_ms: int) -> npt.NDArray[np.int64]:
    """Start of the tumbling window instance containing each event time."""
    t = np.asarray(event_times, dtype=np.int64)
    return t - t % size_ms
