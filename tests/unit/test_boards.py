"""Leaderboard reads (``dashboard.boards``): merging partitions and window instances, ranking
with ties by name, error rates, p99 from merged sketches; and ``pulse top``'s one-sentence
errors. The store is a fake here; tests/integration/test_boards.py reads a real Valkey."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, cast

import numpy as np
import pytest
import redis

from dashboard import boards
from pipeline.cli import main
from schemas import keys, packed
from schemas.argtypes import parse_time
from schemas.events import EventKind
from schemas.sketch import RELATIVE_ACCURACY, bucket_codes

MIN = keys.WINDOW_1M.size_ms
T0 = 1_790_000_000_000 - 1_790_000_000_000 % MIN
SENSOR, APPLOG = EventKind.SENSOR, EventKind.APPLOG


class FakePipeline:
    def __init__(self, store: FakeStore) -> None:
        self.store = store
        self.calls: list[Callable[[], Any]] = []

    def __getattr__(self, name: str) -> Callable[..., None]:
        method = getattr(self.store, name)

        def queue(*args: Any, **kwargs: Any) -> None:
            self.calls.append(lambda: method(*args, **kwargs))

        return queue

    def execute(self) -> list[Any]:
        return [call() for call in self.calls]


class FakeStore:
    """Sorted sets and hashes, replying bytes as a client without decode_responses does."""

    def __init__(self) -> None:
        self.zsets: dict[str, dict[str, float]] = {}
        self.hashes: dict[str, dict[str, bytes | str]] = {}

    def pipeline(self, transaction: bool = False) -> FakePipeline:
        return FakePipeline(self)

    def zunion(
        self, names: list[str], aggregate: str = "SUM", withscores: bool = False
    ) -> list[tuple[bytes, float]]:
        out: dict[str, float] = {}
        for k in names:
            for m, s in self.zsets.get(k, {}).items():
                if m not in out:
                    out[m] = s
                else:
                    out[m] = out[m] + s if aggregate == "SUM" else max(out[m], s)
        return [(m.encode(), s) for m, s in sorted(out.items(), key=lambda ms: (ms[1], ms[0]))]

    def hmget(self, key: str, fields: list[str]) -> list[bytes | None]:
        h = self.hashes.get(key, {})
        return [_bytes(h[f]) if f in h else None for f in fields]

    def hget(self, key: str, field: str) -> bytes | None:
        v = self.hashes.get(key, {}).get(field)
        return None if v is None else _bytes(v)

    def exists(self, key: str) -> int:
        return int(key in self.zsets)


def client(r: FakeStore) -> redis.Redis:
    """``r`` where the readers take a client: it has the few commands they call, with
    redis-py's reply shapes, not the whole of ``redis.Redis``."""
    return cast(redis.Redis, r)


def _bytes(v: bytes | str) -> bytes:
    return v if isinstance(v, bytes) else v.encode()


def packed_value(values: list[float], nf: int = packed.NF_APPLOG) -> bytes:
    """The packed value of some latencies (count and sketch; the rest is not read here)."""
    codes = bucket_codes(values).astype(np.int64)
    stats = np.zeros((1, nf))
    stats[0, packed.COUNT] = len(values)
    table = packed.from_values(
        stats, np.zeros(codes.size, dtype=np.int64), codes, np.ones(codes.size, dtype=np.int64)
    )
    return packed.encode(table)[0]


def put(r: FakeStore, kind: EventKind, part: int, board: str, start: int, **scores: float) -> None:
    r.zsets.setdefault(keys.board_key(kind, part, board, start), {}).update(
        {m.replace("__", "|"): s for m, s in scores.items()}
    )


# --------------------------------------------------------------------------- pure helpers


def test_partitions_combine_by_sum_or_max() -> None:
    parts: list[list[tuple[bytes | str, float]]] = [
        [(b"a", 2.0), (b"b", 5.0)],
        [(b"a", 3.0), ("c", 1.0)],
    ]
    assert boards.combine(parts, "sum") == {"a": 5.0, "b": 5.0, "c": 1.0}
    assert boards.combine(parts, "max") == {"a": 3.0, "b": 5.0, "c": 1.0}
    assert boards.combine([[(b"a", -7.5)], [(b"a", -2.5)]], "max") == {"a": -2.5}
    # a member written by something else, not UTF-8: shown replaced, not a failed board
    assert boards.combine([[(b"\xff\xfea", 1.0)]], "sum") == {"\ufffd\ufffda": 1.0}
    with pytest.raises(ValueError, match="sum or max"):
        boards.combine(parts, "sketch")


