"""``pulse verify --truth FILE``: prove the store holds exactly what a load generator run implies.

Reads every window aggregate in the store (merging partitions, and 1-minute panes into hopping
windows) and compares it with the truth file, which the load generator computed from the events
it produced. It shares only the key layout (``schemas.keys``) and the sketch decoding with the
pipeline, never the pipeline's aggregation arithmetic. Exit status 0 when everything matches,
1 on any mismatch (each one is printed), 2 on bad input.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from schemas import keys
from schemas.events import EventKind

# Counts and min/max must match exactly; float sums may differ by summation order only.
SUM_REL_TOL = 1e-9
VAR_REL_TOL = 1e-9
STATUS_STATS = (*keys.Stat.STATUS_CLASSES, keys.Stat.ERRORS)


class VerifyError(Exception):
    """The truth file or the store cannot be read."""


@dataclass
class Merged:
    """A window aggregate merged over partitions (and panes)."""

    n: int = 0
    sum: float = 0.0
    sq: float = 0.0
    min: float = math.inf
    max: float = -math.inf
    counts: dict[str, int] = field(default_factory=dict)
    sketch: dict[int, int] = field(default_factory=dict)

    def add_packed(self, value: str) -> None:
        """Merge one packed aggregate field (``schemas.keys.unpack_stats``)."""
        for stat, x in keys.unpack_stats(value).items():
            if stat == keys.Stat.COUNT:
                self.n += int(x)
            elif stat == keys.Stat.SUM:
                self.sum += x
            elif stat == keys.Stat.SUMSQ:
                self.sq += x
            elif stat == keys.Stat.MIN:
                self.min = min(self.min, x)
            elif stat == keys.Stat.MAX:
                self.max = max(self.max, x)
            else:
                self.counts[stat] = self.counts.get(stat, 0) + int(x)

    def merge(self, other: Merged) -> None:
        """Merge another aggregate into this one."""
        self.n += other.n
        self.sum += other.sum
        self.sq += other.sq
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)
        for k, v in other.counts.items():
            self.counts[k] = self.counts.get(k, 0) + v
        for c, v in other.sketch.items():
            self.sketch[c] = self.sketch.get(c, 0) + v


# kind -> window name -> dim -> start_ms -> entity -> Merged
StoreView = dict[str, dict[str, dict[str, dict[int, dict[str, Merged]]]]]


def _tree() -> StoreView:
    return defaultdict(lambda: defaultdict(lambda: defaultdict(lambda: defaultdict(dict))))


def read_store(client: Any, batch: int = 500) -> tuple[StoreView, dict[str, dict[str, int]]]:
    """Every tumbling-window aggregate in the store, merged over partitions, and the totals."""
    view = _tree()
    for kind in EventKind:
        agg_keys = sorted(client.scan_iter(match=keys.agg_pattern(kind), count=1000))
        for chunk in _chunks(agg_keys, batch):
            pipe = client.pipeline(transaction=False)
            parsed = []
            for k in chunk:
                _, _part, window, dim, start = keys.parse_agg_key(k)
                parsed.append((window, dim, start))
                pipe.hgetall(k)
                pipe.hgetall(k.replace(":agg:", ":sk:", 1))
            rows = pipe.execute()
            for (window, dim, start), agg, sk in zip(parsed, rows[::2], rows[1::2], strict=True):
                bucket = view[kind.value][window][dim][start]
                for ent, value in agg.items():
                    bucket.setdefault(ent, Merged()).add_packed(value)
                for name, value in sk.items():
                    ent, code = keys.split_field(name)
                    m = bucket.setdefault(ent, Merged())
                    m.sketch[int(code)] = m.sketch.get(int(code), 0) + int(value)
    totals: dict[str, dict[str, int]] = {}
    for kind in EventKind:
        t = {"events": 0, "late": 0, "dead": 0}
        for k in client.scan_iter(match=keys.progress_pattern(kind)):
            row = client.hgetall(k)
            for name in t:
                t[name] += int(row.get(name, 0))
        totals[kind.value] = t
    for kind_view in view.values():
        _add_hopping(kind_view)
    return view, totals


def _add_hopping(kind_view: dict[str, dict[str, dict[int, dict[str, Merged]]]]) -> None:
    for hop in keys.HOPPING_WINDOWS:
        panes = kind_view.get(hop.pane.name, {})
        for dim, by_start in panes.items():
            out: dict[int, dict[str, Merged]] = {}
            for pane_start, ents in by_start.items():
                # a pane belongs to every hopping window whose span covers it
                for i in range(hop.panes):
                    start = pane_start - i * hop.advance_ms
                    target = out.setdefault(start, {})
                    for ent, m in ents.items():
                        target.setdefault(ent, Merged()).merge(m)
            kind_view[hop.name][dim] = out


def _chunks(items: list[str], size: int) -> Iterator[list[str]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def compare(truth: dict[str, Any], view: StoreView, totals: dict[str, dict[str, int]]) -> list[str]:
    """Every difference between the truth file and the store, as readable lines."""
    from pipeline.sketches import RELATIVE_ACCURACY, quantiles

    problems: list[str] = []
    for kind in EventKind:
        k = kind.value
        for name, truth_key in (("events", "events"), ("late", "late"), ("dead", "dead")):
            want = int(truth.get(truth_key, {}).get(k, 0))
            got = totals.get(k, {}).get(name, 0)
            if want != got:
                problems.append(f"{k}: {name} total is {got} in the store, truth says {want}")
        for window, dims in truth.get("windows", {}).get(k, {}).items():
            for dim, starts in dims.items():
                stored_dim = view.get(k, {}).get(window, {}).get(dim, {})
                for start_s, ents in starts.items():
                    start = int(start_s)
                    stored = stored_dim.get(start, {})
                    where = f"{k} {window} {dim} @{start}"
                    for ent, want in ents.items():
                        m = stored.get(ent)
                        if m is None or m.n == 0:
                            problems.append(f"{where} {ent}: missing (truth n={want['n']})")
                            continue
                        problems.extend(
                            _compare_entity(f"{where} {ent}", want, m, quantiles, RELATIVE_ACCURACY)
                        )
                    for ent in stored.keys() - ents.keys():
                        if stored[ent].n:
                            problems.append(
                                f"{where} {ent}: in the store (n={stored[ent].n}) "
                                "but not in the truth"
                            )
                for start in stored_dim.keys() - {int(s) for s in starts}:
                    if any(m.n for m in stored_dim[start].values()):
                        problems.append(
                            f"{k} {window} {dim} @{start}: window in the store but not in the truth"
                        )
    return problems


def _compare_entity(
    where: str, want: dict[str, Any], m: Merged, quantiles: Any, accuracy: float
) -> list[str]:
    out: list[str] = []
    n = int(want["n"])
    if m.n != n:
        out.append(f"{where}: n={m.n}, truth {n}")
        return out
    if not math.isclose(m.sum, want["sum"], rel_tol=SUM_REL_TOL, abs_tol=1e-6):
        out.append(f"{where}: sum={m.sum!r}, truth {want['sum']!r}")
    for stat in ("min", "max"):
        got = getattr(m, stat)
        if not math.isclose(got, want[stat], rel_tol=1e-12, abs_tol=1e-12):
            out.append(f"{where}: {stat}={got!r}, truth {want[stat]!r}")
    mean_sq = m.sq / m.n
    mean = m.sum / m.n
    var = max(mean_sq - mean * mean, 0.0)
    # Variance from sums of squares loses ~1e-16 of E[x^2] to cancellation: compare it there.
    if abs(var - float(want["std"]) ** 2) > VAR_REL_TOL * mean_sq + 1e-12:
        out.append(f"{where}: std={math.sqrt(var)!r}, truth {want['std']!r}")
    qs = (0.5, 0.9, 0.95, 0.99)
    for q, est in zip(qs, quantiles(m.sketch, qs), strict=True):
        exact = float(want[f"p{round(q * 100)}"])
        if est is None or abs(est - exact) > accuracy * abs(exact) + 1e-9:
            out.append(f"{where}: p{round(q * 100)}={est!r}, truth {exact!r} (±{accuracy:.1%})")
    for stat in STATUS_STATS:
        if stat in want and int(want[stat]) != m.counts.get(stat, 0):
            out.append(f"{where}: {stat}={m.counts.get(stat, 0)}, truth {want[stat]}")
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``pulse verify``."""
    parser.add_argument("--truth", required=True, type=Path, help="truth file from pulse loadgen")
    parser.add_argument("--max-report", type=int, default=50, help="mismatches to print")


