"""Query expansion: the one alpha-QE rule that `SearchEngine` searches with and
`chipscout.indexer.evaluate` scores with, so a measured gain is the gain users get.

alpha-query expansion (Radenovic et al. 2018): the query plus its m nearest results, each
weighted by its cosine similarity to the power QE_ALPHA, searched again.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from chipscout.indexer.errors import QueryError

if TYPE_CHECKING:
    import torch

#: m = 5, alpha = 3 were the best of m in {3, 5, 10} x alpha in {1, 3} on held-out EuroSAT
#: queries (BENCHMARKS.md, quality).
QE_ALPHA = 3.0
MAX_EXPAND = 100
#: Query expansion of a search that does not choose one (`expand=None`), per encoder family, for
#: tables whose vectors went through a fitted transform. RCF: m = 5 gained on held-out queries of
#: both EuroSAT sets (+0.010 to +0.017 precision@10, +0.02 mAP, BENCHMARKS.md (quality)); on raw
#: RCF vectors (no transform) it lost 0.03. Other families have no measurement here: none.
DEFAULT_EXPANSION: dict[str, int] = {"rcf": 5}

Array = TypeVar("Array", np.ndarray, "torch.Tensor")


def default_expansion(encoder_name: str, transformed: bool = True) -> int:
    return DEFAULT_EXPANSION.get(encoder_name, 0) if transformed else 0


def whole_number(value: Any, what: str, low: int, high: int, unit: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise QueryError(f"{what} must be a whole number{' of ' + unit if unit else ''}, got {value!r}")
    if not low <= value <= high:
        raise QueryError(f"{what} must be within {low}..{high}{' ' + unit if unit else ''}, got {value}")
    return int(value)


def validate_expand(expand: Any) -> int:
    return whole_number(expand, "query expansion", 0, MAX_EXPAND, "results")


def expand_query(query: Array, similarity: Array, neighbours: Array) -> Array:
    """The expanded query, unit length: `query` + sum_j max(similarity_j, 0) ** QE_ALPHA *
    neighbours_j. query (D,) or (Q, D), unit; similarity (m,) or (Q, m) cosine similarities of
    the query to its neighbours; neighbours (m, D), unit rows (cosine: only directions count).
    numpy (in the query's dtype) or torch alike; a (Q, N) similarity with zeros off the
    neighbours expands Q queries over all N rows at once. torch is not imported here (a search
    by chip id starts without it): a tensor can only come from a caller that imported it."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(query, torch.Tensor):
        weights = similarity.clamp_min(0.0) ** QE_ALPHA
        expanded = query + weights.to(query.dtype) @ neighbours
        return expanded / expanded.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    weights = np.clip(similarity, 0.0, None) ** QE_ALPHA
    expanded = query + weights.astype(query.dtype) @ neighbours
    if expanded.ndim == 1:
        return expanded / max(float(np.linalg.norm(expanded)), 1e-12)
    return expanded / np.maximum(np.linalg.norm(expanded, axis=-1, keepdims=True), 1e-12)
