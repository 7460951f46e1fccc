"""The load generator's truth file: what a run implies, read by ``pulse verify`` and ``pulse eval
anomalies`` (written by ``loadgen.truth``).

:func:`load` checks the shape of every part the readers use, so a file that is not a truth file
(or a damaged one) is one sentence naming the first wrong part, never a traceback or, worse, a
verification that passes because it found nothing to compare.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final, Literal

import orjson
from pydantic import BaseModel, ConfigDict, NonNegativeInt, PositiveInt, ValidationError

FORMAT: Final = 1

_PerKind = dict[str, NonNegativeInt]  # kind -> count
# kind -> window -> dim -> window start -> entity -> statistic -> value
_Windows = dict[str, dict[str, dict[str, dict[str, dict[str, dict[str, float]]]]]]
# kind -> partition -> 1m window start -> board -> member -> score
_Boards = dict[str, dict[str, dict[str, dict[str, dict[str, float]]]]]


class Episode(BaseModel):
    """An injected anomaly: its type, event kind, entity and time span."""

    model_config = ConfigDict(extra="allow")

    type: str
    kind: str
    entity: str
    start_ms: int
    end_ms: int
    events: NonNegativeInt | None = None


class _Truth(BaseModel):
    model_config = ConfigDict(extra="allow")

    format: Literal[1]
    start_ms: int
    end_ms: int
    windows: _Windows
    anomaly_after_s: float = 0.0
    partitions: dict[str, PositiveInt] = {}
    produced: _PerKind = {}
    events: _PerKind = {}
    late: _PerKind = {}
    dead: _PerKind = {}
    per_partition: dict[str, dict[str, dict[str, NonNegativeInt]]] = {}
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
        where = ".".join(str(p) for p in err["loc"]) or "the document"
        raise TruthFileError(f"truth file {path}: {where}: {err['msg']}") from None
    return doc
