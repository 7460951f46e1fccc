"""Fuzz the decode path: every raw value becomes the model's event or a dead letter, never an error.

Hypothesis draws batches of raw Kafka values: arbitrary bytes, valid events with one field or key
mutated, duplicate keys, byte-level damage, deep nesting, values at and just past the length
limits, non-object JSON, tombstones and empty values. Each batch goes through ``decode_sensor``,
``decode_applog`` and ``batch.process`` for both kinds, and every value is checked against the
pydantic model, which defines a valid event: an accepted value equals what
``model_validate_json`` reads from it (field by field, types and the sign of zero included); a
rejected value is one the model rejects too, or a valid event outside the event-time bounds.
"""

from __future__ import annotations

import json
import random
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from pipeline import batch, windows
from pipeline.validation import (
    SLOW_PATH_MAX_BYTES,
    DecodedBatch,
    TimeBounds,
    decode_applog,
    decode_sensor,
)
from schemas.events import AppLogEvent, EventKind, SensorReading

NOW = 1_790_000_000_000
DAY = 86_400_000
MAX_EPOCH = 253_402_300_799_999
BOUNDS = TimeBounds(max_age_ms=7 * DAY, max_skew_ms=300_000)
# batch.process gets bounds that admit every valid event time, so extreme ones reach aggregation
WIDE = batch.BatchRules(TimeBounds(max_age_ms=NOW, max_skew_ms=MAX_EPOCH), 60_000)

# per hypothesis example: RECIPES drawn recipes (1-8 inputs each), topped up to BATCH inputs
RECIPES = 10
BATCH = 200
EXAMPLES = 520  # 104,000 inputs
MIN_INPUTS = 100_000


def js(value: object) -> bytes:
    """``value`` as JSON text, non-ASCII characters written as UTF-8."""
    return json.dumps(value, ensure_ascii=False).encode()


def jsa(value: object) -> bytes:
    """``value`` as JSON text, non-ASCII characters written as escapes."""
    return json.dumps(value).encode()


# --- valid values per field (raw JSON), edges included -----------------------------------------

IDENTS = [js(s) for s in ("dev-1", "a", "x" * 64, "A.b_c-9", "site.berlin_1", "0")]
# mostly within BOUNDS; the rest are valid events that the event-time bounds reject
IN_BOUNDS = (NOW, NOW - 1000, NOW - 7 * DAY, NOW + 300_000, NOW - 123_456_789, NOW + 1)
TIMES = [js(t) for t in IN_BOUNDS] + [js(NOW - 7 * DAY - 1), js(NOW + 300_001), b"0", js(MAX_EPOCH)]
STRINGS_16 = [js("C"), js("x" * 16), js("é" * 16), jsa("😀" * 16), js("😀" * 16), jsa("\x00")]
STRINGS_32 = [js("1.2.3"), js("x" * 32), js(" "), jsa("é" * 32), js("a\nb")]

SENSOR_VALID: dict[str, list[bytes]] = {
    "device_id": IDENTS,
    "site": IDENTS,
    "event_time": TIMES,
    "metric": IDENTS,
    "value": [b"21.5", b"0", b"-0.0", b"1e15", b"-1e15", b"1000000000000000", b"5e-324", b"1E2"],
    "unit": STRINGS_16,
    "lat": [b"90", b"-90", b"90.0", b"0", b"52.5", b"-0", b"8.999999999999999e1"],
    "lon": [b"180", b"-180", b"13.4", b"179.99999999999997", b"-0.0"],
    "firmware": STRINGS_32,
    "schema_version": [b"1"],
}
APPLOG_VALID: dict[str, list[bytes]] = {
    "service": IDENTS,
    "route": [js(s) for s in ("/", "/api/orders/{id}", "/" + "a" * 127, "/a.b_c-d/{x}")],
    "event_time": TIMES,
    "level": [js(s) for s in ("DEBUG", "INFO", "WARN", "ERROR")],
    "status_code": [b"100", b"599", b"503", b"200"],
    "latency_ms": [b"0", b"3600000", b"3600000.0", b"12.5", b"-0.0", b"1e-300"],
    "trace_id": [js(s) for s in ("abc", "a" * 64, "4bf92f35-77b3-4da6", "0")],
    "message": [js(""), js("x" * 2048), js("é" * 2048), jsa("é" * 2048), js("line\nbreak")],
    "schema_version": [b"1"],
}
OPTIONAL = {"schema_version", "message"}
MAX_LENGTH = {
    "device_id": 64,
    "site": 64,
    "metric": 64,
    "unit": 16,
    "firmware": 32,
    "service": 64,
    "route": 128,
    "trace_id": 64,
    "message": 2048,
}


