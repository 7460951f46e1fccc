"""The raw-event archive: names, grouping into hour files, the seek rule and crash recovery.

Crash recovery is checked at every point of a flush: a filesystem that fails its N-th write
stands for a process killed there; a fresh archiver on the same files then recovers, re-reads
from where its markers say, and the committed files must hold every valid event exactly once.
"""

from __future__ import annotations

import asyncio
import itertools
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from pipeline.archive.command import Archiver
from pipeline.archive.layout import (
    HOUR_MS,
    FileRef,
    PartitionBuffer,
    Progress,
    event_table,
    hour_dir,
    hours,
    is_tmp,
    parse_file,
    progress_path,
    schema,
    split_by_hour,
    tmp_path,
)
from pipeline.archive.storage import ArchiveError, ArchiveStore, MarkerError
from pipeline.batch import RawRecord, Record
from pipeline.cli import main
from pipeline.settings import ArchiveSettings
from pipeline.validation import TimeBounds
from schemas.events import EventKind

T0 = 1_795_860_000_000  # 2026-11-28T10:00:00Z
BOUNDS = TimeBounds(max_age_ms=10**13, max_skew_ms=10**13)


def sensor_json(t: int, device: str = "d1", value: float = 1.5) -> bytes:
    return orjson.dumps(
        {"device_id": device, "site": "s1", "event_time": t, "metric": "temp", "value": value,
         "unit": "C", "lat": 1.0, "lon": 2.0, "firmware": "1.0"}
    )  # fmt: skip


# --------------------------------------------------------------------------------- names


def test_file_names_carry_kind_partition_hour_and_offsets() -> None:
    ref = FileRef(EventKind.SENSOR, 3, T0 + 3 * HOUR_MS, 1200, 1899)
    assert ref.path == "sensor/date=2026-11-28/hour=13/p3-000000001200-000000001899.parquet"
    assert parse_file(ref.path) == ref
    big = FileRef(EventKind.APPLOG, 11, T0 - 10 * HOUR_MS, 10**13, 10**13 + 5)
    assert parse_file(big.path) == big  # offsets beyond the padding still parse


@pytest.mark.parametrize(
    "path",
    [
        tmp_path("sensor/date=2026-11-28/hour=13/p3-000000001200-000000001899.parquet"),
        "sensor/date=2026-11-28/hour=24/p3-1-2.parquet",
        "sensor/date=2026-13-28/hour=01/p3-1-2.parquet",
        "other/date=2026-11-28/hour=01/p3-1-2.parquet",
        "_progress/sensor/p3.json",
        "sensor/date=2026-11-28/hour=01/p3-1-2.parquet.tmp",
    ],
)
def test_anything_else_is_not_an_archive_file(path: str) -> None:
    assert parse_file(path) is None


def test_temporaries_are_hidden_beside_their_file() -> None:
    t = tmp_path("sensor/date=2026-11-28/hour=13/p3-1-2.parquet")
    assert t == "sensor/date=2026-11-28/hour=13/.p3-1-2.parquet.tmp"
    assert is_tmp(t) and not is_tmp("sensor/date=2026-11-28/hour=13/p3-1-2.parquet")
    assert tmp_path("_progress/applog/p0.json") == "_progress/applog/.p0.json.tmp"


def test_hours_and_directories() -> None:
    assert hour_dir(EventKind.APPLOG, T0) == "applog/date=2026-11-28/hour=10"
    assert hours(T0 + 1, T0 + 2 * HOUR_MS) == [T0, T0 + HOUR_MS]
    assert hours(T0, T0 + 2 * HOUR_MS + 1) == [T0, T0 + HOUR_MS, T0 + 2 * HOUR_MS]
    assert hours(T0, T0) == []


# ------------------------------------------------------------------------------ grouping


def table(offsets: list[int], times: list[int], partition: int = 3) -> pa.Table:
    from schemas.wire import SENSOR_DECODER

    events = [
        SENSOR_DECODER.decode(sensor_json(t, f"d{o % 3}"))
        for o, t in zip(offsets, times, strict=False)
    ]
    return event_table(EventKind.SENSOR, partition, offsets, events)


