"""Summarise a ``py-spy record --format raw`` profile: self/inclusive time by function and area.

``python -m pulse_bench.profile FILE [--us-per-event X]``. Each sample is attributed to one
area of the worker by its innermost frame in a known file (library frames such as numpy or
the interpreter's are passed over, so their time goes to the pipeline code that called them).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

OTHER = "other"
_LOOP_AREA = "asyncio event loop"
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")

# (area, file substrings), checked from the innermost frame outwards
AREAS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("decode + validate (validation.py, msgspec/pydantic)", (
        "pipeline/validation.py", "pydantic/", "schemas/wire.py",
    )),
    ("aggregation (numpy columns, sketches)", (
        "pipeline/aggregation.py", "schemas/sketch.py", "pipeline/windows.py",
    )),
    ("anomaly detection (detection.py, detectors.py)", (
        "pipeline/detection.py", "pipeline/detectors.py",
    )),
    ("open windows (state.py, packed values)", ("pipeline/state.py", "schemas/packed.py")),
    ("leaderboards (leaderboards.py)", ("pipeline/leaderboards.py",)),
    ("batch bookkeeping (pipeline/batch.py)", ("pipeline/batch.py",)),
    ("store payload (store_writer, keys, orjson)", ("pipeline/store_writer.py", "schemas/keys.py")),
    ("store client (redis-py)", ("redis/",)),
    ("worker glue (checkpoint order, poll split, agent loop)", (
        "pipeline/checkpoint.py", "pipeline/worker.py", "pipeline/ingest.py",
    )),
    ("aiokafka (fetch, record parsing)", ("aiokafka/", "kafka/")),
    ("Faust/mode machinery (streams, events, acks)", ("faust/", "mode/")),
    (_LOOP_AREA, ("asyncio/", "selectors.py")),
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Frame:
    """One stack frame of a sample."""

    func: str
    file: str

    @property
    def name(self) -> str:
        """``file:function``."""
        return f"{self.file}:{self.func}"


def parse_frame(text: str) -> Frame:
    """A frame from py-spy's ``function (file:line)`` text."""
    m = _FRAME.match(text)
    return Frame(m["func"], m["file"]) if m else Frame(text, "?")


def parse(lines: Iterable[str]) -> Iterator[tuple[list[Frame], int]]:
    """Samples of a collapsed-stack file: (frames root first, count)."""
    for line in lines:
        line = line.rstrip("\n")
        if not line:
            continue
        stack, _, count = line.rpartition(" ")
        yield [parse_frame(f) for f in stack.split(";")], int(count)


def _area(frame: Frame) -> str | None:
    for area, files in AREAS:
        if any(f in frame.file for f in files):
            return area
    return None


def area_of(frames: list[Frame]) -> str:
    """The worker area a sample belongs to.

    asyncio frames inside a callback (a socket write under redis-py's send, say) count for the
    code that called them; only samples with nothing known below the loop's dispatch are loop
    overhead.
    """
    dispatch = max(
        (i for i, f in enumerate(frames) if f.func in ("Handle._run", "BaseEventLoop._run_once")),
        default=-1,
    )
    for frame in reversed(frames[dispatch + 1 :]):
        area = _area(frame)
        if area is not None and area != _LOOP_AREA:
            return area
    if dispatch >= 0:
        return _LOOP_AREA
    for frame in reversed(frames):
        area = _area(frame)
        if area is not None:
            return area
    return OTHER


@dataclass
class Summary:
    """Sample counts by area and by function."""

    total: int = 0
    areas: Counter[str] = field(default_factory=Counter)
    self_time: Counter[str] = field(default_factory=Counter)
    inclusive: Counter[str] = field(default_factory=Counter)

    def add(self, frames: list[Frame], count: int) -> None:
        """Count one sample line."""
        self.total += count
        self.areas[area_of(frames)] += count
        if frames:
            self.self_time[frames[-1].name] += count
        for name in {f.name for f in frames}:
            self.inclusive[name] += count


def summarise(lines: Iterable[str]) -> Summary:
    """The summary of a collapsed-stack profile."""
    s = Summary()
    for frames, count in parse(lines):
        s.add(frames, count)
    return s


def report(s: Summary, us_per_event: float | None = None, top: int = 15) -> str:
    """A readable text report."""
    out = [f"{s.total} samples"]

    def row(name: str, n: int) -> str:
        share = n / s.total if s.total else 0.0
        cost = f"  {share * us_per_event:7.2f} µs/event" if us_per_event else ""
        return f"  {100 * share:5.1f}%{cost}  {name}"

    out.append("by area:")
    out += [row(a, n) for a, n in s.areas.most_common()]
    out.append(f"top {top} by self time:")
    out += [row(f, n) for f, n in s.self_time.most_common(top)]
    out.append(f"top {top} by inclusive time (pipeline, faust, aiokafka, redis frames):")
    interesting = ("pipeline/", "faust/", "aiokafka/", "redis/", "pydantic/", "mode/")
    incl = [(f, n) for f, n in s.inclusive.most_common() if any(k in f for k in interesting)]
    out += [row(f, n) for f, n in incl[:top]]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """Print the summary of a profile file."""
    parser = argparse.ArgumentParser(prog="python -m pulse_bench.profile")
    parser.add_argument("file", type=Path)
    parser.add_argument("--us-per-event", type=float, help="worker CPU µs per event, to scale")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args(argv)
    with args.file.open() as f:
        print(report(summarise(f), args.us_per_event, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
