"""Benchmark cases; importing this package registers them (and their ratios and targets)."""

from pulse_bench.cases import (  # noqa: F401 - imported to register
    floor,
    freshness,
    hnsw,
    naive,
    pipeline_case,
    quix,
    reads,
    replay_case,
    write_cost,
)