@dataclass(frozen=True)
class Kind:
    """An event kind: how to decode it, its model, and valid values to build inputs from."""

    event_kind: EventKind
    model: type[BaseModel]
    decode: Callable[[Sequence[bytes | None], int, TimeBounds], DecodedBatch[Any]]
    valid: dict[str, list[bytes]]


SENSOR = Kind(EventKind.SENSOR, SensorReading, decode_sensor, SENSOR_VALID)
APPLOG = Kind(EventKind.APPLOG, AppLogEvent, decode_applog, APPLOG_VALID)
KINDS = (SENSOR, APPLOG)

# --- odd values: wrong types, bounds, huge numbers, literals, bad text ---------------------------

ODD_VALUES = [
    b"null", b"true", b"false", b"[]", b"{}", b"[1]", b'{"a":1}', b'""', b'"1"', b'"21.5"',
    b"0", b"-0", b"-0.0", b"1", b"1.0", b"1e0", b"-1", b"99", b"100", b"599", b"600", b"99.5",
    b"1e15", b"1000000000000001", b"1000000000000000.2", b"-1000000000000000.2", b"1e400",
    b"-1e400", b"1e-400", b"9" * 30, b"-" + b"9" * 30, js(2**63), js(2**64), js(-(2**63) - 1),
    js(MAX_EPOCH + 1), b"90.0000000000001", b"-90.00000000000001", b"180.00000000000003",
    b"3600000.0000001", b"1" + b"0" * 400, b"0." + b"0" * 400 + b"1", b"1e999999999999",
    b"1790000000000.0", b"1.79e12", b"503.0", b"5.03e2", b"1E1", b"1e+1", b"1e-0",
    b"NaN", b"-NaN", b"Infinity", b"-Infinity", b"inf", b"nan", b"+1", b"01", b".5", b"1.",
    b"1e", b"-", b"0x10", b"1_000", b"--1", b"1.5.2",
    b'"\xff"', b'"a\xc3"', b'"\xed\xa0\x80"', b'"\xc0\x80"', b'"\xf4\x90\x80\x80"', b'"\x80"',
    b'"\\ud800"', b'"\\udc00"', b'"\\ud800\\u0041"', b'"\\ud83d\\ude00"', b'"\\u0000"',
    b'"a\x00"', b'"a\x1f"', b'"a\x7f"', b'"\\x41"', b'"\\u00e9"', b'"a\nb"', b'"a\\nb"', b'"a\\/b"',
    b'"\\"', b'"', b'"\\u12"', b'"\\uZZZZ"', b"'a'",
    js("a|b"), js("a#b"), js("a:b"), js("a b"), js("a/b"), js("dev-1\n"), js("dev-1\r"),
    js("a\tb"), js("ａ"), js("\u212a"), js("İ"), js(""), js(" "), js("x" * 65), js("/" + "a" * 128),
    js("x" * 17), js("x" * 33), js("x" * 2049), js("é" * 17), js("😀" * 17), js("x" * 5000),
    js("info"), js("Info"), js("ERROR "), js("FATAL"), js("/a b"), js("api"), js("/a\n"),
    b"2", js(1.0), b"1.00000000000000000001",
]  # fmt: skip


def number_text(sign: bool, digits: str, frac: str, exp: int | None) -> bytes:
    """A JSON number (or a near miss) from its parts."""
    text = ("-" if sign else "") + digits + (f".{frac}" if frac else "")
    return (text + ("" if exp is None else f"e{exp}")).encode()


def float_text(x: float) -> bytes:
    text = repr(x)
    return {"nan": b"NaN", "inf": b"Infinity", "-inf": b"-Infinity"}.get(text, text.encode())


