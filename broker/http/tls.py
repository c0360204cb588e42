"""The ingress's TLS files, checked before granian is given them.

granian (rustls, webpki) reads the certificate, its key, the client CA bundle and the
certificate revocation lists in each worker process as it starts, and a file it cannot use
there panics the worker: every worker, and the ingress never serves. So ``broker serve``
checks them first (:func:`tls_problem`), at start and again before a reload (SIGHUP), and
answers with a message that names the file and what to do.

What was measured of granian 2.8.9 with revocation lists (``--tls-crl``), and so is checked:

- a CRL without extensions (version 1, or a version 2 one with neither the CRL number nor
  the authority key identifier that RFC 5280 asks for) panics the worker;
- only the first CRL of a file is read;
- once any CRL is given, a client certificate whose CA has none is refused (its revocation
  status is unknown): a CRL signed by no CA of the bundle refuses every client, and a CA of
  the bundle without a CRL refuses all of its clients;
- a CRL past its next update is still used (a warning: :func:`stale_crls`).
"""

from __future__ import annotations

import datetime as dt
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

import structlog
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa

from broker.settings import Settings

_CRL_BEGIN = b"-----BEGIN X509 CRL-----"

log = structlog.get_logger(__name__)


def tls_problem(settings: Settings) -> str | None:
    """What is wrong with the ingress TLS settings, checked before anything starts: a
    certificate without its key, a client CA or CRL without what it needs, files that
    cannot be read or do not load (an encrypted key included: granian is given no
    password), a CRL granian would refuse or that would refuse clients it should not."""
    cert, key, client_ca = settings.tls_cert, settings.tls_key, settings.tls_client_ca
    crls = settings.tls_crl_files
    if (cert is None) != (key is None):
        return "--tls-cert and --tls-key go together (BROKER_TLS_CERT, BROKER_TLS_KEY)"
    if client_ca is not None and cert is None:
        return "--tls-client-ca needs --tls-cert and --tls-key: mTLS is TLS first"
    if crls and client_ca is None:
        return "--tls-crl needs --tls-client-ca: revocation lists are of client certificates"
    named = [("--tls-cert", cert), ("--tls-key", key), ("--tls-client-ca", client_ca)]
    for option, path in [*named, *(("--tls-crl", crl) for crl in crls)]:
        if path is not None and (not path.is_file() or not os.access(path, os.R_OK)):
            return f"{option} {path} is not a readable file"
    if cert is None or key is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # A callable password: an encrypted key fails here instead of prompting on a tty.
        context.load_cert_chain(cert, key, password=lambda: b"")
    except ssl.SSLError as e:
        return (
            f"--tls-cert {cert} and --tls-key {key} do not load as a PEM certificate and its "
            f"unencrypted private key ({e.reason or e})"
        )
    if client_ca is None:
        return None
    try:
        context.load_verify_locations(cafile=client_ca)
    except ssl.SSLError as e:
        return f"--tls-client-ca {client_ca} holds no PEM CA certificate ({e.reason or e})"
    return _crls_problem(crls, client_ca) if crls else None


@dataclass(frozen=True)
class _Crl:
    path: Path
    crl: x509.CertificateRevocationList


def _load_crl(path: Path) -> _Crl | str:
    """The one CRL in ``path``, or what is wrong with it."""
    data = path.read_bytes()
    count = data.count(_CRL_BEGIN)
    if count == 0:
        return f"--tls-crl {path} holds no PEM CRL ({_CRL_BEGIN.decode()})"
    if count > 1:
        return (
            f"--tls-crl {path} holds {count} CRLs and only the first would be read: give each "
            "its own file (--tls-crl a.pem,b.pem)"
        )
    try:
        crl = x509.load_pem_x509_crl(data)
    except ValueError as e:
        return f"--tls-crl {path} does not load as a PEM CRL ({e})"
    if len(crl.extensions) == 0:
        return (
            f"--tls-crl {path} is a CRL without extensions (version 1, or without the CRL "
            "number RFC 5280 asks for), which the ingress's TLS library refuses: make it with "
            "a CRL number (openssl ca -gencrl with a crlnumber file)"
        )
    return _Crl(path, crl)


