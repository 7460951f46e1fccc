"""The benchmark harness: case registry, run context, ratios, targets and the report.

A case is a function ``run(ctx) -> dict`` registered with :func:`bench_case`; it may declare the
cases it needs (``requires``), whose results it finds in ``ctx.results``. Ratios and targets are
registered the same way and refer to metrics by path (``"cases.floor.events_per_s"``,
``"ratios.pulse_1w_vs_floor"``), so a new part of the pipeline joins the report by registering a
case (and, if it has one, a target) without touching the rest.

Imports form a DAG: :mod:`~pulse_bench.params` and :mod:`~pulse_bench.kafka` sit below this
module, :mod:`~pulse_bench.procs` and the cases above it.
"""

from __future__ import annotations

import math
import os
import platform
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from pulse_bench.kafka import Preloaded, TopicSet, create_topics, delete_topics, preload
from pulse_bench.params import BenchParams
from schemas.settings import KafkaSettings, StoreSettings, store_client

if TYPE_CHECKING:
    import redis

__all__ = [
    "REGISTRY",
    "BenchCase",
    "BenchContext",
    "BenchError",
    "BenchParams",
    "BenchSkipped",
    "Metrics",
    "Ratio",
    "Registry",
    "Target",
    "bench_case",
    "build_report",
    "check_targets",
    "compute_ratios",
    "drain_rate",
    "percentiles",
    "ratio",
    "run_cases",
    "target",
]

Metrics = dict[str, Any]
CaseFn = Callable[["BenchContext"], Metrics]


class BenchError(Exception):
    """A case could not produce a valid measurement."""


class BenchSkipped(Exception):
    """A case cannot run here (an optional package is missing, say): a note, not a failure."""


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True, slots=True)
class BenchCase:
    """One benchmark case."""

    name: str
    run: CaseFn
    description: str
    requires: tuple[str, ...] = ()
    order: int = 100  # cases run by ascending order, then name


@dataclass(frozen=True, slots=True)
class Ratio:
    """``numerator / denominator``, both metric paths into the report."""

    name: str
    numerator: str
    denominator: str


@dataclass(frozen=True, slots=True)
class Target:
    """A goal on one metric path: ``measured <op> threshold``."""

    name: str
    metric: str
    op: Literal[">=", "<="]
    threshold: float
    note: str = ""

    def met(self, measured: float) -> bool:
        """Whether ``measured`` meets the target."""
        return measured >= self.threshold if self.op == ">=" else measured <= self.threshold


@dataclass
class Registry:
    """Cases, ratios and targets known to ``pulse bench``."""

    cases: dict[str, BenchCase] = field(default_factory=dict)
    ratios: dict[str, Ratio] = field(default_factory=dict)
    targets: dict[str, Target] = field(default_factory=dict)

    def add_case(self, case: BenchCase) -> None:
        """Register a case; names are unique."""
        if case.name in self.cases:
            raise ValueError(f"benchmark case {case.name!r} is registered twice")
        self.cases[case.name] = case

    def resolve(self, selected: Sequence[str] | None) -> list[BenchCase]:
        """The cases to run for ``selected`` names (all when None), requirements included."""
        names = list(self.cases) if selected is None else list(selected)
        unknown = [n for n in names if n not in self.cases]
        if unknown:
            raise ValueError(
                f"unknown case {', '.join(unknown)} (known: {', '.join(sorted(self.cases))})"
            )
        chosen: set[str] = set()
        todo = list(names)
        while todo:
            name = todo.pop()
            if name in chosen:
                continue
            chosen.add(name)
            for req in self.cases[name].requires:
                if req not in self.cases:
                    raise ValueError(f"case {name!r} requires unknown case {req!r}")
                todo.append(req)
        ordered = sorted((self.cases[n] for n in chosen), key=lambda c: (c.order, c.name))
        position = {c.name: i for i, c in enumerate(ordered)}
        for case in ordered:
            for req in case.requires:
                if position[req] > position[case.name]:
                    raise ValueError(
                        f"case {case.name!r} is ordered before its requirement {req!r}"
                    )
        return ordered


