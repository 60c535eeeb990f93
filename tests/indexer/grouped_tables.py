"""Tables of grouped vectors for index and search tests: 400 groups of 10 near-duplicate rows,
each group sharing a place, a day and its quality figures, so every filter keeps or drops whole
groups; with the exact answers computed independently of LanceDB."""

from datetime import datetime, timedelta, timezone

import numpy as np
import pyarrow as pa
import shapely

from chipscout.indexer.search import SearchFilters
from chipscout.indexer.ingest.fitted_state import encode_state
from chipscout.indexer.store.indexes import IndexPolicy
from chipscout.indexer.store import ChipStore, chip_schema
from tests.synthetic import synthetic_config

DIM = 64
GROUPS, PER_GROUP = 400, 10  # 4000 rows: groups of 10 near-duplicates, far from each other
FIRST_DAY = datetime(2023, 1, 1, tzinfo=timezone.utc)
#: Small-table thresholds, so 4000 rows get an index of 16 partitions and every query method.
POLICY = IndexPolicy(rows_per_partition=250, min_rows=1000, scalar_min_rows=1000, exact_max_matches=150)
#: The same, with LanceDB's prefiltered ANN for any filter too wide to over-fetch 50 rows for,
#: and exact search over filtered rows done by chipscout (vectors read by row id), as for
#: tables too large for LanceDB's own.
PREFILTER_POLICY = IndexPolicy(rows_per_partition=250, min_rows=1000, scalar_min_rows=1000,
                               exact_max_matches=150, max_postfilter_fetch=50, scan_max_rows=0)


def _rows(vectors: np.ndarray, seed: int, first: int = 0) -> pa.Table:
    """Chip rows in the pipeline's layout: each group of 10 shares a place, a day (over two
    years of a 20 x 10 degree region) and its quality figures (cloud 10 % unknown), so every
    filter keeps or drops whole groups."""
    n, dim = vectors.shape
    group = (np.arange(n) + first) // PER_GROUP
    group_rng = np.random.default_rng(1000 + seed)
    lon = group_rng.uniform(0, 20, 10_000)[group]
    lat = group_rng.uniform(40, 50, 10_000)[group]
    day = group_rng.integers(0, 730, 10_000)[group]
    cloud = group_rng.random(10_000).astype(np.float32)[group]
    unknown_cloud = (group_rng.random(10_000) < 0.1)[group]
    nodata = (group_rng.random(10_000) * 0.3).astype(np.float32)[group]
    boxes = shapely.box(lon, lat, lon + 0.01, lat + 0.01)
    when = [FIRST_DAY + timedelta(days=int(d), hours=10) for d in day]
    return pa.table({
        "chip_id": [f"g{g:04d}_r{i:05d}" for g, i in zip(group, np.arange(n) + first)],
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.astype(np.float32).ravel()), dim),
        "footprint": shapely.to_wkb(boxes).tolist(),
        "min_lon": lon, "min_lat": lat, "max_lon": lon + 0.01, "max_lat": lat + 0.01,
        "center_lon": lon + 0.005, "center_lat": lat + 0.005,
        "acquired": pa.array(when, pa.timestamp("us", tz="UTC")),
        "source_id": [f"src-{g % 7}" for g in group], "source_path": ["/synthetic.tif"] * n,
        "sensor": ["sentinel-2-l2a"] * n, "crs": ["EPSG:4326"] * n,
        "row_off": pa.array([0] * n, pa.int32()), "col_off": pa.array([0] * n, pa.int32()),
        "size_px": pa.array([64] * n, pa.int32()), "gsd_m": pa.array([10.0] * n, pa.float32()),
        "nodata_fraction": pa.array(nodata, pa.float32()),
        "cloud_fraction": pa.array(np.where(unknown_cloud, None, cloud).tolist(), pa.float32()),
        "radiometry": ["reflectance"] * n, "thumbnail": [None] * n,
        "indexed_at": pa.array([FIRST_DAY] * n, pa.timestamp("us", tz="UTC")),
    }, schema=chip_schema(synthetic_config(dim)))


def _grouped_vectors(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(centres, vectors): each centre's 10 rows lie within ~0.05 of it, centres far apart."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((GROUPS, DIM))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    vectors = np.repeat(centres, PER_GROUP, axis=0) + 0.05 / np.sqrt(DIM) * rng.standard_normal(
        (GROUPS * PER_GROUP, DIM))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return centres.astype(np.float32), vectors.astype(np.float32)


def _write(db: str, table: str, rows: pa.Table) -> ChipStore:
    store = ChipStore(db, table)
    store.create(synthetic_config(rows.schema.field("vector").type.list_size), encode_state({}))
    for start in range(0, rows.num_rows, 500):  # many commits, as an ingest makes them
        store.upsert(rows.slice(start, 500))
    return store


def _truth(vectors: np.ndarray, rows: pa.Table, query: np.ndarray, k: int,
           keep: np.ndarray | None = None) -> list[str]:
    scores = vectors @ (query / np.linalg.norm(query))
    if keep is not None:
        scores = np.where(keep, scores, -np.inf)
    order = [i for i in np.argsort(-scores, kind="stable") if np.isfinite(scores[i])][:k]
    return [rows["chip_id"][int(i)].as_py() for i in order]


def _keep(rows: pa.Table, filters: SearchFilters) -> np.ndarray:
    """The filter evaluated in numpy, independently of LanceDB."""
    keep = np.ones(rows.num_rows, dtype=bool)
    acquired = np.array(rows["acquired"].to_pylist(), dtype=object)
    if filters.date_from:
        keep &= np.array([a is not None and a >= filters.date_from for a in acquired])
    if filters.date_to:
        keep &= np.array([a is not None and a <= filters.date_to for a in acquired])
    if filters.bbox:
        b = filters.bbox
        keep &= ((rows["max_lon"].to_numpy() >= b.min_lon) & (rows["min_lon"].to_numpy() <= b.max_lon)
                 & (rows["max_lat"].to_numpy() >= b.min_lat) & (rows["min_lat"].to_numpy() <= b.max_lat))
    if filters.max_cloud_fraction is not None:
        cloud = np.array([np.nan if c is None else c for c in rows["cloud_fraction"].to_pylist()])
        keep &= np.isnan(cloud) | (cloud <= filters.max_cloud_fraction)
    if filters.max_nodata_fraction is not None:
        keep &= rows["nodata_fraction"].to_numpy().astype(np.float64) <= filters.max_nodata_fraction
    if filters.source_ids:
        keep &= np.isin(np.array(rows["source_id"].to_pylist()), filters.source_ids)
    return keep
