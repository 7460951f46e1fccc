"""The Kafka jar cache: fetched once, never left half-written, KAFKA_HOME honoured."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.settings import StackSettings
from pipeline.stack import kafka
from pipeline.stack.errors import PrerequisiteError, StackError

FAKE_MVN = """#!/bin/sh
echo run >> "{calls}"
[ -n "{fail}" ] && {{ echo "[ERROR] could not resolve"; exit 1; }}
for arg in "$@"; do
  case "$arg" in -DoutputDirectory=*) out="${{arg#-DoutputDirectory=}}";; esac
done
mkdir -p "$out" && touch "$out/kafka_2.13-3.9.1.jar" "$out/kafka-clients-3.9.1.jar"
"""


def fake_mvn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail: bool = False) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    calls = tmp_path / "calls"
    script = bin_dir / "mvn"
    script.write_text(FAKE_MVN.format(calls=calls, fail="1" if fail else ""))
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin")
    monkeypatch.delenv("KAFKA_HOME", raising=False)
    return calls


def test_fetches_once_then_reuses_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = fake_mvn(tmp_path, monkeypatch)
    settings = StackSettings(cache_dir=tmp_path / "cache")
    libs = kafka.ensure_jars(settings)
    assert libs == (tmp_path / "cache" / "kafka-2.13-3.9.1" / "libs").resolve()
    assert (libs / "kafka_2.13-3.9.1.jar").is_file()
    assert (libs.parent / "pom.xml").is_file() and kafka.jars_cached(settings)
    assert kafka.ensure_jars(settings) == libs
    assert calls.read_text().count("run") == 1
    assert kafka.kafka_classpath(settings) == f"{libs}/*"
    # Nothing but the final dir and the lock file is left in the cache.
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [
        ".kafka-2.13-3.9.1.lock",
        "kafka-2.13-3.9.1",
    ]


def test_failed_fetch_leaves_no_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_mvn(tmp_path, monkeypatch, fail=True)
    settings = StackSettings(cache_dir=tmp_path / "cache")
    with pytest.raises(StackError, match="could not resolve"):
        kafka.ensure_jars(settings)
    assert not kafka.jars_cached(settings)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [".kafka-2.13-3.9.1.lock"]


def test_incomplete_cache_dir_is_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_mvn(tmp_path, monkeypatch)
    settings = StackSettings(cache_dir=tmp_path / "cache")
    broken = tmp_path / "cache" / "kafka-2.13-3.9.1" / "libs"
    broken.mkdir(parents=True)
    (broken / "half.jar").touch()
    libs = kafka.ensure_jars(settings)
    assert sorted(p.name for p in libs.iterdir()) == [
        "kafka-clients-3.9.1.jar",
        "kafka_2.13-3.9.1.jar",
    ]


def test_missing_maven_names_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("KAFKA_HOME", raising=False)
    with pytest.raises(PrerequisiteError, match="Maven is required"):
        kafka.kafka_classpath(StackSettings(cache_dir=tmp_path / "cache"))


def test_kafka_home_is_used_without_maven(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "kafka" / "libs").mkdir(parents=True)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("KAFKA_HOME", str(tmp_path / "kafka"))
    settings = StackSettings(cache_dir=tmp_path / "cache")
    assert kafka.kafka_classpath(settings) == f"{(tmp_path / 'kafka' / 'libs').resolve()}/*"
    monkeypatch.setenv("KAFKA_HOME", str(tmp_path / "nowhere"))
    with pytest.raises(PrerequisiteError, match="no libs/"):
        kafka.kafka_classpath(settings)
