"""Detection quality against the load generator's injected anomalies (``pulse eval anomalies``).

The truth file lists each injected episode (kind, entity, start, end). An anomaly the worker
raised *matches* an episode of its entity when its window overlaps the episode widened by
``slack`` on both sides (a window detector reports the window that showed it, and a level
shift may be confirmed a window or two later). Precision is the share of raised anomalies
that match an episode; recall, per episode kind, the share of episodes matched at least once.
Several anomalies of one episode (several signals, consecutive windows) are all true.

An episode that changed no event (its target sent nothing, or nothing on time, within it: a
2-second spike of a series read every few seconds) cannot be seen by any detector: the truth
file counts each episode's events, and such episodes are reported apart, not in recall.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from schemas import anomaly, keys
from schemas import truth as truth_file
from schemas.argtypes import non_negative_seconds, one_line
from schemas.events import EventKind


@dataclass(frozen=True, slots=True)
class Episode:
    """One injected anomaly of the truth file."""

    kind: str  # event kind: "sensor" | "applog"
    anomaly: str  # what was injected: spike, drift, stuck, latency_storm, error_burst
    entity: str
    start_ms: int
    end_ms: int
    events: int | None = None  # on-time events it changed (None: a truth file without counts)


@dataclass(slots=True)
class KindQuality:
    """Precision of one event kind's anomalies, and recall per injected anomaly kind."""

    raised: int = 0
    true: int = 0
    found: dict[str, int] = field(default_factory=dict)  # anomaly kind -> episodes matched
    episodes: dict[str, int] = field(default_factory=dict)  # anomaly kind -> episodes
    unseen: dict[str, int] = field(default_factory=dict)  # anomaly kind -> in no event

    @property
    def precision(self) -> float:
        """Share of raised anomalies that match an episode (1.0 when none was raised)."""
        return self.true / self.raised if self.raised else 1.0

    def recall(self, kind: str | None = None) -> float:
        """Share of episodes (of one anomaly kind, or all) matched at least once."""
        found = self.found.get(kind, 0) if kind else sum(self.found.values())
        total = self.episodes.get(kind, 0) if kind else sum(self.episodes.values())
        return found / total if total else 1.0


def episodes_of(truth: Mapping[str, Any]) -> list[Episode]:
    """The episodes of a truth document."""
    return [
        Episode(
            str(e["type"]),
            str(e["kind"]),
            str(e["entity"]),
            int(e["start_ms"]),
            int(e["end_ms"]),
            None if e.get("events") is None else int(e["events"]),
        )
        for e in truth.get("anomalies", [])
    ]


def counted_ms(truth: Mapping[str, Any], after_s: float | None, slack_s: float) -> tuple[int, int]:
    """``(from_ms, slack_ms)`` of :func:`score`: ``after_s`` seconds after the run's start
    (``None``: the truth's ``anomaly_after_s``), and ``slack_s`` in milliseconds.

    Raises ValueError (one sentence) for seconds outside ``[0, schemas.truth.MAX_SECONDS]``.
    """
    name, after = "--after", after_s
    if after is None:
        name, after = "the truth file's anomaly_after_s", float(truth.get("anomaly_after_s", 0))
    for what, seconds in ((name, after), ("--slack", slack_s)):
        if not 0 <= seconds <= truth_file.MAX_SECONDS:
            raise ValueError(
                f"{what} must be from 0 to {truth_file.MAX_SECONDS} seconds (ten years), "
                f"got {seconds:g}"
            )
    return int(truth.get("start_ms", 0)) + round(after * 1000), round(slack_s * 1000)


