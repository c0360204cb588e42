"""Distil all-MiniLM-L6-v2 into the static token table the built-in embedder ships with.

The model2vec recipe, without model2vec: every WordPiece token of the model's uncased
vocabulary is run through the model alone (``[CLS] token [SEP]``, batched), its output
mean-pooled as sentence-transformers pools a sentence; the 384-d rows are reduced by PCA
(NumPy SVD) to ``--dim`` components; each row is weighted by a Zipf/SIF factor
``sif / (sif + p(rank))`` with ``p`` the Zipf probability of the token's rank in the vocabulary
(no frequency data needed: the vocabulary is roughly in frequency order); and the rows are
stored as int8 with one float32 scale per row (the weight folded in) in one ``.npz``:

- ``vocab``: the kept tokens, UTF-8, one a line (ids are line numbers);
- ``vectors``: int8, ``len(vocab) x dim``;
- ``scales``: float32, one per row (row = ``vectors[i] * scales[i]``);
- ``meta``: UTF-8 JSON (the model, the settings, the time it took).

``[PAD]``, ``[CLS]``, ``[SEP]``, ``[MASK]``, ``[UNK]`` and the ``[unusedN]`` slots are left
out: the broker's tokenizer never produces them (an unknown word adds nothing).

Needs torch and sentence-transformers (a separate venv, never the broker's)::

    python3 -m venv /tmp/stvenv && /tmp/stvenv/bin/pip install torch sentence-transformers
    /tmp/stvenv/bin/python benchmarks/routing_quality/distill.py --model /tmp/minilm/model

Another sentence-transformers model with the same WordPiece vocabulary works too
(``--model DIR --model-name NAME``; all-mpnet-base-v2 was tried, see BENCHMARKS.md).

``--cache FILE.npy`` keeps the model's token outputs, so other ``--dim``/``--sif`` settings
are written again in seconds (the model is not run when the file exists).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = ROOT / "broker/routing/data/minilm_static.npz"

Matrix = npt.NDArray[np.float32]


def kept_vocabulary(model: Path) -> list[tuple[int, str]]:
    """``(model id, token)`` in id order, without special tokens and ``[unusedN]`` slots."""
    spec = json.loads((model / "tokenizer.json").read_text(encoding="utf-8"))
    vocab: dict[str, int] = spec["model"]["vocab"]
    return sorted((i, token) for token, i in vocab.items() if not _special(token))


def _special(token: str) -> bool:
    """BERT's ``[CLS]``/``[unused0]``-style slots, and MPNet's/RoBERTa's ``<s>``/``<pad>``."""
    return len(token) > 2 and (
        (token[0] == "[" and token[-1] == "]") or (token[0] == "<" and token[-1] == ">")
    )


def token_outputs(model: Path, ids: list[int], *, batch: int, threads: int) -> Matrix:
    """The model's mean-pooled output for each token id alone (between the model's own start
    and end tokens), ``len(ids) x`` its hidden size."""
    torch: Any = importlib.import_module("torch")
    sentence_transformers: Any = importlib.import_module("sentence_transformers")

    torch.set_num_threads(threads)
    st = sentence_transformers.SentenceTransformer(str(model), device="cpu", local_files_only=True)
    bert: Any = st[0].auto_model
    tokenizer: Any = st.tokenizer
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    out = np.zeros((len(ids), bert.config.hidden_size), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(ids), batch):
            chunk = ids[start : start + batch]
            input_ids = torch.tensor([[cls, i, sep] for i in chunk])
            hidden = bert(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
            out[start : start + len(chunk)] = hidden.last_hidden_state.mean(dim=1).numpy()
    return out


def pca(rows: Matrix, dim: int) -> Matrix:
    """The first ``dim`` principal components of the centred rows."""
    centred = rows - rows.mean(axis=0)
    _, _, vt = np.linalg.svd(centred.astype(np.float64), full_matrices=False)
    reduced: Matrix = (centred @ vt[:dim].T).astype(np.float32)
    return reduced


def zipf_weights(ids: list[int], sif: float) -> npt.NDArray[np.float64]:
    """``sif / (sif + p)``, ``p`` the Zipf probability of the token's rank (its model id);
    all 1 when ``sif`` is 0."""
    if sif <= 0.0:
        return np.ones(len(ids))
    ranks = np.asarray(ids, dtype=np.float64) + 1.0
    harmonic = float(np.sum(1.0 / np.arange(1, ranks.max() + 1)))
    p = 1.0 / (ranks * harmonic)
    weights: npt.NDArray[np.float64] = sif / (sif + p)
    return weights


def quantize(rows: Matrix) -> tuple[npt.NDArray[np.int8], Matrix]:
    """Symmetric int8 per row: ``rows[i] ~ q[i] * scale[i]``."""
    peak = np.abs(rows).max(axis=1)
    scale = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(rows / scale[:, None]), -127, 127).astype(np.int8)
    return q, scale


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model",
        type=Path,
        required=True,
        help="a sentence-transformers model directory with a WordPiece (BERT uncased) vocabulary",
    )
    parser.add_argument(
        "--model-name",
        default="sentence-transformers/all-MiniLM-L6-v2",
        help="the model's name, recorded in the table",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--dim", type=int, default=128, help="PCA components kept")
    parser.add_argument("--sif", type=float, default=1e-4, help="Zipf/SIF coefficient, 0: off")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--cache", type=Path, help="keep/reuse the token outputs here")
    args = parser.parse_args()

    started = time.perf_counter()
    kept = kept_vocabulary(args.model)
    ids = [i for i, _ in kept]
    if args.cache is not None and args.cache.exists():
        outputs = np.load(args.cache)
        print(f"token outputs from {args.cache}", file=sys.stderr)
    else:
        outputs = token_outputs(args.model, ids, batch=args.batch, threads=args.threads)
        if args.cache is not None:
            np.save(args.cache, outputs)
    model_s = time.perf_counter() - started
    if outputs.shape[0] != len(ids):
        raise SystemExit(f"{args.cache} has {outputs.shape[0]} rows, the vocabulary {len(ids)}")

    rows = pca(outputs, args.dim) * zipf_weights(ids, args.sif)[:, None].astype(np.float32)
    vectors, scales = quantize(rows)
    meta = {
        "model": args.model_name,
        "license": "Apache-2.0",
        "pooling": "mean of start token, token, end token",
        "dim": args.dim,
        "sif": args.sif,
        "tokens": len(kept),
        "quantization": "int8, one float32 scale per row",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("wb") as f:
        np.savez_compressed(
            f,
            vocab=np.frombuffer("\n".join(t for _, t in kept).encode(), dtype=np.uint8),
            vectors=vectors,
            scales=scales,
            meta=np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8),
        )
    total_s = time.perf_counter() - started
    size = args.out.stat().st_size
    print(
        f"{len(kept)} tokens x {args.dim} dims -> {args.out} ({size:,} bytes, "
        f"{size / 2**20:.2f} MiB); model {model_s:.1f} s, total {total_s:.1f} s"
    )


if __name__ == "__main__":
    main()
