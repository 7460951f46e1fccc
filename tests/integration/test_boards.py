"""Leaderboards read from a real Valkey: boards written under the contract's keys
(``schemas.keys.board_key``, per partition and 1m instance) are merged across partitions and
instances by ``dashboard.boards`` (ZUNION per partition), p99 from the merged sketches of the
window hashes; and ``pulse top`` prints them. The worker writing boards is tested end to end
elsewhere."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import redis

from dashboard import boards
from dashboard.queries import discover, reader_client
from pipeline.stack.testing import RunningStack
from schemas import keys, packed
from schemas.events import EventKind
from schemas.sketch import RELATIVE_ACCURACY, bucket_codes

pytestmark = pytest.mark.integration

MIN = keys.WINDOW_1M.size_ms
T0 = 1_790_000_000_000 - 1_790_000_000_000 % MIN  # 2026-09-21 14:13 UTC
SENSOR, APPLOG = EventKind.SENSOR, EventKind.APPLOG


@pytest.fixture
def valkey(fresh_stack: Callable[..., RunningStack]) -> Iterator[RunningStack]:
    """A private Valkey primary on a free port (no replica, no Kafka)."""
    running = fresh_stack(start=False, replica=False)
    assert running.stack.primary.start()
    yield running


@pytest.fixture
def r(valkey: RunningStack) -> Iterator[redis.Redis]:
    client = reader_client(valkey.store_settings, timeout_s=10.0)
    try:
        yield client
    finally:
        client.close()


def packed_latencies(values: np.ndarray) -> bytes:
    codes = bucket_codes(values).astype(np.int64)
    stats = np.zeros((1, packed.NF_APPLOG))
    stats[0, packed.COUNT] = values.size
    stats[0, packed.SUM] = values.sum()
    stats[0, packed.MIN], stats[0, packed.MAX] = values.min(), values.max()
    table = packed.from_values(
        stats, np.zeros(codes.size, dtype=np.int64), codes, np.ones(codes.size, dtype=np.int64)
    )
    return packed.encode(table)[0]


def zadd(r: redis.Redis, kind: EventKind, part: int, board: str, start: int, **s: float) -> None:
    r.zadd(
        keys.board_key(kind, part, board, start), {m.replace("__", "|"): v for m, v in s.items()}
    )


def load(r: redis.Redis) -> dict[str, np.ndarray]:
    """Three partitions of each kind over the minutes T0-2 .. T0; returns the latencies of the
    route ``api|/slow`` (spread over partitions and minutes) and ``web|/`` (one minute)."""
    for kind in EventKind:
        for p in range(3):
            r.hset(
                keys.progress_key(kind, p),
                mapping={"offset": 0, "max_event_time": T0 + 30_000 - p * MIN},
            )
    # sites span partitions: counts add over partitions and minutes
    zadd(r, SENSOR, 0, "site.events", T0 - 2 * MIN, paris=10, oslo=3)
    zadd(r, SENSOR, 1, "site.events", T0 - MIN, paris=1, oslo=9)
    zadd(r, SENSOR, 2, "site.events", T0, oslo=1, rome=4)
    # a device lives in one partition: maxima over minutes
    zadd(r, SENSOR, 0, "device.max.co2", T0 - 2 * MIN, d1=900.0, d2=450.5)
    zadd(r, SENSOR, 0, "device.max.co2", T0, d1=610.0, d2=455.25)
    zadd(r, SENSOR, 1, "device.max.co2", T0 - MIN, d3=455.25)
    zadd(r, SENSOR, 2, "device.anomalies", T0 - MIN, d7=2, d8=1)
    zadd(r, SENSOR, 2, "device.anomalies", T0, d8=1)
    # services span partitions
    for p, (api_req, api_err, web_req, web_err) in enumerate([(100, 1, 50, 5), (100, 3, 0, 0)]):
        for start in (T0 - MIN, T0):
            zadd(r, APPLOG, p, "service.requests", start, api=api_req, web=web_req)
            zadd(r, APPLOG, p, "service.errors", start, api=api_err, web=web_err)
    rng = np.random.default_rng(11)
    lat = {
        ("api|/slow", 0, T0 - MIN): rng.lognormal(3.0, 0.3, 400),
        ("api|/slow", 1, T0): rng.lognormal(6.0, 0.3, 5),
        ("api|/slow", 2, T0 - 2 * MIN): rng.lognormal(2.0, 0.3, 400),
        ("web|/", 1, T0): rng.lognormal(5.0, 0.1, 300),
    }
    for (route, p, start), v in lat.items():
        key = keys.window_key(APPLOG, p, keys.WINDOW_1M, keys.Dim.ROUTE, start)
        r.hset(key, route, packed_latencies(v))
        own = float(np.quantile(v, 0.99, method="lower"))  # the partition's own view
        zadd(r, APPLOG, p, "route.p99", start, **{route.replace("|", "__"): own})
    return {
        "api|/slow": np.concatenate([v for (rt, _, _), v in lat.items() if rt == "api|/slow"]),
        "api|/slow@T0": lat[("api|/slow", 1, T0)],
        "web|/": lat[("web|/", 1, T0)],
    }


def rows(top: boards.Top) -> list[tuple[str, float]]:
    return [(x.member, x.score) for x in top.rows]


def test_reads_merge_across_partitions_and_instances(r: redis.Redis) -> None:
    lat = load(r)
    parts = discover(r).partitions
    assert parts[SENSOR] == (0, 1, 2) and parts[APPLOG] == (0, 1, 2)

    sites = boards.board("site.events")
    assert rows(boards.read_top(r, sites, parts[SENSOR], "5m", T0)) == [
        ("oslo", 13),
        ("paris", 11),
        ("rome", 4),
    ]
    assert rows(boards.read_top(r, sites, parts[SENSOR], "1m", T0 - MIN)) == [
        ("oslo", 9),
        ("paris", 1),
    ]
    co2 = boards.board("device.max.co2")
    top = boards.read_top(r, co2, parts[SENSOR], "5m", T0, n=2)
    assert rows(top) == [("d1", 900.0), ("d2", 455.25)] and top.members == 3  # d3 ties d2
    anomalies = boards.board("device.anomalies")
    assert rows(boards.read_top(r, anomalies, parts[SENSOR], "1h", T0)) == [("d7", 2), ("d8", 2)]

    rate = boards.read_top(r, boards.board("service.error_rate"), parts[APPLOG], "5m", T0)
    assert [(x.member, x.score, x.errors, x.requests) for x in rate.rows] == [
        ("web", 0.1, 10, 100),
        ("api", 0.02, 8, 400),
    ]
    requests = boards.read_top(r, boards.board("service.requests"), parts[APPLOG], "5m", T0)
    assert rows(requests) == [("api", 400), ("web", 100)]

    p99 = boards.read_top(r, boards.board("route.p99"), parts[APPLOG], "5m", T0)
    assert [x.member for x in p99.rows] == ["web|/", "api|/slow"]
    for x in p99.rows:
        exact = float(np.quantile(lat[x.member], 0.99, method="lower"))
        assert abs(x.score - exact) <= RELATIVE_ACCURACY * exact
    # over T0 alone, api|/slow is its 5 slow requests: it leads
    one = boards.read_top(r, boards.board("route.p99"), parts[APPLOG], "1m", T0)
    assert [x.member for x in one.rows] == ["api|/slow", "web|/"]
    exact = float(np.quantile(lat["api|/slow@T0"], 0.99, method="lower"))
    assert abs(one.rows[0].score - exact) <= RELATIVE_ACCURACY * exact

    # the default minute: the newest with data for the board
    assert boards.newest_start(r, sites, parts[SENSOR]) == T0
    assert boards.newest_start(r, anomalies, parts[SENSOR]) == T0
    assert boards.newest_start(r, boards.board("device.max.power"), parts[SENSOR]) == T0


def pulse_top(valkey: RunningStack, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PULSE_STORE_PORT": str(valkey.store_settings.port),
        "COLUMNS": "200",
    }
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "top", *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def table(out: str) -> list[list[str]]:
    cells = [[c for c in line.split() if c != "│"] for line in out.splitlines()]
    return [c for c in cells if c and c[0].isdigit()]


def test_pulse_top_prints_the_merged_board(valkey: RunningStack, r: redis.Redis) -> None:
    load(r)
    done = pulse_top(valkey, "site.events", "--window", "5m")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == (
        "site.events, 5m window 2026-09-21 14:09-14:14 UTC: top 3 of 3"
    )
    assert table(done.stdout) == [["1", "oslo", "13"], ["2", "paris", "11"], ["3", "rome", "4"]]

    done = pulse_top(valkey, "service.error_rate", "--window", "1h", "-n", "1")
    assert done.returncode == 0, done.stderr
    assert "top 1 of 2" in done.stdout
    assert table(done.stdout) == [["1", "web", "10.00%", "10", "100"]]

    done = pulse_top(valkey, "device.max.co2", "--at", "2026-09-21T14:11:59Z")
    assert done.returncode == 0, done.stderr
    assert table(done.stdout) == [["1", "d1", "900"], ["2", "d2", "450.5"]]

    done = pulse_top(valkey, "route.p99", "--at", "2026-09-21T14:13")
    assert done.returncode == 0, done.stderr
    assert [row[1] for row in table(done.stdout)] == ["api|/slow", "web|/"]

    done = pulse_top(valkey, "device.max.humidity", "--window", "5m")
    assert done.returncode == 0, done.stderr
    assert (
        done.stdout == "device.max.humidity: no data in the 5m window 2026-09-21 14:09-14:14 UTC\n"
    )


def test_pulse_top_on_an_empty_store_says_so(valkey: RunningStack) -> None:
    done = pulse_top(valkey, "service.p99")
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout == "no applog events in the store yet: service.p99 is empty\n"
