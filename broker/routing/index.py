"""Vector indexes over L2-normalised rows: exact brute force, and LSH for many rows.

Both answer ``search(query, k, mask)`` with row ids and cosine scores, best first; ``mask``
(a boolean array over the rows) restricts the answer to allowed rows.

* :class:`BruteForceIndex` scores every row: one BLAS float32 matrix-vector product, or,
  with ``quantized=True``, an int8 matrix with a per-row scale (a quarter of the memory,
  scored with int32 accumulation; NumPy has no int8 BLAS, so it is not faster).
* :class:`LSHIndex` hashes rows with random hyperplanes into ``tables`` tables of ``bits``
  bits each, looks the query's bucket up in every table (plus ``probes`` neighbouring
  buckets per table, flipping the query's least certain bits), and re-ranks the candidates
  exactly. Buckets are a dense directory (an offsets array per table), so a lookup is two
  array reads, not a search.

:func:`make_index` picks brute force up to ``lsh_above`` rows and LSH beyond.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

Matrix = npt.NDArray[np.float32]
Ids = npt.NDArray[np.intp]
Scores = npt.NDArray[np.float32]
Mask = npt.NDArray[np.bool_]

DEFAULT_LSH_ABOVE = 5000


class VectorIndex(Protocol):
    dim: int

    def __len__(self) -> int: ...

    def search(self, query: Matrix, k: int, mask: Mask | None = None) -> tuple[Ids, Scores]:
        """The ``k`` best rows (ids, cosine scores), best first, among ``mask``'s rows."""
        ...


def top_k(scores: npt.NDArray[np.floating[Any]], k: int) -> Ids:
    """Positions of the ``k`` largest ``scores``, largest first.

    Selects the ``k`` smallest of the negated scores: NumPy's introselect is several times
    slower selecting the ``n - k``-th element when many values are equal.
    """
    n = scores.shape[0]
    if k <= 0 or n == 0:
        return np.empty(0, dtype=np.intp)
    negated = -scores
    part = np.argpartition(negated, k - 1)[:k] if k < n else np.arange(n, dtype=np.intp)
    ordered: Ids = part[np.argsort(negated[part], kind="stable")]
    return ordered


def _as_matrix(vectors: npt.ArrayLike) -> Matrix:
    matrix = np.ascontiguousarray(vectors, dtype=np.float32)
    if matrix.ndim != 2:
        raise ValueError(f"an index takes a 2-d matrix of rows, not shape {matrix.shape}")
    return matrix


def _check_query(query: Matrix, dim: int) -> Matrix:
    if query.shape != (dim,):
        raise ValueError(f"query has shape {query.shape}; the index holds {dim}-d rows")
    return np.ascontiguousarray(query, dtype=np.float32)


class BruteForceIndex:
    """Exact search over every (allowed) row."""

    def __init__(self, vectors: npt.ArrayLike, *, quantized: bool = False) -> None:
        matrix = _as_matrix(vectors)
        self.dim = int(matrix.shape[1])
        self.quantized = quantized
        self._n = int(matrix.shape[0])
        if quantized:
            peak = np.abs(matrix).max(axis=1) if self._n else np.zeros(0, np.float32)
            self._scale = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
            self._q8 = np.rint(matrix / self._scale[:, None]).astype(np.int8)
            self._matrix: Matrix | None = None
        else:
            self._matrix = matrix

    def __len__(self) -> int:
        return self._n

    def scores(self, query: Matrix) -> Scores:
        """The cosine score of every row."""
        q = _check_query(query, self.dim)
        if self._matrix is not None:
            exact: Scores = self._matrix @ q
            return exact
        peak = float(np.abs(q).max()) if q.size else 0.0
        if peak == 0.0:
            return np.zeros(self._n, dtype=np.float32)
        q8 = np.rint(q * (127.0 / peak)).astype(np.int8)
        dots = np.einsum("ij,j->i", self._q8, q8, dtype=np.int32)
        approx: Scores = (dots * self._scale * np.float32(peak / 127.0)).astype(np.float32)
        return approx

    def search(self, query: Matrix, k: int, mask: Mask | None = None) -> tuple[Ids, Scores]:
        scores = self.scores(query)
        if mask is None:
            order = top_k(scores, k)
            return order, scores[order]
        allowed = np.flatnonzero(mask)
        order = top_k(scores[allowed], k)
        return allowed[order], scores[allowed[order]]


