"""The Numenta Anomaly Benchmark (NAB) scorer and the ``pulse eval nab`` command.

The scorer follows NAB v1.1 (``nab/sweeper.py``, ``nab/optimizer.py``, ``nab/runner.py``):
every row after the probationary period gets a sweep score, +A_TP·σ(position) inside an
anomaly window (only the window's earliest detection counts) and A_FP·σ(distance after the
preceding window) outside, where σ(x) = 2/(1 + e^{5x}) − 1; an undetected window costs A_FN.
Each profile's threshold is the one that maximises the raw score over the whole corpus, and
the result is normalised to ``100·(raw − null)/(perfect − null)``.

``pulse eval nab DIR`` streams every series of ``DIR/data`` through the detector bank the
worker runs (all series as entities of one bank, one vectorised step per round) and prints
the scores; ``--out RESULTS`` writes NAB-style result files.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import re
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt
from pydantic import TypeAdapter, ValidationError

from schemas.argtypes import fraction, out_dir

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
TimeArray = npt.NDArray[np.datetime64]


@dataclass(frozen=True, slots=True)
class Profile:
    """A NAB cost matrix."""

    name: str
    tp: float
    fp: float
    fn: float


PROFILES: Final = (
    Profile("standard", 1.0, 0.11, 1.0),
    Profile("reward_low_FP", 1.0, 0.22, 1.0),
    Profile("reward_low_FN", 1.0, 0.11, 2.0),
)
PROBATION_PERCENT: Final = 0.15
# windows.json: series -> its anomaly windows, each a [start, end] pair of timestamps
_WINDOWS: Final = TypeAdapter(dict[str, list[tuple[str, str]]])


class NabError(Exception):
    """A NAB directory or result that cannot be used; the message is one sentence."""


def probation_length(rows: int, percent: float = PROBATION_PERCENT) -> int:
    """Rows at the start of a series that are not scored (``getProbationPeriod`` in NAB)."""
    return int(min(math.floor(percent * rows), percent * 5000))


def scaled_sigmoid(x: FloatArray) -> FloatArray:
    """NAB's ``scaledSigmoid``: 2·sigmoid(−5x) − 1, and −1 beyond x > 3."""
    out: FloatArray = 2.0 / (1.0 + np.exp(5.0 * np.minimum(x, 3.0))) - 1.0
    return np.where(x > 3.0, -1.0, out)


@dataclass(frozen=True, slots=True)
class SweepRows:
    """A series' scorable rows: anomaly score, unweighted sweep score and window id (−1 = none).

    ``tp_part`` is the sigmoid weight of a row inside a window (to be scaled by A_TP) and
    ``fp_part`` that of a row outside (to be scaled by A_FP); windows are numbered from
    ``window_base``.
    """

    score: FloatArray
    tp_part: FloatArray
    fp_part: FloatArray
    window: IntArray


def window_bounds(s: Series, windows: Sequence[Sequence[str]]) -> list[tuple[int, int]]:
    """Row index ranges ``[first, last]`` of each window of ``s`` (its limits must be times of
    single rows of the series)."""
    out: list[tuple[int, int]] = []
    for start, end in windows:
        try:
            lo, hi = parse_times([start, end])
        except BadTime:
            raise NabError(f"{s.name}: window [{start}, {end}] has a malformed timestamp") from None
        i, j = np.flatnonzero(s.t == lo), np.flatnonzero(s.t == hi)
        if len(i) == 0 or len(j) == 0:
            raise NabError(
                f"{s.name}: window [{start}, {end}] does not start and end on rows of the series "
                f"(which runs from {s.t.min()} to {s.t.max()})"
            )
        for limit, rows in (("starts", i), ("ends", j)):
            if len(rows) > 1:  # NAB would take the first row; a label meant one of them
                raise NabError(
                    f"{s.name}: window [{start}, {end}] {limit} at a time that rows "
                    f"{rows[0] + 1} and {rows[1] + 1} share"
                )
        if j[0] < i[0]:
            raise NabError(f"{s.name}: window [{start}, {end}] ends before it starts")
        if out and i[0] <= out[-1][1]:  # the scorer weighs detections by the window they follow
            raise NabError(
                f"{s.name}: window [{start}, {end}] does not start after the window before it "
                "ends (windows must be in time order and must not overlap)"
            )
        out.append((int(i[0]), int(j[0])))
    return out


