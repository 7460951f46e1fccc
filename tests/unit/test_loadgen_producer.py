"""The load generator's Kafka producer: safe to retry, and patient enough to ride out an outage."""

from __future__ import annotations

import asyncio
from typing import Any

from loadgen.producer import DELIVERY_TIMEOUT_MS, make_producer


def _settings() -> Any:
    async def build() -> Any:
        producer = make_producer("127.0.0.1:9", linger_ms=20)  # never started: no connection
        return producer

    return asyncio.run(build())


def test_producer_is_idempotent_and_waits_for_all_replicas() -> None:
    producer = _settings()
    assert producer._txn_manager is not None  # idempotence: re-sent batches are dropped by seq
    assert producer._sender._acks == -1


def test_producer_rides_out_a_minute_long_broker_outage() -> None:
    # aiokafka fails a batch that waited longer than request_timeout_ms for a partition leader,
    # and with idempotence every later batch of that partition then fails out of sequence: the
    # default 40 s made a 60 s broker outage end the run (measured). Keep well above a minute.
    producer = _settings()
    assert DELIVERY_TIMEOUT_MS >= 90_000
    assert producer._request_timeout_ms == DELIVERY_TIMEOUT_MS
    assert producer._message_accumulator._batch_ttl == DELIVERY_TIMEOUT_MS / 1000
