"""The search API every front end uses: nearest chips of a chip or vector, with typed filters.

Inputs are validated here and turned into typed values; `chipscout.indexer.store` turns them into LanceDB
filters through `sql_literal`, so user text never becomes query syntax.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import date, datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import shapely
from shapely.geometry import Polygon

from chipscout.indexer.errors import QueryError
from chipscout.indexer.store import DEFAULT_TABLE, ChipStore, IndexConfig, sql_literal, unit_rows
from chipscout.indexer.search.vector_index import DEFAULT_POLICY, FilterValues, IndexPolicy, SearchPlan, VectorSearcher

MAX_K = 10_000
_CHIP_ID = re.compile(r"^[A-Za-z0-9_.:/-]{1,200}$")
#: Overlap below this share of the query's area is rounding at shared edges, not overlap.
_OVERLAP_TOLERANCE = 1e-6

METADATA_COLUMNS = [
    "chip_id", "footprint", "min_lon", "min_lat", "max_lon", "max_lat", "center_lon", "center_lat",
    "acquired", "source_id", "source_path", "sensor", "crs", "row_off", "col_off", "size_px",
    "gsd_m", "nodata_fraction", "cloud_fraction",
]


@dataclass(frozen=True)
class BBox:
    min_lon: float
    min_lat: float
    max_lon: float
    max_lat: float

    def __post_init__(self) -> None:
        values = (self.min_lon, self.min_lat, self.max_lon, self.max_lat)
        if not all(_finite_number(v) for v in values):
            raise QueryError(f"bbox values must be finite numbers, got {values}")
        if not (-180 <= self.min_lon <= 180 and -180 <= self.max_lon <= 180):
            raise QueryError(f"bbox longitudes must lie in -180..180, got {self.min_lon}, {self.max_lon}")
        if not (-90 <= self.min_lat <= 90 and -90 <= self.max_lat <= 90):
            raise QueryError(f"bbox latitudes must lie in -90..90, got {self.min_lat}, {self.max_lat}")
        if self.min_lon > self.max_lon or self.min_lat > self.max_lat:
            raise QueryError(
                f"bbox is inverted: min ({self.min_lon}, {self.min_lat}) must not exceed "
                f"max ({self.max_lon}, {self.max_lat}); order is MINLON,MINLAT,MAXLON,MAXLAT")

    @classmethod
    def parse(cls, text: str) -> BBox:
        parts = [p.strip() for p in str(text).split(",")]
        if len(parts) != 4:
            raise QueryError(f"bad bbox {text!r}: expected MINLON,MINLAT,MAXLON,MAXLAT")
        try:
            return cls(*(float(p) for p in parts))
        except ValueError:
            raise QueryError(f"bad bbox {text!r}: expected four numbers") from None

    def as_tuple(self) -> tuple[float, float, float, float]:
        return (self.min_lon, self.min_lat, self.max_lon, self.max_lat)


def _as_utc(value: datetime | date | str | None, what: str) -> datetime | None:
    if value is None or value == "":
        return None
    if isinstance(value, str):
        from chipscout.indexer.sources.files import parse_datetime

        try:
            return parse_datetime(value, what)
        except Exception as err:
            raise QueryError(str(err)) from None
    if isinstance(value, datetime):
        try:
            return value.astimezone(timezone.utc) if value.tzinfo else value.replace(tzinfo=timezone.utc)
        except OverflowError:
            raise QueryError(f"{what} {value!r} is out of range") from None
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=timezone.utc)
    raise QueryError(f"{what} must be a date, got {type(value).__name__}")


def _finite_number(value: Any) -> bool:
    """A real, finite int or float (an int too large for a float is not)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _fraction(value: float | None, what: str) -> float | None:
    if value is None:
        return None
    if not _finite_number(value):
        raise QueryError(f"{what} must be a number within 0..1, got {value!r}")
    if not 0.0 <= value <= 1.0:
        raise QueryError(f"{what} must be within 0..1, got {value}")
    return float(value)


