"""The TLS probe of Kafka's listener, against fake listeners (plain and TLS) on local ports."""

from __future__ import annotations

import socket
import socketserver
import ssl
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline import ingest
from pipeline.stack.tls import TlsFiles, ensure_tls
from schemas.kafka_probe import tls_mismatch
from schemas.settings import KafkaSettings


class _KafkaLike(socketserver.BaseRequestHandler):
    """Answers each request with its correlation id, as a Kafka broker would; closes the
    connection on a size it cannot take (a TLS ClientHello read as a request)."""

    def handle(self) -> None:
        sock: socket.socket = self.request
        context: ssl.SSLContext | None = self.server.tls  # type: ignore[attr-defined]
        try:
            if context is not None:
                sock = context.wrap_socket(sock, server_side=True)
            self._answer(sock)
        except (OSError, ssl.SSLError):
            return
        finally:
            sock.close()

    @staticmethod
    def _answer(sock: socket.socket) -> None:
        with sock.makefile("rb") as stream:  # read(n) waits for n bytes or the end
            while len(head := stream.read(4)) == 4:
                (size,) = struct.unpack(">i", head)
                if not 8 <= size < 1 << 20:
                    return
                body = stream.read(size)
                if len(body) < size:
                    return
                sock.sendall(struct.pack(">i", 6) + body[4:8] + b"\x00\x00")


class _Listener(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, tls: ssl.SSLContext | None) -> None:
        super().__init__(("127.0.0.1", 0), _KafkaLike)
        self.tls = tls

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return ensure_tls(tmp_path_factory.mktemp("tls"))


def _serve(tls: ssl.SSLContext | None) -> Iterator[_Listener]:
    server = _Listener(tls)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def plain() -> Iterator[_Listener]:
    yield from _serve(None)


@pytest.fixture
def tls(certs: TlsFiles) -> Iterator[_Listener]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(certs.server_cert), str(certs.server_key))
    context.load_verify_locations(str(certs.ca_cert))
    context.verify_mode = ssl.CERT_REQUIRED  # as `pulse up --tls` sets ssl.client.auth
    yield from _serve(context)


def _ssl(
    address: str,
    certs: TlsFiles,
    ca: Path | None = None,
    cert: tuple[Path, Path] | None = None,
    no_cert: bool = False,
) -> KafkaSettings:
    """SSL settings: ``certs``' CA and client certificate unless given others (or none)."""
    cert_file, key_file = cert or (certs.client_cert, certs.client_key)
    return KafkaSettings(
        bootstrap=address,
        security_protocol="SSL",
        ssl_ca_file=ca or certs.ca_cert,
        ssl_cert_file=None if no_cert else cert_file,
        ssl_key_file=None if no_cert else key_file,
    )


def test_matching_settings_and_a_listener_that_is_down_are_no_mismatch(
    plain: _Listener, tls: _Listener, certs: TlsFiles
) -> None:
    assert tls_mismatch(KafkaSettings(bootstrap=plain.address)) is None
    assert tls_mismatch(_ssl(tls.address, certs)) is None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{s.getsockname()[1]}"
    assert tls_mismatch(KafkaSettings(bootstrap=closed)) is None
    # the first address that takes a connection is the one asked
    assert tls_mismatch(KafkaSettings(bootstrap=f"{closed},{plain.address}")) is None


def test_a_plaintext_client_on_a_tls_listener(tls: _Listener) -> None:
    assert tls_mismatch(KafkaSettings(bootstrap=tls.address)) == (
        f"Kafka at {tls.address} expects TLS: set PULSE_KAFKA_SECURITY_PROTOCOL=SSL, with "
        "PULSE_KAFKA_SSL_CA_FILE naming the CA that signed its certificate"
    )


def test_a_tls_client_on_a_plaintext_listener(plain: _Listener, certs: TlsFiles) -> None:
    assert tls_mismatch(_ssl(plain.address, certs)) == (
        f"Kafka at {plain.address} does not speak TLS: set "
        "PULSE_KAFKA_SECURITY_PROTOCOL=PLAINTEXT, or point PULSE_KAFKA_BOOTSTRAP at its SSL "
        "listener"
    )


def test_a_certificate_that_does_not_verify(
    tls: _Listener, certs: TlsFiles, tmp_path: Path
) -> None:
    other = ensure_tls(tmp_path / "other")  # another throw-away CA
    problem = tls_mismatch(_ssl(tls.address, certs, ca=other.ca_cert))
    assert problem is not None
    assert problem.startswith(
        f"the certificate of Kafka at {tls.address} does not verify against {other.ca_cert} ("
    )
    assert problem.endswith("): set PULSE_KAFKA_SSL_CA_FILE to the CA that signed it")


@pytest.mark.parametrize("client", ["none", "another CA's"])
def test_a_client_certificate_the_broker_refuses(
    tls: _Listener, certs: TlsFiles, tmp_path: Path, client: str
) -> None:
    if client == "none":
        settings = _ssl(tls.address, certs, no_cert=True)
    else:
        other = ensure_tls(tmp_path / "other")
        settings = _ssl(tls.address, certs, cert=(other.client_cert, other.client_key))
    problem = tls_mismatch(settings)
    assert problem is not None
    assert problem.startswith(f"Kafka at {tls.address} refused this client's TLS certificate (")
    assert problem.endswith(
        "): it needs one signed by its CA in PULSE_KAFKA_SSL_CERT_FILE and PULSE_KAFKA_SSL_KEY_FILE"
    )


class _Silent(socketserver.BaseRequestHandler):
    """A broker still starting: takes the connection, then says nothing (or hangs up)."""

    def handle(self) -> None:
        if self.server.hang_up:  # type: ignore[attr-defined]
            return
        self.request.recv(1 << 16)
        self.server.release.wait(5)  # type: ignore[attr-defined]


@pytest.mark.parametrize("hang_up", [False, True])
def test_a_listener_that_only_times_out_or_hangs_up_is_no_mismatch(
    certs: TlsFiles, hang_up: bool
) -> None:
    """The callers stop waiting on an answer: a broker still starting must not be one."""
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Silent)
    server.daemon_threads = True
    server.hang_up = hang_up  # type: ignore[attr-defined]
    server.release = threading.Event()  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    address = f"127.0.0.1:{server.server_address[1]}"
    try:
        assert tls_mismatch(KafkaSettings(bootstrap=address), timeout_s=0.3) is None
        assert tls_mismatch(_ssl(address, certs), timeout_s=0.3) is None
    finally:
        server.release.set()  # type: ignore[attr-defined]
        server.shutdown()
        server.server_close()


def test_a_worker_says_the_mismatch_at_once_instead_of_waiting(tls: _Listener) -> None:
    said: list[str] = []
    problem = ingest.wait_for_kafka(KafkaSettings(bootstrap=tls.address), said.append, 0.0)
    assert problem is not None and problem.startswith(f"Kafka at {tls.address} expects TLS")
    assert said == []
