"""The site table's read path against an in-memory store: values decoded reply by reply, names
numbered once per read, roll-ups of final panes; every number checked against the raw values."""

from __future__ import annotations

from collections.abc import Generator, Sequence

import numpy as np
import pandas as pd
import pytest
import redis

from dashboard import queries
from schemas import keys, packed
from schemas.events import EventKind
from tests.unit.test_dashboard_merge import naive_stats, table_of

NF = packed.NF_SENSOR
MIN = keys.WINDOW_1M.size_ms
NOW = 1_700_000_040_000 + 30_000  # half a minute into the last pane of the hopping window
STARTS = queries.hopping_pane_starts(keys.HOPPING_5M, NOW)


def _values(rng: np.random.Generator, n: int) -> list[list[float]]:
    return [rng.lognormal(2, 1, int(rng.integers(1, 60))).round(2).tolist() for _ in range(n)]


# --------------------------------------------------------------------------- statistics


@pytest.mark.parametrize("nf", [packed.NF_SENSOR, packed.NF_APPLOG])
def test_stats_reader_equals_decode_stats(nf: int) -> None:
    rng = np.random.default_rng(5)
    rows = _values(rng, 70)
    extra = [[float(i % 3)] * (nf - packed.NF_BASE) for i in range(70)] if nf > NF else ()
    values = packed.encode(table_of(rows, extra))
    reader = queries._StatsReader(nf)
    for lo, hi in ((0, 0), (0, 25), (25, 26), (26, 70)):  # replies of any size, an empty one
        reader.add(values[lo:hi])
    assert reader.values == values
    np.testing.assert_array_equal(reader.stats(), packed.decode_stats(values, nf).stats)
    assert queries._StatsReader(nf).stats().shape == (0, nf)


def test_stats_reader_reads_sensor_values_of_the_earlier_layout() -> None:
    """Windows written before the series statistics (5 statistics) are read beside new ones."""
    t = table_of(_values(np.random.default_rng(6), 10))
    old = packed.encode(packed.Table(t.stats[:, : packed.NF_BASE], t.row, t.code, t.count))
    values = [*packed.encode(t)[:5], *old[5:]]
    reader = queries._StatsReader(NF)
    reader.add(values)
    got = reader.stats()
    np.testing.assert_array_equal(got, packed.decode_stats(values, NF).stats)
    np.testing.assert_array_equal(got[:, : packed.NF_BASE], t.stats[:, : packed.NF_BASE])
    assert np.isnan(got[5:, packed.LAST]).all() and not np.isnan(got[:5, packed.LAST]).any()


@pytest.mark.parametrize(
    "bad",
    [
        b"xx",  # shorter than a header
        b"\x01\x05\x01\x01" + bytes(20),  # shorter than header and statistics
        b"\x02" + bytes(47),  # another version
        b"\x01\x0b\x01\x01" + bytes(92),  # applog statistics where sensor ones belong
        b"\x01\x05\x03\x01" + bytes(44),  # a width packed values never use
    ],
)
def test_stats_reader_raises_what_decode_stats_raises(bad: bytes) -> None:
    good = packed.encode(table_of([[1.0, 2.0], [3.0]]))
    values = [*good, bad, *good]
    reader = queries._StatsReader(NF)
    reader.add(values[:2])
    reader.add(values[2:])
    with pytest.raises(packed.PackedError) as fast:
        reader.stats()
    with pytest.raises(packed.PackedError) as slow:
        packed.decode_stats(values, NF)
    assert fast.value.index == slow.value.index == 2
    assert str(fast.value) == str(slow.value)


def test_stats_reader_rejects_trailing_bytes() -> None:
    (good,) = packed.encode(table_of([[1.0, 2.0, 3.0]]))
    reader = queries._StatsReader(NF)
    reader.add([good, good + b"\x00"])
    with pytest.raises(packed.PackedError):
        reader.stats()


# --------------------------------------------------------------------------- names


