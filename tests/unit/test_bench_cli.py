"""`pulse bench` wiring: the bench is a separate distribution, imported only when it is there."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pulse_bench.cases import freshness
from pulse_bench.harness import BenchContext, BenchParams, Metrics

from schemas.settings import KafkaSettings, StoreSettings

ROOT = Path(__file__).resolve().parents[2]


# drops the editable install's finder of pulse_bench: as if pulse-bench were not installed
NOT_INSTALLED = (
    "import sys\n"
    "sys.meta_path[:] = [f for f in sys.meta_path if 'pulse_bench' not in f.__module__]\n"
    "sys.modules.pop('pulse_bench', None)\n"
)


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", NOT_INSTALLED + code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_pulse_bench_without_the_bench_installed_says_how_to_install_it() -> None:
    res = _python(
        "import importlib.util\n"
        "assert importlib.util.find_spec('pulse_bench') is None\n"
        "from pipeline.cli import main\n"
        "sys.exit(main(['bench', '--smoke']))\n"
    )
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pulse bench: ")
    assert "pip install -e ./bench" in lines[0]


def test_other_commands_work_without_the_bench() -> None:
    res = _python(
        "from pipeline.cli import build_parser\n"
        "print(build_parser().parse_args(['status']).command)\n"
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "status"


def test_python_dash_m_runs_pulse_bench() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "pulse_bench", "--list"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    names = {line.split()[0] for line in res.stdout.splitlines() if line.strip()}
    assert {"floor", "pulse_1w", "quix", "freshness", "freshness_half"} <= names


def test_freshness_half_runs_at_half_the_measured_one_worker_rate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rates: list[int] = []

    def measure(ctx: BenchContext, rate: int, label: str) -> Metrics:
        rates.append(rate)
        return {"rate_target": rate}

    monkeypatch.setattr(freshness, "measure", measure)
    ctx = BenchContext(BenchParams.create(False), KafkaSettings(), StoreSettings(), tmp_path)
    ctx.results["pulse_1w"] = {"events_per_s": 25_001.0}
    got = freshness.run_half(ctx)
    assert rates == [12_500] and got["pulse_1w_events_per_s"] == 25_001.0
    freshness.run(ctx)
    assert rates[-1] == 5_000  # the fixed-rate case: --rate, 5k events/s by default
