"""Hostile input drill: raw bytes no load generator would write, mixed into live traffic.

While ``pulse loadgen`` produces (with its own malformed records), a plain aiokafka producer
sends a hostile mix straight into both input topics at random partitions: invalid UTF-8, a value
of about 1 MB, tombstones, empty values, JSON that is not an object, deep nesting, huge numbers,
random bytes, duplicate keys, truncated JSON, numbers as strings, integer overflow, values that
are costly to judge, events that look valid but for one field, and valid events whose header
key is not UTF-8 (Kafka takes them; the Kafka client cannot parse them). The worker must stay
up the whole time, every hostile record must reach the dead-letter topic (matched by its source
position, since dead letters are at-least-once) with a reason, and ``pulse verify`` must be exact:
the truth file knows nothing of the hostile records, so their number is added to its dead-letter
totals before verifying, and nothing else changes.
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis

from pipeline.stack.testing import RunningStack
from tests.integration.harness import Pipeline, Position, drill_seed, replayable, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.fault]

#: Under Kafka's default message.max.bytes (1,048,588) but over Faust's default producer request
#: size (1,000,000): the broker takes it on the input topic; forwarding it whole may not work.
BIG_BYTES = 1_040_000
#: As large as the input topic takes (with this key): the same bytes plus the dead-letter headers
#: are over the broker's limit, so the worker can only forward a truncated copy.
LIMIT_BYTES = 1_048_400
WAVES = 3


@dataclass(frozen=True)
class Hostile:
    name: str
    value: bytes | None
    unreadable: bool = False  # its dead letter holds no bytes: the client cannot parse it
    headers: tuple[tuple[str, bytes], ...] = ()  # its own, sent with it


def _sensor(now_ms: int, **change: Any) -> dict[str, Any]:
    event = {
        "device_id": "dev-hostile", "site": "site-x", "event_time": now_ms, "metric": "temp",
        "value": 21.5, "unit": "C", "lat": 48.1, "lon": 11.6, "firmware": "1.0.0",
    }  # fmt: skip
    return {**event, **change}


def _applog(now_ms: int, **change: Any) -> dict[str, Any]:
    event = {
        "service": "svc-hostile", "route": "/x", "event_time": now_ms, "level": "INFO",
        "status_code": 200, "latency_ms": 12.5, "trace_id": "t-1", "message": "",
    }  # fmt: skip
    return {**event, **change}


def hostile_mix(kind: str, rng: random.Random, now_ms: int) -> list[Hostile]:
    """The hostile records sent to one input topic (``kind`` shapes the valid-looking ones)."""
    make = _sensor if kind == "sensor" else _applog
    good = orjson.dumps(make(now_ms))
    text_field = b'"site-x"' if kind == "sensor" else b'"svc-hostile"'
    number = b"21.5" if kind == "sensor" else b"12.5"
    mutated = make(now_ms, lat=123.0) if kind == "sensor" else make(now_ms, level="FATAL")

    def sized(size: int) -> bytes:  # a would-be event with one long field, exactly size bytes
        raw = orjson.dumps(make(now_ms, **{"firmware" if kind == "sensor" else "message": ""}))
        return raw.replace(b'""', b'"' + b"x" * (size - len(raw)) + b'"', 1)

    mix = [
        Hostile("invalid UTF-8 key", b'{"\xff":1}'),
        Hostile("invalid UTF-8 in a string value", good.replace(text_field, b'"s\xff\xfe-x"')),
        Hostile("lone surrogate escape", good.replace(text_field, b'"\\ud800"')),
        Hostile("big value", sized(BIG_BYTES)),
        Hostile("limit-size value", sized(LIMIT_BYTES)),
        Hostile("tombstone", None),
        Hostile("empty value", b""),
        Hostile("JSON array", b"[]"),
        Hostile("JSON number", b"1"),
        Hostile("JSON string", b'"x"'),
        Hostile("JSON null", b"null"),
        Hostile("deep nesting", b"[" * 100_000),
        Hostile("deep object nesting", b'{"a":' * 50_000),
        Hostile("overflowing float", good.replace(number, b"1e400", 1)),
        Hostile("5000-digit number", good.replace(number, b"9" * 5000, 1)),
        Hostile("huge event_time", good.replace(str(now_ms).encode(), b"1" + b"0" * 40, 1)),
        Hostile("mutated field", orjson.dumps(mutated)),
        # Every JSON decoder here keeps the last duplicate, so the invalid copy comes last.
        Hostile("duplicate key", good[:-1] + b',"event_time":"soon"}'),
        Hostile("NUL bytes", b"\x00" * 64),
        Hostile("BOM then JSON", b"\xef\xbb\xbf" + good),
        Hostile(
            "headers of its own, one named like the worker's",
            b"[]",
            headers=(("traceparent", b"00-4bf92f-00f067-01"), ("pulse.reason", b"spoof")),
        ),
    ]
    ident = "device_id" if kind == "sensor" else "service"
    mix += [
        Hostile("truncated JSON", good[: len(good) // 2]),
        Hostile("number as a string", good.replace(number, b'"' + number + b'"', 1)),
        Hostile("boolean for a number", good.replace(number, b"true", 1)),
        Hostile("event_time 2**64", good.replace(str(now_ms).encode(), str(2**64).encode(), 1)),
        Hostile("event_time -2**63-1", good.replace(str(now_ms).encode(), b"-9223372036854775809")),
        Hostile("schema_version 2", good[:-1] + b',"schema_version":2}'),
        Hostile("unknown field", good[:-1] + b',"extra":1}'),
        Hostile("overlong UTF-8", good.replace(text_field, b'"\xc0\xaf"')),
        Hostile("key separators in an identifier", orjson.dumps(make(now_ms, **{ident: "a|b:c"}))),
        # under the slow path's size limit, an error per key, each holding a nested array: the
        # model alone spent ~200 ms on one (a poll of them stalled the worker past its session)
        Hostile("costly unknown keys", b"{" + b",".join(
            b'"k%d":' % i + b"[" * 20 + b"]" * 20 for i in range(1300)) + b"}"),
    ]  # fmt: skip
    for i in range(4):
        mix.append(Hostile(f"random bytes {i}", rng.randbytes(rng.randrange(1, 400))))
    return mix


async def send_hostile(
    pl: Pipeline, rng: random.Random, wave: int
) -> dict[Position, tuple[str, Hostile]]:
    """One wave of the mix into both input topics; each record's position as Kafka acked it."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(
        bootstrap_servers=pl.running.bootstrap,
        acks="all",
        enable_idempotence=True,  # a retried send must not add a record nobody knows of
        max_request_size=1_100_000,
    )
    await producer.start()
    try:
        now_ms = int(time.time() * 1000)
        sends = []
        for kind in ("sensor", "applog"):
            for h in hostile_mix(kind, rng, now_ms):
                p = rng.randrange(pl.running.kafka_settings.partitions)
                key = f"hostile-{wave}-{h.name}".encode()
                fut = await producer.send(
                    pl.topics[kind], h.value, key=key, partition=p, headers=list(h.headers) or None
                )
                sends.append((kind, h, fut))
        out: dict[Position, tuple[str, Hostile]] = {}
        for kind, h, fut in sends:
            md = await fut
            out[(md.topic, md.partition, md.offset)] = (kind, h)
    finally:
        await producer.stop()
    out.update(send_unparsable(pl, rng, wave, now_ms))
    return out


