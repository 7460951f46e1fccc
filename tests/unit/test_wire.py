"""The fast decoders accept nothing the event models reject, and decode it to the same values."""

from __future__ import annotations

from typing import Any

import msgspec
import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from loadgen import faults
from schemas.events import AppLogEvent, EventKind, SensorReading
from schemas.wire import APPLOG_DECODER, SENSOR_DECODER, CheckedDecoder

SENSOR: dict[str, Any] = {
    "device_id": "dev-0001",
    "site": "site-berlin-1",
    "event_time": 1_790_000_000_000,
    "metric": "temperature",
    "value": 21.5,
    "unit": "C",
    "lat": 52.5,
    "lon": 13.4,
    "firmware": "1.2.3",
}
APPLOG: dict[str, Any] = {
    "service": "checkout",
    "route": "/api/orders/{id}",
    "event_time": 1_790_000_000_000,
    "level": "ERROR",
    "status_code": 503,
    "latency_ms": 12.5,
    "trace_id": "4bf92f3577b34da6",
    "message": "upstream timeout",
}

# values that probe the edges: types, bounds, patterns, special floats, unicode, newlines
odd_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([1e15, 1e15 + 1, -1e15, 90.0, 90.0000001, 599, 600, 99, 3_600_000.0, 0, -1]),
    st.text(max_size=80),
    st.sampled_from(["dev-1\n", "a|b", "a#b", "", "x" * 65, "/r\n", "INFO", "info", "1", "/a/{b}"]),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