DIGITS = "0123456789"
odd_value = st.one_of(
    st.sampled_from(ODD_VALUES),
    st.sampled_from(ODD_VALUES),
    st.integers(min_value=-(2**70), max_value=2**70).map(js),
    st.floats().map(float_text),
    st.builds(
        number_text,
        st.booleans(),
        st.text(DIGITS, min_size=1, max_size=22),
        st.text(DIGITS, max_size=22),
        st.none() | st.integers(-400, 400),
    ),
    st.text(max_size=12).map(js),
    st.text(max_size=12).map(jsa),
)
# values that fit some field: numbers in range in many spellings, identifiers, short text
IDENT_CHARS = "abcXYZ019_.-"
plausible_value = st.one_of(
    st.floats(-1e15, 1e15).map(float_text),
    st.floats(-180, 180).map(float_text),
    st.integers(-(2**53), 2**53).map(js),
    st.integers(100, 599).map(js),
    st.integers(NOW - 7 * DAY, NOW + 300_000).map(js),
    st.builds(
        number_text,
        st.booleans(),
        st.text(DIGITS, min_size=1, max_size=3),
        st.text(DIGITS, max_size=25),
        st.none() | st.integers(-30, 12),
    ),
    st.text(IDENT_CHARS, min_size=1, max_size=8).map(js),
    st.text(IDENT_CHARS, min_size=60, max_size=70).map(js),
    st.text(max_size=20).map(js),
    st.text(max_size=20).map(jsa),
)
field_value = odd_value | plausible_value

# --- building inputs ------------------------------------------------------------------------------

Pairs = list[tuple[bytes, bytes]]
KEYS = {name: js(name) for kind in KINDS for name in kind.valid}


def base_pairs(kind: Kind, seed: int) -> Pairs:
    """A valid event as (key, value) pairs; ``seed`` picks each field's value."""
    pairs = []
    for n, (name, values) in enumerate(kind.valid.items()):
        pick = (seed >> (3 * n)) % (len(values) + (1 if name in OPTIONAL else 0))
        if pick < len(values):  # an optional field is sometimes left out
            pairs.append((KEYS[name], values[pick]))
    return pairs


def render(pairs: Pairs) -> bytes:
    return b"{" + b",".join(k + b":" + v for k, v in pairs) + b"}"


def key_variant(name: str, how: str, at: int) -> bytes:
    """A field's key, damaged or spelled differently."""
    raw = name.encode()
    cut = at % (len(raw) + 1)
    return {
        "ff": b'"' + raw[:cut] + b"\xff" + raw[cut:] + b'"',
        "c3": b'"' + raw + b'\xc3"',
        "surrogate_utf8": b'"' + raw[:cut] + b"\xed\xa0\x80" + raw[cut:] + b'"',
        "escaped": b'"' + f"\\u{ord(name[0]):04x}".encode() + raw[1:] + b'"',  # the same key
        "lone_surrogate": b'"' + raw[:cut] + b"\\ud800" + raw[cut:] + b'"',
        "upper": js(name.upper()),
        "space": js(name + " "),
        "nul": jsa(name + "\x00"),
        "empty": b'""',
        "unquoted": raw,
    }[how]


KEY_HOWS = [
    "ff", "c3", "surrogate_utf8", "escaped", "lone_surrogate", "upper", "space", "nul", "empty",
    "unquoted",
]  # fmt: skip


def near_limit(field: str, delta: int, char: str, escaped: bool) -> bytes:
    """A string of the field's max_length plus ``delta`` characters."""
    n = MAX_LENGTH[field] + delta
    text = ("/" + char * (n - 1)) if field == "route" else char * n
    return jsa(text) if escaped else js(text)


def mutate(kind: Kind, seed: int, op: tuple[Any, ...]) -> bytes:
    """A valid event of ``kind`` with one change."""
    pairs = base_pairs(kind, seed)
    fields = list(kind.valid)
    tag = op[0]
    if tag in ("set", "dup", "drop", "key", "len", "nest"):
        name = fields[op[1] % len(fields)]
        key = KEYS[name]
        where = next((i for i, (k, _) in enumerate(pairs) if k == key), None)
        if where is None:  # an optional field left out: put it in first
            pairs.append((key, kind.valid[name][0]))
            where = len(pairs) - 1
        if tag == "set":
            pairs[where] = (key, op[2])
        elif tag == "dup":  # a second occurrence, before or after the original
            pairs.insert(where + (1 if op[3] else 0), (key, op[2]))
        elif tag == "drop":
            del pairs[where]
        elif tag == "key":
            pairs[where] = (key_variant(name, op[2], op[3]), pairs[where][1])
        elif tag == "len":
            if name not in MAX_LENGTH:
                name = next(f for f in fields if f in MAX_LENGTH)
                key = KEYS[name]
                where = next(i for i, (k, _) in enumerate(pairs) if k == key)
            pairs[where] = (key, near_limit(name, *op[2:]))
        else:  # nest
            depth, opener = op[2], op[3]
            pairs[where] = (key, opener * depth + (b"]" * depth if opener == b"[" else b""))
    elif tag == "extra":
        pairs.insert(op[2] % (len(pairs) + 1), (op[1], b"1"))
    elif tag == "shuffle":
        pairs = pairs[op[1] % len(pairs) :] + pairs[: op[1] % len(pairs)]
    raw = render(pairs)
    if tag == "bytes":
        at, action, payload = op[1] % (len(raw) + 1), op[2], op[3]
        if action == "insert":
            raw = raw[:at] + payload + raw[at:]
        elif action == "replace":
            raw = raw[:at] + payload + raw[at + len(payload) :]
        elif action == "delete":
            raw = raw[:at] + raw[at + 1 :]
        else:  # truncate
            raw = raw[:at]
    elif tag == "wrap":
        raw = op[1] + raw + op[2]
    return raw


