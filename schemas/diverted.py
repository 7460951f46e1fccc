"""The contract of the dead-letter and late topics' records, for their readers.

The worker copies a diverted record's original bytes (key and value) and headers, but any
header named ``pulse.*`` (``PREFIX``: the worker's own), and adds these headers
(``pipeline/divert.py``); a dead letter too large to forward whole is cut to its first 64 KiB,
keeps only the worker's headers and is marked with ``TRUNCATED`` (the original size) and
``TRUNCATED_REASON``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

PREFIX: Final = "pulse."  # the worker's headers; a record's own of this name are not copied
REASON: Final = "pulse.reason"  # printable ASCII, at most 300 characters
SOURCE_TOPIC: Final = "pulse.source.topic"
SOURCE_PARTITION: Final = "pulse.source.partition"
SOURCE_OFFSET: Final = "pulse.source.offset"
TRUNCATED: Final = "pulse.truncated"
TRUNCATED_REASON: Final = "pulse.truncated.reason"
HEADERS: Final = (REASON, SOURCE_TOPIC, SOURCE_PARTITION, SOURCE_OFFSET)


@dataclass(frozen=True, slots=True)
class DivertedInfo:
    """What the headers of a diverted record say (fields a header lacks are None)."""

    reason: str | None
    source_topic: str | None
    source_partition: int | None
    source_offset: int | None
    truncated_from: int | None = None  # the original size of a truncated dead letter


def _int(raw: bytes | None) -> int | None:
    try:
        return None if raw is None else int(raw)
    except ValueError:
        return None


def parse_headers(headers: Iterable[tuple[str, bytes | None]]) -> DivertedInfo:
    """The headers of a diverted record, read leniently (a topic may hold anything)."""
    h = {k: v for k, v in headers if v is not None}

    def text(name: str) -> str | None:
        raw = h.get(name)
        return None if raw is None else raw.decode("utf-8", errors="replace")

    return DivertedInfo(
        reason=text(REASON),
        source_topic=text(SOURCE_TOPIC),
        source_partition=_int(h.get(SOURCE_PARTITION)),
        source_offset=_int(h.get(SOURCE_OFFSET)),
        truncated_from=_int(h.get(TRUNCATED)),
    )
