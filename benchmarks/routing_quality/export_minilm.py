"""Pack all-MiniLM-L6-v2's weights, int8, for the broker's NumPy port of the model.

Reads a local sentence-transformers model directory (``model.safetensors``,
``tokenizer.json``, ``config.json``) with NumPy alone (no torch, no safetensors package:
the format is an 8-byte header length, a JSON header and the raw arrays) and writes
``broker/routing/data/minilm_l6.npz`` for :mod:`broker.routing.minilm`:

- ``vocab``: the WordPiece vocabulary, UTF-8, one token a line (ids are line numbers);
- ``word``: int8 token embeddings, ``vocab x 384``, with ``word_scale`` (float32, a row);
- ``position``: float32 position embeddings for the first ``max_seq_length`` positions;
  ``token_type``: the type-0 row; ``embed_ln``: the embeddings' LayerNorm (gain, bias);
- per layer ``i``: ``qkv{i}`` (query, key and value side by side), ``out{i}``, ``up{i}``
  and ``down{i}``: int8 matrices laid out ``in x out`` with a float32 scale per output
  column (``*_scale``) and a float32 bias (``*_bias``); ``ln1_{i}`` and ``ln2_{i}``:
  LayerNorm gain and bias;
- ``meta``: UTF-8 JSON (model, licence, shape, max sequence length, pooling).

Per-column int8 keeps each sentence embedding within a cosine of 0.998 of the model's own
(float32, sentence-transformers) on the texts tried. Usage::

    python benchmarks/routing_quality/export_minilm.py --model /tmp/minilm [--out FILE]

``--reference FILE`` also writes the model's own embeddings of :data:`REFERENCE_TEXTS`
(run by sentence-transformers, so in a venv that has it and torch, never the broker's), which
``tests/unit/test_routing_minilm.py`` holds the NumPy port to.
"""

from __future__ import annotations

import argparse
import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = ROOT / "broker/routing/data/minilm_l6.npz"
_DTYPES = {"F32": np.float32, "F16": np.float16, "I64": np.int64}

Array = npt.NDArray[Any]
DEFAULT_REFERENCE = ROOT / "tests/unit/data/minilm_reference.npz"
#: Texts the port is checked on: plain English, accents, CJK, a one-letter text, punctuation
#: and digits, one long enough to be cut at the model's 256 tokens.
REFERENCE_TEXTS = [
    "route this invoice dispute to billing please",
    "the server is down again, page the on-call engineer!",
    "Bonjour, je voudrais annuler ma réservation pour demain soir.",
    "日本語のテキストを英語に翻訳してください",
    "x",
    "Order #4521 (qty: 3) shipped on 2026-11-24 -- tracking ID ZX-99/B.",
    "a long meeting transcript that goes on and on " * 40,
]


def read_safetensors(path: Path) -> dict[str, Array]:
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + size])
    body = memoryview(data)[8 + size :]
    out = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        start, end = spec["data_offsets"]
        array = np.frombuffer(body[start:end], dtype=_DTYPES[spec["dtype"]])
        out[name] = array.reshape(spec["shape"]).astype(np.float32, copy=False)
    return out


def int8_columns(matrix: Array) -> tuple[Array, Array]:
    """``matrix`` (in x out) as int8 with one float32 scale per output column."""
    scale = np.abs(matrix).max(axis=0) / 127.0
    scale[scale == 0] = 1.0
    return np.round(matrix / scale).astype(np.int8), scale.astype(np.float32)


