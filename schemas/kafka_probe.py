"""Why a Kafka listener and a client's TLS settings cannot talk, in one sentence.

aiokafka reports every such mismatch (a TLS client on a plaintext listener or the reverse, a
certificate that does not verify, a client certificate the broker refuses) as it reports a
broker that is down: "Unable to bootstrap". Waiting fixes none of them. :func:`tls_mismatch`
asks the listener itself, with a plain socket and Kafka's smallest request (``ApiVersions``
v0), so every command can say which setting is wrong instead.

The module also keeps aiokafka's own log readable: :func:`client_log_muted` while a caller
says a failure in its own words, :func:`client_repeats_summarised` for a long-running process,
where an outage would otherwise log a line per reconnect attempt.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import struct
import time
from collections.abc import Callable, Iterator

from schemas.settings import KafkaSettings

_CORRELATION = 0x50554C53  # "PULS"
_CLIENT = b"pulse-probe"
# ApiVersions (key 18) v0: the request header and nothing else, after the size
_BODY = struct.pack(">hhih", 18, 0, _CORRELATION, len(_CLIENT)) + _CLIENT
_REQUEST = struct.pack(">i", len(_BODY)) + _BODY

_SSL = "PULSE_KAFKA_SECURITY_PROTOCOL"


def tls_mismatch(kafka: KafkaSettings, timeout_s: float = 5.0) -> str | None:
    """What keeps the client off Kafka's listener at the bootstrap addresses, if it is TLS.

    None when no address takes a connection (a broker that is down or still starting is not
    a TLS question), when the first one that does answers Kafka's request with these settings,
    or when it only resets or times out (a broker still starting): only a definite mismatch
    is an answer, as the callers stop waiting on it.
    """
    for host, port in _addresses(kafka.bootstrap):
        try:
            sock = socket.create_connection((host, port), timeout_s)
        except OSError:
            continue
        where = f"Kafka at {host}:{port}"
        with sock:
            context = kafka.ssl_context()
            if context is None:
                if _answers(sock) or not _speaks_tls(host, port, timeout_s):
                    return None
                return (
                    f"{where} expects TLS: set {_SSL}=SSL, with PULSE_KAFKA_SSL_CA_FILE naming "
                    "the CA that signed its certificate"
                )
            try:
                tls = context.wrap_socket(sock, server_hostname=host)
            except ssl.SSLCertVerificationError as exc:
                ca = kafka.ssl_ca_file or "the system's CAs"
                return (
                    f"the certificate of {where} does not verify against {ca} "
                    f"({exc.verify_message}): set PULSE_KAFKA_SSL_CA_FILE to the CA that "
                    "signed it"
                )
            except (ssl.SSLError, OSError) as exc:
                if _refuses_certificate(exc):  # TLS 1.2 refuses it in the handshake
                    return _refused(where, exc)
                if _answers_plainly(host, port, timeout_s):
                    return (
                        f"{where} does not speak TLS: set {_SSL}=PLAINTEXT, or point "
                        "PULSE_KAFKA_BOOTSTRAP at its SSL listener"
                    )
                if "ALERT" in _reason(exc).upper():  # the broker refused the handshake
                    return f"the TLS handshake with {where} failed ({_reason(exc)})"
                return None  # a reset or a timeout: a broker still starting, say

            with tls:
                try:
                    _answers(tls)
                except ssl.SSLError as exc:  # TLS 1.3 refuses a client certificate only here
                    return _refused(where, exc)
                return None
    return None


@contextlib.contextmanager
def client_log_muted() -> Iterator[None]:
    """aiokafka's own log lines muted: what it would log of a failure (a line per attempt) is
    said once, in the caller's sentence."""
    client_log = logging.getLogger("aiokafka")
    level = client_log.level
    client_log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        client_log.setLevel(level)


class RepeatsSummarised(logging.Filter):
    """Lets the first line of each kind (logger, level and message template) through, then
    one per ``every_s`` seconds that says how many like it were held back since.

    aiokafka logs a line per reconnect attempt, every ``retry_backoff_ms``: a broker down for
    90 s put 6 445 lines of four kinds in a worker's log.
    """

    def __init__(self, every_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.every_s = every_s
        self._clock = clock
        self._seen: dict[tuple[str, int, object], tuple[float, int]] = {}  # -> said at, held

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, record.msg)
        now = self._clock()
        said = self._seen.get(key)
        if said is not None and now - said[0] < self.every_s:
            self._seen[key] = (said[0], said[1] + 1)
            return False
        if said is not None and said[1]:
            held = f"{said[1]} more like it in the last {now - said[0]:.0f} s"
            record.msg, record.args = f"{record.getMessage()} ({held})", ()
        if len(self._seen) >= 1000:  # templates are few; arguments never make a key
            self._seen.clear()
        self._seen[key] = (now, 0)
        return True


def client_repeats_summarised(every_s: float = 60.0) -> RepeatsSummarised:
    """Summarise repeated lines of every aiokafka logger (:class:`RepeatsSummarised`); call it
    once aiokafka is imported (its loggers are made at import, and a filter of a logger does
    not see its children's records)."""
    repeats = RepeatsSummarised(every_s)
    for name in {"aiokafka", *logging.Logger.manager.loggerDict}:
        if name == "aiokafka" or name.startswith("aiokafka."):
            logging.getLogger(name).addFilter(repeats)
    return repeats


def _refuses_certificate(exc: BaseException) -> bool:
    """Whether the broker's alert is about this client's certificate (none, or not trusted)."""
    reason = _reason(exc).upper()
    return "ALERT" in reason and ("CERTIFICATE" in reason or "UNKNOWN_CA" in reason)


def _refused(where: str, exc: BaseException) -> str:
    return (
        f"{where} refused this client's TLS certificate ({_reason(exc)}): it needs one signed "
        "by its CA in PULSE_KAFKA_SSL_CERT_FILE and PULSE_KAFKA_SSL_KEY_FILE"
    )


def _addresses(bootstrap: str) -> list[tuple[str, int]]:
    out: list[tuple[str, int]] = []
    for item in bootstrap.split(","):
        host, sep, port = item.strip().rpartition(":")
        if sep and port.isdigit():
            out.append((host.strip("[]") or "127.0.0.1", int(port)))
    return out


def _answers(sock: socket.socket) -> bool:
    """Whether a Kafka broker answers an ``ApiVersions`` request on ``sock``.

    A socket error other than TLS's (a listener closing on bytes it cannot read) is a no.
    """
    try:
        sock.sendall(_REQUEST)
        head = _read(sock, 8)
    except ssl.SSLError:
        raise
    except OSError:
        return False
    return head is not None and struct.unpack(">ii", head)[1] == _CORRELATION


def _read(sock: socket.socket, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def _speaks_tls(host: str, port: int, timeout_s: float) -> bool:
    """Whether the listener completes a TLS handshake (its certificate unchecked)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with (
            socket.create_connection((host, port), timeout_s) as sock,
            context.wrap_socket(sock, server_hostname=host),
        ):
            return True
    except OSError:  # ssl.SSLError is one
        return False


def _answers_plainly(host: str, port: int, timeout_s: float) -> bool:
    try:
        with socket.create_connection((host, port), timeout_s) as sock:
            return _answers(sock)
    except OSError:
        return False


def _reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)
    return str(reason) if reason else (str(exc) or type(exc).__name__)
