"""When the TLS files the broker uses stop being valid, for
``broker_tls_expiry_timestamp_seconds`` (:func:`broker.telemetry.metrics.tls_expiry_exposition`).

Two sets of files, read at different moments because they are used differently:

- the ingress's (``--tls-cert``, ``--tls-client-ca``, ``--tls-crl``): granian's worker reads
  them as it starts and serves with them until a reload, so an ingress worker reads their
  dates as it starts too (:func:`broker.http.tls.tls_expiries`);
- the NATS client's (``BROKER_NATS_TLS_CERT``, ``BROKER_NATS_TLS_CA``): every new connection
  to NATS (a reconnect included) is made with the files as they are then
  (:class:`broker.natsconn.RenewingContext`), so what matters is the file on disk now: read
  at each scrape (:class:`NatsTlsExpiry`), parsed again only once a file changed.
"""

from __future__ import annotations

import datetime as dt
import stat
import threading
from pathlib import Path

from broker.natsconn import TlsFiles
from broker.settings import Settings

#: A sample of the metric: (file kind, path, Unix time).
Expiry = tuple[str, str, float]


def file_expiry(kind: str, path: Path) -> dt.datetime | None:
    """When the PEM file ``path`` stops being valid: a CRL's next update (``kind`` ``crl``),
    else the earliest ``notAfter`` of the certificates in it (a chain expires with its first
    certificate, a CA bundle is due for attention with its first CA). ``None`` for a file
    that is not a regular file (a FIFO would block the read for good), cannot be read or
    does not parse: left out of ``/metrics``, never failing the process."""
    from cryptography import x509

    try:
        if not stat.S_ISREG(path.stat().st_mode):
            return None
        data = path.read_bytes()
        if kind == "crl":
            return x509.load_pem_x509_crl(data).next_update_utc
        certificates = x509.load_pem_x509_certificates(data)
        return min(c.not_valid_after_utc for c in certificates) if certificates else None
    except Exception:  # cryptography raises several kinds on bad input, lazily too
        return None


class NatsTlsExpiry:
    """The NATS client's certificate (``nats_cert``) and CA bundle (``nats_ca``) as they
    are on disk at a scrape: what the next connection to NATS presents and trusts. A file
    is parsed again only when it changed (inode, size, modification or change time, as
    :class:`~broker.natsconn.TlsFiles` tells a renewal); safe to call from several threads
    (the standalone metrics server answers each scrape on its own)."""

    def __init__(self, settings: Settings) -> None:
        self._files = TlsFiles(settings.nats_tls_ca, settings.nats_tls_cert, None)
        self._named = [
            (kind, path)
            for kind, path in (("nats_cert", self._files.cert), ("nats_ca", self._files.ca))
            if path is not None
        ]
        self._lock = threading.Lock()
        self._stamp: object = None
        self._samples: list[Expiry] = []

    def samples(self) -> list[Expiry]:
        if not self._named:  # no TLS to NATS: nothing to read, not even a stat
            return []
        with self._lock:
            stamp = self._files.stamp()
            if stamp != self._stamp:
                self._stamp, self._samples = (
                    stamp,
                    [
                        (kind, str(path), expires.timestamp())
                        for kind, path in self._named
                        if (expires := file_expiry(kind, path)) is not None
                    ],
                )
            return self._samples