field_index = st.integers(0, 9)
PAYLOADS = [
    b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x00", b" ", b"\n", b",", b":", b"{", b"}", b"[", b"]",
    b'"', b"\\", b"\\u", b"NaN", b"-", b"0", b"e5", b".", b"\xef\xbb\xbf", b'"x":1,', b"\t",
]  # fmt: skip
DEPTHS = [1, 2, 150, 199, 200, 201, 255, 256, 257, 1000, 5000, 20_000]
OPENERS = [b"[", b'{"a":', b'{"device_id":']
ACTIONS = ["insert", "replace", "delete", "truncate"]
WRAPS = [b"", b" ", b"\n\t\r ", b"\xef\xbb\xbf", b"\x00", b"x", b",", b"{}", b"\xff", b"\x0c", b"/"]
op = st.one_of(
    st.tuples(st.just("set"), field_index, field_value),
    st.tuples(st.just("set"), field_index, field_value),
    st.tuples(st.just("set"), field_index, plausible_value),
    st.tuples(st.just("dup"), field_index, field_value, st.booleans()),
    st.tuples(st.just("drop"), field_index),
    st.tuples(st.just("key"), field_index, st.sampled_from(KEY_HOWS), st.integers(0, 20)),
    st.tuples(
        st.just("len"),
        field_index,
        st.sampled_from([-1, 0, 1]),
        st.sampled_from(["x", "é", "😀", "-"]),
        st.booleans(),
    ),
    st.tuples(
        st.just("nest"),
        field_index,
        st.sampled_from(DEPTHS),
        st.sampled_from(OPENERS),
    ),
    st.tuples(
        st.just("extra"), odd_value | st.sampled_from([b'"extra"', b'"Value"', b'"\xff"']),
        st.integers(0, 10),
    ),
    st.tuples(st.just("shuffle"), st.integers(0, 10)),
    st.tuples(
        st.just("bytes"),
        st.integers(0, 400),
        st.sampled_from(ACTIONS),
        st.sampled_from(PAYLOADS) | st.binary(min_size=1, max_size=3),
    ),
    st.tuples(st.just("wrap"), st.sampled_from(WRAPS), st.sampled_from(WRAPS)),
)  # fmt: skip


def seeds(seed: int) -> tuple[int, ...]:
    """A few different base events for one recipe."""
    return (seed, seed >> 7, seed * 2654435761 % 2**40, ~seed % 2**40)


def layouts(pairs: Pairs) -> list[bytes]:
    """The same event written in different, equally valid ways."""
    return [
        render(pairs),
        b"{ " + b" , ".join(k + b" : " + v for k, v in pairs) + b" }",
        b"\n\t{\r\n" + b",\n".join(k + b":\t" + v for k, v in pairs) + b"\n}\n",
        render(pairs[::-1]),
    ]


