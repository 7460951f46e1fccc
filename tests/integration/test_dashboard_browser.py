"""The dashboard in a real browser: ``pulse dashboard`` on a live stack, in headless Chromium.

The real pipeline writes the data (``pulse loadgen`` into fresh topics, a ``pulse worker``
applies it); ``pulse dashboard`` serves the page; Debian's Chromium (``/usr/bin/chromium``,
driven by playwright) opens it with an absolute time range pinned in the URL, so every number
is stable. The numbers the page shows must be what the store holds, computed here with the
dashboard's own readers (and the event count once more from the raw window hashes). Full-page
screenshots go to ``test-output/dashboard/``; the first and steady refresh times are printed.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlencode, urlparse

import numpy as np
import pytest
import redis

from dashboard import boards, page, queries, series, timerange
from pipeline.stack.testing import RunningStack, stop_child
from schemas import diverted, keys, packed
from schemas.events import EventKind
from schemas.settings import store_client
from tests.integration.harness import Pipeline, wait_for

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "test-output" / "dashboard"
CHROMIUM = Path(os.environ.get("PULSE_TEST_CHROMIUM", "/usr/bin/chromium"))
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
REFRESH_S = 5
MIN = 60_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def dashboard(pl: Pipeline, workdir: Path) -> Iterator[str]:
    """``pulse dashboard`` on a free port; yields its URL once Streamlit answers."""
    port = _free_port()
    log = workdir / "dashboard.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "dashboard", f"--port={port}",
             f"--refresh-s={REFRESH_S}"],
            env=pl.env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as reply,
        ):
            return bool(reply.status == 200)
        return False

    try:
        wait_for(healthy, "the dashboard answers", 90, alive=lambda: proc.poll() is None)
        yield url
    except BaseException:
        print(log.read_text(errors="replace")[-3000:])
        raise
    finally:
        stop_child(proc, 20)


def raw_events(r: redis.Redis, parts: int, rng: timerange.TimeRange) -> int:
    """Events in the range's fleet windows, straight from the window hashes."""
    window = timerange.pane_window(rng)
    total = 0.0
    for kind in EventKind:
        for p in range(parts):
            for s in timerange.pane_starts(rng, window):
                key = keys.window_key(kind, p, window, queries.FLEET_DIM[kind], s)
                h = cast(dict[bytes, bytes], r.hgetall(key))
                if h:
                    total += (
                        packed.decode_stats(list(h.values()), queries.NF[kind])
                        .stats[:, packed.COUNT]
                        .sum()
                    )
    return round(total)


def screenshot(pg: Any, path: Path) -> None:
    """A full-page screenshot: Streamlit scrolls inside its main block, so the viewport is
    made as tall as that block first (then restored)."""
    main = "document.querySelector('[data-testid=stMain]')"
    size = pg.viewport_size
    height = pg.evaluate(f"() => {main}.scrollHeight")
    pg.set_viewport_size({"width": size["width"], "height": int(height) + 40})
    pg.wait_for_function(f"() => {main}.clientHeight >= {main}.scrollHeight - 2", timeout=30_000)
    pg.screenshot(path=str(path), full_page=True)
    pg.set_viewport_size(size)


def body(pg: Any) -> str:
    return str(pg.inner_text("body"))


def wait_text(pg: Any, pattern: str, what: str, timeout_s: float = 90) -> re.Match[str]:
    """Wait until the page's text matches ``pattern``; the match."""
    return wait_for(lambda: re.search(pattern, body(pg)), what, timeout_s, interval_s=0.25)