def _issues(ca: x509.Certificate, crl: x509.CertificateRevocationList) -> bool:
    if ca.subject != crl.issuer:
        return False
    key = ca.public_key()
    signing = (
        rsa.RSAPublicKey,
        ec.EllipticCurvePublicKey,
        dsa.DSAPublicKey,
        ed25519.Ed25519PublicKey,
        ed448.Ed448PublicKey,
    )
    return isinstance(key, signing) and crl.is_signature_valid(key)


def _crls_problem(paths: list[Path], client_ca: Path) -> str | None:
    """Each CRL loads, is signed by a CA of the bundle, and each CA has one."""
    cas = x509.load_pem_x509_certificates(client_ca.read_bytes())
    covered: set[int] = set()
    for path in paths:
        loaded = _load_crl(path)
        if isinstance(loaded, str):
            return loaded
        issuers = [i for i, ca in enumerate(cas) if _issues(ca, loaded.crl)]
        if not issuers:
            return (
                f"--tls-crl {path} (issuer {loaded.crl.issuer.rfc4514_string()}) is signed by "
                f"no CA of --tls-client-ca {client_ca}: with it the ingress would refuse every "
                "client certificate (their revocation status unknown)"
            )
        covered.update(issuers)
    missing = [ca.subject.rfc4514_string() for i, ca in enumerate(cas) if i not in covered]
    if missing:
        return (
            f"--tls-client-ca {client_ca} holds CAs with no --tls-crl ({'; '.join(missing)}): "
            "once revocation lists are given, the ingress refuses every client certificate "
            "whose CA has none; add their CRLs"
        )
    return None


def stale_crls(settings: Settings, now: dt.datetime | None = None) -> list[tuple[Path, str]]:
    """The CRLs past their next update, with it (ISO 8601): still used as they are, while
    the CA has most likely revoked more since. Only of files that load (see
    :func:`tls_problem`)."""
    now = now or dt.datetime.now(dt.UTC)
    stale: list[tuple[Path, str]] = []
    for path in settings.tls_crl_files:
        try:
            loaded = _load_crl(path)
        except OSError:
            continue
        if isinstance(loaded, str):
            continue
        next_update = loaded.crl.next_update_utc
        if next_update is not None and next_update < now:
            stale.append((path, next_update.isoformat()))
    return stale


def warn_of_stale_crls(settings: Settings) -> None:
    """Log each CRL past its next update (``tls_crl_out_of_date``): it is still used."""
    for path, next_update in stale_crls(settings):
        log.warning(
            "tls_crl_out_of_date",
            path=str(path),
            next_update=next_update,
            hint="it is still used; install the CA's newer CRL and send broker serve SIGHUP",
        )


#: Which TLS files ``broker_tls_expiry_timestamp_seconds`` reports, by its ``file`` label.
EXPIRY_FILES = ("cert", "client_ca", "crl", "nats_ca", "nats_cert")

_expiry_cache: dict[tuple[str, Path], tuple[object, dt.datetime | None]] = {}


def tls_expiries(settings: Settings) -> list[tuple[str, Path, dt.datetime]]:
    """When each TLS file the broker reads stops being valid: a certificate file's earliest
    ``notAfter`` (a chain or bundle expires with its first certificate), a CRL's next
    update. A file is parsed again only once it changed (inode, size, modification time);
    one that cannot be read or parsed now is left out."""
    named: list[tuple[str, Path | None]] = [
        ("cert", settings.tls_cert),
        ("client_ca", settings.tls_client_ca),
        *(("crl", path) for path in settings.tls_crl_files),
        ("nats_ca", settings.nats_tls_ca),
        ("nats_cert", settings.nats_tls_cert),
    ]
    expiries = []
    for kind, path in named:
        if path is None:
            continue
        try:
            stat = path.stat()
        except OSError:
            continue
        stamp = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        cached = _expiry_cache.get((kind, path))
        if cached is None or cached[0] != stamp:
            if len(_expiry_cache) > 64:  # bounded: paths come from settings, but a reload
                _expiry_cache.clear()  # could name new ones each time
            cached = (stamp, _expiry(kind, path))
            _expiry_cache[(kind, path)] = cached
        if cached[1] is not None:
            expiries.append((kind, path, cached[1]))
    return expiries


def _expiry(kind: str, path: Path) -> dt.datetime | None:
    try:
        data = path.read_bytes()
        if kind == "crl":
            return x509.load_pem_x509_crl(data).next_update_utc
        certificates = x509.load_pem_x509_certificates(data)
    except (OSError, ValueError):
        return None
    return min(c.not_valid_after_utc for c in certificates) if certificates else None
