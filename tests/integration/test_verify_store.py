"""``pulse verify`` finds a store that disagrees with itself, after a real pipeline run.

The truth comparison merges partitions; these checks are per partition: a packed value whose
sketch no longer holds as many values as it counts, or counters that no longer account for the
offsets.
"""

from __future__ import annotations

from pathlib import Path
from typing import cast

import pytest
import redis

from pipeline.stack.testing import RunningStack
from schemas import keys, packed
from schemas.events import EventKind
from tests.integration.harness import Pipeline

pytestmark = pytest.mark.integration


def test_verify_catches_a_store_that_disagrees_with_itself(
    stack: RunningStack, store: redis.Redis, tmp_path: Path
) -> None:
    pl = Pipeline.create(stack, tmp_path)
    truth_file = tmp_path / "truth.json"
    truth = pl.loadgen(
        "--rate=0", "--duration=4", "--devices=6", "--services=2", "--seed=5",
        "--bad-rate=0.02", "--late-rate=0.02", truth=truth_file,
    )  # fmt: skip
    assert sum(truth["dead"].values()) > 0 and sum(truth["late"].values()) > 0
    worker = pl.worker()
    try:
        pl.wait_applied(store, alive=worker.alive)
    finally:
        assert worker.stop() == 0, worker.tail()
    res = pl.verify(truth_file)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "sketches, counters and offsets agree" in res.stdout

    # one sketch bucket one too high: the merged quantiles barely move, the counts disagree
    raw = stack.redis(decode=False)
    key = next(store.scan_iter(match=keys.window_pattern(EventKind.SENSOR, keys.WINDOW_1M)))
    name, value = next(iter(cast(dict[bytes, bytes], raw.hgetall(key)).items()))
    t = packed.decode([value])
    t.count[0] += 1
    _kind, part = keys.parse_tag(key)
    raw.hset(key, name, packed.encode(t)[0])
    res = pl.verify(truth_file)
    assert res.returncode == 1
    lines = [line for line in res.stdout.splitlines() if line.startswith("MISMATCH")]
    assert any(
        f"sensor partition {part} " in line
        and f" {name.decode()}: has a sketch total unequal to its count" in line
        for line in lines
    ), res.stdout
    raw.hset(key, name, value)
    assert pl.verify(truth_file).returncode == 0

    # a progress hash whose counters no longer account for its applied offset
    progress = keys.progress_key(EventKind.APPLOG, 0)
    store.hincrby(progress, keys.Progress.OFFSET, 1)
    res = pl.verify(truth_file)
    assert res.returncode == 1
    assert "MISMATCH applog partition 0: events " in res.stdout
    assert "but applied offset" in res.stdout
