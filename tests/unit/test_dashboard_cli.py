"""``pulse dashboard`` wiring: arguments, the streamlit command line, settings."""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys

import pytest

from dashboard import cli
from dashboard.settings import DashboardSettings
from pipeline.cli import build_parser


def test_cli_module_does_not_import_streamlit() -> None:
    code = "import sys, dashboard.cli, pipeline.cli; pipeline.cli.build_parser(); "
    code += "print('streamlit' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=cli.ROOT
    )
    assert out.stdout.strip() == "False"


def test_dashboard_imports_nothing_from_the_pipeline() -> None:
    # the page, its queries and the CLI run beside the worker, not with it
    code = "import sys, dashboard.app, dashboard.cli, dashboard.geo, dashboard.panels, "
    code += "dashboard.queries; "
    code += "print(sorted(m for m in sys.modules if m == 'pipeline' or m.startswith('pipeline.')))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=cli.ROOT
    )
    assert out.stdout.strip() == "[]"


def test_parser_accepts_dashboard_options() -> None:
    args = build_parser().parse_args(
        ["dashboard", "--port", "8600", "--refresh-s", "5", "--lookback-min", "30"]
    )
    assert (args.port, args.refresh_s, args.lookback_min, args.address) == (8600, 5.0, 30, None)


def test_command_is_headless_on_the_given_address() -> None:
    cmd = cli.command("127.0.0.1", 8600)
    assert cmd[:5] == [sys.executable, "-m", "streamlit", "run", str(cli.APP)]
    opts = dict(zip(cmd[5::2], cmd[6::2], strict=True))
    assert opts == {
        "--server.headless": "true",
        "--server.address": "127.0.0.1",
        "--server.port": "8600",
        "--server.fileWatcherType": "none",
        "--browser.gatherUsageStats": "false",
    }


def test_child_env_passes_given_options_only() -> None:
    args = argparse.Namespace(address=None, port=8600, refresh_s=None, lookback_min=15)
    env = cli.child_env(args, {"PYTHONPATH": "/x", "PULSE_DASHBOARD_REFRESH_S": "7"})
    assert env["PULSE_DASHBOARD_PORT"] == "8600"
    assert env["PULSE_DASHBOARD_LOOKBACK_MIN"] == "15"
    assert env["PULSE_DASHBOARD_REFRESH_S"] == "7"
    assert "PULSE_DASHBOARD_ADDRESS" not in env
    assert env["PYTHONPATH"].split(":") == [str(cli.ROOT), "/x"]


def test_settings_defaults_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("ADDRESS", "PORT", "REFRESH_S", "LOOKBACK_MIN"):
        monkeypatch.delenv(f"PULSE_DASHBOARD_{name}", raising=False)
    s = DashboardSettings()
    assert (s.port, s.refresh_s, s.lookback_min, s.address) == (8501, 2.0, 60, "127.0.0.1")
    monkeypatch.setenv("PULSE_DASHBOARD_LOOKBACK_MIN", "5")
    assert DashboardSettings().lookback_min == 5
    monkeypatch.setenv("PULSE_DASHBOARD_REFRESH_S", "0")
    with pytest.raises(ValueError):
        DashboardSettings()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--port", "99999"], "pulse dashboard: --port: Input should be less than or equal to"),
        (["--refresh-s", "0"], "pulse dashboard: --refresh-s: "),
    ],
)
def test_a_bad_option_is_one_sentence_naming_it(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from pipeline.cli import main

    assert main(["dashboard", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err


def test_a_port_in_use_is_one_sentence_before_streamlit_starts(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from pipeline.cli import main

    def no_exec(*args: object) -> None:
        raise AssertionError("Streamlit was started on a port in use")

    monkeypatch.setattr("dashboard.cli.os.execve", no_exec)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["dashboard", "--address", "127.0.0.1", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err == f"pulse dashboard: cannot listen on 127.0.0.1:{port}: Address already in use.\n"
    assert cli._unavailable("127.0.0.1", port) is None  # free again
