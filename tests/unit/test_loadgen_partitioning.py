"""The loadgen's partition choice is Kafka's default partitioner."""

from __future__ import annotations

import numpy as np
from aiokafka.partitioner import DefaultPartitioner, murmur2

from loadgen import partitioning


def test_matches_aiokafka_default_partitioner() -> None:
    rng = np.random.default_rng(0)
    keys = [rng.bytes(int(n)) for n in rng.integers(0, 48, 600)]
    keys += [f"dev-{i:04d}".encode() for i in range(200)]
    keys += [rng.bytes(16).hex().encode() for _ in range(200)]
    partitioner = DefaultPartitioner()
    for parts in (1, 3, 6, 7):
        everything = list(range(parts))
        expected = [partitioner(k, everything, everything) for k in keys]
        assert [partitioning.partition_for(k, parts) for k in keys] == expected
        assert partitioning.partitions_for(keys, parts).tolist() == expected
    assert partitioning.murmur2_many(keys).tolist() == [murmur2(k) for k in keys]
