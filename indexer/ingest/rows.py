"""Table rows of embedded chips: one batch group (chips of one source) -> chip rows and patch
rows, shared by the local runner and the cluster workers so both write the same rows."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import shapely

from chipscout.encoders.base import EncoderError
from chipscout.indexer.chips import Chip
from chipscout.indexer.errors import ChipscoutError
from chipscout.indexer.ingest.embedding import Embedder
from chipscout.indexer.ingest.reading import SourceFacts
from chipscout.indexer.ingest.thumbnails import thumbnail_png
from chipscout.indexer.sensors import Sensor


def chip_rows(chips: Sequence[Chip], vectors: np.ndarray, sensor: Sensor,
              facts: dict[str, SourceFacts], raw: np.ndarray | None = None,
              stretch: dict[str, Any] | None = None) -> pa.Table:
    """Table rows of `chips`; with `raw` (encoder vectors before the table's fitted transform),
    a `raw_vector` column too (see `chipscout.indexer.ingest.refit`). `stretch`: the table's
    thumbnail stretch (`IndexConfig.thumbnail_stretch`)."""
    footprints = [c.footprint for c in chips]
    bounds = shapely.bounds(np.array(footprints, dtype=object))
    centroids = shapely.centroid(np.array(footprints, dtype=object))
    now = datetime.now(timezone.utc)
    dim = vectors.shape[1]
    rows = pa.table({
        "chip_id": [c.chip_id for c in chips],
        "vector": pa.FixedSizeListArray.from_arrays(
            pa.array(vectors.astype(np.float32).ravel()), dim),
        "footprint": shapely.to_wkb(np.array(footprints, dtype=object)).tolist(),
        "min_lon": bounds[:, 0], "min_lat": bounds[:, 1],
        "max_lon": bounds[:, 2], "max_lat": bounds[:, 3],
        "center_lon": shapely.get_x(centroids), "center_lat": shapely.get_y(centroids),
        "acquired": pa.array([c.acquired for c in chips], type=pa.timestamp("us", tz="UTC")),
        "source_id": [c.source_id for c in chips],
        "source_path": [facts[c.source_id].location for c in chips],
        "sensor": [sensor.name] * len(chips),
        "crs": [facts[c.source_id].crs for c in chips],
        "row_off": pa.array([c.row_off for c in chips], pa.int32()),
        "col_off": pa.array([c.col_off for c in chips], pa.int32()),
        "size_px": pa.array([c.size_px for c in chips], pa.int32()),
        "gsd_m": pa.array([facts[c.source_id].gsd_m for c in chips], pa.float32()),
        "nodata_fraction": pa.array([c.nodata_fraction for c in chips], pa.float32()),
        "cloud_fraction": pa.array([c.cloud_fraction for c in chips], pa.float32()),
        "radiometry": [facts[c.source_id].radiometry for c in chips],
        "thumbnail": [thumbnail_png(c.pixels, c.valid_mask, facts[c.source_id].rgb_positions,
                                    sensor.rgb_max_reflectance, stretch=stretch) for c in chips],
        "indexed_at": pa.array([now] * len(chips), type=pa.timestamp("us", tz="UTC")),
    })
    if raw is not None:
        rows = rows.append_column("raw_vector", pa.FixedSizeListArray.from_arrays(
            pa.array(raw.astype(np.float32).ravel()), raw.shape[1]))
    return rows


def patch_rows(chips: Sequence[Chip], patches: np.ndarray) -> pa.Table:
    """One row per patch token: (chip_id, patch_row, patch_col, vector), raster order."""
    count, tokens, dim = patches.shape
    side = int(round(tokens ** 0.5))
    cols = side if side * side == tokens else tokens  # square chips; otherwise one long row
    index = np.arange(tokens)
    return pa.table({
        "chip_id": np.repeat([c.chip_id for c in chips], tokens),
        "patch_row": pa.array(np.tile(index // cols, count), pa.int32()),
        "patch_col": pa.array(np.tile(index % cols, count), pa.int32()),
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(patches.astype(np.float32).ravel()), dim),
    })


def embed_batch_group(embedder: Embedder, chips: Sequence[Chip], sensor: Sensor,
                      facts: dict[str, SourceFacts], chip_failed: Callable[[Chip, str], None],
                      stretch: dict[str, Any] | None = None) -> list[tuple[pa.Table, pa.Table | None]]:
    """Embed one batch group (chips of one source) into chip rows, and patch rows when the
    encoder keeps patches, without writing anything. Shared by the single-process pipeline and
    the cluster workers (`chipscout.indexer.ingest.cluster`), so both make the same rows.

    A chip the encoder refuses, or whose vector is not finite, goes to `chip_failed` and is left
    out; the others of its group are kept.
    """
    if not chips:
        return []
    gsd_m = facts[chips[0].source_id].gsd_m
    try:
        parts = [(list(chips), *embedder.embed_for_table(chips, gsd_m))]
    except (ChipscoutError, EncoderError):
        # One chip the encoder refuses must not sink its batch: embed one by one instead.
        parts = []
        for chip in chips:
            try:
                parts.append(([chip], *embedder.embed_for_table([chip], gsd_m)))
            except (ChipscoutError, EncoderError) as err:
                chip_failed(chip, str(err))
    out: list[tuple[pa.Table, pa.Table | None]] = []
    for group, vectors, patches, raw in parts:
        finite = np.isfinite(vectors).all(axis=1)
        for chip in (c for c, ok in zip(group, finite) if not ok):
            chip_failed(chip, "the encoder returned a vector with NaN or infinite values")
        if not finite.all():
            keep = np.flatnonzero(finite)
            group, vectors = [group[i] for i in keep], vectors[keep]
            patches = patches[keep] if patches is not None else None
            raw = raw[keep] if raw is not None else None
        if not group:
            continue
        out.append((chip_rows(group, vectors, sensor, facts, raw, stretch),
                    patch_rows(group, patches) if patches is not None else None))
    return out
