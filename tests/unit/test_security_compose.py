"""docker-compose.yml's secured profile agrees with what secure-init writes (no Docker here)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509

from pipeline.stack import compose_secrets
from pipeline.stack.tls import tls_files
from schemas.settings import KafkaSettings, StoreRole, StoreSettings

ROOT = Path(__file__).resolve().parents[2]
SECURE = {
    "secure-init",
    "kafka-secure",
    "topics-secure",
    "valkey-secure",
    "valkey-secure-replica",
    "worker-secure",
    "dashboard-secure",
    "loadgen-secure",
}


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


@pytest.fixture(scope="module")
def secrets_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("secrets")
    assert compose_secrets.main([str(target)]) == 0
    return target


def test_secure_services_are_a_profile_of_their_own() -> None:
    services = compose()["services"]
    assert set(services) >= SECURE
    for name, service in services.items():
        if name in SECURE:
            assert service["profiles"] == ["secure"], name
        else:
            assert "secure" not in service.get("profiles", []), name


def test_no_secret_in_the_compose_file() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    assert "PASSWORD" not in text and "requirepass" not in text and "masterauth" not in text


def test_every_secrets_path_the_services_read_is_written(secrets_dir: Path) -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    paths = set(re.findall(r"/secrets/[\w./-]+", text))
    assert paths, "the secured services read their files from /secrets"
    for path in paths:
        assert (secrets_dir / path.removeprefix("/secrets/")).is_file(), path
    for service in (compose()["services"][n] for n in SECURE - {"topics-secure"}):
        mounts = [v for v in service.get("volumes", []) if v.startswith("secrets:")]
        assert mounts and mounts[0].split(":")[1] == "/secrets"


def test_valkey_nodes_serve_tls_only_with_acl_users(secrets_dir: Path) -> None:
    primary = (secrets_dir / "valkey" / "primary.conf").read_text().splitlines()
    replica = (secrets_dir / "valkey" / "replica.conf").read_text().splitlines()
    for conf in (primary, replica):
        assert "port 0" in conf and "tls-port 6379" in conf and "tls-replication yes" in conf
        assert "user default reset" in conf and "appendfsync always" in conf
        assert "auto-aof-rewrite-min-size 1gb" in conf
    assert not any(line.startswith("replicaof") for line in primary)
    assert f"replicaof {compose_secrets.PRIMARY_HOST} 6379" in replica
    services = compose()["services"]
    assert services["valkey-secure-replica"]["command"][-1] == "/secrets/valkey/replica.conf"


def test_pulse_containers_reach_the_secured_nodes(secrets_dir: Path) -> None:
    c = compose()
    env = c["x-pulse-secure-env"]
    for name in ("worker-secure", "dashboard-secure", "loadgen-secure"):
        assert c["services"][name]["environment"] == env
    assert env["PULSE_HOME"] == "/secrets"
    assert env["PULSE_STORE_HOST"] == compose_secrets.PRIMARY_HOST
    assert int(env["PULSE_STORE_PORT"]) == compose_secrets.VALKEY_PORT
    kafka_env = c["services"]["kafka-secure"]["environment"]
    assert env["PULSE_KAFKA_BOOTSTRAP"] in kafka_env["KAFKA_ADVERTISED_LISTENERS"]
    assert "SECURE:SSL" in kafka_env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"]
    assert kafka_env["KAFKA_SSL_CLIENT_AUTH"] == "required"

    # what those containers read from PULSE_HOME's secrets.env
    secrets = secrets_dir / "secrets.env"
    store, kafka = StoreSettings(_env_file=secrets), KafkaSettings(_env_file=secrets)
    assert store.acl and store.tls and store.credentials(StoreRole.WORKER)[0] == "pulse-worker"
    assert kafka.security_protocol == "SSL"
    # the servers' certificate names every host the clients and the replica connect to
    cert = x509.load_pem_x509_certificate(tls_files(secrets_dir).server_cert.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns = set(names.get_values_for_type(x509.DNSName))
    assert {"valkey-secure", "valkey-secure-replica", "kafka-secure"} <= dns
