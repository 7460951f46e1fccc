"""The similar-anomaly index over a fake vector source (no store)."""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from dashboard.similar import (
    INDEX_FILE,
    SIDECAR_FILE,
    Changes,
    IndexFileError,
    SimilarIndex,
    UnknownAnomalyError,
    exact_knn,
    format_similar,
    load_or_build,
)
from schemas.anomaly import VECTOR_DIM

F32 = npt.NDArray[np.float32]


class FakeSource:
    """A store of anomaly vectors in a dict."""

    def __init__(self, vectors: Mapping[str, F32]) -> None:
        self.data = dict(vectors)

    def ids(self) -> set[str]:
        return set(self.data)

    def vectors(self, ids: Sequence[str]) -> dict[str, F32]:
        return {i: self.data[i] for i in ids if i in self.data}


def clustered(n: int, seed: int = 0, clusters: int = 40) -> F32:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, VECTOR_DIM))
    out = centres[rng.integers(0, clusters, n)] + 0.4 * rng.standard_normal((n, VECTOR_DIM))
    return out.astype(np.float32)


def ids_for(n: int, prefix: str = "sensor:dev-") -> list[str]:
    return [f"{prefix}{i:05d}|temp:1764321000000" for i in range(n)]


def source_of(n: int, seed: int = 0) -> FakeSource:
    return FakeSource(dict(zip(ids_for(n), clustered(n, seed), strict=True)))


@pytest.fixture(scope="module")
def built() -> tuple[FakeSource, SimilarIndex]:
    src = source_of(3000)
    return src, SimilarIndex.build(src)


def test_recall_at_10_against_exact_search(built: tuple[FakeSource, SimilarIndex]) -> None:
    src, index = built
    ids = sorted(src.data)
    data = np.stack([src.data[i] for i in ids])
    queries = clustered(200, seed=1)
    truth, _ = exact_knn(data, queries, 10)
    hits = [
        len({ids[j] for j in want.tolist()} & {i for i, _ in index.query(q, 10)})
        for q, want in zip(queries, truth, strict=True)
    ]
    assert len(index) == 3000
    assert sum(hits) / (10 * len(queries)) >= 0.95


def test_exact_knn_batches_agree_with_a_full_sort() -> None:
    data, queries = clustered(300, 2), clustered(17, 3)
    rows, dists = exact_knn(data, queries, 5, block=1000)  # 3 queries per batch
    unit = data / np.linalg.norm(data, axis=1, keepdims=True)
    qn = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    full = 1 - qn @ unit.T
    assert rows.tolist() == np.argsort(full, axis=1, kind="stable")[:, :5].tolist()
    assert dists == pytest.approx(np.sort(full, axis=1)[:, :5], abs=1e-5)
    assert exact_knn(data[:3], queries, 10)[0].shape == (17, 3)


def test_similar_leaves_the_anomaly_itself_out(built: tuple[FakeSource, SimilarIndex]) -> None:
    src, index = built
    anomaly_id = ids_for(1)[0]
    rows = index.similar(anomaly_id, 10)
    assert len(rows) == 10 and anomaly_id not in {i for i, _ in rows}
    assert [d for _, d in rows] == sorted(d for _, d in rows)
    twin = index.query(src.data[anomaly_id], 1)
    assert twin[0][0] == anomaly_id and twin[0][1] == pytest.approx(0.0, abs=1e-5)


def test_unknown_or_removed_anomaly_is_a_clear_error() -> None:
    index = SimilarIndex()
    index.add(["a", "b"], clustered(2))
    with pytest.raises(UnknownAnomalyError, match="'nope' is not in the similarity index"):
        index.similar("nope")
    assert index.remove(["a", "nope"]) == 1
    assert "a" not in index and "b" in index
    with pytest.raises(UnknownAnomalyError):
        index.similar("a")
    assert index.similar("b") == []
    assert [i for i, _ in index.query(clustered(1)[0], 10)] == ["b"]


def test_re_adding_an_id_replaces_its_vector() -> None:
    index = SimilarIndex()
    v = np.eye(VECTOR_DIM, dtype=np.float32)
    assert index.add(["x", "y"], v[:2]) == Changes(added=2)
    assert index.add(["x"], v[5:6]) == Changes(replaced=1)
    assert len(index) == 2
    [(nearest, distance)] = index.query(v[5], 1)
    assert nearest == "x" and distance == pytest.approx(0.0, abs=1e-6)
    assert index.query(v[0], 2)[0][1] == pytest.approx(1.0, abs=1e-6)  # old vector is gone
    # an id twice in one batch keeps its last vector
    assert index.add(["z", "z"], v[7:9]) == Changes(added=1)
    assert index.query(v[8], 1)[0][0] == "z"


