"""One line of an error's message, for the one-sentence messages."""

from __future__ import annotations

import pytest

from schemas.errors import first_line


class KafkaConnectionError(Exception):
    pass


@pytest.mark.parametrize(
    ("exc", "plain", "typed"),
    [
        (ValueError("bad\nmore detail"), "bad", "ValueError: bad"),
        (ValueError(""), "ValueError", "ValueError"),
        (
            KafkaConnectionError("KafkaConnectionError: Unable to bootstrap"),
            "KafkaConnectionError: Unable to bootstrap",
            "KafkaConnectionError: Unable to bootstrap",  # not named twice
        ),
    ],
)
def test_first_line(exc: Exception, plain: str, typed: str) -> None:
    assert first_line(exc) == plain
    assert first_line(exc, typed=True) == typed
