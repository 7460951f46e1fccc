"""The detector bank: vectorised steps equal single-entity runs, snapshots replay bit-identically,
bad snapshot bytes fail with one exception type, and the injected anomaly kinds of the load
generator (spike, drift, stuck, level shift) raise exactly one alarm each on noisy daily cycles,
and a change of pattern within the usual range raises one through the contextual (kNN) test."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline import detectors
from pipeline.detectors import DetectorBank, SnapshotError
from schemas import anomaly

DAY = detectors.DAY_MS
T0 = 1_700_000_000_000
DATA = Path(__file__).parent / "data"


def sensor_series(n: int, seed: int, step_ms: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """A reading like the load generator's: daily sine plus Gaussian noise, 2 decimals."""
    rng = np.random.default_rng(seed)
    t = T0 + np.arange(n, dtype=np.int64) * step_ms
    v = 21.0 + 4.0 * np.sin(2 * np.pi * (t % DAY) / DAY + seed) + rng.normal(0, 0.3, n)
    return t, np.round(v, 2)


def run(values: np.ndarray, t: np.ndarray, context: bool = True) -> detectors.BatchResult:
    bank = DetectorBank(1)
    return bank.score_batch(np.zeros(len(values), np.int64), t, values, context)


def test_log10_tail_matches_erfc() -> None:
    z = np.array([-5.0, -1.0, 0.0, 0.5, 2.0, 5.0, 10.0, 30.0])
    got = detectors.log10_tail(z)
    want = [math.log10(0.5 * math.erfc(x / math.sqrt(2))) for x in z]
    assert np.allclose(got, want, rtol=1e-5, atol=1e-9)


def test_rounds_equal_single_entity_runs() -> None:
    rng = np.random.default_rng(1)
    series = [sensor_series(int(rng.integers(100, 250)), s) for s in range(4)]
    alone = [run(v, t).score for t, v in series]
    # interleave all series in one batch, shuffled across entities but in time order per entity
    rows = np.concatenate([np.full(len(v), i) for i, (_, v) in enumerate(series)])
    t = np.concatenate([t for t, _ in series])
    v = np.concatenate([v for _, v in series])
    order = np.lexsort((rng.random(len(rows)), t))
    bank = DetectorBank(len(series))
    res = bank.score_batch(rows[order], t[order], v[order])
    together = np.empty(len(rows))
    together[order] = res.score
    pos = 0
    for i, (_, vals) in enumerate(series):
        assert np.array_equal(together[pos : pos + len(vals)], alone[i])
        pos += len(vals)


def test_batch_rejects_time_going_back_within_an_entity() -> None:
    bank = DetectorBank(2)
    with pytest.raises(ValueError, match="time order"):
        bank.score_batch(np.array([0, 1, 0]), np.array([T0 + 5, T0, T0 + 4]), np.ones(3))


def test_scores_are_probabilities_and_alarms_reach_the_threshold() -> None:
    t, v = sensor_series(1500, 3)
    v[900] += 50.0
    res = run(v, t)
    assert res.score.min() >= 0.0 and res.score.max() <= 1.0
    assert np.all(res.score[res.alarm] >= detectors.DEFAULT_PARAMS.threshold)
    assert np.all(res.score[: detectors.DEFAULT_PARAMS.warmup] == 0.0)


@pytest.mark.parametrize("context", [True, False], ids=["context", "no-context"])
@pytest.mark.parametrize("kind", ["spike", "drift", "stuck", "shift", "none"])
def test_injected_anomalies_raise_one_alarm_within_the_episode(kind: str, context: bool) -> None:
    # 8 minutes at 2 readings/s; the episode lasts 30 s, within the load generator's 10-60 s
    n, start, length = 1000, 700, 60
    t, v = sensor_series(n, 7)
    scale = 4 * (4.0 + 0.3)
    ep = slice(start, start + length)
    if kind == "spike":
        ep = slice(start, start + 8)
        v[ep] += scale * 2.0
    elif kind == "drift":
        v[ep] += scale * np.arange(length) / length
    elif kind == "stuck":
        v[ep] = v[start - 1]
    elif kind == "shift":
        v[start:] += 3.0
    res = run(v, t, context)
    alarms = np.flatnonzero(res.alarm)
    if kind == "none":
        assert len(alarms) == 0
        return
    assert len(alarms) == 1, alarms
    assert start <= alarms[0] < ep.stop
    assert res.alarm_index.tolist() == alarms.tolist()


