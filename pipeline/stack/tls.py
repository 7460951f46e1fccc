"""A throw-away certificate authority for ``pulse up --tls`` (the ``cryptography`` package).

``$PULSE_HOME/tls/`` holds the CA, one server certificate (Valkey nodes and the Kafka broker;
it may also act as a client: Valkey's replica and Kafka's inter-broker connection present it)
and one client certificate for Pulse's components. Keys are EC P-256, files mode 0600 in a
0700 directory. Nothing here is meant to outlive the stack: a real deployment brings its own.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from pipeline.stack import processes

TLS_DIR = "tls"
VALIDITY = dt.timedelta(days=365)
RENEW_BEFORE = dt.timedelta(days=7)
# names the server certificate is valid for: the local stack, and the docker compose services
SERVER_DNS_NAMES = ("localhost", "valkey-secure", "valkey-secure-replica", "kafka-secure")
SERVER_IPS = ("127.0.0.1", "::1")


@dataclass(frozen=True)
class TlsFiles:
    """Where the stack's certificates and keys are."""

    dir: Path

    @property
    def ca_cert(self) -> Path:
        """The CA certificate every side trusts."""
        return self.dir / "ca.pem"

    @property
    def ca_key(self) -> Path:
        """The CA's key (only ``pulse up`` uses it, to sign)."""
        return self.dir / "ca-key.pem"

    @property
    def server_cert(self) -> Path:
        """The servers' certificate (Valkey, Kafka)."""
        return self.dir / "server.pem"

    @property
    def server_key(self) -> Path:
        """The servers' key."""
        return self.dir / "server-key.pem"

    @property
    def server_keystore(self) -> Path:
        """Key and certificate chain in one PEM file: Kafka's ``ssl.keystore.type=PEM``."""
        return self.dir / "server-keystore.pem"

    @property
    def client_cert(self) -> Path:
        """The certificate Pulse's clients present."""
        return self.dir / "client.pem"

    @property
    def client_key(self) -> Path:
        """The clients' key."""
        return self.dir / "client-key.pem"

    def all(self) -> list[Path]:
        """Every file, in the order they are written."""
        return [
            self.ca_key,
            self.ca_cert,
            self.server_key,
            self.server_cert,
            self.server_keystore,
            self.client_key,
            self.client_cert,
        ]


def tls_files(home: Path) -> TlsFiles:
    """The TLS files of the stack in ``home`` (they may not exist yet)."""
    return TlsFiles(home.expanduser().resolve() / TLS_DIR)


def ensure_tls(home: Path, now: dt.datetime | None = None) -> TlsFiles:
    """The stack's certificates, generated when missing or expiring within a week."""
    files = tls_files(home)
    moment = now or dt.datetime.now(dt.UTC)
    if all(p.is_file() for p in files.all()) and _valid_until(files) - RENEW_BEFORE > moment:
        return files
    generate(files, moment)
    return files


def _valid_until(files: TlsFiles) -> dt.datetime:
    from cryptography import x509

    ends = [
        x509.load_pem_x509_certificate(p.read_bytes()).not_valid_after_utc
        for p in (files.ca_cert, files.server_cert, files.client_cert)
    ]
    return min(ends)


def generate(files: TlsFiles, now: dt.datetime) -> None:
    """Write a new CA, server and client certificate (replacing any old ones)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    files.dir.mkdir(parents=True, exist_ok=True)
    files.dir.chmod(0o700)
    start, end = now - dt.timedelta(minutes=5), now + VALIDITY

    def name(common: str) -> x509.Name:
        return x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Pulse local stack"),
                x509.NameAttribute(NameOID.COMMON_NAME, common),
            ]
        )

    def key_pem(key: ec.EllipticCurvePrivateKey) -> str:
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,  # Kafka's PEM keystore reads PKCS#8 only
            serialization.NoEncryption(),
        ).decode()

    def cert_pem(cert: x509.Certificate) -> str:
        return cert.public_bytes(serialization.Encoding.PEM).decode()

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = name("Pulse throw-away CA")
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(
        common: str, usages: list[x509.ObjectIdentifier], server: bool
    ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(common))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
            )
        )
        if server:
            alt: list[x509.GeneralName] = [x509.DNSName(n) for n in SERVER_DNS_NAMES]
            alt += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in SERVER_IPS]
            builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
        return key, builder.sign(ca_key, hashes.SHA256())

    both = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    server_key, server_cert = leaf("pulse-server", both, server=True)
    client_key, client_cert = leaf("pulse-client", [ExtendedKeyUsageOID.CLIENT_AUTH], False)
    contents = {
        files.ca_key: key_pem(ca_key),
        files.ca_cert: cert_pem(ca_cert),
        files.server_key: key_pem(server_key),
        files.server_cert: cert_pem(server_cert),
        files.server_keystore: key_pem(server_key) + cert_pem(server_cert) + cert_pem(ca_cert),
        files.client_key: key_pem(client_key),
        files.client_cert: cert_pem(client_cert),
    }
    for path in files.all():
        processes.atomic_write(path, contents[path], mode=0o600)
