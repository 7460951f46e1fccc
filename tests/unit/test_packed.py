"""The packed window value: round trips, the smallest widths, one merge rule, vectorised quantiles,
and clear errors (never a crash or a wrong table) for bytes that are not a packed value."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas import packed, sketch

NOT_TIMED = [HealthCheck.too_slow]
finite = st.floats(min_value=-1e12, max_value=1e12, allow_nan=False, allow_infinity=False)


def table_of(groups: list[list[float]], nf: int = packed.NF_SENSOR) -> packed.Table:
    rows = []
    for vals in groups:
        v = np.asarray(vals, dtype=np.float64)
        stats = [v.size, v.sum(), (v * v).sum(), v.min(), v.max()]
        if nf == packed.NF_SENSOR:
            stats += [float(np.count_nonzero(v[1:] == v[:-1])), v[0], v[-1]]
        rows.append(stats + [float(i) for i in range(nf - len(stats))])
    row = np.concatenate([np.full(len(v), i, dtype=np.int64) for i, v in enumerate(groups)])
    codes = sketch.bucket_codes(np.concatenate([np.asarray(v, float) for v in groups]))
    return packed.from_values(np.array(rows), row, codes, np.ones(codes.size, dtype=np.int64))


@given(st.lists(st.lists(finite, min_size=1, max_size=40), min_size=1, max_size=20))
@settings(max_examples=150, deadline=None, suppress_health_check=NOT_TIMED)
def test_round_trip(groups: list[list[float]]) -> None:
    t = table_of(groups)
    d = packed.decode(packed.encode(t), packed.NF_SENSOR)
    assert np.array_equal(d.stats, t.stats)
    assert np.array_equal(d.row, t.row)
    assert np.array_equal(d.code, t.code)
    assert np.array_equal(d.count, t.count)
    assert packed.problems(d) == []


def reference_encode(t: packed.Table) -> list[bytes]:
    """The layout of schemas/packed.py's docstring, value by value."""
    import struct

    out = []
    for i in range(t.rows):
        mine = t.row == i
        codes, counts = t.code[mine], t.count[mine]
        base = int(codes[0]) if codes.size else 0
        cw = packed_width(int(codes[-1]) - base if codes.size else 0)
        nw = packed_width(int(counts.max()) if counts.size else 0)
        value = struct.pack("<BBBBi", packed.VERSION, t.nf, cw, nw, base)
        value += t.stats[i].astype("<f8").tobytes()
        value += (codes - base).astype(f"<u{cw}").tobytes() + counts.astype(f"<u{nw}").tobytes()
        out.append(value)
    return out


def packed_width(x: int) -> int:
    return 1 if x < 2**8 else 2 if x < 2**16 else 4


@given(
    st.lists(
        st.lists(finite, min_size=1, max_size=120) | st.lists(finite, min_size=1, max_size=3),
        min_size=1,
        max_size=30,
    )
)
@settings(max_examples=150, deadline=None, suppress_health_check=NOT_TIMED)
def test_values_with_short_and_long_sketches_are_laid_out_byte_for_byte(
    groups: list[list[float]],
) -> None:
    # short sketches go in fixed-width slots, long ones end to end: the bytes are the same
    t = table_of(groups)
    assert packed.encode(t) == reference_encode(t)


def test_applog_values_round_trip_with_their_eleven_statistics() -> None:
    t = table_of([[1.0, 2.0], [3.0]], nf=packed.NF_APPLOG)
    d = packed.decode(packed.encode(t))
    assert d.nf == packed.NF_APPLOG and np.array_equal(d.stats, t.stats)
    with pytest.raises(packed.PackedError, match="with 8 statistics"):
        packed.decode(packed.encode(t), packed.NF_SENSOR)