def test_ranking_breaks_ties_by_member_name_and_cuts_at_n() -> None:
    scores = {"b": 3.0, "a": 3.0, "c": 9.0, "d": 1.0, "e": math.nan}
    assert boards.rank(scores, 3) == [("c", 9.0), ("a", 3.0), ("b", 3.0)]
    assert boards.rank(scores, 10) == [("c", 9.0), ("a", 3.0), ("b", 3.0), ("d", 1.0)]
    assert boards.rank({}, 5) == []


def test_error_rates_divide_merged_errors_by_merged_requests() -> None:
    got = boards.error_rates({"a": 200.0, "b": 10.0, "z": 0.0}, {"a": 50.0})
    assert got == {"a": (0.25, 200, 50), "b": (0.0, 10, 0)}


def test_window_starts_end_with_the_minute_of_the_given_time() -> None:
    assert boards.window_starts("1m", T0 + 59_999) == [T0]
    assert boards.window_starts("5m", T0) == [T0 - 4 * MIN + i * MIN for i in range(5)]
    assert len(boards.window_starts("1h", T0)) == 60
    with pytest.raises(ValueError, match="unknown window"):
        boards.window_starts("2m", T0)


def test_p99_is_read_from_the_merged_sketches() -> None:
    rng = np.random.default_rng(3)
    a1, a2 = rng.lognormal(3, 1, 300), rng.lognormal(5, 0.5, 50)
    b1 = rng.lognormal(2, 0.3, 20)
    values = [packed_value(a1.tolist()), None, packed_value(b1.tolist()), packed_value(a2.tolist())]
    got = boards.sketch_p99(values, [0, 1, 1, 0], 3, packed.NF_APPLOG)
    for est, exact in (
        (got[0], np.quantile(np.r_[a1, a2], 0.99, method="lower")),
        (got[1], np.quantile(b1, 0.99, method="lower")),
    ):
        assert abs(est - exact) <= RELATIVE_ACCURACY * exact
    assert math.isnan(got[2])  # no value at all
    assert boards.sketch_p99([None], [0], 1, packed.NF_APPLOG) == [
        pytest.approx(math.nan, nan_ok=True)
    ]


@pytest.mark.parametrize(
    ("name", "stored", "rank"),
    [
        ("site.events", keys.Board.SITE_EVENTS, "sum"),
        ("device.anomalies", keys.Board.DEVICE_ANOMALIES, "sum"),
        ("device.max.co2", "device.max.co2", "max"),
        ("service.requests", keys.Board.SERVICE_REQUESTS, "sum"),
        ("service.error_rate", keys.Board.SERVICE_ERRORS, "rate"),
        ("route.p99", keys.Board.ROUTE_P99, "p99"),
        ("service.anomalies", keys.Board.SERVICE_ANOMALIES, "sum"),
    ],
)
def test_board_names_map_to_the_stored_boards(name: str, stored: str, rank: str) -> None:
    b = boards.board(name)
    assert (b.stored, b.rank) == (stored, rank)
    contract = keys.BOARDS[stored if not stored.startswith("device.max.") else "device.max"]
    assert (b.kind, b.dim) == (contract.kind, contract.dim)


def test_every_user_board_reads_boards_of_the_contract() -> None:
    for name in boards.BOARD_NAMES:
        b = boards.board(name.replace("METRIC", "temperature"))
        for stored in b.reads:
            assert stored in keys.BOARDS or stored.startswith(f"{keys.Board.DEVICE_MAX}.")
            base = keys.BOARDS.get(stored, keys.BOARDS[keys.Board.DEVICE_MAX])
            assert base.kind is b.kind and base.dim == b.dim
            if b.rank in ("sum", "max"):
                assert base.merge == b.rank
            elif b.rank == "p99":
                assert base.merge == "sketch"


@pytest.mark.parametrize(
    ("text", "ms"),
    [
        ("2026-09-21T14:13", 1_789_999_980_000),
        ("2026-09-21T14:13Z", 1_789_999_980_000),
        ("2026-09-21T16:13+02:00", 1_789_999_980_000),
        ("1790000000", 1_790_000_000_000),
        ("1790000000000", 1_790_000_000_000),
    ],
)
def test_times_are_iso_or_epoch(text: str, ms: int) -> None:
    assert parse_time(text) == ms


@pytest.mark.parametrize(
    "text", ["9999-12-31T23:59:59", "99999999999999999999", "0001-01-01T00:00+14:00"]
)
def test_times_a_date_cannot_print_are_one_sentence(text: str) -> None:
    with pytest.raises(ValueError, match=r"^expected a time from 1970-01-01 to 9999-12-31T00:00"):
        parse_time(text)


