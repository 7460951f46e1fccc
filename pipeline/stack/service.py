"""The life cycle every stack service shares: launch detached, wait until ready, stop, kill."""

from __future__ import annotations

import signal
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

from pipeline.stack import processes
from pipeline.stack.errors import StackError, StartupError
from pipeline.stack.processes import ProcessState


@dataclass(frozen=True)
class ServiceStatus:
    """One row of ``pulse status``."""

    service: str
    running: bool
    port: int
    pid: int | None
    data_dir: Path

    @property
    def state(self) -> str:
        """``running`` or ``stopped``."""
        return "running" if self.running else "stopped"


class Service(ABC):
    """A long-lived local process whose state lives in ``home/<name>/``."""

    #: directory name under the stack home, and the name shown by ``pulse status``
    name: str
    #: what users call it in messages
    label: str
    stop_timeout_s: float = 10.0

    def __init__(self, home: Path, start_timeout_s: float) -> None:
        self.dir = home.resolve() / self.name
        self.start_timeout_s = start_timeout_s

    # What each service defines.
    @property
    @abstractmethod
    def port(self) -> int:
        """The port clients connect to."""

    @property
    @abstractmethod
    def data_dir(self) -> Path:
        """Where the service keeps its durable data."""

    @property
    def ports(self) -> dict[str, int]:
        """Every port the service listens on; the client port (key ``port``) first."""
        return {"port": self.port}

    def port_descriptions(self) -> dict[str, int]:
        """``ports`` keyed by what a user would call each one, for error messages."""
        return {
            self.label if key == "port" else f"{self.label} {key.replace('_', ' ')}": port
            for key, port in self.ports.items()
        }

    @abstractmethod
    def _prepare(self) -> tuple[list[str], str, Path]:
        """Write config files; return (argv, command-line marker, log file)."""

    @abstractmethod
    def _probe(self) -> bool:
        """One readiness check: True once the service answers like it should."""

    # Shared behaviour.
    def state(self) -> ProcessState | None:
        """What we recorded when we last started it, if anything."""
        return processes.read_state(self.dir)

    def is_running(self) -> bool:
        """True if the process we started is alive (a reused pid does not count)."""
        state = self.state()
        return state is not None and processes.is_ours(state)

    @property
    def pid(self) -> int | None:
        """The pid of our running process, or None."""
        state = self.state()
        return state.pid if state is not None and processes.is_ours(state) else None

    def status(self) -> ServiceStatus:
        """Running or not, and where."""
        state = self.state()
        running = state is not None and processes.is_ours(state)
        port = self.port
        if running and state is not None:
            port = state.ports.get("port", port)
        return ServiceStatus(
            self.name, running, port, state.pid if running and state else None, self.data_dir
        )

    def launch(self) -> ProcessState:
        """Spawn the process without waiting for it to be ready; records its state file."""
        argv, marker, log_file = self._prepare()
        pid = processes.spawn(argv, cwd=self.dir, log_file=log_file)
        ticks = processes.proc_start_ticks(pid)
        if ticks is None:
            raise StartupError(f"{self.label} exited immediately; see {log_file} for why.")
        state = ProcessState(
            service=self.name,
            pid=pid,
            start_ticks=ticks,
            marker=marker,
            argv=argv,
            ports=self.ports,
            data_dir=str(self.data_dir),
            log_file=str(log_file),
            started_at=time.time(),
        )
        processes.write_state(self.dir, state)
        return state

    def wait_ready(self, timeout_s: float | None = None) -> None:
        """Block until the service answers; raise ``StartupError`` if it dies or times out."""
        state = self.state()
        if state is None:
            raise StartupError(f"{self.label} was never started.")
        timeout = timeout_s or self.start_timeout_s
        deadline = time.monotonic() + timeout
        delay = 0.05
        while True:
            if not processes.is_alive(state):
                raise processes.exited_early(state, self.label)
            if self._probe():
                return
            if time.monotonic() >= deadline:
                raise StartupError(
                    f"{self.label} did not become ready within {timeout:g} s; see {state.log_file}."
                )
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)

    def start(self) -> bool:
        """Start the service on its existing data dir and wait until ready.

        Returns False (and does nothing) if it is already running. If it fails to become ready,
        the process is stopped again before the error propagates.
        """
        if self.is_running():
            return False
        processes.require_free_ports(self.port_descriptions())
        self.launch()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return True

    def stop(self, timeout_s: float | None = None) -> bool:
        """SIGTERM (then SIGKILL after the timeout) our process; False if it was not running."""
        state = self.state()
        if state is None:
            return False
        stopped = processes.terminate(state, timeout_s or self.stop_timeout_s)
        if processes.is_ours(state):
            raise StackError(f"{self.label} (pid {state.pid}) survived SIGKILL.")
        processes.clear_state(self.dir)
        return stopped

    def kill(self, sig: int = signal.SIGKILL, wait: bool = True) -> bool:
        """Send ``sig`` to our process (a crash, by default) and wait until it is gone.

        The state file is kept, so ``start()`` afterwards restarts on the same data.
        """
        state = self.state()
        if state is None or not processes.send_signal(state, sig):
            return False
        if wait and not processes.wait_gone(state, self.stop_timeout_s):
            raise StackError(f"{self.label} (pid {state.pid}) did not exit after signal {sig}.")
        return True