def test_widths_are_the_smallest_that_fit() -> None:
    narrow = table_of([[20.0, 20.1, 20.2, 21.0]])
    (value,) = packed.encode(narrow)
    assert value[2:4] == b"\x01\x01"  # one-byte code offsets and counts
    assert len(value) == 8 + 8 * packed.NF_SENSOR + 2 * narrow.code.size
    many = packed.from_values(
        narrow.stats.copy() * [1000, 1, 1, 1, 1, 0, 1, 1],
        np.zeros(1, np.int64),
        narrow.code[:1],
        np.array([1000]),
    )
    wide = packed.from_values(
        np.array([[2, 0, 0, 1e-6, 1e9, 0, 1e-6, 1e9]]),
        np.zeros(2, np.int64),
        sketch.bucket_codes([1e-6, 1e9]),
        np.ones(2, np.int64),
    )
    assert packed.encode(many)[0][2:4] == b"\x01\x02"
    assert packed.encode(wide)[0][2:4] == b"\x02\x01"
    for t in (many, wide):
        assert np.array_equal(packed.decode(packed.encode(t)).count, t.count)


@given(
    st.lists(st.lists(finite, min_size=1, max_size=30), min_size=1, max_size=12),
    st.integers(min_value=1, max_value=4),
)
@settings(max_examples=100, deadline=None, suppress_health_check=NOT_TIMED)
def test_merge_equals_the_values_taken_together(groups: list[list[float]], n: int) -> None:
    t = packed.decode(packed.encode(table_of(groups)))
    g = np.arange(len(groups)) % n
    m = packed.merge(t, g, n)
    for j in range(n):
        members = [groups[i] for i in range(len(groups)) if g[i] == j]
        if not members:
            assert m.stats[j, packed.COUNT] == 0
            continue
        whole = table_of([[x for vals in members for x in vals]])
        assert m.stats[j, packed.COUNT] == whole.stats[0, packed.COUNT]
        assert m.stats[j, packed.MIN] == whole.stats[0, packed.MIN]
        assert m.stats[j, packed.MAX] == whole.stats[0, packed.MAX]
        assert np.isclose(m.stats[j, packed.SUM], whole.stats[0, packed.SUM], rtol=1e-9, atol=1e-3)
        sel = m.row == j
        assert np.array_equal(m.code[sel], whole.code)
        assert np.array_equal(m.count[sel], whole.count)


@given(st.lists(st.lists(finite, min_size=0, max_size=50), min_size=1, max_size=10))
@settings(max_examples=150, deadline=None, suppress_health_check=NOT_TIMED)
def test_quantiles_match_the_scalar_estimate(groups: list[list[float]]) -> None:
    nonempty = [g if g else [0.0] for g in groups]
    t = table_of(nonempty)
    empty = [i for i, g in enumerate(groups) if not g]
    keep = t.row != -1
    for i in empty:
        keep &= t.row != i
    t = packed.Table(t.stats, t.row[keep], t.code[keep], t.count[keep])
    qs = (0.0, 0.5, 0.9, 0.99, 1.0)
    got = packed.quantiles(t, qs)
    for i, vals in enumerate(groups):
        want = sketch.quantiles(sketch.sketch_of(vals), qs) if vals else [None] * len(qs)
        for g, w in zip(got[i].tolist(), want, strict=True):
            if w is None:
                assert np.isnan(g)
            else:
                assert g == pytest.approx(w, rel=1e-12, abs=1e-300)


@given(st.lists(st.binary(max_size=80), min_size=1, max_size=8))
@settings(max_examples=400, deadline=None, suppress_health_check=NOT_TIMED)
def test_arbitrary_bytes_decode_or_fail_clearly(values: list[bytes]) -> None:
    # a sensor reader also meets values of the earlier 5-statistic layout
    old = packed.encode(packed.Table(np.ones((1, packed.NF_BASE)), *([np.zeros(0, np.int64)] * 3)))
    readers: tuple[Callable[[list[bytes]], packed.Table], ...] = (
        packed.decode,
        lambda vs: packed.decode_stats(vs, packed.NF_SENSOR),
    )
    for vals in (values, [*values, old[0]], [old[0], *values]):
        for read in readers:
            try:
                t = read(vals)
            except packed.PackedError as exc:
                assert exc.index is not None and 0 <= exc.index < len(vals)
                continue
            assert t.rows == len(vals)
            packed.problems(t)  # never raises


