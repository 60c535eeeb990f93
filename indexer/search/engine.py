"""The search API every front end uses: nearest chips of a chip or vector, with typed filters.

Inputs are validated here and turned into typed values; `chipscout.indexer.store` turns them into LanceDB
filters through `sql_literal`, so user text never becomes query syntax.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo
from typing import Any

import numpy as np
import pyarrow as pa
import shapely
from shapely.geometry import Polygon

from chipscout.indexer.chips import validate_chip_id
from chipscout.indexer.errors import QueryError
from chipscout.indexer.geo import BBox, BBoxLike, parse_place  # noqa: F401  (BBox re-exported: callers import it with the engine)
from chipscout.indexer.sensors import ProductNote, product_note
from chipscout.indexer.search.expansion import default_expansion, expand_query, validate_expand, whole_number
from chipscout.indexer.search.filters import SearchFilters
from chipscout.indexer.search.planner import SearchPlan, TableState
from chipscout.indexer.search.sharded import ShardedSearcher
from chipscout.indexer.search.spread import Spread
from chipscout.indexer.search.warm import VectorSearcher
from chipscout.indexer.search.warm_files import searcher_for
from chipscout.indexer.store import DEFAULT_TABLE, ChipStore, IndexConfig, unit_rows
from chipscout.indexer.store.indexes import DEFAULT_POLICY, IndexPolicy, with_memory

MAX_K = 10_000
#: Overlap below this share of the query's area is rounding at shared edges, not overlap.
_OVERLAP_TOLERANCE = 1e-6

#: The columns a `ChipRecord` is built from (`_records`), read for every result: a warm query on
#: a table beyond the memory budget takes them from disk, at ~0.5-1 ms a column for 10 rows of a
#: 10M-row table. The footprint's bounds (`min_lon` ...) are not among them: `ChipRecord.bbox`
#: comes from the footprint, and the filters read them from the filter columns.
METADATA_COLUMNS = [
    "chip_id", "footprint", "center_lon", "center_lat", "acquired", "source_id", "source_path",
    "sensor", "crs", "row_off", "col_off", "size_px", "gsd_m", "nodata_fraction", "cloud_fraction",
]


@dataclass(frozen=True)
class ChipRecord:
    chip_id: str
    source_id: str
    sensor: str
    footprint: Polygon
    center_lon: float
    center_lat: float
    acquired: datetime | None
    nodata_fraction: float
    cloud_fraction: float | None
    size_px: int
    gsd_m: float
    crs: str
    row_off: int
    col_off: int
    source_path: str

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        return tuple(self.footprint.bounds)  # type: ignore[return-value]

    def to_dict(self) -> dict[str, Any]:
        return {
            "chip_id": self.chip_id, "source_id": self.source_id, "sensor": self.sensor,
            "footprint_wkt": self.footprint.wkt, "center_lon": self.center_lon,
            "center_lat": self.center_lat,
            "acquired": self.acquired.isoformat() if self.acquired else None,
            "nodata_fraction": self.nodata_fraction, "cloud_fraction": self.cloud_fraction,
            "size_px": self.size_px, "gsd_m": self.gsd_m, "crs": self.crs,
            "row_off": self.row_off, "col_off": self.col_off, "source_path": self.source_path,
        }


@dataclass(frozen=True)
class SearchResult:
    rank: int
    chip: ChipRecord
    distance: float
    """Cosine distance (0 = same direction, 2 = opposite)."""

    @property
    def similarity(self) -> float:
        return 1.0 - self.distance

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "similarity": round(self.similarity, 6),
                "distance": round(self.distance, 6), **self.chip.to_dict()}


@dataclass(frozen=True)
class SearchResponse:
    query_chip_id: str | None
    results: list[SearchResult]
    elapsed_ms: float
    used_index: bool
    """True when an ANN index answered; False for exact (flat) search."""
    table_version: int
    filters: SearchFilters = field(default_factory=SearchFilters)
    method: str = "exact"
    """How the results were found (`chipscout.indexer.search.planner.SearchPlan.method`): `exact`,
    `exact-scan`, `ann`, `ann-postfilter`, `ann-prefilter`, `sketch` or `exact-sharded` (on a Dask
    cluster); `+expanded:m` after query expansion."""
    expansion: int = 0
    """Results folded into the query by query expansion (0: none)."""

    def to_dict(self) -> dict[str, Any]:
        return {"query_chip_id": self.query_chip_id, "elapsed_ms": round(self.elapsed_ms, 2),
                "used_index": self.used_index, "method": self.method, "expansion": self.expansion,
                "table_version": self.table_version,
                "results": [r.to_dict() for r in self.results]}


#: `ChipRecord`'s fields in order, footprint aside: each read as one column.
_RECORD_FIELDS = ("chip_id", "source_id", "sensor", "center_lon", "center_lat", "acquired", "nodata_fraction",
                  "cloud_fraction", "size_px", "gsd_m", "crs", "row_off", "col_off", "source_path")


def _records(rows: pa.Table) -> list[ChipRecord]:
    """The rows as records, column by column (a warm query's largest cost after its math was
    the row-by-row building: `to_pydict` of every column and keyword arguments per record).
    The schema's Arrow types (`store.config`) give Python floats and ints as the fields want."""
    if not rows.num_rows:
        return []
    footprints = shapely.from_wkb(rows["footprint"].to_numpy(zero_copy_only=False))
    (chip_id, source_id, sensor, center_lon, center_lat, acquired, nodata, cloud, size_px, gsd_m, crs,
     row_off, col_off, source_path) = (rows[name].to_pylist() if name != "acquired" else _datetimes(rows[name])
                                       for name in _RECORD_FIELDS)
    return [ChipRecord(*fields) for fields in zip(
        chip_id, source_id, sensor, footprints, center_lon, center_lat, acquired, nodata, cloud, size_px,
        gsd_m, crs, row_off, col_off, source_path)]