# Each recipe expands to a few inputs, so that 100k inputs take fewer (slow) hypothesis draws.
mutated = st.builds(
    lambda op, seed: [mutate(kind, s, op) for kind in KINDS for s in seeds(seed)],
    op,
    st.integers(0, 2**40),
)
valid = st.builds(
    lambda seed: [raw for kind in KINDS for raw in layouts(base_pairs(kind, seed))],
    st.integers(0, 2**40),
)
NON_OBJECTS = [
    b"[]", b"[1,2,3]", b'"x"', b"1", b"-0.5", b"1e400", b"null", b"true", b"false", b"NaN",
    b"Infinity", b' "a" ', b"[{}]", b'[{"device_id":"dev-1"}]', b'"{}"', b"0",
    b"[" * 150 + b"]" * 150, b"[" * 1000 + b"]" * 1000, b'"\xff"', b'["\xff"]', b"1 2", b"[] x",
    b"{}{}", b"{} {}", b"{", b"}", b"{]", b'{"a"}', b'{"a":}', b'{"a":1,}', b"{,}",
    b"\xef\xbb\xbf{}", b"\x00{}",
]  # fmt: skip
non_object = st.builds(
    lambda v: [v, b" " + v + b"\n", b"[" + v + b"]", b'{"device_id":' + v + b"}"],
    st.sampled_from(NON_OBJECTS)
    | st.lists(st.integers(-5, 5), max_size=4).map(js)
    | st.text(max_size=8).map(js),
)


def nested(opener: bytes, depth: int, closed: bool) -> bytes:
    """``depth`` arrays or objects inside each other, closed or cut off."""
    if not closed:
        return opener * depth
    if opener.strip() == b"[":
        return opener * depth + b"]" * depth
    return opener * depth + b"1" + b"}" * depth


ROOT_OPENERS = [b"[", b'{"a":', b" [", b'{"device_id":', b'{"\xff":']
ROOT_DEPTHS = [1, 10, 199, 200, 201, 999, 1000, 1001, 10_000, 100_000]
deep = st.builds(
    lambda opener, depth: [nested(opener, depth, True), nested(opener, depth, False)],
    st.sampled_from(ROOT_OPENERS),
    st.sampled_from(ROOT_DEPTHS),
)
PREFIXES = [b"", b"{", b'{"', b'{"device_id":"', b'{"service":"', b'{"value":', b'{"a":"', b"["]
arbitrary = st.builds(lambda tail: [p + tail for p in PREFIXES], st.binary(max_size=40))
EMPTY: list[bytes | None] = [None, b"", b" ", b"\n", b"\x00", b"{}", b"\t\r\n "]
empty = st.sampled_from(EMPTY).map(lambda v: [v])

recipe = st.one_of(mutated, mutated, mutated, mutated, valid, arbitrary, non_object, deep, empty)

# --- bulk inputs from a seeded generator ------------------------------------------------------
# Hypothesis favours simple choices, so at this volume most of its draws repeat (108k inputs drawn
# as recipes alone held only 13.7k distinct values). Each example therefore adds inputs of the
# same kinds made by a random.Random seeded from the drawn example (so replays are exact).

INT_EDGES = [0, 99, 100, 599, 600, 2**31, 2**53, 2**63, 2**64, MAX_EPOCH, NOW, 10**15, 90, 180]
TEXT_POOLS = ["abcXYZ019_.-", '/{}|#: \n\t"\\', "\x00\x1f\x7f\x80\xff", "é€𝄞😀\u2028\ufeff"]
OP_TAGS = [
    "set", "set", "set", "set", "dup", "drop", "key", "len", "nest", "extra", "shuffle", "bytes",
    "bytes", "wrap",
]  # fmt: skip


def random_text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(rng.choice(TEXT_POOLS)) for _ in range(n))


def random_digits(rng: random.Random, lo: int, hi: int) -> str:
    return "".join(rng.choice(DIGITS) for _ in range(rng.randint(lo, hi)))


def random_value(rng: random.Random) -> bytes:
    """Any JSON value (or near miss) that might go into a field."""
    r = rng.randrange(10)
    if r < 3:
        return rng.choice(ODD_VALUES)
    if r == 3:
        return js(rng.choice((1, -1)) * rng.choice(INT_EDGES) + rng.randint(-2, 2))
    if r == 4:
        return js(rng.randint(-(2 ** rng.randrange(72)), 2 ** rng.randrange(72)))
    if r == 5:
        return float_text(struct.unpack("<d", rng.randbytes(8))[0])  # any double
    if r == 6:
        return float_text(rng.uniform(-200, 200) * rng.choice((1.0, 1e-300, 1e13, 5e12)))
    if r == 7:
        exp = rng.choice((None, rng.randint(-30, 30)))
        whole, frac = random_digits(rng, 1, 25), random_digits(rng, 0, 25)
        return number_text(rng.random() < 0.3, whole, frac, exp)
    if r == 8:
        return js("".join(rng.choice(IDENT_CHARS) for _ in range(rng.choice((1, 8, 64, 65)))))
    return (js if rng.random() < 0.5 else jsa)(random_text(rng, rng.randrange(40)))


