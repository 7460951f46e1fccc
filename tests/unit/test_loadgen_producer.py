"""The load generator's Kafka producer: safe to retry, and patient enough to ride out an outage."""

from __future__ import annotations

import asyncio
from typing import NamedTuple

from loadgen.producer import DELIVERY_TIMEOUT_MS, make_producer


class ProducerSettings(NamedTuple):
    idempotent: bool
    acks: int
    request_timeout_ms: int
    batch_ttl_s: float


def _settings() -> ProducerSettings:
    async def build() -> ProducerSettings:
        producer = make_producer("127.0.0.1:9", linger_ms=20)  # never started: no connection
        try:
            # idempotence: re-sent batches are dropped by producer id and sequence number
            return ProducerSettings(
                idempotent=producer._txn_manager is not None,
                acks=producer._sender._acks,
                request_timeout_ms=producer._request_timeout_ms,
                batch_ttl_s=producer._message_accumulator._batch_ttl,
            )
        finally:
            await producer.stop()  # an unstopped producer warns (ResourceWarning) when collected

    return asyncio.run(build())


def test_producer_is_idempotent_and_waits_for_all_replicas() -> None:
    producer = _settings()
    assert producer.idempotent
    assert producer.acks == -1


def test_producer_rides_out_a_minute_long_broker_outage() -> None:
    # aiokafka fails a batch that waited longer than request_timeout_ms for a partition leader,
    # and with idempotence every later batch of that partition then fails out of sequence: the
    # default 40 s made a 60 s broker outage end the run (measured). Keep well above a minute.
    producer = _settings()
    assert DELIVERY_TIMEOUT_MS >= 90_000
    assert producer.request_timeout_ms == DELIVERY_TIMEOUT_MS
    assert producer.batch_ttl_s == DELIVERY_TIMEOUT_MS / 1000