# --------------------------------------------------------------------------- reads (fake store)


def test_counts_merge_over_instances_and_partitions() -> None:
    r = FakeStore()
    put(r, SENSOR, 0, "site.events", T0 - MIN, paris=5, oslo=1)
    put(r, SENSOR, 0, "site.events", T0, paris=2)
    put(r, SENSOR, 1, "site.events", T0, oslo=6, rome=7)
    put(r, SENSOR, 1, "site.events", T0 - 5 * MIN, rome=100)  # outside the 5m window
    b = boards.board("site.events")
    top = boards.read_top(client(r), b, [0, 1], "5m", T0 + 30_000, n=10)
    assert [(x.member, x.score) for x in top.rows] == [("oslo", 7), ("paris", 7), ("rome", 7)]
    assert top.starts == tuple(T0 - i * MIN for i in range(4, -1, -1)) and top.members == 3
    one = boards.read_top(client(r), b, [0, 1], "1m", T0, n=2)
    assert [(x.member, x.score) for x in one.rows] == [("rome", 7), ("oslo", 6)]
    assert one.members == 3
    hour = boards.read_top(client(r), b, [0, 1], "1h", T0, n=1)
    assert [(x.member, x.score) for x in hour.rows] == [("rome", 107)]


def test_maxima_take_the_largest_over_instances_and_partitions() -> None:
    r = FakeStore()
    put(r, SENSOR, 0, "device.max.temperature", T0 - MIN, d1=30.5, d2=-4.0)
    put(r, SENSOR, 0, "device.max.temperature", T0, d1=20.0, d2=-3.0)
    put(r, SENSOR, 1, "device.max.temperature", T0, d3=25.25)
    put(r, SENSOR, 1, "device.max.humidity", T0, d3=99.0)  # another metric
    b = boards.board("device.max.temperature")
    top = boards.read_top(client(r), b, [0, 1], "5m", T0, n=10)
    assert [(x.member, x.score) for x in top.rows] == [("d1", 30.5), ("d3", 25.25), ("d2", -3.0)]


def test_error_rates_rank_by_errors_over_requests_with_the_counts() -> None:
    r = FakeStore()
    put(r, APPLOG, 0, "service.requests", T0, api=100, web=10, idle=5)
    put(r, APPLOG, 1, "service.requests", T0, api=300, web=30)
    put(r, APPLOG, 0, "service.errors", T0, api=20, web=1, idle=0)
    put(r, APPLOG, 1, "service.errors", T0, api=20, web=3)
    top = boards.read_top(client(r), boards.board("service.error_rate"), [0, 1], "1m", T0)
    assert [(x.member, x.score, x.errors, x.requests) for x in top.rows] == [
        ("api", 0.1, 40, 400),
        ("web", 0.1, 4, 40),
        ("idle", 0.0, 0, 5),
    ]


def test_p99_merges_the_candidates_sketches_over_partitions_and_instances() -> None:
    r = FakeStore()
    rng = np.random.default_rng(7)
    lat = {
        ("a|/x", 0, T0 - MIN): rng.lognormal(3, 0.2, 200),  # fast, many
        ("a|/x", 1, T0): rng.lognormal(6, 0.2, 5),  # a few slow: the fleet p99 is slow
        ("b|/y", 0, T0): rng.lognormal(4, 0.2, 100),
    }
    for (route, part, start), v in lat.items():
        key = keys.window_key(APPLOG, part, keys.WINDOW_1M, keys.Dim.ROUTE, start)
        r.hashes.setdefault(key, {})[route] = packed_value(v.tolist())
        # the partition's own p99 (its view only): the reader must not rank by these
        own = float(np.quantile(v, 0.99, method="lower"))
        put(r, APPLOG, part, "route.p99", start, **{route.replace("|", "__"): own})
    top = boards.read_top(client(r), boards.board("route.p99"), [0, 1], "5m", T0)
    assert [x.member for x in top.rows] == ["a|/x", "b|/y"]
    exact_a = np.quantile(
        np.r_[lat[("a|/x", 0, T0 - MIN)], lat[("a|/x", 1, T0)]], 0.99, method="lower"
    )
    assert abs(top.rows[0].score - exact_a) <= RELATIVE_ACCURACY * exact_a
    # the 1m window has only partition 1's few slow a|/x values and b|/y
    one = boards.read_top(client(r), boards.board("route.p99"), [0, 1], "1m", T0, n=1)
    assert [x.member for x in one.rows] == ["a|/x"] and one.members == 2


