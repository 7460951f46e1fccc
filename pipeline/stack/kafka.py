"""A one-node Apache Kafka (KRaft, broker + controller) run from the official Maven Central jars.

The jars are fetched once with Maven into ``cache_dir/kafka-<scala>-<version>/libs`` and shared by
every stack home; ``KAFKA_HOME`` (an unpacked Kafka distribution) is used instead when set.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pipeline.stack import processes
from pipeline.stack.errors import PrerequisiteError, StackError, StartupError
from pipeline.stack.service import Service

if TYPE_CHECKING:
    from pipeline.settings import KafkaSettings, StackSettings

T = TypeVar("T")

SLF4J_BINDING = ("org.slf4j", "slf4j-reload4j", "1.7.36")
COMPLETE_MARKER = "COMPLETE"
TOPIC_ALREADY_EXISTS = 36
JAVA_HINT = (
    "install OpenJDK 17 (apt-get install openjdk-17-jre-headless) "
    "or set KAFKA_HOME to an unpacked Kafka distribution"
)


# --- prerequisites and jars -----------------------------------------------------------------


def parse_java_major(version_output: str) -> int | None:
    """The major version from ``java -version`` output (``1.8.0_x`` → 8, ``17.0.15`` → 17)."""
    match = re.search(r'version "(\d+)(?:\.(\d+))?', version_output)
    if match is None:
        return None
    major = int(match.group(1))
    return int(match.group(2) or 0) if major == 1 else major


def require_java(minimum: int = 11) -> str:
    """The path of a ``java`` of at least version ``minimum``; ``PrerequisiteError`` otherwise."""
    java = shutil.which("java")
    if java is None:
        raise PrerequisiteError(f"Java {minimum}+ is required to run Kafka: {JAVA_HINT}.")
    try:
        out = subprocess.run(
            [java, "-version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PrerequisiteError(f"Running '{java} -version' failed ({exc}): {JAVA_HINT}.") from exc
    major = parse_java_major(out.stderr + out.stdout)
    if major is None or major < minimum:
        raise PrerequisiteError(
            f"Java {minimum}+ is required to run Kafka but {java} is version {major or 'unknown'}: "
            f"{JAVA_HINT}."
        )
    return java


def render_pom(kafka_version: str, scala_version: str) -> str:
    """A throw-away pom whose runtime dependencies are exactly the Kafka broker's classpath."""
    group, artifact, version = SLF4J_BINDING
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>pulse.local</groupId>
  <artifactId>kafka-jars</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_{scala_version}</artifactId>
      <version>{kafka_version}</version>
    </dependency>
    <dependency>
      <groupId>{group}</groupId>
      <artifactId>{artifact}</artifactId>
      <version>{version}</version>
    </dependency>
  </dependencies>
</project>
"""


def jar_cache_dir(stack: StackSettings) -> Path:
    """Where this Kafka version's jars are (or will be) cached."""
    return (
        stack.cache_dir.expanduser().resolve()
        / f"kafka-{stack.scala_version}-{stack.kafka_version}"
    )


