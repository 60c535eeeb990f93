"""Indexes of a chip table and how a query uses them: which vector index to build, when, with
which parameters; scalar indexes for the filter columns; compaction; and, per query, whether
to answer from the ANN index (filters applied before or after it) or by exact search.

Policy lives here; the LanceDB calls live in `indexer.store`. Every build is recorded (type,
parameters, rows, seconds, lancedb version) in the companion table `<table>__indexes`, which
`chipscout info` reports beside LanceDB's own index statistics.
"""

from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timedelta, timezone
from typing import Any

import numpy as np
import pyarrow as pa

from indexer.errors import StoreError

#: Vector index types chipscout builds. IVF_RQ (RaBitQ codes) builds fastest for its recall;
#: IVF_PQ is the classic compressed index; IVF_HNSW_SQ is a graph per IVF partition.
VECTOR_INDEX_TYPES = ("IVF_RQ", "IVF_PQ", "IVF_HNSW_SQ")
DEFAULT_INDEX_TYPE = "IVF_RQ"

#: Columns the search filters read (`SearchFilters.where_clause`), plus the id columns that
#: `fetch` and re-indexing look up; each gets a BTREE index once the table is large enough.
SCALAR_INDEX_COLUMNS = ("chip_id", "source_id", "acquired", "min_lon", "max_lon", "min_lat",
                        "max_lat", "cloud_fraction", "nodata_fraction")

RECORD_SUFFIX = "indexes"
VECTOR_RECORD = "vector"


@dataclass(frozen=True)
class IndexPolicy:
    """When to index and how to search. The defaults are the figures of BENCHMARKS.md (search)."""

    index_type: str = DEFAULT_INDEX_TYPE
    rows_per_partition: int = 4096
    """IVF partition size the index is planned with (see `plan_vector_index`)."""
    min_rows: int = 50_000
    """Below this many rows no vector index is built: exact search over cached vectors is
    about as fast as an index (a few ms) and always right."""
    scalar_min_rows: int = 20_000
    """Below this many rows filters are evaluated by scanning; no scalar indexes."""
    rebuild_growth: float = 2.0
    """Rebuild (retrain) the vector index once the table holds this many times the rows it
    was trained on; smaller additions go into the index as deltas by `optimize`."""
    compact_small_fragments: int = 16
    """Compact the table once it has this many small fragments (each commit adds one)."""
    exact_cache_bytes: int = 1 << 30
    """Exact search keeps the vectors in memory (numpy) when they fit in this many bytes;
    larger tables without an index fall back to LanceDB's flat search."""
    exact_max_matches: int = 5_000
    """With an index, a filter allowing at most this many rows is answered exactly, over just
    those rows (see `scan_max_rows`)."""
    scan_max_rows: int = 250_000
    """Up to this many rows, exact search over filtered rows is LanceDB's (its BTREE prefilter,
    then a flat scan: ~15 ms at 100k rows); beyond, its prefilter costs 100-200 ms, so chipscout
    reads the allowed rows' vectors by row id instead (~40 ms for 2000 rows of 768-d, ~90 ms
    for 5000)."""
    max_postfilter_fetch: int = 10_000
    """With an index, a filter is applied after the ANN search, which over-fetches
    k * refine_factor / 2 / share candidates (by the index's codes alone: ~15 ms for 5000 at
    1M rows), as long as that is at most this many; beyond, exact search (up to
    `scan_max_rows` rows) or LanceDB's prefiltered ANN search."""
    tuning: QueryTuning | None = None
    """Search knobs to use instead of those recorded with the index (benchmarks, tests)."""

    def __post_init__(self) -> None:
        if self.index_type not in VECTOR_INDEX_TYPES:
            raise StoreError(f"unknown vector index type {self.index_type!r}; "
                             f"choose one of {', '.join(VECTOR_INDEX_TYPES)}")


DEFAULT_POLICY = IndexPolicy()


