"""Small chip tables with hand-made vectors and footprints, written through ChipStore in the
pipeline's row layout, for tests whose right answer must be known exactly (labelling, refine)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import shapely

from chipscout.indexer.ingest.fitted_state import encode_state
from chipscout.indexer.store import ChipStore, IndexConfig, Normalization, chip_schema

WHEN = datetime(2024, 6, 15, tzinfo=timezone.utc)


def synthetic_config(dim: int) -> IndexConfig:
    return IndexConfig(
        encoder="synthetic", encoder_config={"dim": dim}, encoder_label="synthetic-test",
        embedding_dim=dim, sensor="sentinel-2-l2a", bands=("blue", "green", "red", "nir"),
        band_wavelengths_um=(0.493, 0.56, 0.665, 0.842),
        normalization=Normalization("reflectance", (0.0,) * 4, (1.0,) * 4),
        chip_size_px=64, chip_stride_px=64)


def write_table(db_uri: str, table: str, chip_ids: Sequence[str], vectors: np.ndarray,
                centres: Sequence[tuple[float, float]], size_deg: float = 0.01) -> ChipStore:
    """A table of square footprints `size_deg` wide around `centres` (lon, lat)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    half = size_deg / 2
    boxes = [shapely.box(lon - half, lat - half, lon + half, lat + half) for lon, lat in centres]
    n, dim = vectors.shape
    config = synthetic_config(dim)
    rows = pa.table({
        "chip_id": list(chip_ids),
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), dim),
        "footprint": shapely.to_wkb(np.array(boxes, dtype=object)).tolist(),
        "min_lon": [b.bounds[0] for b in boxes], "min_lat": [b.bounds[1] for b in boxes],
        "max_lon": [b.bounds[2] for b in boxes], "max_lat": [b.bounds[3] for b in boxes],
        "center_lon": [c[0] for c in centres], "center_lat": [c[1] for c in centres],
        "acquired": pa.array([WHEN] * n, pa.timestamp("us", tz="UTC")),
        "source_id": ["synthetic"] * n, "source_path": ["/synthetic.tif"] * n,
        "sensor": ["sentinel-2-l2a"] * n, "crs": ["EPSG:4326"] * n,
        "row_off": pa.array([0] * n, pa.int32()), "col_off": pa.array([0] * n, pa.int32()),
        "size_px": pa.array([64] * n, pa.int32()), "gsd_m": pa.array([10.0] * n, pa.float32()),
        "nodata_fraction": pa.array([0.0] * n, pa.float32()),
        "cloud_fraction": pa.array([None] * n, pa.float32()),
        "radiometry": ["reflectance"] * n, "thumbnail": [None] * n,
        "indexed_at": pa.array([WHEN] * n, pa.timestamp("us", tz="UTC")),
    }, schema=chip_schema(config))
    store = ChipStore(db_uri, table)
    store.create(config, encode_state({}), keep_state=False)
    store.upsert(rows)
    return store


def clustered_table(db_uri: str, table: str = "clusters", per_cluster: int = 12, dim: int = 16,
                    seed: int = 0) -> dict[str, list[str]]:
    """Three well-separated clusters `a`, `b`, `c` of chips on a 0.02-degree grid;
    returns {cluster: chip ids}."""
    rng = np.random.default_rng(seed)
    centres = np.eye(dim)[:3] * 3 + 1.0  # a shared component, like real embeddings have
    ids, vectors, places = [], [], []
    members: dict[str, list[str]] = {}
    for k, name in enumerate("abc"):
        for i in range(per_cluster):
            chip_id = f"{name}{i:02d}"
            members.setdefault(name, []).append(chip_id)
            ids.append(chip_id)
            vectors.append(centres[k] + 0.6 * rng.standard_normal(dim))
            places.append((10.0 + 0.02 * i, 45.0 + 0.02 * k))
    write_table(db_uri, table, ids, np.array(vectors), places)
    return members