def test_numbering_keeps_known_rows_and_numbers_new_names_in_order() -> None:
    base = queries.Rollup.empty(NF).extended(np.asarray([b"a|x", b"b|x"], dtype=object))
    numbering = queries._Numbering(base)
    assert numbering.rows([b"b|x", b"c|y", b"a|x", b"c|y", b"d|z"]).tolist() == [1, 2, 0, 2, 3]
    assert numbering.rows([b"d|z", b"e|z"]).tolist() == [3, 4]
    assert numbering.rows([]).size == 0
    assert numbering.fresh == [b"c|y", b"d|z", b"e|z"] and len(numbering) == 5
    assert numbering.snapshot() == {b"a|x": 0, b"b|x": 1, b"c|y": 2, b"d|z": 3, b"e|z": 4}
    assert base.ids() == {b"a|x": 0, b"b|x": 1}  # the roll-up's own is not changed


def _number_all(
    base: queries.Rollup, calls: Sequence[list[bytes]], memo: queries.NameMemo | None = None
) -> tuple[list[list[int]], dict[bytes, int], list[bytes], queries.NameMemo]:
    numbering = queries._Numbering(base, memo)
    rows = [numbering.rows(names).tolist() for names in calls]
    snapshot = numbering.snapshot()
    done = numbering.finish()
    return rows, snapshot, numbering.fresh, done


def test_numbering_takes_the_rows_of_a_memo_while_the_names_match() -> None:
    base = queries.Rollup.empty(NF).extended(np.asarray([b"a|x", b"b|x"], dtype=object))
    calls = [[b"b|x", b"c|y", b"a|x"], [b"d|z", b"c|y"], []]
    rows, ids, fresh, memo = _number_all(base, calls)
    assert rows == [[1, 2, 0], [3, 2], []] and fresh == [b"c|y", b"d|z"]
    assert ids == {b"a|x": 0, b"b|x": 1, b"c|y": 2, b"d|z": 3}
    again = queries._Numbering(base, memo)
    assert [again.rows(list(names)).tolist() for names in calls] == rows
    assert again.finish() is memo and again.fresh == fresh  # nothing numbered again
    with pytest.raises(ValueError):
        memo.rows[0][0] = 7  # shared between sessions through the cache: read-only
    # a memo over another roll-up (even an equal one) is not used
    other = queries.Rollup.empty(NF).extended(np.asarray([b"a|x", b"b|x"], dtype=object))
    assert _number_all(other, calls, memo)[3] is not memo


def test_the_cache_keeps_the_newest_name_memos_and_forgets_them_on_a_reset() -> None:
    memo = _number_all(queries.Rollup.empty(NF), [[b"a|x"]])[3]
    cache = queries.PaneCache(max_names=2)
    for k in range(3):
        cache.put_names(("names", k), memo)
    assert cache.names(("names", 0)) is None and cache.names(("names", 2)) is memo
    cache.observe("sensor", 100)
    assert cache.names(("names", 2)) is memo
    cache.observe("sensor", 99)  # a watermark went back: the store was reset
    assert cache.names(("names", 2)) is None


@pytest.mark.parametrize("seed", range(30))
def test_numbering_with_any_memo_equals_numbering_afresh(seed: int) -> None:
    """Replies that match the memo, then one that does not (or fewer, or more replies): the
    rows, the numbering mid-read and the new names are those of a read without a memo."""
    rng = np.random.default_rng(seed)
    pool = [f"s{i}|m{i % 3}".encode() for i in range(12)]
    base = queries.Rollup.empty(NF).extended(np.asarray(pool[:4], dtype=object))

    def calls() -> list[list[bytes]]:
        return [
            [pool[i] for i in rng.choice(12, int(rng.integers(0, 7)), replace=False)]
            for _ in range(int(rng.integers(1, 5)))
        ]

    first = calls()
    memo = _number_all(base, first)[3]
    later = [list(c) for c in first[: int(rng.integers(0, len(first) + 1))]] + calls()
    if rng.random() < 0.3:
        later = [list(c) for c in first]  # all the same
    want = _number_all(base, later)
    got = _number_all(base, later, memo)
    assert got[:3] == want[:3]
    for k in range(len(later) + 1):  # the numbering part way, as a read takes it
        with_memo, afresh = queries._Numbering(base, memo), queries._Numbering(base)
        for names in later[:k]:
            assert with_memo.rows(names).tolist() == afresh.rows(names).tolist()
        assert with_memo.snapshot() == afresh.snapshot() and len(with_memo) == len(afresh)