def test_corrupt_values_are_named_by_problems() -> None:
    good = packed.encode(table_of([[1.0, 2.0]]))[0]
    broken = bytearray(good)
    broken[8:16] = np.float64(3).tobytes()  # n = 3, the sketch holds 2
    t = packed.decode([good, bytes(broken)])
    assert packed.problems(t) == [("has a sketch total unequal to its count", [1])]
    nan = bytearray(good)
    nan[16:24] = np.float64(np.nan).tobytes()
    assert packed.problems(packed.decode([bytes(nan)])) == [("holds a non-finite statistic", [0])]


def legacy_values(groups: list[list[float]]) -> list[bytes]:
    """Sensor values as releases before the series statistics wrote them (5 statistics)."""
    t = table_of(groups)
    return packed.encode(packed.Table(t.stats[:, : packed.NF_BASE], t.row, t.code, t.count))


def test_values_without_the_series_statistics_decode_with_what_they_prove() -> None:
    new = packed.encode(table_of([[4.0, 4.0, 5.0]]))
    old = legacy_values([[1.0, 2.0], [3.0, 3.0, 3.0]])
    values = [old[0], new[0], old[1]]
    t = packed.decode(values, packed.NF_SENSOR)
    assert t.nf == packed.NF_SENSOR and t.rows == 3
    assert t.stats[:, packed.COUNT].tolist() == [2, 3, 3]
    # min = max proves every reading after the first repeats it; else nothing is known
    assert t.stats[:, packed.REPEATS].tolist() == [0, 1, 2]
    ends = t.stats[:, [packed.FIRST, packed.LAST]]
    assert np.isnan(ends[[0, 2]]).all() and ends[1].tolist() == [4.0, 5.0]
    assert np.array_equal(t.count, table_of([[1.0, 2.0], [4.0, 4.0, 5.0], [3.0] * 3]).count)
    assert packed.problems(t) == []
    assert np.array_equal(packed.decode_stats(values, packed.NF_SENSOR).stats, t.stats, True)
    with pytest.raises(packed.PackedError, match="value 3 ") as exc:  # its own index
        packed.decode([*values, old[0][:-1]], packed.NF_SENSOR)
    assert exc.value.index == 3
    with pytest.raises(packed.PackedError) as exc:
        packed.decode([new[0], old[0][:-1]], packed.NF_SENSOR)
    assert exc.value.index == 1
    for broken in ([b""], [old[0], b""], [b"", old[0]], [old[0], b"\x01\x05"]):
        for read in (packed.decode, packed.decode_stats):
            with pytest.raises(packed.PackedError):
                read(broken, packed.NF_SENSOR)


series_values = st.lists(st.sampled_from([0.0, 1.0, 2.5]) | finite, min_size=1, max_size=30)


@given(st.lists(series_values, min_size=1, max_size=5))
@settings(max_examples=150, deadline=None, suppress_health_check=NOT_TIMED)
def test_follow_folds_segments_of_a_series_into_the_whole(parts: list[list[float]]) -> None:
    whole = table_of([[x for p in parts for x in p]]).stats
    acc = np.zeros((1, packed.NF_SENSOR))
    acc[0, packed.MIN], acc[0, packed.MAX] = np.inf, -np.inf
    for p in parts:
        acc = packed.follow(acc, table_of([p]).stats)
    exact = [packed.COUNT, packed.MIN, packed.MAX, packed.REPEATS, packed.FIRST, packed.LAST]
    assert acc[0, exact].tolist() == whole[0, exact].tolist()
    assert np.isclose(acc[0, packed.SUM], whole[0, packed.SUM], rtol=1e-9, atol=1e-3)