@dataclass(frozen=True)
class SearchFilters:
    date_from: datetime | None = None
    date_to: datetime | None = None
    """Inclusive upper bound; a bare date means the whole day."""
    bbox: BBox | None = None
    """Chips whose footprint box intersects this lon/lat box."""
    max_cloud_fraction: float | None = None
    max_nodata_fraction: float | None = None
    exclude_overlapping: bool = False
    """Drop chips whose footprint overlaps the query chip's (other dates of the same place too)."""
    source_ids: tuple[str, ...] = ()

    @classmethod
    def build(cls, date_from: Any = None, date_to: Any = None, bbox: BBox | str | Sequence[float] | None = None,
              max_cloud_fraction: float | None = None, max_nodata_fraction: float | None = None,
              exclude_overlapping: bool = False, source_ids: Sequence[str] = ()) -> SearchFilters:
        start = _as_utc(date_from, "start date")
        end = _as_utc(date_to, "end date")
        if isinstance(date_to, (str, date)) and not isinstance(date_to, datetime) and end is not None:
            if isinstance(date_to, date) or len(str(date_to).strip()) == 10:
                end = end.replace(hour=23, minute=59, second=59, microsecond=999999)
        if start and end and start > end:
            raise QueryError(f"date range is inverted: {start.date()} is after {end.date()}")
        if isinstance(bbox, str):
            bbox = BBox.parse(bbox)
        elif bbox is not None and not isinstance(bbox, BBox):
            try:
                bbox = BBox(*[float(v) for v in bbox])
            except (TypeError, ValueError, OverflowError):
                raise QueryError(f"bad bbox {bbox!r}: expected four numbers") from None
        if source_ids is None:
            source_ids = ()
        if isinstance(source_ids, (str, bytes)) or not isinstance(source_ids, (Sequence, set, frozenset)):
            raise QueryError(f"source ids must be a list of ids, got {source_ids!r}")
        for source_id in source_ids:
            if not isinstance(source_id, str) or not _CHIP_ID.match(source_id):
                raise QueryError(f"bad source id {source_id!r}")
        return cls(start, end, bbox, _fraction(max_cloud_fraction, "max cloud fraction"),
                   _fraction(max_nodata_fraction, "max nodata fraction"), bool(exclude_overlapping),
                   tuple(source_ids))

    def where_clause(self, exclude_ids: Sequence[str] = ()) -> str | None:
        terms = []
        if self.date_from is not None:
            terms.append(f"acquired >= {sql_literal(self.date_from)}")
        if self.date_to is not None:
            terms.append(f"acquired <= {sql_literal(self.date_to)}")
        if self.bbox is not None:
            b = self.bbox
            terms.append(
                f"max_lon >= {sql_literal(b.min_lon)} AND min_lon <= {sql_literal(b.max_lon)} AND "
                f"max_lat >= {sql_literal(b.min_lat)} AND min_lat <= {sql_literal(b.max_lat)}")
        if self.max_cloud_fraction is not None:
            # Chips without a cloud mask (cloud_fraction NULL) are kept: unknown is not cloudy.
            terms.append(f"(cloud_fraction IS NULL OR cloud_fraction <= {sql_literal(self.max_cloud_fraction)})")
        if self.max_nodata_fraction is not None:
            terms.append(f"nodata_fraction <= {sql_literal(self.max_nodata_fraction)}")
        if self.source_ids:
            terms.append("source_id IN (" + ", ".join(sql_literal(s) for s in self.source_ids) + ")")
        if exclude_ids:
            terms.append("chip_id NOT IN (" + ", ".join(sql_literal(c) for c in exclude_ids) + ")")
        return " AND ".join(terms) if terms else None


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
    """How the results were found (`chipscout.indexer.search.vector_index.SearchPlan.method`): `exact`,
    `exact-scan`, `ann`, `ann-postfilter` or `ann-prefilter`; `+expanded:m` after query expansion."""
    expansion: int = 0
    """Results folded into the query by query expansion (0: none)."""

    def to_dict(self) -> dict[str, Any]:
        return {"query_chip_id": self.query_chip_id, "elapsed_ms": round(self.elapsed_ms, 2),
                "used_index": self.used_index, "method": self.method, "expansion": self.expansion,
                "table_version": self.table_version,
                "results": [r.to_dict() for r in self.results]}


def _records(rows: pa.Table) -> list[ChipRecord]:
    data = rows.to_pydict()
    footprints = shapely.from_wkb(data["footprint"]) if rows.num_rows else []
    records = []
    for i in range(rows.num_rows):
        cloud = data["cloud_fraction"][i]
        records.append(ChipRecord(
            chip_id=data["chip_id"][i], source_id=data["source_id"][i], sensor=data["sensor"][i],
            footprint=footprints[i], center_lon=data["center_lon"][i], center_lat=data["center_lat"][i],
            acquired=data["acquired"][i], nodata_fraction=float(data["nodata_fraction"][i]),
            cloud_fraction=None if cloud is None else float(cloud), size_px=int(data["size_px"][i]),
            gsd_m=float(data["gsd_m"][i]), crs=data["crs"][i], row_off=int(data["row_off"][i]),
            col_off=int(data["col_off"][i]), source_path=data["source_path"][i]))
    return records