def test_a_lone_outlier_inside_the_range_needs_a_second_observation() -> None:
    # one noisy-but-possible sample is not an episode; two in a row are (the one-step
    # surprise counts when the next observation confirms it)
    n, at = 1500, 1200
    t, v = sensor_series(n, 5, step_ms=60_000)  # a day of readings: the range is the cycle's
    jump = 3.0 if v[at] < 21.0 else -3.0  # 10 noise scales, towards the middle of the range
    lone, pair = v.copy(), v.copy()
    lone[at] += jump
    pair[at : at + 2] += jump
    assert not run(lone, t).alarm[at - 5 :].any()
    alarms = np.flatnonzero(run(pair, t).alarm)
    assert alarms.tolist() == [at + 1]


@pytest.mark.parametrize("kind", ["frequency", "shape"])
def test_a_pattern_change_within_the_range_raises_one_contextual_alarm(kind: str) -> None:
    # a clean 24-sample cycle turns twice as fast, or square: every value stays in the range
    # and the level and scale stay put, but the recent windows match none of the past ones
    rng = np.random.default_rng(11)
    n, at = 900, 700
    i = np.arange(n)
    v = np.sin(2 * np.pi * i / 24) + rng.normal(0, 0.05, n)
    if kind == "frequency":
        v[at:] = np.sin(2 * np.pi * i[at:] / 12) + rng.normal(0, 0.05, n - at)
    else:
        v[at:] = 0.9 * np.sign(np.sin(2 * np.pi * i[at:] / 24)) + rng.normal(0, 0.05, n - at)
    bank = DetectorBank(1)
    t = T0 + i * 60_000
    alarms, causes = [], []
    for j in range(n):
        res = bank.step(np.array([0]), t[j : j + 1], v[j : j + 1])
        if res.alarm[0]:
            alarms.append(j)
            causes.append(anomaly.CAUSES[int(res.cause[0])])
    assert len(alarms) == 1 and at <= alarms[0] < at + detectors.KNN_W, alarms
    assert causes == ["shift"]


def test_without_context_a_row_keeps_only_the_recent_values_and_no_knn_test() -> None:
    # the frequency change of the test above: without the contextual test it raises nothing,
    # and the row holds only the values the anomaly vector shows
    rng = np.random.default_rng(11)
    n, at = 900, 700
    i = np.arange(n)
    v = np.sin(2 * np.pi * i / 24) + rng.normal(0, 0.05, n)
    v[at:] = np.sin(2 * np.pi * i[at:] / 12) + rng.normal(0, 0.05, n - at)
    t = T0 + i * 60_000
    assert run(v, t, context=True).alarm.any()
    bank = DetectorBank(2)
    res = bank.score_batch(np.ones(n, np.int64), t, v, context=False)
    assert not res.alarm.any()
    row = bank.state[1]
    hist = row[detectors.HIST : detectors.HIST + detectors.HIST_LEN]
    assert np.array_equal(hist[-anomaly.WINDOW_LEN :], v[-anomaly.WINDOW_LEN :])
    assert not hist[: -anomaly.WINDOW_LEN].any()
    assert not row[detectors.KNN_D : detectors.KNN_D + detectors.KNN_REF].any()
    assert not bank.state[0].any()  # the other row is untouched
    vec = bank.anomaly_vector(np.array([1]), np.array([0.0]))[0, : anomaly.WINDOW_LEN]
    assert np.corrcoef(vec, v[-anomaly.WINDOW_LEN :])[0, 1] > 0.99