def corpus_bounds(
    series: Sequence[Series], windows: Mapping[str, Sequence[Sequence[str]]]
) -> list[list[tuple[int, int]]]:
    """:func:`window_bounds` of every series; NabError when there is no window at all (NAB's
    score divides by the perfect detector's minus the null one's, both 0 then)."""
    bounds = [window_bounds(s, windows[s.name]) for s in series]
    if not any(bounds):
        raise NabError(
            f"windows.json gives no anomaly window to any of the {len(series)} series, and a NAB "
            "score is undefined without one (it is normalised by perfect minus null, both 0 then)"
        )
    return bounds


def sweep_rows(
    scores: FloatArray, bounds: Sequence[tuple[int, int]], window_base: int = 0
) -> SweepRows:
    """Per-row sweep weights of one series, as ``Sweeper.calcSweepScore`` computes them."""
    n = len(scores)
    idx = np.arange(n)
    window = np.full(n, -1, dtype=np.int64)
    tp_part = np.zeros(n)
    fp_part = np.full(n, -1.0)  # no preceding window: as far away as can be
    max_tp = float(scaled_sigmoid(np.array([-1.0]))[0])
    for w, (lo, hi) in enumerate(bounds):
        width = hi - lo + 1
        inside = slice(lo, hi + 1)
        window[inside] = window_base + w
        tp_part[inside] = scaled_sigmoid(-(hi - idx[inside] + 1) / width) / max_tp
        nxt = bounds[w + 1][0] if w + 1 < len(bounds) else n
        after = slice(hi + 1, nxt)
        # NAB divides by (width - 1); a one-row window would divide by zero there too
        fp_part[after] = scaled_sigmoid(np.abs(hi - idx[after]) / max(width - 1, 1e-12))
    keep = idx >= probation_length(n)
    return SweepRows(scores[keep], tp_part[keep], fp_part[keep], window[keep])


@dataclass(frozen=True, slots=True)
class Sweep:
    """Raw corpus score for every candidate threshold (descending), for one profile."""

    thresholds: FloatArray
    raw: FloatArray
    null: float

    def best(self) -> tuple[float, float]:
        """(threshold, raw score) of the best threshold; the first (highest) on ties."""
        i = int(np.argmax(self.raw))
        return float(self.thresholds[i]), float(self.raw[i])

    def at(self, threshold: float) -> float:
        """Raw score when rows with ``score >= threshold`` are detections."""
        i = int(np.searchsorted(-self.thresholds, -threshold, side="right")) - 1
        return float(self.raw[max(i, 0)])


def sweep(rows: Sequence[SweepRows], profile: Profile) -> Sweep:
    """Raw NAB score at every distinct score value (``Sweeper.calcScoreByThreshold``)."""
    score = np.concatenate([r.score for r in rows]) if rows else np.zeros(0)
    window = np.concatenate([r.window for r in rows]) if rows else np.zeros(0, np.int64)
    tp = np.concatenate([r.tp_part for r in rows]) if rows else np.zeros(0)
    fp = np.concatenate([r.fp_part for r in rows]) if rows else np.zeros(0)
    n_windows = len(np.unique(window[window >= 0]))
    null = -profile.fn * n_windows
    order = np.argsort(-score, kind="stable")
    score, window, tp, fp = score[order], window[order], tp[order], fp[order]
    gain = np.where(window < 0, profile.fp * fp, 0.0)
    inw = np.flatnonzero(window >= 0)
    if len(inw):
        # a window counts its best (earliest) detection so far: add each increase of the max
        w = window[inw]
        by_w = np.lexsort((inw, w))
        ws, vals = w[by_w], profile.tp * tp[inw][by_w]
        offset = 10.0 * (np.cumsum(np.r_[True, ws[1:] != ws[:-1]]) - 1)  # keeps groups apart
        run = np.maximum.accumulate(np.maximum(vals, -profile.fn) + offset) - offset
        first = np.r_[True, ws[1:] != ws[:-1]]
        prev = np.where(first, -profile.fn, np.r_[-profile.fn, run[:-1]])
        gain[inw[by_w]] = run - prev
    raw = null + np.cumsum(gain)
    last = np.r_[score[1:] != score[:-1], True] if len(score) else np.zeros(0, bool)
    thresholds = np.r_[1.1, score[last]]
    return Sweep(thresholds, np.r_[null, raw[last]], null)