def run(args: argparse.Namespace) -> int:
    """Compare the store with the truth file; 0 if they agree."""
    import orjson
    import redis

    from pipeline.settings import StoreSettings

    try:
        truth = orjson.loads(args.truth.read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        print(f"pulse verify: cannot read truth file {args.truth}: {exc}.", file=sys.stderr)
        return 2
    s = StoreSettings()
    client = redis.Redis(
        host=s.host,
        port=s.port,
        db=s.db,
        password=s.password.get_secret_value() if s.password else None,
        decode_responses=True,
    )
    try:
        view, totals = read_store(client)
    except redis.RedisError as exc:
        print(f"pulse verify: cannot read the store at {s.url()}: {exc}.", file=sys.stderr)
        return 2
    problems = compare(truth, view, totals)
    checked = sum(
        len(ents)
        for k in truth.get("windows", {}).values()
        for dims in k.values()
        for starts in dims.values()
        for ents in starts.values()
    )
    for line in problems[: args.max_report]:
        print(f"MISMATCH {line}")
    if len(problems) > args.max_report:
        print(f"... and {len(problems) - args.max_report} more")
    summary = ", ".join(
        f"{k}: events {t['events']} late {t['late']} dead {t['dead']}" for k, t in totals.items()
    )
    if problems:
        print(f"verify: FAILED, {len(problems)} mismatches in {checked} aggregates ({summary})")
        return 1
    print(f"verify: OK, {checked} window aggregates match the truth exactly ({summary})")
    return 0