def _datetimes(column: pa.ChunkedArray) -> list[datetime | None]:
    """A timestamp column (UTC or naive, as the schema's) as the datetimes `to_pylist` gives,
    from the microseconds: pyarrow's own conversion of a zoned column costs ~6 us a value."""
    unit, zone = column.type.unit, column.type.tz
    if unit not in _UNIT_US or zone not in (None, "UTC"):  # wall-clock arithmetic holds in UTC only
        return column.to_pylist()
    epoch = datetime(1970, 1, 1, tzinfo=ZoneInfo(zone) if zone else None)
    scale = _UNIT_US[unit]
    return [None if v is None else epoch + timedelta(microseconds=v * scale)
            for v in column.cast(pa.int64()).to_pylist()]


_UNIT_US = {"s": 1_000_000, "ms": 1_000, "us": 1}


def _checked_filters(filters: Any) -> SearchFilters:
    if filters is None:
        return SearchFilters()
    if not isinstance(filters, SearchFilters):
        raise QueryError(f"filters must be built with SearchFilters.build, got {type(filters).__name__}")
    return filters


def validate_k(k: Any) -> int:
    return whole_number(k, "k", 1, MAX_K)


class SearchEngine:
    """Nearest-neighbour search over one chip table."""

    def __init__(self, db_uri: str, table_name: str = DEFAULT_TABLE,
                 storage_options: dict[str, str] | None = None, index_policy: IndexPolicy | None = None,
                 memory: int | str | None = None, cluster: str | None = None, scheduler: str | None = None):
        """`cluster` (`local` or `local:N` worker processes on this machine) or `scheduler`
        (`tcp://HOST:PORT` of a running Dask cluster): search on a cluster, the table's fragments
        split among its workers (`chipscout.indexer.search.sharded`); `close()` lets it go.
        `memory`: the warm path's budget in bytes, or a size such as `500MB`, `2GiB`
        (`IndexPolicy.warm_cache_bytes`, 2 GiB by default; docs/sizing.md)."""
        policy = with_memory(index_policy or DEFAULT_POLICY, memory)  # a bad size fails before opening
        self.store = ChipStore(db_uri, table_name, storage_options)
        self.store.ensure_exists()  # fail early, with the list of tables, when it is missing
        self._cluster = ExitStack()
        self.searcher: VectorSearcher | ShardedSearcher
        if cluster or scheduler:
            from chipscout.indexer.dask_client import dask_client  # here: Dask only for a cluster

            client = self._cluster.enter_context(dask_client(cluster, scheduler))
            self.searcher = ShardedSearcher(self.store, client, METADATA_COLUMNS,  # `memory`: per worker
                                            policy.warm_cache_bytes if memory is not None else None)
        else:
            self.searcher = searcher_for(self.store, policy)  # s3://: a local copy of the warm cache

    def close(self) -> None:
        """Let go of the Dask cluster of a sharded engine (a `local` one is shut down)."""
        self._cluster.close()

    def __enter__(self) -> SearchEngine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def config(self) -> IndexConfig:
        return self.store.config

    def count(self) -> int:
        return self.store.count()

    def refresh(self) -> None:
        """See commits made by other writers since this engine was opened (the next query reads
        the new version)."""
        self.store.refresh()
        self.searcher.forget_version()

    def warm_plan(self) -> dict[str, Any]:
        """What `warm_up` would hold under the memory budget, without loading anything: the
        vector tier (float32, float16, int8, disk, none), whether the sketch and the result
        columns are kept, the bytes of each part and why (`chipscout info`). A sharded engine:
        what its shards hold."""
        if isinstance(self.searcher, ShardedSearcher):
            return self.searcher.describe()
        return self.searcher.warm_plan(METADATA_COLUMNS).describe()

    def warm_up(self, wait: bool = True) -> dict[str, Any]:
        """Keep what queries read in memory within the memory budget (`memory`,
        `IndexPolicy.warm_cache_bytes`): filter columns, from `IndexPolicy.sketch_min_rows` rows a
        binary sketch, the vectors at the best tier that fits and the result columns when they
        fit (`plan` in the answer says what and why), for front ends that answer many queries: at a million rows a filtered query
        drops from ~40 ms to 5-10 ms (BENCHMARKS.md (search)), for ~20 s of loading and ~1.9 GiB.
        Reloaded after the table changes. Returns what was loaded.

        `wait=False` loads in a background thread (now and after each new table version) and
        returns at once (`{"loading": True}` until loaded); meanwhile queries are answered
        without the cache, with the same results a cold engine gives."""
        cache = self.searcher.warm_up(METADATA_COLUMNS, wait=wait)
        return cache.describe() if cache is not None else {"loading": True}

    def get_chip(self, chip_id: str) -> ChipRecord:
        rows = self.store.fetch([validate_chip_id(chip_id)], METADATA_COLUMNS)
        if rows.num_rows == 0:
            raise QueryError(f"no chip {chip_id!r} in table {self.store.table_name!r}")
        return _records(rows)[0]

    def get_vector(self, chip_id: str) -> np.ndarray:
        rows = self.store.fetch([validate_chip_id(chip_id)], ["chip_id", "vector"])
        if rows.num_rows == 0:
            raise QueryError(f"no chip {chip_id!r} in table {self.store.table_name!r}")
        return np.asarray(rows["vector"][0].as_py(), dtype=np.float32)

    def get_chips(self, chip_ids: Sequence[str]) -> list[ChipRecord]:
        """The records of `chip_ids` that exist, in the order asked (unknown ids left out)."""
        ids = list(dict.fromkeys(validate_chip_id(c) for c in chip_ids))
        by_id: dict[str, ChipRecord] = {}
        for start in range(0, len(ids), 500):  # one modest IN (...) filter per chunk
            by_id.update((r.chip_id, r) for r in _records(self.store.fetch(ids[start:start + 500],
                                                                           METADATA_COLUMNS)))
        return [by_id[c] for c in ids if c in by_id]

    def vectors(self, chip_ids: Sequence[str]) -> tuple[list[str], np.ndarray]:
        """Stored vectors of the chips that exist: (their ids in the order asked, (n, D) float32)."""
        return self.store.vectors([validate_chip_id(c) for c in chip_ids])

    def thumbnails(self, chip_ids: Sequence[str]) -> dict[str, bytes | None]:
        ids = [validate_chip_id(c) for c in chip_ids]
        rows = self.store.fetch(ids, ["chip_id", "thumbnail"])
        return dict(zip(rows["chip_id"].to_pylist(), rows["thumbnail"].to_pylist()))

    @property
    def product(self) -> ProductNote | None:
        """The published embedding product the table holds (None for tables of imagery)."""
        config = self.config
        if config.encoder != "imported" and config.normalization.kind != "none":
            return None
        return product_note(str(config.encoder_config.get("product", config.encoder)), config.encoder_label)

    def chip_at(self, place: BBoxLike) -> ChipRecord:
        """The chip a point `LON,LAT` falls in, or that covers most of a box (`geo.parse_place`),
        to use as a query example; of several (overlapping grids) the one whose centre is nearest."""
        box = parse_place(place)
        where = (f"min_lon <= {box.max_lon!r} AND max_lon >= {box.min_lon!r} "
                 f"AND min_lat <= {box.max_lat!r} AND max_lat >= {box.min_lat!r}")
        candidates = _records(self.store.scan(METADATA_COLUMNS, where=where))
        area = shapely.box(*box.as_tuple())
        point = area.centroid if area.area > 0 else shapely.Point(box.min_lon, box.min_lat)

        def overlap(chip: ChipRecord) -> float:
            if area.area > 0:
                return chip.footprint.intersection(area).area
            return 1.0 if chip.footprint.covers(point) else 0.0

        scored = [(overlap(c), -shapely.Point(c.center_lon, c.center_lat).distance(point), c.chip_id, c)
                  for c in candidates]
        scored = [s for s in scored if s[0] > 0]
        if not scored:
            what = (f"point {box.min_lon:g},{box.min_lat:g}" if area.area == 0
                    else f"box {','.join(f'{v:g}' for v in box.as_tuple())}")
            raise QueryError(f"no chip of table {self.store.table_name!r} covers the {what}")
        return max(scored, key=lambda s: (s[0], s[1], s[2]))[3]

    def sample(self, n: int, seed: int = 0, offset: int = 0) -> list[ChipRecord]:
        """A reproducible pseudo-random page of chips (for galleries)."""
        total = self.count()
        if total == 0 or n <= 0:
            return []
        rng = np.random.default_rng(seed)
        order = rng.permutation(total)
        positions = sorted(int(p) for p in order[offset: offset + n])
        if not positions:
            return []
        ids = self.store.take_offsets(positions, ["chip_id"])["chip_id"].to_pylist()
        rows = self.store.fetch(ids, METADATA_COLUMNS)
        by_id = {r.chip_id: r for r in _records(rows)}
        return [by_id[i] for i in ids if i in by_id]

    def diverse_sample(self, n: int, seed: int = 0, pool_size: int = 4000) -> list[ChipRecord]:
        """`n` chips that look unlike each other, for a gallery's first page: k-means (k = n) on
        the vectors of a seeded random pool of `pool_size` chips, and from each cluster the chip
        nearest its centre, the largest clusters first. A random page of a scene that is mostly
        water is mostly water; this shows one of each kind of place."""
        total = self.count()
        if total <= n or n <= 1:
            return self.sample(n, seed=seed)
        from sklearn.cluster import KMeans  # here: a search by chip id never needs it

        positions = sorted(int(p) for p in np.random.default_rng(seed).permutation(total)[:pool_size])
        ids, vectors = self.store.vectors(self.store.take_offsets(positions, ["chip_id"])["chip_id"].to_pylist())
        if len(ids) <= n:
            return self.sample(n, seed=seed)
        vectors = unit_rows(vectors)
        kmeans = KMeans(n_clusters=n, n_init=1, random_state=seed).fit(vectors)
        distances = np.linalg.norm(vectors - kmeans.cluster_centers_[kmeans.labels_], axis=1)
        sizes = np.bincount(kmeans.labels_, minlength=n)
        chosen = []
        for cluster in np.argsort(-sizes, kind="stable"):
            members = np.flatnonzero(kmeans.labels_ == cluster)
            if len(members):
                chosen.append(ids[members[np.argmin(distances[members])]])
        by_id = {r.chip_id: r for r in _records(self.store.fetch(chosen, METADATA_COLUMNS))}
        return [by_id[i] for i in chosen if i in by_id]

    @property
    def default_expand(self) -> int:
        """The query expansion a search gets when it passes `expand=None`: the table's encoder
        family's measured default (`DEFAULT_EXPANSION`; 5 for RCF tables with a vector transform,
        else 0)."""
        return _default_expand(self.config)

    def similar_to_chip(self, chip_id: str, k: int = 10, filters: SearchFilters | None = None,
                        expand: int | None = None, spread: Spread | None = None) -> SearchResponse:
        """The k chips nearest `chip_id` that `filters` allow (never the chip itself). `expand` > 0
        runs alpha-query expansion (`chipscout.indexer.search.expansion`): the chip's vector plus
        its `expand` nearest allowed chips, weighted by similarity ** `QE_ALPHA`, is searched again
        (two searches; on EuroSAT +0.01 precision@10 and +0.02 mAP, BENCHMARKS.md (quality)).
        None: `default_expand`; 0: the plain nearest neighbours of the chip. `spread`: at most
        `spread.per_cell` results per grid cell of `spread.cell_km` (`chipscout.indexer.search.spread`)."""
        filters = _checked_filters(filters)
        state = self.searcher.state()  # the one read of the table version this query makes
        expand = self._resolved_expand(expand, state)
        query = self.get_chip(chip_id)
        vector = self.get_vector(chip_id)
        return self._spread_search(vector, k, filters, query, (), expand, spread, state.version)

    def similar_to_vector(self, vector: Sequence[float] | np.ndarray, k: int = 10,
                          filters: SearchFilters | None = None, exclude_ids: Sequence[str] = (),
                          expand: int | None = None, spread: Spread | None = None) -> SearchResponse:
        """The k chips nearest `vector` (any length; its direction counts) that `filters` allow,
        leaving out `exclude_ids`; `expand` and `spread` as in `similar_to_chip`, so a stored
        chip's vector finds what its id finds."""
        # The table version is read once per query (a round trip to LanceDB's event loop, ~0.2 ms
        # quiet and several ms on a busy machine) and handed down; the config comes with it.
        state = self.searcher.state()
        unit = _unit_query_vector(vector, state.config.embedding_dim)
        filters = _checked_filters(filters)
        if filters.exclude_overlapping:
            raise QueryError("exclude_overlapping needs a query chip; search by chip id instead")
        if isinstance(exclude_ids, (str, bytes)) or not isinstance(exclude_ids, (Sequence, set, frozenset)):
            raise QueryError(f"ids to exclude must be a list of chip ids, got {exclude_ids!r}")
        expand = self._resolved_expand(expand, state)
        return self._spread_search(unit, k, filters, None, [validate_chip_id(c) for c in exclude_ids],
                                   expand, spread, state.version)

    def _resolved_expand(self, expand: Any, state: TableState) -> int:
        return _default_expand(state.config) if expand is None else validate_expand(expand)

    def _spread_search(self, vector: np.ndarray, k: int, filters: SearchFilters, query: ChipRecord | None,
                       exclude_ids: Sequence[str], expand: int, spread: Spread | None,
                       version: int) -> SearchResponse:
        """`_expanded_search`, spread when asked: more neighbours than k are searched for (growing
        fourfold) until k survive the spreading or the table runs out; elapsed_ms sums every round."""
        if spread is None:
            return self._expanded_search(vector, k, filters, query, exclude_ids, expand, version)
        if not isinstance(spread, Spread):
            raise QueryError(f"spread must be a Spread(cell_km, per_cell), got {type(spread).__name__}")
        k = validate_k(k)
        fetch = min(max(4 * k, k + 16), MAX_K)
        elapsed_ms = 0.0
        while True:
            response = self._expanded_search(vector, fetch, filters, query, exclude_ids, expand, version)
            elapsed_ms += response.elapsed_ms
            kept = spread.apply(response.results)
            if len(kept) >= k or len(response.results) < fetch or fetch >= MAX_K:
                break
            fetch = min(fetch * 4, MAX_K)
        return replace(response, results=kept[:k], elapsed_ms=elapsed_ms)

    def _expanded_search(self, vector: np.ndarray, k: int, filters: SearchFilters,
                         query: ChipRecord | None, exclude_ids: Sequence[str],
                         expand: int, version: int) -> SearchResponse:
        if expand == 0:
            return self._search(vector, k, filters, query, version, exclude_ids)[0]
        k = validate_k(k)
        started = time.perf_counter()
        first, plan, kept_rows = self._search(vector, expand, filters, query, version, exclude_ids)
        ids = [r.chip.chip_id for r in first.results]
        similarity = np.array([r.similarity for r in first.results])
        # A warm searcher has the vectors in memory; else read them (those the table compares).
        stored = self.searcher.warm_vectors(plan, kept_rows) if ids else None
        if stored is None and ids:
            found, stored = self.store.vectors(ids)
            similarity = similarity[[ids.index(c) for c in found]]
            ids = found
        if ids:
            vector = expand_query(vector, similarity, unit_rows(stored)).astype(np.float32)
        # The expanded query lies among the first one's neighbours: a warm sketch re-ranks the
        # first search's candidates rather than scanning again (BENCHMARKS.md (search)): at 1M
        # rows unfiltered ~2 ms instead of ~8, recall 0.977 against exact expansion (0.990).
        second = self._search(vector, k, filters, query, version, exclude_ids, near=plan)[0]
        return replace(second, elapsed_ms=(time.perf_counter() - started) * 1000,
                       used_index=first.used_index or second.used_index,
                       method=f"{second.method}+expanded:{len(ids)}", expansion=len(ids))

    def _search(self, vector: np.ndarray, k: int, filters: SearchFilters, query: ChipRecord | None,
                version: int, exclude_ids: Sequence[str] = (), near: SearchPlan | None = None
                ) -> tuple[SearchResponse, SearchPlan, list[int]]:
        """The response, the plan of its last `nearest` call, and which rows of that call's
        table the results are (in order)."""
        k = validate_k(k)
        started = time.perf_counter()
        # Excluded ids are dropped from an over-fetched list rather than filtered in LanceDB:
        # `chip_id NOT IN (...)` would make every query a prefiltered one.
        excluded = set(exclude_ids) | ({query.chip_id} if query else set())
        overlap_with = query.footprint if (query and filters.exclude_overlapping) else None
        fetch = (k if overlap_with is None else k * 2 + 16) + len(excluded)
        used_index, methods = False, []
        while True:
            rows, plan = self.searcher.nearest(vector, fetch, filters, METADATA_COLUMNS + ["_distance"], near,
                                               version=version)
            used_index = used_index or plan.used_index
            methods.append(plan.method)
            records = _records(rows)
            distances = rows["_distance"].to_pylist()
            kept = [(i, r, d) for i, (r, d) in enumerate(zip(records, distances))
                    if r.chip_id not in excluded
                    and (overlap_with is None or not _overlaps(overlap_with, r.footprint))]
            if len(kept) >= k or rows.num_rows < fetch or fetch >= MAX_K * 4:
                break
            fetch *= 4
        results = [SearchResult(rank, r, float(d)) for rank, (_, r, d) in enumerate(kept[:k], start=1)]
        elapsed = (time.perf_counter() - started) * 1000
        response = SearchResponse(query.chip_id if query else None, results, elapsed,
                                  used_index=used_index,
                                  table_version=version, filters=filters,
                                  method="+".join(dict.fromkeys(methods)))
        return response, plan, [i for i, _, _ in kept[:k]]

    @property
    def db_uri(self) -> str:
        """The database this engine searches (a folder or an object-store URI)."""
        return self.store.db_uri

    @property
    def table_name(self) -> str:
        """The name of the table this engine searches."""
        return self.store.table_name

    @property
    def version(self) -> int:
        """The version of the table this engine searches (a cache key: it changes with every commit)."""
        return self.store.version


def _default_expand(config: IndexConfig) -> int:
    return default_expansion(config.encoder, bool(config.transform))


def _unit_query_vector(vector: Sequence[float] | np.ndarray, dim: int) -> np.ndarray:
    """`vector` as a float32 unit vector of `dim` values, or a QueryError saying what is wrong."""
    try:
        array = np.asarray(vector, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        raise QueryError("query vector must be a list of numbers") from None
    if array.ndim != 1 or array.shape[0] != dim:
        raise QueryError(f"query vector must have {dim} values for this table, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise QueryError("query vector contains NaN or infinite values")
    norm = float(np.linalg.norm(array))
    if not math.isfinite(norm) or 0.0 < norm < 1e-150:
        array = array / float(np.max(np.abs(array)))  # the norm overflowed or underflowed
        norm = float(np.linalg.norm(array))
    if norm == 0.0:
        raise QueryError("query vector is all zeros; it has no direction to search along")
    return (array / norm).astype(np.float32)


def _overlaps(a: Polygon, b: Polygon) -> bool:
    if not a.intersects(b):
        return False
    return a.intersection(b).area > _OVERLAP_TOLERANCE * a.area

