"""Drive the real pipeline from tests: topics, load generator, worker processes, Kafka reads.

Everything here runs real processes (``pulse loadgen``, ``pulse worker``, ``pulse verify``)
against a running stack, the way a user would.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import redis

from pipeline.stack.testing import RunningStack, stop_child
from schemas import keys
from schemas.events import EventKind

T = TypeVar("T")

#: (source topic, source partition, source offset) of a diverted record, from its headers
Position = tuple[str, int, int]


# How often the waits below look again: a polling interval, every wait has a deadline.
POLL_S = 0.2


def wait_for(
    condition: Callable[[], T | None],
    what: str,
    timeout_s: float = 120.0,
    alive: Callable[[], bool] | None = None,
    interval_s: float = POLL_S,
) -> T:
    """Poll ``condition`` until it returns something truthy (returned); fail after the deadline.

    ``alive`` is checked on every round: a process the wait depends on must not die meanwhile.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if alive is not None:
            assert alive(), f"a process died while waiting until {what}"
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s:g}s waiting until {what}")
        time.sleep(interval_s)


class Timeline:
    """Seconds since it was made at each named step of a drill (printed with the result)."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.at: dict[str, float] = {}

    def mark(self, what: str) -> None:
        """Note that ``what`` happened now."""
        self.at[what] = time.monotonic() - self.t0

    def __str__(self) -> str:
        return "timeline: " + ", ".join(f"{k} {v:.1f}s" for k, v in self.at.items())


def drill_seed() -> int:
    """The seed of a drill's random choices: ``PULSE_DRILL_SEED`` if set, else a fresh one."""
    env = os.environ.get("PULSE_DRILL_SEED", "").strip()
    return int(env) if env else random.SystemRandom().randrange(1, 1_000_000)


@contextlib.contextmanager
def replayable(drill: str, seed: int) -> Iterator[None]:
    """Print the seed now, and attach it to any failure of the block so it can be replayed."""
    print(f"\n{drill}: seed {seed} (replay with PULSE_DRILL_SEED={seed})", flush=True)
    try:
        yield
    except BaseException as exc:
        exc.add_note(f"{drill}: seed {seed}; replay with PULSE_DRILL_SEED={seed}")
        raise


def source_position(msg: Any) -> Position:
    """Where a dead-letter or late record came from, by its ``pulse.source.*`` headers."""
    h = dict(msg.headers)
    return (
        h["pulse.source.topic"].decode(),
        int(h["pulse.source.partition"]),
        int(h["pulse.source.offset"]),
    )


