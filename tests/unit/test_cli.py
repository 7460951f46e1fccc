"""The ``pulse`` entry point: whose settings a command reads before it runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import cli


def test_a_wrong_setting_of_one_command_does_not_stop_another(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PULSE_ARCHIVE_MAX_ROWS", "0")
    parser = cli.build_parser(only="top")
    args = parser.parse_args(["top", "site.events", "-n", "3"])
    assert (args.command, args.n) == ("top", 3)
    with pytest.raises(SystemExit) as exc:
        cli.build_parser(only="top").parse_args(["--help"])
    assert exc.value.code == 0
    assert "archive" in capsys.readouterr().out  # every command is still listed


@pytest.mark.parametrize(
    ("command", "setting", "value", "said"),
    [
        ("worker", "PULSE_WORKER_ALLOWED_LATENESS_S", "inf", "Input should be a finite number"),
        ("archive", "PULSE_ARCHIVE_HEARTBEAT_INTERVAL_S", "nan", "Input should be a finite"),
        ("worker", "PULSE_WORKER_APP_ID", "", "String should have at least 1 character"),
        ("worker", "PULSE_WORKER_FETCH_MIN_BYTES", "0", "Input should be greater than or equal"),
        ("status", "PULSE_KAFKA_CONTROLLER_PORTS", "x", "Input should be a valid integer"),
        ("status", "PULSE_KAFKA_BROKERS", "0", "Input should be greater than or equal to 1"),
    ],
)
def test_a_setting_no_process_could_run_with_is_one_sentence_before_any_wait(
    command: str,
    setting: str,
    value: str,
    said: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    monkeypatch.setenv("PULSE_HOME", str(tmp_path))
    monkeypatch.setenv(setting, value)
    assert cli.main([command]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"pulse {command}: {setting}: {said}"), line


def test_a_wrong_setting_is_said_by_the_command_that_reads_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PULSE_ARCHIVE_MAX_ROWS", "0")
    assert cli.main(["archive"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "pulse archive: PULSE_ARCHIVE_MAX_ROWS: Input should be greater than or equal to 1."
    ]


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["demo", "--rate", "-5"], "pulse demo: Argument --rate: must be >= 0, got -5."),
        (
            ["demo", "--devices", "0"],
            "pulse demo: Argument --devices: must be within [1, 1000000], got 0.",
        ),
        (
            ["demo", "--anomaly-rate", "7"],
            "pulse demo: Argument --anomaly-rate: must be within [0, 1], got 7.",
        ),
        (
            ["eval", "anomalies", "t.json", "--slack", "-5"],
            "pulse eval anomalies: Argument --slack: must be a finite number of seconds >= 0, "
            "got -5.",
        ),
        (
            ["eval", "anomalies", "t.json", "--after", "soon"],
            "pulse eval anomalies: Argument --after: expected a number of seconds, got 'soon'.",
        ),
        (
            ["worker", "--name", "a b"],
            "pulse worker: Argument --name: expected 1 to 64 letters, digits, '_', '.' or '-', "
            "got 'a b'.",
        ),
        (
            ["verify", "--truth", "t.json", "--max-report", "-1"],
            "pulse verify: Argument --max-report: must be >= 0, got -1.",
        ),
        # an unknown option is named before a missing one: it is the typo to fix
        (["verify", "--truht=t.json"], "pulse verify: Unrecognized arguments: --truht=t.json."),
        (["similar", "--bogus"], "pulse similar: Unrecognized arguments: --bogus."),
        (["eval", "--bogus"], "pulse eval: Unrecognized arguments: --bogus."),  # before ACTION
        (["verify"], "pulse verify: The following arguments are required: --truth."),
    ],
)
def test_a_bad_value_is_one_sentence_before_anything_starts(
    argv: list[str], said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert capsys.readouterr().err.splitlines()[0] == said


def test_a_file_to_write_is_checked_before_a_long_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The truth file is written at the end of a load: a path it cannot take is said first."""
    (tmp_path / "a-file").write_text("")
    cases = [
        (
            ["loadgen", "--truth", str(tmp_path / "missing" / "t.json")],
            f"pulse loadgen: Argument --truth: directory {tmp_path / 'missing'} does not exist.",
        ),
        (
            ["loadgen", "--output", str(tmp_path)],
            f"pulse loadgen: Argument --output: {tmp_path} is a directory.",
        ),
        (
            ["eval", "nab", str(tmp_path), "--out", str(tmp_path / "a-file")],
            f"pulse eval nab: Argument --out: {tmp_path / 'a-file'} exists and is not a directory.",
        ),
    ]
    for argv, said in cases:
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        assert exc.value.code == 2
        assert capsys.readouterr().err.splitlines()[0] == said


@pytest.mark.parametrize(("value", "port"), [("", None), (" ", None), ("6390", 6390)])
def test_an_empty_replica_port_means_no_replica(
    value: str, port: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from schemas.settings import StoreSettings

    monkeypatch.setenv("PULSE_STORE_REPLICA_PORT", value)
    assert StoreSettings().replica_port == port


@pytest.mark.parametrize(
    ("env", "said"),
    [
        ({"PULSE_KAFKA_BOOTSTRAP": ""}, "PULSE_KAFKA_BOOTSTRAP: expected HOST:PORT"),
        ({"PULSE_KAFKA_BOOTSTRAP": "x:y"}, "PULSE_KAFKA_BOOTSTRAP: expected HOST:PORT"),
        ({"PULSE_KAFKA_SENSOR_TOPIC": "bad topic!"}, "PULSE_KAFKA_SENSOR_TOPIC: String should"),
        ({"PULSE_KAFKA_SENSOR_TOPIC": "pulse.applog"}, "must name four topics"),
        ({"PULSE_KAFKA_SECURITY_PROTOCOL": "SSL", "PULSE_KAFKA_SSL_CA_FILE": "EMPTY"},
         "PULSE_KAFKA_SSL_*_FILE cannot be used: "),
    ],
)  # fmt: skip
def test_kafka_settings_this_process_gets_wrong_are_said_not_waited_on(
    env: dict[str, str],
    said: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    (tmp_path / "empty.pem").write_bytes(b"")
    monkeypatch.setenv("PULSE_HOME", str(tmp_path))
    for name, value in env.items():
        monkeypatch.setenv(name, str(tmp_path / "empty.pem") if value == "EMPTY" else value)
    assert cli.main(["worker"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("pulse worker: ") and said in line, line


def test_an_unknown_flag_without_a_command_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["--bogus"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.startswith("pulse: Unrecognized arguments: --bogus.\n")
