"""The benchmark harness's pure parts: registry, percentiles, rates, ratios, targets, report."""

from __future__ import annotations

from pathlib import Path

import pytest
from pulse_bench.harness import (
    BenchCase,
    BenchContext,
    BenchParams,
    BenchSkipped,
    Ratio,
    Registry,
    Target,
    build_report,
    check_targets,
    compute_ratios,
    drain_cpu,
    drain_rate,
    flatten,
    fmt,
    lookup,
    percentiles,
    render,
    run_cases,
)

from schemas.settings import KafkaSettings, StoreSettings


def _case(name: str, requires: tuple[str, ...] = (), order: int = 100) -> BenchCase:
    return BenchCase(name, lambda ctx: {"n": 1}, name, requires, order)


def test_resolve_adds_requirements_and_orders() -> None:
    reg = Registry()
    for c in (_case("a", order=10), _case("b", order=20), _case("c", ("a", "b"), order=30)):
        reg.add_case(c)
    assert [c.name for c in reg.resolve(["c"])] == ["a", "b", "c"]
    assert [c.name for c in reg.resolve(["b"])] == ["b"]
    assert [c.name for c in reg.resolve(None)] == ["a", "b", "c"]


def test_resolve_rejects_unknown_names_and_misordered_requirements() -> None:
    reg = Registry()
    reg.add_case(_case("a", order=50))
    reg.add_case(_case("late_need", ("a",), order=10))
    with pytest.raises(ValueError, match="unknown case nope"):
        reg.resolve(["nope"])
    with pytest.raises(ValueError, match="ordered before its requirement"):
        reg.resolve(["late_need"])
    with pytest.raises(ValueError, match="registered twice"):
        reg.add_case(_case("a"))


def test_the_shipped_registry_resolves() -> None:
    from pulse_bench import cases  # noqa: F401
    from pulse_bench.harness import REGISTRY

    names = [c.name for c in REGISTRY.resolve(["write_cost"])]
    assert names == ["naive", "pulse_1w", "write_cost"]
    assert [c.name for c in REGISTRY.resolve(["freshness_half"])] == ["pulse_1w", "freshness_half"]
    assert set(REGISTRY.cases) == {
        "floor", "naive", "pulse_1w", "pulse_2w", "pulse_3w", "pulse_1w_nodetect", "quix",
        "write_cost", "freshness", "freshness_half", "reads", "hnsw", "replay",
    }  # fmt: skip
    assert REGISTRY.ratios["pulse_1w_vs_quix"].denominator == "cases.quix.events_per_s"
    # detection's cost: on (pulse_1w), off, on again, in a row
    assert [c.name for c in REGISTRY.resolve(["pulse_1w_nodetect"])] == [
        "pulse_1w",
        "pulse_1w_nodetect",
    ]
    assert REGISTRY.targets["detection_cost"].metric == "cases.pulse_1w_nodetect.detection_on_off"
    goals = {name: (t.op, t.threshold) for name, t in REGISTRY.targets.items()}
    assert goals == {
        "pulse_1w_vs_floor": (">=", 0.25),
        "pulse_1w_vs_quix": (">=", 3.0),
        "freshness_p99_ms": ("<=", 250.0),
        "freshness_half_p99_ms": ("<=", 250.0),
        "write_cost_store_commands": ("<=", 0.5),
        "write_cost_aof_bytes": ("<=", 150.0),
        "write_cost_replica_aof_bytes": ("<=", 150.0),
        "reads_p99_ms": ("<=", 50.0),
        "reads_first_refresh_ms": ("<=", 150.0),
        "hnsw_recall_at_10": (">=", 0.95),
        "hnsw_query_p99_ms": ("<=", 2.0),
        "detection_cost": (">=", 0.8),
    }


def test_percentiles_interpolate() -> None:
    got = percentiles(list(range(1, 101)), (0.5, 0.99, 0.999))
    assert got == pytest.approx({"p50": 50.5, "p99": 99.01, "p99_9": 99.901})
    with pytest.raises(ValueError):
        percentiles([], (0.5,))


