"""Bad input becomes a dead letter with a reason; good input passes; nothing raises."""

from __future__ import annotations

import orjson
import pytest
from pydantic import ValidationError

from pipeline.validation import (
    SLOW_PATH_MAX_BYTES,
    Rejected,
    TimeBounds,
    _describe,
    decode_applog,
    decode_sensor,
)
from schemas.events import SensorReading

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
        (b"", "empty value"),
        (b"[1,2,3]", "not a JSON object: array"),
        # poison pills: invalid UTF-8 (msgspec raises a plain UnicodeDecodeError), deep nesting
        (b'{"\xff":1}', "invalid JSON"),
        (with_(firmware=None).replace(b"null", b'"\xed\xa0\x80"'), "invalid JSON"),
        (with_(unit=None).replace(b"null", b'"\\ud800"'), "invalid JSON"),
        (b"[" * 1_000_000, "invalid JSON"),
        (b'{"a":' * 100_000, "unknown field `a`"),  # large: the fast decoder's reason
        (with_(value=None).replace(b"null", b"[" * 100_000), "schema violation"),
        (with_(value=None).replace(b"null", b"[" * 10_000), "invalid JSON"),
        (b"\xef\xbb\xbf" + with_(), "invalid JSON"),
        (with_() + b" x", "invalid JSON"),
        (b"[]", "not a JSON object: array"),
        (b'"x"', "not a JSON object: string"),
        (b"1", "not a JSON object: number"),
        (b"-0.5e3", "not a JSON object: number"),
        (b"null", "not a JSON object: null"),
        (b"true", "not a JSON object: true/false"),
        (b" \n[1]\t", "not a JSON object: array"),
        (b"[1", "invalid JSON"),
        (b"NaN", "invalid JSON"),
        (b" ", "invalid JSON"),
        # duplicate keys: the last one counts (as for the model), so an invalid last one rejects
        (with_()[:-1] + b',"value":"hot"}', "value"),
        (with_(event_time=True), "event_time"),
        (with_(event_time=float(NOW)), "event_time"),
        (with_(event_time=None).replace(b"null", b"1" + b"0" * 30), "event_time"),
        (with_(value=None).replace(b"null", b"1e400"), "value"),
        # a version equal to 1 that is not the integer 1 (Literal[1] alone would take them)
        (with_(schema_version=True), "schema_version must be the integer 1"),
        (with_(schema_version=1.0), "schema_version must be the integer 1"),
        (with_(schema_version="1"), "schema_version"),
        (with_(schema_version=2), "schema_version"),
    ],
)
def test_rejects_with_reason(raw: bytes, reason: str) -> None:
    out = decode_sensor([with_(), raw, with_()], NOW, BOUNDS)
    assert out.positions == [0, 2]
    assert len(out.rejected) == 1 and out.rejected[0].index == 1
    assert reason.lower() in out.rejected[0].reason.lower()
    assert len(out.rejected[0].reason) <= 300


def test_tombstone_and_empty_values_are_dead_letters() -> None:
    out = decode_sensor([None, b"", with_(), None], NOW, BOUNDS)
    assert out.positions == [2]
    assert [(r.index, r.reason) for r in out.rejected] == [
        (0, "null value (tombstone)"),
        (1, "empty value"),
        (3, "null value (tombstone)"),
    ]


def test_a_value_of_about_one_megabyte_is_rejected() -> None:
    huge = with_(firmware="x" * 1_000_000)
    assert len(huge) > 1_000_000
    out = decode_sensor([huge, b'{"unit":"' + b"\xff" * 1_000_100 + b'"}'], NOW, BOUNDS)
    assert [r.index for r in out.rejected] == [0, 1]
    assert "firmware" in out.rejected[0].reason
    assert out.rejected[1].reason.startswith("invalid JSON")
    assert all(len(r.reason) <= 300 for r in out.rejected)


def test_whitespace_around_a_valid_event_is_fine() -> None:
    padded = b" \n" + with_() + b" " * 1_000_000
    assert decode_sensor([padded], NOW, BOUNDS).positions == [0]


def test_duplicate_keys_read_as_the_model_reads_them() -> None:
    last_wins = with_()[:-1] + b',"value":99.5}'
    invalid_first = with_(value="hot")[:-1] + b',"value":99.5}'
    out = decode_sensor([last_wins, invalid_first], NOW, BOUNDS)
    assert out.positions == [0, 1]
    assert [e.value for e in out.events] == [99.5, 99.5]