@dataclass
class Pipeline:
    """Fresh topics, consumer group and environment for one pipeline run on a stack."""

    running: RunningStack
    env: dict[str, str]
    topics: dict[str, str]  # sensor/applog/deadletter/late -> topic name
    workdir: Path

    @classmethod
    def create(cls, running: RunningStack, workdir: Path, **extra_env: str) -> Pipeline:
        """New uniquely named topics (created now) and a new consumer group."""
        tag = uuid.uuid4().hex[:8]
        topics = {k: f"t{tag}.{k}" for k in ("sensor", "applog", "deadletter", "late")}
        running.stack.kafka.create_topics(list(topics.values()), running.kafka_settings.partitions)
        env = {
            **os.environ,
            **running.env(),
            "PULSE_KAFKA_SENSOR_TOPIC": topics["sensor"],
            "PULSE_KAFKA_APPLOG_TOPIC": topics["applog"],
            "PULSE_KAFKA_DEADLETTER_TOPIC": topics["deadletter"],
            "PULSE_KAFKA_LATE_TOPIC": topics["late"],
            "PULSE_WORKER_APP_ID": f"pulse-test-{tag}",
            "PULSE_WORKER_BATCH_WITHIN_S": "0.05",
            **extra_env,
        }
        return cls(running, env, topics, workdir)

    def pulse(self, *argv: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Run a ``pulse`` subcommand to completion."""
        return subprocess.run(
            [sys.executable, "-m", "pipeline.cli", *argv],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def loadgen(self, *argv: str, truth: Path | None = None) -> dict[str, Any]:
        """Produce events with ``pulse loadgen``; return the truth file's content."""
        truth = truth or self.workdir / f"truth-{uuid.uuid4().hex[:6]}.json"
        res = self.pulse("loadgen", *argv, f"--truth={truth}")
        assert res.returncode == 0, f"loadgen failed: {res.stderr[-2000:]}"
        return self.truth(truth)

    @staticmethod
    def truth(path: Path) -> dict[str, Any]:
        """A truth file's content."""
        import orjson

        data: dict[str, Any] = orjson.loads(path.read_bytes())
        return data

    def start_loadgen(self, *argv: str, truth: Path) -> LoadgenProcess:
        """Start ``pulse loadgen`` in the background (its output goes to a log file)."""
        log = self.workdir / f"loadgen-{uuid.uuid4().hex[:4]}.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "pipeline.cli", "loadgen", *argv, f"--truth={truth}"],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        return LoadgenProcess(proc, log)

    def worker(self, name: str = "w1", **extra_env: str) -> WorkerProcess:
        """Start a ``pulse worker`` process."""
        log = self.workdir / f"worker-{name}-{uuid.uuid4().hex[:4]}.log"
        return WorkerProcess.start({**self.env, **extra_env}, name, log)

    def input_partitions(self) -> list[tuple[EventKind, int]]:
        """Every (event kind, partition) of the two input topics."""
        return [(k, p) for k in EventKind for p in range(self.running.kafka_settings.partitions)]

    def progress(self, client: redis.Redis) -> dict[str, dict[str, str]]:
        """Every input partition's progress hash, by ``"<kind>.<partition>"`` (empty: none)."""
        pipe = client.pipeline(transaction=False)
        parts = self.input_partitions()
        for kind, p in parts:
            pipe.hgetall(keys.progress_key(kind, p))
        return {
            keys.partition_tag(k, p): row for (k, p), row in zip(parts, pipe.execute(), strict=True)
        }

    def owned_by(self, client: redis.Redis, name: str) -> list[str]:
        """Partitions whose progress hash names worker ``name`` as the owner of the last apply.

        The store writes the owner in the same atomic call as the batch, so a partition listed
        here was assigned to that worker, which applied at least one batch of it durably.
        """
        rows = self.progress(client)
        return sorted(tag for tag, row in rows.items() if row.get(keys.Progress.OWNER) == name)

    def applied_total(self, client: redis.Redis) -> int:
        """Sum over input partitions of (applied offset + 1): grows with every applied record."""
        return sum(off + 1 for off in self.applied_offsets(client).values())

    def verify(self, truth: Path) -> subprocess.CompletedProcess[str]:
        """Run ``pulse verify``."""
        return self.pulse("verify", f"--truth={truth}", "--max-report=20")

    def end_offsets(self) -> dict[tuple[str, int], int]:
        """End offset of every partition of the two input topics."""
        return asyncio.run(
            _end_offsets(self.running.bootstrap, [self.topics["sensor"], self.topics["applog"]])
        )

    def applied_offsets(self, client: redis.Redis) -> dict[tuple[str, int], int]:
        """The store's applied offset of every input partition (-1 where none)."""
        out = {}
        pipe = client.pipeline(transaction=False)
        parts = range(self.running.kafka_settings.partitions)
        for kind in EventKind:
            for p in parts:
                pipe.hget(keys.progress_key(kind, p), keys.Progress.OFFSET)
        values = iter(pipe.execute())
        for kind in EventKind:
            for p in parts:
                v = next(values)
                out[(self.topics[kind.value], p)] = int(v) if v is not None else -1
        return out

    def wait_applied(
        self, client: redis.Redis, timeout_s: float = 180.0, alive: Callable[[], bool] | None = None
    ) -> None:
        """Wait until the store has applied every record the input topics hold."""
        ends = self.end_offsets()
        behind: dict[tuple[str, int], tuple[int, int]] = {}

        def caught_up() -> bool:
            nonlocal behind
            applied = self.applied_offsets(client)
            behind = {tp: (applied[tp], end) for tp, end in ends.items() if applied[tp] < end - 1}
            return not behind

        try:
            wait_for(caught_up, "the store applied every record", timeout_s, alive)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; behind: {behind}") from None

    def read_topic(self, name: str) -> list[Any]:
        """Every record of a topic (all partitions)."""
        return asyncio.run(_read_all(self.running.bootstrap, self.topics[name]))

    def diverted(self, name: str = "deadletter") -> dict[Position, list[Any]]:
        """The dead-letter (or late) topic's records by source position.

        Diverted records are at-least-once: a position may appear more than once.
        """
        out: dict[Position, list[Any]] = {}
        for msg in self.read_topic(name):
            out.setdefault(source_position(msg), []).append(msg)
        return out

    def assert_kafka_holds_truth(self, truth_file: Path) -> int:
        """Each input partition holds exactly the records the load generator produced (none
        lost or duplicated across a fault); returns how many in all."""
        truth = self.truth(truth_file)
        ends = self.end_offsets()
        for kind in ("sensor", "applog"):
            for p, row in truth["per_partition"][kind].items():
                tp = (self.topics[kind], int(p))
                assert ends[tp] == row["produced"], (
                    f"{tp}: {ends[tp]} records in Kafka, the load generator produced "
                    f"{row['produced']}: lost or duplicated"
                )
        return sum(ends.values())

    def committed(self) -> dict[tuple[str, int], int]:
        """The worker group's committed offsets on the input topics (-1 where none)."""
        return asyncio.run(
            _committed(
                self.running.bootstrap,
                self.env["PULSE_WORKER_APP_ID"],
                [self.topics["sensor"], self.topics["applog"]],
                self.running.kafka_settings.partitions,
            )
        )


@dataclass
class LoadgenProcess:
    """A ``pulse loadgen`` child process running in the background."""

    proc: subprocess.Popen[bytes]
    log: Path

    def alive(self) -> bool:
        """Whether it is still producing."""
        return self.proc.poll() is None

    def wait(self, timeout_s: float = 180.0) -> None:
        """Wait until it finished, and fail unless it succeeded."""
        code = self.proc.wait(timeout_s)
        assert code == 0, f"loadgen exited with {code}:\n{self.tail()}"

    def stop(self) -> None:
        """Kill it if it still runs (clean-up after a failed test)."""
        if self.alive():
            self.proc.kill()
            self.proc.wait(30)

    def tail(self, n: int = 20) -> str:
        """Last lines of its output."""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])


