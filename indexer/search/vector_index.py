"""Indexes of a chip table and how a query uses them: which vector index to build, when, with
which parameters; scalar indexes for the filter columns; compaction; and, per query, whether
to answer from the ANN index (filters applied before or after it) or by exact search.

Policy lives here; the LanceDB calls live in `chipscout.indexer.store`. Every build is recorded (type,
parameters, rows, seconds, lancedb version) in the companion table `<table>__indexes`, which
`chipscout info` reports beside LanceDB's own index statistics.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timedelta, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from chipscout.indexer.errors import StoreError
from chipscout.indexer.store import unit_rows

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
    warm_cache_bytes: int = 2 << 30
    """A warmed searcher (`VectorSearcher.warm_up`: the app, long-running services) keeps every
    vector in memory for re-ranking and for exact search over filtered rows: float32 when they
    fit `exact_cache_bytes`, else float16 when they fit this budget (a million 768-d vectors:
    1.4 GiB). Beyond it, LanceDB re-ranks from disk (~20 ms more a query at a million rows)."""
    warm_exact_max_matches: int = 20_000
    """`exact_max_matches` for a warmed searcher holding the vectors: exact search over this many
    in-memory rows costs about what an over-fetching ANN query does (BENCHMARKS.md (search))."""
    exact_count_rows: int = 200_000
    """Above this many rows a filter's share is first estimated on a 1-in-16 sample of the
    filter columns (~0.3 ms at a million rows instead of ~4 ms); the allowed rows are counted
    exactly only when the estimate says they are few enough for exact search."""
    sketch_min_rows: int = 100_000
    """A warmed searcher holding the vectors of at least this many rows also keeps a binary
    sketch of each (`BinarySketch`) and answers from it instead of LanceDB's index: at a million
    rows 3-7 ms and recall 0.99+ against LanceDB's 10-22 ms (BENCHMARKS.md (search)). 0: never."""
    sketch_bits: int = 256
    """Bits per row of the sketch (32 bytes at 256)."""
    sketch_candidates: int = 1000
    """Rows the sketch hands to the exact re-ranking: at least this many, or 20 x k."""
    tuning: QueryTuning | None = None
    """Search knobs to use instead of those recorded with the index (benchmarks, tests)."""

    def __post_init__(self) -> None:
        if self.index_type not in VECTOR_INDEX_TYPES:
            raise StoreError(f"unknown vector index type {self.index_type!r}; "
                             f"choose one of {', '.join(VECTOR_INDEX_TYPES)}")
        if self.sketch_bits <= 0 or self.sketch_bits % 64:
            raise StoreError(f"sketch_bits must be a positive multiple of 64, got {self.sketch_bits}")
        if self.sketch_candidates < 1:
            raise StoreError(f"sketch_candidates must be at least 1, got {self.sketch_candidates}")


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
                             report.vector_build_s, rows, dim, store.version, store.lancedb_version())
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
    searches only the allowed rows: LanceDB's prefilter), `sketch` (a warmed searcher's binary
    sketch picks candidates among the allowed rows, re-ranked exactly)."""

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
        return self.method.startswith("ann") or self.method == "sketch"


_NO_TIME = np.iinfo(np.int64).min
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def _micros(when: datetime) -> int:
    """Microseconds since the epoch; a naive datetime is UTC, as `sql_literal` reads it."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return (when - _EPOCH) // timedelta(microseconds=1)


def _date_range_us(values: FilterValues) -> tuple[int, int] | None:
    """The inclusive range of `acquired` (microseconds) a filter's dates allow, None without
    dates. NULL dates are stored as _NO_TIME, below every start: never in a range, as in SQL."""
    if values.date_from is None and values.date_to is None:
        return None
    start = _micros(values.date_from) if values.date_from is not None else _NO_TIME + 1
    end = _micros(values.date_to) if values.date_to is not None else np.iinfo(np.int64).max
    return start, end