@pytest.mark.parametrize(
    "names",
    [
        [b"s1|temp", b"s2|hum", b"site 3|co2"],
        [b"a|b|c", b"d|e"],  # split at the first separator only
        [b"plain", b"s|m"],  # no separator: all first, empty second
        [b"s\n1|temp", b"s2|hum"],  # a line break in a name
        [b"caf\xc3\xa9|t", b"bad\xff|t"],  # UTF-8, and bytes that are not
        [b"|", b"x|"],
    ],
)
def test_split_names_equals_splitting_name_by_name(names: list[bytes]) -> None:
    arr = np.asarray(names, dtype=object)
    first, second = queries.split_names(arr)
    text = [n.decode(errors="replace").partition(keys.ENTITY_SEP) for n in names]
    assert first.tolist() == [t[0] for t in text] and second.tolist() == [t[2] for t in text]
    assert first.dtype == second.dtype == np.dtype(object)
    empty = queries.split_names(np.asarray([], dtype=object))
    assert empty[0].size == empty[1].size == 0


# --------------------------------------------------------------------------- roll-ups


def test_rollup_grows_by_new_entities_and_merges_panes() -> None:
    base = queries.Rollup.empty(NF).extended(np.asarray([b"s1|temp", b"s2|hum"], dtype=object))
    assert base.first.tolist() == ["s1", "s2"] and base.second.tolist() == ["temp", "hum"]
    assert base.stats[:, packed.COUNT].tolist() == [0.0, 0.0]
    stats = packed.decode_stats(packed.encode(table_of([[1.0, 4.0], [10.0], [2.0]])), NF).stats
    one = base.plus([60_000], stats, np.array([0, 1, 0]))
    assert one.starts == (60_000,)
    assert one.stats[:, : packed.NF_BASE].tolist() == [
        naive_stats([1.0, 4.0, 2.0]),
        naive_stats([10.0]),
    ]
    assert base.stats[:, packed.COUNT].tolist() == [0.0, 0.0]  # not changed in place
    with pytest.raises(ValueError):
        one.stats[0, 0] = 5.0  # shared through the cache: read-only
    more = one.extended(np.asarray([b"s3|temp"], dtype=object))
    assert more.rows_of(np.asarray([b"s3|temp", b"s1|temp", b"nope"], dtype=object)).tolist() == [
        2,
        0,
        -1,
    ]
    assert more.extended(np.asarray([], dtype=object)) is more


def test_one_pane_keeps_only_its_entities_and_merges_like_plus() -> None:
    names = np.asarray([b"a|t", b"b|t", b"c|h"], dtype=object)
    base = queries.Rollup.empty(NF).extended(names)
    stats = packed.decode_stats(packed.encode(table_of([[1.0], [5.0, 6.0], [2.0]])), NF).stats
    rows = np.array([2, 0, 2])
    one = base.one_pane(120_000, stats, rows)
    assert one.starts == (120_000,) and one.names.tolist() == [b"a|t", b"c|h"]
    assert one.first.tolist() == ["a", "c"] and one.second.tolist() == ["t", "h"]
    assert one.stats[:, : packed.NF_BASE].tolist() == [
        naive_stats([5.0, 6.0]),
        naive_stats([1.0, 2.0]),
    ]
    # merged into a roll-up of other panes: the same as adding the pane's values directly
    other = base.plus([60_000], stats[:1], np.array([1]))
    np.testing.assert_array_equal(other.merged(one).stats, other.plus([120_000], stats, rows).stats)
    assert queries.Rollup.empty(NF).merged(one).names.tolist() == one.names.tolist()