@dataclass
class WorkerProcess:
    """A ``pulse worker`` child process."""

    proc: subprocess.Popen[bytes]
    log: Path
    name: str

    @classmethod
    def start(cls, env: dict[str, str], name: str, log: Path) -> WorkerProcess:
        """Launch the worker."""
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "pipeline.cli", "worker", f"--name={name}",
                 "--loglevel=info"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        return cls(proc, log, name)

    def alive(self) -> bool:
        """Whether the process still runs."""
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no clean-up, no commit, no goodbye."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM and wait; returns the exit status."""
        return stop_child(self.proc, timeout_s)

    def tail(self, n: int = 40) -> str:
        """Last lines of the worker's log."""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def log_count(self, needle: str) -> int:
        """How many lines of the worker's log contain ``needle``."""
        return sum(needle in line for line in self.log.read_text(errors="replace").splitlines())


async def _end_offsets(bootstrap: str, topics: list[str]) -> dict[tuple[str, int], int]:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    c = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await c.start()
    try:
        tps = [TopicPartition(t, p) for t in topics for p in (c.partitions_for_topic(t) or ())]
        if not tps:
            await c._client.force_metadata_update()
            tps = [TopicPartition(t, p) for t in topics for p in (c.partitions_for_topic(t) or ())]
        ends = await c.end_offsets(tps)
        return {(tp.topic, tp.partition): off for tp, off in ends.items()}
    finally:
        await c.stop()


async def _read_all(bootstrap: str, topic: str) -> list[Any]:
    from aiokafka import AIOKafkaConsumer

    ends = await _end_offsets(bootstrap, [topic])
    want = sum(ends.values())
    c = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await c.start()
    out: list[Any] = []
    try:
        deadline = time.monotonic() + 60
        while len(out) < want and time.monotonic() < deadline:
            for msgs in (await c.getmany(timeout_ms=500)).values():
                out.extend(msgs)
    finally:
        await c.stop()
    return out


async def _committed(
    bootstrap: str, group: str, topics: list[str], partitions: int
) -> dict[tuple[str, int], int]:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    c = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await c.start()
    try:
        out = {}
        for t in topics:
            for p in range(partitions):
                off = await c.committed(TopicPartition(t, p))
                out[(t, p)] = -1 if off is None else off
        return out
    finally:
        await c.stop()