def test_a_flush_over_several_hours_writes_one_file_per_hour_under_one_segment() -> None:
    times = [T0 + 5, T0 + HOUR_MS + 1, T0 + 7, T0 + 2 * HOUR_MS, T0 + HOUR_MS + 9]
    seg = split_by_hour(EventKind.SENSOR, 3, 100, 112, table([100, 101, 104, 110, 111], times))
    got = {ref.hour_ms: t.column("offset").to_pylist() for ref, t in seg.files}
    assert got == {T0: [100, 104], T0 + HOUR_MS: [101, 111], T0 + 2 * HOUR_MS: [110]}
    refs = [ref for ref, _ in seg.files]
    assert {(r.first, r.last) for r in refs} == {(100, 112)}  # the segment, not the rows
    assert len({r.path for r in refs}) == 3
    for _, t in seg.files:
        assert t.schema == schema(EventKind.SENSOR)
        assert pa.types.is_dictionary(t.schema.field("device_id").type)
    assert (seg.rows, seg.min_event_time, seg.max_event_time) == (5, T0 + 5, T0 + 2 * HOUR_MS)


def test_the_buffer_cuts_segments_at_max_rows_and_skips_what_it_read() -> None:
    buf = PartitionBuffer(EventKind.SENSOR, 3, next_offset=100)
    buf.add(104, table([100, 102, 104], [T0, T0, T0]), now=1.0)  # 101, 103 invalid
    buf.add(108, table([105, 106, 107], [T0, T0, T0]), now=2.0)  # 108 invalid
    assert buf.fresh_from([103, 104, 108, 109]) == 3
    assert not buf.due(max_rows=10, max_seconds=5.0, now=5.9)
    assert buf.due(max_rows=10, max_seconds=5.0, now=6.0)
    assert buf.due(max_rows=4, max_seconds=5.0, now=1.0)
    seg = buf.take(max_rows=4)
    assert seg is not None and (seg.first, seg.last, seg.rows) == (100, 105, 4)
    assert (buf.next_offset, buf.read_to, buf.rows, buf.since) == (106, 108, 2, 2.0)
    seg = buf.take(max_rows=4)
    assert seg is not None and (seg.first, seg.last, seg.rows) == (106, 108, 2)
    assert buf.take(max_rows=4) is None and buf.since is None


def test_a_range_of_invalid_records_only_advances_the_marker() -> None:
    buf = PartitionBuffer(EventKind.SENSOR, 0, next_offset=0)
    buf.add(4, table([], []), now=0.0)
    seg = buf.take(10)
    assert seg is not None and (seg.first, seg.last, seg.files) == (0, 4, [])


# --------------------------------------------------------------- seek rule and recovery


class Crash(Exception):
    """The process died here."""


class CrashingFS(MemoryFileSystem):  # type: ignore[misc]
    """A memory filesystem of its own that dies at its N-th write, rename or delete."""

    cachable = False

    def __init__(self, crash_at: int | None) -> None:
        super().__init__()
        self.store: dict[str, Any] = {}  # not the class-wide store of MemoryFileSystem
        self.pseudo_dirs = [""]
        self.crash_at = crash_at
        self.ops = 0

    def _tick(self) -> None:
        self.ops += 1
        if self.crash_at is not None and self.ops == self.crash_at:
            raise Crash(self.ops)

    def pipe_file(self, path: str, value: bytes, **kw: Any) -> None:
        self._tick()
        super().pipe_file(path, value, **kw)

    def mv(self, path1: str, path2: str, **kw: Any) -> None:
        self._tick()
        super().mv(path1, path2, **kw)

    def rm(self, path: str, **kw: Any) -> None:
        self._tick()
        super().rm(path, **kw)


def kafka_log() -> dict[int, list[Record]]:
    """Two partitions; events over three hours, out of order near the boundaries; bad ones."""
    out: dict[int, list[Record]] = {0: [], 1: []}
    for p in (0, 1):
        for o in range(40):
            t = T0 + (o * 4 * HOUR_MS) // 40 - (HOUR_MS // 2 if o % 7 == 3 else 0)
            value = b"{not json" if o % 11 == 5 else sensor_json(t, f"d{o % 4}", o + p / 10)
            out[p].append(Record(o, None, value))
    return out


def valid_offsets(log: dict[int, list[Record]]) -> set[tuple[int, int]]:
    return {(p, r.offset) for p, rs in log.items() for r in rs if r.value != b"{not json"}