# --------------------------------------------------------------------------- against a store


class FakeStore:
    """Window and progress hashes in memory, answering the raw pipelines the queries send."""

    def __init__(self) -> None:
        self.hashes: dict[bytes, dict[bytes, bytes]] = {}
        self.sent: list[list[bytes]] = []  # commands of each pipeline
        self.values: dict[tuple[int, int, bytes], list[float]] = {}  # of each packed value

    def put(self, part: int, start: int, entity: str, values: Sequence[float]) -> None:
        (value,) = packed.encode(table_of([values]))
        key = keys.window_key(EventKind.SENSOR, part, keys.WINDOW_1M, keys.Dim.SITE, start)
        self.hashes.setdefault(key.encode(), {})[entity.encode()] = value
        self.values[(part, start, entity.encode())] = list(values)

    def watermark(self, part: int, mark: int) -> None:
        key = keys.progress_key(EventKind.SENSOR, part).encode()
        self.hashes.setdefault(key, {})[keys.Progress.WATERMARK.encode()] = str(mark).encode()

    def reply(self, command: bytes) -> object:
        words = command.split(b"\r\n")[2:-1:2]  # *N, then $len and argument pairs
        verb, key, *fields = words
        h = self.hashes.get(key, {})
        if verb == b"HGETALL":
            return [x for pair in h.items() for x in pair]
        if verb == b"HGET":
            return h.get(fields[0])
        if verb == b"HMGET":
            return [h.get(f) for f in fields]
        raise AssertionError(f"unexpected command {verb!r}")

    def stream(
        self, r: object, commands: Sequence[bytes], ahead: int | None = None
    ) -> Generator[object, None, None]:
        self.sent.append([c.split(b"\r\n")[2] for c in commands])
        for c in commands:
            yield self.reply(c)


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeStore:
    store = FakeStore()
    monkeypatch.setattr(queries, "stream_raw", store.stream)
    monkeypatch.setattr(queries, "_binary", lambda r: r)
    return store


def _fill(
    fake: FakeStore,
    rng: np.random.Generator,
    starts: Sequence[int],
    metrics: Sequence[str] = ("temp", "hum", "co2"),
) -> dict[tuple[str, str], list[float]]:
    raw: dict[tuple[str, str], list[float]] = {}
    for start in starts:
        for part in range(3):
            for site in range(12):
                for metric in metrics:
                    if rng.random() < 0.4:
                        continue
                    values = rng.normal(20, 5, int(rng.integers(1, 30))).round(2).tolist()
                    raw.setdefault((f"s{site:02d}", metric), []).extend(values)
                    fake.put(part, start, f"s{site:02d}|{metric}", values)
    return raw


def _truth(raw: dict[tuple[str, str], list[float]], limit: int) -> pd.DataFrame:
    rows = [
        [site, metric, len(v), float(np.mean(v)), min(v), max(v)]
        for (site, metric), v in raw.items()
    ]
    frame = pd.DataFrame(rows, columns=["site", "metric", "readings", "mean", "min", "max"])
    return frame.sort_values(
        ["readings", "site", "metric"], ascending=[False, True, True], kind="stable"
    ).head(limit)


def _check(got: queries.SiteMetrics, raw: dict[tuple[str, str], list[float]], limit: int) -> None:
    want = _truth(raw, limit)
    cols = ["site", "metric", "readings", "min", "max"]
    assert got.rows[cols].values.tolist() == want[cols].values.tolist()
    np.testing.assert_allclose(got.rows["mean"], want["mean"], rtol=1e-12)
    assert got.total == len(raw)
    assert got.sites == tuple(sorted({k[0] for k in raw}))
    assert got.metrics == tuple(sorted({k[1] for k in raw}))


