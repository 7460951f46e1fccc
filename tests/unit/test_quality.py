"""Precision and recall of raised anomalies against injected episodes (pure)."""

from __future__ import annotations

import numpy as np

from pipeline import quality
from schemas import anomaly

T0 = 1_700_000_000_000


def raised(
    entity: str, start: int, kind: str = "sensor", signal: str = "max"
) -> anomaly.AnomalyRecord:
    return anomaly.AnomalyRecord(
        anomaly.anomaly_id(kind, 0, start, entity, signal), kind, 0, entity, signal, "range",
        start, 10_000, 0.9, 1.0, 0.0, {}, np.zeros(anomaly.VECTOR_DIM, np.float32),
    )  # fmt: skip


EPISODES = [
    quality.Episode("sensor", "spike", "d1|temp", T0 + 100_000, T0 + 105_000),
    quality.Episode("sensor", "stuck", "d2|temp", T0 + 200_000, T0 + 240_000),
    quality.Episode("applog", "error_burst", "api", T0 + 300_000, T0 + 330_000),
    quality.Episode("sensor", "drift", "d3|temp", T0 + 10_000, T0 + 40_000),  # before from_ms
]


def test_matches_by_entity_and_widened_time() -> None:
    got = quality.score(
        EPISODES,
        [
            raised("d1|temp", T0 + 100_000),  # in the spike
            raised("d1|temp", T0 + 130_000),  # within 30 s after it: still the spike
            raised("d1|temp", T0 + 160_000),  # too late: false
            raised("d2|temp", T0 + 100_000),  # another entity's time: false
            raised("api", T0 + 320_000, "applog", "error_rate"),
            raised("d3|temp", T0 + 20_000),  # before from_ms: not counted
        ],
        slack_ms=30_000,
        from_ms=T0 + 60_000,
    )
    s, a = got["sensor"], got["applog"]
    assert (s.raised, s.true) == (4, 2) and s.precision == 0.5
    assert s.episodes == {"spike": 1, "stuck": 1} and s.found == {"spike": 1, "stuck": 0}
    assert s.recall("spike") == 1.0 and s.recall("stuck") == 0.0 and s.recall() == 0.5
    assert a.precision == 1.0 and a.recall() == 1.0
    assert "spike" in quality.report(got)


def test_nothing_raised_and_nothing_injected() -> None:
    q = quality.score([], [])
    assert q["sensor"].precision == 1.0 and q["sensor"].recall() == 1.0


def test_episodes_of_a_truth_document() -> None:
    doc = {
        "anomalies": [
            {"type": "sensor", "kind": "spike", "entity": "d|m", "start_ms": 1, "end_ms": 2}
        ]
    }
    assert quality.episodes_of(doc) == [quality.Episode("sensor", "spike", "d|m", 1, 2)]


def test_an_episode_that_changed_no_event_is_reported_apart_not_in_recall() -> None:
    """No detector can find an episode that is in no event; a truth file without counts
    (``events`` None) counts every episode as before."""
    seen = quality.Episode("sensor", "spike", "d1|temp", T0 + 100_000, T0 + 105_000, 3)
    blind = quality.Episode("sensor", "spike", "d2|temp", T0 + 200_000, T0 + 202_000, 0)
    unknown = quality.Episode("sensor", "stuck", "d3|temp", T0 + 300_000, T0 + 330_000)
    got = quality.score([seen, blind, unknown], [raised("d1|temp", T0 + 100_000)])["sensor"]
    assert got.episodes == {"spike": 1, "stuck": 1} and got.unseen == {"spike": 1}
    assert got.recall("spike") == 1.0 and got.recall("stuck") == 0.0
    assert "1 more episode(s) changed no event" in quality.report({"sensor": got})
    doc = {"anomalies": [{**_doc(blind), "events": 0}]}
    assert quality.episodes_of(doc) == [blind]


def _doc(e: quality.Episode) -> dict[str, object]:
    return {
        "type": e.kind, "kind": e.anomaly, "entity": e.entity,
        "start_ms": e.start_ms, "end_ms": e.end_ms,
    }  # fmt: skip