async def run_archiver(fs: Any, log: dict[int, list[Record]], poll: int, max_rows: int) -> Archiver:
    """Assign both partitions, poll from the markers' offsets (as Kafka would), stop."""
    archiver = Archiver(
        ArchiveStore("/arch", fs=fs), {EventKind.SENSOR: "t.sensor"}, BOUNDS, max_rows, 1e9
    )
    archiver.forget()
    states = await archiver.load_progress(EventKind.SENSOR, [0, 1])
    pos = {p: states[p].offset + 1 for p in (0, 1)}
    # Kafka's committed offsets are only a hint: re-deliver a few records before the marker
    pos = {p: max(0, o - 3) for p, o in pos.items()}
    while any(pos[p] < len(log[p]) for p in (0, 1)):
        batch: dict[int, list[RawRecord]] = {
            p: list(log[p][pos[p] : pos[p] + poll]) for p in (0, 1) if pos[p] < len(log[p])
        }
        await archiver.handle({EventKind.SENSOR: batch})
        pos = {p: pos[p] + poll for p in (0, 1)}
    await archiver.stop()
    return archiver


def archived(store: ArchiveStore) -> Counter[tuple[int, int]]:
    t = store.read_range(EventKind.SENSOR, 0, 2**62, ["partition", "offset"])
    return Counter(
        zip(t.column("partition").to_pylist(), t.column("offset").to_pylist(), strict=False)
    )


def count_ops(log: dict[int, list[Record]]) -> int:
    fs = CrashingFS(None)
    asyncio.run(run_archiver(fs, log, poll=7, max_rows=9))
    return int(fs.ops)


def test_a_crash_at_any_write_leaves_no_duplicate_and_a_restart_completes_the_archive() -> None:
    log = kafka_log()
    want = valid_offsets(log)
    total_ops = count_ops(log)
    assert total_ops > 40
    for crash_at in range(1, total_ops + 1):
        fs = CrashingFS(crash_at)
        with pytest.raises(Crash):
            asyncio.run(run_archiver(fs, log, poll=7, max_rows=9))
        store = ArchiveStore("/arch", fs=fs)
        seen_before = archived(store)  # what a reader sees after the crash: committed only
        assert all(n == 1 for n in seen_before.values()) and set(seen_before) <= want, crash_at
        fs.crash_at = None
        archiver = asyncio.run(run_archiver(fs, log, poll=5, max_rows=9))
        seen = archived(store)
        assert set(seen) == want and all(n == 1 for n in seen.values()), crash_at
        assert store.temporaries() == [], crash_at
        # every file on the filesystem is committed (nothing a crashed flush left)
        on_disk = [parse_file(p) for p in store._find("sensor")]
        markers = store.markers(EventKind.SENSOR)
        assert all(r is not None and markers[r.partition].committed(r) for r in on_disk)
        assert archiver.counters.archived + len(seen_before) == len(want), crash_at


def test_seek_rule_one_past_the_highest_archived_offset() -> None:
    log = kafka_log()
    fs = CrashingFS(None)
    asyncio.run(run_archiver(fs, log, poll=7, max_rows=9))
    store = ArchiveStore("/arch", fs=fs)
    for p in (0, 1):
        progress = store.load(EventKind.SENSOR, p)
        refs = [r for r in map(parse_file, store._find("sensor")) if r and r.partition == p]
        assert progress.last_offset == 39 == max(r.last for r in refs)
        assert progress.resume_at() == 40
        assert progress.topic == "t.sensor" and not progress.pending
    ext = store.extent()[EventKind.SENSOR]
    assert ext.rows == len(valid_offsets(log)) and ext.last_offsets == {0: 39, 1: 39}
    assert ext.min_event_time is not None and ext.min_event_time < T0
    assert store.extent()[EventKind.APPLOG].rows == 0