def validate_chip_id(chip_id: Any) -> str:
    if not isinstance(chip_id, str) or not _CHIP_ID.match(chip_id):
        raise QueryError(f"bad chip id {chip_id!r}: chip ids are letters, digits and _ . : / -")
    return chip_id


def _checked_filters(filters: Any) -> SearchFilters:
    if filters is None:
        return SearchFilters()
    if not isinstance(filters, SearchFilters):
        raise QueryError(f"filters must be built with SearchFilters.build, got {type(filters).__name__}")
    return filters


#: alpha-query expansion (Radenovic et al. 2018): the query plus its m nearest results, each
#: weighted by its cosine similarity to the power QE_ALPHA, searched again. m = 5, alpha = 3 were
#: the best of m in {3, 5, 10} x alpha in {1, 3} on held-out EuroSAT queries (BENCHMARKS.md, quality).
QE_ALPHA = 3.0
MAX_EXPAND = 100
#: Query expansion of a search that does not choose one (`expand=None`), per encoder family, for
#: tables whose vectors went through a fitted transform. RCF: m = 5 gained on held-out queries of
#: both EuroSAT sets (+0.010 to +0.017 precision@10, +0.02 mAP, BENCHMARKS.md (quality)); on raw
#: RCF vectors (no transform) it lost 0.03. Other families have no measurement here: none.
DEFAULT_EXPANSION: dict[str, int] = {"rcf": 5}


def default_expansion(encoder_name: str, transformed: bool = True) -> int:
    return DEFAULT_EXPANSION.get(encoder_name, 0) if transformed else 0


