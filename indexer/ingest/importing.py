"""`chipscout import`: a chip-level embedding product (GeoParquet) into a normal chip table.

Two streaming passes over the file: the first checks every row (columns, equal vector lengths, no
NaN, a geometry per row) so bad input fails before anything is written and leaves no partial
table; the second writes batches of at most `batch_rows` rows, skipping ids the table already
holds, so an interrupted import resumes where it stopped. The table records the product, its
dimension and the column mapping, and refuses another product.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import shapely

from chipscout.indexer.errors import IncompatibleTableError, ProductFileError
from chipscout.indexer.ingest.fitted_state import encode_state
from chipscout.indexer.ingest.pca_thumbnails import fill_pca_thumbnails
from chipscout.indexer.sources.files import sanitize_source_id
from chipscout.indexer.sources.geoparquet import (PRESETS, ChipBatch, ColumnMapping, ProductFile, checked_batch,
                                                  geometry_crs, open_product, preset, resolve_mapping)
from chipscout.indexer.store import ChipStore, IndexConfig, Normalization

#: The registered "encoder" of imported tables: nothing to rebuild, the vectors came made.
IMPORTED = "imported"
#: Rows per batch unless a memory budget says fewer.
DEFAULT_BATCH_ROWS = 4096


@dataclass
class ImportSummary:
    table: str
    uri: str
    product: str
    rows_read: int = 0
    rows_new: int = 0
    rows_present: int = 0
    batch_rows: int = 0
    largest_batch_bytes: int = 0
    elapsed_s: float = 0.0
    table_rows: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rows_per_s(self) -> float:
        return self.rows_read / self.elapsed_s if self.elapsed_s else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**{k: v for k, v in self.__dict__.items() if k != "extra"}, **self.extra,
                "rows_per_s": round(self.rows_per_s, 1)}


def _crs_transformer(product: ProductFile, mapping: ColumnMapping):
    crs = geometry_crs(product, mapping.geometry)
    if crs is None:
        return None
    from pyproj import CRS, Transformer

    try:
        source = CRS.from_user_input(crs)
    except Exception as err:  # pyproj's CRSError and friends
        raise ProductFileError(f"{product.uri}: unknown geometry CRS in its 'geo' metadata ({err})") from err
    if source.equals(CRS.from_epsg(4326), ignore_axis_order=True):
        return None
    transformer = Transformer.from_crs(source, "OGC:CRS84", always_xy=True)
    return lambda x, y: transformer.transform(x, y)


def product_config(product_name: str, label: str, dim: int, mapping: ColumnMapping,
                   model: str | None) -> IndexConfig:
    return IndexConfig(
        encoder=IMPORTED,
        encoder_config={"product": product_name, "model": model, "dim": dim,
                        "columns": {"vector": mapping.vector, "geometry": mapping.geometry, "id": mapping.id,
                                    "datetime": mapping.datetime}},
        encoder_label=label, embedding_dim=dim, sensor=f"imported:{product_name}", bands=(),
        band_wavelengths_um=(), normalization=Normalization("none", (), ()), chip_size_px=0, chip_stride_px=0)


def batch_rows_for(dim: int, memory_budget_mb: float | None, batch_rows: int | None) -> int:
    """Rows per batch: `batch_rows`, else as many as keep a batch (the vectors in the file's
    float64 worst case, their float32 copy, a footprint and the row's other columns, ~1 KB) within
    a quarter of the budget (decoding, the table rows and the write each hold a copy)."""
    if batch_rows is not None:
        if batch_rows < 1:
            raise ProductFileError(f"batch rows must be positive, got {batch_rows}")
        return batch_rows
    if memory_budget_mb is None:
        return DEFAULT_BATCH_ROWS
    row_bytes = dim * 12 + 1024
    return max(16, int(memory_budget_mb * 2**20 / 4 / row_bytes))


def chip_table(batch: ChipBatch, source_id: str, uri: str, product_name: str) -> pa.Table:
    footprints = batch.footprints
    bounds = shapely.bounds(footprints)
    centroids = shapely.centroid(footprints)
    count, dim = batch.vectors.shape
    now = datetime.now(timezone.utc)
    return pa.table({
        "chip_id": [f"{source_id}:{sanitize_source_id(i)}" for i in batch.ids],
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(batch.vectors.ravel()), dim),
        "footprint": shapely.to_wkb(footprints).tolist(),
        "min_lon": bounds[:, 0], "min_lat": bounds[:, 1], "max_lon": bounds[:, 2], "max_lat": bounds[:, 3],
        "center_lon": shapely.get_x(centroids), "center_lat": shapely.get_y(centroids),
        "acquired": batch.acquired,
        "source_id": [source_id] * count, "source_path": [uri] * count,
        "sensor": [f"imported:{product_name}"] * count, "crs": ["OGC:CRS84"] * count,
        # No pixel grid behind an imported chip: offsets, size and ground sample distance are 0.
        "row_off": pa.array(np.zeros(count, np.int32)), "col_off": pa.array(np.zeros(count, np.int32)),
        "size_px": pa.array(np.zeros(count, np.int32)), "gsd_m": pa.array(np.zeros(count, np.float32)),
        "nodata_fraction": pa.array(np.zeros(count, np.float32)), "cloud_fraction": pa.nulls(count, pa.float32()),
        "radiometry": [f"imported {product_name} vectors"] * count,
        "thumbnail": pa.nulls(count, pa.binary()),
        "indexed_at": pa.array([now] * count, type=pa.timestamp("us", tz="UTC")),
    })


def import_product(uri: str, db_uri: str, table_name: str, *, preset_name: str | None = None,
                   columns: Mapping[str, str | None] | None = None, product_name: str | None = None,
                   batch_rows: int | None = None, memory_budget_mb: float | None = None,
                   storage_options: Mapping[str, str] | None = None,
                   progress: Callable[[int, int | None], None] | None = None,
                   on_batch: Callable[[pa.RecordBatch], None] | None = None) -> ImportSummary:
    """Import the GeoParquet product at `uri` into `table_name` (created if missing).

    `preset_name`: major-tom, clay, earth-index (survey); `columns`: {vector, geometry, id,
    datetime} overriding the preset's. `product_name` labels the table (default: the preset).
    `progress(rows_done, rows_total)` after each batch; `on_batch` sees every batch read (tests
    and benchmarks measure streaming with it)."""
    started = time.perf_counter()
    product = open_product(uri, storage_options)
    chosen = preset(preset_name) if preset_name else None
    mapping, used = resolve_mapping(product, chosen, columns or {})
    emb = product.metadata("emb") or {}
    model = ((emb.get("model") or {}).get("name") if isinstance(emb.get("model"), dict) else emb.get("model"))
    name = product_name or used
    to_crs84 = _crs_transformer(product, mapping)
    wanted = [c for c in dict.fromkeys((mapping.vector, mapping.geometry, mapping.id, mapping.datetime)) if c]
    source_id = sanitize_source_id(product.stem)

    # Pass 1: every row checked, nothing written.
    dim: int | None = None
    total = 0
    rows_per_batch = batch_rows_for(1024, memory_budget_mb, batch_rows)
    for batch in product.batches(wanted, rows_per_batch):
        if dim is None and len(batch):
            dim = checked_batch(product, mapping, batch.slice(0, 1), total, None, to_crs84).vectors.shape[1]
            rows_per_batch = batch_rows_for(dim, memory_budget_mb, batch_rows)
        checked_batch(product, mapping, batch, total, dim, to_crs84)
        total += len(batch)
    if dim is None:
        raise ProductFileError(f"{uri}: holds no rows")
    label = product_name or (PRESETS[used].label if used in PRESETS else "imported embeddings")
    config = product_config(name, label, dim, mapping, model)

    store = ChipStore(db_uri, table_name, storage_options=dict(storage_options) if storage_options else None)
    if store.exists():
        stored = store.config
        if stored.encoder != IMPORTED or stored.encoder_config.get("product") != name:
            raise IncompatibleTableError(
                f"table {table_name!r} holds {stored.encoder_label} vectors; {uri} is {name}: a table never "
                "mixes products, import into another --table")
        store.check_compatible(config)
    summary = ImportSummary(table_name, uri, name, batch_rows=rows_per_batch)
    created = resuming = store.exists()  # only a table that existed before can hold this file's ids

    # Pass 2: write, batch by batch, skipping what an earlier run stored.
    done = 0
    for batch in product.batches(wanted, rows_per_batch):
        summary.largest_batch_bytes = max(summary.largest_batch_bytes, batch.nbytes)
        if on_batch is not None:
            on_batch(batch)
        chips = chip_table(checked_batch(product, mapping, batch, done, dim, to_crs84), source_id, uri, name)
        done += len(batch)
        summary.rows_read += len(batch)
        if not created:
            store.create(config, encode_state({}), keep_state=False)
            created = True
        present = set(store.fetch(chips["chip_id"].to_pylist(), ["chip_id"])["chip_id"].to_pylist()) \
            if resuming else set()
        if present:
            keep = np.array([c not in present for c in chips["chip_id"].to_pylist()])
            chips = chips.filter(pa.array(keep))
            summary.rows_present += len(present)
        summary.rows_new += store.upsert(chips) if chips.num_rows else 0
        if progress is not None:
            progress(done, total)
    summary.elapsed_s = time.perf_counter() - started  # rows/s counts reading and writing, not pictures
    if summary.rows_new:
        summary.extra["thumbnails_drawn"] = fill_pca_thumbnails(store)
    summary.table_rows = store.count()
    return summary

