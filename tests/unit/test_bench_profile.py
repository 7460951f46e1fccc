"""The py-spy profile summariser."""

from __future__ import annotations

from pulse_bench.profile import OTHER, area_of, parse_frame, report, summarise

LINES = [
    "main (pipeline/cli.py:90);run_forever (asyncio/base_events.py:607);"
    "process (pipeline/batch.py:122);aggregate (pipeline/aggregation.py:120);"
    "cumsum (numpy/_core/fromnumeric.py:2914) 3\n",
    "main (pipeline/cli.py:90);on_message (faust/transport/conductor.py:307) 5\n",
    "main (pipeline/cli.py:90);_decode (pipeline/batch.py:140);"
    "model_validate_json (pydantic/main.py:744) 2\n",
    "\n",
    "<unknown> (?) 1\n",
]


def test_frames_parse_with_and_without_lines() -> None:
    f = parse_frame("BaseEventLoop._run_once (asyncio/base_events.py:1922)")
    assert (f.func, f.file) == ("BaseEventLoop._run_once", "asyncio/base_events.py")
    assert parse_frame("_run_code (<frozen runpy>:88)").file == "<frozen runpy>"
    assert parse_frame("weird").file == "?"


def test_samples_go_to_the_innermost_known_area() -> None:
    s = summarise(LINES)
    assert s.total == 11
    assert s.areas["aggregation (numpy columns, sketches)"] == 3  # numpy is skipped
    assert s.areas["Faust/mode machinery (streams, events, acks)"] == 5
    assert s.areas["decode + validate (validation.py, msgspec/pydantic)"] == 2
    assert s.areas[OTHER] == 1
    assert s.self_time["faust/transport/conductor.py:on_message"] == 5
    assert s.inclusive["pipeline/cli.py:main"] == 10
    assert s.inclusive["pipeline/batch.py:process"] == 3


def test_area_of_an_unknown_stack_is_other() -> None:
    assert area_of([parse_frame("x (somewhere/else.py:1)")]) == OTHER


def test_loop_frames_count_for_the_callback_that_called_them() -> None:
    base = "run (mode/worker.py:1);BaseEventLoop._run_once (asyncio/base_events.py:2);"
    base += "Handle._run (asyncio/events.py:3);"
    write = base + "send (redis/asyncio/connection.py:4);write (asyncio/selector_events.py:5)"
    idle = base + "select (selectors.py:6)"
    outer = "run (mode/worker.py:1);BaseEventLoop._run_once (asyncio/base_events.py:2);"
    outer += "select (selectors.py:6)"
    assert area_of([parse_frame(f) for f in write.split(";")]) == "store client (redis-py)"
    assert area_of([parse_frame(f) for f in idle.split(";")]) == "asyncio event loop"
    assert area_of([parse_frame(f) for f in outer.split(";")]) == "asyncio event loop"


def test_report_scales_by_cost_per_event() -> None:
    text = report(summarise(LINES), us_per_event=110.0, top=3)
    assert "11 samples" in text
    assert "45.5%    50.00 µs/event  Faust/mode machinery" in text


def test_detection_and_open_windows_have_areas_of_their_own() -> None:
    """The detector step and the open-window fold are called from the checkpoint: they count
    as detection and open windows, not as the glue that called them."""
    agent = "agent (pipeline/worker.py:1);commit (pipeline/checkpoint.py:2);"
    step = agent + "_step (pipeline/detectors.py:3);_wrapfunc (numpy/_core/fromnumeric.py:4)"
    fold = agent + "_rows (pipeline/state.py:5)"
    glue = agent + "_launch (pipeline/checkpoint.py:6)"
    assert area_of([parse_frame(f) for f in step.split(";")]).startswith("anomaly detection")
    assert area_of([parse_frame(f) for f in fold.split(";")]).startswith("open windows")
    assert area_of([parse_frame(f) for f in glue.split(";")]).startswith("worker glue")
