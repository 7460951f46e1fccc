"""The archive's one I/O point: Parquet files and progress markers on a local path or fsspec URL.

Writes follow :mod:`pipeline.archive.layout`: a flush records its intent in the partition's
marker, writes each file under a temporary name and renames it, then commits the marker.
Every write goes to a temporary name first and is renamed: ``os.replace`` (atomic, after an
``fsync`` of the file, and of the directory after the rename) on a local path, ``fs.mv`` on
other filesystems (on object stores a put is atomic anyway; ``mv`` is copy + delete there).

Reading: :func:`read_range` (the events of a kind in ``[t1, t2)``, from the committed files of
the hours the range meets) and :func:`extent` (what the archive holds, from the markers alone).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from pipeline.archive.layout import (
    PROGRESS_DIR,
    FileRef,
    Progress,
    Segment,
    advanced,
    date_dir,
    days,
    hours,
    is_tmp,
    parse_file,
    progress_path,
    schema,
    tmp_path,
)
from schemas.errors import first_line
from schemas.events import EventKind

# Rows per Parquet row group: a range read skips whole row groups by their event-time statistics.
ROW_GROUP_ROWS = 64 * 1024


@dataclass(frozen=True, slots=True)
class KindExtent:
    """What the archive holds of one event kind (from the progress markers)."""

    min_event_time: int | None  # epoch ms; None: no event archived
    max_event_time: int | None
    rows: int
    files: int
    last_offsets: dict[int, int]  # partition -> every offset up to it is archived


class ArchiveStore:
    """An archive on one filesystem (``url``: a local path or any fsspec URL)."""

    def __init__(self, url: str, fs: Any = None) -> None:
        if fs is None:
            if "::" in url and not all(part.strip() for part in url.split("::")):
                # fsspec would read the empty links of a chain (A::B) as the working directory
                raise ArchiveError(
                    f"cannot use the archive at {url}: a chained URL (A::B) has an empty link"
                )
            try:
                fs, root = fsspec.core.url_to_fs(url)
            except (ImportError, ValueError) as exc:  # unknown protocol, package not installed
                why = first_line(exc).rstrip(".")
                raise ArchiveError(f"cannot use the archive at {url}: {why}") from None
        else:
            root = url
        self.fs = fs
        self.root = str(root).rstrip("/")
        self.local = isinstance(fs, LocalFileSystem)
        self._dirs: set[str] = set()

    def abs(self, rel: str) -> str:
        """A relative archive path on the filesystem."""
        return f"{self.root}/{rel}"

    # -- markers --------------------------------------------------------------------------

    def load(self, kind: EventKind, partition: int) -> Progress:
        """The partition's marker (a fresh one if none was written); :class:`MarkerError`."""
        path = self.abs(progress_path(kind, partition))
        try:
            data = self.fs.cat_file(path)
        except FileNotFoundError:
            return Progress()
        return _marker(path, data)

    def recover(self, kind: EventKind, partition: int) -> Progress:
        """Undo what a crashed flush of the partition left, and return its committed marker.

        Deletes the pending files (whole or not) and every temporary the flush and the marker
        may have left; rewrites the marker without the pending paths.
        """
        path = progress_path(kind, partition)
        self._remove(tmp_path(path))
        progress = self.load(kind, partition)
        if progress.pending:
            for rel in progress.pending:
                self._remove(tmp_path(rel))
                self._remove(rel)
            progress.pending = []
            self._put(path, progress.to_json())
        return progress

    def write_segment(self, segment: Segment, progress: Progress) -> Progress:
        """Write a flush's files and commit it; returns the new marker.

        ``progress`` is the partition's committed marker; the segment must follow it.
        """
        if segment.first != progress.last_offset + 1:
            raise ValueError(
                f"{segment.kind.value} partition {segment.partition}: segment starts at "
                f"{segment.first}, the archive holds up to {progress.last_offset}"
            )
        path = progress_path(segment.kind, segment.partition)
        if segment.files:
            intent = Progress(
                **{**_fields(progress), "pending": [r.path for r, _ in segment.files]}
            )
            self._put(path, intent.to_json())
            for ref, table in segment.files:
                self._put(ref.path, _parquet(ref, table, progress.topic))
        done = advanced(progress, segment)
        self._put(path, done.to_json())
        return done

    # -- reading --------------------------------------------------------------------------

    def markers(self, kind: EventKind) -> dict[int, Progress]:
        """Every partition's marker of a kind."""
        out: dict[int, Progress] = {}
        base = self.abs(f"{PROGRESS_DIR}/{kind.value}")
        try:
            names = self.fs.ls(base, detail=False)
        except FileNotFoundError:
            return out
        for full in names:
            name = str(full).rstrip("/").rpartition("/")[2]
            if name.startswith("p") and name.endswith(".json") and name[1:-5].isdigit():
                out[int(name[1:-5])] = _marker(str(full), self.fs.cat_file(full))
        return out

    def files(self, kind: EventKind, t1: int, t2: int) -> list[FileRef]:
        """The committed files of the hours that meet ``[t1, t2)``, by hour, partition, offset."""
        markers = self.markers(kind)
        # only the hours the archive holds events of (the markers know): a wide range costs
        # no more than the archive's own span
        lo = [m.min_event_time for m in markers.values() if m.min_event_time is not None]
        hi = [m.max_event_time for m in markers.values() if m.max_event_time is not None]
        if not lo or not hi:
            return []
        t1, t2 = max(t1, min(lo)), min(t2, max(hi) + 1)
        wanted = set(hours(t1, t2))
        refs = []
        for day in days(t1, t2):
            for rel in self._find(date_dir(kind, day)):
                ref = parse_file(rel)
                if ref is None or ref.hour_ms not in wanted:
                    continue
                marker = markers.get(ref.partition)
                if marker is not None and marker.committed(ref):
                    refs.append(ref)
        return sorted(refs, key=lambda r: (r.hour_ms, r.partition, r.first))

    def read_range(
        self, kind: EventKind, t1: int, t2: int, columns: Sequence[str] | None = None
    ) -> pa.Table:
        """The archived events of ``kind`` with ``t1 <= event_time < t2`` (epoch ms).

        Columns as :func:`pipeline.archive.layout.schema` (or the ones named), rows ordered by
        partition and offset: each partition's events in the order Kafka held them.
        """
        want = list(columns) if columns is not None else schema(kind).names
        unknown = [c for c in want if c not in schema(kind).names]
        if unknown:
            raise ValueError(f"no column {unknown[0]!r} in the {kind.value} archive")
        read = list(dict.fromkeys([*want, "partition", "offset"]))
        refs = self.files(kind, t1, t2)
        if not refs:
            return schema(kind).empty_table().select(want)
        paths = [self.abs(r.path) for r in refs]
        fs: Any = None
        if not self.local:
            from pyarrow.fs import FSSpecHandler, PyFileSystem

            fs = PyFileSystem(FSSpecHandler(self.fs))
        try:
            table = pq.read_table(
                paths,
                columns=read,
                filesystem=fs,
                filters=[("event_time", ">=", t1), ("event_time", "<", t2)],
                partitioning=None,
            )
        except (pa.ArrowException, OSError) as exc:  # a file damaged or replaced since written
            raise ArchiveError(
                f"the archive at {self.root} cannot be read: {first_line(exc)}"
            ) from None
        return table.sort_by([("partition", "ascending"), ("offset", "ascending")]).select(want)

    def extent(self) -> dict[EventKind, KindExtent]:
        """What the archive holds, per kind (from the markers: no file is read)."""
        out = {}
        for kind in EventKind:
            markers = self.markers(kind)
            lo = [m.min_event_time for m in markers.values() if m.min_event_time is not None]
            hi = [m.max_event_time for m in markers.values() if m.max_event_time is not None]
            out[kind] = KindExtent(
                min_event_time=min(lo) if lo else None,
                max_event_time=max(hi) if hi else None,
                rows=sum(m.rows for m in markers.values()),
                files=sum(m.files for m in markers.values()),
                last_offsets={p: m.last_offset for p, m in sorted(markers.items())},
            )
        return out

    def temporaries(self) -> list[str]:
        """Every temporary name under the archive (relative): none once no flush runs."""
        return [rel for rel in self._find("") if is_tmp(rel)]

    # -- filesystem -----------------------------------------------------------------------

    def _find(self, rel_dir: str) -> list[str]:
        base = self.abs(rel_dir) if rel_dir else self.root
        try:
            found = self.fs.find(base)
        except FileNotFoundError:
            return []
        root = self.fs._strip_protocol(self.root).rstrip("/") + "/"
        out = []
        for full in found:
            path = self.fs._strip_protocol(str(full))
            if path.startswith(root):
                out.append(path[len(root) :])
        return out

    def _put(self, rel: str, data: bytes) -> None:
        """Write ``data`` to ``rel`` atomically: a temporary name beside it, then a rename."""
        final, tmp = self.abs(rel), self.abs(tmp_path(rel))
        parent = final.rpartition("/")[0]
        if parent not in self._dirs:
            self.fs.makedirs(parent, exist_ok=True)
            self._dirs.add(parent)
        if not self.local:
            self.fs.pipe_file(tmp, data)
            self.fs.mv(tmp, final)
            return
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        fd = os.open(parent, os.O_RDONLY)
        try:
            os.fsync(fd)  # the rename itself survives a power loss
        finally:
            os.close(fd)

    def _remove(self, rel: str) -> None:
        path = self.abs(rel)
        if self.local:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            return
        if self.fs.exists(path):
            self.fs.rm(path)


