"""Vector indexes: exact brute force (float32 and int8), LSH recall against it, masks."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from broker.routing.index import BruteForceIndex, LSHIndex, make_index, top_k

pytestmark = pytest.mark.unit

Matrix = npt.NDArray[np.float32]


def unit(matrix: npt.ArrayLike) -> Matrix:
    m = np.asarray(matrix, dtype=np.float64)
    return (m / np.linalg.norm(m, axis=-1, keepdims=True)).astype(np.float32)


def clustered(n: int, dim: int, queries: int, seed: int = 0) -> tuple[Matrix, Matrix]:
    """Random unit rows in clusters of ~50 (cosine ~0.8 to their centre), and queries that
    are new members of random clusters: the shape of real embedding data."""
    rng = np.random.default_rng(seed)
    centres = unit(rng.standard_normal((n // 50, dim)))
    spread = 0.75 / np.sqrt(dim)
    rows = unit(centres[rng.integers(0, len(centres), n)] + spread * rng.standard_normal((n, dim)))
    picks = rng.integers(0, len(centres), queries)
    return rows, unit(centres[picks] + spread * rng.standard_normal((queries, dim)))


def test_top_k_returns_the_largest_first_even_with_ties() -> None:
    scores = np.array([0.1, 0.9, -1.0, 0.9, 0.5, -np.inf, -np.inf], dtype=np.float32)
    assert top_k(scores, 3).tolist() == [1, 3, 4]
    assert top_k(scores, 10).tolist() == [1, 3, 4, 0, 2, 5, 6]
    assert top_k(scores, 0).tolist() == []
    assert top_k(np.zeros(0, dtype=np.float32), 3).tolist() == []


def test_brute_force_is_exact_and_honours_the_mask() -> None:
    rows, queries = clustered(2000, 64, 20)
    index = BruteForceIndex(rows)
    mask = np.zeros(len(rows), dtype=np.bool_)
    mask[::3] = True
    for q in queries:
        ids, scores = index.search(q, 5)
        expected = np.argsort(-(rows @ q), kind="stable")[:5]
        assert ids.tolist() == expected.tolist()
        np.testing.assert_allclose(scores, rows[expected] @ q, rtol=1e-5)
        masked, _ = index.search(q, 5, mask)
        assert mask[masked].all()
        allowed = np.flatnonzero(mask)
        assert masked.tolist() == allowed[np.argsort(-(rows[allowed] @ q))[:5]].tolist()


def test_int8_brute_force_keeps_the_ranking() -> None:
    rows, queries = clustered(5000, 128, 50)
    exact = BruteForceIndex(rows)
    quantized = BruteForceIndex(rows, quantized=True)
    found = 0
    for q in queries:
        truth = set(exact.search(q, 3)[0].tolist())
        ids, scores = quantized.search(q, 3)
        found += len(truth & set(ids.tolist()))
        np.testing.assert_allclose(scores, rows[ids] @ q, atol=0.02)
    assert found / (3 * len(queries)) >= 0.9


def test_lsh_recall_at_3_against_brute_force_on_clustered_random_data() -> None:
    rows, queries = clustered(20_000, 64, 100)
    exact = BruteForceIndex(rows)
    lsh = LSHIndex(rows)
    found = 0
    for q in queries:
        truth = set(exact.search(q, 3)[0].tolist())
        ids, scores = lsh.search(q, 3)
        found += len(truth & set(ids.tolist()))
        np.testing.assert_allclose(scores, rows[ids] @ q, rtol=1e-5)  # re-ranked exactly
        assert len(lsh.candidates(q)) < len(rows) // 4  # it did not scan everything
    assert found / (3 * len(queries)) >= 0.9


def test_lsh_finds_a_near_copy_among_uniform_random_rows() -> None:
    rng = np.random.default_rng(1)
    rows = unit(rng.standard_normal((20_000, 64)))
    lsh = LSHIndex(rows)
    targets = rng.integers(0, len(rows), 100)
    queries = unit(rows[targets] + 0.3 / 8 * rng.standard_normal((100, 64)))
    hits = sum(lsh.search(q, 1)[0][0] == t for q, t in zip(queries, targets, strict=True))
    assert hits >= 95


def test_lsh_search_stays_inside_the_mask() -> None:
    rows, queries = clustered(20_000, 64, 10)
    lsh = LSHIndex(rows)
    wide = np.ones(len(rows), dtype=np.bool_)
    wide[::2] = False  # 10,000 allowed: the LSH path
    narrow = np.zeros(len(rows), dtype=np.bool_)
    narrow[:100] = True  # few allowed: exact over them
    for q in queries:
        for mask in (wide, narrow):
            ids, _ = lsh.search(q, 3, mask)
            assert len(ids) == 3
            assert mask[ids].all()
        allowed = np.flatnonzero(narrow)
        best = allowed[np.argsort(-(rows[allowed] @ q))[:3]]
        assert lsh.search(q, 3, narrow)[0].tolist() == best.tolist()


def test_make_index_switches_to_lsh_above_the_threshold() -> None:
    rows, _ = clustered(600, 16, 1)
    assert isinstance(make_index(rows), BruteForceIndex)
    assert isinstance(make_index(rows, lsh_above=500), LSHIndex)
    assert make_index(rows, quantized=True).quantized


def test_a_query_of_the_wrong_dimension_is_refused() -> None:
    rows, _ = clustered(100, 16, 1)
    with pytest.raises(ValueError, match="16-d rows"):
        BruteForceIndex(rows).search(np.ones(8, dtype=np.float32), 3)


@settings(max_examples=100, deadline=None)
@given(
    matrix=arrays(
        np.float32,
        st.tuples(st.integers(1, 40), st.just(8)),
        elements=st.floats(-1, 1, width=32),
    ),
    k=st.integers(1, 10),
    seed=st.integers(0, 2**16),
)
def test_brute_force_results_are_sorted_masked_dot_products(
    matrix: Matrix, k: int, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    query = unit(rng.standard_normal(8))
    mask = rng.random(len(matrix)) < 0.6
    ids, scores = BruteForceIndex(matrix).search(query, k, mask)
    assert len(ids) == min(k, int(mask.sum()))
    assert mask[ids].all()
    assert (np.diff(scores) <= 0).all()
    np.testing.assert_allclose(scores, matrix[ids] @ query, rtol=1e-5, atol=1e-6)
    if len(ids):
        assert scores[0] == pytest.approx(float((matrix[mask] @ query).max()), abs=1e-6)