def test_dashboard_shows_what_the_store_holds(
    stack: RunningStack, store: redis.Redis, tmp_path: Path
) -> None:
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium): no browser to drive")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")

    pl = Pipeline.create(stack, tmp_path)
    # 30 simulated minutes, anomalies after the detectors' warm-up (100 windows of 10 s)
    truth = pl.loadgen(
        "--rate=0", "--duration=1800", "--sim-rate=20", "--devices=6", "--services=2",
        "--seed=21", "--bad-rate=0.01", "--late-rate=0.01", "--anomaly-rate=1.0",
        "--anomaly-after=1200",
    )  # fmt: skip
    worker = pl.worker()
    try:
        pl.wait_applied(store, alive=worker.alive)
    finally:
        assert worker.stop() == 0, worker.tail()

    # the span's last ten whole minutes (where the anomalies are): nothing moves them now
    first = keys.window_start(int(truth["start_ms"]), keys.WINDOW_1M) + 20 * MIN
    rng = timerange.checked(first, first + 10 * MIN)
    parts = stack.kafka_settings.partitions
    reader = store_client(stack.store_settings, decode=False)
    topo = queries.discover(reader, min_partitions=parts)
    now_ms = time.time_ns() // 1_000_000
    kpis = queries.read_kpis(reader, topo, now_ms)
    fleet = series.read_fleet(reader, topo, rng)
    want = series.range_kpis(reader, topo, fleet, kpis.progress, now_ms)
    assert want.events == raw_events(reader, parts, rng) > 1000
    site_board = boards.read_top_over(
        reader, boards.board("site.events"), topo.partitions[EventKind.SENSOR], rng.label,
        boards.range_starts(rng.start_ms, rng.end_ms), 5,
    )  # fmt: skip
    assert site_board.rows and want.p99_ms is not None and want.anomalies > 0
    reader.close()
    # the dead letters' reasons, as the topic holds them (read before playwright runs its loop)
    reasons = {
        dict(m.headers).get(diverted.REASON, b"").decode() for m in pl.read_topic("deadletter")
    }
    assert reasons

    OUT.mkdir(parents=True, exist_ok=True)
    query = urlencode({"from": str(rng.start_ms), "to": str(rng.end_ms), "refresh": "5s"})
    with dashboard(pl, tmp_path) as url, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            pg = browser.new_page(viewport={"width": 1600, "height": 1000})
            hosts: set[str] = set()
            pg.on("request", lambda req: hosts.add(urlparse(req.url).hostname or ""))
            started = time.monotonic()
            pg.goto(f"{url}/?{query}")
            wait_text(pg, r"events in range", "the KPI tiles show")
            wait_text(pg, r"refresh #1 took", "the first refresh ends")
            first_s = time.monotonic() - started
            # each figure as the store holds it (tables may draw a moment after the footer)
            expected = [
                re.escape(f"{want.events:,} events in range"),
                rf"Anomalies\s+{want.anomalies:,}\s+in range",
                rf"Active devices\s+{want.active_devices:,}\s",
                re.escape(f"{want.errors:,} errors of {want.requests:,} requests"),
                rf"p99 latency\s+{re.escape(f'{want.p99_ms:,.1f}')} ms",
                rf"Dead letters\s+{kpis.dead:,}\s",
                rf"Late events\s+{kpis.late:,}\s",
                r"Consumer lag\s+0\s",  # Kafka read, and the worker applied everything
                r"Fixed: ",
                r"Similar past anomalies to",  # the drill-down opens on an anomalous device
                *(
                    rf"{re.escape(row.member)}\s+{re.escape(cell)}"
                    for row in site_board.rows
                    if (cell := page.score_text(site_board, row.score))
                ),
            ]
            for pattern in expected:
                wait_text(pg, pattern, f"the page shows /{pattern}/", 60)
            wait_for(
                lambda: any(reason and reason in body(pg) for reason in reasons),
                "the page shows a dead letter's reason",
                60,
            )
            text = body(pg)
            (OUT / "overview.txt").write_text(text)
            screenshot(pg, OUT / "overview.png")
            assert "Traceback" not in text
            assert pg.locator("[data-testid='stException']").count() == 0

            # steady refreshes: the footer of any three after the first (it shows the latest)
            steady: dict[int, int] = {}

            def three_more() -> bool:
                m = re.search(r"refresh #(\d+) took ([\d,]+) ms", body(pg))
                if m and int(m.group(1)) > 1:
                    steady[int(m.group(1))] = int(m.group(2).replace(",", ""))
                return len(steady) >= 3

            wait_for(three_more, "three more refreshes", 12 * REFRESH_S, interval_s=0.5)
            took = [steady[n] for n in sorted(steady)]
            page_first = int(
                wait_text(pg, r"first refresh ([\d,]+) ms", "the footer").group(1).replace(",", "")
            )
            screenshot(pg, OUT / "refreshed.png")
            assert f"{want.events:,} events in range" in body(pg)  # the same after refreshes
            assert hosts <= {"127.0.0.1", "localhost", ""}, f"the page reached out: {hosts}"
        finally:
            browser.close()
    print(
        f"\ndashboard: first page load {first_s:.1f} s in the browser (page's own first refresh "
        f"{page_first} ms); steady refreshes {took} ms (median {int(np.median(took))} ms)"
    )
