"""Similar-anomaly search: an hnswlib index (cosine) over the anomaly vectors.

The store is the truth. :meth:`SimilarIndex.build` fills an index from a :class:`VectorSource`
(the store's anomalies), :meth:`~SimilarIndex.add` takes anomalies as they arrive,
:meth:`~SimilarIndex.save` / :meth:`~SimilarIndex.load` keep it across restarts and
:meth:`~SimilarIndex.reconcile` brings a loaded index back in line with the store.
:func:`load_or_build` does what a reader does at start: load, reconcile, else rebuild.

Anomaly ids are strings; hnswlib labels are their positions in a list persisted next to the
index (``similar.json``, beside ``similar.hnsw``). An id that leaves the store keeps its label
(marked deleted), so if it comes back it is the same element again.

Vectors that are zero or not finite have no cosine direction: :meth:`~SimilarIndex.add` skips
them and reports their ids in :attr:`Changes.skipped` (one bad record must not stop a build);
:meth:`~SimilarIndex.query` refuses them with :class:`ValueError`.

Every hnswlib call runs under one lock: ``add_items`` is not safe concurrently with
``knn_query``, and the dashboard serves several sessions from threads.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import tempfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final, Protocol, TypeAlias

import hnswlib
import numpy as np
import numpy.typing as npt

from schemas.anomaly import VECTOR_DIM

__all__ = [
    "DEFAULT_EF",
    "DEFAULT_EF_CONSTRUCTION",
    "DEFAULT_M",
    "Changes",
    "IndexFileError",
    "SimilarIndex",
    "UnknownAnomalyError",
    "VectorSource",
    "exact_knn",
    "format_similar",
    "load_or_build",
]

F32: TypeAlias = npt.NDArray[np.float32]
I64: TypeAlias = npt.NDArray[np.int64]

# Chosen with the ``hnsw`` bench case (100k clustered vectors, 2 cores): recall@10 0.985, query
# p99 0.7 ms, ~10k inserts/s. ef_construction 200 gains < 0.01 recall at a third of the insert
# rate; M 24 inserts slower for no gain; ef 64 gives 0.98 (ef is cheap: queries are far from 2 ms).
DEFAULT_M: Final = 16
DEFAULT_EF_CONSTRUCTION: Final = 100
DEFAULT_EF: Final = 96

SPACE: Final = "cosine"
INDEX_FILE: Final = "similar.hnsw"
SIDECAR_FILE: Final = "similar.json"
FORMAT: Final = 1
FETCH_BATCH: Final = 4096  # ids per ``VectorSource.vectors`` call
ADD_CHUNK: Final = 2048  # vectors per locked ``add_items`` call, so queries interleave
MIN_NORM: Final = 1e-12


class VectorSource(Protocol):
    """Where the anomaly vectors live (the store); the index follows it."""

    def ids(self) -> set[str]:
        """Every anomaly id the source holds now."""
        ...

    def vectors(self, ids: Sequence[str]) -> Mapping[str, F32]:
        """The vectors of ``ids``; ids the source no longer holds are left out."""
        ...


class IndexFileError(Exception):
    """A saved index is missing, corrupt or does not fit: rebuild it from the source."""


class UnknownAnomalyError(LookupError):
    """The anomaly is not in the index (unknown, or gone from the store)."""


@dataclass(frozen=True, slots=True)
class Changes:
    """What an :meth:`~SimilarIndex.add` or a :meth:`~SimilarIndex.reconcile` did."""

    added: int = 0
    replaced: int = 0  # known ids whose vector was written again
    deleted: int = 0
    skipped: tuple[str, ...] = ()  # ids with a zero or non-finite vector, not indexed
    rebuilt: str | None = None  # why the index was rebuilt from the source, if it was


class SimilarIndex:
    """An hnswlib cosine index over anomaly vectors, keyed by anomaly id; thread-safe."""

    def __init__(
        self,
        *,
        M: int = DEFAULT_M,
        ef_construction: int = DEFAULT_EF_CONSTRUCTION,
        ef: int = DEFAULT_EF,
        capacity: int = 1024,
        num_threads: int = -1,
    ) -> None:
        if M < 2 or ef_construction < 1 or ef < 1 or capacity < 1:
            raise ValueError("M >= 2, ef_construction, ef and capacity >= 1 are required")
        index = hnswlib.Index(space=SPACE, dim=VECTOR_DIM)
        index.init_index(max_elements=capacity, M=M, ef_construction=ef_construction)
        self._setup(index, [], set(), ef, num_threads)

    def _setup(
        self, index: Any, ids: list[str], deleted: set[int], ef: int, num_threads: int
    ) -> None:
        index.set_ef(ef)  # hnswlib does not save ef: set it on every index, loaded or new
        self._lock = threading.Lock()
        self._save_lock = threading.Lock()
        self._index = index
        self._ids = ids  # label -> id
        self._labels = {anomaly_id: label for label, anomaly_id in enumerate(ids)}
        self._deleted = deleted  # labels marked deleted
        self._ef = ef
        self._num_threads = num_threads

    # ----------------------------------------------------------------------- properties

    @property
    def M(self) -> int:
        """Graph degree the index was built with."""
        return int(self._index.M)

    @property
    def ef_construction(self) -> int:
        """Candidate list size while inserting."""
        return int(self._index.ef_construction)

    @property
    def ef(self) -> int:
        """Candidate list size while querying (recall against speed)."""
        return self._ef

    @ef.setter
    def ef(self, value: int) -> None:
        if value < 1:
            raise ValueError("ef must be >= 1")
        with self._lock:
            self._index.set_ef(value)
            self._ef = value

    def __len__(self) -> int:
        with self._lock:
            return len(self._ids) - len(self._deleted)

    def __contains__(self, anomaly_id: object) -> bool:
        with self._lock:
            label = self._labels.get(anomaly_id) if isinstance(anomaly_id, str) else None
            return label is not None and label not in self._deleted

    def ids(self) -> set[str]:
        """The ids the index answers with (deleted ones left out)."""
        with self._lock:
            return {i for i, label in self._labels.items() if label not in self._deleted}

    # ----------------------------------------------------------------------- writes

    def add(self, ids: Sequence[str], vectors: F32 | Sequence[F32]) -> Changes:
        """Index ``vectors[i]`` under ``ids[i]``; a known id gets its new vector.

        Zero or non-finite vectors are skipped and their ids returned in ``skipped``; an id
        repeated in the batch keeps its last vector. A wrong shape raises :class:`ValueError`.
        """
        arr = np.asarray(vectors, dtype=np.float32)
        if arr.ndim != 2 or arr.shape != (len(ids), VECTOR_DIM):
            raise ValueError(
                f"expected {len(ids)} vectors of length {VECTOR_DIM}, got shape {arr.shape}"
            )
        last = {anomaly_id: i for i, anomaly_id in enumerate(ids)}  # last one wins
        rows = np.fromiter(last.values(), dtype=np.int64, count=len(last))
        good = _valid_rows(arr[rows])
        skipped = tuple(ids[i] for i in rows[~good].tolist())
        rows = rows[good]
        added = replaced = 0
        for start in range(0, len(rows), ADD_CHUNK):
            chunk = rows[start : start + ADD_CHUNK]
            with self._lock:
                labels = np.empty(len(chunk), dtype=np.int64)
                for j, i in enumerate(chunk.tolist()):
                    anomaly_id = ids[i]
                    label = self._labels.get(anomaly_id)
                    if label is None:
                        label = self._labels[anomaly_id] = len(self._ids)
                        self._ids.append(anomaly_id)
                        added += 1
                    elif label in self._deleted:
                        self._deleted.discard(label)  # hnswlib unmarks it on add_items
                        added += 1
                    else:
                        replaced += 1
                    labels[j] = label
                self._reserve(len(self._ids))
                self._index.add_items(arr[chunk], labels, num_threads=self._num_threads)
        return Changes(added=added, replaced=replaced, skipped=skipped)

    def remove(self, ids: Sequence[str]) -> int:
        """Mark ``ids`` deleted (unknown or already deleted ones are ignored); how many were."""
        done = 0
        with self._lock:
            for anomaly_id in ids:
                label = self._labels.get(anomaly_id)
                if label is not None and label not in self._deleted:
                    self._index.mark_deleted(label)
                    self._deleted.add(label)
                    done += 1
        return done

    def _reserve(self, needed: int) -> None:
        """Grow the capacity to ``needed`` elements (at least 1.5×); the caller holds the lock."""
        capacity = int(self._index.get_max_elements())
        if needed > capacity:
            self._index.resize_index(max(needed, capacity * 3 // 2))

    # ----------------------------------------------------------------------- reads

    def query(self, vector: F32 | Sequence[float], k: int = 10) -> list[tuple[str, float]]:
        """The ``k`` nearest anomalies to ``vector``: ``(id, cosine distance)``, nearest first."""
        v = np.asarray(vector, dtype=np.float32)
        if v.shape != (VECTOR_DIM,):
            raise ValueError(f"expected a vector of length {VECTOR_DIM}, got shape {v.shape}")
        if not _valid_rows(v[None, :])[0]:
            raise ValueError("the query vector is zero or not finite: it has no direction")
        with self._lock:
            return self._knn(v, k)

    def similar(self, anomaly_id: str, k: int = 10) -> list[tuple[str, float]]:
        """The ``k`` anomalies nearest to ``anomaly_id``'s vector, itself left out."""
        with self._lock:
            label = self._labels.get(anomaly_id)
            if label is None or label in self._deleted:
                raise UnknownAnomalyError(f"anomaly {anomaly_id!r} is not in the similarity index")
            vector = np.asarray(self._index.get_items([label]), dtype=np.float32)[0]
            rows = self._knn(vector, k + 1)
        return [row for row in rows if row[0] != anomaly_id][:k]

    def _knn(self, vector: F32, k: int) -> list[tuple[str, float]]:
        """hnswlib's ``knn_query`` of one vector; the caller holds the lock."""
        k = min(k, len(self._ids) - len(self._deleted))
        if k <= 0:
            return []
        try:
            labels, dists = self._index.knn_query(vector, k=k)
        except RuntimeError:
            # fewer than k found: many deleted elements around the query; search wider once
            self._index.set_ef(max(self._ef, 4 * k, 256))
            try:
                labels, dists = self._index.knn_query(vector, k=k)
            finally:
                self._index.set_ef(self._ef)
        return [
            (self._ids[label], float(d))
            for label, d in zip(labels[0].tolist(), dists[0].tolist(), strict=True)
        ]

    def _vectors(self, ids: Sequence[str]) -> F32:
        """The stored (unit) vectors of live ``ids``, in order."""
        with self._lock:
            labels = [self._labels[i] for i in ids]
            if not labels:
                return np.empty((0, VECTOR_DIM), dtype=np.float32)
            return np.asarray(self._index.get_items(labels), dtype=np.float32)

    # ----------------------------------------------------------------------- the store

    @classmethod
    def build(
        cls,
        source: VectorSource,
        *,
        M: int = DEFAULT_M,
        ef_construction: int = DEFAULT_EF_CONSTRUCTION,
        ef: int = DEFAULT_EF,
        num_threads: int = -1,
    ) -> SimilarIndex:
        """A new index of every vector ``source`` holds."""
        index = cls(M=M, ef_construction=ef_construction, ef=ef, num_threads=num_threads)
        index._fill(source, sorted(source.ids()))
        return index

    def _fill(self, source: VectorSource, ids: Sequence[str]) -> Changes:
        """Add ``ids`` from ``source`` in batches (ids gone meanwhile are left out)."""
        with self._lock:
            self._reserve(len(self._ids) + len(ids))
        total = Changes()
        for batch in _batches(ids, FETCH_BATCH):
            found = source.vectors(batch)
            got = [i for i in batch if i in found]
            if not got:
                continue
            done = self.add(got, np.stack([np.asarray(found[i], dtype=np.float32) for i in got]))
            total = Changes(
                added=total.added + done.added,
                replaced=total.replaced + done.replaced,
                skipped=total.skipped + done.skipped,
            )
        return total

    def reconcile(
        self, source: VectorSource, *, sample: int = 256, max_deleted_fraction: float = 0.3
    ) -> Changes:
        """Make the index hold exactly what ``source`` holds (the store is the truth).

        Ids the index has and the source has not are marked deleted; ids the source has and
        the index has not are added. The index is rebuilt from the source instead when the
        vectors of a random ``sample`` of the ids both hold disagree (the index is stale in
        ways a diff of ids cannot see), or when deleted elements would exceed
        ``max_deleted_fraction`` of the index (they cost memory, speed and recall). Anomalies
        added while it runs may be dropped until the next reconcile: run it from one thread.
        """
        wanted = source.ids()
        mine = self.ids()
        common = list(mine & wanted)
        checked = random.sample(common, min(sample, len(common)))  # a new sample each time
        found = source.vectors(checked) if checked else {}
        checked = [i for i in checked if i in found]
        if checked:
            theirs = _unit(np.stack([np.asarray(found[i], dtype=np.float32) for i in checked]))
            differ = int((np.abs(theirs - self._vectors(checked)).max(axis=1) > 1e-4).sum())
            if differ:
                return self._rebuild(
                    source, f"{differ} of {len(checked)} sampled vectors differ from the store"
                )
        gone, missing = mine - wanted, wanted - mine
        with self._lock:
            deleted_after = len(self._deleted) + len(gone)
            new_labels = sum(1 for i in missing if i not in self._labels)
            size_after = len(self._ids) + new_labels
        if deleted_after > max_deleted_fraction * size_after:
            return self._rebuild(
                source, f"{deleted_after} of {size_after} elements would be deleted ones"
            )
        deleted = self.remove(sorted(gone))
        return replace(self._fill(source, sorted(missing)), deleted=deleted)

    def _rebuild(self, source: VectorSource, reason: str) -> Changes:
        """Build a new index from ``source`` aside (queries go on), then swap it in."""
        fresh = SimilarIndex(
            M=self.M,
            ef_construction=self.ef_construction,
            ef=self._ef,
            num_threads=self._num_threads,
        )
        done = fresh._fill(source, sorted(source.ids()))
        now = fresh.ids()
        with self._lock:
            before = {i for i, label in self._labels.items() if label not in self._deleted}
            self._index, self._ids, self._labels, self._deleted = (
                fresh._index, fresh._ids, fresh._labels, fresh._deleted,
            )  # fmt: skip
        return Changes(
            added=len(now - before),
            replaced=len(now & before),
            deleted=len(before - now),
            skipped=done.skipped,
            rebuilt=reason,
        )

    # ----------------------------------------------------------------------- files

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write the index and its id sidecar into ``directory``, each atomically.

        The sidecar holds the index file's digest, so a crash between the two replacements
        leaves a pair that :meth:`load` rejects (and the caller rebuilds), never a wrong one.
        """
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        with self._save_lock, _temp_path(folder, INDEX_FILE) as tmp_index:
            with self._lock:
                self._index.save_index(str(tmp_index))
                ids, deleted = list(self._ids), sorted(self._deleted)
            digest = _fsync_and_digest(tmp_index)
            meta = {
                "format": FORMAT,
                "space": SPACE,
                "dim": VECTOR_DIM,
                "index_sha256": digest,
                "ids": ids,
                "deleted": deleted,
            }
            with _temp_path(folder, SIDECAR_FILE) as tmp_meta:
                with tmp_meta.open("wb") as f:
                    f.write(json.dumps(meta, separators=(",", ":")).encode())
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp_index, folder / INDEX_FILE)
                os.replace(tmp_meta, folder / SIDECAR_FILE)
            _fsync_dir(folder)

    @classmethod
    def load(
        cls, directory: str | os.PathLike[str], *, ef: int = DEFAULT_EF, num_threads: int = -1
    ) -> SimilarIndex:
        """The index saved in ``directory``, queried with ``ef``.

        Raises :class:`IndexFileError` when the files are missing, corrupt, from another
        format or of another vector length: the caller rebuilds (see :func:`load_or_build`).
        """
        folder = Path(directory)
        index_path, meta_path = folder / INDEX_FILE, folder / SIDECAR_FILE
        try:
            meta = json.loads(meta_path.read_bytes())
        except (OSError, ValueError) as exc:
            raise IndexFileError(f"cannot read {meta_path}: {exc}") from exc
        ids, deleted = _check_meta(meta, meta_path)
        try:
            digest = _fsync_and_digest(index_path, sync=False)
        except OSError as exc:
            raise IndexFileError(f"cannot read {index_path}: {exc}") from exc
        if digest != meta["index_sha256"]:
            # checked before hnswlib reads it: a damaged file can crash its loader
            raise IndexFileError(f"{index_path} does not match {meta_path} (digest differs)")
        index = hnswlib.Index(space=SPACE, dim=VECTOR_DIM)
        try:
            index.load_index(str(index_path), max_elements=max(len(ids), 1))
        except (RuntimeError, ValueError, MemoryError) as exc:
            raise IndexFileError(f"hnswlib cannot load {index_path}: {exc}") from exc
        if int(index.element_count) != len(ids):
            raise IndexFileError(
                f"{index_path} holds {index.element_count} elements, {meta_path} {len(ids)} ids"
            )
        out = cls.__new__(cls)
        out._setup(index, ids, deleted, ef, num_threads)
        return out


def load_or_build(
    directory: str | os.PathLike[str],
    source: VectorSource,
    *,
    M: int = DEFAULT_M,
    ef_construction: int = DEFAULT_EF_CONSTRUCTION,
    ef: int = DEFAULT_EF,
) -> tuple[SimilarIndex, Changes]:
    """The saved index reconciled with ``source``, or a new one built from it; saved again.

    ``M`` and ``ef_construction`` apply to a new index only (a saved one keeps its own).
    """
    try:
        index = SimilarIndex.load(directory, ef=ef)
    except IndexFileError as exc:
        index = SimilarIndex(M=M, ef_construction=ef_construction, ef=ef)
        changes = replace(index._fill(source, sorted(source.ids())), rebuilt=str(exc))
    else:
        changes = index.reconcile(source)
    if changes.added or changes.deleted or changes.replaced or changes.rebuilt:
        index.save(directory)
    return index, changes


def format_similar(rows: Sequence[tuple[str, float]]) -> str:
    """``rows`` of :meth:`SimilarIndex.similar` as a text table, nearest first."""
    if not rows:
        return "no similar anomalies"
    lines = [f"{'#':>3}  {'distance':>8}  anomaly"]
    lines += [f"{n:>3}  {d:8.4f}  {i}" for n, (i, d) in enumerate(rows, 1)]
    return "\n".join(lines)


def exact_knn(data: F32, queries: F32, k: int, *, block: int = 1 << 24) -> tuple[I64, F32]:
    """Exact cosine k-NN by numpy: row indices into ``data`` and distances, nearest first.

    Queries run in batches of at most ``block`` similarity entries (64 MB of float32).
    """
    d = _unit(np.asarray(data, dtype=np.float32))
    q = _unit(np.asarray(queries, dtype=np.float32))
    k = max(0, min(k, len(d)))
    rows = np.empty((len(q), k), dtype=np.int64)
    dists = np.empty((len(q), k), dtype=np.float32)
    if k == 0:
        return rows, dists
    step = max(1, block // len(d))
    for start in range(0, len(q), step):
        sims = q[start : start + step] @ d.T
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k] if k < len(d) else np.argsort(-sims)
        top_sims = np.take_along_axis(sims, top, axis=1)
        order = np.argsort(-top_sims, axis=1, kind="stable")
        rows[start : start + step] = np.take_along_axis(top, order, axis=1)
        dists[start : start + step] = 1.0 - np.take_along_axis(top_sims, order, axis=1)
    return rows, dists


# --------------------------------------------------------------------------- helpers


def _valid_rows(arr: F32) -> npt.NDArray[np.bool_]:
    """Rows that are finite and not zero (they have a cosine direction)."""
    finite = np.asarray(np.isfinite(arr).all(axis=1), dtype=np.bool_)
    norms = np.linalg.norm(np.where(finite[:, None], arr, 0), axis=1)
    valid: npt.NDArray[np.bool_] = finite & (norms > MIN_NORM)
    return valid


def _unit(arr: F32) -> F32:
    """Rows scaled to length 1 (zero rows stay zero)."""
    norms = np.linalg.norm(arr, axis=1, keepdims=True)
    return (arr / np.where(norms > 0, norms, 1)).astype(np.float32)


def _batches(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _check_meta(meta: Any, path: Path) -> tuple[list[str], set[int]]:
    """The ids and deleted labels of a sidecar; IndexFileError when it does not fit."""
    if not isinstance(meta, dict):
        raise IndexFileError(f"{path} is not a JSON object")
    for name, want in (("format", FORMAT), ("space", SPACE), ("dim", VECTOR_DIM)):
        if meta.get(name) != want:
            raise IndexFileError(f"{path}: {name} is {meta.get(name)!r}, expected {want!r}")
    ids, deleted = meta.get("ids"), meta.get("deleted")
    if not isinstance(meta.get("index_sha256"), str):
        raise IndexFileError(f"{path}: no index digest")
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise IndexFileError(f"{path}: ids is not a list of strings")
    if len(set(ids)) != len(ids):
        raise IndexFileError(f"{path}: ids repeat")
    if not isinstance(deleted, list) or not all(
        isinstance(d, int) and 0 <= d < len(ids) for d in deleted
    ):
        raise IndexFileError(f"{path}: deleted is not a list of labels")
    return ids, set(deleted)


@contextlib.contextmanager
def _temp_path(folder: Path, name: str) -> Iterator[Path]:
    """A fresh temporary file next to ``folder / name``, removed unless replaced."""
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    path = Path(tmp)
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def _fsync_and_digest(path: Path, *, sync: bool = True) -> str:
    """SHA-256 of a file (after an fsync of it when ``sync``)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        if sync:
            os.fsync(f.fileno())
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(folder: Path) -> None:
    """Make the replacements in ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