def mutate(base: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    keys = sorted(base)
    return st.builds(
        lambda changes, drop, extra: {
            **{k: v for k, v in base.items() if k not in drop},
            **changes,
            **extra,
        },
        st.dictionaries(st.sampled_from(keys), odd_values, max_size=3),
        st.sets(st.sampled_from(keys), max_size=2),
        st.dictionaries(st.sampled_from(["extra", "schema_version", "Value"]), odd_values,
                        max_size=1),
    )  # fmt: skip


def check_subset(decoder: CheckedDecoder[Any], model: type[BaseModel], raw: bytes) -> None:
    try:
        fast = decoder.decode(raw)
    except (msgspec.ValidationError, msgspec.DecodeError, ValueError):
        return  # the model decides; nothing to compare (invalid UTF-8 raises UnicodeDecodeError)
    try:
        slow = model.model_validate_json(raw)
    except ValidationError as exc:
        raise AssertionError(f"fast decoder accepted what the model rejects: {raw!r}") from exc
    want = slow.model_dump(mode="json")
    got = orjson.loads(msgspec.json.encode(fast))
    assert got == want, raw


@given(mutate(SENSOR))
@settings(max_examples=1500, deadline=None)
def test_sensor_fast_decoder_is_a_subset_of_the_model(doc: dict[str, Any]) -> None:
    try:
        raw = orjson.dumps(doc)
    except TypeError:  # ints beyond 64 bits: write them as text
        raw = msgspec.json.encode(doc)
    check_subset(SENSOR_DECODER, SensorReading, raw)


@given(mutate(APPLOG))
@settings(max_examples=1500, deadline=None)
def test_applog_fast_decoder_is_a_subset_of_the_model(doc: dict[str, Any]) -> None:
    try:
        raw = orjson.dumps(doc)
    except TypeError:
        raw = msgspec.json.encode(doc)
    check_subset(APPLOG_DECODER, AppLogEvent, raw)


@given(st.sampled_from([b"", b'{"', b'{"device_id":"', b'{"service":"']), st.binary(max_size=300))
@settings(max_examples=500, deadline=None)
def test_arbitrary_bytes(prefix: bytes, tail: bytes) -> None:
    check_subset(SENSOR_DECODER, SensorReading, prefix + tail)
    check_subset(APPLOG_DECODER, AppLogEvent, prefix + tail)


@pytest.mark.parametrize(
    "splice",
    [
        # duplicate keys: both decoders let the last occurrence win
        b',"value":99.5',
        b',"value":"hot"',
        b',"\\u0076alue":99.5',  # the same key, escaped
        b',"value":NaN,"value":1.0',  # msgspec: malformed; the model: 1.0 (it parses NaN)
        # a version that equals 1 without being the integer 1: both reject
        b',"schema_version":true',
        b',"schema_version":1.0',
        # invalid UTF-8 and lone surrogates in keys and strings
        b',"\xff":1',
        b',"unit":"\xed\xa0\x80"',
        b',"unit":"\\ud800"',
        b',"unit":"\\udc00x"',
    ],
)
def test_hostile_splices(splice: bytes) -> None:
    raw = orjson.dumps(SENSOR)[:-1] + splice + b"}"
    check_subset(SENSOR_DECODER, SensorReading, raw)
    check_subset(SENSOR_DECODER, SensorReading, b'{"value":"hot",' + raw[1:])


@pytest.mark.parametrize(
    "splice",
    [
        b',"value":NaN,"value":21.5',  # the model's parser reads NaN; a later key replaces it
        b',"value":"hot","value":21.5',  # the struct checks every occurrence of a key
    ],
)
def test_where_the_struct_is_stricter_than_the_model(splice: bytes) -> None:
    # not a contract breach (the struct rejects, so the model decides), but worth knowing
    raw = orjson.dumps({k: v for k, v in SENSOR.items() if k != "value"})[:-1] + splice + b"}"
    with pytest.raises((msgspec.ValidationError, msgspec.DecodeError)):
        SENSOR_DECODER.decode(raw)
    model = SensorReading.model_validate_json(raw)
    assert (model.value, model.schema_version) == (21.5, 1)


@pytest.mark.parametrize("fault", list(faults.FaultKind))
def test_load_generator_faults_are_not_accepted_by_the_fast_path(fault: faults.FaultKind) -> None:
    rng = np.random.default_rng(3)
    for kind, doc, decoder, model in (
        (EventKind.SENSOR, SENSOR, SENSOR_DECODER, SensorReading),
        (EventKind.APPLOG, APPLOG, APPLOG_DECODER, AppLogEvent),
    ):
        for _ in range(20):
            raw = faults.corrupt(fault, kind, dict(doc), doc["event_time"], rng)
            check_subset(decoder, model, raw)


def test_valid_events_take_the_fast_path() -> None:
    assert SENSOR_DECODER.decode(orjson.dumps(SENSOR)).value == 21.5
    assert APPLOG_DECODER.decode(orjson.dumps(APPLOG)).status_code == 503
    # and integers where floats are declared, as JSON producers often write them
    assert SENSOR_DECODER.decode(orjson.dumps({**SENSOR, "value": 21})).value == 21.0


@pytest.mark.parametrize(
    ("field", "value"), [("device_id", "dev 1"), ("site", "a|b"), ("metric", "t\n"), ("site", "é")]
)
def test_identifier_patterns_are_checked_once_per_value_and_reject_like_the_model(
    field: str, value: str
) -> None:
    raw = orjson.dumps({**SENSOR, field: value})
    with pytest.raises(msgspec.ValidationError, match=field):
        SENSOR_DECODER.decode(raw)
    with pytest.raises(ValidationError):
        SensorReading.model_validate_json(raw)
    good = SENSOR_DECODER.decode_unchecked(orjson.dumps(SENSOR))
    bad = SENSOR_DECODER.decode_unchecked(raw)
    assert SENSOR_DECODER.breaking([good, bad, good, bad]) == {1: [field], 3: [field]}
    # a value seen valid is not checked again, and is still valid
    assert SENSOR_DECODER.breaking([good]) == {}


def test_the_valid_identifier_cache_is_bounded() -> None:
    d = CheckedDecoder(type(SENSOR_DECODER.decode_unchecked(orjson.dumps(SENSOR))),
                       {"device_id": r"^[a-z0-9-]+\Z"}, cache=10)  # fmt: skip
    events = [
        d.decode_unchecked(orjson.dumps({**SENSOR, "device_id": f"d-{i}"})) for i in range(25)
    ]
    for e in events:
        assert d.breaking([e]) == {}
    assert len(d._valid["device_id"]) <= 10
