"""Certificates made at test time with ``cryptography``: CAs, server and client certificates.

Everything is written as PEM files under a test's temporary directory; keys are EC P-256
(fast to make), certificates live for one day.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_LIFETIME = dt.timedelta(days=1)


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key, as PEM files."""

    cert: Path
    key: Path


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


class CertificateAuthority:
    """A self-signed CA that issues server and client certificates into ``directory``."""

    def __init__(self, directory: Path, name: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.name = name
        self._key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + _LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), critical=False
            )
            .sign(self._key, hashes.SHA256())
        )
        self.cert = directory / f"{name}-ca.pem"
        self.cert.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))

    @property
    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._key.public_key()

    def sign(self, data: bytes) -> bytes:
        """``data`` signed with the CA's key (ECDSA with SHA-256), as its CRLs are."""
        return self._key.sign(data, ec.ECDSA(hashes.SHA256()))

    def revocation_list(
        self,
        path: Path,
        revoked: tuple[Issued, ...] = (),
        *,
        number: int | None = 1,
        next_update: dt.timedelta = _LIFETIME,
        extensions: tuple[tuple[x509.ExtensionType, bool], ...] = (),
        entry_extensions: tuple[tuple[x509.ExtensionType, bool], ...] = (),
    ) -> Path:
        """A CRL of this CA revoking ``revoked``, written to ``path`` (PEM). ``number=None``:
        no extension at all (as ``openssl ca -gencrl`` writes without a crlnumber file).
        A negative ``next_update``: a CRL already past its next update. ``extensions`` (of
        the CRL) and ``entry_extensions`` (of each entry): (extension, critical) pairs."""
        now = dt.datetime.now(dt.UTC)
        stale = next_update < dt.timedelta()
        last_update = now + next_update * 2 if stale else now - dt.timedelta(minutes=5)
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self._cert.subject)
            .last_update(last_update)
            .next_update(now + next_update)
        )
        if number is not None:
            builder = builder.add_extension(x509.CRLNumber(number), critical=False)
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical=critical)
        for issued in revoked:
            serial = x509.load_pem_x509_certificate(issued.cert.read_bytes()).serial_number
            entry = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now)
            for extension, critical in entry_extensions:
                entry = entry.add_extension(extension, critical=critical)
            builder = builder.add_revoked_certificate(entry.build())
        crl = builder.sign(self._key, hashes.SHA256())
        path.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
        return path

    def issue_server(
        self,
        name: str,
        *,
        hosts: tuple[str, ...] = ("127.0.0.1", "localhost"),
        lifetime: dt.timedelta = _LIFETIME,
    ) -> Issued:
        """A server certificate (serverAuth) for ``hosts`` (IP addresses and DNS names)."""
        alt_names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                alt_names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                alt_names.append(x509.DNSName(host))
        return self._issue(name, ExtendedKeyUsageOID.SERVER_AUTH, alt_names, lifetime)

    def issue_client(self, name: str, *, lifetime: dt.timedelta = _LIFETIME) -> Issued:
        """A client certificate (clientAuth) with ``name`` as its common name."""
        return self._issue(name, ExtendedKeyUsageOID.CLIENT_AUTH, [], lifetime)

    def _issue(
        self,
        name: str,
        usage: x509.ObjectIdentifier,
        alt_names: list[x509.GeneralName],
        lifetime: dt.timedelta,
    ) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + lifetime)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
        )
        if alt_names:
            builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        issued = Issued(self.directory / f"{name}.pem", self.directory / f"{name}-key.pem")
        issued.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key, issued.key)
        return issued


@dataclass(frozen=True)
class Pki:
    """What the TLS tests need: a trusted CA with a server and a client certificate, and a
    second CA nobody trusts, with a client certificate of its own."""

    ca: CertificateAuthority
    server: Issued
    client: Issued
    unknown_ca: CertificateAuthority
    unknown_client: Issued


def make_pki(directory: Path) -> Pki:
    """A trusted CA (server + client certificates) and an unknown one, under ``directory``."""
    ca = CertificateAuthority(directory / "trusted", "trusted")
    unknown = CertificateAuthority(directory / "unknown", "unknown")
    return Pki(
        ca=ca,
        server=ca.issue_server("server"),
        client=ca.issue_client("client"),
        unknown_ca=unknown,
        unknown_client=unknown.issue_client("stranger"),
    )


def secure_nats_config(pki: Pki, password: str) -> str:
    """nats-server configuration: TLS that verifies client certificates, and one password user."""
    return f"""
tls {{
  cert_file: {json.dumps(str(pki.server.cert))}
  key_file: {json.dumps(str(pki.server.key))}
  ca_file: {json.dumps(str(pki.ca.cert))}
  verify: true
  timeout: 2
}}
authorization {{
  user: "broker"
  password: {json.dumps(password)}
}}
"""