def random_op(rng: random.Random) -> tuple[Any, ...]:
    """One change to a valid event, as :func:`mutate` takes it."""
    tag, f = rng.choice(OP_TAGS), rng.randrange(10)
    if tag == "set":
        return (tag, f, random_value(rng))
    if tag == "dup":
        return (tag, f, random_value(rng), rng.random() < 0.5)
    if tag == "drop":
        return (tag, f)
    if tag == "key":
        return (tag, f, rng.choice(KEY_HOWS), rng.randrange(20))
    if tag == "len":
        return (tag, f, rng.choice((-1, 0, 1)), rng.choice("xé😀-"), rng.random() < 0.5)
    if tag == "nest":
        return (tag, f, rng.choice(DEPTHS), rng.choice(OPENERS))
    if tag == "extra":
        return (tag, js(random_text(rng, rng.randrange(1, 12))), rng.randrange(11))
    if tag == "shuffle":
        return (tag, rng.randrange(11))
    if tag == "bytes":
        payload = rng.choice(PAYLOADS) if rng.random() < 0.7 else rng.randbytes(rng.randint(1, 3))
        return (tag, rng.randrange(400), rng.choice(ACTIONS), payload)
    return (tag, rng.choice(WRAPS), rng.choice(WRAPS))


def random_input(rng: random.Random) -> bytes | None:
    r = rng.randrange(20)
    kind, seed = rng.choice(KINDS), rng.getrandbits(40)
    if r < 13:
        return mutate(kind, seed, random_op(rng))
    if r < 16:
        return rng.choice(layouts(base_pairs(kind, seed)))
    if r < 18:
        return rng.choice(PREFIXES) + rng.randbytes(rng.randrange(41))
    if r == 18:
        return rng.choice([*NON_OBJECTS, js([rng.randint(-9, 9)]), js(random_text(rng, 5))])
    if rng.random() < 0.5:
        return nested(rng.choice(ROOT_OPENERS), rng.choice(ROOT_DEPTHS), rng.random() < 0.5)
    return rng.choice(EMPTY)


def expand(recipes: list[list[bytes | None]], seed: int) -> list[bytes | None]:
    drawn = [raw for raws in recipes for raw in raws]
    # Seeded with everything drawn: hypothesis's seeds alone repeat too, its examples do not.
    rng = random.Random(repr((seed, drawn)))
    return drawn + [random_input(rng) for _ in range(BATCH - len(drawn))]


raw_batch = st.builds(
    expand, st.lists(recipe, min_size=RECIPES, max_size=RECIPES), st.integers(0, 2**64)
)

# --- the contract -----------------------------------------------------------------------------


def reference(model: type[BaseModel], raw: bytes | None) -> BaseModel | None:
    """What the model reads from ``raw``, or None when it rejects it."""
    if raw is None:
        return None
    try:
        return model.model_validate_json(raw)
    except ValidationError:
        return None


def values(event: object) -> dict[str, str]:
    """An event's field values, written so that types and the sign of zero count."""
    plain = (
        event.model_dump(mode="json")
        if isinstance(event, BaseModel)
        else msgspec.to_builtins(event)
    )
    return {k: f"{type(v).__name__}:{v!r}" for k, v in plain.items()}


def oversized(raw: bytes | None) -> bool:
    """Whether a value the fast decoder rejects is judged without pydantic (see validation)."""
    return raw is not None and len(raw) > SLOW_PATH_MAX_BYTES


def show(raw: bytes | None) -> str:
    return repr(raw if raw is None or len(raw) < 300 else raw[:300] + b"...")


def in_bounds(event_time: int, bounds: TimeBounds) -> bool:
    return NOW - bounds.max_age_ms <= event_time <= NOW + bounds.max_skew_ms


def check_reason(reason: str, raw: bytes | None) -> None:
    assert isinstance(reason, str) and reason, show(raw)
    assert len(reason) <= 300, (reason, show(raw))
    assert reason.isascii() and reason.isprintable(), (reason, show(raw))


