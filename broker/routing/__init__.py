"""Routing: which agent gets a message. Features, embeddings, the catalog, load and policy.

The core here is framework-free (plain Python and NumPy): :func:`extract` reads a message's
features, an :class:`Embedder` turns text into vectors, a :class:`Catalog` holds a tenant's
agents as arrays, and :func:`decide` filters, scores and chooses under a :class:`Policy`.
:class:`Scorer` bundles them for the router service.
"""

from broker.routing.catalog import Catalog, CatalogCache, build_catalog
from broker.routing.embedder import (
    Embedder,
    EmbedderUnavailable,
    HashingEmbedder,
    SentenceTransformerEmbedder,
    load_embedder,
)
from broker.routing.features import Features, InvalidRoutingHeader, extract
from broker.routing.index import BruteForceIndex, LSHIndex, VectorIndex, make_index
from broker.routing.policy import DEFAULT_POLICY, Choice, Policy, PolicyInvalid, load_policy
from broker.routing.scoring import Scorer, decide, load_score
from broker.routing.types import AgentLoad, CandidateScore, Decision, DecisionReason

__all__ = [
    "DEFAULT_POLICY",
    "AgentLoad",
    "BruteForceIndex",
    "CandidateScore",
    "Catalog",
    "CatalogCache",
    "Choice",
    "Decision",
    "DecisionReason",
    "Embedder",
    "EmbedderUnavailable",
    "Features",
    "HashingEmbedder",
    "InvalidRoutingHeader",
    "LSHIndex",
    "Policy",
    "PolicyInvalid",
    "Scorer",
    "SentenceTransformerEmbedder",
    "VectorIndex",
    "build_catalog",
    "decide",
    "extract",
    "load_embedder",
    "load_policy",
    "load_score",
    "make_index",
]
