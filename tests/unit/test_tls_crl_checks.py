"""``--tls-crl`` is checked before granian gets it: granian 2.8.9 panics every worker on a CRL
without extensions, reads only the first CRL of a file, and, given any CRL, refuses every
client certificate whose CA has none (measured; see ``broker.http.tls``). Each such file is
a usage error naming the file and what to do."""

from __future__ import annotations

import base64
import datetime as dt
import os
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import NameOID
from hypothesis import given
from hypothesis import settings as settings_hypothesis
from hypothesis import strategies as st

from broker.http.tls import cas_without_crl, stale_crls, tls_expiries, tls_problem
from broker.settings import Settings
from tests._certs import Pki, make_pki

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def settings(pki: Pki, crl: str | None, client_ca: Path | None = None) -> Settings:
    return Settings(
        tls_cert=pki.server.cert,
        tls_key=pki.server.key,
        tls_client_ca=client_ca or pki.ca.cert,
        tls_crl=crl,
    )


def test_a_crl_of_the_client_ca_is_accepted(pki: Pki, tmp_path: Path) -> None:
    crl = pki.ca.revocation_list(tmp_path / "crl.pem", (pki.client,))
    assert tls_problem(settings(pki, str(crl))) is None


def test_crls_of_every_ca_of_a_bundle_are_accepted_comma_separated(
    pki: Pki, tmp_path: Path
) -> None:
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(pki.ca.cert.read_bytes() + pki.unknown_ca.cert.read_bytes())
    first = pki.ca.revocation_list(tmp_path / "a.pem")
    second = pki.unknown_ca.revocation_list(tmp_path / "b.pem")
    assert tls_problem(settings(pki, f"{first}, {second}", bundle)) is None


def test_a_crl_needs_a_client_ca(pki: Pki, tmp_path: Path) -> None:
    crl = pki.ca.revocation_list(tmp_path / "crl.pem")
    alone = Settings(tls_cert=pki.server.cert, tls_key=pki.server.key, tls_crl=str(crl))
    assert tls_problem(alone) == (
        "--tls-crl needs --tls-client-ca: revocation lists are of client certificates"
    )


def test_a_missing_crl_file_is_named(pki: Pki, tmp_path: Path) -> None:
    assert tls_problem(settings(pki, str(tmp_path / "gone.pem"))) == (
        f"--tls-crl {tmp_path / 'gone.pem'} is not a readable file"
    )


def test_a_crl_without_extensions_is_refused(pki: Pki, tmp_path: Path) -> None:
    crl = pki.ca.revocation_list(tmp_path / "v1.pem", number=None)
    problem = tls_problem(settings(pki, str(crl)))
    assert problem is not None
    assert problem.startswith(f"--tls-crl {crl}: a CRL without extensions")
    assert "crlnumber" in problem


def der_elements(der: bytes, start: int, end: int) -> list[bytes]:
    """The DER elements (tag, length, value) between ``start`` and ``end``."""
    elements = []
    while start < end:
        length, header = der[start + 1], 2
        if length & 0x80:
            size = length & 0x7F
            length, header = int.from_bytes(der[start + 2 : start + 2 + size]), 2 + size
        elements.append(der[start : start + header + length])
        start += header + length
    return elements


def der_header(element: bytes) -> int:
    """The size of a DER element's tag and length."""
    return 2 if element[1] < 0x80 else 2 + (element[1] & 0x7F)