def export(model: Path, out: Path) -> dict[str, Any]:
    config = json.loads((model / "config.json").read_text())
    st_config = json.loads((model / "sentence_bert_config.json").read_text())
    max_len = int(st_config.get("max_seq_length", 256))
    weights = read_safetensors(model / "model.safetensors")
    vocab: dict[str, int] = json.loads((model / "tokenizer.json").read_text())["model"]["vocab"]
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    if [vocab[t] for t in tokens] != list(range(len(tokens))):
        raise SystemExit("the vocabulary's ids are not 0..n-1")

    def w(name: str) -> Array:
        return weights[name]

    arrays: dict[str, Array] = {"vocab": np.frombuffer("\n".join(tokens).encode(), np.uint8)}
    word = w("embeddings.word_embeddings.weight")
    word_scale = np.abs(word).max(axis=1) / 127.0
    word_scale[word_scale == 0] = 1.0
    arrays["word"] = np.round(word / word_scale[:, None]).astype(np.int8)
    arrays["word_scale"] = word_scale.astype(np.float32)
    arrays["position"] = w("embeddings.position_embeddings.weight")[:max_len]
    arrays["token_type"] = w("embeddings.token_type_embeddings.weight")[0]
    arrays["embed_ln"] = np.stack(
        [w("embeddings.LayerNorm.weight"), w("embeddings.LayerNorm.bias")]
    )
    for i in range(int(config["num_hidden_layers"])):
        p = f"encoder.layer.{i}."
        qkv = np.concatenate(
            [w(p + f"attention.self.{part}.weight") for part in ("query", "key", "value")]
        ).T
        qkv_bias = np.concatenate(
            [w(p + f"attention.self.{part}.bias") for part in ("query", "key", "value")]
        )
        parts = {
            "qkv": (qkv, qkv_bias),
            "out": (w(p + "attention.output.dense.weight").T, w(p + "attention.output.dense.bias")),
            "up": (w(p + "intermediate.dense.weight").T, w(p + "intermediate.dense.bias")),
            "down": (w(p + "output.dense.weight").T, w(p + "output.dense.bias")),
        }
        for key, (matrix, bias) in parts.items():
            arrays[f"{key}{i}"], arrays[f"{key}{i}_scale"] = int8_columns(matrix)
            arrays[f"{key}{i}_bias"] = bias.astype(np.float32)
        arrays[f"ln1_{i}"] = np.stack(
            [w(p + "attention.output.LayerNorm.weight"), w(p + "attention.output.LayerNorm.bias")]
        )
        arrays[f"ln2_{i}"] = np.stack(
            [w(p + "output.LayerNorm.weight"), w(p + "output.LayerNorm.bias")]
        )
    meta = {
        "model": "sentence-transformers/all-MiniLM-L6-v2",
        "licence": "Apache-2.0",
        "layers": int(config["num_hidden_layers"]),
        "hidden": int(config["hidden_size"]),
        "heads": int(config["num_attention_heads"]),
        "layer_norm_eps": float(config["layer_norm_eps"]),
        "max_seq_length": max_len,
        "pooling": "mean",
        "quantisation": "int8, one scale per output column (per row for token embeddings)",
    }
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **arrays)
    return {**meta, "bytes": out.stat().st_size, "out": str(out)}


def write_reference(model: Path, out: Path) -> None:
    """The model's own unit embeddings of :data:`REFERENCE_TEXTS` (needs
    sentence-transformers)."""
    from sentence_transformers import SentenceTransformer

    rows = SentenceTransformer(str(model), device="cpu").encode(
        REFERENCE_TEXTS, normalize_embeddings=True, convert_to_numpy=True
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    texts = np.frombuffer("\n".join(REFERENCE_TEXTS).encode(), np.uint8)
    np.savez_compressed(out, texts=texts, rows=np.asarray(rows, dtype=np.float32))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, required=True, help="a local model directory")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument(
        "--reference",
        type=Path,
        nargs="?",
        const=DEFAULT_REFERENCE,
        help=f"also write the model's own embeddings of the test texts (default path: "
        f"{DEFAULT_REFERENCE.relative_to(ROOT)}); needs sentence-transformers",
    )
    args = parser.parse_args()
    print(json.dumps(export(args.model, args.out), indent=2))
    if args.reference:
        write_reference(args.model, args.reference)
        print(f"wrote {args.reference}")


if __name__ == "__main__":
    main()
