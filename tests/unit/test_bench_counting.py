"""Round-trip counters of the bench's child processes: written when the child exits, read after.

A child's counters are only ever read once it stopped, and only if it wrote them as it exited:
a normal exit, a SIGTERM handled by the app, or a SIGTERM during its start-up.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from pulse_bench.harness import BenchError
from pulse_bench.naive_app import Progress
from pulse_bench.procs import Child


def _child(tmp_path: Path, proc: subprocess.Popen[bytes], name: str = "c") -> Child:
    return Child(name, proc, tmp_path / f"{name}.log", tmp_path / f"{name}.counts.json")


def test_counters_are_written_when_the_child_exits(tmp_path: Path) -> None:
    counts = tmp_path / "c.counts.json"
    # `pulse --help` exits at once (SystemExit from argparse): the exit path writes the counters
    proc = subprocess.Popen(
        [sys.executable, "-m", "pulse_bench.counting", str(counts), "--help"],
        stdout=subprocess.DEVNULL,
    )
    assert proc.wait(120) == 0
    assert _child(tmp_path, proc).final_counts() == {"round_trips": 0, "commands": 0}


def test_a_sigterm_during_start_up_still_writes_the_counters(tmp_path: Path) -> None:
    counts = tmp_path / "c.counts.json"
    code = (
        "import signal, sys, time\n"
        "from pathlib import Path\n"
        "from pulse_bench import counting\n"
        "counting._counts.update(round_trips=7, commands=9)\n"
        "signal.signal(signal.SIGTERM, counting._terminate_early(Path(sys.argv[1])))\n"
        "print('ready', flush=True)\n"
        "time.sleep(120)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(counts)], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"ready\n"  # blocks until the handler is installed
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(120) == -signal.SIGTERM  # dies of the signal, as without the handler
    proc.stdout.close()
    assert _child(tmp_path, proc).final_counts() == {"round_trips": 7, "commands": 9}


def test_final_counts_refuses_a_running_child_and_partial_files(tmp_path: Path) -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        with pytest.raises(BenchError, match="before the process exited"):
            _child(tmp_path, sleeper).final_counts()
    finally:
        sleeper.kill()
        sleeper.wait()
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait(120)
    child = _child(tmp_path, done)
    with pytest.raises(BenchError, match="without writing its final counters"):
        child.final_counts()  # no file: killed before it could write
    child.counts_file.write_bytes(orjson.dumps({"round_trips": 3, "commands": 3}))
    with pytest.raises(BenchError, match="without writing its final counters"):
        child.final_counts()  # not marked final
    child.counts_file.write_bytes(orjson.dumps({"round_trips": 3, "commands": 4, "final": True}))
    assert child.final_counts() == {"round_trips": 3, "commands": 4}


def test_naive_progress_hands_out_exactly_the_target(tmp_path: Path) -> None:
    progress = Progress(3, tmp_path / "result.json")
    assert [progress.claim() for _ in range(5)] == [True, True, True, False, False]
    for _ in range(3):
        progress.tick()
    state = orjson.loads((tmp_path / "result.json").read_bytes())
    assert state["count"] == 3 == progress.target  # written at the target
    assert state["first"] <= state["last"]
