"""State files, pid ownership and port checks of the local stack."""

from __future__ import annotations

import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.stack import processes
from pipeline.stack.errors import PortInUseError
from pipeline.stack.processes import ProcessState

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


POLL_S = 0.01  # how often a deadline-bounded wait looks again


def make_state(pid: int, ticks: int, marker: str = "-c") -> ProcessState:
    return ProcessState(
        service="svc", pid=pid, start_ticks=ticks, marker=marker, argv=["x"], ports={"port": 1}
    )


def test_state_round_trip(tmp_path: Path) -> None:
    state = make_state(123, 456, marker=str(tmp_path / "cfg"))
    processes.write_state(tmp_path, state)
    assert processes.read_state(tmp_path) == state
    assert (tmp_path / processes.PID_FILE).read_text() == "123\n"
    processes.clear_state(tmp_path)
    assert processes.read_state(tmp_path) is None


@pytest.mark.parametrize("content", ["", "not json", "[]", '{"pid": 1}', '{"pid": "x"}'])
def test_malformed_state_reads_as_none(tmp_path: Path, content: str) -> None:
    (tmp_path / processes.STATE_FILE).write_text(content)
    assert processes.read_state(tmp_path) is None


def test_atomic_write_sets_mode_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "secret.conf"
    processes.atomic_write(target, "x\n", mode=0o600)
    assert target.read_text() == "x\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["secret.conf"]


def test_ownership_needs_pid_start_time_and_marker(tmp_path: Path) -> None:
    marker = str(tmp_path / "marker.conf")
    pid = processes.spawn([*SLEEPER, marker], cwd=tmp_path, log_file=tmp_path / "log")
    ticks = processes.proc_start_ticks(pid)
    assert ticks is not None
    ours = make_state(pid, ticks, marker)
    try:
        assert processes.is_ours(ours)
        assert not processes.is_ours(make_state(pid, ticks + 1, marker))  # pid reused later
        assert not processes.is_ours(make_state(pid, ticks, str(tmp_path / "other.conf")))
        assert not processes.send_signal(make_state(pid, ticks, "nope"), signal.SIGKILL)
        assert processes.is_ours(ours)  # the foreign-looking state did not kill it
        assert processes.terminate(ours, timeout_s=5.0)
        assert not processes.is_ours(ours) and processes.proc_start_ticks(pid) is None
        assert not processes.terminate(ours, timeout_s=1.0)
    finally:
        processes.send_signal(ours, signal.SIGKILL)


def ignores_sigterm(pid: int) -> bool:
    """Whether the process has set SIGTERM to ignored (its ``SigIgn`` mask, Linux /proc)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = next(line.split()[1] for line in status.splitlines() if line.startswith("SigIgn:"))
    return bool(int(mask, 16) & (1 << (signal.SIGTERM - 1)))


def test_terminate_escalates_to_sigkill(tmp_path: Path) -> None:
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
    marker = str(tmp_path / "stubborn")
    pid = processes.spawn(
        [sys.executable, "-c", code, marker], cwd=tmp_path, log_file=tmp_path / "log"
    )
    deadline = time.monotonic() + 60  # Python's start-up on a loaded machine, not a speed check
    while not ignores_sigterm(pid):
        assert time.monotonic() < deadline, "the child never set SIGTERM to ignored"
        time.sleep(POLL_S)
    ticks = processes.proc_start_ticks(pid)
    assert ticks is not None
    state = make_state(pid, ticks, marker)
    started = time.monotonic()
    assert processes.terminate(state, timeout_s=0.5)
    assert processes.proc_start_ticks(pid) is None
    assert time.monotonic() - started >= 0.5


def test_a_process_we_did_not_start_is_never_ours(tmp_path: Path) -> None:
    other = subprocess.Popen(SLEEPER)
    try:
        ticks = processes.proc_start_ticks(other.pid)
        assert ticks is not None
        state = make_state(other.pid, ticks, marker=str(tmp_path / "pulse.conf"))
        assert not processes.terminate(state, timeout_s=0.5)
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


def test_dead_pid_is_not_alive(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert processes.proc_start_ticks(proc.pid) is None


def test_port_checks() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert not processes.port_is_free(port)
        assert processes.port_accepts(port)
        with pytest.raises(PortInUseError, match=f"Port {port} for the Valkey primary"):
            processes.require_free_ports({"the Valkey primary": port})
    assert processes.port_is_free(port)
    assert not processes.port_accepts(port)


def test_the_same_port_twice_is_rejected() -> None:
    port = processes.free_port()
    with pytest.raises(PortInUseError, match="both configured"):
        processes.require_free_ports({"a": port, "b": port})


def test_tail_returns_last_lines(tmp_path: Path) -> None:
    log = tmp_path / "log"
    log.write_text("".join(f"line {i}\n" for i in range(100)))
    assert processes.tail(log, 2) == "line 98\nline 99"
    assert processes.tail(tmp_path / "missing") == ""
