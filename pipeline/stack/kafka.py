"""Apache Kafka in KRaft mode, run from the official Maven Central jars: one node, or several
(``PULSE_KAFKA_BROKERS``), each acting as broker and controller.

The jars are fetched once with Maven into ``cache_dir/kafka-<scala>-<version>/libs`` and shared by
every stack home; ``KAFKA_HOME`` (an unpacked Kafka distribution) is used instead when set.

With three or more brokers, Pulse's topics and Kafka's internal ones are replicated three times
and need two in-sync replicas (``min.insync.replicas=2``): with the producers' ``acks=all``, a
record acknowledged to the load generator or the worker survives the loss of any one broker.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import json
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
from pipeline.stack.tls import TlsFiles, tls_files

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


def replication(brokers: int) -> tuple[int, int]:
    """(replication factor, min in-sync replicas) of every topic on ``brokers`` brokers."""
    factor = min(brokers, 3)
    return factor, 2 if factor >= 3 else 1


def broker_ports(kafka: KafkaSettings, stack: StackSettings) -> list[tuple[int, int]]:
    """(client, controller) port of each broker.

    Broker ``i`` serves the ``i``-th server of ``PULSE_KAFKA_BOOTSTRAP`` (or, past the list, the
    first one's port + 2i) and its controller ``PULSE_KAFKA_CONTROLLER_PORTS[i]`` (or
    ``PULSE_KAFKA_CONTROLLER_PORT`` + 2i): the defaults interleave 9092, 9093, 9094, ...
    """
    count = stack.kafka_brokers
    servers = [parse_bootstrap(s)[1] for s in kafka.bootstrap.split(",") if s.strip()]
    if not servers:
        raise StackError("PULSE_KAFKA_BOOTSTRAP names no server.")
    controllers = list(stack.kafka_controller_ports)
    if controllers and len(controllers) < count:
        raise StackError(
            f"PULSE_KAFKA_CONTROLLER_PORTS lists {len(controllers)} ports for {count} brokers."
        )
    return [
        (
            servers[i] if i < len(servers) else servers[0] + 2 * i,
            controllers[i] if controllers else stack.kafka_controller_port + 2 * i,
        )
        for i in range(count)
    ]


def render_server_properties(
    *,
    port: int,
    controller_port: int,
    log_dir: Path,
    partitions: int,
    node_id: int = 1,
    voters: str | None = None,
    brokers: int = 1,
    tls: TlsFiles | None = None,
) -> str:
    """server.properties of a KRaft node acting as broker and controller (``voters``: the
    quorum, ``id@host:port,...``; one node by default; ``tls``: an SSL client listener)."""
    factor, min_isr = replication(brokers)
    listener = "PLAINTEXT" if tls is None else "SSL"
    quorum = voters or f"{node_id}@127.0.0.1:{controller_port}"
    return f"""# Written by `pulse up`; rewritten on every start.
process.roles=broker,controller
node.id={node_id}
controller.quorum.voters={quorum}
listeners={listener}://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}
advertised.listeners={listener}://127.0.0.1:{port}
listener.security.protocol.map={listener}:{listener},CONTROLLER:PLAINTEXT
controller.listener.names=CONTROLLER
inter.broker.listener.name={listener}
log.dirs={log_dir}
num.partitions={partitions}
default.replication.factor={factor}
min.insync.replicas={min_isr}
offsets.topic.replication.factor={factor}
offsets.topic.num.partitions={partitions}
transaction.state.log.replication.factor={factor}
transaction.state.log.min.isr={min_isr}
group.initial.rebalance.delay.ms=0
# One local node: a broker restarted after a crash re-registers only once its previous
# session expired (DUPLICATE_BROKER_REGISTRATION until then); the 9 s default slows restarts.
broker.heartbeat.interval.ms=500
broker.session.timeout.ms=4000
auto.create.topics.enable=false
{ssl_properties(tls) if tls is not None else ""}"""


def ssl_properties(tls: TlsFiles) -> str:
    """The SSL listener's keystore (PEM, Kafka 2.7+) and truststore; clients need certificates.

    The controller listener stays PLAINTEXT on the loopback interface: only the brokers of this
    stack speak to it, and KRaft's controller channel would need the same keystore wiring twice.
    """
    return f"""ssl.keystore.type=PEM