def _whole_number(value: Any, what: str, low: int, high: int, unit: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise QueryError(f"{what} must be a whole number{' of ' + unit if unit else ''}, got {value!r}")
    if not low <= value <= high:
        raise QueryError(f"{what} must be within {low}..{high}{' ' + unit if unit else ''}, got {value}")
    return int(value)


def validate_expand(expand: Any) -> int:
    return _whole_number(expand, "query expansion", 0, MAX_EXPAND, "results")


def validate_k(k: Any) -> int:
    return _whole_number(k, "k", 1, MAX_K)


class SearchEngine:
    """Nearest-neighbour search over one chip table."""

    def __init__(self, db_uri: str, table_name: str = DEFAULT_TABLE,
                 storage_options: dict[str, str] | None = None, index_policy: IndexPolicy | None = None):
        self.store = ChipStore(db_uri, table_name, storage_options)
        self.store.ensure_exists()  # fail early, with the list of tables, when it is missing
        self.searcher = VectorSearcher(self.store, index_policy or DEFAULT_POLICY)

    @property
    def config(self) -> IndexConfig:
        return self.store.config

    def count(self) -> int:
        return self.store.count()

    def refresh(self) -> None:
        self.store.refresh()

    def warm_up(self) -> dict[str, Any]:
        """Keep what queries read in memory (result and filter columns, the vectors within
        `IndexPolicy.warm_cache_bytes`, and from `IndexPolicy.sketch_min_rows` rows a binary
        sketch), for front ends that answer many queries: at a million rows a filtered query
        drops from ~40 ms to 5-10 ms (BENCHMARKS.md (search)), for ~20 s of loading and ~1.9 GiB.
        Reloaded after the table changes. Returns what was loaded."""
        return self.searcher.warm_up(METADATA_COLUMNS).describe()

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

    @property
    def default_expand(self) -> int:
        """The query expansion a search gets when it passes `expand=None`: the table's encoder
        family's measured default (`DEFAULT_EXPANSION`; 5 for RCF tables with a vector transform,
        else 0)."""
        config = self.config
        return default_expansion(config.encoder, bool(config.transform))

    def similar_to_chip(self, chip_id: str, k: int = 10,
                        filters: SearchFilters | None = None, expand: int | None = None) -> SearchResponse:
        """The k chips nearest `chip_id` that `filters` allow (never the chip itself). `expand` > 0
        runs alpha-query expansion: the chip's vector plus its `expand` nearest allowed chips,
        weighted by similarity ** `QE_ALPHA`, is searched again (two searches; on EuroSAT +0.01
        precision@10 and +0.02 mAP, BENCHMARKS.md (quality)). None: `default_expand`; 0: the
        plain nearest neighbours of the chip."""
        filters = _checked_filters(filters)
        expand = self._resolved_expand(expand)
        query = self.get_chip(chip_id)
        vector = self.get_vector(chip_id)
        return self._expanded_search(vector, k, filters, query, (), expand)

    def similar_to_vector(self, vector: Sequence[float] | np.ndarray, k: int = 10,
                          filters: SearchFilters | None = None,
                          exclude_ids: Sequence[str] = (), expand: int | None = None) -> SearchResponse:
        """The k chips nearest `vector` (any length; its direction counts) that `filters` allow,
        leaving out `exclude_ids`; `expand` as in `similar_to_chip`, so a stored chip's vector
        finds what its id finds."""
        try:
            array = np.asarray(vector, dtype=np.float64)
        except (TypeError, ValueError, OverflowError):
            raise QueryError("query vector must be a list of numbers") from None
        dim = self.config.embedding_dim
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
        filters = _checked_filters(filters)
        if filters.exclude_overlapping:
            raise QueryError("exclude_overlapping needs a query chip; search by chip id instead")
        if isinstance(exclude_ids, (str, bytes)) or not isinstance(exclude_ids, (Sequence, set, frozenset)):
            raise QueryError(f"ids to exclude must be a list of chip ids, got {exclude_ids!r}")
        expand = self._resolved_expand(expand)
        return self._expanded_search((array / norm).astype(np.float32), k, filters, None,
                                     [validate_chip_id(c) for c in exclude_ids], expand)

    def _resolved_expand(self, expand: Any) -> int:
        return self.default_expand if expand is None else validate_expand(expand)

    def _expanded_search(self, vector: np.ndarray, k: int, filters: SearchFilters,
                         query: ChipRecord | None, exclude_ids: Sequence[str],
                         expand: int) -> SearchResponse:
        if expand == 0:
            return self._search(vector, k, filters, query, exclude_ids)[0]
        k = validate_k(k)
        started = time.perf_counter()
        first, plan, kept_rows = self._search(vector, expand, filters, query, exclude_ids)
        ids = [r.chip.chip_id for r in first.results]
        similarity = np.array([r.similarity for r in first.results])
        # A warm searcher has the vectors in memory; else read them (those the table compares).
        stored = self.searcher.warm_vectors(plan, kept_rows) if ids else None
        if stored is None and ids:
            found, stored = self.store.vectors(ids)
            similarity = similarity[[ids.index(c) for c in found]]
            ids = found
        if ids:
            weights = np.clip(similarity, 0.0, None) ** QE_ALPHA
            expanded = vector + weights.astype(np.float32) @ unit_rows(stored)  # cosine: units
            norm = float(np.linalg.norm(expanded))
            if norm > 0:
                vector = (expanded / norm).astype(np.float32)
        # The expanded query lies among the first one's neighbours: a warm sketch re-ranks the
        # first search's candidates rather than scanning again (BENCHMARKS.md (search)): at 1M
        # rows unfiltered ~2 ms instead of ~8, recall 0.977 against exact expansion (0.990).
        second = self._search(vector, k, filters, query, exclude_ids, near=plan)[0]
        return replace(second, elapsed_ms=(time.perf_counter() - started) * 1000,
                       used_index=first.used_index or second.used_index,
                       method=f"{second.method}+expanded:{len(ids)}", expansion=len(ids))

    def _search(self, vector: np.ndarray, k: int, filters: SearchFilters, query: ChipRecord | None,
                exclude_ids: Sequence[str] = (), near: SearchPlan | None = None
                ) -> tuple[SearchResponse, SearchPlan, list[int]]:
        """The response, the plan of its last `nearest` call, and which rows of that call's
        table the results are (in order)."""
        k = validate_k(k)
        started = time.perf_counter()
        # Excluded ids are dropped from an over-fetched list rather than filtered in LanceDB:
        # `chip_id NOT IN (...)` would make every query a prefiltered one.
        excluded = set(exclude_ids) | ({query.chip_id} if query else set())
        where = filters.where_clause()
        values = FilterValues(filters.date_from, filters.date_to,
                              filters.bbox.as_tuple() if filters.bbox else None,
                              filters.max_cloud_fraction, filters.max_nodata_fraction, filters.source_ids)
        overlap_with = query.footprint if (query and filters.exclude_overlapping) else None
        fetch = (k if overlap_with is None else k * 2 + 16) + len(excluded)
        used_index, methods, version = False, [], None
        while True:
            rows, plan = self.searcher.nearest(vector, fetch, values, where, METADATA_COLUMNS + ["_distance"],
                                               near)
            version = plan.table_version
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
    def version(self) -> int:
        """The version of the table this engine searches (a cache key: it changes with every commit)."""
        return self.store.version


def _overlaps(a: Polygon, b: Polygon) -> bool:
    if not a.intersects(b):
        return False
    return a.intersection(b).area > _OVERLAP_TOLERANCE * a.area

