"""The hnsw bench case at a small size: it runs without services and meets its recall goal."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pulse_bench.cases.hnsw import RECALL_TARGET, anomaly_vectors
from pulse_bench.cases.hnsw import run as run_hnsw
from pulse_bench.harness import REGISTRY, BenchContext, BenchParams, check_targets

from schemas.anomaly import VECTOR_DIM
from schemas.settings import KafkaSettings, StoreSettings


def test_anomaly_vectors_are_clustered_windows() -> None:
    data = anomaly_vectors(2000, np.random.default_rng(1))
    assert data.shape == (2000, VECTOR_DIM) and data.dtype == np.float32
    assert np.isfinite(data).all()
    unit = data / np.linalg.norm(data, axis=1, keepdims=True)
    nearest = np.sort(unit[:200] @ unit.T, axis=1)[:, -2]  # best match other than itself
    assert np.median(nearest) > 0.8  # most vectors have close neighbours: clusters, not noise


def test_the_case_runs_without_services(tmp_path: Path) -> None:
    params = BenchParams.create(True, hnsw_vectors=3000, hnsw_queries=100)
    ctx = BenchContext(params, KafkaSettings(), StoreSettings(), tmp_path)
    result = run_hnsw(ctx)
    assert result["vectors"] == 3000 and result["queries"] == 100
    assert result["recall_at_10"] >= RECALL_TARGET
    assert result["insert_vectors_per_s"] > 0 and result["query"]["p99_ms"] > 0
    targets = check_targets({"hnsw": result}, {}, REGISTRY.targets.values())
    assert {"hnsw_recall_at_10", "hnsw_query_p99_ms"} <= set(targets)