ssl.keystore.location={tls.server_keystore}
ssl.truststore.type=PEM
ssl.truststore.location={tls.ca_cert}
ssl.client.auth=required
"""


#: G1's region size for the broker: a produce request (the load generator's: 1 MB at most) must
#: stay below half a region, or G1 allocates it as a "humongous" object (see broker_jvm_options).
G1_REGION = "4m"


def broker_jvm_options(heap: str) -> list[str]:
    """The broker's JVM flags: Kafka's own (``kafka-server-start.sh``: ``-Xms`` = ``-Xmx``;
    ``kafka-run-class.sh``: G1 with a 20 ms pause goal), and G1 regions of :data:`G1_REGION`.

    The regions are why this is more than Kafka's defaults. Below a 2 GB heap G1 picks 1 MB
    regions, so every request buffer of 512 KB or more (a producer's batches of a few thousand
    records) was a humongous allocation, and past the heap occupancy threshold each one started
    a concurrent mark cycle. Measured on a 2-core machine (a drain, then a paced load at
    60 000 events/s): 299 such allocations and 1.06 s of pauses, the broker at 73–95 % of a
    core for the paced load's first four seconds (15–25 % after), the worker starved, and
    freshness at p99 795 and 402 ms over the first two. With 4 MB regions: 11–17 humongous
    allocations in such a run, and no pause over 15 ms in a full ``pulse bench``.
    """
    return [
        f"-Xms{heap}",
        f"-Xmx{heap}",
        "-XX:+UseG1GC",
        "-XX:MaxGCPauseMillis=20",
        "-XX:InitiatingHeapOccupancyPercent=35",
        "-XX:+ExplicitGCInvokesConcurrent",
        f"-XX:G1HeapRegionSize={G1_REGION}",
    ]


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


CLUSTER_FILE = "kafka-cluster.json"


def formatted_brokers(home: Path) -> int | None:
    """How many brokers the Kafka of the stack home ``home`` was formatted for, if known."""
    try:
        count = json.loads((home / CLUSTER_FILE).read_text()).get("brokers")
    except (OSError, ValueError, AttributeError):
        return None
    return count if isinstance(count, int) and count >= 1 else None


class KafkaService(Service):
    """One broker (``node``: 0, 1, ...); the first one's ``wait_ready`` waits until every
    broker has registered and then creates Pulse's topics (idempotently)."""

    stop_timeout_s = 30.0

    def __init__(self, stack: StackSettings, kafka: KafkaSettings, node: int = 0) -> None:
        self.name = "kafka" if node == 0 else f"kafka-{node + 1}"
        self.label = "the Kafka broker" if stack.kafka_brokers == 1 else f"Kafka broker {node + 1}"
        super().__init__(stack.home, stack.start_timeout_s)
        self.stack = stack
        self.kafka = kafka
        self.node = node
        self.nodes = broker_ports(kafka, stack)
        self._port, self._controller_port = self.nodes[node]

    @property
    def port(self) -> int:
        """The PLAINTEXT (client) port."""
        return self._port

    @property
    def ports(self) -> dict[str, int]:
        """Client and controller ports."""
        return {"port": self._port, "controller_port": self._controller_port}

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
        voters = ",".join(f"{i + 1}@127.0.0.1:{c}" for i, (_, c) in enumerate(self.nodes))
        processes.atomic_write(
            self.config_file,
            render_server_properties(
                port=self._port,
                controller_port=self._controller_port,
                log_dir=self.data_dir,
                partitions=self.kafka.partitions,
                node_id=self.node + 1,
                voters=voters,
                brokers=len(self.nodes),
                tls=self._tls_files(),
            ),
        )
        log4j = self.dir / "log4j.properties"
        processes.atomic_write(log4j, render_log4j(self.log_file))
        base = [java, "-Djava.awt.headless=true", f"-Dlog4j.configuration=file:{log4j}"]
        if not (self.data_dir / "meta.properties").exists():  # format exactly once
            self._format(base, classpath)
        jvm = broker_jvm_options(self.stack.kafka_heap)
        argv = [*base[:1], *jvm, *base[1:], "-cp", classpath,
                "kafka.Kafka", str(self.config_file)]  # fmt: skip
        return argv, str(self.config_file), self.dir / "logs" / "stdout.log"

    def _tls_files(self) -> TlsFiles | None:
        if self.kafka.security_protocol != "SSL":
            return None
        files = tls_files(self.stack.home)
        if not all(p.is_file() for p in files.all()):
            raise StackError(
                f"PULSE_KAFKA_SECURITY_PROTOCOL is SSL but {files.dir} holds no certificates: "
                "start the stack with `pulse up --tls`."
            )
        return files

    def cluster_id(self) -> str:
        """The KRaft cluster id every broker of this home is formatted with (made once).

        A home formatted for another number of brokers is refused: its quorum is fixed.
        """
        path = self.dir.parent / CLUSTER_FILE
        brokers = len(self.nodes)
        with _file_lock(self.dir.parent / f".{CLUSTER_FILE}.lock"):
            try:
                known = json.loads(path.read_text())
            except FileNotFoundError:
                # a home from before this file held one broker, formatted already
                meta = self.dir.parent / "kafka" / "data" / "meta.properties"
                text = meta.read_text() if meta.is_file() else ""
                if found := re.search(r"^cluster\.id=(\S+)", text, re.M):
                    known = {"id": found.group(1), "brokers": 1}
                else:
                    known = {"id": random_cluster_id(), "brokers": brokers}
                processes.atomic_write(path, json.dumps(known) + "\n")
            except ValueError as exc:
                raise StackError(f"{path} is damaged ({exc}); remove the stack home.") from exc
        if known.get("brokers") != brokers:
            raise StackError(
                f"This stack home's Kafka was formatted for {known.get('brokers')} broker(s), "
                f"not {brokers}: run 'pulse down' and use another --home (or remove {path.parent})."
            )
        return str(known["id"])

    def _format(self, base: list[str], classpath: str) -> None:
        argv = [*base, "-cp", classpath, "kafka.tools.StorageTool", "format",
                "-t", self.cluster_id(), "-c", str(self.config_file)]  # fmt: skip
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
        # the first broker is ready once all are: topics need their replicas' brokers
        return len(cluster.get("brokers") or ()) >= (len(self.nodes) if self.node == 0 else 1)

    async def _describe_cluster(self) -> dict[str, Any]:
        from aiokafka.admin import AIOKafkaAdminClient

        admin = AIOKafkaAdminClient(
            bootstrap_servers=self.bootstrap, request_timeout_ms=5000, **self.kafka.client_kwargs()
        )
        await admin.start()
        try:
            cluster: dict[str, Any] = await admin.describe_cluster()
            return cluster
        finally:
            await admin.close()

    def wait_ready(self, timeout_s: float | None = None) -> None:
        """Wait until the broker answers metadata requests; the first broker then ensures that
        Pulse's topics exist."""
        started = time.monotonic()
        super().wait_ready(timeout_s)
        if self.node == 0:
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

        admin = AIOKafkaAdminClient(
            bootstrap_servers=self.bootstrap, request_timeout_ms=10000, **self.kafka.client_kwargs()
        )
        await admin.start()
        try:
            existing = set(await admin.list_topics())
            missing = [n for n in names if n not in existing]
            if missing:
                factor, _ = replication(len(self.nodes))
                response = await admin.create_topics(
                    [NewTopic(n, partitions, replication_factor=factor) for n in missing]
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