def test_running_window_distances_equal_direct_ones() -> None:
    # running sums over a random walk with a huge spike, long gone
    rng = np.random.default_rng(2)
    v = np.cumsum(rng.normal(size=400))
    v[250] = 1e12
    bank = DetectorBank(1)
    bank.score_batch(np.zeros(len(v), np.int64), T0 + np.arange(len(v)) * 1000, v)
    row = bank.state[0]
    hist = row[detectors.HIST : detectors.HIST + detectors.HIST_LEN]
    assert np.array_equal(hist, v[-detectors.HIST_LEN :])
    w, h = detectors.KNN_W, detectors.HIST_LEN
    for c in range(detectors.KNN_REF):
        lag = detectors.KNN_GAP + detectors.KNN_REF - 1 - c
        want = np.sum((hist[h - w :] - hist[h - w - lag : h - lag]) ** 2)
        assert row[detectors.KNN_D + c] == pytest.approx(want, rel=1e-9, abs=1e-9)


def test_alarm_vectors_follow_the_layout() -> None:
    t, v = sensor_series(1000, 9)
    v[700] += 60.0
    res = run(v, t)
    assert res.vectors.shape == (1, anomaly.VECTOR_DIM) and res.vectors.dtype == np.float32
    vec = res.vectors[0]
    assert np.all(np.abs(vec) <= 1.0)
    assert vec[anomaly.WINDOW_LEN - 1] == 1.0  # the spike, clipped, is the newest value
    assert vec[anomaly.F_SCORE] == pytest.approx(res.score[700], abs=1e-6)
    hour = 2 * np.pi * (t[700] % DAY) / DAY
    assert vec[anomaly.F_HOUR_SIN] == pytest.approx(math.sin(hour), abs=1e-6)
    assert vec[anomaly.F_SURPRISE] == 1.0
    # a fresh entity's vector is padded with zeros before its first values
    bank = DetectorBank(1)
    bank.step(np.array([0]), np.array([T0]), np.array([5.0]))
    fresh = bank.anomaly_vector(np.array([0]), np.array([0.0]))
    assert np.all(fresh[0, : anomaly.WINDOW_LEN - 1] == 0.0)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**16),
    n=st.integers(2, 150),
    cut=st.floats(0.0, 1.0),
    stuck=st.booleans(),
    context=st.booleans(),
)
def test_snapshot_restore_replays_bit_identically(
    seed: int, n: int, cut: float, stuck: bool, context: bool
) -> None:
    rng = np.random.default_rng(seed)
    t = T0 + np.cumsum(rng.integers(0, 3_600_000, n))
    v = np.round(rng.standard_t(3, n) * 10, 1)
    if stuck:
        v[n // 2 :] = v[n // 2]
    v[rng.random(n) < 0.02] = np.nan
    whole = DetectorBank(1, detectors.DetectorParams(warmup=10))
    straight = whole.score_batch(np.zeros(n, np.int64), t, v, context)
    k = int(cut * n)
    first = DetectorBank(1, whole.params)
    a = first.score_batch(np.zeros(k, np.int64), t[:k], v[:k], context)
    (blob,) = first.snapshot([0])
    second = DetectorBank(3, whole.params)
    second.restore([2], [blob])
    b = second.score_batch(np.full(n - k, 2, np.int64), t[k:], v[k:], context)
    assert np.array_equal(np.r_[a.score, b.score], straight.score)
    assert np.array_equal(np.r_[a.alarm, b.alarm], straight.alarm)
    assert second.snapshot([2]) == whole.snapshot([0])


def test_snapshot_header_and_size() -> None:
    # a row stepped without context (or one that has seen nothing) is written compact
    t, v = sensor_series(200, 4)
    bank = DetectorBank(4)
    bank.score_batch(np.zeros(200, np.int64), t, v)
    bank.score_batch(np.ones(200, np.int64), t, v, context=False)
    blobs = bank.snapshot([0, 1, 2, 3, 0])
    assert [len(b) for b in blobs] == [detectors.SNAPSHOT_BYTES] + [detectors.COMPACT_BYTES] * 3 + [
        detectors.SNAPSHOT_BYTES
    ]
    assert all(b[:3] == b"PDS" for b in blobs)
    assert [b[3] for b in blobs] == [6, 7, 7, 7, 6]  # versions
    assert detectors.COMPACT_BYTES < 0.3 * detectors.SNAPSHOT_BYTES
    for row, blob in zip([0, 1, 2, 3], blobs, strict=False):
        assert np.array_equal(detectors.decode(blob), bank.state[row])


def test_snapshots_of_versions_4_and_5_load_and_continue_as_before() -> None:
    """States saved by the release before the time-of-week correction (two predictors, the
    profile before the history) load, and the next 200 observations score exactly as that
    release scored them (the fixture holds its snapshots and scores; the series is 10 days
    long, so the correction, which needs two weeks, does not engage)."""
    fixture = json.loads((DATA / "detector_snapshots_v4_v5.json").read_text())
    series = fixture["series"]
    cut = series["cut"]
    t, v = np.array(series["t"], np.int64)[cut:], np.array(series["v"])[cut:]
    for name, version in (("v4", 4), ("v5", 5)):
        old = fixture[name]
        blob = bytes.fromhex(old["snapshot"])
        assert blob[3] == version
        bank = DetectorBank(1)
        bank.restore([0], [blob])
        row = bank.state[0]
        for col in (detectors.LEV, detectors.SC, detectors.ERR, detectors.LS, detectors.SS):
            assert row[col + 2] == row[col + 1]  # the third predictor starts as the second
        if not old["context"]:
            bank.drop_context([0])  # as the worker does for a row it steps without context
        got = bank.score_batch(np.zeros(len(t), np.int64), t, v, old["context"])
        assert got.score.tolist() == old["score"], name
        assert np.flatnonzero(got.alarm).tolist() == old["alarm"] != []
        (again,) = bank.snapshot([0])
        assert again[3] == (6 if old["context"] else 7)


def test_the_time_of_week_correction_finds_a_weekday_that_looks_like_a_sunday() -> None:
    """Ten weeks of a weekly pattern (a daytime peak on weekdays, none at weekends) and a
    holiday: a Wednesday without its peak. The time-of-day profile alone, which averages
    weekdays and weekends, gives it a score of 0.10 (measured with the release before the
    correction); once two weeks have been seen the correction predicts better and the holiday
    raises an alarm, while the same series without it raises none that day."""
    step = 1_800_000
    n = 48 * 7 * 10  # half-hourly
    t = T0 + np.arange(n, dtype=np.int64) * step
    rng = np.random.default_rng(11)
    day = ((t // DAY) + 3) % 7  # 0 = Monday (1970-01-01 was a Thursday)
    hour = (t % DAY) / 3_600_000
    busy = np.where(day < 5, 1.0, 0.0) * np.exp(-(((hour - 14) / 4) ** 2))
    v = np.round(100 + 400 * busy + rng.normal(0, 8, n), 1)
    # the first Wednesday after eight weeks
    wed = next(d for d in range(int(T0 // DAY) + 57, int(T0 // DAY) + 64) if (d + 3) % 7 == 2)
    holiday = np.flatnonzero(t // DAY == wed)
    assert holiday.size == 48 and set(day[holiday].tolist()) == {2}
    v_h = v.copy()
    v_h[holiday] = np.round(100 + rng.normal(0, 8, holiday.size), 1)
    bank = DetectorBank(1)
    got = bank.score_batch(np.zeros(n, np.int64), t, v_h)
    assert np.isin(np.flatnonzero(got.alarm), holiday).any()
    row = bank.state[0]
    assert row[detectors.ERR + 2] < 0.8 * row[detectors.ERR + 1]
    assert row[detectors.WSEAS_N : detectors.WSEAS_N + detectors.WBINS].all()
    calm = DetectorBank(1).score_batch(np.zeros(n, np.int64), t, v)
    assert not np.isin(np.flatnonzero(calm.alarm), holiday).any()
    assert calm.score[holiday].max() < 0.3


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda b: b[:5], "too short"),
        (lambda b: b"XXX" + b[3:], "bad magic"),
        (lambda b: b[:3] + b"\x0a" + b[4:], "version 10"),
        (lambda b: b[:3] + b"\x02" + b[4:], "version 2"),
        (lambda b: b[:3] + b"\x03" + b[4:], "version 3"),
        (lambda b: b[:3] + b"\x06" + b[4:], "layout"),  # a compact row as version 6
        (lambda b: b[:3] + b"\x09" + b[4:], "layout"),  # ... or as a compact head
        (lambda b: b[:3] + b"\x04" + b[4:], "layout"),  # ... or as version 4
        (lambda b: b + b"\x00", "expected"),
        (lambda b: b[:-8] + np.float64(np.nan).tobytes(), "non-finite"),
        (lambda b: b[:8] + np.float64(-1.0).tobytes() + b[16:], "negative or fractional"),
    ],
)
def test_bad_snapshots_say_why(mutate: object, reason: str) -> None:
    (blob,) = DetectorBank(1).snapshot([0])
    with pytest.raises(SnapshotError, match=reason):
        detectors.decode(mutate(blob))  # type: ignore[operator]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2 * detectors.SNAPSHOT_BYTES))
def test_decoding_arbitrary_bytes_fails_only_with_snapshot_error(data: bytes) -> None:
    try:
        row = detectors.decode(data)
    except SnapshotError:
        return
    assert row.shape == (detectors.WIDTH,)


def _trained() -> tuple[bytes, int]:
    t, v = sensor_series(200, 4)
    bank = DetectorBank(1)
    bank.score_batch(np.zeros(200, np.int64), t, v)
    return bank.snapshot([0])[0], int(t[-1])


TRAINED = _trained()


@settings(max_examples=200, deadline=None)
@given(st.integers(0, detectors.SNAPSHOT_BYTES - 1), st.integers(0, 255))
def test_decoding_a_corrupted_snapshot_never_crashes(at: int, byte: int) -> None:
    good, t_last = TRAINED
    blob = bytearray(good)
    blob[at] = byte
    try:
        row = detectors.decode(bytes(blob))
    except SnapshotError:
        return
    fresh = DetectorBank(1)
    fresh.set_rows([0], row[None])
    res = fresh.step(np.array([0]), np.array([t_last + 500]), np.array([21.0]))
    assert 0.0 <= res.score[0] <= 1.0


@pytest.mark.parametrize("value", [0.1, 1e300])
def test_a_time_of_week_value_that_is_not_a_float32_is_refused(value: float) -> None:
    """The bank keeps the correction as float32 (a snapshot holds those values exactly): one
    that float32 cannot hold exactly, or at all, is not a snapshot this code wrote."""
    good, _ = TRAINED
    assert good[3] == 6
    at = 8 + 8 * detectors.WSEAS  # the first bin of the correction
    bad = good[:at] + np.float64(value).tobytes() + good[at + 8 :]
    with pytest.raises(SnapshotError, match="not a float32"):
        detectors.decode(bad)


def test_restore_loads_nothing_when_a_blob_is_bad() -> None:
    bank = DetectorBank(2)
    bank.step(np.array([0, 1]), np.array([T0, T0]), np.array([1.0, 2.0]))
    before = bank.state.copy()
    good = bank.snapshot([0])[0]
    with pytest.raises(SnapshotError):
        bank.restore([0, 1], [good, b"junk"])
    assert np.array_equal(bank.state, before)


@pytest.mark.parametrize("context", [True, False], ids=["context", "no-context"])
def test_huge_values_keep_the_state_finite(context: bool) -> None:
    bank = DetectorBank(1, detectors.DetectorParams(warmup=2))
    v = np.array([1.0, 2.0, 1e308, -1e308, 3.0, np.inf, 1.0, 1e150, -np.inf, np.nan, 1e-300])
    v = np.tile(v, 20)  # long enough for the contextual test to run
    t = T0 + np.arange(len(v)) // 3 * 10**15  # repeated timestamps, huge gaps
    res = bank.score_batch(np.zeros(len(v), np.int64), t, v, context)
    assert np.all((res.score >= 0) & (res.score <= 1))
    assert np.isfinite(bank.state).all()
    detectors.decode(bank.snapshot([0])[0])


def test_predictive_z_maps_student_t_quantiles_to_normal_ones() -> None:
    # two-sided 5 % and 1 % critical values of Student t (10 and 20 df) and a large-df case,
    # as standardised values of the predictive t (zu = t·sqrt((ν+1)/ν))
    t = np.array([2.228, 2.845, 3.0])
    nu = np.array([10.0, 20.0, 1e9])
    zu = t * np.sqrt((nu + 1.0) / nu)
    z = detectors.predictive_z(zu, nu)
    assert np.allclose(z, [1.960, 2.576, 3.0], atol=0.01)
    assert np.array_equal(detectors.predictive_z(-zu, nu), -z)


def test_clustered_repeats_of_a_count_are_not_stuck_but_a_frozen_reading_is() -> None:
    # a count that drops to zero for a few intervals now and then: its runs of zeros are
    # clustered (a zero is likely after a zero), which the run's rate learns
    rng = np.random.default_rng(3)
    n = 3000
    t = T0 + np.arange(n, dtype=np.int64) * 300_000
    v = rng.poisson(20.0, n).astype(np.float64)
    for start in range(150, n - 10, 97):
        v[start : start + int(rng.integers(3, 7))] = 0.0
    bank = DetectorBank(1)
    row = np.zeros(1, np.int64)
    causes = [int(bank.step(row, t[i : i + 1], v[i : i + 1]).cause[0]) for i in range(n)]
    assert anomaly.CAUSES.index("stuck") not in causes  # (the drops may raise other tests)
    # ... while a continuous reading that freezes raises one alarm there
    t2, v2 = sensor_series(1500, 4, step_ms=60_000)
    v2[1200:1210] = v2[1199]
    alarms = np.flatnonzero(run(v2, t2).alarm)
    assert len(alarms) == 1 and 1201 <= alarms[0] < 1210


def test_adding_rows_keeps_the_state_of_the_others() -> None:
    bank = DetectorBank(3)
    rng = np.random.default_rng(5)
    for k in range(150):  # enough observations to fill every part of a row
        bank.step(np.arange(3), np.full(3, 1_700_000_000_000 + k * 10_000), rng.normal(size=3))
    before = bank.state
    assert bank.add(4).tolist() == [3, 4, 5, 6]
    assert len(bank) == 7 and bank.state.shape == (7, detectors.WIDTH)
    assert np.array_equal(bank.state[:3], before)
    assert np.array_equal(bank.state[3:], detectors.fresh_rows(4))


def test_rows_are_copies_and_set_rows_writes_every_column() -> None:
    bank = DetectorBank(3)
    rng = np.random.default_rng(9)
    for k in range(150):
        bank.step(np.arange(3), np.full(3, 1_700_000_000_000 + k * 10_000), rng.normal(size=3))
    rows = bank.rows([2, 0])
    assert np.array_equal(rows, bank.state[[2, 0]])
    rows[:] = 7.0  # a copy: the bank is unchanged
    assert not np.array_equal(bank.state[[2, 0]], rows)
    middle = bank.rows([1])[0]
    new = np.arange(2 * detectors.WIDTH, dtype=np.float64).reshape(2, detectors.WIDTH)
    bank.set_rows([2, 0], new)
    assert np.array_equal(bank.rows([2, 0]), new)
    assert middle.any() and np.array_equal(bank.rows([1])[0], middle)  # untouched


def test_only_rows_stepped_with_context_hold_a_time_of_week_correction() -> None:
    """The correction (1.3 KB a row) is kept only for the rows that have one: those stepped
    with context. 100 of 200 rows are (more than the first allocation, so its room grows),
    the others stay without; rows, set_rows, clear and growth keep every row's columns."""
    bank = DetectorBank(200)
    ctx, plain = np.arange(0, 200, 2), np.arange(1, 200, 2)
    rng = np.random.default_rng(4)
    for k in range(120):
        t = np.full(100, T0 + k * 1_800_000)
        bank.step(ctx, t, 10 + rng.normal(size=100))
        bank.step(plain, t, 10 + rng.normal(size=100), context=False)
    week = slice(detectors.WSEAS, detectors.WIDTH)
    state = bank.state
    assert state[ctx, week].any(axis=1).all() and not state[plain, week].any()
    assert bank._wused == 100  # no column for a row stepped without context
    bank.add(300)  # the rows' room grows: every row keeps its columns
    assert np.array_equal(bank.state[:200], state)
    # a row without a column gets one when it is given a correction, not before
    bank.set_rows([1, 3], state[[0, 5]])
    assert bank._wused == 101
    assert np.array_equal(bank.rows([1, 3]), state[[0, 5]])
    bank.clear(np.array([0, 1]))
    assert not bank.rows([0, 1]).any()
    assert np.array_equal(bank.state[2:200], np.r_[state[[2]], state[[0, 5]][1:], state[4:200]])


@pytest.mark.parametrize("bad", [[3], [-1], [0, 64]])
def test_rows_outside_the_bank_are_refused(bad: list[int]) -> None:
    # the blocks have room past the rows in use (and numpy takes -1 from the end): a wrong
    # index must not read or write that room silently
    bank = DetectorBank(3)
    idx = np.asarray(bad, dtype=np.int64)
    with pytest.raises(IndexError, match="not in a bank of 3 rows"):
        bank.rows(idx)
    with pytest.raises(IndexError):
        bank.set_rows(idx, np.zeros((idx.size, detectors.WIDTH)))
    with pytest.raises(IndexError):
        bank.step(idx, np.full(idx.size, 1_700_000_000_000), np.zeros(idx.size))
    for op in (bank.clear, bank.drop_context, bank.snapshot):
        with pytest.raises(IndexError):
            op(idx)
    assert not bank.state.any()  # nothing was written


def test_rows_kept_by_group_step_as_rows_kept_in_order() -> None:
    """A bank told its rows come in groups (an entity's signals) keeps each member of the groups
    together: that changes where a row is kept, never what it holds. Two banks, one flat and
    one by groups of three, step the same rows (one member of every group at a time, in a
    shuffled order), grow past their first room, restore snapshots, clear rows and drop their
    context, and hold the same states and results throughout."""
    flat, grouped = DetectorBank(0), DetectorBank(0, group=3)
    rng = np.random.default_rng(11)
    for bank in (flat, grouped):
        assert bank.add(30).tolist() == list(range(30))
    entities = 10
    for k in range(130):
        if k == 60:  # grow: more entities than the first room holds
            assert flat.add(300).tolist() == grouped.add(300).tolist()
            entities = 110
        t = T0 + k * 10_000
        blocks = rng.permutation(entities) * 3
        # each entity at its own level: a result is its row's (the caller's order is kept)
        level = 100.0 * (blocks // 3)
        values = level + rng.normal(0.0, 2.0, entities)
        for member, context in ((0, True), (1, False), (2, False)):
            rows = blocks + member
            a = flat.step(rows, np.full(entities, t), values + member, context)
            b = grouped.step(rows, np.full(entities, t), values + member, context)
            for x, y in zip(a, b, strict=True):
                assert np.array_equal(x, y)
            if k > 70:  # the rows added at k = 60 have learned their level
                assert np.allclose(b.expected, level + member, atol=10.0)
    assert np.array_equal(flat.state, grouped.state)
    some = rng.permutation(330)[:40]
    snaps = flat.snapshot(some)
    assert grouped.snapshot(some) == snaps
    for bank in (flat, grouped):
        bank.restore(some[::-1], snaps)
        bank.clear(np.array([4, 5, 6]))
        bank.drop_context(np.array([9, 12]))
    assert np.array_equal(flat.state, grouped.state)
    hit = np.array([0, 3, 9])
    vectors = flat.anomaly_vector(hit, np.ones(3)), grouped.anomaly_vector(hit, np.ones(3))
    assert np.array_equal(*vectors)
    with pytest.raises(IndexError, match="not in a bank of 330 rows"):
        grouped.rows([330])


T0 = 1_700_000_000_000 - 1_700_000_000_000 % (7 * 86_400_000)  # a week's start (Thursday 0:00)


def test_a_head_and_its_profile_chunks_restore_a_row_exactly() -> None:
    """Rows stepped for two weeks (with and without context): their heads and profile
    chunks load into another bank as the same rows; a step marks the chunks of its bins."""
    n = 14 * 48
    t = T0 + np.arange(n, dtype=np.int64) * 1_800_000
    rng = np.random.default_rng(4)
    bank = DetectorBank(3)
    for row, context in ((0, True), (1, False)):
        v = 20 + np.sin(2 * np.pi * np.arange(n) / 48) + rng.standard_normal(n)
        bank.score_batch(np.full(n, row, np.int64), t, v, context)
    rows = np.array([0, 1, 2])  # row 2 never stepped
    heads = bank.snapshot_heads(rows)
    assert [len(h) for h in heads] == [
        detectors.HEAD_BYTES,
        detectors.HEAD_COMPACT_BYTES,
        detectors.HEAD_COMPACT_BYTES,
    ]
    assert not any(detectors.holds_profile(h) for h in heads)
    at, which = np.divmod(np.arange(3 * detectors.CHUNKS), detectors.CHUNKS)
    blobs, zero = bank.chunks(rows[at], which)
    assert {len(b) for b in blobs} == {detectors.CHUNK_BYTES}
    # the row without context has no time-of-week correction; the unstepped row nothing
    week = which >= detectors.DAY_CHUNKS
    assert not zero[at == 0].any() and zero[(at == 1) & week].all() and zero[at == 2].all()
    other = DetectorBank(3)
    other.restore(rows, heads)
    assert other.restore_chunks(
        rows[at][~zero], which[~zero], [b for b, z in zip(blobs, zero, strict=True) if not z]
    ).all()
    assert np.array_equal(other.state, bank.state)
    # a step changes the day chunk of its time (and the week chunk with context)
    bank.take_dirty(rows)
    t1 = T0 + 3 * 86_400_000 + 13 * 3_600_000  # 13:00 on the fourth day
    bank.step(np.array([0, 1]), np.array([t1, t1]), np.array([20.0, 20.0]))
    day, weekday = 13 // 6, 3
    assert bank.take_dirty([0]).tolist() == [1 << day | 1 << (detectors.DAY_CHUNKS + weekday)]
    bank.clear(np.array([2]))
    assert bank.take_dirty([2]).tolist() == [detectors.ALL_CHUNKS]


@pytest.mark.parametrize(
    "blob",
    [
        b"short",
        np.full(24, np.nan).tobytes(),  # not finite
        np.r_[np.zeros(12), -np.ones(12)].tobytes(),  # negative visits
        np.r_[np.zeros(12), np.full(12, 0.5)].tobytes(),  # fractional visits
    ],
)
def test_a_bad_profile_chunk_is_not_loaded(blob: bytes) -> None:
    bank = DetectorBank(1)
    assert bank.restore_chunks([0], np.array([1]), [blob]).tolist() == [False]
    assert not bank.state.any()