def check_decoded(
    raws: Sequence[bytes | None], refs: Sequence[BaseModel | None], out: DecodedBatch[Any]
) -> None:
    """Each value is accepted exactly as the model reads it, or rejected, never both or neither."""
    assert sorted(out.positions + [r.index for r in out.rejected]) == list(range(len(raws)))
    for pos, event in zip(out.positions, out.events, strict=True):
        ref = refs[pos]
        assert ref is not None, f"accepted what the model rejects: {show(raws[pos])}"
        assert values(event) == values(ref), show(raws[pos])
        assert in_bounds(event.event_time, BOUNDS), show(raws[pos])
    for rej in out.rejected:
        raw, ref = raws[rej.index], refs[rej.index]
        check_reason(rej.reason, raw)
        if ref is not None and not oversized(raw):  # a valid event: only its time may reject it
            assert not in_bounds(ref.event_time, BOUNDS), (rej.reason, show(raw))  # type: ignore[attr-defined]
            assert rej.reason.startswith("event_time "), (rej.reason, show(raw))


def check_process(
    kind: Kind, raws: Sequence[bytes | None], refs: Sequence[BaseModel | None], seen: int
) -> None:
    """The whole per-record path of a partition batch takes every value without raising."""
    records = [batch.Record(offset=i, key=None, value=raw) for i, raw in enumerate(raws)]
    state = batch.PartitionState(max_event_time=seen)
    out = batch.process(kind.event_kind, 0, records, state, WIDE, NOW)
    dead = {d.record.offset for d in out.dead}
    rejected = {i for i, ref in enumerate(refs) if ref is None}
    # beyond the slow path's size limit, the fast decoder's rejection stands
    fast_only = {i for i in dead - rejected if oversized(raws[i])}
    assert dead - fast_only == rejected, [show(raws[i]) for i in sorted(dead ^ rejected)[:3]]
    for d in [*out.dead, *out.late]:
        check_reason(d.reason, d.record.value)
    assert out.events + len(out.late) == len(raws) - len(dead)
    batch.commit(state, out)


def check_batch(raws: Sequence[bytes | None], seen: int = NOW) -> None:
    for kind in KINDS:
        refs = [reference(kind.model, raw) for raw in raws]
        check_decoded(raws, refs, kind.decode(raws, NOW, BOUNDS))
        check_process(kind, raws, refs, seen)


def test_fuzz_decode_contract() -> None:
    checked = 0

    @given(raw_batch)
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def run(raws: list[bytes | None]) -> None:
        nonlocal checked
        check_batch(raws, seen=NOW if len(raws) % 2 else windows.NO_EVENT_YET)
        checked += len(raws)

    run()
    assert checked >= MIN_INPUTS


def huge_values() -> Iterator[bytes]:
    """Values of about 1 MB (Kafka's default limit), valid and not."""
    size = 1_000_100
    for kind in KINDS:
        valid = render(base_pairs(kind, 0))
        yield valid + b" " * (size - len(valid))  # valid, padded with whitespace
        yield b" " * (size - len(valid)) + valid
        for name in ("device_id", "service", "message", "firmware"):
            if name in kind.valid:
                pairs = base_pairs(kind, 0)
                pairs.append((js(name), js("x" * size)))
                yield render(pairs)
        pairs = base_pairs(kind, 0)
        pairs.append((b'"event_time"', b"1" + b"0" * size))
        yield render(pairs)
    yield b"[" * size
    yield b'{"a":' * (size // 5)
    yield b'{"device_id":' + b"[" * size
    yield b"[" + b"1," * (size // 2) + b"1]"
    yield b'"' + b"x" * size + b'"'
    yield b"\xff" * size
    yield b'{"' + b"k" * size + b'":1}'
    yield b'{"unit":1,' + b'"unit":"C",' * (size // 11) + b'"unit":"C"}'


def test_values_near_one_megabyte() -> None:
    raws = list(huge_values())
    check_batch(raws)


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.event_kind.value)
def test_generated_valid_events_are_accepted_on_the_fast_path(kind: Kind) -> None:
    # guards the generators: a base event really is valid, so mutations probe the edges
    raws = [render(base_pairs(kind, seed)) for seed in range(0, 2**30, 2**30 // 500)]
    out = kind.decode(raws, NOW, WIDE.bounds)
    assert out.positions == list(range(len(raws)))
    assert not any(isinstance(event, BaseModel) for event in out.events)  # msgspec structs
    for raw in raws:
        assert reference(kind.model, raw) is not None, raw
