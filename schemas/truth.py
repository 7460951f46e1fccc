"""The load generator's truth file: what a run implies, read by ``pulse verify`` and ``pulse eval
anomalies`` (written by ``loadgen.truth``).

:func:`load` checks the shape of every part the readers use, down to the object keys they read
as numbers, so a file that is not a truth file (or a damaged one) is one sentence naming the
first wrong part, never a traceback or, worse, a verification that passes because it found
nothing to compare.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, Final, Literal

import orjson
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    Strict,
    ValidationError,
)
from pydantic_core import PydanticCustomError

from schemas.events import EventKind

FORMAT: Final = 1
# Longest span of seconds a reader turns into milliseconds (ten years): longer than any run, and
# far from the floats whose milliseconds overflow.
MAX_SECONDS: Final = 10 * 365 * 86_400
MAX_PARTITIONS: Final = 100_000


def _whole(pattern: str, what: str) -> Callable[[str], str]:
    regex = re.compile(pattern)

    def check(key: str) -> str:
        if regex.fullmatch(key) is None:
            raise PydanticCustomError("truth_key", f"expected {what}")
        return key

    return check


# Object keys the readers turn into ints, bounded so that they fit the store's int64s.
_Partition = Annotated[str, AfterValidator(_whole(r"[0-9]{1,9}", "a partition number"))]
_Start = Annotated[str, AfterValidator(_whole(r"-?[0-9]{1,18}", "a window start in ms"))]


# The statistics ``pulse verify`` reads of every entity (besides optional status counts).
_STATS: Final = frozenset(("n", "sum", "min", "max", "std", "p50", "p90", "p95", "p99"))


def _all_stats(stats: dict[str, float]) -> dict[str, float]:
    if missing := _STATS - stats.keys():
        raise PydanticCustomError(
            "truth_stats", "missing statistics: {names}", {"names": ", ".join(sorted(missing))}
        )
    return stats


# A dict, not a model: a long run's truth holds millions of these, and models are slower.
_Stats = Annotated[dict[str, float], AfterValidator(_all_stats)]


# The models are strict, since load() hands the readers the parsed JSON, not the validated
# values: "1" must not pass for 1. Kinds stay lax: strict takes an enum only as an instance.
_Kind = Annotated[EventKind, Strict(False)]
_PerKind = dict[_Kind, NonNegativeInt]  # kind -> count
# kind -> window -> dim -> window start -> entity -> statistics
_Windows = dict[_Kind, dict[str, dict[str, dict[_Start, dict[str, _Stats]]]]]
# kind -> partition -> 1m window start -> board -> member -> score
_Boards = dict[_Kind, dict[_Partition, dict[_Start, dict[str, dict[str, float]]]]]


class Episode(BaseModel):
    """An injected anomaly: its type, event kind, entity and time span."""

    model_config = ConfigDict(extra="allow", strict=True)

    type: _Kind
    kind: str
    entity: str
    start_ms: int
    end_ms: int
    events: NonNegativeInt | None = None


class _Truth(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    format: Literal[1]
    start_ms: int
    end_ms: int
    windows: _Windows
    anomaly_after_s: Annotated[float, Field(ge=0, le=MAX_SECONDS)] = 0.0
    # a reader queues a read per partition: bounded far above any topic Pulse reads
    partitions: dict[_Kind, Annotated[int, Field(ge=1, le=MAX_PARTITIONS)]] = {}
    produced: _PerKind = {}
    events: _PerKind = {}
    late: _PerKind = {}
    dead: _PerKind = {}
    per_partition: dict[_Kind, dict[_Partition, dict[str, NonNegativeInt]]] = {}
    boards: _Boards = {}
    anomalies: list[Episode] = []


class TruthFileError(Exception):
    """The file cannot be read, or is not a truth file (one sentence)."""


def load(path: Path) -> dict[str, Any]:
    """The truth file at ``path`` as parsed JSON, once its shape is checked.

    Raises :class:`TruthFileError`.
    """
    try:
        doc = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        raise TruthFileError(f"cannot read truth file {path}: {exc}") from None
    if not isinstance(doc, dict) or "format" not in doc:
        raise TruthFileError(
            f'{path} is not a truth file of `pulse loadgen --truth` (no "format" field)'
        )
    try:
        _Truth.model_validate(doc)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        raise TruthFileError(f"truth file {path}: {_where(err['loc'])}: {err['msg']}") from None
    return doc


def _where(loc: Sequence[str | int]) -> str:
    """A readable JSON path of a pydantic error; a wrong object key (pydantic ends its path with
    ``[key]``) is named apart. Long or unprintable keys are shortened and quoted."""
    key = None
    if loc and loc[-1] == "[key]":
        loc, key = loc[:-2], str(loc[-2])
    path = ".".join(_part(p) for p in loc) or "the document"
    return path if key is None else f"{path}: key {key[:64]!r}"


def _part(p: str | int) -> str:
    s = str(p)
    return s if s.isprintable() and len(s) <= 64 else repr(s[:64])