def test_a_removed_id_that_comes_back_is_live_again() -> None:
    index = SimilarIndex()
    v = np.eye(VECTOR_DIM, dtype=np.float32)
    index.add(["x", "y"], v[:2])
    index.remove(["x"])
    assert index.add(["x"], v[3:4]) == Changes(added=1)
    assert index.query(v[3], 1)[0][0] == "x" and len(index) == 2


def test_zero_and_non_finite_vectors_are_skipped_and_reported() -> None:
    index = SimilarIndex()
    bad = np.ones((4, VECTOR_DIM), dtype=np.float32)
    bad[1] = 0.0
    bad[2, 3] = np.nan
    bad[3, 0] = np.inf
    assert index.add(["ok", "zero", "nan", "inf"], bad) == Changes(
        added=1, skipped=("zero", "nan", "inf")
    )
    assert index.ids() == {"ok"}
    with pytest.raises(ValueError, match="zero or not finite"):
        index.query(np.zeros(VECTOR_DIM, dtype=np.float32))
    with pytest.raises(ValueError, match="length 32"):
        index.query(np.ones(3, dtype=np.float32))
    with pytest.raises(ValueError, match="expected 2 vectors"):
        index.add(["a", "b"], np.ones((3, VECTOR_DIM), dtype=np.float32))


def test_capacity_grows_and_k_is_capped() -> None:
    index = SimilarIndex(capacity=4)
    assert index.query(np.ones(VECTOR_DIM, dtype=np.float32), 5) == []
    index.add(ids_for(100), clustered(100))
    assert len(index) == 100
    assert len(index.query(clustered(1, 9)[0], 500)) == 100


def test_queries_find_live_neighbours_among_many_deleted() -> None:
    index = SimilarIndex()
    index.add(ids_for(400), clustered(400))
    index.remove(ids_for(400)[:390])
    rows = index.query(clustered(1, 5)[0], 10)
    assert {i for i, _ in rows} == set(ids_for(400)[390:])


def test_save_and_load_round_trip_restores_ef_and_deletions(tmp_path: Path) -> None:
    src = source_of(500)
    index = SimilarIndex.build(src, ef=37)
    index.remove(ids_for(3))
    index.save(tmp_path)
    loaded = SimilarIndex.load(tmp_path, ef=37)
    assert loaded.ef == 37 and loaded._index.ef == 37  # hnswlib itself loads with ef=10
    assert (loaded.M, loaded.ef_construction) == (index.M, index.ef_construction)
    assert loaded.ids() == index.ids() and len(loaded) == 497
    q = clustered(1, 4)[0]
    assert loaded.query(q, 10) == index.query(q, 10)
    with pytest.raises(UnknownAnomalyError):
        loaded.similar(ids_for(1)[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == [INDEX_FILE, SIDECAR_FILE]
    loaded.add(["new"], clustered(1, 6))  # a loaded index grows past its saved size
    assert "new" in loaded and len(loaded) == 498


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda d: (d / SIDECAR_FILE).unlink(), "cannot read"),
        (lambda d: (d / INDEX_FILE).unlink(), "cannot read"),
        (lambda d: (d / SIDECAR_FILE).write_text("{not json"), "cannot read"),
        (lambda d: (d / SIDECAR_FILE).write_text("[]"), "not a JSON object"),
        (lambda d: _edit_meta(d, dim=16), "dim is 16"),
        (lambda d: _edit_meta(d, ids=["a", "a"]), "ids repeat"),
        (lambda d: _edit_meta(d, deleted=[10**6]), "deleted"),
        (lambda d: _truncate(d / INDEX_FILE), "digest differs"),
    ],
)
def test_a_damaged_save_means_rebuild(tmp_path: Path, damage: object, reason: str) -> None:
    src = source_of(200)
    SimilarIndex.build(src).save(tmp_path)
    damage(tmp_path)  # type: ignore[operator]
    with pytest.raises(IndexFileError, match=reason):
        SimilarIndex.load(tmp_path)
    index, changes = load_or_build(tmp_path, src)
    assert changes.rebuilt is not None and reason in changes.rebuilt
    assert changes.added == 200 and index.ids() == src.ids()
    again, changes = load_or_build(tmp_path, src)  # the rebuilt index was saved
    assert changes == Changes() and again.ids() == src.ids()


