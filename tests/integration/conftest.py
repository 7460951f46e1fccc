"""Fixtures that run the real local stack (Kafka KRaft + Valkey primary/replica) on free ports.

``stack`` is one stack for the whole session; ``fresh_stack`` builds private stacks for tests
that kill, restart or promote things. Both use a fresh home under pytest's tmp dir and the shared
Kafka jar cache (``PULSE_CACHE_DIR``, default ``~/.cache/pulse``), so the jars are fetched once.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterator

import pytest
import redis

from pipeline.stack import StackError
from pipeline.stack.testing import RunningStack, make_stack


def _down(running: RunningStack) -> None:
    with contextlib.suppress(StackError):
        running.stack.down()


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    """The session's stack: Kafka + Valkey primary + replica, up until the session ends."""
    running = make_stack(tmp_path_factory.mktemp("pulse-home"))
    try:
        running.stack.up()
        yield running
    finally:
        _down(running)


@pytest.fixture
def store(stack: RunningStack) -> Iterator[redis.Redis]:
    """A sync client to the session stack's primary, emptied (FLUSHALL) before the test."""
    client = stack.redis()
    client.flushall()
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def new_topic(stack: RunningStack) -> Callable[..., str]:
    """A factory of fresh, uniquely named topics on the session broker: ``new_topic(2)``."""

    def make(partitions: int = 1, prefix: str = "test") -> str:
        name = f"{prefix}.{uuid.uuid4().hex[:12]}"
        stack.stack.kafka.create_topics([name], partitions)
        return name

    return make


@pytest.fixture
def fresh_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., RunningStack]]:
    """A factory of private stacks for destructive tests; all are torn down after the test.

    ``fresh_stack(start=True, replica=True, partitions=6, brokers=1)``; with ``start=False``
    nothing runs yet, so a test can start single services (``running.stack.primary.start()``)
    and skip Kafka.
    """
    made: list[RunningStack] = []

    def make(
        start: bool = True, replica: bool = True, partitions: int = 6, brokers: int = 1
    ) -> RunningStack:
        running = make_stack(
            tmp_path_factory.mktemp("pulse-fresh"),
            replica=replica,
            partitions=partitions,
            brokers=brokers,
        )
        made.append(running)
        if start:
            running.stack.up()
        return running

    try:
        yield make
    finally:
        for running in made:
            _down(running)