REGISTRY = Registry()


def bench_case(
    name: str, *, description: str, requires: Iterable[str] = (), order: int = 100
) -> Callable[[CaseFn], CaseFn]:
    """Decorator registering ``fn`` as benchmark case ``name`` in :data:`REGISTRY`."""

    def register(fn: CaseFn) -> CaseFn:
        REGISTRY.add_case(BenchCase(name, fn, description, tuple(requires), order))
        return fn

    return register


def ratio(name: str, numerator: str, denominator: str) -> None:
    """Register a ratio of two metric paths."""
    REGISTRY.ratios[name] = Ratio(name, numerator, denominator)


def target(
    name: str, metric: str, op: Literal[">=", "<="], threshold: float, note: str = ""
) -> None:
    """Register a target on a metric path."""
    REGISTRY.targets[name] = Target(name, metric, op, threshold, note)


# --------------------------------------------------------------------------- pure helpers


def percentiles(samples: Sequence[float] | np.ndarray, qs: Sequence[float]) -> dict[str, float]:
    """``{"p50": ..., "p99": ...}`` of ``samples`` (linear interpolation); empty -> ValueError."""
    arr = np.asarray(samples, dtype=np.float64)
    if arr.size == 0:
        raise ValueError("no samples")
    values = np.percentile(arr, [q * 100 for q in qs])
    return {_pname(q): float(v) for q, v in zip(qs, values, strict=True)}


def _pname(q: float) -> str:
    text = f"{q * 100:g}".replace(".", "_")
    return f"p{text}"


def drain_rate(samples: Sequence[tuple[float, int]]) -> Metrics:
    """Throughput from ``(time_s, records_done)`` samples of a drain.

    The clock starts at the first sample with progress, so process start-up and the consumer
    group join are excluded. ``median_1s_per_s`` is the median over 1-second slices (robust to a
    rebalance pause in the middle). When the first sample with progress is also the last (the
    whole drain fell between two polls, as on a machine that starves the poller), the clock
    starts at the sample before it instead: a rate over at most one poll interval too many, not
    a failed case.
    """
    start = _measured_from(samples)
    t0, n0 = samples[start]
    t1, n1 = samples[-1]
    if t1 <= t0 or n1 <= n0:
        raise ValueError("not enough progress to compute a rate")
    times = np.asarray([t for t, _ in samples[start:]])
    done = np.asarray([n for _, n in samples[start:]], dtype=np.float64)
    edges = np.arange(t0, t1, 1.0)
    per_s: list[float] = []
    if edges.size >= 2:
        at = np.interp(edges, times, done)
        per_s = np.diff(at).tolist()
    return {
        "events_per_s": (n1 - n0) / (t1 - t0),
        "median_1s_per_s": float(np.median(per_s)) if per_s else (n1 - n0) / (t1 - t0),
        "measured_events": int(n1 - n0),
        "measured_s": t1 - t0,
    }


def _measured_from(samples: Sequence[tuple[float, int]]) -> int:
    """The sample a drain's measured interval starts at (see :func:`drain_rate`)."""
    start = next((i for i, (_, n) in enumerate(samples) if n > 0), None)
    if start is None:
        raise ValueError("no progress in the samples")
    if start == len(samples) - 1 and start > 0:
        start -= 1
    return start