def jars_cached(stack: StackSettings) -> bool:
    """True if a complete jar download is in the cache."""
    return (jar_cache_dir(stack) / COMPLETE_MARKER).is_file()


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_jars(stack: StackSettings) -> Path:
    """The ``libs`` dir of the cached Kafka jars, fetching them with Maven the first time.

    The fetch happens in a temp dir that is renamed into place only after the marker is written,
    so an interrupted or failed fetch never leaves a cache that looks complete; a lock file keeps
    concurrent fetches (parallel test runs) from doing the work twice.
    """
    final = jar_cache_dir(stack)
    if (final / COMPLETE_MARKER).is_file():
        return final / "libs"
    mvn = shutil.which("mvn")
    if mvn is None:
        raise PrerequisiteError(
            "Maven is required once to download the Kafka jars: install it "
            "(apt-get install maven) or set KAFKA_HOME to an unpacked Kafka distribution."
        )
    final.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(final.parent / f".{final.name}.lock"):
        if (final / COMPLETE_MARKER).is_file():  # another process fetched while we waited
            return final / "libs"
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
        try:
            (tmp / "pom.xml").write_text(render_pom(stack.kafka_version, stack.scala_version))
            argv = [
                mvn, "-q", "-B", "dependency:copy-dependencies",
                f"-DoutputDirectory={tmp / 'libs'}", "-DincludeScope=runtime",
            ]  # fmt: skip
            try:
                out = subprocess.run(
                    argv, cwd=tmp, capture_output=True, text=True, timeout=900, check=False
                )
            except subprocess.TimeoutExpired as exc:
                raise StackError("Maven did not finish fetching the Kafka jars in 15 min.") from exc
            jars = sorted((tmp / "libs").glob("*.jar")) if (tmp / "libs").is_dir() else []
            if out.returncode != 0 or not any(
                j.name.startswith(f"kafka_{stack.scala_version}-") for j in jars
            ):
                last = (out.stdout + out.stderr).strip().splitlines()[-1:] or ["no output"]
                raise StackError(
                    f"Maven could not fetch Kafka {stack.kafka_version} (exit {out.returncode}): "
                    f"{last[0].strip()}"
                )
            (tmp / COMPLETE_MARKER).write_text(f"{len(jars)} jars\n")
            if final.exists():  # a leftover without a marker (an older, broken layout)
                shutil.rmtree(final)
            os.rename(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return final / "libs"


def kafka_classpath(stack: StackSettings) -> str:
    """The Java classpath (a ``libs/*`` wildcard) of the broker, honouring ``KAFKA_HOME``."""
    kafka_home = os.environ.get("KAFKA_HOME")
    if kafka_home:
        libs = Path(kafka_home).expanduser() / "libs"
        if not libs.is_dir():
            raise PrerequisiteError(f"KAFKA_HOME is set to {kafka_home} but it has no libs/ dir.")
        return str(libs.resolve() / "*")
    return str(ensure_jars(stack) / "*")


def random_cluster_id() -> str:
    """A KRaft cluster id the way ``StorageTool random-uuid`` makes one (without a JVM start)."""
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not text.startswith("-"):  # Kafka's Uuid.randomUuid avoids these (CLI-unfriendly)
            return text


# --- configuration ------------------------------------------------------------------------


def parse_bootstrap(bootstrap: str) -> tuple[str, int]:
    """``host:port`` of the first bootstrap server."""
    first = bootstrap.split(",")[0].strip()
    host, sep, port = first.rpartition(":")
    if not sep or not port.isdigit():
        raise StackError(f"PULSE_KAFKA_BOOTSTRAP must look like host:port, not {bootstrap!r}.")
    return host or "127.0.0.1", int(port)


def render_server_properties(
    *, port: int, controller_port: int, log_dir: Path, partitions: int
) -> str:
    """server.properties of a single KRaft node acting as broker and controller."""
    return f"""# Written by `pulse up`; rewritten on every start.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:{controller_port}
listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}
advertised.listeners=PLAINTEXT://127.0.0.1:{port}
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
log.dirs={log_dir}
num.partitions={partitions}
default.replication.factor=1
min.insync.replicas=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions={partitions}
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
group.initial.rebalance.delay.ms=0
# One local node: a broker restarted after a crash re-registers only once its previous
# session expired (DUPLICATE_BROKER_REGISTRATION until then); the 9 s default slows restarts.
broker.heartbeat.interval.ms=500
broker.session.timeout.ms=4000
auto.create.topics.enable=false
"""


def render_log4j(log_file: Path) -> str:
    """log4j (reload4j) configuration: everything to one rolling file."""
    return f"""log4j.rootLogger=INFO, file
log4j.appender.file=org.apache.log4j.RollingFileAppender
log4j.appender.file.File={log_file}
log4j.appender.file.MaxFileSize=20MB
log4j.appender.file.MaxBackupIndex=3
log4j.appender.file.layout=org.apache.log4j.PatternLayout
log4j.appender.file.layout.ConversionPattern=[%d] %p %m (%c)%n
log4j.logger.kafka.request.logger=WARN
log4j.logger.org.apache.kafka.clients=WARN
"""


# --- async helpers ------------------------------------------------------------------------


def run_sync(make: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine to completion, even when called from inside a running event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(_as_coroutine(make))
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(asyncio.run(_as_coroutine(make)))
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=target, name="pulse-stack-admin")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


async def _as_coroutine(make: Callable[[], Awaitable[T]]) -> T:
    return await make()


# --- the service --------------------------------------------------------------------------


class KafkaService(Service):
    """The broker; ``wait_ready`` also creates Pulse's topics (idempotently)."""

    name = "kafka"
    label = "the Kafka broker"
    stop_timeout_s = 30.0

    def __init__(self, stack: StackSettings, kafka: KafkaSettings) -> None:
        super().__init__(stack.home, stack.start_timeout_s)
        self.stack = stack
        self.kafka = kafka
        self.host, self._port = parse_bootstrap(kafka.bootstrap)

    @property
    def port(self) -> int:
        """The PLAINTEXT (client) port."""
        return self._port

    @property
    def ports(self) -> dict[str, int]:
        """Client and controller ports."""
        return {"port": self._port, "controller_port": self.stack.kafka_controller_port}

    @property
    def bootstrap(self) -> str:
        """``host:port`` for clients."""
        return f"127.0.0.1:{self._port}"

    @property
    def data_dir(self) -> Path:
        """``log.dirs``: the topic partitions and KRaft metadata log."""
        return self.dir / "data"

    @property
    def config_file(self) -> Path:
        """The generated server.properties."""
        return self.dir / "server.properties"

    @property
    def log_file(self) -> Path:
        """The broker's log4j log."""
        return self.dir / "logs" / "server.log"

    def _prepare(self) -> tuple[list[str], str, Path]:
        java = require_java()
        classpath = kafka_classpath(self.stack)
        (self.dir / "logs").mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        processes.atomic_write(
            self.config_file,
            render_server_properties(
                port=self._port,
                controller_port=self.stack.kafka_controller_port,
                log_dir=self.data_dir,
                partitions=self.kafka.partitions,
            ),
        )
        log4j = self.dir / "log4j.properties"
        processes.atomic_write(log4j, render_log4j(self.log_file))
        base = [java, "-Djava.awt.headless=true", f"-Dlog4j.configuration=file:{log4j}"]
        if not (self.data_dir / "meta.properties").exists():  # format exactly once
            self._format(base, classpath)
        argv = [*base[:1], f"-Xmx{self.stack.kafka_heap}", *base[1:], "-cp", classpath,
                "kafka.Kafka", str(self.config_file)]  # fmt: skip
        return argv, str(self.config_file), self.dir / "logs" / "stdout.log"

    def _format(self, base: list[str], classpath: str) -> None:
        argv = [*base, "-cp", classpath, "kafka.tools.StorageTool", "format",
                "-t", random_cluster_id(), "-c", str(self.config_file)]  # fmt: skip
        out = subprocess.run(
            argv, cwd=self.dir, capture_output=True, text=True, timeout=120, check=False
        )
        if out.returncode != 0:
            last = (out.stdout + out.stderr).strip().splitlines()[-1:] or ["no output"]
            raise StartupError(f"Formatting the Kafka storage failed: {last[0].strip()}")

    def _probe(self) -> bool:
        if not processes.port_accepts(self._port):
            return False
        try:
            cluster = run_sync(self._describe_cluster)
        except Exception:  # not answering metadata requests yet
            return False
        return bool(cluster.get("brokers"))

    async def _describe_cluster(self) -> dict[str, Any]:
        from aiokafka.admin import AIOKafkaAdminClient

        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=5000)
        await admin.start()
        try:
            cluster: dict[str, Any] = await admin.describe_cluster()
            return cluster
        finally:
            await admin.close()

    def wait_ready(self, timeout_s: float | None = None) -> None:
        """Wait until the broker answers metadata requests, then ensure Pulse's topics exist."""
        started = time.monotonic()
        super().wait_ready(timeout_s)
        left = (timeout_s or self.start_timeout_s) - (time.monotonic() - started)
        self.create_topics(self.kafka.topics, self.kafka.partitions, timeout_s=max(left, 10.0))

    def create_topics(
        self, names: list[str], partitions: int | None = None, timeout_s: float = 30.0
    ) -> None:
        """Create ``names`` (existing ones are fine); wait until every partition has a leader."""
        count = partitions or self.kafka.partitions
        run_sync(lambda: self._create_topics(names, count, timeout_s))

    async def _create_topics(self, names: list[str], partitions: int, timeout_s: float) -> None:
        from aiokafka.admin import AIOKafkaAdminClient, NewTopic

        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=10000)
        await admin.start()
        try:
            existing = set(await admin.list_topics())
            missing = [n for n in names if n not in existing]
            if missing:
                response = await admin.create_topics(
                    [NewTopic(n, num_partitions=partitions, replication_factor=1) for n in missing]
                )
                for topic, code, *_ in response.topic_errors:
                    if code not in (0, TOPIC_ALREADY_EXISTS):
                        raise StackError(f"Creating Kafka topic {topic} failed (error {code}).")
            deadline = time.monotonic() + timeout_s
            while not _all_led(await admin.describe_topics(names), names):
                if time.monotonic() >= deadline:
                    raise StartupError(f"Kafka topics {names} got no partition leaders in time.")
                await asyncio.sleep(0.1)
        finally:
            await admin.close()


def _all_led(described: list[dict[str, Any]], names: list[str]) -> bool:
    by_name = {t["topic"]: t for t in described}
    for name in names:
        topic = by_name.get(name)
        if topic is None or topic["error_code"] != 0 or not topic["partitions"]:
            return False
        if any(p["error_code"] != 0 or p["leader"] < 0 for p in topic["partitions"]):
            return False
    return True
