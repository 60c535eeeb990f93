"""The query planner: per query, whether to answer from the ANN index (the filter applied
before or after it), by exact search over the allowed rows, or from a warm sketch, and with which
knobs; measured choices and their numbers in BENCHMARKS.md (search).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from chipscout.indexer.store.indexes import (
    DEFAULT_INDEX_TYPE, VECTOR_INDEX_TYPES, IndexPolicy, QueryTuning, VectorIndexSpec, default_tuning,
    plan_vector_index, read_record,
)


@dataclass(frozen=True)
class SearchPlan:
    """How one query ran. `method`: `exact` (numpy over vectors of the allowed rows), `exact-scan`
    (LanceDB flat search, filter first), `ann` (the vector index, no filter), `ann-postfilter`
    (the index over-fetches, the filter keeps the allowed rows), `ann-prefilter` (the index
    searches only the allowed rows: LanceDB's prefilter), `sketch` (a warmed searcher's binary
    sketch picks candidates among the allowed rows, re-ranked exactly), `partitions` (a warmed
    searcher's k-means lists nearest the query are scored, their allowed rows only)."""

    method: str
    matches: int | None = None
    """Rows the filter allows (None: no filter); estimated from a sample on large tables when
    they are many (see `IndexPolicy.exact_count_rows`)."""
    tuning: QueryTuning | None = None
    fetch: int = 0
    table_version: int | None = None
    """The table version the query read."""
    candidates: np.ndarray | None = field(default=None, repr=False, compare=False)
    """Warm sketch queries: the rows (positions in the warm cache) re-ranked exactly, which a
    follow-up query near this one may re-rank instead of searching (`nearest(near=...)`)."""
    positions: np.ndarray | None = field(default=None, repr=False, compare=False)
    """Warm sketch queries: each returned row's position in the warm cache (`warm_vectors`)."""

    @property
    def used_index(self) -> bool:
        """Whether an approximate index (LanceDB's, or the warm sketch) picked the candidates."""
        return self.method.startswith("ann") or self.method in ("sketch", "partitions")


class TableState:
    """What the planner knows of one table version."""

    def __init__(self, store, policy: IndexPolicy):
        self.version = store.version
        self.rows = store.count()
        self.index = store.vector_index_stats()
        self.spec: VectorIndexSpec | None = None
        self.tuning: QueryTuning | None = None
        if self.index is not None:
            record = read_record(store)
            if record is not None and record.spec.index_type == self.index["index_type"]:
                # Knobs from today's code for the recorded build, so tuning improvements apply.
                self.spec, self.tuning = record.spec, default_tuning(record.spec)
            else:  # built outside chipscout: plan as if we had built it at this size
                kind = self.index["index_type"]
                self.spec = plan_vector_index(max(1, self.index.get("num_indexed_rows") or self.rows),
                                              store.config.embedding_dim,
                                              kind if kind in VECTOR_INDEX_TYPES else DEFAULT_INDEX_TYPE,
                                              policy.rows_per_partition)
                self.tuning = default_tuning(self.spec)
            if policy.tuning is not None:
                self.tuning = policy.tuning
        self.config = store.config
        self.dim = self.config.embedding_dim
        self.fits_in_memory = self.rows * (self.dim * 4 + 8) <= policy.exact_cache_bytes



def plan_query(policy: IndexPolicy, state: TableState, k: int, matches: int | None, in_memory: bool) -> SearchPlan:
    """The method for a query of `k` results whose filter allows `matches` rows (None: no
    filter), before any retry; `in_memory`: the searcher holds the vectors (`warm_up`)."""
    if state.index is None:
        return SearchPlan("exact" if state.fits_in_memory or in_memory else "exact-scan", matches)
    if matches is None:
        return SearchPlan("ann", None, state.tuning, k)
    scan = state.rows <= policy.scan_max_rows and not in_memory
    exact_max = policy.warm_exact_max_matches if in_memory else policy.exact_max_matches
    if matches <= max(k, exact_max):
        return SearchPlan("exact-scan" if scan else "exact", matches)
    share = matches / max(1, state.rows)
    fetch = math.ceil(allowed_wanted(state, k) / share) + 10
    if fetch > policy.max_postfilter_fetch:
        if scan:
            return SearchPlan("exact-scan", matches)
        return SearchPlan("ann-prefilter", matches, wide_tuning(state, share), k)
    return SearchPlan("ann-postfilter", matches, fetch_tuning(state, k, fetch), fetch)

def allowed_wanted(state: TableState, k: int) -> int:
    """Allowed candidates a postfilter over-fetch aims at: half the rows a refinement would
    re-rank (k * refine_factor), at least 2 k."""
    refine = (state.tuning.refine_factor if state.tuning else None) or 1
    return max(2 * k, k * refine // 2)

def fetch_tuning(state: TableState, k: int, fetch: int) -> QueryTuning:
    """Knobs for over-fetching `fetch` candidates by the index's codes alone: no LanceDB
    refinement (chipscout re-ranks just the allowed candidates on their full vectors), and
    sqrt(fetch / k) times the partitions, where the further neighbours sit, but at most
    twice: at 1M rows twice gives the recall of probing all partitions (0.985-0.995 at 3-50 %
    selectivity) for ~25 % less time (BENCHMARKS.md (search))."""
    base = state.tuning
    assert base is not None and state.spec is not None
    if state.spec.index_type == "IVF_HNSW_SQ":
        return QueryTuning(base.nprobes, None, max(base.ef or 0, fetch))
    growth = min(2.0, math.sqrt(fetch / k))
    probes = min(state.spec.num_partitions, math.ceil(base.nprobes * growth))
    return QueryTuning(probes, None, base.ef)

def wide_tuning(state: TableState, share: float) -> QueryTuning:
    """Knobs for LanceDB's prefiltered ANN: the allowed rows nearest the query lie far out,
    in many partitions; probe 1 / sqrt(share) times as many (all, for 1 %)."""
    base = state.tuning
    assert base is not None and state.spec is not None
    if state.spec.index_type == "IVF_HNSW_SQ":
        return replace(base, ef=max(base.ef or 0, 4 * 64))
    probes = min(state.spec.num_partitions, math.ceil(base.nprobes / math.sqrt(max(share, 1e-6)) * 2))
    return replace(base, nprobes=probes)