def test_drain_rate_starts_at_first_progress() -> None:
    # nothing for 5 s (start-up), then 1000 records/s for 4 s
    samples = [(float(t), 0) for t in range(6)] + [(5.0 + t, 1000 * t) for t in range(1, 5)]
    rate = drain_rate(samples)
    assert rate["events_per_s"] == pytest.approx(1000.0)
    assert rate["median_1s_per_s"] == pytest.approx(1000.0)
    assert rate["measured_events"] == 3000
    with pytest.raises(ValueError):
        drain_rate([(0.0, 0), (1.0, 0)])


def test_drain_rate_when_the_whole_drain_fell_between_two_polls() -> None:
    # a starved poller: no progress, then everything at once; the clock starts a poll earlier
    rate = drain_rate([(0.0, 0), (1.0, 0), (1.5, 2000)])
    assert rate["events_per_s"] == pytest.approx(4000.0)
    assert rate["measured_events"] == 2000 and rate["measured_s"] == pytest.approx(0.5)
    with pytest.raises(ValueError):
        drain_rate([(0.0, 2000)])  # one sample: no rate at all


def test_drain_rate_median_ignores_a_pause() -> None:
    pts = [(0.0, 100), (1.0, 1100), (2.0, 2100), (3.0, 2100), (4.0, 3100), (5.0, 4100)]
    rate = drain_rate(pts)
    assert rate["events_per_s"] == pytest.approx(800.0)
    assert rate["median_1s_per_s"] == pytest.approx(1000.0)


def test_drain_cpu_covers_the_measured_interval_only() -> None:
    # start-up burns 1.2 s of CPU before the first record; then 0.9 s of CPU per 1000 records
    samples = [(0.0, 0), (1.0, 0), (2.0, 1000), (3.0, 2000), (4.0, 3000)]
    cpu = [0.2, 1.2, 2.1, 3.0, 3.9]
    got = drain_cpu(samples, cpu)
    assert got["worker_cpu_s_measured"] == pytest.approx(1.8)
    assert got["worker_cpu_us_per_measured_event"] == pytest.approx(900.0)
    assert got["worker_busy"] == pytest.approx(0.9)
    # the interval is drain_rate's, also when the drain fell between two polls
    fell = drain_cpu([(0.0, 0), (1.0, 0), (1.5, 2000)], [0.5, 1.0, 1.4])
    assert fell["worker_cpu_s_measured"] == pytest.approx(0.4)
    assert fell["worker_busy"] == pytest.approx(0.8)
    with pytest.raises(ValueError, match="2 CPU readings for 3 samples"):
        drain_cpu(samples[:3], cpu[:2])


def test_ratios_and_targets_only_for_measured_metrics() -> None:
    results = {"floor": {"events_per_s": 100.0}, "pulse": {"events_per_s": 60.0}}
    ratios = compute_ratios(
        results,
        [
            Ratio("p_vs_f", "cases.pulse.events_per_s", "cases.floor.events_per_s"),
            Ratio("p_vs_missing", "cases.pulse.events_per_s", "cases.naive.events_per_s"),
        ],
    )
    assert ratios == {"p_vs_f": pytest.approx(0.6)}
    targets = check_targets(
        results,
        ratios,
        [
            Target("half", "ratios.p_vs_f", ">=", 0.5),
            Target("most", "ratios.p_vs_f", ">=", 0.9),
            Target("fast", "cases.pulse.events_per_s", "<=", 50.0, "note"),
            Target("gone", "ratios.p_vs_missing", ">=", 1.0),
        ],
    )
    assert set(targets) == {"half", "most", "fast"}
    assert targets["half"]["met"] is True
    assert targets["most"]["met"] is False
    assert targets["fast"] == {
        "metric": "cases.pulse.events_per_s",
        "target": "<= 50",
        "measured": 60.0,
        "met": False,
        "note": "note",
    }