def drain_cpu(samples: Sequence[tuple[float, int]], cpu: Sequence[float]) -> Metrics:
    """The workers' CPU over a drain's measured interval (:func:`drain_rate`'s), from
    ``cpu[i]``, their CPU seconds at ``samples[i]``: per measured event, and as a share of the
    interval (``worker_busy``; 1.0 is one core all the time). A drain's rate moves with what
    else the machine runs; its CPU per event much less, so the two side by side tell CPU spent
    from time waited (for the store, Kafka, or a core)."""
    if len(cpu) != len(samples):
        raise ValueError(f"{len(cpu)} CPU readings for {len(samples)} samples")
    start = _measured_from(samples)
    (t0, n0), (t1, n1) = samples[start], samples[-1]
    spent = cpu[-1] - cpu[start]
    return {
        "worker_cpu_s_measured": round(spent, 3),
        "worker_cpu_us_per_measured_event": spent / (n1 - n0) * 1e6 if n1 > n0 else None,
        "worker_busy": spent / (t1 - t0) if t1 > t0 else None,
    }


def lookup(report: Mapping[str, Any], path: str) -> Any:
    """The value at a dotted path of a nested mapping; KeyError if any part is missing."""
    node: Any = report
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise KeyError(path)
        node = node[part]
    return node


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def compute_ratios(results: Mapping[str, Metrics], ratios: Iterable[Ratio]) -> dict[str, float]:
    """Every ratio whose two metrics were measured (and whose denominator is not zero)."""
    doc = {"cases": results}
    out: dict[str, float] = {}
    for r in ratios:
        try:
            num, den = _number(lookup(doc, r.numerator)), _number(lookup(doc, r.denominator))
        except KeyError:
            continue
        if num is not None and den:
            out[r.name] = num / den
    return out


def check_targets(
    results: Mapping[str, Metrics], ratios: Mapping[str, float], targets: Iterable[Target]
) -> dict[str, Metrics]:
    """Each target whose metric was measured: target, measured value and whether it is met."""
    doc = {"cases": results, "ratios": ratios}
    out: dict[str, Metrics] = {}
    for t in targets:
        try:
            measured = _number(lookup(doc, t.metric))
        except KeyError:
            continue
        if measured is None:
            continue
        entry: Metrics = {
            "metric": t.metric,
            "target": f"{t.op} {t.threshold:g}",
            "measured": measured,
            "met": t.met(measured),
        }
        if t.note:
            entry["note"] = t.note
        out[t.name] = entry
    return out


def build_report(
    machine: Metrics,
    params: Metrics,
    results: Mapping[str, Metrics],
    errors: Mapping[str, str],
    registry: Registry = REGISTRY,
    skipped: Mapping[str, str] | None = None,
) -> Metrics:
    """The JSON report of a run; ``skipped``: why each case that could not run did not."""
    ratios = compute_ratios(results, registry.ratios.values())
    return {
        "machine": machine,
        "params": params,
        "cases": dict(results),
        "errors": dict(errors),
        "skipped": dict(skipped or {}),
        "ratios": ratios,
        "targets": check_targets(results, ratios, registry.targets.values()),
    }