def _fields(progress: Progress) -> dict[str, Any]:
    return {name: getattr(progress, name) for name in Progress.__dataclass_fields__}


def _parquet(ref: FileRef, table: pa.Table, topic: str | None) -> bytes:
    """A file's bytes: zstd, dictionary pages, statistics; its segment in the metadata."""
    meta = {
        b"pulse.kind": ref.kind.value.encode(),
        b"pulse.topic": (topic or "").encode(),
        b"pulse.partition": str(ref.partition).encode(),
        b"pulse.first_offset": str(ref.first).encode(),
        b"pulse.last_offset": str(ref.last).encode(),
    }
    sink = pa.BufferOutputStream()
    pq.write_table(
        table.replace_schema_metadata(meta),
        sink,
        compression="zstd",
        row_group_size=ROW_GROUP_ROWS,
        write_statistics=True,
    )
    data: bytes = sink.getvalue().to_pybytes()
    return data


def read_range(
    url: str, kind: EventKind, t1: int, t2: int, columns: Sequence[str] | None = None
) -> pa.Table:
    """The archived events of ``kind`` with ``t1 <= event_time < t2`` (epoch ms), as columns.

    ``url``: the archive (``PULSE_ARCHIVE_URL``, a local path or any fsspec URL). Rows are
    ordered by partition and offset; see :meth:`ArchiveStore.read_range`.
    """
    return ArchiveStore(url).read_range(kind, t1, t2, columns)


class ArchiveError(ValueError):
    """Something the archive holds cannot be read (damaged, or not written by it)."""


class MarkerError(ArchiveError):
    """A partition's marker cannot be read: what the archive holds of it is unknown."""


def _marker(path: str, data: bytes) -> Progress:
    try:
        return Progress.from_json(data)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise MarkerError(
            f"the archive marker {path} cannot be read ({type(exc).__name__}: {exc}): restore "
            "it, or delete it with the partition's files to archive the partition again"
        ) from None


def extent(url: str) -> dict[EventKind, KindExtent]:
    """Which event-time range (and rows, files, offsets) the archive holds, per kind."""
    return ArchiveStore(url).extent()