def score(
    episodes: Sequence[Episode],
    raised: Iterable[anomaly.AnomalyRecord],
    slack_ms: int = 30_000,
    from_ms: int | None = None,
) -> dict[str, KindQuality]:
    """Precision and recall per event kind. With ``from_ms``, only episodes starting and
    anomalies raised at or after it count (before it the detectors are still learning)."""
    out = {k.value: KindQuality() for k in EventKind}
    by_entity: dict[tuple[str, str], list[int]] = {}
    for i, e in enumerate(episodes):
        if from_ms is not None and e.start_ms < from_ms:
            continue
        q = out[e.kind]
        by_entity.setdefault((e.kind, e.entity), []).append(i)
        if e.events == 0:  # in no event: nothing to find (an anomaly near it still matches)
            q.unseen[e.anomaly] = q.unseen.get(e.anomaly, 0) + 1
            continue
        q.episodes[e.anomaly] = q.episodes.get(e.anomaly, 0) + 1
        q.found.setdefault(e.anomaly, 0)
    matched: set[int] = set()
    for a in raised:
        if from_ms is not None and a.window_start_ms < from_ms:
            continue
        q = out.setdefault(a.kind, KindQuality())
        q.raised += 1
        hits = [
            i
            for i in by_entity.get((a.kind, a.entity), ())
            if a.window_start_ms + a.window_ms > episodes[i].start_ms - slack_ms
            and a.window_start_ms < episodes[i].end_ms + slack_ms
        ]
        if hits:
            q.true += 1
            matched.update(hits)
    for i in matched:
        e = episodes[i]
        if e.events != 0:
            out[e.kind].found[e.anomaly] += 1
    return out


def report(quality: Mapping[str, KindQuality]) -> str:
    """A readable table of :func:`score`'s result."""
    lines = []
    for kind, q in quality.items():
        lines.append(
            f"{kind}: precision {q.precision:.3f} ({q.true}/{q.raised}), "
            f"recall {q.recall():.3f} ({sum(q.found.values())}/{sum(q.episodes.values())})"
        )
        for name in sorted(q.episodes):
            lines.append(
                f"  {name:<14} recall {q.recall(name):.3f} ({q.found[name]}/{q.episodes[name]})"
            )
        for name, n in sorted(q.unseen.items()):
            lines.append(f"  {name:<14} {n} more episode(s) changed no event: not counted")
    return "\n".join(lines)


def read_anomalies(client: Any, partitions: int) -> tuple[list[anomaly.AnomalyRecord], int]:
    """Every anomaly record the store holds (both kinds, ``partitions`` each), and how many
    records did not decode."""
    pipe = client.pipeline(transaction=False)
    for kind in EventKind:
        for p in range(partitions):
            pipe.hvals(keys.anomalies_key(kind, p))
    out: list[anomaly.AnomalyRecord] = []
    bad = 0
    for blobs in pipe.execute():
        for blob in blobs:
            try:
                out.append(anomaly.decode_record(blob))
            except ValueError:
                bad += 1
    return out, bad


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``pulse eval anomalies``."""
    parser.add_argument("truth", type=Path, help="the load generator's truth file")
    parser.add_argument(
        "--slack",
        type=non_negative_seconds,
        default=30.0,
        metavar="S",
        help="seconds an anomaly may lie outside its episode and still match (default: 30)",
    )
    parser.add_argument(
        "--after",
        type=non_negative_seconds,
        default=None,
        metavar="S",
        help="count only episodes and anomalies from S seconds after the run's start "
        "(default: the run's --anomaly-after)",
    )


def run(args: argparse.Namespace) -> int:
    """Print precision and recall per kind of the store's anomalies against a truth file."""
    from redis.exceptions import RedisError

    from pipeline.settings import KafkaSettings, StoreSettings
    from schemas.settings import StoreRole, store_client

    try:
        truth = truth_file.load(args.truth)
        from_ms, slack_ms = counted_ms(truth, args.after, args.slack)
    except (truth_file.TruthFileError, ValueError) as exc:
        print(f"pulse eval anomalies: {exc}.", file=sys.stderr)
        return 2
    partitions = max(truth.get("partitions", {}).values(), default=KafkaSettings().partitions)
    try:
        records, bad = read_anomalies(
            store_client(StoreSettings(), role=StoreRole.READER), int(partitions)
        )
    except (RedisError, OSError) as exc:
        print(f"pulse eval anomalies: cannot read the store: {one_line(exc)}.", file=sys.stderr)
        return 1
    print(report(score(episodes_of(truth), records, slack_ms, from_ms)))
    if bad:
        print(f"({bad} stored records did not decode and were left out)")
    return 0
