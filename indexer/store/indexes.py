"""Indexes of a chip table (the write path): which vector index to build, when, with which
parameters; BTREE indexes for the filter columns; compaction; the record of every build.

Policy lives here; the LanceDB calls live in `chipscout.indexer.store.chip_store`. Every build is recorded
(type, parameters, rows, seconds, lancedb version) in the companion table `<table>__indexes`, which
`chipscout info` reports beside LanceDB's own index statistics. How a query uses the indexes is
`chipscout.indexer.search.planner`'s business; `IndexPolicy` holds the knobs of both.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa

from chipscout.indexer.errors import StoreError


#: Vector index types chipscout builds. IVF_RQ (RaBitQ codes) builds fastest for its recall;
#: IVF_PQ is the classic compressed index; IVF_HNSW_SQ is a graph per IVF partition.
VECTOR_INDEX_TYPES = ("IVF_RQ", "IVF_PQ", "IVF_HNSW_SQ")
DEFAULT_INDEX_TYPE = "IVF_RQ"

#: Columns the search filters read (`chipscout.indexer.search.filters.SearchFilters`), plus the id columns that
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
    """The memory budget of a warmed searcher (`VectorSearcher.warm_up`: the app, long-running
    services; `--memory`): everything it holds, filter columns, sketch, vectors and result
    columns together. Within it the vectors are kept for re-ranking and exact search over
    filtered rows at the best tier that fits: float32 (also within `exact_cache_bytes`), float16,
    int8 with per-dimension scales, or only the sketch, its candidates re-ranked from disk
    (`chipscout.indexer.search.warm.plan_warm`; docs/sizing.md). A million 768-d rows as float16
    with their result columns: 1.9 GiB."""
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
    """Rows the sketch hands to the exact re-ranking: at least this many, or 20 x k, or one per
    `sketch_rows_per_candidate` rows of the table."""
    sketch_rows_per_candidate: int = 2_000
    """The sketch's candidate count grows with the table beyond `sketch_candidates` x this many
    rows (2M at the defaults): the more rows, the more of them share a Hamming distance with the
    true neighbours. At 10M x 64-d, 1000 candidates kept recall@10 at 0.83-0.98 and 5000 (this
    rule) at 0.96-1.00, for 1-7 ms more per query (BENCHMARKS.md "Ten million chips")."""
    partition_min_rows: int = 0
    """From this many rows (0: never, the default) a warmed searcher holding the vectors (float32,
    float16 or int8) partitions them into k-means lists (`chipscout.indexer.search.partitions`)
    instead of keeping the sketch: a query scores the rows of its nearest lists, not every allowed
    row. Off by default: at 10M x 64-d on 2 busy cores its warm-up took 14 minutes (the sketch's:
    1-2) for query times and recall no better than the sketch's (BENCHMARKS.md "Ten million
    chips"); 2,000,000 is the size it was designed for."""
    partition_list_rows: int = 2_500
    """Rows per list of the partitioned tier (N / this many lists)."""
    partition_probe_rows: int = 150_000
    """The partitioned tier probes lists, nearest first, until this many rows are scored; under a
    filter, this many x sqrt(share) allowed rows (the share seen in the lists probed so far)."""
    partition_min_probes: int = 32
    """Lists a partitioned query probes at least (its first step)."""
    partition_exact_rows: int = 200_000
    """A filter whose date range holds at most about this many rows (of a partitioned table) is
    answered exactly: every row in its dates tested, the allowed ones scored."""
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
        for name in ("sketch_rows_per_candidate", "partition_list_rows", "partition_probe_rows", "partition_min_probes"):
            if getattr(self, name) < 1:
                raise StoreError(f"{name} must be at least 1, got {getattr(self, name)}")


DEFAULT_POLICY = IndexPolicy()

_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40,
               "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_memory(value: Any) -> int:
    """Bytes of a memory budget: a whole number of bytes, or a number with a unit (`500MB`,
    `2GiB`, `1.5G`; KB/MB/GB are powers of 1000, KiB/MiB/GiB and K/M/G powers of 1024)."""
    if isinstance(value, bool):
        raise StoreError(f"memory budget {value!r} is not a size; give bytes or e.g. 500MB, 2GiB")
    if isinstance(value, int):
        size = value
    else:
        match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([a-zA-Z]*)\s*", str(value))
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _SIZE_UNITS:
            raise StoreError(f"memory budget {value!r} is not a size; give bytes or e.g. 500MB, 2GiB")
        size = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if size <= 0:
        raise StoreError(f"memory budget {value!r} must be more than 0 bytes")
    return size


def with_memory(policy: IndexPolicy, memory: Any) -> IndexPolicy:
    """`policy` under a memory budget (`parse_memory`; None: the policy as it is): the warm
    path holds at most that much, and the cold path's float32 cache of a small table too."""
    if memory is None:
        return policy
    budget = parse_memory(memory)
    return replace(policy, warm_cache_bytes=budget, exact_cache_bytes=min(policy.exact_cache_bytes, budget))


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
