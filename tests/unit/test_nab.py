"""The NAB scorer on hand-computed cases, and ``pulse eval nab`` on a tiny synthetic corpus."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from pipeline import cli, nab

STD, LOW_FP, LOW_FN = nab.PROFILES
MAX_TP = 2 / (1 + math.exp(-5)) - 1  # scaledSigmoid(-1)


def sig(x: float) -> float:
    return 2 / (1 + math.exp(5 * x)) - 1


def raw_score(scores: np.ndarray, bounds: list[tuple[int, int]], thr: float = 0.5) -> float:
    rows = nab.sweep_rows(scores, bounds)
    return nab.sweep([rows], STD).at(thr)


def one_hot(n: int, *at: int) -> np.ndarray:
    s = np.zeros(n)
    s[list(at)] = 1.0
    return s


def test_scaled_sigmoid_and_probation() -> None:
    assert nab.scaled_sigmoid(np.array([-1.0, 0.0, 1.0, 3.5])) == pytest.approx(
        [MAX_TP, 0.0, -MAX_TP, -1.0]
    )
    assert nab.probation_length(100) == 15
    assert nab.probation_length(4032) == 604
    assert nab.probation_length(22695) == 750


# 100 rows: probation 15; one window, rows 50..59 (width 10)
W = [(50, 59)]


def test_detection_at_window_start_scores_one() -> None:
    assert raw_score(one_hot(100, 50), W) == pytest.approx(1.0)


def test_detection_at_window_end_scores_little() -> None:
    assert raw_score(one_hot(100, 59), W) == pytest.approx(sig(-0.1) / MAX_TP)


def test_only_the_first_detection_in_a_window_counts() -> None:
    assert raw_score(one_hot(100, 55, 50, 58), W) == pytest.approx(1.0)


def test_false_positive_right_after_a_window_costs_less_than_far_after() -> None:
    near = raw_score(one_hot(100, 50, 60), W) - 1.0
    far = raw_score(one_hot(100, 50, 99), W) - 1.0
    assert near == pytest.approx(0.11 * sig(1 / 9))
    assert far == pytest.approx(-0.11)  # 40/9 > 3 widths: full penalty
    before = raw_score(one_hot(100, 30, 50), W) - 1.0
    assert before == pytest.approx(-0.11)  # no preceding window


def test_missed_window_and_probation() -> None:
    assert raw_score(np.zeros(100), W) == pytest.approx(-1.0)
    # a detection in the probationary period neither hits nor costs
    assert raw_score(one_hot(100, 10), W) == pytest.approx(-1.0)
    assert raw_score(one_hot(100, 10), [(5, 20)]) == pytest.approx(-1.0)


def test_sweep_picks_the_best_threshold_over_the_corpus() -> None:
    a = np.zeros(100)
    a[52], a[80] = 0.9, 0.95  # hit early in the window, and an FP at a higher score
    b = np.zeros(100)
    b[30] = 0.7  # an FP in a series without windows
    rows = [nab.sweep_rows(a, W, 0), nab.sweep_rows(b, [], 1)]
    sw = nab.sweep(rows, STD)
    thr, raw = sw.best()
    hit = sig(-(59 - 52 + 1) / 10) / MAX_TP
    fp80 = 0.11 * sig(21 / 9)
    assert thr == pytest.approx(0.9)
    assert raw == pytest.approx(hit + fp80)
    assert sw.at(0.7) == pytest.approx(hit + fp80 - 0.11)
    assert sw.at(2.0) == sw.null == -1.0
    assert nab.sweep(rows, LOW_FN).null == -2.0
    assert nab.normalised(sw.null, sw.null, 1.0) == 0.0
    assert nab.normalised(1.0, sw.null, 1.0) == 100.0


def make_corpus(root: Path) -> None:
    rng = np.random.default_rng(0)
    t0 = np.datetime64("2014-04-01T00:00")
    windows: dict[str, list[list[str]]] = {}
    for group, name, jump in (("synA", "a.csv", True), ("synB", "b.csv", False)):
        n = 1200
        t = t0 + np.arange(n) * np.timedelta64(5, "m")
        v = 10 + rng.normal(0, 1, n)
        if jump:
            v[900:] += 25
        stamps = [str(x).replace("T", " ") for x in t.astype("datetime64[s]")]
        (root / "data" / group).mkdir(parents=True)
        lines = ["timestamp,value", *(f"{s},{x:.3f}" for s, x in zip(stamps, v, strict=True))]
        (root / "data" / group / name).write_text("\n".join(lines) + "\n")
        windows[f"{group}/{name}"] = (
            [[stamps[880] + ".000000", stamps[960] + ".000000"]] if jump else []
        )
    (root / "windows.json").write_text(json.dumps(windows))


def test_eval_nab_scores_a_corpus_and_writes_results(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_corpus(tmp_path / "nab")
    assert cli.main(["eval", "nab", str(tmp_path / "nab"), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "standard" in out and "reward_low_FN" in out
    res = (tmp_path / "out" / "synA" / "a.csv").read_text().splitlines()
    assert res[0] == "timestamp,value,anomaly_score" and len(res) == 1201
    scores = np.array([float(r.split(",")[2]) for r in res[1:]])
    assert scores.min() >= 0 and scores.max() <= 1
    assert scores[900:960].max() >= 0.66  # the jump is found inside its window
    series, windows = nab.load_corpus(tmp_path / "nab")
    std = nab.evaluate(series, windows, nab.detect(series))[0]
    assert std.score > 50


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda p: None, "is not a directory"),
        (lambda p: (p / "data").mkdir(parents=True), "has no windows.json"),
        (lambda p: p.mkdir(), "has no data/ directory"),
    ],
)
def test_eval_nab_bad_dirs_get_one_sentence(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], setup: object, message: str
) -> None:
    root = tmp_path / "nab"
    setup(root)  # type: ignore[operator]
    assert cli.main(["eval", "nab", str(root)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.count("\n") == 0 and err.endswith(".")


def test_eval_nab_rejects_a_malformed_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_corpus(tmp_path / "nab")
    (tmp_path / "nab" / "data" / "synB" / "b.csv").write_text("timestamp,value\nnot a time,1\n")
    assert cli.main(["eval", "nab", str(tmp_path / "nab")]) == 2
    assert "b.csv row 1: 'not a time' is not a time such as" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("windows", "message"),
    [
        ([], "is not an object of series -> windows"),
        ({"synA/a.csv": 5}, "synA/a.csv: Input should be a valid list"),
        ({"synA/a.csv": [[1, 2]]}, "synA/a.csv.0.0: Input should be a valid string"),
        ({"synA/a.csv": [["a", "b", "c"]]}, "synA/a.csv.0: Tuple should have at most 2 items"),
        ({"synA/a.csv": [["x", "y"]]}, "window [x, y] has a malformed timestamp"),
    ],
)
def test_eval_nab_rejects_malformed_windows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], windows: object, message: str
) -> None:
    make_corpus(tmp_path / "nab")
    good = json.loads((tmp_path / "nab" / "windows.json").read_text())
    doc = {**good, **windows} if isinstance(windows, dict) else windows
    (tmp_path / "nab" / "windows.json").write_text(json.dumps(doc))
    assert cli.main(["eval", "nab", str(tmp_path / "nab")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.count("\n") == 0 and err.endswith("."), err


def test_eval_nab_rejects_a_window_that_ends_before_it_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_corpus(tmp_path / "nab")
    path = tmp_path / "nab" / "windows.json"
    good = json.loads(path.read_text())
    name, ws = next((k, v) for k, v in good.items() if v)
    path.write_text(json.dumps({**good, name: [[ws[0][1], ws[0][0]]]}))
    assert cli.main(["eval", "nab", str(tmp_path / "nab")]) == 2
    assert "ends before it starts" in capsys.readouterr().err


@pytest.mark.parametrize("second", [(950, 1000), (890, 1000), (700, 800)])
def test_eval_nab_rejects_windows_that_overlap_or_are_out_of_order(
    second: tuple[int, int], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The scorer weighs a detection by the window it follows: windows [880, 960] and a
    second one overlapping it, inside it, or before it are refused, naming the second."""
    make_corpus(tmp_path / "nab")
    path = tmp_path / "nab" / "windows.json"
    good = json.loads(path.read_text())
    name, ws = next((k, v) for k, v in good.items() if v)
    t0 = np.datetime64("2014-04-01T00:00")
    extra = [str(t0 + i * np.timedelta64(5, "m")).replace("T", " ") + ":00" for i in second]
    path.write_text(json.dumps({**good, name: [ws[0], extra]}))
    assert cli.main(["eval", "nab", str(tmp_path / "nab")]) == 2
    err = capsys.readouterr().err
    assert f"window [{extra[0]}, {extra[1]}] does not start after the window before it" in err


