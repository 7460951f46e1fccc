"""The quantile sketch: bounded relative error against exact quantiles, exact merges."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas import sketch as sketches

# Examples are checked, never timed: a loaded machine must not fail a test (no deadline, and
# no health check that times data generation).
NOT_TIMED = [HealthCheck.too_slow]


QS = (0.5, 0.9, 0.95, 0.99)


def _check(values: np.ndarray) -> None:
    est = sketches.quantiles(sketches.sketch_of(values), QS)
    exact = np.quantile(values, QS, method="lower")
    for e, x in zip(est, exact, strict=True):
        assert e is not None
        assert abs(e - x) <= 0.01 * abs(x) + 1e-9, (e, x)


@given(
    st.lists(
        st.floats(min_value=-1e9, max_value=1e9, allow_nan=False, allow_infinity=False),
        min_size=1,
        max_size=400,
    )
)
@settings(max_examples=300, deadline=None, suppress_health_check=NOT_TIMED)
def test_quantiles_within_one_percent_of_exact(values: list[float]) -> None:
    _check(np.array(values))


def test_realistic_distributions() -> None:
    rng = np.random.default_rng(7)
    _check(rng.lognormal(3.0, 1.0, 100_000))  # latencies
    _check(rng.normal(21.0, 4.0, 100_000))  # temperatures, some negative
    _check(np.concatenate([np.zeros(50), rng.exponential(1.0, 1000)]))


@given(
    st.lists(st.floats(min_value=-1e6, max_value=1e6, allow_nan=False), min_size=1, max_size=200),
    st.lists(st.floats(min_value=-1e6, max_value=1e6, allow_nan=False), min_size=1, max_size=200),
)
@settings(max_examples=200, deadline=None, suppress_health_check=NOT_TIMED)
def test_merge_equals_sketch_of_union(a: list[float], b: list[float]) -> None:
    merged = sketches.merge([sketches.sketch_of(a), sketches.sketch_of(b)])
    assert merged == sketches.sketch_of(a + b)


def test_bucket_value_within_accuracy_of_members() -> None:
    v = np.geomspace(1e-6, 1e12, 10_000)
    v = np.concatenate([v, -v])
    rep = np.array([sketches.bucket_value(int(c)) for c in sketches.bucket_codes(v)])
    assert np.all(np.abs(rep - v) <= sketches.RELATIVE_ACCURACY * np.abs(v) * (1 + 1e-12))


def test_empty_and_bad_quantile() -> None:
    assert sketches.quantiles({}, QS) == [None] * 4
    try:
        sketches.quantiles({5: 1}, [1.5])
    except ValueError as exc:
        assert "quantile" in str(exc)
    else:
        raise AssertionError("a quantile above 1 must be refused")