def test_a_sidecar_listing_other_elements_than_the_index_is_refused(tmp_path: Path) -> None:
    SimilarIndex.build(source_of(50)).save(tmp_path)
    meta = json.loads((tmp_path / SIDECAR_FILE).read_text())
    _edit_meta(tmp_path, ids=meta["ids"][:-1], deleted=[])
    with pytest.raises(IndexFileError, match="49 ids"):
        SimilarIndex.load(tmp_path)


def _edit_meta(folder: Path, **fields: object) -> None:
    path = folder / SIDECAR_FILE
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def test_reconcile_follows_the_store() -> None:
    src = source_of(300)
    index = SimilarIndex.build(src)
    assert index.reconcile(src) == Changes()
    gone = ids_for(300)[:20]
    for anomaly_id in gone:
        del src.data[anomaly_id]
    fresh = dict(zip(ids_for(30, "app:"), clustered(30, 8), strict=True))
    src.data.update(fresh)
    changes = index.reconcile(src)
    assert changes == Changes(added=30, deleted=20)
    assert index.ids() == src.ids()
    assert not {i for i, _ in index.query(clustered(1, 0)[0], 50)} & set(gone)
    src.data[gone[0]] = clustered(1, 11)[0]  # back in the store
    assert index.reconcile(src) == Changes(added=1)
    assert gone[0] in index


def test_reconcile_skips_store_vectors_without_a_direction() -> None:
    src = source_of(50)
    src.data["broken"] = np.zeros(VECTOR_DIM, dtype=np.float32)
    index = SimilarIndex.build(src)
    assert "broken" not in index and len(index) == 50
    assert index.reconcile(src) == Changes(skipped=("broken",))


def test_reconcile_rebuilds_when_sampled_vectors_differ() -> None:
    src = source_of(400)
    index = SimilarIndex.build(src)
    src.data = dict(zip(ids_for(400), clustered(400, seed=99), strict=True))
    changes = index.reconcile(src)
    assert changes.rebuilt is not None and "differ from the store" in changes.rebuilt
    assert (changes.added, changes.replaced, changes.deleted) == (0, 400, 0)
    probe = ids_for(400)[7]
    assert index.query(src.data[probe], 1)[0][0] == probe


def test_reconcile_rebuilds_when_most_elements_would_be_deleted() -> None:
    src = source_of(400)
    index = SimilarIndex.build(src)
    for anomaly_id in ids_for(400)[:200]:
        del src.data[anomaly_id]
    changes = index.reconcile(src, max_deleted_fraction=0.3)
    assert changes.rebuilt is not None and "deleted" in changes.rebuilt
    assert changes.deleted == 200 and index.ids() == src.ids()
    assert index._deleted == set() and len(index._ids) == 200  # compacted


@pytest.mark.timeout(60)  # a deadlock fails the test instead of hanging the run
def test_adding_while_querying_from_another_thread() -> None:
    index = SimilarIndex()
    index.add(ids_for(100), clustered(100))
    data = clustered(4000, seed=3)
    errors: list[BaseException] = []
    done = threading.Event()

    def adder() -> None:
        try:
            for start in range(0, len(data), 100):
                index.add(ids_for(100, f"w{start}:"), data[start : start + 100])
        except BaseException as exc:
            errors.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=adder)
    thread.start()
    queries = clustered(50, seed=4)
    n = 0
    while not done.is_set() or n < 50:
        assert len(index.query(queries[n % 50], 10)) == 10
        index.similar(ids_for(1)[0], 5)
        n += 1
    thread.join(timeout=30)
    assert not thread.is_alive() and errors == []
    assert len(index) == 4100


def test_format_similar() -> None:
    assert format_similar([]) == "no similar anomalies"
    text = format_similar([("sensor:a|t:1", 0.01234), ("sensor:b|t:2", 0.5)])
    assert text.splitlines() == [
        "  #  distance  anomaly",
        "  1    0.0123  sensor:a|t:1",
        "  2    0.5000  sensor:b|t:2",
    ]