def normalised(raw: float, null: float, perfect: float) -> float:
    """NAB's final score: 0 for the null detector, 100 for the perfect one."""
    return 100.0 * (raw - null) / (perfect - null)


# --- corpus ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Series:
    """One NAB data file."""

    name: str  # "<group>/<file>.csv"
    stamps: list[str]
    raw_values: list[str]
    t: TimeArray
    values: FloatArray


# NAB's files step back by up to an hour (machine_temperature_system_failure) and repeat times
CLOCK_SLACK_MS: Final = 3_600_000
# a date, an optional time and an optional zone (Z, +05:00, -0800): ISO 8601 as NAB writes it
_STAMP: Final = re.compile(
    r"\s*(\d{4}-\d\d-\d\d(?:[T ]\d\d:\d\d(?::\d\d(?:\.\d+)?)?)?)\s*"
    r"(?:Z|([+-])([01]\d|2[0-3])(?::?([0-5]\d))?)?\s*"
)
_NAB_DIGITS: Final = [i for i in range(19) if i not in (4, 7, 10, 13, 16)]


class BadTime(ValueError):
    """The text at ``index`` is not a time."""

    def __init__(self, index: int, text: str) -> None:
        super().__init__(index, text)
        self.index, self.text = index, text


def parse_times(stamps: Sequence[str]) -> TimeArray:
    """Times to the millisecond of ISO 8601 texts such as NAB's ``2014-04-01 00:00:00``, in UTC
    when they name a zone (a text without one is taken as it is); BadTime names the first text
    that is not one."""
    if _nab_shaped(stamps):
        with contextlib.suppress(ValueError):  # a field out of range: found below
            return np.array(stamps, dtype="datetime64[ms]")
    naive, east = [], np.zeros(len(stamps), dtype=np.int64)  # minutes east of UTC
    for i, text in enumerate(stamps):
        m = _STAMP.fullmatch(text)
        if m is None:
            raise BadTime(i, text)
        naive.append(m[1])
        if m[2]:
            east[i] = (1 if m[2] == "+" else -1) * (60 * int(m[3]) + int(m[4] or 0))
    for i, text in enumerate(naive):  # numpy's own check of each field, e.g. month 13
        try:
            np.datetime64(text, "ms")
        except ValueError:
            raise BadTime(i, stamps[i]) from None
    t: TimeArray = np.array(naive, dtype="datetime64[ms]") - east.astype("timedelta64[m]")
    return t


def _nab_shaped(stamps: Sequence[str]) -> bool:
    """Whether every text is ``YYYY-MM-DD HH:MM:SS`` (or with a ``T``), checked by numpy: a
    regular expression per row would take longer than reading the file."""
    a = np.array(stamps)
    if len(a) == 0 or a.dtype != np.dtype("<U19") or bool((np.strings.str_len(a) != 19).any()):
        return False
    c = a.view(np.uint32).reshape(-1, 19)
    digits = c[:, _NAB_DIGITS]
    return bool(
        ((digits >= ord("0")) & (digits <= ord("9"))).all()
        and (c[:, [4, 7]] == ord("-")).all()
        and (c[:, [13, 16]] == ord(":")).all()
        and np.isin(c[:, 10], [ord(" "), ord("T")]).all()
    )


def load_corpus(root: Path) -> tuple[list[Series], dict[str, list[list[str]]]]:
    """The series under ``root/data`` and the windows of ``root/windows.json``."""
    data = root / "data"
    if not root.is_dir():
        raise NabError(f"{root} is not a directory")
    if not data.is_dir():
        raise NabError(f"{root} has no data/ directory (expected data/<group>/<series>.csv)")
    try:
        windows = json.loads((root / "windows.json").read_text())
    except FileNotFoundError:
        raise NabError(f"{root} has no windows.json") from None
    except (OSError, ValueError) as exc:
        raise NabError(f"{root / 'windows.json'} cannot be read: {exc}") from None
    if not isinstance(windows, dict):
        raise NabError(f"{root / 'windows.json'} is not an object of series -> windows")
    try:
        pairs = _WINDOWS.validate_python(windows)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in err["loc"])
        raise NabError(
            f"{root / 'windows.json'}: {where}: {err['msg']} (each series holds a list of "
            "[start, end] timestamp pairs)"
        ) from None
    windows = {name: [list(w) for w in ws] for name, ws in pairs.items()}
    series = []
    for path in sorted(data.glob("*/*.csv")):
        name = f"{path.parent.name}/{path.name}"
        series.append(read_series(path, name))
    if not series:
        raise NabError(f"{data} holds no <group>/<series>.csv files")
    for s in series:
        if s.name not in windows:
            raise NabError(f"windows.json has no entry for {s.name}")
    return series, windows


