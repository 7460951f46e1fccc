"""Mergeable quantile sketch with bounded relative error (DDSketch-style logarithmic buckets).

A value ``x`` with ``|x| >= MIN_MAGNITUDE`` falls in bucket ``i = ceil(log_gamma(|x|))`` of its
sign; the bucket's representative value ``2 * gamma**i / (gamma + 1)`` is within
``RELATIVE_ACCURACY`` of every value in the bucket. Values nearer zero share one zero bucket.

Sign and index are packed into one integer *code* (``index * 4 + sign + 1``) so a sketch is just
``{code: count}``; in the store it travels inside the packed window value (``schemas.packed``),
and two sketches merge by adding counts, which is what makes partial results from partitions,
batches and panes combine exactly.

Why not the ``ddsketch`` package: its sketches are Python objects updated one value at a time;
here the bucket codes of a whole batch are computed in one vectorised numpy pass and the counts
merge as columns (``schemas.packed``), and the readers need only the quantile estimates.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Final

import numpy as np
import numpy.typing as npt

RELATIVE_ACCURACY: Final = 0.008
GAMMA: Final = (1.0 + RELATIVE_ACCURACY) / (1.0 - RELATIVE_ACCURACY)
_LOG_GAMMA: Final = math.log(GAMMA)
MIN_MAGNITUDE: Final = 1e-9
QUANTILES: Final = (0.5, 0.9, 0.95, 0.99)


def bucket_codes(values: npt.ArrayLike) -> npt.NDArray[np.int64]:
    """Bucket code of each value (vectorised)."""
    v = np.asarray(values, dtype=np.float64)
    mag = np.abs(v)
    nonzero = mag >= MIN_MAGNITUDE
    sign = np.where(nonzero, np.sign(v), 0.0).astype(np.int64)
    idx = np.zeros(v.shape, dtype=np.int64)
    idx[nonzero] = np.ceil(np.log(mag[nonzero]) / _LOG_GAMMA).astype(np.int64)
    return idx * 4 + sign + 1


def bucket_values(codes: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Representative value of each bucket code (vectorised :func:`bucket_value`)."""
    c = np.asarray(codes, dtype=np.int64)
    sign = (c % 4 - 1).astype(np.float64)
    return sign * 2.0 * np.power(GAMMA, (c // 4).astype(np.float64)) / (GAMMA + 1.0)


@functools.lru_cache(maxsize=1 << 16)
def bucket_value(code: int) -> float:
    """Representative value of a bucket code (memoised: readers decode the same codes often)."""
    sign = code % 4 - 1
    if sign == 0:
        return 0.0
    idx = code // 4
    return sign * 2.0 * GAMMA**idx / (GAMMA + 1.0)


def sketch_of(values: npt.ArrayLike) -> dict[int, int]:
    """The sketch ``{code: count}`` of some values."""
    codes, counts = np.unique(bucket_codes(values), return_counts=True)
    return {int(c): int(n) for c, n in zip(codes, counts, strict=True)}


def merge(sketches: Iterable[Mapping[int, int]]) -> dict[int, int]:
    """Merge sketches by adding bucket counts."""
    out: dict[int, int] = {}
    for sk in sketches:
        for code, n in sk.items():
            out[code] = out.get(code, 0) + n
    return out


def quantiles(sketch: Mapping[int, int], qs: Sequence[float] = QUANTILES) -> list[float | None]:
    """Estimate quantiles from a sketch; ``None`` for an empty sketch.

    Quantile ``q`` is the value of rank ``floor(q * (n - 1))`` (0-based) in sorted order, as numpy's
    ``quantile(..., method="lower")``, within ``RELATIVE_ACCURACY`` relative error. Plain Python:
    dashboards call this for thousands of small sketches, where numpy's per-call cost dominates.
    """
    for q in qs:
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile must be within [0, 1], got {q}")
    items = sorted((bucket_value(c), n) for c, n in sketch.items() if n > 0)
    total = sum(n for _, n in items)
    if total == 0:
        return [None for _ in qs]
    ranks = sorted((math.floor(q * (total - 1)), i) for i, q in enumerate(qs))
    out: list[float | None] = [None] * len(qs)
    seen = 0
    it = iter(items)
    value, n = next(it)
    for rank, i in ranks:
        while seen + n <= rank:  # the bucket holding 0-based rank `rank`
            seen += n
            value, n = next(it)
        out[i] = value
    return out