def test_merge_without_an_order_keeps_no_first_or_last_reading() -> None:
    t = table_of([[1.0, 1.0], [1.0, 2.0]])
    m = packed.merge(t, [0, 0], 1)
    assert m.stats[0, packed.REPEATS] == 1
    assert np.isnan(m.stats[0, [packed.FIRST, packed.LAST]]).all()
    applog = table_of([[1.0], [2.0]], nf=packed.NF_APPLOG)
    assert np.isfinite(packed.merge(applog, [0, 0], 1).stats).all()


def test_problems_name_impossible_series_statistics() -> None:
    t = table_of([[1.0, 1.0, 2.0], [3.0]])
    bad = t.stats.copy()
    bad[0, packed.REPEATS] = 3  # three readings repeat at most two
    bad[1, packed.LAST] = np.inf
    got = packed.problems(packed.Table(bad, t.row, t.code, t.count))
    assert ("repeats more readings than it holds", [0]) in got
    assert ("holds a non-finite statistic", [1]) in got
    unknown = t.stats.copy()
    unknown[:, packed.FIRST] = np.nan  # unknown, as in a value of an earlier release
    assert packed.problems(packed.Table(unknown, t.row, t.code, t.count)) == []


# ----------------------------------------------------------------- bundles


@given(st.lists(st.lists(finite, min_size=1, max_size=10), min_size=1, max_size=20))
@settings(max_examples=80, deadline=None, suppress_health_check=NOT_TIMED)
def test_a_bundle_round_trips_its_names_and_values(groups: list[list[float]]) -> None:
    values = packed.encode(table_of(groups))
    names = [f"dev-{i}|temperature" for i in range(len(values))]
    blob = packed.encode_bundle(names, values, packed.NF_SENSOR)
    assert packed.decode_bundle(blob) == ([n.encode() for n in names], values)


def test_the_newest_bundle_holding_an_entity_gives_its_value() -> None:
    a1, a2, b1, c0 = (packed.encode(table_of([[x]]))[0] for x in (1.0, 2.0, 3.0, 4.0))
    fields = {
        b"@12": packed.encode_bundle(["a", "b"], [a2, b1], packed.NF_SENSOR),
        b"c": c0,  # a single entity's field (an earlier release): older than any bundle
        b"a": c0,
        b"@9": packed.encode_bundle(["a"], [a1], packed.NF_SENSOR),  # older: "@9" < "@12"
    }
    assert packed.entity_values(fields) == {b"a": a2, b"b": b1, b"c": c0}
    plain = {b"a": a1, b"b": b1}
    assert packed.entity_values(plain) == plain


@pytest.mark.parametrize(
    ("field", "blob", "said"),
    [
        (b"@1", b"\x02\x08\x00", "shorter than its header"),
        (b"@1", b"\x01" + bytes(11), "not a version-2 bundle"),
        (b"@1", packed.encode_bundle(["a", "b"], [b"x" * 80, b"y" * 80], 8)[:-1], "size"),
        (b"@1", packed.encode_bundle(["a", "b"], [b"x", b"y"], 8)[:12], "cut short"),
        (b"@1", packed.encode_bundle(["a|b\nc"], [b"x" * 80], 8), "names (2)"),
        (b"@x", packed.encode_bundle(["a"], [b"x" * 80], 8), "is not numbered"),
        (b"@", packed.encode_bundle(["a"], [b"x" * 80], 8), "is not numbered"),
    ],
)
def test_a_damaged_bundle_fails_clearly(field: bytes, blob: bytes, said: str) -> None:
    with pytest.raises(packed.PackedError, match=said.replace("(", r"\(").replace(")", r"\)")):
        packed.entity_values({b"a": b"v", field: blob})


@given(st.binary(max_size=64))
@settings(max_examples=300, deadline=None)
def test_arbitrary_bytes_in_a_bundle_field_resolve_or_fail_clearly(blob: bytes) -> None:
    try:
        out = packed.entity_values({b"@3": blob})
    except packed.PackedError:
        return
    assert all(isinstance(k, bytes) and isinstance(v, bytes) for k, v in out.items())
