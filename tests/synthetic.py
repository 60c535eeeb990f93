"""Synthetic chip tables, one home for the tests and the benchmarks (`bench/search.py` imports
`tests.synthetic`): rows in ChipStore's layout with known vectors and footprints.

- Small tables whose right answer is known exactly (labelling, refine, search): `write_table`,
  `clustered_table`, written through ChipStore in the pipeline's row layout.
- `SyntheticChips`: large seeded tables for the search benchmark. Vectors: a mixture of Gaussian
  "land-cover" clusters in a 64-d latent space, lifted to `dim` dimensions by a fixed random map,
  plus a little isotropic noise, then L2-normalised: learned embeddings have a low intrinsic
  dimension, and pure 768-d noise would make every method look the same (and ANN look worse than
  it is on real data). Metadata: scenes of 100 chips (a 10 x 10 grid of 1.28 km chips) placed
  uniformly over Europe (lon -10..40, lat 36..70), each acquired on a random day of 2023-2024,
  with Beta-distributed cloud and mostly-zero nodata fractions. Everything is seeded: the same
  arguments give the same rows.

Synthetic pixels for the encoder tests are elsewhere (`tests/encoders/synthetic.py`): they must
import torch only, so the GPU tests run where LanceDB is not installed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

import numpy as np
import pyarrow as pa
import shapely

from chipscout.indexer.ingest.fitted_state import encode_state
from chipscout.indexer.store import ChipStore, IndexConfig, Normalization, chip_schema

# ----------------------------------------------------------------------------- small exact tables
WHEN = datetime(2024, 6, 15, tzinfo=timezone.utc)


def synthetic_config(dim: int, label: str = "synthetic-test", chip_size_px: int = 64) -> IndexConfig:
    """The table config of synthetic vectors: encoder `synthetic`, four reflectance bands."""
    return IndexConfig(
        encoder="synthetic", encoder_config={"dim": dim}, encoder_label=label,
        embedding_dim=dim, sensor="sentinel-2-l2a", bands=("blue", "green", "red", "nir"),
        band_wavelengths_um=(0.493, 0.56, 0.665, 0.842),
        normalization=Normalization("reflectance", (0.0,) * 4, (1.0,) * 4),
        chip_size_px=chip_size_px, chip_stride_px=chip_size_px)


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


# ----------------------------------------------------------------------------- benchmark tables
CONTINENT = (-10.0, 36.0, 40.0, 70.0)  # lon/lat box of the footprints
FIRST_DAY = datetime(2023, 1, 1, tzinfo=timezone.utc)
DAYS = 731
CHIP_DEG = 0.0115  # ~1.28 km of latitude
SCENE_ROWS, SCENE_COLS = 10, 10
LATENT_DIM = 64


def bench_config(dim: int) -> IndexConfig:
    return synthetic_config(dim, label="synthetic-clusters", chip_size_px=128)


@dataclass
class SyntheticChips:
    """A seeded generator of chip rows; `batches()` yields Arrow tables in ChipStore's layout."""

    rows: int
    dim: int = 768
    seed: int = 0
    clusters: int = 0  # 0: rows // 200, at least 64
    _lift: np.ndarray = field(init=False, repr=False)
    _centres: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.seed)
        self.clusters = self.clusters or max(64, self.rows // 200)
        self._lift = (rng.standard_normal((LATENT_DIM, self.dim)) / np.sqrt(LATENT_DIM)).astype(np.float32)
        self._centres = rng.standard_normal((self.clusters, LATENT_DIM)).astype(np.float32)

    def vectors(self, count: int, rng: np.random.Generator, scene_clusters: np.ndarray) -> np.ndarray:
        members = scene_clusters[rng.integers(0, len(scene_clusters), count)]
        latent = self._centres[members] + 1.0 * rng.standard_normal((count, LATENT_DIM), dtype=np.float32)
        vectors = latent @ self._lift + 0.3 * rng.standard_normal((count, self.dim), dtype=np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        return vectors.astype(np.float32)

    def queries(self, count: int, seed: int = 1) -> np.ndarray:
        """Query vectors drawn from the same distribution (not rows of the table)."""
        rng = np.random.default_rng(10_000 + seed)
        return self.vectors(count, rng, np.arange(self.clusters))

    def batches(self, batch_rows: int = 50_000) -> Iterator[tuple[pa.Table, np.ndarray]]:
        """(rows, vectors) in batches; scene after scene, as a real ingest arrives."""
        per_scene = SCENE_ROWS * SCENE_COLS
        scenes = -(-self.rows // per_scene)
        rng = np.random.default_rng(self.seed + 1)
        min_lon, min_lat, max_lon, max_lat = CONTINENT
        scene_lon = rng.uniform(min_lon, max_lon - SCENE_COLS * CHIP_DEG * 2, scenes)
        scene_lat = rng.uniform(min_lat, max_lat - SCENE_ROWS * CHIP_DEG, scenes)
        scene_day = rng.integers(0, DAYS, scenes)
        scene_second = rng.integers(36_000, 43_200, scenes)
        scene_clusters = np.stack([rng.choice(self.clusters, size=12, replace=False)
                                   for _ in range(scenes)])
        produced = 0
        scene = 0
        while produced < self.rows:
            count = min(batch_rows, self.rows - produced)
            ids, lon0, lat0, acquired, source = [], [], [], [], []
            row_in, col_in = [], []
            remaining = count
            vectors = []
            while remaining > 0:
                take = min(per_scene - (produced + count - remaining) % per_scene, remaining)
                start = (produced + count - remaining) % per_scene
                positions = np.arange(start, start + take)
                rows_, cols_ = positions // SCENE_COLS, positions % SCENE_COLS
                vectors.append(self.vectors(take, rng, scene_clusters[scene]))
                # Longitude degrees shrink with latitude: widen chips to keep them ~square.
                widen = 1.0 / np.cos(np.radians(scene_lat[scene]))
                lon0.append(scene_lon[scene] + cols_ * CHIP_DEG * widen)
                lat0.append(scene_lat[scene] + rows_ * CHIP_DEG)
                when = FIRST_DAY + timedelta(days=int(scene_day[scene]), seconds=int(scene_second[scene]))
                acquired.extend([when] * take)
                source.extend([f"S2-synth-{scene:07d}"] * take)
                ids.extend(f"S2-synth-{scene:07d}_r{r * 128:06d}_c{c * 128:06d}_s128"
                           for r, c in zip(rows_, cols_))
                row_in.append(rows_ * 128), col_in.append(cols_ * 128)
                remaining -= take
                if (start + take) % per_scene == 0:
                    scene += 1
            vectors_ = np.concatenate(vectors)
            lon_lo = np.concatenate(lon0)
            lat_lo = np.concatenate(lat0)
            widen = 1.0 / np.cos(np.radians(lat_lo))
            lon_hi, lat_hi = lon_lo + CHIP_DEG * widen, lat_lo + CHIP_DEG
            boxes = shapely.box(lon_lo, lat_lo, lon_hi, lat_hi)
            cloud = rng.beta(0.4, 2.0, count).astype(np.float32)
            nodata = np.where(rng.random(count) < 0.1, rng.random(count) * 0.5, 0.0).astype(np.float32)
            now = datetime.now(timezone.utc)
            table = pa.table({
                "chip_id": ids,
                "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors_.ravel()), self.dim),
                "footprint": shapely.to_wkb(boxes).tolist(),
                "min_lon": lon_lo, "min_lat": lat_lo, "max_lon": lon_hi, "max_lat": lat_hi,
                "center_lon": (lon_lo + lon_hi) / 2, "center_lat": (lat_lo + lat_hi) / 2,
                "acquired": pa.array(acquired, type=pa.timestamp("us", tz="UTC")),
                "source_id": source,
                "source_path": [f"s3://synthetic/{s}.tif" for s in source],
                "sensor": ["sentinel-2-l2a"] * count,
                "crs": ["EPSG:4326"] * count,
                "row_off": pa.array(np.concatenate(row_in), pa.int32()),
                "col_off": pa.array(np.concatenate(col_in), pa.int32()),
                "size_px": pa.array(np.full(count, 128), pa.int32()),
                "gsd_m": pa.array(np.full(count, 10.0), pa.float32()),
                "nodata_fraction": pa.array(nodata),
                "cloud_fraction": pa.array(cloud),
                "radiometry": ["synthetic"] * count,
                "thumbnail": pa.array([b""] * count, pa.binary()),
                "indexed_at": pa.array([now] * count, type=pa.timestamp("us", tz="UTC")),
            })
            produced += count
            yield table, vectors_


@dataclass(frozen=True)
class FilterBox:
    """A date window and a lon/lat box, with the share of rows it matches."""

    date_from: datetime
    date_to: datetime
    bbox: tuple[float, float, float, float]
    selectivity: float


class FootprintIndex:
    """The columns a date+area filter reads, in memory, to draw filters of a given selectivity."""

    def __init__(self) -> None:
        self._parts: list[dict[str, np.ndarray]] = []

    def add(self, rows: pa.Table) -> None:
        self._parts.append({
            "acquired_us": rows["acquired"].cast(pa.int64()).to_numpy(),
            **{c: rows[c].to_numpy() for c in ("min_lon", "min_lat", "max_lon", "max_lat")}})

    def _columns(self) -> dict[str, np.ndarray]:
        if len(self._parts) > 1:
            self._parts = [{k: np.concatenate([p[k] for p in self._parts]) for k in self._parts[0]}]
        return self._parts[0]

    def matches(self, date_from: datetime, date_to: datetime,
                bbox: tuple[float, float, float, float]) -> np.ndarray:
        c = self._columns()
        start = int(date_from.timestamp() * 1e6)
        end = int(date_to.timestamp() * 1e6)
        return ((c["acquired_us"] >= start) & (c["acquired_us"] <= end)
                & (c["max_lon"] >= bbox[0]) & (c["min_lon"] <= bbox[2])
                & (c["max_lat"] >= bbox[1]) & (c["min_lat"] <= bbox[3]))

    def draw(self, selectivity: float, rng: np.random.Generator) -> FilterBox:
        """A random filter (date share and area share ~ sqrt(selectivity) each), its box scaled
        by bisection until it matches within 15 % of `selectivity` (or the closest of 30 tries)."""
        side = np.sqrt(selectivity)
        min_lon, min_lat, max_lon, max_lat = CONTINENT
        days = max(1, round(DAYS * side))
        start_day = int(rng.integers(0, DAYS - days + 1))
        date_from = FIRST_DAY + timedelta(days=start_day)
        date_to = date_from + timedelta(days=days) - timedelta(microseconds=1)
        # Centre the box where a box of the nominal share fits inside the continent.
        margin_w, margin_h = (max_lon - min_lon) * side / 2, (max_lat - min_lat) * side / 2
        centre = (rng.uniform(min_lon + margin_w, max_lon - margin_w),
                  rng.uniform(min_lat + margin_h, max_lat - margin_h))
        low, high = 0.0, 1.0
        best = None
        total = len(self._columns()["acquired_us"])
        for _ in range(30):
            scale = (low + high) / 2
            half_w, half_h = (max_lon - min_lon) * scale / 2, (max_lat - min_lat) * scale / 2
            bbox = (max(-180.0, centre[0] - half_w), max(-90.0, centre[1] - half_h),
                    min(180.0, centre[0] + half_w), min(90.0, centre[1] + half_h))
            share = float(self.matches(date_from, date_to, bbox).sum()) / total
            if best is None or abs(share - selectivity) < abs(best.selectivity - selectivity):
                best = FilterBox(date_from, date_to, bbox, share)
            if abs(share - selectivity) <= 0.15 * selectivity:
                break
            if share < selectivity:
                low = scale
            else:
                high = scale
        assert best is not None
        return best