@pytest.mark.parametrize("value", ["2", "-0.1", "x"])
def test_a_threshold_outside_the_scores_is_one_sentence(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["eval", "nab", "/nonexistent", "--threshold", value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("pulse eval nab: Argument --threshold: ") and "[0, 1]" in err


def test_eval_nab_scores_another_detectors_results(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--scores`` reads results as ``--out`` writes them, or in NAB's results/<detector>/
    layout, and scores them exactly as Pulse's own."""
    make_corpus(tmp_path / "nab")
    series, windows = nab.load_corpus(tmp_path / "nab")
    own = nab.detect(series)
    nab.write_results(tmp_path / "out", series, own)
    read = nab.read_scores(tmp_path / "out", series)
    assert all(np.array_equal(a, b) for a, b in zip(own, read, strict=True))
    for s in series:  # NAB's layout: results/<detector>/<group>/<detector>_<file>.csv
        group, file = s.name.split("/")
        (tmp_path / "det" / group).mkdir(parents=True)
        (tmp_path / "out" / s.name).rename(tmp_path / "det" / group / f"det_{file}")
    want = nab.evaluate(series, windows, own)
    got = nab.evaluate(series, windows, nab.read_scores(tmp_path / "det", series))
    assert [(r.threshold, r.score, r.counts) for r in got] == [
        (r.threshold, r.score, r.counts) for r in want
    ]
    assert cli.main(["eval", "nab", str(tmp_path / "nab"), "--scores", str(tmp_path / "det")]) == 0
    out = capsys.readouterr().out
    assert f"{want[0].score:.1f}" in out and "read scores" in out


def _replace_line(path: Path, index: int, line: str | None) -> None:
    lines = path.read_text().splitlines()
    if line is None:
        del lines[index]
    else:
        lines[index] = line
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: p.unlink(), "holds no single score file for synA/a.csv"),
        (lambda p: _replace_line(p, 5, None), "has 1199 rows where synA/a.csv has 1200"),
        (lambda p: _replace_line(p, 3, "2014-04-01 00:20:00,1,0.1"), "row 3 is for"),
        (lambda p: _replace_line(p, 2, "2014-04-01 00:05:00,1,nan"), "not a finite number"),
        (lambda p: _replace_line(p, 2, "2014-04-01 00:05:00,1,high"), "malformed row"),
        (lambda p: _replace_line(p, 0, "timestamp,value,score"), "'anomaly_score' columns"),
    ],
)
def test_eval_nab_scores_refuses_results_that_do_not_fit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: object, message: str
) -> None:
    make_corpus(tmp_path / "nab")
    series, _ = nab.load_corpus(tmp_path / "nab")
    nab.write_results(tmp_path / "out", series, [np.zeros(len(s.values)) for s in series])
    damage(tmp_path / "out" / "synA" / "a.csv")  # type: ignore[operator]
    assert cli.main(["eval", "nab", str(tmp_path / "nab"), "--scores", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.count("\n") == 0 and err.endswith(".")


def _one_sentence(capsys: pytest.CaptureFixture[str], message: str) -> None:
    err = capsys.readouterr().err.strip()
    assert message in err and err.count("\n") == 0 and err.endswith("."), err


def _no_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the detectors fail the test: what follows must be refused before the run."""

    def boom(series: object) -> None:
        raise AssertionError("the run started")

    monkeypatch.setattr(nab, "detect", boom)


Rows = Callable[[list[str]], list[str]]


def _rewrite_rows(path: Path, change: Rows) -> None:
    """Replace the rows of a data file (header kept) by ``change(rows)``."""
    header, *rows = path.read_text().splitlines()
    path.write_text("\n".join([header, *change(rows)]) + "\n")


def test_eval_nab_without_windows_is_one_sentence_before_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """NAB normalises by perfect − null, both 0 without windows: its score is undefined."""
    make_corpus(tmp_path / "nab")
    path = tmp_path / "nab" / "windows.json"
    path.write_text(json.dumps({k: [] for k in json.loads(path.read_text())}))
    series, windows = nab.load_corpus(tmp_path / "nab")
    with pytest.raises(nab.NabError, match="no anomaly window"):
        nab.evaluate(series, windows, [np.zeros(len(s.values)) for s in series])
    _no_run(monkeypatch)
    assert cli.main(["eval", "nab", str(tmp_path / "nab")]) == 2
    _one_sentence(capsys, "windows.json gives no anomaly window to any of the 2 series")


def test_eval_nab_rejects_an_overlong_csv_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_corpus(tmp_path / "nab")
    path = tmp_path / "nab" / "data" / "synB" / "b.csv"
    _rewrite_rows(path, lambda rows: ["x" * 200_000 + ",1", *rows])
    assert cli.main(["eval", "nab", str(tmp_path / "nab")]) == 2
    _one_sentence(capsys, "b.csv line 2 is not valid CSV: field larger than field limit")


@pytest.mark.parametrize(
    ("out", "message"),
    [
        (lambda p: p / "afile" / "sub", "afile is not a directory"),
        (lambda p: p / "afile", "afile exists and is not a directory"),
        (lambda p: p / ("x" * 300), "cannot be used: File name too long"),
    ],
)
def test_eval_nab_out_that_cannot_be_a_directory_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], out: Callable[[Path], Path], message: str
) -> None:
    (tmp_path / "afile").write_text("")
    with pytest.raises(SystemExit) as exc:
        cli.main(["eval", "nab", str(tmp_path), "--out", str(out(tmp_path))])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("pulse eval nab: Argument --out: ") and message in err, err


@pytest.mark.parametrize(
    ("out", "message"),
    [
        (lambda p: p / "nab" / "data", "would write into"),
        (lambda p: p / "nab" / "data" / "synA", "would write into"),
        (lambda p: p / "loop" / "x", "cannot be made"),  # passes the argument check
    ],
)
def test_eval_nab_refuses_an_out_it_cannot_write_before_the_run(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    out: Callable[[Path], Path],
    message: str,
) -> None:
    make_corpus(tmp_path / "nab")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    before = (tmp_path / "nab" / "data" / "synA" / "a.csv").read_text()
    _no_run(monkeypatch)
    assert cli.main(["eval", "nab", str(tmp_path / "nab"), "--out", str(out(tmp_path))]) == 2
    _one_sentence(capsys, message)
    assert (tmp_path / "nab" / "data" / "synA" / "a.csv").read_text() == before
    assert sorted(p.name for p in (tmp_path / "nab" / "data").iterdir()) == ["synA", "synB"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda rows: rows[::-1], "b.csv is not in time order: row 14 (2014-04-05 02:50:00) is"),
        (lambda rows: rows[:600] + rows[:600], "b.csv is not in time order: row 601 "),
        (lambda rows: ["NaT,1", *rows[1:]], "b.csv row 1: 'NaT' is not a time"),
        (lambda rows: [rows[0], ",1", *rows[2:]], "b.csv row 2: '' is not a time"),
        # numpy wraps this year around to 1969 without a word
        (lambda rows: ["292277026596-12-04T15:30:00,1", *rows[1:]], "row 1: '292277026596"),
    ],
)
def test_eval_nab_rejects_timestamps_out_of_order_or_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], change: Rows, message: str
) -> None:
    make_corpus(tmp_path / "nab")
    _rewrite_rows(tmp_path / "nab" / "data" / "synB" / "b.csv", change)
    assert cli.main(["eval", "nab", str(tmp_path / "nab")]) == 2
    _one_sentence(capsys, message)


def test_eval_nab_accepts_nab_clock_changes_but_no_window_on_a_repeated_time(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """NAB's own files repeat times and step back by up to an hour: they load, unless a window
    starts or ends on a time several rows share (which of them would it be?)."""
    make_corpus(tmp_path / "nab")
    a, b = (tmp_path / "nab" / "data" / g for g in ("synA/a.csv", "synB/b.csv"))
    # as NAB's machine_temperature_system_failure.csv (02:55, then 02:00) and
    # ec2_request_latency_system_failure.csv (12 rows at 03:00)
    _rewrite_rows(b, lambda rows: rows[:300] + rows[289:600] + [rows[600]] * 12 + rows[601:])
    assert len(nab.load_corpus(tmp_path / "nab")[0][1].values) == 1200 + 11 + 11
    _rewrite_rows(a, lambda rows: [*rows[:881], rows[880], *rows[882:]])
    assert cli.main(["eval", "nab", str(tmp_path / "nab")]) == 2
    _one_sentence(
        capsys,
        "a.csv: window [2014-04-04 01:20:00.000000, 2014-04-04 08:00:00.000000] "
        "starts at a time that rows 881 and 882 share",
    )


def test_eval_nab_reads_zone_aware_times_as_utc(tmp_path: Path) -> None:
    """A time naming a zone is converted to UTC (without numpy's warning, an error here)."""
    make_corpus(tmp_path / "naive")
    make_corpus(tmp_path / "zoned")
    for name in ("synA/a.csv", "synB/b.csv"):
        _rewrite_rows(
            tmp_path / "zoned" / "data" / name,
            lambda rows: [r.replace(",", "+05:00,", 1) for r in rows],
        )
    path = tmp_path / "zoned" / "windows.json"
    zoned = {
        k: [[t + "+05:00" for t in w] for w in ws] for k, ws in json.loads(path.read_text()).items()
    }
    path.write_text(json.dumps(zoned))
    naive, nw = nab.load_corpus(tmp_path / "naive")
    series, windows = nab.load_corpus(tmp_path / "zoned")
    for s, n in zip(series, naive, strict=True):
        assert np.array_equal(s.t, n.t - np.timedelta64(5, "h"))
    scores = [one_hot(len(s.values), 890) for s in series]
    assert [r.score for r in nab.evaluate(series, windows, scores)] == [
        r.score for r in nab.evaluate(naive, nw, scores)
    ]
