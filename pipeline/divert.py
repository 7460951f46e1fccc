"""Diverting records to the dead-letter and late topics, acknowledged before the store apply.

A record is never lost here and never stops the worker (see :class:`Divert`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pipeline.batch import Diverted, PartitionBatch, RawRecord
from pipeline.metrics import Metrics
from schemas import diverted

if TYPE_CHECKING:
    import faust

log = logging.getLogger("pulse.divert")

# A dead letter the broker refuses whole is written as its first TRUNCATED_BYTES, marked.
TRUNCATED_BYTES = 64 * 1024
# Large enough that the producer never refuses what the broker accepted on an input topic
# (Faust's default, 1,000,000 bytes, is below Kafka's default message.max.bytes, 1,048,588).
PRODUCER_MAX_REQUEST_BYTES = 16 * 1024 * 1024


# (Faust topic, record, headers) of one diverted record
_Outgoing = tuple[Any, RawRecord, list[tuple[str, bytes]]]


class Divert:
    """Sends rejected and late records to their topics and waits for the broker's acks.

    A diverted record keeps its key, value and headers (but headers named ``pulse.*``) and
    gains the worker's ``pulse.*`` headers: the reason and the source position.

    A record is never lost here and never stops the worker: transient broker errors are retried
    in place; a record the broker refuses as it is (too large, say) is written as a truncated
    copy with a ``pulse.truncated`` header giving its original size; one that cannot be written
    even so is logged and counted.
    """

    def __init__(
        self,
        app: faust.App,
        deadletter_topic: str,
        late_topic: str,
        metrics: Metrics,
        retry_delay_s: float = 0.5,
    ) -> None:
        self._dead = app.topic(deadletter_topic, key_serializer="raw", value_serializer="raw")
        self._late = app.topic(late_topic, key_serializer="raw", value_serializer="raw")
        self._metrics = metrics
        self._retry_delay_s = retry_delay_s

    async def send(self, source_topic: str, batches: Sequence[PartitionBatch]) -> None:
        """Send every diverted record of ``batches``; return once all are acknowledged."""
        todo: list[tuple[Any, RawRecord, list[tuple[str, bytes]]]] = []
        for b in batches:
            for topic, items in ((self._dead, b.dead), (self._late, b.late)):
                todo.extend(
                    (topic, d.record, _headers(source_topic, b.partition, d)) for d in items
                )
        while todo:
            failed = await self._send_all(todo)
            retry = []
            for item, exc in failed:
                if _stopping(exc):
                    raise exc
                if _transient(exc):
                    retry.append(item)
                    continue
                topic, record, headers = item
                await self._send_truncated(topic, record, headers, exc)
            if retry:
                log.warning(
                    "%d diverted records not acknowledged (%s); retrying in %.1fs",
                    len(retry),
                    failed[0][1],
                    self._retry_delay_s,
                )
                await asyncio.sleep(self._retry_delay_s)
            todo = retry

    async def _send_all(self, items: list[_Outgoing]) -> list[tuple[_Outgoing, BaseException]]:
        """Send ``items`` together; the ones that failed, with their errors."""
        futures: list[Any] = []
        failed: list[tuple[_Outgoing, BaseException]] = []
        for item in items:
            topic, record, headers = item
            try:
                futures.append(
                    await topic.send(
                        key=record.key,
                        value=record.value or b"",
                        headers=headers,
                        force=True,  # send now, not when the current event is acked
                    )
                )
            except Exception as exc:  # e.g. refused by the client before it was queued
                futures.append(None)
                failed.append((item, exc))
        sent = [(item, f) for item, f in zip(items, futures, strict=True) if f is not None]
        results = await asyncio.gather(*(f for _, f in sent), return_exceptions=True)
        for (item, _), result in zip(sent, results, strict=True):
            if isinstance(result, asyncio.CancelledError):
                raise result
            if isinstance(result, BaseException):
                failed.append((item, result))
        return failed

    async def _send_truncated(
        self, topic: Any, record: RawRecord, headers: list[tuple[str, bytes]], exc: BaseException
    ) -> None:
        value = record.value or b""
        key = record.key
        # only the worker's headers: the record's own may be what made it too large
        headers = [h for h in headers if h[0].startswith(diverted.PREFIX)]
        marks = [("pulse.truncated", str(len(value)).encode())]
        if key is not None and len(key) > TRUNCATED_BYTES:
            marks.append(("pulse.truncated.key", str(len(key)).encode()))
            key = key[:TRUNCATED_BYTES]
        reason = f"not writable whole ({type(exc).__name__}: {exc})"[:200]
        marks.append(("pulse.truncated.reason", reason.encode()))
        try:
            fut = await topic.send(
                key=key, value=value[:TRUNCATED_BYTES], headers=headers + marks, force=True
            )
            await fut
        except asyncio.CancelledError:
            raise
        except Exception as exc2:
            self._metrics.dead_unwritable += 1
            log.error(
                "could not write a diverted record from %s even truncated (%s); dropped it",
                dict(headers).get("pulse.source.offset", b"?").decode(),
                exc2,
            )
            return
        self._metrics.dead_truncated += 1
        log.warning("wrote a truncated copy of a diverted record: %s", reason)


def _stopping(exc: BaseException) -> bool:
    """Whether a send failed because the worker is shutting down (nothing was decided)."""
    from aiokafka.errors import ProducerClosed

    return isinstance(exc, ProducerClosed | asyncio.CancelledError)


def _transient(exc: BaseException) -> bool:
    """Whether a send error is the broker being unavailable (retry), not the record's fault."""
    from aiokafka.errors import KafkaConnectionError, KafkaError, KafkaTimeoutError

    if isinstance(exc, KafkaTimeoutError | KafkaConnectionError | asyncio.TimeoutError):
        return True
    return isinstance(exc, KafkaError) and bool(getattr(exc, "retriable", False))


def _headers(topic: str, partition: int, d: Diverted) -> list[tuple[str, bytes]]:
    """The record's own headers (but any named ``pulse.*``, which would pass for the worker's),
    then the worker's: why, and where the record came from."""
    own = getattr(d.record, "headers", None) or ()
    return [
        *((k, v if v is not None else b"") for k, v in own if not k.startswith(diverted.PREFIX)),
        ("pulse.reason", d.reason.encode()),
        ("pulse.source.topic", topic.encode()),
        ("pulse.source.partition", str(partition).encode()),
        ("pulse.source.offset", str(d.record.offset).encode()),
    ]