def der_sequence(content: bytes, tag: int = 0x30) -> bytes:
    size = len(content)
    if size < 0x80:
        return bytes([tag, size]) + content
    length = size.to_bytes((size.bit_length() + 7) // 8)
    return bytes([tag, 0x80 | len(length)]) + length + content


def test_a_crl_without_a_next_update_is_refused(pki: Pki, tmp_path: Path) -> None:
    """Optional in the ASN.1, required by RFC 5280 and by webpki: every granian worker
    panicked on one (a review). ``cryptography`` makes none, so this one is re-signed
    without its ``nextUpdate``."""
    made = pki.ca.revocation_list(tmp_path / "made.pem")
    der = x509.load_pem_x509_crl(made.read_bytes()).public_bytes(Encoding.DER)
    (tbs, algorithm, _) = der_elements(
        der, 4 if der[1] & 0x80 == 0 else 2 + (der[1] & 0x7F), len(der)
    )
    header = 2 + (tbs[1] & 0x7F if tbs[1] & 0x80 else 0)
    fields = der_elements(tbs, header, len(tbs))  # version, signature, issuer, this, next, …
    assert [field[0] for field in fields[:5]] == [0x02, 0x30, 0x30, 0x17, 0x17]
    unsigned = der_sequence(b"".join(fields[:4] + fields[5:]))
    signature = pki.ca.sign(unsigned)
    crl = tmp_path / "crl.pem"
    crl.write_bytes(
        pem_armour(
            "X509 CRL",
            der_sequence(unsigned + algorithm + der_sequence(b"\x00" + signature, tag=0x03)),
        )
    )
    assert x509.load_pem_x509_crl(crl.read_bytes()).next_update_utc is None
    problem = tls_problem(settings(pki, str(crl)))
    assert problem is not None
    assert problem.startswith(f"--tls-crl {crl}: a CRL without a next update"), problem


def test_a_file_of_two_crls_is_refused(pki: Pki, tmp_path: Path) -> None:
    both = tmp_path / "both.pem"
    first = pki.ca.revocation_list(tmp_path / "a.pem")
    both.write_bytes(
        first.read_bytes() + pki.unknown_ca.revocation_list(tmp_path / "b.pem").read_bytes()
    )
    problem = tls_problem(settings(pki, str(both)))
    assert problem is not None
    assert problem.startswith(f"--tls-crl {both} holds 2 CRLs and only the first would be read")


@pytest.mark.parametrize(
    "text",
    [
        "not a crl\n",
        "-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n",
    ],
)
def test_a_file_that_is_no_crl_is_refused(pki: Pki, tmp_path: Path, text: str) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text(text)
    problem = tls_problem(settings(pki, str(bad)))
    assert problem is not None
    assert problem.startswith(f"--tls-crl {bad} ")
    assert "PEM CRL" in problem


def test_a_crl_of_a_ca_outside_the_bundle_is_accepted_and_the_bundle_ca_named(
    pki: Pki, tmp_path: Path
) -> None:
    """An intermediate CA's CRL is of no CA in a bundle of roots, and is needed: accepted.
    The bundle's CA without a CRL is named in a warning, not refused (its clients' chains
    may end at another CA of the bundle)."""
    crl = pki.unknown_ca.revocation_list(tmp_path / "other.pem")
    assert tls_problem(settings(pki, str(crl))) is None
    assert cas_without_crl(settings(pki, str(crl))) == ["CN=trusted"]
    assert cas_without_crl(settings(pki, str(pki.ca.revocation_list(tmp_path / "own.pem")))) == []


def test_a_crl_naming_a_bundle_ca_but_signed_by_another_key_is_refused(
    pki: Pki, tmp_path: Path
) -> None:
    from tests._certs import CertificateAuthority

    impostor = CertificateAuthority(tmp_path / "impostor", "trusted")  # same name, new key
    crl = impostor.revocation_list(tmp_path / "forged.pem")
    problem = tls_problem(settings(pki, str(crl)))
    assert problem == (
        f"--tls-crl {crl} names CN=trusted of --tls-client-ca {pki.ca.cert} as its issuer but "
        "is not signed by its key"
    )


def test_two_crls_of_one_issuer_are_refused(pki: Pki, tmp_path: Path) -> None:
    """webpki uses the first CRL of an issuer it finds: what the other revokes would be let
    in (seen: the revoked client answered 200 with the older CRL first)."""
    old = pki.ca.revocation_list(tmp_path / "old.pem")
    new = pki.ca.revocation_list(tmp_path / "new.pem", (pki.client,), number=2)
    assert tls_problem(settings(pki, f"{old},{new}")) == (
        f"--tls-crl {old} and {new} are both CRLs of CN=trusted: only one would be used; "
        "give the newest only"
    )


def test_a_bundle_ca_without_a_crl_is_named_not_refused(pki: Pki, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(pki.ca.cert.read_bytes() + pki.unknown_ca.cert.read_bytes())
    crl = pki.ca.revocation_list(tmp_path / "a.pem")
    assert tls_problem(settings(pki, str(crl), bundle)) is None
    assert cas_without_crl(settings(pki, str(crl), bundle)) == ["CN=unknown"]


UNKNOWN = x509.UnrecognizedExtension(x509.ObjectIdentifier("1.2.3.4.5"), b"\x05\x00")
URI = [x509.UniformResourceIdentifier("http://crl.example.com/ca.crl")]
RELATIVE = x509.RelativeDistinguishedName([x509.NameAttribute(NameOID.COMMON_NAME, "crl1")])
RELATIVE_IDP = x509.IssuingDistributionPoint(None, RELATIVE, False, False, None, False, False)


@pytest.mark.parametrize(
    ("extensions", "entry_extensions", "reason"),
    [
        (((x509.DeltaCRLIndicator(1), True),), (), "a delta CRL"),
        (
            ((x509.IssuingDistributionPoint(None, None, False, False, None, True, False), True),),
            (),
            "an indirect CRL",
        ),
        (
            (
                (
                    x509.IssuingDistributionPoint(
                        None,
                        None,
                        False,
                        False,
                        frozenset({x509.ReasonFlags.key_compromise}),
                        False,
                        False,
                    ),
                    True,
                ),
            ),
            (),
            "a CRL of only some revocation reasons",
        ),
        (
            ((x509.IssuingDistributionPoint(None, None, True, False, None, False, False), True),),
            (),
            "its issuing distribution point names no full distribution point name",
        ),
        (
            (
                (
                    x509.IssuingDistributionPoint(None, RELATIVE, False, False, None, False, False),
                    True,
                ),
            ),
            (),
            "its issuing distribution point names no full distribution point name",
        ),
        (
            ((x509.IssuingDistributionPoint(URI, None, False, False, None, False, True), True),),
            (),
            "a CRL of attribute certificates",
        ),
        (((UNKNOWN, True),), (), "a critical extension the ingress's TLS library does not know"),
        ((), ((UNKNOWN, True),), "an entry has a critical extension"),
        (
            (),
            ((x509.CertificateIssuer([x509.DNSName("ca.example.com")]), True),),
            "an entry names its certificate's issuer",
        ),
    ],
)
def test_a_crl_webpki_cannot_read_is_refused(
    pki: Pki,
    tmp_path: Path,
    extensions: tuple[tuple[x509.ExtensionType, bool], ...],
    entry_extensions: tuple[tuple[x509.ExtensionType, bool], ...],
    reason: str,
) -> None:
    """Each of these passed the first check and panicked every granian worker (a review,
    with granian 2.8.9): at a reload, the ingress then refused every connection."""
    crl = pki.ca.revocation_list(
        tmp_path / "crl.pem",
        (pki.client,),
        extensions=extensions,
        entry_extensions=entry_extensions,
    )
    problem = tls_problem(settings(pki, str(crl)))
    assert problem is not None
    assert problem.startswith(f"--tls-crl {crl}: {reason}"), problem


def test_a_harmless_issuing_distribution_point_and_unknown_extension_are_accepted(
    pki: Pki, tmp_path: Path
) -> None:
    """Each of these was served by granian 2.8.9, the revoked client refused."""
    user_certs = x509.IssuingDistributionPoint(URI, None, True, False, None, False, False)
    crl = pki.ca.revocation_list(
        tmp_path / "crl.pem",
        (pki.client,),
        extensions=((user_certs, True), (UNKNOWN, False)),
        entry_extensions=(
            (x509.CRLReason(x509.ReasonFlags.key_compromise), False),
            (x509.InvalidityDate(dt.datetime(2026, 1, 1)), False),
        ),
    )
    assert tls_problem(settings(pki, str(crl))) is None


def test_a_crl_with_a_duplicated_extension_is_refused_not_raised(pki: Pki, tmp_path: Path) -> None:
    """``cryptography`` raises ``DuplicateExtension`` reading it: that was a traceback at
    start and ended ``broker serve`` at a reload."""
    crl = pki.ca.revocation_list(
        tmp_path / "crl.pem", number=1, extensions=((x509.DeltaCRLIndicator(1), False),)
    )
    der = x509.load_pem_x509_crl(crl.read_bytes()).public_bytes(Encoding.DER)
    delta, number = bytes.fromhex("0603551d1b"), bytes.fromhex("0603551d14")  # their OIDs
    assert der.count(delta) == 1
    crl.write_bytes(pem_armour("X509 CRL", der.replace(delta, number)))
    problem = tls_problem(settings(pki, str(crl)))
    assert problem is not None
    assert problem.startswith(f"--tls-crl {crl} does not load as a PEM CRL (DuplicateExtension")


def pem_armour(label: str, der: bytes) -> bytes:
    body = base64.encodebytes(der)
    return f"-----BEGIN {label}-----\n".encode() + body + f"-----END {label}-----\n".encode()


def test_a_bundle_cryptography_cannot_parse_does_not_raise(pki: Pki, tmp_path: Path) -> None:
    """``ssl`` loads a CA whose PrintableString holds ``_``; ``cryptography`` refuses it. The
    CRLs are then not matched to the bundle's CAs: no error, no warning."""
    key = ec.generate_private_key(ec.SECP256R1())
    printable = x509.NameAttribute(NameOID.COMMON_NAME, "odd-ca", _type=_ASN1Type.PrintableString)
    name = x509.Name([printable])
    now = dt.datetime.now(dt.UTC)
    ca = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(7)
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    der = ca.public_bytes(Encoding.DER).replace(b"odd-ca", b"odd_ca")
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(pki.ca.cert.read_bytes() + pem_armour("CERTIFICATE", der))
    with pytest.raises(ValueError, match="PrintableString"):  # what this is about
        x509.load_pem_x509_certificates(bundle.read_bytes())
    crl = pki.ca.revocation_list(tmp_path / "crl.pem")
    assert tls_problem(settings(pki, str(crl), bundle)) is None
    assert cas_without_crl(settings(pki, str(crl), bundle)) == []


def test_a_crl_past_its_next_update_is_reported_as_stale(pki: Pki, tmp_path: Path) -> None:
    fresh = pki.ca.revocation_list(tmp_path / "fresh.pem")
    old = pki.ca.revocation_list(tmp_path / "old.pem", next_update=-dt.timedelta(hours=1))
    assert tls_problem(settings(pki, str(old))) is None  # still used, as granian does
    stale = stale_crls(settings(pki, f"{fresh},{old}"))
    assert [path for path, _ in stale] == [old]
    assert dt.datetime.fromisoformat(stale[0][1]) < dt.datetime.now(dt.UTC)


@given(
    body=st.binary(max_size=600),
    wrapped=st.booleans(),
)
@settings_hypothesis(max_examples=150, deadline=None)
def test_whatever_a_crl_file_holds_the_answer_is_a_message(
    pki: Pki, tmp_path_factory: pytest.TempPathFactory, body: bytes, wrapped: bool
) -> None:
    """Any bytes, bare or in a CRL's PEM armour: a usage message naming the file, never an
    exception (a traceback instead of exit 2) and never accepted."""
    crl = tmp_path_factory.mktemp("fuzz") / "crl.pem"
    if wrapped:
        body = (
            b"-----BEGIN X509 CRL-----\n" + base64.encodebytes(body) + b"-----END X509 CRL-----\n"
        )
    crl.write_bytes(body)
    problem = tls_problem(settings(pki, str(crl)))
    assert problem is not None
    assert problem.startswith(f"--tls-crl {crl} ")


@given(
    flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(1, 255)), min_size=1, max_size=4)
)
@settings_hypothesis(max_examples=200, deadline=None)
def test_a_damaged_crl_is_refused_or_accepted_never_raised(
    pki: Pki, tmp_path_factory: pytest.TempPathFactory, flips: list[tuple[int, int]]
) -> None:
    """A real CRL (extensions, entries with their own) with a few bytes changed reaches the
    parsing of its extensions and entries, where ``cryptography`` raises: the check answers
    with a message or accepts, it never raises (at a reload that ended the broker)."""
    directory = tmp_path_factory.mktemp("damaged")
    crl = pki.ca.revocation_list(
        directory / "crl.pem",
        (pki.client, pki.server),
        extensions=(
            (x509.AuthorityKeyIdentifier.from_issuer_public_key(pki.ca.public_key), False),
        ),
        entry_extensions=((x509.CRLReason(x509.ReasonFlags.key_compromise), False),),
    )
    der = bytearray(x509.load_pem_x509_crl(crl.read_bytes()).public_bytes(Encoding.DER))
    for position, change in flips:
        der[position % len(der)] ^= change
    crl.write_bytes(pem_armour("X509 CRL", bytes(der)))
    problem = tls_problem(settings(pki, str(crl)))
    assert problem is None or problem.startswith(f"--tls-crl {crl}"), problem