def test_build_report_shape_and_lookup() -> None:
    reg = Registry()
    reg.ratios["r"] = Ratio("r", "cases.a.x", "cases.b.x")
    reg.targets["t"] = Target("t", "ratios.r", ">=", 2.0)
    report = build_report(
        {"cpus": 2}, {"smoke": True}, {"a": {"x": 4.0}, "b": {"x": 1.0}}, {"c": "boom"}, reg
    )
    assert set(report) == {"machine", "params", "cases", "errors", "skipped", "ratios", "targets"}
    assert report["skipped"] == {}
    assert report["ratios"] == {"r": 4.0}
    assert report["targets"]["t"]["met"] is True
    assert lookup(report, "cases.a.x") == 4.0
    with pytest.raises(KeyError):
        lookup(report, "cases.a.y")


def test_render_shows_notes_and_values_as_written(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # one line per note
    # rich reads "[quix]" as a style tag (the skip note lost its extra) and a closing tag it
    # did not open as an error: what a run wrote is printed as it is
    report = build_report(
        {"cpus": 2},
        {},
        {"a": {"tag": "[quix]"}},
        {"c": "bad [/x] reply"},
        Registry(),
        skipped={"quix": "quixstreams is not installed (pip install -e './bench[quix]' adds it)"},
    )
    render(report)
    out = capsys.readouterr().out
    assert "pip install -e './bench[quix]' adds it" in out
    assert "bad [/x] reply" in out
    assert "[quix]" in out.replace("quix skipped", "")


def test_flatten_and_fmt() -> None:
    assert flatten({"a": 1, "b": {"c": 2.5, "d": {"e": "x"}}}) == [
        ("a", 1),
        ("b.c", 2.5),
        ("b.d.e", "x"),
    ]
    assert fmt(True) == "yes" and fmt(False) == "NO"
    assert fmt(12345) == "12,345"
    assert fmt(0.5) == "0.5"
    assert fmt(123456.7) == "123,457"
    assert fmt([1, 2]) == "[1, 2]"


def test_params_smoke_is_smaller_and_overrides_apply() -> None:
    full, smoke = BenchParams.create(False), BenchParams.create(True)
    assert smoke.events < full.events and smoke.naive_events < full.naive_events
    assert full.rate == 5_000 and full.read_devices == 10_000
    p = BenchParams.create(False, events=500, rate=100, store_db=3)
    assert (p.events, p.naive_events, p.rate, p.store_db) == (500, 500, 100, 3)


def test_run_cases_records_failures_and_skips_dependants(tmp_path: Path) -> None:
    def boom(ctx: BenchContext) -> dict[str, object]:
        raise RuntimeError("no broker")

    ctx = BenchContext(BenchParams.create(True), KafkaSettings(), StoreSettings(), tmp_path)
    cases = [
        BenchCase("ok", lambda c: {"v": 1}, ""),
        BenchCase("bad", boom, ""),
        BenchCase("needs_bad", lambda c: {"v": 2}, "", ("bad",)),
    ]
    results, errors = run_cases(ctx, cases)
    assert results["ok"]["v"] == 1 and "wall_s" in results["ok"]
    assert errors == {"bad": "RuntimeError: no broker", "needs_bad": "skipped: needs bad"}
    assert ctx.skipped == {}


def test_a_skipped_case_is_a_note_not_an_error(tmp_path: Path) -> None:
    def absent(ctx: BenchContext) -> dict[str, object]:
        raise BenchSkipped("somelib is not installed")

    ctx = BenchContext(BenchParams.create(True), KafkaSettings(), StoreSettings(), tmp_path)
    cases = [
        BenchCase("opt", absent, ""),
        BenchCase("needs_opt", lambda c: {"v": 1}, "", ("opt",)),
        BenchCase("ok", lambda c: {"v": 2}, ""),
    ]
    results, errors = run_cases(ctx, cases)
    assert errors == {} and set(results) == {"ok"}
    assert ctx.skipped == {
        "opt": "somelib is not installed",
        "needs_opt": "needs opt, which did not run",
    }
    report = build_report({}, {}, results, errors, Registry(), skipped=ctx.skipped)
    assert report["skipped"] == ctx.skipped
