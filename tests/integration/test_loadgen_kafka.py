"""`pulse loadgen` against the real broker: records land where the truth says, in order."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from loadgen.generator import GenConfig, Generator
from pipeline.cli import main


async def _consume(bootstrap: str, topics: dict[str, int], expected: int) -> dict[Any, list[bytes]]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(t, p) for t, n in topics.items() for p in range(n)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        got: dict[Any, list[bytes]] = {tp: [] for tp in tps}
        seen = 0
        deadline = asyncio.get_running_loop().time() + 60
        while seen < expected and asyncio.get_running_loop().time() < deadline:
            batches = await consumer.getmany(timeout_ms=500, max_records=10_000)
            for tp, msgs in batches.items():
                got[tp].extend(m.value for m in msgs if m.value is not None)
                seen += len(msgs)
        return got
    finally:
        await consumer.stop()


@pytest.mark.integration
def test_loadgen_to_kafka_matches_truth_per_partition(
    stack: Any,
    new_topic: Callable[..., str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sensor_topic = new_topic(6, "lg-sensor")
    applog_topic = new_topic(3, "lg-applog")  # a count unlike the settings' default
    bootstrap = stack.kafka_settings.bootstrap
    monkeypatch.setenv("PULSE_KAFKA_BOOTSTRAP", bootstrap)
    monkeypatch.setenv("PULSE_KAFKA_SENSOR_TOPIC", sensor_topic)
    monkeypatch.setenv("PULSE_KAFKA_APPLOG_TOPIC", applog_topic)
    truth_path = tmp_path / "truth.json"
    argv = ["loadgen", "--rate", "0", "--duration", "8", "--devices", "50", "--services", "4",
            "--seed", "21", "--bad-rate", "0.02", "--late-rate", "0.05", "--anomaly-rate", "0.2",
            "--truth", str(truth_path)]  # fmt: skip
    assert main(argv) == 0
    truth = orjson.loads(truth_path.read_bytes())
    assert truth["partitions"] == {"sensor": 6, "applog": 3}
    assert truth["topics"] == {"sensor": sensor_topic, "applog": applog_topic}
    total = truth["produced"]["sensor"] + truth["produced"]["applog"]
    assert total == 8000

    got = asyncio.run(_consume(bootstrap, {sensor_topic: 6, applog_topic: 3}, total))

    config = GenConfig(
        seed=21, start_ms=truth["start_ms"], rate=0, duration_s=8, devices=50, services=4,
        anomaly_rate=0.2, bad_rate=0.02, late_rate=0.05, sensor_partitions=6,
        applog_partitions=3, sensor_topic=sensor_topic, applog_topic=applog_topic,
    )  # fmt: skip
    expected: dict[Any, list[bytes]] = {tp: [] for tp in got}
    for chunk in Generator(config):
        for r in chunk.records:
            expected[TopicPartition(r.topic, r.partition)].append(r.value)
    for kind, topic in (("sensor", sensor_topic), ("applog", applog_topic)):
        for p, row in truth["per_partition"][kind].items():
            tp = TopicPartition(topic, int(p))
            assert len(got[tp]) == row["produced"]
            assert got[tp] == expected[tp]  # same records, same order per partition