def test_site_metrics_first_and_later_refreshes_equal_the_raw_values(fake: FakeStore) -> None:
    rng = np.random.default_rng(11)
    raw = _fill(fake, rng, STARTS)
    fake.put(0, STARTS[0] - MIN, "s00|temp", [1e6])  # outside the window
    for part in range(3):
        fake.watermark(part, STARTS[3])  # panes 0-2 final, 3-4 open
    topo = queries.Topology.of(3)
    view = queries.SiteView(limit=10)
    r = redis.Redis()  # never connected: the fake store answers
    _check(queries.read_site_metrics(r, topo, NOW, view), raw, 10)
    cache = queries.PaneCache()
    first = queries.read_site_metrics(r, topo, NOW, view, cache=cache)
    _check(first, raw, 10)
    # the final panes are cached: alone, and as one roll-up
    key = ("sensor", "1m", "site", tuple(STARTS[:3]), (0, 1, 2))
    rollup = cache.rollup(key)
    assert rollup is not None and rollup.starts == tuple(STARTS[:3])
    assert rollup.stats[:, packed.COUNT].min() > 0  # only entities with values in those panes
    for s in STARTS[:3]:
        assert cache.rollup(("sensor", "1m", "site", (s,), (0, 1, 2))) is not None
    # a later refresh reads only the open panes, and still shows every value
    fake.sent.clear()
    more = _fill(fake, rng, STARTS[3:], ("pm25", "temp2"))  # new values, new entities
    for k, v in more.items():
        raw.setdefault(k, []).extend(v)
    again = queries.read_site_metrics(r, topo, NOW, view, cache=cache)
    _check(again, raw, 10)
    read = [k for cmds in fake.sent for k in cmds if k == b"HGETALL"]
    assert len(read) == 2 * 3  # two open panes x three partitions
    pd.testing.assert_frame_equal(again.rows, queries.read_site_metrics(r, topo, NOW, view).rows)


def test_site_metrics_refreshes_reuse_the_names_of_unchanged_open_panes(fake: FakeStore) -> None:
    """New values under the same names: the numbering of the last read is reused, and every
    number is still exact; a new name in an open pane ends the reuse from its reply on."""
    rng = np.random.default_rng(23)
    raw = _fill(fake, rng, STARTS)
    for part in range(3):
        fake.watermark(part, STARTS[3])
    topo, view, r = queries.Topology.of(3), queries.SiteView(limit=10), redis.Redis()
    cache = queries.PaneCache()
    key = ("names", "sensor", "1m", "site", tuple(STARTS[3:]), (0, 1, 2))
    _check(queries.read_site_metrics(r, topo, NOW, view, cache=cache), raw, 10)
    assert cache.names(key) is None  # panes found final: the next read is over a new roll-up
    _check(queries.read_site_metrics(r, topo, NOW, view, cache=cache), raw, 10)
    memo = cache.names(key)
    assert memo is not None and len(memo.names) == 2 * 3
    # the open panes' values change in place (same names, same order)
    for part, start in [(1, STARTS[3]), (2, STARTS[4])]:
        entity = next(iter(fake.hashes[_site_key(part, start)])).decode()
        fake.put(part, start, entity, [99.5, 100.5])
    raw = _raw_of(fake, STARTS)
    _check(queries.read_site_metrics(r, topo, NOW, view, cache=cache), raw, 10)
    assert cache.names(key) is memo  # every reply matched: nothing numbered again
    fake.put(2, STARTS[4], "zz|new", [1.0, 2.0, 3.0])
    _check(queries.read_site_metrics(r, topo, NOW, view, cache=cache), _raw_of(fake, STARTS), 10)
    changed = cache.names(key)
    assert changed is not None and changed is not memo
    assert changed.fresh[-1] == b"zz|new"


