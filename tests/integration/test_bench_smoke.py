"""``pulse bench --smoke`` against the session stack: the harness works, end to end.

Checks the report's structure and that its numbers are consistent (exact record counts, positive
rates, ordered percentiles); never speed. The ``quix`` case runs when the bench's ``quix`` extra
(quixstreams) is installed and is skipped, with a note, when it is not.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from pipeline.stack.kafka import run_sync
from pipeline.stack.testing import RunningStack
from schemas.settings import store_client

pytestmark = pytest.mark.integration

CASES = {
    "floor", "naive", "pulse_1w", "pulse_2w", "pulse_3w", "pulse_1w_nodetect", "write_cost",
    "freshness", "freshness_half", "reads", "hnsw", "replay",
}  # fmt: skip
TARGETS = {
    "pulse_1w_vs_floor", "freshness_p99_ms", "freshness_half_p99_ms", "reads_p99_ms",
    "reads_first_refresh_ms", "write_cost_store_commands", "write_cost_aof_bytes",
    "write_cost_replica_aof_bytes", "hnsw_recall_at_10", "hnsw_query_p99_ms", "detection_cost",
}  # fmt: skip
QUIX = importlib.util.find_spec("quixstreams") is not None
PANELS = {"kpis", "events_per_minute", "latency_per_minute", "top_routes", "site_metrics"}


def _bench(
    stack: RunningStack, *argv: str, timeout: float = 500
) -> subprocess.CompletedProcess[str]:
    """Run ``pulse bench``; ``timeout`` is a deadline for a loaded machine, not a speed check."""
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "bench", *argv],
        env={**os.environ, **stack.env()},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


async def _topics(bootstrap: str) -> list[str]:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return list(await admin.list_topics())
    finally:
        await admin.close()


def test_smoke_run_reports_every_case_consistently(stack: RunningStack, tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    res = _bench(stack, "--smoke", f"--output={out}")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "ratios" in res.stdout and "targets" in res.stdout  # the table was printed
    report: dict[str, Any] = orjson.loads(out.read_bytes())
    assert set(report) == {"machine", "params", "cases", "errors", "skipped", "ratios", "targets"}
    assert report["errors"] == {}
    if QUIX:
        assert set(report["cases"]) == CASES | {"quix"} and report["skipped"] == {}
    else:  # a note, not a failure
        assert set(report["cases"]) == CASES and set(report["skipped"]) == {"quix"}
        assert "quixstreams is not installed" in report["skipped"]["quix"]
    assert report["machine"]["cpus"] >= 1 and report["machine"]["valkey_version"] != "?"
    params, cases = report["params"], report["cases"]
    assert params["smoke"] is True

    assert cases["floor"]["events"] == params["events"]
    assert cases["naive"]["events"] == params["naive_events"] and cases["naive"]["complete"]
    for name in ("floor", "naive", "pulse_1w", "pulse_2w", "pulse_3w"):
        assert cases[name]["events_per_s"] > 0, name
    for name, workers in (("pulse_1w", 1), ("pulse_2w", 2), ("pulse_3w", 3)):
        c = cases[name]
        assert c["workers"] == workers and c["records"] == params["events"]
        applied = sum(sum(v.values()) for v in c["applied"].values())
        assert applied == params["events"], name  # every record counted once: event, late or dead
        assert 0 < c["measured_events"] <= params["events"]
        assert c["round_trips"] > 0 and c["store"]["aof_bytes"] > 0
    replayed = cases["replay"]
    assert replayed["events_per_s"] > 0 and 0 < replayed["events_rebuilt"] <= params["events"]
    assert replayed["records_read"] <= params["events"] and replayed["partitions"] > 0

    # Round trips are counted by the child processes and read after they exited, so they are
    # exact. A well-formed naive event costs at least HINCRBY, HINCRBYFLOAT and 2x HGET; one the
    # naive app skips as malformed may cost none.
    naive, cost = cases["naive"], cases["write_cost"]
    assert naive["round_trips"] >= 4 * (naive["events"] - naive["skipped_malformed"])
    assert cost["naive"]["round_trips_per_event"] == naive["round_trips"] / naive["events"]
    assert 0 < cost["pulse_1w"]["round_trips_per_event"] < 1

    if QUIX:
        quix = cases["quix"]
        assert quix["records"] == sum(cases["pulse_1w"]["applied"]["sensor"].values())
        assert quix["events_per_s"] > 0 and 0 < quix["measured_events"] <= quix["records"]
        assert 0 < quix["windowed_readings"] <= quix["records"] and quix["windows"] > 0

    half = int(cases["pulse_1w"]["events_per_s"] / 2)
    for name, rate in (("freshness", params["rate"]), ("freshness_half", half)):
        fresh = cases[name]
        assert fresh["rate_target"] == rate
        assert fresh["events"] == rate * params["freshness_s"]
        assert 0 < fresh["p50_ms"] <= fresh["p90_ms"] <= fresh["p99_ms"] <= fresh["max_ms"]
        # every paced record was applied: the worker spent CPU, and both AOFs grew
        assert fresh["worker_cpu_us_per_event"] > 0 and fresh["store_cpu_us_per_event"] >= 0
        assert fresh["aof_bytes_per_event"] > 0 and fresh["replica_aof_bytes_per_event"] > 0

    reads = cases["reads"]
    names = set(reads["panels"])
    assert names >= PANELS and {n.removesuffix("+cache") for n in names} == PANELS
    for panel in reads["panels"].values():
        assert 0 < panel["p50_ms"] <= panel["p99_ms"] and panel["calls"] >= 5
    assert reads["worst_uncached_p99_ms"] == max(reads["panels"][n]["p99_ms"] for n in PANELS)
    assert reads["worst_panel_p99_ms"] == max(
        p["p99_ms"] for p in reads["panels"].values() if p["as_dashboard_runs_it"]
    )
    assert reads["store"]["seeded_events"] > 0 and reads["store"]["site_metric_rows"] > 0
    assert 0 < reads["first_refresh"]["p50_ms"] <= reads["first_refresh"]["p99_ms"]

    assert {"pulse_1w_vs_floor", "pulse_1w_vs_naive", "pulse_2w_vs_1w"} <= set(report["ratios"])
    assert ("pulse_1w_vs_quix" in report["ratios"]) is QUIX
    assert report["ratios"]["pulse_1w_vs_floor"] == pytest.approx(
        cases["pulse_1w"]["events_per_s"] / cases["floor"]["events_per_s"]
    )
    assert set(report["targets"]) == TARGETS | ({"pulse_1w_vs_quix"} if QUIX else set())
    assert all(isinstance(t["met"], bool) for t in report["targets"].values())

    # the stack is left as found: still running, no bench topics, the bench db empty
    assert stack.stack.is_running()
    topics = run_sync(lambda: _topics(stack.bootstrap))
    assert not [t for t in topics if t.startswith("bench.") or "bench-quix-" in t]
    with store_client(stack.store_settings, db=params["store_db"]) as client:
        assert client.dbsize() == 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--cases=floor,nope"], "unknown case nope"),
        (["--events=0"], "--events: must be >= 1"),
        (["--store-db=99"], "--store-db must be within"),
    ],
)
def test_bad_arguments_get_one_sentence(stack: RunningStack, argv: list[str], message: str) -> None:
    res = _bench(stack, *argv, timeout=60)
    assert res.returncode == 2
    assert message in res.stderr
    assert len(res.stderr.strip().splitlines()) <= 2
