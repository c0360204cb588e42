"""The ingress's TLS files, checked before granian is given them.

granian (rustls, webpki) reads the certificate, its key, the client CA bundle and the
certificate revocation lists in each worker process as it starts, and a file it cannot use
there panics the worker: every worker, and the ingress never serves. So ``broker serve``
checks them first (:func:`tls_problem`), at start and again before a reload (SIGHUP), and
answers with a message that names the file and what to do.

What was measured of granian 2.8.9 with revocation lists (``--tls-crl``), and so is checked:

- a CRL without extensions (version 1, or a version 2 one with neither the CRL number nor
  the authority key identifier that RFC 5280 asks for) panics the worker; so does a delta
  CRL, an indirect one (an issuing distribution point saying so, or an entry naming its
  certificate's issuer), one of only some revocation reasons or of attribute certificates,
  one whose issuing distribution point has no full name (a URI), and one with a critical
  extension, or an entry with one, that webpki does not know;
- only the first CRL of a file is read, and of two CRLs of one issuer only one is used;
- once any CRL is given, a certificate in a client's chain whose issuer has none is refused
  (its revocation status unknown): a warning names the bundle's CAs without one
  (:func:`cas_without_crl`), which is no error, since a CA whose clients' chains end at
  another CA of the bundle needs none, and an intermediate CA's CRL is of no CA in it;
- a CRL without a next update panics the worker too; one past its next update is still
  used (a warning: :func:`stale_crls`).
"""

from __future__ import annotations

import datetime as dt
import os
import ssl
from pathlib import Path

import structlog
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.x509.oid import CRLEntryExtensionOID, ExtensionOID

from broker.settings import Settings
from broker.telemetry.tls_expiry import file_expiry

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


#: CRL extensions webpki reads (any other that is critical makes it fail), and of entries.
_CRL_EXTENSIONS_READ = frozenset(
    {
        ExtensionOID.CRL_NUMBER,
        ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
        ExtensionOID.ISSUING_DISTRIBUTION_POINT,
    }
)
_ENTRY_EXTENSIONS_READ = frozenset(
    {CRLEntryExtensionOID.CRL_REASON, CRLEntryExtensionOID.INVALIDITY_DATE}
)


def _load_crl(path: Path) -> x509.CertificateRevocationList | str:
    """The one CRL in ``path``, or what is wrong with it: what the ingress's TLS library
    (webpki, in each granian worker) would fail on, checked here because a worker panics on
    it. Never raises: a file that cannot be analysed is refused."""
    try:
        data = path.read_bytes()
    except OSError as e:
        return f"--tls-crl {path} is not a readable file ({e.strerror or e})"
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
        # cryptography parses lazily: read every part here, where a failure is an answer
        _ = crl.issuer, crl.last_update_utc, crl.next_update_utc, crl.signature_algorithm_oid
        unusable = _unusable(crl)
    except Exception as e:  # an operator's file: whatever fails to parse is refused, named
        return f"--tls-crl {path} does not load as a PEM CRL ({type(e).__name__}: {e})"
    if unusable is not None:
        return f"--tls-crl {path}: {unusable}"
    return crl


def _unusable(crl: x509.CertificateRevocationList) -> str | None:
    """What of ``crl`` webpki cannot use, or ``None``. (May raise on a malformed one.)"""
    if crl.next_update_utc is None:
        return (
            "a CRL without a next update, which the ingress's TLS library refuses (RFC 5280 "
            "asks for one: openssl ca -gencrl sets it from default_crl_days)"
        )
    extensions = crl.extensions
    if len(extensions) == 0:
        return (
            "a CRL without extensions (version 1, or without the CRL number RFC 5280 asks "
            "for), which the ingress's TLS library refuses: make it with a CRL number "
            "(openssl ca -gencrl with a crlnumber file)"
        )
    for extension in extensions:
        value = extension.value
        if isinstance(value, x509.DeltaCRLIndicator):
            return "a delta CRL, which the ingress's TLS library does not read: give the full CRL"
        if isinstance(value, x509.IssuingDistributionPoint):
            if value.indirect_crl:
                return "an indirect CRL, which the ingress's TLS library does not read"
            if value.only_some_reasons:
                return (
                    "a CRL of only some revocation reasons, which the ingress's TLS library "
                    "does not read: give the CA's full CRL"
                )
            if value.only_contains_attribute_certs:
                return "a CRL of attribute certificates, which the ingress's TLS library refuses"
            if value.full_name is None:
                return (
                    "its issuing distribution point names no full distribution point name "
                    "(URI), which the ingress's TLS library refuses"
                )
        elif extension.critical and extension.oid not in _CRL_EXTENSIONS_READ:
            return (
                f"a critical extension the ingress's TLS library does not know "
                f"({extension.oid.dotted_string})"
            )
    for entry in crl:
        _ = entry.serial_number, entry.revocation_date_utc
        for extension in entry.extensions:
            if extension.oid == CRLEntryExtensionOID.CERTIFICATE_ISSUER:
                return "an entry names its certificate's issuer (an indirect CRL), unsupported"
            if extension.critical and extension.oid not in _ENTRY_EXTENSIONS_READ:
                return (
                    f"an entry has a critical extension the ingress's TLS library does not "
                    f"know ({extension.oid.dotted_string})"
                )
    return None


