"""The site table's read path without a store: statistics-only decoding, roll-ups, top rows."""

from __future__ import annotations

import numpy as np
import pytest

from dashboard import queries
from schemas import packed
from tests.unit.test_dashboard_merge import _hashes, table_of


def test_decode_stats_equals_decode_without_buckets() -> None:
    rng = np.random.default_rng(3)
    rows = [rng.lognormal(2, 1, int(rng.integers(1, 300))).round(2).tolist() for _ in range(50)]
    for extra, nf in (((), packed.NF_SENSOR), ([[1.0] * 6] * 50, packed.NF_APPLOG)):
        values = packed.encode(table_of(rows, extra))
        whole, bare = packed.decode(values, nf), packed.decode_stats(values, nf)
        assert bare.stats.tolist() == whole.stats.tolist()
        assert bare.rows == 50 and bare.code.size == 0 and bare.count.size == 0
    assert packed.decode_stats([], packed.NF_SENSOR).rows == 0


@pytest.mark.parametrize(
    "bad",
    [b"xx", b"\x01\x05\x01\x01" + bytes(20), b"\x02" + bytes(47), b"\x01\x0b\x01\x01" + bytes(92)],
)
def test_decode_stats_raises_as_decode_does(bad: bytes) -> None:
    good = packed.encode(table_of([[1.0, 2.0]]))
    values = good * 3 + [bad]
    with pytest.raises(packed.PackedError) as whole:
        packed.decode(values, packed.NF_SENSOR)
    with pytest.raises(packed.PackedError) as bare:
        packed.decode_stats(values, packed.NF_SENSOR)
    assert bare.value.index == whole.value.index == 3
    assert str(bare.value) == str(whole.value)


def test_a_value_with_trailing_bytes_is_malformed_for_both() -> None:
    (good,) = packed.encode(table_of([[1.0, 2.0, 3.0]]))
    with pytest.raises(packed.PackedError):
        packed.decode_stats([good + b"\x00"], packed.NF_SENSOR)


def test_first_rows_keeps_every_row_tied_with_the_last() -> None:
    key = np.array([3.0, 1.0, np.nan, 2.0, 2.0, 5.0, 2.0])
    assert queries.first_rows(key, 2).tolist() == [1, 3, 4, 6]
    assert queries.first_rows(key, 1).tolist() == [1]
    assert queries.first_rows(key, 6).tolist() == [0, 1, 3, 4, 5, 6]
    assert queries.first_rows(key, 7).tolist() == list(range(7))  # NaN last, but kept
    assert queries.first_rows(np.array([]), 3).size == 0


def test_panes_of_flat_replies_equal_panes_of_maps() -> None:
    """RESP2 gives a hash as ``[name, value, ...]``: the same panes as from RESP3's maps."""
    hashes = _hashes([{"a": [1.0, 2.0], "b": [5.0]}, {"a": [3.0]}, {}, {"b": [7.0, 8.0]}])
    flat = [[x for pair in h.items() for x in pair] for h in hashes]
    for sketch in (True, False):
        maps = queries.panes_of_hashes(hashes, 2, packed.NF_SENSOR, sketch)
        lists = queries.panes_of_hashes(flat, 2, packed.NF_SENSOR, sketch)
        for m, li in zip(maps, lists, strict=True):
            assert m.names.tolist() == li.names.tolist()
            np.testing.assert_array_equal(m.table.stats, li.table.stats)
            assert m.table.code.tolist() == li.table.code.tolist()


def test_pane_cache_forgets_rollups_when_a_watermark_goes_back() -> None:
    cache = queries.PaneCache(max_rollups=2)
    rollup = queries.Rollup.empty(packed.NF_SENSOR)
    for i in range(3):
        cache.put_rollup(("sensor", i), rollup)
    assert cache.rollup(("sensor", 0)) is None and cache.rollup(("sensor", 2)) is rollup
    cache.observe("sensor", 100)
    assert cache.observe("sensor", 99)
    assert cache.rollup(("sensor", 2)) is None
    cache.put_rollup(("sensor", 5), rollup)
    cache.clear()
    assert cache.rollup(("sensor", 5)) is None


def test_site_view_checks_its_order_and_limit() -> None:
    assert queries.SiteView().order_by == "readings"
    with pytest.raises(ValueError, match="order_by"):
        queries.SiteView(order_by="sum")
    with pytest.raises(ValueError, match="limit"):
        queries.SiteView(limit=0)