# --- broker_tls_expiry_timestamp_seconds ---------------------------------------------------


def not_after(path: Path) -> dt.datetime:
    return x509.load_pem_x509_certificate(path.read_bytes()).not_valid_after_utc


def test_each_tls_file_reports_when_it_stops_being_valid(pki: Pki, tmp_path: Path) -> None:
    server = pki.ca.issue_server("short", lifetime=dt.timedelta(hours=3))
    chain = tmp_path / "chain.pem"  # the server's certificate, then its CA's: the first ends
    chain.write_bytes(server.cert.read_bytes() + pki.ca.cert.read_bytes())
    crl = pki.ca.revocation_list(tmp_path / "crl.pem", next_update=dt.timedelta(hours=5))
    expiries = tls_expiries(
        Settings(tls_cert=chain, tls_key=server.key, tls_client_ca=pki.ca.cert, tls_crl=str(crl))
    )
    assert [(kind, path) for kind, path, _ in expiries] == [
        ("cert", chain),
        ("client_ca", pki.ca.cert),
        ("crl", crl),
    ]
    when = {kind: expires for kind, _, expires in expiries}
    assert when["cert"] == not_after(server.cert)
    assert when["client_ca"] == not_after(pki.ca.cert)
    assert when["crl"] == x509.load_pem_x509_crl(crl.read_bytes()).next_update_utc