class FilterColumns:
    """The filter columns of every row of one table version, in memory (~60 bytes a row), so a
    filter's exact set of allowed rows costs milliseconds of numpy; LanceDB's scalar-index
    prefilter costs 35-200 ms at a million rows (BENCHMARKS.md (search)). The predicate mirrors
    `SearchFilters.where_clause` (SQL NULL semantics included); tests hold the two together."""

    COLUMNS = ("acquired", "min_lon", "min_lat", "max_lon", "max_lat", "cloud_fraction",
               "nodata_fraction", "source_id")
    SAMPLE_STRIDE = 16

    def __init__(self, store, table: pa.Table | None = None):
        """From `table` (these columns and `_rowid`, in row-id order) when given, else scanned."""
        self.version = store.version
        if table is None:
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

    def mask(self, values: FilterValues, positions: np.ndarray | slice | None = None) -> np.ndarray:
        """Which rows `values` allows: every row, or the rows at `positions` (in that order).
        The date test runs first and the others only on the rows it kept: a filter's later
        tests cost what its date window leaves, not a million comparisons each."""
        at = np.arange(*positions.indices(len(self))) if isinstance(positions, slice) else positions
        count = len(self) if at is None else len(at)
        tests = self._tests(values)
        if not tests:
            return np.ones(count, dtype=bool)
        survivors = at  # positions still in (None: all rows)
        with np.errstate(invalid="ignore"):  # NaN (SQL NULL) compares false, as in SQL
            for test in tests:
                kept = test(slice(None) if survivors is None else survivors)
                survivors = np.flatnonzero(kept) if survivors is None else survivors[kept]
                if len(survivors) == 0:
                    break
        keep = np.zeros(len(self), dtype=bool)
        keep[survivors] = True
        return keep if at is None else keep[at]

    def window_mask(self, values: FilterValues, start: int, stop: int, dates: bool = True) -> np.ndarray:
        """Which rows of positions start..stop `values` allows, every test run over contiguous
        slices of the columns (no gathering); `dates=False` skips the date test (the window is
        already a date range of date-ordered columns)."""
        keep = np.ones(stop - start, dtype=bool)
        with np.errstate(invalid="ignore"):  # NaN (SQL NULL) compares false, as in SQL
            for test in self._tests(values, dates):
                keep &= test(slice(start, stop))
        return keep

    def date_window(self, values: FilterValues) -> tuple[int, int]:
        """(start, stop) of the rows within `values`' date range; valid on date-ordered columns only."""
        dates = _date_range_us(values)
        if dates is None:
            return 0, len(self)
        start = int(np.searchsorted(self.acquired_us, dates[0], "left"))
        stop = int(np.searchsorted(self.acquired_us, dates[1], "right"))
        return start, max(start, stop)

    def reordered(self, order: np.ndarray) -> FilterColumns:
        """The same columns with rows in `order` (positions of these)."""
        copy = object.__new__(FilterColumns)
        copy.version, copy.source_names = self.version, self.source_names
        copy.row_ids, copy.acquired_us = self.row_ids[order], self.acquired_us[order]
        copy.bounds = {c: a[order] for c, a in self.bounds.items()}
        copy.cloud, copy.nodata = self.cloud[order], self.nodata[order]
        copy.source_codes = self.source_codes[order]
        return copy

    def _tests(self, values: FilterValues, dates: bool = True) -> list[Any]:
        """The filter as tests of rows at given positions, the usually most selective first."""
        tests = []
        date_range = _date_range_us(values) if dates else None
        if date_range is not None:
            start, end = date_range

            def in_range(at):
                acquired = self.acquired_us[at]
                return (acquired >= start) & (acquired <= end)
            tests.append(in_range)
        if values.bbox is not None:
            min_lon, min_lat, max_lon, max_lat = (float(v) for v in values.bbox)
            b = self.bounds

            def area(at):
                return ((b["max_lon"][at] >= min_lon) & (b["min_lon"][at] <= max_lon)
                        & (b["max_lat"][at] >= min_lat) & (b["min_lat"][at] <= max_lat))
            tests.append(area)
        if values.source_ids:
            codes = [i for i, name in enumerate(self.source_names) if name in set(values.source_ids)]
            tests.append(lambda at: np.isin(self.source_codes[at], codes))
        if values.max_cloud_fraction is not None:
            limit = float(values.max_cloud_fraction)
            tests.append(lambda at: np.isnan(self.cloud[at]) | (self.cloud[at] <= limit))
        if values.max_nodata_fraction is not None:
            tests.append(lambda at: self.nodata[at] <= float(values.max_nodata_fraction))
        return tests

    def estimate(self, values: FilterValues) -> int:
        """Rows `values` allows, estimated from every `SAMPLE_STRIDE`-th row."""
        sampled = self.mask(values, slice(None, None, self.SAMPLE_STRIDE))
        return round(float(sampled.mean()) * len(self)) if len(sampled) else 0

    def positions(self, row_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(positions in these columns, found) of `row_ids`; a position is meaningless where
        not found (a row id of another version)."""
        positions = np.searchsorted(self.row_ids, row_ids)
        found = positions < len(self.row_ids)
        found[found] = self.row_ids[positions[found]] == row_ids[found]
        return np.minimum(positions, max(0, len(self.row_ids) - 1)), found

    def allowed(self, values: FilterValues, row_ids: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        """Which of `row_ids` `values` allows (from `mask` of every row when it is at hand)."""
        positions, found = self.positions(row_ids)
        if not len(self.row_ids):
            return np.zeros(len(row_ids), dtype=bool)
        keep = mask[positions] if mask is not None else self.mask(values, positions)
        return keep & found


def _top(scores: np.ndarray, row_ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(row ids, cosine distances) of the k best `scores` (cosine similarities of `row_ids`);
    ties broken by the lower row id, as LanceDB breaks them."""
    k = min(k, len(scores))
    if k == 0:
        return np.zeros(0, np.uint64), np.zeros(0, np.float32)
    best = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
    best = best[np.lexsort((row_ids[best], -scores[best]))]
    return row_ids[best], (1.0 - scores[best]).astype(np.float32)


def _unit_query(query: np.ndarray) -> np.ndarray:
    return query.astype(np.float32) / max(float(np.linalg.norm(query)), 1e-30)


class MemoryVectors:
    """All vectors of a table version in memory, unit length, in row-id order: float32 for
    exact search (one matrix-vector product, several times faster than LanceDB's flat search
    on small tables), or float16 for re-ranking ANN candidates and exact search over the rows a
    filter allows, where their ~1e-4 error in a cosine distance does not reorder real neighbours."""

    def __init__(self, store, dtype: Any = np.float32):
        self.version = store.version
        self.row_ids, self.vectors = store.all_vectors(dtype=dtype, unit=True)

    @property
    def nbytes(self) -> int:
        return self.vectors.nbytes + self.row_ids.nbytes

    def scores(self, query: np.ndarray, positions: np.ndarray | None = None) -> np.ndarray:
        """Cosine similarities of `query` (unit length) to the rows at `positions` (all: None),
        in float32 arithmetic."""
        block = self.vectors if positions is None else self.vectors[positions]
        if block.dtype == np.float32:
            return block @ query
        if len(block) <= 2048:  # torch's thread pool costs more than it saves on a few rows
            return block.astype(np.float32) @ query
        # torch converts float16 with the CPU's vector instructions; numpy's astype is ~5x slower.
        return (torch.from_numpy(block).float() @ torch.from_numpy(query)).numpy()

    def top(self, query: np.ndarray, k: int, positions: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        query = _unit_query(query)
        if positions is None:
            positions = np.arange(len(self.row_ids))
        if self.vectors.dtype == np.float16 and len(positions) > 8 * k + 64:
            # torch's float16 product (float32 sums, float16 results: ~3e-4 off near 1) ranks
            # without converting the rows; the best 8 k are then scored in float32.
            block = torch.from_numpy(self.vectors[positions])
            rough = (block @ torch.from_numpy(query).half()).float().numpy()
            positions = positions[np.argpartition(-rough, 8 * k + 63)[:8 * k + 64]]
        return _top(self.scores(query, positions), self.row_ids[positions], k)


class BinarySketch:
    """256 bits per row of a warm table version, ordered by acquisition date, to pick candidates
    fast; `MemoryVectors` then re-ranks them exactly.

    The bits are signs of the centred vectors projected on their principal directions (fitted on
    a sample) and randomly rotated, so every bit carries a share of the variance; the Hamming
    distance between two rows then tracks the angle between them (SimHash on a PCA basis; RaBitQ
    and the 1-bit codes of Earth Index and TerraBit are the same idea). A query scores every
    allowed row: the rows of its date range are contiguous here, so the area, cloud and source
    tests and the distances run over plain array slices (numpy, split across threads), and the
    ~1000 nearest by Hamming distance go to the exact re-ranking. Unlike an IVF probe or a graph
    walk, no allowed row is skipped because of where it sits, so filters cost no recall; at a
    million 768-d rows the true top 10 is among those candidates 99 % of the time or more
    (BENCHMARKS.md (search))."""

    SAMPLE_ROWS = 50_000
    THREAD_MIN_ROWS = 100_000  # below this, one thread: the pool costs more than it saves

    def __init__(self, vectors: MemoryVectors, filters: FilterColumns, bits: int = 256, seed: int = 0):
        started = time.perf_counter()
        rows, dim = vectors.vectors.shape
        self.bits = bits
        rng = np.random.default_rng(seed)
        sample = vectors.vectors[np.sort(rng.choice(rows, min(rows, self.SAMPLE_ROWS), replace=False))]
        sample = sample.astype(np.float32)
        self.mean = sample.mean(axis=0)
        sample -= self.mean
        _, basis = np.linalg.eigh(sample.T @ sample)
        kept = min(dim, bits)
        principal = basis[:, ::-1][:, :kept]  # the `kept` directions of largest variance
        # An orthogonal rotation when there are as many directions as bits, else random
        # hyperplanes in the principal subspace.
        mixing = (np.linalg.qr(rng.standard_normal((bits, bits)))[0] if kept == bits
                  else rng.standard_normal((kept, bits)))
        self.projection = np.ascontiguousarray(principal @ mixing, dtype=np.float32)
        self.order = np.argsort(filters.acquired_us, kind="stable")
        self.filters = filters.reordered(self.order)
        codes = np.empty((rows, bits // 8), dtype=np.uint8)
        projection, mean = torch.from_numpy(self.projection), torch.from_numpy(self.mean)
        for start in range(0, rows, 65_536):
            positions = self.order[start:start + 65_536]
            block = torch.from_numpy(vectors.vectors[positions]).float() - mean
            codes[start:start + len(positions)] = np.packbits((block @ projection).numpy() > 0, axis=1)
        words = codes.view(np.uint64)
        self.words = [np.ascontiguousarray(words[:, w]) for w in range(words.shape[1])]
        self._threads = max(1, min(4, os.cpu_count() or 1))
        self._pool = ThreadPoolExecutor(self._threads)
        self.build_s = time.perf_counter() - started

    @property
    def nbytes(self) -> int:
        return (sum(w.nbytes for w in self.words) + self.order.nbytes + self.filters.nbytes
                + self.projection.nbytes)

    def _code(self, query: np.ndarray) -> np.ndarray:
        return np.packbits(((query - self.mean) @ self.projection) > 0).view(np.uint64)

    def _distances(self, code: np.ndarray, start: int, stop: int) -> np.ndarray:
        distances = np.zeros(stop - start, dtype=np.uint16)
        scratch = np.empty(stop - start, dtype=np.uint64)
        counts = np.empty(stop - start, dtype=np.uint8)
        for word, column in zip(code, self.words):
            np.bitwise_xor(column[start:stop], word, out=scratch)
            np.bitwise_count(scratch, out=counts)
            distances += counts
        return distances

    def _chunks(self, start: int, stop: int) -> list[tuple[int, int]]:
        pieces = 1 if stop - start < self.THREAD_MIN_ROWS else self._threads
        bounds = np.linspace(start, stop, pieces + 1).astype(int)
        return list(zip(bounds[:-1], bounds[1:]))

    def _map(self, work, chunks: list[tuple[int, int]]) -> list[Any]:
        """`work` of every chunk, the first on the calling thread (one hand-off fewer)."""
        others = [self._pool.submit(work, *chunk) for chunk in chunks[1:]]
        return [work(*chunks[0]), *(future.result() for future in others)]

    def search(self, query: np.ndarray, values: FilterValues | None, count: int,
               exact_max: int) -> tuple[np.ndarray, int | None, bool]:
        """(positions in row-id order as in `MemoryVectors`, rows `values` allows (None: no
        filter), whether those positions are every allowed row). Up to `exact_max` allowed rows
        all come back; more are narrowed down to at least `count` nearest `query` by Hamming
        distance (ties included). The date window is cut into one chunk per thread, each tested,
        scored and counted in one task."""
        if values is None:
            start, stop = 0, len(self.order)
        else:
            start, stop = self.filters.date_window(values)
        if stop <= start:
            return np.zeros(0, dtype=np.int64), 0, True
        chunks = self._chunks(start, stop)
        code = self._code(_unit_query(query))

        def score(a: int, b: int) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray]:
            allowed = None if values is None else self.filters.window_mask(values, a, b, dates=False)
            if allowed is not None and not allowed.any():
                return allowed, None, np.zeros(self.bits + 1, dtype=np.int64)
            distances = self._distances(code, a, b)
            if allowed is not None:
                np.copyto(distances, self.bits + 1, where=~allowed)
            return allowed, distances, np.bincount(distances, minlength=self.bits + 2)[:self.bits + 1]

        scored = self._map(score, chunks)
        histogram = np.sum([h for _, _, h in scored], axis=0)
        matches = None if values is None else int(histogram.sum())
        if matches is not None and matches <= exact_max:
            picked = [a + np.flatnonzero(allowed) for (a, _), (allowed, _, _) in zip(chunks, scored)]
            return self.order[np.concatenate(picked)], matches, True
        cutoff = min(int(np.searchsorted(np.cumsum(histogram), count)), self.bits)  # past: all allowed
        picked = [a + np.flatnonzero(distances <= cutoff)
                  for (a, _), (_, distances, _) in zip(chunks, scored) if distances is not None]
        return self.order[np.concatenate(picked)], matches, False


@dataclass
class WarmCache:
    """What a warmed searcher keeps of one table version (`VectorSearcher.warm_up`)."""

    version: int
    records: pa.Table
    """The warmed columns of every row, in row-id order (results are taken from here)."""
    filters: FilterColumns
    vectors: MemoryVectors | None
    """None when the vectors exceed `IndexPolicy.warm_cache_bytes`."""
    load_s: float
    sketch: BinarySketch | None = None
    """Kept from `IndexPolicy.sketch_min_rows` rows on, when the vectors are in memory."""

    @property
    def nbytes(self) -> int:
        return (self.records.nbytes + self.filters.nbytes + (self.vectors.nbytes if self.vectors else 0)
                + (self.sketch.nbytes if self.sketch else 0))

    def describe(self) -> dict[str, Any]:
        return {"version": self.version, "rows": self.records.num_rows, "load_s": round(self.load_s, 2),
                "bytes": self.nbytes,
                "vectors": None if self.vectors is None else str(self.vectors.vectors.dtype),
                "sketch": None if self.sketch is None else {"bits": self.sketch.bits,
                                                            "build_s": round(self.sketch.build_s, 2)}}


class _TableState:
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
        self.dim = store.config.embedding_dim
        self.fits_in_memory = self.rows * (self.dim * 4 + 8) <= policy.exact_cache_bytes


class VectorSearcher:
    """Answers nearest-neighbour queries over one table by the cheapest path that keeps the
    answer right. Without an index: exact search over vectors cached in memory. With one: the
    index (`ann`) when there is no filter; for a filter, its allowed rows come from filter
    columns cached in memory, then
      - few rows allowed (`exact_max_matches`): exact search over just those rows (a prefilter:
        LanceDB's for small tables, chipscout's by row id for large ones);
      - otherwise: the index over-fetches ~k * refine_factor / 2 / share candidates by its codes,
        the filter keeps the allowed ones and chipscout re-ranks those on their full vectors (a
        postfilter), asking again for more when too few survive, and falling back to LanceDB's
        own prefiltered search when over-fetching would cost more.
    `warm_up` (for long-running front ends) also keeps the result columns and, within
    `IndexPolicy.warm_cache_bytes`, the vectors in memory: candidates are then re-ranked and
    results read without touching disk, and exact search covers more filtered rows. From
    `IndexPolicy.sketch_min_rows` rows it also keeps a `BinarySketch`, which then answers every
    query instead of LanceDB: exact search when a filter allows few rows, else the sketch's
    candidates among the allowed rows, re-ranked exactly (`sketch`).
    Caches are per table version (`refresh` a store to see new commits). Thread-safe.
    Measured choices and their numbers: BENCHMARKS.md (search)."""

    def __init__(self, store, policy: IndexPolicy = DEFAULT_POLICY):
        self.store = store
        self.policy = policy
        self._lock = threading.Lock()
        self._state: _TableState | None = None
        self._filters: FilterColumns | None = None
        self._exact: MemoryVectors | None = None
        self._warm_columns: tuple[str, ...] | None = None
        self._warm: WarmCache | None = None

    def _current(self, version: int | None = None) -> _TableState:
        # Each `table.version` is a round trip to LanceDB's event loop (~0.1-2 ms): a query reads
        # it once and hands it on.
        version = self.store.version if version is None else version
        with self._lock:
            if self._state is None or self._state.version != version:
                self._state = _TableState(self.store, self.policy)
            return self._state

    def warm_up(self, columns: Sequence[str]) -> WarmCache:
        """Keep `columns` of every row, the filter columns and (when they fit the budget) the
        vectors of the table's current version in memory, reloading after each new version;
        returns what was loaded. Costs seconds at a million rows, so one-shot commands skip it."""
        wanted = tuple(dict.fromkeys([*columns, *FilterColumns.COLUMNS]))
        missing = [c for c in wanted if c not in self.store.schema.names]
        if missing:
            raise StoreError(f"cannot keep columns {missing} in memory: table "
                             f"{self.store.table_name!r} has no such columns")
        with self._lock:
            self._warm_columns = wanted
        cache = self._warm_cache(self.store.version)
        assert cache is not None
        return cache

    def _warm_cache(self, version: int) -> WarmCache | None:
        with self._lock:
            if self._warm_columns is None:
                return None
            if self._warm is None or self._warm.version != version:
                self._warm = None  # let the old arrays go before the new ones are read
                self._filters = self._exact = None
                started = time.perf_counter()
                records = self.store.scan_with_row_ids(list(self._warm_columns))
                filters = FilterColumns(self.store, records)
                dim = self.store.config.embedding_dim
                rows = records.num_rows
                dtype = (np.float32 if rows * dim * 4 <= self.policy.exact_cache_bytes
                         else np.float16 if rows * dim * 2 <= self.policy.warm_cache_bytes else None)
                vectors = MemoryVectors(self.store, dtype) if dtype is not None else None
                if vectors is not None and not np.array_equal(vectors.row_ids, filters.row_ids):
                    raise StoreError(f"table {self.store.table_name!r} changed while it was read; try again")
                sketch = None
                if (vectors is not None and self.policy.sketch_min_rows
                        and rows >= self.policy.sketch_min_rows):
                    sketch = BinarySketch(vectors, filters, self.policy.sketch_bits)
                # One chunk: `take` on a table of many chunks concatenates them first, every call.
                records = records.drop_columns(["_rowid"]).combine_chunks()
                self._warm = WarmCache(version, records, filters, vectors,
                                       time.perf_counter() - started, sketch)
            return self._warm

    def _filter_columns(self, version: int | None = None) -> FilterColumns:
        version = self.store.version if version is None else version
        warm = self._warm_cache(version)
        if warm is not None:
            return warm.filters
        with self._lock:
            if self._filters is None or self._filters.version != version:
                self._filters = None
                self._filters = FilterColumns(self.store)
            return self._filters

    def _memory_vectors(self, state: _TableState, warm: WarmCache | None) -> MemoryVectors | None:
        """The vectors in memory: the warm cache's, or float32 for exact search on a table
        without an index that fits `exact_cache_bytes`; None otherwise."""
        if warm is not None:
            return warm.vectors
        if state.index is not None or not state.fits_in_memory:
            return None
        with self._lock:
            if self._exact is None or self._exact.version != state.version:
                self._exact = None
                self._exact = MemoryVectors(self.store)
            return self._exact

    def matches(self, values: FilterValues) -> int:
        """How many rows `values` allows (exactly)."""
        return int(self._filter_columns().mask(values).sum())

    def plan(self, k: int, matches: int | None, in_memory: bool = False) -> SearchPlan:
        """The method for a query of `k` results whose filter allows `matches` rows (None: no
        filter), before any retry; `in_memory`: the searcher holds the vectors (`warm_up`)."""
        return self._plan(self._current(), k, matches, in_memory)

    def _plan(self, state: _TableState, k: int, matches: int | None, in_memory: bool) -> SearchPlan:
        if state.index is None:
            return SearchPlan("exact" if state.fits_in_memory or in_memory else "exact-scan", matches)
        if matches is None:
            return SearchPlan("ann", None, state.tuning, k)
        scan = state.rows <= self.policy.scan_max_rows and not in_memory
        exact_max = self.policy.warm_exact_max_matches if in_memory else self.policy.exact_max_matches
        if matches <= max(k, exact_max):
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

    def _wide_tuning(self, state: _TableState, share: float) -> QueryTuning:
        """Knobs for LanceDB's prefiltered ANN: the allowed rows nearest the query lie far out,
        in many partitions; probe 1 / sqrt(share) times as many (all, for 1 %)."""
        base = state.tuning
        assert base is not None and state.spec is not None
        if state.spec.index_type == "IVF_HNSW_SQ":
            return replace(base, ef=max(base.ef or 0, 4 * 64))
        probes = min(state.spec.num_partitions, math.ceil(base.nprobes / math.sqrt(max(share, 1e-6)) * 2))
        return replace(base, nprobes=probes)

    def _rows(self, row_ids: np.ndarray, distances: np.ndarray, columns: list[str],
              warm: WarmCache | None) -> pa.Table:
        """`columns` of `row_ids` with `_distance` = `distances`: from the warm cache when it
        holds them, else read from the table."""
        wanted = [c for c in columns if c != "_distance"]
        if warm is None or any(c not in warm.records.column_names for c in wanted):
            return self.store.take_rows(row_ids, distances, columns)
        positions, found = warm.filters.positions(row_ids)
        if not found.all():
            raise StoreError(f"table {self.store.table_name!r} changed during a query; try again")
        rows = warm.records.take(pa.array(positions)).select(wanted)
        rows = rows.append_column("_distance", pa.array(distances, pa.float32()))
        return rows.select(columns) if "_distance" in columns else rows

    def _rerank(self, vector: np.ndarray, row_ids: np.ndarray, k: int,
                warm: WarmCache | None) -> tuple[np.ndarray, np.ndarray]:
        """The k of `row_ids` nearest `vector` by their full vectors (in memory when warm)."""
        if warm is not None and warm.vectors is not None:
            positions, found = warm.filters.positions(row_ids)
            positions = positions[found]
            return warm.vectors.top(vector, k, positions)
        vectors = unit_rows(self.store.vectors_by_row_id(row_ids))
        return _top(vectors @ _unit_query(vector), row_ids, k)

    def _count(self, state: _TableState, filters: FilterColumns, values: FilterValues,
               k: int, in_memory: bool) -> tuple[int, np.ndarray | None]:
        """(rows allowed, mask of every row or None): exact, except for a large indexed table
        whose sample says the allowed rows are too many for exact search anyway."""
        if state.index is None or state.rows <= self.policy.exact_count_rows:
            mask = filters.mask(values)
            return int(mask.sum()), mask
        estimate = filters.estimate(values)
        exact_max = self.policy.warm_exact_max_matches if in_memory else self.policy.exact_max_matches
        if estimate > 2 * max(k, exact_max):
            return estimate, None
        mask = filters.mask(values)
        return int(mask.sum()), mask

    def nearest(self, vector: np.ndarray, k: int, values: FilterValues | None, where: str | None,
                columns: list[str], near: SearchPlan | None = None) -> tuple[pa.Table, SearchPlan]:
        """The k nearest rows (`columns` plus `_distance`, nearest first) that `values` allows,
        and how they were found. `where` is the same filter as SQL, for LanceDB's own paths.
        `near`: the plan of an earlier query with the same filter whose neighbourhood holds this
        one's (query expansion's second search); a warm sketch then re-ranks that query's
        candidates instead of scanning the sketch again, when they are enough for k."""
        version = self.store.version
        rows, plan = self._nearest(version, vector, k, values, where, columns, near)
        return rows, replace(plan, table_version=version)

    def warm_vectors(self, plan: SearchPlan, rows: Sequence[int]) -> np.ndarray | None:
        """The unit vectors (float32) of rows `rows` (indices into the table `nearest` returned
        with `plan`) from the warm cache; None when that query did not run on it."""
        with self._lock:
            warm = self._warm
        if (plan.positions is None or warm is None or warm.version != plan.table_version
                or warm.vectors is None):
            return None  # not a warm query, or the cache has moved on to a newer version
        return warm.vectors.vectors[plan.positions[np.asarray(rows, dtype=np.int64)]].astype(np.float32)

    def _sketch_search(self, warm: WarmCache, memory: MemoryVectors, vector: np.ndarray, k: int,
                       values: FilterValues | None, columns: list[str],
                       near: SearchPlan | None = None) -> tuple[pa.Table, SearchPlan]:
        """A warmed searcher's query: the allowed rows from the sketch's date-ordered filter
        columns; up to twice the candidates it would pick are all re-ranked (exact), more are
        narrowed down by the sketch first. With `near` (see `nearest`), its candidates."""
        assert warm.sketch is not None
        wanted = max(self.policy.sketch_candidates, 20 * k)
        if (near is not None and near.candidates is not None and near.table_version == warm.version
                and (near.method == "exact" or len(near.candidates) >= wanted)):
            positions, matches, method = near.candidates, near.matches, near.method
        else:
            # Re-ranking every allowed row costs little more than re-ranking `wanted` of them
            # when they are at most twice as many, and is exact.
            positions, matches, exact = warm.sketch.search(vector, values, wanted, 2 * wanted)
            method = "exact" if exact else "sketch"
        row_ids, distances = memory.top(vector, k, positions)
        found, _ = warm.filters.positions(row_ids)
        return (self._rows(row_ids, distances, columns, warm),
                SearchPlan(method, matches, candidates=positions, positions=found))

    def _nearest(self, version: int, vector: np.ndarray, k: int, values: FilterValues | None,
                 where: str | None, columns: list[str],
                 near: SearchPlan | None = None) -> tuple[pa.Table, SearchPlan]:
        state = self._current(version)
        warm = self._warm_cache(version)
        values = None if values is None or values.empty else values
        memory = self._memory_vectors(state, warm)
        if warm is not None and warm.sketch is not None and memory is not None:
            return self._sketch_search(warm, memory, vector, k, values, columns, near)
        in_memory = memory is not None
        filters = mask = matches = None
        if values is not None:
            filters = self._filter_columns(version)
            matches, mask = self._count(state, filters, values, k, in_memory)
        plan = self._plan(state, k, matches, in_memory)
        if matches == 0:
            return self._rows(np.zeros(0, np.uint64), np.zeros(0, np.float32), columns, warm), plan
        if plan.method == "exact" and memory is not None:
            positions = None if mask is None else np.flatnonzero(mask)  # same row-id order
            row_ids, distances = memory.top(vector, k, positions)
            return self._rows(row_ids, distances, columns, warm), plan
        if plan.method == "exact":
            assert filters is not None and mask is not None
            allowed_ids = filters.row_ids[mask]
            vectors = unit_rows(self.store.vectors_by_row_id(allowed_ids))
            row_ids, distances = _top(vectors @ _unit_query(vector), allowed_ids, k)
            return self._rows(row_ids, distances, columns, warm), plan
        if plan.method == "exact-scan":
            return self.store.nearest(vector, k, where, columns, use_index=False), plan
        refine = (state.tuning.refine_factor if state.tuning else None) or 1
        if plan.method == "ann":
            if in_memory and plan.tuning is not None:
                # The index's codes pick k * refine_factor candidates; the vectors in memory re-rank.
                fetch = k * refine
                candidates, _ = self.store.nearest_row_ids(vector, fetch, replace(plan.tuning, refine_factor=None))
                if len(candidates) >= min(fetch, state.rows):
                    ids, distances = self._rerank(vector, candidates, k, warm)
                    return self._rows(ids, distances, columns, warm), plan
            else:
                rows = self.store.nearest(vector, k, None, columns, tuning=plan.tuning)
                if rows.num_rows >= min(k, state.rows):
                    return rows, plan
            # k beyond what the probed partitions hold (k near the table's size): exact search.
            if memory is not None:
                ids, distances = memory.top(vector, k)
                return self._rows(ids, distances, columns, warm), SearchPlan("exact", None)
            plan = SearchPlan("exact-scan", None)
            return self.store.nearest(vector, k, None, columns, use_index=False), plan
        assert filters is not None and values is not None and matches is not None
        if plan.method == "ann-postfilter":
            # Candidates by the index's codes, the filter from memory, then an exact re-rank of
            # the allowed candidates (at most k * refine_factor) on their full vectors.
            fetch = plan.fetch
            while True:
                row_ids, _ = self.store.nearest_row_ids(vector, fetch, plan.tuning)
                allowed_ids = row_ids[filters.allowed(values, row_ids, mask)][:k * refine]
                if len(allowed_ids) >= min(k, matches):
                    ids, distances = self._rerank(vector, allowed_ids, k, warm)
                    return self._rows(ids, distances, columns, warm), replace(plan, fetch=fetch)
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
