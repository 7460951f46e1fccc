"""Produce records whose header key is not UTF-8 (a raw producer can; aiokafka's C encoder
cannot): ``python -m tests.integration.bad_headers BOOTSTRAP`` reads a JSON list of
``{"topic", "partition", "key", "value"}`` (key and value in hex) on stdin and prints the
``[topic, partition, offset]`` of each as Kafka acked it. Run it with
``AIOKAFKA_NO_EXTENSIONS=1``: aiokafka's Python encoder writes the key bytes it is given.
"""

from __future__ import annotations

import asyncio
import sys

import orjson

BAD_KEY = b"\xff\xfe-not-utf-8"


class _RawKey(str):
    """A header key that encodes to bytes that are not UTF-8."""

    __slots__ = ()

    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return BAD_KEY


async def produce(bootstrap: str, records: list[dict[str, str]]) -> list[list[object]]:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        out: list[list[object]] = []
        for r in records:
            md = await producer.send_and_wait(
                r["topic"],
                bytes.fromhex(r["value"]),
                key=bytes.fromhex(r["key"]),
                partition=int(r["partition"]),
                headers=[("trace", b"ok"), (_RawKey("x"), b"v")],
            )
            out.append([md.topic, md.partition, md.offset])
        return out
    finally:
        await producer.stop()


if __name__ == "__main__":
    sent = asyncio.run(produce(sys.argv[1], orjson.loads(sys.stdin.buffer.read())))
    sys.stdout.buffer.write(orjson.dumps(sent))