def _signed_by(ca: x509.Certificate, crl: x509.CertificateRevocationList) -> bool:
    key = ca.public_key()
    signing = (
        rsa.RSAPublicKey,
        ec.EllipticCurvePublicKey,
        dsa.DSAPublicKey,
        ed25519.Ed25519PublicKey,
        ed448.Ed448PublicKey,
    )
    try:
        return isinstance(key, signing) and crl.is_signature_valid(key)
    except Exception:  # a key or signature this library cannot check: not a match
        return False


def _bundle(client_ca: Path) -> list[x509.Certificate]:
    """The client CA bundle's certificates, as far as they parse here (``ssl``, which
    loaded them, accepts some that ``cryptography`` does not)."""
    try:
        return x509.load_pem_x509_certificates(client_ca.read_bytes())
    except Exception:
        return []


def _crls_problem(paths: list[Path], client_ca: Path) -> str | None:
    """Each CRL loads and is one webpki can use; no two are of the same issuer (webpki
    would use the first it finds, and ignore what the other revokes); one that names a CA
    of the bundle as its issuer is signed by it."""
    cas = _bundle(client_ca)
    issuers: dict[x509.Name, Path] = {}
    for path in paths:
        crl = _load_crl(path)
        if isinstance(crl, str):
            return crl
        issuer = crl.issuer
        if issuer in issuers:
            return (
                f"--tls-crl {issuers[issuer]} and {path} are both CRLs of "
                f"{issuer.rfc4514_string()}: only one would be used; give the newest only"
            )
        issuers[issuer] = path
        named = [ca for ca in cas if ca.subject == issuer]
        if named and not any(_signed_by(ca, crl) for ca in named):
            return (
                f"--tls-crl {path} names {issuer.rfc4514_string()} of --tls-client-ca "
                f"{client_ca} as its issuer but is not signed by its key"
            )
    return None


#: The CRLs that load, with their files (:func:`usable_crls`).
_Crls = list[tuple[Path, x509.CertificateRevocationList]]


def usable_crls(settings: Settings) -> _Crls:
    """``--tls-crl``'s CRLs that load and webpki can use (see :func:`tls_problem`)."""
    loaded = ((path, _load_crl(path)) for path in settings.tls_crl_files)
    return [(path, crl) for path, crl in loaded if not isinstance(crl, str)]


def cas_without_crl(settings: Settings, crls: _Crls | None = None) -> list[str]:
    """The CAs of ``--tls-client-ca`` (their subjects) for which no ``--tls-crl`` is given,
    when any is. A client whose chain needs one of them to vouch for a certificate's
    revocation status is refused (unknown status): a client certificate it issued itself,
    or an intermediate CA's when the bundle holds only the root. It is no error: a CA whose
    clients' chains end at another CA of the bundle needs none. ``crls``: those already
    loaded (:func:`usable_crls`), else they are read."""
    if not settings.tls_crl_files or settings.tls_client_ca is None:
        return []
    issuers = {crl.issuer for _, crl in (usable_crls(settings) if crls is None else crls)}
    return [
        ca.subject.rfc4514_string()
        for ca in _bundle(settings.tls_client_ca)
        if ca.subject not in issuers
    ]


def stale_crls(
    settings: Settings, now: dt.datetime | None = None, crls: _Crls | None = None
) -> list[tuple[Path, str]]:
    """The CRLs past their next update, with it (ISO 8601): still used as they are, while
    the CA has most likely revoked more since. Only of files that load; ``crls``: those
    already loaded (:func:`usable_crls`), else they are read."""
    now = now or dt.datetime.now(dt.UTC)
    stale: list[tuple[Path, str]] = []
    for path, crl in usable_crls(settings) if crls is None else crls:
        next_update = crl.next_update_utc
        if next_update is not None and next_update < now:
            stale.append((path, next_update.isoformat()))
    return stale


def warn_of_crls(settings: Settings) -> None:
    """Log what about the CRLs may refuse clients or let revoked ones in, though the ingress
    runs with it: CAs of the bundle without a CRL (``tls_crl_missing``), CRLs past their next
    update (``tls_crl_out_of_date``). Each CRL is read once for both."""
    crls = usable_crls(settings)
    if missing := cas_without_crl(settings, crls):
        log.warning(
            "tls_crl_missing",
            cas=missing,
            hint="a client whose chain needs one of these CAs to vouch for a certificate is "
            "refused (revocation status unknown); add their CRLs, unless their clients' "
            "chains end at another CA of --tls-client-ca",
        )
    for path, next_update in stale_crls(settings, crls=crls):
        log.warning(
            "tls_crl_out_of_date",
            path=str(path),
            next_update=next_update,
            hint="it is still used; install the CA's newer CRL and send broker serve SIGHUP",
        )


def tls_expiries(settings: Settings) -> list[tuple[str, Path, dt.datetime]]:
    """When each of the ingress's TLS files stops being valid, read now: ``cert`` (the
    earliest ``notAfter`` of ``--tls-cert``'s chain: it expires with its first
    certificate), ``client_ca`` (the bundle's earliest), ``crl`` (each one's next update).
    An ingress worker reads them as it starts, as granian's worker does: what it reports is
    what it serves with. A file that is not a regular file, or does not parse, is left
    out."""
    named: list[tuple[str, Path | None]] = [
        ("cert", settings.tls_cert),
        ("client_ca", settings.tls_client_ca),
        *(("crl", path) for path in settings.tls_crl_files),
    ]
    expiries = []
    for kind, path in named:
        if path is not None and (expires := file_expiry(kind, path)) is not None:
            expiries.append((kind, path, expires))
    return expiries