# ----------------------------------------------------------------------------- parameters
@dataclass(frozen=True)
class VectorIndexSpec:
    """Build parameters of a vector index (those that apply to its type; others None)."""

    index_type: str
    num_partitions: int
    num_bits: int | None = None
    num_sub_vectors: int | None = None
    m: int | None = None
    ef_construction: int | None = None
    max_iterations: int = 50
    sample_rate: int = 256

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class QueryTuning:
    """Search-time knobs of an index: IVF partitions probed, refinement factor (candidates
    re-ranked on the full vectors = k * refine_factor), HNSW beam width."""

    nprobes: int
    refine_factor: int | None = None
    ef: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def _pq_sub_vectors(dim: int) -> int:
    """PQ sub-vectors: 16 dimensions each where the dimension allows (8-bit codes, 1/32 of
    float32), else the largest divisor of `dim` that leaves at least 8 dimensions each."""
    if dim % 16 == 0:
        return dim // 16
    for sub in range(dim // 8, 0, -1):
        if dim % sub == 0:
            return sub
    return 1


def plan_vector_index(rows: int, dim: int, index_type: str = DEFAULT_INDEX_TYPE,
                      rows_per_partition: int = 4096) -> VectorIndexSpec:
    """Build parameters for a table of `rows` vectors of `dim` dimensions.

    IVF partitions hold `rows_per_partition` rows (IVF_RQ, IVF_PQ): probing a share of them costs the
    same share of the table, and k-means over sample_rate * partitions vectors stays cheap.
    Graph partitions (IVF_HNSW_SQ) hold up to 250k rows; the graph does the narrowing.
    """
    if rows <= 0 or dim <= 0:
        raise StoreError(f"cannot plan a vector index for {rows} rows of {dim} dimensions")
    if index_type == "IVF_RQ":
        partitions = max(1, min(4096, round(rows / rows_per_partition)))
        return VectorIndexSpec("IVF_RQ", partitions, num_bits=1, max_iterations=20, sample_rate=128)
    if index_type == "IVF_PQ":
        partitions = max(1, min(4096, round(rows / rows_per_partition)))
        return VectorIndexSpec("IVF_PQ", partitions, num_bits=8, num_sub_vectors=_pq_sub_vectors(dim),
                               max_iterations=20, sample_rate=128)
    if index_type == "IVF_HNSW_SQ":
        partitions = max(1, math.ceil(rows / 250_000))
        return VectorIndexSpec("IVF_HNSW_SQ", partitions, m=16, ef_construction=120,
                               max_iterations=20, sample_rate=128)
    raise StoreError(f"unknown vector index type {index_type!r}; choose one of {', '.join(VECTOR_INDEX_TYPES)}")


def default_tuning(spec: VectorIndexSpec) -> QueryTuning:
    """Search knobs that reach recall@10 >= 0.95 against exact search on the benchmark's
    clustered 768-d vectors (BENCHMARKS.md (search)), unfiltered: 40 % of the partitions (at
    least 16), and 10 x k candidates re-ranked on the full vectors, which 1-bit codes need
    (recall 0.74 at 1M rows without, 0.987 with). Probing is cheap next to LanceDB's per-query cost: all
    244 partitions of 1M rows take 22 ms, 16 take 12 ms."""
    if spec.index_type == "IVF_HNSW_SQ":
        return QueryTuning(nprobes=max(1, min(spec.num_partitions, 2)), refine_factor=2, ef=96)
    probes = max(16, math.ceil(spec.num_partitions * 0.4))
    return QueryTuning(nprobes=min(spec.num_partitions, probes), refine_factor=10)


# ----------------------------------------------------------------------------- records
@dataclass(frozen=True)
class IndexRecord:
    """What chipscout built and how long it took; stored in `<table>__indexes`."""

    spec: VectorIndexSpec
    tuning: QueryTuning
    built_at: str
    build_s: float
    rows_at_build: int
    dim: int
    table_version: int
    lancedb_version: str

    def to_dict(self) -> dict[str, Any]:
        return {"index_type": self.spec.index_type, "params": self.spec.to_dict(),
                "query": self.tuning.to_dict(), "built_at": self.built_at,
                "build_s": round(self.build_s, 2), "rows_at_build": self.rows_at_build,
                "dim": self.dim, "table_version": self.table_version,
                "lancedb_version": self.lancedb_version}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> IndexRecord:
        params = dict(raw["params"])
        return cls(spec=VectorIndexSpec(**params), tuning=QueryTuning(**raw["query"]),
                   built_at=raw["built_at"], build_s=float(raw["build_s"]),
                   rows_at_build=int(raw["rows_at_build"]), dim=int(raw["dim"]),
                   table_version=int(raw["table_version"]), lancedb_version=raw["lancedb_version"])


def read_record(store) -> IndexRecord | None:
    rows = store.companion_rows(RECORD_SUFFIX, equals={"name": VECTOR_RECORD})
    if rows is None or rows.num_rows == 0:
        return None
    try:
        return IndexRecord.from_dict(json.loads(rows["record"][rows.num_rows - 1].as_py()))
    except (KeyError, TypeError, ValueError):
        return None  # written by another chipscout version: LanceDB's own statistics still hold


def _write_record(store, record: IndexRecord) -> None:
    rows = pa.table({"name": [VECTOR_RECORD], "record": [json.dumps(record.to_dict(), sort_keys=True)]})
    store.companion_upsert(RECORD_SUFFIX, rows, on=["name"])


# ----------------------------------------------------------------------------- maintenance
@dataclass
class MaintenanceReport:
    """What `maintain_indexes` did."""

    rows: int = 0
    compacted: bool = False
    scalar_indexes_built: list[str] = field(default_factory=list)
    vector_index: str = "none"
    """`built`, `rebuilt`, `updated` (new rows added as a delta), `current`, or `none` (exact)."""
    vector_build_s: float = 0.0
    elapsed_s: float = 0.0
    record: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def maintain_indexes(store, policy: IndexPolicy = DEFAULT_POLICY, *, index_type: str | None = None,
                     rebuild: bool = False, compact: bool | None = None) -> MaintenanceReport:
    """Bring the table's indexes up to date; cheap when nothing changed (no commit at all).

    - compaction (`table.optimize()`) when small fragments pile up, or when `compact` is True;
      it also folds rows added since the last build into the existing indexes;
    - BTREE indexes on the filter and id columns once the table has `scalar_min_rows` rows;
    - the vector index: built once the table has `policy.min_rows` rows, rebuilt when the table
      grew `rebuild_growth` times since, when another `index_type` is asked, or on `rebuild`.

    Each step is one LanceDB commit: a build killed half-way leaves the table at its previous
    version, searchable as before (by the old index, or exactly).
    """
    started = time.perf_counter()
    report = MaintenanceReport()
    if not store.exists():
        return report
    rows = store.count()
    report.rows = rows
    if rows == 0:
        return report
    if index_type is not None:
        policy = replace(policy, index_type=index_type)
    wanted = policy.index_type if index_type is None else index_type
    existing = store.vector_index_stats()
    record = read_record(store)

    fragments = store.fragment_stats()
    unindexed = store.unindexed_rows()
    if compact or (compact is None and (fragments.get("num_small_fragments", 0) >= policy.compact_small_fragments
                                        or unindexed >= max(1, rows // 20))):
        store.optimize()
        report.compacted = True

    if rows >= policy.scalar_min_rows:
        for column in store.missing_scalar_indexes(SCALAR_INDEX_COLUMNS):
            store.create_scalar_index(column)
            report.scalar_indexes_built.append(column)

    dim = store.config.embedding_dim
    needs_build = existing is None and rows >= policy.min_rows
    needs_rebuild = existing is not None and (
        rebuild
        or (index_type is not None and existing["index_type"] != index_type)
        or (record is not None and rows >= policy.rebuild_growth * record.rows_at_build))
    if needs_build or needs_rebuild:
        spec = plan_vector_index(rows, dim, wanted, policy.rows_per_partition)
        build_started = time.perf_counter()
        store.create_vector_index(spec)
        report.vector_build_s = time.perf_counter() - build_started
        record = IndexRecord(spec, default_tuning(spec),
                             datetime.now(timezone.utc).isoformat(timespec="seconds"),
                             report.vector_build_s, rows, dim, store.table.version, store.lancedb_version())
        _write_record(store, record)
        report.vector_index = "rebuilt" if existing is not None else "built"
    elif existing is not None:
        report.vector_index = "updated" if report.compacted and unindexed else "current"
    report.record = record.to_dict() if record and store.vector_index_stats() else None
    report.elapsed_s = time.perf_counter() - started
    return report


def index_status(store) -> dict[str, Any]:
    """The vector index as LanceDB reports it, with chipscout's record of its build; and the
    scalar indexes. For `chipscout info`."""
    stats = store.vector_index_stats()
    record = read_record(store)
    vector = None
    if stats is not None:
        vector = dict(stats)
        if record is not None and record.spec.index_type == stats["index_type"]:
            vector["chipscout"] = {**record.to_dict(), "query": default_tuning(record.spec).to_dict()}
    return {"vector": vector, "scalar": sorted(store.scalar_indexed_columns()),
            "fragments": store.fragment_stats()}


# ----------------------------------------------------------------------------- query planning
@dataclass(frozen=True)
class FilterValues:
    """The typed values of a filter (`SearchFilters` without the overlap rule)."""

    date_from: datetime | None = None
    date_to: datetime | None = None
    bbox: tuple[float, float, float, float] | None = None
    max_cloud_fraction: float | None = None
    max_nodata_fraction: float | None = None
    source_ids: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return self == FilterValues()


@dataclass(frozen=True)
class SearchPlan:
    """How one query ran. `method`: `exact` (numpy over vectors of the allowed rows), `exact-scan`
    (LanceDB flat search, filter first), `ann` (the vector index, no filter), `ann-postfilter`
    (the index over-fetches, the filter keeps the allowed rows), `ann-prefilter` (the index
    searches only the allowed rows: LanceDB's prefilter)."""

    method: str
    matches: int | None = None
    """Rows the filter allows (None: no filter)."""
    tuning: QueryTuning | None = None
    fetch: int = 0

    @property
    def used_index(self) -> bool:
        return self.method.startswith("ann")


_NO_TIME = np.iinfo(np.int64).min
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def _micros(when: datetime) -> int:
    """Microseconds since the epoch; a naive datetime is UTC, as `sql_literal` reads it."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return (when - _EPOCH) // timedelta(microseconds=1)


class FilterColumns:
    """The filter columns of every row of one table version, in memory (~60 bytes a row), so a
    filter's exact set of allowed rows costs milliseconds of numpy; LanceDB's scalar-index
    prefilter costs 35-200 ms at a million rows (BENCHMARKS.md (search)). The predicate mirrors
    `SearchFilters.where_clause` (SQL NULL semantics included); tests hold the two together."""

    COLUMNS = ("acquired", "min_lon", "min_lat", "max_lon", "max_lat", "cloud_fraction",
               "nodata_fraction", "source_id")

    def __init__(self, store):
        self.version = store.table.version
        table = store.scan_with_row_ids(list(self.COLUMNS))
        self.row_ids = table["_rowid"].to_numpy()
        self.acquired_us = table["acquired"].cast(pa.int64()).fill_null(_NO_TIME).to_numpy()
        self.bounds = {c: table[c].cast(pa.float64()).fill_null(np.nan).to_numpy()
                       for c in ("min_lon", "min_lat", "max_lon", "max_lat")}
        self.cloud = table["cloud_fraction"].cast(pa.float64()).fill_null(np.nan).to_numpy()
        self.nodata = table["nodata_fraction"].cast(pa.float64()).fill_null(np.nan).to_numpy()
        sources = table["source_id"].combine_chunks().dictionary_encode()
        self.source_names = sources.dictionary.to_pylist()
        self.source_codes = sources.indices.fill_null(-1).to_numpy(zero_copy_only=False)

    def __len__(self) -> int:
        return len(self.row_ids)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.row_ids, self.acquired_us, self.cloud, self.nodata,
                                      self.source_codes, *self.bounds.values()))

    def mask(self, values: FilterValues) -> np.ndarray:
        keep = np.ones(len(self), dtype=bool)
        with np.errstate(invalid="ignore"):  # NaN (SQL NULL) compares false, as in SQL
            if values.date_from is not None:
                keep &= (self.acquired_us != _NO_TIME) & (self.acquired_us >= _micros(values.date_from))
            if values.date_to is not None:
                keep &= (self.acquired_us != _NO_TIME) & (self.acquired_us <= _micros(values.date_to))
            if values.bbox is not None:
                min_lon, min_lat, max_lon, max_lat = (float(v) for v in values.bbox)
                keep &= ((self.bounds["max_lon"] >= min_lon) & (self.bounds["min_lon"] <= max_lon)
                         & (self.bounds["max_lat"] >= min_lat) & (self.bounds["min_lat"] <= max_lat))
            if values.max_cloud_fraction is not None:
                keep &= np.isnan(self.cloud) | (self.cloud <= float(values.max_cloud_fraction))
            if values.max_nodata_fraction is not None:
                keep &= self.nodata <= float(values.max_nodata_fraction)
        if values.source_ids:
            codes = [i for i, name in enumerate(self.source_names) if name in set(values.source_ids)]
            keep &= np.isin(self.source_codes, codes)
        return keep

    def allowed(self, mask: np.ndarray, row_ids: np.ndarray) -> np.ndarray:
        """Which of `row_ids` the filter `mask` allows."""
        positions = np.searchsorted(self.row_ids, row_ids)
        inside = positions < len(self.row_ids)
        result = np.zeros(len(row_ids), dtype=bool)
        hit = inside.copy()
        hit[inside] = self.row_ids[positions[inside]] == row_ids[inside]
        result[hit] = mask[positions[hit]]
        return result


def _top(vectors: np.ndarray, row_ids: np.ndarray, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(row ids, cosine distances) of the k rows of `vectors` (unit length) nearest `query`;
    ties broken by the lower row id, as LanceDB breaks them."""
    query = query.astype(np.float32) / max(float(np.linalg.norm(query)), 1e-30)
    scores = vectors @ query
    k = min(k, len(scores))
    if k == 0:
        return np.zeros(0, np.uint64), np.zeros(0, np.float32)
    best = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
    best = best[np.lexsort((row_ids[best], -scores[best]))]
    return row_ids[best], (1.0 - scores[best]).astype(np.float32)


def _unit(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    np.divide(vectors, norms, out=vectors, where=norms > 0)
    return vectors


class ExactVectors:
    """All vectors of a table version in memory (float32, unit length), for brute-force search:
    one matrix-vector product, several times faster than LanceDB's flat search on small tables."""

    def __init__(self, store):
        self.version = store.table.version
        self.row_ids, vectors = store.all_vectors()
        self.vectors = _unit(vectors)

    def top(self, query: np.ndarray, k: int, positions: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        if positions is None:
            return _top(self.vectors, self.row_ids, query, k)
        return _top(self.vectors[positions], self.row_ids[positions], query, k)


class _TableState:
    """What the planner knows of one table version."""

    def __init__(self, store, policy: IndexPolicy):
        self.version = store.table.version
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
        dim = store.config.embedding_dim
        self.fits_in_memory = self.rows * (dim * 4 + 8) <= policy.exact_cache_bytes


class VectorSearcher:
    """Answers nearest-neighbour queries over one table by the cheapest path that keeps the
    answer right. Without an index: exact search over vectors cached in memory. With one: the
    index (`ann`) when there is no filter; for a filter, its exact set of allowed rows comes
    from filter columns cached in memory, then
      - few rows allowed (`exact_max_matches`): exact search over just those rows (a prefilter:
        LanceDB's for small tables, chipscout's by row id for large ones);
      - otherwise: the index over-fetches ~k * refine_factor / 2 / share candidates by its codes,
        the filter keeps the allowed ones and chipscout re-ranks those on their full vectors (a
        postfilter), asking again for more when too few survive, and falling back to LanceDB's
        own prefiltered search when over-fetching would cost more.
    Caches are per table version (`refresh` a store to see new commits). Thread-safe.
    Measured choices and their numbers: BENCHMARKS.md (search)."""

    def __init__(self, store, policy: IndexPolicy = DEFAULT_POLICY):
        self.store = store
        self.policy = policy
        self._lock = threading.Lock()
        self._state: _TableState | None = None
        self._filters: FilterColumns | None = None
        self._exact: ExactVectors | None = None

    def _current(self) -> _TableState:
        with self._lock:
            if self._state is None or self._state.version != self.store.table.version:
                self._state = _TableState(self.store, self.policy)
            return self._state

    def _filter_columns(self) -> FilterColumns:
        with self._lock:
            version = self.store.table.version
            if self._filters is None or self._filters.version != version:
                self._filters = None  # let the old arrays go before the new ones are read
                self._filters = FilterColumns(self.store)
            return self._filters

    def _exact_vectors(self) -> ExactVectors:
        with self._lock:
            version = self.store.table.version
            if self._exact is None or self._exact.version != version:
                self._exact = None
                self._exact = ExactVectors(self.store)
            return self._exact

    def matches(self, values: FilterValues) -> int:
        """How many rows `values` allows (exactly)."""
        return int(self._filter_columns().mask(values).sum())

    def plan(self, k: int, matches: int | None) -> SearchPlan:
        """The method for a query of `k` results whose filter allows `matches` rows (None: no
        filter), before any retry."""
        state = self._current()
        if state.index is None:
            return SearchPlan("exact" if state.fits_in_memory else "exact-scan", matches)
        if matches is None:
            return SearchPlan("ann", None, state.tuning, k)
        scan = state.rows <= self.policy.scan_max_rows
        if matches <= max(k, self.policy.exact_max_matches):
            return SearchPlan("exact-scan" if scan else "exact", matches)
        share = matches / max(1, state.rows)
        fetch = math.ceil(self._allowed_wanted(state, k) / share) + 10
        if fetch > self.policy.max_postfilter_fetch:
            if scan:
                return SearchPlan("exact-scan", matches)
            return SearchPlan("ann-prefilter", matches, self._wide_tuning(state, share), k)
        return SearchPlan("ann-postfilter", matches, self._fetch_tuning(state, k, fetch), fetch)

    @staticmethod
    def _allowed_wanted(state: _TableState, k: int) -> int:
        """Allowed candidates a postfilter over-fetch aims at: half the rows a refinement would
        re-rank (k * refine_factor), at least 2 k."""
        refine = (state.tuning.refine_factor if state.tuning else None) or 1
        return max(2 * k, k * refine // 2)

    def _fetch_tuning(self, state: _TableState, k: int, fetch: int) -> QueryTuning:
        """Knobs for over-fetching `fetch` candidates by the index's codes alone: no LanceDB
        refinement (chipscout re-ranks just the allowed candidates on their full vectors), and
        ~sqrt(fetch / k) times the partitions, where the further neighbours sit."""
        base = state.tuning
        assert base is not None and state.spec is not None
        if state.spec.index_type == "IVF_HNSW_SQ":
            return QueryTuning(base.nprobes, None, max(base.ef or 0, fetch))
        probes = min(state.spec.num_partitions, math.ceil(base.nprobes * math.sqrt(fetch / k)))
        return QueryTuning(probes, None, base.ef)

    def _wide_tuning(self, state: _TableState, share: float) -> QueryTuning:
        """Knobs for LanceDB's prefiltered ANN: the allowed rows nearest the query lie far out,
        in many partitions; probe 1 / sqrt(share) times as many (all, for 1 %)."""
        base = state.tuning
        assert base is not None and state.spec is not None
        if state.spec.index_type == "IVF_HNSW_SQ":
            return replace(base, ef=max(base.ef or 0, 4 * 64))
        probes = min(state.spec.num_partitions, math.ceil(base.nprobes / math.sqrt(max(share, 1e-6)) * 2))
        return replace(base, nprobes=probes)

    def nearest(self, vector: np.ndarray, k: int, values: FilterValues | None, where: str | None,
                columns: list[str]) -> tuple[pa.Table, SearchPlan]:
        """The k nearest rows (`columns` plus `_distance`, nearest first) that `values` allows,
        and how they were found. `where` is the same filter as SQL, for LanceDB's own paths."""
        state = self._current()
        values = None if values is None or values.empty else values
        mask = None
        if values is not None:
            filter_columns = self._filter_columns()
            mask = filter_columns.mask(values)
        matches = None if mask is None else int(mask.sum())
        plan = self.plan(k, matches)
        if matches == 0:
            return self.store.take_rows(np.zeros(0, np.uint64), np.zeros(0, np.float32), columns), plan
        if plan.method == "exact" and state.index is None:
            exact = self._exact_vectors()
            positions = None
            if mask is not None:  # filter columns and vectors are both in row-id order
                positions = np.flatnonzero(mask)
            row_ids, distances = exact.top(vector, k, positions)
            return self.store.take_rows(row_ids, distances, columns), plan
        if plan.method == "exact":
            allowed_ids = filter_columns.row_ids[mask]
            vectors = _unit(self.store.vectors_by_row_id(allowed_ids))
            row_ids, distances = _top(vectors, allowed_ids, vector, k)
            return self.store.take_rows(row_ids, distances, columns), plan
        if plan.method == "exact-scan":
            return self.store.nearest(vector, k, where, columns, use_index=False), plan
        if plan.method == "ann":
            rows = self.store.nearest(vector, k, None, columns, tuning=plan.tuning)
            if rows.num_rows >= min(k, state.rows):
                return rows, plan
            # k beyond what the probed partitions hold (k near the table's size): exact search.
            plan = SearchPlan("exact-scan", None)
            return self.store.nearest(vector, k, None, columns, use_index=False), plan
        if plan.method == "ann-postfilter":
            # Candidates by the index's codes, the filter from memory, then an exact re-rank of
            # the allowed candidates (at most k * refine_factor) on their full vectors.
            rerank = k * ((state.tuning.refine_factor if state.tuning else None) or 1)
            fetch = plan.fetch
            while True:
                row_ids, _ = self.store.nearest_row_ids(vector, fetch, plan.tuning)
                allowed_ids = row_ids[filter_columns.allowed(mask, row_ids)][:rerank]
                if len(allowed_ids) >= min(k, matches):
                    vectors = _unit(self.store.vectors_by_row_id(allowed_ids))
                    ids, distances = _top(vectors, allowed_ids, vector, k)
                    return self.store.take_rows(ids, distances, columns), replace(plan, fetch=fetch)
                if fetch * 4 > self.policy.max_postfilter_fetch:
                    break
                fetch *= 4
                plan = replace(plan, tuning=self._fetch_tuning(state, k, fetch))
            plan = SearchPlan("ann-prefilter", matches, self._wide_tuning(state, matches / max(1, state.rows)), k)
        rows = self.store.nearest(vector, k, where, columns, tuning=plan.tuning)
        if rows.num_rows < min(k, matches or k):  # the probed partitions held too few allowed rows
            plan = SearchPlan("exact-scan", matches)
            rows = self.store.nearest(vector, k, where, columns, use_index=False)
        return rows, plan