def send_unparsable(
    pl: Pipeline, rng: random.Random, wave: int, now_ms: int
) -> dict[Position, tuple[str, Hostile]]:
    """Valid events with a header key that is not UTF-8, two per input topic."""
    made = []
    for kind, make in (("sensor", _sensor), ("applog", _applog)):
        for _ in range(2):
            h = Hostile("header key not UTF-8", orjson.dumps(make(now_ms)), unreadable=True)
            made.append((kind, h))
    todo = [
        {
            "topic": pl.topics[kind],
            "partition": rng.randrange(pl.running.kafka_settings.partitions),
            "key": f"hostile-{wave}-{h.name}".encode().hex(),
            "value": (h.value or b"").hex(),
        }
        for kind, h in made
    ]
    res = subprocess.run(
        [sys.executable, "-m", "tests.integration.bad_headers", pl.running.bootstrap],
        input=orjson.dumps(todo),
        capture_output=True,
        env={**os.environ, "AIOKAFKA_NO_EXTENSIONS": "1"},
        timeout=120,
        check=True,
    )
    sent = orjson.loads(res.stdout)
    return {(t, p, o): item for (t, p, o), item in zip(sent, made, strict=True)}


def test_hostile_mix_during_live_load_goes_to_dead_letters(
    stack: RunningStack, store: redis.Redis, tmp_path: Path
) -> None:
    seed = drill_seed()
    with replayable("hostile input drill", seed):
        rng = random.Random(seed)
        pl = Pipeline.create(stack, tmp_path)
        truth_file = tmp_path / "truth.json"
        producer = pl.start_loadgen(
            "--rate=2000", "--duration=20", "--devices=30", "--services=3", f"--seed={seed}",
            "--bad-rate=0.1", truth=truth_file,
        )  # fmt: skip
        worker = pl.worker(name="w")

        def alive() -> bool:
            assert worker.alive(), (
                f"the worker died (exit {worker.proc.returncode}):\n{worker.tail()}"
            )
            return True

        hostile: dict[Position, tuple[str, Hostile]] = {}
        try:
            for wave in range(WAVES):
                # Each wave lands among records the worker is busy with.
                since = pl.applied_total(store)
                wait_for(
                    lambda s=since: pl.applied_total(store) > s,  # type: ignore[misc]
                    "the worker applied live traffic",
                    alive=alive,
                )
                assert producer.alive(), f"the load generator ended before hostile wave {wave}"
                hostile.update(asyncio.run(send_hostile(pl, rng, wave)))
                time.sleep(rng.uniform(0.5, 3.0))  # spread the waves over the run
            producer.wait(180)
            pl.wait_applied(store, timeout_s=240, alive=alive)
            alive()
        finally:
            code = worker.stop()
            producer.stop()
        assert code == 0, worker.tail()

        dead = pl.diverted("deadletter")
        missing = {pos: h.name for pos, (_, h) in hostile.items() if pos not in dead}
        assert not missing, f"hostile records without a dead letter: {missing}"
        late = pl.diverted("late")
        assert not hostile.keys() & late.keys(), "a hostile record went to the late topic"
        for pos, (_, h) in hostile.items():
            for msg in dead[pos]:
                headers = dict(msg.headers)
                assert headers.get("pulse.reason"), f"{h.name} at {pos}: no reason"
                own = [(k, v) for k, v in msg.headers if not k.startswith("pulse.")]
                assert own == [(k, v) for k, v in h.headers if not k.startswith("pulse.")]
                assert [k for k, _ in msg.headers].count("pulse.reason") == 1, h.name
                if h.unreadable:  # the bytes stay in the input topic, at the source offset
                    assert b"unreadable" in headers["pulse.reason"], h.name
                    assert not msg.value, h.name
                elif "pulse.truncated" in headers:
                    assert int(headers["pulse.truncated"]) == len(h.value or b""), h.name
                    assert len(msg.value) < len(h.value or b"")
                    assert (h.value or b"").startswith(msg.value), h.name
                else:
                    assert (msg.value or b"") == (h.value or b""), f"{h.name}: bytes changed"
        shapes = {}
        for name in ("big value", "limit-size value"):
            copies = [m for pos, (_, h) in hostile.items() if h.name == name for m in dead[pos]]
            assert len(copies) >= 2 * WAVES, name
            cut = sum("pulse.truncated" in dict(m.headers) for m in copies)
            shapes[name] = f"{len(copies) - cut} whole, {cut} truncated"

        # Exactly-once in the store: each distinct dead-letter position is one dead count, and
        # the store's dead counters are the truth's plus the hostile records, per event kind.
        truth = pl.truth(truth_file)
        for (_, part, _), (kind, _) in hostile.items():
            row = truth["per_partition"][kind][str(part)]
            row["dead"] += 1
            row["produced"] += 1
            truth["dead"][kind] += 1
            truth["produced"][kind] += 1
        ends = pl.end_offsets()
        for kind in ("sensor", "applog"):
            for part_s, row in truth["per_partition"][kind].items():
                tp = (pl.topics[kind], int(part_s))
                assert ends[tp] == row["produced"], (
                    f"{tp}: {ends[tp]} records, {row['produced']} sent"
                )
        rows = pl.progress(store).values()
        store_dead = sum(int(row.get("dead", 0)) for row in rows)
        assert store_dead == sum(truth["dead"].values()) == len(dead), (
            f"dead: store {store_dead}, truth + hostile {sum(truth['dead'].values())}, "
            f"distinct dead-letter positions {len(dead)}"
        )
        reasons = " ".join(
            dict(m.headers)["pulse.reason"].decode(errors="replace")
            for ms in dead.values()
            for m in ms
        ).lower()
        for needle in (
            "json", "finite", "field required", "extra", "older", "future", "object", "unreadable"
        ):  # fmt: skip
            assert needle in reasons, f"no dead letter mentions {needle!r}"
        with_hostile = tmp_path / "truth-with-hostile.json"
        with_hostile.write_bytes(orjson.dumps(truth))
        res = pl.verify(with_hostile)
        assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
        print(
            f"seed {seed}: {len(hostile)} hostile records in {WAVES} waves, all dead letters; "
            f"dead letters of {BIG_BYTES} B values: {shapes['big value']}, of {LIMIT_BYTES} B: "
            f"{shapes['limit-size value']}; worker up throughout; "
            f"{res.stdout.strip().splitlines()[-1]}"
        )