def read_series(path: Path, name: str) -> Series:
    """One ``timestamp,value`` CSV file (rows are counted after the header), in time order up to
    :data:`CLOCK_SLACK_MS`: a row may repeat a time or step back by that much, as in NAB's files."""
    try:
        with path.open(newline="") as f:
            reader = csv.reader(f)
            try:
                rows = list(reader)
            except csv.Error as exc:
                raise NabError(f"{path} line {reader.line_num} is not valid CSV: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise NabError(f"{path} cannot be read: {exc}") from None
    if not rows or [c.strip() for c in rows[0][:2]] != ["timestamp", "value"]:
        raise NabError(f"{path} does not start with the header 'timestamp,value'")
    body = [r for r in rows[1:] if r]
    if len(body) == 0:
        raise NabError(f"{path} has no rows")
    short = next((i for i, r in enumerate(body) if len(r) < 2), None)
    if short is not None:
        raise NabError(f"{path} row {short + 1} has no value")
    stamps = [r[0] for r in body]
    raw_values = [r[1] for r in body]
    try:
        t = parse_times(stamps)
    except BadTime as exc:
        raise NabError(
            f"{path} row {exc.index + 1}: {exc.text!r} is not a time such as 2014-04-01 00:00:00"
        ) from None
    try:
        values = np.array(raw_values, dtype=np.float64)
    except ValueError as exc:
        raise NabError(f"{path} has a malformed row: {exc}") from None
    if not bool(np.all(np.isfinite(values))):
        raise NabError(f"{path} holds a value that is not a finite number")
    ms = t.astype(np.int64)
    latest = np.maximum.accumulate(ms)
    late = np.flatnonzero(ms < latest - CLOCK_SLACK_MS)
    if len(late):
        i = int(late[0])
        j = int(np.flatnonzero(ms[:i] == latest[i])[0])
        raise NabError(
            f"{path} is not in time order: row {i + 1} ({stamps[i]}) is more than an hour "
            f"before row {j + 1} ({stamps[j]})"
        )
    return Series(name, stamps, raw_values, t, values)


def detect(series: Sequence[Series]) -> list[FloatArray]:
    """Anomaly scores of every series, from one detector bank with a row per series."""
    from pipeline import detectors

    bank = detectors.DetectorBank(len(series))
    codes = np.concatenate(
        [np.full(len(s.values), i, dtype=np.int64) for i, s in enumerate(series)]
    )
    # a few NAB files step back an hour at a DST change: the detector's clock never does
    t_ms = np.concatenate([np.maximum.accumulate(s.t.astype(np.int64)) for s in series])
    values = np.concatenate([s.values for s in series])
    scores = bank.score_batch(codes, t_ms, values).score
    out, pos = [], 0
    for s in series:
        out.append(scores[pos : pos + len(s.values)])
        pos += len(s.values)
    return out


@dataclass(frozen=True, slots=True)
class ProfileResult:
    """A profile's best threshold, its normalised corpus score and the score of each group."""

    profile: Profile
    threshold: float
    score: float
    groups: dict[str, float]
    counts: tuple[int, int, int]  # windows detected, windows, false-positive rows


def evaluate(
    series: Sequence[Series],
    windows: Mapping[str, Sequence[Sequence[str]]],
    scores: Sequence[FloatArray],
    threshold: float | None = None,
) -> list[ProfileResult]:
    """Score a corpus per profile (threshold optimised unless one is given)."""
    rows: list[SweepRows] = []
    group_of: list[str] = []
    base = 0
    for s, sc, bounds in zip(series, scores, corpus_bounds(series, windows), strict=True):
        rows.append(sweep_rows(np.asarray(sc, dtype=np.float64), bounds, base))
        base += len(bounds)
        group_of.append(s.name.split("/")[0])
    n_windows = base
    results = []
    for profile in PROFILES:
        sw = sweep(rows, profile)
        thr, raw = sw.best() if threshold is None else (threshold, sw.at(threshold))
        total = normalised(raw, sw.null, profile.tp * n_windows)
        groups: dict[str, float] = {}
        for g in sorted(set(group_of)):
            sub = [r for r, gg in zip(rows, group_of, strict=True) if gg == g]
            gw = sum(len(np.unique(r.window[r.window >= 0])) for r in sub)
            if gw == 0:
                groups[g] = float("nan")
                continue
            gs = sweep(sub, profile)
            groups[g] = normalised(gs.at(thr), gs.null, profile.tp * gw)
        all_score = np.concatenate([r.score for r in rows])
        all_win = np.concatenate([r.window for r in rows])
        hit = all_score >= thr
        detected = len(np.unique(all_win[hit & (all_win >= 0)]))
        results.append(
            ProfileResult(
                profile, thr, total, groups, (detected, n_windows, int((hit & (all_win < 0)).sum()))
            )
        )
    return results


def read_scores(root: Path, series: Sequence[Series]) -> list[FloatArray]:
    """Another detector's scores of every series, row for row, to score them the same way.

    A series' scores are ``root/<group>/<file>.csv`` (as ``--out`` writes them) or, as in NAB's
    ``results/<detector>/`` folders, ``root/<group>/<detector>_<file>.csv``: a CSV with
    ``timestamp`` and ``anomaly_score`` columns and the series' timestamps in its order.
    """
    if not root.is_dir():
        raise NabError(f"{root} is not a directory")
    out = []
    for s in series:
        group, file = s.name.split("/", 1)
        path = root / group / file
        if not path.is_file():
            found = sorted((root / group).glob(f"*_{file}")) if (root / group).is_dir() else []
            if len(found) != 1:
                which = "several files match" if found else "none found"
                raise NabError(
                    f"{root} holds no single score file for {s.name} ({group}/{file} or "
                    f"{group}/<detector>_{file}: {which})"
                )
            path = found[0]
        out.append(_read_score_file(path, s))
    return out


def _read_score_file(path: Path, s: Series) -> FloatArray:
    try:
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise NabError(f"{path} cannot be read: {exc}") from None
    if not rows or not {"timestamp", "anomaly_score"} <= set(rows[0]):
        raise NabError(f"{path} has no rows with 'timestamp' and 'anomaly_score' columns")
    if len(rows) != len(s.values):
        raise NabError(f"{path} has {len(rows)} rows where {s.name} has {len(s.values)}")
    try:
        t = parse_times([r["timestamp"] for r in rows])
        scores = np.array([r["anomaly_score"] for r in rows], dtype=np.float64)
    except BadTime as exc:
        raise NabError(f"{path} row {exc.index + 1}: {exc.text!r} is not a time") from None
    except (TypeError, ValueError) as exc:
        raise NabError(f"{path} has a malformed row: {exc}") from None
    if not bool(np.array_equal(t, s.t)):
        at = int(np.flatnonzero(t != s.t)[0])
        raise NabError(f"{path} row {at + 1} is for {t[at]}, not {s.t[at]} as in {s.name}")
    if not bool(np.all(np.isfinite(scores))):
        raise NabError(f"{path} holds a score that is not a finite number")
    return scores


def prepare_results(out: Path, root: Path, series: Sequence[Series]) -> None:
    """Make ``out/<group>/`` for every series of the corpus at ``root``, before the run: NabError
    if one cannot be made or written, or lies in the corpus's ``data/`` (its files would be
    overwritten or mixed with the series)."""
    data = (root / "data").resolve()
    try:
        for s in series:
            where = (out / s.name).parent.resolve()
            if where == data or data in where.parents:
                raise NabError(f"--out {out} would write into {root / 'data'}, the corpus itself")
        for s in series:
            target = out / s.name
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.is_dir() or not os.access(target.parent, os.W_OK):
                raise NabError(f"--out {out}: {target} cannot be written")
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop
        raise NabError(f"--out {out} cannot be made: {exc}") from None


def write_results(out: Path, series: Sequence[Series], scores: Sequence[FloatArray]) -> None:
    """``out/<group>/<series>.csv`` with ``timestamp,value,anomaly_score``."""
    for s, sc in zip(series, scores, strict=True):
        path = out / s.name
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["timestamp", "value", "anomaly_score"])
                w.writerows(zip(s.stamps, s.raw_values, (repr(float(x)) for x in sc), strict=True))
        except OSError as exc:
            raise NabError(f"{path} cannot be written: {exc}") from None