def test_a_fifo_is_left_out_not_read(pki: Pki, tmp_path: Path) -> None:
    """Reading a FIFO blocks until someone writes: a worker would never start."""
    fifo = tmp_path / "crl.pem"
    os.mkfifo(fifo)
    settings = Settings(
        tls_cert=pki.server.cert,
        tls_key=pki.server.key,
        tls_client_ca=pki.ca.cert,
        tls_crl=str(fifo),
    )
    assert [kind for kind, _, _ in tls_expiries(settings)] == ["cert", "client_ca"]


def test_a_renewed_file_is_read_again_and_a_broken_one_left_out(pki: Pki, tmp_path: Path) -> None:
    cert = tmp_path / "cert.pem"
    cert.write_bytes(pki.ca.issue_server("a", lifetime=dt.timedelta(hours=2)).cert.read_bytes())
    settings = Settings(tls_cert=cert, tls_key=pki.server.key)
    (first,) = tls_expiries(settings)
    renewed = pki.ca.issue_server("b", lifetime=dt.timedelta(days=30)).cert.read_bytes()
    cert.write_bytes(renewed)
    (second,) = tls_expiries(settings)
    assert second[2] - first[2] > dt.timedelta(days=29)
    cert.write_text("not a certificate, not even the same size")
    assert tls_expiries(settings) == []