def flatten(metrics: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Nested metrics as ``(dotted.name, value)`` rows, for the table."""
    rows: list[tuple[str, Any]] = []
    for name, value in metrics.items():
        path = f"{prefix}{name}"
        if isinstance(value, Mapping):
            rows.extend(flatten(value, path + "."))
        else:
            rows.append((path, value))
    return rows


def fmt(value: Any) -> str:
    """A compact, readable form of a metric value."""
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        if value == 0 or 0.01 <= abs(value) < 1e6:
            return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
        return f"{value:.3g}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, list):
        text = ", ".join(fmt(v) for v in value[:6])
        return f"[{text}{', …' if len(value) > 6 else ''}]"
    return str(value)


def render(report: Mapping[str, Any]) -> None:
    """Print the report as rich tables (what the run wrote is shown as it is: a note such as
    ``pip install -e './bench[quix]'`` is not taken for rich's markup)."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    m = report["machine"]
    console.print(
        f"[bold]pulse bench[/bold] {m.get('cpu_model', '?')} ×{m.get('cpus', '?')}, "
        f"load {m.get('loadavg_start')} → {m.get('loadavg_end')}, Python {m.get('python')}, "
        f"Kafka {m.get('kafka_version')}, Valkey {m.get('valkey_version')}"
    )
    table = Table(title="cases", show_lines=False)
    table.add_column("case")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for case, metrics in report["cases"].items():
        first = True
        for name, value in flatten(metrics):
            if {"profile", "by_command"} & set(name.split(".")):
                continue  # the JSON report has these; too wide for the table
            table.add_row(case if first else "", escape(name), escape(fmt(value)))
            first = False
    console.print(table)
    for case, note in report.get("skipped", {}).items():
        console.print(f"[yellow]{case} skipped:[/yellow] {escape(note)}")
    if report["errors"]:
        for case, err in report["errors"].items():
            console.print(f"[red]{case} failed:[/red] {escape(err)}")
    if report["ratios"]:
        rt = Table(title="ratios")
        rt.add_column("ratio")
        rt.add_column("value", justify="right")
        for name, value in report["ratios"].items():
            rt.add_row(name, f"{value:,.2f}")
        console.print(rt)
    if report["targets"]:
        tt = Table(title="targets")
        for col in ("target", "metric", "goal", "measured", "met"):
            tt.add_column(col)
        for name, t in report["targets"].items():
            style = "green" if t["met"] else "red"
            tt.add_row(
                name, t["metric"], t["target"], fmt(t["measured"]), f"[{style}]{fmt(t['met'])}"
            )
        console.print(tt)


def machine_info(kafka_version: str, valkey_version: str) -> Metrics:
    """What the numbers were measured on."""
    model = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "git": _git_state(),
        "hiredis": _hiredis(),
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "kafka_version": kafka_version,
        "valkey_version": valkey_version,
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }


def _git_state() -> Metrics:
    """The measured code: commit and uncommitted changes (the numbers depend on them)."""
    import subprocess

    root = Path(__file__).resolve().parents[2]

    def git(*argv: str) -> str:
        res = subprocess.run(
            ["git", *argv], cwd=root, capture_output=True, text=True, timeout=10, check=False
        )
        return res.stdout if res.returncode == 0 else ""

    changed = [line[3:] for line in git("status", "--porcelain").splitlines() if line.strip()]
    return {"commit": git("rev-parse", "--short", "HEAD").strip() or "?", "uncommitted": changed}


def _hiredis() -> bool:
    """Whether redis-py parses replies with hiredis (the readers' main cost otherwise)."""
    try:
        from redis.utils import HIREDIS_AVAILABLE
    except ImportError:
        return False
    return bool(HIREDIS_AVAILABLE)


# --------------------------------------------------------------------------- run context


@dataclass
class BenchContext:
    """What a case gets: settings of the stack, a scratch directory, earlier results."""

    params: BenchParams
    kafka: KafkaSettings
    store: StoreSettings
    workdir: Path
    results: dict[str, Metrics] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # case -> why it did not run
    created_topics: list[str] = field(default_factory=list)
    _preloaded: Preloaded | None = None
    _rewrite_config: dict[bool, str] = field(default_factory=dict)  # replica? -> old value

    def redis(
        self, timeout_s: float = 30.0, replica: bool = False, decode: bool = True
    ) -> redis.Redis:
        """A sync client to the bench's store db (``decode``: ``decode_responses``)."""
        port = self.store.replica_port if replica and self.store.replica_port else self.store.port
        return store_client(
            self.store, port=port, db=self.params.store_db, decode=decode, timeout_s=timeout_s
        )

    def flush(self) -> None:
        """Empty the bench's store db (only that db: the user's data stays)."""
        with self.redis() as r:
            r.flushdb()

    def topics(self, tag: str) -> TopicSet:
        """Four fresh topics (sensor, applog, deadletter, late), deleted when the run ends."""
        unique = f"bench.{tag}.{os.getpid()}.{time.monotonic_ns() % 10**9}"
        ts = TopicSet(*(f"{unique}.{k}" for k in ("sensor", "applog", "deadletter", "late")))
        self.created_topics.extend(ts.all)
        create_topics(self.kafka.bootstrap, ts.all, self.kafka.partitions)
        return ts

    def preloaded(self) -> Preloaded:
        """The shared input of the drain cases, produced on first use."""
        if self._preloaded is None:
            ts = self.topics("pre")
            self._preloaded = preload(self.params, self.kafka, ts)
        return self._preloaded

    def env(self, topics: TopicSet, app_id: str, **extra: str) -> dict[str, str]:
        """Environment of a ``pulse`` child process on ``topics``, consumer group ``app_id``."""
        env = {
            **os.environ,
            "PULSE_KAFKA_BOOTSTRAP": self.kafka.bootstrap,
            "PULSE_KAFKA_PARTITIONS": str(self.kafka.partitions),
            "PULSE_KAFKA_SENSOR_TOPIC": topics.sensor,
            "PULSE_KAFKA_APPLOG_TOPIC": topics.applog,
            "PULSE_KAFKA_DEADLETTER_TOPIC": topics.deadletter,
            "PULSE_KAFKA_LATE_TOPIC": topics.late,
            "PULSE_STORE_HOST": self.store.host,
            "PULSE_STORE_PORT": str(self.store.port),
            "PULSE_STORE_DB": str(self.params.store_db),
            "PULSE_WORKER_APP_ID": app_id,
            **extra,
        }
        if self.store.replica_port is not None:
            env["PULSE_STORE_REPLICA_PORT"] = str(self.store.replica_port)
        return env

    def hold_aof_rewrites(self) -> None:
        """Turn automatic AOF rewrites off until :meth:`cleanup`, so AOF growth is measurable."""
        import redis

        nodes = [False] + ([True] if self.store.replica_port is not None else [])
        for replica in nodes:
            with self.redis(replica=replica) as r:
                try:
                    old = r.config_get("auto-aof-rewrite-percentage")["auto-aof-rewrite-percentage"]
                    r.config_set("auto-aof-rewrite-percentage", 0)
                except redis.ResponseError:  # CONFIG disabled: AOF deltas may then be missing
                    continue
                self._rewrite_config[replica] = old

    def cleanup(self) -> None:
        """Delete the run's topics, empty the bench db, restore the AOF rewrite setting."""
        try:
            if self.created_topics:
                delete_topics(self.kafka.bootstrap, self.created_topics)
                self.created_topics.clear()
        finally:
            self.flush()
            for replica, old in self._rewrite_config.items():
                with self.redis(replica=replica) as r:
                    r.config_set("auto-aof-rewrite-percentage", old)
            self._rewrite_config.clear()


def run_cases(
    ctx: BenchContext, cases: Sequence[BenchCase]
) -> tuple[dict[str, Metrics], dict[str, str]]:
    """Run ``cases`` in order; a failed case is recorded and its dependants are skipped.

    A case that raises :class:`BenchSkipped` lands in ``ctx.skipped`` with its reason, as do
    its dependants; it is not an error.
    """
    errors: dict[str, str] = {}
    for case in cases:
        missing = [r for r in case.requires if r not in ctx.results]
        if missing:
            if all(r in ctx.skipped for r in missing):
                ctx.skipped[case.name] = f"needs {', '.join(missing)}, which did not run"
            else:
                errors[case.name] = f"skipped: needs {', '.join(missing)}"
            continue
        t0 = time.monotonic()
        try:
            result = case.run(ctx)
        except BenchSkipped as exc:
            ctx.skipped[case.name] = str(exc)
            continue
        except Exception as exc:  # one failed case must not lose the others' numbers
            errors[case.name] = f"{type(exc).__name__}: {exc}"
            continue
        result["wall_s"] = round(time.monotonic() - t0, 2)
        ctx.results[case.name] = result
    return ctx.results, errors
