"""Bad input becomes a dead letter with a reason; good input passes; nothing raises."""

from __future__ import annotations

import orjson
import pytest

from pipeline.validation import TimeBounds, decode_applog, decode_sensor

NOW = 1_790_000_000_000
BOUNDS = TimeBounds(max_age_ms=7 * 86_400_000, max_skew_ms=300_000)
GOOD = {
    "device_id": "dev-1",
    "site": "site-a",
    "event_time": NOW - 1000,
    "metric": "temperature",
    "value": 21.5,
    "unit": "C",
    "lat": 52.5,
    "lon": 13.4,
    "firmware": "1.2.3",
}


def with_(**kw: object) -> bytes:
    return orjson.dumps({**GOOD, **kw})


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"\x00\xff\xfe random", "JSON"),
        (with_()[:-7], "JSON"),
        (with_(value="hot"), "value"),
        (orjson.dumps({k: v for k, v in GOOD.items() if k != "site"}), "site"),
        (with_(extra="x"), "extra"),
        (with_(value=None).replace(b"null", b"NaN"), "finite"),
        (with_(value=None).replace(b"null", b"Infinity"), "finite"),
        (with_(event_time=NOW - 400 * 86_400_000), "older"),
        (with_(event_time=NOW + 3 * 86_400_000), "future"),
        (with_(device_id="a|b"), "device_id"),
        (with_(value=1e300), "value"),
        (with_(firmware="x" * 300_000), "firmware"),
        (b"", "empty"),
        (b"[1,2,3]", ""),
    ],
)
def test_rejects_with_reason(raw: bytes, reason: str) -> None:
    out = decode_sensor([with_(), raw, with_()], NOW, BOUNDS)
    assert out.positions == [0, 2]
    assert len(out.rejected) == 1 and out.rejected[0].index == 1
    assert reason.lower() in out.rejected[0].reason.lower()
    assert len(out.rejected[0].reason) <= 300


def test_none_value_is_rejected() -> None:
    out = decode_sensor([None], NOW, BOUNDS)
    assert out.rejected[0].reason == "empty value"


def test_applog_valid_and_invalid() -> None:
    good = {
        "service": "checkout",
        "route": "/api/orders/{id}",
        "event_time": NOW,
        "level": "ERROR",
        "status_code": 503,
        "latency_ms": 12.5,
        "trace_id": "abc123",
    }
    bad = {**good, "status_code": 700}
    out = decode_applog([orjson.dumps(good), orjson.dumps(bad)], NOW, BOUNDS)
    assert [e.status_code for e in out.events] == [503]
    assert "status_code" in out.rejected[0].reason
