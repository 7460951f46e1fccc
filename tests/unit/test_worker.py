"""The worker process's start-up: what it leaves to the cycle collector, settings checked first,
and Kafka not there yet."""

from __future__ import annotations

import gc
import logging
import socket

import pytest

from pipeline import ingest, worker
from pipeline.settings import KafkaSettings
from pipeline.worker import freeze_startup_heap


def test_start_up_objects_are_frozen_out_of_full_collections() -> None:
    """Objects alive at start-up are no longer walked by a full collection."""
    before = gc.get_freeze_count()
    alive = [[i] for i in range(1000)]  # tracked containers alive across the call
    try:
        freeze_startup_heap()
        assert gc.get_freeze_count() >= before + len(alive)
        walked = {id(o) for o in gc.get_objects()}  # what a full collection walks
        assert not any(id(x) in walked for x in alive)
    finally:
        gc.unfreeze()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again when the block ends: nothing listens


class _Said(Exception):
    pass


def test_a_worker_waits_for_kafka_and_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ingest, "KAFKA_WAIT_SAY_S", 0.0)
    kafka = KafkaSettings(bootstrap=f"127.0.0.1:{_closed_port()}")
    said: list[str] = []
    level = logging.getLogger("aiokafka").level

    def say(msg: str) -> None:
        said.append(msg)
        if len(said) == 3:  # it keeps trying; the test stops it here
            raise _Said

    with pytest.raises(_Said):
        ingest.wait_for_kafka(kafka, say, retry_s=0.0)
    assert all(m.startswith(f"waiting for Kafka at {kafka.bootstrap} (") for m in said), said
    assert logging.getLogger("aiokafka").level == level  # the client's log level is restored


def test_kafka_that_answers_but_cannot_be_used_is_one_sentence(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from aiokafka.client import AIOKafkaClient

    async def refuse(self: object) -> None:
        raise RuntimeError("unsupported broker version\nmore detail")

    monkeypatch.setattr(AIOKafkaClient, "bootstrap", refuse)
    kafka = KafkaSettings(bootstrap=f"127.0.0.1:{_closed_port()}")
    problem = ingest.wait_for_kafka(kafka, lambda msg: None, retry_s=0.0)
    assert problem == (
        f"cannot use Kafka at {kafka.bootstrap}: RuntimeError: unsupported broker version"
    )


@pytest.mark.parametrize(
    ("name", "value", "said"),
    [
        ("PULSE_WORKER_BATCH_MAX", "abc", "Input should be a valid integer"),
        ("PULSE_WORKER_DIMS_1M", "device,nosuch", "unknown dimension 'nosuch'"),
        ("PULSE_WORKER_DETECT_THRESHOLD", "1.5", "Input should be less than 1"),
    ],
)
def test_a_wrong_worker_setting_is_said_before_any_waiting(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    name: str,
    value: str,
    said: str,
) -> None:
    from pipeline import cli
    from schemas import store_errors

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("the worker reached for a service before checking its settings")

    monkeypatch.setattr(store_errors, "check", never)
    monkeypatch.setattr(worker, "wait_for_kafka", never)
    monkeypatch.setenv(name, value)
    assert cli.main(["worker"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"pulse worker: {name}: {said}"), err


def test_a_sigterm_while_waiting_for_kafka_stops_the_worker_cleanly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A supervisor stopping a worker that still waits for Kafka gets exit status 0, not a
    death by the signal; the handler the process had is put back."""
    import signal

    from pipeline import cli
    from schemas import store_errors

    monkeypatch.setattr(ingest, "KAFKA_WAIT_SAY_S", 0.0)
    kafka = KafkaSettings(bootstrap=f"127.0.0.1:{_closed_port()}")

    def ours(signum: int, frame: object) -> None:  # were wait_for_kafka not to take SIGTERM
        raise _Said

    before = signal.signal(signal.SIGTERM, ours)
    try:
        with pytest.raises(ingest.StopRequested):
            ingest.wait_for_kafka(kafka, lambda msg: signal.raise_signal(signal.SIGTERM), 0.0)
        assert signal.getsignal(signal.SIGTERM) is ours
    finally:
        signal.signal(signal.SIGTERM, before)

    def stopped(*args: object) -> None:
        raise ingest.StopRequested

    monkeypatch.setattr(store_errors, "check", lambda *args: None)
    monkeypatch.setattr(worker, "wait_for_kafka", stopped)
    assert cli.main(["worker"]) == 0
