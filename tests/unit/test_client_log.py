"""aiokafka's repeated log lines summarised: the first of a kind, then one a minute."""

from __future__ import annotations

import logging

import aiokafka.conn  # noqa: F401  (its logger must exist before the filter is installed)
import pytest

from schemas.kafka_probe import RepeatsSummarised, client_repeats_summarised


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _said(
    caplog: pytest.LogCaptureFixture, logger: logging.Logger, clock: _Clock, at: list[float]
) -> list[str]:
    caplog.clear()
    for t in at:
        clock.now = t
        logger.error("Unable connect to node with id %s: %s", 1, f"refused at {t:g} (100%)")
    return [r.getMessage() for r in caplog.records if r.name == logger.name]


def test_the_first_line_of_a_kind_then_one_a_minute_with_the_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = _Clock()
    logger = logging.getLogger("pulse.test.repeats")
    repeats = RepeatsSummarised(60.0, clock)
    logger.addFilter(repeats)
    try:
        said = _said(caplog, logger, clock, [1000, 1000.1, 1030, 1059.9, 1060, 1061, 1200])
        line = "Unable connect to node with id 1: refused at"
        assert said == [
            f"{line} 1000 (100%)",
            f"{line} 1060 (100%) (3 more like it in the last 60 s)",
            f"{line} 1200 (100%) (1 more like it in the last 140 s)",
        ]
        # the line said is formatted already, and its arguments stay a tuple (mode's log
        # formatter wraps any other value in one, and would format the line again)
        last = [r for r in caplog.records if r.name == logger.name][-1]
        assert last.args == () and last.getMessage() == said[-1]
        # another template, level or logger is another kind, said at once
        logger.warning("Unable connect to node with id %s: %s", 1, "x")
        logger.error("Unable to update metadata from %s", [1])
        assert len([r for r in caplog.records if r.name == logger.name]) == 5
    finally:
        logger.removeFilter(repeats)


def test_every_aiokafka_logger_gets_it(caplog: pytest.LogCaptureFixture) -> None:
    repeats = client_repeats_summarised()
    conn = logging.getLogger("aiokafka.conn")
    try:
        assert repeats in conn.filters and repeats in logging.getLogger("aiokafka").filters
        caplog.clear()
        for _ in range(50):
            conn.error("Unable connect to node with id %s: %s", 1, "refused")
        assert len([r for r in caplog.records if r.name == "aiokafka.conn"]) == 1
    finally:
        for name in ["aiokafka", *logging.Logger.manager.loggerDict]:
            if name.startswith("aiokafka"):
                logging.getLogger(name).removeFilter(repeats)