def test_segments_spanning_hours_tile_the_offsets() -> None:
    """Several files share a segment; the segments of a partition tile its offsets."""
    log = kafka_log()
    fs = CrashingFS(None)
    asyncio.run(run_archiver(fs, log, poll=7, max_rows=9))
    store = ArchiveStore("/arch", fs=fs)
    refs = [r for r in map(parse_file, store._find("sensor")) if r is not None]
    segs: dict[int, set[tuple[int, int]]] = {0: set(), 1: set()}
    per_seg = Counter((r.partition, r.first, r.last) for r in refs)
    assert max(per_seg.values()) > 1  # some flush did span hours
    for r in refs:
        segs[r.partition].add((r.first, r.last))
    for _p, ranges in segs.items():
        ordered = sorted(ranges)
        assert ordered[0][0] == 0
        for (_, last), (first, _) in itertools.pairwise(ordered):
            assert first > last  # disjoint (gaps: segments of invalid records only)


def test_uncommitted_files_are_invisible_and_deleted_on_recovery() -> None:
    fs = CrashingFS(None)
    store = ArchiveStore("/arch2", fs=fs)
    seg = split_by_hour(
        EventKind.SENSOR, 0, 0, 2, table([0, 1, 2], [T0, T0 + HOUR_MS, T0 + 1], partition=0)
    )
    store.write_segment(seg, Progress(topic="t"))
    seg2 = split_by_hour(EventKind.SENSOR, 0, 3, 4, table([3, 4], [T0 + 2, T0 + 3], partition=0))
    # a flush that died after its intent and its file, before the commit
    intent = store.load(EventKind.SENSOR, 0)
    intent.pending = [seg2.files[0][0].path]
    store._put(progress_path(EventKind.SENSOR, 0), intent.to_json())
    store._put(seg2.files[0][0].path, b"half a file")
    t = store.read_range(EventKind.SENSOR, T0, T0 + 2 * HOUR_MS)
    assert t.column("offset").to_pylist() == [0, 1, 2]
    assert store.read_range(EventKind.SENSOR, T0 + 1, T0 + HOUR_MS).column(
        "offset"
    ).to_pylist() == [2]
    recovered = store.recover(EventKind.SENSOR, 0)
    assert recovered.last_offset == 2 and not recovered.pending
    assert not fs.exists("/arch2/" + seg2.files[0][0].path)
    with pytest.raises(ValueError, match="segment starts at 0"):
        store.write_segment(seg, recovered)  # a range already archived is never written again


@pytest.mark.parametrize(
    "marker", [b"{not json", b"[1, 2]", b'{"rows": 3}', b'{"last_offset": "x"}']
)
def test_a_damaged_marker_refuses_its_partition_and_the_others_are_archived(
    marker: bytes,
) -> None:
    """What the archive holds of that partition is unknown: re-archiving it from Kafka's start
    or its committed offset would guess, so it waits for an operator (one sentence, naming
    the file); the other partitions go on."""
    fs = CrashingFS(None)
    log = kafka_log()
    asyncio.run(run_archiver(fs, log, poll=7, max_rows=9))
    store = ArchiveStore("/arch", fs=fs)
    path = "/arch/" + progress_path(EventKind.SENSOR, 0)
    fs.pipe_file(path, marker)
    with pytest.raises(MarkerError, match=f"the archive marker {path} cannot be read"):
        store.load(EventKind.SENSOR, 0)
    archiver = Archiver(store, {EventKind.SENSOR: "t.sensor"}, BOUNDS, 9, 1e9)
    states = asyncio.run(archiver.load_progress(EventKind.SENSOR, [0, 1]))
    refused = states[0].refuse
    assert refused is not None and refused.startswith(f"the archive marker {path} cannot be read")
    assert refused.endswith(
        "restore it, or delete it with the partition's files to archive the partition again"
    )
    assert states[1].refuse is None and states[1].offset == len(log[1]) - 1


def test_a_damaged_file_is_one_archive_error_for_its_readers() -> None:
    fs = CrashingFS(None)
    asyncio.run(run_archiver(fs, kafka_log(), poll=7, max_rows=9))
    store = ArchiveStore("/arch", fs=fs)
    victim = store.files(EventKind.SENSOR, 0, 2**62)[0]
    fs.pipe_file("/arch/" + victim.path, b"not parquet")
    with pytest.raises(ArchiveError, match=r"^the archive at /arch cannot be read: "):
        store.read_range(EventKind.SENSOR, 0, 2**62)