class LSHIndex:
    """Random-hyperplane LSH, multi-table and multi-probe, re-ranked exactly.

    ``bits`` defaults to ``round(log2(rows)) - 1`` (between 6 and 18), so buckets hold a
    couple of rows each; ``tables`` and ``probes`` trade recall for speed (see
    BENCHMARKS.md for measured recall@3 at 100,000 rows).
    """

    def __init__(
        self,
        vectors: npt.ArrayLike,
        *,
        tables: int = 64,
        bits: int | None = None,
        probes: int = 8,
        seed: int = 0,
    ) -> None:
        matrix = _as_matrix(vectors)
        n, self.dim = int(matrix.shape[0]), int(matrix.shape[1])
        if bits is None:
            bits = min(18, max(6, round(math.log2(max(n, 2))) - 1))
        probes = min(probes, bits)
        if not 1 <= bits <= 20 or not 1 <= tables <= 256 or probes < 0:
            raise ValueError("LSH needs 1..20 bits, 1..256 tables and probes >= 0")
        self._matrix = matrix
        self._n, self.tables, self.bits, self.probes = n, tables, bits, probes
        rng = np.random.default_rng(seed)
        self._planes = rng.standard_normal((tables * bits, self.dim)).astype(np.float32)
        self._weights = (1 << np.arange(bits)).astype(np.int64)
        self._base = np.arange(tables, dtype=np.int64) << bits
        keys = np.empty((tables, n), dtype=np.int64)
        for start in range(0, n, 8192):  # bounded memory for the sign bits
            chunk = matrix[start : start + 8192] @ self._planes.T > 0
            codes = chunk.reshape(-1, tables, bits) @ self._weights
            keys[:, start : start + 8192] = codes.T + self._base[:, None]
        flat = keys.ravel()
        order = np.argsort(flat, kind="stable")
        self._ids = (order % max(n, 1)).astype(np.int32)
        counts = np.bincount(flat, minlength=tables << bits)
        self._offsets = np.zeros((tables << bits) + 1, dtype=np.int64)
        np.cumsum(counts, out=self._offsets[1:])

    def __len__(self) -> int:
        return self._n

    def candidates(self, query: Matrix) -> Ids:
        """Distinct row ids in the query's buckets and its probed neighbours."""
        projections = (self._planes @ query).reshape(self.tables, self.bits)
        keys = (projections > 0) @ self._weights + self._base
        if self.probes:
            uncertain = np.argpartition(np.abs(projections), self.probes - 1, axis=1)
            flips = self._weights[uncertain[:, : self.probes]]
            keys = np.concatenate([keys[:, None], keys[:, None] ^ flips], axis=1).ravel()
        lo = self._offsets[keys]
        lengths = self._offsets[keys + 1] - lo
        total = int(lengths.sum())
        if total == 0:
            return np.empty(0, dtype=np.intp)
        ends = np.cumsum(lengths)
        positions = np.repeat(lo - ends + lengths, lengths) + np.arange(total)
        return np.unique(self._ids[positions]).astype(np.intp)

    def search(self, query: Matrix, k: int, mask: Mask | None = None) -> tuple[Ids, Scores]:
        q = _check_query(query, self.dim)
        if mask is not None:
            allowed = int(np.count_nonzero(mask))
            if allowed <= DEFAULT_LSH_ABOVE:  # few rows left: exact is as cheap
                rows = np.flatnonzero(mask)
                scores = self._matrix[rows] @ q
                order = top_k(scores, k)
                return rows[order], scores[order]
        rows = self.candidates(q)
        if mask is not None:
            rows = rows[mask[rows]]
        if rows.shape[0] < k:  # too few candidates: fall back to exact
            allowed_rows = np.flatnonzero(mask) if mask is not None else None
            scores = self._matrix @ q if allowed_rows is None else self._matrix[allowed_rows] @ q
            order = top_k(scores, k)
            ids = order if allowed_rows is None else allowed_rows[order]
            return ids, scores[order]
        scores = self._matrix[rows] @ q
        order = top_k(scores, k)
        return rows[order], scores[order]


def make_index(
    vectors: npt.ArrayLike, *, lsh_above: int = DEFAULT_LSH_ABOVE, quantized: bool = False
) -> BruteForceIndex | LSHIndex:
    """Brute force up to ``lsh_above`` rows, LSH beyond."""
    matrix = _as_matrix(vectors)
    if matrix.shape[0] > lsh_above:
        return LSHIndex(matrix)
    return BruteForceIndex(matrix, quantized=quantized)