# --- command -----------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``pulse eval nab DIR [--out RESULTS | --scores RESULTS] [--threshold T]``."""
    sub = parser.add_subparsers(dest="action", metavar="ACTION", parser_class=type(parser))
    sub.required = True
    p = sub.add_parser(
        "nab",
        help="score the detectors on a NAB-layout corpus",
        description="Stream every series of DIR/data through the anomaly detectors and print "
        "the NAB score per profile (threshold optimised over the corpus, as NAB does).",
    )
    p.add_argument(
        "dir", type=Path, metavar="DIR", help="NAB layout: data/<group>/*.csv, windows.json"
    )
    source = p.add_mutually_exclusive_group()
    source.add_argument(
        "--out",
        type=out_dir,
        default=None,
        metavar="RESULTS",
        help="write RESULTS/<group>/<series>.csv (timestamp,value,anomaly_score)",
    )
    source.add_argument(
        "--scores",
        type=Path,
        default=None,
        metavar="RESULTS",
        help="score another detector's results instead of Pulse's: RESULTS/<group>/<series>.csv "
        "or NAB's results/<detector>/ layout (<group>/<detector>_<series>.csv)",
    )
    p.add_argument(
        "--threshold",
        type=fraction,
        default=None,
        metavar="T",
        help="score at this fixed threshold instead of optimising it per profile",
    )
    from pipeline import quality

    quality.add_arguments(
        sub.add_parser(
            "anomalies",
            help="precision and recall of the store's anomalies against a truth file",
            description="Match the anomalies the worker stored with the episodes the load "
            "generator injected (its truth file): precision per event kind, recall per "
            "injected anomaly kind.",
        )
    )