@pytest.mark.parametrize("size", [1_000, 100_000])  # judged by pydantic / by the fast decoder
def test_reasons_do_not_echo_raw_input(size: int) -> None:
    key = "k\n\x00é" + "x" * size
    raw = orjson.dumps({**GOOD, key: 1})
    reason = decode_sensor([raw], NOW, BOUNDS).rejected[0].reason
    assert "k\\n\\x00\\xe9xxx" in reason
    assert reason.isascii() and reason.isprintable() and len(reason) <= 300


def test_reason_of_a_missing_field_names_it() -> None:
    raw = orjson.dumps({k: v for k, v in GOOD.items() if k != "metric"})
    assert decode_sensor([raw], NOW, BOUNDS).rejected[0].reason == (
        "schema violation: metric: Field required"
    )


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


def test_an_unexpected_error_rejects_the_record_only(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(cls: type[SensorReading], raw: bytes) -> SensorReading:
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(SensorReading, "model_validate_json", classmethod(broken))
    out = decode_sensor([with_(), with_(value="hot"), with_()], NOW, BOUNDS)
    assert out.positions == [0, 2]
    assert out.rejected == [Rejected(1, "undecodable value (RecursionError)")]


def test_a_large_value_the_fast_decoder_rejects_is_not_handed_to_pydantic() -> None:
    # 90k distinct unknown keys: pydantic would spend most of a second on it
    body = b",".join(b'"k%d":1' % i for i in range(90_000))
    raw = b"{" + body + b"}"
    assert len(raw) > SLOW_PATH_MAX_BYTES
    out = decode_sensor([raw], NOW, BOUNDS)
    (rej,) = out.rejected
    assert rej.reason.startswith("schema violation: ")
    assert f"in a value of {len(raw)} bytes" in rej.reason


def _spy_on_the_model(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes of the values handed to the sensor model from now on."""
    sizes: list[int] = []
    validate = SensorReading.model_validate_json

    def spy(cls: type[SensorReading], raw: bytes) -> SensorReading:
        sizes.append(len(raw))
        return validate(raw)

    monkeypatch.setattr(SensorReading, "model_validate_json", classmethod(spy))
    return sizes


def test_the_model_judges_a_compact_copy_of_a_costly_value(monkeypatch: pytest.MonkeyPatch) -> None:
    # Just under the slow path's limit: unknown keys with nested arrays cost pydantic ~200 ms
    # each (an error per key, holding its input), so a poll of them stalled a worker for minutes.
    # The model sees each key once, three unknown keys, and empty arrays in place of the rest.
    unit = b'"k%d":' + b"[" * 20 + b"]" * 20
    tail = b',"unit":' + b"[" * 50 + b"]" * 50 + b',"unit":[' + b"1," * 2000 + b"1]}"
    keys = (SLOW_PATH_MAX_BYTES - len(tail)) // (len(unit % 9999) + 1)
    raw = b"{" + b",".join(unit % i for i in range(keys)) + tail  # a duplicate: the last counts
    assert len(raw) <= SLOW_PATH_MAX_BYTES
    # the reason the model gives for the whole value (which errors come first varies between
    # pydantic releases: unknown keys first in 2.13, missing fields first in 2.14)
    with pytest.raises(ValidationError) as whole:
        SensorReading.model_validate_json(raw)
    assert whole.value.error_count() == keys + 9  # each unknown key, 8 missing fields, unit
    sizes = _spy_on_the_model(monkeypatch)
    (rej,) = decode_sensor([raw], NOW, BOUNDS).rejected
    assert sizes and max(sizes) < 200, sizes
    assert rej.reason == _describe(whole.value)
    assert rej.reason.endswith(f" (+{keys + 9 - 3} more)")


@pytest.mark.parametrize(
    "splice",
    [
        b',"unit":' + b"[" * 300 + b"]" * 300 + b',"unit":"C"',  # too deep for the model's parser
        b',"unit":{"a":NaN},"unit":"C"',  # NaN: the model's parser reads it
        b',"unit":' + b"[1]," * 3 + b'"unit":"C"',
        b',"unit":[],"schema_version":1.0',  # both decoders reject 1.0 (not the integer 1)
        b',"value":"hot","value":21.5',  # the fast decoder checks every occurrence of a key
        b',"firmware":"\\u00e9\\ud83d\\ude00","value":"1","value":1e400',
    ],
)
def test_the_compact_copy_changes_no_verdict(splice: bytes) -> None:
    raw = with_()[:-1] + splice + b"}"
    try:
        expected: SensorReading | None = SensorReading.model_validate_json(raw)
    except ValueError:
        expected = None
    out = decode_sensor([raw], NOW, BOUNDS)
    if expected is None:
        assert out.events == [] and len(out.rejected) == 1
    else:
        assert out.rejected == []
        assert out.events == [expected]
