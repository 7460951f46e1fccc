"""Process plumbing shared by the services: detached spawning, state files, ownership, ports.

A service's state file records the pid *and* the kernel start time of the process we spawned, plus a
marker (the absolute path of its config file) that must appear in its command line. A pid is only
treated as ours when all three match, so a pid reused by an unrelated process is never signalled.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.stack.errors import PortInUseError, StartupError

STATE_FILE = "state.json"
PID_FILE = "service.pid"

# Popen handles of children spawned by this interpreter, kept so that they can be reaped (a killed
# child would otherwise stay a zombie, and still look alive in /proc, until we exit).
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


@dataclass(frozen=True)
class ProcessState:
    """What we recorded about a process we started."""

    service: str
    pid: int
    start_ticks: int  # field 22 of /proc/<pid>/stat: distinguishes a reused pid
    marker: str  # a string our process's command line must contain
    argv: list[str]
    ports: dict[str, int] = field(default_factory=dict)
    data_dir: str = ""
    log_file: str = ""
    started_at: float = 0.0

    def to_json(self) -> str:
        """The state as pretty-printed JSON."""
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> ProcessState:
        """Parse a state file's content; raises ``ValueError`` on anything malformed."""
        raw: Any = json.loads(text)
        if not isinstance(raw, dict):
            raise ValueError("state file is not a JSON object")
        try:
            return cls(
                service=str(raw["service"]),
                pid=int(raw["pid"]),
                start_ticks=int(raw["start_ticks"]),
                marker=str(raw["marker"]),
                argv=[str(a) for a in raw["argv"]],
                ports={str(k): int(v) for k, v in dict(raw.get("ports", {})).items()},
                data_dir=str(raw.get("data_dir", "")),
                log_file=str(raw.get("log_file", "")),
                started_at=float(raw.get("started_at", 0.0)),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"state file is missing or mistypes a field: {exc}") from exc


def write_state(service_dir: Path, state: ProcessState) -> None:
    """Atomically write ``state.json`` (and a plain pid file for humans) into ``service_dir``."""
    service_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(service_dir / STATE_FILE, state.to_json())
    atomic_write(service_dir / PID_FILE, f"{state.pid}\n")


def read_state(service_dir: Path) -> ProcessState | None:
    """The recorded state, or None when absent or unreadable (treated as "not started by us")."""
    try:
        return ProcessState.from_json((service_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None


def clear_state(service_dir: Path) -> None:
    """Forget the recorded process."""
    for name in (STATE_FILE, PID_FILE):
        with contextlib.suppress(FileNotFoundError):
            (service_dir / name).unlink()


def atomic_write(path: Path, text: str, mode: int = 0o644) -> None:
    """Write ``text`` to ``path`` via a temp file and rename, created with permissions ``mode``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.chmod(tmp, mode)  # O_CREAT's mode is filtered by the umask
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def _stat_fields(path: Path) -> list[str] | None:
    try:
        stat = path.read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) is parenthesised and may itself contain spaces or ')'.
    return stat[stat.rindex(")") + 2 :].split()


def proc_start_ticks(pid: int) -> int | None:
    """The start time of ``pid`` in clock ticks since boot, or None once it has fully exited.

    A killed multi-threaded process (Valkey, the JVM) shows a zombie leader while its other
    threads are still exiting and its sockets are still open; it only counts as gone when no
    thread is left running.
    """
    _reap(pid)
    fields = _stat_fields(Path(f"/proc/{pid}/stat"))
    if fields is None:
        return None
    if fields[0] in ("Z", "X"):
        try:
            tasks = list(Path(f"/proc/{pid}/task").iterdir())
        except OSError:
            return None
        states = (_stat_fields(task / "stat") for task in tasks)
        if all(s is None or s[0] in ("Z", "X") for s in states):
            return None
    return int(fields[19])


def proc_cmdline(pid: int) -> list[str]:
    """The argv of ``pid``, or an empty list if it cannot be read."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def is_alive(state: ProcessState) -> bool:
    """True while the process we spawned (same pid and start time) has not exited."""
    return proc_start_ticks(state.pid) == state.start_ticks


def is_ours(state: ProcessState) -> bool:
    """True when ``state.pid`` is alive and is still the very process we started."""
    ticks = proc_start_ticks(state.pid)
    if ticks is None or ticks != state.start_ticks:
        return False
    return any(state.marker in arg for arg in proc_cmdline(state.pid))


def spawn(argv: list[str], cwd: Path, log_file: Path, env: dict[str, str] | None = None) -> int:
    """Start ``argv`` detached (own session, stdin closed, output appended to ``log_file``)."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as log:
        proc = subprocess.Popen(
            argv,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # survives the `pulse up` process and its terminal's Ctrl-C
            close_fds=True,
            env=env,
        )
    _CHILDREN[proc.pid] = proc
    return proc.pid


def _reap(pid: int) -> None:
    proc = _CHILDREN.get(pid)
    if proc is not None and proc.poll() is not None:
        del _CHILDREN[pid]


def wait_gone(state: ProcessState, timeout_s: float) -> bool:
    """Wait until the process of ``state`` has exited; True if it did within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while is_alive(state):  # not is_ours: an exiting process's cmdline is already empty
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def terminate(state: ProcessState, timeout_s: float) -> bool:
    """SIGTERM our process, SIGKILL it after ``timeout_s``; False if it was not running."""
    if not is_ours(state):
        return False
    send_signal(state, signal.SIGTERM)
    if not wait_gone(state, timeout_s):
        send_signal(state, signal.SIGKILL)
        wait_gone(state, 10.0)
    return True


def send_signal(state: ProcessState, sig: int) -> bool:
    """Send ``sig`` to our process only; False if it is not (or no longer) ours."""
    if not is_ours(state):
        return False
    try:
        os.kill(state.pid, sig)
    except ProcessLookupError:
        return False
    return True


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True if nothing listens on ``host:port`` (a bind succeeds)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # SO_REUSEADDR: a port left in TIME_WAIT by our own previous run is still usable.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def port_accepts(port: int, host: str = "127.0.0.1", timeout_s: float = 0.5) -> bool:
    """True if a TCP connection to ``host:port`` succeeds."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def require_free_ports(ports: dict[str, int]) -> None:
    """Raise ``PortInUseError`` for the first port (described by its key) that is taken."""
    seen: dict[int, str] = {}
    for what, port in ports.items():
        if port in seen:
            raise PortInUseError(f"{what} and {seen[port]} are both configured on port {port}.")
        seen[port] = what
        if not port_is_free(port):
            raise PortInUseError(
                f"Port {port} for {what} is already in use by another process; "
                f"stop that process or choose another port."
            )


def free_port(host: str = "127.0.0.1") -> int:
    """A port the kernel currently considers free (for tests and ad-hoc stacks)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def tail(path: Path, lines: int = 20) -> str:
    """The last ``lines`` lines of a log file (empty if unreadable)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 16384))
            data = fh.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(data.splitlines()[-lines:])


def exited_early(state: ProcessState, what: str) -> StartupError:
    """The error for a service whose process died during start-up."""
    return StartupError(f"{what} exited during start-up; see {state.log_file} for why.")
