"""Child processes of the benchmarks and what is read from the store while they run.

Workers run as real ``pulse worker`` processes, started through :mod:`pulse_bench.counting`
so that their store round trips are counted client-side (one per ``send_packed_command``: a
pipeline is one write and one round trip).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from pipeline.stack.testing import stop_child
from pulse_bench.harness import BenchContext, BenchError
from schemas import keys
from schemas.events import EventKind

if TYPE_CHECKING:
    import redis

PROGRESS_FIELDS = (
    keys.Progress.OFFSET,
    keys.Progress.EVENTS,
    keys.Progress.LATE,
    keys.Progress.DEAD,
)


@dataclass
class Child:
    """A child process with its log and round-trip counter file (written when it exits)."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    counts_file: Path

    def alive(self) -> bool:
        """Whether it still runs."""
        return self.proc.poll() is None

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM, wait, SIGKILL if it does not stop; the exit status."""
        return stop_child(self.proc, timeout_s)

    def tail(self, n: int = 30) -> str:
        """Last lines of the log."""
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        return ""

    def final_counts(self) -> dict[str, int]:
        """Round trips and commands of the whole run, read after the child exited.

        The child writes them once, when it exits (:mod:`pulse_bench.counting`); a child
        still running, or one that died without writing them (SIGKILL), is a
        :class:`~pulse_bench.harness.BenchError`, never a partial count.
        """
        if self.alive():
            raise BenchError(f"{self.name}: counters read before the process exited")
        try:
            data = orjson.loads(self.counts_file.read_bytes())
        except (OSError, orjson.JSONDecodeError):
            data = {}
        if not isinstance(data, dict) or data.get("final") is not True:
            raise BenchError(
                f"{self.name} exited with {self.proc.returncode} without writing its final "
                f"counters: {self.tail(10)}"
            )
        return {"round_trips": int(data["round_trips"]), "commands": int(data["commands"])}


def spawn(
    ctx: BenchContext,
    env: dict[str, str],
    name: str,
    argv: Sequence[str],
    *,
    counted: bool = True,
) -> Child:
    """Start ``python -m pulse_bench.counting <argv>`` with ``env``, in the run's scratch dir.

    ``counted=False`` starts ``python <argv>`` instead (no round-trip counters: the child's
    :meth:`Child.final_counts` is then a :class:`BenchError`). The working directory is
    ``ctx.workdir``, so what a child leaves there (Faust's ``<app id>-data``) goes with it.
    """
    log = ctx.workdir / f"{name}.log"
    counts_file = ctx.workdir / f"{name}.counts.json"
    counts_file.unlink(missing_ok=True)
    prefix = ["-m", "pulse_bench.counting", str(counts_file)] if counted else []
    out = open(log, "ab")  # noqa: SIM115 - handed to the child
    try:
        proc = subprocess.Popen(
            [sys.executable, *prefix, *argv],
            env={**env, "PYTHONUNBUFFERED": "1"},
            cwd=ctx.workdir,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    finally:
        out.close()
    return Child(name, proc, log, counts_file)


def spawn_worker(ctx: BenchContext, env: dict[str, str], name: str) -> Child:
    """Start a real ``pulse worker``."""
    return spawn(ctx, env, name, ["worker", f"--name={name}", "--loglevel=warning"])


def stop_all(children: Sequence[Child]) -> dict[str, int]:
    """Stop every child (SIGTERM to all first); exit status per name."""
    for c in children:
        if c.alive():
            c.proc.send_signal(signal.SIGTERM)
    return {c.name: c.stop() for c in children}


@dataclass
class Progress:
    """The store's progress hashes of every input partition at one moment."""

    at: float  # time.monotonic() (compared with send times of the same process)
    offsets: dict[tuple[str, int], int]  # (kind, partition) -> applied offset (-1: none)
    totals: dict[str, dict[str, int]]  # kind -> events/late/dead

    def applied_records(self, ends: dict[tuple[str, int], int]) -> int:
        """Records at or below the applied offsets (the store has taken them into account)."""
        return sum(min(self.offsets.get(tp, -1) + 1, end) for tp, end in ends.items())

    def caught_up(self, ends: dict[tuple[str, int], int]) -> bool:
        """Every partition applied up to its end offset."""
        return all(self.offsets.get(tp, -1) >= end - 1 for tp, end in ends.items())


def read_progress(r: redis.Redis, partitions: int) -> Progress:
    """One round trip: the progress hash of every partition of both kinds."""
    pipe = r.pipeline(transaction=False)
    for kind in EventKind:
        for p in range(partitions):
            pipe.hmget(keys.progress_key(kind, p), *PROGRESS_FIELDS)
    rows = iter(pipe.execute())
    at = time.monotonic()
    offsets: dict[tuple[str, int], int] = {}
    totals: dict[str, dict[str, int]] = {}
    for kind in EventKind:
        t = totals[kind.value] = {"events": 0, "late": 0, "dead": 0}
        for p in range(partitions):
            off, ev, late, dead = next(rows)
            offsets[(kind.value, p)] = int(off) if off is not None else -1
            t["events"] += int(ev or 0)
            t["late"] += int(late or 0)
            t["dead"] += int(dead or 0)
    return Progress(at, offsets, totals)


@dataclass
class Drain:
    """Samples of a drain, until the store applied every record: ``(time, records applied)``
    and, at the same moments, the CPU seconds the workers had used in all."""

    samples: list[tuple[float, int]] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    polls: int = 0
    final: Progress | None = None


def wait_drained(
    ctx: BenchContext,
    ends: dict[tuple[str, int], int],
    children: Sequence[Child],
    interval_s: float = 0.02,
    timeout_s: float | None = None,
) -> Drain:
    """Poll the store's progress until caught up with ``ends``; fail if a child dies."""
    drain = Drain()
    deadline = time.monotonic() + (timeout_s or ctx.params.drain_timeout_s)
    with ctx.redis() as r:
        while True:
            prog = read_progress(r, ctx.kafka.partitions)
            drain.polls += 1
            drain.samples.append((time.monotonic(), prog.applied_records(ends)))
            drain.cpu.append(_cpu_of(children, drain.cpu[-1] if drain.cpu else 0.0))
            if prog.caught_up(ends):
                drain.final = prog
                return drain
            for c in children:
                if not c.alive():
                    raise BenchError(f"{c.name} exited with {c.proc.returncode}: {c.tail()}")
            if time.monotonic() > deadline:
                raise BenchError(
                    f"not drained within {timeout_s or ctx.params.drain_timeout_s:.0f} s: "
                    f"{drain.samples[-1][1]:,} of {sum(ends.values()):,} records applied"
                )
            time.sleep(interval_s)


@dataclass(frozen=True)
class StoreCounters:
    """Server-side counters of the primary (and replica): commands, AOF size."""

    commands: int
    cpu_s: float  # the primary's main-process CPU (user + sys)
    aof_bytes: int
    aof_rewrites: int
    replica_aof_bytes: int | None
    commandstats: dict[str, tuple[int, int]]  # command -> (calls, usec)

    @classmethod
    def read(cls, ctx: BenchContext) -> StoreCounters:
        """Current values."""
        with ctx.redis() as r:
            stats, pers, cpu = r.info("stats"), r.info("persistence"), r.info("cpu")
            cmds = r.info("commandstats")
        replica = None
        if ctx.store.replica_port is not None:
            with ctx.redis(replica=True) as rr:
                replica = int(rr.info("persistence")["aof_current_size"])
        return cls(
            int(stats["total_commands_processed"]),
            float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]),
            int(pers["aof_current_size"]),
            int(pers["aof_rewrites"]),
            replica,
            {
                k.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"]))
                for k, v in cmds.items()
            },
        )

    def delta(self, before: StoreCounters, top: int = 6) -> dict[str, Any]:
        """What happened between ``before`` and this snapshot.

        AOF growth is only meaningful without a rewrite in between (the bench turns automatic
        rewrites off while it runs); ``by_command`` lists the commands that took the most
        server time, those a function runs included.
        """
        rewritten = self.aof_rewrites != before.aof_rewrites
        out: dict[str, Any] = {
            "commands": self.commands - before.commands,
            "cpu_s": round(self.cpu_s - before.cpu_s, 3),
            "aof_rewritten": rewritten,
        }
        if not rewritten:
            out["aof_bytes"] = self.aof_bytes - before.aof_bytes
            if self.replica_aof_bytes is not None and before.replica_aof_bytes is not None:
                out["replica_aof_bytes"] = self.replica_aof_bytes - before.replica_aof_bytes
        diffs = []
        for name, (calls, usec) in self.commandstats.items():
            c0, u0 = before.commandstats.get(name, (0, 0))
            if calls > c0:
                diffs.append((usec - u0, calls - c0, name))
        diffs.sort(reverse=True)
        out["by_command"] = {name: {"calls": c, "usec": u} for u, c, name in diffs[:top]}
        return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a live process has used (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu_of(children: Sequence[Child], last: float) -> float:
    """The children's CPU seconds in all, or ``last`` when one cannot be read (it is gone:
    the drain loop reports that)."""
    try:
        return sum(cpu_seconds(c.proc.pid) for c in children)
    except (OSError, ValueError, IndexError):
        return last


def py_spy() -> str | None:
    """The py-spy executable (next to this Python, or on PATH), if installed."""
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


@dataclass
class Profiler:
    """``py-spy record`` attached to a process, writing collapsed stacks (raw format)."""

    proc: subprocess.Popen[bytes]
    output: Path

    @classmethod
    def attach(cls, pid: int, output: Path, rate: int = 100) -> Profiler | None:
        """Start sampling ``pid``; None when py-spy is not installed."""
        exe = py_spy()
        if exe is None:
            return None
        output.parent.mkdir(parents=True, exist_ok=True)
        argv = [exe, "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw"]
        argv += ["--nonblocking", "--output", str(output)]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        return cls(proc, output)

    def stop(self) -> None:
        """Stop sampling (SIGINT makes py-spy write its output)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def until(pred: Callable[[], bool], timeout_s: float, interval_s: float = 0.05) -> bool:
    """Poll ``pred`` until true or the timeout; whether it became true."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval_s)
    return pred()


def pid_alive(pid: int) -> bool:
    """Whether a process with ``pid`` exists."""
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True
