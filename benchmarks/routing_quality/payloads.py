"""Small, real binary payloads for the evaluation: PNG, baseline JPEG, PCM WAV and PDF.

Each generator is deterministic for its arguments (``seed`` picks the picture or the sound),
needs nothing but the standard library and NumPy, and writes a file that ordinary decoders
open: PNG with CRC'd chunks and a zlib stream, JFIF baseline JPEG (8x8 DCT, Huffman coded),
RIFF/WAVE 16-bit mono PCM, and PDF 1.4 with a correct cross-reference table.

``build(spec)`` turns a ``payload:`` mapping of requests.yaml (``{kind: png, ...}``) into bytes.
"""

from __future__ import annotations

import io
import math
import random
import struct
import wave
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
PDF_MAGIC = b"%PDF-"
WAV_MAGIC = b"RIFF"

# --------------------------------------------------------------------------- pictures


def _picture(width: int, height: int, seed: int) -> npt.NDArray[np.uint8]:
    """An RGB picture (height x width x 3): a soft gradient, a few blocks and a disc."""
    rng = random.Random(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    base = np.array([rng.uniform(40, 200) for _ in range(3)])
    slope = np.array([rng.uniform(-1.5, 1.5) for _ in range(3)])
    img = base + slope * (x[..., None] + y[..., None]) * 64 / max(width, height)
    for _ in range(rng.randint(1, 4)):
        x0, y0 = rng.randrange(width), rng.randrange(height)
        w, h = rng.randint(4, max(5, width // 2)), rng.randint(4, max(5, height // 2))
        img[y0 : y0 + h, x0 : x0 + w] = [rng.uniform(0, 255) for _ in range(3)]
    cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(3, min(width, height))
    disc = (x - cx) ** 2 + (y - cy) ** 2 < r * r
    img[disc] = [rng.uniform(0, 255) for _ in range(3)]
    out: npt.NDArray[np.uint8] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(width: int = 64, height: int = 48, seed: int = 0) -> bytes:
    """An 8-bit RGB PNG (no interlace, filter 0 on every row)."""
    pixels = _picture(width, height, seed)
    raw = b"".join(b"\x00" + pixels[row].tobytes() for row in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        PNG_MAGIC
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(raw, 9))
        + _chunk(b"IEND", b"")
    )


# The example luminance quantisation table of ITU-T T.81 Annex K (quality 50), row order.
_QUANT = np.array(
    [
        [16, 11, 10, 16, 24, 40, 51, 61],
        [12, 12, 14, 19, 26, 58, 60, 55],
        [14, 13, 16, 24, 40, 57, 69, 56],
        [14, 17, 22, 29, 51, 87, 80, 62],
        [18, 22, 37, 56, 68, 109, 103, 77],
        [24, 35, 55, 64, 81, 104, 113, 92],
        [49, 64, 78, 87, 103, 121, 120, 101],
        [72, 92, 95, 98, 112, 100, 103, 99],
    ],
    dtype=np.float64,
)
#: Zig-zag scan order as (row, column): odd diagonals run down, even ones up.
_ZIGZAG = sorted(
    ((r, c) for r in range(8) for c in range(8)),
    key=lambda rc: (rc[0] + rc[1], rc[0] if (rc[0] + rc[1]) % 2 else -rc[0]),
)
_DCT = np.array(
    [
        [
            (math.sqrt(1 / 8) if u == 0 else math.sqrt(2 / 8))
            * math.cos((2 * x + 1) * u * math.pi / 16)
            for x in range(8)
        ]
        for u in range(8)
    ]
)
# Our own canonical Huffman tables, valid per T.81 (no all-ones code): every DC category
# 0..11 gets a 4-bit code; every AC symbol (EOB, ZRL, run/size 0..15 x 1..10) an 8-bit one.
_DC_SYMBOLS = list(range(12))
_AC_SYMBOLS = [0x00, 0xF0] + [(run << 4) | size for run in range(16) for size in range(1, 11)]
_DC_CODES = {s: (i, 4) for i, s in enumerate(_DC_SYMBOLS)}
_AC_CODES = {s: (i, 8) for i, s in enumerate(_AC_SYMBOLS)}


class _Bits:
    """MSB-first bit writer with JPEG byte stuffing (0xFF is followed by 0x00)."""

    def __init__(self) -> None:
        self.out = bytearray()
        self._acc = 0
        self._n = 0

    def put(self, value: int, length: int) -> None:
        for shift in range(length - 1, -1, -1):
            self._acc = (self._acc << 1) | ((value >> shift) & 1)
            self._n += 1
            if self._n == 8:
                self.out.append(self._acc)
                if self._acc == 0xFF:
                    self.out.append(0)
                self._acc = self._n = 0

    def flush(self) -> bytes:
        if self._n:
            self.put((1 << (8 - self._n)) - 1, 8 - self._n)  # pad with 1-bits
        return bytes(self.out)


def _magnitude(value: int) -> tuple[int, int]:
    """(size category, the value's additional bits) as T.81 F.1.2.1 codes them."""
    size = abs(value).bit_length()
    return size, value if value >= 0 else value + (1 << size) - 1


def _encode_block(bits: _Bits, block: npt.NDArray[np.float64], previous_dc: int) -> int:
    coeffs = np.rint(_DCT @ (block - 128.0) @ _DCT.T / _QUANT).astype(int)
    scan = [int(coeffs[r, c]) for r, c in _ZIGZAG]
    size, extra = _magnitude(scan[0] - previous_dc)
    bits.put(*_DC_CODES[size])
    bits.put(extra, size)
    run = 0
    for value in scan[1:]:
        if value == 0:
            run += 1
            continue
        while run > 15:
            bits.put(*_AC_CODES[0xF0])
            run -= 16
        size, extra = _magnitude(value)
        bits.put(*_AC_CODES[(run << 4) | size])
        bits.put(extra, size)
        run = 0
    if run:
        bits.put(*_AC_CODES[0x00])
    return scan[0]


def _segment(marker: int, data: bytes) -> bytes:
    return struct.pack(">BBH", 0xFF, marker, len(data) + 2) + data


def _dht(table_class: int, table_id: int, lengths: Mapping[int, int], symbols: list[int]) -> bytes:
    counts = bytes(lengths.get(length, 0) for length in range(1, 17))
    return bytes([(table_class << 4) | table_id]) + counts + bytes(symbols)


def jpeg(width: int = 64, height: int = 48, seed: int = 0) -> bytes:
    """A JFIF baseline JPEG, YCbCr without subsampling; sides are multiples of 8."""
    if width % 8 or height % 8:
        raise ValueError("jpeg sides must be multiples of 8")
    rgb = _picture(width, height, seed).astype(np.float64)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    planes = [
        0.299 * r + 0.587 * g + 0.114 * b,
        128 - 0.168736 * r - 0.331264 * g + 0.5 * b,
        128 + 0.5 * r - 0.418688 * g - 0.081312 * b,
    ]
    bits = _Bits()
    dc = [0, 0, 0]
    for by in range(0, height, 8):
        for bx in range(0, width, 8):
            for i, plane in enumerate(planes):
                dc[i] = _encode_block(bits, plane[by : by + 8, bx : bx + 8], dc[i])
    quant = bytes(int(_QUANT[r_, c_]) for r_, c_ in _ZIGZAG)
    components = b"".join(bytes([cid, 0x11, 0]) for cid in (1, 2, 3))
    scan_components = b"".join(bytes([cid, 0x00]) for cid in (1, 2, 3))
    return (
        b"\xff\xd8"
        + _segment(0xE0, b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00")
        + _segment(0xDB, b"\x00" + quant)
        + _segment(0xC0, struct.pack(">BHHB", 8, height, width, 3) + components)
        + _segment(0xC4, _dht(0, 0, {4: len(_DC_SYMBOLS)}, _DC_SYMBOLS))
        + _segment(0xC4, _dht(1, 0, {8: len(_AC_SYMBOLS)}, _AC_SYMBOLS))
        + _segment(0xDA, b"\x03" + scan_components + b"\x00\x3f\x00")
        + bits.flush()
        + b"\xff\xd9"
    )


# --------------------------------------------------------------------------- sound


def wav(seconds: float = 1.0, seed: int = 0, rate: int = 16_000) -> bytes:
    """16-bit mono PCM: voiced-sounding bursts (a pitch with harmonics) between pauses."""
    rng = random.Random(seed)
    n = round(seconds * rate)
    t = np.arange(n) / rate
    signal = np.zeros(n)
    start = 0.05
    while start < seconds - 0.1:
        length = rng.uniform(0.08, 0.3)
        pitch = rng.uniform(90, 240)
        mask = (t >= start) & (t < start + length)
        envelope = np.sin(np.pi * (t[mask] - start) / length)
        tone = sum(np.sin(2 * np.pi * pitch * k * t[mask]) / k for k in (1, 2, 3))
        signal[mask] += envelope * tone
        start += length + rng.uniform(0.03, 0.15)
    noise = np.random.default_rng(seed).normal(0, 0.01, n)
    samples = np.clip((signal / 2 + noise) * 12_000, -32768, 32767).astype("<i2")
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(samples.tobytes())
    return out.getvalue()


# --------------------------------------------------------------------------- documents


def _pdf_string(text: str) -> bytes:
    raw = text.encode("cp1252")
    return b"(" + raw.replace(b"\\", b"\\\\").replace(b"(", b"\\(").replace(b")", b"\\)") + b")"


def pdf(lines: Sequence[str], title: str | None = None) -> bytes:
    """A one-page A4 PDF 1.4 showing ``lines`` in Helvetica (WinAnsi text only)."""
    text = [b"BT", b"/F1 11 Tf", b"14 TL", b"56 780 Td"]
    for line in lines:
        text.append(_pdf_string(line) + b" Tj T*")
    text.append(b"ET")
    content = b"\n".join(text)
    info = b"<< /Producer (routing-quality payloads)"
    if title:
        info += b" /Title " + _pdf_string(title)
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842]"
        b" /Resources << /Font << /F1 5 0 R >> >> /Contents 4 0 R >>",
        b"<< /Length %d >>\nstream\n" % len(content) + content + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>",
        info + b" >>",
    ]
    out = bytearray(PDF_MAGIC + b"1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n" % (len(objects) + 1) + b"0000000000 65535 f \n"
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R /Info %d 0 R >>\n" % (
        len(objects) + 1,
        len(objects),
    )
    out += b"startxref\n%d\n%%%%EOF\n" % xref
    return bytes(out)


# --------------------------------------------------------------------------- dispatch

GENERATORS: dict[str, Callable[..., bytes]] = {"png": png, "jpeg": jpeg, "wav": wav, "pdf": pdf}
#: What each generated kind is sent as, and the bytes it starts with.
CONTENT_TYPES = {
    "png": "image/png",
    "jpeg": "image/jpeg",
    "wav": "audio/wav",
    "pdf": "application/pdf",
}
MAGIC = {"png": PNG_MAGIC, "jpeg": JPEG_MAGIC, "wav": WAV_MAGIC, "pdf": PDF_MAGIC}


def build(spec: Mapping[str, Any]) -> bytes:
    """The bytes a ``payload:`` mapping describes, e.g. ``{kind: jpeg, width: 48, seed: 2}``."""
    params = dict(spec)
    kind = params.pop("kind", None)
    generator = GENERATORS.get(str(kind))
    if generator is None:
        raise ValueError(f"payload kind {kind!r} is not one of {sorted(GENERATORS)}")
    return generator(**params)
