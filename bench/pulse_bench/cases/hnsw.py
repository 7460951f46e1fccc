"""(g) Similar-anomaly search: the hnswlib index of ``dashboard.similar``, no services needed.

``hnsw_vectors`` synthetic anomaly vectors (a window of a few hundred recurring shapes,
z-normalised, followed by context features; cluster sizes skewed, a few outliers) are built
into a :class:`~dashboard.similar.SimilarIndex` from an in-memory source (the insert rate),
the last 1 000 of them added one by one as the worker would (the streaming insert rate), then
``hnsw_queries`` held-out vectors of the same mixture are searched (query latency, recall@10
against exact numpy search), ``similar()`` is timed on indexed ids and the index is saved and
loaded back.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt

from pulse_bench.harness import BenchContext, BenchError, Metrics, bench_case, percentiles, target
from schemas.anomaly import VECTOR_DIM

RECALL_TARGET = 0.95
QUERY_P99_TARGET_MS = 2.0
K = 10
WINDOW = 24  # leading dims: the entity's recent window; the rest are context features
STREAMED = 1_000  # vectors added one at a time after the bulk build


def anomaly_vectors(
    n: int, rng: np.random.Generator, clusters: int = 300, outliers: float = 0.03
) -> npt.NDArray[np.float32]:
    """``n`` vectors shaped like anomaly vectors: a skewed mixture of recurring shapes."""
    ctx_dim = VECTOR_DIM - WINDOW
    steps = rng.standard_normal((clusters, WINDOW))
    shapes = _znorm(np.cumsum(steps, axis=1))  # smooth-ish recurring window shapes
    spike_at = rng.integers(0, WINDOW, clusters)
    shapes[np.arange(clusters), spike_at] += rng.choice([-3.0, 3.0], clusters)
    contexts = rng.standard_normal((clusters, ctx_dim))
    spread = rng.uniform(0.15, 0.6, clusters)  # how tight each cluster is
    weights = 1.0 / np.arange(1, clusters + 1) ** 0.8  # a few shapes recur much more often
    member = rng.choice(clusters, n, p=weights / weights.sum())
    window = shapes[member] * rng.lognormal(0.0, 0.2, (n, 1))
    window += rng.standard_normal((n, WINDOW)) * spread[member, None]
    context = contexts[member] + rng.standard_normal((n, ctx_dim)) * 0.3
    out = np.concatenate([_znorm(window), context], axis=1)
    odd = rng.random(n) < outliers
    out[odd] = rng.standard_normal((int(odd.sum()), VECTOR_DIM))
    return out.astype(np.float32)


def _znorm(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    mean = x.mean(axis=1, keepdims=True)
    std = x.std(axis=1, keepdims=True)
    out: npt.NDArray[np.float64] = (x - mean) / np.where(std > 0, std, 1.0)
    return out


class ArraySource:
    """A :class:`~dashboard.similar.VectorSource` over in-memory arrays."""

    def __init__(self, ids: Sequence[str], data: npt.NDArray[np.float32]) -> None:
        self._rows = {anomaly_id: i for i, anomaly_id in enumerate(ids)}
        self._data = data

    def ids(self) -> set[str]:
        return set(self._rows)

    def vectors(self, ids: Sequence[str]) -> Mapping[str, npt.NDArray[np.float32]]:
        return {i: self._data[self._rows[i]] for i in ids if i in self._rows}


def _ms(samples: list[float]) -> Metrics:
    return {f"{k}_ms": v for k, v in percentiles(samples, (0.5, 0.99)).items()}


@bench_case(
    "hnsw",
    description="similar-anomaly index: insert rate, query latency, recall@10 vs exact",
    order=70,
)
def run(ctx: BenchContext) -> Metrics:
    """Build, stream into, query, save and load a similarity index of synthetic anomalies."""
    from dashboard.similar import SimilarIndex, exact_knn

    p = ctx.params
    n, n_queries = p.hnsw_vectors, p.hnsw_queries
    rng = np.random.default_rng(p.seed)
    data = anomaly_vectors(n + n_queries, rng)
    data, queries = data[:n], data[n:]
    ids = [f"anomaly:{i:07d}" for i in range(n)]
    streamed = min(STREAMED, n // 10)
    bulk = n - streamed

    t0 = time.perf_counter()
    index = SimilarIndex.build(ArraySource(ids[:bulk], data[:bulk]))
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(bulk, n):
        index.add([ids[i]], data[i : i + 1])
    stream_s = time.perf_counter() - t0
    if len(index) != n:
        raise BenchError(f"the index holds {len(index):,} vectors, {n:,} were added")

    for q in queries[:50]:  # warm-up
        index.query(q, K)
    found: list[list[str]] = []
    latencies: list[float] = []
    for q in queries:
        t0 = time.perf_counter()
        rows = index.query(q, K)
        latencies.append((time.perf_counter() - t0) * 1000)
        found.append([anomaly_id for anomaly_id, _ in rows])
    t0 = time.perf_counter()
    truth, _ = exact_knn(data, queries, K)
    exact_s = time.perf_counter() - t0
    recall = float(
        np.mean(
            [
                len({ids[j] for j in want.tolist()} & set(got)) / K
                for want, got in zip(truth, found, strict=True)
            ]
        )
    )
    similar_ms: list[float] = []
    for i in rng.choice(n, min(n_queries, n), replace=False).tolist():
        t0 = time.perf_counter()
        index.similar(ids[i], K)
        similar_ms.append((time.perf_counter() - t0) * 1000)

    folder = ctx.workdir / "hnsw"
    t0 = time.perf_counter()
    index.save(folder)
    save_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    loaded = SimilarIndex.load(folder, ef=index.ef)
    load_s = time.perf_counter() - t0
    if loaded.query(queries[0], K) != index.query(queries[0], K):
        raise BenchError("the loaded index answers differently from the saved one")
    return {
        "vectors": n,
        "queries": len(queries),
        "M": index.M,
        "ef_construction": index.ef_construction,
        "ef": index.ef,
        "insert_vectors_per_s": bulk / build_s,
        "insert_one_by_one_per_s": streamed / stream_s,
        "build_s": round(build_s, 2),
        "recall_at_10": recall,
        "query": _ms(latencies),
        "similar": _ms(similar_ms),
        "exact_query_ms": exact_s / len(queries) * 1000,
        "save_s": round(save_s, 3),
        "load_s": round(load_s, 3),
        "file_mb": round(sum(f.stat().st_size for f in folder.iterdir()) / 2**20, 1),
    }


target(
    "hnsw_recall_at_10",
    "cases.hnsw.recall_at_10",
    ">=",
    RECALL_TARGET,
    "recall@10 of the index against exact numpy search",
)
target(
    "hnsw_query_p99_ms",
    "cases.hnsw.query.p99_ms",
    "<=",
    QUERY_P99_TARGET_MS,
    "one query of k=10, p99",
)