def test_no_partitions_or_no_sets_is_an_empty_board() -> None:
    r = FakeStore()
    b = boards.board("service.requests")
    assert boards.read_top(client(r), b, [], "1m", T0).rows == ()
    assert boards.read_top(client(r), b, [0, 1], "1h", T0).rows == ()


def test_the_default_minute_is_the_newest_with_data_for_the_board() -> None:
    r = FakeStore()
    b = boards.board("device.anomalies")
    assert boards.newest_start(client(r), b, [0, 1]) is None
    r.hashes[keys.progress_key(SENSOR, 1)] = {"max_event_time": str(T0 + 5 * MIN + 1)}
    # no anomaly board yet: the minute of the newest event
    assert boards.newest_start(client(r), b, [0, 1]) == T0 + 5 * MIN
    put(r, SENSOR, 0, "device.anomalies", T0 + 2 * MIN, d1=1)
    put(r, SENSOR, 1, "device.anomalies", T0, d1=1)
    assert boards.newest_start(client(r), b, [0, 1]) == T0 + 2 * MIN


# --------------------------------------------------------------------------- pulse top errors


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["top", "nope"], "unknown board 'nope'; the boards are site.events, device.anomalies, "
         "device.max.METRIC, service.requests, service.error_rate, service.p99"),
        (["top", "device.max."], "names no metric"),
        (["top", "site.events", "--window", "2m"], "invalid choice: '2m'"),
        (["top", "site.events", "-n", "0"], "must be >= 1"),
        (["top", "site.events", "-n", "x"], "expected a whole number"),
        (["top", "site.events", "--at", "noon"], "expected a time such as"),
        (["top"], "arguments are required: BOARD"),
    ],
)  # fmt: skip
def test_a_bad_board_or_flag_is_one_sentence(
    argv: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    first, *rest = capsys.readouterr().err.splitlines()
    assert first.startswith("pulse top: ") and says in first and first.endswith(".")
    assert rest == ["Run 'pulse top --help' for usage."]


def test_an_unreachable_store_is_one_sentence(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PULSE_STORE_PORT", "1")  # nothing listens there
    assert main(["top", "site.events"]) == 1
    err = capsys.readouterr().err
    assert (
        err.startswith("pulse top: cannot read the store at 127.0.0.1:1") and err.count("\n") == 1
    )
    assert err.endswith(".\n") and not err.endswith("..\n")


@pytest.fixture
def fake_store(monkeypatch: pytest.MonkeyPatch) -> FakeStore:
    """``pulse top`` reading a fake store with two partitions of each kind."""
    from dashboard import queries

    r = FakeStore()
    r.close = lambda: None  # type: ignore[attr-defined]
    monkeypatch.setattr(queries, "reader_client", lambda *_a, **_kw: r)
    monkeypatch.setattr(queries, "discover", lambda _r: queries.Topology.of(2))
    monkeypatch.setenv("COLUMNS", "200")
    return r


def test_top_says_when_there_are_no_events_or_no_data(
    fake_store: FakeStore, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["top", "site.events"]) == 0
    assert capsys.readouterr().out == "no sensor events in the store yet: site.events is empty\n"
    fake_store.hashes[keys.progress_key(SENSOR, 0)] = {"max_event_time": str(T0 + 1)}
    assert main(["top", "device.max.co2", "--window", "5m"]) == 0
    assert capsys.readouterr().out == (
        "device.max.co2: no data in the 5m window 2026-09-21 14:09-14:14 UTC\n"
    )


def test_top_prints_the_ranked_rows(
    fake_store: FakeStore, capsys: pytest.CaptureFixture[str]
) -> None:
    put(fake_store, APPLOG, 0, "route.requests", T0, a__x=10, b__y=4)
    put(fake_store, APPLOG, 1, "route.errors", T0, a__x=1)
    put(fake_store, APPLOG, 0, "route.errors", T0 - MIN, b__y=4)
    put(fake_store, APPLOG, 0, "route.requests", T0 - MIN, b__y=4)
    assert main(["top", "route.error_rate", "--window", "5m", "--at", "2026-09-21T14:13"]) == 0
    out = capsys.readouterr().out
    assert "route.error_rate, 5m window 2026-09-21 14:09-14:14 UTC: top 2 of 2" in out
    cells = [[c for c in line.split() if c != "│"] for line in out.splitlines()]
    rows = [r for r in cells if r and r[0].isdigit()]
    assert rows == [["1", "b|y", "50.00%", "4", "8"], ["2", "a|x", "10.00%", "1", "10"]]