def run(args: argparse.Namespace) -> int:
    """Run ``pulse eval nab`` or ``pulse eval anomalies``."""
    if args.action == "anomalies":
        from pipeline import quality

        return quality.run(args)
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 120))
    try:
        began = time.perf_counter()
        series, windows = load_corpus(args.dir)
        corpus_bounds(series, windows)  # a bad window stops the run before it starts
        if args.out is not None:
            prepare_results(args.out, args.dir, series)
        loaded = time.perf_counter()
        scores = detect(series) if args.scores is None else read_scores(args.scores, series)
        detected = time.perf_counter()
        results = evaluate(series, windows, scores, args.threshold)
        if args.out is not None:
            write_results(args.out, series, scores)
    except NabError as exc:
        print(f"pulse eval nab: {exc}.", file=sys.stderr)
        return 2
    rows = sum(len(s.values) for s in series)
    groups = sorted({g for r in results for g in r.groups})
    whose = "Pulse's detectors" if args.scores is None else str(args.scores)
    table = Table(title=f"NAB scores of {whose}: {len(series)} series, {rows} rows")
    for col in ("profile", "threshold", "score", "detected", "FP rows", *groups):
        table.add_column(col, justify="left" if col == "profile" else "right")
    for r in results:
        d, w, fp = r.counts
        table.add_row(
            r.profile.name,
            f"{r.threshold:.4f}",
            f"{r.score:.1f}",
            f"{d}/{w}",
            str(fp),
            *(f"{r.groups[g]:.1f}" if not math.isnan(r.groups[g]) else "-" for g in groups),
        )
    console.print(table)
    per_row = (detected - loaded) / rows * 1e6
    step = "detect" if args.scores is None else "read scores"
    console.print(
        f"load {loaded - began:.1f} s, {step} {detected - loaded:.1f} s ({per_row:.1f} µs/row), "
        f"score {time.perf_counter() - detected:.1f} s"
    )
    return 0
