"""``pulse loadgen`` end to end without Kafka (JSONL output), pacing, and argument errors."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import orjson
import pytest

from loadgen.generator import GenConfig, Generator, Record
from loadgen.producer import encode_jsonl, read_jsonl, run_load
from pipeline.cli import main
from pipeline.settings import WorkerSettings
from schemas.settings import EventTimeSettings

START = 1_700_000_000_000


def test_jsonl_output_round_trips_and_matches_the_generator(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PULSE_KAFKA_PARTITIONS", "3")
    monkeypatch.setenv("PULSE_WORKER_ALLOWED_LATENESS_S", "10")
    out, truth_path = tmp_path / "events.jsonl", tmp_path / "truth.json"
    argv = ["loadgen", "--rate", "0", "--duration", "3", "--devices", "20", "--services", "3",
            "--seed", "9", "--bad-rate", "0.05", "--late-rate", "0.1", "--anomaly-rate", "0.2",
            "--start-ms", str(START), "--output", str(out), "--truth", str(truth_path)]  # fmt: skip
    assert main(argv) == 0
    summary = capsys.readouterr().out
    assert "sent 3,000 records" in summary and "bad " in summary and "late " in summary
    got = list(read_jsonl(out))
    expected = [
        r
        for c in Generator(
            GenConfig(
                seed=9,
                start_ms=START,
                rate=0,
                duration_s=3,
                devices=20,
                services=3,
                anomaly_rate=0.2,
                bad_rate=0.05,
                late_rate=0.1,
                sensor_partitions=3,
                applog_partitions=3,
            )
        )
        for r in c.records
    ]
    assert got == expected
    assert any(b'"value_b64"' in encode_jsonl(r) for r in got)  # random bytes survive
    truth = orjson.loads(truth_path.read_bytes())
    assert truth["allowed_lateness_ms"] == 10_000
    assert truth["partitions"] == {"sensor": 3, "applog": 3}
    assert truth["start_ms"] == START and truth["end_ms"] == START + 3000
    per_topic = {t: sum(1 for r in got if r.topic == t) for t in ("pulse.sensor", "pulse.applog")}
    assert truth["produced"] == {"sensor": per_topic["pulse.sensor"],
                                 "applog": per_topic["pulse.applog"]}  # fmt: skip
    assert main(argv) == 0
    assert list(read_jsonl(out)) == expected  # deterministic across runs


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rate", "-5"], "--rate: must be >= 0"),
        (["--bad-rate", "1.5"], "--bad-rate: must be within [0, 1]"),
        (["--late-rate", "x"], "--late-rate: expected a number"),
        (["--devices", "0"], "--devices: must be within [1, 1000000], got 0"),
        # beyond what one generator can simulate (its arrays, its int64 event times)
        (["--rate", "99999999999999999999999"], "--rate: must be within [0, 10000000]"),
        (["--sim-rate", "99999999999999999999"], "--sim-rate: must be within [0, 10000000]"),
        (["--duration", "99999999999999999999"], "--duration: must be within [1, 315360000]"),
        (["--services", "99999999999"], "--services: must be within [1, 10000]"),
        (["--start-ms", "99999999999999999999"], "--start-ms: must be within [0, "),
        (["--bootstrap", "x:y"], "--bootstrap: expected HOST:PORT[,HOST:PORT...], got 'x:y'"),
        (["--truth", "/proc/no-such-dir/t.json"], "--truth: directory /proc/no-such-dir does"),
        (["--truth", "/proc/t.json"], "--truth: cannot write /proc/t.json: "),
    ],
)
def test_bad_arguments_are_one_sentence_errors(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["loadgen", *args])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_truth_and_output_in_one_file_is_refused_before_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "events.jsonl"
    argv = ["loadgen", "--rate", "0", "--duration", "2", "--output", str(out),
            "--truth", str(tmp_path / "." / "events.jsonl")]  # fmt: skip
    assert main(argv) == 2
    assert capsys.readouterr().err == "pulse loadgen: --truth and --output name the same file.\n"
    assert not out.exists()
    assert main([*argv[:-2], "--anomaly-after", "2"]) == 2
    assert capsys.readouterr().err == (
        "pulse loadgen: --anomaly-after (2) must be shorter than --duration (2).\n"
    )


def test_worker_bounds_come_from_the_worker_variables(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PULSE_WORKER_MAX_EVENT_AGE_S", "60")
    argv = ["loadgen", "--rate", "0", "--duration", "2", "--devices", "2", "--services", "1",
            "--start-ms", str(START), "--output", str(tmp_path / "events.jsonl")]  # fmt: skip
    assert main(argv) == 0
    assert "the worker will drop the events" in capsys.readouterr().err
    monkeypatch.setenv("PULSE_WORKER_MAX_EVENT_AGE_S", "-1")
    assert main(argv) == 2
    assert "PULSE_WORKER_MAX_EVENT_AGE_S" in capsys.readouterr().err


def test_event_time_settings_mirror_the_worker_settings() -> None:
    """loadgen reads the worker's bounds without importing pipeline: both must agree."""
    for name, field in EventTimeSettings.model_fields.items():
        worker = WorkerSettings.model_fields[name]
        assert (field.annotation, field.default, field.metadata) == (
            worker.annotation,
            worker.default,
            worker.metadata,
        ), name
    assert EventTimeSettings.model_config.get("env_prefix") == WorkerSettings.model_config.get(
        "env_prefix"
    )


