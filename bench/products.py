"""Published embedding products: indexing an AlphaEarth-layout raster, and importing a GeoParquet
product, each beside the bare reader doing the same reads in the same run.

A. An AEF-layout COG (64 int8 bands, -128 nodata, 10 m UTM, 512 px blocks, deflate) is indexed
   with `--encoder aef` (de-quantise, mask, pool, write rows, PCA thumbnails excluded) and read by
   rasterio alone over the same chip windows (all 64 bands per window, nothing else done).
B. A Major TOM-layout GeoParquet file is imported (`import_product`: a checking pass, then the
   writing pass) and read by pyarrow alone (the same columns, the same batch size).

The two sides of each pair run in turns (`--rounds`), so both see the same machine load; the
file is in the page cache for both (it was just written), so MB/s is decode + work, not disk.

    python bench/products.py --workdir /tmp/products-bench --side 2048 --size 64 --rows 200000
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def write_aef(path: Path, side: int) -> None:
    import rasterio
    from affine import Affine

    rng = np.random.default_rng(0)
    profile = dict(driver="COG", width=side, height=side, count=64, dtype="int8", crs="EPSG:32631",
                   transform=Affine(10.0, 0.0, 500_000.0, 0.0, -10.0, 5_700_000.0), nodata=-128,
                   blocksize=512, compress="deflate")
    # Smooth-ish values (a real product compresses like imagery, not like noise).
    base = rng.integers(-100, 100, size=(64, side // 16, side // 16)).astype(np.int16)
    values = np.repeat(np.repeat(base, 16, axis=1), 16, axis=2)
    values = (values + rng.integers(-8, 9, size=values.shape)).clip(-127, 127).astype(np.int8)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(values)


def rasterio_windows(path: Path, size: int) -> tuple[float, int]:
    """Seconds to read every chip window (all bands) with rasterio, and the bytes decoded."""
    import rasterio
    from rasterio.windows import Window

    started = time.perf_counter()
    decoded = 0
    with rasterio.open(path) as src:
        for row in range(0, src.height - size + 1, size):
            for col in range(0, src.width - size + 1, size):
                decoded += src.read(window=Window(col, row, size, size)).nbytes
    return time.perf_counter() - started, decoded


def chipscout_index(path: Path, size: int, db: Path) -> tuple[float, int]:
    from chipscout.indexer.chips import ChipGrid
    from chipscout.indexer.ingest import EncoderChoice, IndexJob
    from chipscout.indexer.ingest.local import run_local
    from chipscout.indexer.sources import local_source

    shutil.rmtree(db, ignore_errors=True)
    source = local_source(path, sensor="aef")
    job = IndexJob(db_uri=str(db), table_name="aef", encoder=EncoderChoice("aef", {}), grid=ChipGrid(size, size),
                   progress=False, max_chips_per_source=10_000_000)
    started = time.perf_counter()
    summary = run_local([source], job)  # the run alone: PCA thumbnails are a separate step
    return time.perf_counter() - started, summary.chips_new


def write_major_tom(path: Path, rows: int, dim: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import shapely

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.indexer.ingest.test_import import _geo_metadata

    rng = np.random.default_rng(1)
    writer = None
    for start in range(0, rows, 50_000):
        count = min(50_000, rows - start)
        lon = 10 + 0.01 * (np.arange(start, start + count) % 1000)
        lat = 45 + 0.01 * (np.arange(start, start + count) // 1000)
        boxes = shapely.box(lon, lat, lon + 0.01, lat + 0.01)
        table = pa.table({
            "unique_id": [f"cell{i}" for i in range(start, start + count)],
            "embedding": pa.FixedSizeListArray.from_arrays(
                pa.array(rng.normal(size=count * dim).astype(np.float32)), dim),
            "timestamp": pa.array(np.full(count, np.datetime64("2021-06-01T10:00:00", "us"))).cast(
                pa.timestamp("us", tz="UTC")),
            "product_id": ["S2A_MSIL2A_20210601"] * count,
            "geometry": pa.array(shapely.to_wkb(boxes).tolist(), pa.binary()),
        }).replace_schema_metadata({b"geo": _geo_metadata()})
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table, row_group_size=8192)
    writer.close()


def pyarrow_read(path: Path, batch_rows: int) -> tuple[float, int]:
    import pyarrow.dataset as ds

    started = time.perf_counter()
    rows = 0
    for batch in ds.dataset(str(path), format="parquet").to_batches(
            columns=["embedding", "geometry", "unique_id", "timestamp"], batch_size=batch_rows):
        rows += batch.num_rows
    return time.perf_counter() - started, rows


def chipscout_import(path: Path, db: Path, batch_rows: int) -> tuple[float, int]:
    from chipscout.indexer.ingest import importing

    shutil.rmtree(db, ignore_errors=True)
    original = importing.fill_pca_thumbnails
    importing.fill_pca_thumbnails = lambda store: 0  # measured apart: pictures are not the import
    try:
        started = time.perf_counter()
        summary = importing.import_product(str(path), str(db), "tom", batch_rows=batch_rows)
        return time.perf_counter() - started, summary.rows_new
    finally:
        importing.fill_pca_thumbnails = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/products-bench")
    parser.add_argument("--side", type=int, default=2048, help="AEF raster side in px")
    parser.add_argument("--size", type=int, default=64, help="chip size in px")
    parser.add_argument("--rows", type=int, default=200_000, help="GeoParquet rows")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--batch-rows", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    raster, parquet = work / "aef.tif", work / "major_tom.parquet"
    if not raster.exists():
        write_aef(raster, args.side)
    if not parquet.exists():
        write_major_tom(parquet, args.rows, args.dim)
    # Pay the imports (torch, lancedb) before any clock starts.
    import chipscout.indexer.ingest.importing  # noqa: F401
    import chipscout.indexer.ingest.local  # noqa: F401
    print(f"load average at start: {os.getloadavg()}")
    print(f"A. {raster} ({raster.stat().st_size / 2**20:.1f} MiB on disk, {args.side} px a side, "
          f"{args.size} px chips)")
    for round_ in range(args.rounds):
        base_s, decoded = rasterio_windows(raster, args.size)
        ours_s, chips = chipscout_index(raster, args.size, work / "db-aef")
        mb = decoded / 2**20
        print(f"  round {round_ + 1}: rasterio windows {base_s:.2f} s ({mb / base_s:.0f} MB/s decoded); "
              f"chipscout index --encoder aef {ours_s:.2f} s, {chips} chips, {chips / ours_s:.0f} chips/s, "
              f"{mb / ours_s:.0f} MB/s; ratio {ours_s / base_s:.2f}x the bare reads")
    print(f"B. {parquet} ({parquet.stat().st_size / 2**20:.1f} MiB, {args.rows} rows x {args.dim}-d)")
    for round_ in range(args.rounds):
        base_s, rows = pyarrow_read(parquet, args.batch_rows)
        ours_s, new = chipscout_import(parquet, work / "db-tom", args.batch_rows)
        print(f"  round {round_ + 1}: pyarrow read {base_s:.2f} s ({rows / base_s:,.0f} rows/s); "
              f"chipscout import {ours_s:.2f} s ({new / ours_s:,.0f} rows/s); ratio {ours_s / base_s:.1f}x")
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