def test_local_archive_round_trip(tmp_path: Path) -> None:
    store = ArchiveStore(str(tmp_path / "a"))
    seg = split_by_hour(EventKind.SENSOR, 2, 0, 1, table([0, 1], [T0, T0 + 5], partition=2))
    store.write_segment(seg, Progress(topic="t"))
    assert store.local and store.temporaries() == []
    from pipeline.archive.storage import extent, read_range

    t = read_range(str(tmp_path / "a"), EventKind.SENSOR, T0, T0 + 5)
    assert t.num_rows == 1 and t.schema == schema(EventKind.SENSOR)
    assert extent(str(tmp_path / "a"))[EventKind.SENSOR].max_event_time == T0 + 5
    with pytest.raises(ValueError, match="no column 'nope'"):
        store.read_range(EventKind.SENSOR, T0, T0 + 5, ["nope"])
    assert read_range(f"file://{tmp_path}/a", EventKind.SENSOR, T0, T0 + 6).num_rows == 2
    assert ArchiveStore("memory://pulse-unit-archive").fs.protocol in ("memory", ("memory",))


# ---------------------------------------------------------------------------------- CLI


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--max-rows", "0"], "pulse archive: Argument --max-rows: must be within [1, 10000000]"),
        (["--max-rows", "x"], "pulse archive: Argument --max-rows: expected a whole number"),
        (["--max-seconds", "-1"], "--max-seconds: must be within (0, 86400] seconds"),
        (["--max-seconds", "1e10"], "--max-seconds: must be within (0, 86400] seconds"),
        (["--max-rows", "99999999999"], "--max-rows: must be within [1, 10000000]"),
        (["--url="], "--url: expected a path or an fsspec URL"),
        (["--bogus"], "pulse archive: Unrecognized arguments: --bogus."),
    ],
)
def test_bad_flags_are_one_sentence(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["archive", *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count(".\n") <= 2


@pytest.mark.parametrize(
    ("url", "said"),
    [
        ("nosuchproto://x", "Protocol not known: nosuchproto."),
        ("{tmp}/a-file/archive", "Not a directory"),
        ("::::", "a chained URL (A::B) has an empty link"),
        ("file::", "a chained URL (A::B) has an empty link"),
    ],
)
def test_an_archive_it_cannot_write_is_said_before_waiting_for_kafka(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    url: str,
    said: str,
) -> None:
    from pipeline import ingest

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("the archive waited for Kafka before checking its own settings")

    monkeypatch.setattr(ingest, "wait_for_kafka", never)
    (tmp_path / "a-file").write_text("")
    url = url.format(tmp=tmp_path)
    assert main(["archive", "--url", url]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"pulse archive: cannot use the archive at {url}: ")
    assert said in err[0]


def test_the_archive_waits_for_kafka_as_the_worker_does(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Started before Kafka answers, the archive waits and says so (the worker's helper);
    a Kafka it cannot use is one sentence and exit status 2, with nothing archived."""
    from pipeline import ingest

    def waits(kafka: object, say: Any, retry_s: float = 1.0) -> str | None:
        say("waiting for Kafka at k:9 (KafkaConnectionError: down)")
        return "cannot use Kafka at k:9: RuntimeError: unsupported"

    monkeypatch.setattr(ingest, "wait_for_kafka", waits)
    assert main(["archive", "--url", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert err == (
        "pulse archive: waiting for Kafka at k:9 (KafkaConnectionError: down)\n"
        "pulse archive: cannot use Kafka at k:9: RuntimeError: unsupported.\n"
    )
    assert not any((tmp_path / "a").rglob("*"))  # its directory is made (checked), empty


def test_settings(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("PULSE_HOME", "/tmp/ph")
    assert ArchiveSettings().resolved_url() == "/tmp/ph/archive"
    monkeypatch.setenv("PULSE_ARCHIVE_URL", "s3://b/pulse")
    assert ArchiveSettings().resolved_url() == "s3://b/pulse"
    monkeypatch.setenv("PULSE_ARCHIVE_MAX_ROWS", "0")
    assert main(["archive", "--help"]) == 2
    assert capsys.readouterr().err.startswith("pulse archive: PULSE_ARCHIVE_MAX_ROWS: ")


def test_the_command_module_stays_light() -> None:
    code = (
        "import sys, pipeline.archive.command; "
        "print(sorted(m for m in ('pyarrow', 'fsspec', 'aiokafka') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
