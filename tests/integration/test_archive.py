"""``pulse archive`` on a real stack: every valid event archived exactly once across a SIGKILL.

Two load generator runs with bad and late records: one pre-produced over two hours of event time
(flushes span hours), one in real time while the archive runs. The archive is SIGKILLed while
the second still produces (so mid-run), restarted, and stopped once its markers reach the end of
every input partition. The committed files must then hold the truth's valid events (on-time
and late) per kind and partition, each (partition, offset) once, the offsets Kafka holds valid
records at, and no temporary file. A third run, after one marker is damaged, refuses that
partition and reports it in its counters.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest

from pipeline.archive.layout import parse_file, progress_path
from pipeline.archive.storage import ArchiveStore
from pipeline.settings import WorkerSettings
from pipeline.stack.testing import RunningStack, stop_child
from pipeline.validation import TimeBounds, decode_applog, decode_sensor
from schemas.events import EventKind
from tests.integration.harness import Pipeline, wait_for

pytestmark = pytest.mark.integration


def start_archive(pl: Pipeline, url: str, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "archive", f"--url={url}", "--max-rows=700",
             "--max-seconds=0.5", "--loglevel=info"],
            env=pl.env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )  # fmt: skip


def archived_rows(store: ArchiveStore) -> int:
    return sum(e.rows for e in store.extent().values())


def valid_offsets(pl: Pipeline, kind: EventKind) -> set[tuple[int, int]]:
    """(partition, offset) of every record of the kind's topic that validates now."""
    w = WorkerSettings()
    bounds = TimeBounds(int(w.max_event_age_s * 1000), int(w.max_clock_skew_s * 1000))
    now_ms = time.time_ns() // 1_000_000
    by_part: dict[int, list[Any]] = {}
    for msg in pl.read_topic(kind.value):
        by_part.setdefault(msg.partition, []).append(msg)
    decode = decode_sensor if kind is EventKind.SENSOR else decode_applog
    out = set()
    for p, msgs in by_part.items():
        decoded = decode([m.value for m in msgs], now_ms, bounds)
        out |= {(p, msgs[i].offset) for i in decoded.positions}
    return out


def test_archive_holds_every_valid_event_once_across_a_sigkill(
    stack: RunningStack, tmp_path: Path
) -> None:
    pl = Pipeline.create(stack, tmp_path, PULSE_ARCHIVE_GROUP_ID=f"archive-{uuid.uuid4().hex[:8]}")
    url = str(tmp_path / "archive")
    store = ArchiveStore(url)
    truths = [
        pl.loadgen(
            "--rate=0", "--sim-rate=8", "--duration=7200", "--devices=30", "--services=3",
            "--seed=5", "--bad-rate=0.02", "--late-rate=0.02", "--anomaly-rate=0",
        )
    ]  # fmt: skip
    truth2 = tmp_path / "truth-live.json"
    live = pl.start_loadgen(
        "--rate=1500", "--duration=20", "--devices=30", "--services=3", "--seed=6",
        "--bad-rate=0.02", "--late-rate=0.02", "--anomaly-rate=0", truth=truth2,
    )  # fmt: skip
    first = start_archive(pl, url, tmp_path / "archive-1.log")
    try:
        wait_for(lambda: archived_rows(store) > 0, "the archive committed a flush", 120,
                 alive=lambda: first.poll() is None)  # fmt: skip
        assert live.alive(), "the live load generator ended before the kill: not mid-run"
        first.send_signal(signal.SIGKILL)
        first.wait(30)
        at_kill = archived_rows(store)
        # what a reader sees right after the crash: committed files only, no duplicate
        for kind in EventKind:
            t = store.read_range(kind, 0, 2**62, ["partition", "offset"])
            seen = list(zip(t["partition"].to_pylist(), t["offset"].to_pylist(), strict=True))
            assert len(seen) == len(set(seen))
        live.wait()
    finally:
        live.stop()
        if first.poll() is None:
            first.kill()
            first.wait(30)
    truths.append(pl.truth(truth2))

    ends = pl.end_offsets()
    second_log = tmp_path / "archive-2.log"
    second = start_archive(pl, url, second_log)
    try:

        def caught_up() -> bool:
            ext = store.extent()
            for kind in EventKind:
                topic = pl.topics[kind.value]
                for p in range(stack.kafka_settings.partitions):
                    if ext[kind].last_offsets.get(p, -1) < ends[(topic, p)] - 1:
                        return False
            return True

        wait_for(caught_up, "the archive reached the end of every partition", 180,
                 alive=lambda: second.poll() is None)  # fmt: skip
    finally:
        code = stop_child(second)
    log_text = second_log.read_text(errors="replace")
    assert code == 0, log_text[-3000:]
    counters = orjson.loads(log_text.strip().splitlines()[-1])

    total_valid = 0
    for kind in EventKind:
        k = kind.value
        table = store.read_range(kind, 0, 2**62)
        pairs = Counter(
            zip(table["partition"].to_pylist(), table["offset"].to_pylist(), strict=True)
        )
        assert pairs and max(pairs.values()) == 1, f"{k}: a (partition, offset) archived twice"
        per_part = Counter(p for p, _ in pairs)
        for p in range(stack.kafka_settings.partitions):
            want = sum(
                t["per_partition"][k][str(p)]["events"] + t["per_partition"][k][str(p)]["late"]
                for t in truths
            )
            assert per_part.get(p, 0) == want, (k, p)
        assert set(pairs) == valid_offsets(pl, kind), k
        total_valid += len(pairs)
        assert table.num_rows == sum(t["events"][k] + t["late"][k] for t in truths)
        assert sum(t["dead"][k] for t in truths) > 20  # bad records were in the run

    assert 0 < at_kill < total_valid, "the kill did not happen mid-run"
    assert store.temporaries() == []
    on_disk = [parse_file(p) for p in store._find("sensor") + store._find("applog")]
    assert all(ref is not None for ref in on_disk)  # nothing else (an uncommitted file, a tmp)
    segments = Counter((r.kind, r.partition, r.first) for r in on_disk if r is not None)
    assert max(segments.values()) > 1, "no flush spanned two event-time hours"
    assert counters["archived"] == total_valid - at_kill
    assert counters["refused"] == {}
    print(f"\narchive counters after the restart: {counters}")

    # a marker that cannot be read: that partition is refused, and the run's counters say so
    marker = Path(url) / progress_path(EventKind.SENSOR, 0)
    marker.write_bytes(b"{not json")
    third_log = tmp_path / "archive-3.log"
    third = start_archive(pl, url, third_log)
    try:
        wait_for(lambda: "refusing" in third_log.read_text(errors="replace"),
                 "the archive refused the partition of the damaged marker", 120,
                 alive=lambda: third.poll() is None)  # fmt: skip
    finally:
        code = stop_child(third)
    log_text = third_log.read_text(errors="replace")
    assert code == 0, log_text[-3000:]
    refused = orjson.loads(log_text.strip().splitlines()[-1])["refused"]
    assert list(refused) == [f"{pl.topics['sensor']}/0"], refused
    assert refused[f"{pl.topics['sensor']}/0"].startswith(
        f"the archive marker {marker} cannot be read"
    )