CODECS = ("gzip", "snappy", "lz4", "zstd")  # every compression codec Kafka has


async def send_compressed(pl: Pipeline, now_ms: int, per_codec: int) -> dict[str, int]:
    """``per_codec`` valid sensor events in batches compressed with each codec; how many per
    partition."""
    from aiokafka import AIOKafkaProducer

    sent: dict[str, int] = {}
    for i, codec in enumerate(CODECS):
        producer = AIOKafkaProducer(
            bootstrap_servers=pl.running.bootstrap,
            acks="all",
            enable_idempotence=True,
            compression_type=codec,
            linger_ms=50,  # one batch of them
        )
        await producer.start()
        try:
            p = i % pl.running.kafka_settings.partitions
            futures = [
                await producer.send(
                    pl.topics["sensor"],
                    orjson.dumps(_sensor(now_ms - j, device_id=f"dev-{codec}-{j % 7}")),
                    key=f"{codec}-{j}".encode(),
                    partition=p,
                )
                for j in range(per_codec)
            ]
            await asyncio.gather(*futures)
            sent[str(p)] = sent.get(str(p), 0) + per_codec
        finally:
            await producer.stop()
    return sent


def test_batches_compressed_with_every_kafka_codec_are_read(
    stack: RunningStack, store: redis.Redis, tmp_path: Path
) -> None:
    """Producers choose their compression (a Java client's `compression.type`, or the topic's):
    the worker reads batches of every codec like any other, and nothing is dead-lettered."""
    from aiokafka import codec

    # the Kafka client of the worker (the same environment) can decompress every codec
    assert codec.has_gzip() and codec.has_snappy() and codec.has_lz4() and codec.has_zstd()
    pl = Pipeline.create(stack, tmp_path)
    per_codec = 200
    sent = asyncio.run(send_compressed(pl, int(time.time() * 1000), per_codec))
    worker = pl.worker(name="codecs")
    try:
        pl.wait_applied(store, alive=worker.alive)
    finally:
        assert worker.stop() == 0, worker.tail()
    rows = {tag: row for tag, row in pl.progress(store).items() if row}
    got = {tag.partition(".")[2]: int(row["events"]) for tag, row in rows.items()}
    assert got == sent, rows
    assert sum(int(row.get("dead", 0)) for row in rows.values()) == 0, rows
    assert sum(sent.values()) == per_codec * len(CODECS)
