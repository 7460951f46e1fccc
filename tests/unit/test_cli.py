"""The ``pulse`` entry point: whose settings a command reads before it runs."""

from __future__ import annotations

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


def test_a_wrong_setting_is_said_by_the_command_that_reads_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PULSE_ARCHIVE_MAX_ROWS", "0")
    assert cli.main(["archive"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "pulse archive: PULSE_ARCHIVE_MAX_ROWS: Input should be greater than or equal to 1."
    ]
