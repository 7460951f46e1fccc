"""Where a newly assigned partition is read from: the store's position, or a refusal."""

from __future__ import annotations

import pytest

from pipeline.batch import PartitionState
from pipeline.ingest import Refuse, Resume, resume_position

T = "pulse.sensor"


def stored(offset: int, topic: str | None = T) -> PartitionState:
    return PartitionState(offset=offset, topic=topic)


@pytest.mark.parametrize(
    ("state", "start", "end", "want"),
    [
        (stored(-1, None), 0, 0, Resume(0)),  # new store, empty topic
        (stored(-1, None), 0, 500, Resume(0)),  # new (or lost) store: everything Kafka holds
        (stored(-1, None), 120, 500, Resume(120)),  # new store, retention trimmed the head
        (stored(99), 0, 500, Resume(100)),  # the store's position, whatever Kafka committed
        (stored(499), 0, 500, Resume(500)),  # fully applied: read what comes next
        (stored(99, None), 0, 500, Resume(100)),  # progress written before topics were recorded
        (stored(119), 120, 500, Resume(120)),  # next record is the first one retained
    ],
)
def test_resumes_where_the_store_stands(
    state: PartitionState, start: int, end: int, want: Resume
) -> None:
    assert resume_position(state, T, start, end) == want


def test_refuses_a_gap_left_by_retention() -> None:
    got = resume_position(stored(99), T, 150, 500)
    assert isinstance(got, Refuse)
    assert "offsets 100..149 were deleted before they were applied" in got.reason


def test_refuses_a_log_shorter_than_what_was_applied() -> None:
    got = resume_position(stored(799), T, 0, 500)
    assert isinstance(got, Refuse)
    assert "recreated or truncated" in got.reason


def test_refuses_offsets_recorded_for_another_topic() -> None:
    got = resume_position(stored(10, "old.sensor"), T, 0, 500)
    assert isinstance(got, Refuse)
    assert "'old.sensor'" in got.reason and repr(T) in got.reason