def test_site_metrics_reuse_the_names_when_no_pane_is_final(fake: FakeStore) -> None:
    """Every pane open (no roll-up of final panes): the memo is over the empty roll-up."""
    raw = _fill(fake, np.random.default_rng(29), STARTS)
    for part in range(3):
        fake.watermark(part, STARTS[0] - MIN)
    topo, view, r = queries.Topology.of(3), queries.SiteView(limit=10), redis.Redis()
    cache = queries.PaneCache()
    key = ("names", "sensor", "1m", "site", tuple(STARTS), (0, 1, 2))
    _check(queries.read_site_metrics(r, topo, NOW, view, cache=cache), raw, 10)
    memo = cache.names(key)
    assert memo is not None and memo.base is queries.Rollup.empty(NF)
    _check(queries.read_site_metrics(r, topo, NOW, view, cache=cache), raw, 10)
    assert cache.names(key) is memo


def _raw_of(fake: FakeStore, starts: Sequence[int]) -> dict[tuple[str, str], list[float]]:
    """Each site x metric's values in ``starts``, as the fake store holds them now."""
    raw: dict[tuple[str, str], list[float]] = {}
    for part in range(3):
        for s in starts:
            for name in fake.hashes.get(_site_key(part, s), {}):
                site, _, metric = name.decode().partition("|")
                raw.setdefault((site, metric), []).extend(fake.values[(part, s, name)])
    return raw


def _site_key(part: int, start: int) -> bytes:
    return keys.window_key(EventKind.SENSOR, part, keys.WINDOW_1M, keys.Dim.SITE, start).encode()


def test_site_metrics_of_empty_panes(fake: FakeStore) -> None:
    for part in range(2):
        fake.watermark(part, NOW)
    got = queries.read_site_metrics(redis.Redis(), queries.Topology.of(2), NOW)
    assert got.empty and got.rows.empty and got.sites == () and got.metrics == ()


def test_site_metrics_when_the_window_moves_on_a_minute(fake: FakeStore) -> None:
    """The next minute's window: final panes from the single-pane roll-ups, merged."""
    rng = np.random.default_rng(17)
    starts = [*STARTS, STARTS[-1] + MIN]
    per_pane = {
        s: _fill(fake, rng, [s], ("temp", "hum") if i % 2 else ("co2", "temp"))
        for i, s in enumerate(starts)
    }
    for part in range(3):
        fake.watermark(part, STARTS[3])
    topo, view, r = queries.Topology.of(3), queries.SiteView(limit=8), redis.Redis()
    cache = queries.PaneCache()

    def raw_of(window: Sequence[int]) -> dict[tuple[str, str], list[float]]:
        raw: dict[tuple[str, str], list[float]] = {}
        for s in window:
            for k, v in per_pane[s].items():
                raw.setdefault(k, []).extend(v)
        return raw

    _check(queries.read_site_metrics(r, topo, NOW, view, cache=cache), raw_of(STARTS), 8)
    rollup = cache.rollup(("sensor", "1m", "site", tuple(STARTS[:3]), (0, 1, 2)))
    assert rollup is not None
    assert rollup.ids() == {n: i for i, n in enumerate(rollup.names.tolist())}
    assert rollup.choices() == (
        tuple(sorted(set(rollup.first.tolist()))),
        tuple(sorted(set(rollup.second.tolist()))),
    )
    for part in range(3):
        fake.watermark(part, STARTS[4])
    fake.sent.clear()
    later = queries.read_site_metrics(r, topo, NOW + MIN, view, cache=cache)
    _check(later, raw_of(starts[1:]), 8)
    read = [k for cmds in fake.sent for k in cmds if k == b"HGETALL"]
    assert len(read) == 3 * 3  # panes 3, 4 and the new one; panes 1-2 from their roll-ups
    pd.testing.assert_frame_equal(
        later.rows, queries.read_site_metrics(r, topo, NOW + MIN, view).rows
    )