def test_a_bad_loadgen_setting_is_one_sentence(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PULSE_LOADGEN_MAX_PENDING", "0")
    assert main(["loadgen", "--help"]) == 2
    assert capsys.readouterr().err.startswith("pulse loadgen: PULSE_LOADGEN_MAX_PENDING: ")


def test_cli_module_imports_stay_light() -> None:
    code = (
        "import sys, loadgen.cli; "
        "print(sorted(m for m in ('numpy', 'aiokafka', 'orjson', 'pipeline') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class ListSink:
    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.sent: list[tuple[float, int]] = []
        self.closed = False

    async def send(self, records: Sequence[Record]) -> None:
        self.sent.append((self.clock.now, len(records)))

    async def close(self) -> None:
        self.closed = True


def test_pacing_releases_slices_on_schedule() -> None:
    cfg = GenConfig(seed=1, start_ms=START, rate=200, duration_s=3, devices=3, services=1)
    clock = FakeClock()
    sink = ListSink(clock)
    progress = asyncio.run(
        run_load(
            Generator(cfg),
            sink,
            rate=cfg.rate,
            total=cfg.total,
            sensor_topic=cfg.sensor_topic,
            clock=clock,
            sleep=clock.sleep,
        )
    )
    assert sink.closed and progress.sent == 600
    assert progress.sensor + progress.applog == 600
    assert all(n == 10 for _, n in sink.sent)  # 50 ms of traffic per slice
    for i, (t, _) in enumerate(sink.sent):
        assert t == pytest.approx(100.0 + i * 0.05)
    assert progress.rate == pytest.approx(600 / 2.95)


def test_unpaced_runs_never_sleep() -> None:
    cfg = GenConfig(seed=1, start_ms=START, rate=0, duration_s=20, devices=3, services=1)
    clock = FakeClock()
    sink = ListSink(clock)
    asyncio.run(
        run_load(
            Generator(cfg),
            sink,
            rate=0,
            total=cfg.total,
            sensor_topic=cfg.sensor_topic,
            clock=clock,
            sleep=clock.sleep,
        )
    )
    assert clock.sleeps == [] and sum(n for _, n in sink.sent) == 20_000


def test_kafka_that_is_down_is_one_sentence(tmp_path: Path) -> None:
    """aiokafka logs its own line for a connection it cannot make: the user reads ours only."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{s.getsockname()[1]}"  # nothing listens once the block ends
    res = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "loadgen", "--duration=1"],
        env={"PATH": "/usr/bin:/bin", "PULSE_HOME": str(tmp_path), "PULSE_KAFKA_BOOTSTRAP": closed},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 1
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"pulse loadgen: cannot use Kafka at {closed}: ")
    assert lines[0].endswith(".") and not lines[0].endswith("..")
