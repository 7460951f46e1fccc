"""Kafka's default key partitioning (murmur2), scalar and vectorised over equal-length keys.

The load generator picks every record's partition itself, with the same rule as the Java client
and aiokafka's ``DefaultPartitioner``: ``(murmur2(key) & 0x7fffffff) % partitions``. Knowing the
partition up front lets the truth file follow the worker's per-partition watermark.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

_SEED = 0x9747B28C
_M = 0x5BD1E995
_MASK = 0xFFFFFFFF


def murmur2(data: bytes) -> int:
    """MurmurHash2 of ``data`` as Kafka computes it (unsigned 32-bit)."""
    length = len(data)
    h = (_SEED ^ length) & _MASK
    n4 = length // 4
    for i in range(n4):
        k = int.from_bytes(data[4 * i : 4 * i + 4], "little")
        k = (k * _M) & _MASK
        k ^= k >> 24
        k = (k * _M) & _MASK
        h = (h * _M) & _MASK
        h ^= k
    tail = data[4 * n4 :]
    if len(tail) >= 3:
        h ^= tail[2] << 16
    if len(tail) >= 2:
        h ^= tail[1] << 8
    if len(tail) >= 1:
        h ^= tail[0]
        h = (h * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    h ^= h >> 15
    return h


def partition_for(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner assigns to ``key``."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


def murmur2_many(keys: Sequence[bytes]) -> npt.NDArray[np.uint32]:
    """MurmurHash2 of many keys at once; keys of equal length are hashed in one numpy pass."""
    out = np.empty(len(keys), dtype=np.uint32)
    by_len: dict[int, list[int]] = {}
    for i, key in enumerate(keys):
        by_len.setdefault(len(key), []).append(i)
    for length, idx in by_len.items():
        out[idx] = _murmur2_fixed(b"".join(keys[i] for i in idx), len(idx), length)
    return out


def partitions_for(keys: Sequence[bytes], partitions: int) -> npt.NDArray[np.int64]:
    """The default-partitioner partition of each key."""
    return (murmur2_many(keys).astype(np.int64) & 0x7FFFFFFF) % partitions


def _murmur2_fixed(blob: bytes, count: int, length: int) -> npt.NDArray[np.uint32]:
    """murmur2 of ``count`` keys of ``length`` bytes each, concatenated in ``blob``."""
    m = np.uint32(_M)
    raw = np.frombuffer(blob, dtype=np.uint8).reshape(count, length)
    n4 = length // 4
    h = np.full(count, (_SEED ^ length) & _MASK, dtype=np.uint32)
    if n4:
        words = np.ascontiguousarray(raw[:, : 4 * n4]).view("<u4").astype(np.uint32)
        for i in range(n4):  # uint32 arithmetic wraps modulo 2**32, as the Java ints do
            k = words[:, i] * m
            k ^= k >> np.uint32(24)
            k *= m
            h *= m
            h ^= k
    extra = length % 4
    base = 4 * n4
    if extra >= 3:
        h ^= raw[:, base + 2].astype(np.uint32) << np.uint32(16)
    if extra >= 2:
        h ^= raw[:, base + 1].astype(np.uint32) << np.uint32(8)
    if extra >= 1:
        h ^= raw[:, base].astype(np.uint32)
        h *= m
    h ^= h >> np.uint32(13)
    h *= m
    h ^= h >> np.uint32(15)
    return h
